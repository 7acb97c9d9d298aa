#!/usr/bin/env python3
"""Writable-view workloads: layerfs-overlay against fuse-overlayfs and kernel overlayfs.

    sudo scripts/bench_writes.py [--repeat N] [--files N] [--big-mib N] [--workdir DIR]
                                 [--workloads w1,w2] [--layerfs PATH] [--json FILE]

All three systems mount the same lower tree with a fresh upper and work dir for every
measurement (``PROG -o lowerdir=L,upperdir=U,workdir=W MNT`` for the two FUSE programs, which
share fuse-overlayfs's command line; ``mount -t overlay`` for the kernel). Caches are dropped
before each workload, the systems' order rotates between repeats, and every timing includes a
final ``syncfs`` of the upper file system, so a system that only defers its writes gains
nothing. Prints medians (min-max) and the ratios layerfs/fuse-overlayfs (target <= 1.0) and
layerfs/kernel. Also callable from ``scripts/bench.py --writes``.

Workloads (the issue-10 list):

* ``untar``    unpack a tar of N files (100 dirs) into the view;
* ``rm-new``   ``rm -rf`` of that unpacked tree (upper-only entries);
* ``rm-lower`` ``rm -rf`` of the lower tree (a whiteout per entry);
* ``cp-a``     ``cp -a`` of the lower tree to a new name (reads lower, writes upper);
* ``copyup``   ``chmod -R g+w`` of the lower tree (copy-up of every file and dir);
* ``dpkg``     dpkg-like: 1000 small files, each written to ``.dpkg-new``, fsync'ed, renamed
  into place, then a status file rewritten with fsync, 20 times;
* ``seqwrite`` one file of ``--big-mib`` MiB with ``dd conv=fsync``.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import random
import shutil
import statistics
import subprocess
import sys
import tarfile
import time
from collections.abc import Callable
from typing import Any

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)

WORKLOADS = ("untar", "rm-new", "rm-lower", "cp-a", "copyup", "dpkg", "seqwrite")
SYSTEMS = ("layerfs", "fuse-overlayfs", "kernel")
DIRS = 100
MTIME = 1_700_000_000

DPKG_SCRIPT = r"""
import os, sys
root = sys.argv[1]
d = os.path.join(root, "var/lib/dpkg/info")
os.makedirs(d, exist_ok=True)
blob = b"x" * 700
for i in range(1000):
    name = os.path.join(d, "pkg%04d.list" % i)
    fd = os.open(name + ".dpkg-new", os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    os.write(fd, blob)
    os.fsync(fd)
    os.close(fd)
    os.rename(name + ".dpkg-new", name)
    if i % 50 == 0:
        st = os.path.join(root, "var/lib/dpkg/status")
        fd = os.open(st + "-new", os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        os.write(fd, blob * 40)
        os.fsync(fd)
        os.close(fd)
        os.rename(st + "-new", st)
dfd = os.open(d, os.O_RDONLY)
os.fsync(dfd)
os.close(dfd)
"""


def log(msg: str) -> None:
    print(f"[bench-writes] {msg}", file=sys.stderr, flush=True)


def sh(cmd: list[str], **kw: Any) -> subprocess.CompletedProcess[str]:
    return subprocess.run(cmd, capture_output=True, text=True, **kw)


def must(cmd: list[str], **kw: Any) -> subprocess.CompletedProcess[str]:
    r = sh(cmd, **kw)
    if r.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)}: {r.stderr.strip()[-400:]}")
    return r


def drop_caches() -> None:
    os.sync()
    with open("/proc/sys/vm/drop_caches", "w") as f:
        f.write("3\n")


def syncfs(path: str) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)  # a directory fd: flushes the file system it lives on
    finally:
        os.close(fd)
    must(["sync", "-f", path])


def make_tree(root: str, files: int, prefix: str, seed: int) -> None:
    """A deterministic tree of *files* small files (0-16 KiB) in DIRS dirs under root/prefix."""
    rng = random.Random(seed)
    blob = rng.randbytes(1 << 15)
    for i in range(files):
        d = os.path.join(root, prefix, f"d{i % DIRS:03d}")
        if i < DIRS:
            os.makedirs(d, exist_ok=True)
        n = rng.randint(0, 16384)
        off = rng.randint(0, len(blob) - n)
        p = os.path.join(d, f"f{i:05d}")
        with open(p, "wb") as f:
            f.write(blob[off : off + n])
        os.utime(p, ns=(MTIME * 10**9, MTIME * 10**9))


def make_tar(path: str, files: int, seed: int) -> None:
    rng = random.Random(seed)
    blob = rng.randbytes(1 << 15)
    with tarfile.open(path, "w", format=tarfile.PAX_FORMAT) as tf:
        for d in range(DIRS):
            ti = tarfile.TarInfo(f"u/d{d:03d}")
            ti.type, ti.mode, ti.mtime = tarfile.DIRTYPE, 0o755, MTIME
            tf.addfile(ti)
        for i in range(files):
            n = rng.randint(0, 16384)
            off = rng.randint(0, len(blob) - n)
            ti = tarfile.TarInfo(f"u/d{i % DIRS:03d}/f{i:05d}")
            ti.size, ti.mode, ti.mtime = n, 0o644, MTIME
            tf.addfile(ti, io.BytesIO(blob[off : off + n]))


class Bench:
    """One run: the lower tree, the tar, fresh upper/work per measurement, every mount undone."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.work = os.path.abspath(args.workdir)
        self.files = args.files
        self.big_mib = args.big_mib
        self.repeat = args.repeat
        self.workloads = [w for w in args.workloads.split(",") if w]
        self.programs = {"layerfs": args.layerfs, "fuse-overlayfs": shutil.which("fuse-overlayfs")}
        self.systems = [s for s in SYSTEMS if s == "kernel" or self.programs.get(s)]
        self.lower = os.path.join(self.work, "lower")
        self.tar = os.path.join(self.work, "unpack.tar")
        self.mnt = os.path.join(self.work, "mnt")
        self.results: dict[str, dict[str, list[float]]] = {}
        self.mounted: str | None = None

    def prepare(self) -> None:
        os.makedirs(self.work, exist_ok=True)
        stamp = os.path.join(self.work, f"prepared-{self.files}")
        if not os.path.exists(stamp):
            log(f"building the lower tree and tar ({self.files} files each)")
            shutil.rmtree(self.lower, ignore_errors=True)
            os.makedirs(self.lower)
            make_tree(self.lower, self.files, "tree", seed=7)
            make_tar(self.tar, self.files, seed=8)
            with open(stamp, "w"):
                pass
        os.makedirs(self.mnt, exist_ok=True)

    def mount(self, system: str) -> tuple[str, str]:
        run_dir = os.path.join(self.work, "run")
        shutil.rmtree(run_dir, ignore_errors=True)
        upper, workd = os.path.join(run_dir, "upper"), os.path.join(run_dir, "work")
        os.makedirs(upper)
        os.makedirs(workd)
        opts = f"lowerdir={self.lower},upperdir={upper},workdir={workd}"
        if system == "kernel":
            must(["mount", "-t", "overlay", "overlay", "-o", opts, self.mnt])
        else:
            prog = self.programs[system]
            assert prog
            must([prog, "-o", opts, self.mnt])
        if not os.path.ismount(self.mnt):
            raise RuntimeError(f"{system} did not mount")
        self.mounted = system
        return upper, workd

    def unmount(self) -> None:
        if self.mounted is None:
            return
        pids = self._daemon_pids()
        r = sh(["umount", self.mnt])
        if r.returncode != 0:
            sh(["umount", "-l", self.mnt])
        for pid in pids:  # the next mount must not race the last daemon's exit
            for _ in range(1000):
                if not os.path.exists(f"/proc/{pid}"):
                    break
                time.sleep(0.01)
        self.mounted = None

    def _daemon_pids(self) -> list[int]:
        if self.mounted == "kernel":
            return []
        sys.path.insert(0, REPO)
        from layerfs.fs.mount import find_mount_process

        pid = None
        for prog in (b"fuse-overlayfs", b"layerfs-overlay", b"layerfs.fs.daemon"):
            pid = pid or find_mount_process(self.mnt, prog)
        return [pid] if pid else []

    def prepare_workload(self, wl: str) -> None:
        if wl == "rm-new":
            must(["tar", "-xf", self.tar, "-C", self.mnt])
            syncfs(self.mnt)

    def command(self, wl: str) -> list[str]:
        m = self.mnt
        return {
            "untar": ["tar", "-xf", self.tar, "-C", m],
            "rm-new": ["rm", "-rf", os.path.join(m, "u")],
            "rm-lower": ["rm", "-rf", os.path.join(m, "tree")],
            "cp-a": ["cp", "-a", os.path.join(m, "tree"), os.path.join(m, "copy")],
            "copyup": ["chmod", "-R", "g+w", os.path.join(m, "tree")],
            "dpkg": [sys.executable, "-c", DPKG_SCRIPT, m],
            "seqwrite": [
                "dd", "if=/dev/zero", f"of={os.path.join(m, 'big')}", "bs=1M",
                f"count={self.big_mib}", "conv=fsync", "status=none",
            ],
        }[wl]  # fmt: skip

    def measure(self, system: str, wl: str) -> float:
        self.mount(system)
        try:
            self.prepare_workload(wl)
            drop_caches()
            t = time.perf_counter()
            must(self.command(wl))
            syncfs(self.mnt)
            return time.perf_counter() - t
        finally:
            self.unmount()

    def run(self) -> None:
        self.prepare()
        for rep in range(self.repeat):
            order = (
                self.systems[rep % len(self.systems) :] + self.systems[: rep % len(self.systems)]
            )
            for wl in self.workloads:
                for system in order:
                    dt = self.measure(system, wl)
                    self.results.setdefault(wl, {}).setdefault(system, []).append(dt)
                    log(f"rep {rep + 1} {wl:9s} {system:15s} {dt:8.3f} s")

    def cleanup(self) -> None:
        self.unmount()
        shutil.rmtree(os.path.join(self.work, "run"), ignore_errors=True)


def summarize(results: dict[str, dict[str, list[float]]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for wl, per in results.items():
        row: dict[str, Any] = {
            s: {"median": statistics.median(v), "min": min(v), "max": max(v), "n": len(v)}
            for s, v in per.items()
        }
        lf = row.get("layerfs", {}).get("median")
        ff = row.get("fuse-overlayfs", {}).get("median")
        kk = row.get("kernel", {}).get("median")
        row["L/F"] = lf / ff if lf and ff else None
        row["L/K"] = lf / kk if lf and kk else None
        out[wl] = row
    return out


def report(summary: dict[str, Any]) -> str:
    lines = ["", "writable workloads (seconds, median [min-max]; ratios of medians)"]
    lines.append(
        f"{'workload':10s} {'layerfs':>22s} {'fuse-overlayfs':>22s} {'kernel':>22s}  L/F    L/K"
    )

    def cell(d: dict[str, Any] | None) -> str:
        if not d:
            return f"{'-':>22s}"
        return f"{d['median']:8.3f} [{d['min']:.3f}-{d['max']:.3f}]".rjust(22)

    def r(x: float | None) -> str:
        return f"{x:5.2f}" if x is not None else "  -  "

    for wl, row in summary.items():
        lines.append(
            f"{wl:10s} {cell(row.get('layerfs'))} {cell(row.get('fuse-overlayfs'))} "
            f"{cell(row.get('kernel'))}  {r(row['L/F'])}  {r(row['L/K'])}"
        )
    lines.append("")
    lines.append("targets (issue 10: each writable workload <= 1.0x fuse-overlayfs)")
    for wl, row in summary.items():
        v = row["L/F"]
        verdict = "-" if v is None else ("met" if v <= 1.0 else "MISSED")
        lines.append(f"  {wl:10s} L/F {r(v)}  {verdict}")
    return "\n".join(lines)


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--workdir", default="/var/tmp/layerfs-bench-writes")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--files", type=int, default=10_000)
    ap.add_argument("--big-mib", type=int, default=1024)
    ap.add_argument("--workloads", default=",".join(WORKLOADS))
    default_prog = os.path.join(REPO, ".venv", "bin", "layerfs-overlay")
    ap.add_argument("--layerfs", default=default_prog if os.path.exists(default_prog) else None)
    ap.add_argument("--json", metavar="FILE")
    return ap.parse_args(argv)


def run(
    workdir: str, quick: bool = False, log: Callable[[str], None] | None = None
) -> tuple[str, dict[str, Any]]:
    """Run the writable workloads from ``scripts/bench.py`` (its work dir, a ``writes/`` dir
    beside its chains); returns the report text and the summary. ``quick``: 2,000 files,
    64 MiB, one repeat."""
    argv = ["--workdir", os.path.join(workdir, "writes")]
    if quick:
        argv += ["--files", "2000", "--big-mib", "64", "--repeat", "1"]
    args = parse(argv)
    bench = Bench(args)
    if log is not None:
        log(f"writable workloads in {args.workdir} ({args.files} files, {args.big_mib} MiB)")
    try:
        bench.run()
    finally:
        bench.cleanup()
    summary = summarize(bench.results)
    return report(summary), summary


def main(argv: list[str] | None = None) -> int:
    if os.geteuid() != 0:
        print("bench_writes: needs root (mounts, drop_caches)", file=sys.stderr)
        return 2
    args = parse(argv)
    unknown = set(args.workloads.split(",")) - set(WORKLOADS) - {""}
    if unknown:
        print(f"bench_writes: unknown workloads {', '.join(sorted(unknown))}", file=sys.stderr)
        return 2
    bench = Bench(args)
    if not bench.programs["layerfs"]:
        log("no layerfs-overlay found (run scripts/setup): measuring the peers only")
    try:
        bench.run()
    finally:
        bench.cleanup()
    summary = summarize(bench.results)
    print(report(summary))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(
                {"writes": summary, "files": args.files, "big_mib": args.big_mib}, f, indent=1
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
