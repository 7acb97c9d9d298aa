#!/usr/bin/env python3
"""Benchmark layerfs against fuse-overlayfs and kernel overlayfs on the same layer dirs.

    sudo scripts/bench.py [--repeat N] [--quick] [--chains a,b,c] [--workloads w1,w2]
                          [--json FILE] [--plot FILE.png] [--workdir DIR] [--pin CPU]

Builds the test chains (cached in the work dir), imports them with ``layerfs import-layer``,
then mounts the same ``diff/`` directories with layerfs, fuse-overlayfs and the kernel, and
runs every workload cold (fresh mount + sync + drop_caches) and warm (immediate repeat),
alternating the systems' order. Store workloads compare the layerfs CLI with the Go
``containers-storage`` tool. Prints medians with min-max and the ratios, and a "targets"
section. Needs root (mounts, drop_caches). Every mount it makes is undone on exit.

For the two FUSE systems it also counts the requests the kernel sends during each workload
(the ``fuse:fuse_request_send`` tracepoint, per connection) and, in the ``xattr-cpu``
workload, measures daemon CPU per uncached request: 100k ``lgetxattr`` calls (FUSE never
caches xattrs) against the daemon's utime+stime from ``/proc/PID/stat``. ``--pin CPU`` runs
the clients and every daemon thread on that one CPU (steadier on a shared VM).
"""

from __future__ import annotations

import argparse
import atexit
import contextlib
import json
import os
import random
import shutil
import signal
import statistics
import subprocess
import sys
import time
from collections import defaultdict
from typing import Any

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
VENV_PY = os.path.join(REPO, ".venv", "bin", "python")

# On a fresh machine: install the packages, the venv and the bench extra (matplotlib) first.
if os.geteuid() == 0 and not os.environ.get("LAYERFS_BENCH_NO_REEXEC"):
    need_setup = not os.path.exists(VENV_PY)
    if not need_setup:
        probe = "import layerfs, matplotlib"
        need_setup = subprocess.run([VENV_PY, "-c", probe], capture_output=True).returncode != 0
    if need_setup:
        subprocess.run([os.path.join(HERE, "setup")], check=True)
        subprocess.run(
            [VENV_PY, "-m", "pip", "install", "-q", "-e", f"{REPO}[bench]"],
            check=True,
            capture_output=True,
        )

# Run under the project's venv (matplotlib, layerfs) when started with another python.
if (
    os.path.exists(VENV_PY)
    and os.path.realpath(sys.prefix) != os.path.realpath(os.path.join(REPO, ".venv"))
    and not os.environ.get("LAYERFS_BENCH_NO_REEXEC")
):
    os.environ["LAYERFS_BENCH_NO_REEXEC"] = "1"
    os.execv(VENV_PY, [VENV_PY, os.path.abspath(__file__), *sys.argv[1:]])

sys.path.insert(0, HERE)
sys.path.insert(0, REPO)
import bench_workloads as bw  # noqa: E402

from layerfs.fs import fusetrace  # noqa: E402

LAYERFS = os.path.join(REPO, ".venv", "bin", "layerfs")
if not os.path.exists(LAYERFS):
    LAYERFS = shutil.which("layerfs") or LAYERFS
GO = "containers-storage"
CHILD_PY = "/usr/bin/python3" if os.path.exists("/usr/bin/python3") else sys.executable
SYSTEMS = ("layerfs", "fuse-overlayfs", "kernel")
READ_WORKLOADS = ("find", "ls-laR", "tar", "seqread", "randread", "stat")
FS_WORKLOADS = ("mount", *READ_WORKLOADS, "xattr-cpu")
FUSE_SYSTEMS = ("layerfs", "fuse-overlayfs")
STORE_WORKLOADS = ("import", "layers-json", "create-delete")
ALL_WORKLOADS = FS_WORKLOADS + STORE_WORKLOADS
CHAIN_SPEC = 4  # bump when the builders change, to rebuild cached chains


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


# Children get cached bytecode even where the caller set PYTHONDONTWRITEBYTECODE (as an installed
# package would have); the cache goes to the work dir, not into the checkout.
CHILD_ENV = {k: v for k, v in os.environ.items() if k != "PYTHONDONTWRITEBYTECODE"}


def run(cmd: list[str], **kw: Any) -> subprocess.CompletedProcess:
    kw.setdefault("env", CHILD_ENV)
    kw.setdefault("stdout", subprocess.PIPE)
    kw.setdefault("stderr", subprocess.PIPE)
    return subprocess.run(cmd, text=True, **kw)


def must(cmd: list[str], **kw: Any) -> subprocess.CompletedProcess:
    r = run(cmd, **kw)
    if r.returncode != 0:
        raise RuntimeError(
            f"{' '.join(cmd)!r} failed (rc {r.returncode}): {(r.stderr or '').strip()[-500:]}"
        )
    return r


def timed(cmd: list[str], **kw: Any) -> tuple[float, subprocess.CompletedProcess]:
    t = time.perf_counter()
    r = run(cmd, **kw)
    return time.perf_counter() - t, r


def drop_caches() -> None:
    os.sync()
    with open("/proc/sys/vm/drop_caches", "w") as f:
        f.write("3\n")


def alive(pid: int) -> bool:
    """True while ``pid`` runs (a zombie, not yet reaped by its reaper, counts as gone)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def pin_threads(pid: int | None, cpu: int | None) -> None:
    """Put every thread of *pid* on *cpu* (threads it starts later inherit that)."""
    if pid is None or cpu is None:
        return
    with contextlib.suppress(OSError):
        for tid in os.listdir(f"/proc/{pid}/task"):
            with contextlib.suppress(OSError):  # a thread that just ended
                os.sched_setaffinity(int(tid), {cpu})


def cpu_ticks(pid: int) -> int:
    """utime + stime of process *pid* (all threads), clock ticks (proc(5) fields 14, 15)."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return int(fields[11]) + int(fields[12])


