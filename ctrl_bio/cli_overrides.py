"""The Hydra config of a ``ctrl-bio`` command: composing it, and reading and type-checking its overrides.

A bad override is a :class:`~ctrl_bio.cli_errors.UsageError` naming it, raised before any run directory exists.
"""

from __future__ import annotations

import os
from importlib import resources
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from ctrl_bio.cli_errors import UsageError

#: Rank 0 of a training command exports its run directory here; the processes Lightning's DDP launcher
#: starts re-run the same command line and read it, so that every rank writes into the same directory.
RUN_DIR_ENV = "CTRL_BIO_RUN_DIR"


def config_dir() -> Path:
    """The folder holding the Hydra configs (``configs/`` in a checkout, ``ctrl_bio/configs`` when installed)."""
    checkout = Path(__file__).resolve().parent.parent / "configs"
    if checkout.is_dir():
        return checkout
    return Path(str(resources.files("ctrl_bio") / "configs"))


def compose_config(command: str, overrides: list[str]) -> DictConfig:
    """Compose ``configs/<command>.yaml`` with the overrides, the ``hydra`` node included."""
    if os.environ.get(RUN_DIR_ENV):
        overrides = [*overrides, f"hydra.run.dir='{os.environ[RUN_DIR_ENV]}'"]
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from hydra.core.utils import setup_globals

    from ctrl_bio.settings import check_keys, register

    setup_globals()  # the ${now:...} resolver used by hydra.run.dir
    register()  # the typed schemas configs/method/*.yaml extend
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(config_dir()), version_base="1.3", job_name=command):
        cfg = compose(config_name=command, overrides=overrides, return_hydra_config=True)
    check_keys(cfg)  # +method.gamm=2 is force-added past the schema
    return cfg


def parse_overrides(overrides: list[str]) -> list[Any]:
    """Hydra's parse of each override; one that does not parse is a :class:`UsageError` naming it."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    parser = OverridesParser.create()
    parsed = []
    for text in overrides:
        try:
            parsed.append(parser.parse_override(text))
        except Exception:  # noqa: BLE001 - Hydra's parse errors and ANTLR's lexer errors alike
            raise UsageError(f"cannot read '{text}' as an override: write key=value or +key=value "
                             f"(ctrl-bio --help)") from None
    return parsed


def _group_names() -> set[str]:
    return {p.name for p in config_dir().iterdir() if p.is_dir()}


def value_type_error(key: str, value: Any, default: Any) -> str | None:
    """Why ``value`` cannot replace ``default`` (a number for a number, true/false for a boolean), or None.

    YAML keeps ``lr=abc`` as the text 'abc'; refused here, it is one line naming the key instead of a TypeError deep
    inside the optimiser. null is left to the command's own checks (some settings take it).
    """
    if value is None or default is None:
        return None
    if isinstance(default, bool):
        if not isinstance(value, bool):
            return f"{key}={value!r}: expected true or false (default {default})"
    elif isinstance(default, (int, float)):  # a list stays allowed: y=[0,1] asks one class per label
        if isinstance(value, (bool, str, dict)):
            return f"{key}={value!r}: expected a number (default {default})"
    return None


def check_override_types(command: str, parsed: list[Any], overrides: list[str]) -> None:
    """Every ``key=value`` that replaces a number or a boolean of the composed defaults must be one."""
    groups = _group_names()
    values = [o for o in parsed if not o.is_add() and not o.is_delete() and o.key_or_group not in groups
              and not o.key_or_group.startswith("hydra.")]
    if not values:
        return
    choices = [text for o, text in zip(parsed, overrides) if o.key_or_group in groups or
               o.key_or_group.startswith("hydra.")]
    defaults = compose_config(command, choices)
    for o in values:
        default = OmegaConf.select(defaults, o.key_or_group, default=None, throw_on_resolution_failure=False)
        why = value_type_error(o.key_or_group, o.value(), default)
        if why:
            raise UsageError(why)
