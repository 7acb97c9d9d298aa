"""Failures found by a fresh-eyes attack on issue 9's change, each against the real Go tool,
real FUSE mounts and the overlay oracle of the store's format."""

from __future__ import annotations

import errno
import json
import os
import subprocess
from pathlib import Path

import pytest

from conftest import GoTool, LayerfsCLI, StorePaths, make_tar, require_root, wait_until
from fs_helpers import (
    assert_same_tree,
    fuse_overlayfs,
    kernel_overlay,
    require_fuse_overlayfs,
    snapshot,
)
from fs_helpers import layerfs_view as _view
from fs_helpers import store_chain_dirs as _diff_dirs
from layerfs import procfs
from layerfs.fs.index import chain_pins, walk_diff
from layerfs.fs.index.build import layer_key
from layerfs.fs.index.format import encode, write_file
from layerfs.store import pending

pytestmark = [pytest.mark.fuse, pytest.mark.root, pytest.mark.interop]

OLD = {"etc": None, "etc/sub": None, "etc/sub/file": b"old\n", "etc/keep": b"k"}
MOUNT_PROGRAM = "overlay.mount_program=/usr/bin/fuse-overlayfs"


@pytest.fixture(autouse=True)
def _root() -> None:
    require_root()


def _write_through(go: GoTool, layer: str, *opts: str, name: str) -> None:
    """Mount *layer* read-write with the Go tool, change files deep below its root, unmount."""
    mnt = go.out(*opts, "mount", layer).strip()
    try:
        Path(mnt, "etc/sub/file").write_bytes(b"written through the Go mount, longer\n")
        Path(mnt, "etc/sub", name).write_bytes(b"added\n")
    finally:
        go.run(*opts, "unmount", layer)


def test_mount_program_store_image_layer_written_through_go_mount(
    cli: LayerfsCLI, go: GoTool, paths: StorePaths, tmp_path: Path
) -> None:
    """fuse-overlayfs creates ``work/work`` on the first read-write mount only: a later Go
    mount that changes a digest-pinned layer changes nothing in the index key, and the
    persisted index served the old tree."""
    require_fuse_overlayfs()
    layer = go.out("--storage-opt", MOUNT_PROGRAM, "create-layer").split()[0]
    tar = tmp_path / "base.tar"
    tar.write_bytes(make_tar(OLD))
    go.run("--storage-opt", MOUNT_PROGRAM, "applydiff", "-f", str(tar), layer)
    assert paths.store().whiteout_format() == "aufs"
    _write_through(go, layer, "--storage-opt", MOUNT_PROGRAM, name="first")
    _view(cli, layer, tmp_path / "warm")  # a pinned layer: its index may be persisted now
    _write_through(go, layer, "--storage-opt", MOUNT_PROGRAM, name="second")
    got = _view(cli, layer, tmp_path / "view")
    with fuse_overlayfs(_diff_dirs(paths, layer), tmp_path / "oracle") as m:
        want = snapshot(m)
    assert "etc/sub/second" in want
    assert_same_tree(got, want, ignore=("ino", "nlink"))
    names = {e["name"] for e in json.loads(cli.out("ls", "--json", layer, "etc/sub"))}
    assert "second" in names


def test_image_layer_written_through_go_mount_with_relative_upperdir(
    cli: LayerfsCLI, tmp_path: Path
) -> None:
    """With mount data over a page the Go tool mounts with relative paths
    (``upperdir=<id>/diff``), so mountinfo never names the layer's absolute diff dir: a view
    made while the Go mount was live persisted the index under the post-mount key, and the
    writes that followed were never seen."""
    long = tmp_path / ("r" * 200)
    sp = StorePaths(str(long / "root"), str(tmp_path / "run"))
    go, cli = GoTool(sp), LayerfsCLI(sp)
    try:
        top = ""
        for _ in range(16):
            top = go.out("create-layer", *([top] if top else [])).split()[0]
        tar = tmp_path / "base.tar"
        tar.write_bytes(make_tar(OLD))
        go.run("applydiff", "-f", str(tar), top)
        cli.run("create-layer", "--name", "child", top)
        mnt = go.out("mount", top).strip()
        try:
            with open("/proc/self/mountinfo") as f:
                assert f"upperdir={top}/diff," in f.read()  # relative, as described
            _view(cli, "child", tmp_path / "during")
            Path(mnt, "etc/sub/added").write_bytes(b"added\n")
            Path(mnt, "etc/sub/file").write_bytes(b"written through the Go mount, longer\n")
        finally:
            go.run("unmount", top)
        got = _view(cli, "child", tmp_path / "view")
        short = tmp_path / "o"  # the chain's own paths are too long for one mount's options
        short.mkdir()
        links = []
        for i, d in enumerate(_diff_dirs(sp, "child")):
            os.symlink(d, short / str(i))
            links.append(str(short / str(i)))
        with kernel_overlay(links, tmp_path / "oracle") as m:
            want = snapshot(m)
        assert "etc/sub/added" in want
        assert_same_tree(got, want, ignore=("ino",))
        assert cli.out("cat", "child", "etc/sub/added") == "added\n"
    finally:
        go.shutdown()


