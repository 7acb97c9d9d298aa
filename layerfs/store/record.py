"""The layer record and its containers/storage-compatible JSON encoding.

A record is one element of the ``layers.json`` / ``volatile-layers.json`` array. Keys are
written in the Go struct's field order, every key except ``id`` and ``created`` is omitted
when empty or zero, and strings are escaped the way Go's ``encoding/json`` escapes them
(``<``, ``>``, ``&``, U+2028 and U+2029 as ``\\uXXXX``, control characters other than
``\\n``, ``\\r`` and ``\\t`` as ``\\u00XX``, other non-ASCII raw). Keys this version does not
know are kept and written back after the known ones, so a newer tool's fields survive a
rewrite by layerfs.
"""

from __future__ import annotations

import datetime as _dt
import json
import re
import secrets
from dataclasses import dataclass, field
from typing import Any

from layerfs.errors import CorruptStoreError

#: JSON keys of a layer record, in the order containers/storage writes them.
RECORD_KEYS: tuple[str, ...] = (
    "id",
    "names",
    "parent",
    "metadata",
    "mountlabel",
    "created",
    "compressed-diff-digest",
    "compressed-size",
    "diff-digest",
    "toc-digest",
    "diff-size",
    "compression",
    "uidset",
    "gidset",
    "flags",
    "uidmap",
    "gidmap",
    "big-data-names",
)

#: The flag containers/storage sets while a layer is being created or deleted.
INCOMPLETE_FLAG = "incomplete"
WRITEABLE_FLAG = "layerfs.writeable"
"""Record flag of a layer made with ``create-layer --writeable``: ``layerfs mount`` of it is
read-write. containers-storage keeps flags it does not know on every rewrite of the record."""

ZERO_TIME = "0001-01-01T00:00:00Z"

_CREATED_RE = re.compile(
    r"^(\d{4})-(\d{2})-(\d{2})T(\d{2}):(\d{2}):(\d{2})(?:\.(\d{1,9}))?(Z|[+-]\d{2}:\d{2})$"
)


