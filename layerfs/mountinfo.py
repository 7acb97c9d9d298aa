"""What is mounted where, from ``/proc/self/mountinfo``.

Reading the table never touches the mount points themselves, so it also sees mounts whose
FUSE daemon died or hangs (a ``stat`` of those fails with ENOTCONN or blocks).

The table is read as bytes and every path is decoded with :func:`os.fsdecode`
(surrogateescape): a mount point anywhere on the machine whose name is not UTF-8 must not
break a command that only cares about its own mounts.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass

_OCTAL = re.compile(rb"\\([0-7]{3})")
_BACKSLASHED = re.compile(r"\\(.)")


def _unescape(field: bytes) -> str:
    """Undo the kernel's octal escapes (``\\040`` for a space) and decode like a file name."""
    return os.fsdecode(_OCTAL.sub(lambda m: bytes([int(m.group(1), 8) & 0xFF]), field))


@dataclass(frozen=True)
class MountEntry:
    """One line of mountinfo: where, what, and the device (``major:minor``) of the mount."""

    point: str
    fstype: str
    source: str
    major: int
    minor: int
    options: tuple[str, ...]
    super_options: tuple[str, ...] = ()
    """The file system's own options (after the source), each unescaped."""


def entries(pid: int | str = "self") -> list[MountEntry]:
    """Every mount in this mount namespace (or that of process *pid*: another namespace's
    mounts, read through ``/proc/PID/mountinfo``), in table order (later entries on top)."""
    with open(f"/proc/{pid}/mountinfo", "rb") as f:
        data = f.read()
    out = []
    for line in data.splitlines():
        fields = line.split()
        try:
            sep = fields.index(b"-")
            major, minor = (int(x) for x in fields[2].split(b":"))
        except ValueError:
            continue  # not a line of the documented shape
        opts = os.fsdecode(fields[5]).split(",")
        # split before unescaping: a comma inside a value (a path) is escaped as \054
        supers = fields[sep + 3].split(b",") if len(fields) > sep + 3 else []
        out.append(
            MountEntry(
                _unescape(fields[4]),
                os.fsdecode(fields[sep + 1]),
                _unescape(fields[sep + 2]) if len(fields) > sep + 2 else "",
                major,
                minor,
                tuple(opts),
                tuple(_unescape(o) for o in supers),
            )
        )
    return out


def overlay_upper_dirs() -> set[str]:
    """The ``upperdir`` of every kernel overlay mount in this mount namespace: directories
    that can change while they are mounted. The kernel shows the value as it was given, with
    overlayfs's own backslash escapes (``\\,`` for a comma in a path): those are undone."""
    prefix = "upperdir="
    return {
        _BACKSLASHED.sub(r"\1", o[len(prefix) :])
        for e in entries()
        if e.fstype == "overlay"
        for o in e.super_options
        if o.startswith(prefix)
    }


def mounts() -> list[tuple[str, str, str]]:
    """(mount point, fs type, source) of every mount in this mount namespace, in order."""
    return [(e.point, e.fstype, e.source) for e in entries()]


def normalize(path: str) -> str:
    """Absolute path with the parent's symlinks resolved; the last component is not touched,
    since it may be a dead FUSE mount that cannot be stat'ed."""
    path = os.path.abspath(path)
    parent, name = os.path.split(path)
    return os.path.join(os.path.realpath(parent), name) if name else path


def entry_at(path: str, pid: int | str = "self") -> MountEntry | None:
    """The topmost mount whose mount point is ``path`` (in the mount namespace of *pid*: a
    process that is gone or not ours counts as no mounts there), or None."""
    target = normalize(path)
    found = None
    try:
        table = entries(pid)
    except OSError:
        if pid == "self":
            raise
        return None
    for entry in table:
        if entry.point == target:
            found = entry
    return found


def is_mountpoint(path: str) -> bool:
    """True if something (alive or not) is mounted at ``path``."""
    return entry_at(path) is not None


def fs_type_of(path: str) -> str:
    """The filesystem type of the mount that holds ``path`` (the longest matching mount)."""
    real = os.path.realpath(path)
    best, kind = "", "unknown"
    for point, fstype, _ in mounts():
        inside = real == point or real.startswith(point.rstrip("/") + "/")
        if inside and len(point) >= len(best):
            best, kind = point, fstype
    return kind
