"""Building a layer's index: producers of entries, the cache key, and the cache policy.

A layer index is made from an iterator of :class:`~layerfs.fs.index.format.Entry` values.
:func:`walk_diff` is the producer that reads a ``diff/`` directory; a later producer can read
a table of contents (zstd:chunked, eStargz) instead and feed the same :func:`encode`.

**What a persisted index trusts** (:func:`layer_index`): an index file beside a layer
(``overlay/<id>/layerfs.index``) is used only for a layer whose content is pinned by a recorded
uncompressed diff digest, and only when its key matches exactly: format version, layer id,
that digest, the ``diff/`` directory's device, inode, mtime and ctime, the identity (device,
inode, size, mtime, ctime) of the layer's tar-split file, and the identity of its ``work/``
directory (a read-write kernel mount of the layer recreates ``work/work``, changing it). Every
applydiff writes a new digest and a new tar-split file; layerfs applydiff deletes the index.
A layer without a digest (a container layer, an empty created layer), any layer that is at
this moment the upper directory of a kernel overlay mount, and any layer whose ``work/`` is not
empty is scanned live and its index never written or read. A read-write mount of the layer
(kernel overlay or fuse-overlayfs, whoever made it and in whatever mount namespace, with
absolute or relative ``upperdir``) leaves ``work/work`` behind, and such a mount can change any
file below ``diff/`` without touching the key: fuse-overlayfs creates ``work/work`` only once,
and a mount that was live while the key was taken changes nothing afterwards. A layer never
mounted read-write has an empty ``work/`` (or none).

**Ids and namespaces**: the ids in an index are those ``lstat`` gave the process that built
it, i.e. seen through its user namespace's id maps. The key of a layer built inside a user
namespace therefore includes the digests of its uid and gid maps (:meth:`IdMap.key`), so a
process in another namespace (or on the host) never reads owners taken from a namespace that
is not its own: it rebuilds the index (and saves its own).

**Unreadable directories**: a directory the building process may not list and search
(``faccessat(R_OK|X_OK)`` with effective ids, or EACCES from the listing itself) is indexed
with its own attributes and :data:`~layerfs.fs.index.format.F_SEALED`, no children; the view
answers EACCES below it, as kernel overlayfs does with its mounter's credentials, instead of
failing the whole mount. Such an index depends on who built it and is never saved.
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import os
import stat
from collections.abc import Iterator
from dataclasses import dataclass

from layerfs.errors import LayerfsError
from layerfs.fs.index.format import (
    F_SEALED,
    Entry,
    IndexFormatError,
    LayerIndex,
    decode,
    encode,
    read_file,
    write_file,
)
from layerfs.mountinfo import overlay_upper_dirs
from layerfs.overlayfmt import (
    F_OTHER_DEV,
    F_REDIRECT,
    F_TRUSTED_WHITEOUT,
    MARKER_XATTRS,
    TRUSTED_PREFIX,
    TRUSTED_REDIRECT,
    TRUSTED_WHITEOUT,
)
from layerfs.userns import read_id_map

log = logging.getLogger("layerfs.fs.index")

INDEX_FILE = "layerfs.index"
KEY_VERSION = 1


class LayerReadError(LayerfsError):
    """A layer's ``diff/`` cannot be read completely; no view is built from it."""


@dataclass(frozen=True)
class LayerPin:
    """A store layer as the index sees it: its id, its recorded uncompressed diff digest
    (``""``: none, the layer is not pinned), its tar-split file (``None``: none) and where its
    index file lives (``None``: nowhere). Only a pinned layer's index file is read or written;
    an unpinned layer's file is removed."""

    layer_id: str
    digest: str
    tar_split: str | None = None
    index_path: str | None = None


