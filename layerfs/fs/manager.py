"""Mount management: resolve a target, keep ``mountpoints.json`` counts, start and stop daemons.

One daemon serves one layer's view. Counts live in ``mountpoints.json`` in the Go format, so
a layer mounted by ``containers-storage`` (a kernel overlay) and one mounted by layerfs share
the same records: mounting a live mount only adds to its count and returns its path, as Go
does. What Go's records cannot hold — the daemon's pid — is kept beside them in
``<runroot>/layerfs/daemons/<id>.json``.

Locks, outermost first:
1. ``<runroot>/layerfs/locks/<id>.lock`` — a ``filelock`` (``flock``) lock that only
   layerfs processes take. It makes N concurrent ``mount`` calls of one layer start exactly
   one daemon. ``flock`` does not exclude Go processes, which is fine here: Go never
   starts our daemons, and the shared counts below are under the fcntl lock.
2. ``layers.lock`` (shared), then ``mountpoints.lock`` (write), for short updates only,
   never while a daemon builds its index, so Go processes are not held up by a slow mount.
   ``layers.lock`` matters: containers-storage 1.43 loads mountpoints.json when it opens
   the store and rewrites it from that copy whenever it saves, all under ``layers.lock``;
   an update made while it held only that lock would be overwritten.

A mount is recorded (count + 1 at its path) *before* its daemon starts, and undone if the
start fails. A ``mount`` killed in between leaves either a live view with its record, or a
record whose path is not mounted, which the next repair resets: never a view nobody knows.

Repairs done on the way (each mount, unmount, mounted and ps): a recorded FUSE mount
whose daemon died ("transport endpoint is not connected", or a dead pid) is detached and
its record dropped; a count whose path is no longer mounted (a reboot, a manual umount)
is reset.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import time
from collections.abc import Iterator
from dataclasses import dataclass

from filelock import FileLock

from layerfs.errors import InvalidArgumentError, LayerUnknownError, MountError
from layerfs.fs import mount as fuse_mount
from layerfs.fs.index import chain_pins
from layerfs.store.jsonfile import atomic_write
from layerfs.store.layers import Store
from layerfs.store.mounts import MountRecord

log = logging.getLogger(__name__)

INDEX_FILE = "layerfs.index"


@dataclass(frozen=True)
class MountInfo:
    """A layer's view as ``ps`` shows it."""

    layer_id: str
    names: tuple[str, ...]
    path: str
    count: int
    pid: int | None
    state: str  # "live", "stale" (recorded, not mounted) or "dead" (daemon gone)


