"""Mounting views through the CLI: counts, repair of dead daemons, Go interop, safety checks."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import (
    GoTool,
    LayerfsCLI,
    StorePaths,
    import_two_layer_chain,
    process_gone,
    wait_until,
)

pytestmark = [pytest.mark.fuse, pytest.mark.root]


@pytest.fixture
def chain(cli: LayerfsCLI) -> str:
    """base (a, d/x) <- top (b, .wh.a, d/y): returns the top layer's name."""
    import_two_layer_chain(cli)
    return "top"


def _fuse_mounts_below(top: str) -> list[str]:
    with open("/proc/self/mounts") as f:
        return [ln.split()[1] for ln in f if ln.split()[2].startswith("fuse") and top in ln]


def _daemon_pid(paths: StorePaths, layer_id: str) -> int:
    with open(os.path.join(paths.runroot, "layerfs", "daemons", f"{layer_id}.json")) as f:
        return int(json.load(f)["pid"])


def _kill_daemon(paths: StorePaths, layer_id: str) -> None:
    """SIGKILL the view's daemon and wait until it has exited (its FUSE connection is then
    aborted: the view answers ENOTCONN)."""
    pid = _daemon_pid(paths, layer_id)
    os.kill(pid, signal.SIGKILL)
    wait_until(lambda: process_gone(pid), f"SIGKILLed daemon {pid} has exited")


def test_mount_counts_and_unmount_at_zero(cli: LayerfsCLI, chain: str, paths: StorePaths) -> None:
    path = cli.out("mount", chain).strip()
    try:
        assert sorted(os.listdir(path)) == ["b", "d"]
        assert sorted(os.listdir(os.path.join(path, "d"))) == ["x", "y"]
        assert cli.out("mount", chain).strip() == path
        assert cli.out("mounted", chain).strip() == "2"
        views = json.loads(cli.out("ps", "--json"))
        assert len(views) == 1 and views[0]["count"] == 2 and views[0]["mountpoint"] == path
        pid = views[0]["pid"]
        record = json.load(open(os.path.join(paths.runroot, "overlay-layers", "mountpoints.json")))
        assert record == [{"id": views[0]["id"], "path": path, "count": 2}]
        assert "still mounted (1)" in cli.out("unmount", chain)
        assert os.path.ismount(path)
        assert "unmounted" in cli.out("unmount", path)  # by mount point
        assert not _fuse_mounts_below(paths.root)
        wait_until(lambda: process_gone(pid), f"daemon {pid} has exited after unmount")
        assert cli.out("mounted", chain).strip() == "0"
    finally:
        cli.run("unmount", "--force", chain, check=False)


def test_writes_are_refused_with_erofs(cli: LayerfsCLI, chain: str) -> None:
    path = cli.out("mount", chain).strip()
    try:
        with pytest.raises(OSError) as err:
            open(os.path.join(path, "new"), "w")
        assert err.value.errno == 30  # EROFS
    finally:
        cli.run("unmount", chain)


def test_kill_9_is_detected_and_repaired(cli: LayerfsCLI, chain: str, paths: StorePaths) -> None:
    path = cli.out("mount", chain).strip()
    layer_id = json.loads(cli.out("layer", "--json", chain))[0]["id"]
    _kill_daemon(paths, layer_id)
    with pytest.raises(OSError) as err:
        os.listdir(path)
    assert err.value.errno == 107  # ENOTCONN: transport endpoint is not connected
    assert cli.out("mounted", chain).strip() == "0"  # detected and repaired
    assert not _fuse_mounts_below(paths.root)
    again = cli.out("mount", chain).strip()
    try:
        assert sorted(os.listdir(again)) == ["b", "d"]
        _kill_daemon(paths, layer_id)
        again2 = cli.out("mount", chain).strip()  # mount itself repairs too
        assert sorted(os.listdir(again2)) == ["b", "d"]
        assert cli.out("mounted", chain).strip() == "1"
    finally:
        cli.run("unmount", "--force", chain, check=False)
    assert not _fuse_mounts_below(paths.root)


def test_stale_counts_after_a_reboot_are_reset(cli: LayerfsCLI, chain: str) -> None:
    layer_id = json.loads(cli.out("layer", "--json", chain))[0]["id"]
    mp = os.path.join(cli.paths.runroot, "overlay-layers", "mountpoints.json")
    with open(mp, "w") as f:
        json.dump([{"id": layer_id, "path": "/nonexistent/merged", "count": 3}], f)
    assert cli.out("mounted", chain).strip() == "0"
    path = cli.out("mount", chain).strip()
    try:
        assert cli.out("mounted", chain).strip() == "1" and os.path.ismount(path)
    finally:
        cli.run("unmount", chain)


def test_concurrent_mounts_start_one_daemon(cli: LayerfsCLI, chain: str, paths: StorePaths) -> None:
    procs = [subprocess.Popen(cli.argv("mount", chain), stdout=subprocess.PIPE) for _ in range(4)]
    outs = [p.communicate(timeout=120)[0].decode().strip() for p in procs]
    try:
        assert all(p.returncode == 0 for p in procs)
        assert len(set(outs)) == 1
        assert cli.out("mounted", chain).strip() == "4"
        assert len(_fuse_mounts_below(paths.root)) == 1
        layer_id = json.loads(cli.out("layer", "--json", chain))[0]["id"]
        pid = _daemon_pid(paths, layer_id)
        daemons = subprocess.run(
            ["pgrep", "-f", f"layerfs.fs.daemon {outs[0]}"], capture_output=True, text=True
        ).stdout.split()
        assert daemons == [str(pid)]
    finally:
        cli.run("unmount", "--force", chain, check=False)


