"""The optimum of CTRL's objective as a row, and how much of it a learned row reaches.

J's maximiser is the pre-trained law tilted by the reward, p*(x | y) = p_pre(x) p(y | x)^(gamma/alpha) / Z(y)
(DESIGN.md; Zhao et al. 2024, eq. 7 with gamma). Self-normalised importance resampling of N pre-trained samples with
weights p(y | x_i)^(gamma/alpha) draws from it without training anything: what a perfect estimator would reach with
the same pre-trained model and reward classifier. Its KL to the pre-trained law, sum_i w_i log(N w_i), is the path
KL of the optimal control too (the optimal process shares the pre-trained bridges given x_0), so J is comparable.
``fraction_of_optimum`` = (metric - pre-trained) / (optimum - pre-trained) puts every learned row on that scale.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from ctrl_bio.harness import Row
from ctrl_bio.objective import WeightedPool


def ctrl_pool(ctx: Any, source: str, pool_size: int) -> Tensor:
    """The unlabelled pool ``ctrl``'s score matching tilts by p(y|x)^gamma, (pool_size, *x_shape).

    ``training``: pool_size of the pre-trained model's training samples, a fixed random subset. ``pretrained``:
    pool_size samples of the pre-trained model, the target CTRL's theory names (p_pre tilted), passed through the
    domain's ``project`` where it has one: for discrete data the sampler's continuous end points lie off the
    lattice the network was trained on, and matching them near t = 0 costs a large control (on QM9 graphs a path
    KL of about 200 nats against 1-2 with the snapped pool; benchmarks/molecules/README.md).
    """
    if source == "training":
        g = torch.Generator().manual_seed(ctx.seed + 7100)
        return ctx.x_train[torch.randperm(ctx.x_train.shape[0], generator=g)[:pool_size]]
    if source == "pretrained":
        pool = ctx.sample(lambda _y: ctx.pretrained, torch.zeros(pool_size, len(ctx.n_classes), dtype=torch.long),
                          seed_offset=7100)[0]
        project = getattr(ctx.domain, "project", None)
        return project(pool) if project is not None else pool
    raise ValueError(f"method.pool must be 'training' or 'pretrained', got {source!r}")


#: Rows that are not learned from the reward: they get no ``fraction_of_optimum``.
REFERENCE_ROWS = ("pretrained", "optimum", "real_data", "shuffled", "exact_guidance")


@dataclass
class TiltedDraw:
    """Samples of the tilted pool for a set of requests.

    Attributes:
        x: one sample per request, (B, ...).
        kl: KL(p*(.|y) || p_pre) of each request's tilted pool, sum_i w_i log(N w_i), (B,).
        ess: the smallest Kish effective sample size over the requested label combinations.
    """

    x: Tensor
    kl: Tensor
    ess: float


def draw_tilted(pool: WeightedPool, y: Tensor, generator: torch.Generator) -> TiltedDraw:
    """One draw per request from the pool tilted for it (importance resampling, with replacement)."""
    x = pool.draw(y, generator)
    n = pool.x0.shape[0]
    combos, inverse = torch.unique(y, dim=0, return_inverse=True)
    kl_per_combo = torch.stack([(pool.weights(c) * (n * pool.weights(c)).clamp_min(1e-300).log()).sum()
                                for c in combos]).float()
    ess = min(pool.effective_sample_size(c) for c in combos)
    return TiltedDraw(x=x, kl=kl_per_combo[inverse], ess=ess)


@dataclass
class RequestDraw:
    """One importance-resampled pool index per request, from per-request log weights.

    Attributes:
        index: the drawn pool item of each request, (R,).
        kl: KL of each request's tilted pool to the untilted one, sum_i w_i log(N w_i), (R,).
        ess: Kish effective sample size of each request's weights, (R,).
    """

    index: Tensor
    kl: Tensor
    ess: Tensor


def draw_per_request(log_weights: Tensor, generator: torch.Generator) -> RequestDraw:
    """Importance resampling with a weight vector per request: ``log_weights`` (R, N) holds
    (gamma/alpha) log p(y_r | x_i) for request r and pool item i. For continuous labels every request has its own
    tilt (a Gaussian reward N(y_r; f(x), sigma^2) is a different function of x for each requested value)."""
    w = torch.softmax(log_weights.double(), dim=1)
    n = w.shape[1]
    index = torch.multinomial(w, 1, generator=generator)[:, 0]
    kl = (w * (n * w).clamp_min(1e-300).log()).sum(1)
    ess = 1.0 / (w**2).sum(1)
    return RequestDraw(index=index, kl=kl.float(), ess=ess.float())


def add_fraction_of_optimum(rows: Sequence[Row], metric: str = "accuracy") -> None:
    """Give every learned row ``fraction_of_optimum`` = (m - m_pretrained) / (m_optimum - m_pretrained) on ``metric``,
    in place, when the suite ran both reference rows on the same label; nothing otherwise."""
    by_label: dict[str, dict[str, Row]] = {}
    for r in rows:
        by_label.setdefault(r.label, {})[r.method] = r
    for named in by_label.values():
        pre, opt = named.get("pretrained"), named.get("optimum")
        if pre is None or opt is None or pre.metrics.get(metric) is None or opt.metrics.get(metric) is None:
            continue
        gain = opt.metrics[metric] - pre.metrics[metric]
        for method, r in named.items():
            if method not in REFERENCE_ROWS and r.metrics.get(metric) is not None:
                r.metrics["fraction_of_optimum"] = (r.metrics[metric] - pre.metrics[metric]) / gain if gain else None
