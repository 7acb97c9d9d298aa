"""Id mapping of a view: fuse-overlayfs's ``uidmapping=``/``gidmapping=`` and squash options.

A mapping is a list of ``STORED:SHOWN:LEN`` triples, written one after the other with ``:``
(``uidmapping=0:1000:1:1:100000:65536``); empty fields are skipped, as fuse-overlayfs's
``strtok`` skips them, so the ``:``-leading form (``uidmapping=:0:1:65536``) is the same map.
containers/storage writes ``ContainerID:HostID:Size`` for each range of a container's map:
*stored* is the id a layer file has (as the daemon's ``lstat`` sees it), *shown* is the id the
view reports for it.

* The view shows ``SHOWN + (id - STORED)`` for a stored id inside a range, the overflow id
  (65534) for any other id (as fuse-overlayfs does: a mapping names every id it shows);
  without a mapping ids are shown as stored.
* An id written through a read-write view (create, mkdir, chown) goes the other way:
  ``STORED + (id - SHOWN)``, 65534 when no range holds it.
* ``squash_to_uid=N`` / ``squash_to_gid=N`` show every entry owned by N, ``squash_to_root`` by
  0 (the ``_to_uid``/``_to_gid`` options win over it); they change only what is shown, and with
  any of them a failing chown through the view is not an error (fuse-overlayfs ignores it).

Only the view's answers change; the files on disk keep their ids.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from dataclasses import dataclass

from layerfs.userns import OVERFLOW_ID

MAX_ID = 0xFFFFFFFF
"""Ids are 32-bit; ``(uid_t)-1`` means "unchanged" to chown and is never a mapped id."""


class IdMappingError(ValueError):
    """A mapping option that cannot be read; the message is the one line for the user."""


@dataclass(frozen=True)
class Range:
    """``count`` ids: stored ``stored + k`` is shown as ``shown + k``."""

    stored: int
    shown: int
    count: int


def parse_mapping(option: str, text: str) -> tuple[Range, ...]:
    """The ranges of a ``uidmapping=``/``gidmapping=`` value (*option* names it in errors).

    Raises IdMappingError for a field that is not a decimal number, a count that is not a
    multiple of three fields, a zero length, ids beyond 32 bits, or ranges that overlap on
    either side (a translation would be ambiguous; fuse-overlayfs takes the first match)."""
    fields = [f for f in text.split(":") if f]
    if not fields:
        raise IdMappingError(f"{option}= needs STORED:SHOWN:LEN triples")
    for f in fields:
        if not f.isascii() or not f.isdigit():
            raise IdMappingError(f"{option}={text}: {f!r} is not a number")
    if len(fields) % 3:
        raise IdMappingError(f"{option}={text}: fields must come in STORED:SHOWN:LEN triples")
    nums = [int(f) for f in fields]
    ranges = []
    for i in range(0, len(nums), 3):
        stored, shown, count = nums[i : i + 3]
        if count == 0:
            raise IdMappingError(f"{option}={text}: a range of length 0")
        if stored + count - 1 >= MAX_ID or shown + count - 1 >= MAX_ID:
            raise IdMappingError(f"{option}={text}: ids beyond {MAX_ID - 1}")
        ranges.append(Range(stored, shown, count))
    for side in ("stored", "shown"):
        spans = sorted((getattr(r, side), getattr(r, side) + r.count) for r in ranges)
        for (_, end), (start, _) in itertools.pairwise(spans):
            if start < end:
                raise IdMappingError(f"{option}={text}: ranges overlap")
    return tuple(ranges)


def parse_id(option: str, text: str) -> int:
    """A ``squash_to_uid=``/``squash_to_gid=`` value."""
    if not text.isascii() or not text.isdigit() or int(text) >= MAX_ID:
        raise IdMappingError(f"{option}={text}: not a uid/gid number")
    return int(text)


@dataclass(frozen=True)
class _Axis:
    """The mapping of one kind of id (uids or gids)."""

    ranges: tuple[Range, ...] = ()
    squash: int | None = None

    def shown(self, stored: int) -> int:
        if self.squash is not None:
            return self.squash
        return self._translate(stored, to_shown=True)

    def stored(self, shown: int) -> int:
        return self._translate(shown, to_shown=False)

    def _translate(self, ident: int, *, to_shown: bool) -> int:
        """*ident* through the ranges (stored to shown, or back); unchanged without ranges,
        :data:`OVERFLOW_ID` when no range holds it."""
        if not self.ranges:
            return ident
        for r in self.ranges:
            start, target = (r.stored, r.shown) if to_shown else (r.shown, r.stored)
            if start <= ident < start + r.count:
                return target + (ident - start)
        return OVERFLOW_ID


@dataclass(frozen=True)
class IdMapping:
    """What a view does to ids (see the module docstring). ``IdMapping()`` changes nothing."""

    uids: tuple[Range, ...] = ()
    gids: tuple[Range, ...] = ()
    squash_to_root: bool = False
    squash_uid: int | None = None
    squash_gid: int | None = None

    def __post_init__(self) -> None:
        uid_squash = self.squash_uid
        gid_squash = self.squash_gid
        if self.squash_to_root:
            uid_squash = 0 if uid_squash is None else uid_squash
            gid_squash = 0 if gid_squash is None else gid_squash
        object.__setattr__(self, "_uid", _Axis(self.uids, uid_squash))
        object.__setattr__(self, "_gid", _Axis(self.gids, gid_squash))

    @property
    def is_identity(self) -> bool:
        """True when the view shows and writes every id as stored."""
        return not (self.uids or self.gids or self.squashes)

    @property
    def squashes(self) -> bool:
        """True with any squash option (chown failures through the view are then ignored)."""
        return self.squash_to_root or self.squash_uid is not None or self.squash_gid is not None

    def shown_uid(self, uid: int) -> int:
        """The uid the view reports for a stored *uid*."""
        return self._uid.shown(uid)  # type: ignore[attr-defined,no-any-return]

    def shown_gid(self, gid: int) -> int:
        """The gid the view reports for a stored *gid*."""
        return self._gid.shown(gid)  # type: ignore[attr-defined,no-any-return]

    def stored_uid(self, uid: int) -> int:
        """The uid written to disk for *uid* given through the view (create, chown)."""
        return self._uid.stored(uid)  # type: ignore[attr-defined,no-any-return]

    def stored_gid(self, gid: int) -> int:
        """The gid written to disk for *gid* given through the view (create, chown)."""
        return self._gid.stored(gid)  # type: ignore[attr-defined,no-any-return]

    def options(self) -> list[str]:
        """The fuse-overlayfs options that give this mapping (for command lines and records)."""
        out = []
        if self.uids:
            out.append("uidmapping=" + render(self.uids))
        if self.gids:
            out.append("gidmapping=" + render(self.gids))
        if self.squash_to_root:
            out.append("squash_to_root")
        if self.squash_uid is not None:
            out.append(f"squash_to_uid={self.squash_uid}")
        if self.squash_gid is not None:
            out.append(f"squash_to_gid={self.squash_gid}")
        return out


def render(ranges: Sequence[Range]) -> str:
    """The ``STORED:SHOWN:LEN[:...]`` text of *ranges*."""
    return ":".join(f"{r.stored}:{r.shown}:{r.count}" for r in ranges)


def from_options(options: Sequence[str]) -> IdMapping:
    """An IdMapping from fuse-overlayfs-style options (``uidmapping=...``, ``squash_to_root``
    ...); options of other names are ignored, a later option replaces an earlier one of the
    same name. Raises IdMappingError naming the bad option."""
    uids: tuple[Range, ...] = ()
    gids: tuple[Range, ...] = ()
    root = False
    suid: int | None = None
    sgid: int | None = None
    for opt in options:
        key, eq, value = opt.partition("=")
        if key == "uidmapping":
            uids = parse_mapping(key, value)
        elif key == "gidmapping":
            gids = parse_mapping(key, value)
        elif key == "squash_to_root":
            if eq:
                raise IdMappingError("squash_to_root takes no value")
            root = True
        elif key == "squash_to_uid":
            suid = parse_id(key, value)
        elif key == "squash_to_gid":
            sgid = parse_id(key, value)
    return IdMapping(uids, gids, root, suid, sgid)
