"""Image records: ``<graphroot>/overlay-images/images.json`` under ``images.lock``.

The layer store reads images to refuse deleting an image's top layer and to resolve an
image name to its top layer for ``mount``; ``import-image`` adds records. Records are kept
as decoded JSON objects so that keys written by Go survive a rewrite unchanged. Big data
lives in ``overlay-images/<id>/<file>`` with the same file-name encoding as layer big data.

Lock order: ``layers.lock`` before ``images.lock``, as in containers/storage.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from collections.abc import Callable
from typing import Any

from layerfs.errors import CorruptStoreError, LayerfsError
from layerfs.store.bigdata import big_data_file_name
from layerfs.store.jsonfile import atomic_write, read_optional
from layerfs.store.lockfile import LockFile
from layerfs.store.record import format_created, go_json_dumps

#: Key order of an image record as containers/storage writes it.
IMAGE_KEYS = (
    "id",
    "digest",
    "names",
    "names-history",
    "layer",
    "mapped-layers",
    "metadata",
    "big-data-names",
    "big-data-sizes",
    "big-data-digests",
    "created",
    "flags",
)


def _is_str_list(value: Any) -> bool:
    return isinstance(value, list) and all(isinstance(v, str) for v in value)


#: The fields layerfs reads, and the JSON types Go's decoder accepts for them (null is
#: accepted too wherever Go's field is a slice, map or pointer).
_FIELD_CHECKS: dict[str, tuple[str, Callable[[Any], bool]]] = {
    "id": ("a string", lambda v: isinstance(v, str) and v != ""),
    "names": ("a list of strings", lambda v: v is None or _is_str_list(v)),
    "names-history": ("a list of strings", lambda v: v is None or _is_str_list(v)),
    "mapped-layers": ("a list of strings", lambda v: v is None or _is_str_list(v)),
    "big-data-names": ("a list of strings", lambda v: v is None or _is_str_list(v)),
    "layer": ("a string", lambda v: isinstance(v, str)),
    "digest": ("a string", lambda v: isinstance(v, str)),
    "metadata": ("a string", lambda v: isinstance(v, str)),
    "created": ("a string", lambda v: isinstance(v, str)),
    "big-data-sizes": (
        "an object of integers",
        lambda v: v is None or (isinstance(v, dict) and all(type(x) is int for x in v.values())),
    ),
}


def _record_problem(record: dict[str, Any]) -> str | None:
    """What is wrong with an images.json record's field types (as Go's decoder would refuse
    them), or None. ``id`` is required; the other fields may be missing."""
    if "id" not in record:
        return "has no id"
    for key, (kind, ok) in _FIELD_CHECKS.items():
        if key in record and not ok(record[key]):
            return f'"{key}" is not {kind}'
    return None


class ImageUnknownError(LayerfsError):
    """No image has this id, name or unique id prefix (containers/storage ErrImageUnknown)."""

    def __init__(self, ref: str, detail: str = "") -> None:
        self.ref = ref
        super().__init__(f'image "{ref}" not known' + (f": {detail}" if detail else ""))


class AmbiguousImageError(ImageUnknownError):
    """An id prefix matches more than one image."""

    def __init__(self, ref: str, candidates: list[str]) -> None:
        self.candidates = candidates
        super().__init__(ref, "ambiguous id prefix, candidates: " + ", ".join(sorted(candidates)))


def find_image(images: list[dict[str, Any]], ref: str) -> dict[str, Any]:
    """The record in *images* (decoded ``images.json``) with id *ref*, else name *ref*, else
    the one id starting with *ref*. Pure: the caller loaded *images* under ``images.lock``.
    Raises :class:`ImageUnknownError` / :class:`AmbiguousImageError`."""
    for image in images:
        if image.get("id") == ref:
            return image
    for image in images:
        if ref in (image.get("names") or []):
            return image
    matches = [i for i in images if ref and str(i.get("id", "")).startswith(ref)]
    if len(matches) > 1:
        raise AmbiguousImageError(ref, [str(i.get("id")) for i in matches])
    if not matches:
        raise ImageUnknownError(ref)
    return matches[0]


def image_size(record: dict[str, Any], layer: Callable[[str], tuple[int, str] | None]) -> int:
    """The size containers/storage's ``ImageSize`` reports: every layer reachable from the top
    layer and the mapped top layers (each once) plus the image's big-data sizes. *layer* maps
    a layer id to (its ``Size()``, or 0 when unknown; its parent id), or None for a layer
    that is not there (skipped, as Go does). Takes no lock; the caller's *layer* decides."""
    queue = [str(i) for i in [record.get("layer"), *(record.get("mapped-layers") or [])] if i]
    seen: set[str] = set()
    total = 0
    while queue:
        layer_id = queue.pop()
        if layer_id in seen:
            continue
        seen.add(layer_id)
        found = layer(layer_id)
        if found is None:
            continue
        size, parent = found
        total += max(size, 0)
        if parent:
            queue.append(parent)
    sizes = record.get("big-data-sizes") or {}
    return total + sum(int(v) for v in sizes.values() if isinstance(v, int))


