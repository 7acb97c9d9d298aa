"""Real mounts of the layerfs daemon, compared with kernel overlayfs and fuse-overlayfs."""

from __future__ import annotations

import errno
import os
import shutil
import signal
import tempfile
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings

from conftest import process_gone, wait_until
from fs_helpers import (
    Layer,
    assert_same_tree,
    build_random_layer,
    chains,
    cleanup_mount,
    fuse_overlayfs,
    kernel_overlay,
    layerfs_mount,
    make_rich_chain,
    require_fuse,
    snapshot,
)
from layerfs.errors import MountError
from layerfs.fs.index import LayerPin
from layerfs.fs.mount import (
    daemon_pid_alive,
    detach,
    is_dead_fuse_mount,
    is_mountpoint,
    mountinfo,
    spawn_daemon,
    unmount,
)

pytestmark = [pytest.mark.fuse, pytest.mark.root]

IDS = ["layer-top", "layer-mid", "layer-base"]


@pytest.fixture(autouse=True)
def _fuse() -> None:
    require_fuse()


def mountinfo_line(path: str) -> str:
    with open("/proc/self/mountinfo") as f:
        return next(x for x in f if f" {path} " in x)


def ino_map(snap: dict[str, dict[str, object]]) -> dict[str, object]:
    return {p: r["ino"] for p, r in snap.items()}


def test_view_matches_kernel(tmp_path: Path) -> None:
    dirs = make_rich_chain(tmp_path)
    with layerfs_mount(dirs, tmp_path / "m", layer_ids=IDS) as m:
        got = snapshot(m.path)
        with kernel_overlay(dirs, tmp_path / "k") as k:
            want = snapshot(k)
    assert_same_tree(got, want, ignore=("ino",))
    assert got[""]["ino"] == 1


@pytest.mark.parametrize(("wh", "opq"), [("file", "file"), ("file", "user"), ("char", "user")])
def test_other_forms(tmp_path: Path, wh: str, opq: str) -> None:
    """In an aufs-format store (a mount program), the .wh. and user.overlay forms give the view
    the kernel gives for the kernel form, and agree with fuse-overlayfs (except nlink, which
    fuse-overlayfs counts itself). A kernel-format store reads them as ordinary files and
    xattrs (tests/test_whiteout_formats.py)."""
    dirs = make_rich_chain(tmp_path / "x", wh, opq)
    kdirs = make_rich_chain(tmp_path / "kform", "char", "trusted")
    with layerfs_mount(dirs, tmp_path / "m", layer_ids=IDS, whiteout_format="aufs") as m:
        got = snapshot(m.path)
    with kernel_overlay(kdirs, tmp_path / "k") as k:
        want = snapshot(k)
    assert_same_tree(got, want, ignore=("ino",))
    if wh == "file" or opq != "trusted":
        with fuse_overlayfs(dirs, tmp_path / "fo") as fo:
            fov = snapshot(fo)
        # fuse-overlayfs counts nlink itself (dirs: subdirs; hard links: the names it has seen,
        # its issue #435); nlink is checked against the kernel above
        assert_same_tree(got, fov, ignore=("ino", "nlink"))


def test_big_directory_and_offsets(tmp_path: Path) -> None:
    low = Layer(tmp_path / "low")
    up = Layer(tmp_path / "up")
    for i in range(3000):
        low.file(f"d/f{i:05d}", b"x")
    for i in range(0, 3000, 3):
        up.whiteout(f"d/f{i:05d}")
    for i in range(1000):
        up.file(f"d/g{i:05d}-{'n' * 100}", b"y")
    dirs = [str(up.finish()), str(low.finish())]
    with layerfs_mount(dirs, tmp_path / "m") as m:
        got = sorted(os.listdir(os.path.join(m.path, "d")))
        with os.scandir(os.path.join(m.path, "d")) as it:
            first = [e.name for e in it]
        with kernel_overlay(dirs, tmp_path / "k") as k:
            want = sorted(os.listdir(os.path.join(k, "d")))
    assert got == want and len(got) == 3000
    assert first == sorted(first)  # served in name order


