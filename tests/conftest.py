"""Shared fixtures: temporary stores, the real containers-storage binary, the layerfs CLI.

In CI (``CI=true``) a test whose tool or privilege is missing fails instead of skipping,
so a green run always means the interop and FUSE checks really ran.
"""

from __future__ import annotations

import contextlib
import io
import os
import select
import shutil
import signal
import subprocess
import sys
import tarfile
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

import pytest

from layerfs.store.layers import Store

IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")
GO_TOOL = "containers-storage"

T = TypeVar("T")


def require(condition: bool, reason: str) -> None:
    """Go on when ``condition`` holds; otherwise skip the test, or fail it under CI=true (a CI
    run that cannot do what the test needs must not pass silently)."""
    if condition:
        return
    if IN_CI:
        pytest.fail(f"required for this test under CI=true: {reason}")
    pytest.skip(reason)


def require_tool(name: str) -> str:
    """Path of a tool the test needs; fail in CI, skip elsewhere, when it is missing."""
    path = shutil.which(name)
    require(path is not None, f"{name} is not installed (scripts/test installs it)")
    assert path is not None
    return path


def require_root() -> None:
    """Fail in CI, skip elsewhere, unless running as root."""
    require(os.geteuid() == 0, "this test needs root")


def make_tar(
    entries: dict[str, bytes | None], whiteouts: Sequence[str] = (), *, mode: int = 0o644
) -> bytes:
    """A PAX tar: empty ``.wh.`` files first, then files (bytes, ``mode``) and directories
    (None, 0755)."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tf:
        for name in whiteouts:
            tf.addfile(tarfile.TarInfo(name))
        for name, data in entries.items():
            info = tarfile.TarInfo(name)
            info.mtime = 1_700_000_000
            if data is None:
                info.type = tarfile.DIRTYPE
                info.mode = 0o755
                tf.addfile(info)
            else:
                info.size = len(data)
                info.mode = mode
                tf.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def run_and_kill(
    argv: Sequence[str], delay: float, timeout: float = 60
) -> tuple[subprocess.Popen[str], str, bool]:
    """Start ``argv``, wait for its first line of output, then SIGKILL it ``delay`` seconds
    later if still running; returns the process, its whole stdout and whether the kill landed.

    The first line is the handshake: the worker has started and is inside its mutations, so
    the kill never lands in interpreter start-up. The delay after it is fault injection, not
    synchronisation: it only picks a random moment, and callers must accept every outcome
    (killed anywhere, or finished) by checking what the worker acknowledged.
    """
    worker = subprocess.Popen(list(argv), stdout=subprocess.PIPE, text=True)
    assert worker.stdout is not None
    try:
        ready = select.select([worker.stdout], [], [], timeout)[0]
        assert ready, f"{argv[0]} printed nothing in {timeout:g} s"
        first = worker.stdout.readline()
        time.sleep(delay)  # fault injection: a random point among the worker's mutations
        killed = worker.poll() is None
        if killed:
            worker.send_signal(signal.SIGKILL)
        rest = worker.stdout.read()
        worker.wait(timeout)
    finally:
        if worker.poll() is None:
            worker.kill()
            worker.wait()
        worker.stdout.close()
    return worker, first + rest, killed


# ------------------------------------------------------------------------------ waiting
#
# Every wait polls the real condition (a lock in /proc/locks, a process's state in /proc, a
# mount in the mount table) under a deadline and fails naming what never happened. A short
# poll interval inside that deadline is fine; a fixed sleep that hopes the state was reached
# is not.


def wait_until(
    predicate: Callable[[], T], what: str, timeout: float = 30.0, interval: float = 0.005
) -> T:
    """Poll ``predicate`` until it returns something true and return that; fail the test
    with "timed out after N s waiting until WHAT" when ``timeout`` seconds pass first."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() >= deadline:
            raise AssertionError(f"timed out after {timeout:g} s waiting until {what}")
        time.sleep(interval)


def process_gone(pid: int) -> bool:
    """True once every thread of process ``pid`` has exited.

    The process may stay a zombie (its parent reaps it later): by then its files are closed,
    so a FUSE daemon's connection is aborted. A thread-group leader shows "Z" while its other
    threads are still exiting and still hold the files, so those must be gone as well.
    """
    try:
        tids = os.listdir(f"/proc/{pid}/task")
        with open(f"/proc/{pid}/stat", "rb") as f:
            data = f.read()
    except (FileNotFoundError, ProcessLookupError):
        return True
    if any(tid != str(pid) for tid in tids):
        return False
    state = data[data.rindex(b")") + 2 : data.rindex(b")") + 3]
    return state in (b"Z", b"X")


@dataclass(frozen=True)
class FileLock:
    """One line of ``/proc/locks`` for a given file.

    ``kind`` is POSIX (classic ``fcntl`` record lock, as Go's ``pkg/lockfile`` takes),
    OFDLCK (open file description lock, as layerfs takes) or FLOCK; ``mode`` is READ or
    WRITE; ``pid`` is the holder's (or waiter's) process, -1 for OFD locks; ``waiting`` is
    True for a request that is blocked behind a conflicting lock.
    """

    kind: str
    mode: str
    pid: int
    waiting: bool


def file_locks(path: str) -> list[FileLock]:
    """Locks held on, and requests blocked on, the file at ``path`` (matched by device and
    inode, as ``/proc/locks`` names files)."""
    st = os.stat(path)
    key = f"{os.major(st.st_dev):02x}:{os.minor(st.st_dev):02x}:{st.st_ino}"
    out = []
    with open("/proc/locks") as f:
        for line in f:
            words = line.split()
            waiting = len(words) > 1 and words[1] == "->"
            if waiting:
                del words[1]
            if len(words) < 6 or words[5] != key:
                continue
            out.append(FileLock(words[1], words[3], int(words[4]), waiting))
    return out


