"""``ctrl-bio pretrain | train-classifier | finetune | sample`` from a composed config (see ``configs/<command>.yaml``).

Each command takes the resolved config (``hydra`` node removed, ``run_dir`` set) and the checkpoint to
resume from, builds the domain through its ``plugin`` node (a ``_target_``, so this module imports no
domain), and writes into ``run_dir``. Only rank 0 writes the exported weights and reports.
"""

from __future__ import annotations

import json
import logging
import math
import zlib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities import rank_zero_only
from omegaconf import DictConfig, OmegaConf

from ctrl_bio.domain import Domain, check_domain
from ctrl_bio.labels import (
    LabelError,
    build_classifier,
    check_trusted,
    exact_log_prob,
    label_specs,
    load_label,
)
from ctrl_bio.model import check_labels
from ctrl_bio.progress import progress_bar
from ctrl_bio.reward import CalibratedClassifier, LabelPrior, LogLikelihoodReward
from ctrl_bio.sampling import ddim, euler_maruyama, time_grid
from ctrl_bio.settings import autocast, check_precision, lightning_device, resolve_device, settings_for
from ctrl_bio.training.modules import CTRLModule
from ctrl_bio.training.runs import (
    CHECKPOINT_DIR,
    build_trainer,
    checkpoint_file,
    export_network,
    fit,
    fit_classifier,
    fit_score_network,
    load_trainable,
    logger_names,
    read_meta,
    read_weights,
    save_weights,
    trainable_state,
)

log = logging.getLogger("ctrl_bio")


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


#: (test, what it asks for) of a setting's value.
Rule = tuple[Callable[[Any], bool], str]
POSITIVE_INT: Rule = (lambda v: _is_int(v) and v >= 1, "a positive integer")
COUNT: Rule = (lambda v: _is_int(v) and v >= 0, "an integer >= 0")
POSITIVE: Rule = (lambda v: _is_number(v) and v > 0, "a positive number")
OPTIONAL_POSITIVE_INT: Rule = (lambda v: v is None or POSITIVE_INT[0](v), "a positive integer or null")
FRACTION: Rule = (lambda v: _is_number(v) and 0 < v < 1, "a number in (0, 1)")

#: Settings every training run reads (``sample`` trains nothing and takes none of them).
TRAINING_SETTINGS: dict[str, Rule] = {"seed": COUNT, "checkpoint_every": OPTIONAL_POSITIVE_INT,
                                      "trainer.max_steps": OPTIONAL_POSITIVE_INT}
#: What each command's settings must be: ``steps=0`` would exit 0 with an untrained network, ``steps=-1`` would
#: never end, ``batch_size=0`` draws empty batches.
SETTINGS: dict[str, dict[str, Rule]] = {
    "pretrain": {**TRAINING_SETTINGS, "steps": POSITIVE_INT, "batch_size": POSITIVE_INT, "lr": POSITIVE,
                 "t_end": FRACTION},
    "train-classifier": TRAINING_SETTINGS,
    "finetune": {**TRAINING_SETTINGS, "n_steps": POSITIVE_INT, "t_end": FRACTION, "method.steps": COUNT,
                 "method.sm_steps": COUNT, "method.batch_size": POSITIVE_INT, "method.sm_batch_size": POSITIVE_INT,
                 "method.lr": POSITIVE, "method.sm_lr": POSITIVE, "method.pool_size": POSITIVE_INT,
                 "method.eval_every": COUNT, "method.alpha": POSITIVE},
    "sample": {"n": POSITIVE_INT, "batch_size": POSITIVE_INT, "n_steps": OPTIONAL_POSITIVE_INT, "seed": COUNT,
               "sampler": (lambda v: v in ("em", "ddim"), "em (Euler-Maruyama) or ddim")},
}


def check_settings(command: str, cfg: DictConfig) -> None:
    """Refuse a setting outside its range with one line naming the key, before any run directory is made."""
    for key, (ok, wanted) in SETTINGS.get(command, {}).items():
        value = OmegaConf.select(cfg, key, default=KeyError, throw_on_resolution_failure=False)
        if value is not KeyError and not ok(value):
            raise ValueError(f"{key} must be {wanted}, got {value!r}")
    if "trainer" in cfg:  # trainer.logger=wandb without wandb installed: one line, before any run directory
        logger_names(cfg.trainer.get("logger"))
    resolve_device(cfg.get("device") or "auto")  # device=cuda on a machine without one: one line, before any run
    check_precision(cfg.get("precision") or 32)


