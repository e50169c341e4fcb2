"""The baselines CTRL is compared against, each a wrapper around a score callable (samplers never branch).

Every wrapper returns a sampler callable ``(x, t) -> (s, u)`` with u = s - s_pre, so the sampler records
each method's path KL to the pre-trained model exactly as it does for CTRL.

- :func:`classifier_free_guidance` (Ho & Salimans 2022, eq. 6): s_pre + w (s_cond - s_pre) with a conditional
  model trained by denoising score matching on the labelled pairs (:func:`train_conditional_pathway`).
- :func:`classifier_guidance` (Dhariwal & Nichol 2021, Alg. 1; Song et al. 2021, eq. 14): s_pre + w grad log
  p(y | x_t, t) with a noise-conditional classifier trained on x_t (:func:`train_noisy_classifier`).
- :func:`reconstruction_guidance` (DPS, Chung et al. 2023, Alg. 1; Ho et al. 2022 "reconstruction guidance"):
  s_pre + w grad_x log p(y | x0_hat(x_t)), the clean-data classifier at Tweedie's denoised estimate.
- :func:`best_of_n`: N pre-trained samples per request, the one the reward classifier likes best.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from ctrl_bio.model import NULL_LABEL, ConditionalScore, fourier_features
from ctrl_bio.objective import denoising_score_matching_loss
from ctrl_bio.progress import progress_bar
from ctrl_bio.sampling import ScoreFn, Spacing, euler_maruyama, split_score
from ctrl_bio.sde import SDE
from ctrl_bio.utils import rand, randn

#: A label log-likelihood ``(x, y) -> (B,)`` summed over labels, y of shape (B, K); a
#: :class:`ctrl_bio.reward.LogLikelihoodReward` is one.
LogLikelihood = Callable[[Tensor, Tensor], Tensor]


def _grad_x(fn: Callable[[Tensor], Tensor], x: Tensor) -> Tensor:
    """grad_x sum_i fn(x)_i, whether or not the caller runs under ``torch.no_grad``."""
    with torch.enable_grad():
        x = x.detach().requires_grad_(True)
        return torch.autograd.grad(fn(x).sum(), x)[0]


def classifier_free_guidance(model: ConditionalScore, y: Tensor, scale: float) -> ScoreFn:
    """s_pre + w (s_theta(., y) - s_pre) for an augmented model trained as a conditional model.

    The augmented model's null label gives exactly s_pre, so the unconditional score of CFG is the frozen
    pre-trained one and w = 1 is the conditional model itself.
    """
    conditioned = model.conditioned(y)

    def score_fn(x: Tensor, t: Tensor) -> tuple[Tensor, Tensor]:
        s, u = conditioned(x, t)
        return s + (scale - 1.0) * u, scale * u

    return score_fn


def classifier_guidance(pretrained: ScoreFn, noisy_log_likelihood: Callable[[Tensor, Tensor, Tensor], Tensor],
                        y: Tensor, scale: float) -> ScoreFn:
    """s_pre + w grad_x log p(y | x_t, t) with a classifier of noisy x_t.

    Args:
        pretrained: the pre-trained score ``(x, t) -> s``.
        noisy_log_likelihood: ``(x_t, t, y) -> (B,)`` log p(y | x_t, t) summed over labels.
        y: requested labels, (B, K).
        scale: guidance weight w (1 is Bayes' rule).
    """

    def score_fn(x: Tensor, t: Tensor) -> tuple[Tensor, Tensor]:
        u = scale * _grad_x(lambda z: noisy_log_likelihood(z, t, y), x)
        return split_score(pretrained(x, t))[0] + u, u

    return score_fn


def reconstruction_guidance(pretrained: ScoreFn, sde: SDE, log_likelihood: LogLikelihood, y: Tensor,
                            scale: float) -> ScoreFn:
    """DPS: s_pre + w grad_x log p(y | x0_hat(x_t)), x0_hat = (x_t + sigma_t^2 s_pre) / alpha_t (Tweedie).

    The gradient runs through the pre-trained score (Chung et al. 2023 differentiate the denoiser too), so
    one step costs a forward and a backward pass of the network.
    """

    def score_fn(x: Tensor, t: Tensor) -> tuple[Tensor, Tensor]:
        def log_p(z: Tensor) -> Tensor:
            return log_likelihood(sde.denoise(z, t, split_score(pretrained(z, t))[0]), y)

        u = scale * _grad_x(log_p, x)
        return split_score(pretrained(x, t))[0] + u, u

    return score_fn


@torch.no_grad()
def best_of_n(sde: SDE, pretrained: ScoreFn, log_likelihood: LogLikelihood, y: Tensor, x_shape: Sequence[int],
              times: Tensor, n: int, generator: torch.Generator | None = None) -> Tensor:
    """For each request y_i, n pre-trained samples and the one with the highest log p(y_i | x), (B, ...)."""
    if n < 1:
        raise ValueError(f"best_of_n needs n >= 1, got {n}")
    b = y.shape[0]
    y_rep = y.repeat(n, 1)  # candidate j of request i sits at row j * b + i
    x_init = sde.prior_sampling((n * b, *x_shape), generator=generator)
    x = euler_maruyama(sde, pretrained, x_init, times, generator=generator, keep_trajectory=False).x
    scores = log_likelihood(x, y_rep).reshape(n, b)
    best = scores.argmax(dim=0)
    return x.reshape(n, b, *x_shape)[best, torch.arange(b)]


class NoisyMLPClassifier(nn.Module):
    """Logits of p(y | x_t, t) for vector data: an MLP of (x_t, Fourier features of t)."""

    def __init__(self, dim: int, n_classes: int, hidden: int = 128, depth: int = 3, n_fourier: int = 16):
        super().__init__()
        self.n_fourier = n_fourier
        layers: list[nn.Module] = []
        width = dim + n_fourier
        for _ in range(depth):
            layers += [nn.Linear(width, hidden), nn.SiLU()]
            width = hidden
        self.net = nn.Sequential(*layers, nn.Linear(width, n_classes))

    def forward(self, x: Tensor, t: Tensor) -> Tensor:
        return self.net(torch.cat([x.flatten(1), fourier_features(t, self.n_fourier)], dim=1))


@dataclass
class TrainingRecord:
    """Loss every ``log_every`` updates and wall-clock seconds of a baseline's training."""

    losses: list[float] = field(default_factory=list)
    seconds: float = 0.0


def fit_adam(params: list[Tensor], loss_fn: Callable[[int], Tensor], steps: int, lr: float, desc: str,
             progress: bool) -> TrainingRecord:
    """Adam with a cosine schedule over ``steps`` updates of ``loss_fn(step)``."""
    start = time.perf_counter()
    record = TrainingRecord()
    opt = torch.optim.Adam(params, lr=lr)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=max(steps, 1))
    with progress_bar(steps, desc, enabled=progress) as advance:
        for step in range(steps):
            loss = loss_fn(step)
            if not torch.isfinite(loss):
                raise FloatingPointError(f"{desc}: loss became {loss.item()} at update {step}")
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            advance(loss=loss.item())
            if step % max(steps // 20, 1) == 0:
                record.losses.append(loss.item())
    record.seconds = time.perf_counter() - start
    return record


def train_noisy_classifier(net: nn.Module, sde: SDE, x: Tensor, y: Tensor, *, steps: int = 4000,
                           batch_size: int = 256, lr: float = 2e-3, t_end: float = 1e-3,
                           generator: torch.Generator | None = None, progress: bool = True) -> TrainingRecord:
    """Cross-entropy of ``net(x_t, t)`` against y on pairs noised at t ~ U(t_end, 1), x_t ~ p(x_t | x_0)."""

    def loss_fn(_: int) -> Tensor:
        idx = torch.randint(0, x.shape[0], (batch_size,), generator=generator).to(x.device)
        t = t_end + (1.0 - t_end) * rand((batch_size,), generator, device=x.device, dtype=x.dtype)
        x_t = sde.perturb(x[idx], t, randn(x[idx].shape, generator, device=x.device, dtype=x.dtype))
        return F.cross_entropy(net(x_t, t), y[idx])

    net.train()
    record = fit_adam(list(net.parameters()), loss_fn, steps, lr, "noisy classifier", progress)
    net.eval().requires_grad_(False)
    return record


def train_conditional_pathway(model: ConditionalScore, sde: SDE, x: Tensor, y: Tensor, *, steps: int = 4000,
                              batch_size: int = 512, lr: float = 2e-3, label_dropout: float = 0.1,
                              t_end: float = 1e-3, spacing: Spacing = "uniform",
                              generator: torch.Generator | None = None, progress: bool = True) -> TrainingRecord:
    """Classifier-free guidance's training: denoising score matching of the label pathway on the pairs.

    Args:
        x: clean inputs of the labelled pairs, (N, ...).
        y: their labels, (N, K).
        label_dropout: probability that a label is replaced by the null label (Ho & Salimans 2022). The
            augmented model's null label is the frozen pre-trained score, so dropped rows only teach nothing;
            kept for fidelity to CFG's recipe and for pairs that carry only some of several labels.
        spacing: how t is drawn (:func:`ctrl_bio.objective.denoising_score_matching_loss`).
    """

    def loss_fn(_: int) -> Tensor:
        idx = torch.randint(0, x.shape[0], (batch_size,), generator=generator).to(x.device)
        y_b = y[idx].clone()
        y_b[rand(y_b.shape, generator, device=y.device) < label_dropout] = NULL_LABEL
        return denoising_score_matching_loss(model, sde, x[idx], y_b, t_end=t_end, spacing=spacing,
                                             generator=generator)

    params = [p for p in model.parameters() if p.requires_grad]
    return fit_adam(params, loss_fn, steps, lr, "cfg pathway", progress)
