"""The merged view of a layer chain, resolved once.

Input: the ``diff/`` directories of a layer chain, **top layer first** (a layer's own diff dir,
then its parents' diff dirs, nearest first). All of them are read-only while indexed.

:func:`build_index` walks the chain once, breadth first, and resolves every visible path with
the rules of kernel overlayfs (a lowerdir-only mount, no redirects, no metacopy):

* the upper entry wins; merging of a directory continues downwards only while the entry below is
  also a directory and no layer on the way is opaque;
* whiteouts in both on-disk forms hide the name in lower layers: a char device 0:0 ``NAME``
  (kernel form) and an empty regular file ``.wh.NAME`` (AUFS/OCI form, as fuse-overlayfs reads it;
  when a layer holds both ``NAME`` and ``.wh.NAME`` the whiteout wins, like fuse-overlayfs);
* a directory is opaque when it has the xattr ``trusted.overlay.opaque=y`` or
  ``user.overlay.opaque=y`` or contains a ``.wh..wh..opq`` file; the root is never opaque (as in
  the kernel, which always merges the root of every layer);
* a non-directory over a directory hides it completely, a directory over a non-directory replaces
  it, a directory re-created over a whiteout shows only its own contents;
* internal markers (whiteouts, ``.wh.*`` names, ``trusted.overlay.*``/``user.overlay.*`` xattrs)
  are never part of the view.

Attributes are those of the topmost entry (for a merged directory: the topmost layer's dir), with
two changes made by the kernel too: a merged directory (more than one contributing layer) reports
``st_nlink == 1`` and every ``st_ino`` is rewritten (see below).

**Inode numbers** (FUSE nodeid == ``st_ino`` in pyfuse3): the root is ``1``
(``pyfuse3.ROOT_INODE``); every other entry gets
``((layer position counted from the bottom) + 1) << 48 | st_ino`` of its supplying file.
Numbers are therefore stable across rebuilds and remounts, stay the same for a
lower layer's files when more layers are stacked on top, are unique in the view (layers differ in
the high bits), and hard links inside one layer share one number and keep their real ``st_nlink``.
Files whose ``st_ino`` does not fit in 48 bits, or that live on another device than their layer's
root, get numbers from a reserved range (prefix ``0xFFFF``) in walk order, which is deterministic.

**Storage**: one row per visible entry, in breadth-first order with the children of a directory
contiguous and sorted by name (bytes order), so that ``lookup`` is a binary search in the global
name list and a readdir offset is an index into the parent's child range. Numeric columns are
``array.array`` (plus a sorted inode column for inode -> row binary search); names are one list
of ``bytes``; symlink targets and xattrs are sparse dicts.
:meth:`UnionIndex.save` writes all of it as a few byte strings in one pickle; :func:`load_index`
reads it back only if the stored chain key (each layer dir's path, device, inode, mtime and ctime)
still matches, so a stale index is never used.
"""

from __future__ import annotations

import bisect
import collections
import contextlib
import errno
import os
import pickle
import stat
from array import array
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple

ROOT_INO = 1
"""Inode number of the view's root (equals ``pyfuse3.ROOT_INODE``)."""

INDEX_FORMAT = 2
_MAGIC = b"layerfs-union-index\n"

WH_PREFIX = b".wh."
OPAQUE_MARKER = b".wh..wh..opq"
OPAQUE_XATTRS = (b"trusted.overlay.opaque", b"user.overlay.opaque")
HIDDEN_XATTR_PREFIXES = (b"trusted.overlay.", b"user.overlay.")

_INO_SHIFT = 48
_INO_MASK = (1 << _INO_SHIFT) - 1
_OVERFLOW_BASE = 0xFFFF << _INO_SHIFT
MAX_LAYERS = 0xFFFE

# column name -> array typecode
_COLUMNS: dict[str, str] = {
    "ino": "Q",
    "mode": "I",
    "nlink": "Q",
    "uid": "I",
    "gid": "I",
    "rdev": "Q",
    "size": "q",
    "blocks": "q",
    "atime": "q",
    "mtime": "q",
    "ctime": "q",
    "layer": "I",
    "parent": "I",
    "first": "I",
    "count": "I",
    # inode -> row map: inode numbers sorted, with their rows (binary search, nothing to build
    # at load time)
    "by_ino": "Q",
    "by_ino_row": "I",
}

