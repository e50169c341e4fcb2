"""The losses of policy-gradient CTRL on recorded paths (:mod:`ctrl_bio.policy_gradient` derives them).

- :func:`surrogate_loss`: the clipped surrogate of J, per-step (``ddpo``) or cumulative path ratios (``ctrl_pg``),
  with the closed-form Girsanov KL, advantages from :func:`rewards_to_go` minus a :class:`ValueNetwork` baseline;
- :func:`reference_loss`: the cross-entropy of the soft-optimal path measure on pre-trained paths, weighted by
  :func:`soft_optimal_weights` (reward-weighted regression on path space, Peters & Schaal 2007).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor, nn

from ctrl_bio.model import ConditionalScore, fourier_features, one_hot_labels
from ctrl_bio.objective import Objective
from ctrl_bio.policy_paths import PathBatch, step_log_ratio
from ctrl_bio.utils import append_dims, sum_except_batch

Variant = Literal["ctrl_pg", "ddpo"]
Baseline = Literal["x0_hat", "learned", "none"]
ReferenceEstimator = Literal["path", "score_matching"]


class ValueNetwork(nn.Module):
    """Baseline V(x_t, t, y) ~ E[reward-to-go | x_t], an MLP of (features, Fourier(t), one-hot y).

    Args:
        dim: number of features of one state (flattened).
        n_classes: classes per label.
        hidden: width; depth: number of hidden layers.
    """

    def __init__(self, dim: int, n_classes: tuple[int, ...], hidden: int = 128, depth: int = 2, n_fourier: int = 16):
        super().__init__()
        self.n_classes, self.n_fourier = tuple(n_classes), n_fourier
        layers: list[nn.Module] = []
        width = dim + n_fourier + sum(self.n_classes)
        for _ in range(depth):
            layers += [nn.Linear(width, hidden), nn.SiLU()]
            width = hidden
        layers.append(nn.Linear(width, 1))
        self.net = nn.Sequential(*layers)

    def forward(self, features: Tensor, t: Tensor, y: Tensor) -> Tensor:
        h = torch.cat([features.reshape(features.shape[0], -1), fourier_features(t, self.n_fourier),
                       one_hot_labels(y, self.n_classes)], dim=1)
        return self.net(h).squeeze(1)


def rewards_to_go(reward: Tensor, kl_steps: Tensor, alpha: float) -> Tensor:
    """R_k = r - alpha sum_{i > k} c_i: J of the path counting only the KL the action at step k can still change,
    (n, B)."""
    later = kl_steps.flip(0).cumsum(0).flip(0) - kl_steps
    return Objective(alpha=alpha).value(reward[None], later)


def value_features(batch: PathBatch, baseline: Baseline) -> Tensor:
    """Inputs of the value network at every step: x0_hat or x_t, (n, B, ...)."""
    return batch.x0_hat if baseline == "x0_hat" else batch.states[:-1]


def evaluate_value(value: ValueNetwork, batch: PathBatch, baseline: Baseline) -> Tensor:
    """V at every (step, path), (n, B)."""
    n, b = batch.active.shape
    feats = value_features(batch, baseline).reshape(n * b, -1)
    t = batch.times[:-1].reshape(-1)
    y = batch.y[None].expand(n, *batch.y.shape).reshape(n * b, -1)
    return value(feats, t, y).reshape(n, b)


@dataclass
class SurrogateLoss:
    """One evaluation of the clipped surrogate (scalars are means over valid paths)."""

    loss: Tensor
    clip_fraction: float
    max_log_ratio: float


def surrogate_loss(model: ConditionalScore, batch: PathBatch, advantages: Tensor, valid: Tensor, *,
                   variant: Variant, alpha: float, clip: float) -> SurrogateLoss:
    """-(clipped policy-gradient surrogate - alpha KL) of the current parameters on a batch of paths.

    Args:
        advantages: A_k per (step, path), (n, B), detached.
        valid: paths with a finite reward, (B,) bool.
        variant: ``ctrl_pg`` clips the cumulative path ratio, ``ddpo`` each step's ratio (module docstring).
        clip: eps of the ratio interval [1 - eps, 1 + eps].
    """
    n, b = batch.active.shape
    mask = batch.active & valid[None]
    k_idx, p_idx = mask.nonzero(as_tuple=True)
    x, t, y = batch.states[k_idx, p_idx], batch.times[k_idx, p_idx], batch.y[p_idx]
    _, u = model.conditioned(y)(x, t)
    du = u - batch.controls[k_idx, p_idx]
    std = batch.stds[k_idx, p_idx]
    rho = torch.zeros(n, b, dtype=u.dtype, device=u.device)
    rho = rho.index_put((k_idx, p_idx), step_log_ratio(batch.noises[k_idx, p_idx], std, du))
    if variant == "ctrl_pg":
        before = (rho.detach().cumsum(0) - rho.detach())  # log w_{<k}: only step k's own term carries a gradient
        ratio = torch.exp(before + rho)
    elif variant == "ddpo":
        ratio = torch.exp(rho)
    else:
        raise ValueError(f"variant must be 'ctrl_pg' or 'ddpo', got {variant!r}")
    clipped = ratio.clamp(1.0 - clip, 1.0 + clip)
    surrogate = torch.minimum(ratio * advantages, clipped * advantages) * mask
    kl = torch.zeros(n, b, dtype=u.dtype, device=u.device)
    kl = kl.index_put((k_idx, p_idx), 0.5 * std**2 * sum_except_batch(u**2))
    per_path = Objective(alpha=alpha).value(surrogate.sum(0), kl.sum(0))  # J with the surrogate as its reward
    n_valid = mask.any(0).sum().clamp_min(1)
    outside = ((ratio.detach() - 1).abs() > clip) & mask
    return SurrogateLoss(loss=-(per_path * mask.any(0)).sum() / n_valid,
                         clip_fraction=float(outside.sum() / mask.sum().clamp_min(1)),
                         max_log_ratio=float((before + rho).detach().abs().max()) if variant == "ctrl_pg"
                         else float(rho.detach().abs().max()))


def soft_optimal_weights(reward: Tensor, y: Tensor, alpha: float, log_density_ratio: Tensor | None = None) -> Tensor:
    """Self-normalised weights dP*/dP_behaviour of scored paths within each label combination, (B,).

    dP*/dP_pre = exp(r / alpha) / Z(y) (the soft-optimal path measure of KL-regularised RL); normalising within
    each requested y removes Z(y). Paths of another behaviour process (the policy being trained) are weighted by
    dP*/dP_beh = exp(r / alpha - log dP_beh/dP_pre) / Z(y) (``log_density_ratio``, :meth:`PathBatch.log_density_ratio`;
    zero for pre-trained paths). The weights average to one over the batch, each label group keeping its share.
    """
    log_w = reward.double() / alpha
    if log_density_ratio is not None:
        log_w = log_w - log_density_ratio.double()
    weights = torch.zeros_like(reward)
    _, group = torch.unique(y, dim=0, return_inverse=True)
    for g in group.unique():
        rows = group == g
        weights[rows] = torch.softmax(log_w[rows], dim=0).to(reward.dtype) * rows.sum()
    return weights


def reference_loss(model: ConditionalScore, batch: PathBatch, weights: Tensor, k_idx: Tensor, p_idx: Tensor,
                   weight_baseline: Tensor | None = None) -> Tensor:
    """Cross-entropy -E_i[w_i log dP_theta/dP_pre(tau_i)] of the soft-optimal path measure, on pre-trained paths.

    log dP_theta/dP_pre along a pre-trained path is the sum of per-step Gaussian log-ratios (Girsanov),
    sum_k sqrt(beta_k h) z_k . u_theta - h beta_k ||u_theta||^2 / 2; weighted by w = dP*/dP_pre its gradient is
    that of KL(P* || P_theta), which pulls the policy toward every mode that P* keeps. Since z_k has mean zero
    given x_k under the pre-trained process, the noise term may use w - b(x_k) for any baseline b of the state
    (unbiased); b(x_k) ~ E_pre[w | x_k] = h_t(x_k, y) / Z(y) removes most of the noise near t = 0, where the
    path's end point and hence w are nearly decided. The sum over steps is estimated from a uniform random
    subset of (step, path) pairs (unbiased), which spreads a fixed cost over more paths.

    Args:
        weights: soft-optimal weight (mean one) of the path of each selected pair, (M,).
        k_idx, p_idx: step and path index of each selected pair, (M,) long each.
        weight_baseline: b(x_k) at each pair, (M,), detached; None for none.
    """
    n = batch.active.shape[0]
    _, u = model.conditioned(batch.y[p_idx])(batch.states[k_idx, p_idx], batch.times[k_idx, p_idx])
    std = append_dims(batch.stds[k_idx, p_idx], u.ndim)
    noise_term = sum_except_batch(std * batch.noises[k_idx, p_idx] * u)
    drift_term = 0.5 * sum_except_batch((std * u) ** 2)
    noise_weight = weights if weight_baseline is None else weights - weight_baseline
    return -n * (noise_weight * noise_term - weights * drift_term).mean()


def value_at(value: ValueNetwork, batch: PathBatch, baseline: Baseline, k_idx: Tensor, p_idx: Tensor) -> Tensor:
    """V at the selected (step, path) pairs, (M,)."""
    feats = value_features(batch, baseline)[k_idx, p_idx]
    return value(feats, batch.times[k_idx, p_idx], batch.y[p_idx])
