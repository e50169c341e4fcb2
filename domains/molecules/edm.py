"""``ctrl-bio benchmark suite=molecules_edm``: conditional generation of QM9's DFT properties as EDM measures it.

The protocol of EDM (Hoogeboom et al. 2022, "Equivariant Diffusion for Molecule Generation in 3D", sec. 4.2) and
GeoLDM, for the continuous targets ``gap`` (eV), ``mu`` (D) and ``alpha`` (bohr^3): a property predictor that never
saw a molecule the generators learned from (here the evaluation oracle of :mod:`domains.molecules.oracle`, trained
on the oracle pool only) predicts the property of each generated molecule, and the mean absolute error against the
requested value c is the score. For each property P:

- requests: c = the DFT values of ``n_eval`` real test molecules (drawn without replacement, seeded; the same
  molecules for every property);
- ``real_data`` (the lower bound): the oracle's prediction on those very molecules against their own DFT values,
  ``mae = mae_lower`` (the oracle's own error; EDM's "QM9" row);
- ``shuffled`` (the upper bound): the same predictions against the requests randomly permuted, ``mae = mae_upper``
  (a generator that ignores c but makes QM9-like molecules; EDM's "Naive (upper-bound)" row);
- ``pretrained``: unconditional samples of the pre-trained model against the requests (another no-control
  reference; the same samples for every property);
- ``ctrl``: CTRL with a continuous label (:mod:`ctrl_bio.continuous`): a regressor (GraphClassifier(n_out=1))
  trained on ``n_pairs`` pairs of the labelled-pairs pool (their DFT values; never the oracle pool) and calibrated
  to its held-out RMSE, the Gaussian likelihood reward, the empirical prior of the pairs' values, the
  zero-initialised molecule pathway (:class:`domains.molecules.pathway.GraphAugmentedScore`: a real-valued label
  embedding in the time embedding plus the domain's LoRA adapters) on the frozen pre-trained network, and
  :func:`finetune_continuous` (``score_matching`` in the suite config) with the pre-trained model's unlabelled
  training molecules as the score-matching pool; sampled with the requested c;
- ``optimum``: J's optimum with this pre-trained model and reward, no training: ``optimum.n`` pre-trained samples
  (snapped to graphs) importance-resampled per request with weights N(c; f(x), s^2)^(gamma/alpha)
  (:func:`ctrl_bio.optimum.draw_per_request`); its ``effective_sample_size`` is the smallest over the requests. Every
  learned row gets ``fraction_of_optimum`` on ``fraction_closed``;
- ``cfg``: the same zero-initialised pathway trained by plain denoising score matching on the labelled pairs
  (label dropout to NaN), sampled with classifier-free guidance s_pre + w (s_cond - s_pre); w is chosen on requests
  of its own (drawn from the pairs' values) by the reward regressor's J = gamma E log N(c; f(x), s^2) - alpha KL,
  CTRL's own objective, never by the oracle.

Every row uses the same Euler-Maruyama sampler (``n_steps``, ``t_end``) and, for ``pretrained``, ``ctrl`` and
``cfg``, the same initial noise and increments. Metrics: ``mae`` of the oracle's prediction against the request over
the valid molecules (RDKit sanitisation of the decode; ``n_valid`` says how many), ``fraction_closed`` =
(mae_upper - mae) / (mae_upper - mae_lower) (0 = no control, 1 = as close as real molecules), ``corr`` (Pearson
correlation of prediction and request over the valid molecules), ``validity``, ``uniqueness``, ``novelty``,
``connected``, and ``kl`` (the path KL to the pre-trained model) where a path exists. Each property gets a scatter
plot of requested against predicted values (``edm_<P>.png``) and each row's molecules as CSV
(``samples/<P>/<row>.csv``: SMILES, requested value, predicted value, valid).
"""

from __future__ import annotations

