"""Export: tar-split replay, generated diffs, changes and diff size (Go CLI as oracle)."""

from __future__ import annotations

import io
import os
import subprocess
import tarfile
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from archive_helpers import E, GoStore, build_tar, require_root, require_tool, snapshot
from layerfs.archive.apply import apply_tar
from layerfs.archive.export import changes, diff_size, write_diff
from layerfs.errors import ArchiveError

BASE = [
    E("./", "dir"),
    E("./etc/", "dir"),
    E("./etc/passwd", data=b"root:x:0:0\n"),
    E("./etc/keep", data=b"k"),
    E("./opq/", "dir"),
    E("./opq/old", data=b"old"),
    E("./gone", data=b"bye"),
    E("./same/", "dir", mtime=1_600_000_000),
    E("./same/deep/", "dir", mtime=1_600_000_000),
]
TOP = [
    E("./etc/", "dir"),
    E("./etc/passwd", data=b"root:x:0:0:changed\n"),
    E("./.wh.gone"),
    E("./opq/", "dir"),
    E("./opq/.wh..wh..opq"),
    E("./opq/new", data=b"new"),
    E("./same/", "dir", mtime=1_600_000_000),
    E("./same/deep/", "dir", mtime=1_600_000_000),
    E("./same/deep/added", data=b"a"),
    E("./sym", "sym", "etc/keep"),
]


def _apply(data: bytes, diff: Path, **kw: object) -> None:
    diff.mkdir(parents=True, exist_ok=True)
    apply_tar(io.BytesIO(data), str(diff), **kw)  # type: ignore[arg-type]


def _replay(diff: Path, ts: Path, lowers: list[str] | None = None) -> bytes:
    out = io.BytesIO()
    write_diff(out, str(diff), lowers or [], str(ts))
    return out.getvalue()


@pytest.mark.parametrize("fmt", [tarfile.GNU_FORMAT, tarfile.PAX_FORMAT, tarfile.USTAR_FORMAT])
def test_replay_is_byte_exact(tmp_path: Path, fmt: int) -> None:
    data = build_tar(TOP[:3] + TOP[5:], fmt=fmt) + b"\0" * 7000 + b"junk after the end"
    ts = tmp_path / "ts.gz"
    _apply(data, tmp_path / "d", tar_split_path=str(ts))
    assert _replay(tmp_path / "d", ts) == data


def test_replay_detects_tampering(tmp_path: Path) -> None:
    data = build_tar([E("./f", data=b"original")])
    ts = tmp_path / "ts.gz"
    _apply(data, tmp_path / "d", tar_split_path=str(ts))
    (tmp_path / "d" / "f").write_bytes(b"tampered")
    with pytest.raises(ArchiveError, match=r"file integrity checksum failed for \./f"):
        _replay(tmp_path / "d", ts)


def test_replay_gnu_tar_and_umoci(tmp_path: Path) -> None:
    require_tool("tar")
    src = tmp_path / "src"
    (src / "a" / ("long" * 40)).mkdir(parents=True)
    (src / "a" / ("long" * 40) / "f").write_bytes(os.urandom(3000))
    os.symlink("a", src / "s")
    for fmt in ("gnu", "posix", "ustar", "v7"):
        tar = tmp_path / f"{fmt}.tar"
        args = ["tar", f"--format={fmt}", "-C", str(src), "-cf", str(tar), "."]
        if fmt in ("ustar", "v7"):
            args[-1] = "s"
        subprocess.run(args, check=True)
        ts = tmp_path / f"{fmt}.ts"
        _apply(tar.read_bytes(), tmp_path / fmt, tar_split_path=str(ts))
        assert _replay(tmp_path / fmt, ts) == tar.read_bytes(), fmt


@pytest.mark.interop
def test_umoci_layer_round_trips(tmp_path: Path) -> None:
    require_root()
    umoci = require_tool("umoci")
    img = tmp_path / "oci"
    subprocess.run([umoci, "init", "--layout", str(img)], check=True)
    subprocess.run([umoci, "new", "--image", f"{img}:t"], check=True)
    bundle = tmp_path / "bundle"
    subprocess.run([umoci, "unpack", "--image", f"{img}:t", str(bundle)], check=True)
    rootfs = bundle / "rootfs"
    (rootfs / "etc").mkdir()
    (rootfs / "etc" / "motd").write_text("hello\n")
    os.symlink("motd", rootfs / "etc" / "link")
    subprocess.run([umoci, "repack", "--image", f"{img}:t", str(bundle)], check=True)
    blobs = sorted((img / "blobs" / "sha256").iterdir(), key=lambda p: p.stat().st_size)
    layer = next(p for p in blobs if p.read_bytes()[:3] == b"\x1f\x8b\x08")
    ts = tmp_path / "ts.gz"
    diff = tmp_path / "diff"
    diff.mkdir()
    with layer.open("rb") as f:
        res = apply_tar(f, str(diff), tar_split_path=str(ts))
    assert res.compressed_digest == "sha256:" + layer.name
    import gzip

    assert _replay(diff, ts) == gzip.decompress(layer.read_bytes())
    assert (diff / "etc" / "motd").read_text() == "hello\n"


def _go_two_layers(tmp_path: Path) -> tuple[GoStore, str, str]:
    go = GoStore(tmp_path)
    (tmp_path / "base.tar").write_bytes(build_tar(BASE))
    (tmp_path / "top.tar").write_bytes(build_tar(TOP))
    base = go.import_layer(tmp_path / "base.tar")["id"]
    top = go.import_layer(tmp_path / "top.tar", parent=base)["id"]
    return go, base, top


