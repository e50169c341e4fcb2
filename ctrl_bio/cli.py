"""The ``ctrl-bio`` command line: ``ctrl-bio <command> [key=value ...]`` with Hydra overrides.

The core reaches a domain only through ``_target_`` paths in ``configs/`` (Hydra instantiation), so
this module imports no domain. Every run writes into its own run directory (``hydra.run.dir``): the
resolved config, a log, checkpoints and, for ``benchmark``, ``results.json``, ``results.md`` and plots.
Bad input ends with one line on stderr, never a traceback (``CTRL_BIO_DEBUG=1`` shows it): exit status 2 for a
usage error (a bad override, a missing or unreadable input file, a run directory in use), 1 for a failure while
running (a NaN loss, an error inside a library). A run holds its directory with a lock file (:mod:`ctrl_bio.rundir`).
"""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from importlib import metadata, resources
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from ctrl_bio.rundir import RunDirError, RunLock, check_no_run_there, unique_run_dir

log = logging.getLogger("ctrl_bio")

USAGE = """usage: ctrl-bio <command> [key=value ...]

Commands:
  pretrain          train the domain's score network by denoising score matching
                    e.g. ctrl-bio pretrain domain=gmm steps=4000
  train-classifier  train and calibrate a reward classifier p(y|x) per label on clean pairs
                    e.g. ctrl-bio train-classifier label=component data.n_pairs=2000
  finetune          CTRL: fine-tune a zero-initialised label pathway on the frozen pre-trained model
                    e.g. ctrl-bio finetune label=component pretrained=learned method.sm_steps=2000
  sample            write samples of a fine-tuned run (or its model/ folder) with the requested labels
                    e.g. ctrl-bio sample run=runs/finetune/<date> y=2 n=1000 sampler=ddim
  benchmark         run a benchmark suite and write results.json, results.md and plots
                    e.g. ctrl-bio benchmark suite=gmm domain.dim=8 seed=1

Overrides use Hydra syntax (key=value, +key=value); every run writes into hydra.run.dir.
Training commands: resume=<run dir or .ckpt> continues a killed run; trainer.strategy=ddp trainer.devices=2
runs several processes. Sweeps: -m key=a,b (or range(0,3)) runs one job per combination, each in its own
<hydra.sweep.dir>/<n>. Options: -h/--help this text (also after a command); --version the package version;
--cfg print the composed config of a command and exit. Exit status: 0 done, 2 usage error, 1 failure;
CTRL_BIO_DEBUG=1 shows the traceback of an error.
"""

#: Rank 0 of a training command exports its run directory here; the processes Lightning's DDP launcher
#: starts re-run the same command line and read it, so that every rank writes into the same directory.
RUN_DIR_ENV = "CTRL_BIO_RUN_DIR"

#: Set to 1 to see the traceback of an error instead of its one line.
DEBUG_ENV = "CTRL_BIO_DEBUG"


class UsageError(Exception):
    """A problem with what the user asked for, reported as one line (exit status 2)."""


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


def one_line(exc: BaseException) -> str:
    """A Hydra/OmegaConf/validation error flattened onto one readable line."""
    schema = getattr(exc.__cause__, "object_type", None)
    if "Could not override" in str(exc) and isinstance(schema, type) and hasattr(schema, "__dataclass_fields__"):
        return f"unknown config key '{exc.__cause__.full_key}' (not a field of ctrl_bio.settings.{schema.__name__})"
    if "Could not override" in str(exc) and "+" in str(exc):
        key = str(exc).split("'")[1]
        return f"unknown config key '{key}' (to add a new key write +{key}=...)"
    while exc.__cause__ is not None and type(exc).__module__.startswith(("hydra", "omegaconf")):
        exc = exc.__cause__
    text = str(exc).split("Config search path")[0]
    if getattr(exc, "full_key", None) and exc.full_key not in text.split("full_key")[0]:
        text = f"{exc.full_key}: {text}"  # a wrong type names the value and the type; the key is the point
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    lines = [ln for ln in lines if not ln.startswith(("full_key", "object_type", "Set the environment"))]
    if type(exc).__module__.startswith("yaml"):  # a YAML syntax error: its "in <file>, line n" lines are the point
        lines = [ln.replace('"', "'") for ln in lines]
    return " ".join(lines) or type(exc).__name__


