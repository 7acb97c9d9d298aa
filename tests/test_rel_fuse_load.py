"""The FUSE view under load, and kill -9 / recovery cycles.

A three-layer image (part of the host's /usr/lib/python3.*, a layer that whites some of it
out and adds files, and a top layer that replaces some files) is mounted once; 8 reader
threads do a fixed number of operations (listdir, stat, full reads compared with the
expected bytes) while the daemon's VmRSS is sampled; it must not grow past a generous bound.
Then the daemon is SIGKILLed and recovered (``mounted`` repairs, ``mount`` remounts, contents
checked) over and over; in the end no daemon process and no mount is left.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import signal
import threading
from pathlib import Path

import pytest

from conftest import LayerfsCLI, StorePaths, require, require_root, require_tool, wait_until
from rel_helpers import (
    daemon_pids,
    figures,
    make_tar,
    mounts_below,
    rss_kib,
    scaled,
    tar_of_tree,
    wait_gone,
)

pytestmark = [pytest.mark.fuse, pytest.mark.root]

READERS = 8
OPS_PER_READER = scaled(400, 6000, "LAYERFS_REL_READER_OPS")
KILL_CYCLES = scaled(20, 150, "LAYERFS_REL_KILL_CYCLES")
FILES = scaled(600, 3000)
RSS_GROWTH_LIMIT_KIB = 256 * 1024  # generous: a leak per request shows up far beyond it


def _source_dir() -> str:
    for name in sorted(os.listdir("/usr/lib"), reverse=True):
        if name.startswith("python3.") and os.path.isdir(f"/usr/lib/{name}"):
            return f"/usr/lib/{name}"
    require(False, "no /usr/lib/python3.* on this host to build the image from")
    raise AssertionError


def _expected(root: str, top: str) -> dict[str, str]:
    """relative path -> sha256 of what the base layer holds."""
    out = {}
    for dirpath, _, filenames in os.walk(top):
        for name in filenames:
            p = os.path.join(dirpath, name)
            if os.path.isfile(p) and not os.path.islink(p):
                rel = os.path.relpath(p, root)
                with open(p, "rb") as f:
                    out[rel] = hashlib.sha256(f.read()).hexdigest()
    return out


@pytest.fixture
def image(cli: LayerfsCLI, paths: StorePaths) -> tuple[str, dict[str, str]]:
    """Import the chain; returns the top layer id and path -> sha256 of regular files."""
    require_root()
    src = _source_dir()
    base_tar = tar_of_tree(src, "py", FILES)
    cli.run("import-layer", "--name", "base", input=base_tar)
    # what the base layer really holds: read back from its diff dir
    base_id = json.loads(cli.out("layer", "--json", "base"))[0]["id"]
    diff = os.path.join(paths.root, "overlay", base_id, "diff")
    expect = _expected(diff, os.path.join(diff, "py"))
    rng = random.Random(7)
    gone = rng.sample(sorted(expect), len(expect) // 10)
    mid: dict[str, bytes | None] = {"py/": None, "py/added/": None}
    for k in range(100):
        mid[f"py/added/f{k}"] = os.urandom(rng.randrange(1, 20000))
    for rel in gone:
        d, _, b = rel.rpartition("/")
        mid[f"{d}/.wh.{b}"] = b""
    cli.run("import-layer", "--name", "mid", "--parent", "base", input=make_tar(mid))
    for rel in gone:
        del expect[rel]
    for k in range(100):
        expect[f"py/added/f{k}"] = hashlib.sha256(mid[f"py/added/f{k}"] or b"").hexdigest()
    top: dict[str, bytes | None] = {"py/": None}
    replaced = rng.sample(sorted(expect), 50)
    for rel in replaced:
        top[rel] = b"replaced " + rel.encode()
        expect[rel] = hashlib.sha256(top[rel] or b"").hexdigest()
    top_id = cli.out("import-layer", "--name", "top", "--parent", "mid", input=make_tar(top))
    return top_id.split()[0], expect


def _pid(paths: StorePaths, layer_id: str) -> int:
    with open(os.path.join(paths.runroot, "layerfs", "daemons", f"{layer_id}.json")) as f:
        return int(json.load(f)["pid"])


def _fds(pid: int) -> list[str]:
    """The open descriptors of a process (for a leak check)."""
    return os.listdir(f"/proc/{pid}/fd")


def _reader(mnt: str, expect: dict[str, str], seed: int, ops: int, errors: list[str]) -> None:
    rng = random.Random(seed)
    files = sorted(expect)
    dirs = sorted({os.path.dirname(f) for f in files})
    try:
        for _ in range(ops):
            r = rng.random()
            if r < 0.5:
                rel = rng.choice(files)
                with open(os.path.join(mnt, rel), "rb") as f:
                    got = hashlib.sha256(f.read()).hexdigest()
                if got != expect[rel]:
                    errors.append(f"{rel}: wrong content")
            elif r < 0.8:
                d = rng.choice(dirs)
                names = set(os.listdir(os.path.join(mnt, d)))
                want = {os.path.basename(f) for f in files if os.path.dirname(f) == d}
                if not want <= names:
                    errors.append(f"{d}: missing {sorted(want - names)[:3]}")
                if any(n.startswith(".wh.") for n in names):
                    errors.append(f"{d}: whiteout visible")
            else:
                rel = rng.choice(files)
                os.stat(os.path.join(mnt, rel))
    except OSError as exc:
        errors.append(f"reader {seed}: {exc!r}")


def test_parallel_readers_and_kill_recovery_cycles(
    cli: LayerfsCLI, paths: StorePaths, image: tuple[str, dict[str, str]]
) -> None:
    require_tool("fusermount3")
    top, expect = image
    mnt = cli.out("mount", top).strip()
    try:
        with figures("FUSE: 8 readers") as fig:
            pid = _pid(paths, top)
            fds0 = _fds(pid)
            rss0 = rss_kib(pid)
            errors: list[str] = []
            samples = [rss0]
            threads = [
                threading.Thread(target=_reader, args=(mnt, expect, s, OPS_PER_READER, errors))
                for s in range(READERS)
            ]
            for t in threads:
                t.start()
            while any(t.is_alive() for t in threads):
                samples.append(rss_kib(pid))
                threads[0].join(0.2)
            for t in threads:
                t.join()
            samples.append(rss_kib(pid))
            fig.trials, fig.ops = READERS, READERS * OPS_PER_READER
            fig.notes.update(rss_start_mib=rss0 // 1024, rss_max_mib=max(samples) // 1024)
            fig.failures = len(errors)
            assert not errors, errors[:10]
            # Backing fds belong to the inode (layerfs/fs/fdcache.py, bounded): they are closed
            # when the kernel forgets the inodes, so make it forget them (unused dentries and
            # inodes dropped: FORGET requests) and wait for the daemon's descriptors to come
            # back to where they were.
            with open("/proc/sys/vm/drop_caches", "w") as f:
                f.write("2\n")
            wait_until(
                lambda: len(_fds(pid)) <= len(fds0),
                f"the daemon closed the files the readers closed ({len(fds0)} fds before)",
                timeout=30,
            )
            assert max(samples) - rss0 < RSS_GROWTH_LIMIT_KIB, f"RSS {rss0} -> {max(samples)} KiB"
        with figures("FUSE: kill -9 / recover") as fig:
            rng = random.Random(11)
            files = sorted(expect)
            for _ in range(KILL_CYCLES):
                pid = _pid(paths, top)
                os.kill(pid, signal.SIGKILL)
                assert wait_gone(pid)
                assert cli.out("mounted", top).strip() == "0"  # dead view detected, detached
                assert not mounts_below(paths.root, "fuse")
                mnt = cli.out("mount", top).strip()
                for rel in rng.sample(files, 5):
                    with open(os.path.join(mnt, rel), "rb") as f:
                        assert hashlib.sha256(f.read()).hexdigest() == expect[rel]
                assert len(daemon_pids(paths.root)) == 1
                fig.trials += 1
                fig.ops += 7
    finally:
        cli.run("unmount", "--force", top, check=False)
        for pid in daemon_pids(paths.root):
            wait_gone(pid)
    assert not mounts_below(paths.root, "fuse"), "a mount leaked"
    assert not daemon_pids(paths.root), "a daemon leaked"
    assert not [ln for ln in Path("/proc/self/mounts").read_text().split("\n") if mnt in ln]
