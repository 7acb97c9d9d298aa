"""The per-layer index file is data only: hostile, damaged, foreign or truncated files are
never used (and never executed); the view is rebuilt from ``diff/`` and is correct."""

from __future__ import annotations

import hashlib
import logging
import os
import pickle
import struct
from pathlib import Path

import pytest

from fs_helpers import Layer, require_root, snapshot_index
from layerfs.fs.index import LayerPin, build_index, open_index
from layerfs.fs.index import format as fmt

pytestmark = pytest.mark.root

DIGEST = "sha256:" + "5e" * 32


@pytest.fixture(autouse=True)
def _root() -> None:
    require_root()  # mknod for whiteouts


def _chain(tmp_path: Path) -> tuple[list[str], list[LayerPin | None]]:
    low = Layer(tmp_path / "low").file("etc/motd", b"hello motd\n").file("etc/gone", b"g")
    low.symlink("lnk", "etc/motd").file("x", b"x", xattrs={"user.k": b"v"}).finish()
    top = Layer(tmp_path / "top").file("etc/new", b"new").whiteout("etc/gone").finish()
    dirs = [str(top), str(low.root)]
    pins: list[LayerPin | None] = [
        LayerPin(f"id{i}", DIGEST, None, str(tmp_path / f"idx{i}")) for i in range(2)
    ]
    return dirs, pins


def _files(pins: list[LayerPin | None]) -> list[Path]:
    return [Path(p.index_path) for p in pins if p is not None and p.index_path]


def _reseal(data: bytearray) -> bytes:
    """Recompute the trailing checksum (an attacker who can write the file can do this)."""
    data[-fmt.DIGEST_SIZE :] = hashlib.blake2b(
        bytes(data[: -fmt.DIGEST_SIZE]), digest_size=fmt.DIGEST_SIZE
    ).digest()
    return bytes(data)


def _layout(data: bytes) -> tuple[dict[str, tuple[int, int]], int, int]:
    _, _, _, rows, nx, key_len, _ = fmt._HEADER.unpack_from(data, 0)
    layout, str_off = fmt._layout(rows, nx, key_len)
    return layout, str_off, rows


def _assert_correct_and_rebuilt(dirs: list[str], pins: list[LayerPin | None]) -> None:
    idx, cached = open_index(dirs, pins)
    assert not cached
    assert snapshot_index(idx) == snapshot_index(build_index(dirs))
    m = idx.resolve("etc/motd")
    assert m is not None and idx.names[idx.row_of(m) or 0] == b"motd"
    # the rebuilt files are good again
    _, cached = open_index(dirs, pins)
    assert cached


def test_pickle_payload_never_runs(tmp_path: Path) -> None:
    """An old-style (pickle) layerfs.index carrying code: never unpickled, the view is right."""
    dirs, pins = _chain(tmp_path)
    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self) -> tuple[object, tuple[str]]:
            return (Path.touch, (str(marker),))  # type: ignore[return-value]

    payload = b"layerfs-union-index\n" + pickle.dumps({"format": 2, "key": Evil()})
    pickle.loads(payload[len(b"layerfs-union-index\n") :])  # the payload does run ...
    assert marker.exists()
    marker.unlink()
    for f in _files(pins):
        f.write_bytes(payload)
    _assert_correct_and_rebuilt(dirs, pins)
    assert not marker.exists()  # ... but never through the index
    for f in _files(pins):
        assert f.read_bytes()[:8] == fmt.MAGIC


