"""One config tree: every suite reads the top-level ``method``, typed by ``ctrl_bio.settings`` (issue 26)."""

from __future__ import annotations

import dataclasses
import inspect
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import torch
from omegaconf import OmegaConf

from ctrl_bio.cli import compose_config, main
from ctrl_bio.cli_runs import apply_budget
from ctrl_bio.finetune import finetune
from ctrl_bio.settings import CTRLSettings, PolicyGradientSettings, settings_for

SUITES = sorted(p.stem for p in (Path(__file__).resolve().parent.parent / "configs" / "suite").glob("*.yaml"))


def test_every_suite_file_is_covered() -> None:
    assert {"gmm", "gmm_pg", "dna", "molecules", "molecules_edm", "images", "speed"} <= set(SUITES)


@pytest.mark.parametrize("suite", SUITES)
def test_method_gamma_from_the_command_line_is_the_only_gamma(suite: str, capsys: pytest.CaptureFixture) -> None:
    assert main(["benchmark", f"suite={suite}", "method.gamma=2.5", "--cfg"]) == 0
    gammas = [ln.strip() for ln in capsys.readouterr().out.splitlines() if ln.strip().startswith("gamma:")]
    assert gammas == ["gamma: 2.5"]
    cfg = compose_config("benchmark", [f"suite={suite}", "method.gamma=2.5"])
    # What run_benchmark hands the suite's entry point: the top-level method, whole.
    node = OmegaConf.to_container(cfg.suite.method, resolve=True)
    assert node == OmegaConf.to_container(cfg.method, resolve=True) and node["gamma"] == 2.5


class Captured(Exception):
    """Raised by a stand-in for the suite's first object built from ``method``, carrying what it received."""

    def __init__(self, **received: Any):
        super().__init__("captured")
        self.received = received


def _capture(**kwargs: Any) -> None:
    raise Captured(**kwargs)


def _stub_suite(monkeypatch: pytest.MonkeyPatch, suite: str) -> Any:
    """The suite's entry point with the data-loading pieces replaced, so that it stops at the first object that
    takes gamma (its context or the speed measurement) and reports what that object got."""
    if suite in ("dna", "molecules", "images"):
        module = pytest.importorskip(f"domains.{suite}.suite")
        context = {"dna": "DNAContext", "molecules": "MoleculeContext", "images": "ImageContext"}[suite]
        monkeypatch.setattr(module, "load_task", lambda labels, domain, seed: ([], [], [], {}))
        monkeypatch.setattr(module, context, lambda *a, **kw: _capture(gamma=kw["objective"].gamma,
                                                                       alpha=kw["objective"].alpha))
        return module.run_suite
    if suite in ("gmm", "gmm_pg"):
        module = pytest.importorskip("domains.gmm.suite")
        monkeypatch.setattr(module, "build_task", lambda testbed, specs, fraction: (None, [], {}))
        monkeypatch.setattr(module, "SuiteContext", lambda *a, **kw: _capture(gamma=kw["gamma"], alpha=kw["alpha"]))
        return module.run_suite
    if suite == "molecules_edm":
        module = pytest.importorskip("domains.molecules.edm")
        monkeypatch.setattr(module, "EDMContext", lambda *a, **kw: SimpleNamespace(x_real=torch.zeros(1)))
        monkeypatch.setattr(module, "run_property", lambda ctx, prop, **kw: _capture(gamma=kw["method"]["gamma"],
                                                                                     alpha=kw["method"]["alpha"]))
        return module.run_suite
    from ctrl_bio import speed

    monkeypatch.setattr(speed, "in_fresh_process", lambda fn, env=None, **kw: _capture(gamma=kw["cfg"].gamma,
                                                                                       alpha=kw["cfg"].alpha))
    return speed.run_speed_suite


@pytest.mark.parametrize("suite", SUITES)
def test_method_gamma_reaches_what_the_suite_builds(suite: str, monkeypatch: pytest.MonkeyPatch, tmp_path) -> None:
    cfg = compose_config("benchmark", [f"suite={suite}", "method.gamma=2.5", "method.alpha=0.5", "suite.device=cpu"]
                         if suite == "speed" else [f"suite={suite}", "method.gamma=2.5", "method.alpha=0.5"])
    apply_budget(cfg)  # as run_benchmark does: it also takes the budgets table off the suite node
    node = OmegaConf.to_container(cfg.suite, resolve=True)
    for key in ("name", "_target_", "_partial_", "domain", "testbed", "pretrained", "sweep"):
        node.pop(key, None)
    if "labels" in node:
        node["labels"] = [{"name": "stub"}]
    run = _stub_suite(monkeypatch, suite)
    positional = [p for p in inspect.signature(run).parameters.values() if p.kind == p.POSITIONAL_OR_KEYWORD]
    with pytest.raises(Captured) as got:
        run(*([None] * len(positional)), run_dir=tmp_path, **node)
    assert got.value.received == {"gamma": 2.5, "alpha": 0.5}


