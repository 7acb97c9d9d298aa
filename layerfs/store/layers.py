"""The layer store: records, names, metadata, big data, create and delete.

Files (graph root ``G``, run root ``R``), as containers/storage's overlay driver keeps them:
``G/overlay-layers/{layers.json,volatile-layers.json,layers.lock,<id>.tar-split.gz,<id>/}``,
``G/overlay/<id>/…`` (see :mod:`layerfs.store.overlay`) and ``R/overlay-layers/mountpoints.*``.

Locking. ``layers.lock`` protects both layer JSON files, tar-splits and big data. Every
public method of :class:`Store` takes it itself — shared for queries, exclusive for
changes — and first reloads the JSON when another process wrote since we last looked (new
LastWrite token, or a JSON file's mtime differs from the one we saw). Private methods say
which lock their caller must hold. ``mountpoints.lock`` is taken inside ``layers.lock``.
Within one process a re-entrant mutex serialises threads sharing a :class:`Store`.

Re-entry. Code that runs while this thread holds ``layers.lock`` through the Store — a
``create_layer`` ``populate`` or ``update_layer`` ``apply`` callback, a
:meth:`Store.reading_layer` or :meth:`Store.mount_counts` block — may call the query
methods (they reuse the held lock: nobody else can write meanwhile), but a method that
changes the store raises :class:`StoreReentryError` instead of waiting for itself forever.

Records. :class:`~layerfs.store.records.LayerRecords` owns the record maps (by id, by name,
which file) and their invariants. Every record a method returns is a deep copy: editing it,
nested flag values included, never changes the store.

Crash safety. ``create`` saves the record flagged ``incomplete`` before making any
directory and clears the flag when done; ``delete`` sets the flag before removing anything.
The next read-write load deletes flagged layers, so a killed process never leaves a layer
that looks complete but is not.
"""

from __future__ import annotations

import contextlib
import errno
import functools
import logging
import os
import re
import stat
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

from layerfs import procfs, userns
from layerfs.errors import (
    AmbiguousLayerError,
    BigDataUnknownError,
    CorruptStoreError,
    DuplicateIDError,
    InvalidArgumentError,
    LayerfsError,
    LayerHasChildrenError,
    LayerMountedError,
    LayerUnknownError,
    LayerUsedByImageError,
    NameInUseError,
    StoreReadOnlyError,
    StoreReentryError,
)
from layerfs.mountinfo import fs_type_of, is_mountpoint
from layerfs.store import bigdata, pending
from layerfs.store.jsonfile import (
    SpaceReserve,
    StoreWriteError,
    atomic_write,
    mtime_ns,
    read_optional,
)
from layerfs.store.lockfile import HeldLock, LastWrite, LockFile
from layerfs.store.mounts import MountRecord, MountTable
from layerfs.store.overlay import DRIVER, OverlayLayout, remove_tree
from layerfs.store.record import (
    INCOMPLETE_FLAG,
    WRITEABLE_FLAG,
    Layer,
    decode_layers,
    encode_layers,
    format_created,
    new_layer_id,
)
from layerfs.store.records import LayerRecords, copy_layer

if TYPE_CHECKING:
    from layerfs.store.images import ImageRecords

log = logging.getLogger(__name__)

#: Per thread: lock-file path -> (id of the Store holding it, "read"/"write").
_THREAD_LOCKS = threading.local()

_ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$")
_DIGEST_RE = re.compile(r"^[a-z0-9]+(?:[.+_-][a-z0-9]+)*:[a-zA-Z0-9=_-]+$")


def default_root() -> str:
    """The graph root when none is given.

    ``$LAYERFS_ROOT``; else for real root ``/var/lib/layerfs``; else (a plain user, or euid 0
    inside a user namespace such as ``podman unshare``) ``$CONTAINERS_GRAPHROOT`` when set
    (podman exports it into its namespace), else ``$XDG_DATA_HOME/layerfs``
    (``~/.local/share/layerfs``)."""
    env = os.environ.get("LAYERFS_ROOT")
    if env:
        return env
    if not userns.is_rootless():
        return "/var/lib/layerfs"
    graphroot = os.environ.get("CONTAINERS_GRAPHROOT")
    if graphroot:
        return graphroot
    data_home = os.environ.get("XDG_DATA_HOME") or os.path.expanduser("~/.local/share")
    return os.path.join(data_home, "layerfs")


def default_runroot() -> str:
    """The run root when none is given.

    ``$LAYERFS_RUNROOT``; else for real root ``/run/layerfs``; else ``$CONTAINERS_RUNROOT``
    when set, else ``$XDG_RUNTIME_DIR/layerfs``; without ``XDG_RUNTIME_DIR`` the fallback
    ``/tmp/layerfs-run-UID/layerfs`` (UID: the host uid), whose top directory is made 0700 and
    refused when it belongs to someone else or others may write to it (:func:`private_dir`)."""
    env = os.environ.get("LAYERFS_RUNROOT")
    if env:
        return env
    if not userns.is_rootless():
        return "/run/layerfs"
    runroot = os.environ.get("CONTAINERS_RUNROOT")
    if runroot:
        return runroot
    runtime = os.environ.get("XDG_RUNTIME_DIR")
    if not runtime:
        runtime = private_dir(f"/tmp/layerfs-run-{userns.host_uid()}")
    return os.path.join(runtime, "layerfs")


