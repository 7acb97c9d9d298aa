"""Final attacks on the read-write view, each compared with the kernel overlay."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
from collections.abc import Iterator
from pathlib import Path

from test_rw_attack import REMOUNT_DIR_NLINK_AFTER_GROUP_COPY_UP
from test_rw_posix import HIDDEN, Pair, _read, _write, finish, kernel_ro, layerfs_rw, mounted_pair

from conftest import GoTool, LayerfsCLI, wait_until
from fs_helpers import cleanup_mount, snapshot
from layerfs.procfs import pid_stopped

CAP = bytes.fromhex("0100000200040000000000000000000000000000")


def _as_user(cwd: str, cmd: str) -> int:
    """Run *cmd* as uid 1000 in *cwd* (entered as root: the test's tmp dirs are private)."""
    return subprocess.run(
        ["setpriv", "--reuid", "1000", "--regid", "1000", "--clear-groups", "sh", "-c", cmd],
        cwd=cwd,
        capture_output=True,
    ).returncode


@contextlib.contextmanager
def _rewriting(path: str, source: str, blocks: int) -> Iterator[None]:
    """A shell loop rewriting *path* from *source* with dd (64 KiB blocks) for the duration;
    entered once the first write has reached the file."""
    loop = f"while :; do dd if={source} of='{path}' bs=64k count={blocks} 2>/dev/null; done"
    writer = subprocess.Popen(["sh", "-c", loop])
    try:
        wait_until(lambda: os.path.exists(path) and os.path.getsize(path) > 0, f"{path} is written")
        yield
    finally:
        writer.kill()
        writer.wait(timeout=10)


def _stop(pid: int) -> None:
    """SIGSTOP *pid* and wait until the kernel shows it stopped."""
    os.kill(pid, signal.SIGSTOP)
    wait_until(lambda: pid_stopped(pid), f"process {pid} is stopped")


def test_capability_memo_cleared_by_setxattr_then_write(tmp_path: Path) -> None:
    with mounted_pair(tmp_path) as pair:
        pair.run(lambda r: os.chmod(f"{r}/f1", 0o666))
        pair.run(lambda r: os.getxattr(f"{r}/f1", "security.capability"))  # absent: memo set
        pair.run(
            lambda r: (
                subprocess.run(
                    ["setfattr", "-n", "security.capability", "-v", "0x" + CAP.hex(), f"{r}/f1"]
                ).returncode
            )
        )
        pair.run(lambda r: os.getxattr(f"{r}/f1", "security.capability"))
        assert pair.run(lambda r: _as_user(r, "printf more >> f1")) == ("ok", 0)
        pair.run(lambda r: os.getxattr(f"{r}/f1", "security.capability"))
        pair.run(lambda r: sorted(os.listxattr(f"{r}/f1")))
        pair.run(lambda r: _read(f"{r}/f1"))
        # set again, remove, get; then write as root and as user
        pair.run(lambda r: os.setxattr(f"{r}/f2", "security.capability", CAP))
        pair.run(lambda r: os.removexattr(f"{r}/f2", "security.capability"))
        pair.run(lambda r: os.getxattr(f"{r}/f2", "security.capability"))
        pair.run(lambda r: os.setxattr(f"{r}/f2", "security.capability", CAP))
        pair.run(lambda r: os.getxattr(f"{r}/f2", "security.capability"))
        pair.run(lambda r: _write(f"{r}/f2", b"root", os.O_WRONLY | os.O_APPEND))
        pair.run(lambda r: os.getxattr(f"{r}/f2", "security.capability"))
        # the lower cap file: get, write as user, get
        pair.run(lambda r: os.chmod(f"{r}/cap", 0o666))
        pair.run(lambda r: os.getxattr(f"{r}/cap", "security.capability"))
        assert pair.run(lambda r: _as_user(r, "printf x >> cap")) == ("ok", 0)
        pair.run(lambda r: os.getxattr(f"{r}/cap", "security.capability"))
        pair.run(lambda r: os.setxattr(f"{r}/cap", "security.capability", CAP))
        assert pair.run(lambda r: _as_user(r, "truncate -s 1 cap")) == ("ok", 0)
        pair.run(lambda r: os.getxattr(f"{r}/cap", "security.capability"))
        finish(pair)


def test_written_data_visible_to_other_process_and_after_remount(tmp_path: Path) -> None:
    payload = os.urandom(300_000)
    with mounted_pair(tmp_path) as pair:

        def w(r: str) -> int:
            with open(f"{r}/new", "wb") as f:
                f.write(payload)
            with open(f"{r}/f1", "r+b") as f:
                f.seek(2)
                f.write(b"XY")
            return 0

        pair.run(w)
        pair.run(
            lambda r: subprocess.run(["cat", f"{r}/new"], capture_output=True).stdout == payload
        )
        pair.run(lambda r: subprocess.run(["cat", f"{r}/f1"], capture_output=True).stdout)
        # layerfs unmount + remount on the same upper
        d = pair.dirs["l"]
        cleanup_mount(pair.l, None)
        with layerfs_rw([d["lower"]], d["upper"], d["work"], Path(pair.l)):
            assert _read(f"{pair.l}/new") == payload
            assert _read(f"{pair.l}/f1") == _read(f"{pair.k}/f1")
            assert _read(f"{pair.l}/f1") == b"onXY"
        with open(f"{d['upper']}/new", "rb") as f:
            assert f.read() == payload
        with layerfs_rw([d["lower"]], d["upper"], d["work"], Path(pair.l)):
            finish(pair)


def test_stopped_daemon_lazy_umount_then_kill(tmp_path: Path) -> None:
    pair = Pair(tmp_path)
    d = pair.dirs["l"]
    with layerfs_rw([d["lower"]], d["upper"], d["work"], Path(pair.l)) as pid:
        _write(f"{pair.l}/before", b"b" * 10000)
        with _rewriting(f"{pair.l}/mid", "/dev/zero", 16):
            try:
                _stop(pid)
                r = subprocess.run(["timeout", "10", "umount", "-l", pair.l], capture_output=True)
                assert r.returncode == 0, r.stderr
                r = subprocess.run(
                    ["timeout", "10", "grep", "-c", pair.l, "/proc/self/mountinfo"],
                    capture_output=True,
                )
                assert r.stdout.strip() == b"0"
            finally:
                os.kill(pid, signal.SIGKILL)
                os.kill(pid, signal.SIGCONT)
    with kernel_ro([d["upper"], d["lower"]], tmp_path / "again") as m:
        snap = snapshot(m, HIDDEN)
        assert _read(f"{m}/before") == b"b" * 10000
        assert "f1" in snap and "d/a" in snap
        if os.path.exists(f"{m}/mid"):
            assert len(_read(f"{m}/mid")) <= 16 * 65536


def test_stopped_mount_program_ps_and_lazy_umount_do_not_hang(
    tmp_path: Path, cli: LayerfsCLI
) -> None:
    import sys

    from test_mountprog import _store

    from fs_helpers import require_fuse
    from layerfs.fs.mount import find_mount_process, is_mountpoint

    require_fuse()
    prog = os.path.join(os.path.dirname(sys.executable), "layerfs-overlay")
    s = _store(tmp_path)
    m = s["merged"]
    opts = f"lowerdir={s['lower']},upperdir={s['upper']},workdir={s['work']}"
    r = subprocess.run([prog, "-o", opts, m], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    pid = find_mount_process(m, b"layerfs-overlay")
    assert pid is not None
    data = os.urandom(1 << 20)
    with open(f"{m}/etc/os", "ab") as f:
        f.write(data)
    with contextlib.ExitStack() as running:
        running.enter_context(_rewriting(f"{m}/etc/mid", "/dev/urandom", 8))
        running.callback(os.kill, pid, signal.SIGCONT)  # callbacks run last first: KILL, CONT
        running.callback(os.kill, pid, signal.SIGKILL)
        _stop(pid)
        ps = subprocess.run(["timeout", "20", *cli.argv("ps")], capture_output=True)
        assert ps.returncode != 124, "layerfs ps hung on a stopped daemon"
        r2 = subprocess.run(["timeout", "10", "umount", "-l", m], capture_output=True)
        assert r2.returncode == 0, r2.stderr
        assert not is_mountpoint(m)
    lowers = [os.path.realpath(d) for d in s["lower"].split(":")]
    with kernel_ro([s["upper"], *lowers], tmp_path / "k") as k:
        assert _read(f"{k}/etc/os") == b"top\n" + data
        assert not os.path.lexists(f"{k}/bin/sh")
        assert _read(f"{k}/etc/new") == b"n"
        if os.path.exists(f"{k}/etc/mid"):
            assert len(_read(f"{k}/etc/mid")) <= 8 * 65536


def test_go_child_layer_written_beside_a_live_view(cli: LayerfsCLI, go: GoTool) -> None:
    """With a layerfs view of ``top`` live, Go creates a child layer, mounts it (kernel
    overlay over top's diff), writes through it and unmounts: the view and Go agree."""
    import json

    from conftest import import_two_layer_chain

    top = import_two_layer_chain(cli)["top"]
    path = cli.out("mount", "top").strip()
    try:
        child = go.out("create-layer", top).split()[-1].strip()
        km = go.out("mount", child).strip()
        assert sorted(os.listdir(km)) == ["b", "d"]
        _write(f"{km}/c", b"child")
        os.unlink(f"{km}/b")
        go.run("unmount", child)
        assert sorted(os.listdir(path)) == ["b", "d"]
        assert _read(f"{path}/b") == b"B"
        km = go.out("mount", child).strip()
        assert sorted(os.listdir(km)) == ["c", "d"]
        go.run("unmount", child)
        views = json.loads(cli.out("ps", "--json"))
        assert [(v["id"], v["state"]) for v in views] == [(top, "live")]
        go.run("delete-layer", child)
        assert "unmounted" in cli.out("unmount", "top")
    finally:
        cli.run("unmount", "--force", "top", check=False)


def test_capability_memo_across_hard_links_and_rename(tmp_path: Path) -> None:
    with mounted_pair(tmp_path) as pair:
        pair.run(lambda r: os.chmod(f"{r}/h1", 0o666))
        pair.run(lambda r: os.getxattr(f"{r}/h1", "security.capability"))
        pair.run(lambda r: os.getxattr(f"{r}/d/h3", "security.capability"))
        pair.run(lambda r: os.setxattr(f"{r}/h2", "security.capability", CAP))
        pair.run(lambda r: os.getxattr(f"{r}/h1", "security.capability"))
        assert pair.run(lambda r: _as_user(r, "printf z >> h1")) == ("ok", 0)
        names = ("h1", "h2", "d/h3")
        pair.run(lambda r: [os.getxattr(f"{r}/{n}", "security.capability") for n in names])
        pair.run(lambda r: os.getxattr(f"{r}/f3", "security.capability"))
        pair.run(lambda r: os.rename(f"{r}/f3", f"{r}/f3r"))
        pair.run(lambda r: os.setxattr(f"{r}/f3r", "security.capability", CAP))
        pair.run(lambda r: os.chmod(f"{r}/f3r", 0o666))
        pair.run(lambda r: os.getxattr(f"{r}/f3r", "security.capability"))
        assert pair.run(lambda r: _as_user(r, "printf z >> f3r")) == ("ok", 0)
        pair.run(lambda r: os.getxattr(f"{r}/f3r", "security.capability"))
        pair.run(lambda r: (_read(f"{r}/h2"), _read(f"{r}/f3r")))
        # (the group copy-up made upper d/: kernel remount shows nlink 1, documented)
        finish(pair, remount_dir_nlink=REMOUNT_DIR_NLINK_AFTER_GROUP_COPY_UP)


def test_mmap_write_then_other_process_and_remount(tmp_path: Path) -> None:
    import mmap

    with mounted_pair(tmp_path) as pair:

        def mw(r: str) -> int:
            fd = os.open(f"{r}/big", os.O_RDWR)
            try:
                with mmap.mmap(fd, 8192) as mm:
                    mm[100:104] = b"MMAP"
            finally:
                os.close(fd)
            return 0

        pair.run(mw)
        pair.run(
            lambda r: subprocess.run(["head", "-c", "110", f"{r}/big"], capture_output=True).stdout
        )
        d = pair.dirs["l"]
        cleanup_mount(pair.l, None)
        with open(f"{d['upper']}/big", "rb") as f:
            assert f.read(110)[100:104] == b"MMAP"
        with layerfs_rw([d["lower"]], d["upper"], d["work"], Path(pair.l)):
            finish(pair)