def vm_hwm(pid: int | None) -> int | None:
    if not pid:
        return None
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


# ---------------------------------------------------------------------------- state / cleanup


class Bench:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.work = args.workdir
        self.g = os.path.join(self.work, "store")
        self.r = os.path.join(self.work, "run")
        self.mounted: dict[str, str] = {}  # mountpoint -> system
        self.layerfs_targets: dict[str, str] = {}  # mountpoint -> layer id
        self.go_stores: set[tuple[str, str]] = set()
        self.chains: dict[str, dict[str, Any]] = {}
        self.results: list[dict[str, Any]] = []
        self.notes: list[str] = []
        self.no_trace = False

    def lfs(self, *a: str, g: str | None = None, r: str | None = None) -> list[str]:
        return [self.args.layerfs, "--root", g or self.g, "--runroot", r or self.r, *a]

    def go(self, g: str, r: str, *a: str) -> list[str]:
        self.go_stores.add((g, r))
        return [GO, "-g", g, "-R", r, "-s", "overlay", *a]

    def go_shutdown(self, g: str, r: str) -> None:
        run([GO, "-g", g, "-R", r, "-s", "overlay", "shutdown"])
        self.go_stores.discard((g, r))

    def cleanup(self) -> None:
        for mnt in list(self.mounted):
            try:
                self.unmount(mnt)
            except Exception as e:
                log(f"cleanup: {mnt}: {e}")
        for g, r in list(self.go_stores):
            self.go_shutdown(g, r)

    # ------------------------------------------------------------------------ mounting

    def lowerdir(self, chain: dict[str, Any]) -> str:
        ov = os.path.join(self.g, "overlay")
        parts = []
        for lid in reversed(chain["layers"]):  # top first
            with open(os.path.join(ov, lid, "link")) as f:
                parts.append("l/" + f.read().strip())
        if len(parts) == 1:  # the kernel wants two lowers without an upper (Go does the same)
            parts.append(f"{chain['layers'][0]}/empty")
        return ":".join(parts)

    def mount(self, system: str, key: str, cold_index: bool = False) -> tuple[float, int | None]:
        """Mount chain ``key`` with ``system``; returns (seconds until live, daemon pid)."""
        chain = self.chains[key]
        mnt = os.path.join(self.work, "mnt", f"{system}-{key}")
        os.makedirs(mnt, exist_ok=True)
        ov = os.path.join(self.g, "overlay")
        top = chain["layers"][-1]
        if system == "layerfs":
            if cold_index:
                for lid in chain["layers"]:
                    with contextlib.suppress(FileNotFoundError):
                        os.unlink(os.path.join(ov, lid, "layerfs.index"))
            self.mounted[mnt] = system
            self.layerfs_targets[mnt] = top
            dt, r = timed(self.lfs("mount", top, mnt))
            if r.returncode != 0:
                self.mounted.pop(mnt)
                raise RuntimeError(f"layerfs mount failed: {r.stderr.strip()[-400:]}")
            pid = None
            ps = json.loads(must(self.lfs("ps", "--json")).stdout or "[]")
            for m in ps:
                if m.get("id") == top:
                    pid = m.get("pid")
            pin_threads(pid, self.args.pin)
            return dt, pid
        low = self.lowerdir(chain)
        if system == "kernel":
            cmd = ["mount", "-t", "overlay", "overlay", "-o", f"ro,lowerdir={low}", mnt]
        else:
            cmd = ["fuse-overlayfs", "-o", f"lowerdir={low}", mnt]
        self.mounted[mnt] = system
        dt, r = timed(cmd, cwd=ov)
        if r.returncode != 0 or not os.path.ismount(mnt):
            self.mounted.pop(mnt)
            raise RuntimeError(f"{system} mount failed: {r.stderr.strip()[-400:]}")
        pid = self.fuse_pid(mnt) if system == "fuse-overlayfs" else None
        pin_threads(pid, self.args.pin)
        return dt, pid

    @staticmethod
    def fuse_pid(mnt: str) -> int | None:
        from layerfs.fs.mount import find_mount_process

        return find_mount_process(mnt, b"fuse-overlayfs")

    def unmount(self, mnt: str) -> None:
        system = self.mounted.get(mnt)
        if system == "layerfs":
            top = self.layerfs_targets[mnt]
            r = run(self.lfs("unmount", top))
            if r.returncode != 0 or os.path.ismount(mnt):
                run(self.lfs("unmount", "--force", top))
        elif system == "fuse-overlayfs":
            pid = self.fuse_pid(mnt)
            r = run(["fusermount3", "-u", mnt])
            if r.returncode != 0:
                run(["umount", "-l", mnt])
            for _ in range(200):  # let the daemon exit before the next mount
                if not pid or not alive(pid):
                    break
                time.sleep(0.01)
        elif system == "kernel" and run(["umount", mnt]).returncode != 0:
            run(["umount", "-l", mnt])
        if os.path.ismount(mnt):
            raise RuntimeError(f"could not unmount {mnt}")
        self.mounted.pop(mnt, None)

    # ------------------------------------------------------------------------ chains

    def build_chains(self) -> None:
        os.makedirs(self.g, exist_ok=True)
        os.makedirs(self.r, exist_ok=True)
        cache_file = os.path.join(self.work, "chains.json")
        try:
            with open(cache_file) as f:
                cache = json.load(f)
        except (OSError, ValueError):
            cache = {}
        known = {rec["id"] for rec in json.loads(must(self.lfs("layers", "--json")).stdout or "[]")}
        scale = 0.1 if self.args.quick else 1.0
        for name in self.args.chains:
            key = ("q" if self.args.quick else "") + name
            spec = {"spec": CHAIN_SPEC, "scale": scale}
            c = cache.get(key)
            if (
                c
                and c.get("spec") == spec
                and all(lid in known for lid in c["layers"])
                and all(
                    os.path.isdir(os.path.join(self.g, "overlay", lid, "diff"))
                    for lid in c["layers"]
                )
            ):
                log(f"chain {key}: reusing {len(c['layers'])} layers")
                self.chains[key] = c
                continue
            if c:  # stale: delete its layers, top first
                for lid in reversed(c["layers"]):
                    run(self.lfs("delete-layer", lid))
            outdir = os.path.join(self.work, "tars", key)
            shutil.rmtree(outdir, ignore_errors=True)
            os.makedirs(outdir)
            log(f"chain {key}: building tars")
            note = ""
            if name == "a":
                note = bw.debootstrap(os.path.join(self.work, "src", "debian"), log)
                tars, big = bw.build_chain_a(
                    outdir,
                    os.path.join(self.work, "src", "debian"),
                    note.startswith("FALLBACK"),
                    scale,
                    log,
                )
            elif name == "b":
                tars, big = bw.build_chain_b(outdir, scale, log)
            else:
                tars, big = bw.build_chain_c(outdir, scale, log)
            ids: list[str] = []
            t0 = time.perf_counter()
            for tar in tars:
                cmd = self.lfs("import-layer", *(["--parent", ids[-1]] if ids else []), tar)
                ids.append(must(cmd).stdout.split()[0])
            log(f"chain {key}: imported {len(ids)} layers in {time.perf_counter() - t0:.1f} s")
            c = {"spec": spec, "layers": ids, "big": big, "note": note, "tars": tars}
            self.chains[key] = c
            cache[key] = c
            with open(cache_file, "w") as f:
                json.dump(cache, f, indent=1)
        for key, c in self.chains.items():
            if c.get("note"):
                self.notes.append(f"chain {key}: {c['note']}")
        self.prepare_paths()

    def prepare_paths(self) -> None:
        """Per chain: the merged entry count and a fixed random list of paths for ``stat``."""
        n = 2000 if self.args.quick else 10_000
        for key, c in self.chains.items():
            pf = os.path.join(self.work, f"paths-{key}-{n}.txt")
            if os.path.exists(pf) and c.get("entries"):
                c["paths"] = pf
                continue
            self.mount("kernel", key)
            mnt = os.path.join(self.work, "mnt", f"kernel-{key}")
            try:
                allp = []
                for root, dirs, files in os.walk(mnt):
                    rel = os.path.relpath(root, mnt)
                    for x in dirs + files:
                        allp.append(os.path.normpath(os.path.join(rel, x)))
            finally:
                self.unmount(mnt)
            allp.sort()
            c["entries"] = len(allp)
            sample = random.Random(42).sample(allp, min(n, len(allp)))
            with open(pf, "wb") as f:
                f.write(b"".join(os.fsencode(p) + b"\n" for p in sample))
            c["paths"] = pf
            log(f"chain {key}: {len(allp)} merged entries (kernel view)")

    # ------------------------------------------------------------------------ fs workloads

    def workload(self, wl: str, key: str, mnt: str) -> dict[str, Any]:
        c = self.chains[key]
        quick = self.args.quick
        if wl == "find":
            dt, r = timed(["find", ".", "-printf", "%p %s %m %U %G %T@ %n\n"], cwd=mnt)
            return {"s": dt, "rc": r.returncode, "entries": r.stdout.count("\n") - 1}
        if wl == "ls-laR":
            dt, r = timed(["ls", "-laR", "."], cwd=mnt, stdout=subprocess.DEVNULL)
            return {"s": dt, "rc": r.returncode}
        if wl == "tar":
            dt, r = timed(
                ["bash", "-o", "pipefail", "-c", "tar -cf - . | cat > /dev/null"], cwd=mnt
            )
            return {"s": dt, "rc": r.returncode, "err": r.stderr.strip()[-200:] or None}
        if wl == "seqread":
            dt, r = timed(["dd", f"if={c['big']}", "of=/dev/null", "bs=1M", "status=none"], cwd=mnt)
            return {"s": dt, "rc": r.returncode}
        if wl == "randread":
            n = 500 if quick else 2000
            dt, r = timed(
                [CHILD_PY, "-S", "-c", bw.RANDREAD_CHILD, os.path.join(mnt, c["big"]), str(n), "7"]
            )
            inner = float(r.stdout.split()[0]) if r.returncode == 0 else None
            return {"s": inner if inner is not None else dt, "outer_s": dt, "rc": r.returncode}
        if wl == "stat":
            dt, r = timed([CHILD_PY, "-S", "-c", bw.STAT_CHILD, mnt, c["paths"]])
            out = r.stdout.split()
            inner = float(out[0]) if r.returncode == 0 else None
            return {
                "s": inner if inner is not None else dt,
                "outer_s": dt,
                "rc": r.returncode,
                "missing": int(out[1]) if len(out) > 1 else None,
            }
        raise ValueError(wl)

    def xattr_target(self, key: str, mnt: str) -> str:
        """A regular file of the chain (from its stat path list) as seen under *mnt*."""
        with open(self.chains[key]["paths"], "rb") as f:
            for line in f:
                p = os.path.join(mnt, os.fsdecode(line.rstrip(b"\n")))
                with contextlib.suppress(OSError):
                    if os.path.isfile(p) and not os.path.islink(p):
                        return p
        raise RuntimeError(f"chain {key}: no regular file for xattr-cpu")

    def xattr_cpu(self, key: str, mnt: str, pid: int) -> dict[str, Any]:
        """Daemon CPU per request over N lgetxattr calls of a missing name (each one request)."""
        n = 20_000 if self.args.quick else 100_000
        path = self.xattr_target(key, mnt)
        name = "user.layerfs-bench-missing"

        def loop(count: int) -> None:
            for _ in range(count):
                with contextlib.suppress(OSError):
                    os.getxattr(path, name, follow_symlinks=False)

        loop(1000)  # warm
        with fusetrace.RequestCounter(mnt) as rc:
            rc.start()
            t0, c0 = time.perf_counter(), cpu_ticks(pid)
            loop(n)
            wall, ticks = time.perf_counter() - t0, cpu_ticks(pid) - c0
            sent = sum(rc.stop().values())
        us = ticks / os.sysconf("SC_CLK_TCK") / max(sent, 1) * 1e6
        return {"s": us, "wall_us": wall / n * 1e6, "requests": sent, "calls": n, "rc": 0}

    def counted(self, system: str, mnt: str, fn: Any) -> tuple[dict[str, Any], int | None]:
        """Run *fn()* (a workload); for a FUSE system also count its requests."""
        if system not in FUSE_SYSTEMS or self.no_trace:
            return fn(), None
        try:
            rc = fusetrace.RequestCounter(mnt)
            rc.open()
        except (fusetrace.TraceUnavailable, OSError) as e:
            self.no_trace = True
            self.notes.append(f"request counts unavailable: {e}")
            return fn(), None
        try:
            rc.start()
            res = fn()
            counts = rc.stop()
        finally:
            rc.close()
        return res, sum(counts.values())

    def record(self, **kw: Any) -> None:
        self.results.append(kw)
        if kw.get("rc", 0) not in (0, None):
            log(f"  NOTE nonzero rc: {kw}")

    def run_fs(self) -> None:
        wls = [w for w in FS_WORKLOADS if w in self.args.workloads]
        if not wls:
            return
        for rep in range(self.args.repeat):
            for ci, key in enumerate(self.chains):
                c = self.chains[key]
                for wi, wl in enumerate(wls):
                    if wl in ("seqread", "randread") and not c.get("big"):
                        continue
                    if wl == "xattr-cpu" and rep > 0:
                        continue  # one 100k-call sample per system and chain is plenty
                    k = (rep + ci + wi) % 3
                    order = SYSTEMS[k:] + SYSTEMS[:k]
                    for system in order:
                        try:
                            self.session(rep, key, wl, system)
                        except Exception as e:
                            log(f"  ERROR {key}/{wl}/{system}: {e}")
                            self.record(
                                rep=rep,
                                chain=key,
                                workload=wl,
                                system=system,
                                phase="cold",
                                s=None,
                                rc=-1,
                                err=str(e)[-300:],
                            )
                            for mnt in [m for m, s in self.mounted.items() if s == system]:
                                try:
                                    self.unmount(mnt)
                                except Exception as e2:
                                    log(f"  unmount after error: {e2}")
                log(f"rep {rep + 1}/{self.args.repeat} chain {key} done")

    def session(self, rep: int, key: str, wl: str, system: str) -> None:
        mnt = os.path.join(self.work, "mnt", f"{system}-{key}")
        base = {"rep": rep, "chain": key, "workload": wl, "system": system}
        if wl == "mount":
            # cold: caches dropped (and, for layerfs, no persisted index); warm: immediate remount
            drop_caches()
            if system == "layerfs":
                for lid in self.chains[key]["layers"]:
                    with_index = os.path.join(self.g, "overlay", lid, "layerfs.index")
                    if os.path.exists(with_index):
                        os.unlink(with_index)
            dt, pid = self.mount(system, key, cold_index=True)
            self.record(**base, phase="cold", s=dt, rc=0)
            if pid:
                self.record(**base, phase="rss-after-mount", s=None, rss=vm_hwm(pid), rc=0)
            self.unmount(mnt)
            dt, _ = self.mount(system, key)
            self.record(**base, phase="warm", s=dt, rc=0)
            self.unmount(mnt)
            return
        if wl == "xattr-cpu":
            if system not in FUSE_SYSTEMS:
                return
            _, pid = self.mount(system, key)
            try:
                if pid:
                    res = self.xattr_cpu(key, mnt, pid)
                    self.record(**base, phase="op", **res)
                    log(f"  {key} {wl:<9} {system:<15} {res['s']:.1f} us/request")
            finally:
                self.unmount(mnt)
            return
        _, pid = self.mount(system, key)
        try:
            drop_caches()
            res, n = self.counted(system, mnt, lambda: self.workload(wl, key, mnt))
            self.record(**base, phase="cold", requests=n, **res)
            res2, n2 = self.counted(system, mnt, lambda: self.workload(wl, key, mnt))
            self.record(**base, phase="warm", requests=n2, **res2)
            log(f"  {key} {wl:<9} {system:<15} cold {res['s']:.3f} s  warm {res2['s']:.3f} s")
            if pid:
                self.record(**base, phase="rss", s=None, rss=vm_hwm(pid), rc=0)
        finally:
            self.unmount(mnt)

    # ------------------------------------------------------------------------ store workloads

    def scratch(self, name: str) -> tuple[str, str]:
        g = os.path.join(self.work, "scratch", name)
        r = os.path.join(self.work, "scratch", name + ".run")
        for d in (g, r):
            if os.path.ismount(os.path.join(g, "overlay")):
                run([GO, "-g", g, "-R", r, "-s", "overlay", "shutdown"])
            shutil.rmtree(d, ignore_errors=True)
            os.makedirs(d)
        return g, r

    def store_op(
        self,
        who: str,
        g: str,
        r: str,
        args: tuple[str, ...],
        go_args: tuple[str, ...],
        *,
        workload: str,
        rep: int,
        phase: str = "op",
        **extra: Any,
    ) -> subprocess.CompletedProcess:
        """Run one store command with layerfs (``args``) or Go (``go_args``), timed and
        recorded; returns the finished process."""
        cmd = self.lfs(*args, g=g, r=r) if who == "layerfs" else self.go(g, r, *go_args)
        dt, res = timed(cmd)
        self.record(
            rep=rep,
            chain="store",
            workload=workload,
            system=who,
            phase=phase,
            s=dt,
            rc=res.returncode,
            **extra,
        )
        return res

    def run_store(self) -> None:
        wls = [w for w in STORE_WORKLOADS if w in self.args.workloads]
        quick = self.args.quick
        if "import" in wls:
            key = next((k for k in self.chains if k.endswith("a")), None)
            if key is None:
                self.notes.append("import: skipped (needs chain a for the rootfs tarball)")
            else:
                tar = self.chains[key]["tars"][0]
                size = os.path.getsize(tar)
                for rep in range(self.args.repeat):
                    order = ("layerfs", "go") if rep % 2 == 0 else ("go", "layerfs")
                    for who in order:
                        g, r = self.scratch(f"import-{who}")
                        with open(tar, "rb") as f:  # page the tar in, and flush earlier writes
                            while f.read(1 << 22):
                                pass
                        os.sync()
                        self.store_op(
                            who,
                            g,
                            r,
                            ("import-layer", tar),
                            ("import-layer", "-f", tar),
                            workload="import",
                            rep=rep,
                            bytes=size,
                        )
                        if who == "go":
                            self.go_shutdown(g, r)
                    log(f"import rep {rep + 1}/{self.args.repeat}")
        if "layers-json" in wls:
            n = 500 if quick else 5000
            g, r = self.big_store(n)
            for rep in range(self.args.repeat):
                order = ("layerfs", "go") if rep % 2 == 0 else ("go", "layerfs")
                for who in order:
                    res = self.store_op(
                        who,
                        g,
                        r,
                        ("layers", "--json"),
                        ("layers", "--json"),
                        workload="layers-json",
                        rep=rep,
                        phase=f"{n}",
                    )
                    self.results[-1]["out_bytes"] = len(res.stdout)
            self.go_shutdown(g, r)
        if "create-delete" in wls:
            n = 30 if quick else self.args.store_ops
            for rep in range(self.args.store_repeat):
                order = ("layerfs", "go") if rep % 2 == 0 else ("go", "layerfs")
                for who in order:
                    g, r = self.scratch(f"cd-{who}")
                    ids = []
                    for i in range(n):
                        res = self.store_op(
                            who,
                            g,
                            r,
                            ("create-layer",),
                            ("create-layer",),
                            workload="create-layer",
                            rep=rep,
                            i=i,
                        )
                        ids.append(res.stdout.split()[0] if res.returncode == 0 else None)
                    for i, lid in enumerate(ids):
                        if lid is None:
                            continue
                        self.store_op(
                            who,
                            g,
                            r,
                            ("delete-layer", lid),
                            ("delete-layer", lid),
                            workload="delete-layer",
                            rep=rep,
                            i=i,
                        )
                    if who == "go":
                        self.go_shutdown(g, r)
                    log(f"create/delete {who}: {n} ops done")

    def big_store(self, n: int) -> tuple[str, str]:
        """A store with ``n`` layers (cached), made through the layerfs Python API."""
        g = os.path.join(self.work, f"store-{n}")
        r = os.path.join(self.work, f"store-{n}.run")
        done = g + ".complete"
        if os.path.exists(done):
            return g, r
        shutil.rmtree(g, ignore_errors=True)
        shutil.rmtree(r, ignore_errors=True)
        log(f"building a {n}-layer store with the layerfs API (once) ...")
        code = (
            "import sys\nfrom layerfs import Store\n"
            "s = Store(sys.argv[1], sys.argv[2])\n"
            "prev = None\n"
            "for i in range(int(sys.argv[3])):\n"
            "    lay = s.create_layer(names=[f'bench-{i}'], parent=prev if i % 5 else None)\n"
            "    prev = lay.id\n"
        )
        t = time.perf_counter()
        must([VENV_PY, "-c", code, g, r, str(n)])
        open(done, "w").close()
        log(f"  built in {time.perf_counter() - t:.0f} s")
        return g, r


