"""Pair sources and exact likelihoods that label configs of the gmm domain name (``configs/label/*.yaml``).

A pair callable is ``(testbed, n, generator) -> (x, y)``: ``n`` fresh mixture samples with their labels,
so two labels drawn from two callables come from two separate, independent data sets (CTRL Sec. 5).
An exact callable is ``testbed -> (x -> log p(y | x))``: the true label likelihood, used for evaluation
and for the ``ctrl_oracle_reward`` row, never as the ``ctrl`` row's reward.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from domains.gmm.testbed import Testbed


def component_pairs(testbed: Testbed, n: int, generator: torch.Generator) -> tuple[Tensor, Tensor]:
    """(x, class of the generating component) for n mixture samples."""
    x, comp = testbed.mixture.sample(n, generator)
    return x, testbed.component_label.classes[comp]


def logistic_pairs(testbed: Testbed, n: int, generator: torch.Generator, index: int = 0) -> tuple[Tensor, Tensor]:
    """(x, y_index) for n mixture samples, y_index ~ softmax(W_index x + b_index)."""
    x, _ = testbed.mixture.sample(n, generator)
    return x, testbed.logistic_labels.sample_labels(x, generator)[:, index]


def component_log_prob(testbed: Testbed) -> Callable[[Tensor], Tensor]:
    """x -> log p(y | x) of the component label, (B, n_classes)."""
    return testbed.component_label.log_prob


def logistic_log_prob(testbed: Testbed, index: int = 0) -> Callable[[Tensor], Tensor]:
    """x -> log p(y_index | x) of one logistic label, (B, n_classes)."""
    return testbed.logistic_labels.log_prob_fns()[index]