import csv
import logging
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from ctrl_bio.continuous import (
    ContinuousLabelEmbedding,
    ContinuousPrior,
    GaussianReward,
    finetune_continuous,
    fit_regressor,
)
from ctrl_bio.guidance import classifier_free_guidance, fit_adam
from ctrl_bio.harness import Row, SuiteResult
from ctrl_bio.objective import Objective, denoising_score_matching_loss
from ctrl_bio.optimum import add_fraction_of_optimum, draw_per_request
from ctrl_bio.sampling import ScoreFn, sample_in_batches, time_grid
from ctrl_bio.settings import autocast, check_precision, resolve_device, settings_for
from ctrl_bio.utils import rand
from domains.molecules.data import PROPERTIES, UNITS, decode, encode, graph_types, to_smiles
from domains.molecules.domain import MoleculeDomain
from domains.molecules.metrics import generation_metrics
from domains.molecules.nets import GraphClassifier
from domains.molecules.oracle import predict_properties
from domains.molecules.pathway import GraphAugmentedScore

log = logging.getLogger(__name__)

METHODS = ("real_data", "shuffled", "pretrained", "optimum", "ctrl", "cfg")
#: Rows drawn in each property's scatter plot.
PLOTTED = ("pretrained", "ctrl", "cfg", "real_data")


def fraction_closed(mae: float, mae_lower: float, mae_upper: float) -> float:
    """(mae_upper - mae) / (mae_upper - mae_lower): 0 at the no-control upper bound, 1 at the real-data lower bound;
    NaN when the bounds coincide or mae is NaN."""
    gap = mae_upper - mae_lower
    if not math.isfinite(mae) or not gap > 0:
        return float("nan")
    return (mae_upper - mae) / gap


def bounds(pred: Tensor, target: Tensor, generator: torch.Generator) -> tuple[float, float, Tensor]:
    """(mae_lower, mae_upper, shuffled targets) of real molecules' predictions ``pred`` against their own values
    ``target`` and against a random permutation of them."""
    shuffled = target[torch.randperm(target.shape[0], generator=generator)]
    p, c, s = pred.double(), target.double(), shuffled.double()
    return float((p - c).abs().mean()), float((p - s).abs().mean()), shuffled


def request_metrics(pred: Tensor, target: Tensor, valid: Tensor) -> dict[str, float]:
    """``mae`` and ``corr`` of predictions against requests over the valid molecules, and ``n_valid``."""
    p, c = pred[valid].double(), target[valid].double()
    n = int(valid.sum())
    mae = float((p - c).abs().mean()) if n else float("nan")
    corr = float(torch.corrcoef(torch.stack([p, c]))[0, 1]) if n > 2 and p.std() > 0 and c.std() > 0 else float("nan")
    return {"mae": mae, "corr": corr, "n_valid": n}


