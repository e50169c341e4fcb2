"""Run plumbing of the training commands: trainers, checkpoints, resumption and exported weights.

A run directory holds ``config.yaml``, ``run.log``, ``metrics.csv`` (Lightning's CSVLogger; ``trainer.logger`` adds
TensorBoard or offline wandb logs),
``checkpoints/last.ckpt`` plus the latest ``step=<k>.ckpt`` (full training state), and the final
trainable weights as safetensors. ``resume=<run dir or .ckpt>`` continues from the checkpoint.
"""

from __future__ import annotations

import csv
import importlib
import importlib.util
import inspect
import json
import logging
import os
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback, ModelCheckpoint, RichProgressBar
from lightning.pytorch.loggers import CSVLogger
from safetensors.torch import load_file, save_file
from torch import Tensor, nn
from torch.nn import functional as F

from ctrl_bio.hub_spec import sde_spec
from ctrl_bio.labels import check_trusted
from ctrl_bio.reward import (
    CalibratedClassifier,
    ClassifierReport,
    calibration_split,
    expected_calibration_error,
    fit_temperature,
)
from ctrl_bio.sde import SDE
from ctrl_bio.training.modules import ClassifierModule, ScoreMatchingModule, tick_loader

CHECKPOINT_DIR = "checkpoints"


class StepProgressBar(RichProgressBar):
    """Rich progress in optimiser steps: the modules draw their own data, so there are no epochs to count."""

    def _get_train_description(self, current_epoch: int) -> str:
        return "steps"


#: Trainer arguments the commands set themselves: the run directory's logger, checkpoints and callbacks.
RESERVED_TRAINER_KEYS = ("default_root_dir", "callbacks", "logger", "enable_checkpointing", "enable_progress_bar",
                         "enable_model_summary", "num_sanity_val_steps", "limit_val_batches")


def check_trainer_keys(kwargs: Mapping[str, Any]) -> None:
    """Refuse ``trainer.*`` settings Lightning does not take, or that the commands own, with one line."""
    reserved = sorted(set(kwargs) & set(RESERVED_TRAINER_KEYS))
    if reserved:
        raise ValueError(f"trainer.{reserved[0]}: set by ctrl-bio itself (metrics.csv and checkpoints in the run "
                         f"directory; extra callbacks go in callbacks=[...])")
    unknown = sorted(set(kwargs) - set(inspect.signature(L.Trainer).parameters))
    if unknown:
        raise ValueError(f"trainer.{unknown[0]}: not an argument of lightning.Trainer")


#: ``trainer.logger=``: where training metrics go besides ``metrics.csv``, which every run writes (a resumed run
#: merges it; the docs and tests read it). The extra of the package each needs, for the one-line error without it.
LOGGERS = {"csv": None, "tensorboard": ("tensorboard", "tensorboard"), "wandb": ("wandb", "wandb")}


def logger_names(value: str | Sequence[str] | None) -> list[str]:
    """``trainer.logger``'s value (a name or a list of names) as a checked list, ``csv`` first and always present."""
    names = list(value) if isinstance(value, Sequence) and not isinstance(value, str) else [value]
    names = [n for n in names if n is not None]
    bad = [n for n in names if n not in LOGGERS]
    if bad:
        raise ValueError(f"trainer.logger={bad[0]!r}: choose csv, tensorboard or wandb (or a list of them)")
    for name in names:
        needed = LOGGERS[name]
        if needed is not None and importlib.util.find_spec(needed[0]) is None:
            raise ValueError(f"trainer.logger={name} needs the {needed[0]} package: "
                             f"pip install 'ctrl-bio[{needed[1]}]'")
    return list(dict.fromkeys(["csv", *names]))


def build_loggers(run_dir: Path, names: Sequence[str]) -> list[Any]:
    """Lightning loggers into the run directory: ``metrics.csv``, TensorBoard events under ``tensorboard/``, a wandb
    run in offline mode under ``wandb/`` (``wandb sync <run>/wandb/offline-run-*`` uploads it later)."""
    loggers: list[Any] = []
    for name in names:
        if name == "csv":
            loggers.append(CSVLogger(save_dir=str(run_dir), name="", version=""))
        elif name == "tensorboard":
            from lightning.pytorch.loggers import TensorBoardLogger

            loggers.append(TensorBoardLogger(save_dir=str(run_dir), name="tensorboard", version="",
                                             default_hp_metric=False))
        elif name == "wandb":
            from lightning.pytorch.loggers import WandbLogger

            loggers.append(WandbLogger(save_dir=str(run_dir), offline=True, project="ctrl-bio", name=run_dir.name))
    return loggers


