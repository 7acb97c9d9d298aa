"""User namespaces: which one this process is in, its id maps, and the namespace identities
that mount records compare.

This module is the only reader of ``/proc/*/uid_map``, ``/proc/*/gid_map`` and
``/proc/*/ns/*``; everything else asks it.

Id maps use the kernel's convention: each line of ``/proc/PID/uid_map`` is
``inside outside count``, where *inside* ids are those seen by processes in the namespace
and *outside* ids are those of the parent namespace (for a first-level namespace, the host,
i.e. what the disk stores).
"""

from __future__ import annotations

import hashlib
import itertools
import os
from dataclasses import dataclass

#: The id the kernel reports for an id that has no mapping (``/proc/sys/fs/overflowuid``).
OVERFLOW_ID = 65534

#: Set by podman in the processes it re-executes inside its rootless user namespace.
ROOTLESS_UID_ENV = "_CONTAINERS_ROOTLESS_UID"

_FULL_RANGE = 4294967295


@dataclass(frozen=True)
class IdRange:
    """``count`` consecutive ids: ``inside + k`` in the namespace is ``outside + k`` outside it."""

    inside: int
    outside: int
    count: int


@dataclass(frozen=True)
class IdMap:
    """An id map as the kernel keeps it.

    Invariant: ranges do not overlap on either side (the kernel refuses such maps; ``parse``
    checks the same so a hostile or garbled file cannot produce an ambiguous translation).
    """

    ranges: tuple[IdRange, ...]

    @classmethod
    def identity(cls) -> IdMap:
        """The initial namespace's map: every id is itself."""
        return cls((IdRange(0, 0, _FULL_RANGE),))

    @classmethod
    def parse(cls, text: str) -> IdMap:
        """Parse the ``/proc/PID/uid_map`` form (one ``inside outside count`` per line)."""
        ranges = []
        for lineno, line in enumerate(text.splitlines(), 1):
            fields = line.split()
            if not fields:
                continue
            if len(fields) != 3 or not all(f.isdigit() for f in fields):
                raise ValueError(f"id map line {lineno} is not 'inside outside count': {line!r}")
            inside, outside, count = (int(f) for f in fields)
            if count == 0:
                raise ValueError(f"id map line {lineno} has a zero count")
            ranges.append(IdRange(inside, outside, count))
        result = cls(tuple(ranges))
        result._check_disjoint()
        return result

    def _check_disjoint(self) -> None:
        for side in ("inside", "outside"):
            spans = sorted((getattr(r, side), getattr(r, side) + r.count) for r in self.ranges)
            for (_, end), (start, _) in itertools.pairwise(spans):
                if start < end:
                    raise ValueError(f"id map ranges overlap on the {side} side")

    def is_identity(self) -> bool:
        """True for the initial namespace's map (or any map that changes no id)."""
        return bool(self.ranges) and all(r.inside == r.outside for r in self.ranges)

    def to_outside(self, ident: int) -> int | None:
        """The outside id of ``ident`` seen inside, or None when it is not mapped."""
        for r in self.ranges:
            if r.inside <= ident < r.inside + r.count:
                return r.outside + (ident - r.inside)
        return None

    def to_inside(self, ident: int) -> int | None:
        """The id seen inside for outside id ``ident``, or None when it is not mapped."""
        for r in self.ranges:
            if r.outside <= ident < r.outside + r.count:
                return r.inside + (ident - r.outside)
        return None

    def key(self) -> str:
        """A short stable digest of the map, for keying data that depends on it."""
        text = "\n".join(f"{r.inside} {r.outside} {r.count}" for r in self.ranges)
        return hashlib.sha256(text.encode()).hexdigest()[:16]

    def render(self) -> str:
        """The ``/proc`` form, one range per line (what ``newuidmap`` is given, flattened)."""
        return "".join(f"{r.inside} {r.outside} {r.count}\n" for r in self.ranges)


def read_id_map(kind: str = "uid", pid: int | str = "self") -> IdMap:
    """The ``kind`` ("uid" or "gid") map of process ``pid``; identity when the kernel has no
    such file (no user-namespace support)."""
    if kind not in ("uid", "gid"):
        raise ValueError(f"kind must be 'uid' or 'gid', not {kind!r}")
    try:
        with open(f"/proc/{pid}/{kind}_map", encoding="ascii") as f:
            text = f.read()
    except FileNotFoundError:
        return IdMap.identity()
    return IdMap.parse(text)


def in_user_namespace() -> bool:
    """True when this process's uid map is not the identity: it runs in a user namespace
    below the initial one (``podman unshare``, a rootless container, ``layerfs unshare``)."""
    return not read_id_map("uid").is_identity()


def is_rootless() -> bool:
    """True when this process does not have real root on the host: a non-zero euid, or euid
    0 inside a user namespace, or a process podman marked as rootless."""
    if os.geteuid() != 0:
        return True
    if os.environ.get(ROOTLESS_UID_ENV):
        return True
    return in_user_namespace()


def host_uid() -> int:
    """The host (initial-namespace) uid of this process: the outside id of our euid through
    every level we can see (one level: what ``/proc/self/uid_map`` says)."""
    env = os.environ.get(ROOTLESS_UID_ENV)
    if env and env.isdigit():
        return int(env)
    outside = read_id_map("uid").to_outside(os.geteuid())
    return outside if outside is not None else OVERFLOW_ID


def namespace_id(kind: str, pid: int | str = "self") -> str | None:
    """The identity of process ``pid``'s ``kind`` namespace ("mnt", "user", ...), as the kernel
    names it (``mnt:[4026531841]``), or None when it cannot be read (the process is gone, or
    belongs to another user)."""
    try:
        return os.readlink(f"/proc/{pid}/ns/{kind}")
    except OSError:
        return None