class EDMContext:
    """What the rows share: domain, frozen pre-trained network, requests, real test molecules, the sampler."""

    def __init__(self, domain: MoleculeDomain, *, n_eval: int, n_select: int, n_steps: int, t_end: float,
                 batch_size: int, seed: int, oracle: str | Path | None = None, device: str = "cpu",
                 precision: str = "32"):
        self.domain, self.seed, self.batch_size, self.oracle = domain, seed, batch_size, oracle
        # The frozen network and the sampling on the device (bf16-mixed: sampling under autocast); data and scores
        # on the CPU.
        self.device, self.precision = resolve_device(device), check_precision(precision)
        self.n_eval, self.n_select, self.n_steps, self.t_end = n_eval, n_select, n_steps, t_end
        self.times = time_grid(n_steps, t_end)
        self.pretrained = domain.pretrained_model().to(self.device)
        if not hasattr(self.pretrained, "emb_dim"):
            raise TypeError(f"suite molecules_edm needs a network with a time embedding (emb_dim, extra_emb), got "
                            f"{type(self.pretrained).__name__}")
        table = domain.table
        test = table.of_split("test")
        g = torch.Generator().manual_seed(seed + 4000)
        n_test = len(test)
        idx = (torch.randperm(n_test, generator=g)[:n_eval] if n_eval <= n_test
               else torch.randint(n_test, (n_eval,), generator=g))
        self.test_index = idx
        self.x_real = test.x()[idx]
        self.real_values = {p: torch.from_numpy(test.properties[p][idx.numpy()]).float() for p in PROPERTIES}
        self.train_smiles = set(table.of_split("training").smiles)
        self._real_scored: tuple | None = None
        self._pretrained: tuple | None = None
        self._optimum_pool: tuple | None = None

    def sample(self, score_fn_for: Callable[[Tensor], ScoreFn], y: Tensor, seed_offset: int = 2000
               ) -> tuple[Tensor, Tensor]:
        """Samples and path KLs for requests y (B, 1), in batches; the same noise for every row at one offset."""
        g = torch.Generator().manual_seed(self.seed + seed_offset)  # on the CPU: the same paths on any device
        with autocast(self.device, self.precision):
            x, kl = sample_in_batches(self.domain.sde, score_fn_for, y, self.domain.x_shape, self.times,
                                      self.batch_size, g, device=self.device)
        return x.float().cpu(), kl.float().cpu()

    def decoded(self, x: Tensor) -> tuple[Tensor, list, dict[str, Tensor], dict[str, float]]:
        """(valid mask, molecules, oracle predictions per property, generation metrics) of samples x."""
        x = encode(*graph_types(x))  # the decoded graph, not the continuous sample
        mols = decode(x)
        valid = torch.tensor([m is not None for m in mols], dtype=torch.bool)
        return valid, mols, predict_properties(x, self.oracle), generation_metrics(mols, self.train_smiles)

    def optimum_pool(self, n: int) -> tuple:
        """(graphs, decoded, seconds) of n pre-trained samples snapped to graphs, drawn once for every property's
        optimum; seconds is the drawing time the first time and 0 after."""
        if self._optimum_pool is None:
            start = time.perf_counter()
            y = torch.full((n, 1), float("nan"))
            x = self.domain.project(self.sample(lambda _y: self.pretrained, y, seed_offset=7100)[0])
            self._optimum_pool = (x, self.decoded(x), time.perf_counter() - start)
        x, decoded, seconds = self._optimum_pool
        self._optimum_pool = (x, decoded, 0.0)  # its time is charged to the first property's row only
        return x, decoded, seconds

    def real_scored(self) -> tuple:
        if self._real_scored is None:
            self._real_scored = self.decoded(self.x_real)
        return self._real_scored

    def pretrained_scored(self) -> tuple:
        """The pretrained row's samples (they do not depend on the request: one set for every property)."""
        if self._pretrained is None:
            start = time.perf_counter()
            y = torch.full((self.n_eval, 1), float("nan"))
            x, kl = self.sample(lambda _y: self.pretrained, y)
            self._pretrained = (x, torch.zeros_like(kl), self.decoded(x), time.perf_counter() - start)
        return self._pretrained


def fit_property_regressor(x: Tensor, y: Tensor, settings: dict[str, Any], seed: int):
    """The reward regressor: GraphClassifier(n_out=1) fitted by :func:`fit_regressor` on the pairs."""
    s = {"hidden": 64, "edge_hidden": 32, "n_layers": 3, "dropout": 0.1, "epochs": 20, "batch_size": 128,
         "lr": 2e-3, "weight_decay": 1e-2, "calib_fraction": 0.2} | dict(settings)
    torch.manual_seed(seed)
    net = GraphClassifier(1, hidden=int(s["hidden"]), edge_hidden=int(s["edge_hidden"]),
                          n_layers=int(s["n_layers"]), dropout=float(s["dropout"]))
    return fit_regressor(net, x, y, calib_fraction=float(s["calib_fraction"]), epochs=int(s["epochs"]),
                         batch_size=int(s["batch_size"]), lr=float(s["lr"]), weight_decay=float(s["weight_decay"]),
                         seed=seed)


