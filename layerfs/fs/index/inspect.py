"""``layerfs inspect``: where the bytes of a chain went, per layer (a scriptable dive).

Input: the chain's per-layer indexes (:class:`~layerfs.fs.index.format.LayerIndex`, top
first) and their merged :class:`~layerfs.fs.index.UnionIndex`; nothing walks ``diff/``.

Per layer L, against the view of the layers below it (V below) and the view with L on top
(V with):

* **added**: entries L supplies whose path is not in V below; **modified**: entries L
  supplies whose path is in V below (a replaced file, a directory L also has, a type
  change); **deleted**: paths of V below that are not in V with (a whiteout, an opaque
  directory, a directory replaced by a file: the entry and everything under it);
* **stored**: bytes of L's regular files; **visible**: those the final view (every layer)
  still shows; **wasted** = stored - visible, split into *shadowed* (the path is in the final
  view, supplied by a layer above) and *removed* (the path is gone from the final view);
* **largest**: L's biggest files with what became of each.

Chain **efficiency** = visible bytes / stored bytes (1.0 for a chain without file bytes).

**Hard links**: bytes are counted once per inode (a layer's files with the same device and
inode number are one file), in every figure; entry counts count names. A hard-linked file is
visible if any of its names is.

V below / V with are computed in one pass bottom-up, applying each layer's entries to a
path map with the store format's rules (:mod:`layerfs.overlayfmt`: whiteouts, opaque
directories, ``.wh.`` names). Directory redirects (``trusted.overlay.redirect``, made only by
a kernel read-write mount with ``redirect_dir``) are not followed there; the final view, and
with it every visible/wasted figure, is the real merge. :attr:`ChainReport.consistent` says
whether the pass ended with exactly the final view's paths.
"""

from __future__ import annotations

import heapq
import math
import stat
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from layerfs.fs.index.format import LayerIndex
from layerfs.fs.index.merge import UnionIndex
from layerfs.overlayfmt import (
    OPAQUE_MARKER,
    WhiteoutFormat,
    is_internal_name,
    is_opaque,
    whiteout_target,
)

# (chain index, dev, ino): one file of one layer
_FileKey = tuple[int, int, int]


@dataclass
class Tally:
    """Entries (names) and bytes (regular files, once per inode) of one kind of change."""

    entries: int = 0
    bytes: int = 0


@dataclass
class LargeFile:
    """One of a layer's biggest files: its path in the layer, size and fate in the view
    (``visible``, ``shadowed`` or ``removed``)."""

    path: str
    size: int
    state: str


@dataclass
class LayerReport:
    """What one layer does to the chain (see the module docstring)."""

    id: str
    added: Tally = field(default_factory=Tally)
    modified: Tally = field(default_factory=Tally)
    deleted: Tally = field(default_factory=Tally)
    stored_bytes: int = 0
    visible_bytes: int = 0
    shadowed_bytes: int = 0
    removed_bytes: int = 0
    largest: list[LargeFile] = field(default_factory=list)

    @property
    def wasted_bytes(self) -> int:
        return self.shadowed_bytes + self.removed_bytes


@dataclass
class ChainReport:
    """The whole chain: layers **base first** (build order), and the totals."""

    layers: list[LayerReport]
    visible_bytes: int
    stored_bytes: int
    visible_entries: int
    consistent: bool

    @property
    def efficiency(self) -> float:
        return self.visible_bytes / self.stored_bytes if self.stored_bytes else 1.0

    @property
    def wasted_bytes(self) -> int:
        return self.stored_bytes - self.visible_bytes


class _Entry:
    """A path of the running view: who supplies it and, for a regular file, its key/size."""

    __slots__ = ("is_dir", "key", "size")

    def __init__(self, is_dir: bool, key: _FileKey | None, size: int) -> None:
        self.is_dir = is_dir
        self.key = key
        self.size = size


class _View:
    """The running view of the layers applied so far: path -> entry, dir -> child paths."""

    def __init__(self) -> None:
        self.entries: dict[bytes, _Entry] = {b"": _Entry(True, None, 0)}
        self.kids: dict[bytes, set[bytes]] = {}

    def put(self, path: bytes, entry: _Entry) -> None:
        if path not in self.entries:
            self.kids.setdefault(path.rpartition(b"/")[0], set()).add(path)
        self.entries[path] = entry

    def remove_below(self, path: bytes, gone: dict[bytes, _Entry]) -> None:
        """Drop everything under directory *path* (not *path*) into *gone*."""
        stack = list(self.kids.pop(path, ()))
        while stack:
            p = stack.pop()
            gone[p] = self.entries.pop(p)
            stack.extend(self.kids.pop(p, ()))

    def remove(self, path: bytes, gone: dict[bytes, _Entry]) -> None:
        """Drop *path* and everything under it into *gone*."""
        e = self.entries.pop(path, None)
        if e is None:
            return
        self.kids.get(path.rpartition(b"/")[0], set()).discard(path)
        gone[path] = e
        self.remove_below(path, gone)


