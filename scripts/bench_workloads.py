"""Test chains for ``scripts/bench.py``: layer tarballs built with :mod:`tarfile`.

Every builder is deterministic (seeded), writes plain (uncompressed) tars and returns the
list of tar files bottom-first plus the path of the chain's large file (or ``None``).
The tars use the OCI conventions that ``import-layer`` turns into the overlay layout:
``.wh.NAME`` for a deletion (a char 0:0 device on disk) and ``.wh..wh..opq`` for an opaque
directory (``trusted.overlay.opaque=y`` on disk).
"""

from __future__ import annotations

import io
import os
import random
import shutil
import stat
import subprocess
import sys
import tarfile
import time

MIB = 1 << 20
MTIME = 1_700_000_000
_BLOB = random.Random(1).randbytes(1 << 17)


def _data(rng: random.Random, lo: int, hi: int) -> bytes:
    n = rng.randint(lo, hi)
    off = rng.randint(0, len(_BLOB) - n)
    return _BLOB[off : off + n]


class _Repeat(io.RawIOBase):
    """A read-only stream of ``size`` bytes cycled from a 1 MiB random block."""

    def __init__(self, size: int, seed: int) -> None:
        self.left = size
        self.block = random.Random(seed).randbytes(MIB)
        self.pos = 0

    def readable(self) -> bool:
        return True

    def readinto(self, buf) -> int:  # type: ignore[no-untyped-def]
        n = min(len(buf), self.left, MIB - self.pos)
        if n <= 0:
            return 0
        buf[:n] = self.block[self.pos : self.pos + n]
        self.pos = (self.pos + n) % MIB
        self.left -= n
        return n


class LayerTar:
    """Writes one layer tar; parent directories are added automatically, once."""

    def __init__(self, path: str) -> None:
        self.tar = tarfile.open(path, "w", format=tarfile.PAX_FORMAT)  # noqa: SIM115
        self.dirs: set[str] = set()

    def _info(self, name: str, typ: bytes, mode: int) -> tarfile.TarInfo:
        ti = tarfile.TarInfo(name)
        ti.type = typ
        ti.mode = mode
        ti.mtime = MTIME
        ti.uname = ti.gname = "root"
        return ti

    def dir(self, name: str, mode: int = 0o755) -> None:
        name = name.strip("/")
        if not name or name in self.dirs:
            return
        self.dir(os.path.dirname(name))
        self.dirs.add(name)
        self.tar.addfile(self._info(name, tarfile.DIRTYPE, mode))

    def file(self, name: str, data: bytes, mode: int = 0o644) -> None:
        self.dir(os.path.dirname(name))
        ti = self._info(name, tarfile.REGTYPE, mode)
        ti.size = len(data)
        self.tar.addfile(ti, io.BytesIO(data))

    def big(self, name: str, size: int, seed: int) -> None:
        self.dir(os.path.dirname(name))
        ti = self._info(name, tarfile.REGTYPE, 0o644)
        ti.size = size
        self.tar.addfile(ti, io.BufferedReader(_Repeat(size, seed), MIB))

    def symlink(self, name: str, target: str) -> None:
        self.dir(os.path.dirname(name))
        ti = self._info(name, tarfile.SYMTYPE, 0o777)
        ti.linkname = target
        self.tar.addfile(ti)

    def whiteout(self, name: str) -> None:
        d, b = os.path.split(name.strip("/"))
        self.file(os.path.join(d, ".wh." + b), b"")

    def opaque(self, name: str) -> None:
        self.dir(name)
        self.file(os.path.join(name.strip("/"), ".wh..wh..opq"), b"")

    def close(self) -> None:
        self.tar.close()


# ---------------------------------------------------------------------------- chain a


def debootstrap(dest: str, log) -> str:  # type: ignore[no-untyped-def]
    """A Debian bookworm minbase rootfs in ``dest`` (cached); falls back to the host's /usr.

    Returns a note saying what was used.
    """
    done = dest + ".complete"
    if os.path.exists(done):
        return f"Debian bookworm minbase (debootstrap, cached in {dest})"
    if shutil.which("debootstrap"):
        tmp = dest + ".tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        log(f"running debootstrap --variant=minbase bookworm {tmp} (a few minutes) ...")
        t = time.perf_counter()
        r = subprocess.run(
            ["debootstrap", "--variant=minbase", "bookworm", tmp, "http://deb.debian.org/debian"],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
        )
        if r.returncode == 0:
            shutil.rmtree(dest, ignore_errors=True)
            os.rename(tmp, dest)
            open(done, "w").close()
            log(f"debootstrap done in {time.perf_counter() - t:.0f} s")
            return f"Debian bookworm minbase (debootstrap, cached in {dest})"
        shutil.rmtree(tmp, ignore_errors=True)
        log(f"debootstrap FAILED (rc {r.returncode}): {r.stderr.strip()[-300:]}")
    else:
        log("debootstrap not installed")
    log("FALLBACK: chain a uses a tar of the host's /usr instead of a Debian rootfs")
    return "FALLBACK: host /usr (debootstrap failed or missing)"