# ---------------------------------------------------------------------------- reporting


def summarize(
    results: list[dict[str, Any]],
) -> dict[tuple[str, str, str], dict[str, dict[str, Any]]]:
    """(chain, workload, phase) -> system -> {median, min, max, n, errors}."""
    groups: dict[tuple[str, str, str, str], list[float]] = defaultdict(list)
    errors: dict[tuple[str, str, str, str], int] = defaultdict(int)
    for r in results:
        sysname = r["system"]
        if r["phase"].startswith("rss"):
            if r.get("rss") is None:
                continue
            k = (r["chain"], "daemon-rss", "peak", sysname)
            groups[k].append(r["rss"])
            continue
        k = (r["chain"], r["workload"], r["phase"], sysname)
        if r.get("rc", 0) not in (0, None) or r.get("s") is None:
            errors[k] += 1
        if r.get("s") is not None:
            groups[k].append(r["s"])
    # daemon RSS: one figure per (chain, system, rep) = the max over that rep's sessions
    rss_rep: dict[tuple[str, str, int], int] = {}
    for r in results:
        if r["phase"].startswith("rss") and r.get("rss"):
            kk = (r["chain"], r["system"], r["rep"])
            rss_rep[kk] = max(rss_rep.get(kk, 0), r["rss"])
    for k in [k for k in groups if k[1] == "daemon-rss"]:
        del groups[k]
    for (chain, sysname, _), v in rss_rep.items():
        groups[(chain, "daemon-rss", "peak", sysname)].append(v)
    out: dict[tuple[str, str, str], dict[str, dict[str, Any]]] = defaultdict(dict)
    for (chain, wl, phase, sysname), vals in groups.items():
        out[(chain, wl, phase)][sysname] = {
            "median": statistics.median(vals),
            "min": min(vals),
            "max": max(vals),
            "n": len(vals),
            "errors": errors.get((chain, wl, phase, sysname), 0),
        }
    for k, e in errors.items():
        if e and (k[0], k[1], k[2]) in out and k[3] not in out[(k[0], k[1], k[2])]:
            out[(k[0], k[1], k[2])][k[3]] = {
                "median": None,
                "min": None,
                "max": None,
                "n": 0,
                "errors": e,
            }
    return out


