# mypy: disable-error-code="func-returns-value"
"""Attacks on the read-write view: each case runs the same operations on a kernel overlay mount
and on a layerfs rw mount of two copies of the same lower (``test_rw_posix``'s pair), compares
results/errnos and the final trees (live, and the layerfs upper remounted by the kernel)."""

from __future__ import annotations

import mmap
import os
import subprocess
from pathlib import Path
from typing import Any

import pytest
from test_rw_posix import Pair, _read, _stat, _write, finish, mounted_pair
from test_rw_posix import outcome as _outcome

from fs_helpers import cleanup_mount
from layerfs.fs.upper import RENAME_EXCHANGE, renameat2

B = os.fsencode


def test_rename_dir_into_own_subdir_is_einval(tmp_path: Path) -> None:
    with mounted_pair(tmp_path) as pair:
        pair.run(lambda r: os.rename(f"{r}/d", f"{r}/d/sub/d"))
        pair.run(lambda r: os.rename(f"{r}/d", f"{r}/d/x"))
        pair.run(
            lambda r: (
                os.mkdir(f"{r}/n") or os.mkdir(f"{r}/n/m") or os.rename(f"{r}/n", f"{r}/n/m/z")
            )
        )
        pair.run(lambda r: os.rename(f"{r}/d/sub", f"{r}/d"))
        pair.run(lambda r: os.rename(f"{r}/d", f"{r}/d"))
        finish(pair)


def test_rename_over_existing_across_layers(tmp_path: Path) -> None:
    with mounted_pair(tmp_path) as pair:
        pair.run(lambda r: os.rename(f"{r}/f1", f"{r}/d"))  # file over lower dir: EISDIR
        pair.run(lambda r: os.rename(f"{r}/e", f"{r}/f1"))  # dir over file: ENOTDIR
        pair.run(lambda r: os.rename(f"{r}/e", f"{r}/d"))  # dir over non-empty lower dir
        pair.run(lambda r: os.rename(f"{r}/d", f"{r}/e"))  # lower dir over empty lower dir
        pair.run(lambda r: sorted(os.listdir(f"{r}/e")))
        pair.run(lambda r: os.rename(f"{r}/keep", f"{r}/e/sub"))  # over non-empty (d/sub has c)
        pair.run(lambda r: os.unlink(f"{r}/e/sub/c") or os.rename(f"{r}/keep", f"{r}/e/sub"))
        pair.run(lambda r: sorted(os.listdir(f"{r}/e/sub")))
        pair.run(lambda r: os.rename(f"{r}/s", f"{r}/sd"))  # symlink over symlink-to-dir
        pair.run(lambda r: os.rename(f"{r}/p", f"{r}/cdev"))
        finish(pair, dir_nlink=False)


def test_exchange_lower_dir_and_upper_file(tmp_path: Path) -> None:
    with mounted_pair(tmp_path) as pair:
        pair.run(lambda r: _write(f"{r}/newf", b"upper file"))
        pair.run(lambda r: renameat2(B(f"{r}/d"), B(f"{r}/newf"), RENAME_EXCHANGE))
        pair.run(lambda r: (sorted(os.listdir(f"{r}/newf")), _read(f"{r}/d")))
        pair.run(lambda r: renameat2(B(f"{r}/tree"), B(f"{r}/keep"), RENAME_EXCHANGE))
        pair.run(lambda r: (sorted(os.listdir(f"{r}/tree")), sorted(os.listdir(f"{r}/keep"))))
        pair.run(lambda r: renameat2(B(f"{r}/e"), B(f"{r}/e"), RENAME_EXCHANGE))
        finish(pair, dir_nlink=False)


def test_rename_lower_dir_with_whiteouts_and_links(tmp_path: Path) -> None:
    with mounted_pair(tmp_path) as pair:
        pair.run(lambda r: os.unlink(f"{r}/tree/x/y"))
        pair.run(lambda r: os.unlink(f"{r}/tree/ln"))
        pair.run(lambda r: os.rename(f"{r}/tree", f"{r}/moved"))
        pair.run(lambda r: sorted(os.listdir(f"{r}/moved")) + sorted(os.listdir(f"{r}/moved/x")))
        pair.run(lambda r: (_stat(f"{r}/moved/hl")[1], _stat(f"{r}/moved/x/hl2")[1]))
        pair.run(lambda r: os.path.exists(f"{r}/tree"))
        pair.run(lambda r: os.mkdir(f"{r}/tree") or sorted(os.listdir(f"{r}/tree")))
        pair.run(lambda r: os.rename(f"{r}/moved", f"{r}/tree"))
        finish(pair, dir_nlink=False)


REMOUNT_DIR_NLINK_AFTER_GROUP_COPY_UP = False
"""A lower hard-link group touched through the view is copied up at every member's path, so
the members' parent dirs exist in the layerfs upper; the live view shows them with the lower
link count, as the kernel (which keeps the group in its index dir and leaves the dirs lower),
but the kernel remounting that upper sees merged dirs (link count 1): a documented difference
(:mod:`layerfs.fs.rwops`), so link counts of dirs are not compared after that remount."""


def test_unlink_one_hard_link_others_keep_count(tmp_path: Path) -> None:
    with mounted_pair(tmp_path) as pair:
        pair.run(lambda r: _stat(f"{r}/h2")[1])
        pair.run(lambda r: os.unlink(f"{r}/h1") or (_stat(f"{r}/h2")[1], _stat(f"{r}/d/h3")[1]))
        pair.run(lambda r: _write(f"{r}/h2", b"X", os.O_WRONLY | os.O_APPEND))
        pair.run(lambda r: (_read(f"{r}/d/h3"), _stat(f"{r}/d/h3")[1]))
        pair.run(lambda r: os.link(f"{r}/h2", f"{r}/h4") or _stat(f"{r}/d/h3")[1])
        finish(pair, remount_dir_nlink=REMOUNT_DIR_NLINK_AFTER_GROUP_COPY_UP)


def test_ro_fd_before_copy_up_sees_new_data(tmp_path: Path) -> None:
    def op(r: str) -> tuple[bytes, bytes, int]:
        ro = os.open(f"{r}/f1", os.O_RDONLY)
        try:
            first = os.pread(ro, 100, 0)
            _write(f"{r}/f1", b"NEW DATA!", os.O_WRONLY)
            return first, os.pread(ro, 100, 0), os.fstat(ro).st_size
        finally:
            os.close(ro)

    with mounted_pair(tmp_path) as pair:
        pair.run(op)
        finish(pair)


def test_o_trunc_while_reader_open(tmp_path: Path) -> None:
    def op(r: str) -> tuple[bytes, int, bytes]:
        ro = os.open(f"{r}/big", os.O_RDONLY)
        try:
            head = os.pread(ro, 16, 0)
            w = os.open(f"{r}/big", os.O_WRONLY | os.O_TRUNC)
            os.write(w, b"short")
            os.close(w)
            return head, os.fstat(ro).st_size, os.pread(ro, 100, 0)
        finally:
            os.close(ro)

    with mounted_pair(tmp_path) as pair:
        pair.run(op)
        finish(pair)


