"""The kernel does the caching (issue 12), with the patched pyfuse3 that scripts/setup builds.

Request counts are what the kernel sends to the view's FUSE connection (the
``fuse:fuse_request_send`` tracepoint, :mod:`layerfs.fs.fusetrace`), never timings. A
read-only view's lowers are immutable while it is mounted, so the kernel's caches cannot go
stale under it; a changed layer is seen by the next mount (tested: applydiff, then remount).
"""

from __future__ import annotations

import os
import select
import subprocess
import sys
import threading
from collections import Counter
from collections.abc import Iterable, Iterator
from pathlib import Path

import pytest
from kcache_helpers import counted, read_all, walk

from conftest import LayerfsCLI, StorePaths, make_tar, require_root
from fs_helpers import (
    assert_same_tree,
    cleanup_mount,
    kernel_overlay,
    layerfs_mount,
    make_rich_chain,
    require_fuse,
    snapshot,
)
from fs_helpers import store_chain_dirs as _chain_dirs
from layerfs.fs.fdcache import FdCache
from layerfs.fs.ops import pyfuse3_features

pytestmark = [pytest.mark.fuse, pytest.mark.root]


@pytest.fixture
def chain(tmp_path: Path) -> list[str]:
    require_root()
    require_fuse()
    return [str(d) for d in make_rich_chain(tmp_path / "chain")]


def test_patched_pyfuse3_is_installed_and_detected() -> None:
    """scripts/setup builds pyfuse3 with patches/pyfuse3; every feature is found."""
    assert pyfuse3_features().missing == []


def test_the_daemon_logs_which_pyfuse3_it_runs(chain: list[str], tmp_path: Path) -> None:
    with layerfs_mount(chain, tmp_path / "mnt") as m:
        log = Path(m.log).read_text()
    lines = [ln for ln in log.splitlines() if "daemon: pyfuse3 " in ln]
    assert len(lines) == 1, log
    assert "kernel readdir and symlink caches, zero-message open" in lines[0]


def least(runs: Iterable[Counter[str]]) -> Counter[str]:
    """The run with the fewest requests: a ``drop_caches`` by another process on the machine
    can empty the kernel's caches between two runs, never make a run send fewer requests."""
    return min(runs, key=lambda c: sum(c.values()))


def test_warm_walk_and_read_all_send_no_requests(chain: list[str], tmp_path: Path) -> None:
    with layerfs_mount(chain, tmp_path / "mnt") as m:
        cold_walk = counted(m.path, walk)
        warm_walk = least(counted(m.path, walk) for _ in range(3))
        cold_read = counted(m.path, read_all)
        warm_read = least(counted(m.path, read_all) for _ in range(3))
    # the counter sees the cold traffic: listings and symlink targets, file data
    assert cold_walk["READDIRPLUS"] > 0 and cold_walk["READLINK"] > 0, cold_walk
    assert cold_read["READ"] > 0, cold_read
    # zero-message open: not one OPEN/RELEASE/OPENDIR/RELEASEDIR, even cold (pyfuse3 answers
    # the very first OPEN and OPENDIR itself, with ENOSYS, which the kernel then remembers)
    for op in ("OPEN", "RELEASE", "OPENDIR", "RELEASEDIR", "FLUSH"):
        assert cold_walk[op] + cold_read[op] <= 1, (op, cold_walk, cold_read)
    # warm: the kernel answers everything from its caches
    assert sum(warm_walk.values()) == 0, warm_walk
    assert sum(warm_read.values()) == 0, warm_read


def test_cached_answers_are_identical_to_kernel_overlay(chain: list[str], tmp_path: Path) -> None:
    """The whole tree (types, modes, owners, sizes, times, content, symlink targets, rdev,
    xattrs, hard-link groups) read cold and then again from the kernel's caches equals a
    kernel overlay of the same layers."""
    with kernel_overlay(chain, tmp_path / "kernel") as k:
        want = snapshot(k)
    with layerfs_mount(chain, tmp_path / "mnt") as m:
        cold = snapshot(m.path)
        warm = snapshot(m.path)
    assert_same_tree(cold, want, ignore=("ino",))
    assert_same_tree(warm, want, ignore=("ino",))
    assert warm == cold


