"""View paths resolve like a chrooted process sees them, never leaving the view.

Oracle: a kernel overlay mount of the same layers, with a static busybox inside it, queried
through ``chroot MNT /bin/busybox ...`` (so ``/`` and ``..`` at the root are the view's).
End to end: ``layerfs cat``/``ls``/``which`` on a merged-/usr image (``lib -> usr/lib``).
"""

from __future__ import annotations

import io
import json
import os
import stat
import subprocess
import tarfile
from pathlib import Path

import pytest

from conftest import LayerfsCLI, require_root, require_tool
from fs_helpers import Layer, kernel_overlay
from layerfs.fs.index import build_index
from layerfs.fs.viewpath import MAX_SYMLINKS, ViewPathError, resolve

pytestmark = [pytest.mark.root]

PATHS = [
    "usr/lib/os-release",
    "lib/os-release",
    "lib/../marker",  # physical "..": lib is usr/lib, so this is /usr/marker
    "lib/sub/../../marker",
    "abs/os-release",
    "escape/os-release",  # ../../../../usr/lib: ".." stops at the root
    "up/deep/dotdot/marker",
    "up/deep/dotdot",
    "/../../marker",
    "file-link",
    "dirlink/x",
    "dirlink/x/",
    "lib",
    "lib/",
    "lib/.",
    "top-abs",
    "loop1",
    "loop1/x",
    "selfloop",
    "dangling",
    "dangling/x",
    "usr/lib/os-release/x",
    "usr/lib/os-release/",
    "file-link/",
    "gone-link",
    "etc/gone",
    "c0",  # a chain of exactly MAX_SYMLINKS links
    "d0",  # one link more
    "missing",
    ".",
    "/",
    "",
    "twice//lib//os-release",
]


def _chain(base: Path) -> list[str]:
    bottom = Layer(base / "bottom")
    bottom.file("bin/busybox", Path(require_tool("busybox")).resolve().read_bytes(), mode=0o755)
    bottom.file("usr/lib/os-release", b"ID=bottom\n").file("usr/lib/sub/f", b"f")
    bottom.file("usr/marker", b"in usr\n").file("marker", b"in root\n")
    bottom.symlink("lib", "usr/lib").symlink("abs", "/usr/lib")
    bottom.symlink("escape", "../../../../usr/lib")
    bottom.symlink("up/deep/dotdot", "../..")
    bottom.symlink("file-link", "usr/lib/os-release")
    bottom.dir("dirlink").symlink("dirlink/x", "../lib/os-release")
    bottom.symlink("loop1", "loop2").symlink("loop2", "loop1").symlink("selfloop", "selfloop")
    bottom.symlink("dangling", "/nonexistent")
    bottom.file("etc/gone", b"deleted above").symlink("gone-link", "etc/gone")
    for i in range(MAX_SYMLINKS):
        bottom.symlink(f"c{i}", f"c{i + 1}" if i + 1 < MAX_SYMLINKS else "usr/marker")
    for i in range(MAX_SYMLINKS + 1):
        bottom.symlink(f"d{i}", f"d{i + 1}" if i + 1 <= MAX_SYMLINKS else "usr/marker")
    bottom.symlink("twice", ".")
    top = Layer(base / "top")
    top.file("usr/lib/os-release", b"ID=top\n")
    top.symlink("top-abs", "/lib/os-release")
    top.whiteout("etc/gone")
    return [str(top.finish()), str(bottom.finish())]


def _busybox(mnt: str, *argv: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["chroot", mnt, "/bin/busybox", *argv], capture_output=True, text=True, timeout=30
    )


def _oracle_follow(mnt: str, path: str) -> tuple[str, str]:
    """("ok", canonical path) or ("err", strerror) for *path* in the chroot: stat(2) says
    whether it resolves (busybox realpath accepts a missing last component)."""
    st = _busybox(mnt, "stat", "-L", "-c", "%F", path or ".")
    if st.returncode != 0:
        return "err", st.stderr.strip().rsplit(": ", 1)[-1]
    r = _busybox(mnt, "realpath", path or ".")
    assert r.returncode == 0, r.stderr
    return "ok", r.stdout.strip()


def _ours(idx, path: str, follow_last: bool) -> tuple[str, str]:  # type: ignore[no-untyped-def]
    try:
        return "ok", resolve(idx, path, follow_last=follow_last).path
    except ViewPathError as e:
        return "err", os.strerror(e.errno)


