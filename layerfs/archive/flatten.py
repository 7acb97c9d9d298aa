"""The flattened view of a chain: one tar of it (``layerfs export``), or one file or subtree
of it written into a directory (``layerfs extract``).

Both read the merged :class:`~layerfs.fs.index.UnionIndex` (nothing is mounted): whiteouts
and opaque directories are already applied there, so no ``.wh.`` entry or marker is ever
written. File contents are read from the supplying layer with
:class:`~layerfs.fs.backing.BackingOpener` (never following a symlink below a diff dir) and
streamed; nothing holds more than one chunk in memory.

The tar (PAX, names ``./…``, the root as ``./``) carries, per entry: type, permission bits,
numeric uid/gid (no user or group names: the host's names mean nothing for an image), the
mtime with nanoseconds (a PAX ``mtime`` record when not whole seconds), the xattrs a layer
tar carries (:func:`layerfs.archive.export.exported_xattr`: ``security.capability``,
``user.*``, ``trusted.*``; never overlay markers), symlink targets and device numbers.
Files that are hard links of each other in the view (the same view inode) are one regular
entry and hard link entries to it. Sockets cannot be put in a tar and are left out (GNU tar
does the same).

The caller keeps the layers from changing while this reads them (``layers.lock`` shared,
:meth:`layerfs.store.layers.Store.reading_layer`).
"""

from __future__ import annotations

import errno
import os
import stat
import tarfile
from collections.abc import Iterator
from dataclasses import dataclass
from typing import BinaryIO

from layerfs.archive.export import copy_fd, emit, exported_xattr, pax_xattrs, tar_header
from layerfs.errors import LayerfsError
from layerfs.fs.backing import BackingOpener
from layerfs.fs.index import UnionIndex
from layerfs.fs.viewpath import resolve

_NS = 1_000_000_000
CHUNK = 1 << 20


@dataclass
class FlattenStats:
    """What a flatten wrote: entries, regular-file bytes, and sockets left out."""

    entries: int = 0
    bytes: int = 0
    sockets_skipped: int = 0


def pax_time(ns: int) -> str:
    """A PAX time value for *ns* nanoseconds since the epoch (``-1.000000001`` for
    -1000000001 ns), exact: no float on the way."""
    sign = "-" if ns < 0 else ""
    secs, frac = divmod(abs(ns), _NS)
    return f"{sign}{secs}.{frac:09d}" if frac else f"{sign}{secs}"


def _walk(index: UnionIndex, row: int, rel: bytes) -> Iterator[tuple[int, bytes]]:
    """(row, path relative to the view root) of *row* and everything below it, depth first,
    siblings in name order; an explicit stack (no recursion limit on deep trees)."""
    stack = [(row, rel)]
    names = index.names
    while stack:
        r, p = stack.pop()
        yield r, p
        if stat.S_ISDIR(index.mode[r]):
            lo = index.first[r]
            for child in range(lo + index.count[r] - 1, lo - 1, -1):
                stack.append((child, p + b"/" + names[child] if p else names[child]))


def _xattr_pairs(index: UnionIndex, ino: int) -> list[tuple[str, bytes]]:
    return [(os.fsdecode(k), v) for k, v in index.xattrs(ino)]


