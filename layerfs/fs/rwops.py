"""pyfuse3 request handlers for a read-write union view: translation only.

The view is the lower layers (immutable while mounted, answered from their
:class:`~layerfs.fs.index.UnionIndex`) under an upper dir (read from disk on every request:
this daemon is its only writer while mounted, as with kernel overlayfs). Every change of the
upper dir is made by :class:`~layerfs.fs.upper.Upper`; this module decides *what* changes.

Inode numbers are stable across copy-up and remount:

* an entry from the lower layers has the lower index's number;
* an upper entry that stands for a lower one (copied up, or moved by a directory rename)
  carries that number in ``trusted.layerfs.origin`` (:data:`~layerfs.overlayfmt.ORIGIN_XATTR`);
* any other upper entry has ``(number of lowers + 1) << 48 | st_ino``, the number the index
  gives it once this upper dir becomes the top lower layer of a later view.

Xattrs set through the view are stored under an escaped name where the plain one would be
bookkeeping: ``trusted.layerfs.X`` as ``trusted.layerfs.layerfs.X`` (every format, so that
``trusted.layerfs.origin`` stays unforgeable from the view while the kernel, which knows no
such name, stores it as a plain xattr), and in the kernel format ``trusted.overlay.X`` as
``trusted.overlay.overlay.X`` (as kernel overlayfs 6.7+ does).

Differences from kernel overlayfs (each pinned by a test in ``tests/test_rw_attack.py``):

* ``fallocate(2)`` of every mode is ``EOPNOTSUPP`` (the kernel passes it to the upper fs):
  pyfuse3 3.5 has no fallocate handler (``test_fallocate_punch_hole_zero_range_keep_size``).
* ``open(O_TMPFILE)`` is ``EOPNOTSUPP`` (the kernel makes the file in the upper dir): pyfuse3
  3.5 has no tmpfile handler (``test_o_tmpfile``).
* Paths whose upper-dir path is longer than ``PATH_MAX`` are ``ENAMETOOLONG`` (the kernel
  works with dentries): :class:`~layerfs.fs.upper.Upper` addresses entries by absolute path
  strings (``test_paths_longer_than_path_max``).
* A lower hard-link group touched through the view is copied up at every member's path (the
  kernel keeps it in its index dir): the view shows the other members' parent dirs with the
  lower link count, as the kernel, but the kernel remounting the upper shows them merged
  (link count 1) (``test_unlink_one_hard_link_others_keep_count``). A FUSE open names an
  inode, not the link it came through: a later write through another member of the group
  counts as a change of the first-known member's dir only.
* ``trusted.layerfs.X`` set through the view is stored as ``trusted.layerfs.layerfs.X`` (see
  above); the kernel stores the plain name (``test_layerfs_xattrs_from_view_are_plain``).

Nodes: :class:`Node` is one inode the kernel knows (lookup count > 0) or that is open. It
records the view paths it is known under (hard links: several) and the lower index inode merged
below its path, if any. Paths of nodes are rewritten on rename.

Concurrency: handlers run as trio tasks of pyfuse3's loop. Lookups, getattr, readdir and
data requests never take the lock and never await while they read the node table. Every
mutation of the upper dir or of the node table's paths holds :attr:`RWOperations.mutation`
(one lock per view); long copies (big files, directory trees) run in a worker thread while it
is held, so that lookups and reads go on meanwhile and see either the old or the new entry.
"""

from __future__ import annotations

import errno
import logging
import os
import stat
from bisect import bisect_left
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import pyfuse3
import trio

from layerfs.fs.backing import BackingOpener
from layerfs.fs.idmap import IdMapping
from layerfs.fs.index import ROOT_INO, UnionIndex
from layerfs.fs.ops import caller_has_sys_admin, guard_handlers, statfs_reply
from layerfs.fs.upper import (
    RENAME_EXCHANGE,
    RENAME_NOREPLACE,
    RENAME_WHITEOUT,
    Upper,
    is_bookkeeping_xattr,
    list_xattrs,
    renameat2,
)
from layerfs.overlayfmt import (
    LAYERFS_PREFIX,
    TRUSTED_PREFIX,
    WH_PREFIX,
    WRITE_HIDDEN_PREFIXES,
    WhiteoutFormat,
    check_format,
    is_hidden_xattr,
    is_upper_whiteout,
    is_write_internal_xattr,
)

log = logging.getLogger(__name__)

TIMEOUT = 1e6
"""Entry, attribute and negative-entry timeout (seconds). This daemon is the upper dir's only
writer and every change passes through the mount, so the kernel's caches stay right: it
updates them itself on create/unlink/rename/link/setattr from the replies, and copy-up, whiteouts
and opaque dirs change nothing a cached attribute shows (inode numbers are kept)."""

THREAD_COPY_BYTES = 1 << 20
"""Copy-ups of files at least this big run in a worker thread."""

_INO_SHIFT = 48
_TRUSTED = b"trusted."
_CAPS = b"security.capability"
ESCAPED_PREFIX = TRUSTED_PREFIX + b"overlay."
"""The kernel format stores view xattr ``trusted.overlay.X`` as ``trusted.overlay.overlay.X``."""
LAYERFS_ESCAPED = LAYERFS_PREFIX + b"layerfs."
"""Every format stores view xattr ``trusted.layerfs.X`` as ``trusted.layerfs.layerfs.X``: the
view's own bookkeeping names (``trusted.layerfs.origin``) cannot be set from the view."""


@dataclass
class Node:
    """One inode of the view.

    ``paths``: view paths (relative, ``b""`` = root) it is known under, in insertion order;
    empty once every known name was unlinked (it may still be open). ``lower``: the lower
    index inode merged at its path when the upper does not hide the lower there (no upper
    entry, or an upper dir that is not opaque), else None. ``nlookup``: the kernel's lookup
    count; ``opens``: open handles. A node is dropped when both are 0. ``gen`` grows on each
    copy-up, so that a handle opened on the lower file re-opens the upper one. ``no_caps``:
    getxattr found no ``security.capability`` (the kernel asks before every write to a
    regular file, to drop file capabilities); set by getxattr, cleared by setxattr. Caps
    appear on the inode only by a setxattr through this view (the daemon is the upper's only
    writer; a copy-up copies the lower's xattrs, which gave the same answer).
    Guarded by the view's mutation lock for writes (single-threaded event loop for reads)."""

    ino: int
    paths: dict[bytes, None]
    lower: int | None
    nlookup: int = 0
    opens: int = 0
    gen: int = 0
    no_caps: bool = False

    def rel(self) -> bytes | None:
        for p in self.paths:
            return p
        return None


@dataclass
class Probe:
    """What the view shows at a path: its inode, the upper entry's lstat (None: lower only),
    the lower inode merged there (see :attr:`Node.lower`) and the lower entry's inode at the
    path even if the upper hides it (``lower_here``: a deletion must leave a whiteout)."""

    ino: int
    st: os.stat_result | None
    lower: int | None
    lower_here: int | None


class _Handle:
    __slots__ = ("fd", "gen", "node", "upper")

    def __init__(self, fd: int, node: Node, upper: bool) -> None:
        self.fd = fd
        self.node = node
        self.upper = upper
        self.gen = node.gen


