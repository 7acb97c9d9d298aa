"""apply_tar: extraction fidelity, whiteouts, digests against Go, and hostile input."""

from __future__ import annotations

import bz2
import gzip
import io
import lzma
import os
import stat
import subprocess
import tarfile
from pathlib import Path

import pytest
import zstandard

from archive_helpers import E, GoStore, build_tar, raw_entry, require_root, require_tool
from layerfs.archive.apply import apply_tar
from layerfs.archive.compression import Compression
from layerfs.errors import ArchiveError


def _apply(data: bytes, diff: Path, **kw: object):  # type: ignore[no-untyped-def]
    diff.mkdir(parents=True, exist_ok=True)
    return apply_tar(io.BytesIO(data), str(diff), **kw)  # type: ignore[arg-type]


def test_metadata_is_preserved(tmp_path: Path) -> None:
    require_root()
    cap = b"\x01\x00\x00\x02\x00\x20\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00"
    entries = [
        E("./", "dir", mode=0o700),
        E("./d/", "dir", mode=0o1777, uid=12, gid=13, mtime=1_000_000_000.5),
        E("./d/suid", data=b"x", mode=0o6755, uid=1000, gid=1001),
        E(
            "./d/cap",
            data=b"c",
            pax={
                "SCHILY.xattr.security.capability": cap.decode("latin-1"),
                "SCHILY.xattr.user.note": "hi",
                "SCHILY.xattr.trusted.t": "t",
                "mtime": "1700000000.123456789",
                "atime": "1700000001.5",
            },
        ),
        E("./d/" + "n" * 250, data=b"long name"),
        E("./sym", "sym", "d/" + "t" * 200, uid=5),
        E("./hard", "hard", "./d/suid"),
        E("./chr", "chr", dev=(1, 3)),
        E("./blk", "blk", dev=(7, 0)),
        E("./fifo", "fifo", mode=0o640),
        E("./\udcff\udcfe", data=b"raw name"),
    ]
    data = build_tar(entries, fmt=tarfile.PAX_FORMAT)
    data = data.replace(cap.decode("latin-1").encode("utf-8"), cap)  # binary xattr value
    d = tmp_path / "diff"
    d.mkdir(mode=0o555)
    _apply(data, d)
    assert stat.S_IMODE(d.stat().st_mode) == 0o555  # root entry skipped
    st = (d / "d").stat()
    assert (stat.S_IMODE(st.st_mode), st.st_uid, st.st_gid) == (0o1777, 12, 13)
    assert st.st_mtime_ns == 1_000_000_000_500_000_000  # set after its contents
    st = (d / "d" / "suid").stat()
    assert (stat.S_IMODE(st.st_mode), st.st_uid, st.st_gid) == (0o6755, 1000, 1001)
    assert st.st_nlink == 2 and (d / "hard").stat().st_ino == st.st_ino
    c = d / "d" / "cap"
    assert os.getxattr(c, "security.capability") == cap
    assert os.getxattr(c, "user.note") == b"hi" and os.getxattr(c, "trusted.t") == b"t"
    assert c.stat().st_mtime_ns == 1_700_000_000_123_456_789
    assert c.stat().st_atime_ns == 1_700_000_001_500_000_000
    assert (d / "d" / ("n" * 250)).read_bytes() == b"long name"
    assert os.readlink(d / "sym") == "d/" + "t" * 200 and os.lstat(d / "sym").st_uid == 5
    assert os.major((d / "chr").stat().st_rdev) == 1 and stat.S_ISBLK((d / "blk").stat().st_mode)
    assert stat.S_ISFIFO((d / "fifo").stat().st_mode)
    assert (d / os.fsdecode(b"\xff\xfe")).read_bytes() == b"raw name"


def test_kernel_and_aufs_whiteouts(tmp_path: Path) -> None:
    require_root()
    data = build_tar(
        [E("./a/", "dir"), E("./a/.wh.x", uid=3, gid=4), E("./a/.wh..wh..opq"), E("./.wh.top")]
    )
    k = tmp_path / "k"
    res = _apply(data, k)
    st = os.lstat(k / "a" / "x")
    assert stat.S_ISCHR(st.st_mode) and st.st_rdev == 0 and stat.S_IMODE(st.st_mode) == 0
    assert (st.st_uid, st.st_gid) == (3, 4)
    assert os.getxattr(k / "a", "trusted.overlay.opaque") == b"y"
    assert not (k / "a" / ".wh..wh..opq").exists() and os.path.lexists(k / "top")
    assert res.uidset == [0] and res.gidset == [0]  # .wh.* owners are not counted
    a = tmp_path / "a"
    _apply(data, a, whiteout_format="aufs")
    assert (a / "a" / ".wh.x").is_file() and (a / "a" / ".wh..wh..opq").is_file()
    assert os.getxattr(a / "a", "user.overlay.opaque") == b"y"


