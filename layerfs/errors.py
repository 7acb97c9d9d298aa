"""One exception hierarchy for layerfs.

Every error says what went wrong and, where it applies, which layer and which file or path.
The CLI prints ``layerfs: <message>`` on one line and exits 1 for any :class:`LayerfsError`.
"""

from __future__ import annotations

import os


def describe_os_error(e: OSError) -> str:
    """``path: strerror`` of an OSError (just ``strerror`` without a path), the path decoded
    (never ``b'...'``)."""
    text = e.strerror or type(e).__name__
    if e.filename is not None:
        text = f"{os.fsdecode(e.filename)}: {text}"
    return text


class LayerfsError(Exception):
    """Base of every error layerfs raises on purpose."""


class LayerUnknownError(LayerfsError):
    """No layer matches the given id, name or id prefix (containers/storage ErrLayerUnknown)."""

    def __init__(self, ref: str, detail: str = "") -> None:
        self.ref = ref
        msg = f'layer "{ref}" not known'
        if detail:
            msg += f": {detail}"
        super().__init__(msg)


class AmbiguousLayerError(LayerUnknownError):
    """An id prefix matches more than one layer."""

    def __init__(self, ref: str, candidates: list[str]) -> None:
        self.candidates = candidates
        super().__init__(ref, "ambiguous id prefix, candidates: " + ", ".join(sorted(candidates)))


class DuplicateIDError(LayerfsError):
    """The id given for a new layer is in use (ErrDuplicateID)."""


class NameInUseError(LayerfsError):
    """A name given for a new layer is in use (ErrDuplicateName)."""


class LayerHasChildrenError(LayerfsError):
    """The layer cannot be deleted: other layers name it as parent (ErrLayerHasChildren)."""


class LayerMountedError(LayerfsError):
    """The layer cannot be deleted or changed while it is mounted."""


class LayerUsedByImageError(LayerfsError):
    """The layer is the top layer of an image (ErrLayerUsedByImage)."""


class CorruptStoreError(LayerfsError):
    """A store file cannot be parsed or violates an invariant; nothing was rewritten."""


class StoreReadOnlyError(LayerfsError):
    """A write was attempted on a store opened read-only."""


class InvalidArgumentError(LayerfsError):
    """A caller-supplied value (id, name, key, digest) is malformed."""


class BigDataUnknownError(LayerfsError):
    """A big-data key is not stored for the layer."""


class ArchiveError(LayerfsError):
    """A layer tar stream is malformed or hostile; the message names the entry."""


class MountError(LayerfsError):
    """Mounting or unmounting a union view failed."""


class StoreReentryError(LayerfsError):
    """A store change was asked for from code that runs under the store's own lock.

    ``create_layer``'s ``populate`` and ``update_layer``'s ``apply`` run while the store holds
    ``layers.lock`` exclusively; they may read the store but not change it.
    """


class StoreSyncError(LayerfsError):
    """Syncing a store directory failed: a rename there may not survive a crash."""

    def __init__(self, path: str, exc: OSError) -> None:
        import errno as _errno

        self.errno = exc.errno
        name = _errno.errorcode.get(exc.errno or 0, "error")
        super().__init__(
            f"syncing directory {path}: {exc.strerror} ({name}); "
            "its latest change may not survive a crash"
        )
