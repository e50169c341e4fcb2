"""Typed settings of the ``method`` config group: one dataclass per config, one field per key.

``configs/method/ctrl.yaml`` and ``ctrl_pg.yaml`` extend these dataclasses (Hydra's "structured config schema"
pattern: the YAML's defaults list names the schema stored under the same group), so a misspelt or unknown key, or
a value of the wrong type, fails when the config is composed, with one line naming it (``method.gamm=2``,
``method.lr=abc``, ``method: {gamm: 4}`` in a suite file). A suite changes only the values that differ, as
overrides of the top-level ``method`` node in its ``# @package _global_`` file.

A new key is one field here with the default of the function that takes it. The suites pass every field to
:func:`ctrl_bio.finetune.finetune` (the row runners read ``pool`` and ``control_scales`` themselves); a consumer that
takes fewer keys (``ctrl-bio finetune``'s Lightning module, the continuous-label suite) gets them through
:func:`settings_for`, which refuses, naming the key, a setting it would otherwise silently ignore.

The dataclasses hold no Hydra: :func:`register` stores them in Hydra's ConfigStore and is called by the entry point.
"""

from __future__ import annotations

import dataclasses
import inspect
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any


@dataclass
class CTRLSettings:
    """CTRL's settings (``method=ctrl``): keyword arguments of :func:`ctrl_bio.finetune.finetune` plus the row's own.

    Defaults are those of ``ctrl-bio finetune``; a suite overrides what differs (``configs/suite/<name>.yaml``).
    docs/method.md says what each estimator does.
    """

    estimator: str = "score_matching"   # score_matching | pathwise | hybrid (score matching, then pathwise) | ...
    warm_start: bool = False            # score matching for sm_steps before the on-policy estimator
    alpha: float = 1.0                  # KL weight
    gamma: float = 1.0                  # reward weight; the target is p_pre(x) p(y|x)^(gamma/alpha)
    # Score matching on the reward-tilted pool.
    sm_steps: int = 8000                # score-matching updates
    sm_batch_size: int = 512
    sm_lr: float = 2.0e-3
    sm_target: str = "denoising"        # denoising | posterior | control (ctrl_bio.objective)
    sm_spacing: str = "uniform"         # how score matching draws t: uniform | quadratic
    pool: str = "pretrained"            # the pool tilted by p(y|x)^(gamma/alpha): pretrained (the model's samples)
                                        # | training (its unlabelled training data; domain suites only)
    pool_size: int = 20000              # pool samples
    # On-policy estimators (pathwise, adjoint_matching, soft_value).
    steps: int = 200                    # updates
    batch_size: int = 128
    lr: float = 1.0e-4
    memory: str = "checkpoint"          # pathwise: full | checkpoint | truncate (the last grad_last_k steps)
    grad_last_k: int = 10
    grad_clip: float | None = 1.0    # null: no clipping
    am_time_samples: int = 10           # adjoint matching: grid points per trajectory
    max_adjoint: float | None = None  # adjoint matching: clip of the lean adjoint (null: none)
    value_steps: int = 2000             # soft value: regression updates of V
    value_batch_size: int = 256
    value_lr: float = 2.0e-3
    value_spacing: str = "uniform"      # soft value: how t is drawn for V and the distillation (uniform | quadratic)
    # soft value, suites: V's network: noisy_classifier (the domain's noisy classifier of x_t) | denoised_reward (the
    # reward classifier at the pre-trained denoiser's x0_hat, its scale and offsets in t fitted: DenoisedRewardValue)
    value_model: str = "noisy_classifier"
    # soft value: where grad V is distilled: the tilted pool's x_t (pool) | guided paths' states (guided) | nowhere
    # (none, with steps=0: the row samples s_pre + grad V itself)
    value_distill: str = "pool"
    value_guided_paths: int = 512       # soft value, value_distill=guided: trajectories of s_pre + grad V drawn once
    rollout_anchors: int = 256          # rollout control: pre-trained trajectories whose states are the anchors
    rollout_k: int = 16                 # rollout control: continuations of the pre-trained sampler per anchor
    # rollout control: anchor noise levels (each moved to the sampler's nearest grid point)
    rollout_times: list[float] = field(default_factory=lambda: [0.03, 0.09, 0.15, 0.21, 0.27, 0.33, 0.39, 0.45,
                                                                0.51, 0.57, 0.63, 0.69, 0.75, 0.81, 0.87, 0.93])
    # Monitoring, stopping and the row's sampling.
    eval_every: int = 500               # a no-grad estimate of J, reward and KL every this many updates
    patience: int | None = None         # a phase stops when J has not improved in this many evaluations (null: never)
    tolerance: float = 0.0              # an improvement of J must exceed this to count
    keep_best: bool = False             # end with the parameters of the evaluation with the highest J, not the last
    eval_batch_size: int = 512
    control_fit_times: list[float] = field(default_factory=list)  # t where the control is compared with the pool's
    control_scales: list[float] = field(default_factory=lambda: [1.0])  # suites: s_pre + w u, w chosen by J