def write_view_tar(out: BinaryIO, index: UnionIndex) -> FlattenStats:
    """Write the whole view of *index* to *out* as one uncompressed tar (module docstring).
    OSError when a backing file cannot be read; ArchiveError when one shrank."""
    opener = BackingOpener(index.diff_dirs)
    stats = FlattenStats()
    first_name: dict[int, str] = {}  # view inode -> the name its content was written under
    for row, rel in _walk(index, 0, b""):
        a = index.attr_of_row(row)
        mode = a.mode
        if stat.S_ISSOCK(mode):
            stats.sockets_skipped += 1
            continue
        name = b"./" + rel + (b"/" if stat.S_ISDIR(mode) and rel else b"")
        typ = _TYPES.get(stat.S_IFMT(mode))
        if typ is None:
            continue
        ti = tar_header(name, typ, mode, a.uid, a.gid, a.mtime_ns // _NS, names=False)
        pax = pax_xattrs(_xattr_pairs(index, a.ino))
        if a.mtime_ns % _NS:  # (whole seconds fit the ustar field; tarfile adds PAX if not)
            pax["mtime"] = pax_time(a.mtime_ns)
        ti.pax_headers = pax
        if stat.S_ISREG(mode) and a.nlink > 1:
            if a.ino in first_name:
                ti.type = tarfile.LNKTYPE
                ti.linkname = first_name[a.ino]
                emit(out, ti)
                stats.entries += 1
                continue
            first_name[a.ino] = ti.name
        if stat.S_ISLNK(mode):
            ti.linkname = index.readlink(a.ino).decode("utf-8", "surrogateescape")
        elif stat.S_ISCHR(mode) or stat.S_ISBLK(mode):
            ti.devmajor, ti.devminor = os.major(a.rdev), os.minor(a.rdev)
        elif stat.S_ISREG(mode):
            ti.size = a.size
        emit(out, ti)
        stats.entries += 1
        if stat.S_ISREG(mode):
            layer, backing = index.backing_in_layer(a.ino)
            fd = opener.open(layer, backing)
            assert fd is not None
            copy_fd(out, fd, a.size, rel)
            stats.bytes += a.size
    out.write(bytes(1024))
    return stats


_TYPES = {
    stat.S_IFDIR: tarfile.DIRTYPE,
    stat.S_IFREG: tarfile.REGTYPE,
    stat.S_IFLNK: tarfile.SYMTYPE,
    stat.S_IFCHR: tarfile.CHRTYPE,
    stat.S_IFBLK: tarfile.BLKTYPE,
    stat.S_IFIFO: tarfile.FIFOTYPE,
}


# --------------------------------------------------------------------------- extract


class ExtractError(LayerfsError):
    """``extract`` cannot write an entry into DEST (one line: which entry, why)."""


_DIR_OPEN = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC


class _Writer:
    """Creates view entries below an open directory fd, never following a symlink that is
    already there (it is replaced, as tar replaces it) and never leaving DEST: every name is
    one component, created relative to a directory this writer opened with ``O_NOFOLLOW``."""

    def __init__(self, index: UnionIndex, shown_dest: str) -> None:
        self.index = index
        self.opener = BackingOpener(index.diff_dirs)
        self.root = os.geteuid() == 0
        self.shown = shown_dest
        self.links: dict[int, tuple[int, bytes]] = {}  # view ino -> (dup'd dir fd, name)
        self.stats = FlattenStats()

    def where(self, rel: bytes) -> str:
        return os.path.join(self.shown, os.fsdecode(rel))

    def _clear(self, dirfd: int, name: bytes, want_dir: bool, rel: bytes) -> bool:
        """Make room for *name*; True when an existing directory is to be reused."""
        try:
            st = os.stat(name, dir_fd=dirfd, follow_symlinks=False)
        except FileNotFoundError:
            return False
        if stat.S_ISDIR(st.st_mode):
            if want_dir:
                return True
            raise ExtractError(f"{self.where(rel)}: exists and is a directory")
        os.unlink(name, dir_fd=dirfd)  # a file or a symlink: replaced, never followed
        return False

    def _owner_and_times(
        self, target: int | bytes, dirfd: int | None, row: int, rel: bytes
    ) -> None:
        """Owner (as root), permission bits and times of *row* on an open fd (*dirfd*
        None; xattrs too), or owner and times of the entry *target* just created in *dirfd*
        (never through a symlink; no xattrs: ``user.*`` cannot be set on links and
        devices)."""
        a = self.index.attr_of_row(row)
        times = (a.atime_ns, a.mtime_ns)
        if dirfd is None:
            assert isinstance(target, int)
            if self.root:
                os.fchown(target, a.uid, a.gid)
            os.fchmod(target, stat.S_IMODE(a.mode))
            self._xattrs(target, row, rel)  # after chown, which drops security.capability
            os.utime(target, ns=times)
            return
        if self.root:
            os.chown(target, a.uid, a.gid, dir_fd=dirfd, follow_symlinks=False)
        # (no chmod by name: it would follow a symlink swapped in meanwhile; FIFOs and
        # devices are made with their mode)
        os.utime(target, ns=times, dir_fd=dirfd, follow_symlinks=False)

    def _xattrs(self, fd: int, row: int, rel: bytes) -> None:
        ino = self.index.ino[row]
        for key, value in _xattr_pairs(self.index, ino):
            if not exported_xattr(key):
                continue
            try:
                os.setxattr(fd, key, value)
            except OSError as e:
                if not self.root and e.errno in (errno.EPERM, errno.ENOTSUP, errno.EACCES):
                    continue  # trusted.* and security.capability need root
                raise ExtractError(f"{self.where(rel)}: xattr {key}: {e.strerror}") from None

    def entry(self, dirfd: int, row: int, rel: bytes) -> int | None:
        """Create the entry of *row* named by the last component of *rel* in *dirfd*;
        returns an fd for a directory (the caller finishes and closes it), else None."""
        index = self.index
        a = index.attr_of_row(row)
        mode = a.mode
        name = rel.rpartition(b"/")[2]
        want_dir = stat.S_ISDIR(mode)
        if stat.S_ISSOCK(mode):
            self.stats.sockets_skipped += 1
            return None
        reuse = self._clear(dirfd, name, want_dir, rel)
        self.stats.entries += 1
        if want_dir:
            if not reuse:
                os.mkdir(name, 0o700, dir_fd=dirfd)
            return os.open(name, _DIR_OPEN, dir_fd=dirfd)
        if stat.S_ISREG(mode) and a.nlink > 1 and a.ino in self.links:
            src_fd, src_name = self.links[a.ino]
            os.link(src_name, name, src_dir_fd=src_fd, dst_dir_fd=dirfd, follow_symlinks=False)
            return None
        if stat.S_ISLNK(mode):
            os.symlink(index.readlink(a.ino), name, dir_fd=dirfd)
            self._owner_and_times(name, dirfd, row, rel)
            return None
        if stat.S_ISREG(mode):
            self._file(dirfd, name, row, rel)
            if a.nlink > 1:
                self.links[a.ino] = (os.dup(dirfd), name)
            return None
        umask = os.umask(0)  # the exact mode at creation
        try:
            if stat.S_ISFIFO(mode):
                os.mkfifo(name, stat.S_IMODE(mode), dir_fd=dirfd)
            else:
                os.mknod(name, stat.S_IFMT(mode) | stat.S_IMODE(mode), a.rdev, dir_fd=dirfd)
        except PermissionError:
            raise ExtractError(f"{self.where(rel)}: creating a device needs root") from None
        finally:
            os.umask(umask)
        self._owner_and_times(name, dirfd, row, rel)
        return None

    def _file(self, dirfd: int, name: bytes, row: int, rel: bytes) -> None:
        ino = self.index.ino[row]
        layer, backing = self.index.backing_in_layer(ino)
        src = self.opener.open(layer, backing)
        assert src is not None
        flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
        try:
            dst = os.open(name, flags, 0o600, dir_fd=dirfd)
            try:
                while chunk := os.read(src, CHUNK):
                    view = memoryview(chunk)
                    while view:
                        view = view[os.write(dst, view) :]
                    self.stats.bytes += len(chunk)
                self._owner_and_times(dst, None, row, rel)
            finally:
                os.close(dst)
        finally:
            os.close(src)

    def finish_dir(self, fd: int, row: int, rel: bytes) -> None:
        """Directory metadata, applied after its children (their creation changes mtime)."""
        try:
            self._owner_and_times(fd, None, row, rel)
        finally:
            os.close(fd)

    def close(self) -> None:
        for fd, _ in self.links.values():
            os.close(fd)
        self.links.clear()


def extract_path(index: UnionIndex, path: str, dest: str) -> FlattenStats:
    """Write *path* of the view (a file, or a directory with everything below it) into the
    existing directory *dest* as ``dest/<its name>`` (the root: its contents into *dest*).

    *path* is resolved inside the view (symbolic links on the way followed, confined to the
    view; the last component is taken as it is, a link stays a link); nothing is looked up
    on the host. In *dest* every entry is created relative to a directory fd opened with
    ``O_NOFOLLOW``: an existing symlink there is replaced, never followed, and no name can
    contain ``/`` or be ``..``, so nothing is written outside *dest*. Owners, xattrs other
    than ``user.*`` and devices are written only as root (as tar does). Raises
    :class:`~layerfs.fs.viewpath.ViewPathError` (PATH not in the view), ExtractError, OSError.
    """
    target = resolve(index, path, follow_last=False)
    row = index.row_of(target.ino)
    assert row is not None
    try:
        top = os.open(dest, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    except NotADirectoryError:
        raise ExtractError(f"{dest}: not a directory") from None
    writer = _Writer(index, dest)
    # events: (dir fd the entry goes in, row, rel) to create; (fd, row, rel, True) to finish
    pending: list[tuple[int, int, bytes, bool]] = []
    try:
        if row == 0:
            pending.extend(_children(index, top, 0, b""))
        else:
            pending.append((top, row, index.names[row], False))
        while pending:
            fd, r, rel, done = pending.pop()
            if done:
                writer.finish_dir(fd, r, rel)
                continue
            child_fd = writer.entry(fd, r, rel)
            if child_fd is not None:
                pending.append((child_fd, r, rel, True))
                pending.extend(_children(index, child_fd, r, rel))
    except BaseException:
        for fd, _r, _rel, done in pending:
            if done:
                os.close(fd)
        raise
    finally:
        writer.close()
        os.close(top)
    return writer.stats


def _children(
    index: UnionIndex, fd: int, row: int, rel: bytes
) -> list[tuple[int, int, bytes, bool]]:
    """Create-events for the children of directory *row*, last name first (popped in order)."""
    lo = index.first[row]
    names = index.names
    return [
        (fd, c, rel + b"/" + names[c] if rel else names[c], False)
        for c in range(lo + index.count[row] - 1, lo - 1, -1)
    ]