def test_mmap_write_lower_file(tmp_path: Path) -> None:
    def op(r: str) -> bytes:
        fd = os.open(f"{r}/big", os.O_RDWR)
        try:
            with mmap.mmap(fd, 8192) as m:
                m[0:4] = b"MMAP"
                m[5000:5004] = b"mmap"
                m.flush()
        finally:
            os.close(fd)
        return _read(f"{r}/big")[:8]

    with mounted_pair(tmp_path) as pair:
        pair.run(op)
        finish(pair)


def pinned_difference(pair: Pair, fn: Any, err: str) -> Any:
    """Run *fn* on both views where layerfs differs from the kernel on purpose (listed under
    "Differences from kernel overlayfs" in :mod:`layerfs.fs.rwops`): the kernel must succeed,
    layerfs must fail with errno *err* (and so change nothing). Returns the kernel's result."""
    rk, rl = _outcome(fn, pair.k), _outcome(fn, pair.l)
    name = getattr(fn, "__name__", fn)
    assert rk[0] == "ok", f"{name}: the kernel gave {rk!r} (the difference is gone?)"
    assert rl == ("error", err), f"{name}: layerfs gave {rl!r}, documented: {err}"
    return rk[1]


def test_truncate_sparse(tmp_path: Path) -> None:
    _truncate_fallocate(tmp_path, punch=False)


def test_fallocate_punch_hole_zero_range_keep_size(tmp_path: Path) -> None:
    """fallocate(2) modes: the kernel passes them to the upper fs. layerfs answers every mode
    EOPNOTSUPP (documented difference): FUSE needs a fallocate handler and pyfuse3 3.5 has
    none. The files stay as they were on the layerfs side."""
    _truncate_fallocate(tmp_path, punch=True)


def _truncate_fallocate(tmp_path: Path, punch: bool) -> None:
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    PUNCH, KEEP, ZERO = 0x02, 0x01, 0x10

    def falloc(path: str, mode: int, off: int, ln: int) -> Any:
        fd = os.open(path, os.O_RDWR)
        try:
            rc = libc.fallocate(fd, mode, ctypes.c_long(off), ctypes.c_long(ln))
            if rc != 0:
                e = ctypes.get_errno()
                raise OSError(e, os.strerror(e))
            st = os.fstat(fd)
            return st.st_size, os.pread(fd, 16, max(off - 4, 0))
        finally:
            os.close(fd)

    with mounted_pair(tmp_path) as pair:
        pair.run(lambda r: os.truncate(f"{r}/f1", 1 << 30) or _stat(f"{r}/f1")[4])
        pair.run(lambda r: os.truncate(f"{r}/big", 3))
        pair.run(lambda r: falloc(f"{r}/d/a", PUNCH, 0, 2))  # PUNCH without KEEP: EOPNOTSUPP
        pair.run(lambda r: falloc(f"{r}/d", 0, 0, 10))
        if not punch:
            pair.run(lambda r: os.stat(f"{r}/f1").st_blocks < 16)
            finish(pair)
            return
        before = {n: _read(f"{pair.l}/{n}") for n in ("f2", "d/b", "f3")}
        pinned_difference(pair, lambda r: falloc(f"{r}/f2", PUNCH | KEEP, 1, 2), "ENOTSUP")
        pinned_difference(pair, lambda r: falloc(f"{r}/d/b", ZERO, 1, 10), "ENOTSUP")
        pinned_difference(pair, lambda r: falloc(f"{r}/f3", KEEP, 0, 1 << 20), "ENOTSUP")
        assert {n: _read(f"{pair.l}/{n}") for n in before} == before


def test_overlay_and_layerfs_xattrs_from_view(tmp_path: Path) -> None:
    with mounted_pair(tmp_path) as pair:
        for name in ("trusted.overlay.origin", "trusted.overlay.redirect", "trusted.overlay.x"):
            pair.run(lambda r, n=name: os.setxattr(f"{r}/f1", n, b"/d"))  # type: ignore[misc]
            pair.run(lambda r, n=name: os.setxattr(f"{r}/newdir-x", n, b"y"))  # type: ignore[misc]
        pair.run(lambda r: os.setxattr(f"{r}/e", "trusted.overlay.opaque", b"y"))
        pair.run(lambda r: os.removexattr(f"{r}/e", "trusted.overlay.opaque"))
        pair.run(lambda r: sorted(os.listdir(f"{r}/e")))
        pair.run(lambda r: sorted(os.listxattr(f"{r}/f1")))
        finish(pair)


def test_layerfs_xattrs_from_view_are_plain(tmp_path: Path) -> None:
    """``trusted.layerfs.*`` is layerfs's bookkeeping: set through the view it must not steer
    the view (the kernel stores it as an ordinary trusted xattr)."""
    with mounted_pair(tmp_path) as pair:
        pair.run(lambda r: os.setxattr(f"{r}/f1", "trusted.layerfs.origin", b"7"))
        pair.run(lambda r: os.getxattr(f"{r}/f1", "trusted.layerfs.origin"))
        pair.run(lambda r: sorted(os.listxattr(f"{r}/f1")))
        pair.run(
            lambda r: os.mkdir(f"{r}/nd") or os.setxattr(f"{r}/nd", "trusted.layerfs.opaque", b"y")
        )
        pair.run(lambda r: (sorted(os.listdir(r)), _read(f"{r}/f1")))
        pair.run(lambda r: (_stat(f"{r}/f1"), _stat(f"{r}/f2")))
        pair.run(lambda r: os.stat(f"{r}/f1").st_ino == os.stat(f"{r}/f2").st_ino)
        finish(pair)


def test_odd_names(tmp_path: Path) -> None:
    long = "L" * 255
    with mounted_pair(tmp_path) as pair:
        pair.run(lambda r: _write(f"{r}/new\nline", b"n") and sorted(os.listdir(r)))
        pair.run(lambda r: _write(f"{r}/{long}", b"long") and _read(f"{r}/{long}"))
        pair.run(lambda r: _write(f"{r}/{long}X", b"toolong"))
        pair.run(lambda r: os.rename(f"{r}/f1", f"{r}/{long[:-1]}M") or sorted(os.listdir(r)))
        pair.run(lambda r: os.unlink(f"{r}/{long}") or sorted(os.listdir(r)))
        pair.run(lambda r: os.unlink(f"{r}/{long[:-1]}M") or sorted(os.listdir(r)))
        pair.run(lambda r: os.rename(f"{r}/d/a", f"{r}/d/{long}") or sorted(os.listdir(f"{r}/d")))
        finish(pair)


def test_wh_prefixed_names_through_view(tmp_path: Path) -> None:
    with mounted_pair(tmp_path) as pair:
        pair.run(lambda r: _write(f"{r}/.wh.f2", b"just a name") and sorted(os.listdir(r)))
        pair.run(lambda r: _write(f"{r}/d/.wh..wh..opq", b"") and sorted(os.listdir(f"{r}/d")))
        pair.run(lambda r: os.mkdir(f"{r}/.wh.e") or sorted(os.listdir(r)))
        pair.run(lambda r: os.rename(f"{r}/f3", f"{r}/.wh.f1") or sorted(os.listdir(r)))
        pair.run(lambda r: (_read(f"{r}/f2"), _read(f"{r}/f1"), sorted(os.listdir(f"{r}/d"))))
        finish(pair)


