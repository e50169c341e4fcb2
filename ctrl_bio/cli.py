"""The ``ctrl-bio`` command line: ``ctrl-bio <command> [key=value ...]`` with Hydra overrides.

The core reaches a domain only through ``_target_`` paths in ``configs/`` (Hydra instantiation), so
this module imports no domain. Every run writes into its own run directory (``hydra.run.dir``): the
resolved config, a log, checkpoints and, for ``benchmark``, ``results.json``, ``results.md`` and plots.
Bad input ends with one line on stderr, never a traceback (``CTRL_BIO_DEBUG=1`` shows it): exit status 2 for a
usage error (a bad override, a missing or unreadable input file, a run directory in use), 1 for a failure while
running (a NaN loss, an error inside a library). A run holds its directory with a lock file (:mod:`ctrl_bio.rundir`).

The parts: :mod:`ctrl_bio.cli_errors` (the one-line errors and exit statuses), :mod:`ctrl_bio.cli_overrides`
(composing a command's config, reading and type-checking overrides), :mod:`ctrl_bio.cli_runs` (run directories,
``resume=``, the per-command runners and the error boundary :func:`run_command`) and :mod:`ctrl_bio.cli_multirun`
(``-m`` sweeps). Their public names are importable from here too.
"""

from __future__ import annotations

import logging
import sys
from importlib import metadata

from ctrl_bio.cli_errors import DEBUG_ENV, UsageError, exit_status, one_line, report_error
from ctrl_bio.cli_multirun import MULTIRUN_FLAGS, SWEEP_DIR, run_multirun, sweep_jobs
from ctrl_bio.cli_overrides import (
    RUN_DIR_ENV,
    check_override_types,
    compose_config,
    config_dir,
    parse_overrides,
    value_type_error,
)
from ctrl_bio.cli_runs import (
    COMMANDS,
    RESUME_FREE,
    TRAINING_COMMANDS,
    default_run_dir,
    log,
    open_run,
    resume_config,
    run_benchmark,
    run_command,
    run_training_command,
    saved_command,
    training_config,
)

#: The entry point and what it re-exports from the cli_* modules (their old import path, ctrl_bio.cli).
__all__ = ["USAGE", "main", "version", "command_help", "DEBUG_ENV", "UsageError", "exit_status", "one_line",
           "report_error", "MULTIRUN_FLAGS", "SWEEP_DIR", "run_multirun", "sweep_jobs", "RUN_DIR_ENV",
           "check_override_types", "compose_config", "config_dir", "parse_overrides", "value_type_error", "COMMANDS",
           "RESUME_FREE", "TRAINING_COMMANDS", "default_run_dir", "log", "open_run", "resume_config", "run_benchmark",
           "run_command", "run_training_command", "saved_command", "training_config"]

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