def private_dir(path: str) -> str:
    """Create *path* 0700 if missing; refuse it (one line) when it is not a directory owned
    by this process's euid, or group or others may write to it (another user could have
    made it in advance to watch or replace what we put there)."""
    with contextlib.suppress(FileExistsError):
        os.mkdir(path, 0o700)
    st = os.lstat(path)
    if not stat.S_ISDIR(st.st_mode):
        raise LayerfsError(f"run root {path} is not a directory; remove it or set XDG_RUNTIME_DIR")
    if st.st_uid != os.geteuid():
        raise LayerfsError(
            f"run root {path} belongs to uid {st.st_uid}, not to you; "
            "remove it or set XDG_RUNTIME_DIR"
        )
    if st.st_mode & 0o022:
        raise LayerfsError(
            f"run root {path} is writable by others (mode {stat.S_IMODE(st.st_mode):04o}); "
            f"chmod 700 {path} or set XDG_RUNTIME_DIR"
        )
    return path


@dataclass(frozen=True)
class LayerContents:
    """What :meth:`Store.reading_layer` yields: a layer's record and where its files are."""

    layer: Layer
    chain: list[Layer]  # the layer and its ancestors, nearest first
    diff_dir: str
    lower_diff_dirs: list[str]  # the ancestors' diff/ directories, nearest first
    tar_split: str | None  # the layer's tar-split file, if it has one


@dataclass(frozen=True)
class StoreFiles:
    """Where one store keeps its layer metadata."""

    root: str
    runroot: str

    @property
    def layers_dir(self) -> str:
        """``G/overlay-layers``."""
        return os.path.join(self.root, f"{DRIVER}-layers")

    @property
    def stable(self) -> str:
        """``layers.json``: synced on every write."""
        return os.path.join(self.layers_dir, "layers.json")

    @property
    def volatile(self) -> str:
        """``volatile-layers.json``: never synced (layers that need not survive a crash)."""
        return os.path.join(self.layers_dir, "volatile-layers.json")

    @property
    def lock(self) -> str:
        """``layers.lock``."""
        return os.path.join(self.layers_dir, "layers.lock")

    @property
    def runroot_layers_dir(self) -> str:
        """``R/overlay-layers``: mountpoints.json and its lock."""
        return os.path.join(self.runroot, f"{DRIVER}-layers")

    def tar_split(self, layer_id: str) -> str:
        """``G/overlay-layers/<id>.tar-split.gz``."""
        return os.path.join(self.layers_dir, f"{layer_id}.tar-split.gz")