def test_mkdir_over_whiteout_and_readdir(tmp_path: Path) -> None:
    with mounted_pair(tmp_path) as pair:
        pair.run(
            lambda r: os.unlink(f"{r}/f1") or os.mkdir(f"{r}/f1") or sorted(os.listdir(f"{r}/f1"))
        )
        pair.run(lambda r: _write(f"{r}/f1/in", b"i") and sorted(os.listdir(f"{r}/f1")))
        pair.run(lambda r: os.rmdir(f"{r}/f1"))
        pair.run(
            lambda r: os.unlink(f"{r}/f1/in") or os.rmdir(f"{r}/f1") or os.path.lexists(f"{r}/f1")
        )
        pair.run(lambda r: os.symlink("f2", f"{r}/f1") or os.readlink(f"{r}/f1"))
        pair.run(lambda r: sorted(os.listdir(r)))
        finish(pair)


def test_readdir_while_mutating(tmp_path: Path) -> None:
    def op(r: str) -> list[str]:
        for i in range(300):
            _write(f"{r}/e/n{i:03d}", b"")
        seen: list[str] = []
        with os.scandir(f"{r}/d") as it:
            for ent in it:
                seen.append(ent.name)
                if ent.name == "a":
                    os.unlink(f"{r}/d/b") if os.path.exists(f"{r}/d/b") else None
        fd = os.open(f"{r}/e", os.O_RDONLY)
        os.close(fd)
        names = []
        with os.scandir(f"{r}/e") as it:
            for n, ent in enumerate(it):
                names.append(ent.name)
                if n == 10:
                    for i in range(0, 300, 2):
                        os.unlink(f"{r}/e/n{i:03d}")
        # every entry never removed must be seen exactly once
        kept = {f"n{i:03d}" for i in range(1, 300, 2)}
        return [str(sorted(kept - set(names))), str(len(names) - len(set(names)))]

    with mounted_pair(tmp_path) as pair:
        pair.run(op)
        finish(pair)


def test_symlink_loops_and_devices(tmp_path: Path) -> None:
    with mounted_pair(tmp_path) as pair:
        pair.run(lambda r: os.symlink("loop2", f"{r}/loop1") or os.symlink("loop1", f"{r}/loop2"))
        pair.run(lambda r: _read(f"{r}/loop1"))
        pair.run(lambda r: _write(f"{r}/loop1", b"x"))
        pair.run(
            lambda r: os.mknod(f"{r}/blk", 0o6000 | 0o640, os.makedev(8, 1)) or _stat(f"{r}/blk")
        )
        pair.run(lambda r: os.mknod(f"{r}/f1", 0o20644, os.makedev(1, 3)))
        pair.run(lambda r: os.mkfifo(f"{r}/ff") or _stat(f"{r}/ff"))
        finish(pair)


def test_mknod_whiteout_device_through_view_is_eperm(tmp_path: Path) -> None:
    """mknod of a 0:0 char device is how a whiteout looks in the upper dir: the kernel refuses
    it (EPERM) rather than let the new entry vanish."""
    with mounted_pair(tmp_path) as pair:
        pair.run(lambda r: os.mknod(f"{r}/e/cd", 0o20644, os.makedev(0, 0)))
        pair.run(lambda r: sorted(os.listdir(f"{r}/e")))
        pair.run(lambda r: os.mknod(f"{r}/f1", 0o20644, os.makedev(0, 0)))
        pair.run(lambda r: os.unlink(f"{r}/f2") or os.mknod(f"{r}/f2", 0o20644, os.makedev(0, 0)))
        pair.run(lambda r: sorted(os.listdir(r)))
        finish(pair)


# -- hostile upper/lower contents ----------------------------------------------------------------


def _prepared_pair(base: Path, prep: Any) -> Any:
    """A pair whose dirs ``prep(dirs)`` changed (the same way on both sides) before mounting."""
    import contextlib

    from test_rw_posix import kernel_rw, layerfs_rw

    @contextlib.contextmanager
    def cm() -> Any:
        pair = Pair(base)
        for side in ("k", "l"):
            prep(pair.dirs[side])
        k, lf = pair.dirs["k"], pair.dirs["l"]
        with (
            kernel_rw(k["lower"], k["upper"], k["work"], Path(pair.k)),
            layerfs_rw([lf["lower"]], lf["upper"], lf["work"], Path(pair.l)),
        ):
            yield pair

    return cm()


def _view_ino(base: Path, rel: str) -> int:
    """The inode number layerfs's rw view gives lower entry *rel* (a throwaway mount)."""
    from test_rw_posix import build_lower, layerfs_rw

    lower = build_lower(base / "lower")
    (base / "u").mkdir()
    (base / "w").mkdir()
    with layerfs_rw([lower], str(base / "u"), str(base / "w"), base / "m"):
        return os.lstat(base / "m" / rel).st_ino


def test_forged_origin_in_upper_makes_no_inode_collision(tmp_path: Path) -> None:
    """An upper dir written by another mount program (a container under kernel overlay can set
    any trusted.* xattr) whose file carries ``trusted.layerfs.origin`` = another entry's view
    inode: the kernel gives the two files different inode numbers; so must layerfs (same st_ino
    + st_dev makes tar, cp -a, rsync -H and du treat them as one hard-linked file)."""
    victim = _view_ino(tmp_path / "probe", "f2")

    def prep(d: dict[str, str]) -> None:
        p = Path(d["upper"]) / "forged"
        p.write_bytes(b"forged")
        os.setxattr(p, "trusted.layerfs.origin", str(victim).encode())

    with _prepared_pair(tmp_path / "pair", prep) as pair:
        pair.run(lambda r: os.lstat(f"{r}/forged").st_ino == os.lstat(f"{r}/f2").st_ino)
        pair.run(lambda r: _read(f"{r}/forged"))
        finish(pair)


def test_forged_origin_in_lower_is_ignored(tmp_path: Path) -> None:
    """A lower file (from an image layer) carrying ``trusted.layerfs.origin``: copy-up must not
    carry the forged number over into the upper (inode collision after remount)."""
    victim = _view_ino(tmp_path / "probe", "f2")

    def prep(d: dict[str, str]) -> None:
        os.setxattr(Path(d["lower"]) / "f3", "trusted.layerfs.origin", str(victim).encode())

    with _prepared_pair(tmp_path / "pair", prep) as pair:
        pair.run(lambda r: os.lstat(f"{r}/f3").st_ino == os.lstat(f"{r}/f2").st_ino)
        pair.run(lambda r: _write(f"{r}/f3", b"X", os.O_WRONLY | os.O_APPEND))
        pair.run(lambda r: os.lstat(f"{r}/f3").st_ino == os.lstat(f"{r}/f2").st_ino)
        pair.run(lambda r: os.rename(f"{r}/f3", f"{r}/f3b"))
        pair.run(lambda r: os.lstat(f"{r}/f3b").st_ino == os.lstat(f"{r}/f2").st_ino)
        finish(pair)


# -- the mount program's command line against the kernel's mount options ---------------------


PROG = str(Path(__file__).resolve().parent.parent / ".venv" / "bin" / "layerfs-overlay")


