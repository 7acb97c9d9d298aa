"""layerfs: a containers/storage-compatible layer store and a FUSE union view of layer chains.

Public API: :class:`Store` (the layer store), :class:`Layer` (one record) and the error
types in :mod:`layerfs.errors`. They are imported on first use, so that processes that need
only a part of the package (the mount daemon above all) start fast.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from layerfs.errors import (
        AmbiguousLayerError,
        ArchiveError,
        CorruptStoreError,
        DuplicateIDError,
        LayerfsError,
        LayerHasChildrenError,
        LayerMountedError,
        LayerUnknownError,
        MountError,
        NameInUseError,
    )
    from layerfs.store.layers import Store
    from layerfs.store.record import Layer

__all__ = [
    "AmbiguousLayerError",
    "ArchiveError",
    "CorruptStoreError",
    "DuplicateIDError",
    "Layer",
    "LayerHasChildrenError",
    "LayerMountedError",
    "LayerUnknownError",
    "LayerfsError",
    "MountError",
    "NameInUseError",
    "Store",
]
__version__ = "0.1.0"

_WHERE = {
    name: {"Store": "layerfs.store.layers", "Layer": "layerfs.store.record"}.get(
        name, "layerfs.errors"
    )
    for name in __all__
}


def __getattr__(name: str) -> Any:
    module = _WHERE.get(name)
    if module is None:
        raise AttributeError(f"module 'layerfs' has no attribute {name!r}")
    return getattr(importlib.import_module(module), name)
