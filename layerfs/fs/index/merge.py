"""The union view of a chain, merged from per-layer indexes with the store format's rules.

Input: one :class:`~layerfs.fs.index.format.LayerIndex` per layer, **top layer first**, and
the store's whiteout format. :func:`merge` resolves every visible path once, as the format's
own mount does (:mod:`layerfs.overlayfmt` has the rules), and :func:`explain` answers
``layerfs which`` with the same lookups.

Lookup of a directory's entry (``child_stack``) follows the kernel's ``ovl_lookup``: the
topmost layer holding the name decides; a whiteout there hides it; a directory collects the
same directory from the lower layers of its parent's stack (or, after an absolute redirect, of
every lower layer from its root) until a whiteout, a non-directory or an opaque directory.

Attributes are those of the topmost entry; a merged directory (more than one layer in its
stack) reports ``st_nlink == 1``, as the kernel does.

**Inode numbers** (FUSE nodeid == ``st_ino``): the root is ``1``; every other entry gets
``((layer position counted from the bottom) + 1) << 48 | st_ino`` of its supplying file, so
numbers are stable across rebuilds and remounts, stay the same for a lower layer's files when
layers are stacked on top, and hard links inside one layer share one number. Files whose
``st_ino`` does not fit in 48 bits, or that live on another device than their layer's root,
get numbers from a reserved range (prefix ``0xFFFF``) in walk order.

**Storage**: one row per visible entry, breadth first, the children of a directory contiguous
and sorted by name. The union keeps only (layer, row in that layer's index), parent, child
range and inode number per entry; every other attribute is read from the layer index's
columns on demand, so the memory is a few small arrays plus the mapped index files.
"""

from __future__ import annotations

import bisect
import collections
import os
import stat
from array import array
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import NamedTuple

from layerfs.fs.index.format import F_SEALED, LayerIndex
from layerfs.overlayfmt import (
    F_OTHER_DEV,
    F_REDIRECT,
    OPAQUE_MARKER,
    WH_PREFIX,
    WhiteoutFormat,
    follows_redirects,
    is_hidden_xattr,
    is_internal_name,
    is_opaque,
    whiteout_target,
)

ROOT_INO = 1
"""Inode number of the view's root (equals ``pyfuse3.ROOT_INODE``)."""

_INO_SHIFT = 48
_INO_MASK = (1 << _INO_SHIFT) - 1
_OVERFLOW_BASE = 0xFFFF << _INO_SHIFT
MAX_LAYERS = 0xFFFE
_NS = 1_000_000_000


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


# -- the format's rules over layer indexes --------------------------------------------------