def build_trainer(run_dir: str | Path | None, trainer: Mapping[str, Any], *, max_steps: int,
                  checkpoint_every: int | None = 500, callbacks: Sequence[Callback] = (), progress: bool = True,
                  logs: bool = True) -> L.Trainer:
    """A Lightning trainer that checkpoints into ``run_dir/checkpoints`` and logs metrics into ``run_dir``.

    Args:
        run_dir: the run directory; None for a throw-away fit (no checkpoints, no logs).
        trainer: keyword arguments of ``lightning.Trainer`` (``configs/trainer/default.yaml``); its
            ``max_steps`` wins over the command's own count when it is set.
        max_steps: the command's number of optimiser steps.
        checkpoint_every: save ``last.ckpt`` and ``step=<k>.ckpt`` every this many steps.

    ``trainer["logger"]`` (``csv``, ``tensorboard``, ``wandb`` or a list) adds loggers beside ``metrics.csv``.
    """
    kwargs = {k: v for k, v in dict(trainer).items() if v is not None}
    names = logger_names(kwargs.pop("logger", "csv"))
    check_trainer_keys(kwargs)
    kwargs["max_steps"] = int(kwargs.get("max_steps") or max_steps)
    cbs = list(callbacks)
    if progress:
        cbs.append(StepProgressBar(leave=False))
    if run_dir is not None:
        run_dir = Path(run_dir)
        cbs.append(ModelCheckpoint(dirpath=run_dir / CHECKPOINT_DIR, filename="{step}", save_last=True,
                                   save_top_k=1, every_n_train_steps=checkpoint_every or None))
    logger = build_loggers(Path(run_dir), names) if run_dir is not None and logs else False
    logging.getLogger("lightning.pytorch").setLevel(logging.WARNING)
    # CSVLogger deletes an existing metrics.csv (Lightning >= 2.2); fit() keeps a resumed run's earlier rows.
    warnings.filterwarnings("ignore", message="Experiment logs directory .* exists and is not empty")
    warnings.filterwarnings("ignore", message="Checkpoint directory .* exists and is not empty")  # resumed runs
    # The CTRL module optimises manually; its checkpoints hold the state after the step, which is what resumes.
    warnings.filterwarnings("ignore", message="Using ModelCheckpoint with manual optimization")
    # Frozen pre-trained networks sit in eval mode inside the trained module on purpose.
    warnings.filterwarnings("ignore", message="Found .* module\\(s\\) in eval mode")
    warnings.filterwarnings("ignore", message=".*isinstance\\(treespec, LeafSpec\\)")
    return L.Trainer(default_root_dir=str(run_dir) if run_dir else None, callbacks=cbs, logger=logger,
                     enable_checkpointing=run_dir is not None, enable_progress_bar=progress,
                     enable_model_summary=False, num_sanity_val_steps=0, limit_val_batches=0, **kwargs)


METRICS_FILE = "metrics.csv"
#: Rows of a resumed run logged before its checkpoint, kept until the resumed process finishes.
METRICS_BEFORE_RESUME = "metrics.before_resume.csv"


def _read_rows(path: Path) -> list[dict[str, str]]:
    if not path.is_file():
        return []
    with path.open(newline="") as f:
        return list(csv.DictReader(f))


def _write_rows(path: Path, rows: list[dict[str, str]]) -> None:
    columns = list(dict.fromkeys(key for row in rows for key in row))  # every row's keys, first seen first
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns, restval="")
        writer.writeheader()
        writer.writerows(rows)


def _before_checkpoint(row: Mapping[str, str], resume_step: int) -> bool:
    """Whether a metrics row was logged before the checkpoint of ``resume_step`` was written.

    Training rows of step k are logged during step k; an evaluation after k steps (finetune's reward, kl and
    objective, no loss) is logged at the end of step k - 1, before that step's checkpoint. So the row of the
    checkpoint's own step is kept when it has no loss: the resumed run never logs it again.
    """
    step = int(float(row["step"]))
    return step < resume_step or (step == resume_step and not row.get("loss"))