class _Mutex:
    """``async with`` lock that costs no trip through the scheduler when it is free (most
    mutations never await, so it is almost always free): trio's ``Lock.acquire`` always
    checkpoints, which doubled the loop iterations per request."""

    __slots__ = ("_lock",)

    def __init__(self) -> None:
        self._lock = trio.Lock()

    async def __aenter__(self) -> None:
        try:
            self._lock.acquire_nowait()
        except trio.WouldBlock:
            await self._lock.acquire()

    async def __aexit__(self, *exc: object) -> None:
        self._lock.release()


def _join(prel: bytes, name: bytes) -> bytes:
    return prel + b"/" + name if prel else name


def _err(code: int) -> pyfuse3.FUSEError:
    return pyfuse3.FUSEError(code)


@guard_handlers
class RWOperations(pyfuse3.Operations):
    """The read-write union view (see the module docstring).

    Mount-option assumptions: ``default_permissions`` (the kernel checks permissions from the
    attributes returned here; there is no ``access`` handler); no ``ro``. There are no lock
    handlers, so the kernel keeps flock and POSIX locks locally, as it does for overlayfs.
    """

    supports_dot_lookup = True
    enable_writeback_cache = False
    enable_acl = True

    def __init__(
        self,
        lower: UnionIndex | None,
        upper: Upper,
        layer_ids: Sequence[str] | None = None,
        upper_layer_id: str | None = None,
        ids: IdMapping | None = None,
    ) -> None:
        super().__init__()
        self.ids = ids or IdMapping()
        """The view's id mapping (:mod:`layerfs.fs.idmap`): ids shown are mapped from disk,
        ids written (new entries, chown) are mapped back."""
        self.lower = lower
        self.up = upper
        self.fmt: WhiteoutFormat = upper.fmt
        nlayers = len(lower.diff_dirs) if lower is not None else 0
        self.upper_tag = (nlayers + 1) << _INO_SHIFT
        self.upper_layer_id = upper_layer_id
        self._opener = BackingOpener(lower.diff_dirs) if lower is not None else None
        root_lower = ROOT_INO if lower is not None else None
        if root_lower is not None and self.fmt == "aufs" and upper.is_opaque(b""):
            root_lower = None  # fuse-overlayfs honours an opaque layer root
        root = Node(ROOT_INO, {b"": None}, root_lower, nlookup=1)
        self.nodes: dict[int, Node] = {ROOT_INO: root}
        self.by_path: dict[bytes, Node] = {b"": root}
        self._handles: dict[int, _Handle] = {}
        self._dirs: dict[int, tuple[Node, list[bytes] | None]] = {}
        self._next_fh = 1
        self._mutation = _Mutex()
        self._negative = pyfuse3.EntryAttributes()
        self._negative.st_ino = 0
        self._negative.entry_timeout = TIMEOUT
        self._reported: set[tuple[str, str]] = set()

    # -- errors (guard_handlers calls report) --------------------------------------------
    def report(self, handler: str, args: Sequence[Any], e: Exception) -> None:
        subject = "-"
        if args and isinstance(args[0], int) and args[0] in self.nodes:
            subject = "/" + os.fsdecode(self.nodes[args[0]].rel() or b"")
        key = (handler, subject)
        if key in self._reported:
            return
        if len(self._reported) > 4096:
            self._reported.clear()
        self._reported.add(key)
        if isinstance(e, OSError):
            log.warning("%s %s: %s (answered errno %d)", handler, subject, e, e.errno or errno.EIO)
        else:
            log.error("%s %s: unexpected %s", handler, subject, type(e).__name__, exc_info=e)

    @property
    def mutation(self) -> _Mutex:
        """The lock every mutation holds."""
        return self._mutation

    # -- inode numbers and attributes ------------------------------------------------------
    def _upper_ino(self, rel: bytes, st: os.stat_result) -> int:
        if not rel:
            return ROOT_INO
        origin = self.up.origin(rel)
        return origin if origin is not None else self.upper_tag | st.st_ino

    def _ea_of_stat(self, ino: int, st: os.stat_result, merged: bool) -> pyfuse3.EntryAttributes:
        ea = pyfuse3.EntryAttributes()
        ea.st_ino = ino
        ea.generation = 0
        ea.entry_timeout = TIMEOUT
        ea.attr_timeout = TIMEOUT
        ea.st_mode = st.st_mode
        ea.st_nlink = 1 if merged else st.st_nlink
        ea.st_uid = self.ids.shown_uid(st.st_uid)
        ea.st_gid = self.ids.shown_gid(st.st_gid)
        ea.st_rdev = st.st_rdev
        ea.st_size = st.st_size
        ea.st_blocks = st.st_blocks
        ea.st_blksize = st.st_blksize
        ea.st_atime_ns = st.st_atime_ns
        ea.st_mtime_ns = st.st_mtime_ns
        ea.st_ctime_ns = st.st_ctime_ns
        return ea

    def _ea_of_lower(self, lino: int) -> pyfuse3.EntryAttributes:
        assert self.lower is not None
        a = self.lower.attr(lino)
        ea = pyfuse3.EntryAttributes()
        ea.st_ino = a.ino
        ea.generation = 0
        ea.entry_timeout = TIMEOUT
        ea.attr_timeout = TIMEOUT
        ea.st_mode = a.mode
        ea.st_nlink = a.nlink
        ea.st_uid = self.ids.shown_uid(a.uid)
        ea.st_gid = self.ids.shown_gid(a.gid)
        ea.st_rdev = a.rdev
        ea.st_size = a.size
        ea.st_blocks = a.blocks
        ea.st_blksize = 4096
        ea.st_atime_ns = a.atime_ns
        ea.st_mtime_ns = a.mtime_ns
        ea.st_ctime_ns = a.ctime_ns
        return ea

    def _merged_dir_ea(
        self, ino: int, rel: bytes, st: os.stat_result, lino: int
    ) -> pyfuse3.EntryAttributes:
        """A merged dir: link count 1 (as the kernel), or the lower dir's where the upper dir
        exists only for a hard-link group (:data:`~layerfs.fs.upper.LOWER_LINKS_XATTR`)."""
        ea = self._ea_of_stat(ino, st, True)
        if self.lower is not None and self.up.keeps_lower_links(rel, st):
            ea.st_nlink = self.lower.attr(lino).nlink
        return ea

    def _ea_of_probe(self, p: Probe, rel: bytes | None = None) -> pyfuse3.EntryAttributes:
        if p.st is not None:
            merged = stat.S_ISDIR(p.st.st_mode) and p.lower is not None
            if merged and rel is not None and p.lower is not None:
                return self._merged_dir_ea(p.ino, rel, p.st, p.lower)
            return self._ea_of_stat(p.ino, p.st, merged)
        assert p.lower is not None
        return self._ea_of_lower(p.lower)

    def _attrs(self, node: Node) -> pyfuse3.EntryAttributes:
        for rel in node.paths:
            st, wh = self.up.entry(rel, by_name=False)
            if st is not None:
                if stat.S_ISDIR(st.st_mode) and node.lower is not None:
                    return self._merged_dir_ea(node.ino, rel, st, node.lower)
                return self._ea_of_stat(node.ino, st, False)
            if not wh and node.lower is not None:
                return self._ea_of_lower(node.lower)
        for h in self._handles.values():
            if h.node is node:
                # as the kernel: the open file's own count (0 for an unlinked upper file;
                # a lower file opened before its name was whited out keeps its count)
                return self._ea_of_stat(node.ino, os.fstat(h.fd), False)
        if node.lower is not None and self._lower_is_dir(node.lower):
            # a removed dir still open (a cwd, a dir fd) that stood on a lower dir: as the
            # kernel, its attributes stay those of the deleted merged dir (link count 1)
            ea = self._ea_of_lower(node.lower)
            ea.st_nlink = 1
            return ea
        raise _err(errno.ENOENT)

    # -- resolving -------------------------------------------------------------------------
    def _node(self, ino: int) -> Node:
        node = self.nodes.get(ino)
        if node is None:
            raise _err(errno.ENOENT)
        return node

    def _dir_rel(self, ino: int) -> tuple[Node, bytes]:
        node = self._node(ino)
        rel = node.rel()
        if rel is None:
            raise _err(errno.ENOENT)
        return node, rel

    def _child_lower(self, pnode: Node, name: bytes) -> int | None:
        if pnode.lower is None or self.lower is None:
            return None
        if pnode.lower in self.lower.sealed:
            raise _err(errno.EACCES)  # a lower dir the index could not read: as the kernel
        return self.lower.lookup(pnode.lower, name)

    def _lower_is_dir(self, lino: int | None) -> bool:
        return lino is not None and self.lower is not None and self.lower.is_dir(lino)

    def _probe(self, pnode: Node, rel: bytes, name: bytes) -> Probe | None:
        """What the view shows at *rel* (child *name* of *pnode*), or None."""
        if self.fmt == "aufs" and name.startswith(WH_PREFIX):
            return None
        lo = self._child_lower(pnode, name)
        st = self.up.lstat(rel)
        if st is not None and is_upper_whiteout(self.fmt, name, st.st_mode, st.st_rdev):
            return None
        if (st is not None or lo is not None) and self.up.whiteout_by_name(rel):
            return None  # (a name in neither layer needs no look for ``.wh.NAME``)
        if st is not None:
            merged = None
            if stat.S_ISDIR(st.st_mode) and self._lower_is_dir(lo) and not self.up.is_opaque(rel):
                merged = lo
            return Probe(self._upper_ino(rel, st), st, merged, lo)
        if lo is None:
            return None
        return Probe(lo, None, lo, lo)

    def _probe_child(self, pino: int, name: bytes) -> tuple[Node, bytes, Probe | None]:
        pnode, prel = self._dir_rel(pino)
        rel = _join(prel, name)
        return pnode, rel, self._probe(pnode, rel, name)

    def _bind(self, p: Probe, rel: bytes) -> Node:
        """The node for probe *p* at *rel* (created if new), with *rel* among its paths."""
        node = self.nodes.get(p.ino)
        if node is None:
            node = Node(p.ino, {}, p.lower)
            self.nodes[p.ino] = node
        else:
            node.lower = p.lower
        old = self.by_path.get(rel)
        if old is not None and old is not node:
            old.paths.pop(rel, None)
            self._maybe_drop(old)
        node.paths[rel] = None
        self.by_path[rel] = node
        return node

    def _maybe_drop(self, node: Node) -> None:
        if node.nlookup > 0 or node.opens > 0 or node.ino == ROOT_INO:
            return
        if self.nodes.get(node.ino) is node:
            del self.nodes[node.ino]
        for rel in node.paths:
            if self.by_path.get(rel) is node:
                del self.by_path[rel]

    def _unbind(self, rel: bytes) -> None:
        node = self.by_path.pop(rel, None)
        if node is not None:
            node.paths.pop(rel, None)
            self._maybe_drop(node)

    def _move_paths(self, old: bytes, new: bytes, clear_lower: bool) -> None:
        """Rewrite the paths of the node at *old* and, for a dir, of every node below it."""
        node = self.by_path.get(old)
        pre = old + b"/"
        moves = [(rel, n) for rel, n in self.by_path.items() if rel == old or rel.startswith(pre)]
        for rel, n in moves:
            del self.by_path[rel]
            n.paths.pop(rel, None)
        for rel, n in moves:
            nrel = new + rel[len(old) :]
            n.paths[nrel] = None
            self.by_path[nrel] = n
            if clear_lower:
                n.lower = None
        if node is not None and not clear_lower:
            node.lower = None

    def _visible_lower(self, rel: bytes, lino: int) -> bool:
        """True if the view shows lower inode *lino* at *rel* (nothing in the upper on the way
        hides it). Walks the path from the root (used for hard-link groups only)."""
        comps = rel.split(b"/")
        cur = b""
        for i, c in enumerate(comps):
            cur = _join(cur, c)
            st, wh = self.up.entry(cur)
            if wh:
                return False
            if st is None:
                continue
            if i == len(comps) - 1 or not stat.S_ISDIR(st.st_mode) or self.up.is_opaque(cur):
                return False
        assert self.lower is not None
        return self.lower.resolve(rel) == lino

    # -- lookup, getattr, readdir ------------------------------------------------------------
    async def lookup(
        self, parent_inode: int, name: bytes, ctx: pyfuse3.RequestContext
    ) -> pyfuse3.EntryAttributes:
        pnode, prel = self._dir_rel(parent_inode)
        if name == b".":
            node = pnode
        elif name == b"..":
            head = prel.rpartition(b"/")[0]
            node = self.by_path.get(head) or self._node(ROOT_INO)
        else:
            rel = _join(prel, name)
            p = self._probe(pnode, rel, name)
            if p is None:
                return self._negative
            node = self._bind(p, rel)
            node.nlookup += 1
            return self._ea_of_probe(p, rel)
        node.nlookup += 1
        return self._attrs(node)

    async def forget(self, inode_list: Sequence[tuple[int, int]]) -> None:
        for ino, n in inode_list:
            node = self.nodes.get(ino)
            if node is None:
                continue
            node.nlookup = max(0, node.nlookup - n)
            self._maybe_drop(node)

    async def getattr(self, inode: int, ctx: pyfuse3.RequestContext) -> pyfuse3.EntryAttributes:
        return self._attrs(self._node(inode))

    async def readlink(self, inode: int, ctx: pyfuse3.RequestContext) -> bytes:
        node = self._node(inode)
        rel = node.rel()
        if rel is not None:
            st, _ = self.up.entry(rel, by_name=False)
            if st is not None:
                if not stat.S_ISLNK(st.st_mode):
                    raise _err(errno.EINVAL)
                return os.readlink(self.up.path(rel))
        if node.lower is None or self.lower is None:
            raise _err(errno.EINVAL)
        try:
            return self.lower.readlink(node.lower)
        except KeyError:
            raise _err(errno.EINVAL) from None

    def _listing(self, node: Node, rel: bytes) -> list[bytes]:
        entries, wh = self.up.listdir(rel)
        names = set(entries)
        if node.lower is not None and self.lower is not None:
            if node.lower in self.lower.sealed:
                raise _err(errno.EACCES)
            for name, _ in self.lower.children(node.lower):
                if name not in wh and name not in names:
                    names.add(name)
        return sorted(names)

    async def opendir(self, inode: int, ctx: pyfuse3.RequestContext) -> int:
        node = self._node(inode)
        fh = self._next_fh
        self._next_fh += 1
        node.opens += 1
        self._dirs[fh] = (node, None)
        return fh

    async def readdir(self, fh: int, start_id: int, token: pyfuse3.ReaddirToken) -> None:
        node, names = self._dirs[fh]
        rel = node.rel()
        if rel is None:
            return
        if names is None or start_id == 0:
            names = self._listing(node, rel)
            self._dirs[fh] = (node, names)
        if start_id < 2:
            head = rel.rpartition(b"/")[0]
            parent = self.by_path.get(head) or self._node(ROOT_INO)
            dots = ((b".", node), (b"..", parent if rel else node))
            for off in range(start_id, 2):
                dname, dnode = dots[off]
                if not pyfuse3.readdir_reply(token, dname, self._attrs(dnode), off + 1):
                    return
            start_id = 2
        for i in range(start_id - 2, len(names)):
            name = names[i]
            crel = _join(rel, name)
            p = self._probe(node, crel, name)
            if p is None:
                continue
            child = self._bind(p, crel)
            if not pyfuse3.readdir_reply(token, name, self._ea_of_probe(p, crel), i + 3):
                self._maybe_drop(child)
                return
            child.nlookup += 1

    async def releasedir(self, fh: int) -> None:
        entry = self._dirs.pop(fh, None)
        if entry is not None:
            entry[0].opens -= 1
            self._maybe_drop(entry[0])

    async def fsyncdir(self, fh: int, datasync: bool) -> None:
        entry = self._dirs.get(fh)
        rel = entry[0].rel() if entry else None
        if rel is None or self.up.lstat(rel) is None:
            return
        fd = os.open(self.up.path(rel), os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)

    async def statfs(self, ctx: pyfuse3.RequestContext) -> pyfuse3.StatvfsData:
        return statfs_reply(self.up.root)

    # -- copy-up (mutation lock held) ---------------------------------------------------------
    def _open_lower(self, lino: int) -> int:
        """A read-only fd of lower file *lino*, opened confined to its layer (no symlink
        followed below the diff dir, :mod:`layerfs.fs.backing`)."""
        assert self.lower is not None and self._opener is not None
        layer, rel = self.lower.backing_in_layer(lino)
        fd = self._opener.open(layer, rel)
        assert fd is not None
        return fd

    def _copy_lower_to_temp(self, lino: int, ino: int, with_data: bool = True) -> bytes:
        """A complete copy of lower entry *lino* (no children) in the work dir, with its
        attributes and origin *ino*."""
        assert self.lower is not None
        a = self.lower.attr(lino)
        target = self.lower.readlink(lino) if stat.S_ISLNK(a.mode) else None
        src = self._open_lower(lino) if stat.S_ISREG(a.mode) and with_data and a.size else None
        try:
            tmp = self.up.prepare_copy(a.mode, a.rdev, a.size, src, target, with_data)
        finally:
            if src is not None:
                os.close(src)
        try:
            self._copy_lower_attrs(tmp, lino)
            self.up.set_origin(tmp, ino)
        except BaseException:
            self.up.remove_tree(tmp)
            raise
        return tmp

    def _copy_lower_attrs(self, tmp: bytes, lino: int) -> None:
        """Give work-dir entry *tmp* the owner, mode, times and xattrs of lower entry *lino*."""
        assert self.lower is not None
        a = self.lower.attr(lino)
        self.up.copy_attrs(
            tmp, a.mode, a.uid, a.gid, a.atime_ns, a.mtime_ns, self.lower.xattrs(lino)
        )

    def _install(self, tmp: bytes, rel: bytes) -> None:
        """Place *tmp* at *rel*, keeping the times of the upper parent (as the kernel does
        when it copies up: a copy-up is not a change of the directory)."""
        prel = rel.rpartition(b"/")[0]
        times = self.up.keep_times(prel)
        self.up.place(tmp, rel)
        self.up.restore_times(prel, times)
        self._dirs_changed(prel)  # the kernel would have copied the parents up too

    def _dirs_changed(self, rel: bytes) -> None:
        """The kernel would have copied up the dir *rel* and its parents: drop their
        :data:`~layerfs.fs.upper.LOWER_LINKS_XATTR` marks."""
        while rel:
            self.up.drop_lower_links(rel)
            rel = rel.rpartition(b"/")[0]

    def _ensure_dir_sync(self, rel: bytes) -> None:
        """Copy up the directory *rel* of the view and its parents, root first."""
        if not rel:
            return
        cur = b""
        for c in rel.split(b"/"):
            cur = _join(cur, c)
            st = self.up.lstat(cur)
            if st is not None and stat.S_ISDIR(st.st_mode):
                continue
            assert self.lower is not None
            lino = self.lower.resolve(cur)
            if lino is None or not self.lower.is_dir(lino):
                raise OSError(errno.ENOENT, "no such directory in the view", os.fsdecode(cur))
            tmp = self._copy_lower_to_temp(lino, lino)
            self._install(tmp, cur)

    def _copy_up_sync(self, node: Node, rel: bytes, with_data: bool = True) -> None:
        """Copy up the lower entry *node* shown at *rel* (a file's whole hard-link group)."""
        st, _ = self.up.entry(rel, by_name=False)
        if st is not None:
            return
        assert self.lower is not None and node.lower is not None
        lino = node.lower
        a = self.lower.attr(lino)
        if stat.S_ISDIR(a.mode):
            self._ensure_dir_sync(rel)
            node.gen += 1
            return
        group = [rel]
        if a.nlink > 1:
            group += [r for r in self._group_paths(lino) if r != rel]
        only_for_group: list[bytes] = []  # dirs made just for other members (see Upper)
        for i, r in enumerate(group):
            prel = r.rpartition(b"/")[0]
            if i > 0:
                cur = b""
                for c in prel.split(b"/") if prel else []:
                    cur = _join(cur, c)
                    if self.up.lstat(cur) is None:
                        only_for_group.append(cur)
            self._ensure_dir_sync(prel)
        tmp = self._copy_lower_to_temp(lino, node.ino, with_data)
        self._install(tmp, rel)
        for r in group[1:]:
            tmp = self.up.temp()
            os.link(self.up.path(rel), tmp)
            self._install(tmp, r)
        for d in only_for_group:
            self.up.mark_lower_links(d)
        node.gen += 1

    def _group_paths(self, lino: int) -> list[bytes]:
        """View paths of every visible member of the lower hard-link group of *lino*."""
        idx = self.lower
        assert idx is not None
        out = []
        i = bisect_left(idx.by_ino, lino)
        while i < len(idx.by_ino) and idx.by_ino[i] == lino:
            rel = idx.relpath_of_row(idx.by_ino_row[i])
            if self._visible_lower(rel, lino):
                out.append(rel)
            i += 1
        return out

    async def _copy_up(self, node: Node, with_data: bool = True) -> bytes:
        """Make *node* an upper entry; returns its upper-relative path."""
        rel = node.rel()
        if rel is None:
            raise _err(errno.ENOENT)
        st, _ = self.up.entry(rel, by_name=False)
        if st is not None:
            if (stat.S_ISDIR(st.st_mode) and node.lower is not None) or (
                stat.S_ISREG(st.st_mode) and st.st_nlink > 1
            ):  # (a dir, or maybe a hard-link group member: the kernel copies up now)
                self._dirs_changed(rel if stat.S_ISDIR(st.st_mode) else rel.rpartition(b"/")[0])
            return rel
        if node.lower is None:
            raise _err(errno.ENOENT)
        assert self.lower is not None
        big = with_data and self.lower.attr(node.lower).size >= THREAD_COPY_BYTES
        if big:
            await trio.to_thread.run_sync(self._copy_up_sync, node, rel, with_data)
        else:
            self._copy_up_sync(node, rel, with_data)
        return rel

    async def _ensure_dir(self, rel: bytes) -> None:
        self._ensure_dir_sync(rel)

    # -- directory trees (rename of a dir with lower content) ------------------------------
    def _clone_tree_sync(self, rel: bytes, lino: int | None, ino: int) -> bytes:
        """A complete copy of the merged directory *rel* in the work dir: upper non-dirs are
        hard-linked (same inode), lower non-dirs copied up (a hard-link group is copied up at
        its own paths first, then linked), dirs made anew with their origin inode numbers."""
        st = self.up.lstat(rel)
        up_dir = st is not None and stat.S_ISDIR(st.st_mode)
        tmp = self.up.temp()
        os.mkdir(tmp, 0o700)
        try:
            entries, wh = self.up.listdir(rel) if up_dir else ({}, set())
            lower_kids: dict[bytes, int] = {}
            hidden = up_dir and self.up.is_opaque(rel)
            if lino is not None and self.lower is not None and not hidden:
                lower_kids = {n: i for n, i in self.lower.children(lino) if n not in wh}
            for name in sorted(set(entries) | set(lower_kids)):
                crel = _join(rel, name)
                cst = entries.get(name)
                clo = lower_kids.get(name)
                dst = tmp + b"/" + name
                if cst is not None:
                    if stat.S_ISDIR(cst.st_mode):
                        merged = clo if self._lower_is_dir(clo) else None
                        sub = self._clone_tree_sync(crel, merged, self._upper_ino(crel, cst))
                        os.rename(sub, dst)
                    else:
                        os.link(self.up.path(crel), dst, follow_symlinks=False)
                    continue
                assert clo is not None and self.lower is not None
                a = self.lower.attr(clo)
                if stat.S_ISDIR(a.mode):
                    os.rename(self._clone_tree_sync(crel, clo, clo), dst)
                elif stat.S_ISREG(a.mode) and a.nlink > 1:
                    node = self.nodes.get(clo) or Node(clo, {crel: None}, clo)
                    saved = dict(node.paths)
                    node.paths = {crel: None, **saved}
                    try:
                        self._copy_up_sync(node, crel)
                    finally:
                        node.paths = saved
                    os.link(self.up.path(crel), dst, follow_symlinks=False)
                else:
                    os.rename(self._copy_lower_to_temp(clo, clo), dst)
            if up_dir:
                assert st is not None
                xattrs = [
                    kv
                    for kv in list_xattrs(self.up.path(rel))
                    if not is_bookkeeping_xattr(self.fmt, kv[0])
                ]
                self.up.copy_attrs(
                    tmp, st.st_mode, st.st_uid, st.st_gid, st.st_atime_ns, st.st_mtime_ns, xattrs
                )
            else:
                assert lino is not None
                self._copy_lower_attrs(tmp, lino)
            self.up.set_origin(tmp, ino)
        except BaseException:
            self.up.remove_tree(tmp)
            raise
        return tmp

    def _materialize_sync(self, node: Node, rel: bytes, lino: int) -> None:
        """Replace the merged dir at *rel* by an opaque upper copy of what it shows (the view
        does not change), so that it can be renamed without redirects."""
        self._ensure_dir_sync(rel.rpartition(b"/")[0])
        times = self.up.keep_times(rel)
        tmp = self._clone_tree_sync(rel, lino, node.ino)
        self.up.mark_opaque(tmp)
        if times is None:
            a = self.lower.attr(lino) if self.lower is not None else None
            if a is not None:
                times = (a.atime_ns, a.mtime_ns)
        self.up.restore_times_abs(tmp, times)
        prel = rel.rpartition(b"/")[0]
        ptimes = self.up.keep_times(prel)
        self.up.place(tmp, rel)
        self.up.restore_times(prel, ptimes)
        self._dirs_changed(prel)
        pre = rel + b"/"
        for r, n in self.by_path.items():
            if r == rel or r.startswith(pre):
                n.lower = None
                n.gen += 1

    # -- owners of new entries ---------------------------------------------------------------
    def _new_owner(
        self, pst: os.stat_result, ctx: pyfuse3.RequestContext, is_dir: bool
    ) -> tuple[int, int, int]:
        """(uid, gid, extra mode bits) of a new entry in the upper dir whose lstat is *pst*:
        the caller's fsuid and fsgid, the parent's group and S_ISGID for dirs below a
        set-gid dir. Ids on disk: the caller's mapped back through the view's id mapping."""
        uid = self.ids.stored_uid(ctx.uid)
        if pst.st_mode & stat.S_ISGID:
            return uid, pst.st_gid, stat.S_ISGID if is_dir else 0
        return uid, self.ids.stored_gid(ctx.gid), 0

    def _chown(self, target: bytes | int, uid: int, gid: int) -> None:
        """chown (not following symlinks) with ids already on the disk side; with a squash
        option a failure is ignored, as fuse-overlayfs ignores it."""
        try:
            if isinstance(target, int):
                os.fchown(target, uid, gid)
            else:
                os.chown(target, uid, gid, follow_symlinks=False)
        except OSError:
            if not self.ids.squashes:
                raise

    async def _prepare_parent(self, pnode: Node, prel: bytes) -> os.stat_result:
        """Make the upper dir *prel* exist (copy-up of its lower dirs); returns its lstat."""
        pst = self.up.lstat(prel)
        if pst is None:
            self._ensure_dir_sync(prel)
            pst = os.lstat(self.up.path(prel))
        return pst

    def _new_node(self, rel: bytes) -> tuple[Node, pyfuse3.EntryAttributes]:
        """Bind the entry just made at *rel* (never the root). It has no origin xattr (only a
        copy-up writes one), so its inode number comes from its lstat alone."""
        st = os.lstat(self.up.path(rel))
        p = Probe(self.upper_tag | st.st_ino, st, None, None)
        node = self._bind(p, rel)
        node.nlookup += 1
        return node, self._ea_of_probe(p)

    def _finish_new(
        self, path: bytes, uid: int, gid: int, mode: int, symlink: bool = False
    ) -> None:
        self._chown(path, uid, gid)
        if not symlink:
            os.chmod(path, mode)

    async def _create_entry(
        self,
        parent_inode: int,
        name: bytes,
        ctx: pyfuse3.RequestContext,
        kind: str,
        mode: int = 0,
        rdev: int = 0,
        target: bytes = b"",
        link_src: bytes | None = None,
    ) -> tuple[Node, pyfuse3.EntryAttributes]:
        """Make a new entry (lock held): in place, or prepared in the work dir and swapped in
        when a whiteout is there (an opaque dir, over a whiteout or lower entry)."""
        pnode, rel, p = self._probe_child(parent_inode, name)
        if p is not None:
            raise _err(errno.EEXIST)
        if self.fmt == "aufs" and name.startswith(WH_PREFIX):
            raise _err(errno.EINVAL)
        if kind == "node" and stat.S_ISCHR(mode) and rdev == 0:
            raise _err(errno.EPERM)  # a whiteout's form: the kernel refuses it, as here
        prel = rel.rpartition(b"/")[0]
        pst = await self._prepare_parent(pnode, prel)
        uid, gid, extra = self._new_owner(pst, ctx, kind == "dir")
        perm = stat.S_IMODE(mode) | extra
        over = self.up.lstat(rel) is not None or self.up.whiteout_by_name(rel)
        lower_here = self._child_lower(pnode, name) is not None
        path = self.up.temp() if over else self.up.path(rel)
        if kind == "dir":
            os.mkdir(path, 0o700)
        elif kind == "symlink":
            os.symlink(target, path)
        elif kind == "link":
            assert link_src is not None
            os.link(link_src, path, follow_symlinks=False)
        else:
            os.mknod(path, stat.S_IFMT(mode) | 0o600, rdev)
        try:
            if kind != "link":
                self._finish_new(path, uid, gid, perm, symlink=kind == "symlink")
            if kind == "dir" and (over or lower_here):
                self.up.mark_opaque(path)
            if over:
                self.up.place(path, rel)
        except BaseException:
            self.up.remove_tree(path)
            raise
        if kind == "link":
            return self._relink(rel)
        return self._new_node(rel)

    def _relink(self, rel: bytes) -> tuple[Node, pyfuse3.EntryAttributes]:
        st = os.lstat(self.up.path(rel))
        p = Probe(self._upper_ino(rel, st), st, None, None)
        node = self._bind(p, rel)
        node.nlookup += 1
        return node, self._ea_of_probe(p)

    # -- namespace mutations -------------------------------------------------------------
    async def mkdir(
        self, parent_inode: int, name: bytes, mode: int, ctx: pyfuse3.RequestContext
    ) -> pyfuse3.EntryAttributes:
        async with self.mutation:
            return (await self._create_entry(parent_inode, name, ctx, "dir", mode))[1]

    async def mknod(
        self, parent_inode: int, name: bytes, mode: int, rdev: int, ctx: pyfuse3.RequestContext
    ) -> pyfuse3.EntryAttributes:
        async with self.mutation:
            return (await self._create_entry(parent_inode, name, ctx, "node", mode, rdev))[1]

    async def symlink(
        self, parent_inode: int, name: bytes, target: bytes, ctx: pyfuse3.RequestContext
    ) -> pyfuse3.EntryAttributes:
        async with self.mutation:
            _node, ea = await self._create_entry(
                parent_inode, name, ctx, "symlink", stat.S_IFLNK | 0o777, target=target
            )
            return ea

    async def link(
        self, inode: int, new_parent_inode: int, new_name: bytes, ctx: pyfuse3.RequestContext
    ) -> pyfuse3.EntryAttributes:
        async with self.mutation:
            node = self._node(inode)
            rel = await self._copy_up(node)
            if (
                self.up.origin(rel) is None
                and node.ino != self.upper_tag | os.lstat(self.up.path(rel)).st_ino
            ):
                self.up.set_origin(self.up.path(rel), node.ino)
            _, ea = await self._create_entry(
                new_parent_inode, new_name, ctx, "link", link_src=self.up.path(rel)
            )
            return ea

    async def create(
        self, parent_inode: int, name: bytes, mode: int, flags: int, ctx: pyfuse3.RequestContext
    ) -> tuple[pyfuse3.FileInfo, pyfuse3.EntryAttributes]:
        async with self.mutation:
            _pnode, rel, p = self._probe_child(parent_inode, name)
            if p is not None:
                if flags & os.O_EXCL:
                    raise _err(errno.EEXIST)
                node = self._bind(p, rel)
                node.nlookup += 1
                fi = await self._open_node(node, flags & ~(os.O_CREAT | os.O_EXCL))
                return fi, self._attrs(node)
            node, ea = await self._create_entry(
                parent_inode, name, ctx, "node", stat.S_IFREG | stat.S_IMODE(mode)
            )
            fi = await self._open_node(node, flags & ~(os.O_CREAT | os.O_EXCL | os.O_TRUNC))
            return fi, ea  # opening the new empty file changed none of its attributes

    async def unlink(self, parent_inode: int, name: bytes, ctx: pyfuse3.RequestContext) -> None:
        async with self.mutation:
            pnode, rel, p = self._probe_child(parent_inode, name)
            if p is None:
                raise _err(errno.ENOENT)
            if p.st is not None and stat.S_ISDIR(p.st.st_mode):
                raise _err(errno.EISDIR)
            self._remove(pnode, rel, p)

    async def rmdir(self, parent_inode: int, name: bytes, ctx: pyfuse3.RequestContext) -> None:
        async with self.mutation:
            pnode, rel, p = self._probe_child(parent_inode, name)
            if p is None:
                raise _err(errno.ENOENT)
            is_dir = stat.S_ISDIR(p.st.st_mode) if p.st is not None else self._lower_is_dir(p.lower)
            if not is_dir:
                raise _err(errno.ENOTDIR)
            node = self.by_path.get(rel) or Node(p.ino, {rel: None}, p.lower)
            if self._listing(node, rel):
                raise _err(errno.ENOTEMPTY)
            self._remove(pnode, rel, p)

    def _group_up_before_unlink(self, rel: bytes, p: Probe) -> None:
        """Before the name *rel* of a lower hard-link group goes (unlink, rename over it),
        copy the group up, so that the other links show a true count afterwards."""
        if p.st is None and p.lower is not None and self.lower is not None:
            a = self.lower.attr(p.lower)
            if not stat.S_ISDIR(a.mode) and a.nlink > 1:
                self._copy_up_sync(self.by_path.get(rel) or self._bind(p, rel), rel)

    def _remove(self, pnode: Node, rel: bytes, p: Probe) -> None:
        prel = rel.rpartition(b"/")[0]
        self._group_up_before_unlink(rel, p)
        if p.lower_here is not None:
            self._ensure_dir_sync(prel)
            self.up.whiteout(rel)
        else:
            self.up.remove(rel)
        self._unbind(rel)

    async def rename(
        self,
        parent_inode_old: int,
        name_old: bytes,
        parent_inode_new: int,
        name_new: bytes,
        flags: int,
        ctx: pyfuse3.RequestContext,
    ) -> None:
        if flags & RENAME_WHITEOUT or (flags & RENAME_EXCHANGE and flags & RENAME_NOREPLACE):
            raise _err(errno.EINVAL)
        async with self.mutation:
            spnode, srel, sp = self._probe_child(parent_inode_old, name_old)
            dpnode, drel, dp = self._probe_child(parent_inode_new, name_new)
            if sp is None:
                raise _err(errno.ENOENT)
            if self.fmt == "aufs" and name_new.startswith(WH_PREFIX):
                raise _err(errno.EINVAL)  # a ``.wh.`` name is a whiteout here (as create)
            if flags & RENAME_NOREPLACE and dp is not None:
                raise _err(errno.EEXIST)
            if flags & RENAME_EXCHANGE:
                if dp is None:
                    raise _err(errno.ENOENT)
                await self._exchange(spnode, srel, sp, dpnode, drel, dp)
                return
            s_dir = self._probe_is_dir(sp)
            if dp is not None:
                if dp.ino == sp.ino:
                    return
                d_dir = self._probe_is_dir(dp)
                if s_dir and not d_dir:
                    raise _err(errno.ENOTDIR)
                if d_dir and not s_dir:
                    raise _err(errno.EISDIR)
                if d_dir:
                    dnode = self.by_path.get(drel) or Node(dp.ino, {drel: None}, dp.lower)
                    if self._listing(dnode, drel):
                        raise _err(errno.ENOTEMPTY)
            snode = self.by_path.get(srel) or self._bind(sp, srel)
            if dp is not None and not s_dir:
                self._group_up_before_unlink(drel, dp)
            await self._prepare_move(snode, srel, sp, s_dir)
            self._ensure_dir_sync(drel.rpartition(b"/")[0])
            s_abs = self.up.path(srel)
            lower_at_dst = self._child_lower(dpnode, name_new) is not None
            if s_dir and lower_at_dst and not self.up.is_opaque(srel):
                self.up.mark_opaque(s_abs)
            d_upper = self.up.lstat(drel)
            if dp is not None and d_upper is not None and stat.S_ISDIR(d_upper.st_mode):
                # crash-atomic: first an on-disk empty dst (the view does not change), then
                # one rename that also leaves the whiteout at the source
                self.up.clear_dir(drel, lower_at_dst, dp.ino)
            self.up.move(srel, drel, whiteout=sp.lower_here is not None)
            self.up.clear_name_whiteout(drel)
            self._unbind(drel)
            self._move_paths(srel, drel, clear_lower=s_dir)
            snode.lower = None

    def _probe_is_dir(self, p: Probe) -> bool:
        if p.st is not None:
            return stat.S_ISDIR(p.st.st_mode)
        return self._lower_is_dir(p.lower)

    async def _prepare_move(self, node: Node, rel: bytes, p: Probe, is_dir: bool) -> None:
        """Make the entry at *rel* a pure upper entry that can be renamed as it is."""
        if is_dir:
            if p.lower is not None:  # merged with (or only in) the lower layers
                await trio.to_thread.run_sync(self._materialize_sync, node, rel, p.lower)
        else:
            await self._copy_up(node)
            st = os.lstat(self.up.path(rel))
            if self.up.origin(rel) is None and node.ino != self.upper_tag | st.st_ino:
                self.up.set_origin(self.up.path(rel), node.ino)

    async def _exchange(
        self, spnode: Node, srel: bytes, sp: Probe, dpnode: Node, drel: bytes, dp: Probe
    ) -> None:
        s_dir, d_dir = self._probe_is_dir(sp), self._probe_is_dir(dp)
        snode = self.by_path.get(srel) or self._bind(sp, srel)
        dnode = self.by_path.get(drel) or self._bind(dp, drel)
        await self._prepare_move(snode, srel, sp, s_dir)
        await self._prepare_move(dnode, drel, dp, d_dir)
        s_abs, d_abs = self.up.path(srel), self.up.path(drel)
        if s_dir and dp.lower_here is not None and not self.up.is_opaque(srel):
            self.up.mark_opaque(s_abs)
        if d_dir and sp.lower_here is not None and not self.up.is_opaque(drel):
            self.up.mark_opaque(d_abs)
        renameat2(s_abs, d_abs, RENAME_EXCHANGE)
        tmp = b"\0swap"
        self._move_paths(srel, tmp, clear_lower=s_dir)
        self._move_paths(drel, srel, clear_lower=d_dir)
        self._move_paths(tmp, drel, clear_lower=s_dir)
        snode.lower = dnode.lower = None

    # -- attributes ----------------------------------------------------------------------
    async def setattr(
        self,
        inode: int,
        attr: pyfuse3.EntryAttributes,
        fields: pyfuse3.SetattrFields,
        fh: int | None,
        ctx: pyfuse3.RequestContext,
    ) -> pyfuse3.EntryAttributes:
        async with self.mutation:
            node = self._node(inode)
            handle = self._handles.get(fh) if fh is not None else None
            target: bytes | int
            if node.rel() is None:
                if handle is None or not handle.upper:
                    raise _err(errno.ENOENT)
                target = handle.fd
            else:
                truncating = fields.update_size and attr.st_size == 0
                rel = await self._copy_up(node, with_data=not truncating)
                target = self.up.path(rel)
            if fields.update_uid or fields.update_gid:
                uid = self.ids.stored_uid(attr.st_uid) if fields.update_uid else -1
                gid = self.ids.stored_gid(attr.st_gid) if fields.update_gid else -1
                self._chown(target, uid, gid)
            if fields.update_mode:
                st = os.stat(target) if isinstance(target, int) else os.lstat(target)
                if stat.S_ISLNK(st.st_mode):
                    raise _err(errno.EOPNOTSUPP)
                if isinstance(target, int):
                    os.fchmod(target, stat.S_IMODE(attr.st_mode))
                else:
                    os.chmod(target, stat.S_IMODE(attr.st_mode))
            if fields.update_size:
                if handle is not None and handle.upper:
                    os.ftruncate(handle.fd, attr.st_size)
                else:
                    os.truncate(target, attr.st_size)
            if fields.update_atime or fields.update_mtime:
                a, m = attr.st_atime_ns, attr.st_mtime_ns
                if not (fields.update_atime and fields.update_mtime):  # keep the other one
                    cur = os.stat(target) if isinstance(target, int) else os.lstat(target)
                    a = a if fields.update_atime else cur.st_atime_ns
                    m = m if fields.update_mtime else cur.st_mtime_ns
                if isinstance(target, int):
                    os.utime(target, ns=(a, m))
                else:
                    os.utime(target, ns=(a, m), follow_symlinks=False)
            return self._attrs(node)

    # -- xattrs --------------------------------------------------------------------------
    def _internal(self, name: bytes) -> bool:
        return is_write_internal_xattr(self.fmt, name)

    def _upper_name(self, name: bytes) -> bytes | None:
        """The upper dir's xattr name for view xattr *name*, None if it cannot be set. The
        kernel format escapes ``trusted.overlay.X`` as ``trusted.overlay.overlay.X``, as kernel
        overlayfs (6.7+) does for nested overlays; fuse-overlayfs refuses its internal names."""
        if name.startswith(LAYERFS_PREFIX):
            return LAYERFS_ESCAPED + name[len(LAYERFS_PREFIX) :]
        if self.fmt == "kernel" and name.startswith(TRUSTED_PREFIX):
            return ESCAPED_PREFIX + name[len(TRUSTED_PREFIX) :]
        return None if is_hidden_xattr(self.fmt, name) else name

    def _view_name(self, uname: bytes) -> bytes | None:
        """The view's name of upper xattr *uname* (None: internal, never shown)."""
        if self.fmt == "kernel" and uname.startswith(ESCAPED_PREFIX):
            return TRUSTED_PREFIX + uname[len(ESCAPED_PREFIX) :]
        if uname.startswith(LAYERFS_ESCAPED):
            return LAYERFS_PREFIX + uname[len(LAYERFS_ESCAPED) :]
        return None if self._internal(uname) else uname

    def _refuse(self, name: bytes) -> pyfuse3.FUSEError:
        if name.startswith(WRITE_HIDDEN_PREFIXES):
            return _err(pyfuse3.ENOATTR)
        return _err(errno.EOPNOTSUPP)

    async def getxattr(self, inode: int, name: bytes, ctx: pyfuse3.RequestContext) -> bytes:
        node = self._node(inode)
        if name == _CAPS:
            if node.no_caps:
                raise _err(pyfuse3.ENOATTR)
            try:
                return await self._getxattr(node, name)
            except pyfuse3.FUSEError as e:
                if e.errno == pyfuse3.ENOATTR:
                    node.no_caps = True
                raise
        return await self._getxattr(node, name)

    async def _getxattr(self, node: Node, name: bytes) -> bytes:
        uname = self._upper_name(name)
        if uname is None:
            raise self._refuse(name)
        rel = node.rel()
        if rel is not None:
            st, _ = self.up.entry(rel, by_name=False)
            if st is not None:
                try:
                    return os.getxattr(self.up.path(rel), uname, follow_symlinks=False)
                except OSError as e:
                    if e.errno == errno.ENODATA:
                        raise _err(pyfuse3.ENOATTR) from None
                    raise
        if node.lower is not None and self.lower is not None:
            for k, v in self.lower.xattrs(node.lower):
                if k == name:
                    return v
        raise _err(pyfuse3.ENOATTR)

    async def listxattr(self, inode: int, ctx: pyfuse3.RequestContext) -> list[bytes]:
        node = self._node(inode)
        rel = node.rel()
        names: list[bytes] = []
        st = self.up.entry(rel, by_name=False)[0] if rel is not None else None
        if rel is not None and st is not None:
            raw = os.listxattr(self.up.path(rel), follow_symlinks=False)
            for n in raw:
                v = self._view_name(os.fsencode(n))
                if v is not None:
                    names.append(v)
        elif node.lower is not None and self.lower is not None:
            names = [k for k, _ in self.lower.xattrs(node.lower) if not self._internal(k)]
        if any(n.startswith(_TRUSTED) for n in names) and not caller_has_sys_admin(ctx.pid):
            names = [n for n in names if not n.startswith(_TRUSTED)]
        return names

    async def setxattr(
        self, inode: int, name: bytes, value: bytes, ctx: pyfuse3.RequestContext
    ) -> None:
        uname = self._upper_name(name)
        if uname is None:
            raise _err(errno.EOPNOTSUPP)
        async with self.mutation:
            node = self._node(inode)
            node.no_caps = False
            rel = await self._copy_up(node)
            os.setxattr(self.up.path(rel), uname, value, follow_symlinks=False)

    async def removexattr(self, inode: int, name: bytes, ctx: pyfuse3.RequestContext) -> None:
        uname = self._upper_name(name)
        if uname is None:
            raise _err(errno.EOPNOTSUPP)
        async with self.mutation:
            node = self._node(inode)
            rel = node.rel()
            if rel is None:
                raise _err(errno.ENOENT)
            if self.up.entry(rel, by_name=False)[0] is None:
                if node.lower is None or self.lower is None:
                    raise _err(errno.ENOENT)
                if all(k != name for k, _ in self.lower.xattrs(node.lower)):
                    raise _err(pyfuse3.ENOATTR)
            rel = await self._copy_up(node)
            try:
                os.removexattr(self.up.path(rel), uname, follow_symlinks=False)
            except OSError as e:
                if e.errno == errno.ENODATA:
                    raise _err(pyfuse3.ENOATTR) from None
                raise

    # -- data ----------------------------------------------------------------------------
    async def _open_node(self, node: Node, flags: int) -> pyfuse3.FileInfo:
        rel = node.rel()
        if rel is None:
            raise _err(errno.ENOENT)
        writing = flags & os.O_ACCMODE != os.O_RDONLY or flags & os.O_TRUNC
        if writing:  # after a copy-up the upper entry is there
            rel = await self._copy_up(node, with_data=not flags & os.O_TRUNC)
            in_upper = True
        else:
            in_upper = self.up.entry(rel, by_name=False)[0] is not None
        # O_DIRECT is the kernel's business (it sends direct I/O as it comes); the daemon's
        # own fd must not have it, or its unaligned pwrite/pread buffers give EINVAL
        strip = os.O_CREAT | os.O_EXCL | os.O_NOCTTY | os.O_DIRECT
        oflags = flags & ~strip | os.O_CLOEXEC | os.O_NOFOLLOW
        if in_upper:
            fd = os.open(self.up.path(rel), oflags)
            upper = True
        else:
            if node.lower is None or self.lower is None:
                raise _err(errno.ENOENT)
            fd = self._open_lower(node.lower)
            upper = False
        fh = self._next_fh
        self._next_fh += 1
        self._handles[fh] = _Handle(fd, node, upper)
        node.opens += 1
        # keep_cache: every change of the file passes through this mount (and its page cache)
        return pyfuse3.FileInfo(fh=fh, keep_cache=True, direct_io=False)

    async def open(self, inode: int, flags: int, ctx: pyfuse3.RequestContext) -> pyfuse3.FileInfo:
        node = self._node(inode)
        if flags & os.O_ACCMODE != os.O_RDONLY or flags & os.O_TRUNC:
            async with self.mutation:
                return await self._open_node(node, flags)
        return await self._open_node(node, flags)

    def _reopen_if_copied(self, h: _Handle) -> None:
        if h.upper or h.gen == h.node.gen:
            return
        rel = h.node.rel()
        if rel is None or self.up.entry(rel, by_name=False)[0] is None:
            return
        fd = os.open(self.up.path(rel), os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW)
        os.close(h.fd)
        h.fd, h.upper, h.gen = fd, True, h.node.gen

    async def read(self, fh: int, off: int, size: int) -> bytes:
        h = self._handles.get(fh)
        if h is None:
            raise _err(errno.EBADF)
        self._reopen_if_copied(h)
        return os.pread(h.fd, size, off)

    async def write(self, fh: int, off: int, buf: bytes) -> int:
        h = self._handles.get(fh)
        if h is None or not h.upper:
            raise _err(errno.EBADF)
        return os.pwrite(h.fd, buf, off)

    # flush is left to the base class, which answers ENOSYS: the kernel then stops sending it
    # (one request less per close(2)). Nothing is buffered here (write is a pwrite of the
    # upper fd, whose errors are returned by write itself) and there are no lock handlers, so
    # there is nothing for a close to flush or unlock; fuse-overlayfs answers the same.

    async def fsync(self, fh: int, datasync: bool) -> None:
        h = self._handles.get(fh)
        if h is None:
            raise _err(errno.EBADF)
        if datasync:
            await trio.to_thread.run_sync(os.fdatasync, h.fd)
        else:
            await trio.to_thread.run_sync(os.fsync, h.fd)

    async def release(self, fh: int) -> None:
        h = self._handles.pop(fh, None)
        if h is None:
            return
        os.close(h.fd)
        h.node.opens -= 1
        self._maybe_drop(h.node)


def open_rw_operations(
    lower: UnionIndex | None,
    upper_dir: str,
    work_dir: str,
    *,
    whiteout_format: str = "kernel",
    layer_ids: Sequence[str] | None = None,
    upper_layer_id: str | None = None,
    ids: IdMapping | None = None,
) -> RWOperations:
    """The Operations of a read-write view; cleans the work dir's leftovers first (a crash's
    temporary entries). The daemon's umask is cleared: new entries get exactly the mode the
    kernel asked for."""
    if not work_dir:
        raise ValueError("a read-write view needs a work dir")
    fmt = check_format(whiteout_format)
    up = Upper(upper_dir, work_dir, fmt)
    n = up.clean_work()
    if n:
        log.info("removed %d leftover entries from %s", n, os.fsdecode(up.work))
    os.umask(0)
    return RWOperations(lower, up, layer_ids, upper_layer_id, ids)
