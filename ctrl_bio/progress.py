"""A rich progress bar for long loops that can be switched off (tests, nested loops)."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator


@contextlib.contextmanager
def progress_bar(total: int, description: str, enabled: bool = True) -> Iterator[Callable[..., None]]:
    """Yield ``advance(**fields)``, which moves the bar one step and shows the given numbers."""
    if not enabled:
        yield lambda **_: None
        return
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
                  TextColumn("{task.fields[info]}"), transient=True) as bar:
        task = bar.add_task(description, total=total, info="")

        def advance(**fields: float) -> None:
            info = " ".join(f"{k}={v:.4g}" for k, v in fields.items())
            bar.update(task, advance=1, info=info)

        yield advance
