"""Whiteout, opaque and redirect rules follow the store's format, each against its own oracle:
kernel overlayfs for the "kernel" format, fuse-overlayfs 1.10 for the "aufs" format.

Generated chains use every marker form, honoured and ignored ones alike, in both formats (a
kernel-format layer holding ``.wh.`` files must show them as files; an aufs-format layer holding
``trusted.overlay.redirect`` must ignore it)."""

from __future__ import annotations

import os
import random
import shutil
import stat
import tempfile
from pathlib import Path

import pytest

from fs_helpers import (
    Layer,
    assert_same_tree,
    fuse_overlayfs,
    kernel_overlay,
    layerfs_mount,
    require_root,
    snapshot,
    snapshot_index,
)
from layerfs.fs.index import build_index, which

pytestmark = pytest.mark.root

# what each oracle never lists (plus layerfs's own provenance xattr)
HIDDEN = {
    "kernel": (b"trusted.overlay.", b"user.layerfs."),
    "aufs": (b"trusted.overlay.", b"user.overlay.", b"user.fuseoverlayfs.", b"user.layerfs."),
}
NAMES = ["a", "b", "c", ".wh.a", ".wh.b"]
KINDS = [
    "file",
    "empty",
    "dir",
    "symlink",
    "hardlink",
    "whiteout-char",
    "whiteout-file",
    "whiteout-xattr",
    "xattr-nonempty",
    "opaque-trusted",
    "opaque-x",
    "opaque-user",
    "opaque-fuse",
    "opaque-marker",
    "redirect-abs",
    "redirect-rel",
    "dev",
    "fifo",
]


@pytest.fixture(autouse=True)
def _root() -> None:
    require_root()


def _random_layer(root: Path, rng: random.Random, n: int, ops: int) -> str:
    lay = Layer(root)
    for _ in range(ops):
        depth = rng.randint(1, 3)
        comps = [rng.choice(NAMES) for _ in range(depth)]
        rel = "/".join(comps)
        p = root / rel
        kind = rng.choice(KINDS)
        try:
            if os.path.lexists(p) and kind not in (
                "opaque-trusted",
                "opaque-x",
                "opaque-user",
                "opaque-fuse",
                "opaque-marker",
                "redirect-abs",
                "redirect-rel",
            ):
                continue
            if kind == "file":
                lay.file(
                    rel,
                    f"{n}:{rel}".encode(),
                    mode=0o640 + n,
                    uid=n,
                    xattrs={"user.l": str(n).encode()} if rng.random() < 0.3 else None,
                )
            elif kind == "empty":
                lay.file(rel, b"")
            elif kind == "dir":
                lay.dir(rel, mode=0o750 + n)
            elif kind == "symlink":
                lay.symlink(rel, f"target-{n}")
            elif kind == "hardlink":
                src = root / "hl-src"
                if not src.exists():
                    lay.file("hl-src", b"linked")
                lay.hardlink(rel, "hl-src")
            elif kind == "whiteout-char":
                lay.whiteout(rel)
            elif kind == "whiteout-file":
                if Path(rel).name.startswith(".wh."):
                    # ".wh..wh.*" names are aufs metadata: applydiff (Go's and ours) never
                    # writes them, and fuse-overlayfs reads them inconsistently
                    continue
                wh = str(Path(rel).parent / (".wh." + Path(rel).name))
                if os.path.lexists(root / wh):
                    continue
                lay.file(wh, b"")
            elif kind in ("whiteout-xattr", "xattr-nonempty"):
                lay.file(rel, b"" if kind == "whiteout-xattr" else b"data")
                os.setxattr(p, "trusted.overlay.whiteout", b"")
                if rng.random() < 0.5:
                    os.setxattr(p.parent, "trusted.overlay.opaque", b"x")
            elif kind == "dev":
                lay.device(rel, "c", 1, n + 1)
            elif kind == "fifo":
                lay.fifo(rel)
            else:
                if not p.is_dir() or p.is_symlink():
                    lay.dir(rel)
                if kind == "opaque-trusted":
                    os.setxattr(p, "trusted.overlay.opaque", b"y")
                elif kind == "opaque-x":
                    os.setxattr(p, "trusted.overlay.opaque", b"x")
                elif kind == "opaque-user":
                    os.setxattr(p, "user.overlay.opaque", b"y")
                elif kind == "opaque-fuse":
                    os.setxattr(p, "user.fuseoverlayfs.opaque", b"y")
                elif kind == "opaque-marker":
                    (p / ".wh..wh..opq").touch()
                elif kind == "redirect-abs":
                    target = "/" + "/".join(rng.choice(NAMES[:3]) for _ in range(rng.randint(1, 2)))
                    os.setxattr(p, "trusted.overlay.redirect", target.encode())
                else:
                    os.setxattr(p, "trusted.overlay.redirect", rng.choice(NAMES[:3]).encode())
        except (NotADirectoryError, FileExistsError, IsADirectoryError):
            continue
    return str(lay.finish())


def _chain(base: Path, seed: int) -> list[str]:
    rng = random.Random(seed)
    n = rng.randint(2, 4)
    dirs = [_random_layer(base / f"l{i}", rng, i, rng.randint(3, 12)) for i in range(n)]
    return list(reversed(dirs))  # top first


def _oracle(fmt: str, dirs: list[str], mnt: Path) -> dict[str, dict[str, object]]:
    mount = kernel_overlay if fmt == "kernel" else fuse_overlayfs
    with mount(dirs, mnt) as m:
        return snapshot(m, HIDDEN[fmt])