def _count(tally: Tally, e: _Entry, seen: set[_FileKey]) -> None:
    tally.entries += 1
    if e.key is not None and e.key not in seen:
        seen.add(e.key)
        tally.bytes += e.size


def _row_paths(li: LayerIndex) -> tuple[list[bytes], list[bytes]]:
    """Path and name of every row of a layer index (rows are breadth first: parents come
    first)."""
    paths = [b""]
    names = [b""]
    for r in range(1, li.rows):
        parent = paths[li.parent[r]]
        name = li.name(r)
        names.append(name)
        paths.append(parent + b"/" + name if parent else name)
    return paths, names


def _apply_layer(
    view: _View, li: LayerIndex, pos: int, fmt: WhiteoutFormat, rep: LayerReport
) -> list[bytes]:
    """Put layer *li* (chain index *pos*) on top of *view*, filling rep's added, modified
    and deleted tallies; returns the layer's row paths. A path the layer removes (opaque
    directory, whiteout) and supplies again is modified, not deleted and added."""
    paths, names = _row_paths(li)
    aufs = fmt == "aufs"
    seen_new: set[_FileKey] = set()
    seen_gone: set[_FileKey] = set()
    gone: dict[bytes, _Entry] = {}  # removed from the view by this layer so far
    whited: set[bytes] = set()  # aufs: names a .wh. file hides in this layer too
    if aufs:
        for r in range(1, li.rows):
            name = names[r]
            target = whiteout_target(fmt, name, li.mode[r], li.rdev[r], li.size[r], li.flags[r])
            if target is not None and target != name:
                whited.add(paths[li.parent[r]] + b"/" + target if li.parent[r] else target)
    for r in range(li.rows):
        mode = li.mode[r]
        is_dir = stat.S_ISDIR(mode)
        path = paths[r]
        if r == 0:
            marker = aufs and li.lookup(0, OPAQUE_MARKER) is not None
            if is_opaque(fmt, li.flags[0], marker, True):
                view.remove_below(b"", gone)
            continue
        name = names[r]
        target = whiteout_target(fmt, name, mode, li.rdev[r], li.size[r], li.flags[r])
        if target is not None:
            parent = paths[li.parent[r]]
            view.remove(parent + b"/" + target if parent else target, gone)
            continue
        if is_internal_name(fmt, name) or path in whited:
            continue
        old = view.entries.get(path)
        if old is None:
            old = gone.pop(path, None)
        tally = rep.added if old is None else rep.modified
        key = None if not stat.S_ISREG(mode) else (pos, li.dev[r], li.ino[r])
        entry = _Entry(is_dir, key, li.size[r] if key else 0)
        _count(tally, entry, seen_new)
        if old is not None and old.is_dir:
            marker = is_dir and aufs and li.lookup(r, OPAQUE_MARKER) is not None
            if not is_dir or is_opaque(fmt, li.flags[r], marker, False):
                view.remove_below(path, gone)
        view.put(path, entry)
    for e in gone.values():
        _count(rep.deleted, e, seen_gone)
    return paths