def property_pairs(domain: MoleculeDomain, prop: str, n_pairs: int, seed: int, k: int = 0) -> tuple[Tensor, Tensor]:
    """The (x, value) pairs the reward regressor of the k-th property of a suite is fitted on: n_pairs molecules
    drawn from the labelled-pairs pool (never the oracle pool) by the suite's seed."""
    g = torch.Generator().manual_seed(seed + 7919 * (k + 1))
    table = domain.table
    pool = np.flatnonzero(table.pairs_pool())
    if n_pairs > pool.size:
        raise ValueError(f"data.n_pairs={n_pairs} but the labelled-pairs pool holds {pool.size} molecules")
    pick = np.sort(pool[torch.randperm(pool.size, generator=g)[:n_pairs].numpy()])
    mask = np.zeros(len(table), dtype=bool)
    mask[pick] = True
    sub = table.select(mask)
    return sub.x(), torch.from_numpy(sub.properties[prop]).float()


def train_cfg_pathway(model: GraphAugmentedScore, sde, x: Tensor, y: Tensor, *, steps: int, batch_size: int,
                      lr: float, label_dropout: float, t_end: float, generator: torch.Generator, progress: bool):
    """Denoising score matching of the label pathway on the pairs (x0, y), a label dropped to NaN (no request) with
    probability ``label_dropout``: :func:`ctrl_bio.guidance.train_conditional_pathway` for real labels."""

    def loss_fn(_: int) -> Tensor:
        idx = torch.randint(0, x.shape[0], (batch_size,), generator=generator)
        y_b = y[idx].clone()
        y_b[rand(y_b.shape, generator, device=y.device) < label_dropout] = float("nan")
        return denoising_score_matching_loss(model, sde, x[idx], y_b, t_end=t_end, generator=generator)

    params = [p for p in model.parameters() if p.requires_grad]
    return fit_adam(params, loss_fn, steps, lr, "cfg pathway (continuous)", progress)


