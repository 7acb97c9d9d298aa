"""layerfs: a containers/storage-compatible layer store and a FUSE union view of layer chains.

Public API: :class:`Store` (the layer store), :class:`Layer` (one record) and the error
types in :mod:`layerfs.errors`.
"""

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