class Store:
    """A containers/storage-compatible layer store (overlay driver layout).

    Thread-safe; shared safely with other layerfs and Go processes through the lock files.
    """

    def __init__(
        self, root: str | None = None, runroot: str | None = None, *, read_only: bool = False
    ) -> None:
        self.files = StoreFiles(
            os.path.abspath(root or default_root()), os.path.abspath(runroot or default_runroot())
        )
        self.read_only = read_only
        #: containers/storage-style driver options (``overlay.force_mask`` ...), as given
        #: with ``--storage-opt``; imports read them (:class:`~layerfs.archive.apply.ApplyOptions`).
        self.storage_opts: dict[str, str] = {}
        self.driver = OverlayLayout(self.files.root)
        self.mount_table = MountTable(self.files.runroot_layers_dir, read_only=read_only)
        self._mutex = threading.RLock()
        self._records = LayerRecords()
        self._token: LastWrite | None = None
        self._mtimes: tuple[int, int] = (0, 0)
        self._needs_repair = False
        if not read_only:
            self._ensure_dirs()
            self._space_reserve.refill(self.files.stable, only_if_missing=True)
        elif not os.path.isdir(self.files.layers_dir):
            raise LayerfsError(f"{self.files.layers_dir}: no layer store here")
        self.lock = LockFile(self.files.lock, read_only=read_only)

    @functools.cached_property
    def _space_reserve(self) -> SpaceReserve:
        return SpaceReserve(os.path.join(self.files.layers_dir, SpaceReserve.NAME))

    @functools.cached_property
    def images(self) -> ImageRecords:
        """The image records of this graph root (imported on first use)."""
        from layerfs.store.images import ImageRecords

        return ImageRecords(self.files.root, read_only=self.read_only)

    @property
    def root(self) -> str:
        """The graph root."""
        return self.files.root

    @property
    def runroot(self) -> str:
        """The run root."""
        return self.files.runroot

    def _ensure_dirs(self) -> None:
        try:
            os.makedirs(self.files.root, mode=0o700, exist_ok=True)
            os.makedirs(self.files.layers_dir, mode=0o700, exist_ok=True)
            self.driver.ensure_home()
            self.mount_table.ensure_dir()
        except OSError as exc:
            raise LayerfsError(
                f"cannot create the store under {self.files.root}: {exc.strerror}"
            ) from exc

    # ----------------------------------------------------------------- loading

    @contextmanager
    def _reading(self) -> Iterator[None]:
        """Hold the shared lock with fresh records; repairs first if the load asks for it.

        When this thread already holds ``layers.lock`` through this store (a ``populate`` or
        ``apply`` callback, a :meth:`reading_layer` block), the held lock is reused: the
        records are fresh, since nobody else can write while it is held.
        """
        if self._held_here() is not None:
            yield
            return
        with self._mutex:
            while True:
                with self.lock.read() as held:
                    self._reload_if_changed(held)
                    if not (self._needs_repair and not self.read_only):
                        with self._holding("read"):
                            yield
                        return
                with self.lock.write() as held:
                    self._reload_if_changed(held)
                    self._repair(held)

    @contextmanager
    def _writing(self) -> Iterator[HeldLock]:
        """Hold the exclusive lock with fresh, repaired records.

        Refused with :class:`StoreReentryError` when this thread already holds
        ``layers.lock`` through this store: a second acquisition would wait for itself
        forever (the lock is not re-entrant, as in Go), and a change from inside a
        ``populate``/``apply`` callback would edit records the outer call is changing.
        """
        if self.read_only:
            raise StoreReadOnlyError(f"{self.root}: the store is open read-only")
        held_mode = self._held_here()
        if held_mode is not None:
            raise StoreReentryError(
                f"{self.root}: a store change was asked for while this thread holds "
                f"layers.lock ({held_mode}), e.g. from a populate or apply callback; "
                "only reads are allowed there"
            )
        with self._mutex, self.lock.write() as held:
            self._reload_if_changed(held)
            self._repair(held)
            with self._holding("write"):
                yield held

    def _held_here(self) -> str | None:
        """``"read"``/``"write"`` when this thread holds ``layers.lock`` through this Store.

        A thread that holds it through *another* Store object of the same store cannot take
        it again either (the OFD lock of one descriptor blocks the next): that raises
        :class:`StoreReentryError` for reads and changes alike.
        """
        held: dict[str, tuple[int, str]] = getattr(_THREAD_LOCKS, "held", {})
        entry = held.get(self.files.lock)
        if entry is None:
            return None
        owner, mode = entry
        if owner != id(self):
            raise StoreReentryError(
                f"{self.root}: this thread holds layers.lock ({mode}) through another Store "
                "object of the same store; use that object inside the callback"
            )
        return mode

    @contextmanager
    def _holding(self, mode: str) -> Iterator[None]:
        """Mark this thread as holding ``layers.lock`` in ``mode`` for the block."""
        if not hasattr(_THREAD_LOCKS, "held"):
            _THREAD_LOCKS.held = {}
        _THREAD_LOCKS.held[self.files.lock] = (id(self), mode)
        try:
            yield
        finally:
            _THREAD_LOCKS.held.pop(self.files.lock, None)

    def _reload_if_changed(self, held: HeldLock) -> None:
        """Reload when the token or a JSON mtime moved. Caller holds ``layers.lock``."""
        token = held.last_write()
        mtimes = (mtime_ns(self.files.stable), mtime_ns(self.files.volatile))
        if self._token is not None and token == self._token and mtimes == self._mtimes:
            return
        self._load()
        self._token = token
        self._mtimes = mtimes

    def _load(self) -> None:
        """Read both JSON files strictly and rebuild the indexes. Caller holds ``layers.lock``.

        A file that cannot be parsed raises :class:`CorruptStoreError` and leaves the
        in-memory state as it was: it is never treated as an empty store.
        """
        stable = decode_layers(read_optional(self.files.stable), self.files.stable)
        volatile = decode_layers(read_optional(self.files.volatile), self.files.volatile)
        self._records, self._needs_repair = LayerRecords.from_files(
            stable,
            volatile,
            source=self.files.stable,
            volatile_source=self.files.volatile,
            strict_names=self.read_only,
        )

    def _repair(self, held: HeldLock) -> None:
        """Delete incomplete layers and save fixed names. Caller holds the write lock."""
        if not self._needs_repair:
            return
        for layer in self._records.incomplete():
            log.warning('Found incomplete layer "%s", deleting it', layer.id)
            self._remove_layer_data(layer.id)
            self._forget(layer)
        self._save(held)
        self._needs_repair = False

    def _save(self, held: HeldLock, *, stable: bool = True, volatile: bool = True) -> None:
        """Write the JSON files and a new token. Caller holds the write lock.

        The token is written first (as containers/storage HEAD does), so a crash between the
        two writes still makes every other process reload.
        """
        self._token = held.record_write()
        if stable:
            records = self._records.in_file(volatile=False)
            atomic_write(self.files.stable, encode_layers(records), durable=True)
        if volatile:
            records = self._records.in_file(volatile=True)
            if records or os.path.exists(self.files.volatile):
                atomic_write(self.files.volatile, encode_layers(records), durable=False)
        self._mtimes = (mtime_ns(self.files.stable), mtime_ns(self.files.volatile))

    def _save_for(self, held: HeldLock, layer: Layer) -> None:
        """Save only the file that holds ``layer``. Caller holds the write lock."""
        is_volatile = self._records.is_volatile(layer.id)
        self._save(held, stable=not is_volatile, volatile=is_volatile)

    def _forget(self, layer: Layer) -> None:
        """Drop a record from memory (not from disk). Caller holds the write lock."""
        self._records.remove(layer)

    def _remove_layer_data(self, layer_id: str) -> None:
        """Remove driver dirs, tar-split and big data of a layer. Caller holds the write lock."""
        self.driver.remove(layer_id)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.files.tar_split(layer_id))
        remove_tree(bigdata.big_data_dir(self.files.layers_dir, layer_id))

    # ----------------------------------------------------------------- lookup

    def _resolve(self, ref: str) -> Layer:
        """Exact id, then exact name, then a unique id prefix. Caller holds ``layers.lock``."""
        if not ref:
            raise LayerUnknownError(ref)
        layer = self._records.by_id(ref) or self._records.by_name(ref)
        if layer is not None:
            return layer
        matches = self._records.with_id_prefix(ref)
        if len(matches) == 1:
            return matches[0]
        if len(matches) > 1:
            raise AmbiguousLayerError(ref, [la.id for la in matches])
        raise LayerUnknownError(ref)

    def get(self, ref: str) -> Layer:
        """The record for an id, name or unique id prefix (a copy; edits do not persist)."""
        with self._reading():
            return copy_layer(self._resolve(ref))

    def exists(self, ref: str) -> bool:
        """Whether ``ref`` names a layer (an ambiguous prefix does not)."""
        with self._reading():
            try:
                self._resolve(ref)
            except LayerUnknownError:
                return False
            return True

    def layers(self) -> list[Layer]:
        """All records in load order (stable file first, then volatile)."""
        with self._reading():
            return [copy_layer(la) for la in self._records]

    def layers_json(self) -> bytes:
        """All records as one JSON array in the Go encoding (no copies: for listings)."""
        with self._reading():
            return encode_layers(list(self._records))

    def is_volatile(self, ref: str) -> bool:
        """Whether the layer is kept in volatile-layers.json."""
        with self._reading():
            return self._records.is_volatile(self._resolve(ref).id)

    def chain(self, ref: str) -> list[Layer]:
        """The layer and its ancestors, nearest first.

        A missing parent or a cycle raises :class:`CorruptStoreError` showing the chain.
        """
        with self._reading():
            return [copy_layer(la) for la in self._chain_unlocked(self._resolve(ref))]

    def _chain_unlocked(self, layer: Layer) -> list[Layer]:
        chain = [layer]
        seen = {layer.id}
        while chain[-1].parent:
            parent = self._records.by_id(chain[-1].parent)
            shown = " -> ".join(la.id[:12] for la in chain)
            if parent is None:
                raise CorruptStoreError(
                    f'layer "{chain[-1].id}" names parent "{chain[-1].parent}", which is not '
                    f"in the store (chain: {shown})"
                )
            if parent.id in seen:
                raise CorruptStoreError(f"parent cycle: {shown} -> {parent.id[:12]}")
            seen.add(parent.id)
            chain.append(parent)
        return chain

    def layers_by_digest(self, kind: str, digest: str) -> list[Layer]:
        """Layers whose ``compressed``, ``uncompressed`` or ``toc`` digest equals ``digest``."""
        if not _DIGEST_RE.match(digest):
            raise InvalidArgumentError(f'"{digest}" is not a valid digest')
        attr = {
            "compressed": "compressed_diff_digest",
            "uncompressed": "diff_digest",
            "toc": "toc_digest",
        }.get(kind)
        if attr is None:
            raise InvalidArgumentError(f"unknown digest kind {kind!r}")
        with self._reading():
            found = [copy_layer(la) for la in self._records if getattr(la, attr) == digest]
        if not found:
            raise LayerUnknownError(digest, f"no layer with {kind} digest")
        return found

    def size(self, ref: str) -> int:
        """The uncompressed size, or -1 when unknown."""
        return self.get(ref).size()

    # ----------------------------------------------------------------- create

    def create_layer(
        self,
        layer_id: str | None = None,
        *,
        names: Iterable[str] = (),
        parent: str | None = None,
        volatile: bool = False,
        writeable: bool = False,
        metadata: str = "",
        populate: Callable[[Layer, list[str]], dict[str, Any] | None] | None = None,
    ) -> Layer:
        """Create a layer (and fill it through ``populate``), crash-safely.

        ``populate(layer, lower_diff_dirs)`` runs with the record saved as incomplete and the
        directories made; it may return record fields to set (digests, sizes, uid/gid sets).
        If it raises, the layer is removed again and the error propagates. ``writeable``
        sets the record flag :data:`WRITEABLE_FLAG` (Go keeps unknown flags on every rewrite),
        which makes ``layerfs mount`` of the layer read-write; the overlay layout is the same.
        """
        wanted = list(dict.fromkeys(names))
        for name in wanted:
            if not name:
                raise InvalidArgumentError("a layer name must not be empty")
        if layer_id is not None and not _ID_RE.match(layer_id):
            raise InvalidArgumentError(
                f'"{layer_id}" is not a valid layer id (letters, digits, "_", "." and "-")'
            )
        with self._writing() as held:
            if layer_id is None:
                layer_id = new_layer_id()
                while layer_id in self._records:
                    layer_id = new_layer_id()
            elif layer_id in self._records:
                raise DuplicateIDError(f'layer id "{layer_id}" is already in use')
            for name in wanted:
                owner = self._records.by_name(name)
                if owner is not None:
                    raise NameInUseError(f'name "{name}" is already in use by layer "{owner.id}"')
            parent_layer = self._resolve(parent) if parent else None
            lower_dirs: list[str] = []
            if parent_layer is not None:
                lower_dirs = [
                    self.driver.diff_dir(la.id) for la in self._chain_unlocked(parent_layer)
                ]
            layer = Layer(
                id=layer_id,
                names=wanted,
                parent=parent_layer.id if parent_layer else "",
                metadata=metadata,
                created=format_created(time.time_ns()),
                flags={INCOMPLETE_FLAG: True, **({WRITEABLE_FLAG: True} if writeable else {})},
            )
            self._records.add(layer, volatile=volatile)
            self._save_for(held, layer)
            try:
                self.driver.create(layer.id, layer.parent)
                if populate is not None:
                    updates = populate(copy_layer(layer), lower_dirs)
                    for key, value in (updates or {}).items():
                        setattr(layer, key, value)
                del layer.flags[INCOMPLETE_FLAG]
                self._save_for(held, layer)
            except BaseException:
                self._abort_create(held, layer)
                raise
            return copy_layer(layer)

    def _abort_create(self, held: HeldLock, layer: Layer) -> bool:
        """Remove a layer whose create or update failed; True when it is gone.

        Caller holds the write lock and has saved the record flagged ``incomplete``. Errors
        here are only logged: the record stays incomplete, and this Store repairs it before
        its next operation (any other Store on its next load).
        """
        try:
            self._remove_layer_data(layer.id)
            self._forget(layer)
            self._save_for(held, layer)
        except Exception:
            log.exception('could not remove layer "%s" after a failed change', layer.id)
            self._needs_repair = True
            return False
        return True

    def update_layer(
        self, ref: str, apply: Callable[[Layer, list[str]], dict[str, Any] | None]
    ) -> Layer:
        """Change a layer's contents (``applydiff``) with the incomplete-flag discipline.

        The record is flagged incomplete while ``apply(layer, lower_diff_dirs)`` runs; on
        success its returned fields are set and the flag cleared. On failure the layer is
        removed before the error propagates (its contents are then unknown; the error says
        so), as the next load of any store would remove it; if that removal fails too, this
        Store keeps the repair pending and retries it before its next operation, so the
        incomplete layer is never listed or changed. ``apply`` runs under the write lock: it
        may read the store, not change it (see :meth:`_writing`).
        """
        with self._writing() as held:
            layer = self._resolve(ref)
            self._refuse_if_mounted(layer)
            lower_dirs = [self.driver.diff_dir(la.id) for la in self._chain_unlocked(layer)[1:]]
            layer.flags[INCOMPLETE_FLAG] = True
            self._save_for(held, layer)
            try:
                updates = apply(copy_layer(layer), lower_dirs)
            except BaseException as exc:
                removed = self._abort_create(held, layer)
                fate = "has been removed" if removed else "will be removed"
                if isinstance(exc, LayerfsError):
                    raise LayerfsError(
                        f'{exc}; layer "{layer.id}" was left incomplete and {fate}'
                    ) from exc
                raise
            for key, value in (updates or {}).items():
                setattr(layer, key, value)
            del layer.flags[INCOMPLETE_FLAG]
            self._save_for(held, layer)
            return copy_layer(layer)

    # ----------------------------------------------------------------- names, metadata, flags

    def set_names(self, ref: str, names: Iterable[str]) -> Layer:
        """Replace the layer's names; a name held by another layer moves to this one."""
        return self._change_names(ref, list(names), replace=True)

    def add_names(self, ref: str, names: Iterable[str]) -> Layer:
        """Add names; a name held by another layer moves to this one (as in Go)."""
        return self._change_names(ref, list(names), replace=False)

    def remove_names(self, ref: str, names: Iterable[str]) -> Layer:
        """Remove names from the layer; names it does not have are ignored."""
        drop = list(names)
        with self._writing() as held:
            layer = self._resolve(ref)
            self._records.remove_names(layer, drop)
            self._save(held)
            return copy_layer(layer)

    def _change_names(self, ref: str, names: list[str], *, replace: bool) -> Layer:
        for name in names:
            if not name:
                raise InvalidArgumentError("a layer name must not be empty")
        with self._writing() as held:
            layer = self._resolve(ref)
            self._records.set_names(layer, names if replace else layer.names + names)
            self._save(held)
            return copy_layer(layer)

    def set_metadata(self, ref: str, metadata: str) -> Layer:
        """Replace the free-text metadata."""
        with self._writing() as held:
            layer = self._resolve(ref)
            layer.metadata = metadata
            self._save_for(held, layer)
            return copy_layer(layer)

    def set_flag(self, ref: str, flag: str, value: Any) -> Layer:
        """Set one flag (any JSON value). ``incomplete`` is reserved for the store."""
        if flag == INCOMPLETE_FLAG:
            raise InvalidArgumentError(f'the flag "{INCOMPLETE_FLAG}" is reserved for the store')
        with self._writing() as held:
            layer = self._resolve(ref)
            layer.flags[flag] = value
            self._save_for(held, layer)
            return copy_layer(layer)

    def clear_flag(self, ref: str, flag: str) -> Layer:
        """Remove one flag; a flag that is not set is ignored."""
        with self._writing() as held:
            layer = self._resolve(ref)
            if flag in layer.flags and flag != INCOMPLETE_FLAG:
                del layer.flags[flag]
                self._save_for(held, layer)
            return copy_layer(layer)

    # ----------------------------------------------------------------- big data

    def big_data_names(self, ref: str) -> list[str]:
        """Keys of the layer's big-data items, in the order they were first written."""
        return list(self.get(ref).big_data_names)

    def get_big_data(self, ref: str, key: str) -> bytes:
        """The bytes stored under ``key``."""
        with self._reading():
            layer = self._resolve(ref)
            path = bigdata.big_data_path(self.files.layers_dir, layer.id, key)
            try:
                with open(path, "rb") as f:
                    return f.read()
            except FileNotFoundError as exc:
                raise BigDataUnknownError(
                    f'layer "{layer.id}" has no big-data item "{key}" ({path}: file does not exist)'
                ) from exc

    def set_big_data(self, ref: str, key: str, data: bytes) -> None:
        """Store ``data`` under ``key`` atomically; a new key is appended to big-data-names."""
        with self._writing() as held:
            layer = self._resolve(ref)
            path = bigdata.big_data_path(self.files.layers_dir, layer.id, key)
            os.makedirs(os.path.dirname(path), mode=0o700, exist_ok=True)
            atomic_write(path, data, durable=not self._records.is_volatile(layer.id))
            if key not in layer.big_data_names:
                layer.big_data_names.append(key)
                self._save_for(held, layer)

    # ----------------------------------------------------------------- mounts (counts only)

    def mount_count(self, ref: str) -> int:
        """How many users hold the layer's view, as recorded in mountpoints.json."""
        with self._reading():
            layer_id = self._resolve(ref).id
        record = self.mount_table.snapshot().get(layer_id)
        return record.count if record else 0

    def _refuse_if_mounted(self, layer: Layer) -> None:
        """Raise when the layer has a view, live or being started. Caller holds ``layers.lock``.

        The rule for counts (:mod:`layerfs.store.pending`): a ``mountpoints.json`` count
        whose path is a mount point is live (a mount whose daemon died is still a mount:
        ``layerfs mounted`` or ``unmount`` repairs it); one whose path is not mounted is
        *pending* while a layerfs ``mount`` holds the layer's lock, and refused like a live
        one; otherwise it is stale and dropped. A layerfs view that Go cannot see (private,
        or its record dropped by the Go tool) is found through its daemon record. Reads the
        mount table only: never probes a mount, so a hung daemon cannot block this.
        """
        runroot = self.files.runroot
        with self.mount_table.update() as table:
            record = table.get(layer.id)
            if record is not None and record.count > 0:
                if record.path and is_mountpoint(record.path):
                    raise LayerMountedError(
                        f'layer "{layer.id}" is mounted at {record.path} '
                        f"(count {record.count}); unmount it first"
                    )
                if pending.layer_busy(runroot, layer.id):
                    raise LayerMountedError(
                        f'layer "{layer.id}" is being mounted at {record.path} by another '
                        "layerfs command; unmount it first"
                    )
                del table[layer.id]
        daemon = pending.read_daemon(runroot, layer.id)
        if daemon is None:
            return
        if daemon.pid and procfs.pid_alive(daemon.pid) and is_mountpoint(daemon.path):
            raise LayerMountedError(
                f'layer "{layer.id}" has a layerfs view at {daemon.path} '
                f"(daemon {daemon.pid}); unmount it first"
            )
        if pending.layer_busy(runroot, layer.id):
            raise LayerMountedError(
                f'layer "{layer.id}" is being mounted at {daemon.path} by another '
                "layerfs command; unmount it first"
            )

    # ----------------------------------------------------------------- delete, wipe, gc

    def delete_layer(self, ref: str) -> str:
        """Delete one layer; returns its id.

        Refused when another layer's parent is this layer (checked by resolved id, so
        deleting by name cannot orphan a child), when it is an image's top layer, or when
        its view is mounted.
        """
        with self._writing() as held:
            layer = self._resolve(ref)
            children = self._records.children_of(layer.id)
            if children:
                raise LayerHasChildrenError(
                    f'layer "{layer.id}" is used by layer "{children[0]}": layer has children'
                )
            images = self.images.images_with_top_layer(layer.id)
            if images:
                raise LayerUsedByImageError(
                    f'layer "{layer.id}" is the top layer of image "{images[0]}"'
                )
            self._refuse_if_mounted(layer)
            self._delete_unlocked(held, layer)
            return layer.id

    def _delete_unlocked(self, held: HeldLock, layer: Layer) -> None:
        """Flag, remove data, drop the record. Caller holds the write lock.

        On a full disk the flag cannot be saved (the atomic write needs a temp file), and
        freeing data first would lose the crash guarantee; the space reserve is given up
        instead, and taken again once the delete has freed space.
        """
        layer.flags[INCOMPLETE_FLAG] = True
        try:
            self._save_for(held, layer)
        except StoreWriteError as exc:
            if exc.errno != errno.ENOSPC or not self._space_reserve.release():
                layer.flags.pop(INCOMPLETE_FLAG, None)
                raise
            self._save_for(held, layer)
        self._remove_layer_data(layer.id)
        self._forget(layer)
        self._save_for(held, layer)
        self._space_reserve.refill(self.files.stable)

    def wipe(self) -> list[str]:
        """Delete every layer, newest first; refused while any view is mounted."""
        with self._writing() as held:
            for layer in self._records:
                self._refuse_if_mounted(layer)
            deleted = []
            for layer in reversed(list(self._records)):
                self._delete_unlocked(held, layer)
                deleted.append(layer.id)
            self._save(held)
            return deleted

    def gc(self) -> list[str]:
        """Remove driver dirs, tar-splits, big data and ``l/`` links that belong to no record.

        Returns the removed paths. Runs under the write lock, so a layer being created by
        another process (its record is saved before its directories) is never collected.
        """
        removed: list[str] = []
        with self._writing():
            known = self._records.ids()
            for name in self.driver.orphans(known):
                path = os.path.join(self.driver.home, name)
                if is_mountpoint(os.path.join(path, "merged")):
                    log.warning("gc: %s is mounted; left alone", path)
                    continue
                remove_tree(path)
                removed.append(path)
            for name in self.driver.dangling_links():
                path = os.path.join(self.driver.link_dir, name)
                os.unlink(path)
                removed.append(path)
            with os.scandir(self.files.layers_dir) as entries:
                for entry in entries:
                    if entry.name.endswith(".tar-split.gz"):
                        owner = entry.name[: -len(".tar-split.gz")]
                    elif entry.is_dir(follow_symlinks=False):
                        owner = entry.name
                    elif entry.name.startswith(".tmp-"):
                        owner = ""  # a temp file left by a killed writer
                    else:
                        continue
                    if owner not in known:
                        remove_tree(entry.path)
                        removed.append(entry.path)
        return removed

    # ----------------------------------------------------------------- status

    def status(self) -> list[tuple[str, str]]:
        """Driver and store facts as (key, value) pairs, like ``containers-storage status``."""
        with self._reading():
            count = len(self._records)
            volatile = self._records.volatile_count()
        st = os.statvfs(self.files.root)
        return [
            ("Graph Root", self.root),
            ("Run Root", self.runroot),
            ("Driver", DRIVER),
            ("Backing Filesystem", fs_type_of(self.files.root)),
            ("Supports d_type", "true"),
            ("Native Overlay Diff", "true"),
            ("Using metacopy", "false"),
            ("Layers", str(count)),
            ("Volatile Layers", str(volatile)),
            ("Free Space", str(st.f_bavail * st.f_frsize)),
        ]

    def diff_dirs(self, ref: str) -> list[str]:
        """The ``diff/`` directories of the layer and its ancestors, nearest first."""
        return self.diff_dirs_of_chain(self.chain(ref))

    # ----------------------------------------------------------------- paths (no lock)
    #
    # Where the overlay driver keeps a layer's files. These compute paths only; whoever
    # reads or changes what is there holds ``layers.lock`` (see reading_layer).

    def overlay_home(self) -> str:
        """``<root>/overlay``: the driver's home, holding every layer directory."""
        return self.driver.home

    def layer_dir(self, layer_id: str) -> str:
        """``<root>/overlay/<id>``."""
        return self.driver.layer_dir(layer_id)

    def diff_dir(self, layer_id: str) -> str:
        """``<root>/overlay/<id>/diff``: the layer's own files."""
        return self.driver.diff_dir(layer_id)

    def merged_dir(self, layer_id: str) -> str:
        """``<root>/overlay/<id>/merged``: the default mount point of the layer's view."""
        return self.driver.merged_dir(layer_id)

    def work_dir(self, layer_id: str) -> str:
        """``<root>/overlay/<id>/work``."""
        return self.driver.work_dir(layer_id)

    def tar_split_path(self, layer_id: str) -> str:
        """``<root>/overlay-layers/<id>.tar-split.gz`` (it may not exist)."""
        return self.files.tar_split(layer_id)

    def diff_dirs_of_chain(self, chain: Sequence[Layer]) -> list[str]:
        """The ``diff/`` directories of the given records, in the same order."""
        return [self.driver.diff_dir(la.id) for la in chain]

    def whiteout_format(self) -> Literal["kernel", "aufs"]:
        """How this store's layers encode whiteouts (from ``overlay/.has-mount-program``)."""
        return self.driver.whiteout_format()

    # ----------------------------------------------------------------- whole operations

    def chain_with_dirs(self, ref: str) -> tuple[list[Layer], list[str]]:
        """The layer's chain (nearest first) and its ``diff/`` directories, from one lock."""
        with self._reading():
            chain = [copy_layer(la) for la in self._chain_unlocked(self._resolve(ref))]
        return chain, self.diff_dirs_of_chain(chain)

    @contextmanager
    def reading(self) -> Iterator[None]:
        """Hold ``layers.lock`` shared, with fresh records, for the whole block.

        Queries inside the block reuse the held lock (one acquisition for a command that
        resolves several references and then reads files); changes are refused
        (:class:`StoreReentryError`). ``images.lock`` may be taken inside the block: that is
        the lock order of containers/storage (layers, then images).
        """
        with self._reading():
            yield

    @contextmanager
    def reading_layer(self, ref: str) -> Iterator[LayerContents]:
        """Resolve ``ref`` and hold ``layers.lock`` shared while the block reads its files.

        The layer (and its chain) cannot be deleted or changed by anyone — this process,
        another layerfs or a Go process — until the block ends. Inside the block the Store
        may be queried (the held lock is reused) but not changed (:class:`StoreReentryError`).
        """
        with self._reading():
            chain = [copy_layer(la) for la in self._chain_unlocked(self._resolve(ref))]
            tar_split = self.files.tar_split(chain[0].id)
            yield LayerContents(
                layer=chain[0],
                chain=chain,
                diff_dir=self.driver.diff_dir(chain[0].id),
                lower_diff_dirs=self.diff_dirs_of_chain(chain[1:]),
                tar_split=tar_split if os.path.exists(tar_split) else None,
            )

    def has_layer_id(self, layer_id: str) -> bool:
        """Whether a layer has exactly this id (names and prefixes do not count)."""
        with self._reading():
            return layer_id in self._records

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
        """Add (or update) an image record whose top layer is ``top_layer`` (an exact id).

        Holds ``layers.lock`` shared for the whole write of ``images.json`` (taken inside
        it, as in containers/storage), so the top layer cannot be deleted meanwhile; a top
        layer that is not in the store raises :class:`LayerUnknownError`.
        """
        if self.read_only:
            raise StoreReadOnlyError(f"{self.root}: the store is open read-only")
        with self._reading():
            if top_layer not in self._records:
                raise LayerUnknownError(top_layer, "the image's top layer is not in the store")
            return self.images.add_image(
                image_id,
                names=names,
                top_layer=top_layer,
                manifest=manifest,
                manifest_digest=manifest_digest,
                config=config,
                config_digest=config_digest,
            )

    # ----------------------------------------------------------------- mount counts

    def mount_records(self) -> dict[str, MountRecord]:
        """The recorded mount counts (a snapshot of mountpoints.json, by layer id)."""
        return self.mount_table.snapshot()

    @contextmanager
    def mount_counts(self) -> Iterator[dict[str, MountRecord]]:
        """The mount table for changes, under ``layers.lock`` (shared) and ``mountpoints.lock``.

        Lock order as in Go: ``layers.lock`` first. The table is saved at the end of the
        block if it changed. The Store may be queried inside the block, not changed.
        """
        with self._reading(), self.mount_table.update() as table:
            yield table
