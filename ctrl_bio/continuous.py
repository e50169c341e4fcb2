"""Continuous labels for CTRL: a real-valued target y (a molecule's HOMO-LUMO gap, a sequence's GC content).

CTRL (Zhao et al. 2024, "Adding Conditional Control to Diffusion Models with Reinforcement Learning", eq. 6;
DESIGN.md) maximises

    J(theta) = E_{y ~ p(y)} E_{x ~ P_theta(.|y)} [ gamma * log p(y | x_0) ] - alpha * KL(P_theta(.|y) || P_pre),

and nothing in it needs y to be a class. The label space (:class:`ctrl_bio.label_space.ContinuousLabels`: NaN for
no request, Fourier features of the standardised value, the pool tilted per requested value) plugs a real y into
the one pathway family (:mod:`ctrl_bio.model`), the one reward-tilted pool and the one training loop
(:func:`ctrl_bio.finetune.finetune` / :func:`ctrl_bio.finetune.train` with any estimator). What is truly continuous
lives here:

- the reward: a Gaussian likelihood p(y | x) = N(y; f(x), s^2) around a regressor f trained on clean pairs, with
  s its calibrated error, the RMSE on a held-out split (:func:`fit_regressor`, :class:`GaussianReward`);
- the label prior: the empirical distribution of the observed y (:class:`ContinuousPrior`);
- :func:`finetune_continuous`: the score-matching warm start on the pool tilted by N(y; f(x_0), s^2)^(gamma/alpha),
  whose score at every t is the optimum's (Vincent 2011), then pathwise, each as its own :func:`train` run.

The pathway and pool classes this module used to define are re-exported from where they now live.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import torch
from torch import Tensor, nn

from ctrl_bio.estimators import Objective, Pathwise, Problem, ScoreMatching, sample_pretrained_pool
from ctrl_bio.finetune import FinetuneResult, train
from ctrl_bio.label_space import ContinuousLabels, ContinuousWeightedPool, check_continuous_labels, value_features
from ctrl_bio.model import (
    ContinuousAugmentedScore,
    ContinuousLabelEmbedding,
    ContinuousPathwayScore,
    ContinuousVectorPathway,
)
from ctrl_bio.objective import MemoryMode, ScoreTarget
from ctrl_bio.reward import fit_minibatches
from ctrl_bio.sampling import Spacing
from ctrl_bio.sde import SDE

__all__ = ["CalibratedRegressor", "ContinuousAugmentedScore", "ContinuousFinetuneResult", "ContinuousLabelEmbedding",
           "ContinuousLabels", "ContinuousPathwayScore", "ContinuousPrior", "ContinuousVectorPathway",
           "ContinuousWeightedPool", "GaussianReward", "RegressorReport", "check_continuous_labels",
           "finetune_continuous", "fit_regressor", "gaussian_log_likelihood", "sample_pretrained_pool",
           "value_features"]

ContinuousEstimator = Literal["pathwise", "score_matching", "hybrid"]


def gaussian_log_likelihood(pred: Tensor, y: Tensor, sigma: Tensor) -> Tensor:
    """sum_k log N(y_k; pred_k, sigma_k^2) over the last dimension, broadcasting pred against y; NaN y_k adds 0."""
    mask = ~torch.isnan(y)
    sigma = sigma.to(pred)
    z = (torch.where(mask, y, torch.zeros_like(y)) - pred) / sigma
    log_n = -0.5 * z**2 - torch.log(sigma) - 0.5 * math.log(2 * math.pi)
    return torch.where(mask, log_n, torch.zeros_like(log_n)).sum(-1)


class GaussianReward:
    """r(x0, y) = sum_k log N(y_k; f_k(x0), sigma_k^2), the Gaussian likelihood reward of DESIGN.md.

    Same call signature as :class:`ctrl_bio.reward.LogLikelihoodReward`, ``(x0, y) -> (B,)`` with y (B, K) float.
    The normalising constant -log(sigma sqrt(2 pi)) is included, so that J's optimum at alpha = gamma = 1 is the
    log evidence E_y log p(y) as for categorical labels. A NaN y_k (no request) adds zero.

    Args:
        regressor: ``x0 -> (B, K)`` (or (B,) for one label) predictions f(x0), e.g. a :class:`CalibratedRegressor`;
            or a sequence of K such callables, one per label (separate pair data sets, conditionally
            independent given x as in CTRL Sec. 5).
        sigma: the calibrated error per label (a scalar or K values); default: ``regressor.sigma``.
    """

    def __init__(self, regressor: Callable[[Tensor], Tensor] | Sequence[Callable[[Tensor], Tensor]],
                 sigma: float | Sequence[float] | Tensor | None = None):
        self.regressors = list(regressor) if isinstance(regressor, (list, tuple)) else [regressor]
        if sigma is None:
            sigma = torch.cat([torch.as_tensor(r.sigma, dtype=torch.float32).flatten() for r in self.regressors])
        self.sigma = torch.as_tensor(sigma, dtype=torch.float32).flatten()
        if (self.sigma <= 0).any():
            raise ValueError(f"sigma must be positive, got {self.sigma.tolist()}")

    @property
    def n_labels(self) -> int:
        """K as far as sigma tells (1 when one sigma is shared by every label)."""
        return self.sigma.numel()

    def predict(self, x0: Tensor) -> Tensor:
        """f(x0), (B, K)."""
        preds = [p if p.ndim == 2 else p.reshape(x0.shape[0], -1) for p in (r(x0) for r in self.regressors)]
        pred = torch.cat(preds, dim=1)
        if self.sigma.numel() > 1 and pred.shape[1] != self.n_labels:  # one sigma broadcasts over every label
            raise ValueError(f"the regressor predicts {pred.shape[1]} labels but sigma has {self.n_labels}")
        return pred

    def log_prob(self, pred: Tensor, y: Tensor) -> Tensor:
        """sum_k log N(y_k; pred_k, sigma_k^2) for predictions pred (..., K) against y (..., K), broadcast."""
        return gaussian_log_likelihood(pred, y, self.sigma)

    def __call__(self, x0: Tensor, y: Tensor) -> Tensor:
        pred = self.predict(x0)
        if y.ndim != 2 or y.shape[1] != pred.shape[1]:
            raise ValueError(f"labels must have shape (batch_size, {pred.shape[1]}), got {tuple(y.shape)}")
        return self.log_prob(pred, y.to(pred.device))


class CalibratedRegressor(nn.Module):
    """f(x) = loc + scale * net(x) in label units, with the calibrated error ``sigma`` per label; frozen once fitted."""

    def __init__(self, net: nn.Module, loc: Tensor, scale: Tensor, sigma: Tensor):
        super().__init__()
        self.net = net
        self.register_buffer("loc", torch.as_tensor(loc, dtype=torch.float32).flatten())
        self.register_buffer("scale", torch.as_tensor(scale, dtype=torch.float32).flatten())
        self.register_buffer("sigma", torch.as_tensor(sigma, dtype=torch.float32).flatten())

    def forward(self, x: Tensor) -> Tensor:
        """Predictions in label units, (B, K), on x's device; the network runs where its weights are."""
        out = self.net(x.to(self.loc.device))
        return (self.loc + self.scale * out.reshape(x.shape[0], -1)).to(x.device)