def test_inodes_stable_across_remount(tmp_path: Path) -> None:
    dirs = make_rich_chain(tmp_path)
    # pinned layers (a recorded diff digest) keep their index files
    pins = [
        LayerPin(f"id{i}", "sha256:" + "1" * 64, None, str(tmp_path / f"index{i}"))
        for i in range(len(dirs))
    ]
    with layerfs_mount(dirs, tmp_path / "m", layer_ids=IDS, pins=pins) as m:
        first = ino_map(snapshot(m.path))
        assert "built" in Path(m.log).read_text()
    assert all(Path(p.index_path).exists() for p in pins if p.index_path)
    with layerfs_mount(dirs, tmp_path / "m", layer_ids=IDS, pins=pins) as m:
        warm = ino_map(snapshot(m.path))
        assert "index loaded" in Path(m.log).read_text()
    with layerfs_mount(dirs, tmp_path / "m") as m:
        cold = ino_map(snapshot(m.path))
    assert first == warm == cold
    non_dir = [v for p, v in first.items() if p not in ("bin/link-c", "bin/l1-b")]
    assert len(set(non_dir)) == len(non_dir)


def test_layer_xattr_and_xattrs(tmp_path: Path) -> None:
    dirs = make_rich_chain(tmp_path)
    with layerfs_mount(dirs, tmp_path / "m", layer_ids=IDS) as m:
        p = m.path
        assert os.getxattr(f"{p}/etc/hosts", "user.layerfs.layer") == b"layer-mid"
        assert os.getxattr(f"{p}/etc", "user.layerfs.layer") == b"layer-top"
        assert os.getxattr(f"{p}/bin/sh", "user.layerfs.layer") == b"layer-base"
        # the VFS answers user.* xattrs of symlinks and devices itself (ENODATA), never asking us
        with pytest.raises(OSError):
            os.getxattr(f"{p}/lnk", "user.layerfs.layer", follow_symlinks=False)
        for path in (f"{p}/etc/hosts", f"{p}/xa", p):
            assert not any(n.startswith("user.layerfs") for n in os.listxattr(path))
        # kernel format: user.overlay.* is an ordinary xattr (the kernel lists it too)
        assert sorted(os.listxattr(f"{p}/xa")) == ["trusted.t", "user.foo", "user.overlay.junk"]
        with pytest.raises(OSError) as ei:
            os.getxattr(f"{p}/xa", "trusted.overlay.junk")
        assert ei.value.errno == errno.ENODATA
        with pytest.raises(OSError) as ei:
            os.getxattr(f"{p}/opq", "trusted.overlay.opaque")
        assert ei.value.errno == errno.ENODATA
        with open(f"{p}/lnk", "rb") as f:  # symlink followed inside the view
            assert f.read() == b"root:x:0:0\n"


def test_writes_give_erofs(tmp_path: Path) -> None:
    dirs = make_rich_chain(tmp_path)
    with layerfs_mount(dirs, tmp_path / "m") as m:
        p = m.path
        attempts = [
            lambda: os.open(f"{p}/etc/passwd", os.O_WRONLY),
            lambda: os.open(f"{p}/etc/passwd", os.O_RDWR),
            lambda: os.open(f"{p}/newfile", os.O_CREAT | os.O_WRONLY, 0o644),
            lambda: os.mkdir(f"{p}/newdir"),
            lambda: os.unlink(f"{p}/top-only"),
            lambda: os.rmdir(f"{p}/emptydir"),
            lambda: os.rename(f"{p}/top-only", f"{p}/renamed"),
            lambda: os.chmod(f"{p}/top-only", 0o777),
            lambda: os.truncate(f"{p}/top-only", 0),
            lambda: os.symlink("x", f"{p}/sl"),
            lambda: os.link(f"{p}/top-only", f"{p}/hl"),
            lambda: os.setxattr(f"{p}/top-only", "user.x", b"1"),
            lambda: os.removexattr(f"{p}/xa", "user.foo"),
            lambda: os.utime(f"{p}/top-only"),
        ]
        for i, attempt in enumerate(attempts):
            with pytest.raises(OSError) as ei:
                attempt()
            assert ei.value.errno == errno.EROFS, (i, ei.value)
        sv = os.statvfs(p)
        assert sv.f_flag & os.ST_RDONLY
        assert sv.f_namemax == os.statvfs(dirs[0]).f_namemax
        assert sv.f_blocks == os.statvfs(dirs[0]).f_blocks


def test_mount_options(tmp_path: Path) -> None:
    dirs = make_rich_chain(tmp_path)
    with layerfs_mount(dirs, tmp_path / "m") as m:
        line = mountinfo_line(m.path)
        opts = line.split()[5].split(",")
        assert {"ro", "nosuid", "nodev", "noatime"} <= set(opts)
        assert [t for p, t, _ in mountinfo() if p == m.path] == ["fuse.layerfs"]
        assert "default_permissions" in line
    with layerfs_mount(dirs, tmp_path / "c", for_container=True, allow_other=True) as m:
        line = mountinfo_line(m.path)
        opts = line.split()[5].split(",")
        assert "nosuid" not in opts and "nodev" not in opts
        assert "allow_other" in line and "default_permissions" in line
        st = os.stat(f"{m.path}/bin/su")
        assert st.st_mode & 0o4000