class _Rules:
    """The format's rules applied to rows of the chain's layer indexes."""

    def __init__(self, layers: Sequence[LayerIndex], fmt: WhiteoutFormat) -> None:
        self.layers = layers
        self.fmt = fmt
        self.aufs = fmt == "aufs"
        self.redirects = follows_redirects(fmt)

    def whiteout_of(self, li: LayerIndex, row: int, name: bytes) -> bytes | None:
        return whiteout_target(
            self.fmt, name, li.mode[row], li.rdev[row], li.size[row], li.flags[row]
        )

    def opaque(self, li: LayerIndex, row: int) -> bool:
        marker = self.aufs and li.lookup(row, OPAQUE_MARKER) is not None
        return is_opaque(self.fmt, li.flags[row], marker, row == 0)

    def find(self, li: LayerIndex, prow: int, name: bytes) -> tuple[str, int]:
        """What layer *li*'s directory row *prow* says about *name*: ('none', -1),
        ('whiteout', row) or ('entry', row)."""
        if self.aufs:
            wh = li.lookup(prow, WH_PREFIX + name)
            if wh is not None:
                return "whiteout", wh
            if is_internal_name(self.fmt, name):
                return "none", -1
        r = li.lookup(prow, name)
        if r is None:
            return "none", -1
        if self.whiteout_of(li, r, name) == name:
            return "whiteout", r
        return "entry", r

    def redirect(self, li: LayerIndex, row: int) -> bytes | None:
        if self.redirects and li.flags[row] & F_REDIRECT and stat.S_ISDIR(li.mode[row]):
            return li.link(row)
        return None

    def resolve_abs(self, layer: int, comps: list[bytes]) -> tuple[str, int, list[bytes]]:
        """Look up an absolute redirect path in one layer from its root. Returns (kind, row,
        path for the lower layers): kind 'none' when absent there, 'stop' when a whiteout or
        non-directory on the way ends the search, 'entry' for the final component (row).
        A redirect on a directory on the way rewrites the path the lower layers look up (the
        kernel's ``ovl_check_redirect``); an opaque directory on the way is passed."""
        li = self.layers[layer]
        row = 0
        lower = comps
        for i, comp in enumerate(comps):
            kind, r = self.find(li, row, comp)
            if kind == "none":
                return "none", -1, lower
            if kind == "whiteout":
                return "stop", -1, lower
            if i == len(comps) - 1:
                return "entry", r, lower
            if not stat.S_ISDIR(li.mode[r]):
                return "stop", -1, lower
            red = self.redirect(li, r)
            if red is not None:
                post = comps[i + 1 :]
                if red.startswith(b"/"):
                    lower = [c for c in red.split(b"/") if c] + post
                elif b"/" not in red and red not in (b"", b".", b".."):
                    lower = [*lower[:i], red, *post]
            row = r
        return "none", -1, lower

    def child_stack(
        self, parent: Sequence[tuple[int, int]], top: int, row: int, name: bytes
    ) -> list[tuple[int, int]]:
        """The layers (layer, row) of directory *name* found at (*top*, *row*) under a parent
        directory whose stack is *parent*, top first (kernel ``ovl_lookup``)."""
        stack = [(top, row)]
        li = self.layers[top]
        if self.opaque(li, row):
            return stack
        cur = name
        absolute: list[bytes] | None = None
        red = self.redirect(li, row)
        if red is not None:
            if red.startswith(b"/"):
                absolute = [c for c in red.split(b"/") if c]
            elif b"/" not in red and red not in (b"", b".", b".."):
                cur = red
            else:
                return stack
        rest = [(lay, prow) for lay, prow in parent if lay > top]
        j = top + 1
        while True:
            if absolute is not None:
                if j >= len(self.layers) or not absolute:
                    break
                kind, r, absolute = self.resolve_abs(j, absolute)
                layer = j
                j += 1
                if kind == "none":
                    continue
                if kind == "stop":
                    break
            else:
                if not rest:
                    break
                layer, prow = rest.pop(0)
                j = layer + 1
                kind, r = self.find(self.layers[layer], prow, cur)
                if kind == "none":
                    continue
                if kind == "whiteout":
                    break
            lo = self.layers[layer]
            if not stat.S_ISDIR(lo.mode[r]):
                break
            stack.append((layer, r))
            if self.opaque(lo, r):
                break
            red = self.redirect(lo, r)
            if red is not None:
                if red.startswith(b"/"):
                    absolute = [c for c in red.split(b"/") if c]
                elif b"/" not in red and red not in (b"", b".", b".."):
                    if absolute is not None:
                        absolute = [*absolute[:-1], red]
                    else:
                        cur = red
                else:
                    break
        return stack


# -- the merged view ---------------------------------------------------------------------


class _Col:
    """A view column read through (layer, row): ``col[row]`` -> int."""

    __slots__ = ("_cols", "_layer", "_lrow")

    def __init__(self, cols: list[Sequence[int]], layer: array[int], lrow: array[int]) -> None:
        self._cols = cols
        self._layer = layer
        self._lrow = lrow

    def __len__(self) -> int:
        return len(self._layer)

    def __getitem__(self, row: int) -> int:
        return self._cols[self._layer[row]][self._lrow[row]]