def _read_xattrs(
    path: bytes, sealed: bool = False
) -> tuple[int, bytes | None, tuple[tuple[bytes, bytes], ...]]:
    """(marker flags, redirect value, other xattrs) of *path* (not followed).

    Raises LayerReadError naming the path when an xattr cannot be read (other than "not
    supported"/"vanished"): a marker read as absent could expose hidden entries. Of a
    *sealed* directory (nothing below it is answered) an xattr it may not read (``user.*``
    needs read permission) is left out."""
    try:
        names = os.listxattr(path, follow_symlinks=False)
    except OSError as e:
        if e.errno == errno.ENOTSUP:
            return 0, None, ()
        raise LayerReadError(
            f"cannot list the xattrs of {os.fsdecode(path)}: {os.strerror(e.errno or 0)}"
        ) from None
    flags = 0
    redirect = None
    out = []
    for n in names:
        nb = os.fsencode(n)
        try:
            value = os.getxattr(path, nb, follow_symlinks=False)
        except OSError as e:
            if e.errno in (errno.ENODATA, errno.ENOTSUP):
                continue
            if sealed and e.errno == errno.EACCES:
                continue
            raise LayerReadError(
                f"cannot read xattr {os.fsdecode(nb)} of {os.fsdecode(path)}: "
                f"{os.strerror(e.errno or 0)}"
            ) from None
        marker = MARKER_XATTRS.get(nb)
        if marker is not None:
            flags |= marker.get(value, 0)
        if nb == TRUSTED_WHITEOUT:
            flags |= F_TRUSTED_WHITEOUT
        elif nb == TRUSTED_REDIRECT:
            redirect = value
        if nb.startswith(TRUSTED_PREFIX):
            continue  # internal to every format; kept only as the facts above
        out.append((nb, value))
    out.sort()
    return flags, redirect, tuple(out)


def walk_diff(diff_dir: str | bytes) -> Iterator[Entry]:
    """Every entry of a ``diff/`` tree, the root first; nothing is interpreted (whiteouts and
    markers are reported like any file, with their marker flags). Symlinks are not followed;
    entries on another device than the layer root (below a mount point) get F_OTHER_DEV; a
    directory this process may not list and search gets F_SEALED and no children (see the
    module docstring). Raises LayerReadError naming the path when something else cannot be
    read."""
    root = os.path.abspath(os.fsencode(diff_dir))
    try:
        root_dev = os.lstat(root).st_dev
    except OSError as e:
        raise LayerReadError(f"cannot read layer {os.fsdecode(root)}: {e.strerror}") from None
    # real root on the host may list everything (no access call per directory); anyone else
    # asks the kernel first, so that a directory listable but not searchable is sealed too
    check_access = os.geteuid() != 0 or not read_id_map("uid").is_identity()
    stack: list[bytes] = [b""]
    while stack:
        rel = stack.pop()
        path = root + b"/" + rel if rel else root
        try:
            st = os.lstat(path)
            link = os.readlink(path) if stat.S_ISLNK(st.st_mode) else None
        except OSError as e:
            raise LayerReadError(f"cannot read {os.fsdecode(path)}: {e.strerror}") from None
        is_dir = stat.S_ISDIR(st.st_mode)
        sealed = False
        if is_dir:
            if check_access and not os.access(
                path, os.R_OK | os.X_OK, effective_ids=True, follow_symlinks=False
            ):
                sealed = True
            else:
                try:
                    with os.scandir(path) as it:
                        stack += [rel + b"/" + e.name if rel else e.name for e in it]
                except PermissionError:
                    sealed = True
                except OSError as e:
                    raise LayerReadError(f"cannot list {os.fsdecode(path)}: {e.strerror}") from None
        flags, redirect, xattrs = _read_xattrs(path, sealed)
        if sealed:
            flags |= F_SEALED
        if st.st_dev != root_dev:
            flags |= F_OTHER_DEV
        if is_dir:
            if redirect:
                flags |= F_REDIRECT
                link = redirect
        else:
            redirect = None
        yield Entry(
            rel,
            st.st_mode,
            st.st_uid,
            st.st_gid,
            st.st_nlink,
            st.st_rdev,
            st.st_size,
            st.st_blocks,
            st.st_ino,
            st.st_dev,
            st.st_atime_ns,
            st.st_mtime_ns,
            st.st_ctime_ns,
            flags,
            link,
            xattrs,
        )


def _ident(path: str | bytes) -> list[int] | None:
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return None
    return [st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns]


