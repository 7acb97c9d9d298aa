"""Fresh-eyes attack on issue 13 (export / extract / inspect) and issue 11: hostile stores.

Oracle: kernel overlayfs on the same diff dirs; inspect figures computed by hand below.
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from conftest import LayerfsCLI, StorePaths, require_root, require_tool
from fs_helpers import assert_same_tree, kernel_overlay, snapshot

pytestmark = [pytest.mark.root]

WH = 0o20000 | 0o600  # a char 0/0 whiteout


def hostile_chain(paths: StorePaths) -> tuple[Path, Path]:
    """Layer a: hostile names, a hard-link pair, dirs opq/ and dd/, a 64 MiB sparse file.
    Layer b: whites out one name of the pair, makes opq opaque (and whites out opq/old
    inside it), replaces dir dd by a file, adds symlinks pointing out of the view."""
    store = paths.store()
    a = store.create_layer(names=["a"]).id
    b = store.create_layer(names=["b"], parent=a).id
    da, db = Path(store.diff_dir(a)), Path(store.diff_dir(b))
    for n in (b"nl\nname", b"bad\xffutf", b"esc\x1b[2J", b"-dash"):
        with open(os.path.join(os.fsencode(da), n), "wb") as f:
            f.write(b"x")
    (da / "h1").write_bytes(b"hl")
    os.link(da / "h1", da / "h2")
    (da / "opq").mkdir()
    (da / "opq/old").write_text("old")
    (da / "dd").mkdir()
    (da / "dd/f").write_text("f")
    with open(da / "sparse", "wb") as f:
        f.truncate(64 << 20)
    os.mknod(db / "h1", WH, 0)
    (db / "opq").mkdir()
    os.setxattr(db / "opq", "trusted.overlay.opaque", b"y")
    os.mknod(db / "opq/old", WH, 0)
    (db / "opq/new").write_text("new")
    (db / "dd").write_text("now a file")
    os.symlink("/etc/passwd", db / "abs")
    os.symlink("../../../../etc", db / "rel")
    return da, db


def test_export_of_hostile_chain_is_the_kernel_tree(
    cli: LayerfsCLI, paths: StorePaths, tmp_path: Path
) -> None:
    require_root()
    require_tool("tar")
    da, db = hostile_chain(paths)
    tar = tmp_path / "x.tar"
    cli.run("export", "-o", str(tar), "b")
    (tmp_path / "x").mkdir()
    r = subprocess.run(
        ["tar", "--xattrs", "--xattrs-include=*", "-xpf", str(tar), "-C", str(tmp_path / "x")],
        capture_output=True,
    )
    assert r.returncode == 0, r.stderr
    (tmp_path / "e").mkdir()
    cli.run("extract", "b", "/", str(tmp_path / "e"))
    with kernel_overlay([str(db), str(da)], tmp_path / "k") as k:
        want = snapshot(k)
    assert "nl\nname" in want and "bad\udcffutf" in want and "h1" not in want
    assert_same_tree(snapshot(str(tmp_path / "x")), want, ignore=("ino", "nlink"))
    got = snapshot(str(tmp_path / "e"))
    # extract of / fills DEST: DEST's own mode and mtime stay DEST's
    del got[""], want[""]
    assert_same_tree(got, want, ignore=("ino", "nlink"))
    # the symlinks are copied as links, never followed out of the tree
    assert os.readlink(tmp_path / "e/abs") == "/etc/passwd"


def test_inspect_hostile_chain_by_hand(cli: LayerfsCLI, paths: StorePaths) -> None:
    require_root()
    hostile_chain(paths)
    out = cli.out("inspect", "b")
    table = [ln.split() for ln in out.splitlines() if ln[:3].strip() in ("0", "1")]
    rows = {r[0]: r for r in table if len(r) > 2}  # (not the "largest files" headings)
    # layer a: 4 names, h1, h2, opq, opq/old, dd, dd/f, sparse = 11 entries;
    # bytes 4 + 2 (one inode for h1/h2) + 3 + 1 + 64 MiB.  wasted: opq/old 3 + dd/f 1 (h1's
    # bytes are still visible as h2)
    assert rows["0"][2:5] == ["11", "/", "64.0"]
    assert rows["0"][-2:] == ["4", "B"]
    # layer b: added opq/new, abs, rel (3 B); modified opq (dir), dd (10 B);
    # deleted h1 (2 B), opq/old (3 B), dd/f (1 B)
    assert " 3 / 3 B " in out and " 2 / 10 B " in out and " 3 / 6 B " in out
    # no name forges a line or sends a terminal escape
    assert "\x1b" not in out
    assert "/nl\\nname" in out and "/esc\\x1b[2J" in out
    assert not any(ln == "name" for ln in out.splitlines())
