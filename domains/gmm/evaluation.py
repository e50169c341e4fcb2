"""How the gmm suite scores samples for one or several labels (DESIGN.md, "The exact testbed").

A :class:`LabelTask` holds, per label, the evaluation likelihood p_k(y_k | x) (exact where the label config
names one, else an oracle classifier trained on pairs disjoint from the reward's) and, when every label is
exact, a sampler of the exact target p(x | y) ∝ p_pre(x) prod_k p_k(y_k | x): the restricted mixture for a
single component label, importance resampling of a large mixture pool otherwise.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from ctrl_bio.metrics import accuracy, energy_distance, histogram_tv, macro_f1
from ctrl_bio.objective import WeightedPool
from ctrl_bio.reward import LabelPrior
from domains.gmm.testbed import Testbed

LogProbFn = Callable[[Tensor], Tensor]


@dataclass
class LabelTask:
    """The labels of one suite run and how to evaluate them.

    Attributes:
        names: label names, in column order of y (B, K).
        n_classes: classes per label.
        eval_log_probs: per label, x -> log p_k(. | x) (B, C_k) used for evaluation.
        exact: whether every ``eval_log_probs`` is the true likelihood (then targets and J* exist).
        component_label: the single label is the mixture's component label (exact h-transform, exact target).
    """

    testbed: Testbed
    names: list[str]
    n_classes: tuple[int, ...]
    eval_log_probs: list[LogProbFn]
    exact: bool
    component_label: bool
    pool_size: int = 200_000

    def __post_init__(self) -> None:
        self._pool: WeightedPool | None = None

    @property
    def title(self) -> str:
        return " + ".join(f"{n} ({c} classes)" for n, c in zip(self.names, self.n_classes))

    def log_likelihood(self, x: Tensor, y: Tensor) -> Tensor:
        """sum_k log p_k(y_k | x) under the evaluation likelihoods, (B,)."""
        return sum(f(x).gather(1, y[:, k:k + 1]).squeeze(1) for k, f in enumerate(self.eval_log_probs))

    def pool(self) -> WeightedPool:
        """A large pre-trained (mixture) sample with the exact label likelihoods, built once."""
        if self._pool is None:
            g = torch.Generator().manual_seed(self.testbed.seed + 5000)
            x, _ = self.testbed.mixture.sample(self.pool_size, g)
            self._pool = WeightedPool(x, [f(x) for f in self.eval_log_probs])
        return self._pool

    def request_prior(self) -> LabelPrior:
        """p(y_k) per label: exact marginals E_pre p_k(. | x) for exact labels (product over labels)."""
        if self.component_label:
            return LabelPrior([self.testbed.component_label.class_probs()])
        return LabelPrior([lp.exp().mean(0) for lp in self.pool().class_log_probs])

    def optimum(self, y: Tensor) -> float | None:
        """J* = E_y log Z(y), Z(y) = E_pre prod_k p_k(y_k | x), the optimum of J at alpha = gamma = 1."""
        if not self.exact:
            return None
        if self.component_label:
            return float(self.request_prior().log_prob(y).mean())
        combos, inverse = torch.unique(y, dim=0, return_inverse=True)
        logw = torch.stack([sum(lp[:, int(v)] for lp, v in zip(self.pool().class_log_probs, row))
                            for row in combos]).double()  # (combos, N)
        log_z = torch.logsumexp(logw, 1) - math.log(logw.shape[1])
        return float(log_z[inverse].mean())

    def sample_target(self, y: Tensor, generator: torch.Generator) -> Tensor | None:
        """Exact samples of p(x | y) for requests y (B, K); None without exact likelihoods."""
        if not self.exact:
            return None
        if self.component_label:
            return self.testbed.component_label.sample_target(y[:, 0], generator)
        return self.pool().draw(y, generator)


def combination_index(y: Tensor) -> Tensor:
    """An integer per row for its label combination, (B,) (for per-combination metrics and colours)."""
    return torch.unique(y, dim=0, return_inverse=True)[1]


def label_metrics(task: LabelTask, x: Tensor, y: Tensor) -> dict[str, float]:
    """Accuracy and macro-F1 averaged over labels (per label too when several), and E[p(y | x)]."""
    out: dict[str, float] = {}
    accs, f1s = [], []
    for k, (name, n, f) in enumerate(zip(task.names, task.n_classes, task.eval_log_probs)):
        pred = f(x).argmax(1)
        accs.append(accuracy(pred, y[:, k]))
        f1s.append(macro_f1(pred, y[:, k], n))
        if len(task.names) > 1:
            out[f"accuracy_{name}"] = accs[-1]
    out["accuracy"] = sum(accs) / len(accs)
    out["macro_f1"] = sum(f1s) / len(f1s)
    out["likelihood"] = float(task.log_likelihood(x, y).exp().mean())
    return out


def distribution_metrics(task: LabelTask, x: Tensor, y: Tensor, target: Tensor,
                         twins: list[Tensor]) -> dict[str, float]:
    """Energy distance to exact target samples per label combination beside its noise floor, and component TV.

    The noise floor is the mean distance between ``target`` and independent exact twins: a single such
    distance fluctuates by a factor of two at a few hundred samples per class, so one draw is no floor.
    """
    mixture = task.testbed.mixture
    comp, comp_target = mixture.component_log_joint(x).argmax(1), mixture.component_log_joint(target).argmax(1)
    combo = combination_index(y)
    dist, floor, tv = [], [], []
    for c in range(int(combo.max()) + 1):
        rows = combo == c
        if rows.sum() < 2:
            continue
        dist.append(energy_distance(x[rows], target[rows]))
        floor.append(sum(energy_distance(twin[rows], target[rows]) for twin in twins) / len(twins))
        tv.append(histogram_tv(comp[rows], comp_target[rows], mixture.n_components))
    mean = lambda v: float(sum(v) / len(v))  # noqa: E731
    return {"distance_to_target": mean(dist), "noise_floor": mean(floor), "component_tv": mean(tv)}
