"""The overlay driver's directory layout under ``<graphroot>/overlay``.

Per layer ``<id>/`` (0700) holds ``diff/`` (the layer's files; 0555 for a base layer, the
parent's ``diff/`` mode otherwise), ``link`` (26 base32 characters, 0644, no newline),
``lower`` (only with a parent: ``l/<parentlink>`` then the parent's own ``lower``, joined
with ``:``), ``work/``, ``merged/`` and, for a base layer, ``empty/``. ``l/<link>`` is a
symlink to ``../<id>/diff`` that keeps kernel mount option strings short.

Every function here expects the caller to hold the store's write lock (``layers.lock``)
when it changes anything, and at least the read lock when it reads.
"""

from __future__ import annotations

import base64
import contextlib
import os
import secrets
import shutil
import stat
from collections.abc import Callable
from typing import Any, Literal

from layerfs.errors import CorruptStoreError, LayerfsError
from layerfs.mountinfo import is_mountpoint

DRIVER = "overlay"
LINK_DIR = "l"
BASE_DIFF_MODE = 0o555
MOUNT_PROGRAM_MARKER = ".has-mount-program"
_RESERVED = frozenset({LINK_DIR, MOUNT_PROGRAM_MARKER})


class OverlayLayout:
    """Paths and directory operations of the overlay driver home ``<graphroot>/overlay``."""

    def __init__(self, graphroot: str) -> None:
        self.home = os.path.join(graphroot, DRIVER)
        self.link_dir = os.path.join(self.home, LINK_DIR)

    def ensure_home(self) -> None:
        """Create the driver home, ``l/`` and ``.has-mount-program`` as the Go driver does.

        ``.has-mount-program`` also records the store's whiteout form: ``false`` (root) means
        kernel form (char device 0:0, ``trusted.overlay.opaque``), ``true`` means the form the
        Go driver writes with a mount program (``.wh.`` files, ``user.overlay.opaque``),
        which needs neither mknod nor trusted.* xattrs.

        Many processes may open a fresh store at once (no lock is held here): the marker
        is written to a private temporary file and hard-linked into place, so it appears
        whole or not at all, and a process that loses the race keeps the winner's file.
        """
        os.makedirs(self.home, mode=0o700, exist_ok=True)
        os.makedirs(self.link_dir, mode=0o700, exist_ok=True)
        marker = os.path.join(self.home, MOUNT_PROGRAM_MARKER)
        content = b"false" if os.geteuid() == 0 else b"true"
        for _attempt in range(3):  # a concurrent gc may remove our temp file: try again
            if os.path.exists(marker):
                return
            tmp = f"{marker}.tmp-{os.getpid()}-{secrets.token_hex(4)}"
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
            try:
                try:
                    os.write(fd, content)
                finally:
                    os.close(fd)
                os.link(tmp, marker)
                return
            except FileExistsError:  # another process was first; its file is whole
                return
            except FileNotFoundError:
                continue
            finally:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(tmp)

    def whiteout_format(self) -> Literal["kernel", "aufs"]:
        """The whiteout form this store's layers use (see :meth:`ensure_home`).

        Only the exact text ``true`` means a mount program; any other content (garbage,
        non-UTF-8 bytes) is the kernel form. A marker that is not a regular file (a FIFO, a
        directory) or cannot be read counts as missing; it is never waited on."""
        uses_program = os.geteuid() != 0
        try:
            fd = os.open(
                os.path.join(self.home, MOUNT_PROGRAM_MARKER),
                os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC,
            )
        except OSError:
            return "aufs" if uses_program else "kernel"
        try:
            if stat.S_ISREG(os.fstat(fd).st_mode):
                uses_program = os.read(fd, 64).strip() == b"true"
        except OSError:
            pass
        finally:
            os.close(fd)
        return "aufs" if uses_program else "kernel"

    def layer_dir(self, layer_id: str) -> str:
        """``<home>/<id>``."""
        return os.path.join(self.home, layer_id)

    def diff_dir(self, layer_id: str) -> str:
        """``<home>/<id>/diff``: the layer's own files."""
        return os.path.join(self.home, layer_id, "diff")

    def merged_dir(self, layer_id: str) -> str:
        """``<home>/<id>/merged``: the default mount point."""
        return os.path.join(self.home, layer_id, "merged")

    def work_dir(self, layer_id: str) -> str:
        """``<home>/<id>/work``."""
        return os.path.join(self.home, layer_id, "work")

    def create(self, layer_id: str, parent_id: str) -> None:
        """Create the layer's directories, link and lower files.

        Caller holds the write lock and has saved the record flagged ``incomplete``, so a
        crash part-way leaves a layer that the next load removes.
        """
        self.ensure_home()
        layer_dir = self.layer_dir(layer_id)
        os.mkdir(layer_dir, 0o700)
        diff_mode = BASE_DIFF_MODE
        if parent_id:
            parent_diff = self.diff_dir(parent_id)
            try:
                diff_mode = stat.S_IMODE(os.stat(parent_diff).st_mode)
            except FileNotFoundError as exc:
                raise CorruptStoreError(
                    f'parent layer "{parent_id}" has no directory {parent_diff}'
                ) from exc
        diff = self.diff_dir(layer_id)
        os.mkdir(diff)
        os.chmod(diff, diff_mode)
        link = _new_link_id()
        _write_small(os.path.join(layer_dir, "link"), link, 0o644)
        os.symlink(os.path.join("..", layer_id, "diff"), os.path.join(self.link_dir, link))
        if parent_id:
            _write_small(os.path.join(layer_dir, "lower"), self._lower_for_child(parent_id), 0o644)
        else:
            os.mkdir(os.path.join(layer_dir, "empty"), 0o700)
        os.mkdir(os.path.join(layer_dir, "work"), 0o700)
        os.mkdir(os.path.join(layer_dir, "merged"), 0o700)

    def _lower_for_child(self, parent_id: str) -> str:
        parts = [f"{LINK_DIR}/{self.link_of(parent_id)}"]
        parent_lower = os.path.join(self.layer_dir(parent_id), "lower")
        with contextlib.suppress(FileNotFoundError), open(parent_lower) as f:
            text = f.read().strip()
            if text:
                parts.append(text)
        return ":".join(parts)

    def link_of(self, layer_id: str) -> str:
        """The layer's short link name, repairing a missing ``l/`` symlink on the way."""
        path = os.path.join(self.layer_dir(layer_id), "link")
        try:
            with open(path) as f:
                link = f.read().strip()
        except FileNotFoundError as exc:
            raise CorruptStoreError(f'layer "{layer_id}" has no link file {path}') from exc
        target = os.path.join(self.link_dir, link)
        if not os.path.islink(target):
            with contextlib.suppress(FileExistsError):
                os.symlink(os.path.join("..", layer_id, "diff"), target)
        return link

    def remove(self, layer_id: str) -> None:
        """Remove the layer's directories and its ``l/`` symlink; missing parts are fine.

        Caller holds the write lock and has flagged the record ``incomplete``. Refuses a
        ``merged/`` that is still a mount point, so a live view is never deleted under a user.
        """
        layer_dir = self.layer_dir(layer_id)
        merged = self.merged_dir(layer_id)
        if is_mountpoint(merged):
            raise LayerfsError(f'layer "{layer_id}": {merged} is still mounted')
        link_file = os.path.join(layer_dir, "link")
        with contextlib.suppress(OSError), open(link_file) as f:
            link = f.read().strip()
            if link and "/" not in link:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(os.path.join(self.link_dir, link))
        remove_tree(layer_dir)

    def orphans(self, known_ids: set[str]) -> list[str]:
        """Entries of the driver home that belong to no layer record."""
        try:
            names = os.listdir(self.home)
        except FileNotFoundError:
            return []
        return sorted(n for n in names if n not in known_ids and n not in _RESERVED)

    def dangling_links(self) -> list[str]:
        """``l/`` symlinks whose target no longer exists."""
        try:
            names = os.listdir(self.link_dir)
        except FileNotFoundError:
            return []
        return sorted(n for n in names if not os.path.exists(os.path.join(self.link_dir, n)))