def test_every_flipped_byte_is_caught(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """A flipped byte anywhere (header, key, columns, strings, checksum) never reaches the view:
    'motd' never becomes 'mote'."""
    dirs, pins = _chain(tmp_path)
    open_index(dirs, pins)
    target = _files(pins)[1]
    good = target.read_bytes()
    layout, str_off, _ = _layout(good)
    motd = good.index(b"motd", str_off)
    offsets = {0, 7, 8, 12, 16, 24, 40, 63, fmt.HEADER_SIZE, motd, motd + 3, len(good) - 1}
    offsets |= {len(good) - fmt.DIGEST_SIZE, str_off, len(good) - fmt.DIGEST_SIZE - 1}
    offsets |= {off for off, length in layout.values() if length}
    offsets |= set(range(0, len(good), max(1, len(good) // 97)))
    caplog.set_level(logging.WARNING, logger="layerfs.fs.index")
    for off in sorted(offsets):
        data = bytearray(good)
        data[off] ^= 0x01 if off != motd + 3 else ord("d") ^ ord("e")
        target.write_bytes(bytes(data))
        caplog.clear()
        idx, cached = open_index(dirs, pins)
        assert not cached, off
        assert idx.resolve("etc/motd") is not None and idx.resolve("etc/mote") is None, off
        assert sum("ignoring index" in r.message for r in caplog.records) == 1, off
        assert open_index(dirs, pins)[1]  # rebuilt and valid again


@pytest.mark.parametrize("cut", [0, 1, 8, 63, 64, 100, -33, -1])
def test_truncated_file(tmp_path: Path, cut: int) -> None:
    dirs, pins = _chain(tmp_path)
    open_index(dirs, pins)
    for f in _files(pins):
        f.write_bytes(f.read_bytes()[:cut])
    _assert_correct_and_rebuilt(dirs, pins)


def test_wrong_version_and_foreign_key(tmp_path: Path) -> None:
    dirs, pins = _chain(tmp_path)
    open_index(dirs, pins)
    f = _files(pins)[0]
    data = bytearray(f.read_bytes())
    struct.pack_into("<I", data, 8, fmt.VERSION + 1)
    f.write_bytes(_reseal(data))
    _assert_correct_and_rebuilt(dirs, pins)
    # a valid index of the other layer, copied over this one: another key
    files = _files(pins)
    files[0].write_bytes(files[1].read_bytes())
    _assert_correct_and_rebuilt(dirs, pins)


def _hostile(good: bytes, edit: str) -> bytes:
    layout, str_off, rows = _layout(good)
    data = bytearray(good)

    def col_set(name: str, row: int, value: int) -> None:
        off, _ = layout[name]
        tc = dict(fmt.ROW_COLUMNS + fmt.XATTR_COLUMNS)[name]
        size = 8 if tc in "Qq" else 4
        struct.pack_into("<" + tc, data, off + row * size, value)

    if edit == "slash":
        i = data.index(b"motd", str_off)
        data[i + 1] = ord("/")
    elif edit == "dotdot":
        return _dotdot(good)
    elif edit == "nul":
        i = data.index(b"motd", str_off)
        data[i + 2] = 0
    elif edit == "parent":
        col_set("parent", rows - 1, rows + 5)
    elif edit == "first":
        col_set("first", 0, rows + 1)
    elif edit == "count":
        col_set("count", 0, rows * 3)
    elif edit == "name_off":
        col_set("name_off", rows - 1, 1 << 40)
    elif edit == "link_off":
        col_set("link_off", 1, 1 << 40)
    elif edit == "link_len":
        col_set("link_len", 1, 1 << 31)
    elif edit == "xattr_count":
        col_set("xattr_count", 1, 1000)
    elif edit == "unsorted":
        i = data.index(b"etclnkx", str_off)
        data[i : i + 7] = b"lnketcx"
    elif edit == "mode":
        col_set("mode", 0, 0o100644)
    elif edit == "nsec":
        col_set("mtime_ns", 1, 1_000_000_000)
    elif edit == "flags":
        col_set("flags", 1, 1 << 30)
    return _reseal(data)


def _dotdot(good: bytes) -> bytes:
    """Rename the root entry 'x' (last, one byte) to '.': a checksummed but hostile name."""
    layout, str_off, rows = _layout(good)
    data = bytearray(good)
    # find the row named 'x' among the root's children (rows 1..count[0])
    noff, _ = layout["name_off"]
    loff, _ = layout["name_len"]
    for r in range(rows):
        o = struct.unpack_from("<Q", data, noff + 8 * r)[0]
        ln = struct.unpack_from("<I", data, loff + 4 * r)[0]
        if ln == 1 and data[str_off + o : str_off + o + 1] == b"x":
            data[str_off + o] = ord(".")
            return _reseal(data)
    raise AssertionError("no entry x")


HOSTILE = [
    "slash",
    "dotdot",
    "nul",
    "parent",
    "first",
    "count",
    "name_off",
    "link_off",
    "link_len",
    "xattr_count",
    "unsorted",
    "mode",
    "nsec",
    "flags",
]


@pytest.mark.parametrize("edit", HOSTILE)
def test_hostile_but_checksummed(tmp_path: Path, edit: str) -> None:
    """A file with a valid checksum but impossible content is rejected by the checks."""
    dirs, pins = _chain(tmp_path)
    open_index(dirs, pins)
    f = _files(pins)[1]
    good = f.read_bytes()
    bad = _hostile(good, edit)
    assert bad != good
    with pytest.raises(fmt.IndexFormatError):
        fmt.decode(bad, good[fmt.HEADER_SIZE : fmt.HEADER_SIZE + _keylen(good)])
    f.write_bytes(bad)
    _assert_correct_and_rebuilt(dirs, pins)


def _keylen(data: bytes) -> int:
    return int(fmt._HEADER.unpack_from(data, 0)[5])


def test_index_file_is_not_followed(tmp_path: Path) -> None:
    """A symlink planted as the index file is not read through, and is replaced."""
    dirs, pins = _chain(tmp_path)
    secret = tmp_path / "secret"
    secret.write_bytes(b"do not touch")
    for f in _files(pins):
        os.symlink(secret, f)
    _assert_correct_and_rebuilt(dirs, pins)
    assert secret.read_bytes() == b"do not touch"
    assert not any(f.is_symlink() for f in _files(pins))