def test_sparse_files_stay_sparse(tmp_path: Path) -> None:
    require_tool("tar")
    src = tmp_path / "src"
    src.mkdir()
    with open(src / "sp", "wb") as f:
        f.seek(8 << 20)
        f.write(b"end")
        f.seek(1 << 20)
        f.write(b"middle")
    for fmt in ("gnu", "posix"):
        tar = tmp_path / f"{fmt}.tar"
        subprocess.run(
            ["tar", "--sparse", f"--format={fmt}", "-C", str(src), "-cf", str(tar), "sp"],
            check=True,
        )
        d = tmp_path / fmt
        _apply(tar.read_bytes(), d)
        assert (d / "sp").read_bytes() == (src / "sp").read_bytes()
        assert (d / "sp").stat().st_blocks * 512 < 1 << 20


@pytest.mark.interop
@pytest.mark.parametrize("kind", list(Compression))
def test_digests_sizes_owners_match_go(tmp_path: Path, kind: Compression) -> None:
    entries = [
        E("./", "dir"),
        E("./f", data=b"x" * 5000, uid=1000, gid=50),
        E("./.wh.y", uid=77, gid=77),
        E("./d/", "dir", uid=3, gid=9),
    ]
    plain = build_tar(entries, fmt=tarfile.GNU_FORMAT, pax_headers={"comment": "global"})
    blob = {
        Compression.NONE: lambda b: b,
        Compression.GZIP: gzip.compress,
        Compression.BZIP2: bz2.compress,
        Compression.XZ: lzma.compress,
        Compression.ZSTD: lambda b: zstandard.ZstdCompressor().compress(b),
    }[kind](build_tar(entries, fmt=tarfile.PAX_FORMAT, pax_headers={"comment": "g"}))
    del plain
    (tmp_path / "layer").write_bytes(blob)
    go = GoStore(tmp_path)
    try:
        rec = go.import_layer(tmp_path / "layer")
        res = _apply(blob, tmp_path / "diff")
        assert res.compressed_digest == rec["compressed-diff-digest"]
        assert res.compressed_size == rec.get("compressed-size", 0)
        assert res.uncompressed_digest == rec["diff-digest"]
        assert res.uncompressed_size == rec.get("diff-size", 0)
        assert int(res.compression) == rec.get("compression", 0)
        assert res.uidset == rec.get("uidset", []) and res.gidset == rec.get("gidset", [])
    finally:
        go.shutdown()


def test_empty_input_is_an_empty_layer(tmp_path: Path) -> None:
    res = _apply(b"", tmp_path / "d")
    assert res.uncompressed_size == 0 and res.uncompressed_digest.endswith("b855")
    assert res.uidset == []


# --------------------------------------------------------------------------- hostile input


def _victim(tmp_path: Path) -> Path:
    v = tmp_path / "victim"
    v.mkdir(exist_ok=True)
    (v / "passwd").write_text("safe")
    return v


