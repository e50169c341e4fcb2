"""``ctrl-bio <command> -m key=a,b ...``: one job per combination of the sweep overrides, each in its own run folder."""

from __future__ import annotations

from pathlib import Path

from ctrl_bio.cli_errors import UsageError
from ctrl_bio.cli_overrides import config_dir, parse_overrides
from ctrl_bio.cli_runs import run_command
from ctrl_bio.rundir import unique_run_dir

#: The flags that ask for a multirun (Hydra's own spelling).
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