@dataclass
class PolicyGradientSettings:
    """The ``ctrl_pg`` / ``ddpo`` rows (``method=ctrl_pg`` in a suite's ``policy_gradient.settings``): keyword
    arguments of :func:`ctrl_bio.policy_gradient.finetune_policy_gradient` (docs/policy_gradient.md). alpha is not
    here: the rows take ``method.alpha``, the one KL weight of the run. Measured on four mixtures with
    VectorPathway(hidden=256, depth=2): 150-158 s per row on one thread."""

    variant: str = "ctrl_pg"            # ctrl_pg (path-level clipped ratio) | ddpo (per-step clipped ratios)
    baseline: str = "x0_hat"            # x0_hat (value net of the denoised prediction) | learned | none
    n_steps: int = 50                   # Euler-Maruyama steps of the training paths (grids jittered per batch)
    t_end: float = 1.0e-3
    iterations: int = 200               # batches of on-policy paths; each costs batch_size reward queries
    batch_size: int = 128
    updates_per_batch: int = 4          # updates each batch serves (clipped importance ratio)
    clip: float = 0.2                   # eps of the ratio interval [1 - eps, 1 + eps]
    lr: float = 3.0e-4
    value_lr: float = 3.0e-3
    restart_fraction: float | None = 0.0  # on-policy paths restarted from pre-trained states at a random step
    reference_pool: int | None = 4096  # pre-trained paths scored once for the soft-optimal term (null: by variant)
    reference_batch: int = 8192         # pool draws per update
    reference_weight: float = 4.0       # weight of the soft-optimal term, in units of alpha
    reference_updates: int | None = 1000  # warm-start updates on that term alone (null: by variant)
    reference_lr: float = 2.0e-3
    reference_estimator: str = "score_matching"  # score_matching | path (cross-entropy of path measures)
    reference_replay: bool | None = True  # scored on-policy paths join the pool, weighted by dP*/dP_theta
    grad_clip: float | None = 1.0
    seed: int = 0


#: (config group, name in the ConfigStore, dataclass): what ``configs/method/<config>.yaml`` lists as its schema.
SCHEMAS = (("method", "ctrl_settings", CTRLSettings), ("method", "ctrl_pg_settings", PolicyGradientSettings))


def register() -> None:
    """Store the schemas in Hydra's ConfigStore (idempotent); call before composing a config."""
    from hydra.core.config_store import ConfigStore

    store = ConfigStore.instance()
    for group, name, node in SCHEMAS:
        store.store(group=group, name=name, node=node)


def settings_for(settings: Mapping[str, Any], consumer: Callable[..., Any] | Sequence[Callable[..., Any]],
                 where: str, schema: type = CTRLSettings) -> dict[str, Any]:
    """The settings ``consumer`` takes as keyword arguments; every other one must be at its schema default.

    A setting the consumer does not take is dropped when it is at its default and refused, naming it, when it is
    not: a key set on the command line is never silently ignored.

    Args:
        settings: the composed ``method`` node as a plain dict.
        consumer: the function or class the settings go to, or several that share them out.
        where: what runs them, for the message (``ctrl-bio finetune``).
        schema: the dataclass the settings were composed against.
    """
    consumers = consumer if isinstance(consumer, (tuple, list)) else (consumer,)
    taken = {name for c in consumers for name in inspect.signature(c).parameters}
    defaults = {f.name: f.default if f.default is not dataclasses.MISSING else f.default_factory()
                for f in dataclasses.fields(schema)}
    unknown = sorted(k for k in settings if k not in taken and k not in defaults)
    if unknown:
        raise ValueError(f"method: unknown key(s) {unknown} for {where}")
    changed = [k for k in settings if k not in taken and settings[k] != defaults[k]]
    if changed:
        k = changed[0]
        raise ValueError(f"method.{k}={settings[k]!r} is not supported by {where} (only {defaults[k]!r}); "
                         f"it takes: {', '.join(sorted(taken & set(defaults)))}")
    return {k: v for k, v in settings.items() if k in taken}


