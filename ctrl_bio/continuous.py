"""Continuous labels for CTRL: a real-valued target y (a molecule's HOMO-LUMO gap, a sequence's GC content).

CTRL (Zhao et al. 2024, "Adding Conditional Control to Diffusion Models with Reinforcement Learning", eq. 6;
DESIGN.md) maximises

    J(theta) = E_{y ~ p(y)} E_{x ~ P_theta(.|y)} [ gamma * log p(y | x_0) ] - alpha * KL(P_theta(.|y) || P_pre),

and nothing in it needs y to be a class. For a real y the pieces become:

- the reward: a Gaussian likelihood p(y | x) = N(y; f(x), s^2) around a regressor f trained on clean pairs, with
  s its calibrated error, the RMSE on a held-out split (:func:`fit_regressor`, :class:`GaussianReward`);
- the label prior: the empirical distribution of the observed y (:class:`ContinuousPrior`);
- the label pathway: a small MLP of Fourier features of the standardised y whose last layer is zero, so that
  step 0 reproduces the pre-trained sampler bit for bit, added to a frozen network's time embedding
  (:class:`ContinuousLabelEmbedding`, :class:`ContinuousAugmentedScore`) or, for networks without one, a
  zero-initialised control MLP (:class:`ContinuousVectorPathway`, :class:`ContinuousPathwayScore`);
- a missing request is NaN (the continuous counterpart of ``NULL_LABEL``): it contributes exactly zero.

With these duck-typed pieces :func:`ctrl_bio.finetune.finetune` with ``estimator="pathwise"`` runs unchanged
(it calls ``label_prior.sample``, ``reward(x0, y)`` and ``model.conditioned(y)`` only). The score-matching
warm start, which for categorical labels tilts the pre-trained pool once per label combination, tilts it once per
requested value here (:class:`ContinuousWeightedPool`, :func:`finetune_continuous`): the optimum of J is
P*(x_0 | y) proportional to p_pre(x_0) N(y; f(x_0), s^2)^(gamma/alpha), whose score at every t is what denoising
score matching (Vincent 2011) learns from pool samples importance-resampled with those weights.
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

from ctrl_bio.finetune import FinetuneResult, TrainingMonitor, finetune
from ctrl_bio.model import fourier_features
from ctrl_bio.objective import MemoryMode, denoising_score_matching_loss
from ctrl_bio.progress import progress_bar
from ctrl_bio.reward import fit_minibatches
from ctrl_bio.sampling import Spacing, euler_maruyama, time_grid
from ctrl_bio.sde import SDE
from ctrl_bio.utils import append_dims, rand

ContinuousEstimator = Literal["pathwise", "score_matching", "hybrid"]


def _per_label(v: float | Sequence[float] | Tensor, n_labels: int, name: str) -> Tensor:
    """A scalar or a per-label sequence as a float tensor of shape (n_labels,)."""
    t = torch.as_tensor(v, dtype=torch.float32).flatten()
    if t.numel() == 1:
        t = t.expand(n_labels).clone()
    if t.numel() != n_labels:
        raise ValueError(f"{name} needs one value or one per label ({n_labels}), got {t.numel()}")
    return t


def check_continuous_labels(y: Tensor, n_labels: int) -> None:
    """Raise a clear error for a continuous label tensor of the wrong shape or type (NaN = no request is fine)."""
    if y.ndim != 2 or y.shape[1] != n_labels:
        raise ValueError(f"continuous labels must have shape (batch_size, {n_labels}), got {tuple(y.shape)}")
    if not torch.is_floating_point(y):
        raise ValueError(f"continuous labels must be a float tensor (NaN for no request), got {y.dtype}")
    if torch.isinf(y).any():
        raise ValueError("continuous labels must be finite or NaN (no request), got inf")


def value_features(u: Tensor, n_fourier: int) -> Tensor:
    """Features of a standardised value u, (B,) -> (B, n_fourier + 1): u itself, then sin/cos at geometric
    angular frequencies pi/8 .. 2 pi (periods 16 down to 1 standard deviation; random Fourier features in the
    spirit of Tancik et al. 2020, deterministic here)."""
    half = n_fourier // 2
    freqs = math.pi * torch.exp(torch.linspace(math.log(1 / 8), math.log(2.0), half, device=u.device, dtype=u.dtype))
    angles = u[:, None] * freqs[None, :]
    return torch.cat([u[:, None], torch.sin(angles), torch.cos(angles)], dim=1)


def _standardised(y: Tensor, loc: Tensor, scale: Tensor) -> tuple[Tensor, Tensor]:
    """(u, mask): u = (y - loc) / scale with NaN replaced by 0 (so that no NaN reaches a gradient), mask = ~isnan."""
    mask = ~torch.isnan(y)
    u = torch.where(mask, (y - loc.to(y)) / scale.to(y), torch.zeros_like(y))
    return u, mask


class ContinuousLabelEmbedding(nn.Module):
    """y (B, K) float -> (B, emb_dim): per label, an MLP of :func:`value_features` of (y_k - loc_k) / scale_k.

    The continuous counterpart of :class:`ctrl_bio.model.LabelEmbedding` ("a small MLP for a continuous y",
    DESIGN.md; CTRL Sec. 4.2): the sum over labels is added to a frozen network's time embedding. The last layer
    of every MLP is zero, so the embedding is exactly zero at initialisation, and a NaN entry (no request for that
    label) contributes exactly zero at every step of training.

    Args:
        emb_dim: width of the network's time embedding.
        n_labels: K, the number of continuous labels.
        hidden: width of the MLP's hidden layer.
        n_fourier: sine/cosine features of the standardised value (even).
        loc, scale: standardisation of each label (a scalar or one per label), e.g. :attr:`ContinuousPrior.loc`.
    """

    def __init__(self, emb_dim: int, n_labels: int = 1, hidden: int = 64, n_fourier: int = 16,
                 loc: float | Sequence[float] = 0.0, scale: float | Sequence[float] = 1.0):
        super().__init__()
        if n_fourier % 2:
            raise ValueError(f"n_fourier must be even, got {n_fourier}")
        self.n_labels, self.n_fourier = int(n_labels), int(n_fourier)
        self.register_buffer("loc", _per_label(loc, self.n_labels, "loc"))
        self.register_buffer("scale", _per_label(scale, self.n_labels, "scale"))
        if (self.scale <= 0).any():
            raise ValueError(f"scale must be positive, got {self.scale.tolist()}")
        self.mlps = nn.ModuleList(
            nn.Sequential(nn.Linear(n_fourier + 1, hidden), nn.SiLU(), nn.Linear(hidden, hidden), nn.SiLU(),
                          nn.Linear(hidden, emb_dim)) for _ in range(self.n_labels))
        for mlp in self.mlps:
            nn.init.zeros_(mlp[-1].weight)
            nn.init.zeros_(mlp[-1].bias)

    def forward(self, y: Tensor) -> Tensor:
        u, mask = _standardised(y, self.loc, self.scale)
        out = 0.0
        for k, mlp in enumerate(self.mlps):
            out = out + mlp(value_features(u[:, k], self.n_fourier)) * mask[:, k:k + 1].to(u.dtype)
        return out


class ContinuousAugmentedScore(nn.Module):
    """A frozen network ``net(x, t, extra_emb)`` whose time embedding receives a :class:`ContinuousLabelEmbedding`.

    The continuous counterpart of :class:`ctrl_bio.model.EmbeddingAugmentedScore`: ``score_and_control`` returns
    (s_theta, s_theta - s_pre), both through the same graph so that the KL's pathwise gradient is exact.

    Args:
        net: a score network ``net(x, t, extra_emb=None) -> s``; frozen in place. Its ``forward_pair(x, t, emb)
            -> (s, s_pre)`` is used when it has one.
        emb_dim: width of the network's time embedding.
        n_labels, hidden, n_fourier, loc, scale: see :class:`ContinuousLabelEmbedding`.
    """

    def __init__(self, net: nn.Module, emb_dim: int, n_labels: int = 1, hidden: int = 64, n_fourier: int = 16,
                 loc: float | Sequence[float] = 0.0, scale: float | Sequence[float] = 1.0):
        super().__init__()
        net.requires_grad_(False)
        self.net = net
        self.embedding = ContinuousLabelEmbedding(emb_dim, n_labels, hidden, n_fourier, loc, scale)
        self.n_labels = self.embedding.n_labels

    def score_and_control(self, x: Tensor, t: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
        emb = self.embedding(y.to(x.device))  # a prior samples on the CPU; the model may sit on a GPU
        if hasattr(self.net, "forward_pair"):
            s, s_pre = self.net.forward_pair(x, t, emb)
        else:
            s, s_pre = self.net(x, t, emb), self.net(x, t)
        return s, s - s_pre

    def forward(self, x: Tensor, t: Tensor, y: Tensor) -> Tensor:
        return self.net(x, t, self.embedding(y.to(x.device)))

    def conditioned(self, y: Tensor) -> Callable[[Tensor, Tensor], tuple[Tensor, Tensor]]:
        """A sampler callable ``(x, t) -> (s_theta, u)`` for fixed labels y of shape (B, K) (NaN: no request)."""
        check_continuous_labels(y, self.n_labels)
        return lambda x, t: self.score_and_control(x, t, y)


class ContinuousVectorPathway(nn.Module):
    """Control u(x_t, t, y) for vector data and real labels, an MLP with a zero last layer.

    The continuous counterpart of :class:`ctrl_bio.model.VectorPathway`, for pre-trained scores without a time
    embedding (the exact analytic score of a Gaussian, a mixture): inputs x_t, eps_pre = -sigma_t s_pre, the
    denoised x0_hat, Fourier features of t and, per label, [requested, u, sin, cos] of the standardised value
    (zero when not requested). It predicts in noise units, u = -net / sigma_t; a row with no request gets no
    control.

    Args:
        dim: data dimension d.
        n_labels: K.
        hidden, depth: MLP width and number of hidden layers.
        n_fourier: Fourier features of t; n_fourier_y: of each standardised label value.
        loc, scale: standardisation of each label (a scalar or one per label).
    """

    def __init__(self, dim: int, n_labels: int = 1, hidden: int = 128, depth: int = 3, n_fourier: int = 16,
                 n_fourier_y: int = 16, loc: float | Sequence[float] = 0.0, scale: float | Sequence[float] = 1.0):
        super().__init__()
        if n_fourier_y % 2:
            raise ValueError(f"n_fourier_y must be even, got {n_fourier_y}")
        self.dim, self.n_labels, self.n_fourier, self.n_fourier_y = dim, int(n_labels), n_fourier, n_fourier_y
        self.register_buffer("loc", _per_label(loc, self.n_labels, "loc"))
        self.register_buffer("scale", _per_label(scale, self.n_labels, "scale"))
        layers: list[nn.Module] = []
        width = 3 * dim + n_fourier + self.n_labels * (n_fourier_y + 2)
        for _ in range(depth):
            layers += [nn.Linear(width, hidden), nn.SiLU()]
            width = hidden
        self.body = nn.Sequential(*layers)
        self.out = nn.Linear(width, dim)
        nn.init.zeros_(self.out.weight)
        nn.init.zeros_(self.out.bias)

    def label_features(self, y: Tensor) -> Tensor:
        u, mask = _standardised(y, self.loc, self.scale)
        m = mask.to(u.dtype)
        return torch.cat([torch.cat([m[:, k:k + 1], m[:, k:k + 1] * value_features(u[:, k], self.n_fourier_y)], 1)
                          for k in range(self.n_labels)], dim=1)

    def forward(self, x: Tensor, t: Tensor, y: Tensor, s_pre: Tensor, sde: SDE) -> Tensor:
        alpha, sigma = append_dims(sde.alpha(t), x.ndim), append_dims(sde.sigma(t), x.ndim)
        eps_pre = -sigma * s_pre
        x0_hat = (x - sigma * eps_pre) / alpha
        h = torch.cat([x, eps_pre, x0_hat, fourier_features(t, self.n_fourier), self.label_features(y)], 1)
        eps_u = self.out(self.body(h))
        active = (~torch.isnan(y)).any(dim=1, keepdim=True).to(x.dtype)
        return -active * eps_u / sigma


class ContinuousPathwayScore(nn.Module):
    """s_theta(x, t, y) = s_pre(x, t) + u_theta(x, t, y) with s_pre frozen and y real (NaN: no request).

    The continuous counterpart of :class:`ctrl_bio.model.AugmentedScore`.

    Args:
        pretrained: the pre-trained score ``(x, t) -> s`` (an ``nn.Module`` is frozen in place).
        pathway: a :class:`ContinuousVectorPathway`, zero at initialisation.
        sde: the SDE the pre-trained model was trained with.
    """

    def __init__(self, pretrained: Callable[[Tensor, Tensor], Tensor], pathway: ContinuousVectorPathway, sde: SDE):
        super().__init__()
        if isinstance(pretrained, nn.Module):
            pretrained.requires_grad_(False)
        self.pretrained, self.pathway, self.sde = pretrained, pathway, sde
        self.n_labels = pathway.n_labels

    def score_and_control(self, x: Tensor, t: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
        s_pre = self.pretrained(x, t)
        u = self.pathway(x, t, y.to(x.device), s_pre, self.sde)
        return s_pre + u, u

    def forward(self, x: Tensor, t: Tensor, y: Tensor) -> Tensor:
        return self.score_and_control(x, t, y)[0]

    def conditioned(self, y: Tensor) -> Callable[[Tensor, Tensor], tuple[Tensor, Tensor]]:
        check_continuous_labels(y, self.n_labels)
        return lambda x, t: self.score_and_control(x, t, y)


# --------------------------------------------------------------------------------------------------- reward


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
        """Predictions in label units, (B, K)."""
        out = self.net(x)
        return self.loc + self.scale * out.reshape(x.shape[0], -1)


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


# --------------------------------------------------------------------------------------- score-matching start


class ContinuousWeightedPool:
    """Pre-trained samples with their regressor predictions, tilted per requested value y.

    Weights w_i(y) = N(y; f(x0_i), sigma^2)^tilt / sum_j N(y; f(x0_j), sigma^2)^tilt with tilt = gamma / alpha:
    a draw is a sample of P*(x_0 | y) proportional to p_pre(x_0) p(y | x_0)^(gamma/alpha) (the optimum of J),
    up to the pool's finite size, measured by Kish's effective sample size.

    Args:
        x0: pre-trained samples, (N, ...).
        reward: a :class:`GaussianReward` (its ``predict`` runs once on the pool, its ``log_prob`` per batch).
        tilt: gamma / alpha.
        chunk: rows of y weighed at once (memory is chunk x N).
    """

    def __init__(self, x0: Tensor, reward: GaussianReward, tilt: float = 1.0, chunk: int = 1024):
        self.x0, self.reward, self.tilt, self.chunk = x0, reward, float(tilt), chunk
        with torch.no_grad():
            self.pred = reward.predict(x0)

    def _tilted_log_likelihood(self, y: Tensor) -> Tensor:
        """tilt * sum_k log N(y_k; f_k(x0_i), sigma_k^2) up to a constant in i, (B, N); NaN y_k adds 0.

        The normalising constants cancel in the weights, so this is one fused pass over (B, N, K) in the pool's
        dtype (the score-matching loop calls it every update).
        """
        z = (y.to(self.pred)[:, None, :] - self.pred[None]) / self.reward.sigma.to(self.pred)
        return (-0.5 * self.tilt) * torch.nan_to_num(z, nan=0.0).square().sum(-1)

    def log_weights(self, y: Tensor) -> Tensor:
        """Normalised log weights of every pool sample for every row of y, (B, N), float64."""
        return torch.log_softmax(self._tilted_log_likelihood(y).double(), dim=1)

    def effective_sample_size(self, y: Tensor) -> Tensor:
        """Kish's effective sample size 1 / sum_i w_i(y)^2 for every row of y, (B,)."""
        return torch.cat([1.0 / torch.exp(2 * self.log_weights(yc)).sum(1) for yc in y.split(self.chunk)]).float()

    def draw(self, y: Tensor, generator: torch.Generator | None = None) -> Tensor:
        """One pool sample per row of y from the pool tilted by N(y; f(x0), sigma^2)^tilt, (B, ...)."""
        chunks = []
        for yc in y.split(self.chunk):  # inverse-CDF draws: one cumsum, far faster than torch.multinomial per row
            logw = self._tilted_log_likelihood(yc)
            cdf = torch.cumsum(torch.exp(logw - logw.max(dim=1, keepdim=True).values), dim=1)
            u = rand((yc.shape[0], 1), generator, device=cdf.device, dtype=cdf.dtype) * cdf[:, -1:]
            chunks.append(torch.searchsorted(cdf, u).squeeze(1).clamp_max(cdf.shape[1] - 1))
        return self.x0[torch.cat(chunks).to(self.x0.device)]


