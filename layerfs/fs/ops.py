"""pyfuse3 request handlers for a read-only union view; all answers come from a UnionIndex."""

from __future__ import annotations

import errno
import logging
import os
import stat
from collections.abc import Sequence

import pyfuse3

from layerfs.fs.index import HIDDEN_XATTR_PREFIXES, UnionIndex

log = logging.getLogger(__name__)

LAYER_XATTR = b"user.layerfs.layer"
"""Virtual xattr: the id of the layer supplying an entry. Answered by getxattr, never listed."""

TIMEOUT = 1e6
"""Entry, attribute and negative-entry timeout in seconds: the layers are immutable."""

_EROFS = errno.EROFS


def _erofs() -> pyfuse3.FUSEError:
    return pyfuse3.FUSEError(_EROFS)


class UnionOperations(pyfuse3.Operations):
    """Translates FUSE requests into answers from a :class:`~layerfs.fs.index.UnionIndex` and
    reads from the backing files; it holds no policy and never walks the layer chain.

    Mount-option assumptions (the daemon sets them):

    * ``ro``: the view is read-only; every write handler still answers EROFS.
    * ``default_permissions``: the kernel checks permissions from the mode bits we return, so
      there is no ``access`` handler. Mandatory together with ``allow_other``.
    * ``noatime``: reads never update times (the index holds the attributes).
    * ``nodev,nosuid`` unless mounted for a container, where ``dev,suid`` are wanted.

    Caching: entries, attributes and negative lookups carry :data:`TIMEOUT`; ``open`` sets
    ``keep_cache`` and never ``direct_io``. pyfuse3 readdir is always readdirplus, so every
    listing also primes the dentry and attribute caches; offsets are positions in the
    directory's sorted child array (after ``.`` and ``..``).
    Handlers are plain blocking syscalls on one OS thread (local disk, short
    calls); ``forget`` only keeps lookup counts (nothing is ever freed).
    """

    supports_dot_lookup = True
    enable_writeback_cache = False
    enable_acl = True  # the kernel then enforces POSIX ACLs stored in layers, as overlayfs does

    def __init__(self, index: UnionIndex, layer_ids: Sequence[str] | None = None) -> None:
        super().__init__()
        self.index = index
        n = len(index.diff_dirs)
        ids = list(layer_ids) if layer_ids else []
        if ids and len(ids) != n:
            raise ValueError(f"{len(ids)} layer ids for {n} layers")
        self.layer_ids: list[bytes] = [
            os.fsencode(ids[i]) if ids else index.diff_dirs[i] for i in range(n)
        ]
        self._attrs: dict[int, pyfuse3.EntryAttributes] = {}
        self._handles: dict[int, list[int]] = {}  # fh -> [inode, backing fd or -1]
        self._next_fh = 1
        self.lookups: dict[int, int] = {}
        self._negative = pyfuse3.EntryAttributes()
        self._negative.st_ino = 0
        self._negative.entry_timeout = TIMEOUT
        self._negative.attr_timeout = TIMEOUT

    # -- helpers --------------------------------------------------------------------------
    def _entry(self, ino: int) -> pyfuse3.EntryAttributes:
        ea = self._attrs.get(ino)
        if ea is not None:
            return ea
        row = self.index.row_of(ino)
        if row is None:
            raise pyfuse3.FUSEError(errno.ENOENT)
        return self._entry_of_row(row)

    def _entry_of_row(self, row: int) -> pyfuse3.EntryAttributes:
        idx = self.index
        ino = idx.ino[row]
        ea = self._attrs.get(ino)
        if ea is not None:
            return ea
        ea = pyfuse3.EntryAttributes()
        ea.st_ino = ino
        ea.generation = 0
        ea.entry_timeout = TIMEOUT
        ea.attr_timeout = TIMEOUT
        ea.st_mode = idx.mode[row]
        ea.st_nlink = idx.nlink[row]
        ea.st_uid = idx.uid[row]
        ea.st_gid = idx.gid[row]
        ea.st_rdev = idx.rdev[row]
        ea.st_size = idx.size[row]
        ea.st_blocks = idx.blocks[row]
        ea.st_blksize = 4096
        ea.st_atime_ns = idx.atime[row]
        ea.st_mtime_ns = idx.mtime[row]
        ea.st_ctime_ns = idx.ctime[row]
        self._attrs[ino] = ea
        return ea

    def _count(self, ino: int) -> None:
        self.lookups[ino] = self.lookups.get(ino, 0) + 1

    # -- metadata -------------------------------------------------------------------------
    async def lookup(
        self, parent_inode: int, name: bytes, ctx: pyfuse3.RequestContext
    ) -> pyfuse3.EntryAttributes:
        ino = self.index.lookup(parent_inode, name)
        if ino is None:
            return self._negative
        ea = self._entry(ino)
        self._count(ino)
        return ea

    async def forget(self, inode_list: Sequence[tuple[int, int]]) -> None:
        lookups = self.lookups
        for ino, n in inode_list:
            left = lookups.get(ino, 0) - n
            if left > 0:
                lookups[ino] = left
            else:
                lookups.pop(ino, None)

    async def getattr(self, inode: int, ctx: pyfuse3.RequestContext) -> pyfuse3.EntryAttributes:
        return self._entry(inode)

    async def readlink(self, inode: int, ctx: pyfuse3.RequestContext) -> bytes:
        try:
            return self.index.readlink(inode)
        except KeyError:
            raise pyfuse3.FUSEError(errno.EINVAL) from None

    async def opendir(self, inode: int, ctx: pyfuse3.RequestContext) -> int:
        row = self.index.row_of(inode)
        if row is None:
            raise pyfuse3.FUSEError(errno.ENOENT)
        if not stat.S_ISDIR(self.index.mode[row]):
            raise pyfuse3.FUSEError(errno.ENOTDIR)
        return inode

    async def readdir(self, fh: int, start_id: int, token: pyfuse3.ReaddirToken) -> None:
        # offsets: 0 ".", 1 "..", 2 + i the i-th child in name order; next_id = offset + 1
        idx = self.index
        if start_id < 2:
            row = idx.row_of(fh)
            if row is None:
                return
            dots = ((b".", row), (b"..", idx.parent[row]))
            for off in range(start_id, 2):
                name, r = dots[off]
                if not pyfuse3.readdir_reply(token, name, self._entry_of_row(r), off + 1):
                    return
            start_id = 2
        rows = idx.child_range(fh)
        names = idx.names
        for i in range(start_id - 2, len(rows)):
            row = rows[i]
            ea = self._entry_of_row(row)
            if not pyfuse3.readdir_reply(token, names[row], ea, i + 3):
                return
            self._count(ea.st_ino)

    async def releasedir(self, fh: int) -> None:
        return None

    async def statfs(self, ctx: pyfuse3.RequestContext) -> pyfuse3.StatvfsData:
        sv = os.statvfs(self.index.diff_dirs[0])
        out = pyfuse3.StatvfsData()
        out.f_bsize = sv.f_bsize
        out.f_frsize = sv.f_frsize
        out.f_blocks = sv.f_blocks
        out.f_bfree = sv.f_bfree
        out.f_bavail = sv.f_bavail
        out.f_files = sv.f_files
        out.f_ffree = sv.f_ffree
        out.f_favail = sv.f_favail
        out.f_namemax = sv.f_namemax
        return out

    # -- xattrs ---------------------------------------------------------------------------
    async def getxattr(self, inode: int, name: bytes, ctx: pyfuse3.RequestContext) -> bytes:
        if name == LAYER_XATTR:
            row = self.index.row_of(inode)
            if row is None:
                raise pyfuse3.FUSEError(errno.ENOENT)
            return self.layer_ids[self.index.layer[row]]
        if not name.startswith(HIDDEN_XATTR_PREFIXES):
            for k, v in self.index.xattrs(inode):
                if k == name:
                    return v
        raise pyfuse3.FUSEError(pyfuse3.ENOATTR)

    async def listxattr(self, inode: int, ctx: pyfuse3.RequestContext) -> list[bytes]:
        return [k for k, _ in self.index.xattrs(inode)]

    # -- data -----------------------------------------------------------------------------
    async def open(self, inode: int, flags: int, ctx: pyfuse3.RequestContext) -> pyfuse3.FileInfo:
        if flags & os.O_ACCMODE != os.O_RDONLY or flags & os.O_TRUNC:
            raise _erofs()
        if self.index.row_of(inode) is None:
            raise pyfuse3.FUSEError(errno.ENOENT)
        # The backing file is opened on the first read: with keep_cache a warm file is served
        # from the page cache and never reaches read(), so most opens cost no syscall at all.
        fh = self._next_fh
        self._next_fh += 1
        self._handles[fh] = [inode, -1]
        return pyfuse3.FileInfo(fh=fh, keep_cache=True, direct_io=False)

    def _backing_fd(self, handle: list[int]) -> int:
        path = self.index.backing_path(handle[0])
        base = os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC
        try:
            try:
                fd = os.open(path, base | os.O_NOATIME)
            except PermissionError:
                fd = os.open(path, base)
        except OSError as e:
            log.warning("open %r: %s", path, e)
            raise pyfuse3.FUSEError(e.errno or errno.EIO) from None
        handle[1] = fd
        return fd

    async def read(self, fh: int, off: int, size: int) -> bytes:
        handle = self._handles[fh]
        fd = handle[1] if handle[1] >= 0 else self._backing_fd(handle)
        try:
            return os.pread(fd, size, off)
        except OSError as e:
            raise pyfuse3.FUSEError(e.errno or errno.EIO) from None

    # flush, fsync and fsyncdir are left to the base class, which answers ENOSYS: the kernel
    # then stops sending them (a read-only view has nothing to flush), saving one request
    # per close(2).

    async def release(self, fh: int) -> None:
        handle = self._handles.pop(fh, None)
        if handle is not None and handle[1] >= 0:
            os.close(handle[1])

    # -- every write: EROFS -----------------------------------------------------------------
    async def setattr(
        self,
        inode: int,
        attr: pyfuse3.EntryAttributes,
        fields: pyfuse3.SetattrFields,
        fh: int | None,
        ctx: pyfuse3.RequestContext,
    ) -> pyfuse3.EntryAttributes:
        raise _erofs()

    async def mknod(
        self, parent_inode: int, name: bytes, mode: int, rdev: int, ctx: pyfuse3.RequestContext
    ) -> pyfuse3.EntryAttributes:
        raise _erofs()

    async def mkdir(
        self, parent_inode: int, name: bytes, mode: int, ctx: pyfuse3.RequestContext
    ) -> pyfuse3.EntryAttributes:
        raise _erofs()

    async def unlink(self, parent_inode: int, name: bytes, ctx: pyfuse3.RequestContext) -> None:
        raise _erofs()

    async def rmdir(self, parent_inode: int, name: bytes, ctx: pyfuse3.RequestContext) -> None:
        raise _erofs()

    async def symlink(
        self, parent_inode: int, name: bytes, target: bytes, ctx: pyfuse3.RequestContext
    ) -> pyfuse3.EntryAttributes:
        raise _erofs()

    async def rename(
        self,
        parent_inode_old: int,
        name_old: bytes,
        parent_inode_new: int,
        name_new: bytes,
        flags: int,
        ctx: pyfuse3.RequestContext,
    ) -> None:
        raise _erofs()

    async def link(
        self, inode: int, new_parent_inode: int, new_name: bytes, ctx: pyfuse3.RequestContext
    ) -> pyfuse3.EntryAttributes:
        raise _erofs()

    async def write(self, fh: int, off: int, buf: bytes) -> int:
        raise _erofs()

    async def create(
        self, parent_inode: int, name: bytes, mode: int, flags: int, ctx: pyfuse3.RequestContext
    ) -> tuple[pyfuse3.FileInfo, pyfuse3.EntryAttributes]:
        raise _erofs()

    async def setxattr(
        self, inode: int, name: bytes, value: bytes, ctx: pyfuse3.RequestContext
    ) -> None:
        raise _erofs()

    async def removexattr(self, inode: int, name: bytes, ctx: pyfuse3.RequestContext) -> None:
        raise _erofs()
