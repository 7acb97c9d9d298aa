"""Mount reference counts: ``<runroot>/overlay-layers/mountpoints.json`` under ``mountpoints.lock``.

The file is an array of ``{"id", "path", "count"}`` objects, one per mounted layer, written
only for counts above zero; ``[]`` when nothing is mounted. Go's ``mount``/``unmount`` and
ours share the file, so every change happens under the write lock with a reload first, and
entries this process does not understand (a layer it does not know) are written back as
they were read.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

from layerfs.errors import CorruptStoreError
from layerfs.store.jsonfile import atomic_write, read_optional
from layerfs.store.lockfile import LockFile
from layerfs.store.record import go_json_dumps


@dataclass
class MountRecord:
    """One mounted layer: where its view is and how many users hold it."""

    id: str
    path: str
    count: int


class MountTable:
    """The mount counts of one store (run root).

    Lock order: a caller that also holds ``layers.lock`` takes it first, as Go does.
    """

    def __init__(self, runroot_layers_dir: str, *, read_only: bool = False) -> None:
        self.dir = runroot_layers_dir
        self.path = os.path.join(runroot_layers_dir, "mountpoints.json")
        self.lock = LockFile(
            os.path.join(runroot_layers_dir, "mountpoints.lock"), read_only=read_only
        )

    def ensure_dir(self) -> None:
        """Create the run-root directory (0700)."""
        os.makedirs(self.dir, mode=0o700, exist_ok=True)

    def _load(self) -> dict[str, MountRecord]:
        data = read_optional(self.path)
        if not data:
            return {}
        try:
            decoded = json.loads(data.decode("utf-8"))
        except (UnicodeDecodeError, ValueError) as exc:
            raise CorruptStoreError(f"{self.path}: not valid JSON ({exc})") from exc
        if decoded is None:
            return {}
        if not isinstance(decoded, list):
            raise CorruptStoreError(f"{self.path}: expected a JSON array")
        table: dict[str, MountRecord] = {}
        for item in decoded:
            if not isinstance(item, dict) or not isinstance(item.get("id"), str):
                raise CorruptStoreError(f"{self.path}: malformed entry {item!r:.80}")
            if "/" in item["id"] or item["id"] in ("", ".", ".."):  # ids name files (locks)
                raise CorruptStoreError(f"{self.path}: unsafe layer id in {item!r:.80}")
            count = item.get("count", 0)
            path = item.get("path", "")
            if not isinstance(count, int) or not isinstance(path, str):
                raise CorruptStoreError(f"{self.path}: malformed entry {item!r:.80}")
            if count > 0:
                table[item["id"]] = MountRecord(item["id"], path, count)
        return table

    def _save(self, table: dict[str, MountRecord]) -> None:
        entries = [
            {"id": r.id, "path": r.path, "count": r.count} for r in table.values() if r.count > 0
        ]
        atomic_write(self.path, go_json_dumps(entries).encode("utf-8"), durable=False)

    def snapshot(self) -> dict[str, MountRecord]:
        """The current counts, read under the shared lock."""
        if not os.path.isdir(self.dir):
            return {}
        with self.lock.read():
            return self._load()

    @contextmanager
    def update(self) -> Iterator[dict[str, MountRecord]]:
        """Yield the table for changes under the write lock; saved if the block changed it."""
        self.ensure_dir()
        with self.lock.write() as held:
            table = self._load()
            before = {k: (v.path, v.count) for k, v in table.items()}
            yield table
            after = {k: (v.path, v.count) for k, v in table.items() if v.count > 0}
            if after != before:
                held.record_write()
                self._save(table)
