"""Reader/writer lock files that interlock with containers/storage's ``pkg/lockfile``.

Go processes lock ``layers.lock`` and ``mountpoints.lock`` with POSIX ``fcntl`` record locks
over the whole file (``F_RDLCK`` shared, ``F_WRLCK`` exclusive). ``flock()`` locks do not
conflict with those, so they would not keep a Go process out; this module never uses them.

We take *open file description* locks (``F_OFD_SETLKW``, Linux ≥ 3.15) instead of classic
POSIX locks. The kernel checks OFD and POSIX locks against each other, so a Go process
waits for us and we wait for it. Unlike POSIX locks, an OFD lock belongs to the descriptor
that took it, not to the process: another thread or trio task closing a different
descriptor of the same file cannot silently drop it, and two descriptors in one process
exclude each other, so threads need no extra bookkeeping.

The file's first 64 bytes hold the "LastWrite" token: UnixNano (u64 LE), a per-process
counter (u64 LE), the PID (u32 LE) and 44 random bytes. Every writer stores a fresh token
while it holds the write lock; readers only compare tokens for equality to learn whether
another process changed the data the lock protects. The file is never truncated.
"""

from __future__ import annotations

import errno
import fcntl
import itertools
import os
import struct
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

from layerfs.errors import LayerfsError, StoreReadOnlyError

TOKEN_SIZE = 64

_FLOCK = struct.Struct("@hhqqi4x")  # struct flock on Linux x86_64/aarch64: 32 bytes
_counter = itertools.count(1)
_counter_lock = threading.Lock()


@dataclass(frozen=True)
class LastWrite:
    """An opaque change token; two tokens are equal iff no write happened in between."""

    raw: bytes

    @classmethod
    def fresh(cls) -> LastWrite:
        """A new, never-before-seen token for this process."""
        with _counter_lock:
            count = next(_counter)
        head = struct.pack("<QQI", time.time_ns(), count, os.getpid() & 0xFFFFFFFF)
        return cls(head + os.urandom(TOKEN_SIZE - len(head)))

    @property
    def empty(self) -> bool:
        """True for the token of a lock file nobody has written yet."""
        return not self.raw.strip(b"\0")

    def describe(self) -> str:
        """Human-readable fields of the token (for ``--debug`` logs)."""
        if len(self.raw) < 20:
            return "(empty)"
        nanos, count, pid = struct.unpack_from("<QQI", self.raw)
        return f"time={nanos} counter={count} pid={pid}"


class LockFile:
    """A whole-file reader/writer lock on one path, shared with Go processes.

    Use :meth:`write` or :meth:`read` as context managers. Each acquisition opens its own
    descriptor and holds an OFD lock on it until release; acquisitions are not re-entrant
    (a second acquisition by the same thread waits for the first, as it would in Go).
    """

    def __init__(self, path: str, *, read_only: bool = False) -> None:
        self.path = path
        self.read_only = read_only

    def _open(self) -> int:
        flags = os.O_CLOEXEC | (os.O_RDONLY if self.read_only else os.O_RDWR | os.O_CREAT)
        try:
            return os.open(self.path, flags, 0o644)
        except OSError as exc:
            raise LayerfsError(f"opening lock file {self.path}: {exc.strerror}") from exc

    def _lock_fd(self, fd: int, exclusive: bool, blocking: bool) -> bool:
        kind = fcntl.F_WRLCK if exclusive else fcntl.F_RDLCK
        request = _FLOCK.pack(kind, os.SEEK_SET, 0, 0, 0)
        command = fcntl.F_OFD_SETLKW if blocking else fcntl.F_OFD_SETLK
        try:
            fcntl.fcntl(fd, command, request)
        except OSError as exc:
            if not blocking and exc.errno in (errno.EAGAIN, errno.EACCES):
                return False
            raise LayerfsError(f"locking {self.path}: {exc.strerror}") from exc
        return True

    @contextmanager
    def write(self) -> Iterator[HeldLock]:
        """Hold the lock exclusively for the ``with`` block."""
        if self.read_only:
            raise StoreReadOnlyError(f"{self.path}: cannot take a write lock on a read-only store")
        with self._held(exclusive=True) as held:
            yield held

    @contextmanager
    def read(self) -> Iterator[HeldLock]:
        """Hold the lock shared for the ``with`` block."""
        with self._held(exclusive=False) as held:
            yield held

    def try_write(self) -> HeldLock | None:
        """Take the write lock without waiting; None when someone else holds the lock.

        The caller must call :meth:`HeldLock.release` on the result.
        """
        fd = self._open()
        if not self._lock_fd(fd, exclusive=True, blocking=False):
            os.close(fd)
            return None
        return HeldLock(self, fd, exclusive=True)

    @contextmanager
    def _held(self, exclusive: bool) -> Iterator[HeldLock]:
        fd = self._open()
        try:
            self._lock_fd(fd, exclusive=exclusive, blocking=True)
        except BaseException:
            os.close(fd)
            raise
        held = HeldLock(self, fd, exclusive)
        try:
            yield held
        finally:
            held.release()


class HeldLock:
    """A lock acquisition: the descriptor that carries the OFD lock, and the token calls."""

    def __init__(self, lockfile: LockFile, fd: int, exclusive: bool) -> None:
        self.lockfile = lockfile
        self.fd = fd
        self.exclusive = exclusive

    def last_write(self) -> LastWrite:
        """The token currently stored in the file (zero bytes when never written)."""
        data = os.pread(self.fd, TOKEN_SIZE, 0)
        return LastWrite(data.ljust(TOKEN_SIZE, b"\0"))

    def record_write(self) -> LastWrite:
        """Store a fresh token so other processes reload; the caller holds this write lock."""
        if not self.exclusive:
            raise LayerfsError(f"{self.lockfile.path}: recording a write needs the write lock")
        token = LastWrite.fresh()
        try:
            written = os.pwrite(self.fd, token.raw, 0)
        except OSError as exc:
            raise LayerfsError(f"writing lock file {self.lockfile.path}: {exc.strerror}") from exc
        if written != TOKEN_SIZE:
            raise LayerfsError(f"writing lock file {self.lockfile.path}: short write")
        return token

    def release(self) -> None:
        """Drop the lock by closing its descriptor (idempotent)."""
        if self.fd >= 0:
            fd, self.fd = self.fd, -1
            os.close(fd)
