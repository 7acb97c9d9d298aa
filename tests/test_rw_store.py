"""``layerfs mount`` of a writable layer through the store: a read-write view whose changes
land in the layer's ``diff/`` in the store's format, shared with the Go tool's own mount of
the layer so that an upper dir never has two writers, and exported by ``layerfs diff`` as a
tar that reproduces the view.

Oracles: kernel overlay of the layer dirs after unmount (the upper read as the top lower),
the real ``containers-storage`` binary (its mount, its records, its applydiff).
"""

from __future__ import annotations

import errno
import io
import json
import os
import shutil
import stat
import tarfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from conftest import GoTool, LayerfsCLI, StorePaths, make_tar
from fs_helpers import (
    HIDDEN_XATTR_PREFIXES,
    assert_same_tree,
    kernel_overlay,
    require_fuse,
    snapshot,
)

pytestmark = [pytest.mark.fuse, pytest.mark.root]

BASE = {
    "etc": None,
    "etc/keep": b"keep\n",
    "etc/edit": b"old\n",
    "etc/gone": b"bye\n",
    "srv": None,
    "srv/tree": None,
    "srv/tree/a": b"a\n",
    "srv/tree/sub": None,
    "srv/tree/sub/b": b"b\n",
    "srv/redo": None,
    "srv/redo/old": b"old\n",
    "var": None,
    "var/lib": None,
    "var/lib/state": b"0\n",
}


def write_changes(root: str) -> None:
    """What a container does to its root: every kind of change across the layers."""
    with open(os.path.join(root, "etc/new"), "w") as f:
        f.write("new\n")
    with open(os.path.join(root, "etc/edit"), "a") as f:
        f.write("appended\n")
    os.unlink(os.path.join(root, "etc/gone"))
    os.chmod(os.path.join(root, "etc/keep"), 0o600)
    try:
        os.rename(os.path.join(root, "srv/tree"), os.path.join(root, "srv/moved"))  # a lower dir
    except OSError as exc:
        if exc.errno != errno.EXDEV:  # kernel overlay without redirect_dir
            raise
        shutil.move(os.path.join(root, "srv/tree"), os.path.join(root, "srv/moved"))  # as mv
    for name in os.listdir(os.path.join(root, "srv/redo")):
        os.unlink(os.path.join(root, "srv/redo", name))
    os.rmdir(os.path.join(root, "srv/redo"))
    os.mkdir(os.path.join(root, "srv/redo"))  # over a whiteout: opaque
    with open(os.path.join(root, "srv/redo/fresh"), "w") as f:
        f.write("fresh\n")
    os.symlink("../etc/new", os.path.join(root, "var/link"))
    os.link(os.path.join(root, "etc/new"), os.path.join(root, "var/hard"))
    os.mkfifo(os.path.join(root, "var/fifo"))
    os.setxattr(os.path.join(root, "var/lib/state"), "user.note", b"set")
    with open(os.path.join(root, "var/lib/state"), "r+") as f:
        f.truncate(0)
        f.write("1\n")
        f.flush()
        os.fsync(f.fileno())


ENGINE_XATTRS = (b"trusted.layerfs.",)
"""The rw engine's own bookkeeping in the upper dir (``trusted.layerfs.origin``: an entry's
inode number from before its copy-up). A view hides it; kernel overlay, reading the dirs
afterwards, lists it as it lists any foreign ``trusted.*`` xattr (as it would list
fuse-overlayfs's ``user.fuseoverlayfs.*``), so trees read from disk leave it out. It must
never reach a layer tar (tested below)."""
ON_DISK_HIDDEN = (*HIDDEN_XATTR_PREFIXES, *ENGINE_XATTRS)


def recorded(paths: StorePaths) -> dict[str, tuple[str, int]]:
    """``mountpoints.json`` as id -> (path, count)."""
    try:
        with open(os.path.join(paths.runroot, "overlay-layers", "mountpoints.json")) as f:
            raw = json.load(f)
    except FileNotFoundError:
        return {}
    return {r["id"]: (r["path"], r["count"]) for r in raw}


def layer_dirs(paths: StorePaths, ref: str) -> list[str]:
    """The diff dirs of *ref*'s chain, top first (the upper of a rw view first)."""
    store = paths.store()
    return [store.diff_dir(la.id) for la in store.chain(ref)]


def on_disk(paths: StorePaths, ref: str, mnt: Path) -> dict[str, dict[str, Any]]:
    """The layer's tree as kernel overlay shows its dirs (nothing mounted on them)."""
    with kernel_overlay(layer_dirs(paths, ref), mnt) as path:
        return snapshot(path, ON_DISK_HIDDEN)