def stash_metrics_before_resume(log_dir: Path, resume_step: int) -> None:
    """Keep the rows of ``metrics.csv`` logged before ``resume_step`` in ``metrics.before_resume.csv``.

    Lightning's CSVLogger deletes ``metrics.csv`` when a resumed run starts logging. Rows at or after the
    checkpoint's step came from the killed process after its last checkpoint; the resumed run logs them again.
    A stash left by an earlier resume that was itself killed is extended, not replaced.
    """
    rows = _read_rows(log_dir / METRICS_BEFORE_RESUME) + _read_rows(log_dir / METRICS_FILE)
    kept = [row for row in rows if not row.get("step") or _before_checkpoint(row, resume_step)]
    if kept:
        _write_rows(log_dir / METRICS_BEFORE_RESUME, kept)


def merge_metrics_after_resume(log_dir: Path) -> None:
    """Put the stashed rows in front of the resumed run's ``metrics.csv`` (columns united) and drop the stash."""
    stash = log_dir / METRICS_BEFORE_RESUME
    if stash.is_file():
        _write_rows(log_dir / METRICS_FILE, _read_rows(stash) + _read_rows(log_dir / METRICS_FILE))
        stash.unlink()


def fit(trainer: L.Trainer, module: L.LightningModule, resume: str | Path | None = None) -> None:
    """Fit ``module`` on the endless tick loader (each step draws its own data), resuming from ``resume``.

    A resumed run's ``metrics.csv`` keeps the rows logged before the checkpoint it resumed from.
    """
    log_dir = Path(trainer.logger.log_dir) if isinstance(trainer.logger, CSVLogger) else None
    if resume and log_dir is not None and trainer.is_global_zero:
        step = int(torch.load(resume, map_location="cpu", weights_only=True)["global_step"])
        stash_metrics_before_resume(log_dir, step)
    trainer.fit(module, train_dataloaders=tick_loader(), ckpt_path=str(resume) if resume else None)
    if log_dir is not None and trainer.is_global_zero:  # trainer.fit has flushed the logger (its teardown)
        merge_metrics_after_resume(log_dir)
    if trainer.default_root_dir and trainer.checkpoint_callback is not None:
        # The last step may fall between two periodic checkpoints: save it, so last.ckpt is the finished run.
        trainer.save_checkpoint(Path(trainer.default_root_dir) / CHECKPOINT_DIR / "last.ckpt")


def resolve_resume(path: str | Path) -> tuple[Path, Path]:
    """(what to resume from, run directory) for ``resume=<run dir or .ckpt file>``.

    What to resume from is the run's ``checkpoints/last.ckpt``, the given ``.ckpt`` file, or the run
    directory itself when it has no top-level checkpoint (``train-classifier`` keeps one per label; a run
    killed before its first checkpoint starts again in its own directory).
    """
    path = Path(path)
    if path.is_dir():
        ckpt = path / CHECKPOINT_DIR / "last.ckpt"
        if ckpt.is_file():
            return ckpt, path
        if (path / "config.yaml").is_file():
            return path, path
        raise FileNotFoundError(f"resume: no checkpoint at '{ckpt}' (give a run directory or a .ckpt file)")
    if not path.is_file():
        raise FileNotFoundError(f"resume: no checkpoint at '{path}' (give a run directory or a .ckpt file)")
    return path, path.parent.parent if path.parent.name == CHECKPOINT_DIR else path.parent


#: What every Lightning checkpoint of a training command holds.
CHECKPOINT_KEYS = ("global_step", "state_dict", "optimizer_states", "lr_schedulers")


