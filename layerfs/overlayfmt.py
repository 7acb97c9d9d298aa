"""Whiteout, opaque and redirect rules of each store format, in one place.

A store's ``overlay/.has-mount-program`` says which program mounts its layers, and with it how
deletions are encoded in ``diff/`` (:meth:`OverlayLayout.whiteout_format`). A view of a layer
chain must show exactly what the store's own mount shows, so every reader of ``diff/`` asks this
module, never its own copy of the rules.

``"kernel"`` (root store, no mount program): the running kernel's overlayfs in a lowerdir-only
mount is the oracle (measured on Linux 6.18):

* a whiteout is a character device 0:0, or (kernel >= 6.7) an *empty regular file* carrying
  the xattr ``trusted.overlay.whiteout``; the parent need not be marked ``opaque=x`` for a
  lookup to honour it;
* a directory is opaque when ``trusted.overlay.opaque`` is exactly ``y``; ``x`` only marks a
  directory holding xattr whiteouts and is *not* opaque; the root of a layer is never opaque;
* ``trusted.overlay.redirect`` on a directory is followed (``redirect_always_follow``): an
  absolute value (``/a/b``) continues the merge in the lower layers at that path from their
  roots, a relative one at that name in the same parent;
* everything else is ordinary: a file named ``.wh.x`` is a file called ``.wh.x``,
  ``.wh..wh..opq`` is a file, ``user.overlay.opaque`` is an ordinary xattr (no ``userxattr``);
* ``trusted.overlay.*`` xattrs are internal and never listed.

Rootless (a plain user, or euid 0 in a user namespace: :func:`userxattr`), the kernel format
is read and written as containers/storage and the kernel do it there: c/storage mounts with
``userxattr``, so a directory is opaque when ``user.overlay.opaque`` is ``y`` (the trusted
form means nothing, and an unprivileged process could not even read it), ``user.overlay.*``
xattrs are internal too, and every marker layerfs writes uses ``user.overlay.*``, never
``trusted.*``. Whiteouts stay character devices 0:0 (the kernel lets a user namespace make
those; observed with containers-storage 1.43 inside ``podman unshare``).

``"aufs"`` (a store with a mount program): fuse-overlayfs 1.10 is the oracle (measured):

* ``.wh.NAME`` (of any file type) hides ``NAME`` in lower layers *and* in its own layer; a
  character device 0:0 is a whiteout too; a bare ``.wh.`` does nothing; every name starting with
  ``.wh.`` is internal and never shown;
* a directory is opaque when it holds an entry ``.wh..wh..opq`` (any type) or one of the xattrs
  ``trusted.overlay.opaque``, ``user.overlay.opaque``, ``user.fuseoverlayfs.opaque`` is exactly
  ``y``; this includes the root of a layer;
* xattr whiteouts, ``opaque=x`` and redirects mean nothing;
* ``trusted.overlay.*``, ``user.overlay.*`` and ``user.fuseoverlayfs.*`` xattrs are internal.
"""

from __future__ import annotations

import stat
from typing import Literal

from layerfs import userns

WhiteoutFormat = Literal["kernel", "aufs"]
FORMATS: tuple[WhiteoutFormat, ...] = ("kernel", "aufs")

WH_PREFIX = b".wh."
OPAQUE_MARKER = b".wh..wh..opq"

TRUSTED_PREFIX = b"trusted.overlay."
TRUSTED_OPAQUE = b"trusted.overlay.opaque"
TRUSTED_WHITEOUT = b"trusted.overlay.whiteout"
TRUSTED_REDIRECT = b"trusted.overlay.redirect"
USER_OPAQUE = b"user.overlay.opaque"
FUSE_OPAQUE = b"user.fuseoverlayfs.opaque"

ROOT_LAYERFS_PREFIX = b"trusted.layerfs."
ROOTLESS_LAYERFS_PREFIX = b"user.layerfs."


_USERXATTR = userns.is_rootless()
"""Whether this process is rootless (see :func:`userxattr`); read once, at import."""