def _daemon_file(paths: StorePaths, layer: str) -> Path:
    return Path(pending.daemon_file(paths.runroot, layer))


def test_unmount_never_signals_a_process_the_daemon_record_names_wrongly(
    cli: LayerfsCLI, paths: StorePaths
) -> None:
    """A daemon record whose pid is not the view's daemon (a reused pid, a hostile record):
    unmount waited for that process and then sent it SIGTERM."""
    cli.run("import-layer", "--name", "base", input=make_tar(OLD))
    layer = paths.store().get("base").id
    cli.run("mount", layer)
    record = json.loads(_daemon_file(paths, layer).read_text())
    daemon = record["pid"]
    victim = subprocess.Popen(["sleep", "600"])
    try:
        record["pid"] = victim.pid
        _daemon_file(paths, layer).write_text(json.dumps(record))
        cli.run("unmount", layer, timeout=60)
        wait_until(lambda: not procfs.pid_alive(daemon), what="the real daemon exits")
        assert victim.poll() is None, "unmount signalled a process that is not the daemon"
        assert cli.out("mounted", layer).strip() == "0"
    finally:
        victim.kill()
        victim.wait()


@pytest.mark.parametrize(
    "record",
    [
        {"pid": 5, "path": "/x", "started": "soon"},
        {"pid": 5, "path": "/x", "started": [1]},
        {"pid": 5, "path": "/x\u0000y"},
        {"pid": True, "path": "/x"},
        {"pid": 5, "path": "/x", "count": True, "go_visible": "no"},
    ],
    ids=["started-text", "started-list", "nul-path", "bool-pid", "bool-count"],
)
def test_hostile_daemon_record_is_ignored(
    cli: LayerfsCLI, paths: StorePaths, record: dict[str, object]
) -> None:
    """A damaged daemon record gave a traceback in every view command."""
    cli.run("import-layer", "--name", "base", input=make_tar(OLD))
    layer = paths.store().get("base").id
    f = _daemon_file(paths, layer)
    f.parent.mkdir(parents=True, exist_ok=True)
    f.write_text(json.dumps(record))
    for args in (("ps",), ("mounted", layer), ("unmount", layer)):
        proc = cli.run(*args, check=False, timeout=30)
        err = proc.stderr.decode()
        assert proc.returncode == 0, err
        assert "Traceback" not in err and "Error:" not in err, err
    assert pending.read_daemon(paths.runroot, layer) is None


def test_fifo_index_file_does_not_hang(cli: LayerfsCLI, paths: StorePaths) -> None:
    """A FIFO planted as a pinned layer's ``layerfs.index``: opening it blocked ``cat``, ``ls``
    and the daemon (``mount``) until a writer came."""
    cli.run("import-layer", "--name", "base", input=make_tar(OLD))
    store = paths.store()
    layer = store.get("base").id
    index = Path(store.layer_dir(layer)) / "layerfs.index"
    index.unlink(missing_ok=True)
    os.mkfifo(index)
    cat = cli.run("cat", layer, "etc/sub/file", timeout=30)  # a hang is a TimeoutExpired
    assert cat.stdout == b"old\n"
    assert not index.exists() or index.is_file()
    out = cli.run("mount", layer, timeout=60).stdout.decode().strip()
    try:
        assert Path(out, "etc/sub/file").read_bytes() == b"old\n"
    finally:
        cli.run("unmount", layer)


