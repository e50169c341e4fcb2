"""The one error boundary of ``ctrl-bio``: any failure of a command leaves as one line on stderr and an exit status.

Exit status 2 for a usage error (a bad override, a missing or unreadable input file, a run directory in use), 1 for a
failure while running (a NaN loss, an error inside a library). ``CTRL_BIO_DEBUG=1`` shows the traceback instead.
"""

from __future__ import annotations

import sys

from ctrl_bio.rundir import RunDirError

#: Set to 1 to see the traceback of an error instead of its one line.
DEBUG_ENV = "CTRL_BIO_DEBUG"


class UsageError(Exception):
    """A problem with what the user asked for, reported as one line (exit status 2)."""


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


def report_error(exc: Exception) -> int:
    """Print ``exc`` as the one ``ctrl-bio: error: ...`` line on stderr and return its exit status."""
    status = exit_status(exc)
    text = one_line(exc)
    if status == 1 and not isinstance(exc, RuntimeError):  # RuntimeErrors of ours and torch's read alone
        text = f"{type(exc).__name__}: {text}"
    hint = f" (set {DEBUG_ENV}=1 for the traceback)" if status == 1 else ""
    print(f"ctrl-bio: error: {text}{hint}", file=sys.stderr)
    return status