class _Time(_Col):
    __slots__ = ("_nsec",)

    def __init__(
        self,
        secs: list[Sequence[int]],
        nsecs: list[Sequence[int]],
        layer: array[int],
        lrow: array[int],
    ) -> None:
        super().__init__(secs, layer, lrow)
        self._nsec = nsecs

    def __getitem__(self, row: int) -> int:
        la, r = self._layer[row], self._lrow[row]
        return self._cols[la][r] * _NS + self._nsec[la][r]


class _NLink(_Col):
    __slots__ = ("_merged",)

    def __init__(
        self, cols: list[Sequence[int]], layer: array[int], lrow: array[int], merged: array[int]
    ) -> None:
        super().__init__(cols, layer, lrow)
        self._merged = merged

    def __getitem__(self, row: int) -> int:
        if self._merged[row]:
            return 1
        return self._cols[self._layer[row]][self._lrow[row]]


class _Names:
    """``names[row]`` -> the entry's name (bytes); ``b""`` for the root."""

    __slots__ = ("_layer", "_layers", "_lrow")

    def __init__(self, layers: Sequence[LayerIndex], layer: array[int], lrow: array[int]) -> None:
        self._layers = layers
        self._layer = layer
        self._lrow = lrow

    def __len__(self) -> int:
        return len(self._layer)

    def __getitem__(self, row: int) -> bytes:
        if row == 0:
            return b""
        li = self._layers[self._layer[row]]
        r = self._lrow[row]
        o = li.name_off[r]
        return bytes(li.strings[o : o + li.name_len[r]])