@pytest.fixture
def writable(cli: LayerfsCLI) -> Iterator[str]:
    """A base layer and a writable layer on it (``create-layer --writeable``); its id."""
    cli.run("import-layer", "--name", "base", input=make_tar(BASE))
    out = cli.out("create-layer", "--writeable", "--name", "ctr", "base")
    yield out.split()[0]
    cli.run("unmount", "--force", "ctr", check=False)


def test_writeable_flag_survives_go_rewrites(cli: LayerfsCLI, go: GoTool, writable: str) -> None:
    """The flag that makes a layer writable is a record flag Go keeps on every rewrite."""
    go.run("add-names", "--name", "other", "ctr")
    go.run("set-metadata", "-m", "meta", "ctr")
    go.run("create-layer", "base")  # a rewrite of layers.json by Go
    record = json.loads(cli.out("layer", "--json", "ctr"))[0]
    assert record["flags"] == {"layerfs.writeable": True}
    assert json.loads(go.out("layer", "--json", "ctr"))[0]["flags"] == {"layerfs.writeable": True}


def test_rw_is_refused_for_a_layer_that_is_not_writable(
    cli: LayerfsCLI, paths: StorePaths, writable: str
) -> None:
    proc = cli.run("mount", "--rw", "base", check=False)
    err = proc.stderr.decode()
    assert proc.returncode == 1 and err.count("\n") == 1 and "Traceback" not in err
    assert 'layer "' in err and "is not writable" in err
    cli.run("create-layer", "--name", "child", "ctr")
    proc = cli.run("mount", "--rw", "ctr", check=False)
    assert proc.returncode == 1 and "has child layers" in proc.stderr.decode()
    assert recorded(paths) == {}


def test_rw_view_writes_land_in_the_layer(
    cli: LayerfsCLI, paths: StorePaths, writable: str, tmp_path: Path
) -> None:
    """Every change made in the view is in ``diff/`` in the store's format: kernel overlay
    of the dirs after unmount shows the tree the view showed."""
    require_fuse()
    path = cli.out("mount", "ctr").strip()
    store = paths.store()
    assert path == store.merged_dir(writable)
    assert recorded(paths) == {writable: (path, 1)}  # Go's mount shares it
    write_changes(path)
    view = snapshot(path)
    cli.run("unmount", "ctr")
    assert recorded(paths) == {}
    got = on_disk(paths, "ctr", tmp_path / "kernel")
    assert_same_tree(view, got)
    assert "srv/tree" not in view and view["srv/moved/sub/b"]["type"] == stat.S_IFREG
    assert sorted(os.listdir(os.path.join(store.diff_dir(writable), "srv", "redo"))) == ["fresh"]


def test_a_read_only_view_of_a_written_layer(
    cli: LayerfsCLI, paths: StorePaths, writable: str, tmp_path: Path
) -> None:
    """``--ro`` of a written layer is a private view (Go never hands it to a container)
    showing what kernel overlay shows, without the engine's bookkeeping."""
    require_fuse()
    path = cli.out("mount", "ctr").strip()
    write_changes(path)
    cli.run("unmount", "ctr")
    ro = cli.out("mount", "--ro", "ctr").strip()
    try:
        assert ro == os.path.join(paths.runroot, "layerfs", "views", writable)
        assert recorded(paths) == {}
        assert_same_tree(snapshot(ro), on_disk(paths, "ctr", tmp_path / "kernel"))
    finally:
        cli.run("unmount", "ctr")


def test_diff_of_a_written_layer_reproduces_the_view(
    cli: LayerfsCLI, go: GoTool, paths: StorePaths, writable: str, tmp_path: Path
) -> None:
    """``layerfs diff`` of the layer, applied on the same parent by layerfs and by Go, gives
    the tree the view showed before unmount."""
    require_fuse()
    path = cli.out("mount", "ctr").strip()
    write_changes(path)
    view = snapshot(path)
    cli.run("unmount", "ctr")
    tar = cli.run("diff", "ctr").stdout
    with tarfile.open(fileobj=io.BytesIO(tar)) as tf:
        leaked = [
            m.name
            for m in tf
            if any(k.startswith("SCHILY.xattr.trusted.layerfs.") for k in m.pax_headers)
        ]
    assert leaked == []  # the engine's bookkeeping is not layer content
    cli.run("import-layer", "--name", "copy", "--parent", "base", input=tar)
    go_copy = go.out("create-layer", "base").split()[0]
    go.run("applydiff", go_copy, input=tar)
    for record in view.values():
        record["mtime"] //= 10**9  # the tar carries whole seconds
    for ref, name in (("copy", "layerfs"), (go_copy, "go")):
        got = on_disk(paths, ref, tmp_path / name)
        for record in got.values():
            record["mtime"] //= 10**9
        assert_same_tree(got, view, ignore=("root_mtime",))


