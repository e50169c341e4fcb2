"""Label spaces: how a label y is represented, what "no label requested" is, and how a pathway reads it.

Nothing in CTRL's objective (DESIGN.md; Zhao et al. 2024, eq. 6)

    J(theta) = E_{y ~ p(y)} E_{x ~ P_theta(.|y)} [ gamma log p(y | x_0) ] - alpha KL(P_theta(.|y) || P_pre)

needs y to be a class. What does depend on the kind of y is small, and a :class:`LabelSpace` holds all of it:
the tensor a request is (its dtype and the value meaning "no request"), the fixed code an MLP pathway reads it by,
and the reward-tilted pool that score matching draws from, p_pre(x_0) p(y | x_0)^(gamma/alpha) resampled per request.
Everything else (the augmented score, the sampler, :func:`ctrl_bio.finetune.train` and its estimators) is shared.

- :class:`CategoricalLabels`: y (B, K) long, class indices, ``NULL_LABEL`` (-1) for no request; one-hot codes; the
  pool tilted once per label combination (:class:`WeightedPool`).
- :class:`ContinuousLabels`: y (B, K) float, NaN for no request; Fourier features of the standardised value; the pool
  tilted once per requested value (:class:`ContinuousWeightedPool`).
"""

from __future__ import annotations

import copy
import math
from collections.abc import Sequence
from typing import Any, Protocol

import torch
from torch import Tensor

from ctrl_bio.utils import rand

NULL_LABEL = -1


class TiltedPool(Protocol):
    """Pre-trained samples x0 resampled by p(y | x0)^tilt for each request y (what score matching regresses onto).

    ``draw`` gives the denoising target's x0; ``posterior_mean`` (E[x0 | x_t, y] over the pool's items) the
    ``posterior`` target; it and ``untilted`` (the same items, uniform weights) the ``control`` target
    (:func:`ctrl_bio.objective.weighted_score_matching_loss`).
    """

    x0: Tensor
    tilt: float

    def draw(self, y: Tensor, generator: torch.Generator | None = None) -> Tensor: ...

    def item_log_tilts(self, y: Tensor, index: Tensor) -> Tensor: ...

    def posterior_mean(self, x_t: Tensor, alpha_t: Tensor, sigma_t: Tensor, y: Tensor) -> Tensor: ...

    def untilted(self) -> TiltedPool: ...


class LabelSpace(Protocol):
    """What the shared machinery needs to know about a kind of label.

    Attributes:
        n_labels: K, labels per request.
        n_features: width of :meth:`features`.
    """

    n_labels: int
    n_features: int

    def none(self, n: int, device: torch.device | str | None = None) -> Tensor:
        """n requests asking for nothing, (n, K): the augmented model then is exactly the pre-trained one."""
        ...

    def requested(self, y: Tensor) -> Tensor:
        """Which labels each request asks for, (B, K) bool."""
        ...

    def check(self, y: Tensor) -> None:
        """Raise a clear ValueError for a request tensor of the wrong shape, type or range."""
        ...

    def features(self, y: Tensor) -> Tensor:
        """The fixed code an MLP pathway reads y by, (B, n_features); zero for a label not requested."""
        ...

    def tilted_pool(self, x0: Tensor, reward: Any, tilt: float) -> TiltedPool:
        """The pool x0 with the reward's likelihood of every request, tilted by ``tilt`` = gamma / alpha."""
        ...

    def pool_summary(self, pool: TiltedPool, label_prior: Any, generator: torch.Generator) -> dict[str, Any]:
        """``pool_ess`` (the smallest Kish effective sample size over requests) and what else is worth recording;
        draws nothing from ``generator``."""
        ...


def as_label_space(labels: Sequence[int] | LabelSpace) -> LabelSpace:
    """A label space as given, or categorical labels from their class counts (what a pathway's constructor takes)."""
    return labels if hasattr(labels, "features") else CategoricalLabels(labels)


def label_space_of(model: Any) -> LabelSpace:
    """The model's ``labels``; a model that only names its ``n_classes`` has categorical labels."""
    labels = getattr(model, "labels", None)
    return labels if labels is not None else CategoricalLabels(model.n_classes)


# ------------------------------------------------------------------------------------------------ categorical


def one_hot_labels(y: Tensor, n_classes: Sequence[int]) -> Tensor:
    """Concatenated one-hot codes of K labels, (B, K) -> (B, sum n_classes); a null label (-1) is all zero."""
    codes = []
    for k, n in enumerate(n_classes):
        yk = y[:, k]
        code = torch.zeros(y.shape[0], n, device=y.device)
        valid = yk != NULL_LABEL
        code[valid, yk[valid]] = 1.0
        codes.append(code)
    return torch.cat(codes, dim=1)


