"""The merged index of a layer chain: semantics (kernel overlayfs as oracle for the kernel
format, fuse-overlayfs for the aufs format), inode numbers, persistence, provenance."""

from __future__ import annotations

import os
import shutil
import stat
import tempfile
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings

from fs_helpers import (
    CAP_NET_BIND,
    Layer,
    assert_same_tree,
    build_random_layer,
    chains,
    kernel_overlay,
    make_rich_chain,
    require_root,
    rich_chain_expected_paths,
    snapshot,
    snapshot_index,
)
from layerfs.fs.index import (
    ROOT_INO,
    LayerPin,
    UnionIndex,
    build_index,
    open_index,
    which,
)

pytestmark = pytest.mark.root

# (whiteout form, opaque form, store format reading them)
FORMS = [
    ("char", "trusted", "kernel"),
    ("char", "user", "aufs"),
    ("file", "file", "aufs"),
    ("file", "user", "aufs"),
    ("char", "trusted", "aufs"),
]


@pytest.fixture(autouse=True)
def _root() -> None:
    require_root()  # mknod, chown, trusted.* xattrs


def paths(idx: UnionIndex) -> set[str]:
    return {os.fsdecode(p) for p, _ in idx.walk()}


@pytest.mark.parametrize(("wh", "opq", "fmt"), FORMS)
def test_rich_chain_paths(tmp_path: Path, wh: str, opq: str, fmt: str) -> None:
    idx = build_index(make_rich_chain(tmp_path, wh, opq), fmt)
    assert paths(idx) == rich_chain_expected_paths()


def test_aufs_markers_are_ordinary_in_kernel_format(tmp_path: Path) -> None:
    """A kernel-format store shows ``.wh.`` files, ``.wh..wh..opq`` and user.overlay.opaque as
    what they are (the kernel does), so they cannot hide anything from an inspection."""
    low = Layer(tmp_path / "low").file("evil", b"e").file("etc/hosts", b"h")
    low.file("opq/lower", b"l").finish()
    top = Layer(tmp_path / "top").file(".wh.evil").file(".wh.etc").file("opq/.wh..wh..opq")
    top.dir("uo").finish()
    os.setxattr(top.root / "uo", "user.overlay.opaque", b"y")
    Layer(tmp_path / "low").file("uo/x", b"x").finish()
    dirs = [str(top.root), str(low.root)]
    kernel = paths(build_index(dirs, "kernel"))
    assert {"evil", "etc/hosts", ".wh.evil", ".wh.etc", "opq/lower", "uo/x"} <= kernel
    aufs = paths(build_index(dirs, "aufs"))
    assert not {"evil", "etc", ".wh.evil", "opq/lower", "uo/x"} & aufs


def test_rich_chain_attributes(tmp_path: Path) -> None:
    dirs = make_rich_chain(tmp_path)
    idx = build_index(dirs)
    etc = idx.resolve("etc")
    assert etc is not None
    a = idx.attr(etc)
    assert stat.S_IMODE(a.mode) == 0o750 and a.gid == 42  # merged dir: topmost layer's attrs
    assert a.nlink == 1  # merged dir, as the kernel reports it
    assert idx.xattrs(etc) == ((b"user.dirattr", b"top"),)
    opq = idx.resolve("opq")
    assert opq is not None and idx.attr(opq).nlink == 2  # opaque: not merged, real nlink
    hosts = idx.resolve("/etc/hosts")
    assert hosts is not None
    assert idx.layer_index(hosts) == 1
    assert idx.backing_path(hosts) == os.fsencode(dirs[1]) + b"/etc/hosts"
    xa = idx.resolve("xa")
    assert xa is not None
    # the kernel lists user.overlay.* (no userxattr) and hides trusted.overlay.*;
    # fuse-overlayfs hides both
    assert dict(idx.xattrs(xa)) == {
        b"user.foo": b"bar",
        b"trusted.t": b"\x00\x01",
        b"user.overlay.junk": b"j",
    }
    aufs = build_index(dirs, "aufs")
    xa = aufs.resolve("xa")
    assert xa is not None
    assert dict(aufs.xattrs(xa)) == {b"user.foo": b"bar", b"trusted.t": b"\x00\x01"}
    cap = idx.resolve("bin/cap")
    assert cap is not None and dict(idx.xattrs(cap)) == {b"security.capability": CAP_NET_BIND}
    lnk = idx.resolve("lnk")
    assert lnk is not None and idx.readlink(lnk) == b"etc/passwd"
    owned = idx.resolve("owned")
    assert owned is not None and idx.attr(owned).mtime_ns == -1_000_000_001
    su = idx.resolve("bin/su")
    assert su is not None and stat.S_IMODE(idx.attr(su).mode) == 0o4755
    null = idx.resolve("dev/null")
    assert null is not None and idx.attr(null).rdev == os.makedev(1, 3)