@dataclass
class Layer:
    """One layer record.

    Invariants kept by the store (not by this class): ``id`` is unique in the store, every
    name is held by one layer only, ``parent`` is a full id or empty, ``uidset``/``gidset``
    are sorted and unique. ``created`` is kept as the exact RFC 3339 text read or written, so
    an untouched record is written back byte for byte.
    """

    id: str
    names: list[str] = field(default_factory=list)
    parent: str = ""
    metadata: str = ""
    mountlabel: str = ""
    created: str = ZERO_TIME
    compressed_diff_digest: str = ""
    compressed_size: int = 0
    diff_digest: str = ""
    toc_digest: str = ""
    diff_size: int = 0
    compression: int = 0
    uidset: list[int] = field(default_factory=list)
    gidset: list[int] = field(default_factory=list)
    flags: dict[str, Any] = field(default_factory=dict)
    uidmap: list[dict[str, int]] = field(default_factory=list)
    gidmap: list[dict[str, int]] = field(default_factory=list)
    big_data_names: list[str] = field(default_factory=list)
    #: Keys of the record that this version does not know, in their original order.
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def incomplete(self) -> bool:
        """True when the record carries ``"flags": {"incomplete": true}``."""
        return self.flags.get(INCOMPLETE_FLAG) is True

    def size(self) -> int:
        """The uncompressed diff size, or -1 when unknown (as Go's ``Layer.Size``)."""
        if self.diff_digest or self.toc_digest:
            return self.diff_size
        return -1

    def created_datetime(self) -> _dt.datetime:
        """``created`` as an aware datetime (microsecond precision)."""
        ns = parse_created_ns(self.created)
        return _dt.datetime.fromtimestamp(ns // 1_000_000_000, _dt.UTC).replace(
            microsecond=(ns % 1_000_000_000) // 1000
        )

    def to_json_obj(self) -> dict[str, Any]:
        """The record as an ordered dict with Go's omission rules applied."""
        values: dict[str, Any] = {
            "id": self.id,
            "names": self.names,
            "parent": self.parent,
            "metadata": self.metadata,
            "mountlabel": self.mountlabel,
            "created": self.created,
            "compressed-diff-digest": self.compressed_diff_digest,
            "compressed-size": self.compressed_size,
            "diff-digest": self.diff_digest,
            "toc-digest": self.toc_digest,
            "diff-size": self.diff_size,
            "compression": self.compression,
            "uidset": self.uidset,
            "gidset": self.gidset,
            "flags": self.flags,
            "uidmap": self.uidmap,
            "gidmap": self.gidmap,
            "big-data-names": self.big_data_names,
        }
        out: dict[str, Any] = {}
        for key in RECORD_KEYS:
            value = values[key]
            if key in ("id", "created") or value:
                out[key] = value
        for key, value in self.extra.items():
            if key not in out:
                out[key] = value
        return out

    @classmethod
    def from_json_obj(cls, obj: Any, source: str) -> Layer:
        """Build a record from one decoded array element; ``source`` names the file for errors."""
        if not isinstance(obj, dict):
            raise CorruptStoreError(f"{source}: a layer record is not a JSON object: {obj!r:.80}")
        layer_id = obj.get("id")
        if not isinstance(layer_id, str) or not layer_id:
            raise CorruptStoreError(f"{source}: a layer record has no id: {obj!r:.120}")
        if "/" in layer_id or "\0" in layer_id or layer_id in (".", ".."):
            # the id names directories (overlay/<id>, overlay-layers/<id>) that a repair or a
            # delete removes: a path-like id would reach outside the store
            raise CorruptStoreError(f'{source}: layer id "{layer_id:.80}" is not a safe file name')

        fields: dict[str, Any] = {}
        extra: dict[str, Any] = {}
        value: Any
        for key, value in obj.items():
            spec = _FIELD_SPECS.get(key)
            if spec is None:
                if key != "id":
                    extra[key] = value
                continue
            attr, kind = spec
            if value is None:
                continue
            if type(value) is not kind:  # bool is not int, float is not int: exact types
                raise CorruptStoreError(
                    f'{source}: layer "{layer_id}": key "{key}" has the wrong type: {value!r:.80}'
                )
            if isinstance(value, list):
                value = list(value)
                want = _LIST_ITEM_TYPES[key]
                if want is not None and any(type(x) is not want for x in value):
                    raise CorruptStoreError(
                        f'{source}: layer "{layer_id}": "{key}" holds a non-{want.__name__}'
                    )
            elif isinstance(value, dict):
                value = dict(value)
            fields[attr] = value
        created = fields.get("created", ZERO_TIME)
        if not _CREATED_RE.match(created):
            raise CorruptStoreError(
                f'{source}: layer "{layer_id}": not an RFC 3339 time: {created!r:.60}'
            )
        return cls(id=layer_id, extra=extra, **fields)


#: JSON key -> (attribute, exact JSON type) for every known key but "id".
_FIELD_SPECS: dict[str, tuple[str, type]] = {
    "names": ("names", list),
    "parent": ("parent", str),
    "metadata": ("metadata", str),
    "mountlabel": ("mountlabel", str),
    "created": ("created", str),
    "compressed-diff-digest": ("compressed_diff_digest", str),
    "compressed-size": ("compressed_size", int),
    "diff-digest": ("diff_digest", str),
    "toc-digest": ("toc_digest", str),
    "diff-size": ("diff_size", int),
    "compression": ("compression", int),
    "uidset": ("uidset", list),
    "gidset": ("gidset", list),
    "flags": ("flags", dict),
    "uidmap": ("uidmap", list),
    "gidmap": ("gidmap", list),
    "big-data-names": ("big_data_names", list),
}
_LIST_ITEM_TYPES: dict[str, type | None] = {
    "names": str,
    "big-data-names": str,
    "uidset": int,
    "gidset": int,
    "uidmap": None,
    "gidmap": None,
}


def new_layer_id() -> str:
    """A random id as containers/storage makes one: 64 lowercase hex characters.

    Ids whose first 12 characters are all digits are regenerated, so a short id is never
    mistaken for a number.
    """
    while True:
        candidate = secrets.token_hex(32)
        if not candidate[:12].isdigit():
            return candidate