def _mount_both(base: Path, opts: str, mnt_k: Path, mnt_l: Path) -> tuple[bool, bool]:
    """Mount *opts* with the kernel and with layerfs-overlay (``{B}`` is each side's base);
    returns (kernel mounted, layerfs mounted) and unmounts both."""
    from layerfs.fs.mount import is_mountpoint

    mnt_k.mkdir(parents=True, exist_ok=True)
    mnt_l.mkdir(parents=True, exist_ok=True)
    rk = subprocess.run(
        [
            "mount",
            "-t",
            "overlay",
            "overlay",
            "-o",
            opts.replace("{B}", str(base / "k")),
            str(mnt_k),
        ],
        capture_output=True,
        text=True,
    )
    ok_k = rk.returncode == 0
    if ok_k:
        subprocess.run(["umount", str(mnt_k)], check=True)
    rl = subprocess.run(
        [PROG, "-o", opts.replace("{B}", str(base / "l")), str(mnt_l)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    ok_l = rl.returncode == 0 and is_mountpoint(str(mnt_l))
    if ok_l:
        cleanup_mount(str(mnt_l), None)
    assert "Traceback" not in rl.stderr, rl.stderr
    return ok_k, ok_l


def _dirs(base: Path, *names: str) -> None:
    for side in ("k", "l"):
        for n in names:
            (base / side / n).mkdir(parents=True, exist_ok=True)
        (base / side / names[0] / "f").write_bytes(b"f")


def test_workdir_inside_upperdir_refused_like_kernel(tmp_path: Path) -> None:
    _dirs(tmp_path, "lower", "upper/work")
    got = _mount_both(
        tmp_path,
        "lowerdir={B}/lower,upperdir={B}/upper,workdir={B}/upper/work",
        tmp_path / "mk",
        tmp_path / "ml",
    )
    assert got[1] == got[0], f"layerfs mounted={got[1]}, kernel mounted={got[0]}"


def test_upperdir_inside_lowerdir_refused_like_kernel(tmp_path: Path) -> None:
    _dirs(tmp_path, "lower/upper", "work")
    got = _mount_both(
        tmp_path,
        "lowerdir={B}/lower,upperdir={B}/lower/upper,workdir={B}/work",
        tmp_path / "mk",
        tmp_path / "ml",
    )
    assert got[1] == got[0], f"layerfs mounted={got[1]}, kernel mounted={got[0]}"


def test_upper_and_work_same_dir_refused_like_kernel(tmp_path: Path) -> None:
    _dirs(tmp_path, "lower", "upper")
    got = _mount_both(
        tmp_path,
        "lowerdir={B}/lower,upperdir={B}/upper,workdir={B}/upper",
        tmp_path / "mk",
        tmp_path / "ml",
    )
    assert got[1] == got[0], f"layerfs mounted={got[1]}, kernel mounted={got[0]}"


def test_escaped_colon_in_lowerdir(tmp_path: Path) -> None:
    """The kernel reads ``\\:`` in lowerdir as a colon inside a path."""
    _dirs(tmp_path, "low:er", "upper", "work")
    got = _mount_both(
        tmp_path,
        "lowerdir={B}/low\\:er,upperdir={B}/upper,workdir={B}/work",
        tmp_path / "mk",
        tmp_path / "ml",
    )
    assert got == (True, True), f"layerfs mounted={got[1]}, kernel mounted={got[0]}"


# -- more operations ------------------------------------------------------------------------------


def test_o_rdonly_o_trunc_truncates_lower_file(tmp_path: Path) -> None:
    """open(O_RDONLY | O_TRUNC) truncates on Linux (write permission suffices): a lower file
    must be copied up and truncated, not served read-only from the lower."""

    def op(r: str) -> tuple[int, bytes]:
        fd = os.open(f"{r}/f1", os.O_RDONLY | os.O_TRUNC)
        try:
            return os.fstat(fd).st_size, os.read(fd, 10)
        finally:
            os.close(fd)

    with mounted_pair(tmp_path) as pair:
        pair.run(op)
        pair.run(lambda r: _stat(f"{r}/f1"))
        finish(pair)


def test_rename_onto_own_hard_link_is_a_no_op(tmp_path: Path) -> None:
    """rename(2) between two names of one inode does nothing (both names stay)."""
    with mounted_pair(tmp_path) as pair:
        pair.run(lambda r: os.rename(f"{r}/h1", f"{r}/h2") or sorted(os.listdir(r)))
        pair.run(lambda r: (_stat(f"{r}/h1")[1], _stat(f"{r}/h2")[1]))
        pair.run(lambda r: os.link(f"{r}/f1", f"{r}/f1l") or os.rename(f"{r}/f1", f"{r}/f1l"))
        pair.run(lambda r: sorted(os.listdir(r)))
        finish(pair)


def test_chown_by_root_clears_setid_and_capability(tmp_path: Path) -> None:
    with mounted_pair(tmp_path) as pair:
        pair.run(lambda r: os.chown(f"{r}/suid", 1000, 1000) or _stat(f"{r}/suid"))
        pair.run(lambda r: os.chown(f"{r}/cap", 0, 0) or sorted(os.listxattr(f"{r}/cap")))
        pair.run(lambda r: os.chown(f"{r}/sg", 5, 5) or _stat(f"{r}/sg"))
        pair.run(lambda r: os.chmod(f"{r}/suid", 0o6755) or _stat(f"{r}/suid"))
        pair.run(lambda r: os.chown(f"{r}/suid", -1, -1) or _stat(f"{r}/suid"))
        finish(pair)


def test_links_to_dirs_and_through_whiteouts(tmp_path: Path) -> None:
    with mounted_pair(tmp_path) as pair:
        pair.run(lambda r: os.link(f"{r}/d", f"{r}/dl"))
        pair.run(lambda r: os.unlink(f"{r}/f1") or os.link(f"{r}/f1", f"{r}/f1l"))
        pair.run(lambda r: os.link(f"{r}/f2", f"{r}/f1") or _stat(f"{r}/f1"))
        pair.run(lambda r: os.link(f"{r}/s", f"{r}/sl") or os.readlink(f"{r}/sl"))
        pair.run(lambda r: os.link(f"{r}/p", f"{r}/e/pl") or _stat(f"{r}/p"))
        pair.run(lambda r: os.link(f"{r}/f3", f"{r}/d"))
        finish(pair)


def test_rmdir_of_lower_dir_emptied_by_whiteouts(tmp_path: Path) -> None:
    with mounted_pair(tmp_path) as pair:
        pair.run(lambda r: os.unlink(f"{r}/keep/k") or os.rmdir(f"{r}/keep"))
        pair.run(lambda r: os.mkdir(f"{r}/keep") or os.listdir(f"{r}/keep"))
        pair.run(lambda r: os.rmdir(f"{r}/keep") or os.path.lexists(f"{r}/keep"))
        pair.run(lambda r: os.rename(f"{r}/e", f"{r}/keep") or os.listdir(f"{r}/keep"))
        finish(pair, dir_nlink=False)


def test_symlink_xattrs_and_times(tmp_path: Path) -> None:
    with mounted_pair(tmp_path) as pair:
        pair.run(lambda r: os.setxattr(f"{r}/s", "user.x", b"1", follow_symlinks=False))
        pair.run(lambda r: os.setxattr(f"{r}/s", "trusted.x", b"1", follow_symlinks=False))
        pair.run(
            lambda r: (
                os.utime(f"{r}/s", ns=(5, 7), follow_symlinks=False)
                or os.lstat(f"{r}/s").st_mtime_ns
            )
        )
        pair.run(lambda r: os.lstat(f"{r}/s").st_mtime_ns != os.lstat(f"{r}/f1").st_mtime_ns)
        pair.run(lambda r: os.utime(f"{r}/p", ns=(5, 9)) or os.lstat(f"{r}/p").st_mtime_ns)
        finish(pair)


def test_big_merged_directory_listing(tmp_path: Path) -> None:
    def op(r: str) -> tuple[int, list[str]]:
        for i in range(3000):
            _write(f"{r}/e/n{i}", b"")
        for i in range(0, 3000, 3):
            os.unlink(f"{r}/e/n{i}")
        names = os.listdir(f"{r}/e")
        return len(names), sorted(names)[:5]

    with mounted_pair(tmp_path) as pair:
        pair.run(op)
        finish(pair)


_WORKER = r"""
import os, random, sys
root, seed = sys.argv[1], int(sys.argv[2])
rnd = random.Random(seed)
for i in range(200):
    k = rnd.randrange(5)
    try:
        if k == 0:
            fd = os.open(root + "/big", os.O_WRONLY | os.O_APPEND)
            os.write(fd, b"w%d-%d\n" % (seed, i)); os.close(fd)
        elif k == 1:
            fd = os.open(root + "/d/a", os.O_WRONLY | os.O_APPEND)
            os.write(fd, b"a%d-%d\n" % (seed, i)); os.close(fd)
        elif k == 2:
            n = root + "/e/p%d-%d" % (seed, i)
            fd = os.open(n, os.O_WRONLY | os.O_CREAT); os.close(fd)
        elif k == 3:
            os.setxattr(root + "/tree/x/y", "user.s%d" % seed, b"%d" % i)
        else:
            os.rename(root + "/e/p%d-%d" % (seed, i - 1), root + "/d/sub/p%d-%d" % (seed, i))
    except FileNotFoundError:
        pass
"""


def test_concurrent_writers_match_kernel(tmp_path: Path) -> None:
    """Four processes appending to lower files, creating and renaming at the same time: every
    append lands once, every name ends where the kernel's does (order of appends aside)."""
    import sys

    def op(r: str) -> tuple[list[bytes], list[bytes], list[str], list[str], dict[str, bytes]]:
        procs = [subprocess.Popen([sys.executable, "-c", _WORKER, r, str(s)]) for s in range(4)]
        for p in procs:
            assert p.wait(120) == 0
        big = _read(f"{r}/big")
        tail = big[256 * 8192 :]
        xs = {n: os.getxattr(f"{r}/tree/x/y", n) for n in os.listxattr(f"{r}/tree/x/y")}
        # the order of the appends is the scheduler's: sort them, so the trees can be compared
        a = _read(f"{r}/d/a")
        _write(f"{r}/big", big[: 256 * 8192] + b"".join(sorted(tail.splitlines(True))), os.O_WRONLY)
        _write(f"{r}/d/a", a[:5] + b"".join(sorted(a[5:].splitlines(True))), os.O_WRONLY)
        return (
            sorted(tail.splitlines()),
            sorted(_read(f"{r}/d/a")[5:].splitlines()),
            sorted(os.listdir(f"{r}/e")),
            sorted(os.listdir(f"{r}/d/sub")),
            xs,
        )

    with mounted_pair(tmp_path) as pair:
        pair.run(op)
        finish(pair)


# -- open directories and files across copy-up, rename and removal -----------------------------


def test_dirfd_follows_renamed_lower_dir(tmp_path: Path) -> None:
    """A dir fd (a shell's cwd) on a lower dir, the dir (or its parent) renamed: names made
    through the fd land in the renamed dir."""

    def op(r: str) -> tuple[list[str], list[str], bytes]:
        fd = os.open(f"{r}/tree/x", os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.rename(f"{r}/tree", f"{r}/t2")
            w = os.open("made-after", os.O_WRONLY | os.O_CREAT, 0o644, dir_fd=fd)
            os.write(w, b"after rename")
            os.close(w)
            os.mkdir("sub-after", dir_fd=fd)
            return (
                sorted(os.listdir(f"{r}/t2/x")),
                sorted(os.listdir(fd)),
                _read(f"{r}/t2/x/made-after"),
            )
        finally:
            os.close(fd)

    with mounted_pair(tmp_path) as pair:
        pair.run(op)
        finish(pair, dir_nlink=False)


def test_dirfd_of_removed_lower_dir_does_not_reach_its_successor(tmp_path: Path) -> None:
    """A dir fd on lower dir ``keep``; ``keep`` removed and made again: the old fd is a deleted
    dir (creating through it is ENOENT), the new ``keep`` stays empty."""

    def op(r: str) -> tuple[Any, list[str], list[Any]]:
        fd = os.open(f"{r}/keep", os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.unlink(f"{r}/keep/k")
            os.rmdir(f"{r}/keep")
            os.mkdir(f"{r}/keep")
            try:
                w = os.open("ghost", os.O_WRONLY | os.O_CREAT, 0o644, dir_fd=fd)
                os.close(w)
                res: Any = "created"
            except OSError as e:
                res = e.errno
            try:
                old: Any = sorted(os.listdir(fd))
            except OSError as e:
                old = e.errno
            try:
                st: Any = os.fstat(fd).st_nlink
            except OSError as e:
                st = e.errno
            return res, sorted(os.listdir(f"{r}/keep")), [old, st]
        finally:
            os.close(fd)

    with mounted_pair(tmp_path) as pair:
        pair.run(op)
        finish(pair)


def test_fd_on_hard_link_sees_write_through_other_link(tmp_path: Path) -> None:
    """h1/h2 are one lower inode; a read fd on h2 opened before h1 is written (copy-up of the
    group) reads the new data, as with the kernel's index=on."""

    def op(r: str) -> tuple[bytes, bytes, int]:
        ro = os.open(f"{r}/h2", os.O_RDONLY)
        try:
            first = os.pread(ro, 100, 0)
            _write(f"{r}/h1", b"CHANGED", os.O_WRONLY)
            return first, os.pread(ro, 100, 0), os.fstat(ro).st_size
        finally:
            os.close(ro)

    with mounted_pair(tmp_path) as pair:
        pair.run(op)
        pair.run(lambda r: (_read(f"{r}/h2"), _read(f"{r}/d/h3")))
        finish(pair, remount_dir_nlink=REMOUNT_DIR_NLINK_AFTER_GROUP_COPY_UP)


def test_open_unlinked_lower_file_then_recreated(tmp_path: Path) -> None:
    def op(r: str) -> tuple[int, bytes, int, bytes, bool]:
        fd = os.open(f"{r}/f1", os.O_RDONLY)
        try:
            os.unlink(f"{r}/f1")
            _write(f"{r}/f1", b"second incarnation")
            st = os.fstat(fd)
            return (
                st.st_nlink,
                os.pread(fd, 100, 0),
                os.stat(f"{r}/f1").st_nlink,
                _read(f"{r}/f1"),
                st.st_ino == os.stat(f"{r}/f1").st_ino,
            )
        finally:
            os.close(fd)

    with mounted_pair(tmp_path) as pair:
        pair.run(op)
        finish(pair)


def test_rename_over_open_lower_file(tmp_path: Path) -> None:
    """A read fd on lower f1; f2 renamed over f1: the fd still reads the old f1."""

    def op(r: str) -> tuple[bytes, int, bytes]:
        fd = os.open(f"{r}/f1", os.O_RDONLY)
        try:
            os.rename(f"{r}/f2", f"{r}/f1")
            return os.pread(fd, 100, 0), os.fstat(fd).st_nlink, _read(f"{r}/f1")
        finally:
            os.close(fd)

    with mounted_pair(tmp_path) as pair:
        pair.run(op)
        finish(pair)


def test_aufs_format_refuses_wh_names_by_every_route(tmp_path: Path) -> None:
    """In the aufs (``.wh.``-file) format a ``.wh.NAME`` entry in the upper dir *is* a whiteout,
    so the view refuses to make one (create is EINVAL). Every other way to make such a name
    (rename, link, symlink, mkdir, mknod) must be refused too, or the view hides ``NAME``."""
    from test_rw_posix import build_lower, layerfs_rw

    from layerfs.fs.mount import is_mountpoint

    lower = build_lower(tmp_path / "lower")
    (tmp_path / "u").mkdir()
    (tmp_path / "w").mkdir()
    mnt = tmp_path / "m"
    r = str(mnt)
    results = {}
    with layerfs_rw([lower], str(tmp_path / "u"), str(tmp_path / "w"), mnt, fmt="aufs"):
        assert is_mountpoint(r)
        routes = {
            "create": lambda: _write(f"{r}/.wh.f1", b""),
            "rename": lambda: os.rename(f"{r}/f3", f"{r}/.wh.f1"),
            "link": lambda: os.link(f"{r}/big", f"{r}/.wh.f2"),
            "symlink": lambda: os.symlink("x", f"{r}/.wh.h1"),
            "mkdir": lambda: os.mkdir(f"{r}/.wh.d"),
            "mknod": lambda: os.mkfifo(f"{r}/.wh.e"),
            "opaque": lambda: _write(f"{r}/keep/.wh..wh..opq", b""),
            "rename-dir": lambda: os.rename(f"{r}/tree", f"{r}/.wh.sd"),
        }
        for what, fn in routes.items():
            results[what] = outcome_of(fn)
        names = sorted(os.listdir(r))
        keep = sorted(os.listdir(f"{r}/keep"))
    problems = [f"{w}: {res}" for w, res in results.items() if res != "EINVAL"]
    for gone in ("f1", "f2", "h1", "d", "e", "sd"):
        if gone not in names:
            problems.append(f"{gone} vanished from the view")
    if keep != ["k"]:
        problems.append(f"keep/ lists {keep}")
    assert not problems, "\n".join(problems)


def outcome_of(fn: Any) -> str:
    try:
        fn()
    except OSError as e:
        import errno as _errno

        return _errno.errorcode.get(e.errno or 0, str(e.errno))
    return "ok"


def test_layerfs_remount_shows_what_the_view_showed(tmp_path: Path) -> None:
    """Names and xattrs that look like overlay bookkeeping, made through the view: layerfs
    mounting the same upper again must show the same tree as the live view (and the kernel)."""
    from test_rw_posix import HIDDEN, compare_trees, layerfs_rw

    from fs_helpers import snapshot

    with mounted_pair(tmp_path) as pair:
        pair.run(lambda r: _write(f"{r}/.wh.f2", b"a name") and sorted(os.listdir(r)))
        pair.run(lambda r: _write(f"{r}/e/.wh..wh..opq", b"") and sorted(os.listdir(f"{r}/e")))
        pair.run(
            lambda r: _write(f"{r}/keep/.wh..wh..opq", b"") and sorted(os.listdir(f"{r}/keep"))
        )
        pair.run(lambda r: os.mkdir(f"{r}/.wh.d") or sorted(os.listdir(r)))
        pair.run(lambda r: os.setxattr(f"{r}/f3", "trusted.overlay.opaque", b"y"))
        pair.run(lambda r: os.setxattr(f"{r}/e", "trusted.overlay.opaque", b"y"))
        pair.run(lambda r: os.setxattr(f"{r}/tree", "trusted.overlay.redirect", b"/d"))
        pair.run(lambda r: os.mknod(f"{r}/e/.wh.zz", 0o10644) or sorted(os.listdir(f"{r}/e")))
        live = snapshot(pair.l, HIDDEN)
        finish(pair, dir_nlink=False)
    d = pair.dirs["l"]
    with layerfs_rw([d["lower"]], d["upper"], d["work"], tmp_path / "again-l"):
        again = snapshot(str(tmp_path / "again-l"), HIDDEN)
    compare_trees(again, live, pair.started, "layerfs upper remounted by layerfs", dir_nlink=False)


_OPTION_CASES = {
    "empty-lower-component": (
        "lowerdir={B}/lower::{B}/l2,upperdir={B}/upper,workdir={B}/work",
        ("lower", "l2", "upper", "work"),
    ),
    "lower-is-upper": ("lowerdir={B}/lower,upperdir={B}/lower,workdir={B}/work", ("lower", "work")),
    "lower-is-work": (
        "lowerdir={B}/lower,upperdir={B}/upper,workdir={B}/lower",
        ("lower", "upper"),
    ),
    "lower-inside-upper": (
        "lowerdir={B}/upper/lower,upperdir={B}/upper,workdir={B}/work",
        ("upper/lower", "work"),
    ),
    "upper-inside-work": (
        "lowerdir={B}/lower,upperdir={B}/work/upper,workdir={B}/work",
        ("lower", "work/upper"),
    ),
    "lower-is-a-file": (
        "lowerdir={B}/lower/f,upperdir={B}/upper,workdir={B}/work",
        ("lower", "upper", "work"),
    ),
    "missing-lower": (
        "lowerdir={B}/nothere,upperdir={B}/upper,workdir={B}/work",
        ("lower", "upper", "work"),
    ),
    "same-lower-twice": (
        "lowerdir={B}/lower:{B}/lower,upperdir={B}/upper,workdir={B}/work",
        ("lower", "upper", "work"),
    ),
}


@pytest.mark.parametrize("case", sorted(_OPTION_CASES))
def test_mount_options_accepted_or_refused_like_kernel(tmp_path: Path, case: str) -> None:
    """The same option string with the same dirs: layerfs-overlay mounts iff the kernel does
    (and a refusal is one line, no traceback)."""
    opts, names = _OPTION_CASES[case]
    _dirs(tmp_path, *names)
    got = _mount_both(tmp_path, opts, tmp_path / "mk", tmp_path / "ml")
    assert got[1] == got[0], f"{case}: layerfs mounted={got[1]}, kernel mounted={got[0]}"


def test_xattr_edge_cases(tmp_path: Path) -> None:
    def acl(r: str) -> tuple[int, str]:
        p = subprocess.run(
            ["setfacl", "-m", "u:1000:rw", f"{r}/f1"], capture_output=True, text=True
        )
        g = subprocess.run(["getfacl", "-c", f"{r}/f1"], capture_output=True, text=True)
        return p.returncode, g.stdout

    with mounted_pair(tmp_path) as pair:
        pair.run(lambda r: os.setxattr(f"{r}/f2", "user.big", b"v" * 65536))
        pair.run(lambda r: os.setxattr(f"{r}/f2", "user.big2", b"v" * 65537))
        pair.run(lambda r: os.setxattr(f"{r}/f2", "user." + "n" * 250, b"1"))
        pair.run(lambda r: os.setxattr(f"{r}/p", "user.onfifo", b"1"))
        pair.run(lambda r: os.setxattr(f"{r}/cdev", "user.ondev", b"1"))
        pair.run(lambda r: os.setxattr(f"{r}/f3", "user.x", b"1", os.XATTR_REPLACE))
        pair.run(lambda r: os.setxattr(f"{r}/xf", "user.a", b"1", os.XATTR_CREATE))
        pair.run(lambda r: os.setxattr(f"{r}/f3", "bogus.ns", b"1"))
        pair.run(lambda r: os.setxattr(f"{r}/d", "security.capability", b"\x01"))
        pair.run(acl)
        pair.run(lambda r: sorted(os.listxattr(f"{r}/f1")))
        finish(pair)


# -- crash atomicity of rename (fault injected with strace, no timing) ---------------------------


_MUTATING = "mknodat,mknod,renameat2,renameat,rename,unlinkat,unlink,rmdir,mkdirat,mkdir"


def _crash_at(pid: int, mnt: str, op: str, calls: str, when: int) -> bool:
    """SIGKILL daemon *pid* on entry to the *when*-th call of each syscall in *calls* (strace
    counts per syscall) while a child runs *op* in the view; then drop the dead mount. False
    if *op* finished first (the daemon made fewer calls: it is left running)."""
    import sys

    from conftest import process_gone, require_tool, wait_until
    from layerfs.fs.mount import abort_connection, detach

    strace = require_tool("strace")
    tracer = subprocess.Popen(
        [
            strace,
            "-f",
            "-p",
            str(pid),
            "-qq",
            "-e",
            f"trace={calls}",
            "-e",
            f"inject={calls}:signal=SIGKILL:when={when}",
            "-o",
            "/dev/null",
        ],
        stderr=subprocess.PIPE,
    )
    try:
        # attached once the daemon's status shows a tracer
        def traced() -> bool:
            with open(f"/proc/{pid}/status") as f:
                return any(ln.startswith("TracerPid:") and ln.split()[1] != "0" for ln in f)

        wait_until(traced, "strace attached to the daemon", 30)
        child = subprocess.Popen([sys.executable, "-c", op, mnt])
        wait_until(
            lambda: process_gone(pid) or child.poll() is not None,
            "the daemon was killed or the rename finished",
            60,
        )
        if not process_gone(pid):
            child.wait(60)
            return False
        abort_connection(mnt)
        child.wait(60)
        detach(mnt)
        return True
    finally:
        if tracer.poll() is None:
            tracer.kill()
        tracer.wait()


_CRASH_CASES = {
    # (made first through the view, rename source, rename destination)
    "lower-dir-over-upper-dir": ("mkdir:newdir", "keep", "newdir"),
    "lower-file-over-upper-file": ("file:newf", "f1", "newf"),
    "lower-dir-over-whiteout": ("rm:f2", "keep", "f2"),
}


@pytest.mark.parametrize("point", ["mknod-1", "any-1", "any-2", "any-3"])
@pytest.mark.parametrize("case", sorted(_CRASH_CASES))
def test_crash_in_rename_is_atomic(tmp_path: Path, case: str, point: str) -> None:
    """The kernel's rename is atomic: after a crash of the daemon inside rename(SRC, DST) (SRC
    in the lower, DST in the upper), the upper shows the old state or the new one, never SRC
    and DST both. The crash is injected at the daemon's first mknod(2) inside the rename, or
    at its 1st, 2nd, 3rd call of each mutating syscall (mknod, rename, unlink, rmdir, mkdir);
    a rename that makes fewer such calls finishes and must show the new state."""
    from test_rw_posix import HIDDEN, build_lower, kernel_ro, kernel_rw, layerfs_rw

    from fs_helpers import snapshot

    setup, src, dst = _CRASH_CASES[case]

    def prepare(m: str) -> None:
        kind, _, name = setup.partition(":")
        if kind == "mkdir":
            os.mkdir(f"{m}/{name}")
        elif kind == "file":
            _write(f"{m}/{name}", b"upper")
        else:
            os.unlink(f"{m}/{name}")

    states = {}
    for name, do in (("before", False), ("after", True)):
        base = tmp_path / name
        lower = build_lower(base / "lower")
        (base / "u").mkdir()
        (base / "w").mkdir()
        with kernel_rw(lower, str(base / "u"), str(base / "w"), base / "m") as m:
            prepare(m)
            if do:
                os.rename(f"{m}/{src}", f"{m}/{dst}")
            states[name] = {p: r["type"] for p, r in snapshot(m, HIDDEN).items()}

    base = tmp_path / "crash"
    lower = build_lower(base / "lower")
    (base / "u").mkdir()
    (base / "w").mkdir()
    mnt = base / "m"
    with layerfs_rw([lower], str(base / "u"), str(base / "w"), mnt) as pid:
        prepare(str(mnt))
        op = (
            "import os,sys\ntry:\n"
            f" os.rename(sys.argv[1]+'/{src}', sys.argv[1]+'/{dst}')\n"
            "except OSError:\n pass"
        )
        which, _, n = point.partition("-")
        calls = "mknodat,mknod" if which == "mknod" else _MUTATING
        crashed = _crash_at(pid, str(mnt), op, calls, int(n))
    with kernel_ro([str(base / "u"), lower], base / "again") as m:
        got = {p: r["type"] for p, r in snapshot(m, HIDDEN).items()}
    keys = {p for p in set(got) | set(states["before"]) if p.startswith((src, dst))}
    view = {p: got.get(p) for p in sorted(keys)}
    if not crashed:
        assert got == states["after"], f"after the rename the upper shows {view}"
    assert got in (states["before"], states["after"]), f"after the crash the upper shows {view}"


# -- miscellaneous system calls ------------------------------------------------------------------


def test_o_direct_write_to_lower_file(tmp_path: Path) -> None:
    def op(r: str) -> tuple[int, bytes]:
        buf = mmap.mmap(-1, 4096)
        buf.write(b"D" * 4096)
        fd = os.open(f"{r}/big", os.O_RDWR | os.O_DIRECT)
        try:
            n = os.pwritev(fd, [buf], 4096)
        finally:
            os.close(fd)
        return n, _read(f"{r}/big")[4090:4100]

    with mounted_pair(tmp_path) as pair:
        pair.run(op)
        finish(pair)


def test_o_tmpfile(tmp_path: Path) -> None:
    """open(O_TMPFILE): the kernel makes an unnamed file in the upper dir. layerfs answers
    EOPNOTSUPP (documented difference): pyfuse3 3.5 has no tmpfile handler. Nothing changes
    in either view's tree."""

    def op(r: str) -> tuple[int, bytes, list[str]]:
        fd = os.open(f"{r}/d", os.O_TMPFILE | os.O_RDWR, 0o600)
        try:
            os.write(fd, b"anon")
            return os.fstat(fd).st_nlink, os.pread(fd, 10, 0), sorted(os.listdir(f"{r}/d"))
        finally:
            os.close(fd)

    with mounted_pair(tmp_path) as pair:
        pinned_difference(pair, op, "ENOTSUP")
        finish(pair, dir_nlink=False)  # the kernel copied up d (merged: link count 1)


def test_copy_file_range_between_lower_files(tmp_path: Path) -> None:
    def op(r: str) -> tuple[int, bytes]:
        src = os.open(f"{r}/big", os.O_RDONLY)
        dst = os.open(f"{r}/f2", os.O_WRONLY)
        try:
            n = os.copy_file_range(src, dst, 10000, 0, 2)
        finally:
            os.close(src)
            os.close(dst)
        return n, _read(f"{r}/f2")

    with mounted_pair(tmp_path) as pair:
        pair.run(op)
        finish(pair)


def test_rename_whiteout_flag_from_the_view(tmp_path: Path) -> None:
    with mounted_pair(tmp_path) as pair:
        pair.run(lambda r: renameat2(B(f"{r}/f1"), B(f"{r}/f1w"), 4))  # RENAME_WHITEOUT
        pair.run(lambda r: sorted(os.listdir(r)))
        finish(pair)


def test_utime_now_and_omit_on_lower_entries(tmp_path: Path) -> None:
    with mounted_pair(tmp_path) as pair:
        pair.run(lambda r: os.utime(f"{r}/f1") or os.stat(f"{r}/f1").st_mtime_ns > 10**18)
        pair.run(lambda r: os.utime(f"{r}/d", ns=(1, 2)) or os.stat(f"{r}/d").st_mtime_ns)
        pair.run(lambda r: sorted(os.listdir(f"{r}/d")))
        pair.run(lambda r: os.utime(f"{r}/sd", ns=(3, 4)) or os.stat(f"{r}/d").st_mtime_ns)
        finish(pair)


def test_telldir_seekdir_on_merged_dir(tmp_path: Path) -> None:
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    libc.opendir.restype = ctypes.c_void_p
    libc.readdir.restype = ctypes.c_void_p
    libc.readdir.argtypes = [ctypes.c_void_p]
    libc.telldir.restype = ctypes.c_long
    libc.telldir.argtypes = [ctypes.c_void_p]
    libc.seekdir.argtypes = [ctypes.c_void_p, ctypes.c_long]
    libc.closedir.argtypes = [ctypes.c_void_p]
    name_off = 19  # struct dirent64: d_ino 8, d_off 8, d_reclen 2, d_type 1

    def entries(dp: int, n: int) -> list[bytes]:
        out = []
        for _ in range(n):
            ent = libc.readdir(dp)
            if not ent:
                break
            out.append(ctypes.string_at(ent + name_off))
        return out

    def op(r: str) -> tuple[list[bytes], list[bytes], list[bytes]]:
        for i in range(100):
            _write(f"{r}/d/u{i}", b"")
        dp = libc.opendir(os.fsencode(f"{r}/d"))
        try:
            entries(dp, 50)
            pos = libc.telldir(dp)
            mid = entries(dp, 30)
            rest = entries(dp, 1000)
            libc.seekdir(dp, pos)
            again = entries(dp, 30)
            # same entries after a seek back (order is the fs's own: compare as sets)
            return (
                sorted(mid) if sorted(mid) == sorted(again) else [b"seek differs"],
                [],
                sorted(set(mid) | set(rest) | set(entries(dp, 0)))[:0],
            )
        finally:
            libc.closedir(dp)

    with mounted_pair(tmp_path) as pair:
        res_k = __import__("test_rw_posix").outcome(op, pair.k)
        res_l = __import__("test_rw_posix").outcome(op, pair.l)
        assert res_l[0] == res_k[0] == "ok", (res_l, res_k)
        assert res_l[1][0] != [b"seek differs"], (
            "layerfs: seekdir back did not return the same entries"
        )
        finish(pair)


def test_paths_longer_than_path_max(tmp_path: Path) -> None:
    """Dirs nested past PATH_MAX (each step made relative to the previous dir's fd, as tar and
    rm -rf do): the kernel works with dentries and goes on; layerfs addresses upper entries by
    absolute path strings and answers ENAMETOOLONG once the upper path passes PATH_MAX
    (documented difference). ``rm -rf`` of what each made gives the same trees."""
    comp = "n" * 200

    def op(r: str) -> tuple[int, bytes, list[str]]:
        fd = os.open(f"{r}/e", os.O_RDONLY | os.O_DIRECTORY)
        try:
            for _ in range(25):  # 25 * 201 bytes > 4096
                os.mkdir(comp, dir_fd=fd)
                nfd = os.open(comp, os.O_RDONLY | os.O_DIRECTORY, dir_fd=fd)
                os.close(fd)
                fd = nfd
            w = os.open("leaf", os.O_WRONLY | os.O_CREAT, 0o644, dir_fd=fd)
            os.write(w, b"deep")
            os.close(w)
            os.rename("leaf", "leaf2", src_dir_fd=fd, dst_dir_fd=fd)
            r2 = os.open("leaf2", os.O_RDONLY, dir_fd=fd)
            data = os.read(r2, 10)
            os.close(r2)
            return os.stat("leaf2", dir_fd=fd).st_size, data, sorted(os.listdir(fd))
        finally:
            os.close(fd)

    with mounted_pair(tmp_path) as pair:
        pinned_difference(pair, op, "ENAMETOOLONG")
        pair.run(lambda r: subprocess.run(["rm", "-rf", f"{r}/e"], check=True) and None)
        pair.run(lambda r: sorted(os.listdir(r)))
        finish(pair)


def test_copy_up_keeps_a_sparse_file_sparse(tmp_path: Path) -> None:
    """Kernel copy-up skips holes (SEEK_DATA/SEEK_HOLE): a 256 MiB lower file with 4 KiB of
    data stays a few blocks in the upper."""

    def prep(d: dict[str, str]) -> None:
        with open(Path(d["lower"]) / "sparse", "wb") as f:
            f.truncate(256 << 20)
            f.seek(128 << 20)
            f.write(b"s" * 4096)

    def op(r: str) -> tuple[int, bool]:
        _write(f"{r}/sparse", b"+", os.O_WRONLY | os.O_APPEND)
        st = os.stat(f"{r}/sparse")
        return st.st_size, st.st_blocks * 512 < (1 << 20)

    with _prepared_pair(tmp_path, prep) as pair:
        pair.run(op)
        finish(pair)


def test_unix_socket_bound_in_view(tmp_path: Path) -> None:
    import socket

    def op(r: str) -> tuple[int, list[str]]:
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            s.bind(f"{r}/e/sock")
        finally:
            s.close()
        return os.lstat(f"{r}/e/sock").st_mode, sorted(os.listdir(f"{r}/e"))

    with mounted_pair(tmp_path) as pair:
        pair.run(op)
        pair.run(lambda r: os.unlink(f"{r}/e/sock") or os.listdir(f"{r}/e"))
        finish(pair)


def test_wh_named_regular_file_in_a_lower_under_kernel_format(tmp_path: Path) -> None:
    """A lower diff dir holding a regular file named ``.wh.f2`` beside ``f2`` (in the kernel
    format a ``.wh.`` file is just a name): the kernel shows both."""

    def prep(d: dict[str, str]) -> None:
        (Path(d["lower"]) / ".wh.f2").write_bytes(b"a name\n")
        (Path(d["lower"]) / "d" / ".wh..wh..opq").write_bytes(b"")

    with _prepared_pair(tmp_path, prep) as pair:
        pair.run(lambda r: sorted(os.listdir(r)))
        pair.run(lambda r: sorted(os.listdir(f"{r}/d")))
        pair.run(lambda r: _write(f"{r}/.wh.f2", b"+", os.O_WRONLY | os.O_APPEND))
        pair.run(lambda r: os.unlink(f"{r}/d/.wh..wh..opq") or sorted(os.listdir(f"{r}/d")))
        finish(pair)