def test_resolution_matches_a_chroot_on_kernel_overlay(tmp_path: Path) -> None:
    require_root()
    require_tool("chroot")
    dirs = _chain(tmp_path)
    idx = build_index(dirs)
    with kernel_overlay(dirs, tmp_path / "k") as mnt:
        problems = []
        for path in PATHS:
            want, got = _oracle_follow(mnt, path), _ours(idx, path, True)
            if want != got:
                problems.append(f"follow {path!r}: kernel {want}, layerfs {got}")
            if path.rstrip("/") in ("", ".") or path.endswith(("/", "/.", "/..")):
                continue
            # without following the last component: the parent is resolved, the entry is
            # the link itself (lstat)
            head, _, name = path.rpartition("/")
            parent = _oracle_follow(mnt, head or "/")
            lst = _busybox(mnt, "stat", "-c", "%F %s", path)
            got = _ours(idx, path, False)
            if parent[0] == "ok" and lst.returncode == 0:
                want = ("ok", parent[1].rstrip("/") + "/" + name)
                if got[0] == "ok":
                    attr = idx.attr(resolve(idx, path, follow_last=False).ino)
                    kind = {stat.S_IFLNK: "symbolic link", stat.S_IFDIR: "directory"}.get(
                        stat.S_IFMT(attr.mode), "regular file"
                    )
                    mine = f"{kind} {attr.size}"
                    theirs = lst.stdout.strip().replace("regular empty file", "regular file")
                    if mine != theirs:
                        problems.append(f"lstat {path!r}: kernel {theirs}, layerfs {mine}")
            else:
                want = parent if parent[0] == "err" else ("err", lst.stderr.rsplit(": ", 1)[-1])
                want = (want[0], want[1].strip())
            if want != got:
                problems.append(f"nofollow {path!r}: kernel {want}, layerfs {got}")
            # cat: content through the chroot equals the content of what we resolved
            cat = _busybox(mnt, "cat", path)
            if cat.returncode == 0 and got[0] == "ok":
                ino = resolve(idx, path, follow_last=True).ino
                if Path(os.fsdecode(idx.backing_path(ino))).read_text() != cat.stdout:
                    problems.append(f"cat {path!r}: content differs")
        assert problems == [], "\n".join(problems)


def _tar(entries: list[tuple[str, str, bytes | str | None]]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tf:
        for name, kind, data in entries:
            info = tarfile.TarInfo(name)
            info.mtime = 1_700_000_000
            if kind == "d":
                info.type, info.mode = tarfile.DIRTYPE, 0o755
                tf.addfile(info)
            elif kind == "l":
                info.type, info.linkname, info.mode = tarfile.SYMTYPE, str(data), 0o777
                tf.addfile(info)
            else:
                assert isinstance(data, bytes)
                info.size, info.mode = len(data), 0o644
                tf.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def test_cat_ls_which_follow_symlinked_dirs_in_a_merged_usr_image(cli: LayerfsCLI) -> None:
    cli.run(
        "import-layer",
        "--name",
        "usrmerge",
        input=_tar(
            [
                ("usr", "d", None),
                ("usr/lib", "d", None),
                ("usr/lib/os-release", "f", b"ID=layerfs\n"),
                ("usr/lib/x", "f", b"x"),
                ("etc", "d", None),
                ("etc/passwd", "f", b"view passwd\n"),
                ("lib", "l", "usr/lib"),
                ("etc/os-release", "l", "../usr/lib/os-release"),
                ("out", "l", "/etc/passwd"),
            ]
        ),
    )
    assert cli.run("cat", "usrmerge", "lib/os-release").stdout == b"ID=layerfs\n"
    assert cli.run("cat", "usrmerge", "/etc/os-release").stdout == b"ID=layerfs\n"
    assert cli.run("cat", "usrmerge", "out").stdout == b"view passwd\n"  # not the host's

    link = json.loads(cli.out("ls", "--json", "usrmerge", "lib"))  # the link itself
    assert [(r["name"], r["mode"][0], r["target"]) for r in link] == [("lib", "l", "usr/lib")]
    listing = json.loads(cli.out("ls", "--json", "usrmerge", "lib/"))
    assert [r["name"] for r in listing] == ["os-release", "x"]

    which = cli.out("which", "usrmerge", "lib/os-release")
    assert which.splitlines()[0].startswith("/usr/lib/os-release: file from layer ")
    assert "resolved from lib/os-release" in which
    info = json.loads(cli.out("which", "--json", "usrmerge", "lib/os-release"))
    assert info["path"] == "/usr/lib/os-release" and info["followed_symlinks"] is True
    plain = json.loads(cli.out("which", "--json", "usrmerge", "lib"))
    assert plain["path"] == "/lib" and plain["followed_symlinks"] is False

    r = cli.run("cat", "usrmerge", "lib/nope", check=False)
    assert r.returncode == 1
    assert r.stderr.decode().strip().splitlines() == [
        "layerfs: lib/nope: No such file or directory (in the view)"
    ]