def check_labels(y: Tensor, n_classes: Sequence[int]) -> None:
    """Raise a clear error for a label tensor of the wrong shape or with a value outside its classes."""
    if y.ndim != 2 or y.shape[1] != len(n_classes):
        raise ValueError(f"labels must have shape (batch_size, {len(n_classes)}), got {tuple(y.shape)}")
    for k, n in enumerate(n_classes):
        bad = (y[:, k] < NULL_LABEL) | (y[:, k] >= n)
        if bad.any():
            raise ValueError(f"label {k} takes values in 0..{n - 1} (or -1 for none), got {int(y[bad, k][0])}")


def pool_posterior_mean(flat: Tensor, sq_norms: Tensor, x_t: Tensor, alpha_t: Tensor, sigma_t: Tensor,
                        log_w: Tensor) -> Tensor:
    """E[x_0 | x_t] for x_0 drawn from pool items ``flat`` (N, d) with prior log weights ``log_w`` ((N,) or (b, N)):
    softmax_i(log w_i - ||x_t - alpha_t x0_i||^2 / (2 sigma_t^2)) @ x0, (b, d). x_t: (b, d); alpha_t, sigma_t: (b, 1).

    ||x_t - alpha_t x0_i||^2 enters up to a term constant in i, by one matrix product (no (b, N, d) tensor).
    """
    sq_dist = alpha_t**2 * sq_norms - 2 * alpha_t * (x_t @ flat.T)
    return torch.softmax(log_w.to(x_t) - sq_dist / (2 * sigma_t**2), dim=1) @ flat


class CategoricalLabels:
    """K categorical labels with ``n_classes[k]`` classes each; ``NULL_LABEL`` (-1) asks for nothing."""

    def __init__(self, n_classes: Sequence[int]):
        self.n_classes = tuple(int(n) for n in n_classes)
        self.n_labels, self.n_features = len(self.n_classes), sum(self.n_classes)

    def none(self, n: int, device: torch.device | str | None = None) -> Tensor:
        return torch.full((n, self.n_labels), NULL_LABEL, dtype=torch.long, device=device)

    def requested(self, y: Tensor) -> Tensor:
        return y != NULL_LABEL

    def check(self, y: Tensor) -> None:
        check_labels(y, self.n_classes)

    def features(self, y: Tensor) -> Tensor:
        return one_hot_labels(y, self.n_classes)

    def combinations(self) -> Tensor:
        """Every combination of the labels' classes, (prod n_classes, K), in ``torch.cartesian_prod`` order."""
        return torch.cartesian_prod(*[torch.arange(n) for n in self.n_classes]).reshape(-1, self.n_labels)

    def tilted_pool(self, x0: Tensor, reward: Any, tilt: float) -> TiltedPool:
        fns = getattr(reward, "log_prob_fns", None)
        if fns is None:
            raise TypeError("a pool is tilted by each label's class log-probabilities: the reward needs "
                            "log_prob_fns (a LogLikelihoodReward); use estimator=pathwise or adjoint_matching for a "
                            "plain reward")
        return WeightedPool(x0, [f(x0) for f in fns], tilt=tilt)

    def pool_summary(self, pool: TiltedPool, label_prior: Any, generator: torch.Generator) -> dict[str, Any]:
        combos = CategoricalLabels(label_prior.n_classes).combinations()[:64]
        return {"pool_ess": min(pool.effective_sample_size(c) for c in combos)}


