"""Helpers for the union-view tests: build layer diff dirs from Python, mount them with layerfs,
the kernel overlayfs or fuse-overlayfs, and compare trees entry by entry."""

from __future__ import annotations

import contextlib
import errno
import hashlib
import os
import random
import shutil
import stat
import struct
import subprocess
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from hypothesis import strategies as st

from conftest import LayerfsCLI, StorePaths, wait_until
from conftest import require as require  # skip here, fail under CI=true
from layerfs.fs.index import UnionIndex
from layerfs.fs.mount import daemon_pid_alive, detach, is_mountpoint, spawn_daemon, unmount

HIDDEN_XATTR_PREFIXES = (b"trusted.overlay.", b"user.overlay.", b"user.layerfs.")

# security.capability v2: effective, permitted = CAP_NET_BIND_SERVICE
CAP_NET_BIND = struct.pack("<IIIII", 0x02000001, 1 << 10, 0, 0, 0)


def require_root() -> None:
    require(os.geteuid() == 0, "needs root")


def require_fuse() -> None:
    require_root()
    require(os.path.exists("/dev/fuse"), "/dev/fuse missing")
    require(shutil.which("fusermount3") is not None, "fusermount3 missing")


def require_kernel_overlay() -> None:
    require_root()
    with open("/proc/filesystems") as f:
        ok = any(line.split()[-1] == "overlay" for line in f if line.strip())
    if not ok:
        subprocess.run(["modprobe", "overlay"], capture_output=True)
        with open("/proc/filesystems") as f:
            ok = any(line.split()[-1] == "overlay" for line in f if line.strip())
    require(ok, "kernel overlayfs not available")


def require_fuse_overlayfs() -> None:
    require_fuse()
    require(shutil.which("fuse-overlayfs") is not None, "fuse-overlayfs not installed")


# -- building layers ------------------------------------------------------------------------

T0 = 1_600_000_000_123_456_789