ChainKey = tuple[tuple[bytes, int, int, int, int], ...]


class Attr(NamedTuple):
    """The ``lstat`` attributes of a view entry (``ino`` is the view's inode number)."""

    ino: int
    mode: int
    nlink: int
    uid: int
    gid: int
    rdev: int
    size: int
    blocks: int
    atime_ns: int
    mtime_ns: int
    ctime_ns: int


@dataclass(frozen=True)
class Provenance:
    """Where a path of the view comes from (for ``layerfs which``). Layers are chain indices,
    0 = top.

    * ``visible``: the path exists in the view;
    * ``layer``: the layer supplying the visible entry (its attributes), else ``None``;
    * ``merged``: for a directory, every layer whose directory contributes contents, top first;
    * ``shadowed``: layers holding an entry (or whiteout) at this path that the view does not use;
    * ``whiteout_layer``: when not visible because of a whiteout, the layer holding it.
    """

    path: str
    visible: bool
    layer: int | None
    kind: str | None
    merged: tuple[int, ...]
    shadowed: tuple[int, ...]
    whiteout_layer: int | None


def chain_key(diff_dirs: Sequence[str | bytes]) -> ChainKey:
    """Identity of a chain for index caching: each layer dir's abspath, st_dev, st_ino,
    st_mtime_ns and st_ctime_ns. Raises OSError if a dir is missing."""
    out = []
    for d in diff_dirs:
        p = os.path.abspath(os.fsencode(d))
        st = os.stat(p)
        out.append((p, st.st_dev, st.st_ino, st.st_mtime_ns, st.st_ctime_ns))
    return tuple(out)


def _is_hidden_xattr(name: bytes) -> bool:
    return name.startswith(HIDDEN_XATTR_PREFIXES)


def _read_xattrs(path: bytes) -> tuple[tuple[bytes, bytes], ...]:
    try:
        names = os.listxattr(path, follow_symlinks=False)
    except OSError as e:
        if e.errno in (errno.ENOTSUP, errno.ENODATA):
            return ()
        raise
    out = []
    for n in names:
        nb = os.fsencode(n)
        if _is_hidden_xattr(nb):
            continue
        try:
            out.append((nb, os.getxattr(path, nb, follow_symlinks=False)))
        except OSError as e:
            if e.errno not in (errno.ENODATA, errno.ENOTSUP):
                raise
    out.sort()
    return tuple(out)


def _has_opaque_xattr(path: bytes) -> bool:
    try:
        names = os.listxattr(path, follow_symlinks=False)
    except OSError:
        return False
    for n in names:
        nb = os.fsencode(n)
        if nb in OPAQUE_XATTRS:
            try:
                if os.getxattr(path, nb, follow_symlinks=False) == b"y":
                    return True
            except OSError:
                pass
    return False


class _Cand:
    """A name being resolved in one merged directory during the build."""

    __slots__ = ("closed", "entry", "is_dir", "layer", "sources")

    def __init__(self, layer: int, entry: os.DirEntry[bytes] | None, is_dir: bool) -> None:
        self.layer = layer
        self.entry = entry  # None: whiteout
        self.is_dir = is_dir
        self.sources: list[tuple[int, bytes]] = []
        self.closed = not is_dir