def _layer_with_secret_outside(
    cli: LayerfsCLI, paths: StorePaths, tmp_path: Path
) -> tuple[str, Path, Path]:
    """A layer with ``etc/shadow`` and, outside the store, a root-only file of the same name."""
    secret = tmp_path / "secret"
    secret.mkdir()
    (secret / "shadow").write_bytes(SECRET)
    (secret / "shadow").chmod(0o600)
    cli.run("import-layer", "--name", "base", input=make_tar(SHADOW))
    layer = paths.store().get("base").id
    return layer, Path(paths.store().driver.diff_dir(layer)), secret


SECRET = b"HOST SECRET\n"
SHADOW = {"etc": None, "etc/shadow": b"layer data\n"}


def _swap_for_symlink(diff: Path, secret: Path) -> None:
    """What someone who can write the store does: the indexed dir becomes a symlink."""
    os.rename(diff / "etc", diff / "etc.old")
    os.symlink(secret, diff / "etc")


def test_view_never_follows_a_symlink_that_replaced_a_layer_dir(
    cli: LayerfsCLI, paths: StorePaths, tmp_path: Path
) -> None:
    """The daemon opened backing files by absolute path: a layer dir replaced by a symlink
    after the view was made had it serve a root-only file from outside the layer, under the
    0644 mode the index recorded (kernel overlayfs never follows a symlink in a lower path)."""
    layer, diff, secret = _layer_with_secret_outside(cli, paths, tmp_path)
    mnt = cli.out("mount", layer).strip()
    try:
        _swap_for_symlink(diff, secret)
        try:
            data = Path(mnt, "etc/shadow").read_bytes()
        except OSError as e:
            assert e.errno == errno.ELOOP, e
        else:
            assert data == SHADOW["etc/shadow"], "served a file from outside the layer"
    finally:
        cli.run("unmount", layer)


def test_cat_never_follows_a_symlink_that_replaced_a_layer_dir(
    cli: LayerfsCLI, paths: StorePaths, tmp_path: Path
) -> None:
    """``layerfs cat`` opened the backing path with a plain open(): an index whose entries
    predate the swap (here a persisted one written for the current key, as a store writer can)
    made it print a file from outside the layer."""
    layer, diff, secret = _layer_with_secret_outside(cli, paths, tmp_path)
    entries = list(walk_diff(str(diff)))
    _swap_for_symlink(diff, secret)
    store = paths.store()
    pin = chain_pins(store, store.chain(layer))[0]
    assert pin.index_path is not None
    write_file(pin.index_path, encode(entries, layer_key(os.fsencode(diff), pin)))
    proc = cli.run("cat", layer, "etc/shadow", check=False, timeout=30)
    assert SECRET not in proc.stdout
    assert proc.returncode == 1, proc.stdout
    assert proc.stderr.decode().count("\n") == 1 and "symbolic links" in proc.stderr.decode()


@pytest.mark.parametrize("kind", ["non-utf8", "fifo", "directory"])
def test_damaged_mount_program_marker(
    cli: LayerfsCLI, paths: StorePaths, tmp_path: Path, kind: str
) -> None:
    """``overlay/.has-mount-program`` with non-UTF-8 bytes gave a UnicodeDecodeError traceback
    in every view command; a FIFO there blocked them. Anything but ``true`` is the kernel form
    (the store's root default), and the marker is never waited on."""
    cli.run("import-layer", "--name", "base", input=make_tar(OLD))
    layer = paths.store().get("base").id
    marker = Path(paths.root, "overlay", ".has-mount-program")
    marker.unlink()
    if kind == "non-utf8":
        marker.write_bytes(b"garbage\n\x00\xff")
    elif kind == "fifo":
        os.mkfifo(marker)
    else:
        marker.mkdir()
    assert cli.run("cat", layer, "etc/sub/file", timeout=30).stdout == b"old\n"  # no hang
    assert paths.store().whiteout_format() == "kernel"
    mnt = cli.run("mount", layer, timeout=60).stdout.decode().strip()
    try:
        assert Path(mnt, "etc/keep").read_bytes() == b"k"
    finally:
        cli.run("unmount", layer, timeout=30)