def test_lookup_children_dots(tmp_path: Path) -> None:
    idx = build_index(make_rich_chain(tmp_path))
    data = idx.lookup(ROOT_INO, b"data")
    assert data is not None
    assert [n for n, _ in idx.children(data)] == [b"a", b"b", b"d", b"e", b"f"]
    assert idx.lookup(data, b".") == data
    assert idx.lookup(data, b"..") == ROOT_INO
    assert idx.lookup(ROOT_INO, b"..") == ROOT_INO
    assert idx.lookup(data, b"c") is None
    assert idx.lookup(ROOT_INO, b".wh.gone") is None
    assert idx.lookup(12345, b"x") is None
    f = idx.lookup(data, b"a")
    assert f is not None and list(idx.child_range(f)) == []


def test_inode_numbers(tmp_path: Path) -> None:
    dirs = make_rich_chain(tmp_path)
    idx = build_index(dirs)
    inos = {os.fsdecode(p): i for p, i in idx.walk()}
    # hard links in one layer share a number; nlink is the real one
    assert inos["bin/link-b"] == inos["bin/link-c"]
    assert idx.attr(inos["bin/link-b"]).nlink == 3
    assert inos["bin/l1-a"] == inos["bin/l1-b"]
    others = [i for p, i in inos.items() if p not in ("bin/link-c", "bin/l1-b")]
    assert len(set(others)) == len(others)
    assert ROOT_INO not in others
    # derived from (layer position from the bottom, st_ino)
    st = os.lstat(os.path.join(dirs[2], "bin/sh"))
    assert inos["bin/sh"] == (1 << 48) | st.st_ino
    st = os.lstat(os.path.join(dirs[0], "top-only"))
    assert inos["top-only"] == (3 << 48) | st.st_ino
    # stable across a rebuild, and for lower layers when a layer is stacked on top
    assert {os.fsdecode(p): i for p, i in build_index(dirs).walk()} == inos
    extra = Layer(tmp_path / "extra").file("new", b"n").finish()
    stacked = {os.fsdecode(p): i for p, i in build_index([str(extra), *dirs]).walk()}
    assert stacked["bin/sh"] == inos["bin/sh"]


def _same(a: UnionIndex, b: UnionIndex) -> None:
    assert list(a.walk()) == list(b.walk())
    for _, ino in a.walk():  # atime: reading a directory (the walk) updates it
        assert a.attr(ino)._replace(atime_ns=0) == b.attr(ino)._replace(atime_ns=0)
        assert a.xattrs(ino) == b.xattrs(ino)
        assert a.backing_path(ino) == b.backing_path(ino)
    assert a.links == b.links


def _pins(dirs: list[str], digest: str = "sha256:" + "ab" * 32) -> list[LayerPin | None]:
    return [
        LayerPin(f"id{i}", digest, None, str(Path(d).parent / f"{Path(d).name}.index"))
        for i, d in enumerate(dirs)
    ]


def test_save_load(tmp_path: Path) -> None:
    """Pinned layers get an index file each; a second open loads all of them; an unpinned
    layer (no digest) is scanned live and its file removed, never read."""
    dirs = make_rich_chain(tmp_path)
    pins = _pins(dirs)
    idx, cached = open_index(dirs, pins)
    assert not cached
    files = [Path(p.index_path) for p in pins if p and p.index_path]
    assert all(f.exists() for f in files)
    idx2, cached = open_index(dirs, pins)
    assert cached
    _same(idx, idx2)
    _same(idx, build_index(dirs))
    # another digest (an applydiff): rebuilt
    _, cached = open_index(dirs, _pins(dirs, "sha256:" + "cd" * 32))
    assert not cached
    # no digest: live, and the stale file goes away
    unpinned = [LayerPin(f"id{i}", "", None, str(f)) for i, f in enumerate(files)]
    _, cached = open_index(dirs, unpinned)
    assert not cached and not any(f.exists() for f in files)