@torch.no_grad()
def sample_pretrained_pool(model: ContinuousPathwayScore | ContinuousAugmentedScore, sde: SDE,
                           x_shape: tuple[int, ...], n: int, *, n_steps: int, t_end: float, batch_size: int = 4096,
                           spacing: Spacing = "uniform", generator: torch.Generator | None = None) -> Tensor:
    """n samples of the pre-trained model: the augmented model with no request (NaN labels, exactly s_pre)."""
    device = next(model.parameters()).device
    times = time_grid(n_steps, t_end, spacing=spacing, device=device)
    chunks = []
    for start in range(0, n, batch_size):
        b = min(batch_size, n - start)
        y_none = torch.full((b, model.n_labels), float("nan"), device=device)
        x_init = sde.prior_sampling((b, *x_shape), generator=generator, device=device)
        chunks.append(euler_maruyama(sde, model.conditioned(y_none), x_init, times, generator=generator,
                                     keep_trajectory=False).x)
    return torch.cat(chunks)


@dataclass
class ContinuousFinetuneResult(FinetuneResult):
    """:class:`ctrl_bio.finetune.FinetuneResult` plus the effective sample sizes of the tilted pool.

    Attributes:
        ess: Kish ESS of the pool's weights over a probe of 256 prior draws: ``min``, ``median``, ``mean``, and
            ``pool_size``; ``batch_mean``: the mean ESS of the rows of every score-matching batch (a running record).
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
                        spacing: Spacing = "uniform") -> ContinuousFinetuneResult:
    """CTRL for continuous labels: :func:`ctrl_bio.finetune.finetune` with a per-value score-matching warm start.

    ``score_matching``: for each batch, y ~ ``label_prior`` and x0 from the pre-trained pool resampled by
    N(y; f(x0), sigma^2)^(gamma/alpha) (:class:`ContinuousWeightedPool`), then the weighted denoising score matching
    of the pathway (:func:`ctrl_bio.objective.denoising_score_matching_loss`); ``pathwise``: exactly
    :func:`ctrl_bio.finetune.finetune` with ``estimator="pathwise"``; ``hybrid``: the first, then the second.
    Arguments mean what they mean in :func:`ctrl_bio.finetune.finetune`. A NaN loss restores the last evaluated
    parameters (saved to ``checkpoint_path`` when given) and raises :class:`ctrl_bio.finetune.NonFiniteLossError`.
    """
    if estimator not in ("pathwise", "score_matching", "hybrid"):
        raise ValueError(f"estimator must be 'pathwise', 'score_matching' or 'hybrid', got {estimator!r}")
    if alpha <= 0:
        raise ValueError(f"alpha must be positive, got {alpha}")
    start = time.perf_counter()
    result = ContinuousFinetuneResult()
    common = dict(alpha=alpha, gamma=gamma, n_steps=n_steps, t_end=t_end, spacing=spacing)
    step = 0
    if estimator != "pathwise" and sm_steps > 0:
        step = _score_matching_phase(model, sde, reward, label_prior, x_shape, result, sm_steps=sm_steps,
                                     sm_batch_size=sm_batch_size, sm_lr=sm_lr, pool_size=pool_size, pool_x0=pool_x0,
                                     grad_clip=grad_clip, eval_every=eval_every, eval_batch_size=eval_batch_size,
                                     checkpoint_path=checkpoint_path, seed=seed, progress=progress, **common)
    if estimator != "score_matching":
        # finetune's pathwise phase, unchanged: it needs label_prior.sample, reward(x0, y) and model.conditioned(y).
        sub = finetune(model, sde, reward, label_prior, x_shape, estimator="pathwise", steps=steps,
                       batch_size=batch_size, lr=lr, memory=memory, grad_last_k=grad_last_k, grad_clip=grad_clip,
                       eval_every=eval_every, eval_batch_size=eval_batch_size, checkpoint_path=checkpoint_path,
                       seed=seed + 2, progress=progress, **common)
        for rec in sub.history:
            if rec["phase"] == "init" and result.history:
                continue  # the warm start's last evaluation already records the starting point
            result.history.append(rec | {"step": rec["step"] + step})
    result.seconds = time.perf_counter() - start
    return result


def _score_matching_phase(model, sde: SDE, reward: GaussianReward, label_prior: ContinuousPrior,
                          x_shape: tuple[int, ...], result: ContinuousFinetuneResult, *, sm_steps: int,
                          sm_batch_size: int, sm_lr: float, pool_size: int, pool_x0: Tensor | None,
                          grad_clip: float | None, eval_every: int, eval_batch_size: int,
                          checkpoint_path: str | Path | None, seed: int, progress: bool, alpha: float, gamma: float,
                          n_steps: int, t_end: float, spacing: Spacing) -> int:
    """The score-matching warm start of :func:`finetune_continuous`; returns the number of updates made."""
    generator = torch.Generator().manual_seed(seed)
    monitor = TrainingMonitor(model, sde, reward, label_prior, x_shape, history=result.history, alpha=alpha,
                              gamma=gamma, n_steps=n_steps, t_end=t_end, spacing=spacing,
                              eval_batch_size=eval_batch_size, seed=seed + 1, checkpoint_path=checkpoint_path)
    monitor.evaluate(0, "init", float("nan"))
    x0 = pool_x0 if pool_x0 is not None else sample_pretrained_pool(
        model, sde, x_shape, pool_size, n_steps=n_steps, t_end=t_end, spacing=spacing, generator=generator)
    pool = ContinuousWeightedPool(x0, reward, tilt=gamma / alpha)
    with torch.no_grad():
        ess = pool.effective_sample_size(label_prior.sample(256, torch.Generator().manual_seed(seed + 3)))
    result.pool_ess = float(ess.min())
    result.ess = {"min": float(ess.min()), "median": float(ess.median()), "mean": float(ess.mean()),
                  "pool_size": x0.shape[0], "batch_mean": []}
    params = monitor.params
    opt = torch.optim.Adam(params, lr=sm_lr)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=sm_steps)
    step = 0
    with progress_bar(sm_steps, "ctrl score_matching (continuous)", enabled=progress) as advance:
        for _ in range(sm_steps):
            y = label_prior.sample(sm_batch_size, generator).to(x0.device)
            loss = denoising_score_matching_loss(model, sde, pool.draw(y, generator), y, t_end=t_end,
                                                 generator=generator)
            step += 1
            monitor.check(loss, step, "score_matching")
            opt.zero_grad(set_to_none=True)
            loss.backward()
            if grad_clip is not None:
                torch.nn.utils.clip_grad_norm_(params, grad_clip)
            opt.step()
            sched.step()
            advance(loss=loss.detach().item())
            if step % eval_every == 0 or step == sm_steps:
                with torch.no_grad():
                    result.ess["batch_mean"].append(float(pool.effective_sample_size(y[:64]).mean()))
                monitor.evaluate(step, "score_matching", loss.detach().item())
    return step
