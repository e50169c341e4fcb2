"""Rewards log p(y | x0) for CTRL: calibrated classifiers on clean data, summed over labels.

CTRL (Zhao et al. 2024, Sec. 4.1) learns p(y | x, c) from offline pairs on clean x only and uses its
log-likelihood as the terminal reward. Calibration matters because the fine-tuned model targets
p_pre(x) p(y|x)^gamma: an over-confident classifier acts like gamma > 1. Temperature scaling (Guo et al.
2017, "On Calibration of Modern Neural Networks", eq. 9) is fitted on a held-out split and the expected
calibration error (ECE, Naeini et al. 2015; Guo et al. eq. 3) is reported before and after.

Several labels whose pairs come from separate data sets are combined by conditional independence given
x (CTRL Sec. 5): log p(y_1, ..., y_K | x) = sum_k log p_k(y_k | x).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Protocol

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from ctrl_bio.metrics import expected_calibration_error  # noqa: F401  (public here too, as before)


class Reward(Protocol):
    """A terminal reward ``(x0, y) -> (batch_size,)``; y has shape (batch_size, n_labels)."""

    def __call__(self, x0: Tensor, y: Tensor) -> Tensor: ...


def mlp_classifier(in_dim: int, n_classes: int, hidden: int = 128, depth: int = 2) -> nn.Module:
    """A small MLP classifier for vector data, logits of shape (B, n_classes)."""
    layers: list[nn.Module] = []
    width = in_dim
    for _ in range(depth):
        layers += [nn.Linear(width, hidden), nn.SiLU()]
        width = hidden
    layers.append(nn.Linear(width, n_classes))
    return nn.Sequential(*layers)


def flat_mlp_classifier(x_shape: tuple[int, ...], n_classes: int, hidden: int = 128, depth: int = 2) -> nn.Module:
    """:func:`mlp_classifier` on flattened samples of any shape (the default classifier of a label config)."""
    in_dim = 1
    for n in x_shape:
        in_dim *= int(n)
    return nn.Sequential(nn.Flatten(), mlp_classifier(in_dim, n_classes, hidden=hidden, depth=depth))


def fit_temperature(logits: Tensor, y: Tensor, max_iter: int = 200) -> float:
    """Temperature T > 0 minimising the held-out NLL of softmax(logits / T) (Guo et al. 2017)."""
    log_t = torch.zeros((), requires_grad=True)
    opt = torch.optim.LBFGS([log_t], lr=0.1, max_iter=max_iter, line_search_fn="strong_wolfe")

    def closure() -> Tensor:
        opt.zero_grad()
        loss = F.cross_entropy(logits / log_t.exp(), y)
        loss.backward()
        return loss

    opt.step(closure)
    return float(log_t.detach().exp())


class CalibratedClassifier(nn.Module):
    """p(y | x) = softmax(f(x) / T) with a fitted temperature T; frozen once calibrated."""

    def __init__(self, net: nn.Module, temperature: float = 1.0):
        super().__init__()
        self.net = net
        self.register_buffer("temperature", torch.tensor(float(temperature)))

    def forward(self, x: Tensor) -> Tensor:
        """Calibrated log-probabilities, (B, n_classes), on x's device; the network runs where its weights are (a
        classifier on the GPU scores samples kept on the CPU, and gradients flow back across the move)."""
        return F.log_softmax(self.net(x.to(self.temperature.device)) / self.temperature, dim=1).to(x.device)


@dataclass
class ClassifierReport:
    """How a reward classifier fared on its held-out calibration split."""

    train_size: int
    calib_size: int
    accuracy: float
    ece_before: float
    ece_after: float
    temperature: float
    nll_before: float
    nll_after: float


def calibration_split(y: Tensor, n: int, calib_fraction: float,
                      generator: torch.Generator | None = None) -> tuple[Tensor, Tensor]:
    """Random disjoint (calibration, training) indices of n pairs; the calibration split is never trained on."""
    if y.shape != (n,):
        raise ValueError(f"labels must have shape ({n},), got {tuple(y.shape)}")
    n_calib = max(int(round(calib_fraction * n)), 1)
    if n - n_calib < 2:
        raise ValueError(f"need at least 3 pairs to train and calibrate a classifier, got {n}")
    perm = torch.randperm(n, generator=generator)
    return perm[:n_calib], perm[n_calib:]


def fit_minibatches(net: nn.Module, train: Tensor, loss_of: Callable[[Tensor], Tensor], *, epochs: int,
                    batch_size: int, lr: float, weight_decay: float, generator: torch.Generator | None) -> None:
    """AdamW with cosine decay over shuffled minibatches of the ``train`` indices; ``loss_of(idx)`` is a batch's loss.

    The loop every reward model of the toolkit is trained with (classifiers here, regressors in
    :mod:`ctrl_bio.continuous`); leaves ``net`` in eval mode.
    """
    opt = torch.optim.AdamW(net.parameters(), lr=lr, weight_decay=weight_decay)
    n_train = train.numel()
    steps_per_epoch = max(n_train // batch_size, 1)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=epochs * steps_per_epoch)
    net.train()
    for _ in range(epochs):
        order = train[torch.randperm(n_train, generator=generator)]
        for i in range(steps_per_epoch):
            loss = loss_of(order[i * batch_size:(i + 1) * batch_size])
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
    net.eval()


def train_classifier(net: nn.Module, x: Tensor, y: Tensor, *, calib_fraction: float = 0.2, epochs: int = 200,
                     batch_size: int = 256, lr: float = 3e-3, weight_decay: float = 1e-4,
                     generator: torch.Generator | None = None) -> tuple[CalibratedClassifier, ClassifierReport]:
    """Train ``net`` on clean pairs (x, y), then temperature-scale it on a held-out split.

    Args:
        net: a module mapping x (B, ...) to logits (B, n_classes).
        x: inputs, (N, ...).
        y: integer class labels, (N,).
        calib_fraction: fraction of the pairs held out for calibration (never trained on).
    """
    calib, train = calibration_split(y, x.shape[0], calib_fraction, generator)
    fit_minibatches(net, train, lambda idx: F.cross_entropy(net(x[idx]), y[idx]), epochs=epochs,
                    batch_size=batch_size, lr=lr, weight_decay=weight_decay, generator=generator)
    n_train = train.numel()
    with torch.no_grad():
        logits = net(x[calib])
    temperature = fit_temperature(logits, y[calib])
    probs_before, probs_after = logits.softmax(1), (logits / temperature).softmax(1)
    report = ClassifierReport(
        train_size=n_train, calib_size=calib.numel(),
        accuracy=float((logits.argmax(1) == y[calib]).float().mean()),
        ece_before=expected_calibration_error(probs_before, y[calib]),
        ece_after=expected_calibration_error(probs_after, y[calib]),
        temperature=temperature,
        nll_before=float(F.cross_entropy(logits, y[calib])),
        nll_after=float(F.cross_entropy(logits / temperature, y[calib])))
    classifier = CalibratedClassifier(net, temperature).requires_grad_(False)
    return classifier, report


class LogLikelihoodReward:
    """r(x0, y) = sum_k log p_k(y_k | x0) from one log-probability model per label.

    Args:
        log_prob_fns: one callable per label, ``x0 -> (B, n_classes_k)`` log-probabilities
            (a :class:`CalibratedClassifier`, or a domain's exact label likelihood).
    """

    def __init__(self, log_prob_fns: Sequence[Callable[[Tensor], Tensor]]):
        if len(log_prob_fns) == 0:
            raise ValueError("a reward needs at least one label")
        self.log_prob_fns = list(log_prob_fns)

    def __call__(self, x0: Tensor, y: Tensor) -> Tensor:
        if y.ndim != 2 or y.shape[1] != len(self.log_prob_fns):
            raise ValueError(f"labels must have shape (batch_size, {len(self.log_prob_fns)}), got {tuple(y.shape)}")
        total = x0.new_zeros(x0.shape[0])
        for k, log_prob in enumerate(self.log_prob_fns):
            total = total + log_prob(x0).gather(1, y[:, k:k + 1]).squeeze(1)
        return total


class LabelPrior:
    """p(y) as a product of per-label categorical marginals (default: empirical label frequencies)."""

    def __init__(self, class_probs: Sequence[Tensor]):
        self.class_probs = [torch.as_tensor(p, dtype=torch.float64) / torch.as_tensor(p).sum() for p in class_probs]

    @classmethod
    def from_labels(cls, labels: Sequence[Tensor], n_classes: Sequence[int]) -> LabelPrior:
        """Empirical frequencies of each label's own pairs."""
        return cls([torch.bincount(y, minlength=n).double() for y, n in zip(labels, n_classes)])

    @property
    def n_classes(self) -> tuple[int, ...]:
        return tuple(p.numel() for p in self.class_probs)

    def sample(self, n: int, generator: torch.Generator | None = None) -> Tensor:
        """Labels of shape (n, K)."""
        return torch.stack([torch.multinomial(p, n, replacement=True, generator=generator)
                            for p in self.class_probs], dim=1)

    def log_prob(self, y: Tensor) -> Tensor:
        return sum(torch.log(p[y[:, k]]) for k, p in enumerate(self.class_probs)).float()


class NonDifferentiableRewardError(ValueError):
    """An estimator that follows the reward's gradient was given a reward with none (e.g. an exact label computed on
    the decoded sample)."""


def check_differentiable(r: Tensor, estimator: str) -> None:
    """Refuse a reward value that carries no gradient to x0 where ``estimator`` needs one."""
    if not r.requires_grad:
        raise NonDifferentiableRewardError(
            f"estimator {estimator} follows the reward's gradient in x0, and this reward has none (an exact label "
            "computed on the decoded sample?): use score_matching or soft_value, or a learned classifier "
            "(reward=classifier)")

