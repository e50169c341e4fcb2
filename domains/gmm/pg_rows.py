"""Policy-gradient rows of the gmm suite (``ctrl_pg``, ``ddpo``): the mixture's label as a black-box reward.

The suite trains these rows with :func:`train_pg` and samples them twice, with the suite's step count and
with the training step count: a continuous-time estimator must do as well at both (docs/policy_gradient.md).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from ctrl_bio.model import AugmentedScore, VectorPathway
from ctrl_bio.policy_gradient import PolicyGradientResult, Variant, finetune_policy_gradient
from ctrl_bio.reward import LabelPrior, Reward
from domains.gmm.testbed import Testbed


def train_pg(variant: Variant, testbed: Testbed, reward: Reward, prior: LabelPrior, *, n_steps_train: int = 50,
             t_end: float = 1e-3, pathway: dict[str, Any], pg: dict[str, Any], seed: int,
             checkpoint_path: str | Path | None = None,
             progress: bool = True) -> tuple[AugmentedScore, PolicyGradientResult]:
    """Build the augmented model on the testbed's exact pre-trained score and train it by policy gradient.

    Args:
        variant: ``ctrl_pg`` or ``ddpo``.
        reward: a black box ``(x0, y) -> (B,)`` such as
            ``ctrl_bio.blackbox.label_likelihood_black_box(testbed.component_label.log_prob)``.
        prior: p(y) the training labels are drawn from.
        n_steps_train: Euler-Maruyama steps of the training paths.
        pathway: keyword arguments of :class:`ctrl_bio.model.VectorPathway` (hidden, depth, n_fourier).
        pg: keyword arguments of :func:`ctrl_bio.policy_gradient.finetune_policy_gradient`
            (``configs/method/ctrl_pg.yaml``); ``variant``, ``n_steps`` and ``t_end`` are set here, and the
            ``ddpo`` row never gets the pre-trained pool of ``ctrl_pg`` (published DDPO is on-policy only).
    """
    pg = {k: v for k, v in pg.items() if k not in ("variant", "n_steps", "t_end", "seed", "progress",
                                                   "checkpoint_path")}
    if variant == "ddpo":
        pg |= {"reference_pool": 0, "reference_updates": 0}
    torch.manual_seed(seed)
    model = AugmentedScore(testbed.pretrained,
                           VectorPathway(testbed.dim, (testbed.component_label.n_classes,), **pathway), testbed.sde)
    result = finetune_policy_gradient(model, testbed.sde, reward, prior, (testbed.dim,), variant=variant,
                                      n_steps=n_steps_train, t_end=t_end, seed=seed, progress=progress,
                                      checkpoint_path=checkpoint_path, **pg)
    return model, result
