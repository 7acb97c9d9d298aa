"""Opening a view's backing files, confined to their layer.

A backing file is opened below its layer's ``diff/`` directory (itself opened without
following a symlink) with ``openat2(RESOLVE_BENEATH | RESOLVE_NO_SYMLINKS |
RESOLVE_NO_MAGICLINKS)``: a directory of the layer replaced by a symlink after the index was
made (a store written by someone else) fails with ELOOP instead of serving a file from outside
the layer under the mode bits the index recorded; kernel overlayfs never follows a symlink in
a lower layer's path either. Kernels without openat2 (< 5.6) fall back to
``openat(O_NOFOLLOW)`` below the diff dir.
"""

from __future__ import annotations

import ctypes
import errno
import os
import sys
from collections.abc import Sequence
from typing import Any

OPEN_FLAGS = os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC

_SYS_OPENAT2 = 437  # the same number on every Linux architecture (added in 5.6)
RESOLVE_NO_MAGICLINKS = 0x02
RESOLVE_NO_SYMLINKS = 0x04
RESOLVE_BENEATH = 0x08
RESOLVE_CACHED = 0x20  # Linux 5.12: fail with EAGAIN unless the lookup needs no I/O
CONFINED = RESOLVE_BENEATH | RESOLVE_NO_SYMLINKS | RESOLVE_NO_MAGICLINKS


class _OpenHow(ctypes.Structure):
    _fields_ = (("flags", ctypes.c_uint64), ("mode", ctypes.c_uint64), ("resolve", ctypes.c_uint64))


class BackingOpener:
    """Opens files below the diff dirs of one chain (top first), never following a symlink
    below a diff dir. Each open first opens the layer's diff dir by its path (a layer that was
    deleted or renamed meanwhile gives ENOENT, as its files are gone), then the file beneath
    it. Thread-safe."""

    def __init__(self, diff_dirs: Sequence[bytes | str]) -> None:
        self.diff_dirs = [os.fsencode(d) for d in diff_dirs]
        self.openat2 = sys.platform == "linux"
        self.cached = self.openat2
        self._syscall: Any = None
        if self.openat2:
            try:
                self._syscall = ctypes.CDLL(None, use_errno=True).syscall
            except (OSError, AttributeError):
                self.openat2 = self.cached = False

    def _openat2(self, dirfd: int, path: bytes, flags: int, resolve: int) -> int:
        """An fd, or -errno."""
        how = _OpenHow(flags, 0, resolve)
        fd = self._syscall(_SYS_OPENAT2, dirfd, path, ctypes.byref(how), ctypes.sizeof(how))
        return int(fd) if fd >= 0 else -ctypes.get_errno()

    def open(self, layer: int, rel: bytes, *, cached_only: bool = False) -> int | None:
        """A read-only fd for *rel* (relative, non-empty) below layer *layer*'s diff dir;
        O_NOATIME where allowed. With *cached_only*, None when the open would block (or the
        kernel cannot tell). Raises OSError (ELOOP: a symlink on the way)."""
        if cached_only and not self.cached:
            return None
        base = self.diff_dirs[layer]
        if self.openat2:
            cached = RESOLVE_CACHED if cached_only else 0
            dirfd = self._openat2(_AT_FDCWD, base, _DIR_FLAGS, cached)
            if dirfd >= 0:
                try:
                    for extra in (os.O_NOATIME, 0):
                        fd = self._openat2(dirfd, rel, OPEN_FLAGS | extra, CONFINED | cached)
                        if fd >= 0 or not (-fd == errno.EPERM and extra):
                            break  # (EPERM: O_NOATIME needs ownership or CAP_FOWNER)
                finally:
                    os.close(dirfd)
                if fd >= 0:
                    return fd
                code, what = -fd, base + b"/" + rel
            else:
                code, what = -dirfd, base
            if cached_only and code == errno.EAGAIN:
                return None
            if code not in (errno.ENOSYS, errno.E2BIG, errno.EINVAL):
                raise OSError(code, os.strerror(code), os.fsdecode(what))
            if cached_only:
                self.cached = False  # no RESOLVE_CACHED (before 5.12) or no openat2
                return None
            self.openat2 = self.cached = False
        if cached_only:
            return None
        # no openat2 (before 5.6): at least neither the diff dir nor the file is followed
        dirfd = os.open(base, _DIR_FLAGS)
        try:
            try:
                return os.open(rel, OPEN_FLAGS | os.O_NOATIME, dir_fd=dirfd)
            except PermissionError:
                return os.open(rel, OPEN_FLAGS, dir_fd=dirfd)
        finally:
            os.close(dirfd)


_AT_FDCWD = -100
_DIR_FLAGS = os.O_PATH | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
