"""Backing file descriptors kept per inode, bounded, for a view whose opens reach no handler.

With zero-message open (the patched pyfuse3's ``enable_no_open``) the kernel sends no OPEN or
RELEASE, so there is no per-open state to hang a descriptor on: a read names only the inode.
The descriptors therefore belong to the inode, are shared by every reader of it, and are
closed when the kernel forgets the inode or when the cache is full (least recently used first).
The same per-inode descriptor is what a FUSE passthrough open would hand to the kernel.
"""

from __future__ import annotations

import os
import resource
from collections import OrderedDict

DEFAULT_LIMIT = 1024
"""Most descriptors kept open at once (lowered to half the soft RLIMIT_NOFILE if that is less)."""


def default_limit() -> int:
    """:data:`DEFAULT_LIMIT`, or half the soft RLIMIT_NOFILE when that is smaller (at least 16)."""
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY:
        return DEFAULT_LIMIT
    return max(16, min(DEFAULT_LIMIT, soft // 2))


class BackingFd:
    """One inode's backing descriptor.

    ``users`` counts reads using ``fd`` right now (a worker thread may be in ``pread`` on it);
    ``evicted`` is set once it left the cache. Invariant: ``fd`` is open while it is in the
    cache or ``users > 0``; it is closed exactly once, by whoever drops the last of both.
    """

    __slots__ = ("evicted", "fd", "users")

    def __init__(self, fd: int) -> None:
        self.fd = fd
        self.users = 0
        self.evicted = False


class FdCache:
    """Per-inode :class:`BackingFd` entries, most recently used last, at most ``limit`` cached.

    Locking: every method runs on the trio thread (the pyfuse3 loop) and never awaits, so the
    methods are atomic with respect to each other. A worker thread may use ``entry.fd`` only
    between :meth:`acquire`/:meth:`add` and the matching :meth:`release`, which are called on
    the trio thread; an entry evicted meanwhile is closed by that :meth:`release`, never under
    a running ``pread`` (a closed and reused descriptor number would read another file).
    """

    def __init__(self, limit: int | None = None) -> None:
        self.limit = limit if limit is not None else default_limit()
        self._fds: OrderedDict[int, BackingFd] = OrderedDict()

    def __len__(self) -> int:
        return len(self._fds)

    def __contains__(self, ino: int) -> bool:
        return ino in self._fds

    def acquire(self, ino: int) -> BackingFd | None:
        """The cached entry of *ino* with one more user, or None."""
        entry = self._fds.get(ino)
        if entry is None:
            return None
        self._fds.move_to_end(ino)
        entry.users += 1
        return entry

    def add(self, ino: int, fd: int) -> BackingFd:
        """Cache *fd* (just opened, owned by the caller until now) for *ino* and return its
        entry with one user. If a concurrent read cached one first, *fd* is closed and that
        entry is returned instead. Evicts the least recently used entries beyond the limit."""
        entry = self._fds.get(ino)
        if entry is not None:
            os.close(fd)
        else:
            entry = BackingFd(fd)
            self._fds[ino] = entry
            while len(self._fds) > self.limit:
                _, old = self._fds.popitem(last=False)
                self._drop(old)
        self._fds.move_to_end(ino)
        entry.users += 1
        return entry

    def release(self, entry: BackingFd) -> None:
        """One user of *entry* is done; close it if it was evicted and this was the last."""
        entry.users -= 1
        if entry.evicted and entry.users == 0:
            os.close(entry.fd)

    def forget(self, ino: int) -> None:
        """The kernel forgot *ino*: close its descriptor (after its last running read)."""
        entry = self._fds.pop(ino, None)
        if entry is not None:
            self._drop(entry)

    def close_all(self) -> None:
        """Drop every entry (at unmount); ones still in use close on their last release."""
        while self._fds:
            _, entry = self._fds.popitem()
            self._drop(entry)

    @staticmethod
    def _drop(entry: BackingFd) -> None:
        entry.evicted = True
        if entry.users == 0:
            os.close(entry.fd)
