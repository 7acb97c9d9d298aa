"""Progress bars for long imports and exports: only on a terminal, only after a second.

A bar on stderr would corrupt nothing on stdout, but it is noise in logs and pipes, so it
shows only when stderr is a TTY and the caller is not in ``--json`` mode.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager

from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TransferSpeedColumn

DELAY_SECONDS = 1.0


@contextmanager
def byte_progress(
    label: str, total: int | None, *, enabled: bool
) -> Iterator[Callable[[int, int], None] | None]:
    """Yield a ``callback(bytes_done, entries_done)`` or None when no bar should show."""
    if not enabled or not sys.stderr.isatty():
        yield None
        return
    started = time.monotonic()
    bar: Progress | None = None
    task = None

    def update(done: int, entries: int) -> None:
        nonlocal bar, task
        if bar is None:
            if time.monotonic() - started < DELAY_SECONDS:
                return
            bar = Progress(
                TextColumn("{task.description}"),
                BarColumn(),
                DownloadColumn(),
                TransferSpeedColumn(),
                TextColumn("{task.fields[entries]} entries"),
                transient=True,
            )
            bar.start()
            task = bar.add_task(label, total=total, entries=0)
        assert task is not None
        bar.update(task, completed=done, entries=entries)

    try:
        yield update
    finally:
        if bar is not None:
            bar.stop()
