"""What is mounted where, from ``/proc/self/mountinfo``.

Reading the table never touches the mount points themselves, so it also sees mounts whose
FUSE daemon died (a ``stat`` of those fails with ENOTCONN).
"""

from __future__ import annotations

import os


def _unescape(field: str) -> str:
    """Undo the kernel's octal escapes (``\\040`` for a space) in a mountinfo field."""
    out = []
    i = 0
    while i < len(field):
        if field[i] == "\\" and i + 3 < len(field) and field[i + 1 : i + 4].isdigit():
            out.append(chr(int(field[i + 1 : i + 4], 8)))
            i += 4
        else:
            out.append(field[i])
            i += 1
    return "".join(out)


def mounts() -> list[tuple[str, str, str]]:
    """(mount point, fs type, source) of every mount in this mount namespace, in order."""
    out = []
    with open("/proc/self/mountinfo") as f:
        for line in f:
            fields = line.split()
            sep = fields.index("-")
            out.append((_unescape(fields[4]), fields[sep + 1], _unescape(fields[sep + 2])))
    return out


def normalize(path: str) -> str:
    """Absolute path with the parent's symlinks resolved; the last component is not touched,
    since it may be a dead FUSE mount that cannot be stat'ed."""
    path = os.path.abspath(path)
    parent, name = os.path.split(path)
    return os.path.join(os.path.realpath(parent), name) if name else path


def is_mountpoint(path: str) -> bool:
    """True if something (alive or not) is mounted at ``path``."""
    target = normalize(path)
    return any(point == target for point, _, _ in mounts())


def fs_type_of(path: str) -> str:
    """The filesystem type of the mount that holds ``path`` (the longest matching mount)."""
    real = os.path.realpath(path)
    best, kind = "", "unknown"
    for point, fstype, _ in mounts():
        inside = real == point or real.startswith(point.rstrip("/") + "/")
        if inside and len(point) >= len(best):
            best, kind = point, fstype
    return kind