class UnionIndex:
    """The resolved view of one chain. Immutable after construction; all lookups in memory.

    Entry rows are numbered 0..n-1 (row 0 is the root); public methods take and return view
    inode numbers unless they say "row". The per-row sequences ``ino mode nlink uid gid rdev
    size blocks atime mtime ctime layer parent names`` are indexed by row (times in
    nanoseconds, possibly beyond 2**63)."""

    def __init__(
        self,
        diff_dirs: Sequence[bytes],
        layers: Sequence[LayerIndex],
        fmt: WhiteoutFormat,
        layer: array[int],
        lrow: array[int],
        parent: array[int],
        first: array[int],
        count: array[int],
        ino: array[int],
        merged: array[int],
        sealed: frozenset[int] = frozenset(),
    ) -> None:
        self.diff_dirs = tuple(diff_dirs)
        self.sealed = sealed
        """Inode numbers of the directories some layer of whose stack could not be read
        (:data:`~layerfs.fs.index.format.F_SEALED`): EACCES below them."""
        self.layers = tuple(layers)
        self.whiteout_format = fmt
        self.layer = layer
        self.lrow = lrow
        self.parent = parent
        self.first = first
        self.count = count
        self.ino = ino
        ls = self.layers

        def col(name: str) -> list[Sequence[int]]:
            return [getattr(li, name) for li in ls]

        self.mode = _Col(col("mode"), layer, lrow)
        self.uid = _Col(col("uid"), layer, lrow)
        self.gid = _Col(col("gid"), layer, lrow)
        self.rdev = _Col(col("rdev"), layer, lrow)
        self.size = _Col(col("size"), layer, lrow)
        self.blocks = _Col(col("blocks"), layer, lrow)
        self.nlink = _NLink(col("nlink"), layer, lrow, merged)
        self.atime = _Time(col("atime_s"), col("atime_ns"), layer, lrow)
        self.mtime = _Time(col("mtime_s"), col("mtime_ns"), layer, lrow)
        self.ctime = _Time(col("ctime_s"), col("ctime_ns"), layer, lrow)
        self.names = _Names(ls, layer, lrow)
        order = sorted(range(len(ino)), key=ino.__getitem__)
        self.by_ino = array("Q", [ino[r] for r in order])
        self.by_ino_row = array("I", order)

    # -- size ---------------------------------------------------------------------------
    def __len__(self) -> int:
        """Number of visible entries, the root included."""
        return len(self.layer)

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
        li = self.layers[self.layer[row]]
        r = self.lrow[row]
        nlink = 1 if self.nlink._merged[row] else li.nlink[r]
        return Attr(
            self.ino[row],
            li.mode[r],
            nlink,
            li.uid[r],
            li.gid[r],
            li.rdev[r],
            li.size[r],
            li.blocks[r],
            li.atime_s[r] * _NS + li.atime_ns[r],
            li.mtime_s[r] * _NS + li.mtime_ns[r],
            li.ctime_s[r] * _NS + li.ctime_ns[r],
        )

    def readlink(self, ino: int) -> bytes:
        """Target of symlink *ino*; KeyError if it is not a symlink."""
        row = self._row(ino)
        li = self.layers[self.layer[row]]
        r = self.lrow[row]
        if not stat.S_ISLNK(li.mode[r]):
            raise KeyError(ino)
        return li.link(r)

    @property
    def links(self) -> dict[int, bytes]:
        """row -> symlink target, for every symlink of the view (computed; for tests)."""
        out = {}
        for row in range(len(self)):
            li = self.layers[self.layer[row]]
            r = self.lrow[row]
            if stat.S_ISLNK(li.mode[r]):
                out[row] = li.link(r)
        return out

    def xattrs(self, ino: int) -> tuple[tuple[bytes, bytes], ...]:
        """The entry's xattrs (name, value), sorted, the format's internal ones removed."""
        row = self._row(ino)
        li = self.layers[self.layer[row]]
        fmt = self.whiteout_format
        return tuple(kv for kv in li.xattrs(self.lrow[row]) if not is_hidden_xattr(fmt, kv[0]))

    def layer_index(self, ino: int) -> int:
        """Chain index (0 = top) of the layer supplying *ino*."""
        return self.layer[self._row(ino)]

    def relpath_of_row(self, row: int) -> bytes:
        parts = []
        while row != 0:
            parts.append(self.names[row])
            row = self.parent[row]
        return b"/".join(reversed(parts))

    def backing_in_layer(self, ino: int) -> tuple[int, bytes]:
        """(chain index of the layer, path relative to its diff dir, ``b""`` for the root) of
        the file that supplies *ino* (the topmost dir for a merged dir): its path inside its
        own layer, which differs from the view path below a redirect."""
        row = self._row(ino)
        li = self.layers[self.layer[row]]
        r = self.lrow[row]
        parts = []
        while r != 0:
            parts.append(li.name(r))
            r = li.parent[r]
        return self.layer[row], b"/".join(reversed(parts))

    def backing_path(self, ino: int) -> bytes:
        """Absolute path of the file that supplies *ino* (see :meth:`backing_in_layer`). For
        messages and tests: open backing files with :mod:`layerfs.fs.backing`, which never
        follows a symlink that appeared in the layer since it was indexed."""
        la, rel = self.backing_in_layer(ino)
        base = self.diff_dirs[la]
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
        names = self.names
        for row in range(1, len(self)):
            p = self.parent[row]
            rel = paths[p] + b"/" + names[row] if p else names[row]
            paths.append(rel)
            yield rel, self.ino[row]

    # -- provenance ---------------------------------------------------------------------
    def layer_of(self, path: str | bytes) -> int | None:
        """Chain index of the layer supplying *path*, or None when not visible."""
        ino = self.resolve(path)
        return None if ino is None else self.layer_index(ino)

    def which(self, path: str | bytes) -> Provenance:
        """Explain *path*: the supplying layer and the lower layers it shadows or whites out."""
        return explain(self.layers, self.whiteout_format, path)


