"""What layerfs knows about its own views, beside Go's ``mountpoints.json``.

Files under ``<runroot>/layerfs/`` (layerfs only; the Go tool never reads them):

- ``locks/<id>.lock`` — the per-layer ``flock`` lock every layerfs mount command of the
  layer holds from before it writes its record until the daemon is ready (or the start was
  undone). Never taken while a store lock (``layers.lock``/``mountpoints.lock``) is held;
  code under a store lock may only *test* it (:func:`layer_busy`, non-blocking).
- ``daemons/<id>.json`` — one record per daemon layerfs started: pid, mount point, the
  mount options it was started with, and whether the view is recorded in
  ``mountpoints.json`` (``go_visible``) or private to layerfs (its count is then kept here).

The pending rule (one rule, honoured by ``Store._refuse_if_mounted`` and the mount
manager): a ``mountpoints.json`` record with a count whose path is not (yet) a mount point
is **pending** while ``locks/<id>.lock`` is held by someone — a layerfs ``mount`` is
starting that view — and **stale** otherwise (a reboot, a manual umount, a killed mount
command): a pending record is honoured like a live mount, a stale one is dropped.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import math
import os
import time
from dataclasses import dataclass, field
from typing import TypeGuard

from layerfs.store.jsonfile import atomic_write

STATE_DIR = "layerfs"


def state_dir(runroot: str) -> str:
    """``<runroot>/layerfs``."""
    return os.path.join(runroot, STATE_DIR)


def layer_lock_path(runroot: str, layer_id: str) -> str:
    """``<runroot>/layerfs/locks/<id>.lock``."""
    return os.path.join(state_dir(runroot), "locks", f"{layer_id}.lock")


def daemon_file(runroot: str, layer_id: str) -> str:
    """``<runroot>/layerfs/daemons/<id>.json``."""
    return os.path.join(state_dir(runroot), "daemons", f"{layer_id}.json")


def layer_busy(runroot: str, layer_id: str) -> bool:
    """True while another open file holds the layer's layerfs lock (a mount is starting).

    Never blocks. Safe under a store lock (the per-layer lock is outermost, so waiting for
    it here could deadlock; testing it cannot).
    """
    try:
        fd = os.open(layer_lock_path(runroot, layer_id), os.O_RDONLY | os.O_CLOEXEC)
    except (FileNotFoundError, PermissionError):
        return False  # no layerfs command of ours can hold a lock we cannot open
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as exc:
        if exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN):
            return True
        raise
    finally:
        os.close(fd)  # closing drops a lock we may have taken
    return False


@dataclass
class DaemonRecord:
    """A daemon layerfs started for one layer's view.

    ``go_visible``: the view's count is in ``mountpoints.json`` (Go shares it); otherwise
    the view is private to layerfs and ``count`` here is its count. ``read_write``: the view
    writes into the layer's ``diff/`` (its upper dir); such a view is always ``go_visible``,
    so that Go's ``mount`` of the layer shares it instead of mounting a second writer.
    """

    layer_id: str
    pid: int
    path: str
    for_container: bool = False
    allow_other: bool = False
    go_visible: bool = True
    count: int = 1
    read_write: bool = False
    started: float = field(default_factory=time.time)
    #: The daemon's mount namespace (``mnt:[N]``, :func:`layerfs.userns.namespace_id`); ""
    #: in records written before layerfs knew namespaces. A view is only visible there.
    mnt_ns: str = ""
    id_options: tuple[str, ...] = ()
    """The view's id mapping options (``uidmapping=...``, :mod:`layerfs.fs.idmap`); a view
    is shared only with a request for the same ones."""

    def options(self) -> str:
        """The live options as a person reads them."""
        opts = ["read-write" if self.read_write else "read-only"]
        opts.append("suid,dev (for a container)" if self.for_container else "nosuid,nodev")
        if self.allow_other:
            opts.append("allow_other")
        opts += self.id_options
        return ", ".join(opts)


def read_daemon(runroot: str, layer_id: str) -> DaemonRecord | None:
    """The daemon record of a layer, or None (missing, unreadable, or with a field of the
    wrong type or out of range: such a record is never acted on)."""
    try:
        with open(daemon_file(runroot, layer_id), "rb") as f:
            raw = json.loads(f.read())
    except (OSError, ValueError):
        return None
    if not isinstance(raw, dict):
        return None
    pid, path, count = raw.get("pid"), raw.get("path"), raw.get("count", 1)
    started = raw.get("started", 0)
    keys = ("for_container", "allow_other", "go_visible", "read_write")
    flags = [raw.get(k, k == "go_visible") for k in keys]
    id_options = raw.get("id_options", [])
    if not isinstance(id_options, list) or not all(isinstance(o, str) for o in id_options):
        return None
    if (
        not _is_int(pid)
        or not 0 <= pid <= _PID_MAX
        or not isinstance(path, str)
        or not os.path.isabs(path)
        or "\0" in path
        or not _is_int(count)
        or count < 1
        or not (
            (_is_int(started) and abs(started) < 1 << 53)
            or (isinstance(started, float) and math.isfinite(started))
        )
        or not all(isinstance(f, bool) for f in flags)
        or not isinstance(raw.get("mnt_ns", ""), str)
    ):
        return None  # damaged or foreign: never acted on
    return DaemonRecord(
        layer_id,
        pid,
        path,
        for_container=flags[0],
        allow_other=flags[1],
        go_visible=flags[2],
        read_write=flags[3],
        count=count,
        started=float(started),
        mnt_ns=raw.get("mnt_ns", ""),
        id_options=tuple(id_options),
    )


_PID_MAX = 1 << 22  # the kernel's largest pid_max (PID_MAX_LIMIT on 64-bit)


def _is_int(value: object) -> TypeGuard[int]:
    return isinstance(value, int) and not isinstance(value, bool)


def write_daemon(runroot: str, record: DaemonRecord) -> None:
    """Save a daemon record. Caller holds the layer's layerfs lock."""
    path = daemon_file(runroot, record.layer_id)
    os.makedirs(os.path.dirname(path), mode=0o700, exist_ok=True)
    data = {
        "pid": record.pid,
        "path": record.path,
        "for_container": record.for_container,
        "allow_other": record.allow_other,
        "go_visible": record.go_visible,
        "read_write": record.read_write,
        "count": record.count,
        "started": record.started,
        "mnt_ns": record.mnt_ns,
    }
    if record.id_options:
        data["id_options"] = list(record.id_options)
    atomic_write(path, json.dumps(data).encode(), durable=False)


