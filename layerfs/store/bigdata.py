"""Big-data items of a layer: ``<graphroot>/overlay-layers/<id>/<file>``.

File names follow containers/storage's ``makeBigDataBaseName`` so both tools find the same
files: a key made only of ``[a-z0-9.]`` is used as is, anything else becomes ``=`` plus the
standard base64 of the key. We copy Go's quirk on purpose, because a different name would
hide the item from the other tool: the scan stops at the first character outside that set
and encodes only if characters remain *after* it, so a key whose only such character is the
last one is stored raw (``keY`` -> ``keY``, ``Key`` -> ``=S2V5``).

Where the quirk would yield an unsafe file name (``.``, ``..``, or a ``/`` kept raw, as in
``a/``) Go would write outside the layer's directory; we refuse such keys instead.
"""

from __future__ import annotations

import base64
import os

from layerfs.errors import InvalidArgumentError

_PLAIN = frozenset(b".0123456789abcdefghijklmnopqrstuvwxyz")


def big_data_file_name(key: str) -> str:
    """The file name containers/storage uses for ``key`` (see the module docstring)."""
    if not key:
        raise InvalidArgumentError("a big-data key must not be empty")
    raw = key.encode("utf-8", "surrogateescape")
    consumed = len(raw)
    i = 0
    while i < len(raw):
        byte = raw[i]
        # Go reads runes: a multi-byte rune has size != 1 and stops the scan after it.
        width = 1 if byte < 0x80 else _utf8_width(raw, i)
        i += width
        if width != 1 or byte not in _PLAIN:
            consumed = i
            break
    else:
        consumed = len(raw)
    if consumed < len(raw):
        return "=" + base64.b64encode(raw).decode("ascii")
    if key in (".", "..") or "/" in key or "\0" in key:
        raise InvalidArgumentError(
            f'big-data key "{key}" would be stored under an unsafe file name; choose another key'
        )
    return key


def _utf8_width(raw: bytes, i: int) -> int:
    first = raw[i]
    need = (
        2
        if first >> 5 == 0b110
        else 3
        if first >> 4 == 0b1110
        else 4
        if first >> 3 == 0b11110
        else 1
    )
    chunk = raw[i : i + need]
    try:
        chunk.decode("utf-8")
    except UnicodeDecodeError:
        return 1  # Go yields RuneError with size 1 for an invalid byte
    return need


def big_data_dir(layers_dir: str, layer_id: str) -> str:
    """Directory that holds a layer's big-data files."""
    return os.path.join(layers_dir, layer_id)


def big_data_path(layers_dir: str, layer_id: str, key: str) -> str:
    """Path of one big-data item."""
    return os.path.join(big_data_dir(layers_dir, layer_id), big_data_file_name(key))
