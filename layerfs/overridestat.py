"""``user.containers.override_stat``: the owner, mode and type a file *should* have.

containers/storage writes it when it may not give a file its real owner or mode (the store
option ``force_mask``, or rootless without enough subordinate ids), and fuse-overlayfs (and a
layerfs view) show the stored values instead of the file's own. The format, from
containers/storage ``pkg/idtools`` (``FormatContainersOverrideXattrDevice`` /
``parseOverrideXattr``)::

    UID:GID:MODE[:TYPE]

``UID`` and ``GID`` decimal, ``MODE`` the permission bits with set-id and sticky bits in
octal (written with four digits, ``0755``), ``TYPE`` one of ``file``, ``dir``, ``symlink``,
``pipe``, ``socket``, ``block-MAJOR-MINOR``, ``char-MAJOR-MINOR``; older writers leave the
type out (then the file's own type stands). Readers take a prefix match on the type name and
ignore fields after the device numbers, as Go does.
"""

from __future__ import annotations

import os
import stat
from dataclasses import dataclass

XATTR = "user.containers.override_stat"
XATTR_BYTES = XATTR.encode()

_TYPES = {
    stat.S_IFREG: "file",
    stat.S_IFDIR: "dir",
    stat.S_IFLNK: "symlink",
    stat.S_IFIFO: "pipe",
    stat.S_IFSOCK: "socket",
}


@dataclass(frozen=True)
class OverrideStat:
    """What the xattr says. ``mode`` holds the permission bits (``0o7777``) and, when the
    xattr names a type, its ``S_IFMT`` bits; ``file_type`` is 0 when it names none."""

    uid: int
    gid: int
    mode: int
    rdev: int = 0

    @property
    def file_type(self) -> int:
        """The ``S_IFMT`` part of :attr:`mode` (0: the file's own type stands)."""
        return stat.S_IFMT(self.mode)

    def apply_to(self, st_mode: int) -> int:
        """The mode a view shows for a backing file of mode *st_mode*."""
        kind = self.file_type or stat.S_IFMT(st_mode)
        return kind | stat.S_IMODE(self.mode)


def format_override(uid: int, gid: int, mode: int, rdev: int = 0) -> bytes:
    """The xattr value for an entry of *mode* (type and permission bits) and owner."""
    kind = stat.S_IFMT(mode)
    if kind == stat.S_IFCHR:
        typ = f"char-{os.major(rdev)}-{os.minor(rdev)}"
    elif kind == stat.S_IFBLK:
        typ = f"block-{os.major(rdev)}-{os.minor(rdev)}"
    else:
        typ = _TYPES.get(kind, "file")
    return f"{uid}:{gid}:{stat.S_IMODE(mode):04o}:{typ}".encode()


def parse_override(value: bytes) -> OverrideStat:
    """Parse an xattr value; ValueError (naming what is wrong) for anything Go refuses."""
    try:
        text = value.decode("ascii")
    except UnicodeDecodeError:
        raise ValueError(f"{XATTR} is not ASCII") from None
    parts = text.split(":")
    if len(parts) < 3:
        raise ValueError(f"{XATTR} has fewer than 3 fields: {text!r}")
    uid = _number(parts[0], 10, "uid")
    gid = _number(parts[1], 10, "gid")
    perm = _number(parts[2], 8, "mode") & 0o7777
    if len(parts) == 3:
        return OverrideStat(uid, gid, perm)
    typ = parts[3]
    for kind, name in _TYPES.items():
        if typ.startswith(name):
            return OverrideStat(uid, gid, kind | perm)
    for prefix, kind in (("block", stat.S_IFBLK), ("char", stat.S_IFCHR)):
        if typ.startswith(prefix):
            dev = typ.split("-")
            if len(dev) < 3 or dev[0] != prefix:
                raise ValueError(f"{XATTR}: bad device type {typ!r}")
            major = _number(dev[1], 10, "major number")
            minor = _number(dev[2], 10, "minor number")
            return OverrideStat(uid, gid, kind | perm, os.makedev(major, minor))
    raise ValueError(f"{XATTR}: unknown file type {typ!r}")


def _number(text: str, base: int, what: str) -> int:
    if not text or not all(c in "0123456789"[:base] for c in text):
        raise ValueError(f"{XATTR}: bad {what} {text!r}")
    value = int(text, base)
    if value > 0xFFFFFFFF:
        raise ValueError(f"{XATTR}: {what} {text} is out of range")
    return value


def read_override(path: str | bytes | int) -> OverrideStat | None:
    """The override of *path* (not following a symlink), or None when it has none or the
    value cannot be parsed (such a file is shown as it is on disk)."""
    try:
        if isinstance(path, int):
            value = os.getxattr(path, XATTR)
        else:
            value = os.getxattr(path, XATTR, follow_symlinks=False)
    except OSError:
        return None
    try:
        return parse_override(value)
    except ValueError:
        return None