LAYERFS_PREFIX = ROOTLESS_LAYERFS_PREFIX if _USERXATTR else ROOT_LAYERFS_PREFIX
"""A read-write view's own bookkeeping on upper entries (:data:`ORIGIN_XATTR`): under
``trusted.layerfs.`` as root, ``user.layerfs.`` when rootless (a user namespace cannot set
``trusted.*``; being rootless never changes within a process, see :func:`userxattr`). Both
forms are hidden by every layerfs view, read-only ones included (where kernel overlayfs,
which knows nothing of them, would list them), and never exported."""

_BOOKKEEPING = (ROOT_LAYERFS_PREFIX, ROOTLESS_LAYERFS_PREFIX)

HIDDEN_PREFIXES: dict[WhiteoutFormat, tuple[bytes, ...]] = {
    # rootless, the kernel mounts with userxattr: user.overlay.* is its own, never listed
    "kernel": (TRUSTED_PREFIX, *_BOOKKEEPING, *((b"user.overlay.",) if _USERXATTR else ())),
    "aufs": (TRUSTED_PREFIX, b"user.overlay.", b"user.fuseoverlayfs.", *_BOOKKEEPING),
}
"""Xattr name prefixes the format's own mount never lists (and layerfs's bookkeeping)."""

COMMON_HIDDEN_PREFIXES: tuple[bytes, ...] = (TRUSTED_PREFIX, *_BOOKKEEPING)
"""Prefixes hidden in every format."""

# Raw facts about one entry of a layer, recorded by the per-layer index (format-independent).
F_TRUSTED_OPAQUE_Y = 1 << 0
F_TRUSTED_OPAQUE_X = 1 << 1
F_USER_OPAQUE_Y = 1 << 2
F_FUSE_OPAQUE_Y = 1 << 3
F_TRUSTED_WHITEOUT = 1 << 4
F_REDIRECT = 1 << 5  # the redirect value is stored as the row's "link" string
F_OTHER_DEV = 1 << 6  # the entry lives on another device than its layer's root
KNOWN_FLAGS = (1 << 7) - 1

MARKER_XATTRS: dict[bytes, dict[bytes, int]] = {
    TRUSTED_OPAQUE: {b"y": F_TRUSTED_OPAQUE_Y, b"x": F_TRUSTED_OPAQUE_X},
    USER_OPAQUE: {b"y": F_USER_OPAQUE_Y},
    FUSE_OPAQUE: {b"y": F_FUSE_OPAQUE_Y},
}
"""Opaque-marker xattrs and the flag each value sets (other values set nothing)."""


def check_format(fmt: str) -> WhiteoutFormat:
    """*fmt* as a :data:`WhiteoutFormat`; ValueError for anything else."""
    if fmt == "kernel":
        return "kernel"
    if fmt == "aufs":
        return "aufs"
    raise ValueError(f"unknown whiteout format {fmt!r} (kernel or aufs)")


def userxattr() -> bool:
    """True when this process is rootless, so that its kernel overlay (and containers/storage
    in it) uses ``user.overlay.*`` instead of ``trusted.overlay.*`` (the ``userxattr`` mount
    option). Fixed for the life of the process: a plain user is rootless both before and
    after layerfs joins its user namespace (``setns`` in the same process), and real root
    never enters one."""
    return _USERXATTR


def is_hidden_xattr(fmt: WhiteoutFormat, name: bytes) -> bool:
    """True if the format's mount never lists xattr *name*."""
    return name.startswith(HIDDEN_PREFIXES[fmt])


def is_internal_name(fmt: WhiteoutFormat, name: bytes) -> bool:
    """True if *name* is a marker the format's mount never shows (whatever it marks)."""
    return fmt == "aufs" and name.startswith(WH_PREFIX)


def whiteout_target(
    fmt: WhiteoutFormat, name: bytes, mode: int, rdev: int, size: int, flags: int
) -> bytes | None:
    """The name this entry whites out in its directory, or None if it is no whiteout."""
    if fmt == "aufs" and name.startswith(WH_PREFIX):  # by name, whatever the file type
        if name != OPAQUE_MARKER and len(name) > len(WH_PREFIX):
            return name[len(WH_PREFIX) :]
        return None
    if stat.S_ISCHR(mode) and rdev == 0:
        return name
    if fmt == "kernel" and stat.S_ISREG(mode) and size == 0 and flags & F_TRUSTED_WHITEOUT:
        return name
    return None


