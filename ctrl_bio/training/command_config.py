"""What a ``ctrl-bio`` command reads from its composed config: settings checked against their ranges (before any run
directory exists), the domain built from its ``plugin`` node, the trainer's arguments and the sampler's time grid.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities import rank_zero_only
from omegaconf import DictConfig, OmegaConf

from ctrl_bio.domain import Domain, check_domain
from ctrl_bio.settings import check_precision, lightning_device, resolve_device
from ctrl_bio.training.runs import logger_names


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


def trainer_kwargs(cfg: DictConfig) -> dict[str, Any]:
    trainer = OmegaConf.to_container(cfg.trainer, resolve=True)
    # device= and precision= become the trainer's accelerator, devices and precision (an explicit trainer.* wins).
    device, precision = resolve_device(cfg.get("device") or "auto"), check_precision(cfg.get("precision") or 32)
    trainer |= lightning_device(device, precision, trainer)
    return dict(trainer=trainer, checkpoint_every=cfg.checkpoint_every, progress=cfg.progress,
                callbacks=build_callbacks(cfg))


def time_spacing(cfg: DictConfig, domain: Domain) -> str:
    """The sampler's time grid: the run's ``spacing``, else the domain's own (``spacing`` attribute), else uniform."""
    return cfg.get("spacing") or getattr(domain, "spacing", "uniform")