def inspect_chain(index: UnionIndex, layer_ids: Sequence[str], *, largest: int = 5) -> ChainReport:
    """The report for the chain behind *index* (``layer_ids`` top first, one per layer of
    the index); *largest*: how many of each layer's biggest files to list. Pure: reads the
    index in memory only (no lock needed)."""
    layers = index.layers
    fmt = index.whiteout_format
    n = len(layers)
    if len(layer_ids) != n:
        raise ValueError(f"{len(layer_ids)} layer ids for {n} layers")
    # the final view: which files of which layer it shows
    visible: set[_FileKey] = set()
    for row in range(1, len(index)):
        pos = index.layer[row]
        li = layers[pos]
        r = index.lrow[row]
        if stat.S_ISREG(li.mode[r]):
            visible.add((pos, li.dev[r], li.ino[r]))
    view = _View()
    reports: list[LayerReport] = []
    layer_files: list[dict[_FileKey, tuple[int, bytes]]] = []
    for pos in range(n - 1, -1, -1):  # base first
        rep = LayerReport(layer_ids[pos])
        reports.append(rep)
        li = layers[pos]
        paths = _apply_layer(view, li, pos, fmt, rep)
        files: dict[_FileKey, tuple[int, bytes]] = {}
        for r in range(1, li.rows):
            if stat.S_ISREG(li.mode[r]):
                files.setdefault((pos, li.dev[r], li.ino[r]), (li.size[r], paths[r]))
        layer_files.append(files)
    final_paths = len(index) - 1
    consistent = len(view.entries) - 1 == final_paths and all(
        rel in view.entries for rel, _ in index.walk()
    )

    def in_view(path: bytes) -> bool:  # the pass ends with the final view's paths
        return path in view.entries if consistent else index.resolve(path) is not None

    for rep, files in zip(reports, layer_files, strict=True):
        states: dict[bytes, str] = {}
        for key, (size, p) in files.items():
            rep.stored_bytes += size
            if key in visible:
                states[p] = "visible"
                rep.visible_bytes += size
            elif in_view(p):
                states[p] = "shadowed"
                rep.shadowed_bytes += size
            else:
                states[p] = "removed"
                rep.removed_bytes += size
        rep.largest = [
            LargeFile("/" + p.decode("utf-8", "backslashreplace"), size, states[p])
            for size, p in heapq.nlargest(largest, files.values())
        ]
    return ChainReport(
        layers=reports,
        visible_bytes=sum(r.visible_bytes for r in reports),
        stored_bytes=sum(r.stored_bytes for r in reports),
        visible_entries=final_paths,
        consistent=consistent,
    )


# --------------------------------------------------------------------------- output


def report_json(report: ChainReport) -> dict[str, Any]:
    """The report as plain JSON values (layers base first)."""

    def tally(t: Tally) -> dict[str, int]:
        return {"entries": t.entries, "bytes": t.bytes}

    return {
        "layers": [
            {
                "id": r.id,
                "added": tally(r.added),
                "modified": tally(r.modified),
                "deleted": tally(r.deleted),
                "stored_bytes": r.stored_bytes,
                "visible_bytes": r.visible_bytes,
                "wasted_bytes": r.wasted_bytes,
                "shadowed_bytes": r.shadowed_bytes,
                "removed_bytes": r.removed_bytes,
                "largest": [{"path": f.path, "size": f.size, "state": f.state} for f in r.largest],
            }
            for r in report.layers
        ],
        "visible_entries": report.visible_entries,
        "visible_bytes": report.visible_bytes,
        "stored_bytes": report.stored_bytes,
        "wasted_bytes": report.wasted_bytes,
        "efficiency": round(report.efficiency, 6),
        "changes_exact": report.consistent,
    }


def human(n: int) -> str:
    """``1536`` -> ``1.5 KiB`` (bytes below 1 KiB as they are)."""
    value = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(value) < 1024 or unit == "TiB":
            return f"{n} B" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{n} B"


def report_text(report: ChainReport, target: str) -> str:
    """The human-readable report (the efficiency rounded down: 100 % only without waste)."""
    percent = math.floor(report.efficiency * 10_000) / 100
    lines = [
        f"{target}: {len(report.layers)} layers, {report.visible_entries} entries in the view",
        f"efficiency {percent:.2f} %: {human(report.visible_bytes)} visible of "
        f"{human(report.stored_bytes)} stored, {human(report.wasted_bytes)} wasted",
        "",
        f"{'#':>3} {'LAYER':<13}{'ADDED':>18}{'MODIFIED':>18}{'DELETED':>18}"
        f"{'STORED':>12}{'WASTED':>12}",
    ]

    def cell(t: Tally) -> str:
        return f"{t.entries} / {human(t.bytes)}"

    for i, r in enumerate(report.layers):
        lines.append(
            f"{i:>3} {r.id[:12]:<13}{cell(r.added):>18}{cell(r.modified):>18}"
            f"{cell(r.deleted):>18}{human(r.stored_bytes):>12}{human(r.wasted_bytes):>12}"
        )
    lines.append("")
    lines.append("largest files per layer (entries / bytes above: names / bytes once per inode)")
    for i, r in enumerate(report.layers):
        if not r.largest:
            continue
        lines.append(f"{i:>3} {r.id[:12]}")
        for f in r.largest:
            lines.append(f"      {human(f.size):>10}  {f.state:<8}  {_one_line(f.path)}")
    if not report.consistent:
        lines.append("")
        lines.append("note: the chain has directory redirects: change counts are approximate")
    return "\n".join(lines)


def _one_line(path: str) -> str:
    """*path* for a text line: control characters (a newline in a hostile layer's name
    would forge a row) shown as ``\\n``, ``\\x1b``... (as invalid UTF-8 already is)."""
    out = []
    for c in path:
        out.append(c if c.isprintable() else c.encode("unicode_escape").decode("ascii"))
    return "".join(out)