def check_checkpoint(path: str | Path) -> int:
    """The step of the Lightning checkpoint at ``path``, after checking that it is one; else one line.

    The file is read with ``weights_only=True`` (tensors and plain containers, never arbitrary pickled objects),
    before Lightning's own loader sees it, so that a user's or a shared checkpoint cannot run code.
    """
    path = Path(path)
    if path.suffix == ".safetensors":
        raise ValueError(f"resume: '{path}' holds exported weights, not a training checkpoint: give the run directory "
                         f"or its checkpoints/last.ckpt")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - zip, pickle and size errors all mean the same thing here
        reason = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:160]
        raise ValueError(f"resume: '{path}' is not a readable checkpoint (truncated, empty or not a .ckpt file: "
                         f"{reason}); resume from another checkpoints/step=<k>.ckpt or start a new run") from None
    missing = [k for k in CHECKPOINT_KEYS if not isinstance(state, dict) or k not in state]
    if missing:
        raise ValueError(f"resume: '{path}' is not a ctrl-bio training checkpoint (it lacks {missing[0]})")
    return int(state["global_step"])


def checkpoint_file(resume: Path | None) -> Path | None:
    """The ``.ckpt`` file to continue from, None to start (again) from step 0."""
    return resume if resume is not None and resume.is_file() else None


def is_main_process() -> bool:
    """False in the processes Lightning's DDP launcher starts for ranks > 0 (known before any trainer exists)."""
    return os.environ.get("LOCAL_RANK", "0") == "0" and os.environ.get("NODE_RANK", "0") == "0"


def save_weights(tensors: Mapping[str, Tensor], path: str | Path, meta: Mapping[str, Any] | None = None) -> Path:
    """Write tensors as safetensors and, if given, ``meta`` as JSON beside them (same stem)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, str(tmp))
    os.replace(tmp, path)  # atomic: a concurrent reader (another rank, another run's cache) never sees half a file
    if meta is not None:
        path.with_suffix(".json").write_text(json.dumps(meta, indent=2, default=str) + "\n")
    return path


def read_weights(path: str | Path) -> dict[str, Tensor]:
    """The tensors of a ``.safetensors`` file; a truncated or foreign file is one line naming it."""
    try:
        return load_file(str(path))
    except Exception as exc:  # noqa: BLE001 - safetensors raises its own error type for every kind of damage
        raise ValueError(f"{path}: not a readable .safetensors file ({str(exc).splitlines()[0][:160]})") from None


def read_meta(path: str | Path) -> dict[str, Any]:
    """The JSON written beside exported weights; a damaged one is one line naming it."""
    try:
        meta = json.loads(Path(path).read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as exc:
        raise ValueError(f"{path}: not a readable JSON file ({exc})") from None
    if not isinstance(meta, dict):
        raise ValueError(f"{path}: expected a JSON object, found {type(meta).__name__}")
    return meta


def trainable_state(model: nn.Module) -> dict[str, Tensor]:
    """The trainable parameters of ``model`` by name (the label pathway of an augmented model)."""
    return {n: p for n, p in model.named_parameters() if p.requires_grad}


def load_trainable(model: nn.Module, path: str | Path) -> nn.Module:
    """Load weights written by :func:`save_weights` of :func:`trainable_state` into ``model``."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no weights file '{path}'")
    tensors = read_weights(path)
    expected = {n for n, p in model.named_parameters() if p.requires_grad}
    if set(tensors) != expected:
        raise ValueError(f"{path}: holds parameters {sorted(set(tensors) ^ expected)[:3]}... that the model "
                         f"does not (or lacks ones it has): was it written for another label set or pathway?")
    model.load_state_dict(tensors, strict=False)
    return model


def export_network(net: nn.Module, path: str | Path) -> Path:
    """Save a score network's weights (safetensors) and what rebuilds it (JSON: class, ``config``, SDE)."""
    cls = type(net)
    meta = {"class": f"{cls.__module__}.{cls.__qualname__}", "config": dict(net.config), "sde": sde_spec(net.sde)}
    return save_weights(net.state_dict(), path, meta)