def test_policy_gradient_rows_take_the_one_alpha() -> None:
    cfg = compose_config("benchmark", ["suite=gmm_pg", "method.alpha=0.5"])
    assert "alpha" not in cfg.suite.policy_gradient.settings
    assert "alpha" not in {f.name for f in dataclasses.fields(PolicyGradientSettings)}


@pytest.mark.parametrize("override,needle", [
    ("method.gamm=2", "'method.gamm'"),               # misspelt: refused by the schema at composition
    ("+method.gamm=2", "'method.gamm'"),              # force-added: refused after composition
    ("method.gamma=abc", "method.gamma"),             # wrong type
    ("method.control_scales=2", "method.control_scales"),
])
def test_a_bad_method_key_is_one_line_naming_it(override: str, needle: str, capsys: pytest.CaptureFixture) -> None:
    assert main(["benchmark", override, "--cfg"]) == 2
    err = capsys.readouterr().err.strip()
    assert needle in err and len(err.splitlines()) == 1 and "Traceback" not in err


def test_a_suite_file_key_outside_the_schema_fails_at_composition(tmp_path: Path) -> None:
    """A user's suite file that misspells a method key stops at composition, naming it."""
    (tmp_path / "suite").mkdir()
    (tmp_path / "suite" / "mine.yaml").write_text("# @package _global_\ndefaults:\n  - gmm\nmethod:\n  gamm: 4.0\n")
    with pytest.raises(Exception, match="gamm"):
        compose_config("benchmark", ["suite=mine", f"hydra.searchpath=[file://{tmp_path}]"])


def test_command_defaults_are_finetunes_except_where_the_command_sets_its_own() -> None:
    """A key a suite does not set takes its schema default, so the schema's defaults are finetune's: a new key
    added with another default would move every suite's recorded numbers."""
    taken = inspect.signature(finetune).parameters
    own = {"sm_steps", "lr", "eval_every"}  # ctrl-bio finetune's own choices (configs/method/ctrl.yaml before 26)
    for f in dataclasses.fields(CTRLSettings):
        if f.name in taken and f.name not in own:
            default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
            expected = taken[f.name].default
            assert default == (list(expected) if isinstance(expected, tuple) else expected), f.name


#: finetune's keyword arguments that the suites and commands fill in themselves: the rest are ``method`` settings.
PROVIDED = {"model", "sde", "reward", "label_prior", "x_shape", "n_steps", "t_end", "spacing", "seed", "progress",
            "pool_x0", "checkpoint_path", "value_net"}


def test_every_setting_of_finetune_is_a_typed_method_key() -> None:
    """A keyword added to finetune needs its field in ctrl_bio.settings.CTRLSettings, or no config can set it."""
    fields = {f.name for f in dataclasses.fields(CTRLSettings)}
    assert set(inspect.signature(finetune).parameters) - PROVIDED <= fields


def test_settings_for_drops_defaults_and_refuses_a_set_key_the_consumer_ignores() -> None:
    def consumer(*, gamma: float = 1.0, lr: float = 1e-3) -> None:
        return None

    settings = dataclasses.asdict(CTRLSettings(gamma=3.0))
    assert settings_for(settings, consumer, "here") == {"gamma": 3.0, "lr": 1e-4}
    with pytest.raises(ValueError, match=r"method.pool='training' is not supported by here"):
        settings_for(settings | {"pool": "training"}, consumer, "here")
    with pytest.raises(ValueError, match="unknown key"):
        settings_for(settings | {"gamm": 3.0}, consumer, "here")


def test_finetune_command_refuses_a_suite_only_setting(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    code = main(["finetune", "method.pool=training", "method.sm_steps=1", "data.n_pairs=50",
                 "label.component.training.epochs=1", "progress=false", f"hydra.run.dir={tmp_path / 'run'}"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and "method.pool='training' is not supported by ctrl-bio finetune" in err
