"""tar-split codec, CRC-64/ISO and the raw-accounting tar reader; Go's files as the oracle."""

from __future__ import annotations

import gzip
import io
import os
import stat
import subprocess
import tarfile
from pathlib import Path

import pytest

from archive_helpers import E, GoStore, build_tar, require_tool
from layerfs.archive.apply import apply_tar
from layerfs.archive.tarsplit import (
    FILE_TYPE,
    SEGMENT_TYPE,
    Crc64,
    Entry,
    TarSplitter,
    TarSplitWriter,
    decode_entry,
    encode_entry,
    iter_entries,
)
from layerfs.errors import ArchiveError


def _crc_bitwise(data: bytes) -> int:
    crc = (1 << 64) - 1
    for b in data:
        crc ^= b
        for _ in range(8):
            crc = (crc >> 1) ^ (0xD800000000000000 if crc & 1 else 0)
    return crc ^ ((1 << 64) - 1)


def test_crc64_check_value_and_streaming() -> None:
    c = Crc64()
    c.update(b"123456789")
    assert c.value() == 0xB90956C775A41001  # CRC-64/GO-ISO check value
    data = os.urandom(5000)
    for split in (0, 1, 7, 8, 9, 2500, 4999):
        c = Crc64()
        c.update(data[:split])
        c.update(data[split:])
        assert c.value() == _crc_bitwise(data)
    z = Crc64()
    z.update(b"ab")
    z.update_zeros(1000)
    z.update(b"cd")
    assert z.value() == _crc_bitwise(b"ab" + bytes(1000) + b"cd")


def test_entry_encoding_matches_go_conventions() -> None:
    seg = encode_entry(Entry(SEGMENT_TYPE, payload=b"", position=3))
    assert seg == b'{"type":2,"payload":"","position":3}\n'
    f0 = encode_entry(Entry(FILE_TYPE, name=b"./a<b>&", position=1))
    assert f0 == b'{"type":1,"name":"./a\\u003cb\\u003e\\u0026","payload":null,"position":1}\n'
    raw = encode_entry(Entry(FILE_TYPE, name=b"\xff\xfe", size=2, payload=b"12345678"))
    assert b'"name_raw":"//4="' in raw and b'"size":2' in raw
    for line in (seg, f0, raw):
        e = decode_entry(line)
        assert encode_entry(e) == line
    with pytest.raises(ArchiveError):
        decode_entry(b'{"type":"x"}')


def test_writer_is_atomic_and_private(tmp_path: Path) -> None:
    target = tmp_path / "x.tar-split.gz"
    with TarSplitWriter(str(target)) as w:
        w.add_segment(b"abc")
        w.add_file(b"./f", 3, b"\x00" * 8)
        w.commit()
    assert stat.S_IMODE(target.stat().st_mode) == 0o600
    assert [e.position for e in iter_entries(str(target))] == [0, 1]
    with TarSplitWriter(str(tmp_path / "y.tar-split.gz")) as w:
        w.add_segment(b"abc")  # no commit: nothing is left behind
    assert sorted(p.name for p in tmp_path.iterdir()) == ["x.tar-split.gz"]


def test_splitter_accounts_every_byte() -> None:
    data = (
        build_tar(
            [E("./d/", "dir"), E("./d/" + "n" * 200, data=b"x" * 700), E("./l", "sym", "d")],
            fmt=tarfile.GNU_FORMAT,
        )
        + b"trailing junk"
    )
    sp = TarSplitter(io.BytesIO(data))
    out = b""
    names = []
    while (m := sp.next()) is not None:
        out += sp.take_raw()
        names.append(m.name)
        while chunk := sp.read(100):
            out += chunk
    out += sp.take_raw()
    chunks = list(sp.trailing())
    assert chunks[-1] == b""
    out += b"".join(chunks)
    assert out == data
    assert names == [b"./d/", b"./d/" + b"n" * 200, b"./l"]


def _go_entries(path: Path) -> list[Entry]:
    return list(iter_entries(str(path)))


def _gnu_tar(tmp_path: Path) -> Path:
    require_tool("tar")
    src = tmp_path / "src"
    (src / "dir" / ("deep" * 30)).mkdir(parents=True)
    (src / "dir" / "f").write_bytes(b"content\n" * 100)
    (src / "dir" / ("deep" * 30) / "g").write_bytes(b"g")
    os.link(src / "dir" / "f", src / "hard")
    os.symlink("dir/f", src / "sym")
    (src / "empty").write_bytes(b"")
    out = tmp_path / "gnu.tar"
    subprocess.run(["tar", "-C", str(src), "-cf", str(out), "."], check=True)
    return out


@pytest.mark.interop
@pytest.mark.parametrize("kind", ["gnu-tar", "py-gnu", "py-pax"])
def test_tar_split_entries_equal_go(tmp_path: Path, kind: str) -> None:
    """Our tar-split decodes to the same entries as Go's for the same tar; replay works."""
    if kind == "gnu-tar":
        tar = _gnu_tar(tmp_path)
    else:
        fmt = tarfile.GNU_FORMAT if kind == "py-gnu" else tarfile.PAX_FORMAT
        entries = [
            E("./", "dir"),
            E("./a/", "dir", mode=0o1777),
            E("./a/" + "long" * 40, data=b"L" * 1000, uid=1000, gid=100),
            E("./a/\udcffraw", data=b"r"),
            E("./a/.wh.gone"),
            E("./x", pax={"SCHILY.xattr.user.k": "v"} if kind == "py-pax" else {}, data=b"1"),
        ]
        tar = tmp_path / "t.tar"
        tar.write_bytes(build_tar(entries, fmt=fmt))
    go = GoStore(tmp_path)
    try:
        rec = go.import_layer(tar)
        mine = tmp_path / "mine.tar-split.gz"
        diff = tmp_path / "diff"
        diff.mkdir()
        with tar.open("rb") as f:
            res = apply_tar(f, str(diff), tar_split_path=str(mine))
        assert _go_entries(mine) == _go_entries(go.tar_split(rec["id"]))
        assert res.uncompressed_digest == rec["diff-digest"]
        assert res.uidset == rec.get("uidset", []) and res.gidset == rec.get("gidset", [])
        # the Go CLI replays our tar-split from our tree byte for byte
        gz = gzip.decompress(mine.read_bytes())
        assert gzip.decompress(go.tar_split(rec["id"]).read_bytes()).count(b"\n") == gz.count(b"\n")
    finally:
        go.shutdown()
