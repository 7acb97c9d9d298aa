"""Shared helpers for the archive tests: tar builders, tree snapshots, the Go oracle."""

from __future__ import annotations

import io
import json
import os
import stat
import subprocess
import tarfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from conftest import require_root, require_tool

CS = "/usr/bin/containers-storage"

__all__ = ["require_root", "require_tool"]


@dataclass
class E:
    """A tar entry to build: ``E("a/f", data=b"x")``, ``E("d/", "dir")``, ``E("l", "sym", "t")``."""

    name: str
    kind: str = "file"
    link: str = ""
    data: bytes = b""
    mode: int | None = None
    uid: int = 0
    gid: int = 0
    mtime: float = 1_700_000_000
    dev: tuple[int, int] = (0, 0)
    pax: dict[str, str] = field(default_factory=dict)


_TYPES = {
    "file": tarfile.REGTYPE,
    "dir": tarfile.DIRTYPE,
    "sym": tarfile.SYMTYPE,
    "hard": tarfile.LNKTYPE,
    "chr": tarfile.CHRTYPE,
    "blk": tarfile.BLKTYPE,
    "fifo": tarfile.FIFOTYPE,
}


def build_tar(entries: list[E], fmt: int = tarfile.PAX_FORMAT, **kw: Any) -> bytes:
    """Build a tar in memory with Python's tarfile (names may hold surrogate escapes)."""
    buf = io.BytesIO()
    with tarfile.open(
        fileobj=buf, mode="w", format=fmt, encoding="utf-8", errors="surrogateescape", **kw
    ) as t:
        for e in entries:
            ti = tarfile.TarInfo(e.name)
            ti.type = _TYPES[e.kind]
            ti.linkname = e.link
            ti.mode = e.mode if e.mode is not None else (0o755 if e.kind == "dir" else 0o644)
            ti.uid, ti.gid, ti.mtime = e.uid, e.gid, e.mtime
            ti.devmajor, ti.devminor = e.dev
            ti.pax_headers = dict(e.pax)
            ti.size = len(e.data) if e.kind == "file" else 0
            t.addfile(ti, io.BytesIO(e.data) if ti.size else None)
    return buf.getvalue()


def raw_header(name: bytes, typeflag: bytes = b"0", size: int = 0, link: bytes = b"") -> bytes:
    """A hand-made ustar header block (for names tarfile refuses to write)."""
    blk = bytearray(512)
    blk[0 : len(name)] = name
    blk[100:108] = b"0000644\0"
    blk[108:116] = b"0000000\0"
    blk[116:124] = b"0000000\0"
    blk[124:136] = b"%011o\0" % size
    blk[136:148] = b"14000000000\0"
    blk[156:157] = typeflag
    blk[157 : 157 + len(link)] = link
    blk[257:265] = b"ustar\x0000"
    blk[148:156] = b"        "
    blk[148:156] = b"%06o\0 " % sum(blk)
    return bytes(blk)


def raw_entry(name: bytes, data: bytes = b"", typeflag: bytes = b"0", link: bytes = b"") -> bytes:
    """Header plus padded content."""
    pad = bytes(-len(data) % 512)
    return raw_header(name, typeflag, len(data), link) + data + pad


def snapshot(root: str | Path) -> dict[str, tuple[Any, ...]]:
    """Everything we preserve about a tree: type, mode, owner, mtime, content, xattrs, links."""
    out: dict[str, tuple[Any, ...]] = {}
    broot = os.fsencode(str(root))
    inodes: dict[int, str] = {}
    for dirpath, dirnames, filenames in os.walk(broot):
        for name in sorted(dirnames + filenames):
            p = os.path.join(dirpath, name)
            rel = os.fsdecode(os.path.relpath(p, broot))
            st = os.lstat(p)
            xattrs = tuple(
                sorted(
                    (k, os.getxattr(p, k, follow_symlinks=False))
                    for k in os.listxattr(p, follow_symlinks=False)
                )
            )
            extra: Any = None
            if stat.S_ISREG(st.st_mode):
                with open(p, "rb") as f:
                    extra = f.read()
                if st.st_nlink > 1:
                    extra = ("link", inodes.setdefault(st.st_ino, rel), extra)
            elif stat.S_ISLNK(st.st_mode):
                extra = os.readlink(p)
            elif stat.S_ISCHR(st.st_mode) or stat.S_ISBLK(st.st_mode):
                extra = (os.major(st.st_rdev), os.minor(st.st_rdev))
            mtime: int | None = st.st_mtime_ns
            if stat.S_ISCHR(st.st_mode) and st.st_rdev == 0:
                mtime = None  # whiteouts get the time of extraction, as in Go
            out[rel] = (st.st_mode, st.st_uid, st.st_gid, mtime, extra, xattrs)
    return out


class GoStore:
    """The real containers-storage CLI on a private graph root (overlay driver)."""

    def __init__(self, base: Path) -> None:
        require_root()
        require_tool("containers-storage")
        self.g = base / "g"
        self.r = base / "r"

    def run(self, *args: str, check: bool = True, stdin: bytes | None = None) -> str:
        cmd = [CS, "-g", str(self.g), "-R", str(self.r), "-s", "overlay", *args]
        p = subprocess.run(cmd, input=stdin, capture_output=True, timeout=120)
        if check and p.returncode != 0:
            raise AssertionError(f"{cmd} failed: {p.stderr.decode()}")
        return p.stdout.decode()

    def import_layer(self, path: Path, parent: str | None = None) -> dict[str, Any]:
        args = ["import-layer", "-j", "-f", str(path)]
        out = self.run(*args, *([parent] if parent else []))
        rec: dict[str, Any] = json.loads(out)
        return rec

    def create_layer(self, parent: str | None = None) -> str:
        out = self.run("create-layer", *([parent] if parent else []))
        return out.split()[0]

    def record(self, layer_id: str) -> dict[str, Any]:
        layers = json.loads((self.g / "overlay-layers" / "layers.json").read_text())
        return next(rec for rec in layers if rec["id"] == layer_id)

    def diff_dir(self, layer_id: str) -> Path:
        return self.g / "overlay" / layer_id / "diff"

    def tar_split(self, layer_id: str) -> Path:
        return self.g / "overlay-layers" / f"{layer_id}.tar-split.gz"

    def lowers(self, layer_id: str) -> list[str]:
        lower = self.g / "overlay" / layer_id / "lower"
        if not lower.exists():
            return []
        return [str((self.g / "overlay" / p).resolve()) for p in lower.read_text().split(":")]

    def diff(self, layer_id: str, out: Path) -> bytes:
        self.run("diff", "-u", "-f", str(out), layer_id)
        return out.read_bytes()

    def changes(self, layer_id: str) -> list[tuple[str, int]]:
        data = json.loads(self.run("changes", "-j", layer_id) or "[]")
        return [(c["Path"], c["Kind"]) for c in data or []]

    def shutdown(self) -> None:
        self.run("shutdown", check=False)


def walk_names(root: Path) -> Iterator[str]:
    for dirpath, dirnames, filenames in os.walk(root):
        for n in dirnames + filenames:
            yield os.path.relpath(os.path.join(dirpath, n), root)