class Layer:
    """Builds one diff dir. Times are applied in :meth:`finish` (deepest first), because adding
    children changes a directory's mtime. ``whiteout_form``: 'char' (0:0 device, kernel form) or
    'file' (``.wh.NAME``); ``opaque_form``: 'trusted', 'user' (xattrs) or 'file'
    (``.wh..wh..opq``)."""

    def __init__(self, root: Path, whiteout_form: str = "char", opaque_form: str = "trusted"):
        self.root = root
        self.whiteout_form = whiteout_form
        self.opaque_form = opaque_form
        root.mkdir(parents=True, exist_ok=True)
        self._times: list[tuple[Path, int]] = []

    def _p(self, rel: str) -> Path:
        p = self.root / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        return p

    def _meta(
        self,
        p: Path,
        mode: int | None,
        uid: int,
        gid: int,
        mtime_ns: int | None,
        xattrs: dict[str, bytes] | None,
    ) -> None:
        os.chown(p, uid, gid, follow_symlinks=False)
        if mode is not None:
            os.chmod(p, mode)
        for k, v in (xattrs or {}).items():
            os.setxattr(p, k, v, follow_symlinks=False)
        if mtime_ns is not None:
            self._times.append((p, mtime_ns))

    def dir(
        self,
        rel: str,
        mode: int = 0o755,
        uid: int = 0,
        gid: int = 0,
        mtime_ns: int | None = None,
        xattrs: dict[str, bytes] | None = None,
        opaque: bool = False,
    ) -> Layer:
        p = self._p(rel)
        p.mkdir(exist_ok=True)
        self._meta(p, mode, uid, gid, mtime_ns, xattrs)
        if opaque:
            self.make_opaque(rel)
        return self

    def make_opaque(self, rel: str) -> Layer:
        p = self.root / rel
        if self.opaque_form == "trusted":
            os.setxattr(p, "trusted.overlay.opaque", b"y")
        elif self.opaque_form == "user":
            os.setxattr(p, "user.overlay.opaque", b"y")
        else:
            (p / ".wh..wh..opq").touch(mode=0o000)
        return self

    def file(
        self,
        rel: str,
        data: bytes = b"",
        mode: int = 0o644,
        uid: int = 0,
        gid: int = 0,
        mtime_ns: int | None = None,
        xattrs: dict[str, bytes] | None = None,
    ) -> Layer:
        p = self._p(rel)
        p.write_bytes(data)
        self._meta(p, mode, uid, gid, mtime_ns, xattrs)
        return self

    def symlink(
        self, rel: str, target: str, uid: int = 0, gid: int = 0, mtime_ns: int | None = None
    ) -> Layer:
        p = self._p(rel)
        os.symlink(target, p)
        self._meta(p, None, uid, gid, mtime_ns, None)
        return self

    def hardlink(self, rel: str, existing: str) -> Layer:
        os.link(self.root / existing, self._p(rel))
        return self

    def fifo(self, rel: str, mode: int = 0o644, mtime_ns: int | None = None) -> Layer:
        p = self._p(rel)
        os.mkfifo(p)
        self._meta(p, mode, 0, 0, mtime_ns, None)
        return self

    def device(self, rel: str, kind: str, major: int, minor: int, mode: int = 0o660) -> Layer:
        p = self._p(rel)
        fmt = stat.S_IFCHR if kind == "c" else stat.S_IFBLK
        os.mknod(p, fmt | mode, os.makedev(major, minor))
        os.chmod(p, mode)
        return self

    def whiteout(self, rel: str) -> Layer:
        p = self._p(rel)
        if self.whiteout_form == "char":
            os.mknod(p, stat.S_IFCHR | 0o000, os.makedev(0, 0))
        else:
            (p.parent / (".wh." + p.name)).touch(mode=0o000)
        return self

    def finish(self) -> Path:
        """Apply times: the requested ones, :data:`T0` for everything else (so two builds of
        the same chain are identical), deepest first."""
        times = dict.fromkeys(self._all_paths(), T0)
        times.update(dict(self._times))
        for p, ns in sorted(times.items(), key=lambda t: -len(t[0].parts)):
            os.utime(p, ns=(ns, ns), follow_symlinks=False)
        return self.root

    def _all_paths(self) -> list[Path]:
        out = [self.root]
        for dirpath, dirnames, filenames in os.walk(self.root):
            out += [Path(dirpath) / n for n in dirnames + filenames]
        return out


