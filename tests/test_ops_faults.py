"""No request handler can end the daemon: failures become errnos, logged once with the path.

Also: reads that run in worker threads while metadata is answered inline return the right data
when listings and reads interleave."""

from __future__ import annotations

import errno
import hashlib
import logging
import os
import threading
from pathlib import Path

import pyfuse3
import pytest
import trio

from fs_helpers import Layer, layerfs_mount
from layerfs.fs.index import build_index
from layerfs.fs.mount import daemon_pid_alive
from layerfs.fs.ops import UnionOperations

pytestmark = [pytest.mark.fuse, pytest.mark.root]


def _chain(tmp_path: Path) -> tuple[Path, Path]:
    top = Layer(tmp_path / "top")
    top.dir("d").file("d/x", b"x from top").file("b", b"b from top")
    top.file("a", b"a from top", xattrs={"user.tag": b"A"})
    bottom = Layer(tmp_path / "bottom")
    bottom.dir("d").file("d/y", b"y from bottom").file("keep", b"kept\n" * 1000)
    return top.finish(), bottom.finish()


def _errno_of(fn, *args) -> int:  # type: ignore[no-untyped-def]
    with pytest.raises(OSError) as info:
        fn(*args)
    return info.value.errno or 0


def test_vanished_leaf_layer_gives_errnos_and_the_daemon_stays(tmp_path: Path) -> None:
    top, bottom = _chain(tmp_path)
    with layerfs_mount([str(top), str(bottom)], tmp_path / "mnt") as m:
        mnt = Path(m.path)
        opened = os.open(mnt / "a", os.O_RDONLY)  # opened, never read: no data cached
        try:
            assert os.statvfs(mnt).f_namemax > 0
            os.rename(top, tmp_path / "top.gone")  # what the Go tool's delete-layer amounts to

            for _ in range(2):  # the second time must not log again
                assert _errno_of(os.statvfs, mnt) in (errno.ENOENT, errno.EIO)
                assert _errno_of(os.pread, opened, 100, 0) in (errno.ENOENT, errno.EIO)
            fd = os.open(mnt / "b", os.O_RDONLY)  # a new open of a file of the vanished layer
            try:
                assert _errno_of(os.read, fd, 100) in (errno.ENOENT, errno.EIO)
            finally:
                os.close(fd)

            # metadata comes from the index: the view still shows the chain as mounted
            assert sorted(os.listdir(mnt / "d")) == ["x", "y"]
            assert os.getxattr(mnt / "a", "user.tag") == b"A"
            # the daemon lives and serves the layers that are still there
            assert daemon_pid_alive(m.pid)
            assert (mnt / "keep").read_bytes() == b"kept\n" * 1000
            assert (mnt / "d" / "y").read_bytes() == b"y from bottom"
        finally:
            os.close(opened)
        assert daemon_pid_alive(m.pid)
        log = Path(m.log).read_text()
    statfs_lines = [ln for ln in log.splitlines() if "statfs /:" in ln]
    assert len(statfs_lines) == 1, log
    assert str(top) in statfs_lines[0]
    read_lines = [ln for ln in log.splitlines() if " read /a:" in ln]
    assert len(read_lines) == 1, log
    assert "Traceback" not in log
    assert "b'" not in log


def test_unexpected_exception_becomes_eio_logged_once(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A handler that raises something other than FUSEError/OSError answers EIO (here: a
    listxattr/readdir for an inode the index does not know, which raises KeyError inside)."""
    top, bottom = _chain(tmp_path)
    ops = UnionOperations(build_index([str(top), str(bottom)]))
    unknown = 0xDEAD_BEEF

    async def call_twice() -> list[int]:
        codes = []
        for _ in range(2):
            try:
                await ops.listxattr(unknown, None)
            except pyfuse3.FUSEError as e:
                codes.append(e.errno)
        return codes

    with caplog.at_level(logging.WARNING, logger="layerfs.fs.ops"):
        assert trio.run(call_twice) == [errno.EIO, errno.EIO]
    lines = [r for r in caplog.records if r.name == "layerfs.fs.ops"]
    assert len(lines) == 1
    assert f"inode {unknown}" in lines[0].getMessage()
    assert lines[0].exc_info is not None  # the traceback is kept for the log


def test_reads_interleaved_with_listings_return_the_right_data(tmp_path: Path) -> None:
    """Reads wait in worker threads while listings and stats are answered inline; whatever
    the interleaving, every file reads back exactly, and listings stay complete."""
    layer = Layer(tmp_path / "l")
    want: dict[str, str] = {}
    for i in range(300):
        data = hashlib.sha256(str(i).encode()).digest() * (1 + i * 37 % 900)
        layer.file(f"d{i % 7}/f{i}", data)
        want[f"d{i % 7}/f{i}"] = hashlib.sha256(data).hexdigest()
    names = {
        f"d{k}": sorted(p.split("/")[1] for p in want if p.startswith(f"d{k}/")) for k in range(7)
    }
    with open("/proc/sys/vm/drop_caches", "w") as f:  # the reads must reach the disk
        os.sync()
        f.write("3\n")
    with layerfs_mount([str(layer.finish())], tmp_path / "mnt") as m:
        mnt = Path(m.path)
        errors: list[str] = []

        def reader(paths: list[str]) -> None:
            for p in paths:
                got = hashlib.sha256((mnt / p).read_bytes()).hexdigest()
                if got != want[p]:
                    errors.append(f"{p}: content differs")

        def lister() -> None:
            for _ in range(20):
                for d, expected in names.items():
                    if sorted(os.listdir(mnt / d)) != expected:
                        errors.append(f"{d}: listing differs")
                    for n in expected[:5]:
                        os.stat(mnt / d / n)

        paths = sorted(want)
        threads = [threading.Thread(target=reader, args=(paths[i::4],)) for i in range(4)]
        threads.append(threading.Thread(target=lister))
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert errors == []
        assert daemon_pid_alive(m.pid)