def remove_tree(path: str) -> None:
    """Remove a directory tree; read-only directories (diff/ is 0555) are made writable.

    Root ignores directory modes; an unprivileged owner needs the parent made writable
    before it can unlink, which the error handler does before retrying once.
    """

    def on_error(func: Callable[[str], object], failed: str, exc_info: Any) -> None:
        exc = exc_info[1]
        if isinstance(exc, FileNotFoundError):
            return
        if isinstance(exc, PermissionError) and func in (os.unlink, os.rmdir):
            os.chmod(os.path.dirname(failed), 0o700)
            func(failed)
            return
        raise exc

    if os.path.islink(path) or os.path.isfile(path):
        os.unlink(path)
    elif os.path.lexists(path):
        shutil.rmtree(path, onerror=on_error)


def _new_link_id() -> str:
    return base64.b32encode(os.urandom(16)).decode("ascii")[:26]


def _write_small(path: str, text: str, mode: int) -> None:
    """Write a small file atomically (temp file in the same directory, then rename).

    A kill part-way must never leave ``link`` empty: containers-storage 1.43 deletes
    ``l/<contents of link>`` when it removes an incomplete layer, and for an empty ``link``
    that is the whole ``l/`` directory, breaking every other layer's link.
    """
    tmp = f"{path}.tmp-{os.getpid()}"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, mode)
    try:
        data = text.encode()
        while data:
            data = data[os.write(fd, data) :]
    finally:
        os.close(fd)
    os.rename(tmp, path)