def _merge_dir(
    sources: Sequence[tuple[int, bytes]], is_root: bool
) -> tuple[dict[bytes, _Cand], int]:
    """Merge one directory. *sources*: (layer, abs dir path), top first, already cut at the
    first non-directory/whiteout. Returns the names and how many layers really contributed
    (the list is cut again at the first opaque layer)."""
    merged: dict[bytes, _Cand] = {}
    used = 0
    for layer, dpath in sources:
        used += 1
        real: list[os.DirEntry[bytes]] = []
        whiteouts: set[bytes] = set()
        opaque = False
        with os.scandir(dpath) as it:
            for e in it:
                name = e.name
                if name.startswith(WH_PREFIX):
                    if name == OPAQUE_MARKER:
                        opaque = True
                    else:
                        whiteouts.add(name[len(WH_PREFIX) :])
                    continue
                if not e.is_dir(follow_symlinks=False) and not e.is_file(follow_symlinks=False):
                    st = e.stat(follow_symlinks=False)
                    if stat.S_ISCHR(st.st_mode) and st.st_rdev == 0:
                        whiteouts.add(name)
                        continue
                real.append(e)
        for e in real:
            name = e.name
            if name in whiteouts:
                continue
            is_dir = e.is_dir(follow_symlinks=False)
            c = merged.get(name)
            if c is None:
                c = _Cand(layer, e, is_dir)
                if is_dir:
                    c.sources.append((layer, e.path))
                merged[name] = c
            elif not c.closed:
                if is_dir:
                    c.sources.append((layer, e.path))
                else:
                    c.closed = True
        for name in whiteouts:
            c = merged.get(name)
            if c is None:
                merged[name] = _Cand(layer, None, False)
            else:
                c.closed = True
        if not is_root and (opaque or _has_opaque_xattr(dpath)):
            break
    return merged, used


