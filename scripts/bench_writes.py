#!/usr/bin/env python3
"""Writable-view workloads: layerfs-overlay vs fuse-overlayfs vs kernel overlayfs.

Each system mounts the same fresh dirs with the same command line (the mount-program form:
``-o lowerdir=L,upperdir=U,workdir=W MNT``; the kernel: ``mount -t overlay``), and runs:

- ``unpack``: ``tar -xf`` of a 10k-file tree into the view;
- ``rm -rf``: remove that unpacked tree again;
- ``cp -a``: copy a 10k-file lower tree inside the view (reads the lower, writes the upper);
- ``copy-up``: ``chmod`` of every file of the lower tree (a copy-up of each file);
- ``dpkg-like``: 2000 times write a small file, fsync it, rename it over its final name
  (dpkg's database discipline);
- ``seq-write``: a 1 GiB sequential write (1 MiB writes) and fsync.

Every workload ends with ``sync``, inside the timing. Run alone (``python3
scripts/bench_writes.py [--quick] [--workdir DIR]``) or from ``scripts/bench.py``. Root only.
Timings are a single run each: on a shared machine quote ratios of the same run.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import os
import shutil
import subprocess
import sys
import tarfile
import time
from collections.abc import Callable, Iterator

HERE = os.path.dirname(os.path.abspath(__file__))
PROGRAM = os.path.join(os.path.dirname(HERE), ".venv", "bin", "layerfs-overlay")
SYSTEMS = ("kernel", "fuse-overlayfs", "layerfs")


def _tree_tar(path: str, files: int) -> None:
    """A tree of *files* small files (100 per directory, 1-8 KiB)."""
    with tarfile.open(path, "w") as tf:
        for i in range(files):
            if i % 100 == 0:
                info = tarfile.TarInfo(f"tree/d{i // 100}")
                info.type, info.mode, info.mtime = tarfile.DIRTYPE, 0o755, 1_650_000_000
                tf.addfile(info)
            data = bytes([i % 251]) * (1024 * (1 + i % 8))
            info = tarfile.TarInfo(f"tree/d{i // 100}/f{i}")
            info.size, info.mode, info.mtime = len(data), 0o644, 1_650_000_000
            tf.addfile(info, io.BytesIO(data))


@contextlib.contextmanager
def _mounted(system: str, lower: str, upper: str, work: str, mnt: str) -> Iterator[None]:
    opts = f"lowerdir={lower},upperdir={upper},workdir={work}"
    if system == "kernel":
        subprocess.run(["mount", "-t", "overlay", "overlay", "-o", opts, mnt], check=True)
    else:
        prog = "fuse-overlayfs" if system == "fuse-overlayfs" else PROGRAM
        subprocess.run([prog, "-o", opts, mnt], check=True)
    try:
        yield
    finally:
        if system == "kernel":
            subprocess.run(["umount", mnt], check=False)
        else:
            subprocess.run(["fusermount3", "-u", mnt], check=False)
        if os.path.ismount(mnt):
            subprocess.run(["umount", "-l", mnt], check=False)


def _dpkg_like(root: str, n: int) -> None:
    target = os.path.join(root, "var-lib-dpkg")
    os.makedirs(target, exist_ok=True)
    for i in range(n):
        final = os.path.join(target, f"info{i % 200}.list")
        tmp = final + ".dpkg-new"
        with open(tmp, "wb") as f:
            f.write(b"/usr/share/doc/pkg/file\n" * (1 + i % 20))
            f.flush()
            os.fsync(f.fileno())
        os.rename(tmp, final)


def _seq_write(root: str, mib: int) -> None:
    chunk = b"\xa5" * (1 << 20)
    with open(os.path.join(root, "big.bin"), "wb") as f:
        for _ in range(mib):
            f.write(chunk)
        f.flush()
        os.fsync(f.fileno())


def _chmod_all(root: str) -> None:
    for dirpath, _dirs, files in os.walk(os.path.join(root, "tree")):
        for name in files:
            os.chmod(os.path.join(dirpath, name), 0o600)


def run(
    workdir: str, *, quick: bool = False, log: Callable[[str], None] = print
) -> tuple[str, dict[str, dict[str, float]]]:
    """Run every workload on every system; returns the report text and the seconds."""
    if not os.access(PROGRAM, os.X_OK):
        return f"writable workloads: skipped ({PROGRAM} missing; run scripts/setup)", {}
    files = 2000 if quick else 10000
    dpkg_n = 300 if quick else 2000
    seq_mib = 128 if quick else 1024
    base = os.path.join(workdir, "writes")
    shutil.rmtree(base, ignore_errors=True)
    os.makedirs(base)
    tar = os.path.join(base, "tree.tar")
    _tree_tar(tar, files)
    lower = os.path.join(base, "lower")
    os.makedirs(lower)
    subprocess.run(["tar", "-xf", tar, "-C", lower], check=True)
    workloads: list[tuple[str, Callable[[str], None]]] = [
        ("unpack", lambda m: _unpack(tar, os.path.join(m, "new"))),
        ("rm -rf", lambda m: _run("rm", "-rf", os.path.join(m, "new"))),
        ("cp -a", lambda m: _run("cp", "-a", os.path.join(m, "tree"), os.path.join(m, "cp"))),
        ("copy-up", _chmod_all),
        ("dpkg-like", lambda m: _dpkg_like(m, dpkg_n)),
        ("seq-write", lambda m: _seq_write(m, seq_mib)),
    ]
    seconds: dict[str, dict[str, float]] = {name: {} for name, _ in workloads}
    for system in SYSTEMS:
        upper, work, mnt = (os.path.join(base, f"{system}-{d}") for d in ("upper", "work", "mnt"))
        for d in (upper, work, mnt):
            os.makedirs(d)
        log(f"writable workloads on {system} ...")
        with _mounted(system, lower, upper, work, mnt):
            for name, fn in workloads:
                subprocess.run(["sync"], check=True)
                t = time.perf_counter()
                fn(mnt)
                subprocess.run(["sync"], check=True)
                seconds[name][system] = time.perf_counter() - t
        shutil.rmtree(upper, ignore_errors=True)
        shutil.rmtree(work, ignore_errors=True)
    lines = [
        f"writable workloads ({files} files, {dpkg_n} fsynced renames, {seq_mib} MiB; one run "
        "each, seconds incl. sync)",
        f"  {'workload':<10} {'kernel':>8} {'fuse-ovl':>8} {'layerfs':>8} "
        f"{'vs fuse-ovl':>11} {'vs kernel':>9}",
    ]
    for name, by in seconds.items():
        k, f, ours = by["kernel"], by["fuse-overlayfs"], by["layerfs"]
        lines.append(
            f"  {name:<10} {k:8.2f} {f:8.2f} {ours:8.2f} {ours / f:10.2f}x {ours / k:8.2f}x"
        )
    shutil.rmtree(base, ignore_errors=True)
    return "\n".join(lines), seconds


def _run(*argv: str) -> None:
    subprocess.run(argv, check=True)


def _unpack(tar: str, dest: str) -> None:
    os.mkdir(dest)
    _run("tar", "-xf", tar, "-C", dest)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--workdir", default="/var/tmp/layerfs-bench")
    ap.add_argument("--quick", action="store_true", help="smaller sizes (smoke test)")
    args = ap.parse_args()
    if os.geteuid() != 0:
        print("bench_writes.py needs root (it mounts overlays)", file=sys.stderr)
        return 2
    text, _ = run(args.workdir, quick=args.quick, log=lambda m: print(m, file=sys.stderr))
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