@dataclass
class RegressorReport:
    """How a reward regressor fared on its held-out calibration split (per label where a tuple)."""

    train_size: int
    calib_size: int
    skipped: int
    rmse: tuple[float, ...]
    mae: tuple[float, ...]
    sigma: tuple[float, ...]
    nll: float
    train_rmse: tuple[float, ...] = field(default_factory=tuple)


def fit_regressor(net: nn.Module, x: Tensor, y: Tensor, *, calib_fraction: float = 0.2, epochs: int = 200,
                  batch_size: int = 256, lr: float = 3e-3, weight_decay: float = 1e-4,
                  seed: int = 0) -> tuple[CalibratedRegressor, RegressorReport]:
    """Train ``net`` by MSE on standardised y, then set sigma to its RMSE on a held-out split.

    The held-out RMSE is the constant scale that minimises the Gaussian NLL of the held-out residuals, the
    continuous analogue of temperature scaling (Guo et al. 2017) for the reward of :class:`GaussianReward`.

    Args:
        net: a module mapping x (B, ...) to (B, K) (or (B,) for one label) standardised predictions.
        x: inputs, (N, ...).
        y: real labels, (N,) or (N, K). Rows with a NaN or infinite label are skipped and counted.
        calib_fraction: fraction of the pairs held out for calibration (never trained on).
    Returns:
        (the frozen :class:`CalibratedRegressor`, a :class:`RegressorReport` with the held-out RMSE, MAE and NLL).
    """
    generator = torch.Generator().manual_seed(seed)
    y2 = y.reshape(y.shape[0], -1).float()
    if y2.shape[0] != x.shape[0]:
        raise ValueError(f"x has {x.shape[0]} rows but y has {y2.shape[0]}")
    good = torch.isfinite(y2).all(dim=1)
    skipped = int((~good).sum())
    x, y2 = x[good], y2[good]
    n = x.shape[0]
    n_calib = max(int(round(calib_fraction * n)), 1)
    if n - n_calib < 2:
        raise ValueError(f"need at least 3 pairs with finite labels to train and calibrate a regressor, got {n}")
    perm = torch.randperm(n, generator=generator)
    calib, train = perm[:n_calib], perm[n_calib:]
    loc, scale = y2[train].mean(0), y2[train].std(0).clamp_min(1e-8)
    z = (y2 - loc) / scale
    fit_minibatches(net, train, lambda idx: ((net(x[idx]).reshape(idx.numel(), -1) - z[idx]) ** 2).mean(),
                    epochs=epochs, batch_size=batch_size, lr=lr, weight_decay=weight_decay, generator=generator)
    n_train = train.numel()
    regressor = CalibratedRegressor(net, loc, scale, torch.ones_like(loc)).requires_grad_(False)
    with torch.no_grad():
        resid = regressor(x[calib]) - y2[calib]
        train_resid = regressor(x[train]) - y2[train]
    rmse = resid.pow(2).mean(0).sqrt().clamp_min(1e-8)
    regressor.sigma.copy_(rmse)
    nll = float(-gaussian_log_likelihood(resid, torch.zeros_like(resid), rmse).mean())
    report = RegressorReport(train_size=n_train, calib_size=n_calib, skipped=skipped,
                             rmse=tuple(rmse.tolist()), mae=tuple(resid.abs().mean(0).tolist()),
                             sigma=tuple(rmse.tolist()), nll=nll,
                             train_rmse=tuple(train_resid.pow(2).mean(0).sqrt().tolist()))
    return regressor, report


