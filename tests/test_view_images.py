"""Real images through the whole path: import (layerfs or skopeo), mount, compare with the kernel.

The kernel's overlayfs, mounted read-only on the same ``diff/`` directories, is the oracle:
every entry must agree in type, mode, owner, size, mtime, content, link target, rdev,
xattrs, nlink and hard-link grouping.
"""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest

from conftest import IN_CI, LayerfsCLI, StorePaths, make_tar, require_root, require_tool
from fs_helpers import assert_same_tree, kernel_overlay, snapshot
from image_helpers import build_oci_image, sample_steps

pytestmark = [pytest.mark.fuse, pytest.mark.root, pytest.mark.interop]

MINBASE_CACHE = Path(os.environ.get("LAYERFS_TEST_CACHE", "/var/tmp/layerfs-test-cache"))


def _diff_dirs(cli: LayerfsCLI, paths: StorePaths, top: str) -> list[str]:
    records = {r["id"]: r for r in json.loads(cli.out("layers", "--json"))}
    dirs = []
    layer_id: str | None = top
    while layer_id:
        dirs.append(os.path.join(paths.root, "overlay", layer_id, "diff"))
        layer_id = records[layer_id].get("parent")
    return dirs


def _compare_with_kernel(cli: LayerfsCLI, paths: StorePaths, target: str, tmp: Path) -> int:
    mounted = json.loads(cli.out("mount", "--json", target))
    view = mounted["mountpoint"]
    try:
        got = snapshot(view)
        with kernel_overlay(_diff_dirs(cli, paths, mounted["id"]), tmp / "kernel") as kmnt:
            want = snapshot(kmnt)
        assert_same_tree(got, want)
        return len(got)
    finally:
        cli.run("unmount", target)


def test_umoci_image_matches_the_kernel(cli: LayerfsCLI, paths: StorePaths, tmp_path: Path) -> None:
    require_root()
    image = build_oci_image(tmp_path / "build", sample_steps())
    cli.run("import-image", "--name", "sample:t", f"oci:{image}:t")
    entries = _compare_with_kernel(cli, paths, "sample:t", tmp_path)
    assert entries > 10


def test_store_written_by_skopeo_matches_the_kernel(
    cli: LayerfsCLI, paths: StorePaths, tmp_path: Path
) -> None:
    require_root()
    skopeo = require_tool("skopeo")
    image = build_oci_image(tmp_path / "build", sample_steps())
    dest = f"containers-storage:[overlay@{paths.root}+{paths.runroot}]localhost/sk:t"
    proc = subprocess.run([skopeo, "copy", f"oci:{image}:t", dest], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    subprocess.run(
        ["containers-storage", "-g", paths.root, "-R", paths.runroot, "-s", "overlay", "shutdown"],
        capture_output=True,
    )
    entries = _compare_with_kernel(cli, paths, "localhost/sk:t", tmp_path)
    assert entries > 10


def _minbase_tarball() -> Path:
    """A Debian minbase rootfs tarball, made once per machine with debootstrap."""
    tarball = MINBASE_CACHE / "minbase.tar"
    if tarball.exists():
        return tarball
    debootstrap = require_tool("debootstrap")
    MINBASE_CACHE.mkdir(parents=True, exist_ok=True)
    rootfs = MINBASE_CACHE / "rootfs"
    proc = subprocess.run(
        [debootstrap, "--variant=minbase", "bookworm", str(rootfs), "http://deb.debian.org/debian"],
        capture_output=True,
        text=True,
        timeout=1500,
    )
    if proc.returncode != 0:
        message = f"debootstrap failed: {proc.stderr[-500:]}"
        if IN_CI:
            pytest.fail(message)
        pytest.skip(message)
    partial = tarball.with_suffix(".partial")
    subprocess.run(
        ["tar", "-C", str(rootfs), "--numeric-owner", "-cf", str(partial), "."], check=True
    )
    subprocess.run(["rm", "-rf", str(rootfs)], check=True)
    partial.rename(tarball)
    return tarball


def _tar_of(entries: dict[str, bytes | None], whiteouts: list[str], path: Path) -> Path:
    path.write_bytes(make_tar(entries, whiteouts))
    return path


@pytest.mark.timeout(1800)
def test_debian_minbase_plus_layers_matches_the_kernel(
    cli: LayerfsCLI, paths: StorePaths, tmp_path: Path
) -> None:
    require_root()
    base = _minbase_tarball()
    cli.run("import-layer", "--name", "minbase", str(base), timeout=600)
    second = _tar_of(
        {"etc/motd": b"layerfs\n", "usr/share/doc": None, "usr/share/doc/NEW": b"x\n"},
        ["usr/share/doc/.wh..wh..opq", "etc/.wh.issue", "var/.wh.log"],
        tmp_path / "second.tar",
    )
    cli.run("import-layer", "--name", "minbase-2", "--parent", "minbase", str(second))
    third = _tar_of({"var/log": None, "var/log/fresh": b"recreated\n"}, [], tmp_path / "third.tar")
    cli.run("import-layer", "--name", "minbase-3", "--parent", "minbase-2", str(third))
    entries = _compare_with_kernel(cli, paths, "minbase-3", tmp_path)
    assert entries > 3000
    listing = json.loads(cli.out("ls", "--json", "minbase-3", "/usr/share/doc"))
    assert [e["name"] for e in listing] == ["NEW"]
    assert cli.run("cat", "minbase-3", "/etc/motd").stdout == b"layerfs\n"