def run_length_key(command: str, cfg: DictConfig) -> str | None:
    """The setting that makes a resumed run longer: ``steps`` of pretrain, the last phase's length of finetune."""
    if command == "pretrain":
        return "steps"
    if command == "finetune":
        estimator = OmegaConf.select(cfg, "method.estimator", default="score_matching")
        return "method.sm_steps" if estimator == "score_matching" else "method.steps"
    return None


def build_domain(node: DictConfig) -> Domain:
    from hydra.utils import instantiate

    return check_domain(instantiate(node, _convert_="all"))


def build_callbacks(cfg: DictConfig) -> list[Callback]:
    """Extra Lightning callbacks from ``callbacks: [{_target_: ...}, ...]`` (empty by default)."""
    from hydra.utils import instantiate

    return [instantiate(node) for node in cfg.get("callbacks") or []]


def is_rank_zero() -> bool:
    return rank_zero_only.rank == 0


def _trainer_kwargs(cfg: DictConfig) -> dict[str, Any]:
    trainer = OmegaConf.to_container(cfg.trainer, resolve=True)
    # device= and precision= become the trainer's accelerator, devices and precision (an explicit trainer.* wins).
    device, precision = resolve_device(cfg.get("device") or "auto"), check_precision(cfg.get("precision") or 32)
    trainer |= lightning_device(device, precision, trainer)
    return dict(trainer=trainer, checkpoint_every=cfg.checkpoint_every, progress=cfg.progress,
                callbacks=build_callbacks(cfg))


def run_pretrain(cfg: DictConfig, run_dir: Path, resume: Path | None) -> None:
    """Denoising score matching of the domain's score network on its training data; writes ``score.safetensors``."""
    domain = build_domain(cfg.plugin)
    torch.manual_seed(cfg.seed)
    net = domain.score_network()
    fit_score_network(net, domain.sde, domain.training_data(), steps=cfg.steps, batch_size=cfg.batch_size,
                      lr=cfg.lr, t_end=cfg.t_end, seed=cfg.seed, run_dir=run_dir, resume=checkpoint_file(resume),
                      **_trainer_kwargs(cfg))
    if not is_rank_zero():
        return
    path = export_network(net, run_dir / "score.safetensors")
    print(f"pre-trained network: {path}")
    if cfg.evaluate and hasattr(domain, "evaluate_pretrained"):
        quality = domain.evaluate_pretrained(net)
        (run_dir / "quality.json").write_text(json.dumps(quality, indent=2) + "\n")
        print("quality: " + ", ".join(f"{k}={v:.4g}" for k, v in quality.items()))


def pair_seed(seed: int, name: str) -> int:
    """The pairs of label ``name`` are drawn from their own stream: the same in train-classifier and finetune."""
    return int(seed) + zlib.crc32(name.encode()) % 100_000


def _load_pairs(cfg: DictConfig, domain: Domain) -> list[tuple[dict[str, Any], Any]]:
    specs = label_specs(OmegaConf.to_container(cfg.label, resolve=True))
    if not specs:
        raise LabelError("no label given: add label=<name> (a file under configs/label/)")
    return [(spec, load_label(spec, domain=domain, seed=pair_seed(cfg.seed, spec["name"]))) for spec in specs]