def test_index_key_identity(tmp_path: Path) -> None:
    """A re-created diff dir (other inode) is another layer state even with the same digest."""
    a = Layer(tmp_path / "a").file("f", b"1").finish()
    pins = _pins([str(a)])
    open_index([str(a)], pins)
    shutil.rmtree(a)
    Layer(tmp_path / "a").file("g", b"2").finish()
    idx, cached = open_index([str(a)], pins)
    assert not cached and paths(idx) == {"g"}


def test_which(tmp_path: Path) -> None:
    dirs = make_rich_chain(tmp_path)
    idx = build_index(dirs)
    w = idx.which("etc/hosts")
    assert (w.visible, w.layer, w.shadowed) == (True, 1, (2,))
    w = idx.which("/etc/gone")
    assert (w.visible, w.layer, w.whiteout_layer, w.shadowed) == (False, None, 1, (2,))
    w = idx.which("olddir")
    assert (w.visible, w.layer, w.merged, w.shadowed) == (True, 0, (0,), (1, 2))
    w = idx.which("olddir/x")
    assert not w.visible and w.shadowed == (2,)
    w = idx.which("data")
    assert (w.kind, w.merged) == ("dir", (0, 1, 2))
    w = idx.which("opq")
    assert (w.layer, w.merged, w.shadowed) == (1, (1,), (2,))
    w = idx.which("keep/sub/deep")
    assert (w.visible, w.whiteout_layer, w.shadowed) == (False, 0, (2,))
    assert idx.which("/").visible
    assert idx.layer_of("d2f") == 1 and idx.layer_of("nope") is None
    # which() agrees with the index for every path present in any layer
    every: set[str] = set()
    for d in dirs:
        for dp, dn, fn in os.walk(d):
            for n in dn + fn:
                every.add(os.path.relpath(os.path.join(dp, n), d))
    for p in every:
        w = which(dirs, p)
        assert w.visible == (idx.resolve(p) is not None), p
        if w.visible:
            assert w.layer == idx.layer_of(p), p


def test_single_layer(tmp_path: Path) -> None:
    d = Layer(tmp_path / "only").file("a/b", b"x").whiteout("c").finish()
    idx = build_index([str(d)])
    assert paths(idx) == {"a", "a/b"}
    assert idx.attr(ROOT_INO).nlink == os.lstat(d).st_nlink  # not merged


@pytest.mark.parametrize(("wh", "opq", "fmt"), FORMS)
def test_rich_chain_index_matches_kernel(tmp_path: Path, wh: str, opq: str, fmt: str) -> None:
    """The index (with the backing files) equals a kernel overlay mount of the same chain in
    kernel form; each format reading its own forms must give the same view."""
    kernel_dirs = make_rich_chain(tmp_path / "k", "char", "trusted")
    dirs = (
        kernel_dirs
        if (wh, opq) == ("char", "trusted")
        else make_rich_chain(tmp_path / "x", wh, opq)
    )
    got = snapshot_index(build_index(dirs, fmt))
    with kernel_overlay(kernel_dirs, tmp_path / "mnt") as mnt:
        want = snapshot(mnt)
    ignore = ("ino",) if dirs is kernel_dirs else ("ino", "root_mtime")
    assert_same_tree(got, want, ignore=ignore)


# -- property test against the kernel ---------------------------------------------------------


@settings(max_examples=60, deadline=None, suppress_health_check=list(HealthCheck))
@given(chains)
def test_random_chains_match_kernel(layers: list[list[tuple[list[str], str]]]) -> None:
    base = Path(tempfile.mkdtemp(prefix="lfs-prop-"))
    try:
        n = len(layers)
        # layers[0] is the bottom; the chain is passed top first
        dirs = [build_random_layer(base / f"l{i}", ops, i) for i, ops in enumerate(layers)]
        chain = list(reversed(dirs))
        got = snapshot_index(build_index(chain))
        with kernel_overlay(chain, base / "mnt") as mnt:
            want = snapshot(mnt)
        assert_same_tree(got, want, ignore=("ino",))
        assert n == len(chain)
    finally:
        shutil.rmtree(base, ignore_errors=True)