def test_large_file_read(tmp_path: Path) -> None:
    dirs = make_rich_chain(tmp_path)
    with layerfs_mount(dirs, tmp_path / "m") as m:
        with open(f"{m.path}/big", "rb") as f, open(f"{dirs[2]}/big", "rb") as g:
            assert f.read() == g.read()
        with open(f"{m.path}/big", "rb") as f:
            f.seek(1_000_000)
            assert f.read(10) == Path(dirs[2], "big").read_bytes()[1_000_000:1_000_010]


def test_kill9_leaves_dead_mount_that_detach_cleans(tmp_path: Path) -> None:
    dirs = make_rich_chain(tmp_path)
    mnt = tmp_path / "m"
    mnt.mkdir()
    pid = spawn_daemon(dirs, [], str(mnt), index_path=None, log_path=str(tmp_path / "log"))
    try:
        assert daemon_pid_alive(pid) and is_mountpoint(str(mnt))
        assert not is_dead_fuse_mount(str(mnt))
        os.kill(pid, signal.SIGKILL)
        wait_until(lambda: process_gone(pid), f"SIGKILLed daemon {pid} has exited", 10)
        assert is_mountpoint(str(mnt))
        assert is_dead_fuse_mount(str(mnt))
        assert detach(str(mnt))
        assert not is_mountpoint(str(mnt))
        assert not is_dead_fuse_mount(str(mnt))
        assert not detach(str(mnt))  # nothing left to detach
    finally:
        cleanup_mount(str(mnt), pid)


def test_sigterm_unmounts_cleanly(tmp_path: Path) -> None:
    dirs = make_rich_chain(tmp_path)
    mnt = tmp_path / "m"
    mnt.mkdir()
    log = tmp_path / "log"
    pid = spawn_daemon(dirs, [], str(mnt), index_path=None, log_path=str(log))
    try:
        os.kill(pid, signal.SIGTERM)
        wait_until(lambda: process_gone(pid), f"daemon {pid} has exited on SIGTERM", 10)
        assert not is_mountpoint(str(mnt))
        assert "unmounted" in log.read_text()
    finally:
        cleanup_mount(str(mnt), pid)


def test_unmount_waits_for_daemon(tmp_path: Path) -> None:
    dirs = make_rich_chain(tmp_path)
    mnt = tmp_path / "m"
    mnt.mkdir()
    pid = spawn_daemon(dirs, [], str(mnt), index_path=None, log_path=str(tmp_path / "log"))
    try:
        with open(mnt / "etc/passwd", "rb"):
            with pytest.raises(MountError, match="busy"):
                unmount(str(mnt), pid)
            assert is_mountpoint(str(mnt))
        unmount(str(mnt), pid)
        assert not is_mountpoint(str(mnt)) and not daemon_pid_alive(pid)
    finally:
        cleanup_mount(str(mnt), pid)


def test_spawn_failure_reports_error(tmp_path: Path) -> None:
    dirs = make_rich_chain(tmp_path)
    with pytest.raises(MountError, match="mounting"):
        spawn_daemon(
            dirs, [], str(tmp_path / "no-such-dir"), index_path=None, log_path=str(tmp_path / "log")
        )
    with pytest.raises(MountError, match=r"cannot read layer .*missing-layer"):
        spawn_daemon(
            [str(tmp_path / "missing-layer")],
            [],
            str(tmp_path),
            index_path=None,
            log_path=str(tmp_path / "log2"),
        )
    with pytest.raises(MountError, match="layer ids"):
        spawn_daemon(dirs, ["one"], str(tmp_path), index_path=None, log_path=str(tmp_path / "log3"))
    assert not is_mountpoint(str(tmp_path))


@settings(max_examples=12, deadline=None, suppress_health_check=list(HealthCheck))
@given(chains)
def test_random_chains_fuse_matches_kernel(layers: list[list[tuple[list[str], str]]]) -> None:
    base = Path(tempfile.mkdtemp(prefix="lfs-fprop-"))
    try:
        dirs = [build_random_layer(base / f"l{i}", ops, i) for i, ops in enumerate(layers)]
        chain = list(reversed(dirs))
        with layerfs_mount(chain, base / "m") as m:
            got = snapshot(m.path)
        with kernel_overlay(chain, base / "k") as k:
            want = snapshot(k)
        assert_same_tree(got, want, ignore=("ino",))
    finally:
        shutil.rmtree(base, ignore_errors=True)