def layer_key(diff_dir: str | bytes, pin: LayerPin | None) -> bytes:
    """The cache key of a layer in its current state (see the module docstring)."""
    d = os.fsencode(diff_dir)
    st = os.lstat(d)
    parts: dict[str, object] = {
        "v": KEY_VERSION,
        "diff": [st.st_dev, st.st_ino, st.st_mtime_ns, st.st_ctime_ns],
        "work": _ident(os.path.join(os.path.dirname(d), b"work")),
    }
    uids, gids = read_id_map("uid"), read_id_map("gid")
    if not (uids.is_identity() and gids.is_identity()):
        parts["ids"] = [uids.key(), gids.key()]  # owners as this user namespace sees them
    if pin is not None:
        parts["id"] = pin.layer_id
        parts["digest"] = pin.digest
        parts["tar-split"] = _ident(pin.tar_split) if pin.tar_split else None
    return json.dumps(parts, sort_keys=True).encode()


def _mounted_read_write(diff_dir: bytes) -> bool:
    """True if the layer's ``work/`` has any entry (it has been the upper directory of a
    read-write mount) or cannot be listed; False if it is empty or absent."""
    try:
        with os.scandir(os.path.join(os.path.dirname(diff_dir), b"work")) as it:
            return next(it, None) is not None
    except FileNotFoundError:
        return False
    except OSError:
        return True


def upper_dirs_in_use() -> set[bytes]:
    """Upper dirs of this mount namespace's kernel overlays, as absolute byte paths."""
    try:
        return {os.fsencode(p) for p in overlay_upper_dirs()}
    except OSError:
        return set()


def _noting_sealed(entries: Iterator[Entry], sealed: list[bytes]) -> Iterator[Entry]:
    for e in entries:
        if e.flags & F_SEALED:
            sealed.append(e.path)
        yield e


def _report_sealed(diff_dir: bytes, sealed: list[bytes]) -> None:
    if sealed:
        shown = ", ".join("/" + os.fsdecode(p) for p in sealed[:5])
        more = f" and {len(sealed) - 5} more" if len(sealed) > 5 else ""
        log.warning(
            "layer %s: %d directories cannot be read (EACCES below them): %s%s",
            os.fsdecode(diff_dir),
            len(sealed),
            shown,
            more,
        )


def scan_layer(diff_dir: str | bytes) -> LayerIndex:
    """A fresh index of *diff_dir*, in memory (never persisted)."""
    sealed: list[bytes] = []
    data = encode(_noting_sealed(walk_diff(diff_dir), sealed), b"")
    _report_sealed(os.fsencode(diff_dir), sealed)
    return decode(data, b"")


def layer_index(
    diff_dir: str | bytes, pin: LayerPin | None, upper_dirs: set[bytes] | None = None
) -> tuple[LayerIndex, bool]:
    """The index of one layer: loaded from beside it when pinned and valid, else built.

    *upper_dirs*: the upper dirs of the kernel overlays mounted now (a layer among them can
    change under the index and is scanned live); read from mountinfo when not given.

    Returns (index, loaded). A pinned layer's rebuilt index is saved (best effort, atomic).
    An index file of an unpinned layer (for example left by an older layerfs) is removed,
    best effort, and never read."""
    d = os.path.abspath(os.fsencode(diff_dir))
    if pin is None or pin.index_path is None:
        return scan_layer(d), False
    path = os.fsencode(pin.index_path)
    if upper_dirs is None:
        upper_dirs = upper_dirs_in_use()
    if not pin.digest or _mounted_read_write(d) or d in upper_dirs:
        with contextlib.suppress(OSError):
            os.unlink(path)
        return scan_layer(d), False
    try:
        key = layer_key(d, pin)
    except OSError as e:
        raise LayerReadError(f"cannot read layer {os.fsdecode(d)}: {e.strerror}") from None
    try:
        return read_file(path, key), True
    except FileNotFoundError:
        pass
    except (OSError, IndexFormatError) as e:
        log.warning("ignoring index %s (%s); rebuilding", os.fsdecode(path), e)
    sealed: list[bytes] = []
    data = encode(_noting_sealed(walk_diff(d), sealed), key)
    _report_sealed(d, sealed)
    with contextlib.suppress(OSError):
        os.unlink(path)  # whatever it was (a symlink, a damaged file): not ours to keep
    if not sealed and layer_key(d, pin) == key:  # complete and unchanged while we walked
        try:
            write_file(path, data)
        except OSError as e:
            log.info("cannot save index %s: %s", os.fsdecode(path), e.strerror)
    return decode(data, key), False
