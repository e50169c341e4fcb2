"""``budget=<name>``: a suite's named, measured settings, applied beneath the command line's own (issue 23)."""

from __future__ import annotations

import pytest
from omegaconf import OmegaConf

from ctrl_bio.cli import compose_config
from ctrl_bio.cli_errors import UsageError
from ctrl_bio.cli_runs import apply_budget


def test_budget_large_reaches_the_method_and_the_suite_node() -> None:
    cfg = compose_config("benchmark", ["suite=molecules_edm", "budget=large"])
    default = compose_config("benchmark", ["suite=molecules_edm"]).method.sm_steps
    apply_budget(cfg)
    assert cfg.method.sm_steps == 16000 != default
    # The suite function reads the top-level method through its ${method} node: the budget reaches it there too.
    assert OmegaConf.to_container(cfg.suite, resolve=True)["method"]["sm_steps"] == 16000
    assert "budgets" not in cfg.suite  # the table itself is not a setting of the suite function


def test_the_command_line_wins_over_the_budget_and_default_changes_nothing() -> None:
    cfg = compose_config("benchmark", ["suite=molecules_edm", "budget=large", "method.sm_steps=7"])
    apply_budget(cfg)
    assert cfg.method.sm_steps == 7 and cfg.method.eval_every == 2000
    plain = compose_config("benchmark", ["suite=molecules_edm"])
    before = OmegaConf.to_container(plain.method)
    apply_budget(plain)
    assert OmegaConf.to_container(plain.method) == before


def test_an_unknown_budget_is_one_line_naming_the_suites_budgets() -> None:
    cfg = compose_config("benchmark", ["suite=gmm", "budget=large"])
    with pytest.raises(UsageError, match=r"^budget=large: suite gmm has budgets default$"):
        apply_budget(cfg)


def test_cfg_shows_the_settings_the_budget_applies(capsys: pytest.CaptureFixture) -> None:
    from ctrl_bio.cli import main

    assert main(["benchmark", "suite=molecules_edm", "budget=large", "--cfg"]) == 0
    out = capsys.readouterr().out
    assert "sm_steps: 16000" in out and "budgets:" not in out