class WeightedPool:
    """Samples of the pre-trained model with their per-class label log-likelihoods.

    Args:
        x0: pre-trained samples, (N, ...).
        class_log_probs: per label k, log p_k(c | x0_i) for every class c, each of shape (N, n_classes_k).
        tilt: exponent gamma / alpha of the likelihood in the target p_pre(x) p(y|x)^(gamma/alpha).
    """

    def __init__(self, x0: Tensor, class_log_probs: list[Tensor], tilt: float = 1.0):
        self.x0 = x0
        self.class_log_probs = class_log_probs
        self.tilt = tilt
        self._probs: dict[tuple[int, ...], Tensor] = {}

    def weights(self, y: Tensor) -> Tensor:
        """Normalised weights p(y | x0_i)^tilt / sum_j p(y | x0_j)^tilt for one label combination y, (N,)."""
        key = tuple(int(v) for v in y)
        if key not in self._probs:  # one softmax per label combination, reused by every draw
            logw = self.tilt * sum(lp[:, k] for lp, k in zip(self.class_log_probs, key))
            # Kept on the CPU whatever the pool's device: draws use the run's CPU generator (the same draws on any
            # device), and torch.multinomial needs its weights where its generator is.
            self._probs[key] = torch.softmax(logw.double().cpu(), dim=0)
        return self._probs[key]

    def item_log_tilts(self, y: Tensor, index: Tensor) -> Tensor:
        """tilt * log p(y_b | x0_i) for the pool items ``index[b]`` of each row of y, unnormalised, (B, M).

        index: (B, M) pool rows per request (the rollouts of one anchor, :mod:`ctrl_bio.estimators.rollout_control`).
        """
        return self.tilt * sum(lp[index, y[:, k, None].to(index.device)]
                               for k, lp in enumerate(self.class_log_probs))

    def effective_sample_size(self, y: Tensor) -> float:
        """Kish's effective sample size of the importance weights for one label combination y, (K,)."""
        return float(1.0 / (self.weights(y) ** 2).sum())

    def draw(self, y: Tensor, generator: torch.Generator | None = None) -> Tensor:
        """One pool sample per row of y, drawn from the pool tilted by p(y | x0)^tilt, (B, ...)."""
        idx = torch.empty(y.shape[0], dtype=torch.long)
        combos, inverse = torch.unique(y.cpu(), dim=0, return_inverse=True)
        for j, combo in enumerate(combos):
            rows = (inverse == j).nonzero().squeeze(1)
            idx[rows] = torch.multinomial(self.weights(combo), rows.numel(), replacement=True, generator=generator)
        return self.x0[idx.to(self.x0.device)]

    @torch.no_grad()
    def posterior_mean(self, x_t: Tensor, alpha_t: Tensor, sigma_t: Tensor, y: Tensor) -> Tensor:
        """E[x_0 | x_t, y] when x_0 is drawn from the pool tilted for y and x_t = alpha_t x_0 + sigma_t eps, (B, ...).

        The posterior over pool items is softmax_i(log w_i(y) - ||x_t - alpha_t x0_i||^2 / (2 sigma_t^2)): exact for
        the pool's (weighted, empirical) distribution, whose noised score is what denoising score matching on the pool
        converges to. alpha_t, sigma_t: (B,).
        """
        flat = self.x0.reshape(self.x0.shape[0], -1).to(x_t)
        sq_norms = (flat**2).sum(1)
        out = torch.empty_like(x_t.reshape(x_t.shape[0], -1))
        combos, inverse = torch.unique(y, dim=0, return_inverse=True)
        for j, combo in enumerate(combos):
            rows = (inverse == j).nonzero().squeeze(1)
            out[rows] = pool_posterior_mean(flat, sq_norms, x_t[rows].reshape(rows.numel(), -1), alpha_t[rows, None],
                                            sigma_t[rows, None], self.weights(combo).log())
        return out.reshape(x_t.shape)

    def untilted(self) -> WeightedPool:
        """The same pool with uniform weights (tilt 0): the pre-trained law the optimal control is measured from."""
        return WeightedPool(self.x0, self.class_log_probs, tilt=0.0)


# ------------------------------------------------------------------------------------------------- continuous


def per_label(v: float | Sequence[float] | Tensor, n_labels: int, name: str) -> Tensor:
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


def standardised(y: Tensor, loc: Tensor, scale: Tensor) -> tuple[Tensor, Tensor]:
    """(u, mask): u = (y - loc) / scale with NaN replaced by 0 (so that no NaN reaches a gradient), mask = ~isnan."""
    mask = ~torch.isnan(y)
    u = torch.where(mask, (y - loc.to(y)) / scale.to(y), torch.zeros_like(y))
    return u, mask


