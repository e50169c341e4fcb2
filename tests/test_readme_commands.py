"""Every `ctrl-bio` command of the README composes and resolves (a contract test: a README command that fails at
once, such as an interpolation a suite cannot resolve, fails here)."""

from __future__ import annotations

import shlex
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from ctrl_bio.cli import compose_config
from ctrl_bio.cli_runs import apply_budget

README = Path(__file__).resolve().parent.parent / "README.md"


def readme_commands() -> list[list[str]]:
    """The argument lists of the `ctrl-bio ...` lines of the README's code blocks (continuations joined, comments
    dropped)."""
    lines, out, joined, in_code = README.read_text().splitlines(), [], "", False
    for line in lines:
        if line.startswith("```"):
            in_code = not in_code
            continue
        if not in_code:
            continue
        text = line.split(" # ")[0].rstrip() if not line.lstrip().startswith("#") else ""
        if joined:
            text, joined = joined + " " + text.strip(), ""
        if text.endswith("\\"):
            joined = text[:-1].rstrip()
            continue
        for part in text.split("&&"):
            words = shlex.split(part.strip()) if "ctrl-bio " in part else []
            start = next((i for i, w in enumerate(words) if w.endswith("ctrl-bio")), None)
            if start is not None:
                out.append(words[start + 1:])
    return out


COMMANDS = readme_commands()


def test_the_readme_has_the_commands_it_should() -> None:
    assert len(COMMANDS) >= 20 and ["benchmark", "suite=gmm"] in COMMANDS


@pytest.mark.parametrize("args", [a for a in COMMANDS if a and not a[0].startswith("-")], ids=" ".join)
def test_every_readme_command_composes_and_resolves(args: list[str]) -> None:
    # <date> stands for the run directory's name, which the user types in (runs/<command>/<date>).
    args = [a.replace("<date>", "2026-12-04_12-00-00") for a in args]
    command, overrides = args[0], [a for a in args[1:] if a not in ("-m", "--cfg")]
    if "-m" in args:  # a sweep: each job is the command with one value of each swept key
        overrides = [o.split(",")[0] for o in overrides]
    cfg = compose_config(command, overrides)
    if command == "benchmark":
        apply_budget(cfg)
        OmegaConf.to_container(cfg.suite, resolve=True)
    else:  # every node the command reads, resolved against the whole config (hydra.run.dir included)
        for key in (k for k in cfg if k != "hydra"):
            node = cfg[key]
            if OmegaConf.is_config(node):
                OmegaConf.to_container(node, resolve=True)
