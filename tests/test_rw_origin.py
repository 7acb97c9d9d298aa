"""The read-write view's own bookkeeping (``trusted.layerfs.origin``, the inode number a
copied-up entry keeps) stays private: the view never lists or returns it and refuses to set
it, and neither containers-storage's ``diff`` nor ``layerfs diff`` of the upper layer carries
it into the layer tar."""

from __future__ import annotations

import errno
import io
import os
import tarfile
from pathlib import Path

import pytest
from test_rw_posix import layerfs_rw

from conftest import GoTool, LayerfsCLI, StorePaths
from layerfs.overlayfmt import ORIGIN_XATTR

ORIGIN = os.fsdecode(ORIGIN_XATTR)


def _pax_keys(tar_bytes: bytes) -> dict[str, set[str]]:
    with tarfile.open(fileobj=io.BytesIO(tar_bytes)) as t:
        return {m.name: set(m.pax_headers) for m in t}


def test_origin_is_private(go: GoTool, cli: LayerfsCLI, paths: StorePaths, tmp_path: Path) -> None:
    parent = go.out("create-layer").split()[0]
    pdiff = Path(paths.root) / "overlay" / parent / "diff"
    (pdiff / "etc").mkdir()
    (pdiff / "etc" / "conf").write_bytes(b"v1\n")
    os.setxattr(pdiff / "etc" / "conf", "user.kept", b"yes")
    child = go.out("create-layer", parent).split()[0]
    cdir = Path(paths.root) / "overlay" / child
    mnt = tmp_path / "mnt"
    with layerfs_rw([str(pdiff)], str(cdir / "diff"), str(cdir / "work"), mnt):
        conf = mnt / "etc" / "conf"
        ino = os.lstat(conf).st_ino
        with open(conf, "ab") as f:
            f.write(b"v2\n")
        assert os.lstat(conf).st_ino == ino
        assert ORIGIN not in os.listxattr(conf)
        with pytest.raises(OSError) as e:
            os.getxattr(conf, ORIGIN)
        assert e.value.errno == errno.ENODATA
        # set through the view it is a plain xattr (as the kernel stores it), kept escaped:
        # the bookkeeping, and so the inode number, stays as it was
        os.setxattr(conf, ORIGIN, b"1")
        assert os.getxattr(conf, ORIGIN) == b"1"
        assert os.lstat(conf).st_ino == ino
    # the upper file does carry it (that is how the number survives a remount) ...
    assert os.getxattr(cdir / "diff" / "etc" / "conf", ORIGIN) == str(ino).encode()
    # ... but no layer tar does
    for name, tar in (
        ("containers-storage diff", go.run("diff", "-u", child).stdout),
        ("layerfs diff", cli.run("diff", child).stdout),
    ):
        keys = _pax_keys(tar)
        assert "etc/conf" in keys, f"{name}: {sorted(keys)}"
        assert "SCHILY.xattr.user.kept" in keys["etc/conf"], name
        assert not any(ORIGIN in k for ks in keys.values() for k in ks), f"{name}: {keys}"