def write_rows_csv(path: Path, prop: str, smiles: Sequence[str | None], requested: Tensor, predicted: Tensor,
                   valid: Tensor) -> Path:
    """``sample, smiles, valid, requested_<P>, predicted_<P>`` (SMILES empty when invalid)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["sample", "smiles", "valid", f"requested_{prop}", f"predicted_{prop}"])
        for i, (s, c, p, v) in enumerate(zip(smiles, requested.tolist(), predicted.tolist(), valid.tolist())):
            writer.writerow([i, s or "", int(v), f"{c:.5g}", f"{p:.5g}"])
    return path


def plot_requested_vs_predicted(points: dict[str, tuple[Tensor, Tensor]], prop: str, path: Path,
                                maes: dict[str, float]) -> Path:
    """One panel per row: oracle-predicted against requested value (valid molecules), with the diagonal."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(points), figsize=(3.4 * len(points), 3.4), squeeze=False)
    allv = torch.cat([torch.cat([c, p]) for c, p in points.values()]) if points else torch.zeros(1)
    lo, hi = float(allv.min()), float(allv.max())
    for ax, (name, (c, p)) in zip(axes[0], points.items()):
        ax.scatter(c.numpy(), p.numpy(), s=5, alpha=0.5)
        ax.plot([lo, hi], [lo, hi], "k--", lw=1)
        ax.set_title(f"{name} (MAE {maes.get(name, float('nan')):.3g})", fontsize=9)
        ax.set_xlabel(f"requested {prop} ({UNITS[prop]})")
        ax.set_xlim(lo, hi)
        ax.set_ylim(lo, hi)
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel(f"oracle-predicted {prop}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def run_property(ctx: EDMContext, prop: str, *, n_pairs: int, method: dict[str, Any], cfg: dict[str, Any],
                 regressor: dict[str, Any], methods: Sequence[str], run_dir: Path, progress: bool, info: dict,
                 k: int, optimum: dict[str, Any] | None = None) -> list[Row]:
    """The rows of one property."""
    domain, seed = ctx.domain, ctx.seed
    c_eval = ctx.real_values[prop]
    y_eval = c_eval[:, None]
    rows: list[Row] = []
    outputs: dict[str, tuple[Tensor, Tensor, Tensor, list]] = {}  # name -> (requested, predicted, valid, smiles)
    pinfo: dict[str, Any] = {"n_eval": int(c_eval.numel())}

    # Bounds: the oracle on the real molecules that carry the requested values.
    start = time.perf_counter()
    valid_r, mols_r, pred_r, gen_r = ctx.real_scored()
    pr = pred_r[prop]
    mae_lower, mae_upper, shuffled = bounds(pr, c_eval, torch.Generator().manual_seed(seed + 4100 + k))
    pinfo |= {"mae_lower": mae_lower, "mae_upper": mae_upper}
    real_seconds = time.perf_counter() - start

    def finish(name: str, pred: Tensor, valid: Tensor, mols: list, gen: dict, kl: Tensor | None, seconds: float,
               extra: dict | None = None, requested: Tensor = c_eval) -> None:
        metrics: dict[str, Any] = request_metrics(pred, requested, valid)
        metrics["fraction_closed"] = fraction_closed(metrics["mae"], mae_lower, mae_upper)
        metrics |= gen
        if kl is not None:
            metrics["kl"] = float(kl.mean())
        metrics |= (extra or {})
        metrics["seconds"] = seconds
        rows.append(Row(name, prop, metrics))
        outputs[name] = (requested, pred, valid, to_smiles(mols))
        log.info("%s %s: %s", prop, name, {k: round(v, 4) if isinstance(v, float) else v for k, v in metrics.items()})

    lazy: dict[str, Any] = {}

    def pairs_and_reward():
        if "reward" not in lazy:
            t0 = time.perf_counter()
            x_pairs, y_pairs = property_pairs(domain, prop, n_pairs, seed, k)
            reg, report = fit_property_regressor(x_pairs, y_pairs, regressor, seed + 11 * (k + 1))
            reg.to(ctx.device)  # fitted on the CPU; scores on any device (CalibratedRegressor follows its input)
            lazy.update(x=x_pairs, y=y_pairs, reward=GaussianReward(reg), prior=ContinuousPrior(y_pairs))
            seconds = time.perf_counter() - t0
            pinfo["regressor"] = asdict(report) | {"seconds": seconds}
            log.info("%s regressor (%d pairs): held-out RMSE %.4g, MAE %.4g %s (%.0f s)", prop, n_pairs,
                     report.rmse[0], report.mae[0], UNITS[prop], seconds)
            lazy["charge"] = seconds  # charged to the first learned row
        return lazy["reward"], lazy["prior"]

    def charge() -> float:
        return lazy.pop("charge", 0.0)

    def new_model(prior: ContinuousPrior) -> GraphAugmentedScore:
        # The molecule pathway (label embedding + LoRA, domains/molecules/pathway.py) with a real-valued embedding.
        torch.manual_seed(seed)
        embedding = ContinuousLabelEmbedding(ctx.pretrained.emb_dim, 1, loc=prior.loc, scale=prior.scale)
        return GraphAugmentedScore(ctx.pretrained, lora_rank=domain.lora_rank, lora_targets=domain.lora_targets,
                                   train_copy=domain.train_copy,
                                   embedding=embedding).to(ctx.device)

    objective = Objective.of(method)
    for name in methods:
        start = time.perf_counter()
        if name == "real_data":
            finish(name, pr, valid_r, mols_r, gen_r, None, real_seconds)
        elif name == "shuffled":
            finish(name, pr, valid_r, mols_r, gen_r, None, real_seconds, requested=shuffled)
        elif name == "pretrained":
            x, kl, (valid, mols, pred, gen), seconds = ctx.pretrained_scored()
            finish(name, pred[prop], valid, mols, gen, kl, seconds, {"score_evals": ctx.n_steps})
        elif name == "optimum":
            reward, _ = pairs_and_reward()
            n = int((optimum or {}).get("n", 2048))
            pool, (valid_p, mols_p, pred_p, _), pool_seconds = ctx.optimum_pool(n)
            with torch.no_grad():
                f = reward.predict(pool)[:, 0]
            log_w = objective.tilt * -0.5 * ((c_eval[:, None] - f[None]) / float(reward.sigma[0])) ** 2
            draw = draw_per_request(log_w, torch.Generator().manual_seed(seed + 7200 + k))
            mols = [mols_p[i] for i in draw.index.tolist()]
            pinfo["optimum"] = {"pool_size": n, "tilt": objective.tilt, "ess_median": float(draw.ess.median())}
            finish(name, pred_p[prop][draw.index], valid_p[draw.index], mols,
                   generation_metrics(mols, ctx.train_smiles), draw.kl,
                   time.perf_counter() - start + pool_seconds + charge(),
                   {"effective_sample_size": float(draw.ess.min()), "score_evals": ctx.n_steps})
        elif name == "ctrl":
            reward, prior = pairs_and_reward()
            settings = dict(method)
            source = settings.pop("pool", "training")
            pool_size = int(settings.pop("pool_size", 8192))
            if source != "training":
                raise ValueError(f"method.pool must be 'training' for molecules_edm, got {source!r}")
            settings = settings_for(settings, finetune_continuous, "suite molecules_edm")
            train_x = domain.training_data()
            g = torch.Generator().manual_seed(seed + 7100)
            pool = train_x[torch.randperm(train_x.shape[0], generator=g)[:pool_size]]
            model = new_model(prior)
            result = finetune_continuous(model, domain.sde, reward, prior, domain.x_shape, n_steps=ctx.n_steps,
                                         t_end=ctx.t_end, seed=seed, progress=progress, pool_x0=pool,
                                         checkpoint_path=run_dir / "checkpoints" / f"ctrl_{prop}.safetensors",
                                         **settings)
            pinfo["ctrl"] = {"pool": source, "pool_size": int(pool.shape[0]), "ess": result.ess,
                             "train_seconds": result.seconds, "history": result.history}
            x, kl = ctx.sample(model.conditioned, y_eval)
            valid, mols, pred, gen = ctx.decoded(x)
            finish(name, pred[prop], valid, mols, gen, kl, time.perf_counter() - start + charge(),
                   {"score_evals": 2 * ctx.n_steps})
        elif name == "cfg":
            reward, prior = pairs_and_reward()
            s = {"steps": 600, "batch_size": 128, "lr": 1e-2, "label_dropout": 0.1} | dict(cfg)
            scales = [float(w) for w in s.pop("scales", [1.0, 2.0, 4.0])]
            model = new_model(prior)
            record = train_cfg_pathway(model, domain.sde, lazy["x"].to(ctx.device), lazy["y"][:, None].to(ctx.device),
                                       steps=int(s["steps"]),
                                       batch_size=int(s["batch_size"]), lr=float(s["lr"]),
                                       label_dropout=float(s["label_dropout"]), t_end=ctx.t_end,
                                       generator=torch.Generator().manual_seed(seed + 8000), progress=progress)
            # Guidance weight chosen on requests of its own (drawn from the pairs' values) by the reward's J.
            y_select = prior.sample(ctx.n_select, torch.Generator().manual_seed(seed + 2600 + k))
            per_scale = {}
            for w in scales:
                xs, kls = ctx.sample(lambda y, m=model, w=w: classifier_free_guidance(m, y, w), y_select,
                                     seed_offset=2500)
                per_scale[str(w)] = float(objective.value(reward(xs, y_select), kls).mean())
            best = max(scales, key=lambda w: per_scale[str(w)])
            pinfo["cfg"] = {"pairs": int(lazy["x"].shape[0]), "per_scale_reward_J": per_scale, "scale": best,
                            "losses": record.losses, "train_seconds": record.seconds}
            x, kl = ctx.sample(lambda y, m=model, w=best: classifier_free_guidance(m, y, w), y_eval)
            valid, mols, pred, gen = ctx.decoded(x)
            finish(name, pred[prop], valid, mols, gen, kl, time.perf_counter() - start + charge(),
                   {"score_evals": 2 * ctx.n_steps, "guidance_scale": best})
        else:
            raise ValueError(f"unknown method '{name}' for suite molecules_edm; known: {', '.join(METHODS)}")

    for name, (requested, pred, valid, smiles) in outputs.items():
        write_rows_csv(run_dir / "samples" / prop / f"{name}.csv", prop, smiles, requested, pred, valid)
    points = {n: (outputs[n][0][outputs[n][2]], outputs[n][1][outputs[n][2]]) for n in PLOTTED if n in outputs}
    if points:
        plot_requested_vs_predicted(points, prop, run_dir / f"edm_{prop}.png",
                                    {r.method: r.metrics["mae"] for r in rows})
    info[prop] = pinfo
    return rows


