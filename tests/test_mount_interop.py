"""layerfs views and the real Go tool on one store, the Go tool started *after* the view.

Covers issue 9 items B4 (Go's bind mount of ``<root>/overlay`` must not hide a live view),
B7 (every pairing of layerfs and Go mount/unmount/delete-layer, at default and custom mount
points) and B8 (no option downgrades; no read-only view of a writable layer where Go would
hand it to a container).
"""

from __future__ import annotations

import json
import os
import subprocess
import time
from pathlib import Path

import pytest

from conftest import GoTool, LayerfsCLI, StorePaths, import_two_layer_chain
from layerfs.procfs import pid_alive

pytestmark = [pytest.mark.fuse, pytest.mark.root]


@pytest.fixture
def chain(cli: LayerfsCLI) -> dict[str, str]:
    """base (a, d/x) <- top (b, .wh.a, d/y): returns name -> id."""
    return import_two_layer_chain(cli)


def fuse_mounts_below(top: str) -> list[str]:
    """FUSE mount points below ``top`` in this process's mountinfo (bytes-safe)."""
    out = []
    with open("/proc/self/mountinfo", "rb") as f:
        for line in f.read().splitlines():
            fields = line.split()
            sep = fields.index(b"-")
            point = os.fsdecode(fields[4]).replace("\\040", " ")
            if fields[sep + 1].startswith(b"fuse") and point.startswith(top):
                out.append(point)
    return out


def daemon_pid(paths: StorePaths, layer_id: str) -> int:
    with open(os.path.join(paths.runroot, "layerfs", "daemons", f"{layer_id}.json")) as f:
        return int(json.load(f)["pid"])