def holds_lock(path: str, pid: int, mode: str | None = None) -> bool:
    """Whether process ``pid`` holds a POSIX lock on ``path`` (of ``mode``, if given)."""
    return any(
        lock.pid == pid and not lock.waiting and mode in (None, lock.mode)
        for lock in file_locks(path)
    )


def waits_for_lock(path: str, pid: int | None = None, kind: str | None = None) -> bool:
    """Whether a request for a lock on ``path`` is blocked (by process ``pid`` and/or of
    ``kind``, when given; OFD waiters show pid -1, so match those by kind)."""
    return any(
        lock.waiting and pid in (None, lock.pid) and kind in (None, lock.kind)
        for lock in file_locks(path)
    )


@dataclass
class StorePaths:
    """A graph root and run root in a temporary directory."""

    root: str
    runroot: str

    def store(self, *, read_only: bool = False) -> Store:
        """A :class:`Store` on these paths."""
        return Store(self.root, self.runroot, read_only=read_only)

    @property
    def layers_json(self) -> str:
        return os.path.join(self.root, "overlay-layers", "layers.json")

    @property
    def layers_lock(self) -> str:
        return os.path.join(self.root, "overlay-layers", "layers.lock")


@pytest.fixture
def paths(tmp_path: Path) -> Iterator[StorePaths]:
    """Fresh store paths; any mount left below them is detached at teardown."""
    sp = StorePaths(str(tmp_path / "root"), str(tmp_path / "runroot"))
    yield sp
    _detach_mounts_below(str(tmp_path))


@pytest.fixture
def store(paths: StorePaths) -> Store:
    """A new, empty store."""
    return paths.store()


class GoTool:
    """Runs ``containers-storage -g ROOT -R RUNROOT -s overlay ...`` on a store."""

    def __init__(self, paths: StorePaths) -> None:
        self.binary = require_tool(GO_TOOL)
        self.paths = paths

    def argv(self, *args: str) -> list[str]:
        return [
            self.binary,
            "-g",
            self.paths.root,
            "-R",
            self.paths.runroot,
            "-s",
            "overlay",
            *args,
        ]

    def run(
        self, *args: str, input: bytes | None = None, check: bool = True, timeout: float = 60
    ) -> subprocess.CompletedProcess[bytes]:
        proc = subprocess.run(
            self.argv(*args), input=input, capture_output=True, timeout=timeout, check=False
        )
        if check and proc.returncode != 0:
            raise AssertionError(
                f"containers-storage {' '.join(args)} failed rc={proc.returncode}: "
                f"{proc.stderr.decode(errors='replace')}"
            )
        return proc

    def out(self, *args: str, input: bytes | None = None) -> str:
        return self.run(*args, input=input).stdout.decode()

    def shutdown(self) -> None:
        """Release the store (Go bind-mounts G/overlay onto itself while in use)."""
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.run("shutdown", check=False, timeout=30)


@pytest.fixture
def go(paths: StorePaths) -> Iterator[GoTool]:
    """The real Go tool on the same store as ``paths``; shut down at teardown."""
    require_root()
    tool = GoTool(paths)
    yield tool
    tool.shutdown()


class LayerfsCLI:
    """Runs the layerfs CLI as a subprocess on a store."""

    def __init__(self, paths: StorePaths) -> None:
        self.paths = paths

    def argv(self, *args: str) -> list[str]:
        return [
            sys.executable,
            "-m",
            "layerfs",
            "--root",
            self.paths.root,
            "--runroot",
            self.paths.runroot,
            *args,
        ]

    def run(
        self, *args: str, input: bytes | None = None, check: bool = True, timeout: float = 120
    ) -> subprocess.CompletedProcess[bytes]:
        proc = subprocess.run(
            self.argv(*args), input=input, capture_output=True, timeout=timeout, check=False
        )
        if check and proc.returncode != 0:
            raise AssertionError(
                f"layerfs {' '.join(args)} failed rc={proc.returncode}: "
                f"{proc.stderr.decode(errors='replace')}"
            )
        return proc

    def out(self, *args: str, input: bytes | None = None) -> str:
        return self.run(*args, input=input).stdout.decode()


def import_two_layer_chain(cli: LayerfsCLI) -> dict[str, str]:
    """Import ``base`` (a, d/x) <- ``top`` (b, .wh.a, d/y) through the CLI: name -> id."""
    require_root()
    ids = {}
    ids["base"] = cli.out(
        "import-layer", "--name", "base", input=make_tar({"a": b"A", "d": None, "d/x": b"X"})
    ).split()[0]
    ids["top"] = cli.out(
        "import-layer",
        "--name",
        "top",
        "--parent",
        "base",
        input=make_tar({"b": b"B", ".wh.a": b"", "d/y": b"Y"}),
    ).split()[0]
    return ids


@pytest.fixture
def cli(paths: StorePaths) -> LayerfsCLI:
    """The layerfs CLI on the same store as ``paths``."""
    return LayerfsCLI(paths)


def _detach_mounts_below(top: str) -> None:
    with open("/proc/self/mounts") as f:
        points = [line.split()[1].replace("\\040", " ") for line in f]
    for point in sorted((p for p in points if p.startswith(top + "/")), reverse=True):
        subprocess.run(["umount", "-l", point], capture_output=True, check=False)
