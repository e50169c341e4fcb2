"""The ``ctrl-bio`` command line: ``ctrl-bio <command> [key=value ...]`` with Hydra overrides.

The core reaches a domain only through ``_target_`` paths in ``configs/`` (Hydra instantiation), so
this module imports no domain. Every run writes into its own run directory (``hydra.run.dir``): the
resolved config, a log, checkpoints and, for ``benchmark``, ``results.json``, ``results.md`` and plots.
Bad input ends with one line on stderr and a non-zero exit, never a traceback.
"""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Callable
from importlib import resources
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

log = logging.getLogger("ctrl_bio")

USAGE = """usage: ctrl-bio <command> [key=value ...]

Commands:
  pretrain          train the domain's score network by denoising score matching
                    e.g. ctrl-bio pretrain domain=gmm steps=4000
  train-classifier  train and calibrate a reward classifier p(y|x) per label on clean pairs
                    e.g. ctrl-bio train-classifier label=component data.n_pairs=2000
  finetune          CTRL: fine-tune a zero-initialised label pathway on the frozen pre-trained model
                    e.g. ctrl-bio finetune label=component pretrained=learned method.sm_steps=2000
  sample            write samples of a fine-tuned run with the requested labels
                    e.g. ctrl-bio sample run=runs/finetune/<date> y=2 n=1000
  benchmark         run a benchmark suite and write results.json, results.md and plots
                    e.g. ctrl-bio benchmark suite=gmm domain.dim=8 seed=1

Overrides use Hydra syntax (key=value, +key=value); every run writes into hydra.run.dir.
Training commands: resume=<run dir or .ckpt> continues a killed run; trainer.strategy=ddp trainer.devices=2
runs several processes. Options: -h/--help this text; --cfg print the composed config of a command and exit.
"""

#: Rank 0 of a training command exports its run directory here; the processes Lightning's DDP launcher
#: starts re-run the same command line and read it, so that every rank writes into the same directory.
RUN_DIR_ENV = "CTRL_BIO_RUN_DIR"


class UsageError(Exception):
    """A problem with what the user asked for, reported as one line."""


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

    setup_globals()  # the ${now:...} resolver used by hydra.run.dir
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(config_dir()), version_base="1.3", job_name=command):
        return compose(config_name=command, overrides=overrides, return_hydra_config=True)


def one_line(exc: BaseException) -> str:
    """A Hydra/OmegaConf/validation error flattened onto one readable line."""
    if "Could not override" in str(exc) and "+" in str(exc):
        key = str(exc).split("'")[1]
        return f"unknown config key '{key}' (to add a new key write +{key}=...)"
    while exc.__cause__ is not None and type(exc).__module__.startswith(("hydra", "omegaconf")):
        exc = exc.__cause__
    text = str(exc).split("Config search path")[0]
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    lines = [ln for ln in lines if not ln.startswith(("full_key", "object_type", "Set the environment"))]
    return " ".join(lines) or type(exc).__name__


