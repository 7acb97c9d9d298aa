"""``trusted.*`` xattrs are visible only to callers with CAP_SYS_ADMIN, as on kernel overlayfs.

The oracle is a kernel overlay mount of the same layer dirs: ``getfattr -d -m -`` run as
``nobody`` and as root must print the same on both mounts.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from conftest import require_root, require_tool
from fs_helpers import CAP_NET_BIND, Layer, kernel_overlay, layerfs_mount

pytestmark = [pytest.mark.fuse, pytest.mark.root]

NOBODY = ["--reuid=65534", "--regid=65534", "--clear-groups"]
PATHS = ["f", "d", "d/g", "plain", "lower-only", "link"]


@pytest.fixture
def world_dir() -> Iterator[Path]:
    """A directory nobody can traverse (pytest's tmp dirs are 0700)."""
    d = Path(tempfile.mkdtemp(prefix="layerfs-xattr-"))
    os.chmod(d, 0o755)
    yield d
    shutil.rmtree(d, ignore_errors=True)


def _chain(base: Path) -> list[str]:
    top = Layer(base / "top")
    top.file("f", b"f", xattrs={"user.color": b"red", "trusted.secret": b"s1"})
    top.dir("d", xattrs={"trusted.overlay.opaque": b"y", "trusted.other": b"t"})
    top.file("d/g", b"g", xattrs={"trusted.only": b"x"})
    top.file("plain", b"p", xattrs={"security.capability": CAP_NET_BIND, "user.a": b"1"})
    top.symlink("link", "f")
    bottom = Layer(base / "bottom")
    bottom.file("lower-only", b"l", xattrs={"trusted.low": b"L", "user.low": b"l"})
    bottom.file("d/hidden", b"h")
    return [str(top.finish()), str(bottom.finish())]


def _getfattr(mnt: str, as_nobody: bool) -> tuple[int, str, str]:
    argv = [require_tool("getfattr"), "-h", "-d", "-m", "-", *PATHS]
    if as_nobody:
        argv = [require_tool("setpriv"), *NOBODY, *argv]
    r = subprocess.run(argv, cwd=mnt, capture_output=True, text=True, timeout=60)
    return r.returncode, r.stdout, r.stderr.replace(mnt, "MNT")


def _trusted_getxattr(mnt: str, as_nobody: bool) -> tuple[int, str]:
    argv = [require_tool("getfattr"), "-h", "-n", "trusted.secret", "--only-values", "f"]
    if as_nobody:
        argv = [require_tool("setpriv"), *NOBODY, *argv]
    r = subprocess.run(argv, cwd=mnt, capture_output=True, text=True, timeout=60)
    return r.returncode, r.stdout


def test_trusted_xattrs_follow_the_callers_capability(world_dir: Path) -> None:
    require_root()
    dirs = _chain(world_dir)
    with (
        kernel_overlay(dirs, world_dir / "kmnt") as kmnt,
        layerfs_mount(dirs, world_dir / "lmnt", allow_other=True) as lm,
    ):
        for as_nobody in (True, False):
            want = _getfattr(kmnt, as_nobody)
            got = _getfattr(lm.path, as_nobody)
            assert got == want, f"as {'nobody' if as_nobody else 'root'}"
            assert _trusted_getxattr(lm.path, as_nobody) == _trusted_getxattr(kmnt, as_nobody)
        # the oracle really differs between the two callers
        nobody, root = _getfattr(kmnt, True)[1], _getfattr(kmnt, False)[1]
        assert "trusted.secret" in root and "trusted.secret" not in nobody
        assert "user.color" in nobody and "trusted.overlay" not in root