class MountManager:
    """Mount and unmount layer views of one store."""

    def __init__(self, store: Store) -> None:
        self.store = store
        self.state_dir = os.path.join(store.runroot, "layerfs")
        self.daemons_dir = os.path.join(self.state_dir, "daemons")
        self.locks_dir = os.path.join(self.state_dir, "locks")
        self.logs_dir = os.path.join(self.state_dir, "logs")

    # ------------------------------------------------------------------ resolution

    def resolve(self, target: str) -> str:
        """Layer id for a layer id/name/prefix or an image name/id."""
        try:
            return self.store.get(target).id
        except LayerUnknownError:
            top = self.store.images.top_layer_of(target)
            if top is None:
                raise LayerUnknownError(target, "no layer or image has this name or id") from None
            return self.store.get(top).id

    def _resolve_target_or_path(self, target: str) -> str:
        if os.path.isabs(target) or os.path.exists(target):
            path = os.path.realpath(target)
            for record in self.store.mount_table.snapshot().values():
                if os.path.realpath(record.path) == path:
                    return record.id
            if not self.store.exists(target):
                raise MountError(f"{target}: no layer is recorded as mounted there")
        return self.resolve(target)

    @contextlib.contextmanager
    def _counts(self) -> Iterator[dict[str, MountRecord]]:
        """The mount table for update, under ``layers.lock`` (shared) and ``mountpoints.lock``."""
        with self.store.lock.read(), self.store.mount_table.update() as table:
            yield table

    @contextlib.contextmanager
    def _layer_lock(self, layer_id: str) -> Iterator[None]:
        os.makedirs(self.locks_dir, mode=0o700, exist_ok=True)
        with FileLock(os.path.join(self.locks_dir, f"{layer_id}.lock")):
            yield

    # ------------------------------------------------------------------ daemon records

    def _daemon_file(self, layer_id: str) -> str:
        return os.path.join(self.daemons_dir, f"{layer_id}.json")

    def _daemon_pid(self, layer_id: str, path: str | None = None) -> int | None:
        """The recorded daemon pid, else (given the view's path) the one found in /proc."""
        try:
            with open(self._daemon_file(layer_id)) as f:
                pid = json.load(f).get("pid")
        except (OSError, ValueError):
            pid = None
        if isinstance(pid, int):
            return pid
        return fuse_mount.find_daemon_pid(path) if path else None

    def _save_daemon(self, layer_id: str, pid: int, path: str) -> None:
        os.makedirs(self.daemons_dir, mode=0o700, exist_ok=True)
        record = {"pid": pid, "path": path, "started": time.time()}
        atomic_write(self._daemon_file(layer_id), json.dumps(record).encode(), durable=False)

    def _drop_daemon(self, layer_id: str) -> None:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self._daemon_file(layer_id))

    # ------------------------------------------------------------------ health

    def _state(self, record: MountRecord) -> str:
        """live, stale or dead for a record with count > 0."""
        path = record.path
        if fuse_mount.is_dead_fuse_mount(path):
            return "dead"
        if not fuse_mount.is_mountpoint(path):
            return "stale"
        pid = self._daemon_pid(record.id)
        if pid is not None and not fuse_mount.daemon_pid_alive(pid):
            return "dead"
        return "live"

    def _repair(self, table: dict[str, MountRecord], layer_id: str) -> MountRecord | None:
        """Drop a dead or stale record (detaching a dead mount). Caller holds mountpoints.lock
        and the layer's lock. Returns the record if it is live."""
        record = table.get(layer_id)
        if record is None or record.count <= 0:
            return None
        state = self._state(record)
        if state == "live":
            return record
        if state == "dead":
            log.warning("view of layer %s at %s: daemon is gone; detaching", layer_id, record.path)
            fuse_mount.detach(record.path)
        else:
            log.warning(
                "count %d for layer %s is stale (not mounted); reset", record.count, layer_id
            )
        del table[layer_id]
        self._drop_daemon(layer_id)
        return None

    # ------------------------------------------------------------------ operations

    def mount(
        self,
        target: str,
        mountpoint: str | None = None,
        *,
        allow_other: bool = False,
        for_container: bool = False,
        debug: bool = False,
    ) -> tuple[str, str, int]:
        """Mount (or add a user to) the layer's view. Returns (layer id, path, count)."""
        layer_id = self.resolve(target)
        with self._layer_lock(layer_id):
            with self._counts() as table:
                live = self._repair(table, layer_id)
                if live is not None:
                    if mountpoint and os.path.realpath(mountpoint) != os.path.realpath(live.path):
                        raise MountError(
                            f'layer "{layer_id}" is already mounted at {live.path}; '
                            "unmount it before mounting it elsewhere"
                        )
                    live.count += 1
                    return layer_id, live.path, live.count
            chain = self.store.chain(layer_id)
            diff_dirs = [self.store.driver.diff_dir(la.id) for la in chain]
            path = os.path.abspath(mountpoint or self.store.driver.merged_dir(layer_id))
            self._check_mountpoint(path, diff_dirs)
            os.makedirs(path, mode=0o700, exist_ok=True)
            os.makedirs(self.logs_dir, mode=0o700, exist_ok=True)
            self._drop_daemon(layer_id)
            with self._counts() as table:
                table[layer_id] = MountRecord(layer_id, path, 1)
            try:
                pid = fuse_mount.spawn_daemon(
                    diff_dirs,
                    [la.id for la in chain],
                    path,
                    pins=chain_pins(self.store, chain),
                    whiteout_format=self.store.driver.whiteout_format(),
                    log_path=os.path.join(self.logs_dir, f"{layer_id}.log"),
                    allow_other=allow_other,
                    for_container=for_container,
                    debug=debug,
                )
            except BaseException:
                with self._counts() as table:
                    table.pop(layer_id, None)
                raise
            self._save_daemon(layer_id, pid, path)
            return layer_id, path, 1

    def _check_mountpoint(self, path: str, diff_dirs: list[str]) -> None:
        real = os.path.realpath(path)
        for diff in diff_dirs:
            layer_dir = os.path.realpath(os.path.dirname(diff))
            if (
                real == layer_dir
                or real.startswith(os.path.realpath(diff) + os.sep)
                or (real == os.path.realpath(diff))
            ):
                raise InvalidArgumentError(
                    f"mount point {path} is inside layer directory {diff}; "
                    "a view cannot be mounted over its own layers"
                )
            if os.path.realpath(diff).startswith(real + os.sep):
                raise InvalidArgumentError(
                    f"mount point {path} would hide layer directory {diff} of its own chain"
                )
        if fuse_mount.is_mountpoint(path) or fuse_mount.is_dead_fuse_mount(path):
            raise InvalidArgumentError(f"mount point {path} is already a mount point")

    def unmount(self, target: str, *, force: bool = False) -> tuple[str, int]:
        """Drop one user of the view (all with ``force``); unmount at zero.

        Returns (layer id, remaining count). Unmounting a layer that is not mounted succeeds
        with count 0, as containers-storage does.
        """
        layer_id = self._resolve_target_or_path(target)
        with self._layer_lock(layer_id), self._counts() as table:
            record = self._repair(table, layer_id)
            if record is None:
                return layer_id, 0
            if force:
                record.count = 1
            if record.count > 1:
                record.count -= 1
                return layer_id, record.count
            fuse_mount.unmount(record.path, self._daemon_pid(layer_id, record.path))
            del table[layer_id]
            self._drop_daemon(layer_id)
            if record.path == self.store.driver.merged_dir(layer_id):
                with contextlib.suppress(OSError):
                    os.rmdir(record.path)  # as the overlay driver's Put does
            return layer_id, 0

    def mounted(self, target: str) -> int:
        """The layer's mount count after repairing dead or stale records."""
        layer_id = self.resolve(target)
        with self._layer_lock(layer_id), self._counts() as table:
            record = self._repair(table, layer_id)
            return record.count if record else 0

    def repair(self, target: str) -> None:
        """Detach a dead view and drop stale counts of one layer, if it has a record."""
        try:
            layer_id = self.resolve(target)
        except LayerUnknownError:
            return
        if layer_id not in self.store.mount_table.snapshot():
            return
        with self._layer_lock(layer_id), self._counts() as table:
            self._repair(table, layer_id)

    def ps(self) -> list[MountInfo]:
        """Every recorded view, after repairing dead and stale ones."""
        live: list[MountRecord] = []
        for layer_id in list(self.store.mount_table.snapshot()):
            with self._layer_lock(layer_id), self._counts() as table:
                record = self._repair(table, layer_id)
                if record is not None:
                    live.append(MountRecord(record.id, record.path, record.count))
        out = []
        for record in live:  # outside the locks: a store read may need the write lock
            try:
                names = tuple(self.store.get(record.id).names)
            except LayerUnknownError:
                names = ()
            pid = self._daemon_pid(record.id, record.path)
            out.append(MountInfo(record.id, names, record.path, record.count, pid, "live"))
        return out