def prepare_run_dir(cfg: DictConfig) -> Path:
    """Create the run directory, save the resolved config and send the log there too."""
    run_dir = Path(cfg.hydra.run.dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    plain = OmegaConf.masked_copy(cfg, [k for k in cfg.keys() if k != "hydra"])
    (run_dir / "config.yaml").write_text(OmegaConf.to_yaml(plain, resolve=True))
    handler = logging.FileHandler(run_dir / "run.log")
    handler.setFormatter(logging.Formatter("%(asctime)s %(name)s %(levelname)s %(message)s"))
    logging.getLogger().addHandler(handler)
    return run_dir


def run_benchmark(cfg: DictConfig) -> None:
    """Instantiate ``cfg.suite`` (a partial of a suite function), run it and write its results."""
    from hydra.utils import instantiate

    from ctrl_bio.harness import markdown_table, write_results

    node = OmegaConf.to_container(cfg.suite, resolve=True)
    name = node.pop("name")
    run = instantiate(node)  # builds the domain first, so bad settings fail before any run directory exists
    run_dir = prepare_run_dir(cfg)
    log.info("suite %s, run directory %s", name, run_dir)
    result = run(run_dir=run_dir)
    path = write_results(result, run_dir)
    print(markdown_table(result.rows))
    print(f"results: {path}")


def training_config(command: str, overrides: list[str]) -> tuple[DictConfig, Path, Path | None]:
    """(resolved config without ``hydra``, run directory, checkpoint to resume from) of a training command.

    ``resume=<run dir or .ckpt>`` reloads that run's saved ``config.yaml`` and applies the other
    ``key=value`` overrides on top (e.g. ``progress=false``).
    """
    from ctrl_bio.training.runs import resolve_resume

    resume = next((o.split("=", 1)[1] for o in overrides if o.startswith("resume=")), None)
    if resume not in (None, "", "null"):
        ckpt, run_dir = resolve_resume(resume)
        saved = run_dir / "config.yaml"
        if not saved.is_file():
            raise FileNotFoundError(f"resume: no config.yaml in '{run_dir}' to continue from")
        rest = [o.lstrip("+") for o in overrides if not o.startswith(("resume=", "hydra."))]
        cfg = OmegaConf.merge(OmegaConf.load(saved), OmegaConf.from_dotlist(rest))
        cfg.resume = str(ckpt)
        return cfg, run_dir, ckpt
    full = compose_config(command, overrides)
    run_dir = Path(full.hydra.run.dir)
    cfg = OmegaConf.masked_copy(full, [k for k in full.keys() if k != "hydra"])
    OmegaConf.set_struct(cfg, False)
    cfg.run_dir = str(run_dir)
    OmegaConf.resolve(cfg)
    return cfg, run_dir, None


def run_training_command(command: str, overrides: list[str]) -> None:
    """Run ``pretrain``, ``train-classifier``, ``finetune`` or ``sample`` in its run directory."""
    from ctrl_bio.training.commands import COMMANDS as TRAINING
    from ctrl_bio.training.runs import is_main_process

    cfg, run_dir, ckpt = training_config(command, overrides)
    main_process = is_main_process()
    if main_process:
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "config.yaml").write_text(OmegaConf.to_yaml(cfg))
        handler = logging.FileHandler(run_dir / "run.log")
        handler.setFormatter(logging.Formatter("%(asctime)s %(name)s %(levelname)s %(message)s"))
        logging.getLogger().addHandler(handler)
        os.environ[RUN_DIR_ENV] = str(run_dir)
    log.info("%s, run directory %s%s", command, run_dir, f", resuming from {ckpt}" if ckpt else "")
    try:
        TRAINING[command](cfg, run_dir, ckpt)
    finally:
        if main_process:
            os.environ.pop(RUN_DIR_ENV, None)
            logging.getLogger().removeHandler(handler)
            handler.close()


COMMANDS: dict[str, Callable[[DictConfig], None]] = {"benchmark": run_benchmark}
TRAINING_COMMANDS = ("pretrain", "train-classifier", "finetune", "sample")


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(USAGE)
        return 0
    command, overrides = argv[0], argv[1:]
    show_cfg = "--cfg" in overrides
    overrides = [o for o in overrides if o != "--cfg"]
    if command not in COMMANDS and command not in TRAINING_COMMANDS:
        print(f"ctrl-bio: error: unknown command '{command}'; commands: "
              f"{', '.join([*TRAINING_COMMANDS, *COMMANDS])}", file=sys.stderr)
        return 2
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    from ctrl_bio.finetune import NonFiniteLossError

    try:
        if command in TRAINING_COMMANDS and not show_cfg:
            run_training_command(command, overrides)
            return 0
        cfg = compose_config(command, overrides)
        if show_cfg:
            print(OmegaConf.to_yaml(OmegaConf.masked_copy(cfg, [k for k in cfg if k != "hydra"])))
            return 0
        COMMANDS[command](cfg)
    except NonFiniteLossError as exc:
        print(f"ctrl-bio: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("ctrl-bio: interrupted", file=sys.stderr)
        return 130
    except Exception as exc:  # noqa: BLE001 - every failure leaves as one readable line
        if isinstance(exc, (ValueError, FileNotFoundError, UsageError)) or type(exc).__module__.startswith(
                ("hydra", "omegaconf", "lightning")):
            print(f"ctrl-bio: error: {one_line(exc)}", file=sys.stderr)
            return 2
        raise
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
