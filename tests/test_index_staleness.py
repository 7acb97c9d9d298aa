"""A fresh view shows the layer directories as they are at mount time, whoever changed them
through a sanctioned path: layerfs or Go ``applydiff``, a container layer written through the
Go tool's kernel mount, an image layer the Go tool mounted read-write. Each view (mount,
``ls``, ``cat``) is compared with a kernel overlay of the same directories."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from conftest import GoTool, LayerfsCLI, StorePaths, make_tar, require_root
from fs_helpers import assert_same_tree, kernel_overlay, snapshot
from fs_helpers import layerfs_view as _view
from fs_helpers import store_chain_dirs as _chain_dirs

pytestmark = [pytest.mark.fuse, pytest.mark.root, pytest.mark.interop]

OLD = {"etc": None, "etc/sub": None, "etc/sub/file": b"old\n", "etc/keep": b"k"}
NEW = {"etc/sub/file": b"a much longer new content\n", "etc/sub/new": b"new\n"}


@pytest.fixture(autouse=True)
def _root() -> None:
    require_root()


def _oracle(paths: StorePaths, ref: str, mnt: Path) -> dict[str, dict[str, object]]:
    with kernel_overlay(_chain_dirs(paths, ref), mnt) as m:
        return snapshot(m)


def _assert_view_is_current(cli: LayerfsCLI, paths: StorePaths, ref: str, tmp: Path) -> None:
    got = _view(cli, ref, tmp / "view")
    want = _oracle(paths, ref, tmp / "kernel")
    # the root and every merged directory are the layers' own dirs: ino differs by design
    assert_same_tree(got, want, ignore=("ino",))
    ls = {e["name"]: e for e in json.loads(cli.out("ls", "--json", ref, "etc/sub"))}
    for name in ls:
        assert want[f"etc/sub/{name}"]["size"] == ls[name]["size"]
    assert set(ls) == {p.split("/")[-1] for p in want if p.startswith("etc/sub/")}


def _base_and_child(cli: LayerfsCLI) -> None:
    cli.run("import-layer", "--name", "base", input=make_tar(OLD))
    cli.run("create-layer", "--name", "child", "base")


def _warm(cli: LayerfsCLI, paths: StorePaths, tmp: Path) -> None:
    """View the child once (this persists the base layer's index) and check the old data."""
    got = _view(cli, "child", tmp / "warm")
    assert got["etc/sub/file"]["size"] == len(OLD["etc/sub/file"] or b"")
    base = paths.store().get("base")
    index = Path(paths.store().driver.layer_dir(base.id)) / "layerfs.index"
    assert index.exists()  # pinned by its diff digest: persisted
    assert cli.out("cat", "child", "etc/sub/file").encode() == OLD["etc/sub/file"]


def test_layerfs_applydiff_is_seen(cli: LayerfsCLI, paths: StorePaths, tmp_path: Path) -> None:
    _base_and_child(cli)
    _warm(cli, paths, tmp_path)
    cli.run("applydiff", "base", input=make_tar(NEW))
    assert cli.out("cat", "child", "etc/sub/file").encode() == NEW["etc/sub/file"]
    assert cli.out("cat", "child", "etc/sub/new").encode() == NEW["etc/sub/new"]
    _assert_view_is_current(cli, paths, "child", tmp_path)


def test_go_applydiff_is_seen(
    cli: LayerfsCLI, go: GoTool, paths: StorePaths, tmp_path: Path
) -> None:
    _base_and_child(cli)
    _warm(cli, paths, tmp_path)
    tar = tmp_path / "new.tar"
    tar.write_bytes(make_tar(NEW))
    go.run("applydiff", "-f", str(tar), "base")
    assert cli.out("cat", "child", "etc/sub/file").encode() == NEW["etc/sub/file"]
    _assert_view_is_current(cli, paths, "child", tmp_path)


def test_go_applydiff_of_the_same_tar_twice(
    cli: LayerfsCLI, go: GoTool, paths: StorePaths, tmp_path: Path
) -> None:
    """The same diff applied again keeps the digest; the rewritten tar-split still changes the
    key, and the view matches the kernel."""
    cli.run("import-layer", "--name", "base", input=make_tar(OLD))
    cli.run("create-layer", "--name", "child", "base")
    tar = tmp_path / "new.tar"
    tar.write_bytes(make_tar(NEW))
    go.run("applydiff", "-f", str(tar), "base")
    _view(cli, "child", tmp_path / "warm")
    (Path(_chain_dirs(paths, "base")[0]) / "etc/sub/new").unlink()  # (what a repair would redo)
    go.run("applydiff", "-f", str(tar), "base")
    _assert_view_is_current(cli, paths, "child", tmp_path)


def _write_through_go_mount(go: GoTool, ref: str) -> None:
    mnt = go.out("mount", ref).strip()
    try:
        Path(mnt, "etc/sub/file").write_bytes(b"written through the Go mount, longer\n")
        Path(mnt, "etc/keep").unlink()
        Path(mnt, "etc/sub/added").write_bytes(b"added\n")
        Path(mnt, "etc/dir/inner").mkdir(parents=True)  # deep changes only: the layer's
        Path(mnt, "etc/dir/inner/f").write_bytes(b"f")  # root directory stays as it was
        os.symlink("sub/file", Path(mnt, "etc/link"))
    finally:
        go.run("unmount", ref)


def test_container_layer_written_through_go_mount(
    cli: LayerfsCLI, go: GoTool, paths: StorePaths, tmp_path: Path
) -> None:
    cli.run("import-layer", "--name", "base", input=make_tar(OLD))
    container = go.out("create-layer", "base").split()[0]
    first = _view(cli, container, tmp_path / "first")
    assert "etc/keep" in first
    _write_through_go_mount(go, container)
    got = _view(cli, container, tmp_path / "view")
    want = _oracle(paths, container, tmp_path / "kernel")
    assert_same_tree(got, want, ignore=("ino",))
    assert "etc/keep" not in got and "etc/dir/inner/f" in got
    assert cli.out("cat", container, "etc/sub/added") == "added\n"


def test_image_layer_written_through_go_mount(
    cli: LayerfsCLI, go: GoTool, paths: StorePaths, tmp_path: Path
) -> None:
    """A layer pinned by its digest but mounted read-write by the Go tool (its diff is the
    upper dir) and changed: the kernel recreated work/work, so the key no longer matches."""
    _base_and_child(cli)
    _warm(cli, paths, tmp_path)
    _write_through_go_mount(go, paths.store().get("base").id)
    _assert_view_is_current(cli, paths, "child", tmp_path)


def test_layer_changed_while_go_mount_is_live(
    cli: LayerfsCLI, go: GoTool, paths: StorePaths, tmp_path: Path
) -> None:
    """While a kernel mount uses a layer as its upper dir, the layer is scanned live."""
    _base_and_child(cli)
    _warm(cli, paths, tmp_path)
    base = paths.store().get("base").id
    mnt = go.out("mount", base).strip()
    try:
        _assert_view_is_current(cli, paths, "child", tmp_path / "1")
        Path(mnt, "etc/sub/live").write_bytes(b"live\n")
        _assert_view_is_current(cli, paths, "child", tmp_path / "2")
        assert cli.out("cat", "child", "etc/sub/live") == "live\n"
    finally:
        go.run("unmount", base)


def test_upper_dirs_with_commas_and_spaces_are_recognised(tmp_path: Path) -> None:
    """mountinfo shows an upperdir with octal and overlayfs backslash escapes; the index must
    see the real path, or a layer under a live kernel overlay is trusted from disk."""
    import subprocess

    from layerfs.mountinfo import overlay_upper_dirs

    for name in ("lower", "up, per", "work", "mnt"):
        (tmp_path / name).mkdir()
    upper = str(tmp_path / "up, per")
    opts = f"lowerdir={tmp_path}/lower,upperdir={upper.replace(',', chr(92) + ',')}"
    opts += f",workdir={tmp_path}/work"
    subprocess.run(
        ["mount", "-t", "overlay", "overlay", "-o", opts, str(tmp_path / "mnt")], check=True
    )
    try:
        assert upper in overlay_upper_dirs()
    finally:
        subprocess.run(["umount", str(tmp_path / "mnt")], check=True)
    assert upper not in overlay_upper_dirs()