def merge(
    diff_dirs: Sequence[bytes], layers: Sequence[LayerIndex], fmt: WhiteoutFormat
) -> UnionIndex:
    """Resolve the chain (layer indexes top first) into a :class:`UnionIndex`."""
    if not layers:
        raise ValueError("a chain needs at least one layer")
    if len(layers) > MAX_LAYERS:
        raise ValueError(f"chain has {len(layers)} layers, at most {MAX_LAYERS} supported")
    rules = _Rules(layers, fmt)
    nlayers = len(layers)
    aufs = fmt == "aufs"
    L = array("I", [0])
    R = array("I", [0])
    P = array("I", [0])
    F = array("I", [0])
    C = array("I", [0])
    INO = array("Q", [ROOT_INO])
    M = array("B", [0])
    inos: dict[tuple[int, int, int], int] = {}
    overflow = _OVERFLOW_BASE

    queue: collections.deque[tuple[int, list[tuple[int, int]]]] = collections.deque()
    root_stack = [(i, 0) for i in range(nlayers)]
    if aufs:  # fuse-overlayfs honours an opaque layer root
        for i, li in enumerate(layers):
            if rules.opaque(li, 0) and i < nlayers - 1:
                root_stack = root_stack[: i + 1]
                break
    queue.append((0, root_stack))
    M[0] = 1 if len(root_stack) > 1 else 0
    any_sealed = any(li.has_sealed for li in layers)
    sealed: list[int] = []
    while queue:
        urow, stack = queue.popleft()
        if any_sealed and any(layers[la].flags[r] & F_SEALED for la, r in stack):
            sealed.append(urow)
        # name -> (layer, row) of the deciding entry; None for a whiteout
        if len(stack) == 1:
            layer, drow = stack[0]
            li = layers[layer]
            lo = li.first[drow]
            rows = range(lo, lo + li.count[drow])
            chosen: list[tuple[bytes | None, int, int]] = []
            hidden: set[bytes] = set()
            if aufs:
                for k in rows:
                    nm = li.name(k)
                    if nm.startswith(WH_PREFIX):
                        t = rules.whiteout_of(li, k, nm)
                        if t is not None:
                            hidden.add(t)
            for k in rows:
                mode = li.mode[k]
                if stat.S_ISCHR(mode) and li.rdev[k] == 0:
                    continue
                if aufs:
                    nm = li.name(k)
                    if nm.startswith(WH_PREFIX) or nm in hidden:
                        continue
                elif (
                    stat.S_ISREG(mode)
                    and li.size[k] == 0
                    and li.flags[k]
                    and rules.whiteout_of(li, k, b"") is not None
                ):
                    continue
                chosen.append((None, layer, k))
        else:
            decided: dict[bytes, tuple[int, int] | None] = {}
            for layer, drow in stack:
                li = layers[layer]
                lo = li.first[drow]
                here: dict[bytes, tuple[int, int] | None] = {}
                wh: set[bytes] = set()
                same: set[bytes] = set()
                for k in range(lo, lo + li.count[drow]):
                    nm = li.name(k)
                    t = rules.whiteout_of(li, k, nm)
                    if t is not None:
                        # fuse-overlayfs: a name already decided above (``.wh..wh.X`` whites
                        # out the whiteout ``.wh.X``) is skipped before it is interpreted,
                        # but ``X`` beside ``.wh.X`` in one layer is a whiteout all the same
                        if not (aufs and nm in decided):
                            wh.add(t)
                        same.add(t)
                        continue
                    if aufs and nm.startswith(WH_PREFIX):
                        continue
                    here[nm] = (layer, k)
                for nm in wh:
                    here[nm] = None
                for nm in same:
                    if nm in here:
                        here[nm] = None
                if aufs:  # record whiteouts under their raw names too (see above)
                    for k in range(lo, lo + li.count[drow]):
                        nm = li.name(k)
                        if nm.startswith(WH_PREFIX):
                            decided.setdefault(nm, None)
                for nm, v in here.items():
                    if nm not in decided:
                        decided[nm] = v
            chosen = [(nm, v[0], v[1]) for nm, v in sorted(decided.items()) if v is not None]
        F[urow] = len(L)
        C[urow] = len(chosen)
        for cname, layer, k in chosen:
            li = layers[layer]
            row = len(L)
            L.append(layer)
            R.append(k)
            P.append(urow)
            F.append(0)
            C.append(0)
            st_ino = li.ino[k]
            if st_ino <= _INO_MASK and not li.flags[k] & F_OTHER_DEV:
                INO.append(((nlayers - layer) << _INO_SHIFT) | st_ino)
            else:
                ikey = (layer, li.dev[k], st_ino)
                num = inos.get(ikey)
                if num is None:
                    num = inos[ikey] = overflow
                    overflow += 1
                INO.append(num)
            mode = li.mode[k]
            if stat.S_ISDIR(mode):
                if len(stack) == 1 and not (rules.redirects and li.flags[k] & F_REDIRECT):
                    M.append(0)
                    queue.append((row, [(layer, k)]))
                    continue
                name = cname if cname is not None else li.name(k)
                sub = rules.child_stack(stack, layer, k, name)
                M.append(1 if len(sub) > 1 else 0)
                queue.append((row, sub))
            else:
                M.append(0)
    return UnionIndex(
        diff_dirs, layers, fmt, L, R, P, F, C, INO, M, frozenset(INO[r] for r in sealed)
    )