def train_label_classifiers(cfg: DictConfig, domain: Domain, labelled: Sequence[tuple[dict, Any]], run_dir: Path,
                            resuming: bool) -> list[CalibratedClassifier]:
    """One calibrated classifier per label into ``run_dir/classifiers/<name>.safetensors`` (+ ``.json`` report).

    When resuming, a finished classifier is loaded and an unfinished one continues from its checkpoint.
    """
    out = []
    for spec, pairs in labelled:
        name = spec["name"]
        path = run_dir / "classifiers" / f"{name}.safetensors"
        if resuming and path.is_file():
            out.append(load_classifier(path, spec, domain))
            continue
        if pairs.n_classes is None:
            raise LabelError(f"label '{name}': continuous labels need a regressor, not a classifier")
        sub = run_dir / "classifiers" / name
        last = sub / CHECKPOINT_DIR / "last.ckpt"
        torch.manual_seed(cfg.seed)
        net = build_classifier(spec, pairs.x.shape[1:], pairs.n_classes)
        training = dict(spec.get("training") or {})
        fraction = (spec.get("calibration") or {}).get("fraction", 0.2)
        clf, report = fit_classifier(net, pairs.x, pairs.y, calib_fraction=fraction, seed=cfg.seed, run_dir=sub,
                                     resume=last if resuming and last.is_file() else None, **training,
                                     **_trainer_kwargs(cfg))
        if is_rank_zero():
            meta = {"label": spec, "n_classes": pairs.n_classes, "x_shape": list(pairs.x.shape[1:]),
                    "n_pairs": len(pairs), "n_skipped": pairs.n_skipped, "skipped": dict(pairs.skipped),
                    "report": vars(report)}
            save_weights(clf.state_dict(), path, meta)
            print(f"classifier '{name}': accuracy {report.accuracy:.3f}, ECE {report.ece_before:.4f} -> "
                  f"{report.ece_after:.4f} (temperature {report.temperature:.3f}); {path}")
        out.append(clf)
    return out


def load_classifier(path: Path, spec: Mapping[str, Any], domain: Domain) -> CalibratedClassifier:
    """A calibrated classifier written by ``train-classifier`` for this label."""
    meta_path = path.with_suffix(".json")
    if not path.is_file() or not meta_path.is_file():
        raise FileNotFoundError(f"classifier: no '{path}' (with its .json) for label '{spec['name']}'")
    meta = read_meta(meta_path)
    if not {"label", "x_shape", "n_classes"} <= meta.keys():
        raise ValueError(f"{meta_path}: not a classifier report of train-classifier (no label, x_shape or n_classes)")
    target = (meta["label"].get("classifier") or {}).get("_target_")
    if target is not None and target != (spec.get("classifier") or {}).get("_target_"):
        # A _target_ the run's own label config does not name is imported only from a trusted package.
        check_trusted(target, f"{meta_path}: classifier _target_")
    net = build_classifier(meta["label"], meta["x_shape"], meta["n_classes"])
    clf = CalibratedClassifier(net)
    clf.load_state_dict(read_weights(path))
    return clf.requires_grad_(False).eval()


def run_train_classifier(cfg: DictConfig, run_dir: Path, resume: Path | None) -> None:
    """Calibrated reward classifiers p(y|x) of the requested labels, trained on clean pairs."""
    domain = build_domain(cfg.plugin)
    train_label_classifiers(cfg, domain, _load_pairs(cfg, domain), run_dir, resuming=resume is not None)


def _reward_fns(cfg: DictConfig, domain: Domain, labelled: Sequence[tuple[dict, Any]], run_dir: Path,
                resuming: bool) -> list:
    if cfg.reward == "exact":
        fns = [exact_log_prob(spec, domain) for spec, _ in labelled]
        missing = [spec["name"] for (spec, _), f in zip(labelled, fns) if f is None]
        if missing:
            raise LabelError(f"reward=exact: label(s) {missing} define no exact likelihood ('exact' field)")
        return fns
    if cfg.reward != "classifier":
        raise ValueError(f"reward must be 'classifier' or 'exact', got {cfg.reward!r}")
    if cfg.classifier is None:
        return train_label_classifiers(cfg, domain, labelled, run_dir, resuming)
    given = Path(cfg.classifier)
    if given.is_file() and len(labelled) == 1:
        return [load_classifier(given, labelled[0][0], domain)]
    return [load_classifier(given / "classifiers" / f"{spec['name']}.safetensors", spec, domain)
            for spec, _ in labelled]


def time_spacing(cfg: DictConfig, domain: Domain) -> str:
    """The sampler's time grid: the run's ``spacing``, else the domain's own (``spacing`` attribute), else uniform."""
    return cfg.get("spacing") or getattr(domain, "spacing", "uniform")