class UnionIndex:
    """The resolved view of one chain. Immutable after construction; all lookups are in-memory.

    Entry rows are numbered 0..n-1 (row 0 is the root); public methods take and return view
    inode numbers unless they say "row".
    """

    __slots__ = (
        "atime",
        "blocks",
        "by_ino",
        "by_ino_row",
        "count",
        "ctime",
        "diff_dirs",
        "first",
        "gid",
        "ino",
        "key",
        "layer",
        "links",
        "mode",
        "mtime",
        "names",
        "nlink",
        "parent",
        "rdev",
        "size",
        "uid",
        "xattr_map",
    )

    ino: array[int]
    mode: array[int]
    nlink: array[int]
    uid: array[int]
    gid: array[int]
    rdev: array[int]
    size: array[int]
    blocks: array[int]
    atime: array[int]
    mtime: array[int]
    ctime: array[int]
    layer: array[int]
    parent: array[int]
    first: array[int]
    count: array[int]
    by_ino: array[int]
    by_ino_row: array[int]

    def __init__(
        self,
        diff_dirs: Sequence[bytes],
        key: ChainKey,
        columns: dict[str, array[int]],
        names: list[bytes],
        links: dict[int, bytes],
        xattrs: dict[int, tuple[tuple[bytes, bytes], ...]],
    ) -> None:
        self.diff_dirs = tuple(diff_dirs)
        self.key = key
        for col in _COLUMNS:
            setattr(self, col, columns[col])
        self.names = names
        self.links = links
        self.xattr_map = xattrs

    # -- size ---------------------------------------------------------------------------
    def __len__(self) -> int:
        """Number of visible entries, the root included."""
        return len(self.names)

    # -- rows and inodes ------------------------------------------------------------------
    def row_of(self, ino: int) -> int | None:
        """Row of a view inode (the first row for hard links), or None."""
        i = bisect.bisect_left(self.by_ino, ino)
        if i < len(self.by_ino) and self.by_ino[i] == ino:
            return self.by_ino_row[i]
        return None

    def _row(self, ino: int) -> int:
        row = self.row_of(ino)
        if row is None:
            raise KeyError(ino)
        return row

    def is_dir(self, ino: int) -> bool:
        return stat.S_ISDIR(self.mode[self._row(ino)])

    def lookup(self, parent_ino: int, name: bytes) -> int | None:
        """Inode of *name* in directory *parent_ino*, or None. Handles ``.`` and ``..``."""
        prow = self.row_of(parent_ino)
        if prow is None:
            return None
        if name == b".":
            return parent_ino
        if name == b"..":
            return self.ino[self.parent[prow]]
        lo = self.first[prow]
        hi = lo + self.count[prow]
        i = bisect.bisect_left(self.names, name, lo, hi)
        if i < hi and self.names[i] == name:
            return self.ino[i]
        return None

    def child_range(self, ino: int) -> range:
        """Rows of the children of directory *ino*, sorted by name (empty for non-dirs)."""
        row = self._row(ino)
        lo = self.first[row]
        return range(lo, lo + self.count[row])

    def children(self, ino: int) -> list[tuple[bytes, int]]:
        """(name, inode) of the children of directory *ino*, sorted by name."""
        return [(self.names[r], self.ino[r]) for r in self.child_range(ino)]

    def attr(self, ino: int) -> Attr:
        return self.attr_of_row(self._row(ino))

    def attr_of_row(self, row: int) -> Attr:
        return Attr(
            self.ino[row],
            self.mode[row],
            self.nlink[row],
            self.uid[row],
            self.gid[row],
            self.rdev[row],
            self.size[row],
            self.blocks[row],
            self.atime[row],
            self.mtime[row],
            self.ctime[row],
        )

    def readlink(self, ino: int) -> bytes:
        """Target of symlink *ino*; KeyError if it is not a symlink."""
        return self.links[self._row(ino)]

    def xattrs(self, ino: int) -> tuple[tuple[bytes, bytes], ...]:
        """The entry's xattrs (name, value), sorted, internal markers removed."""
        return self.xattr_map.get(self._row(ino), ())

    def layer_index(self, ino: int) -> int:
        """Chain index (0 = top) of the layer supplying *ino*."""
        return self.layer[self._row(ino)]

    def relpath_of_row(self, row: int) -> bytes:
        parts = []
        while row != 0:
            parts.append(self.names[row])
            row = self.parent[row]
        return b"/".join(reversed(parts))

    def backing_path(self, ino: int) -> bytes:
        """Absolute path of the file that supplies *ino* (the topmost dir for a merged dir)."""
        row = self._row(ino)
        rel = self.relpath_of_row(row)
        base = self.diff_dirs[self.layer[row]]
        return base + b"/" + rel if rel else base

    def resolve(self, path: str | bytes) -> int | None:
        """Inode of a view path (relative or starting with ``/``), or None. No symlink following."""
        ino: int | None = ROOT_INO
        for comp in os.fsencode(path).split(b"/"):
            if not comp or comp == b".":
                continue
            assert ino is not None
            ino = self.lookup(ino, comp)
            if ino is None:
                return None
        return ino

    def walk(self) -> Iterator[tuple[bytes, int]]:
        """(relative path, inode) of every entry except the root, breadth first."""
        paths: list[bytes] = [b""]
        for row in range(1, len(self.names)):
            p = self.parent[row]
            rel = paths[p] + b"/" + self.names[row] if p else self.names[row]
            paths.append(rel)
            yield rel, self.ino[row]

    # -- provenance ---------------------------------------------------------------------
    def layer_of(self, path: str | bytes) -> int | None:
        """Chain index of the layer supplying *path*, or None when not visible."""
        ino = self.resolve(path)
        return None if ino is None else self.layer_index(ino)

    def which(self, path: str | bytes) -> Provenance:
        """Explain *path*: the supplying layer and the lower layers it shadows or whites out.

        Made for a CLI command, not for FUSE requests: it lstat()s the path in every layer.
        """
        return which(self.diff_dirs, path)

    # -- persistence --------------------------------------------------------------------
    def save(self, path: str | bytes) -> None:
        """Write the index atomically (temp file + rename) to *path*."""
        payload: dict[str, Any] = {
            "format": INDEX_FORMAT,
            "key": self.key,
            "cols": {c: getattr(self, c).tobytes() for c in _COLUMNS},
            "names": b"\0".join(self.names),
            "links": self.links,
            "xattrs": self.xattr_map,
        }
        p = os.fsencode(path)
        tmp = p + b".tmp.%d" % os.getpid()
        try:
            with open(tmp, "wb") as f:
                f.write(_MAGIC)
                pickle.dump(payload, f, protocol=pickle.HIGHEST_PROTOCOL)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, p)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise


