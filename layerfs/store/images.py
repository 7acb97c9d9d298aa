"""Image records: ``<graphroot>/overlay-images/images.json`` under ``images.lock``.

The layer store reads images to refuse deleting an image's top layer and to resolve an
image name to its top layer for ``mount``. Records are kept as decoded JSON objects so that
keys written by Go survive a rewrite unchanged.
"""

from __future__ import annotations

import json
import os
from typing import Any

from layerfs.errors import CorruptStoreError
from layerfs.store.jsonfile import read_optional
from layerfs.store.lockfile import LockFile


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
        """The top layer of the image with this name, id or unique id prefix, or None."""
        images = self.load()
        for image in images:
            if image.get("id") == name_or_id:
                return str(image.get("layer") or "") or None
        for image in images:
            if name_or_id in (image.get("names") or []):
                return str(image.get("layer") or "") or None
        matches = [i for i in images if str(i.get("id", "")).startswith(name_or_id)]
        if name_or_id and len(matches) == 1:
            return str(matches[0].get("layer") or "") or None
        return None