def run_finetune(cfg: DictConfig, run_dir: Path, resume: Path | None) -> None:
    """CTRL fine-tuning of a zero-initialised label pathway; writes ``pathway.safetensors`` (+ ``.json``)."""
    domain = build_domain(cfg.plugin)
    labelled = _load_pairs(cfg, domain)
    fns = _reward_fns(cfg, domain, labelled, run_dir, resuming=resume is not None)
    prior = LabelPrior.from_labels([pairs.y for _, pairs in labelled], [pairs.n_classes for _, pairs in labelled])
    torch.manual_seed(cfg.seed)
    n_classes = [pairs.n_classes for _, pairs in labelled]
    model = domain.augment(domain.pretrained_model(), n_classes)
    # Suite-only settings (pool, control_scales, ...) must be at their defaults: refused by name, never ignored.
    method = settings_for(OmegaConf.to_container(cfg.method, resolve=True), CTRLModule, "ctrl-bio finetune")
    module = CTRLModule(model, domain.sde, LogLikelihoodReward(fns), prior, domain.x_shape, n_steps=cfg.n_steps,
                        t_end=cfg.t_end, spacing=time_spacing(cfg, domain), seed=cfg.seed, **method)
    if cfg.trainer.get("max_steps") not in (None, module.total_steps):
        raise ValueError(f"finetune runs method.sm_steps + method.steps = {module.total_steps} steps (each phase has "
                         f"its own schedule): set those instead of trainer.max_steps={cfg.trainer.max_steps}")
    trainer = build_trainer(run_dir, max_steps=module.total_steps, **_trainer_kwargs(cfg))
    fit(trainer, module, checkpoint_file(resume))
    if is_rank_zero():
        labels = [{"name": spec["name"], "n_classes": pairs.n_classes, "classes": spec.get("classes"),
                   "n_pairs": len(pairs), "skipped": dict(pairs.skipped)} for spec, pairs in labelled]
        path = save_weights(trainable_state(model), run_dir / "pathway.safetensors",
                            {"labels": labels, "steps": trainer.global_step})
        print(f"fine-tuned label pathway: {path}")
        export_model(cfg, domain, model, labels, run_dir / MODEL_DIR)


#: The sub-folder of a finetune run holding its model in the Hugging Face convention (:mod:`ctrl_bio.hub`).
MODEL_DIR = "model"


def export_model(cfg: DictConfig, domain: Domain, model: torch.nn.Module, labels: list[dict[str, Any]],
                 folder: Path) -> Path | None:
    """The fine-tuned model as a ``save_pretrained`` folder (config.json, model.safetensors, model card, ``base/``).

    ``config.json["extra"]`` keeps what ``ctrl-bio sample run=<folder>`` needs besides the model: the domain's plugin
    node, the sample shape, the sampler's grid and the labels. A model the hub cannot describe (a network without a
    ``config``) is reported in one log line and not exported: ``pathway.safetensors`` is still the run's result.
    """
    from ctrl_bio.hub import save_pretrained

    method = cfg.method
    extra = {"plugin": OmegaConf.to_container(cfg.plugin, resolve=True), "x_shape": list(domain.x_shape),
             "n_steps": cfg.n_steps, "t_end": cfg.t_end, "spacing": time_spacing(cfg, domain), "labels": labels}
    try:
        save_pretrained(model, folder, labels=labels, alpha=method.get("alpha"), gamma=method.get("gamma"),
                        estimator=method.get("estimator"), extra=extra,
                        training_data=", ".join(f"{lab['n_pairs']} pairs of label '{lab['name']}'" for lab in labels))
    except TypeError as exc:
        log.warning("model/ not written (the Hub-style folder): %s", exc)
        return None
    print(f"fine-tuned model (save_pretrained folder): {folder}")
    return folder