def fmt(v: float | None, rss: bool = False) -> str:
    if v is None:
        return "-"
    if rss:
        return f"{v / 1e6:.0f}MB"
    if v >= 100:
        return f"{v:.0f}"
    if v >= 1:
        return f"{v:.2f}"
    if v >= 0.01:
        return f"{v:.3f}"
    return f"{v * 1000:.2f}ms"


def cell(d: dict[str, Any] | None, rss: bool = False) -> str:
    if not d or d["median"] is None:
        return "ERR" if d else "-"
    s = f"{fmt(d['median'], rss)} [{fmt(d['min'], rss)}-{fmt(d['max'], rss)}]"
    if d["errors"]:
        s += f" !{d['errors']}err"
    return s


def ratio(a: dict[str, Any] | None, b: dict[str, Any] | None) -> float | None:
    if not a or not b or not a["median"] or not b["median"]:
        return None
    return a["median"] / b["median"]


def rs(x: float | None) -> str:
    return "-" if x is None else f"{x:.2f}x"


def report(
    bench: Bench, summary: dict, args: argparse.Namespace
) -> tuple[str, list[dict[str, Any]]]:
    lines = []
    lines.append(
        f"layerfs benchmark  {time.strftime('%Y-%m-%d %H:%M')}  repeat={args.repeat}"
        f"{'  QUICK' if args.quick else ''}  host: {os.cpu_count()} cpu, "
        f"kernel {os.uname().release}"
    )
    for k, c in bench.chains.items():
        lines.append(
            f"  chain {k}: {len(c['layers'])} layers, {c.get('entries', '?')} merged entries"
            f"{', large file ' + c['big'] if c.get('big') else ''}"
        )
    for n in bench.notes:
        lines.append(f"  note: {n}")
    lines.append(
        "  seconds: median [min-max] over repeats; cold = fresh mount + sync + drop_caches, warm = "
        "immediate repeat. randread/stat are timed inside the child (no interpreter start-up)."
    )
    lines.append(
        "  mount cold = caches dropped (layerfs: index deleted, built at mount); warm = remount "
        "(layerfs: persisted index). Includes CLI start-up for layerfs."
    )
    lines.append("")
    hdr = (
        f"{'chain':<6}{'workload':<13}{'phase':<6}{'layerfs':<28}{'fuse-overlayfs':<28}"
        f"{'kernel':<28}{'L/F':>7}{'L/K':>7}"
    )
    lines.append(hdr)
    lines.append("-" * len(hdr))
    order = {w: i for i, w in enumerate((*FS_WORKLOADS, "daemon-rss"))}
    fs_keys = sorted(
        (k for k in summary if k[0] != "store" and k[1] != "xattr-cpu"),
        key=lambda k: (k[0], order.get(k[1], 99), k[2] != "cold"),
    )
    for k in fs_keys:
        d = summary[k]
        rss = k[1] == "daemon-rss"
        lf, fo, kn = d.get("layerfs"), d.get("fuse-overlayfs"), d.get("kernel")
        lines.append(
            f"{k[0]:<6}{k[1]:<13}{k[2]:<6}{cell(lf, rss):<28}{cell(fo, rss):<28}{cell(kn, rss):<28}"
            f"{rs(ratio(lf, fo)):>7}{rs(ratio(lf, kn)):>7}"
        )
    lines.extend(request_table(bench.results))
    cpu_keys = sorted(k for k in summary if k[1] == "xattr-cpu")
    if cpu_keys:
        lines.append("")
        lines.append("daemon CPU per uncached request (us; 100k lgetxattr calls, /proc/PID/stat)")
        h3 = f"{'chain':<8}{'layerfs':<16}{'fuse-overlayfs':<16}"
        lines.append(h3)
        lines.append("-" * len(h3))
        for k in cpu_keys:
            d = summary[k]
            cells = []
            for sysname in FUSE_SYSTEMS:
                v = d.get(sysname)
                cells.append(f"{v['median']:.1f}" if v and v["median"] else "-")
            lines.append(f"{k[0]:<8}{cells[0]:<16}{cells[1]:<16}")
    st = sorted(k for k in summary if k[0] == "store")
    if st:
        lines.append("")
        h2 = f"{'store op':<26}{'layerfs':<30}{'containers-storage (Go)':<30}{'L/Go':>7}"
        lines.append(h2)
        lines.append("-" * len(h2))
        for k in st:
            d = summary[k]
            label = k[1] + (
                f" ({k[2]} layers)"
                if k[1] == "layers-json"
                else " (per op)"
                if k[2] == "op" and k[1] != "import"
                else ""
            )
            lines.append(
                f"{label:<26}{cell(d.get('layerfs')):<30}{cell(d.get('go')):<30}"
                f"{rs(ratio(d.get('layerfs'), d.get('go'))):>7}"
            )
    # targets
    targets: list[dict[str, Any]] = []

    def tgt(name: str, value: float | None, limit: float, unit: str = "x") -> None:
        targets.append(
            {
                "target": name,
                "value": value,
                "limit": limit,
                "unit": unit,
                "met": None if value is None else value <= limit,
            }
        )

    # issue 12: every read workload <= 1.0x fuse-overlayfs cold and warm; warm walk (find),
    # stat and read-all (tar) <= 1.2x kernel; mount <= 0.15 s; <= 12 us daemon CPU a request
    for k in fs_keys:
        if k[1] not in READ_WORKLOADS:
            continue
        d = summary[k]
        tgt(
            f"{k[0]} {k[1]} {k[2]}: layerfs/fuse-overlayfs",
            ratio(d.get("layerfs"), d.get("fuse-overlayfs")),
            1.0,
        )
        if k[2] == "warm" and k[1] in ("find", "stat", "tar"):
            tgt(
                f"{k[0]} {k[1]} warm: layerfs/kernel", ratio(d.get("layerfs"), d.get("kernel")), 1.2
            )
    for k in fs_keys:
        if k[1] == "mount" and k[2] == "warm":
            lf = summary[k].get("layerfs")
            tgt(f"{k[0]} mount, warm index (s)", lf and lf["median"], 0.15, "s")
        if k[1] == "daemon-rss" and k[0].endswith(("b", "c")):
            lf = summary[k].get("layerfs")
            tgt(f"{k[0]} daemon peak RSS (MB)", lf and lf["median"] / 1e6, 150, "MB")
    for k in cpu_keys:
        lf = summary[k].get("layerfs")
        tgt(f"{k[0]} daemon CPU per request (us)", lf and lf["median"], 12, "us")
    for k in st:
        d = summary[k]
        lim = 1.5 if k[1] == "import" else 1.0
        tgt(f"store {k[1]}: layerfs/Go", ratio(d.get("layerfs"), d.get("go")), lim)
    lines.append("")
    lines.append("targets (reported, not asserted)")
    lines.append("-" * 64)
    met = sum(1 for t in targets if t["met"])
    for t in targets:
        v = "-" if t["value"] is None else (f"{t['value']:.2f}{t['unit']}")
        status = "n/a" if t["met"] is None else ("met" if t["met"] else "MISSED")
        lines.append(f"{t['target']:<48}{v:>10}  (<= {t['limit']}{t['unit']})  {status}")
    lines.append(f"{met}/{len(targets)} targets met")
    return "\n".join(lines), targets