def test_many_files_read_through_a_small_fd_cache(tmp_path: Path) -> None:
    """More files than the fd cache holds: every read is right; never more fds than the
    limit stay open, and in-use fds are only closed by their last user."""
    paths = []
    for i in range(40):
        p = tmp_path / f"f{i}"
        p.write_bytes(str(i).encode() * (i + 1))
        paths.append(p)
    cache = FdCache(limit=8)
    entries = []
    for i, p in enumerate(paths):
        entries.append(cache.add(i, os.open(p, os.O_RDONLY)))
        assert len(cache) <= 8
    # all 40 are in use (users == 1): the evicted ones are still open and readable
    for i, e in enumerate(entries):
        assert os.pread(e.fd, 100, 0) == str(i).encode() * (i + 1)
    fds = [e.fd for e in entries]
    for e in entries:
        cache.release(e)
    for fd in fds[:32]:  # evicted and released: closed
        with pytest.raises(OSError):
            os.fstat(fd)
    for fd in fds[32:]:  # still cached: open
        os.fstat(fd)
    again = cache.acquire(39)
    assert again is not None and again.fd == fds[39]
    cache.forget(39)
    os.fstat(fds[39])  # forgotten while in use: still open for its user
    cache.release(again)
    with pytest.raises(OSError):
        os.fstat(fds[39])
    dup = cache.add(38, os.open(paths[0], os.O_RDONLY))  # a racing second open of inode 38
    assert dup.fd == fds[38]
    cache.release(dup)
    cache.close_all()
    for fd in fds[32:39]:
        with pytest.raises(OSError):
            os.fstat(fd)


@pytest.fixture
def stalling_layer(tmp_path: Path) -> Iterator[tuple[Path, subprocess.Popen[bytes]]]:
    require_root()
    require_fuse()
    mnt = tmp_path / "stall"
    mnt.mkdir()
    args = [sys.executable, str(Path(__file__).with_name("stall_fs.py")), str(mnt)]
    proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        assert line.strip() == b"READY", proc.stderr.read() if proc.stderr else b""
        yield mnt, proc
    finally:
        cleanup_mount(str(mnt), None)
        proc.kill()
        proc.wait(timeout=10)


def _line(proc: subprocess.Popen[bytes], timeout: float) -> bytes:
    assert proc.stdout is not None
    ready, _, _ = select.select([proc.stdout], [], [], timeout)
    assert ready, f"no output from the stalling layer within {timeout} s"
    return proc.stdout.readline().strip()


def test_metadata_answered_while_a_read_stalls(
    stalling_layer: tuple[Path, subprocess.Popen[bytes]], tmp_path: Path
) -> None:
    """A read blocked on its backing file (a FUSE lower that stalls until told) does not hold
    up stat, listing, xattr or another file's read on the view."""
    lower, proc = stalling_layer
    with layerfs_mount([str(lower)], tmp_path / "mnt") as m:
        mnt = Path(m.path)
        got: list[bytes] = []
        reader = threading.Thread(target=lambda: got.append((mnt / "slow").read_bytes()))
        reader.daemon = True
        reader.start()
        try:
            assert _line(proc, 30) == b"WAITING"  # the view's read reached the stalled layer
            answered: list[object] = []

            def metadata() -> None:
                answered.append(os.stat(mnt / "fast").st_size)
                answered.append(sorted(os.listdir(mnt)))
                answered.append(os.listxattr(mnt / "fast"))
                answered.append((mnt / "fast").read_bytes())

            t = threading.Thread(target=metadata, daemon=True)
            t.start()
            t.join(30)
            assert answered == [10, ["fast", "slow"], [], b"fast data\n"]
            assert reader.is_alive()  # still blocked: the answers did not wait for it
        finally:
            os.setxattr(lower, "user.release", b"1")
            reader.join(30)
        assert got == [b"slow data\n" * 1000]


def test_remount_after_applydiff_shows_the_new_content(
    cli: LayerfsCLI, paths: StorePaths, tmp_path: Path
) -> None:
    """Kernel caches live as long as the mount: a layer changed by applydiff (which pins a new
    digest) is seen by the next mount, cached listing, symlink target and data alike."""
    require_root()
    old = {"d": None, "d/f": b"old\n", "d/keep": b"k"}
    cli.run("import-layer", "--name", "base", input=make_tar(old))
    cli.run("create-layer", "--name", "child", "base")
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    cli.run("mount", "child", str(mnt))
    try:
        assert (mnt / "d" / "f").read_bytes() == b"old\n"
        assert sorted(os.listdir(mnt / "d")) == ["f", "keep"]
    finally:
        cli.run("unmount", str(mnt))
    cli.run("applydiff", "base", input=make_tar({"d/f": b"new and longer\n", "d/g": b"g"}))
    with kernel_overlay(_chain_dirs(paths, "child"), tmp_path / "kernel") as k:
        want = snapshot(k)
    cli.run("mount", "child", str(mnt))
    try:
        got = snapshot(str(mnt))
        again = snapshot(str(mnt))
    finally:
        cli.run("unmount", str(mnt))
    assert got["d/f"]["size"] == len(b"new and longer\n")
    assert "d/g" in got
    assert_same_tree(got, want, ignore=("ino",))
    assert again == got