def explain(layers: Sequence[LayerIndex], fmt: WhiteoutFormat, path: str | bytes) -> Provenance:
    """``layerfs which``: explain *path* in the chain of *layers* (top first)."""
    rules = _Rules(layers, fmt)
    comps = [c for c in os.fsencode(path).split(b"/") if c and c != b"."]
    shown = "/" + os.fsdecode(b"/".join(comps))
    n = len(layers)
    if not comps:
        return Provenance(shown, True, 0, "dir", tuple(range(n)), (), None)
    stack = [(i, 0) for i in range(n)]
    if fmt == "aufs":
        for i, li in enumerate(layers):
            if rules.opaque(li, 0):
                stack = stack[: i + 1]
                break
    visible = False
    kind: str | None = None
    top: int | None = None
    whiteout: int | None = None
    used: list[int] = []
    for depth, comp in enumerate(comps):
        found: tuple[int, int] | None = None
        for layer, prow in stack:
            k, r = rules.find(layers[layer], prow, comp)
            if k == "whiteout":
                whiteout = layer
                break
            if k == "entry":
                found = (layer, r)
                break
        last = depth == len(comps) - 1
        if found is None:
            visible = False
            break
        whiteout = None
        layer, r = found
        if stat.S_ISDIR(layers[layer].mode[r]):
            stack = rules.child_stack(stack, layer, r, comp)
            kind = "dir"
        else:
            kind = "file"
            stack = [(layer, r)]
            if not last:
                whiteout = None
                found = None
                break
        if last:
            visible = True
            top = layer
            used = [la for la, _ in stack] if kind == "dir" else [layer]
    present = tuple(i for i in range(n) if _raw_present(rules, i, comps))
    if visible:
        merged = tuple(used) if kind == "dir" else ()
        return Provenance(
            shown, True, top, kind, merged, tuple(i for i in present if i not in used), None
        )
    return Provenance(
        shown, False, None, None, (), tuple(i for i in present if i != whiteout), whiteout
    )


def _raw_present(rules: _Rules, layer: int, comps: Sequence[bytes]) -> bool:
    """Does layer hold anything (an entry or a whiteout of it) at the raw path *comps*?"""
    li = rules.layers[layer]
    row = 0
    for i, comp in enumerate(comps):
        if i == len(comps) - 1:
            return rules.find(li, row, comp)[0] != "none"
        r = li.lookup(row, comp)
        if r is None or not stat.S_ISDIR(li.mode[r]):
            return False
        row = r
    return False
