"""Helpers for the id-mapping and rootless view tests: mount the same dirs with
``layerfs-overlay`` (this checkout's) and fuse-overlayfs with the same ``-o`` options."""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path

from conftest import require, wait_until
from fs_helpers import require_fuse_overlayfs
from layerfs.fs.mount import daemon_pid_alive, detach, find_mount_process, is_mountpoint

REPO = Path(__file__).resolve().parent.parent
PROG = os.path.join(os.path.dirname(sys.executable), "layerfs-overlay")


def checkout_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    """The environment with this checkout first on PYTHONPATH (the venv is installed from
    another checkout)."""
    env = dict(os.environ)
    env["PYTHONPATH"] = str(REPO) + (
        os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else ""
    )
    if extra:
        env.update(extra)
    return env


def overlay_options(
    lowers: Sequence[str], upper: str | None = None, work: str | None = None, extra: str = ""
) -> str:
    opts = "lowerdir=" + ":".join(lowers)
    if upper is not None and work is not None:
        opts += f",upperdir={upper},workdir={work}"
    return opts + ("," + extra if extra else "")


def _unmount(mnt: str, prog: bytes) -> None:
    pid = find_mount_process(mnt, prog)
    subprocess.run(["fusermount3", "-u", mnt], capture_output=True, check=False)
    if is_mountpoint(mnt):
        detach(mnt)
    if pid is not None:
        wait_until(lambda: not daemon_pid_alive(pid), f"{prog.decode()} {pid} exits", 30)


@contextlib.contextmanager
def layerfs_overlay(opts: str, mnt: Path) -> Iterator[str]:
    """``layerfs-overlay -o OPTS MNT`` from this checkout; unmounted afterwards."""
    mnt.mkdir(parents=True, exist_ok=True)
    r = subprocess.run(
        [PROG, "-o", opts, str(mnt)], capture_output=True, text=True, env=checkout_env()
    )
    assert r.returncode == 0, r.stderr
    try:
        yield str(mnt)
    finally:
        _unmount(str(mnt), b"layerfs-overlay")


@contextlib.contextmanager
def fuse_overlayfs_with(opts: str, mnt: Path) -> Iterator[str]:
    """fuse-overlayfs with the same ``-o`` text (the oracle); unmounted afterwards."""
    require_fuse_overlayfs()
    mnt.mkdir(parents=True, exist_ok=True)
    r = subprocess.run(["fuse-overlayfs", "-o", opts, str(mnt)], capture_output=True, text=True)
    require(r.returncode == 0, f"fuse-overlayfs failed: {r.stderr.strip()}")
    try:
        yield str(mnt)
    finally:
        _unmount(str(mnt), b"fuse-overlayfs")


def owners(root: str) -> dict[str, tuple[int, int]]:
    """path -> (uid, gid) of every entry under *root* (lstat, not followed)."""
    out = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in ["", *dirnames, *filenames]:
            p = os.path.join(dirpath, name) if name else dirpath
            rel = os.path.relpath(p, root)
            if rel in out:
                continue
            st = os.lstat(p)
            out[rel] = (st.st_uid, st.st_gid)
    return out
