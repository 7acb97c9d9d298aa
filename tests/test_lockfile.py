"""Lock files: OFD locks that exclude POSIX-lock holders, and the LastWrite token."""

from __future__ import annotations

import os
import struct
import subprocess
import sys
import threading
import time
from pathlib import Path

from conftest import file_locks, wait_until, waits_for_lock
from layerfs.store.lockfile import TOKEN_SIZE, LastWrite, LockFile

_HOLD_POSIX = """
import fcntl, sys
f = open(sys.argv[1], "r+")
fcntl.lockf(f, fcntl.LOCK_SH if sys.argv[2] == "sh" else fcntl.LOCK_EX)
print("locked", flush=True)
sys.stdin.readline()  # hold the lock until the parent says "release" (or closes the pipe)
"""


class PosixHolder:
    """Another process holding a classic POSIX lock (as Go does) until :meth:`release`."""

    def __init__(self, path: str, mode: str) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-c", _HOLD_POSIX, path, mode],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        assert self.proc.stdout is not None
        assert self.proc.stdout.readline().strip() == "locked"

    def release(self) -> None:
        """Tell the holder to let go, and wait until it has exited."""
        assert self.proc.stdin is not None
        self.proc.communicate("release\n", timeout=30)
        assert self.proc.returncode == 0


def test_token_layout_and_freshness() -> None:
    a, b = LastWrite.fresh(), LastWrite.fresh()
    assert len(a.raw) == TOKEN_SIZE and a != b
    nanos, counter_a, pid = struct.unpack_from("<QQI", a.raw)
    assert pid == os.getpid() and abs(nanos - time.time_ns()) < 60 * 10**9
    assert struct.unpack_from("<Q", b.raw, 8)[0] == counter_a + 1
    assert LastWrite(b"\0" * TOKEN_SIZE).empty


def test_record_write_changes_the_token_without_truncating(tmp_path: Path) -> None:
    path = str(tmp_path / "layers.lock")
    lock = LockFile(path)
    with lock.write() as held:
        assert held.last_write().empty
        token = held.record_write()
    with open(path, "ab") as f:
        f.write(b"tail")  # bytes past the token are never touched
    with lock.read() as held:
        assert held.last_write() == token
    with lock.write() as held:
        assert held.record_write() != token
    assert os.path.getsize(path) == TOKEN_SIZE + 4


def test_a_posix_lock_holder_in_another_process_blocks_our_writer(tmp_path: Path) -> None:
    path = str(tmp_path / "layers.lock")
    Path(path).touch()
    holder = PosixHolder(path, "ex")
    got = threading.Event()

    def take() -> None:
        with LockFile(path).write():
            got.set()

    worker = threading.Thread(target=take)
    worker.start()
    try:
        wait_until(
            lambda: got.is_set() or waits_for_lock(path, kind="OFDLCK"),
            "our write lock request is blocked behind the POSIX holder",
        )
        assert not got.is_set(), "we took the write lock while another process held it"
    finally:
        holder.release()
        worker.join(30)
    assert got.is_set(), "the write lock was not granted after the holder let go"


def test_shared_locks_coexist_and_exclude_writers(tmp_path: Path) -> None:
    path = str(tmp_path / "layers.lock")
    Path(path).touch()
    holder = PosixHolder(path, "sh")
    try:
        with LockFile(path).read():
            assert holder.proc.poll() is None  # we got a shared lock while it holds one
        assert LockFile(path).try_write() is None
    finally:
        holder.release()
    got = LockFile(path).try_write()
    assert got is not None
    got.release()


def test_closing_another_descriptor_does_not_drop_our_lock(tmp_path: Path) -> None:
    """POSIX locks vanish when any fd of the file is closed; OFD locks must not."""
    path = str(tmp_path / "layers.lock")
    lock = LockFile(path)
    with lock.write():
        other = os.open(path, os.O_RDWR)
        os.close(other)
        probe = subprocess.run(
            [
                sys.executable,
                "-c",
                "import fcntl,sys; f=open(sys.argv[1],'r+');"
                "fcntl.lockf(f, fcntl.LOCK_EX|fcntl.LOCK_NB)",
                path,
            ],
            capture_output=True,
        )
        assert probe.returncode != 0, "the lock was dropped by closing another descriptor"


def test_threads_of_one_process_exclude_each_other(tmp_path: Path) -> None:
    path = str(tmp_path / "layers.lock")
    lock = LockFile(path)
    inside = 0
    worst = 0
    guard = threading.Lock()

    def worker() -> None:
        nonlocal inside, worst
        for _ in range(50):
            with lock.write():
                with guard:
                    inside += 1
                    worst = max(worst, inside)
                # Not synchronisation: a short pause inside the lock gives the other threads
                # a chance to barge in; the result below does not depend on it.
                time.sleep(0.0005)
                with guard:
                    inside -= 1

    threads = [threading.Thread(target=worker) for _ in range(4)]
    with lock.write():  # all four must queue behind this holder, none may get in
        for t in threads:
            t.start()
        wait_until(
            lambda: sum(lk.waiting for lk in file_locks(path)) == len(threads),
            "all four threads are blocked on the lock we hold",
        )
        assert inside == 0
    for t in threads:
        t.join(60)
        assert not t.is_alive(), "a thread never got the lock"
    assert worst == 1
