#!/usr/bin/env python3
"""Daemon micro-benchmarks (root): metadata latency under cold reads, warm tree walks, RSS,
daemon CPU per request, FUSE request counts.

    scripts/bench_daemon.py WORKDIR [--files N] [--big-mib M] [--seconds S] [--only W,...]
                                    [--calls N] [--pin CPU]

Builds (once, reused) a two-layer chain under WORKDIR: N small files in directories of 100
plus, in the bottom layer, one file of M MiB for random reads. Then, on a fresh layerfs mount:

* ``meta``: getxattr latency (p50/p99 in microseconds; FUSE does not cache xattrs, so every
  call reaches the daemon; one probe every 0.5 ms) while idle, then while another process
  does 4 KiB random reads of the big file after ``drop_caches`` (POSIX_FADV_RANDOM, so no
  readahead hides the disk); ``reader_reads`` is how many reads that process completed;
* ``tree``: warm ``tar -cf - . | cat``, ``find`` and ``ls -laR`` (each run once cold to prime,
  then timed warm, median of 3);
* ``rss``: the daemon's VmRSS after one full ``find`` (and that find's time, cold and warm);
* ``cpu``: daemon CPU per uncached request: ``--calls`` (100k) ``lgetxattr`` calls on one file
  (FUSE never caches xattrs, so each is one request), the daemon's utime+stime from
  ``/proc/PID/stat`` divided by the requests the kernel sent (counted by the tracepoint);
* ``requests``: FUSE requests (``fuse:fuse_request_send`` tracepoint, by opcode) of each tree
  workload, cold and warm.

``--pin CPU`` runs this process, its children and every daemon thread on that one CPU (far
steadier on a shared VM; it also shows the cost of the client/daemon hand-over).

The daemon imported is the ``layerfs`` found first on PYTHONPATH, so the same script measures
two checkouts. Prints one JSON object.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import json
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time
from typing import Any

from layerfs.fs.mount import spawn_daemon, unmount

# fusetrace from this checkout, whichever layerfs is measured (an older one may not have it)
_ft_path = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "layerfs")
_ft_spec = importlib.util.spec_from_file_location(
    "bench_fusetrace", os.path.join(_ft_path, "fs", "fusetrace.py")
)
assert _ft_spec is not None and _ft_spec.loader is not None
fusetrace = importlib.util.module_from_spec(_ft_spec)
_ft_spec.loader.exec_module(fusetrace)


def drop_caches() -> None:
    os.sync()
    with open("/proc/sys/vm/drop_caches", "w") as f:
        f.write("3\n")


def build(work: str, files: int, big_mib: int) -> list[str]:
    top, bottom = os.path.join(work, "top"), os.path.join(work, "bottom")
    stamp = os.path.join(work, f"built-{files}-{big_mib}")
    if os.path.exists(stamp):
        return [top, bottom]
    subprocess.run(["rm", "-rf", top, bottom], check=True)
    rng = random.Random(1)
    for i in range(files):
        layer = top if i % 4 == 0 else bottom
        d = os.path.join(layer, f"d{i // 100:04d}")
        os.makedirs(d, exist_ok=True)
        path = os.path.join(d, f"f{i:06d}")
        with open(path, "wb") as f:
            f.write(rng.randbytes(rng.randrange(64, 8192)))
        os.setxattr(path, "user.bench", b"1")
    with open(os.path.join(bottom, "big"), "wb") as f:
        chunk = rng.randbytes(1 << 20)
        for _ in range(big_mib):
            f.write(chunk)
    os.setxattr(os.path.join(bottom, "big"), "user.bench", b"1")
    open(stamp, "w").close()
    return [top, bottom]


PROBE_PAUSE = 0.0005
"""Seconds between two probes (a busy-looping probe would compete with the reads it measures)."""


def pct(xs: list[float], p: float) -> float:
    xs = sorted(xs)
    return round(xs[min(len(xs) - 1, int(len(xs) * p))] * 1e6, 1)


def probe(path: str, seconds: float, pause: float = PROBE_PAUSE) -> dict[str, float]:
    lat: list[float] = []
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        t0 = time.perf_counter()
        os.getxattr(path, "user.bench")
        lat.append(time.perf_counter() - t0)
        time.sleep(pause)  # a paced probe: it must not load the daemon itself
    return {"n": len(lat), "p50_us": pct(lat, 0.5), "p99_us": pct(lat, 0.99)}


READER = r"""
import os, random, sys, time
fd = os.open(sys.argv[1], os.O_RDONLY)
os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_RANDOM)
size = os.fstat(fd).st_size
rng = random.Random(2)
end = time.monotonic() + float(sys.argv[2])
n = 0
while time.monotonic() < end:
    os.pread(fd, 4096, rng.randrange(size // 4096) * 4096)
    n += 1
print(n)
"""


def meta(mnt: str, seconds: float) -> dict[str, Any]:
    target = os.path.join(mnt, "d0000", "f000000")
    probe(target, 0.5)  # warm the path
    idle = probe(target, seconds)
    drop_caches()
    probe(target, 0.2)  # re-resolve the path after drop_caches dropped the dentries
    reader = subprocess.Popen(
        [sys.executable, "-c", READER, os.path.join(mnt, "big"), str(seconds + 1)],
        stdout=subprocess.PIPE,
        text=True,
    )
    time.sleep(0.5)  # let the reader get going (a benchmark, not a test)
    busy = probe(target, seconds)
    out, _ = reader.communicate()
    return {"idle": idle, "cold_reads": busy, "reader_reads": int(out.strip())}


def timed(cmd: str, cwd: str) -> float:
    t0 = time.perf_counter()
    subprocess.run(["bash", "-o", "pipefail", "-c", cmd], cwd=cwd, check=True)
    return time.perf_counter() - t0


TREE = {
    "tar": "tar -cf - . | cat > /dev/null",
    "find": "find . -printf '%p %s %m %U %G %T@ %n\\n' > /dev/null",
    "ls-laR": "ls -laR . > /dev/null",
}


def tree(mnt: str) -> dict[str, float]:
    out = {}
    for name, cmd in TREE.items():
        timed(cmd, mnt)
        out[name] = round(statistics.median(timed(cmd, mnt) for _ in range(3)), 3)
    return out


def rss_kib(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return -1


def rss(mnt: str, pid: int) -> dict[str, float]:
    before = rss_kib(pid)
    cold = timed(TREE["find"], mnt)
    after = rss_kib(pid)
    warm = statistics.median(timed(TREE["find"], mnt) for _ in range(3))
    return {
        "rss_mounted_mib": round(before / 1024, 1),
        "rss_after_find_mib": round(after / 1024, 1),
        "find_first_s": round(cold, 3),
        "find_warm_s": round(warm, 3),
    }


def pin_threads(pid: int, cpu: int) -> None:
    """Put every thread of *pid* on *cpu* (threads started later inherit it)."""
    for tid in os.listdir(f"/proc/{pid}/task"):
        with contextlib.suppress(OSError):  # a thread that just ended
            os.sched_setaffinity(int(tid), {cpu})


def cpu_ticks(pid: int) -> int:
    """utime + stime of process *pid* (all its threads), in clock ticks."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return int(fields[11]) + int(fields[12])  # fields 14 and 15 of proc(5)


def cpu(mnt: str, pid: int, calls: int) -> dict[str, Any]:
    target = os.path.join(mnt, "d0000", "f000000")
    for _ in range(1000):  # warm the path and the daemon
        os.getxattr(target, "user.bench", follow_symlinks=False)
    with fusetrace.RequestCounter(mnt) as rc:
        rc.start()
        t0, c0 = time.perf_counter(), cpu_ticks(pid)
        for _ in range(calls):
            os.getxattr(target, "user.bench", follow_symlinks=False)
        wall, ticks = time.perf_counter() - t0, cpu_ticks(pid) - c0
        counts = rc.stop()
    requests = sum(counts.values())
    per_s = os.sysconf("SC_CLK_TCK")
    return {
        "calls": calls,
        "requests": requests,
        "daemon_cpu_us_per_request": round(ticks / per_s / max(requests, 1) * 1e6, 2),
        "wall_us_per_call": round(wall / calls * 1e6, 2),
    }


def requests(mnt: str) -> dict[str, dict[str, int]]:
    out: dict[str, dict[str, int]] = {}
    for name, cmd in TREE.items():
        drop_caches()
        for phase in ("cold", "warm"):
            with fusetrace.RequestCounter(mnt) as rc:
                rc.start()
                timed(cmd, mnt)
                counts = rc.stop()
            out[f"{name} {phase}"] = {"total": sum(counts.values()), **dict(counts.most_common())}
    return out


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("workdir")
    p.add_argument("--files", type=int, default=20000)
    p.add_argument("--big-mib", type=int, default=2048)
    p.add_argument("--seconds", type=float, default=3.0)
    p.add_argument("--only", default="meta,tree,rss,cpu,requests")
    p.add_argument("--calls", type=int, default=100_000, help="lgetxattr calls for cpu")
    p.add_argument("--pin", type=int, metavar="CPU", help="run client and daemon on this CPU")
    a = p.parse_args()
    os.makedirs(a.workdir, exist_ok=True)
    dirs = build(a.workdir, a.files, a.big_mib)
    if a.pin is not None:
        os.sched_setaffinity(0, {a.pin})
    result: dict[str, Any] = {"files": a.files, "pin": a.pin}
    for what in a.only.split(","):
        mnt = tempfile.mkdtemp(dir=a.workdir, prefix="mnt-")
        log = mnt + ".log"
        drop_caches()
        pid = spawn_daemon(dirs, [], mnt, index_path=None, log_path=log)
        if a.pin is not None:
            pin_threads(pid, a.pin)
        try:
            if what == "meta":
                result["meta"] = meta(mnt, a.seconds)
            elif what == "tree":
                result["tree"] = tree(mnt)
            elif what == "rss":
                result["rss"] = rss(mnt, pid)
            elif what == "cpu":
                result["cpu"] = cpu(mnt, pid, a.calls)
            elif what == "requests":
                result["requests"] = requests(mnt)
        finally:
            unmount(mnt, pid)
            os.rmdir(mnt)
            os.unlink(log)
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
