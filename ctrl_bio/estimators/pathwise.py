"""CTRL's pathwise estimator: -J by backpropagation through the Euler-Maruyama sampler (:func:`pathwise_loss`)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from ctrl_bio.estimators.base import Problem
from ctrl_bio.objective import MemoryMode, pathwise_loss


@dataclass
class Pathwise:
    """Reparameterised gradient of J through the whole chain (``full``, ``checkpoint``: the same gradient with memory
    flat in the number of steps) or through its last ``grad_last_k`` steps (``truncate``: DRaFT-K, Clark et al. 2024).
    On-policy: a mode the model stops visiting gets no gradient back, so from a cold start it can collapse."""

    steps: int = 200
    batch_size: int = 128
    lr: float = 1e-3
    memory: MemoryMode = "checkpoint"
    grad_last_k: int = 10
    name: str = "pathwise"

    def prepare(self, problem: Problem, generator: torch.Generator) -> dict:
        return {}

    def loss(self, problem: Problem, y: Tensor, generator: torch.Generator) -> Tensor:
        p = problem
        return pathwise_loss(p.model, p.sde, p.reward, y, p.x_shape, n_steps=p.n_steps, t_end=p.t_end,
                             alpha=p.objective.alpha, gamma=p.objective.gamma, memory=self.memory,
                             grad_last_k=self.grad_last_k, spacing=p.spacing, generator=generator).loss
