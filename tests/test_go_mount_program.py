"""The Go tool mounts, writes and unmounts a layer through ``layerfs-overlay``.

``containers-storage --storage-opt overlay.mount_program=layerfs-overlay`` runs our program
for its ``mount`` of a layer (a read-write view: lowers from ``l/``, upper = the layer's
``diff/``). After the Go ``unmount``, the layer dirs are read by two oracles: fuse-overlayfs
(the reference mount program, reading the store's whiteout format) and, through Go's own
``diff`` of the layer imported on the same parent into a kernel-format store, kernel
overlay. Both must show the tree the view showed.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
from test_rw_store import BASE, ON_DISK_HIDDEN, write_changes

from conftest import GO_TOOL, GoTool, LayerfsCLI, StorePaths, make_tar, require, require_tool
from fs_helpers import assert_same_tree, fuse_overlayfs, kernel_overlay, require_fuse, snapshot

pytestmark = [pytest.mark.fuse, pytest.mark.root, pytest.mark.interop]


def mount_program() -> str:
    """This virtualenv's ``layerfs-overlay`` unless ``LAYERFS_TEST_MOUNT_PROGRAM`` names
    another (``/usr/bin/fuse-overlayfs`` proves the test itself)."""
    path = os.environ.get("LAYERFS_TEST_MOUNT_PROGRAM") or str(
        Path(sys.executable).parent / "layerfs-overlay"
    )
    require(os.access(path, os.X_OK), f"mount program {path} is not installed (scripts/setup)")
    return path


class GoWithProgram(GoTool):
    """containers-storage on a store whose layers a mount program mounts."""

    def __init__(self, paths: StorePaths, program: str) -> None:
        super().__init__(paths)
        self.program = program

    def argv(self, *args: str) -> list[str]:
        head = super().argv()
        return [*head, "--storage-opt", f"overlay.mount_program={self.program}", *args]


def fuse_mounts(path: str) -> list[str]:
    with open("/proc/self/mountinfo") as f:
        return [ln.split(" - ")[1].split()[0] for ln in f if ln.split()[4] == path]


def test_go_mounts_writes_and_unmounts_through_the_mount_program(
    tmp_path: Path, paths: StorePaths
) -> None:
    require_fuse()
    require_tool(GO_TOOL)
    go = GoWithProgram(paths, mount_program())
    try:
        base = go.out("create-layer", "-n", "base").split()[0]
        go.run("applydiff", base, input=make_tar(BASE))
        top = go.out("create-layer", "-n", "top", base).split()[0]
        path = go.out("mount", top).strip()
        assert fuse_mounts(path) and fuse_mounts(path)[0].startswith("fuse")
        write_changes(path)
        view = snapshot(path)
        go.run("unmount", top)
        assert fuse_mounts(path) == []
        store = paths.store()
        assert store.whiteout_format() == "aufs"  # Go marked the store for a mount program
        dirs = [store.diff_dir(top), store.diff_dir(base)]
        with fuse_overlayfs(dirs, tmp_path / "fuse") as mnt:
            # fuse-overlayfs reports one link for every directory
            assert_same_tree(snapshot(mnt, ON_DISK_HIDDEN), view, dir_nlink=False)
        tar = go.run("diff", top).stdout
    finally:
        go.shutdown()
    kernel_store = LayerfsCLI(StorePaths(str(tmp_path / "k-root"), str(tmp_path / "k-run")))
    kernel_store.run("import-layer", "--name", "base", input=make_tar(BASE))
    kernel_store.run("import-layer", "--name", "top", "--parent", "base", input=tar)
    kstore = kernel_store.paths.store()
    assert kstore.whiteout_format() == "kernel"
    dirs = [kstore.diff_dir(la.id) for la in kstore.chain("top")]
    with kernel_overlay(dirs, tmp_path / "kernel") as mnt:
        got = snapshot(mnt, ON_DISK_HIDDEN)
    for snap in (got, view):
        for record in snap.values():
            record["mtime"] //= 10**9  # a layer tar carries whole seconds
    # Go exports a directory made again over a deleted one as the directory plus a whiteout
    # of each entry it hid (not an opaque marker): kernel overlay then reports it as a merged
    # directory, with one link
    assert_same_tree(got, view, ignore=("root_mtime",), dir_nlink=False)


def test_layerfs_rw_mount_in_a_mount_program_store(tmp_path: Path, paths: StorePaths) -> None:
    """In a store that Go uses with ``layerfs-overlay`` as its mount program (``.wh.``
    format): ``layerfs mount`` of a writable layer writes that format (fuse-overlayfs, the
    store's reference reader, shows the view's tree afterwards); Go's mount shares our view;
    and in the other order ``layerfs mount`` shares the mount Go made through the program,
    its last ``unmount`` ending it."""
    require_fuse()
    require_tool(GO_TOOL)
    go = GoWithProgram(paths, mount_program())
    cli = LayerfsCLI(paths)
    try:
        base = go.out("create-layer", "-n", "base").split()[0]
        go.run("applydiff", base, input=make_tar(BASE))
        top = cli.out("create-layer", "--writeable", "--name", "top", base).split()[0]
        store = paths.store()
        assert store.whiteout_format() == "aufs"
        path = cli.out("mount", "top").strip()
        assert go.out("mount", top).strip() == path  # shared, not a second writer
        write_changes(path)
        view = snapshot(path)
        go.run("unmount", top)
        assert "unmounted" in cli.out("unmount", "top")
        assert fuse_mounts(path) == []
        dirs = [store.diff_dir(top), store.diff_dir(base)]
        with fuse_overlayfs(dirs, tmp_path / "fuse") as mnt:
            assert_same_tree(snapshot(mnt, ON_DISK_HIDDEN), view, dir_nlink=False)
        # Go first, through the mount program; then layerfs shares it
        path = go.out("mount", top).strip()
        assert cli.out("mount", "top").strip() == path
        assert cli.out("mounted", "top").strip() == "2"
        with open(os.path.join(path, "etc", "second"), "w") as f:
            f.write("2\n")
        go.run("unmount", top)
        assert "unmounted" in cli.out("unmount", "top")
        assert fuse_mounts(path) == []
        assert os.path.exists(os.path.join(store.diff_dir(top), "etc", "second"))
    finally:
        cli.run("unmount", "--force", "top", check=False)
        go.shutdown()
