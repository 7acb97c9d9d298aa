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


# -- a small image for rootless podman ---------------------------------------------------------

PODMAN_FLAGS = ["--runtime", "runc", "--cgroup-manager", "cgroupfs", "--events-backend", "file"]
RUN_FLAGS = ["--network", "none", "--ulimit", "nofile=1024:1024", "--ulimit", "nproc=1024:1024"]
BUSYBOX = "/usr/bin/busybox"
APPLETS = (
    "sh",
    "ls",
    "cat",
    "echo",
    "mkdir",
    "rm",
    "mv",
    "chown",
    "touch",
    "stat",
    "id",
    "find",
    "grep",
    "sort",
)


def busybox_rootfs_tar(path: Path) -> Path:
    """A tar of a tiny rootfs: busybox-static and its applets, with entries owned by several
    container ids (0, 1, 42, 1000) and a 0700 dir of uid 1000 (``home/u``)."""
    import io
    import tarfile

    require(os.path.exists(BUSYBOX), "busybox-static is not installed")

    def add(
        tf: tarfile.TarFile,
        name: str,
        kind: bytes,
        mode: int,
        uid: int = 0,
        gid: int = 0,
        data: bytes = b"",
        link: str = "",
    ) -> None:
        ti = tarfile.TarInfo(name)
        ti.type, ti.mode, ti.uid, ti.gid, ti.mtime = kind, mode, uid, gid, 1_600_000_000
        ti.linkname = link
        ti.size = len(data) if kind == tarfile.REGTYPE else 0
        tf.addfile(ti, io.BytesIO(data) if kind == tarfile.REGTYPE else None)

    with open(BUSYBOX, "rb") as f:
        busybox = f.read()
    with tarfile.open(path, "w", format=tarfile.GNU_FORMAT) as tf:
        for d in ("bin", "etc", "tmp", "home", "var", "var/lib"):
            add(tf, d, tarfile.DIRTYPE, 0o1777 if d == "tmp" else 0o755)
        add(tf, "bin/busybox", tarfile.REGTYPE, 0o755, data=busybox)
        for a in APPLETS:
            add(tf, f"bin/{a}", tarfile.SYMTYPE, 0o777, link="busybox")
        add(
            tf,
            "etc/passwd",
            tarfile.REGTYPE,
            0o644,
            data=b"root:x:0:0::/:/bin/sh\n"
            b"daemon:x:1:1::/:/bin/sh\nu:x:1000:1000::/home/u:/bin/sh\n",
        )
        add(tf, "etc/group", tarfile.REGTYPE, 0o644, data=b"root:x:0:\nshadow:x:42:\n")
        add(tf, "etc/shadow", tarfile.REGTYPE, 0o640, 0, 42, data=b"root:*::0:::::\n")
        add(tf, "var/lib/daemon", tarfile.DIRTYPE, 0o755, 1, 1)
        add(tf, "var/lib/daemon/state", tarfile.REGTYPE, 0o644, 1, 1, data=b"d\n")
        add(tf, "home/u", tarfile.DIRTYPE, 0o700, 1000, 1000)
        add(tf, "home/u/notes", tarfile.REGTYPE, 0o600, 1000, 1000, data=b"private\n")
    return path