def _tar_tree(path: str, src: str, arc_prefix: str) -> None:
    with tarfile.open(path, "w", format=tarfile.PAX_FORMAT) as tar:
        for root, dirs, files in os.walk(src):
            dirs.sort()
            rel = os.path.relpath(root, src)
            arc_root = arc_prefix if rel == "." else os.path.join(arc_prefix, rel)
            if arc_root:
                tar.add(root, arcname=arc_root, recursive=False)
            for name in sorted(files + [d for d in dirs if os.path.islink(os.path.join(root, d))]):
                p = os.path.join(root, name)
                st = os.lstat(p)
                if stat.S_ISSOCK(st.st_mode) or stat.S_ISFIFO(st.st_mode):
                    continue
                tar.add(p, arcname=os.path.join(arc_root, name), recursive=False)


def _base_listing(src: str) -> tuple[list[str], dict[str, int]]:
    """Regular files (relative) and directory entry counts of a tree."""
    files: list[str] = []
    dircount: dict[str, int] = {}
    for root, dirs, fnames in os.walk(src):
        rel = os.path.relpath(root, src)
        dircount[rel] = len(dirs) + len(fnames)
        for f in fnames:
            p = os.path.join(root, f)
            if os.path.isfile(p) and not os.path.islink(p):
                files.append(os.path.normpath(os.path.join(rel, f)))
    files.sort()
    return files, dircount