HOSTILE = {
    "dotdot": (raw_entry(b"../victim/passwd", b"pwned"), r'entry "\.\./victim/passwd".*escapes'),
    "dotdot-inner": (raw_entry(b"a/../../victim/x", b"p"), "escapes"),
    "symlink-parent": (
        raw_entry(b"link", typeflag=b"2", link=b"/etc") + raw_entry(b"link/passwd", b"p"),
        'entry "link/passwd": parent "link" is a symlink',
    ),
    "symlink-dotdot": (raw_entry(b"up", typeflag=b"2", link=b".."), "escapes"),
    "symlink-dot-parent": (
        raw_entry(b"d/", typeflag=b"5")
        + raw_entry(b"d/l", typeflag=b"2", link=b".")
        + raw_entry(b"d/l/x", b"p"),
        "is a symlink",
    ),
    "hardlink-escape": (raw_entry(b"h", typeflag=b"1", link=b"../victim/passwd"), "escapes"),
    "hardlink-missing": (raw_entry(b"h", typeflag=b"1", link=b"nothere"), "not in this layer"),
    "hardlink-via-symlink": (
        raw_entry(b"l", typeflag=b"2", link=b"/")
        + raw_entry(b"h", typeflag=b"1", link=b"l/etc/passwd"),
        "is a symlink",
    ),
    "bare-whiteout": (raw_entry(b"d/.wh."), r"bare whiteout"),
    "duplicate": (raw_entry(b"./f", b"1") + raw_entry(b"f", b"2"), "duplicates of file paths"),
    "root-symlink": (raw_entry(b".", typeflag=b"2", link=b"/"), "cannot replace the layer root"),
    "empty-name": (raw_entry(b""), 'entry ""'),
    "truncated-content": (raw_entry(b"f", b"x" * 2000)[:1000], 'entry "f": unexpected EOF'),
    "truncated-header": (raw_entry(b"f", b"x")[:700], "unexpected EOF"),
    "junk": (b"this is not a tar file" * 40, "invalid tar header"),
    "short-junk": (b"junk", "unexpected EOF"),
    "gzip-junk": (b"\x1f\x8b\x08" + b"\x00" * 7 + b"garbage" * 50, "gzip"),
    "zstd-truncated": (
        zstandard.ZstdCompressor().compress(raw_entry(b"f", bytes(3000)) + bytes(9000))[:-12],
        "unexpected EOF",
    ),
    "zero-then-data": (bytes(512) + raw_entry(b"f", b"x"), "invalid tar header"),
    "unknown-type": (raw_entry(b"f", typeflag=b"D"), "unhandled tar header type"),
}


@pytest.mark.parametrize("case", sorted(HOSTILE))
def test_hostile_input_is_refused(tmp_path: Path, case: str) -> None:
    victim = _victim(tmp_path)
    before = sorted(os.listdir(tmp_path))
    data, pattern = HOSTILE[case]
    with pytest.raises(ArchiveError, match=pattern) as info:
        _apply(data, tmp_path / "layer" / "diff", tar_split_path=str(tmp_path / "layer" / "ts"))
    assert "\n" not in str(info.value)
    assert (victim / "passwd").read_text() == "safe"
    assert sorted(os.listdir(tmp_path)) == sorted({*before, "layer"})
    assert os.listdir(tmp_path / "layer") == ["diff"]  # no tar-split or temp file left


def test_absolute_names_are_confined(tmp_path: Path) -> None:
    _victim(tmp_path)
    data = (
        raw_entry(b"/abs/x", b"1")
        + raw_entry(b"/../y", b"2")
        + raw_entry(b"/h", b"", b"1", b"/abs/x")
    )
    d = tmp_path / "d"
    _apply(data, d)
    assert (d / "abs" / "x").read_bytes() == b"1" and (d / "y").read_bytes() == b"2"
    assert (d / "h").stat().st_ino == (d / "abs" / "x").stat().st_ino


def test_symlink_in_lower_layer_is_not_followed(tmp_path: Path) -> None:
    lower = tmp_path / "lower"
    _apply(raw_entry(b"etc", typeflag=b"2", link=b"/etc"), lower)
    with pytest.raises(ArchiveError, match='parent "etc" is a symlink in a lower layer'):
        _apply(raw_entry(b"etc/passwd", b"p"), tmp_path / "up", lower_diff_dirs=[str(lower)])
    # a real directory in this layer over the lower symlink is fine
    data = raw_entry(b"etc/", typeflag=b"5") + raw_entry(b"etc/passwd", b"p")
    _apply(data, tmp_path / "up2", lower_diff_dirs=[str(lower)])
    assert (tmp_path / "up2" / "etc" / "passwd").read_bytes() == b"p"


def test_device_without_mknod_permission(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def deny(*a: object, **k: object) -> None:
        raise PermissionError(1, "Operation not permitted")

    monkeypatch.setattr(os, "mknod", deny)
    with pytest.raises(ArchiveError, match='entry "c": cannot create device node'):
        _apply(raw_entry(b"c", typeflag=b"3"), tmp_path / "d")
    with pytest.raises(ArchiveError, match="mknod not permitted"):
        _apply(raw_entry(b".wh.x"), tmp_path / "e")


def test_disk_full_is_a_clear_error(tmp_path: Path) -> None:
    require_root()
    mnt = tmp_path / "small"
    mnt.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=256k", "tmpfs", str(mnt)], check=True)
    try:
        bomb = gzip.compress(raw_entry(b"big", bytes(4 << 20)))
        assert len(bomb) < 10_000
        with pytest.raises(ArchiveError, match='entry "big": no space left on device'):
            _apply(bomb, mnt / "diff", tar_split_path=str(mnt / "ts"))
        assert os.listdir(mnt) == ["diff"]
    finally:
        subprocess.run(["umount", str(mnt)], check=True)