def is_opaque(fmt: WhiteoutFormat, flags: int, has_marker_child: bool, is_root: bool) -> bool:
    """True if a layer's directory hides the same directory in all lower layers."""
    if fmt == "kernel":
        marker = F_USER_OPAQUE_Y if userxattr() else F_TRUSTED_OPAQUE_Y
        return not is_root and bool(flags & marker)
    return has_marker_child or bool(
        flags & (F_TRUSTED_OPAQUE_Y | F_USER_OPAQUE_Y | F_FUSE_OPAQUE_Y)
    )


def follows_redirects(fmt: WhiteoutFormat) -> bool:
    """True if the format's mount follows ``trusted.overlay.redirect`` on directories."""
    return fmt == "kernel"


# -- write side: the marker forms a read-write view writes into its upper dir --------------
#
# Measured with the same oracles as the read rules above: kernel overlayfs (Linux 6.18) as
# root writes a whiteout as a character device 0:0 with mode 0 and marks a directory made over
# a whiteout with ``trusted.overlay.opaque=y``; fuse-overlayfs 1.10 as root writes the same
# character device for a whiteout and marks a directory opaque with ``trusted.overlay.opaque=y``
# *and* an empty 0700 regular file ``.wh..wh..opq`` inside it (both read rules accept those).

WHITEOUT_MODE = stat.S_IFCHR | 0o000
"""Mode of a whiteout device as kernel overlayfs and fuse-overlayfs create it (rdev 0:0)."""

OPAQUE_MARKER_MODE = 0o700
"""Mode of the ``.wh..wh..opq`` file fuse-overlayfs puts in an opaque directory."""

ORIGIN_XATTR = LAYERFS_PREFIX + b"origin"
"""Written by a read-write view on an upper entry that stands for a lower one (copy-up) or
keeps an inode number across a rename: the view's inode number, decimal ASCII. Internal:
never listed, never exported; kernel overlayfs and c/storage ignore ``trusted.layerfs.*``."""

WRITE_HIDDEN_PREFIXES: tuple[bytes, ...] = _BOOKKEEPING
"""Xattr prefixes of a read-write view's own bookkeeping: hidden in every format."""


def opaque_xattrs(fmt: WhiteoutFormat) -> tuple[tuple[bytes, bytes], ...]:
    """The xattrs that mark a directory opaque when a read-write view or an import writes it
    (``user.overlay.opaque`` when rootless: an unprivileged process cannot set ``trusted.*``)."""
    return ((USER_OPAQUE, b"y"),) if userxattr() else ((TRUSTED_OPAQUE, b"y"),)


def opaque_read_xattrs(fmt: WhiteoutFormat) -> tuple[bytes, ...]:
    """The xattrs whose value ``y`` makes an upper directory opaque in *fmt* (what a
    read-write view reads back of what it, or the format's own mount, wrote)."""
    if fmt == "aufs":
        return (TRUSTED_OPAQUE, USER_OPAQUE, FUSE_OPAQUE)
    return (USER_OPAQUE,) if userxattr() else (TRUSTED_OPAQUE,)


def opaque_marker_file(fmt: WhiteoutFormat) -> bytes | None:
    """The name of the marker file an opaque directory also holds in *fmt* (or None)."""
    return OPAQUE_MARKER if fmt == "aufs" else None


def is_write_internal_xattr(fmt: WhiteoutFormat, name: bytes) -> bool:
    """True for xattrs a read-write view refuses to set or show (as the format's mount does):
    the format's internal names and the view's own bookkeeping."""
    return is_hidden_xattr(fmt, name) or name.startswith(WRITE_HIDDEN_PREFIXES)


def is_upper_whiteout(fmt: WhiteoutFormat, name: bytes, st_mode: int, st_rdev: int) -> bool:
    """True if an upper-dir entry (from lstat) is a whiteout (by its own form, not by name)."""
    return stat.S_ISCHR(st_mode) and st_rdev == 0
