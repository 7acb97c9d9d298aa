"""Moving layer contents into and out of the store: import, applydiff, diff, changes.

These functions join the store (records, locks, crash discipline) to the tar machinery in
:mod:`layerfs.archive.apply` and :mod:`layerfs.archive.export`. Imports run inside
:meth:`Store.create_layer`/``update_layer``, so the layer is flagged ``incomplete`` until its
contents and digests are in place, and a failure removes it again.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from typing import Any, BinaryIO

from layerfs.archive.apply import ApplyOptions, ApplyResult, apply_tar
from layerfs.archive.compression import Compression, open_compressor
from layerfs.archive.export import Change, changes, diff_size, write_diff
from layerfs.errors import InvalidArgumentError
from layerfs.store.layers import LayerContents, Store
from layerfs.store.record import Layer

Progress = Callable[[int, int], None]


def result_fields(result: ApplyResult) -> dict[str, Any]:
    """Record fields (Layer attribute names) from an apply result."""
    return {
        "compressed_diff_digest": result.compressed_digest,
        "compressed_size": result.compressed_size,
        "diff_digest": result.uncompressed_digest,
        "diff_size": result.uncompressed_size,
        "compression": int(result.compression),
        "uidset": list(result.uidset),
        "gidset": list(result.gidset),
    }


def _filler(
    store: Store,
    stream: BinaryIO,
    progress: Progress | None,
    check: Callable[[ApplyResult], None] | None = None,
) -> Callable[[Layer, list[str]], dict[str, Any]]:
    """A populate/apply callback that extracts ``stream`` into the layer it is given.

    It runs under the store's write lock, inside create_layer/update_layer."""

    def fill(layer: Layer, lowers: list[str]) -> dict[str, Any]:
        with contextlib.suppress(FileNotFoundError):  # a view index of the old contents
            os.unlink(os.path.join(store.layer_dir(layer.id), "layerfs.index"))
        result = apply_tar(
            stream,
            store.diff_dir(layer.id),
            lower_diff_dirs=lowers,
            tar_split_path=store.tar_split_path(layer.id),
            whiteout_format=store.whiteout_format(),
            progress=progress,
            options=ApplyOptions.from_storage_opts(store.storage_opts),
        )
        if check is not None:
            check(result)
        return result_fields(result)

    return fill


def import_layer(
    store: Store,
    stream: BinaryIO,
    *,
    layer_id: str | None = None,
    names: Iterable[str] = (),
    parent: str | None = None,
    check: Callable[[ApplyResult], None] | None = None,
    progress: Progress | None = None,
) -> Layer:
    """Create a layer from a (possibly compressed) tar stream.

    ``check`` may inspect the result (digests) and raise to reject the layer; the layer is
    then removed as if the tar had been bad. Takes the store's write lock for the whole
    import, as containers/storage does.
    """
    fill = _filler(store, stream, progress, check)
    return store.create_layer(layer_id, names=names, parent=parent, populate=fill)


def apply_diff(
    store: Store, ref: str, stream: BinaryIO, *, progress: Progress | None = None
) -> Layer:
    """Apply a tar stream on top of an existing layer's contents."""
    return store.update_layer(ref, _filler(store, stream, progress))


@contextmanager
def _diff_inputs(store: Store, ref: str, from_ref: str | None) -> Iterator[LayerContents]:
    """The layer's files under one shared lock, checked against ``from_ref`` (its parent).

    Resolving and reading happen under the same lock acquisition, so the layer cannot be
    deleted or changed (applydiff) between the two.
    """
    with store.reading_layer(ref) as contents:
        layer = contents.layer
        if from_ref is not None:
            base = store.get(from_ref)
            if base.id != layer.parent:
                raise InvalidArgumentError(
                    f'diff of layer "{layer.id}" against "{base.id}": only its parent '
                    f'("{layer.parent or "none"}") is supported'
                )
        yield contents


def export_diff(
    store: Store,
    ref: str,
    out: BinaryIO,
    *,
    from_ref: str | None = None,
    compression: Compression | None = None,
) -> Compression:
    """Write the layer's diff as a tar stream; returns the compression used.

    The original bytes are replayed when the layer has a tar-split; otherwise a tar is
    generated from ``diff/``. ``compression`` defaults to the layer's own compression.
    Holds ``layers.lock`` shared from resolving ``ref`` to the last byte written.
    """
    with _diff_inputs(store, ref, from_ref) as contents:
        chosen = Compression(contents.layer.compression) if compression is None else compression
        sink = open_compressor(out, chosen)
        write_diff(sink, contents.diff_dir, contents.lower_diff_dirs, contents.tar_split)
        if sink is not out:
            sink.close()
    return chosen


def layer_changes(store: Store, ref: str, from_ref: str | None = None) -> list[Change]:
    """Add/Modify/Delete entries of the layer relative to its parent (Go's rules)."""
    with _diff_inputs(store, ref, from_ref) as contents:
        return changes(contents.diff_dir, contents.lower_diff_dirs)


def layer_diff_size(store: Store, ref: str, from_ref: str | None = None) -> int:
    """Sum of regular file sizes in the layer's ``diff/``, as the overlay driver reports."""
    with _diff_inputs(store, ref, from_ref) as contents:
        return diff_size(contents.diff_dir)
