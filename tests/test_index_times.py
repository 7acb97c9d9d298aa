"""Times at the limits: after 2262 (beyond int64 nanoseconds), year 3000, before 1970. The
index keeps them exactly (seconds + nanoseconds), persisted or not, and the mounted view shows
what kernel overlayfs shows (issue 9, C9: such a file made the layer unmountable)."""

from __future__ import annotations

import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from fs_helpers import (
    Layer,
    assert_same_tree,
    kernel_overlay,
    layerfs_mount,
    require_root,
    snapshot,
)
from layerfs.fs.index import LayerPin, build_index, open_index

pytestmark = [pytest.mark.root, pytest.mark.fuse]

NS = 1_000_000_000
TIMES = {
    "y2300": 10_413_792_000 * NS + 5,  # 2300-01-01, > 2**63 ns
    "y3000": 32_503_680_000 * NS + 999_999_999,  # 3000-01-01
    "over-int64": 2**63 + 5,
    "y1900": -2_208_988_800 * NS,
    "minus-1ns": -1,
    "epoch": 0,
}


@pytest.fixture
def tmpfs(tmp_path: Path) -> Iterator[Path]:
    """A tmpfs (64-bit times; ext4 stops at 2446)."""
    require_root()
    mnt = tmp_path / "tmpfs"
    mnt.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "tmpfs", str(mnt)], check=True)
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=False)


def _chain(base: Path) -> list[str]:
    low = Layer(base / "low").file("lowfile", b"l")
    for name, ns in TIMES.items():
        low.file(f"d/{name}", name.encode(), mtime_ns=ns)
    low.dir("old", mtime_ns=TIMES["y1900"]).finish()
    top = Layer(base / "top").file("top-3000", b"t", mtime_ns=TIMES["y3000"]).finish()
    for name, ns in TIMES.items():  # atime too
        os.utime(low.root / "d" / name, ns=(ns, ns))
    return [str(top), str(low.root)]


def test_index_keeps_times_exactly(tmpfs: Path) -> None:
    dirs = _chain(tmpfs)
    for name, ns in TIMES.items():
        assert os.lstat(Path(dirs[1], "d", name)).st_mtime_ns == ns  # the fs keeps them
    pins = [LayerPin(f"l{i}", "sha256:" + "0" * 64, None, str(tmpfs / f"i{i}")) for i in (0, 1)]
    for idx in (build_index(dirs), open_index(dirs, pins)[0], open_index(dirs, pins)[0]):
        for name, ns in TIMES.items():
            ino = idx.resolve(f"d/{name}")
            assert ino is not None
            a = idx.attr(ino)
            assert a.mtime_ns == ns and a.atime_ns == ns, name
            assert idx.mtime[idx.row_of(ino) or 0] == ns
    assert open_index(dirs, pins)[1]  # really loaded from the files


def test_view_shows_kernel_times(tmpfs: Path) -> None:
    dirs = _chain(tmpfs)
    with kernel_overlay(dirs, tmpfs / "kernel") as k:
        want = snapshot(k)
    with layerfs_mount(dirs, tmpfs / "view") as m:
        got = snapshot(m.path)
        st = os.lstat(os.path.join(m.path, "d", "y3000"))
        assert st.st_mtime_ns == TIMES["y3000"]
    assert_same_tree(got, want, ignore=("ino",))
    assert got["d/over-int64"]["mtime"] == TIMES["over-int64"]