def request_table(results: list[dict[str, Any]]) -> list[str]:
    """FUSE requests the kernel sent per workload (median over repeats), layerfs and
    fuse-overlayfs, cold and warm; empty when nothing was counted."""
    groups: dict[tuple[str, str, str], dict[str, list[int]]] = defaultdict(
        lambda: defaultdict(list)
    )
    for r in results:
        if r.get("requests") is not None and r["phase"] in ("cold", "warm"):
            groups[(r["chain"], r["workload"], r["phase"])][r["system"]].append(r["requests"])
    if not groups:
        return []
    order = {w: i for i, w in enumerate(FS_WORKLOADS)}
    out = ["", "FUSE requests per workload (median; fuse:fuse_request_send tracepoint)"]
    h = f"{'chain':<6}{'workload':<13}{'phase':<6}{'layerfs':>12}{'fuse-overlayfs':>16}"
    out += [h, "-" * len(h)]
    for k in sorted(groups, key=lambda k: (k[0], order.get(k[1], 99), k[2] != "cold")):
        g = groups[k]
        vals = [str(int(statistics.median(g[s]))) if g.get(s) else "-" for s in FUSE_SYSTEMS]
        out.append(f"{k[0]:<6}{k[1]:<13}{k[2]:<6}{vals[0]:>12}{vals[1]:>16}")
    return out