def format_created(ns: int) -> str:
    """RFC 3339 UTC with Go's RFC3339Nano trimming of trailing zeros, from Unix nanoseconds."""
    secs, frac = divmod(ns, 1_000_000_000)
    stamp = _dt.datetime.fromtimestamp(secs, _dt.UTC).strftime("%Y-%m-%dT%H:%M:%S")
    if frac:
        stamp += "." + f"{frac:09d}".rstrip("0")
    return stamp + "Z"


def parse_created_ns(text: str, source: str = "created") -> int:
    """Parse an RFC 3339 time with up to nine fraction digits into Unix nanoseconds."""
    match = _CREATED_RE.match(text)
    if not match:
        raise CorruptStoreError(f"{source}: not an RFC 3339 time: {text!r:.60}")
    year, month, day, hour, minute, second, frac, zone = match.groups()
    try:
        moment = _dt.datetime(
            int(year), int(month), int(day), int(hour), int(minute), int(second), tzinfo=_dt.UTC
        )
    except ValueError as exc:
        raise CorruptStoreError(f"{source}: not a valid time: {text!r:.60}") from exc
    offset = 0
    if zone != "Z":
        sign = 1 if zone[0] == "+" else -1
        offset = sign * (int(zone[1:3]) * 3600 + int(zone[4:6]) * 60)
    epoch = _dt.datetime(1970, 1, 1, tzinfo=_dt.UTC)
    seconds = (moment - epoch) // _dt.timedelta(seconds=1) - offset
    nanos = int((frac or "0").ljust(9, "0"))
    return seconds * 1_000_000_000 + nanos


_GO_ESCAPES = {
    "<": "\\u003c",
    ">": "\\u003e",
    "&": "\\u0026",
    "\u2028": "\\u2028",
    "\u2029": "\\u2029",
}


def go_json_dumps(value: Any) -> str:
    """Encode like Go's ``json.Marshal``: compact, HTML-safe escapes, raw UTF-8.

    Python escapes ``\\b`` and ``\\f`` with short forms where Go (before 1.22) writes
    ``\\u0008`` and ``\\u000c``; both are fixed up here. ``<``, ``>`` and ``&`` can only
    occur inside strings in compact JSON, so they are escaped wherever they appear; escapes
    are walked as units so an escaped backslash is never misread.
    """
    text = json.dumps(value, ensure_ascii=False, separators=(",", ":"), allow_nan=False)
    return _escape_pass(text)


# Escapes are matched as units, left to right, so the "b" of an escaped backslash followed
# by a literal b ("\\\\b" in the text) is never mistaken for a backspace escape.
_NEEDS_FIXUP = re.compile(r"\\\\|\\[bf]|[<>&\u2028\u2029]")
_FIXUPS = {"\\b": "\\u0008", "\\f": "\\u000c", "\\\\": "\\\\", **_GO_ESCAPES}


def _escape_pass(text: str) -> str:
    return _NEEDS_FIXUP.sub(lambda m: _FIXUPS[m.group(0)], text)


def encode_layers(layers: list[Layer]) -> bytes:
    """The bytes of a layers.json array, exactly as containers/storage writes it."""
    body = ",".join(go_json_dumps(layer.to_json_obj()) for layer in layers)
    return ("[" + body + "]").encode("utf-8")


def decode_layers(data: bytes, source: str) -> list[Layer]:
    """Decode a layers.json array; empty bytes and ``null`` mean no layers.

    Anything that is not a JSON array of records raises :class:`CorruptStoreError` naming
    ``source``: a damaged file is never mistaken for an empty store.
    """
    if not data:
        return []
    try:
        decoded = json.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as exc:
        raise CorruptStoreError(
            f"{source}: not valid JSON ({exc}); the file was left untouched"
        ) from exc
    if decoded is None:
        return []
    if not isinstance(decoded, list):
        raise CorruptStoreError(f"{source}: expected a JSON array of layer records")
    return [Layer.from_json_obj(item, source) for item in decoded]
