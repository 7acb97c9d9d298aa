"""Atomic file replacement and strict reads for the store's JSON and data files.

A write goes to a temporary file ``.tmp-<base><digits>`` in the target's directory, is
synced, made 0600 and renamed over the target, so a reader (or a crash) sees either the old
or the new file, never a mix. With ``durable=True`` the directory is synced too, so the
rename itself survives a power cut (containers/storage skips this; we do it for the stable
file). On any failure — a full disk included — the temporary file is removed, the target is
untouched and the error names the target file.
"""

from __future__ import annotations

import contextlib
import errno
import os
import secrets

from layerfs.errors import LayerfsError, StoreSyncError


class StoreWriteError(LayerfsError):
    """Writing a store file failed; the previous version of the file is intact."""

    def __init__(self, path: str, exc: OSError) -> None:
        self.errno = exc.errno
        name = errno.errorcode.get(exc.errno or 0, "error")
        super().__init__(f"saving {path}: {exc.strerror} ({name}); the previous file is intact")


def atomic_write(path: str, data: bytes, *, durable: bool = True, mode: int = 0o600) -> None:
    """Replace ``path`` with ``data`` atomically.

    ``durable`` syncs the data before the rename and the directory after it; without it
    nothing is synced (volatile files). The caller holds the lock that protects ``path``.
    """
    directory, base = os.path.split(path)
    tmp = os.path.join(directory, f".tmp-{base}{secrets.randbelow(10**9)}")
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, mode)
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view) :]
            if durable:
                os.fdatasync(fd)
            os.fchmod(fd, mode)
        finally:
            os.close(fd)
        os.rename(tmp, path)
    except OSError as exc:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise StoreWriteError(path, exc) from exc
    if durable:
        fsync_dir(directory)


#: fsync errors that mean "this file system cannot sync a directory", not "the data may
#: be lost": only these are ignored (tmpfs-like and some FUSE file systems answer so).
_CANNOT_SYNC_DIRS = frozenset({errno.EINVAL, errno.EOPNOTSUPP, errno.ENOTSUP, errno.ENOSYS})


def fsync_dir(directory: str) -> None:
    """Sync a directory so renames and creations in it are durable.

    A file system that cannot sync directories (EINVAL, ENOTSUP, ENOSYS) is accepted, as
    is a directory this user may not open for reading (EACCES/EPERM); any other error —
    EIO above all — raises :class:`StoreSyncError`: the change may not survive a crash.
    """
    path = directory or "."
    try:
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    except OSError as exc:
        if exc.errno in (errno.EACCES, errno.EPERM):
            return
        raise StoreSyncError(path, exc) from exc
    try:
        os.fsync(fd)
    except OSError as exc:
        if exc.errno not in _CANNOT_SYNC_DIRS:
            raise StoreSyncError(path, exc) from exc
    finally:
        os.close(fd)


def read_optional(path: str) -> bytes:
    """The file's bytes, or ``b""`` when it does not exist; other errors name the file."""
    try:
        with open(path, "rb") as f:
            return f.read()
    except FileNotFoundError:
        return b""
    except OSError as exc:
        raise LayerfsError(f"reading {path}: {exc.strerror}") from exc


def mtime_ns(path: str) -> int:
    """The file's mtime in nanoseconds, or 0 when it does not exist."""
    try:
        return os.stat(path).st_mtime_ns
    except FileNotFoundError:
        return 0


class SpaceReserve:
    """A preallocated file that a delete can give up when the disk is full.

    Deleting must work on a full disk (it is how users get space back), but a delete first
    saves the record flagged ``incomplete``, and that atomic save needs room for a temp
    file. The reserve — at least 256 KiB, or twice the size of ``layers.json`` plus 64 KiB,
    allocated with ``fallocate`` so it really holds blocks — is made once per store, given up
    for that save, and refilled (best effort) after the delete. Go ignores the file; ``gc``
    keeps it.
    """

    NAME = ".layerfs-reserve"
    SLACK = 64 * 1024
    MINIMUM = 256 * 1024

    def __init__(self, path: str) -> None:
        self.path = path

    def refill(self, layers_json: str, *, only_if_missing: bool = False) -> None:
        """Grow the reserve to its target size if it is smaller; failures are ignored.

        With ``only_if_missing`` an existing reserve is left as it is, so opening a store
        changes nothing in it once the reserve exists.
        """
        if only_if_missing and os.path.exists(self.path):
            return
        try:
            want = max(self.MINIMUM, 2 * os.stat(layers_json).st_size + self.SLACK)
        except OSError:
            want = self.MINIMUM
        try:
            fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_CLOEXEC, 0o600)
        except OSError:
            return
        try:
            if os.fstat(fd).st_size < want:
                os.posix_fallocate(fd, 0, want)
        except OSError:
            pass  # a full disk: try again after the next save
        finally:
            os.close(fd)

    def release(self) -> bool:
        """Free the reserve; True if there was one to free."""
        try:
            size = os.stat(self.path).st_size
            os.unlink(self.path)
        except FileNotFoundError:
            return False
        return size > 0