def test_go_and_layerfs_share_mount_counts(go: GoTool, cli: LayerfsCLI, chain: str) -> None:
    path = cli.out("mount", chain).strip()
    try:
        layer_id = json.loads(cli.out("layer", "--json", chain))[0]["id"]
        assert go.out("mount", layer_id).strip() == path  # live mount: Go only counts
        assert cli.out("mounted", chain).strip() == "2"
        go.run("unmount", layer_id)
        assert cli.out("mounted", chain).strip() == "1" and os.path.ismount(path)
    finally:
        cli.run("unmount", "--force", chain, check=False)
    base_id = json.loads(cli.out("layer", "--json", "base"))[0]["id"]
    kernel = go.out("mount", base_id).strip()  # a kernel overlay made by Go
    try:
        assert cli.out("mount", "base").strip() == kernel
        assert cli.out("mounted", "base").strip() == "2"
        assert "still mounted" in cli.out("unmount", "base")
    finally:
        go.run("unmount", base_id)
    assert not os.path.ismount(kernel)


def test_mounted_layers_cannot_be_deleted(cli: LayerfsCLI, chain: str) -> None:
    cli.out("mount", chain)
    try:
        proc = cli.run("delete-layer", chain, check=False)
        assert proc.returncode == 1 and b"unmount it first" in proc.stderr
    finally:
        cli.run("unmount", chain)
    cli.run("delete-layer", chain)


def test_bad_mount_points_are_refused(cli: LayerfsCLI, chain: str, paths: StorePaths) -> None:
    base_id = json.loads(cli.out("layer", "--json", "base"))[0]["id"]
    inside = os.path.join(paths.root, "overlay", base_id, "diff", "d")
    proc = cli.run("mount", chain, inside, check=False)
    assert proc.returncode == 1 and b"inside layer directory" in proc.stderr
    proc = cli.run("mount", chain, "/proc", check=False)
    assert proc.returncode == 1 and b"already a mount point" in proc.stderr
    assert cli.out("mounted", chain).strip() == "0"


def test_sigterm_unmounts_cleanly(cli: LayerfsCLI, chain: str, paths: StorePaths) -> None:
    path = cli.out("mount", chain).strip()
    layer_id = json.loads(cli.out("layer", "--json", chain))[0]["id"]
    pid = _daemon_pid(paths, layer_id)
    os.kill(pid, signal.SIGTERM)
    wait_until(lambda: not os.path.ismount(path), f"SIGTERM made daemon {pid} unmount {path}")
    assert cli.out("mounted", chain).strip() == "0"


def test_which_ls_cat_without_mounting(cli: LayerfsCLI, chain: str) -> None:
    base_id = json.loads(cli.out("layer", "--json", "base"))[0]["id"]
    top_id = json.loads(cli.out("layer", "--json", "top"))[0]["id"]
    assert cli.run("cat", chain, "/d/x").stdout == b"X"
    listing = json.loads(cli.out("ls", "--json", chain, "/"))
    assert [e["name"] for e in listing] == ["b", "d"]
    which_a = json.loads(cli.run("which", "--json", chain, "/a", check=False).stdout)
    assert which_a["visible"] is False and which_a["whiteout"] == top_id
    assert which_a["shadowed"] == [base_id]
    which_d = json.loads(cli.out("which", "--json", chain, "/d"))
    assert which_d["layer"] == top_id and which_d["merged"] == [top_id, base_id]
    assert cli.run("cat", chain, "/a", check=False).returncode == 1


def test_mount_point_xattr_names_the_layer(cli: LayerfsCLI, chain: str) -> None:
    path = cli.out("mount", chain).strip()
    try:
        base_id = json.loads(cli.out("layer", "--json", "base"))[0]["id"]
        assert os.getxattr(os.path.join(path, "d", "x"), "user.layerfs.layer") == base_id.encode()
        assert "user.layerfs.layer" not in os.listxattr(os.path.join(path, "d", "x"))
    finally:
        cli.run("unmount", chain)


def test_python_api_imports_cleanly_in_a_subprocess() -> None:
    proc = subprocess.run([sys.executable, "-c", "import layerfs; print(layerfs.Store)"])
    assert proc.returncode == 0
    assert Path(layerfs_file()).exists()


def layerfs_file() -> str:
    import layerfs

    return layerfs.__file__


def test_a_dead_view_does_not_block_delete(cli: LayerfsCLI, chain: str, paths: StorePaths) -> None:
    cli.out("mount", chain)
    layer_id = json.loads(cli.out("layer", "--json", chain))[0]["id"]
    _kill_daemon(paths, layer_id)
    assert cli.out("delete-layer", chain).strip() == layer_id
    assert not _fuse_mounts_below(paths.root)
    assert not os.path.exists(os.path.join(paths.root, "overlay", layer_id))