def wait_gone(pid: int, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while pid_alive(pid):
        assert time.monotonic() < deadline, f"daemon {pid} still running"
        time.sleep(0.02)


def recorded(paths: StorePaths) -> dict[str, tuple[str, int]]:
    try:
        with open(os.path.join(paths.runroot, "overlay-layers", "mountpoints.json")) as f:
            return {e["id"]: (e["path"], e["count"]) for e in json.load(f) if e["count"] > 0}
    except FileNotFoundError:
        return {}


def ps(cli: LayerfsCLI) -> list[dict[str, object]]:
    return list(json.loads(cli.out("ps", "--json")))


def one_line_error(proc: subprocess.CompletedProcess[bytes]) -> str:
    assert proc.returncode == 1, proc
    err = proc.stderr.decode()
    assert err.count("\n") == 1 and "Traceback" not in err and "b'" not in err, err
    return err


# ------------------------------------------------------------------ B4: Go after the view


def test_go_started_after_the_view_does_not_hide_it(
    cli: LayerfsCLI, go: GoTool, chain: dict[str, str], paths: StorePaths
) -> None:
    path = cli.out("mount", "top").strip()
    assert path.startswith(os.path.join(paths.root, "overlay") + "/")
    pid = daemon_pid(paths, chain["top"])
    try:
        go.out("layers")  # Go's first command on this store: its driver "makes home private"
        kernel = go.out("mount", chain["base"]).strip()  # and a kernel overlay beside it
        assert sorted(os.listdir(kernel)) == ["a", "d"]
        go.run("unmount", chain["base"])
        assert sorted(os.listdir(path)) == ["b", "d"]  # still our view, not an empty dir
        views = ps(cli)
        assert [(v["id"], v["state"]) for v in views] == [(chain["top"], "live")]
        assert "unmounted" in cli.out("unmount", "top")
    finally:
        cli.run("unmount", "--force", "top", check=False)
    assert fuse_mounts_below(paths.root) == []
    wait_gone(pid)


def test_a_hidden_view_is_not_reported_unmounted(
    cli: LayerfsCLI, chain: dict[str, str], paths: StorePaths
) -> None:
    """A view listed in mountinfo that umount answers EINVAL for (another mount over its
    parent hides it) is an error, never a success that leaks the FUSE mount."""
    path = cli.out("mount", "top").strip()
    layer_dir = os.path.dirname(path)
    subprocess.run(["mount", "--bind", layer_dir, layer_dir], check=True)  # hides merged/
    try:
        assert [(v["mountpoint"], v["state"]) for v in ps(cli)] == [(path, "hidden")]
        err = one_line_error(cli.run("mount", "top", check=False))
        assert "hidden" in err  # never hands out a path that shows another file system
        err = one_line_error(cli.run("unmount", "top", check=False))
        assert "hidden" in err
        assert fuse_mounts_below(path) == [path]
        assert recorded(paths)[chain["top"]] == (path, 1)  # the record is kept
    finally:
        subprocess.run(["umount", layer_dir], check=True)
    assert "unmounted" in cli.out("unmount", "top")
    assert fuse_mounts_below(paths.root) == []


# ------------------------------------------------------------------ B7: every pairing


def test_layerfs_custom_mount_then_go_unmount(
    cli: LayerfsCLI, go: GoTool, chain: dict[str, str], paths: StorePaths, tmp_path: Path
) -> None:
    mnt = str(tmp_path / "custom")
    os.mkdir(mnt)
    assert cli.out("mount", "top", mnt).strip() == mnt
    pid = daemon_pid(paths, chain["top"])
    go.run("unmount", chain["top"])  # Go drops the record; its Put only looks at merged/
    assert chain["top"] not in recorded(paths)
    assert sorted(os.listdir(mnt)) == ["b", "d"]
    assert [(v["mountpoint"], v["state"]) for v in ps(cli)] == [(mnt, "untracked")]
    assert cli.run("delete-layer", "top", check=False).returncode == 1  # still refused
    # mounting again adopts the untracked view
    assert cli.out("mount", "top", mnt).strip() == mnt
    assert recorded(paths)[chain["top"]] == (mnt, 1)
    go.run("unmount", chain["top"])
    assert "unmounted" in cli.out("unmount", mnt)  # by mount point
    assert fuse_mounts_below(str(tmp_path)) == []
    wait_gone(pid)
    assert ps(cli) == []


def test_layerfs_default_mount_then_go_unmount(
    cli: LayerfsCLI, go: GoTool, chain: dict[str, str], paths: StorePaths
) -> None:
    path = cli.out("mount", "top").strip()
    pid = daemon_pid(paths, chain["top"])
    go.run("unmount", chain["top"])  # Go's Put detaches merged/: the view ends
    assert fuse_mounts_below(paths.root) == []
    wait_gone(pid)
    assert ps(cli) == [] and cli.out("mounted", "top").strip() == "0"
    assert not os.path.exists(os.path.join(paths.runroot, "layerfs", "daemons", chain["top"]))
    assert cli.out("mount", "top").strip() == path  # and can be mounted again
    assert "unmounted" in cli.out("unmount", "top")


def test_layerfs_custom_mount_then_go_delete_layer(
    cli: LayerfsCLI, go: GoTool, chain: dict[str, str], paths: StorePaths, tmp_path: Path
) -> None:
    mnt = str(tmp_path / "custom")
    os.mkdir(mnt)
    cli.out("mount", "top", mnt)
    pid = daemon_pid(paths, chain["top"])
    go.run("delete-layer", chain["top"])  # Go unmounts its record and removes the layer
    assert chain["top"] not in recorded(paths)
    views = ps(cli)
    assert [(v["id"], v["mountpoint"], v["state"]) for v in views] == [
        (chain["top"], mnt, "untracked")
    ]
    assert "unmounted" in cli.out("unmount", mnt)
    assert fuse_mounts_below(str(tmp_path)) == []
    wait_gone(pid)


def test_layerfs_default_mount_then_go_delete_layer(
    cli: LayerfsCLI, go: GoTool, chain: dict[str, str], paths: StorePaths
) -> None:
    cli.out("mount", "top")
    pid = daemon_pid(paths, chain["top"])
    go.run("delete-layer", chain["top"])
    assert fuse_mounts_below(paths.root) == []
    wait_gone(pid)
    assert ps(cli) == []


def test_go_mount_then_layerfs_unmount_and_delete(
    cli: LayerfsCLI, go: GoTool, chain: dict[str, str], paths: StorePaths
) -> None:
    kernel = go.out("mount", chain["top"]).strip()
    assert os.path.ismount(kernel)
    proc = cli.run("delete-layer", "top", check=False)
    assert proc.returncode == 1 and b"unmount it first" in proc.stderr  # Go's mount counts
    assert "unmounted" in cli.out("unmount", "top")  # the last user: like Go's unmount
    assert not os.path.ismount(kernel) and recorded(paths) == {}
    go.out("mount", chain["top"])
    assert "unmounted" in cli.out("unmount", kernel)  # by mount point
    assert recorded(paths) == {}
    assert cli.out("delete-layer", "top").strip() == chain["top"]


# ------------------------------------------------------------------ B8: options


@pytest.mark.parametrize(
    ("first", "second", "named"),
    [
        ((), ("--for-container",), "nosuid,nodev"),
        (("--for-container",), (), "suid,dev (for a container)"),
        ((), ("--allow-other",), "nosuid,nodev"),
        (("--allow-other",), (), "allow_other"),
    ],
)
def test_a_view_is_not_shared_with_other_options(
    cli: LayerfsCLI,
    chain: dict[str, str],
    paths: StorePaths,
    first: tuple[str, ...],
    second: tuple[str, ...],
    named: str,
) -> None:
    path = cli.out("mount", *first, "top").strip()
    try:
        err = one_line_error(cli.run("mount", *second, "top", check=False))
        assert path in err and named in err and "unmount it first" in err
        assert cli.out("mounted", "top").strip() == "1"
        assert cli.out("mount", *first, "top").strip() == path  # same options: shared
        assert cli.out("mounted", "top").strip() == "2"
        with open("/proc/self/mountinfo") as f:
            opts = next(ln.split()[5] for ln in f if ln.split()[4] == path)
        assert ("nosuid" in opts) == ("--for-container" not in first)
    finally:
        cli.run("unmount", "--force", "top", check=False)


def test_a_container_layer_gets_a_view_go_never_hands_out(
    cli: LayerfsCLI, go: GoTool, chain: dict[str, str], paths: StorePaths
) -> None:
    """A container's writable layer viewed read-only by layerfs (``--ro``) is not recorded
    where Go would reuse it: Go's mount of the container is its own writable overlay, never
    our read-only view."""
    go.run("create-image", "-n", "img", chain["top"])
    ctr = go.out("create-container", "img").split()[0]
    layer = json.loads(go.out("container", "--json", ctr))[0]["layer"]
    view = cli.out("mount", "--ro", layer).strip()
    try:
        assert view == os.path.join(paths.runroot, "layerfs", "views", layer)
        assert sorted(os.listdir(view)) == ["b", "d"]
        assert recorded(paths) == {}  # nothing for Go to reuse
        assert cli.out("mount", "--ro", layer).strip() == view  # layerfs users share it
        assert cli.out("mounted", layer).strip() == "2"
        assert [(v["mountpoint"], v["count"], v["state"]) for v in ps(cli)] == [
            (view, 2, "private")
        ]
        rootfs = go.out("mount", ctr).strip()  # what Go gives the container
        assert rootfs != view
        with open(os.path.join(rootfs, "written"), "w") as f:  # writable, not EROFS
            f.write("ok")
        proc = cli.run("delete-layer", layer, check=False)
        assert proc.returncode == 1 and b"unmount it first" in proc.stderr
        go.run("unmount", ctr)
        assert "still mounted (1)" in cli.out("unmount", layer)
        assert "unmounted" in cli.out("unmount", layer)
        assert fuse_mounts_below(paths.runroot) == [] and not os.path.exists(view)
    finally:
        cli.run("unmount", "--force", layer, check=False)
        go.run("unmount", ctr, check=False)
    go.run("delete-container", ctr)