def parse_request(y: Any, labels: Sequence[Mapping[str, Any]]) -> torch.Tensor:
    """``y=2`` or ``y=[0,1]`` (one class per label, -1 for none) as a (K,) long tensor."""
    values = list(y) if isinstance(y, (list, tuple)) or OmegaConf.is_list(y) else [y]
    names = [lab["name"] for lab in labels]
    if len(values) != len(labels):
        raise ValueError(f"y has {len(values)} value(s) but the run was fine-tuned for {len(labels)} label(s) "
                         f"{names}: give one class per label, e.g. y=[{','.join('0' for _ in labels)}]")
    try:
        request = torch.tensor([int(v) for v in values], dtype=torch.long)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"y must hold integer class indices, got {values}") from exc
    try:
        check_labels(request[None], [lab["n_classes"] for lab in labels])
    except ValueError as exc:
        raise ValueError(f"y={values} for labels {names}: {exc}") from exc
    return request


@dataclass
class SampleSource:
    """What ``ctrl-bio sample`` draws from: a fine-tuned model, its domain, labels and the sampler grid it was
    fine-tuned with."""

    model: torch.nn.Module
    domain: Domain
    labels: list[dict[str, Any]]
    n_steps: int
    t_end: float
    spacing: str


def load_finetune_run(ft_dir: Path) -> SampleSource:
    """A finetune run directory: its saved config, ``pathway.safetensors`` and the domain's pre-trained model."""
    weights = ft_dir / "pathway.safetensors"
    for needed in (ft_dir / "config.yaml", weights, weights.with_suffix(".json")):
        if not needed.is_file():
            raise FileNotFoundError(f"run={ft_dir}: no '{needed.name}' there (is it a finished finetune run or a "
                                    f"save_pretrained folder?)")
    ft_cfg = OmegaConf.load(ft_dir / "config.yaml")
    labels = read_meta(weights.with_suffix(".json")).get("labels")
    if not labels:
        raise ValueError(f"{weights.with_suffix('.json')}: names no labels (is it a finetune run's pathway.json?)")
    domain = build_domain(ft_cfg.plugin)
    model = domain.augment(domain.pretrained_model(), [lab["n_classes"] for lab in labels])
    load_trainable(model, weights)
    return SampleSource(model, domain, labels, ft_cfg.n_steps, ft_cfg.t_end, time_spacing(ft_cfg, domain))


def check_targets(node: Any, where: str) -> None:
    """Every ``_target_`` of a config read from a file lies in a trusted package (``check_trusted``)."""
    if isinstance(node, Mapping):
        if "_target_" in node:
            check_trusted(str(node["_target_"]), f"{where} _target_")
        for value in node.values():
            check_targets(value, where)
    elif isinstance(node, list):
        for value in node:
            check_targets(value, where)


def load_model_folder(folder: Path) -> SampleSource:
    """A ``save_pretrained`` folder written by ``ctrl-bio finetune`` (``<run>/model``): the model, and the domain
    rebuilt from ``config.json["extra"]``."""
    from ctrl_bio.hub import from_pretrained, read_config

    extra = read_config(folder).get("extra") or {}
    missing = [k for k in ("plugin", "labels", "n_steps", "t_end") if k not in extra]
    if missing:
        raise ValueError(f"run={folder}: config.json has no extra {missing} (only folders written by ctrl-bio "
                         f"finetune name their domain; sample others with the Python API, ctrl_bio.hub)")
    check_targets(extra["plugin"], f"{folder}/config.json: extra.plugin")  # a shared folder names what is imported
    model = from_pretrained(folder)
    domain = build_domain(OmegaConf.create(extra["plugin"]))
    return SampleSource(model, domain, extra["labels"], extra["n_steps"], extra["t_end"],
                        extra.get("spacing") or "uniform")


def load_sample_source(run: str | None) -> SampleSource:
    """``run=`` of ``ctrl-bio sample``: a finetune run directory or a ``save_pretrained`` folder (``<run>/model``)."""
    if run is None:
        raise ValueError("sample needs run=<directory of a finetune run, or its model/ folder>")
    path = Path(run)
    if (path / "config.json").is_file():
        return load_model_folder(path)
    return load_finetune_run(path)


#: ``sampler=`` of ``ctrl-bio sample``: em (Euler-Maruyama, the sampler CTRL fine-tunes with) or ddim (deterministic).
SAMPLERS = ("em", "ddim")