def make_rich_chain(
    base: Path, whiteout_form: str = "char", opaque_form: str = "trusted"
) -> list[str]:
    """A 3-layer chain exercising every rule; returns diff dirs top first."""
    l2 = Layer(base / "l2", whiteout_form, opaque_form)
    l1 = Layer(base / "l1", whiteout_form, opaque_form)
    l0 = Layer(base / "l0", whiteout_form, opaque_form)
    # bottom
    l2.dir("etc", mtime_ns=T0 + 1)
    l2.file("etc/passwd", b"root:x:0:0\n", mtime_ns=T0 + 2)
    l2.file("etc/hosts", b"127.0.0.1 localhost\n", mtime_ns=T0 + 3)
    l2.file("etc/gone", b"to be whited out\n", mtime_ns=T0 + 4)
    l2.dir("bin", mtime_ns=T0 + 5)
    l2.file("bin/sh", b"\x7fELF" + b"\0" * 1000, mode=0o755, mtime_ns=T0 + 6)
    l2.file("bin/su", b"su", mode=0o4755, mtime_ns=T0 + 7)
    l2.file("bin/sgid", b"sg", mode=0o2755, mtime_ns=T0 + 7)
    l2.file("bin/link-a", b"shared", mtime_ns=T0 + 8).hardlink("bin/link-b", "bin/link-a")
    l2.hardlink("bin/link-c", "bin/link-a")
    l2.file(
        "bin/cap", b"cap", mode=0o755, mtime_ns=T0 + 9, xattrs={"security.capability": CAP_NET_BIND}
    )
    l2.dir("tmp", mode=0o1777, mtime_ns=T0 + 10)
    l2.dir("dev", mtime_ns=T0 + 11)
    l2.device("dev/null", "c", 1, 3, mode=0o666)
    l2.device("dev/sda", "b", 8, 0)
    l2.fifo("dev/initctl", mode=0o600)
    for c in "abcde":
        l2.file(f"data/{c}", c.encode() * 100, uid=1000, gid=1000, mtime_ns=T0 + ord(c))
    l2.file("olddir/x", b"x").file("olddir/y", b"y").dir("olddir/sub").file("olddir/sub/z", b"z")
    l2.file("opq/lower1", b"1").file("opq/lower2", b"2").dir("opq/lowerdir")
    l2.file("opq2/old", b"old")
    l2.file("f2d", b"file that becomes a dir")
    l2.file("d2f/inner", b"dir that becomes a file")
    l2.file("keep/sub/deep/file", b"deep").file("keep/sub/other", b"o")
    l2.file(
        "xa",
        b"xattrs",
        xattrs={
            "user.foo": b"bar",
            "trusted.overlay.junk": b"j",
            "user.overlay.junk": b"j",
            "trusted.t": b"\x00\x01",
        },
    )
    l2.symlink("lnk", "etc/passwd", mtime_ns=T0 + 20)
    l2.symlink("dangling", "/nonexistent/target", uid=1000, gid=100)
    l2.file("owned", b"o", mode=0o640, uid=1234, gid=5678, mtime_ns=-1_000_000_001)
    l2.file("big", random.Random(7).randbytes(3 * 1024 * 1024 + 17))
    l2.dir("whdir").file("whdir/inner", b"i")
    l2.finish()
    # middle
    l1.dir("etc", mode=0o755, mtime_ns=T0 + 101)
    l1.file("etc/hosts", b"10.0.0.1 middle\n", uid=1000, mtime_ns=T0 + 102)
    l1.whiteout("etc/gone")
    l1.whiteout("olddir")
    l1.dir("opq", mode=0o700, opaque=True, mtime_ns=T0 + 103)
    l1.file("opq/new1", b"new1")
    l1.whiteout("data/c")
    l1.file("data/f", b"f" * 10)
    l1.file("d2f", b"now a file", mtime_ns=T0 + 104)
    l1.file("bin/l1-a", b"l1 link").hardlink("bin/l1-b", "bin/l1-a")
    l1.file("keep/sub/file2", b"2")
    l1.whiteout("never-existed")
    l1.whiteout("whdir")
    l1.finish()
    # top
    l0.dir("olddir", mode=0o711, mtime_ns=T0 + 201)
    l0.file("olddir/z", b"recreated")
    l0.dir("f2d", mtime_ns=T0 + 202).file("f2d/inside", b"inside")
    l0.dir("etc", mode=0o750, uid=0, gid=42, mtime_ns=T0 + 203, xattrs={"user.dirattr": b"top"})
    l0.file("data/a", b"A" * 7, mtime_ns=T0 + 204)
    l0.whiteout("bin/link-a")
    l0.dir("opq2", opaque=True).file("opq2/new", b"new")
    l0.whiteout("keep/sub/deep")
    l0.file("top-only", b"top", mtime_ns=T0 + 205)
    l0.file("whdir", b"file over whiteout")
    l0.dir("emptydir", mode=0o705)
    l0.finish()
    return [str(l0.root), str(l1.root), str(l2.root)]


def rich_chain_expected_paths() -> set[str]:
    """The paths the rich chain must show (semantics written out by hand)."""
    return {
        "etc",
        "etc/passwd",
        "etc/hosts",
        "bin",
        "bin/sh",
        "bin/su",
        "bin/sgid",
        "bin/link-b",
        "bin/link-c",
        "bin/cap",
        "bin/l1-a",
        "bin/l1-b",
        "tmp",
        "dev",
        "dev/null",
        "dev/sda",
        "dev/initctl",
        "data",
        "data/a",
        "data/b",
        "data/d",
        "data/e",
        "data/f",
        "olddir",
        "olddir/z",
        "opq",
        "opq/new1",
        "opq2",
        "opq2/new",
        "f2d",
        "f2d/inside",
        "d2f",
        "keep",
        "keep/sub",
        "keep/sub/other",
        "keep/sub/file2",
        "xa",
        "lnk",
        "dangling",
        "owned",
        "big",
        "top-only",
        "whdir",
        "emptydir",
    }