def load_index(path: str | bytes, diff_dirs: Sequence[str | bytes]) -> UnionIndex | None:
    """Load a saved index if it exists, is readable and was built for exactly this chain
    (same dirs, same inode/mtime/ctime of each); otherwise None (the caller rebuilds)."""
    try:
        key = chain_key(diff_dirs)
        with open(path, "rb") as f:
            if f.read(len(_MAGIC)) != _MAGIC:
                return None
            payload = pickle.load(f)
    except (OSError, EOFError, pickle.UnpicklingError, ValueError, TypeError, AttributeError):
        return None
    if not isinstance(payload, dict) or payload.get("format") != INDEX_FORMAT:
        return None
    if payload.get("key") != key:
        return None
    try:
        cols: dict[str, array[int]] = {}
        for c, tc in _COLUMNS.items():
            a = array(tc)
            a.frombytes(payload["cols"][c])
            cols[c] = a
        names = payload["names"].split(b"\0")
        if any(len(a) != len(names) for a in cols.values()):
            return None
        return UnionIndex(
            [k[0] for k in key], key, cols, names, payload["links"], payload["xattrs"]
        )
    except (KeyError, ValueError, TypeError, AttributeError):
        return None


def build_index(diff_dirs: Sequence[str | bytes]) -> UnionIndex:
    """Resolve the chain *diff_dirs* (top layer first) into a :class:`UnionIndex`.

    Reads every layer directory once; lstat()s and reads the xattrs of visible entries only.
    Raises OSError when a layer cannot be read, ValueError for an empty or too long chain.
    """
    if not diff_dirs:
        raise ValueError("a chain needs at least one layer")
    if len(diff_dirs) > MAX_LAYERS:
        raise ValueError(f"chain has {len(diff_dirs)} layers, at most {MAX_LAYERS} supported")
    key = chain_key(diff_dirs)
    dirs = [k[0] for k in key]
    nlayers = len(dirs)
    layer_dev = [k[1] for k in key]

    cols: dict[str, list[int]] = {c: [] for c in _COLUMNS}
    names: list[bytes] = []
    links: dict[int, bytes] = {}
    xattrs: dict[int, tuple[tuple[bytes, bytes], ...]] = {}
    inos: dict[tuple[int, int, int], int] = {}
    overflow = [_OVERFLOW_BASE]

    def ino_for(layer: int, st: os.stat_result) -> int:
        k = (layer, st.st_dev, st.st_ino)
        ino = inos.get(k)
        if ino is None:
            if st.st_dev == layer_dev[layer] and st.st_ino <= _INO_MASK:
                ino = ((nlayers - layer) << _INO_SHIFT) | st.st_ino
            else:
                ino = overflow[0]
                overflow[0] += 1
            inos[k] = ino
        return ino

    def add_row(
        name: bytes, parent: int, layer: int, path: bytes, st: os.stat_result, ino: int
    ) -> int:
        row = len(names)
        names.append(name)
        c = cols
        c["ino"].append(ino)
        c["mode"].append(st.st_mode)
        c["nlink"].append(st.st_nlink)
        c["uid"].append(st.st_uid)
        c["gid"].append(st.st_gid)
        c["rdev"].append(st.st_rdev)
        c["size"].append(st.st_size)
        c["blocks"].append(st.st_blocks)
        c["atime"].append(st.st_atime_ns)
        c["mtime"].append(st.st_mtime_ns)
        c["ctime"].append(st.st_ctime_ns)
        c["layer"].append(layer)
        c["parent"].append(parent)
        c["first"].append(0)
        c["count"].append(0)
        xa = _read_xattrs(path)
        if xa:
            xattrs[row] = xa
        if stat.S_ISLNK(st.st_mode):
            links[row] = os.readlink(path)
        return row

    root_st = os.lstat(dirs[0])
    add_row(b"", 0, 0, dirs[0], root_st, ROOT_INO)
    queue: collections.deque[tuple[int, list[tuple[int, bytes]]]] = collections.deque()
    queue.append((0, [(i, d) for i, d in enumerate(dirs)]))
    while queue:
        row, sources = queue.popleft()
        merged, used = _merge_dir(sources, row == 0)
        if used > 1:
            cols["nlink"][row] = 1  # kernel overlayfs: merged dirs report nlink 1
        visible = sorted(n for n, c in merged.items() if c.entry is not None)
        cols["first"][row] = len(names)
        cols["count"][row] = len(visible)
        for name in visible:
            c = merged[name]
            e = c.entry
            assert e is not None
            st = e.stat(follow_symlinks=False)
            child = add_row(name, row, c.layer, e.path, st, ino_for(c.layer, st))
            if c.is_dir:
                queue.append((child, c.sources))

    order = sorted(range(len(names)), key=cols["ino"].__getitem__)  # stable: first row first
    cols["by_ino"] = [cols["ino"][r] for r in order]
    cols["by_ino_row"] = order
    columns = {c: array(tc, cols[c]) for c, tc in _COLUMNS.items()}
    return UnionIndex(dirs, key, columns, names, links, xattrs)