def run_suite(domain: MoleculeDomain, *, run_dir: str | Path, properties: Sequence[str] = ("gap", "mu", "alpha"),
              n_pairs: int = 5000, n_eval: int = 256, n_select: int = 64, n_steps: int = 100, t_end: float = 1e-3,
              batch_size: int = 256, method: dict[str, Any] | None = None, cfg: dict[str, Any] | None = None,
              regressor: dict[str, Any] | None = None, optimum: dict[str, Any] | None = None,
              methods: Sequence[str] = METHODS, seed: int = 0,
              oracle: str | None = None, progress: bool = True, labels: Any = None,
              device: str = "cpu", precision: str = "32") -> SuiteResult:
    """Run the EDM conditional-generation protocol for each property (rows labelled by property).

    Args:
        domain: the molecule domain (QM9, its SDE and pre-trained GraphScoreNet).
        run_dir: where plots, samples and checkpoints go.
        properties: QM9 DFT properties, each a task of its own (``gap``, ``mu``, ``alpha``).
        n_pairs: labelled pairs per property, from the labelled-pairs pool (never the oracle pool).
        n_eval: requests (DFT values of as many real test molecules); ``n_select``: cfg's own selection requests.
        n_steps, t_end, batch_size: the Euler-Maruyama sampler of every row (and its batch).
        method: keyword arguments of :func:`ctrl_bio.continuous.finetune_continuous` for ``ctrl`` plus ``pool``
            (``training``) and ``pool_size``.
        cfg: ``steps``, ``batch_size``, ``lr``, ``label_dropout`` and ``scales`` of the ``cfg`` row.
        regressor: the reward regressor's network and :func:`fit_regressor` settings.
        optimum: ``n``, the pre-trained samples the ``optimum`` row resamples (drawn once for every property).
        methods: the rows, in order (a subset of :data:`METHODS`).
        oracle: the evaluation oracle's checkpoint; None: the shipped one.
        labels: ignored (the properties are the labels); accepted so that a config passing it still runs.
        device: where the frozen network, the trained models and the sampling run (``device=``); ``precision``:
            ``32`` or ``bf16-mixed`` (sampling under bfloat16 autocast).
    """
    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        raise ValueError(f"unknown method(s) {unknown} for suite molecules_edm; known: {', '.join(METHODS)}")
    bad = [p for p in properties if p not in PROPERTIES]
    if bad:
        raise ValueError(f"unknown QM9 propert{'y' if len(bad) == 1 else 'ies'} {bad}; known: {', '.join(PROPERTIES)}")
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    ctx = EDMContext(domain, n_eval=n_eval, n_select=n_select, n_steps=n_steps, t_end=t_end, batch_size=batch_size,
                     seed=seed, oracle=oracle, device=device, precision=precision)
    info: dict[str, Any] = {"protocol": "EDM (Hoogeboom et al. 2022) sec. 4.2", "properties": list(properties),
                            "n_pairs": n_pairs, "n_eval": int(ctx.x_real.shape[0]), "n_select": n_select,
                            "n_steps": n_steps, "t_end": t_end, "method": dict(method or {}), "cfg": dict(cfg or {}),
                            "units": {p: UNITS[p] for p in properties}, "oracle": oracle or "shipped"}
    rows: list[Row] = []
    for k, prop in enumerate(properties):
        rows += run_property(ctx, prop, n_pairs=n_pairs, method=dict(method or {}), cfg=dict(cfg or {}),
                             regressor=dict(regressor or {}), methods=methods, run_dir=run_dir, progress=progress,
                             info=info, k=k, optimum=optimum)
    add_fraction_of_optimum(rows, metric="fraction_closed")
    info["seconds"] = time.perf_counter() - start
    return SuiteResult("molecules_edm", rows, info)