def plot(summary: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fs = [k for k in sorted(summary) if k[0] != "store" and k[1] not in ("daemon-rss", "xattr-cpu")]
    st = [k for k in sorted(summary) if k[0] == "store"]
    labels = [f"{k[0]} {k[1]} {k[2]}" for k in fs] + [f"store {k[1]}" for k in st]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(16, max(6, 0.32 * len(labels) + 2)))
    colors = {
        "layerfs": "tab:blue",
        "fuse-overlayfs": "tab:orange",
        "kernel": "tab:green",
        "go": "tab:red",
    }
    h = 0.27
    for j, sysname in enumerate(("layerfs", "fuse-overlayfs", "kernel", "go")):
        ys, xs, lo, hi = [], [], [], []
        for i, k in enumerate(fs + st):
            d = summary[k].get(sysname)
            if not d or d["median"] is None:
                continue
            off = j if sysname != "go" else 1
            ys.append(i + (off - 1) * h)
            xs.append(d["median"])
            lo.append(d["median"] - d["min"])
            hi.append(d["max"] - d["median"])
        if xs:
            ax1.barh(
                ys, xs, height=h, xerr=[lo, hi], color=colors[sysname], label=sysname, capsize=2
            )
    ax1.set_yticks(range(len(labels)), labels, fontsize=7)
    ax1.invert_yaxis()
    ax1.set_xscale("log")
    ax1.set_xlabel("seconds (median, min-max)")
    ax1.legend(fontsize=8)
    r_f, r_k = [], []
    for k in fs + st:
        d = summary[k]
        base = d.get("fuse-overlayfs") or d.get("go")
        r_f.append(ratio(d.get("layerfs"), base) or 0)
        r_k.append(ratio(d.get("layerfs"), d.get("kernel")) or 0)
    ys = range(len(labels))
    ax2.barh(
        [y - 0.2 for y in ys],
        r_f,
        height=0.4,
        color="tab:orange",
        label="layerfs / fuse-overlayfs (store: / Go)",
    )
    ax2.barh([y + 0.2 for y in ys], r_k, height=0.4, color="tab:green", label="layerfs / kernel")
    ax2.axvline(1.0, color="k", lw=0.8)
    ax2.axvline(1.5, color="grey", lw=0.8, ls="--")
    ax2.set_yticks(list(ys), labels, fontsize=7)
    ax2.invert_yaxis()
    ax2.set_xscale("log")
    ax2.set_xlabel("ratio (log)")
    ax2.legend(fontsize=8)
    fig.suptitle("layerfs vs fuse-overlayfs vs kernel overlayfs")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