# -- snapshots --------------------------------------------------------------------------------

FIELDS = ("type", "mode", "uid", "gid", "size", "mtime", "nlink", "rdev", "data", "link", "xattrs")


def _xattrs(path: str, hidden: tuple[bytes, ...] = HIDDEN_XATTR_PREFIXES) -> dict[bytes, bytes]:
    out = {}
    try:
        names = os.listxattr(path, follow_symlinks=False)
    except OSError as e:
        if e.errno == errno.ENOTSUP:
            return {}
        raise
    for n in names:
        nb = os.fsencode(n)
        if nb.startswith(hidden):
            continue
        out[nb] = os.getxattr(path, n, follow_symlinks=False)
    return out


def _record(
    mode: int,
    ino: int,
    nlink: int,
    uid: int,
    gid: int,
    size: int,
    mtime_ns: int,
    rdev: int,
    data: bytes | None,
    link: bytes | None,
    xattrs: dict[bytes, bytes],
) -> dict[str, Any]:
    return {
        "type": stat.S_IFMT(mode),
        "mode": stat.S_IMODE(mode),
        "uid": uid,
        "gid": gid,
        "size": size,
        "mtime": mtime_ns,
        "nlink": nlink,
        "rdev": rdev if stat.S_ISCHR(mode) or stat.S_ISBLK(mode) else 0,
        "data": hashlib.sha256(data).hexdigest() if data is not None else None,
        "link": link,
        "xattrs": xattrs,
        "ino": ino,
    }


def snapshot(
    root: str, hidden: tuple[bytes, ...] = HIDDEN_XATTR_PREFIXES
) -> dict[str, dict[str, Any]]:
    """Every entry under *root* (root itself as ''), read through the filesystem; xattrs
    starting with one of *hidden* are left out."""
    out: dict[str, dict[str, Any]] = {}

    def visit(rel: str) -> None:
        path = os.path.join(root, rel) if rel else root
        try:
            st = os.lstat(path)
        except FileNotFoundError:
            # kernel overlayfs passes readdir of a dir that lives in one layer only straight
            # through, so a whiteout there is listed but cannot be looked up: not in the view
            return
        data = link = None
        if stat.S_ISREG(st.st_mode):
            with open(path, "rb") as f:
                data = f.read()
        elif stat.S_ISLNK(st.st_mode):
            link = os.fsencode(os.readlink(path))
        out[rel] = _record(
            st.st_mode,
            st.st_ino,
            st.st_nlink,
            st.st_uid,
            st.st_gid,
            st.st_size,
            st.st_mtime_ns,
            st.st_rdev,
            data,
            link,
            _xattrs(path, hidden),
        )
        if stat.S_ISDIR(st.st_mode):
            for name in sorted(os.listdir(path)):
                visit(f"{rel}/{name}" if rel else name)

    visit("")
    return out


def snapshot_index(
    idx: UnionIndex, hidden: tuple[bytes, ...] = HIDDEN_XATTR_PREFIXES
) -> dict[str, dict[str, Any]]:
    """The same records computed from an index and its backing files (no mount)."""
    out: dict[str, dict[str, Any]] = {}
    entries = [(b"", 1), *idx.walk()]
    for rel, ino in entries:
        a = idx.attr(ino)
        data = link = None
        if stat.S_ISREG(a.mode):
            with open(idx.backing_path(ino), "rb") as f:
                data = f.read()
        elif stat.S_ISLNK(a.mode):
            link = idx.readlink(ino)
        out[os.fsdecode(rel)] = _record(
            a.mode,
            a.ino,
            a.nlink,
            a.uid,
            a.gid,
            a.size,
            a.mtime_ns,
            a.rdev,
            data,
            link,
            {k: v for k, v in idx.xattrs(ino) if not k.startswith(hidden)},
        )
    return out