def load_network(path: str | Path, sde: SDE) -> nn.Module:
    """Rebuild a network saved by :func:`export_network` (a ``.safetensors`` file or the run directory
    holding ``score.safetensors``), frozen, in eval mode; its SDE must match ``sde``."""
    path = Path(path)
    if path.is_dir():
        path = path / "score.safetensors"
    meta_path = path.with_suffix(".json")
    if not path.is_file() or not meta_path.is_file():
        raise FileNotFoundError(f"no pre-trained network at '{path}' (need {path.name} and {meta_path.name})")
    meta = read_meta(meta_path)
    if meta.get("sde") is None or meta.get("class") is None:
        raise ValueError(f"{meta_path}: not the description of an exported network (no 'class' or 'sde')")
    if meta["sde"] != sde_spec(sde):
        raise ValueError(f"{path}: the network was trained with SDE {meta['sde']}, the domain uses {sde_spec(sde)}")
    check_trusted(meta["class"], f"{meta_path}: class")  # a shared run directory must not choose what is imported
    module_name, _, cls_name = meta["class"].rpartition(".")
    net = getattr(importlib.import_module(module_name), cls_name)(sde, **meta["config"])
    net.load_state_dict(read_weights(path))
    return net.requires_grad_(False).eval()


def fit_score_network(net: nn.Module, sde: SDE, data: Tensor, *, steps: int, batch_size: int = 512,
                      lr: float = 2e-3, t_end: float = 1e-3, seed: int = 0, run_dir: str | Path | None = None,
                      trainer: Mapping[str, Any] | None = None, checkpoint_every: int | None = 500,
                      resume: str | Path | None = None, progress: bool = True,
                      callbacks: Sequence[Callback] = ()) -> nn.Module:
    """Pre-train ``net`` by denoising score matching on ``data`` (in place); returns it frozen, in eval mode."""
    module = ScoreMatchingModule(net, sde, data, lr=lr, batch_size=batch_size, t_end=t_end, seed=seed)
    pl_trainer = build_trainer(run_dir, trainer or {"accelerator": "cpu", "devices": 1}, max_steps=steps,
                               checkpoint_every=checkpoint_every, callbacks=callbacks, progress=progress)
    fit(pl_trainer, module, resume)
    return net.requires_grad_(False).eval()


def calibrate(net: nn.Module, x: Tensor, y: Tensor, train_size: int) -> tuple[CalibratedClassifier, ClassifierReport]:
    """Temperature-scale a trained classifier on its held-out split and report ECE before and after
    (Guo et al. 2017); the classifier comes back frozen."""
    net.eval()
    with torch.no_grad():
        logits = net(x)
    temperature = fit_temperature(logits, y)
    report = ClassifierReport(
        train_size=train_size, calib_size=x.shape[0], accuracy=float((logits.argmax(1) == y).float().mean()),
        ece_before=expected_calibration_error(logits.softmax(1), y),
        ece_after=expected_calibration_error((logits / temperature).softmax(1), y), temperature=temperature,
        nll_before=float(F.cross_entropy(logits, y)), nll_after=float(F.cross_entropy(logits / temperature, y)))
    return CalibratedClassifier(net, temperature).requires_grad_(False), report


def fit_classifier(net: nn.Module, x: Tensor, y: Tensor, *, calib_fraction: float = 0.2, epochs: int = 200,
                   batch_size: int = 256, lr: float = 3e-3, weight_decay: float = 1e-4, seed: int = 0,
                   run_dir: str | Path | None = None, trainer: Mapping[str, Any] | None = None,
                   checkpoint_every: int | None = 500, resume: str | Path | None = None, progress: bool = True,
                   callbacks: Sequence[Callback] = ()) -> tuple[CalibratedClassifier, ClassifierReport]:
    """Train a classifier on clean pairs under Lightning, then calibrate it on a held-out split.

    The split is drawn from ``seed`` (the same split on every rank and after a resume); one epoch is
    ``len(train) // batch_size`` steps, as in :func:`ctrl_bio.reward.train_classifier`.
    """
    calib, train = calibration_split(y, x.shape[0], calib_fraction, torch.Generator().manual_seed(seed))
    module = ClassifierModule(net, x[train], y[train], lr=lr, weight_decay=weight_decay, batch_size=batch_size,
                              seed=seed)
    steps = epochs * max(train.numel() // batch_size, 1)
    pl_trainer = build_trainer(run_dir, trainer or {"accelerator": "cpu", "devices": 1}, max_steps=steps,
                               checkpoint_every=checkpoint_every, callbacks=callbacks, progress=progress)
    fit(pl_trainer, module, resume)
    return calibrate(net.cpu(), x[calib], y[calib], train.numel())