# ---------------------------------------------------------------------------- main


def main() -> int:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--workdir", default="/var/tmp/layerfs-bench")
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument(
        "--quick", action="store_true", help="small chains, repeat 2, few store ops (smoke test)"
    )
    ap.add_argument("--chains", default="a,b,c")
    ap.add_argument(
        "--workloads", default=",".join(ALL_WORKLOADS), help=f"any of {','.join(ALL_WORKLOADS)}"
    )
    ap.add_argument(
        "--store-ops",
        type=int,
        default=1000,
        help="layers created+deleted per system (default 1000)",
    )
    ap.add_argument(
        "--store-repeat",
        type=int,
        default=1,
        help="repeats of create/delete (default 1: each of the --store-ops calls is a sample)",
    )
    ap.add_argument("--json", metavar="FILE")
    ap.add_argument("--plot", metavar="FILE.png")
    ap.add_argument("--no-writes", action="store_true", help="skip the writable workloads")
    ap.add_argument(
        "--pin", type=int, metavar="CPU", help="run clients and daemons on this one CPU"
    )
    ap.add_argument(
        "--layerfs",
        default=LAYERFS,
        metavar="CLI",
        help="the layerfs command to measure (e.g. .venv-stock/bin/layerfs: stock pyfuse3)",
    )
    args = ap.parse_args()
    if os.geteuid() != 0:
        print(
            "bench.py needs root: it mounts kernel overlayfs and FUSE filesystems, writes "
            "/proc/sys/vm/drop_caches for cold runs and runs containers-storage, which bind-mounts "
            "its store. Run it with sudo.",
            file=sys.stderr,
        )
        return 2
    if args.quick and "--repeat" not in " ".join(sys.argv):
        args.repeat = 2
    args.chains = [c.strip() for c in args.chains.split(",") if c.strip()]
    bad = [c for c in args.chains if c not in ("a", "b", "c")]
    args.workloads = [w.strip() for w in args.workloads.split(",") if w.strip()]
    bad += [w for w in args.workloads if w not in ALL_WORKLOADS]
    if bad:
        ap.error(f"unknown chain/workload: {', '.join(bad)}")
    for tool in ("fuse-overlayfs", "fusermount3", GO, "mount"):
        if not shutil.which(tool):
            print(f"bench.py: {tool} not found", file=sys.stderr)
            return 1
    os.makedirs(os.path.join(args.workdir, "mnt"), exist_ok=True)
    # leftovers of an interrupted earlier run of this script (only our own mount dir)
    for d in os.listdir(os.path.join(args.workdir, "mnt")):
        p = os.path.join(args.workdir, "mnt", d)
        if os.path.ismount(p):
            log(f"unmounting leftover {p}")
            run(["umount", "-l", p])

    CHILD_ENV["PYTHONPYCACHEPREFIX"] = os.path.join(args.workdir, "pycache")
    if args.pin is not None:
        os.sched_setaffinity(0, {args.pin})  # every client command inherits it
    bench = Bench(args)
    atexit.register(bench.cleanup)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    t0 = time.perf_counter()
    try:
        needs_chains = bool(set(args.workloads) & set(FS_WORKLOADS)) or "import" in args.workloads
        if needs_chains:
            bench.build_chains()
        log(f"setup done in {time.perf_counter() - t0:.0f} s")
        bench.run_fs()
        bench.run_store()
    finally:
        bench.cleanup()
    summary = summarize(bench.results)
    text, targets = report(bench, summary, args)
    if not args.no_writes:  # writable views: scripts/bench_writes.py
        sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
        import bench_writes

        text += "\n\n" + bench_writes.run(args.workdir, quick=args.quick, log=log)[0]
    if "b" in args.chains:  # layerfs inspect on chain b: scripts/bench_inspect.py
        text += "\n\n" + __import__("bench_inspect").run(args.workdir, quick=args.quick, log=log)[0]
    text += f"\n(total run time {time.perf_counter() - t0:.0f} s)"
    print(text)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(
                {
                    "args": {k: v for k, v in vars(args).items()},
                    "chains": bench.chains,
                    "notes": bench.notes,
                    "results": bench.results,
                    "targets": targets,
                    "summary": [
                        {
                            "chain": k[0],
                            "workload": k[1],
                            "phase": k[2],
                            **{s: v for s, v in d.items()},
                        }
                        for k, d in summary.items()
                    ],
                },
                f,
                indent=1,
            )
    if args.plot:
        try:
            plot(summary, args.plot)
        except ImportError:
            print(f"--plot needs matplotlib: {VENV_PY} -m pip install matplotlib", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
