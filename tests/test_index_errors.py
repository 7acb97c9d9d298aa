"""A layer whose opaque marker cannot be read is refused with a clear error naming the path,
never read as "not opaque" (which would expose the entries it hides). The failing layer is a
real FUSE file system (tests/eio_fs.py) whose xattr calls fail with EIO."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from fs_helpers import Layer, cleanup_mount, require_fuse
from layerfs.errors import LayerfsError
from layerfs.fs.index import LayerReadError, build_index, which

pytestmark = [pytest.mark.root, pytest.mark.fuse]


@pytest.fixture(params=["getxattr", "listxattr"])
def eio_layer(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Path]:
    require_fuse()
    mnt = tmp_path / "eio"
    mnt.mkdir()
    args = [sys.executable, str(Path(__file__).with_name("eio_fs.py")), str(mnt)]
    if request.param == "listxattr":
        args.append("--listxattr")
    proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        assert line.strip() == b"READY", proc.stderr.read() if proc.stderr else b""
        yield mnt
    finally:
        cleanup_mount(str(mnt), None)
        proc.kill()
        proc.wait(timeout=10)


def test_unreadable_opaque_marker_fails_the_build(eio_layer: Path, tmp_path: Path) -> None:
    lower = Layer(tmp_path / "lower").file("d/hidden", b"must stay hidden").finish()
    dirs = [str(eio_layer), str(lower)]
    with pytest.raises(LayerReadError) as e:
        build_index(dirs)
    msg = str(e.value)
    assert isinstance(e.value, LayerfsError)
    assert f"{eio_layer}/d" in msg and "Input/output error" in msg
    assert "\n" not in msg and "b'" not in msg
    with pytest.raises(LayerReadError):
        which(dirs, "d/hidden")
