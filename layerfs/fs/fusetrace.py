"""Count the FUSE requests the kernel sends to one mount (tests and benchmarks; root only).

Uses the ``fuse:fuse_request_send`` tracepoint in a private tracefs instance (its own buffer,
event switch and filter), so other tracing and other FUSE mounts on the machine are neither
disturbed nor counted: the filter keeps the one connection, whose id is the mount's
``st_dev``. What the kernel sends is counted, including requests the daemon never sees as a
handler call (pyfuse3 answering OPEN itself with zero-message open).
"""

from __future__ import annotations

import contextlib
import itertools
import os
import re
import subprocess
from collections import Counter
from collections.abc import Iterator

TRACEFS = "/sys/kernel/tracing"
EVENT = "events/fuse/fuse_request_send"
BUFFER_KB = 16384
"""Per-CPU buffer of the instance; ~40 bytes per event, so ~400k requests per CPU."""

_serial = itertools.count()
_LINE = re.compile(rb"fuse_request_send: connection \d+ req \d+ opcode \d+ \((\w+)\)")
_ENTRIES = re.compile(rb"entries-in-buffer/entries-written: (\d+)/(\d+)")


class TraceUnavailable(Exception):
    """The tracepoint cannot be used here (no tracefs, no FUSE tracepoint, not root)."""


def _tracefs() -> str:
    if not os.path.isdir(os.path.join(TRACEFS, "events")):
        r = subprocess.run(
            ["mount", "-t", "tracefs", "nodev", TRACEFS], capture_output=True, text=True
        )
        if r.returncode != 0 and not os.path.isdir(os.path.join(TRACEFS, "events")):
            raise TraceUnavailable(f"cannot mount tracefs at {TRACEFS}: {r.stderr.strip()}")
    if not os.path.isdir(os.path.join(TRACEFS, EVENT)):
        raise TraceUnavailable("this kernel has no fuse:fuse_request_send tracepoint")
    return TRACEFS


def connection_id(mountpoint: str) -> int:
    """The tracepoint's ``connection`` of the FUSE mount at *mountpoint* (its kernel dev_t)."""
    dev = os.stat(mountpoint).st_dev
    return (os.major(dev) << 20) | os.minor(dev)


def _write(path: str, text: str) -> None:
    with open(path, "w") as f:
        f.write(text)


class RequestCounter:
    """Counts requests to one FUSE connection between :meth:`start` and :meth:`stop`.

    Not thread-safe; one instance per measurement. The tracefs instance exists from
    :meth:`open` to :meth:`close` (use it as a context manager).
    """

    def __init__(self, mountpoint: str) -> None:
        self.connection = connection_id(mountpoint)
        self.dir = ""

    def __enter__(self) -> RequestCounter:
        self.open()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def open(self) -> None:
        root = _tracefs()
        self.dir = os.path.join(root, "instances", f"layerfs-{os.getpid()}-{next(_serial)}")
        os.mkdir(self.dir)
        try:
            _write(os.path.join(self.dir, "buffer_size_kb"), str(BUFFER_KB))
            _write(os.path.join(self.dir, EVENT, "filter"), f"connection == {self.connection}")
        except BaseException:
            self.close()
            raise

    def start(self) -> None:
        """Empty the buffer and start counting."""
        _write(os.path.join(self.dir, "trace"), "")
        _write(os.path.join(self.dir, EVENT, "enable"), "1")

    def stop(self) -> Counter[str]:
        """Stop counting; the requests since :meth:`start` by opcode (``FUSE_`` dropped).
        Raises RuntimeError if the buffer overflowed (the counts would be short)."""
        _write(os.path.join(self.dir, EVENT, "enable"), "0")
        with open(os.path.join(self.dir, "trace"), "rb") as f:
            text = f.read()
        m = _ENTRIES.search(text)
        if m and m.group(1) != m.group(2):
            kept, written = int(m.group(1)), int(m.group(2))
            raise RuntimeError(f"trace buffer overflowed ({kept} of {written} events kept)")
        counts: Counter[str] = Counter()
        for name in _LINE.findall(text):
            counts[name.decode().removeprefix("FUSE_")] += 1
        return counts

    def close(self) -> None:
        if self.dir:
            with contextlib.suppress(OSError):
                _write(os.path.join(self.dir, EVENT, "enable"), "0")
            with contextlib.suppress(OSError):
                os.rmdir(self.dir)
            self.dir = ""


@contextlib.contextmanager
def counting(mountpoint: str) -> Iterator[Counter[str]]:
    """``with counting(mnt) as counts: ...``: *counts* is filled when the block ends."""
    counts: Counter[str] = Counter()
    with RequestCounter(mountpoint) as rc:
        rc.start()
        try:
            yield counts
        finally:
            counts.update(rc.stop())