# -- overrides ---------------------------------------------------------------------------------------------------


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


# -- run directories ---------------------------------------------------------------------------------------------


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
    from ctrl_bio.training.commands import run_length_key
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

    ``resume=<run dir or .ckpt>`` reloads that run's saved ``config.yaml`` (:func:`resume_config`). A fresh run's
    default directory is made unique here, in the main process, before ``${run_dir}`` is resolved.
    """
    from ctrl_bio.training.commands import check_settings
    from ctrl_bio.training.runs import is_main_process

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


def version() -> str:
    try:
        return metadata.version("ctrl-bio")
    except metadata.PackageNotFoundError:  # a checkout on PYTHONPATH, not installed
        return "unknown (not installed)"


def command_help(command: str) -> str:
    """The usage lines of one command."""
    lines = USAGE.splitlines()
    start = next(i for i, ln in enumerate(lines) if ln.startswith(f"  {command} "))
    own = [lines[start]] + [ln for ln in lines[start + 1:start + 3] if ln.startswith(" " * 10)]
    return "\n".join([f"usage: ctrl-bio {command} [key=value ...]", *own,
                      f"Every key and its default: ctrl-bio {command} --cfg"])


def exit_status(exc: BaseException) -> int:
    """2 for what the user asked for (bad overrides, inputs, run directories), 1 for a failure while running."""
    from ctrl_bio.finetune import NonFiniteLossError

    if isinstance(exc, NonFiniteLossError):
        return 1
    if isinstance(exc, (UsageError, ValueError, FileNotFoundError, RunDirError)):
        return 2
    if type(exc).__module__.startswith(("hydra", "omegaconf", "lightning", "yaml")):
        return 2
    return 1


# -- multirun (-m): one job per combination of the sweep overrides ---------------------------------------------------

MULTIRUN_FLAGS = ("-m", "--multirun")
#: Where a multirun's jobs go when ``hydra.sweep.dir`` is not given: one numbered folder per job under it.
SWEEP_DIR = "runs/multirun/{command}/{time:%Y-%m-%d_%H-%M-%S}"


def sweep_jobs(overrides: list[str]) -> list[list[str]]:
    """The override lists of a sweep: every combination of ``key=a,b``, ``key=range(0,3)``, ``key=glob(*)`` values.

    The expansion is Hydra's own (its parser and sweep iterators; Hydra's basic sweeper takes the same cartesian
    product, the last override varying fastest). A list value (``suite.methods=[a,b]``) is one value, not a sweep.
    """
    import itertools

    from hydra.core.override_parser.types import ValueType

    choices: list[list[str]] = []
    for o, text in zip(parse_overrides(overrides), overrides):
        if o.is_sweep_override():
            if o.value_type == ValueType.INTERVAL_SWEEP:
                raise UsageError(f"'{text}': an interval is for a sweeper plugin (Optuna, Ax); list the values instead")
            key = o.get_key_element()
            if o.value_type == ValueType.GLOB_CHOICE_SWEEP:  # label=glob(logistic*): the group's files that match
                group = config_dir() / o.key_or_group.replace(".", "/")
                values = o.value().filter(sorted(p.stem for p in group.glob("*.yaml")))
            else:
                values = list(o.sweep_string_iterator())
            choices.append([f"{key}={v}" for v in values])
        else:
            choices.append([text])
    return [list(job) for job in itertools.product(*choices)]


def run_multirun(command: str, overrides: list[str]) -> int:
    """``ctrl-bio <command> -m key=a,b ...``: run every job of the sweep one after another, each in its own run
    directory ``<hydra.sweep.dir>/<job number>``; one summary line per job and ``jobs.csv`` in the sweep folder.

    A failing job does not stop the others; the exit status is the worst job's.
    """
    import csv
    import time
    from datetime import datetime

    if any(o.startswith(("hydra.run.dir=", "resume=")) for o in overrides):
        raise UsageError("with -m every job gets its own run directory <hydra.sweep.dir>/<n>: give hydra.sweep.dir "
                         "instead of hydra.run.dir (and no resume=)")
    given = [o.split("=", 1)[1] for o in overrides if o.startswith("hydra.sweep.dir=")]
    rest = [o for o in overrides if not o.startswith("hydra.sweep.dir=")]
    jobs = sweep_jobs(rest)
    sweep_dir = Path(given[-1]) if given else unique_run_dir(SWEEP_DIR.format(command=command, time=datetime.now()))
    sweep_dir.mkdir(parents=True, exist_ok=True)
    varied = [i for i in range(len(rest)) if len({job[i] for job in jobs}) > 1]
    print(f"multirun: {len(jobs)} job(s) of ctrl-bio {command} in {sweep_dir}")
    rows, worst = [], 0
    for n, job in enumerate(jobs):
        run_dir = sweep_dir / str(n)
        start = time.perf_counter()
        status = run_command(command, [*job, f"hydra.run.dir={run_dir}"])
        seconds = time.perf_counter() - start
        worst = max(worst, status)
        what = " ".join(job[i] for i in varied) or "(no sweep)"
        outcome = "done" if status == 0 else f"failed (exit {status})"
        print(f"job {n}: {what}: {outcome} in {seconds:.1f} s, {run_dir}")
        rows.append({"job": n, "overrides": " ".join(job), "status": status, "seconds": round(seconds, 2),
                     "run_dir": str(run_dir)})
    with (sweep_dir / "jobs.csv").open("w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    print(f"multirun: {sum(r['status'] == 0 for r in rows)}/{len(rows)} job(s) done; {sweep_dir / 'jobs.csv'}")
    return worst


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
            print(OmegaConf.to_yaml(OmegaConf.masked_copy(cfg, [k for k in cfg if k != "hydra"])))
            return 0
        COMMANDS[command](cfg)
    except KeyboardInterrupt:
        raise
    except Exception as exc:  # noqa: BLE001 - the one error boundary: every failure leaves as one readable line
        if os.environ.get(DEBUG_ENV) == "1":
            raise
        status = exit_status(exc)
        text = one_line(exc)
        if status == 1 and not isinstance(exc, RuntimeError):  # RuntimeErrors of ours and torch's read alone
            text = f"{type(exc).__name__}: {text}"
        hint = f" (set {DEBUG_ENV}=1 for the traceback)" if status == 1 else ""
        print(f"ctrl-bio: error: {text}{hint}", file=sys.stderr)
        return status
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(USAGE)
        return 0
    if argv[0] in ("--version", "-V"):
        print(f"ctrl-bio {version()}")
        return 0
    command, overrides = argv[0], argv[1:]
    show_cfg = "--cfg" in overrides
    overrides = [o for o in overrides if o != "--cfg"]
    if command not in COMMANDS and command not in TRAINING_COMMANDS:
        print(f"ctrl-bio: error: unknown command '{command}'; commands: "
              f"{', '.join([*TRAINING_COMMANDS, *COMMANDS])}", file=sys.stderr)
        return 2
    if any(o in ("-h", "--help") for o in overrides):
        print(command_help(command))
        return 0
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    multirun = any(o in MULTIRUN_FLAGS for o in overrides)
    overrides = [o for o in overrides if o not in MULTIRUN_FLAGS]
    try:
        if multirun and not show_cfg:
            return run_multirun(command, overrides)
        return run_command(command, overrides, show_cfg)
    except KeyboardInterrupt:
        print("ctrl-bio: interrupted", file=sys.stderr)
        return 130
    except UsageError as exc:  # the sweep itself cannot be read (a job's own errors are reported by run_command)
        print(f"ctrl-bio: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
