"""Mount management: resolve a target, keep mount counts, start and stop daemons.

One daemon serves one layer's view. Counts of views the Go tool may share live in
``mountpoints.json`` in the Go format, so a layer mounted by ``containers-storage`` (a kernel
overlay) and one mounted by layerfs share the same records: mounting a live mount only adds
to its count and returns its path, as Go does. What Go's records cannot hold — the daemon's
pid and the options it was started with — is kept beside them in
``<runroot>/layerfs/daemons/<id>.json`` (:mod:`layerfs.store.pending`).

A layer is **writable** when Go's ``containers.json`` names it as a container's layer, or
its record carries the flag ``layerfs.writeable`` (``create-layer --writeable``; Go keeps
the flag on every rewrite). ``mount`` of a writable layer is read-write unless asked
``read_write=False``; any other layer mounts read-only, and asking it read-write is refused.

Three kinds of layerfs view:

- **shared read-only** (a layer that is not writable): recorded in ``mountpoints.json``
  at ``<root>/overlay/<id>/merged`` or a given mount point; Go's ``mount`` of the layer
  returns it and counts it.
- **read-write** (a writable layer): lowers = the parent chain, upper = the layer's
  ``diff/``, work = its ``work/`` (Go's overlay layout), whiteouts in the store's format.
  Recorded in ``mountpoints.json`` like a shared view, at ``merged`` by default, because
  Go's ``mount`` of the layer is a read-write kernel overlay on the same upper: recorded,
  Go shares our view (count + 1) instead of mounting a second writer. In the other order a
  live Go mount is shared the same way. There is never more than one writer on an upper.
- **private read-only** (a writable layer asked read-only): Go's ``mount`` would hand a
  recorded view to a container as its writable root, so the view is never written to
  ``mountpoints.json``; its count is kept in the daemon record and its default mount point
  is ``<runroot>/layerfs/views/<id>``. Go's own mount of the layer is independent (it is the
  one writer; the private view reads the upper live). A read-write request while our
  private view lives, or the reverse, is refused (one daemon per layer).

A view is only shared with a request that asks for the same options (read-write or not,
``--for-container``, ``--allow-other``); a different request is refused, naming the live
options.

Locks, outermost first:
1. ``<runroot>/layerfs/locks/<id>.lock`` — a ``filelock`` (``flock``) lock that only layerfs
   processes take, held by every layerfs command on the layer's view. It makes N concurrent
   ``mount`` calls of one layer start exactly one daemon, and marks a record written before
   the daemon is ready as *pending* (see :mod:`layerfs.store.pending` for the rule).
2. ``layers.lock`` (shared), then ``mountpoints.lock`` (write), for short updates only,
   never while a daemon builds its index, and **never while a mount is probed**: the health
   of a view (statfs with a deadline, the daemon's /proc state) is found first without any
   store lock, then the record is changed under the locks if it is still the one probed. A
   stopped or stuck daemon therefore cannot hold up Go or other layerfs commands.
   ``layers.lock`` matters: containers-storage 1.43 loads mountpoints.json when it opens
   the store and rewrites it from that copy whenever it saves, all under ``layers.lock``.
3. ``<root>/storage.lock`` (Go's graph lock), only around making ``<root>/overlay`` a
   private mount of its own before the first view below it (Go does the same under it).

Repairs on the way (mount, unmount, mounted, ps): a FUSE view whose daemon died
(ENOTCONN, or a dead pid) is detached and its records dropped; a count whose path is not
mounted and not pending is reset; a daemon that does not answer is reported
("daemon 1234 does not answer"), never waited for; ``unmount --force`` detaches it.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

from filelock import FileLock, Timeout

from layerfs import procfs, userns
from layerfs.errors import AmbiguousLayerError, InvalidArgumentError, LayerUnknownError, MountError
from layerfs.fs import mount as fuse_mount
from layerfs.fs.idmap import IdMappingError, from_options
from layerfs.fs.index import chain_pins
from layerfs.mountinfo import entries, entry_at, normalize
from layerfs.store import pending
from layerfs.store.layers import Store
from layerfs.store.lockfile import LockFile
from layerfs.store.mounts import MountRecord
from layerfs.store.pending import DaemonRecord
from layerfs.store.record import WRITEABLE_FLAG
from layerfs.userns import in_user_namespace

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
    state: str  # "live", "private", "untracked" (Go dropped its record), "hung", "hidden",
    # "elsewhere" (live in another mount namespace: a user namespace's, or the host's)
    read_write: bool = False  # the view writes into the layer (ours, or Go's kernel overlay)


@dataclass(frozen=True)
class ViewPlan:
    """What a new view of one layer is made of.

    ``lowers``: the read-only layers, top first (the whole chain for a read-only view, the
    parent chain for a read-write one, possibly empty); ``upper``/``work``: the layer's
    ``diff/`` and ``work/`` for a read-write view, else None; ``private``: a read-only view
    of a writable layer, never recorded in ``mountpoints.json``.
    """

    layer_id: str
    lowers: tuple[str, ...]  # layer ids, top first
    upper: str | None
    work: str | None
    private: bool

    @property
    def read_write(self) -> bool:
        return self.upper is not None


@dataclass
class _View:
    """What one layer has mounted, found without store locks."""

    record: MountRecord | None  # the mountpoints.json record (count > 0)
    daemon: DaemonRecord | None  # our daemon record
    record_state: str = "none"  # live / stale / dead / hung / elsewhere / none
    daemon_state: str = "none"  # live / gone / hung / elsewhere / none (not at record.path)


class MountManager:
    """Mount and unmount layer views of one store."""

    def __init__(self, store: Store) -> None:
        self.store = store
        self.state_dir = pending.state_dir(store.runroot)
        self.daemons_dir = os.path.join(self.state_dir, "daemons")
        self.locks_dir = os.path.join(self.state_dir, "locks")
        self.logs_dir = os.path.join(self.state_dir, "logs")
        self.views_dir = os.path.join(self.state_dir, "views")

    # ------------------------------------------------------------------ resolution

    def resolve(self, target: str) -> str:
        """Layer id for a layer id/name/prefix or an image id/name/prefix.

        The one resolver of every view command: an ambiguous prefix raises
        :class:`AmbiguousLayerError` listing the candidates (as ``layer`` and
        ``delete-layer`` do), whether it matches layers or images.
        """
        try:
            return self.store.get(target).id
        except AmbiguousLayerError:
            raise
        except LayerUnknownError:
            pass
        from layerfs.store.images import AmbiguousImageError, ImageUnknownError

        try:
            top = str(self.store.images.get(target).get("layer") or "")
        except AmbiguousImageError as e:
            raise AmbiguousLayerError(target, e.candidates) from None
        except ImageUnknownError:
            top = ""
        if not top:
            raise LayerUnknownError(target, "no layer or image has this name or id")
        return self.store.get(top).id

    def writable(self, layer_id: str) -> bool:
        """True for a container's layer (Go's ``containers.json``) or a layer flagged
        ``layerfs.writeable``. Reads the records without holding a lock (each file is
        replaced atomically)."""
        if layer_id in pending.container_layers(self.store.root):
            return True
        return self.store.get(layer_id).flags.get(WRITEABLE_FLAG) is True

    def plan(self, layer_id: str, read_write: bool | None = None) -> ViewPlan:
        """The view ``mount`` makes of a layer: read-write when the layer is writable and
        *read_write* is not False. Raises InvalidArgumentError for a read-write request of a
        layer that is not writable or has child layers (their views would change under them).
        """
        writable = self.writable(layer_id)
        rw = writable if read_write is None else read_write
        chain = self.store.chain(layer_id)
        if not rw:
            return ViewPlan(layer_id, tuple(la.id for la in chain), None, None, writable)
        if not writable:
            raise InvalidArgumentError(
                f'layer "{layer_id}" is not writable: only a container\'s layer or one made with '
                "`create-layer --writeable` mounts read-write (mount it without --rw to read it)"
            )
        children = [la.id for la in self.store.layers() if la.parent == layer_id]
        if children:
            raise InvalidArgumentError(
                f'layer "{layer_id}" has child layers ({children[0]}); writing it would change '
                "their views: mount it with --ro"
            )
        return ViewPlan(
            layer_id,
            tuple(la.id for la in chain[1:]),
            self.store.diff_dir(layer_id),
            self.store.work_dir(layer_id),
            False,
        )

    def _by_path(self, target: str) -> str | None:
        """The layer whose view (recorded by Go or by us) is at the path *target*."""
        path = normalize(target)
        for record in self.store.mount_records().values():
            if normalize(record.path) == path:
                return record.id
        for daemon in pending.daemon_records(self.store.runroot):
            if normalize(daemon.path) == path:
                return daemon.layer_id
        return None

    def _resolve_target_or_path(self, target: str) -> str:
        """A layer for a view's path or a layer/image reference. A path is never stat'ed:
        it may be the mount point of a hung daemon."""
        if os.path.isabs(target) or target.startswith("."):
            found = self._by_path(target)
            if found is not None:
                return found
            if not self.store.exists(target):
                raise MountError(f"{target}: no layer is recorded as mounted there")
            return self.resolve(target)
        try:
            return self.resolve(target)
        except AmbiguousLayerError:
            raise
        except LayerUnknownError:
            found = self._by_path(target)
            if found is None:
                raise
            return found

    @contextlib.contextmanager
    def _counts(self) -> Iterator[dict[str, MountRecord]]:
        """The mount table for update, under ``layers.lock`` (shared) and ``mountpoints.lock``.

        Nothing that can block on a mount may run inside."""
        with self.store.mount_counts() as table:
            yield table

    def _drop_record_at(self, layer_id: str, path: str) -> None:
        """Drop the layer's mount record if it still names *path* (another process may have
        re-recorded the layer elsewhere meanwhile). Takes the count locks itself."""
        with self._counts() as table:
            now = table.get(layer_id)
            if now is not None and now.path == path:
                del table[layer_id]

    @contextlib.contextmanager
    def _layer_lock(self, layer_id: str) -> Iterator[None]:
        os.makedirs(self.locks_dir, mode=0o700, exist_ok=True)
        with FileLock(pending.layer_lock_path(self.store.runroot, layer_id)):
            yield

    # ------------------------------------------------------------------ daemon records

    def _daemon_pid(self, layer_id: str, path: str | None = None) -> int | None:
        """The recorded daemon pid, else (given the view's path) the one found in /proc."""
        daemon = pending.read_daemon(self.store.runroot, layer_id)
        if (
            daemon is not None
            and daemon.pid
            and (path is None or normalize(daemon.path) == normalize(path))
        ):
            return daemon.pid
        return fuse_mount.find_daemon_pid(path) if path else None

    def _save_daemon(self, record: DaemonRecord) -> None:
        pending.write_daemon(self.store.runroot, record)

    def _drop_daemon(self, layer_id: str) -> None:
        pending.drop_daemon(self.store.runroot, layer_id)

    # ------------------------------------------------------------------ health (no store lock)

    @staticmethod
    def _elsewhere(path: str, daemon: DaemonRecord | None) -> bool:
        """True when the view at *path*, not mounted in this mount namespace, lives in
        another one: its daemon's record names another namespace and the daemon is alive
        there (its ``/proc/PID/ns/mnt`` is still that one), or, for a view without our
        daemon record (Go's), the rootless namespace's pause process has it mounted."""
        here = userns.namespace_id("mnt")
        if daemon is not None and daemon.mnt_ns and daemon.mnt_ns != here:
            if not daemon.pid or not procfs.pid_alive(daemon.pid):
                return False
            theirs = userns.namespace_id("mnt", daemon.pid)
            if theirs is None:  # from inside a user namespace, a process outside it: its
                # namespace links are closed to us, its command line is not
                return pending.is_layerfs_daemon(daemon.pid, path)
            return theirs == daemon.mnt_ns
        if daemon is not None:
            return False
        pause = userns.pause_pid()
        if pause is None or userns.namespace_id("mnt", pause) in (None, here):
            return False
        return entry_at(path, pid=pause) is not None

    @classmethod
    def _health(cls, path: str, pid: int | None, daemon: DaemonRecord | None = None) -> str:
        """live, stale (not mounted), dead, hung or elsewhere (live in another mount
        namespace, see :meth:`_elsewhere`; never stale for that); reads mountinfo and
        /proc, and probes a FUSE mount only with a deadline. Never call under a store lock."""
        # ours, started in another namespace: a copy of the mount may show here (a namespace
        # made after it), but unmounting that copy would not end the view
        if daemon is not None and cls._elsewhere(path, daemon):
            return "elsewhere"
        entry = entry_at(path)
        if entry is None:  # (with a daemon record, _elsewhere has answered already)
            return "elsewhere" if daemon is None and cls._elsewhere(path, None) else "stale"
        if pid is not None:
            if not procfs.pid_alive(pid):
                return "dead" if entry.fstype.startswith("fuse") else "live"
            if procfs.pid_stopped(pid):
                return "hung"
        if not entry.fstype.startswith("fuse"):
            return "live"  # a kernel overlay made by Go: nothing to probe
        return fuse_mount.probe(path, dev=os.makedev(entry.major, entry.minor))

    def _inspect(self, layer_id: str) -> _View:
        """The layer's records and their health. Caller holds the layer lock, no store lock."""
        record = self.store.mount_records().get(layer_id)
        daemon = pending.read_daemon(self.store.runroot, layer_id)
        if daemon is not None and daemon.pid == 0:  # the mount command died before READY
            daemon.pid = fuse_mount.find_daemon_pid(daemon.path) or 0
        view = _View(record, daemon)
        if record is not None:
            pid = None
            at_record = None
            if daemon is not None and normalize(daemon.path) == normalize(record.path):
                pid = daemon.pid or None
                at_record = daemon
            elif entry_at(record.path) is not None:
                pid = fuse_mount.find_daemon_pid(record.path)
            view.record_state = self._health(record.path, pid, at_record)
        if daemon is not None and (
            record is None or normalize(daemon.path) != normalize(record.path)
        ):
            state = self._health(daemon.path, daemon.pid, daemon)
            view.daemon_state = {"stale": "gone", "dead": "gone"}.get(state, state)
            if state in ("live", "elsewhere") and not pending.is_layerfs_daemon(
                daemon.pid, daemon.path
            ):
                view.daemon_state = "gone"  # pid reused; the view is someone else's now
        elif daemon is not None:
            view.daemon_state = "at-record"
        return view

    def _repair(self, layer_id: str) -> _View:
        """Drop dead and stale records of one layer (detaching a dead mount) and return what
        is left. Caller holds the layer lock and no store lock."""
        view = self._inspect(layer_id)
        record = view.record
        if record is not None and view.record_state in ("dead", "stale"):
            if view.record_state == "dead":
                log.warning(
                    "view of layer %s at %s: daemon is gone; detaching", layer_id, record.path
                )
                fuse_mount.detach(record.path)
            else:
                log.warning(
                    "count %d for layer %s is stale (not mounted); reset", record.count, layer_id
                )
            self._drop_record_at(layer_id, record.path)
            if view.daemon_state == "at-record":
                self._drop_daemon(layer_id)
                view.daemon, view.daemon_state = None, "none"
            view.record, view.record_state = None, "none"
        if view.daemon is not None and view.daemon_state == "gone":
            if fuse_mount.probe(view.daemon.path) == "dead":
                fuse_mount.detach(view.daemon.path)
            self._drop_daemon(layer_id)
            view.daemon, view.daemon_state = None, "none"
        return view

    @staticmethod
    def _refuse_elsewhere(layer_id: str, view: _View) -> None:
        """Refuse to change a view that lives in another mount namespace (one line)."""
        for state, where in ((view.record_state, view.record), (view.daemon_state, view.daemon)):
            if state == "elsewhere" and where is not None:
                daemon = view.daemon
                ns = f" ({daemon.mnt_ns}, daemon {daemon.pid})" if daemon and daemon.mnt_ns else ""
                if userns.in_user_namespace():
                    hint = "outside the user namespace (LAYERFS_USERNS=host layerfs ...)"
                else:
                    hint = "in that namespace (layerfs unshare layerfs ...)"
                raise MountError(
                    f'layer "{layer_id}" is mounted at {where.path} in another mount '
                    f"namespace{ns}; mount or unmount it from there: run it {hint}"
                )

    @staticmethod
    def _hung(pid: int | None, path: str) -> MountError:
        who = f"daemon {pid}" if pid is not None else "the daemon"
        return MountError(
            f"view at {path}: {who} does not answer (stopped or stuck); "
            "`layerfs unmount --force` detaches it"
        )

    # ------------------------------------------------------------------ operations

    def mount(
        self,
        target: str,
        mountpoint: str | None = None,
        *,
        allow_other: bool = False,
        for_container: bool = False,
        debug: bool = False,
        read_write: bool | None = None,
        id_options: Sequence[str] = (),
    ) -> tuple[str, str, int]:
        """Mount (or add a user to) the layer's view. Returns (layer id, path, count).

        *read_write*: None mounts a writable layer read-write and any other read-only; True
        insists on read-write (refused for a layer that is not writable); False asks for a
        read-only view (private for a writable layer).

        *allow_other* is always on for root of a user namespace (``podman unshare``), as
        fuse-overlayfs has it: the namespace's other uids (a container's) can use the view,
        and the kernel checks their permissions (``default_permissions``).

        *id_options* map ids (``uidmapping=...``, :mod:`layerfs.fs.idmap`); a mapped
        read-only view is private (Go never hands it out: it would show foreign ids)."""
        try:
            from_options(id_options)
        except IdMappingError as e:
            raise InvalidArgumentError(str(e)) from None
        if os.geteuid() == 0 and in_user_namespace():
            allow_other = True
        layer_id = self.resolve(target)
        plan = self.plan(layer_id, read_write)
        private = plan.private or (bool(id_options) and not plan.read_write)
        wanted = DaemonRecord(
            layer_id,
            0,
            "",
            for_container=for_container,
            allow_other=allow_other,
            read_write=plan.read_write,
            mnt_ns=userns.namespace_id("mnt") or "",
            id_options=tuple(id_options),
        )
        with self._layer_lock(layer_id):
            view = self._repair(layer_id)
            self._refuse_elsewhere(layer_id, view)
            reused = self._reuse(layer_id, view, mountpoint, wanted, private)
            if reused is not None:
                return layer_id, reused[0], reused[1]
            lowers = [self.store.get(i) for i in plan.lowers]
            diff_dirs = [self.store.diff_dir(la.id) for la in lowers]
            own_dirs = diff_dirs + ([plan.upper] if plan.upper else [])
            default = (
                os.path.join(self.views_dir, layer_id)
                if private
                else self.store.merged_dir(layer_id)
            )
            path = normalize(mountpoint or default)
            self._check_mountpoint(path, own_dirs)
            self._make_dir(path, created_parents=mountpoint is None)
            if path.startswith(self.store.overlay_home() + os.sep):
                self._private_home()
            os.makedirs(self.logs_dir, mode=0o700, exist_ok=True)
            if plan.work is not None:
                os.makedirs(plan.work, mode=0o700, exist_ok=True)
            wanted.path, wanted.go_visible = path, not private
            with self._counts() as table:
                # under layers.lock: a delete either finished (dirs gone) or must now see
                # this pending record (the layer lock is held) and refuse
                if not all(os.path.isdir(d) for d in own_dirs):
                    raise LayerUnknownError(layer_id, "deleted while being mounted")
                self._save_daemon(wanted)  # pid 0 until the daemon is ready
                if not private:
                    table[layer_id] = MountRecord(layer_id, path, 1)
            if plan.read_write:
                # the upper changes under the view: its persisted index must never be used
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(os.path.join(self.store.layer_dir(layer_id), INDEX_FILE))
            try:
                pid = fuse_mount.spawn_daemon(
                    diff_dirs,
                    [la.id for la in lowers],
                    path,
                    pins=chain_pins(self.store, lowers),
                    whiteout_format=self.store.whiteout_format(),
                    log_path=os.path.join(self.logs_dir, f"{layer_id}.log"),
                    allow_other=allow_other,
                    for_container=for_container,
                    debug=debug,
                    upper_dir=plan.upper,
                    work_dir=plan.work,
                    upper_layer_id=layer_id if plan.read_write else None,
                    id_options=id_options,
                )
            except BaseException:
                with self._counts() as table:
                    if not private:
                        table.pop(layer_id, None)
                    self._drop_daemon(layer_id)
                raise
            wanted.pid = pid
            self._save_daemon(wanted)
            return layer_id, path, 1

    def _reuse(
        self,
        layer_id: str,
        view: _View,
        mountpoint: str | None,
        wanted: DaemonRecord,
        private: bool,
    ) -> tuple[str, int] | None:
        """Add a user to a live view that matches the request; None if a new one is needed.
        Raises when a live view differs from the request. Caller holds the layer lock."""
        daemon, record = view.daemon, view.record

        def same_place(path: str) -> None:
            if mountpoint and normalize(mountpoint) != normalize(path):
                raise MountError(
                    f'layer "{layer_id}" is already mounted at {path}; '
                    "unmount it before mounting it elsewhere"
                )

        def same_options(live: DaemonRecord) -> None:
            if (live.read_write, live.for_container, live.allow_other, live.id_options) != (
                wanted.read_write,
                wanted.for_container,
                wanted.allow_other,
                wanted.id_options,
            ):
                raise MountError(
                    f'layer "{layer_id}" is already mounted at {live.path} with '
                    f"{live.options()}; unmount it first or ask for the same options"
                )

        if daemon is not None and view.daemon_state == "hung":
            raise self._hung(daemon.pid, daemon.path)
        if record is not None and view.record_state == "hung":
            raise self._hung(self._daemon_pid(layer_id, record.path), record.path)
        for state, where in ((view.record_state, record), (view.daemon_state, daemon)):
            if state == "hidden" and where is not None:
                raise MountError(
                    f"the view of layer {layer_id} at {where.path} is hidden by another mount "
                    "over a parent directory; unmount that one first"
                )
        live = daemon if view.daemon_state in ("live", "at-record") else None
        if live is not None and not live.go_visible:  # our private view
            same_place(live.path)
            same_options(live)
            live.count += 1
            self._save_daemon(live)
            return live.path, live.count
        if private:
            if live is not None:
                same_options(live)  # our read-write view: one daemon per layer
            return None  # a recorded view (Go's writable mount) is never handed out here
        if record is not None:
            same_place(record.path)
            if live is not None and view.daemon_state == "at-record":
                same_options(live)
            elif wanted.read_write and "ro" in self._mount_options(record.path):
                # (containers-storage 1.43 ignores `mount -o ro` of a layer; newer ones mount
                # it lowerdir-only, which cannot take writes)
                raise MountError(
                    f'layer "{layer_id}" is mounted read-only at {record.path} by another '
                    "tool; unmount it before mounting it read-write"
                )
            # else Go's kernel overlay (read-write on the same upper, or a mount program's):
            # it keeps set-id bits and devices and lets anyone in; it is the one writer
            with self._counts() as table:
                now = table.get(layer_id)
                if now is None or now.path != record.path:
                    raise MountError(
                        f'layer "{layer_id}" was unmounted by another process meanwhile; try again'
                    )
                now.count += 1
                return now.path, now.count
        if live is not None:
            # our view whose record the Go tool dropped (untracked): record it again
            same_place(live.path)
            same_options(live)
            with self._counts() as table:
                table[layer_id] = MountRecord(layer_id, live.path, 1)
            return live.path, 1
        return None

    @staticmethod
    def _mount_options(path: str) -> tuple[str, ...]:
        """The mount's and its file system's options from mountinfo (never stats *path*)."""
        entry = entry_at(path)
        return () if entry is None else entry.options + entry.super_options

    def _make_dir(self, path: str, *, created_parents: bool) -> None:
        parent = os.path.dirname(path)
        if not created_parents and not os.path.isdir(parent):
            raise InvalidArgumentError(
                f"mount point {path}: its parent directory {parent} does not exist"
            )
        try:
            os.makedirs(path, mode=0o700, exist_ok=True)
        except OSError as exc:
            raise MountError(f"cannot create mount point {path}: {exc.strerror}") from exc
        if not os.path.isdir(path):
            raise InvalidArgumentError(f"mount point {path} is not a directory")

    def _private_home(self) -> None:
        """Make ``<root>/overlay`` a private mount of itself before a view appears below it
        (see :func:`layerfs.fs.mount.make_private_mount`), under Go's graph lock."""
        home = self.store.overlay_home()
        if entry_at(home) is not None:
            return
        lock = LockFile(os.path.join(self.store.root, "storage.lock"))
        with lock.write():
            below = [e.point for e in entries() if e.point.startswith(home + os.sep)]
            if below:
                # a bind now would hide them just as Go's would; leave them visible
                log.warning(
                    "%s is not a mount point but %s is mounted below it; not binding it",
                    home,
                    below[0],
                )
                return
            if not fuse_mount.make_private_mount(home):
                log.info("cannot make %s a private mount (not root); skipped", home)

    def _check_mountpoint(self, path: str, diff_dirs: list[str]) -> None:
        if fuse_mount.is_mountpoint(path):  # mountinfo only: never stat a possible mount
            raise InvalidArgumentError(f"mount point {path} is already a mount point")
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

    def unmount(self, target: str, *, force: bool = False) -> tuple[str, int]:
        """Drop one user of the view (all with ``force``); unmount at zero.

        Returns (layer id, remaining count). Unmounting a layer that is not mounted succeeds
        with count 0, as containers-storage does. A path names the view mounted there (one
        Go recorded, or one of our daemons whose record Go dropped); a layer names our
        private view first, else the recorded one, else our untracked one. With ``force``
        a daemon that does not answer is detached and killed.
        """
        by_path = os.path.isabs(target) or target.startswith(".")
        layer_id = self._resolve_target_or_path(target)
        with self._layer_lock(layer_id):
            view = self._repair(layer_id)
            self._refuse_elsewhere(layer_id, view)
            daemon, record = view.daemon, view.record
            want_path = normalize(target) if by_path else None
            untracked = daemon is not None and view.daemon_state in ("live", "hung", "hidden")
            if (
                untracked
                and daemon is not None
                and ((want_path is None and not daemon.go_visible) or want_path == daemon.path)
            ):
                return self._unmount_daemon(layer_id, daemon, view.daemon_state, force)
            if record is not None:
                return self._unmount_record(layer_id, view, force)
            if untracked and daemon is not None:
                return self._unmount_daemon(layer_id, daemon, view.daemon_state, force)
            return layer_id, 0

    def _take_down(self, path: str, pid: int | None, state: str, force: bool) -> None:
        """Unmount a view at zero users. Caller holds the layer lock and no store lock.

        *pid* comes from a record that may be stale or hostile: it is waited for or signalled
        only if it is the layerfs daemon serving *path* (else the daemon is looked up)."""
        if pid is not None and not pending.is_layerfs_daemon(pid, path):
            log.warning("pid %d is not the daemon of the view at %s; not signalling it", pid, path)
            pid = fuse_mount.find_daemon_pid(path)
        if state == "hung":
            if not force:
                raise self._hung(pid, path)
            ours = pid is not None and pending.is_layerfs_daemon(pid, path)
            fuse_mount.force_detach(path, pid, is_ours=ours)
            return
        if force and pid is not None and state == "live":
            try:
                fuse_mount.unmount(path, pid)
            except MountError:
                fuse_mount.force_detach(path, pid, is_ours=pending.is_layerfs_daemon(pid, path))
            return
        fuse_mount.unmount(path, pid)

    def _unmount_daemon(
        self, layer_id: str, daemon: DaemonRecord, state: str, force: bool
    ) -> tuple[str, int]:
        """Unmount our view that ``mountpoints.json`` does not hold (private or untracked)."""
        if daemon.go_visible is False and daemon.count > 1 and not force:
            daemon.count -= 1
            self._save_daemon(daemon)
            return layer_id, daemon.count
        self._take_down(daemon.path, daemon.pid, state, force)
        self._drop_daemon(layer_id)
        if normalize(daemon.path) == normalize(os.path.join(self.views_dir, layer_id)):
            with contextlib.suppress(OSError):
                os.rmdir(daemon.path)
        return layer_id, 0

    def _unmount_record(self, layer_id: str, view: _View, force: bool) -> tuple[str, int]:
        """Drop a user of the view recorded in ``mountpoints.json``."""
        record = view.record
        assert record is not None
        with self._counts() as table:
            now = table.get(layer_id)
            if now is None or now.path != record.path:
                return layer_id, 0  # unmounted by another process meanwhile
            if not force and now.count > 1:
                now.count -= 1
                return layer_id, now.count
        pid = self._daemon_pid(layer_id, record.path)
        self._take_down(record.path, pid, view.record_state, force)
        self._drop_record_at(layer_id, record.path)
        if view.daemon_state == "at-record":
            self._drop_daemon(layer_id)
        if record.path == self.store.merged_dir(layer_id):
            with contextlib.suppress(OSError):
                os.rmdir(record.path)  # as the overlay driver's Put does
        return layer_id, 0

    def mounted(self, target: str) -> int:
        """The layer's mount count (recorded plus private) after repairing dead or stale
        records. A view whose daemon does not answer still counts, with a warning."""
        layer_id = self.resolve(target)
        with self._layer_lock(layer_id):
            view = self._repair(layer_id)
        count = view.record.count if view.record is not None else 0
        daemon = view.daemon
        if daemon is not None and not daemon.go_visible and view.daemon_state != "gone":
            count += daemon.count
        if view.daemon_state == "hung" and daemon is not None:
            log.warning("%s", self._hung(daemon.pid, daemon.path))
        elif view.record_state == "hung" and view.record is not None:
            path = view.record.path
            log.warning("%s", self._hung(self._daemon_pid(layer_id, path), path))
        return count

    def repair(self, target: str) -> None:
        """Detach a dead view and drop stale counts of one layer, if it has a record.
        Never waits: while another layerfs command holds the layer, nothing is done."""
        try:
            layer_id = self.resolve(target)
        except LayerUnknownError:
            return
        if layer_id not in self.store.mount_records() and not os.path.exists(
            pending.daemon_file(self.store.runroot, layer_id)
        ):
            return
        os.makedirs(self.locks_dir, mode=0o700, exist_ok=True)
        lock = FileLock(pending.layer_lock_path(self.store.runroot, layer_id), timeout=0)
        try:
            lock.acquire()
        except Timeout:
            return  # a mount or unmount is under way: the store's pending rule decides
        try:
            self._repair(layer_id)
        finally:
            lock.release()

    def ps(self) -> list[MountInfo]:
        """Every view (recorded, private, or ours whose record Go dropped), after repairing
        dead and stale ones. A daemon that does not answer is listed as ``hung``."""
        ids = list(self.store.mount_records())
        ids += [d.layer_id for d in pending.daemon_records(self.store.runroot)]
        out = []
        for layer_id in dict.fromkeys(ids):
            with self._layer_lock(layer_id):
                view = self._repair(layer_id)
            try:
                names = tuple(self.store.get(layer_id).names)
            except LayerUnknownError:
                names = ()
            record, daemon = view.record, view.daemon
            if record is not None:
                pid = self._daemon_pid(layer_id, record.path)
                state = view.record_state
                if state not in ("hung", "hidden", "elsewhere"):
                    state = "live"
                if view.daemon_state == "at-record" and daemon is not None:
                    rw = daemon.read_write
                else:  # Go's mount (kernel overlay or its mount program)
                    rw = "ro" not in self._mount_options(record.path)
                out.append(MountInfo(layer_id, names, record.path, record.count, pid, state, rw))
            if daemon is not None and view.daemon_state in ("live", "hung", "hidden", "elsewhere"):
                count = 0 if daemon.go_visible else daemon.count
                state = view.daemon_state
                if state == "live":
                    state = "untracked" if daemon.go_visible else "private"
                out.append(
                    MountInfo(
                        layer_id, names, daemon.path, count, daemon.pid, state, daemon.read_write
                    )
                )
        for info in out:
            if info.state == "hung":
                log.warning("%s", self._hung(info.pid, info.path))
        return out