def unknown_keys(cfg: Any, path: str = "") -> list[tuple[str, str]]:
    """(key, schema name) of every key of a composed config that its node's schema does not declare.

    ``+method.gamm=2`` force-adds a key past the schema, so composition alone does not refuse it. The config is
    walked without resolving it; nodes typed by one of :data:`SCHEMAS` are checked.
    """
    from omegaconf import DictConfig, OmegaConf

    if not isinstance(cfg, DictConfig) or cfg._is_none() or cfg._is_missing() or cfg._is_interpolation():
        return []
    schema = OmegaConf.get_type(cfg)
    found = []
    if any(schema is node for _, _, node in SCHEMAS):
        fields = {f.name for f in dataclasses.fields(schema)}
        found += [(f"{path}{k}", schema.__name__) for k in cfg.keys() if k not in fields]
    for key in cfg.keys():
        if not (path == "" and key == "hydra"):
            found += unknown_keys(cfg._get_node(key), f"{path}{key}.")
    return found


def check_keys(cfg: Any) -> None:
    """Refuse, with one line naming it, a key that the typed schema of its node does not declare."""
    unknown = unknown_keys(cfg)
    if unknown:
        key, schema = unknown[0]
        raise ValueError(f"unknown config key '{key}' (not a field of ctrl_bio.settings.{schema})")


# -- device and precision ---------------------------------------------------------------------------------------

#: What ``device=`` takes, for messages.
DEVICES = "auto, cpu, cuda or cuda:N"
#: What ``precision=`` takes: full float32, or bfloat16 autocast with float32 weights (Lightning's names).
PRECISIONS = ("32", "bf16-mixed")


def resolve_device(device: Any) -> str:
    """``device=`` as a torch device string: ``auto`` is ``cuda`` when a GPU is visible, else ``cpu``.

    A device this machine does not have, or a value outside :data:`DEVICES`, is a ``ValueError`` of one line that
    names the key and what it takes.
    """
    import re

    import torch

    text = str(device)
    if text == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if text == "cpu":
        return text
    match = re.fullmatch(r"cuda(?::(\d+))?", text)
    if match is None:
        raise ValueError(f"device={text}: device takes {DEVICES}")
    if not torch.cuda.is_available():
        raise ValueError(f"device={text}: this machine has no CUDA device (device takes {DEVICES}; auto uses a GPU "
                         f"when there is one)")
    if match.group(1) is not None and int(match.group(1)) >= torch.cuda.device_count():
        raise ValueError(f"device={text}: this machine has {torch.cuda.device_count()} CUDA device(s), "
                         f"cuda:0..cuda:{torch.cuda.device_count() - 1} (device takes {DEVICES})")
    return text


def check_precision(precision: Any) -> str:
    """``precision=`` as text (YAML reads 32 as a number), or a one-line ``ValueError`` naming what it takes."""
    text = str(precision)
    if text not in PRECISIONS:
        raise ValueError(f"precision={text}: precision takes {' or '.join(PRECISIONS)}")
    return text


def lightning_device(device: str, precision: str, trainer: Mapping[str, Any]) -> dict[str, Any]:
    """``trainer.accelerator``, ``devices`` and ``precision`` for a resolved ``device`` and checked ``precision``.

    What the run's ``trainer`` node sets explicitly (not null) wins: ``trainer.devices=2 trainer.strategy=ddp`` keeps
    its two processes on the device's kind. ``cuda:N`` is the one GPU N.
    """
    kind, _, index = device.partition(":")
    out = {"accelerator": trainer.get("accelerator") or ("gpu" if kind == "cuda" else "cpu"),
           "devices": [int(index)] if index else trainer.get("devices") or 1,
           "precision": trainer.get("precision") or ("32-true" if precision == "32" else precision)}
    if index and trainer.get("devices") not in (None, 1, [int(index)]):
        raise ValueError(f"device={device} is one GPU; trainer.devices={trainer['devices']} asks for several "
                         f"(write device=cuda trainer.devices=N)")
    return out


def autocast(device: str, precision: str) -> Any:
    """The autocast context of ``precision`` on ``device`` (bf16-mixed: bfloat16 matmuls, float32 weights)."""
    import contextlib

    import torch

    if precision == "32":
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.partition(":")[0], dtype=torch.bfloat16)