def build_chain_a(
    outdir: str, rootfs: str, fallback: bool, scale: float, log
) -> tuple[list[str], str]:  # type: ignore[no-untyped-def]
    """Rootfs + package-install-like layer + deletions/opaque layer + one large file."""
    rng = random.Random(0xA)
    tars = [os.path.join(outdir, f"{i:02d}.tar") for i in range(4)]
    src, prefix = ("/usr", "usr") if fallback else (rootfs, "")
    log("  a/00: rootfs tar")
    _tar_tree(tars[0], src, prefix)
    files, dircount = _base_listing(src)
    if prefix:
        files = [os.path.join(prefix, f) for f in files]
        dircount = {os.path.normpath(os.path.join(prefix, k)): v for k, v in dircount.items()}

    # 01: like installing packages: new libs, binaries, docs, and replaced existing files
    log("  a/01: package-install-like layer")
    t = LayerTar(tars[1])
    n_pkg = max(4, int(40 * scale))
    for p in range(n_pkg):
        for k in range(50):
            t.file(f"usr/lib/bench-pkg{p:02d}/mod{k:03d}.py", _data(rng, 200, 20_000))
        t.file(f"usr/bin/bench-tool-{p:02d}", _data(rng, 5_000, 60_000), 0o755)
        t.file(f"usr/share/doc/bench-pkg{p:02d}/copyright", _data(rng, 500, 3_000))
        t.symlink(f"usr/lib/bench-pkg{p:02d}/current", f"mod{p:03d}.py")
    replaced = rng.sample(files, min(len(files) // 10, int(300 * scale) + 10))
    for f in replaced:
        t.file(f, _data(rng, 100, 20_000), 0o644)
    t.close()

    # 02: deletions (whiteouts) and replaced directories (opaque)
    log("  a/02: deletions + opaque dirs layer")
    t = LayerTar(tars[2])
    big_dirs = sorted(
        (d for d, n in dircount.items() if n >= 20 and d.count("/") >= 2),
        key=lambda d: (-dircount[d], d),
    )
    opaque = big_dirs[1:4]  # replace three big directories with new content
    # (no whiteouts inside them: the kernel lists a same-layer whiteout in an opaque dir)
    rest = sorted(
        f for f in set(files) - set(replaced) if not any(f.startswith(d + "/") for d in opaque)
    )
    for f in rng.sample(rest, min(len(rest) // 5, int(400 * scale) + 10)):
        t.whiteout(f)
    for d in opaque:
        t.opaque(d)
        for k in range(20):
            t.file(f"{d}/replaced-{k:02d}", _data(rng, 100, 4_000))
    t.close()

    # 03: one large file
    log("  a/03: large-file layer")
    t = LayerTar(tars[3])
    big = "opt/bench/big.bin"
    t.big(big, int(100 * MIB * max(scale, 0.16)), seed=3)
    t.file("opt/bench/README", b"large file layer\n")
    t.close()
    return tars, big


# ---------------------------------------------------------------------------- chain b


def build_chain_b(outdir: str, scale: float, log) -> tuple[list[str], str]:  # type: ignore[no-untyped-def]
    """50 layers, ~100k tar entries in total, heavy shadowing, whiteouts, opaque dirs."""
    rng = random.Random(0xB)
    n_layers = max(5, int(50 * scale))
    per_layer = 2000 if scale >= 1 else max(600, int(2000 * scale))
    leaves = [f"d{i:02d}/e{j}" for i in range(20) for j in range(10)]
    hot = [f"{leaf}/h{k:02d}" for leaf in leaves for k in range(10)]  # 2000 shadowed names
    n_files = per_layer - 220 - 40
    prev_unique: list[str] = []
    tars = []
    big = "data/big.bin"
    for i in range(n_layers):
        path = os.path.join(outdir, f"{i:02d}.tar")
        tars.append(path)
        t = LayerTar(path)
        for leaf in leaves:
            t.dir(leaf)
        if i == 0:
            t.big(big, int(100 * MIB * max(scale, 0.16)), seed=0xB)
        opaque = leaves[(i * 7) % len(leaves)] if i % 10 == 5 else None
        if opaque:
            t.opaque(opaque)
        written = set(rng.sample(hot, n_files // 2))
        for name in sorted(written):
            t.file(name, _data(rng, 100, 3_000))
        unique = []
        for k in range(n_files - n_files // 2):
            name = f"{rng.choice(leaves)}/u{i:02d}_{k:04d}"
            unique.append(name)
            t.file(name, _data(rng, 100, 3_000))
        if prev_unique:
            ok = [n for n in prev_unique if not (opaque and n.startswith(opaque + "/"))]
            for name in rng.sample(ok, min(20, len(ok))):
                t.whiteout(name)
            ok = [
                n for n in hot if n not in written and not (opaque and n.startswith(opaque + "/"))
            ]
            for name in rng.sample(ok, 20):
                t.whiteout(name)
        prev_unique = unique
        t.close()
        if i % 10 == 9:
            log(f"  b: {i + 1}/{n_layers} tars")
    return tars, big


# ---------------------------------------------------------------------------- chain c


def build_chain_c(outdir: str, scale: float, log) -> tuple[list[str], None]:  # type: ignore[no-untyped-def]
    """One layer with 100k small files, 10 per leaf directory, 7 levels deep."""
    rng = random.Random(0xC)
    path = os.path.join(outdir, "00.tar")
    t = LayerTar(path)
    fan = 10 if scale >= 1 else max(3, round(10 * scale**0.25))
    for a in range(fan):
        for b in range(fan):
            for c in range(fan):
                for d in range(fan):
                    leaf = f"deep/nest/ed/a{a}/b{b}/c{c}/d{d}"
                    for k in range(10):
                        t.file(f"{leaf}/f{k}.txt", _data(rng, 50, 1_500))
    t.close()
    return [path], None


# ---------------------------------------------------------------------------- children

# Timed inside a small child process (``python3 -S``) so interpreter start-up is excluded;
# the same code and the same inputs run on every system.
RANDREAD_CHILD = r"""
import os, random, sys, time
path, n, seed = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
fd = os.open(path, os.O_RDONLY)
size = os.fstat(fd).st_size
rng = random.Random(seed)
offs = [rng.randrange(0, size - 4096) for _ in range(n)]
t = time.perf_counter()
for o in offs:
    if len(os.pread(fd, 4096, o)) != 4096:
        raise SystemExit("short read")
print(time.perf_counter() - t)
"""

STAT_CHILD = r"""
import os, sys, time
os.chdir(sys.argv[1])
with open(sys.argv[2], "rb") as f:
    paths = f.read().split(b"\n")[:-1]
missing = 0
t = time.perf_counter()
for p in paths:
    try:
        os.lstat(p)
    except FileNotFoundError:
        missing += 1
print(time.perf_counter() - t, missing)
"""

if __name__ == "__main__":
    sys.exit("helper module for scripts/bench.py")
