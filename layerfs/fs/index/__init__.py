"""The merged view of a layer chain.

* :mod:`~layerfs.fs.index.format`: the per-layer index file (data only, checksummed,
  memory-mapped, checked before use);
* :mod:`~layerfs.fs.index.build`: producers of a layer's entries (a walk of ``diff/``), the
  cache key and what a persisted index trusts;
* :mod:`~layerfs.fs.index.merge`: the union of per-layer indexes under the store format's
  whiteout rules (:mod:`layerfs.overlayfmt`), and ``which``.

Diff dirs are always given **top layer first**.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import TYPE_CHECKING

from layerfs.fs.index.build import (
    INDEX_FILE,
    LayerPin,
    LayerReadError,
    layer_index,
    scan_layer,
    upper_dirs_in_use,
    walk_diff,
)
from layerfs.fs.index.format import Entry, IndexFormatError, LayerIndex
from layerfs.fs.index.merge import (
    MAX_LAYERS,
    ROOT_INO,
    Attr,
    Provenance,
    UnionIndex,
    explain,
    merge,
)
from layerfs.overlayfmt import COMMON_HIDDEN_PREFIXES, check_format

if TYPE_CHECKING:
    from layerfs.store.layers import Store
    from layerfs.store.record import Layer

HIDDEN_XATTR_PREFIXES = COMMON_HIDDEN_PREFIXES
"""Xattr prefixes no view ever lists, whatever the store format (``trusted.overlay.``); the
format's other internal xattrs are already absent from :meth:`UnionIndex.xattrs`."""

__all__ = [
    "HIDDEN_XATTR_PREFIXES",
    "INDEX_FILE",
    "MAX_LAYERS",
    "ROOT_INO",
    "Attr",
    "Entry",
    "IndexFormatError",
    "LayerIndex",
    "LayerPin",
    "LayerReadError",
    "Provenance",
    "UnionIndex",
    "build_index",
    "chain_pins",
    "open_index",
    "walk_diff",
    "which",
]


def _check_chain(diff_dirs: Sequence[str | bytes]) -> list[bytes]:
    if not diff_dirs:
        raise ValueError("a chain needs at least one layer")
    if len(diff_dirs) > MAX_LAYERS:
        raise ValueError(f"chain has {len(diff_dirs)} layers, at most {MAX_LAYERS} supported")
    return [os.path.abspath(os.fsencode(d)) for d in diff_dirs]


def chain_pins(store: Store, chain: Sequence[Layer]) -> list[LayerPin]:
    """The :class:`LayerPin` of each layer of *chain* (records as returned by
    ``Store.chain``): its recorded diff digest, tar-split file and index file. The caller needs
    no lock: the key is checked against the files themselves when the index is opened."""
    return [
        LayerPin(
            la.id,
            la.diff_digest,
            store.tar_split_path(la.id),
            os.path.join(store.layer_dir(la.id), INDEX_FILE),
        )
        for la in chain
    ]


def build_index(diff_dirs: Sequence[str | bytes], whiteout_format: str = "kernel") -> UnionIndex:
    """Scan every layer of the chain *diff_dirs* (top first) live and merge them; nothing is
    read from or written to disk besides the layers. Raises LayerReadError when a layer
    cannot be read, ValueError for an empty or too long chain."""
    fmt = check_format(whiteout_format)
    dirs = _check_chain(diff_dirs)
    return merge(dirs, [scan_layer(d) for d in dirs], fmt)


def open_index(
    diff_dirs: Sequence[str | bytes],
    pins: Sequence[LayerPin | None] | None = None,
    *,
    whiteout_format: str = "kernel",
) -> tuple[UnionIndex, bool]:
    """The view of *diff_dirs* (top first): each layer's index loaded from beside it when the
    layer is pinned (see :mod:`layerfs.fs.index.build`) and valid, else built; then merged.
    *pins* has one entry per diff dir (``None``: scan live). Returns (index, every layer's
    index came from disk)."""
    fmt = check_format(whiteout_format)
    dirs = _check_chain(diff_dirs)
    if pins is None or isinstance(pins, (str, bytes, os.PathLike)):
        pins = [None] * len(dirs)  # an old-style single cache path: never used any more
    if len(pins) != len(dirs):
        raise ValueError(f"{len(pins)} layer pins for {len(dirs)} layers")
    loaded = []
    all_loaded = True
    upper_dirs = upper_dirs_in_use() if any(pins) else set()  # one mountinfo read per mount
    for d, pin in zip(dirs, pins, strict=True):
        li, was_loaded = layer_index(d, pin, upper_dirs)
        loaded.append(li)
        all_loaded = all_loaded and was_loaded
    return merge(dirs, loaded, fmt), all_loaded


def which(
    diff_dirs: Sequence[str | bytes], path: str | bytes, whiteout_format: str = "kernel"
) -> Provenance:
    """Explain *path* in the chain *diff_dirs* (top first), scanning the layers live."""
    fmt = check_format(whiteout_format)
    dirs = _check_chain(diff_dirs)
    return explain([scan_layer(d) for d in dirs], fmt, path)
