"""Process states read from ``/proc``: the one place that parses ``/proc/PID/stat``.

The state letter follows the command name, which is in parentheses and may itself contain
``)``, so it is found after the *last* ``)``.
"""

from __future__ import annotations

import os

#: States of a process that has exited (zombie, not yet reaped; or dead).
_GONE = (b"Z", b"X")
#: States of a process stopped by a signal (``T``) or by a tracer (``t``).
_STOPPED = (b"T", b"t")


def task_state(pid: int, tid: int | None = None) -> bytes | None:
    """The one-letter state of process *pid* (or of its thread *tid*), or None when it is
    gone or cannot be read."""
    path = f"/proc/{pid}/stat" if tid is None else f"/proc/{pid}/task/{tid}/stat"
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError:
        return None
    end = data.rfind(b")")
    return data[end + 2 : end + 3] if end >= 0 else None


def pid_alive(pid: int) -> bool:
    """True while any thread of process *pid* is alive (not a zombie).

    A killed multi-threaded process shows its leader as a zombie while other threads are
    still exiting and still hold the FUSE connection open, so the leader alone is not enough.
    """
    try:
        tids = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return False
    for tid in tids:
        state = task_state(pid, int(tid)) if tid.isdigit() else None
        if state is not None and state not in _GONE:
            return True
    return False


def pid_stopped(pid: int) -> bool:
    """True if the process is stopped (SIGSTOP, ``State: T``) or traced (``t``)."""
    return task_state(pid) in _STOPPED
