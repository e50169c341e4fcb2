"""Running one ``ctrl-bio`` command: its run directory (lock, ``config.yaml``, ``run.log``), ``resume=`` of a training
command, the benchmark and training runners, and :func:`run_command`, the error boundary around them.

Every run writes into its own run directory (``hydra.run.dir``), held with a lock file (:mod:`ctrl_bio.rundir`).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from omegaconf import DictConfig, OmegaConf, open_dict

from ctrl_bio.cli_errors import DEBUG_ENV, UsageError, one_line, report_error
from ctrl_bio.cli_overrides import (
    RUN_DIR_ENV,
    check_override_types,
    compose_config,
    parse_overrides,
    value_type_error,
)
from ctrl_bio.rundir import RunLock, check_no_run_there, unique_run_dir

log = logging.getLogger("ctrl_bio")


def _log_handler(run_dir: Path) -> logging.Handler:
    handler = logging.FileHandler(run_dir / "run.log")
    handler.setFormatter(logging.Formatter("%(asctime)s %(name)s %(levelname)s %(message)s"))
    return handler


@contextmanager
def open_run(run_dir: Path, saved: DictConfig, command: str, *, fresh: bool) -> Iterator[Path]:
    """Hold ``run_dir`` (its lock), write ``config.yaml``, log into ``run.log``; an error ends there as one line too.

    A fresh training run (not ``resume=``) is refused in a folder that already holds a run's outputs; a benchmark
    writes its results over an earlier benchmark's (the recorded suites are re-run into their folders).
    """
    lock = RunLock(run_dir).acquire()
    handler = None
    try:
        if fresh and command != "benchmark":
            check_no_run_there(run_dir, command)
        (run_dir / "config.yaml").write_text(OmegaConf.to_yaml(saved))
        handler = _log_handler(run_dir)
        logging.getLogger().addHandler(handler)
        yield run_dir
    except BaseException as exc:
        if handler is not None:  # the file only: the console gets the same line from main()
            handler.handle(log.makeRecord(log.name, logging.ERROR, __file__, 0, "stopped: %s",
                                          (one_line(exc) if isinstance(exc, Exception) else type(exc).__name__,),
                                          None))
        raise
    finally:
        if handler is not None:
            logging.getLogger().removeHandler(handler)
            handler.close()
        lock.release()


def default_run_dir(cfg: DictConfig) -> bool:
    """Whether ``hydra.run.dir`` is the ``${now:...}`` default (neither given nor inherited from DDP rank 0)."""
    given = [o for o in cfg.hydra.overrides.hydra if str(o).startswith("hydra.run.dir=")]
    return not given and not os.environ.get(RUN_DIR_ENV)


def run_benchmark(cfg: DictConfig) -> None:
    """Instantiate ``cfg.suite`` (a partial of a suite function), run it and write its results."""
    from hydra.utils import instantiate

    from ctrl_bio.harness import markdown_table, write_results
    from ctrl_bio.settings import check_precision, resolve_device

    # device=auto becomes the device it stands for here, once: what the suite node's ${device} reads.
    cfg.precision = check_precision(cfg.get("precision") or 32)
    cfg.device = resolve_device(cfg.get("device") or "auto")
    apply_budget(cfg)
    node = OmegaConf.to_container(cfg.suite, resolve=True)
    name = node.pop("name")
    run = instantiate(node)  # builds the domain first, so bad settings fail before any run directory exists
    run_dir = unique_run_dir(cfg.hydra.run.dir) if default_run_dir(cfg) else Path(cfg.hydra.run.dir)
    plain = OmegaConf.masked_copy(cfg, [k for k in cfg.keys() if k != "hydra"])
    with open_run(run_dir, OmegaConf.create(OmegaConf.to_container(plain, resolve=True)), "benchmark", fresh=True):
        log.info("suite %s, run directory %s", name, run_dir)
        result = run(run_dir=run_dir)
        path = write_results(result, run_dir)
    print(markdown_table(result.rows))
    print(f"results: {path}")


def apply_budget(cfg: DictConfig) -> None:
    """``budget=<name>``: the suite's named set of settings (``suite.budgets.<name>``: dotted key -> value), applied
    in place beneath what the command line sets itself (``budget=large method.sm_steps=100`` runs 100 updates).

    ``default`` is the suite as configured. A suite declares only budgets whose effect it has measured
    (benchmarks/estimators/README.md); an unknown name is one line listing the suite's budgets.
    """
    node = cfg.suite.get("budgets")
    budgets = OmegaConf.to_container(node, resolve=False) if node is not None else {}
    with open_dict(cfg.suite):
        cfg.suite.pop("budgets", None)  # the suite function takes the resolved settings, not the table
    name = str(cfg.get("budget") or "default")
    if name == "default":
        return
    if name not in budgets:
        raise UsageError(f"budget={name}: suite {cfg.suite.name} has budgets {', '.join(['default', *budgets])}")
    given = {str(o).split("=", 1)[0].lstrip("+~") for o in cfg.hydra.overrides.task}
    for key, value in budgets[name].items():
        if key not in given:
            OmegaConf.update(cfg, key, value, merge=True, force_add=False)


# -- training commands -------------------------------------------------------------------------------------------


#: Settings a resumed run may change: they decide how it runs (progress bar, checkpoints, processes), not what
#: it computes. ``trainer.devices`` changes the effective batch (devices x batch size); docs/training.md says so.
RESUME_FREE = ("progress", "callbacks", "checkpoint_every", "evaluate", "device", "trainer.devices",
               "trainer.num_nodes", "trainer.strategy", "trainer.accelerator", "trainer.log_every_n_steps",
               "trainer.logger")


def saved_command(cfg: DictConfig) -> str:
    """The command a saved ``config.yaml`` belongs to (its ``command`` key; older runs: by their keys)."""
    if cfg.get("command"):
        return str(cfg.command)
    if "suite" in cfg:
        return "benchmark"
    if "method" in cfg:
        return "finetune"
    if "run" in cfg and "y" in cfg:
        return "sample"
    if "steps" in cfg:
        return "pretrain"
    return "train-classifier"


def resume_config(command: str, overrides: list[str], resume: str) -> tuple[DictConfig, Path, Path]:
    """The saved config of the run to continue, with the overrides it can honour; any other is refused.

    The saved config is the truth: an override that would change what the run computes (``lr``, a seed, the
    label) cannot be honoured by a run that restores its optimiser and schedule, so it is one line naming the key.
    A longer run (``steps`` of pretrain, the last phase's ``method.steps`` or ``method.sm_steps`` of finetune, set
    larger) is applied, its cosine schedule stretched to the new length from the step it stands at.
    """
    from ctrl_bio.training.command_config import run_length_key
    from ctrl_bio.training.runs import check_checkpoint, resolve_resume

    if command == "sample":
        raise UsageError("sample does not resume: run it again (it is quick)")
    ckpt, run_dir = resolve_resume(resume)
    saved = run_dir / "config.yaml"
    if not saved.is_file():
        raise FileNotFoundError(f"resume: no config.yaml in '{run_dir}' to continue from")
    try:
        cfg = OmegaConf.load(saved)
    except Exception as exc:  # noqa: BLE001 - YAML and OmegaConf raise several types
        raise UsageError(f"resume: {saved} is not a readable config ({one_line(exc)})") from exc
    if not isinstance(cfg, DictConfig):
        raise UsageError(f"resume: {saved} is not a config of key: value settings")
    was = saved_command(cfg)
    if was != command:
        raise UsageError(f"resume: '{run_dir}' is a {was} run, not a {command} run (ctrl-bio {was} resume={resume})")
    if ckpt.is_file():
        check_checkpoint(ckpt)
    length_key = run_length_key(command, cfg)
    rest = [o for o in overrides if not o.startswith("resume=")]
    for o, text in zip(parse_overrides(rest), rest):
        key, value = o.key_or_group, o.value()
        if key == "hydra.run.dir" and Path(str(value)).resolve() != run_dir.resolve():
            raise UsageError(f"resume continues in the run's own directory '{run_dir}': drop {text}")
        if key.startswith("hydra."):
            continue  # the saved config is resolved: search paths and the like change nothing
        if o.is_delete():
            raise UsageError(f"resume: cannot delete '{key}' from a saved run")
        old = OmegaConf.select(cfg, key, default=KeyError)
        if old is KeyError:
            raise UsageError(f"resume: unknown config key '{key}' (not in {saved})")
        old = OmegaConf.to_container(old) if OmegaConf.is_config(old) else old
        if value == old:
            continue
        why = value_type_error(key, value, old)
        if why:
            raise UsageError(why)
        if key == length_key:
            if not isinstance(value, int) or isinstance(value, bool) or value <= int(old):
                raise UsageError(f"resume: {key}={value} must be an integer above the run's {old} (a resumed run "
                                 f"can only be made longer)")
            log.info("resume: %s %s -> %s (the cosine schedule is stretched to the new length)", key, old, value)
        elif key not in RESUME_FREE:
            raise UsageError(f"resume: {key}={value} would change the run (saved {key}={old}); a resumed run keeps "
                             f"its saved config: start a new run to change it")
        OmegaConf.update(cfg, key, value, merge=False, force_add=True)
    cfg.resume = str(ckpt)
    cfg.command = command
    return cfg, run_dir, ckpt


def training_config(command: str, overrides: list[str]) -> tuple[DictConfig, Path, Path | None]:
    """(resolved config without ``hydra``, run directory, checkpoint to resume from) of a training command.

    ``run_dir=<dir>`` is accepted as ``hydra.run.dir=<dir>``.
    ``resume=<run dir or .ckpt>`` reloads that run's saved ``config.yaml`` (:func:`resume_config`). A fresh run's
    default directory is made unique here, in the main process, before ``${run_dir}`` is resolved.
    """
    from ctrl_bio.training.command_config import check_settings
    from ctrl_bio.training.runs import is_main_process

    # The config's run_dir is filled from hydra.run.dir below; a run_dir=... override would otherwise be
    # overwritten without a word, so it is read as the hydra.run.dir it means.
    overrides = [f"hydra.run.dir={o.split('=', 1)[1]}" if o.startswith("run_dir=") else o for o in overrides]
    resume = next((o.split("=", 1)[1] for o in overrides if o.startswith("resume=")), None)
    if resume not in (None, "", "null"):
        cfg, run_dir, ckpt = resume_config(command, overrides, resume)
        check_settings(command, cfg)
        return cfg, run_dir, ckpt
    parsed = parse_overrides(overrides)
    full = compose_config(command, overrides)
    check_override_types(command, parsed, overrides)
    cfg = OmegaConf.masked_copy(full, [k for k in full.keys() if k != "hydra"])
    OmegaConf.set_struct(cfg, False)
    run_dir = Path(full.hydra.run.dir)
    check_settings(command, cfg)
    if default_run_dir(full) and is_main_process():
        run_dir = unique_run_dir(run_dir)
    cfg.run_dir = str(run_dir)
    cfg.command = command
    OmegaConf.resolve(cfg)
    return cfg, run_dir, None


def run_training_command(command: str, overrides: list[str]) -> None:
    """Run ``pretrain``, ``train-classifier``, ``finetune`` or ``sample`` in its run directory."""
    from ctrl_bio.training.commands import COMMANDS as TRAINING
    from ctrl_bio.training.runs import is_main_process

    cfg, run_dir, ckpt = training_config(command, overrides)
    if not is_main_process():
        TRAINING[command](cfg, run_dir, ckpt)
        return
    with open_run(run_dir, cfg, command, fresh=ckpt is None):
        os.environ[RUN_DIR_ENV] = str(run_dir)
        try:
            log.info("%s, run directory %s%s", command, run_dir, f", resuming from {ckpt}" if ckpt else "")
            TRAINING[command](cfg, run_dir, ckpt)
        finally:
            os.environ.pop(RUN_DIR_ENV, None)


COMMANDS: dict[str, Callable[[DictConfig], None]] = {"benchmark": run_benchmark}
TRAINING_COMMANDS = ("pretrain", "train-classifier", "finetune", "sample")


def run_command(command: str, overrides: list[str], show_cfg: bool = False) -> int:
    """One command with its overrides: its exit status, any error reported as one line on stderr."""
    try:
        sweeps = [text for o, text in zip(parse_overrides(overrides), overrides) if o.is_sweep_override()]
        if sweeps:
            raise UsageError(f"'{sweeps[0]}' is a sweep: add -m to run one job per value (ctrl-bio {command} -m ...)")
        if command in TRAINING_COMMANDS and not show_cfg:
            run_training_command(command, overrides)
            return 0
        parsed = parse_overrides(overrides)
        cfg = compose_config(command, overrides)
        check_override_types(command, parsed, overrides)
        if show_cfg:
            if command == "benchmark":
                apply_budget(cfg)  # what the run would use: the budget's settings, not the table of budgets
            print(OmegaConf.to_yaml(OmegaConf.masked_copy(cfg, [k for k in cfg if k != "hydra"])))
            return 0
        COMMANDS[command](cfg)
    except KeyboardInterrupt:
        raise
    except Exception as exc:  # noqa: BLE001 - the one error boundary: every failure leaves as one readable line
        if os.environ.get(DEBUG_ENV) == "1":
            raise
        return report_error(exc)
    return 0