# ---------------------------------------------------------------------------------------------------- prior


class ContinuousPrior:
    """p(y) for real labels: the empirical distribution of the observed values (resampling them).

    Args:
        values: observed labels, (N,) or (N, K), drawn jointly (one row at a time); rows with a NaN are dropped.
            For several labels from separate pair sets use :meth:`product` (product of marginals, DESIGN.md).
    """

    def __init__(self, values: Tensor | Sequence[float]):
        v = torch.as_tensor(values, dtype=torch.float32)
        v = v.reshape(v.shape[0], -1) if v.ndim else v.reshape(1, 1)
        self.columns = [v[torch.isfinite(v).all(1)]]
        if self.columns[0].shape[0] == 0:
            raise ValueError("a continuous prior needs at least one finite label value")

    @classmethod
    def product(cls, values: Sequence[Tensor | Sequence[float]]) -> ContinuousPrior:
        """Independent resampling of each label's own observed values (labels from separate pair data sets)."""
        priors = [cls(v) for v in values]
        prior = priors[0]
        prior.columns = [c for p in priors for c in p.columns]
        return prior

    @property
    def n_labels(self) -> int:
        return sum(c.shape[1] for c in self.columns)

    @property
    def loc(self) -> Tensor:
        """Mean of each label, (K,): the standardisation a label pathway should use."""
        return torch.cat([c.mean(0) for c in self.columns])

    @property
    def scale(self) -> Tensor:
        """Standard deviation of each label, (K,) (1 where a label takes a single value)."""
        std = torch.cat([c.std(0) if c.shape[0] > 1 else torch.zeros(c.shape[1]) for c in self.columns])
        return torch.where(std > 0, std, torch.ones_like(std))

    def sample(self, n: int, generator: torch.Generator | None = None) -> Tensor:
        """Labels of shape (n, K), float."""
        return torch.cat([c[torch.randint(c.shape[0], (n,), generator=generator)] for c in self.columns], dim=1)