class ContinuousLabels:
    """K real-valued labels; NaN asks for nothing (the continuous counterpart of ``NULL_LABEL``).

    Args:
        n_labels: K.
        loc, scale: standardisation of each label (a scalar or one per label), e.g. the prior's mean and std.
        n_fourier: sine/cosine features of each standardised value in :meth:`features` (even).
    """

    def __init__(self, n_labels: int = 1, loc: float | Sequence[float] | Tensor = 0.0,
                 scale: float | Sequence[float] | Tensor = 1.0, n_fourier: int = 16):
        if n_fourier % 2:
            raise ValueError(f"n_fourier must be even, got {n_fourier}")
        self.n_labels, self.n_fourier = int(n_labels), int(n_fourier)
        self.loc, self.scale = per_label(loc, self.n_labels, "loc"), per_label(scale, self.n_labels, "scale")
        if (self.scale <= 0).any():
            raise ValueError(f"scale must be positive, got {self.scale.tolist()}")
        self.n_features = self.n_labels * (self.n_fourier + 2)

    def none(self, n: int, device: torch.device | str | None = None) -> Tensor:
        return torch.full((n, self.n_labels), float("nan"), device=device)

    def requested(self, y: Tensor) -> Tensor:
        return ~torch.isnan(y)

    def check(self, y: Tensor) -> None:
        check_continuous_labels(y, self.n_labels)

    def features(self, y: Tensor) -> Tensor:
        """Per label [requested, requested * :func:`value_features` of (y_k - loc_k) / scale_k], (B, n_features)."""
        u, mask = standardised(y, self.loc, self.scale)
        m = mask.to(u.dtype)
        return torch.cat([torch.cat([m[:, k:k + 1], m[:, k:k + 1] * value_features(u[:, k], self.n_fourier)], 1)
                          for k in range(self.n_labels)], dim=1)

    def tilted_pool(self, x0: Tensor, reward: Any, tilt: float) -> ContinuousWeightedPool:
        return ContinuousWeightedPool(x0, reward, tilt=tilt)

    def pool_summary(self, pool: ContinuousWeightedPool, label_prior: Any, generator: torch.Generator
                     ) -> dict[str, Any]:
        """Kish ESS over a probe of 256 prior draws (``ess``: min, median, mean, pool_size); the probe has its own
        generator, seeded from the run's, so that the training draws stay as they were without it."""
        probe = label_prior.sample(256, torch.Generator().manual_seed(generator.initial_seed() + 3))
        ess = pool.effective_sample_size(probe)
        return {"pool_ess": float(ess.min()), "ess": {"min": float(ess.min()), "median": float(ess.median()),
                                                      "mean": float(ess.mean()), "pool_size": pool.x0.shape[0]}}


class ContinuousWeightedPool:
    """Pre-trained samples with their regressor predictions, tilted per requested value y.

    Weights w_i(y) = N(y; f(x0_i), sigma^2)^tilt / sum_j N(y; f(x0_j), sigma^2)^tilt with tilt = gamma / alpha:
    a draw is a sample of P*(x_0 | y) proportional to p_pre(x_0) p(y | x_0)^(gamma/alpha) (the optimum of J),
    up to the pool's finite size, measured by Kish's effective sample size.

    Args:
        x0: pre-trained samples, (N, ...).
        reward: a :class:`ctrl_bio.continuous.GaussianReward` (``predict`` runs once on the pool; its ``sigma``).
        tilt: gamma / alpha.
        chunk: rows of y weighed at once (memory is chunk x N).
    """

    def __init__(self, x0: Tensor, reward: Any, tilt: float = 1.0, chunk: int = 1024):
        self.x0, self.reward, self.tilt, self.chunk = x0, reward, float(tilt), chunk
        with torch.no_grad():
            self.pred = reward.predict(x0)

    def _tilted_log_likelihood(self, y: Tensor, index: Tensor | None = None) -> Tensor:
        """tilt * sum_k log N(y_k; f_k(x0_i), sigma_k^2) up to a constant in i, (B, N); NaN y_k adds 0. With
        ``index`` (B, M), only the pool items ``index[b]`` of each row, (B, M).

        The normalising constants cancel in the weights, so this is one fused pass over (B, N, K) in the pool's
        dtype (the score-matching loop calls it every update).
        """
        pred = self.pred[None] if index is None else self.pred[index]
        z = (y.to(self.pred)[:, None, :] - pred) / self.reward.sigma.to(self.pred)
        return (-0.5 * self.tilt) * torch.nan_to_num(z, nan=0.0).square().sum(-1)

    def item_log_tilts(self, y: Tensor, index: Tensor) -> Tensor:
        """tilt * log N(y_b; f(x0_i), sigma^2) up to a constant, for the pool items ``index[b]`` of each row of y,
        (B, M). index: (B, M)."""
        return self._tilted_log_likelihood(y, index)

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
    def posterior_mean(self, x_t: Tensor, alpha_t: Tensor, sigma_t: Tensor, y: Tensor) -> Tensor:
        """E[x_0 | x_t, y] for x_0 drawn from the pool tilted for y, x_t = alpha_t x_0 + sigma_t eps, (B, ...): as
        :meth:`WeightedPool.posterior_mean`, with one weight vector per row of y. alpha_t, sigma_t: (B,)."""
        flat = self.x0.reshape(self.x0.shape[0], -1).to(x_t)
        sq_norms = (flat**2).sum(1)
        rows = torch.arange(x_t.shape[0], device=y.device).split(self.chunk)
        return torch.cat([pool_posterior_mean(flat, sq_norms, x_t[r].reshape(r.numel(), -1), alpha_t[r, None],
                                              sigma_t[r, None], self.log_weights(y[r])) for r in rows]
                         ).reshape(x_t.shape)

    def untilted(self) -> ContinuousWeightedPool:
        """The same pool with uniform weights (tilt 0), its predictions reused."""
        pool = copy.copy(self)
        pool.tilt = 0.0
        return pool