def draw_samples(source: SampleSource, request: torch.Tensor, *, n: int, batch_size: int, n_steps: int, seed: int,
                 sampler: str = "em", device: torch.device | str = "cpu", precision: str | int = 32,
                 progress: bool = False) -> torch.Tensor:
    """n samples of ``source`` with the label request (K,), ``batch_size`` at a time, on the CPU.

    Every batch's prior draw and noise come from one CPU generator seeded with ``seed``: the same samples on any
    device. ``sampler="ddim"`` follows the deterministic DDIM step (:func:`ctrl_bio.sampling.ddim`), so its noise is
    the prior draw alone.
    """
    if sampler not in SAMPLERS:
        raise ValueError(f"sampler must be one of {', '.join(SAMPLERS)}, got {sampler!r}")
    domain, model = source.domain, source.model
    times = time_grid(n_steps, source.t_end, spacing=source.spacing, device=device)
    g = torch.Generator().manual_seed(seed)
    n_batches = -(-n // batch_size)
    chunks = []
    with torch.no_grad(), autocast(device, precision), \
            progress_bar(n_batches * n_steps, f"sampling ({sampler})", enabled=progress) as advance:
        for start in range(0, n, batch_size):
            b = min(batch_size, n - start)
            score_fn = model.conditioned(request.expand(b, -1).to(device))

            def counted(x: torch.Tensor, t: torch.Tensor, score_fn=score_fn) -> Any:
                advance()  # one score evaluation is one sampler step
                return score_fn(x, t)

            x_init = domain.sde.prior_sampling((b, *domain.x_shape), generator=g, device=device)
            if sampler == "ddim":
                x = ddim(domain.sde, counted, x_init, times)
            else:
                x = euler_maruyama(domain.sde, counted, x_init, times, generator=g, keep_trajectory=False).x
            chunks.append(x.float().cpu())
    return torch.cat(chunks)


def plot_samples(domain: Domain, x: torch.Tensor, y: torch.Tensor, label_names: Sequence[str],
                 run_dir: Path) -> Path:
    """``samples.png`` beside the samples: the domain's own ``plot_samples(x, y, label_names, path)`` where it has one
    (an optional hook, like ``project``), else a scatter of the first two coordinates."""
    path = run_dir / "samples.png"
    if hasattr(domain, "plot_samples"):
        return Path(domain.plot_samples(x, y, label_names, path))
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    flat = x.reshape(x.shape[0], -1)
    second = flat[:, 1] if flat.shape[1] > 1 else torch.zeros(flat.shape[0])
    fig, ax = plt.subplots(figsize=(4, 4))
    ax.scatter(flat[:, 0].numpy(), second.numpy(), s=3, alpha=0.5)
    ax.set_xlabel("x[0]")
    ax.set_ylabel("x[1]")
    ax.set_title(", ".join(f"{name}={v}" for name, v in zip(label_names, y[0].tolist())), fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def run_sample(cfg: DictConfig, run_dir: Path, resume: Path | None = None) -> None:
    """Samples of a fine-tuned run (or its ``model/`` folder) with the requested labels, in the domain's format,
    and a plot of them (``samples.png``)."""
    source = load_sample_source(cfg.run)
    labels = source.labels
    names = [lab["name"] for lab in labels]
    request = parse_request(cfg.y, labels)
    device, precision = resolve_device(cfg.get("device") or "auto"), check_precision(cfg.get("precision") or 32)
    source.model.to(device)
    x = draw_samples(source, request, n=cfg.n, batch_size=cfg.batch_size, n_steps=cfg.n_steps or source.n_steps,
                     seed=cfg.seed, sampler=cfg.get("sampler", "em"), device=device, precision=precision,
                     progress=cfg.get("progress", False))
    y = request.expand(cfg.n, -1)
    path = source.domain.write_samples(x, y, names, run_dir)
    print(f"{cfg.n} samples with {dict(zip(names, request.tolist()))}: {path}")
    if cfg.get("plot", True):
        print(f"plot: {plot_samples(source.domain, x, y, names, run_dir)}")


COMMANDS = {"pretrain": run_pretrain, "train-classifier": run_train_classifier, "finetune": run_finetune,
            "sample": run_sample}