def hardlink_groups(snap: dict[str, dict[str, Any]]) -> dict[str, frozenset[str]]:
    """path -> the set of paths with the same st_ino (non-directories only)."""
    by_ino: dict[int, set[str]] = {}
    for p, r in snap.items():
        if r["type"] != stat.S_IFDIR:
            by_ino.setdefault(r["ino"], set()).add(p)
    return {p: frozenset(by_ino[r["ino"]]) for p, r in snap.items() if r["type"] != stat.S_IFDIR}


def assert_same_tree(
    got: dict[str, dict[str, Any]],
    want: dict[str, dict[str, Any]],
    ignore: Sequence[str] = (),
    check_links: bool = True,
    dir_nlink: bool = True,
) -> None:
    """Entry-by-entry comparison; hard-link groups (same st_ino) must match too."""
    problems = []
    if set(got) != set(want):
        problems.append(f"only in view: {sorted(set(got) - set(want))}")
        problems.append(f"only in oracle: {sorted(set(want) - set(got))}")
    for p in sorted(set(got) & set(want)):
        for f in FIELDS:
            if f in ignore:
                continue
            if f == "nlink" and not dir_nlink and got[p]["type"] == stat.S_IFDIR:
                continue
            if f == "mtime" and p == "" and "root_mtime" in ignore:
                continue
            if got[p][f] != want[p][f]:
                problems.append(f"{p or '/'}: {f} {got[p][f]!r} != {want[p][f]!r}")
    if check_links:
        g, w = hardlink_groups(got), hardlink_groups(want)
        for p in sorted(set(g) & set(w)):
            if g[p] != w[p]:
                problems.append(f"{p}: hard-link group {sorted(g[p])} != {sorted(w[p])}")
    assert not problems, "trees differ:\n" + "\n".join(problems[:40])


# -- mounts -------------------------------------------------------------------------------------


@contextlib.contextmanager
def kernel_overlay(diff_dirs: Sequence[str], mnt: Path) -> Iterator[str]:
    """Mount the chain (top first) read-only with kernel overlayfs."""
    require_kernel_overlay()
    mnt.mkdir(parents=True, exist_ok=True)
    dirs = list(diff_dirs)
    if len(dirs) == 1:  # the kernel wants two lowers without an upper
        empty = mnt.parent / (mnt.name + "-empty")
        empty.mkdir(exist_ok=True)
        dirs.append(str(empty))
    with _kernel_mount("ro,lowerdir=" + ":".join(dirs), mnt) as path:
        yield path


@contextlib.contextmanager
def kernel_rw(lower: str, upper: str, work: str, mnt: Path) -> Iterator[str]:
    """Mount *lower* (a ``:``-joined lowerdir) with *upper* read-write with kernel overlayfs,
    ``redirect_dir`` (lower dirs can be renamed) and ``index`` (hard links survive copy-up) on:
    layerfs does both without writing redirects or an index."""
    require_kernel_overlay()
    mnt.mkdir(parents=True, exist_ok=True)
    opts = f"lowerdir={lower},upperdir={upper},workdir={work},redirect_dir=on,index=on"
    with _kernel_mount(opts, mnt) as path:
        yield path


@contextlib.contextmanager
def _kernel_mount(opts: str, mnt: Path) -> Iterator[str]:
    r = subprocess.run(
        ["mount", "-t", "overlay", "overlay", "-o", opts, str(mnt)], capture_output=True, text=True
    )
    require(r.returncode == 0, f"kernel overlay mount failed: {r.stderr.strip()}")
    try:
        yield str(mnt)
    finally:
        subprocess.run(["umount", str(mnt)], check=False)
        if is_mountpoint(str(mnt)):
            subprocess.run(["umount", "-l", str(mnt)], check=False)


