"""Run directories: one run per folder, held by a lock file that names the holder's pid.

Two runs writing into one folder mix their files (one's ``config.yaml``, the other's checkpoints, interleaved
``metrics.csv``). A run therefore holds ``run.lock`` for as long as it writes: an ``flock`` on the file, which the
kernel releases when the holder exits in any way, SIGKILL included, so a lock left by a dead run is stale and is
taken over by the next one (the pid in the file says who held it). Where the file system has no ``flock`` (some
network file systems) the pid alone decides: a lock whose pid is alive is held. Default run directories are stamped
to the second; :func:`unique_run_dir` adds ``_1``, ``_2``, ... so that two runs started within one second never
share one.
"""

from __future__ import annotations

import itertools
import logging
import os
from pathlib import Path

try:
    import fcntl
except ImportError:  # pragma: no cover - Windows: the pid alone decides
    fcntl = None

log = logging.getLogger("ctrl_bio")

LOCK_NAME = "run.lock"
#: What a training run leaves in its folder: a new run (not ``resume=``) is refused where one of them exists.
RUN_OUTPUTS = ("checkpoints", "score.safetensors", "pathway.safetensors", "classifiers")


class RunDirError(ValueError):
    """The run directory is held by another run, or already holds one; the message is one line."""


def unique_run_dir(base: str | Path) -> Path:
    """``base`` or, if it exists, the first of ``base_1``, ``base_2``, ... that does not; created here.

    ``mkdir`` without ``exist_ok`` is atomic, so two processes never get the same folder.
    """
    base = Path(base)
    base.parent.mkdir(parents=True, exist_ok=True)
    for k in itertools.count():
        path = base if k == 0 else base.with_name(f"{base.name}_{k}")
        try:
            path.mkdir()
            return path
        except FileExistsError:
            continue
    raise AssertionError("unreachable")


def check_no_run_there(run_dir: Path, command: str) -> None:
    """Refuse to start a new run in a folder that already holds a training run's outputs."""
    held = [name for name in RUN_OUTPUTS if (run_dir / name).exists()]
    if held:
        raise RunDirError(f"run directory '{run_dir}' already holds a run ({held[0]}): continue it with "
                          f"ctrl-bio {command} resume={run_dir}, or choose another hydra.run.dir")


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's live process
        return True
    return True


def _read_pid(fd: int) -> int | None:
    os.lseek(fd, 0, os.SEEK_SET)
    text = os.read(fd, 64).decode(errors="replace").strip()
    return int(text) if text.isdigit() else None


class RunLock:
    """``run_dir/run.lock`` held by this process until :meth:`release` (a context manager too)."""

    def __init__(self, run_dir: str | Path):
        self.run_dir = Path(run_dir)
        self.path = self.run_dir / LOCK_NAME
        self.fd: int | None = None

    def _refuse(self, pid: int | None) -> RunDirError:
        who = f"process {pid}" if pid else "another process"
        return RunDirError(f"run directory '{self.run_dir}' is in use by {who} (lock file {self.path}): wait for "
                           f"that run to end, or choose another hydra.run.dir")

    def acquire(self) -> RunLock:
        self.run_dir.mkdir(parents=True, exist_ok=True)
        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            previous = _read_pid(fd)
            try:
                if fcntl is None:
                    raise OSError("no flock")
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                raise self._refuse(previous) from None
            except OSError:  # no flock on this file system: a live pid holds the lock
                if previous not in (None, os.getpid()) and _pid_alive(previous):
                    os.close(fd)
                    raise self._refuse(previous) from None
            # A holder that released (and removed the file) between our open and flock leaves us a lock on a
            # file no one else sees: open the path again.
            try:
                same = os.stat(self.path).st_ino == os.fstat(fd).st_ino
            except FileNotFoundError:
                same = False
            if same:
                break
            os.close(fd)
        if previous not in (None, os.getpid()):
            log.info("run directory %s: took over the stale lock of process %d (no longer running)", self.run_dir,
                     previous)
        os.ftruncate(fd, 0)
        os.lseek(fd, 0, os.SEEK_SET)
        os.write(fd, f"{os.getpid()}\n".encode())
        os.fsync(fd)
        self.fd = fd
        return self

    def release(self) -> None:
        if self.fd is None:
            return
        try:
            self.path.unlink()
        except FileNotFoundError:
            pass
        os.close(self.fd)  # closing drops the flock
        self.fd = None

    def __enter__(self) -> RunLock:
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()