@dataclass
class ContinuousFinetuneResult(FinetuneResult):
    """:class:`ctrl_bio.finetune.FinetuneResult` plus the effective sample sizes of the tilted pool.

    Attributes:
        ess: Kish ESS of the pool's weights over a probe of 256 prior draws: ``min``, ``median``, ``mean``, and
            ``pool_size`` (:meth:`ctrl_bio.label_space.ContinuousLabels.pool_summary`).
    """

    ess: dict = field(default_factory=dict)


def finetune_continuous(model: ContinuousPathwayScore | ContinuousAugmentedScore, sde: SDE, reward: GaussianReward,
                        label_prior: ContinuousPrior, x_shape: tuple[int, ...], *,
                        estimator: ContinuousEstimator = "score_matching", alpha: float = 1.0, gamma: float = 1.0,
                        steps: int = 200, batch_size: int = 128, lr: float = 1e-3, n_steps: int = 100,
                        t_end: float = 1e-3, memory: MemoryMode = "checkpoint", grad_last_k: int = 10,
                        grad_clip: float | None = 1.0, sm_steps: int = 2000, sm_batch_size: int = 512,
                        sm_lr: float = 2e-3, pool_size: int = 20000, pool_x0: Tensor | None = None,
                        eval_every: int = 100, eval_batch_size: int = 512,
                        checkpoint_path: str | Path | None = None, seed: int = 0, progress: bool = True,
                        spacing: Spacing = "uniform", sm_spacing: Spacing = "uniform",
                        sm_target: ScoreTarget = "denoising") -> ContinuousFinetuneResult:
    """CTRL for continuous labels: the estimators of :func:`ctrl_bio.finetune.finetune`, each phase its own run.

    ``score_matching``: :class:`ctrl_bio.estimators.ScoreMatching` on the pre-trained pool resampled by
    N(y; f(x0), sigma^2)^(gamma/alpha) for each requested y (the label space's pool,
    :class:`ctrl_bio.label_space.ContinuousWeightedPool`); ``pathwise``: :class:`ctrl_bio.estimators.Pathwise`;
    ``hybrid``: the first, then the second. Each phase is one :func:`ctrl_bio.finetune.train` run from its own seed
    (``seed``, ``seed + 2``) that ends on an evaluation; the history counts updates across both.
    (:func:`ctrl_bio.finetune.finetune` runs the same estimators as one run from one seed.)
    Arguments mean what they mean in :func:`ctrl_bio.finetune.finetune` (``sm_target``: ``denoising``, ``posterior``
    or ``control``, with the pool's posterior over its items weighted per requested value). A NaN loss restores the
    last evaluated parameters (saved to ``checkpoint_path`` when given) and raises
    :class:`ctrl_bio.finetune.NonFiniteLossError`.
    """
    if estimator not in ("pathwise", "score_matching", "hybrid"):
        raise ValueError(f"estimator must be 'pathwise', 'score_matching' or 'hybrid', got {estimator!r}")
    start = time.perf_counter()
    problem = Problem(model, sde, reward, label_prior, x_shape, Objective(alpha=alpha, gamma=gamma), n_steps=n_steps,
                      t_end=t_end, spacing=spacing)
    phases = []
    if estimator != "pathwise" and sm_steps > 0:
        phases.append((ScoreMatching(steps=sm_steps, batch_size=sm_batch_size, lr=sm_lr, pool_size=pool_size,
                                     pool_x0=pool_x0, spacing=sm_spacing, target=sm_target), seed))
    if estimator != "score_matching":
        phases.append((Pathwise(steps=steps, batch_size=batch_size, lr=lr, memory=memory, grad_last_k=grad_last_k),
                       seed + 2))
    result = ContinuousFinetuneResult()
    for phase, phase_seed in phases:
        part = train(problem, [phase], grad_clip=grad_clip, eval_every=eval_every, eval_batch_size=eval_batch_size,
                     checkpoint_path=checkpoint_path, seed=phase_seed, progress=progress)
        done = result.history[-1]["step"] if result.history else 0
        # a later phase's starting point is the earlier phase's last evaluation, already recorded
        result.history += [rec | {"step": rec["step"] + done} for rec in part.history
                           if not (rec["phase"] == "init" and result.history)]
        result.prepared |= part.prepared
        result.stopped_by |= part.stopped_by
        if part.pool_ess is not None:
            result.pool_ess, result.ess = part.pool_ess, part.prepared[phase.name]["ess"]
    result.seconds = time.perf_counter() - start
    return result