@contextlib.contextmanager
def fuse_overlayfs(diff_dirs: Sequence[str], mnt: Path) -> Iterator[str]:
    require_fuse_overlayfs()
    mnt.mkdir(parents=True, exist_ok=True)
    r = subprocess.run(
        ["fuse-overlayfs", "-o", "lowerdir=" + ":".join(diff_dirs), str(mnt)],
        capture_output=True,
        text=True,
    )
    require(r.returncode == 0, f"fuse-overlayfs failed: {r.stderr.strip()}")
    try:
        yield str(mnt)
    finally:
        subprocess.run(["fusermount3", "-u", str(mnt)], check=False)
        if is_mountpoint(str(mnt)):
            detach(str(mnt))


class LayerfsMount:
    """A running layerfs mount: ``path``, ``pid``, ``log``."""

    def __init__(self, path: str, pid: int, log: str) -> None:
        self.path = path
        self.pid = pid
        self.log = log


@contextlib.contextmanager
def layerfs_mount(
    diff_dirs: Sequence[str],
    mnt: Path,
    *,
    index_path: Path | None = None,
    layer_ids: Sequence[str] = (),
    **kw: Any,
) -> Iterator[LayerfsMount]:
    """Mount with the layerfs daemon; always unmounted and the daemon gone afterwards."""
    require_fuse()
    mnt.mkdir(parents=True, exist_ok=True)
    log = str(mnt.parent / (mnt.name + ".log"))
    # a layerfs mount that fails is the code under test failing: never a skip
    pid = spawn_daemon(
        list(diff_dirs),
        list(layer_ids),
        str(mnt),
        index_path=str(index_path) if index_path else None,
        log_path=log,
        **kw,
    )
    m = LayerfsMount(str(mnt), pid, log)
    try:
        yield m
    finally:
        cleanup_mount(str(mnt), pid)


def cleanup_mount(path: str, pid: int | None) -> None:
    """Best effort: unmount (lazily if needed) and make sure the daemon is gone."""
    try:
        if is_mountpoint(path):
            try:
                unmount(path, pid, timeout=5)
            except Exception:
                detach(path)
    finally:
        if pid is not None and daemon_pid_alive(pid):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, 9)
            with contextlib.suppress(AssertionError):  # best effort: cleanup never raises
                wait_until(lambda: not daemon_pid_alive(pid), f"daemon {pid} has exited", 5)


# -- random chains (property tests) -------------------------------------------------------

NAMES = ["a", "b", "c"]
KINDS = ["file", "dir", "opaque", "whiteout", "symlink", "file2"]
op = st.tuples(st.lists(st.sampled_from(NAMES), min_size=1, max_size=3), st.sampled_from(KINDS))
chains = st.lists(st.lists(op, max_size=6), min_size=2, max_size=4)


def build_random_layer(root: Path, ops: list[tuple[list[str], str]], n: int) -> str:
    lay = Layer(root)
    for comps, kind in ops:
        rel = "/".join(comps)
        p = root / rel
        try:
            if os.path.lexists(p):
                continue
            if kind == "file":
                lay.file(rel, f"{n}:{rel}".encode(), mode=0o600 + n)
            elif kind == "file2":
                lay.file(rel, b"same", uid=n)
            elif kind in ("dir", "opaque"):
                lay.dir(rel, mode=0o750 + n, opaque=kind == "opaque")
            elif kind == "symlink":
                lay.symlink(rel, f"target-{n}")
            else:
                lay.whiteout(rel)
        except (NotADirectoryError, FileExistsError):
            continue
    return str(lay.finish())


def store_chain_dirs(paths: StorePaths, ref: str) -> list[str]:
    """The diff dirs of *ref*'s chain in the test store, top first."""
    store = paths.store()
    return [store.diff_dir(la.id) for la in store.chain(ref)]


def layerfs_view(cli: LayerfsCLI, ref: str, mnt: Path) -> dict[str, dict[str, object]]:
    """Snapshot of a fresh layerfs mount of *ref* at *mnt* (unmounted again)."""
    mnt.mkdir(parents=True, exist_ok=True)
    cli.run("mount", ref, str(mnt))
    try:
        return snapshot(str(mnt))
    finally:
        cli.run("unmount", str(mnt))