def drop_daemon(runroot: str, layer_id: str) -> None:
    """Remove a daemon record. Caller holds the layer's layerfs lock."""
    with contextlib.suppress(FileNotFoundError):
        os.unlink(daemon_file(runroot, layer_id))


def daemon_records(runroot: str) -> list[DaemonRecord]:
    """Every daemon record under the run root."""
    try:
        names = sorted(os.listdir(os.path.join(state_dir(runroot), "daemons")))
    except FileNotFoundError:
        return []
    out = []
    for name in names:
        if name.endswith(".json"):
            record = read_daemon(runroot, name[: -len(".json")])
            if record is not None:
                out.append(record)
    return out


def is_layerfs_daemon(pid: int, mountpoint: str) -> bool:
    """True if *pid* is a layerfs daemon serving *mountpoint* (guards against pid reuse)."""
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            argv = f.read().split(b"\0")
    except OSError:
        return False
    return os.fsencode(os.path.abspath(mountpoint)) in argv and any(
        arg.endswith(b"layerfs.fs.daemon") for arg in argv
    )


def container_layers(root: str) -> set[str]:
    """Ids of the layers that Go's container records (``<root>/overlay-containers/
    containers.json``) name as a container's writable layer: Go's ``mount`` of such a layer
    hands the result to the container as its root file system.

    Read without ``containers.lock``: Go replaces the file atomically (rename), so a read
    sees one whole version; an unreadable file counts as no containers.
    """
    path = os.path.join(root, "overlay-containers", "containers.json")
    try:
        with open(path, "rb") as f:
            records = json.loads(f.read() or b"[]")
    except (OSError, ValueError):
        return set()
    if not isinstance(records, list):
        return set()
    return {r["layer"] for r in records if isinstance(r, dict) and isinstance(r.get("layer"), str)}