def open_index(
    diff_dirs: Sequence[str | bytes], cache_path: str | bytes | None
) -> tuple[UnionIndex, bool]:
    """Load the cached index for *diff_dirs* or build (and save, best effort) a new one.
    Returns (index, loaded_from_cache)."""
    if cache_path is not None:
        idx = load_index(cache_path, diff_dirs)
        if idx is not None:
            return idx, True
    idx = build_index(diff_dirs)
    if cache_path is not None:
        with contextlib.suppress(OSError):
            idx.save(cache_path)
    return idx, False


# -- provenance (per-path probing, for the CLI) ---------------------------------------------


def _kind_at(base: bytes, rel: bytes) -> str | None:
    """What layer dir *base* holds at *rel*: 'dir', 'file' (any non-dir), 'whiteout' or None."""
    head, _, tail = rel.rpartition(b"/")
    parent = base + b"/" + head if head else base
    if os.path.lexists(parent + b"/" + WH_PREFIX + tail):
        return "whiteout"
    try:
        st = os.lstat(base + b"/" + rel)
    except (FileNotFoundError, NotADirectoryError):
        return None
    if stat.S_ISDIR(st.st_mode):
        return "dir"
    if stat.S_ISCHR(st.st_mode) and st.st_rdev == 0:
        return "whiteout"
    return "file"


def _is_opaque_dir(path: bytes) -> bool:
    return os.path.lexists(path + b"/" + OPAQUE_MARKER) or _has_opaque_xattr(path)


def which(diff_dirs: Sequence[str | bytes], path: str | bytes) -> Provenance:
    """Explain *path* in the chain *diff_dirs* (top first); see :class:`Provenance`."""
    dirs = [os.path.abspath(os.fsencode(d)) for d in diff_dirs]
    comps = [c for c in os.fsencode(path).split(b"/") if c and c != b"."]
    shown = "/" + os.fsdecode(b"/".join(comps))
    if not comps:
        return Provenance(shown, True, 0, "dir", tuple(range(len(dirs))), (), None)
    srcs = list(range(len(dirs)))
    kind: str | None = None
    whiteout: int | None = None
    new: list[int] = []
    for depth in range(len(comps)):
        rel = b"/".join(comps[: depth + 1])
        new = []
        kind = None
        whiteout = None
        for layer in srcs:
            k = _kind_at(dirs[layer], rel)
            if k is None:
                continue
            if kind is None:
                if k == "whiteout":
                    whiteout = layer
                    kind = "whiteout"
                    break
                kind = k
                new.append(layer)
                if k != "dir" or _is_opaque_dir(dirs[layer] + b"/" + rel):
                    break
            else:
                if k != "dir":
                    break
                new.append(layer)
                if _is_opaque_dir(dirs[layer] + b"/" + rel):
                    break
        last = depth == len(comps) - 1
        if kind is None or kind == "whiteout" or (kind == "file" and not last):
            new = []
            break
        srcs = new
    rel = b"/".join(comps)
    present = tuple(i for i in range(len(dirs)) if _kind_at(dirs[i], rel) is not None)
    if new and kind in ("dir", "file"):
        merged = tuple(new) if kind == "dir" else ()
        shadowed = tuple(i for i in present if i not in new)
        return Provenance(shown, True, new[0], kind, merged, shadowed, None)
    shadowed = tuple(i for i in present if i != whiteout)
    return Provenance(shown, False, None, None, (), shadowed, whiteout)
