"""Faults of a read-write view (issue 10 item 5): the daemon SIGKILLed during heavy writes and
copy-ups, and a full upper file system during copy-up. After each, kernel overlayfs mounts the
upper dir, no file under a final name is a partial copy, and the next mount cleans ``work/``."""

from __future__ import annotations

import errno
import hashlib
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from test_rw_posix import kernel_ro, kernel_rw, layerfs_rw

from conftest import wait_until
from fs_helpers import Layer, require_fuse, snapshot
from layerfs.fs.mount import abort_connection, detach
from layerfs.fs.upper import TEMP_PREFIX, WORK_SUBDIR

BIG = 4 << 20
N_BIG = 8


def _pattern(i: int, size: int) -> bytes:
    seed = hashlib.sha256(str(i).encode()).digest()
    return (seed * (size // len(seed) + 1))[:size]


def _lower(root: Path) -> str:
    la = Layer(root)
    for i in range(N_BIG):
        la.file(f"big/{i}", _pattern(i, BIG))
    la.file("small", b"small\n")
    return str(la.finish())


WRITER = r"""
import os, sys
root = sys.argv[1]
n = int(sys.argv[2])
i = 0
while True:
    with open(f"{root}/big/{i % n}", "ab") as f:   # a copy-up of 4 MiB on the first round
        f.write(b"+")
    with open(f"{root}/new-{i}", "wb") as f:
        f.write(os.urandom(65536))
        if i % 4 == 0:
            os.fsync(f.fileno())
    i += 1
    if i == n:
        print("round", flush=True)
"""


def test_sigkill_during_heavy_writes(tmp_path: Path) -> None:
    require_fuse()
    lower = _lower(tmp_path / "lower")
    up, work, mnt = tmp_path / "upper", tmp_path / "work", tmp_path / "mnt"
    up.mkdir()
    work.mkdir()
    with layerfs_rw([lower], str(up), str(work), mnt) as pid:
        writer = subprocess.Popen(
            [sys.executable, "-c", WRITER, str(mnt), str(N_BIG)],
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
        )
        try:
            wait_until(
                lambda: len(os.listdir(up / "big")) >= 3 if (up / "big").exists() else False,
                "three copy-ups done",
                60,
            )
            os.kill(pid, signal.SIGKILL)
            abort_connection(str(mnt))
            detach(str(mnt))
        finally:
            writer.kill()
            writer.wait()
    # no partial copy under a final name: every copied-up file holds all of the lower data
    names = sorted(os.listdir(up / "big"))
    assert names
    for name in names:
        data = (up / "big" / name).read_bytes()
        assert data[:BIG] == _pattern(int(name), BIG), f"big/{name} is a partial copy"
        assert set(data[BIG:]) <= {ord("+")}
    assert not [p for p in os.listdir(up) if os.fsencode(p).startswith(TEMP_PREFIX)]
    # kernel overlay mounts the upper dir and shows every file whole
    with kernel_ro([str(up), lower], tmp_path / "k") as k:
        for i in range(N_BIG):
            assert (Path(k) / "big" / str(i)).read_bytes()[:BIG] == _pattern(i, BIG)
    # the next mount cleans the work dir (what the crash left, and a planted leftover)
    leftovers = work / os.fsdecode(WORK_SUBDIR)
    (leftovers / (os.fsdecode(TEMP_PREFIX) + "999")).write_bytes(b"partial")
    with layerfs_rw([lower], str(up), str(work), mnt):
        assert os.listdir(leftovers) == []
        assert (mnt / "small").read_bytes() == b"small\n"


def _small_tmpfs(path: Path, size: str) -> None:
    path.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)], check=True)
    (path / "upper").mkdir()
    (path / "work").mkdir()


def _enospc_writes(root: str) -> list[str]:
    out = []
    for name in ("big/0", "big/1"):
        try:
            with open(f"{root}/{name}", "ab") as f:
                f.write(b"+")
            out.append("ok")
        except OSError as e:
            out.append(errno.errorcode[e.errno or 0])
    with open(f"{root}/small", "ab") as f:  # the upper is still usable
        f.write(b"more\n")
    return out


def test_enospc_during_copy_up(tmp_path: Path) -> None:
    require_fuse()
    lower = _lower(tmp_path / "lower")
    before = snapshot(lower)
    results = {}
    try:
        for side in ("k", "l"):
            _small_tmpfs(tmp_path / side, "2m")
            d = tmp_path / side
            if side == "k":
                with kernel_rw(lower, str(d / "upper"), str(d / "work"), d / "mnt"):
                    results[side] = _enospc_writes(str(d / "mnt"))
            else:
                with layerfs_rw([lower], str(d / "upper"), str(d / "work"), d / "mnt"):
                    results[side] = _enospc_writes(str(d / "mnt"))
                    assert (d / "mnt" / "big" / "0").read_bytes() == _pattern(0, BIG)
        assert results["l"] == results["k"] == ["ENOSPC", "ENOSPC"]
        d = tmp_path / "l"
        assert snapshot(lower) == before, "the lower layer changed"
        assert not (d / "upper" / "big" / "0").exists()
        assert os.listdir(d / "work" / os.fsdecode(WORK_SUBDIR)) == []
        with kernel_ro([str(d / "upper"), lower], tmp_path / "again") as k:
            assert (Path(k) / "big" / "0").read_bytes() == _pattern(0, BIG)
            assert (Path(k) / "small").read_bytes() == b"small\nmore\n"
    finally:
        for side in ("k", "l"):
            subprocess.run(["umount", "-l", str(tmp_path / side)], capture_output=True)


@pytest.mark.parametrize("fmt", ["kernel", "aufs"])
def test_remount_after_kill_keeps_view(tmp_path: Path, fmt: str) -> None:
    """A view killed after its changes were made shows them again on the next mount."""
    require_fuse()
    lower = _lower(tmp_path / "lower")
    up, work, mnt = tmp_path / "upper", tmp_path / "work", tmp_path / "mnt"
    up.mkdir()
    work.mkdir()
    with layerfs_rw([lower], str(up), str(work), mnt, fmt) as pid:
        os.unlink(mnt / "big" / "1")
        os.rename(mnt / "big", mnt / "big2")
        (mnt / "big2" / "n").write_bytes(b"new")
        os.mkdir(mnt / "big")
        live = snapshot(str(mnt))
        os.kill(pid, signal.SIGKILL)
        abort_connection(str(mnt))
        detach(str(mnt))
    with layerfs_rw([lower], str(up), str(work), mnt, fmt):
        again = snapshot(str(mnt))
    assert {k: {f: v for f, v in r.items() if f != "ino"} for k, r in again.items()} == {
        k: {f: v for f, v in r.items() if f != "ino"} for k, r in live.items()
    }
    assert {k: r["ino"] for k, r in again.items()} == {k: r["ino"] for k, r in live.items()}