def test_go_mount_shares_a_layerfs_rw_view(
    cli: LayerfsCLI, go: GoTool, paths: StorePaths, writable: str, tmp_path: Path
) -> None:
    """layerfs first, then Go: Go's mount of the layer returns our view (count 2), never a
    second writer on the same upper; Go's last unmount ends the view."""
    require_fuse()
    path = cli.out("mount", "ctr").strip()
    assert go.out("mount", writable).strip() == path
    assert recorded(paths) == {writable: (path, 2)}
    views = json.loads(cli.out("ps", "--json"))
    assert [(v["mountpoint"], v["count"], v["read_write"]) for v in views] == [(path, 2, True)]
    with open(os.path.join(path, "etc/from-go-user"), "w") as f:
        f.write("x\n")
    assert "still mounted (1)" in cli.out("unmount", "ctr")
    go.run("unmount", writable)
    assert recorded(paths) == {}
    with open("/proc/self/mountinfo") as f:
        assert not any(line.split()[4] == path for line in f)
    got = on_disk(paths, "ctr", tmp_path / "kernel")
    assert got["etc/from-go-user"]["size"] == 2


def test_layerfs_shares_a_go_rw_mount(
    cli: LayerfsCLI, go: GoTool, paths: StorePaths, writable: str, tmp_path: Path
) -> None:
    """Go first, then layerfs: a rw request shares Go's kernel overlay (one writer); a
    read-only one gets an independent private view; our unmount drops a user of Go's."""
    require_fuse()
    path = go.out("mount", writable).strip()
    assert cli.out("mount", "ctr").strip() == path
    assert recorded(paths) == {writable: (path, 2)}
    with open("/proc/self/mountinfo") as f:
        assert next(ln.split()[8] for ln in f if ln.split()[4] == path) == "overlay"
    write_changes(path)
    view = snapshot(path)
    assert "still mounted (1)" in cli.out("unmount", "ctr")
    go.run("unmount", writable)
    assert recorded(paths) == {}
    assert_same_tree(on_disk(paths, "ctr", tmp_path / "kernel"), view)


def test_rw_and_ro_requests_do_not_mix(cli: LayerfsCLI, paths: StorePaths, writable: str) -> None:
    """One daemon per layer: a read-only request while our rw view lives is refused naming
    the live options, and so is a rw request while our private read-only view lives."""
    require_fuse()
    cli.run("mount", "ctr")
    proc = cli.run("mount", "--ro", "ctr", check=False)
    assert proc.returncode == 1 and "read-write" in proc.stderr.decode()
    cli.run("unmount", "ctr")
    cli.run("mount", "--ro", "ctr")
    proc = cli.run("mount", "ctr", check=False)
    assert proc.returncode == 1 and "read-only" in proc.stderr.decode()
    cli.run("unmount", "ctr")
    assert recorded(paths) == {}


def test_a_base_writable_layer_mounts_without_lowers(
    cli: LayerfsCLI, paths: StorePaths, tmp_path: Path
) -> None:
    """A writable layer with no parent: a view of its upper alone."""
    require_fuse()
    cli.run("create-layer", "--writeable", "--name", "solo")
    path = cli.out("mount", "solo").strip()
    try:
        os.makedirs(os.path.join(path, "a/b"))
        with open(os.path.join(path, "a/b/c"), "w") as f:
            f.write("c\n")
        view = snapshot(path)
    finally:
        cli.run("unmount", "solo")
    with kernel_overlay(layer_dirs(paths, "solo"), tmp_path / "kernel") as mnt:
        got = snapshot(mnt, ON_DISK_HIDDEN)
    # the oracle mount needs a second (empty) lower, which makes its root a merged
    # directory: overlayfs reports one link for it
    got[""]["nlink"] = view[""]["nlink"]
    assert_same_tree(got, view)


def test_a_go_container_layer_mounts_read_write(
    cli: LayerfsCLI, go: GoTool, paths: StorePaths, writable: str, tmp_path: Path
) -> None:
    """A container's layer (Go's containers.json) is writable: ``layerfs mount`` of it is
    the container's root as Go's mount would give it, and Go's mount of the container
    shares it."""
    require_fuse()
    go.run("create-image", "-n", "img", "base")
    ctr = go.out("create-container", "img").split()[0]
    layer = json.loads(go.out("container", "--json", ctr))[0]["layer"]
    path = cli.out("mount", layer).strip()
    try:
        assert go.out("mount", ctr).strip() == path
        write_changes(path)
        view = snapshot(path)
        go.run("unmount", ctr)
    finally:
        cli.run("unmount", "--force", layer, check=False)
    assert recorded(paths) == {}
    assert_same_tree(on_disk(paths, layer, tmp_path / "kernel"), view)
    go.run("delete-container", ctr)