class ImageRecords:
    """Read access to the image store of one graph root."""

    def __init__(self, graphroot: str, *, read_only: bool = False) -> None:
        self.dir = os.path.join(graphroot, "overlay-images")
        self.path = os.path.join(self.dir, "images.json")
        self.lock = LockFile(os.path.join(self.dir, "images.lock"), read_only=read_only)

    def load_unlocked(self) -> list[dict[str, Any]]:
        """Decode images.json; the caller holds ``images.lock``. Missing or empty is ``[]``."""
        data = read_optional(self.path)
        if not data:
            return []
        try:
            decoded = json.loads(data.decode("utf-8"))
        except (UnicodeDecodeError, ValueError) as exc:
            raise CorruptStoreError(f"{self.path}: not valid JSON ({exc})") from exc
        if decoded is None:
            return []
        if not isinstance(decoded, list) or not all(isinstance(i, dict) for i in decoded):
            raise CorruptStoreError(f"{self.path}: expected a JSON array of image records")
        for n, record in enumerate(decoded):
            problem = _record_problem(record)
            if problem:
                raise CorruptStoreError(f"{self.path}: image record {n + 1}: {problem}")
        return decoded

    def load(self) -> list[dict[str, Any]]:
        """Decode images.json under the shared lock (no lock file is created for a read)."""
        if not os.path.exists(self.path):
            return []
        with self.lock.read():
            return self.load_unlocked()

    def images_with_top_layer(self, layer_id: str) -> list[str]:
        """Ids of the images whose top layer is ``layer_id``."""
        return [
            str(image.get("id"))
            for image in self.load()
            if image.get("layer") == layer_id or layer_id in (image.get("mapped-layers") or [])
        ]

    def top_layer_of(self, name_or_id: str) -> str | None:
        """The top layer of the image with this name, id or unique id prefix, or None (an
        ambiguous prefix included)."""
        try:
            return str(self.get(name_or_id).get("layer") or "") or None
        except ImageUnknownError:
            return None

    def json_bytes(self, images: list[dict[str, Any]] | None = None) -> bytes:
        """*images* (default: every record, read under the shared lock) encoded as Go encodes
        ``images.json`` (the bytes of ``containers-storage images -j``)."""
        return _encode_images(self.load() if images is None else images)

    def get(self, ref: str) -> dict[str, Any]:
        """The record of the image with this id, name or unique id prefix (looked up in that
        order, as containers/storage does), under the shared ``images.lock``.

        Raises :class:`ImageUnknownError` when nothing matches and
        :class:`AmbiguousImageError` (listing the candidates) for a prefix of several ids."""
        return find_image(self.load(), ref)

    def add_image(
        self,
        image_id: str,
        *,
        names: list[str],
        top_layer: str,
        manifest: bytes,
        manifest_digest: str,
        config: bytes,
        config_digest: str,
    ) -> dict[str, Any]:
        """Add (or update) an image record with its manifest and config as big data.

        Names move from any other image that holds them, as in Go. The caller holds
        ``layers.lock`` (the top layer must not vanish meanwhile); this takes ``images.lock``.
        Use :meth:`layerfs.store.layers.Store.add_image`, which holds it and checks the top
        layer, rather than calling this directly.
        """
        os.makedirs(self.dir, mode=0o700, exist_ok=True)
        items = {
            config_digest: config,
            f"manifest-{manifest_digest}": manifest,
            "manifest": manifest,
        }
        with self.lock.write() as held:
            images = self.load_unlocked()
            record = next((i for i in images if i.get("id") == image_id), None)
            if record is None:
                record = {"id": image_id, "created": format_created(time.time_ns())}
                images.append(record)
            for other in images:
                if other is not record and other.get("names"):
                    other["names"] = [n for n in other["names"] if n not in names]
            record["digest"] = manifest_digest
            record["names"] = list(dict.fromkeys([*(record.get("names") or []), *names]))
            history = [n for n in (record.get("names-history") or []) if n not in names]
            record["names-history"] = [*names, *history]
            record["layer"] = top_layer
            data_dir = os.path.join(self.dir, image_id)
            os.makedirs(data_dir, mode=0o700, exist_ok=True)
            big_names = list(record.get("big-data-names") or [])
            sizes = dict(record.get("big-data-sizes") or {})
            digests = dict(record.get("big-data-digests") or {})
            for key, data in items.items():
                atomic_write(os.path.join(data_dir, big_data_file_name(key)), data)
                if key not in big_names:
                    big_names.append(key)
                sizes[key] = len(data)
                digests[key] = "sha256:" + hashlib.sha256(data).hexdigest()
            record["big-data-names"] = big_names
            record["big-data-sizes"] = sizes
            record["big-data-digests"] = digests
            held.record_write()
            atomic_write(self.path, _encode_images(images))
            return dict(record)


def _encode_images(images: list[dict[str, Any]]) -> bytes:
    """images.json bytes: Go key order, empty values omitted, map keys sorted."""
    encoded = []
    for image in images:
        ordered: dict[str, Any] = {}
        for key in IMAGE_KEYS:
            value = image.get(key)
            if key in ("id", "created") or value:
                ordered[key] = dict(sorted(value.items())) if isinstance(value, dict) else value
        for key, value in image.items():
            ordered.setdefault(key, value)
        encoded.append(go_json_dumps(ordered))
    return ("[" + ",".join(encoded) + "]").encode("utf-8")