@pytest.mark.interop
def test_replay_of_go_layer_and_go_replay_of_ours(tmp_path: Path) -> None:
    go, base, top = _go_two_layers(tmp_path)
    try:
        # we replay what Go imported
        lowers = go.lowers(top)
        assert _replay(go.diff_dir(top), go.tar_split(top), lowers) == build_tar(TOP)
        # Go replays what we imported into a layer it created
        mine = go.create_layer(base)
        apply_tar(
            io.BytesIO(build_tar(TOP)),
            str(go.diff_dir(mine)),
            lower_diff_dirs=go.lowers(mine),
            tar_split_path=str(go.tar_split(mine)),
        )
        assert go.diff(mine, tmp_path / "out.tar") == build_tar(TOP)
        assert snapshot(go.diff_dir(mine)) == snapshot(go.diff_dir(top))
    finally:
        go.shutdown()


@pytest.mark.interop
def test_changes_and_diff_size_match_go(tmp_path: Path) -> None:
    go, _base, top = _go_two_layers(tmp_path)
    try:
        mine = [(c.path, c.kind) for c in changes(str(go.diff_dir(top)), go.lowers(top))]
        assert mine == go.changes(top)
        assert diff_size(str(go.diff_dir(top))) == int(go.run("diffsize", top))
    finally:
        go.shutdown()


def _members(data: bytes) -> list[tuple[str, bytes, int, int, int, str, bytes]]:
    out = []
    with tarfile.open(fileobj=io.BytesIO(data)) as t:
        for m in t:
            f = t.extractfile(m) if m.isreg() else None
            content = f.read() if f else b""
            out.append((m.name, m.type, m.mode & 0o7777, m.uid, m.size, m.linkname, content))
    return out


@pytest.mark.interop
def test_generated_diff_matches_go_native_diff(tmp_path: Path) -> None:
    go, _base, top = _go_two_layers(tmp_path)
    try:
        go.tar_split(top).unlink()  # forces Go's native overlay diff
        theirs = go.diff(top, tmp_path / "go.tar")
        out = io.BytesIO()
        write_diff(out, str(go.diff_dir(top)), go.lowers(top), None)
        assert _members(out.getvalue()) == _members(theirs)
    finally:
        go.shutdown()


def test_generated_diff_no_opaque_marker_over_lower_whiteout(tmp_path: Path) -> None:
    require_root()
    low = tmp_path / "low"
    _apply(build_tar([E("./.wh.d")]), low)
    up = tmp_path / "up"
    _apply(build_tar([E("./d/", "dir"), E("./d/.wh..wh..opq"), E("./d/f", data=b"f")]), up)
    out = io.BytesIO()
    write_diff(out, str(up), [str(low)], None)
    names = [m[0] for m in _members(out.getvalue())]
    assert names == ["d", "d/f"]
    out = io.BytesIO()
    write_diff(out, str(up), [], None)
    assert [m[0] for m in _members(out.getvalue())] == ["d", "d/f"]


# --------------------------------------------------------------------------- property test

_name = st.text(alphabet="abcxyz.-_é", min_size=1, max_size=8).filter(
    lambda s: s not in (".", "..") and not s.startswith(".wh.")
)


@st.composite
def _trees(draw: st.DrawFn) -> list[E]:
    entries: list[E] = []
    dirs = [""]
    files: list[str] = []
    for _ in range(draw(st.integers(1, 12))):
        parent = draw(st.sampled_from(dirs))
        name = parent + draw(_name)
        if any(e.name.rstrip("/") == name for e in entries):
            continue
        kind = draw(st.sampled_from(["file", "dir", "sym", "hard", "fifo", "wh"]))
        mode = draw(st.sampled_from([0o644, 0o755, 0o4755, 0o1777, 0o600]))
        uid = draw(st.integers(0, 70000))
        mtime = draw(st.integers(0, 2_000_000_000))
        if kind == "dir":
            entries.append(E(name + "/", "dir", mode=mode, uid=uid, mtime=mtime))
            dirs.append(name + "/")
        elif kind == "file":
            data = draw(st.binary(max_size=2000))
            entries.append(E(name, data=data, mode=mode, uid=uid, gid=uid % 7, mtime=mtime))
            files.append(name)
        elif kind == "hard" and files:
            entries.append(E(name, "hard", draw(st.sampled_from(files))))
        elif kind == "sym":
            entries.append(E(name, "sym", draw(_name), mtime=mtime))
        elif kind == "fifo":
            entries.append(E(name, "fifo", mode=mode, mtime=mtime))
        elif kind == "wh":
            entries.append(E(parent + ".wh." + draw(_name), uid=uid))
    return entries


@settings(max_examples=30, deadline=None, suppress_health_check=list(HealthCheck))
@given(tree=_trees(), fmt=st.sampled_from([tarfile.GNU_FORMAT, tarfile.PAX_FORMAT]))
def test_property_apply_export_reapply(tmp_path_factory: pytest.TempPathFactory, tree, fmt) -> None:  # type: ignore[no-untyped-def]
    require_root()
    tmp = tmp_path_factory.mktemp("prop")
    data = build_tar(tree, fmt=fmt)
    ts = tmp / "ts.gz"
    try:
        _apply(data, tmp / "a", tar_split_path=str(ts))
    except ArchiveError as exc:
        # a whiteout and a file of the same name, or the same whiteout drawn twice (Go refuses
        # duplicate paths too)
        assert "whiteout target" in str(exc) or "duplicates of file paths" in str(exc)
        return
    assert _replay(tmp / "a", ts) == data
    out = io.BytesIO()
    write_diff(out, str(tmp / "a"), [], None)
    _apply(out.getvalue(), tmp / "b")
    assert snapshot(tmp / "b") == snapshot(tmp / "a")