def _compare(
    fmt: str, got: dict[str, dict[str, object]], want: dict[str, dict[str, object]]
) -> None:
    if fmt == "kernel":
        assert_same_tree(got, want, ignore=("ino",))
    else:
        # fuse-overlayfs numbers inodes its own way, and its st_nlink counts the names it has
        # loaded (directories: its own count; a file whose other link is hidden: 1); the
        # view keeps the kernel's numbers. Hard-link groups are still compared.
        assert_same_tree(got, want, ignore=("ino", "nlink"))


SEEDS = range(60)


@pytest.mark.parametrize("fmt", ["kernel", "aufs"])
def test_generated_chains_match_oracle(tmp_path: Path, fmt: str) -> None:
    for seed in SEEDS:
        base = Path(tempfile.mkdtemp(prefix=f"lfs-wh-{fmt}-{seed}-", dir=tmp_path))
        dirs = _chain(base, seed)
        idx = build_index(dirs, fmt)
        got = snapshot_index(idx, HIDDEN[fmt])
        want = _oracle(fmt, dirs, base / "mnt")
        try:
            _compare(fmt, got, want)
        except AssertionError as e:
            raise AssertionError(f"seed {seed}: {e}") from None
        # which() agrees with the view for every raw path of every layer
        for d in dirs:
            for dp, dn, fn in os.walk(d):
                for name in dn + fn:
                    rel = os.path.relpath(os.path.join(dp, name), d)
                    w = which(dirs, rel, fmt)
                    assert w.visible == (rel in want), (seed, rel)
                    if w.visible:
                        assert w.layer == idx.layer_of(rel), (seed, rel)
        shutil.rmtree(base, ignore_errors=True)


@pytest.mark.parametrize("fmt", ["kernel", "aufs"])
def test_view_through_fuse_matches_oracle(tmp_path: Path, fmt: str) -> None:
    """The mounted view (the daemon told the store's format) equals the oracle."""
    for seed in range(100, 106):
        base = tmp_path / f"s{seed}"
        dirs = _chain(base, seed)
        with layerfs_mount(dirs, base / "view", whiteout_format=fmt) as m:
            got = snapshot(m.path, HIDDEN[fmt])
        want = _oracle(fmt, dirs, base / "mnt")
        try:
            _compare(fmt, got, want)
        except AssertionError as e:
            raise AssertionError(f"seed {seed}: {e}") from None


def _marker_chain(base: Path) -> list[str]:
    """Every marker form once, in a fixed chain."""
    low = Layer(base / "low")
    for d in ("etc", "opq-t", "opq-x", "opq-u", "opq-f", "opq-m", "red-src", "xw", "plain"):
        low.file(f"{d}/lower", b"lower")
    low.file("evil", b"evil").file("gone", b"gone").file("xw/gone", b"g").finish()
    top = Layer(base / "top")
    top.file(".wh.evil").file(".wh.etc").file("plain/.wh.lower")
    top.whiteout("gone")
    for d in ("opq-t", "opq-x", "opq-u", "opq-f", "opq-m", "red-dst", "xw"):
        top.dir(d)
    top.file("xw/gone", b"")
    top.finish()
    os.setxattr(top.root / "xw/gone", "trusted.overlay.whiteout", b"")
    os.setxattr(top.root / "opq-t", "trusted.overlay.opaque", b"y")
    os.setxattr(top.root / "opq-x", "trusted.overlay.opaque", b"x")
    os.setxattr(top.root / "opq-u", "user.overlay.opaque", b"y")
    os.setxattr(top.root / "opq-f", "user.fuseoverlayfs.opaque", b"y")
    (top.root / "opq-m/.wh..wh..opq").touch()
    os.setxattr(top.root / "red-dst", "trusted.overlay.redirect", b"/red-src")
    return [str(top.root), str(low.root)]


KERNEL_VIEW = {
    "evil",
    ".wh.evil",
    "etc",
    "etc/lower",
    ".wh.etc",
    "plain",
    "plain/lower",
    "plain/.wh.lower",
    "opq-t",
    "opq-x",
    "opq-x/lower",
    "opq-u",
    "opq-u/lower",
    "opq-f",
    "opq-f/lower",
    "opq-m",
    "opq-m/lower",
    "opq-m/.wh..wh..opq",
    "red-src",
    "red-src/lower",
    "red-dst",
    "red-dst/lower",
    "xw",
    "xw/lower",
}
AUFS_VIEW = {
    "plain",
    "opq-t",
    "opq-x",
    "opq-x/lower",
    "opq-u",
    "opq-f",
    "opq-m",
    "red-src",
    "red-src/lower",
    "red-dst",
    "xw",
    "xw/lower",
    "xw/gone",
}


@pytest.mark.parametrize(("fmt", "expected"), [("kernel", KERNEL_VIEW), ("aufs", AUFS_VIEW)])
def test_every_marker_form(tmp_path: Path, fmt: str, expected: set[str]) -> None:
    """The written-out rules of each format, checked against the oracle as well. In a kernel
    store ``touch .wh.evil`` and ``/.wh.etc`` hide nothing (the old view hid both)."""
    dirs = _marker_chain(tmp_path)
    idx = build_index(dirs, fmt)
    got = snapshot_index(idx, HIDDEN[fmt])
    assert set(got) - {""} == expected
    _compare(fmt, got, _oracle(fmt, dirs, tmp_path / "mnt"))
    if fmt == "kernel":
        assert which(dirs, "evil", fmt).visible and which(dirs, "etc/lower", fmt).visible
        assert stat.S_ISREG(got[".wh.evil"]["type"] | stat.S_IFREG)
