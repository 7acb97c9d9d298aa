"""Attacks on ``layerfs diff`` of a layer written through a read-write ``layerfs mount``: the
tar, applied on the same parent, must give the tree the view showed; Go's own ``diff`` of the
same layer dir (applied the same way) is the second oracle."""

from __future__ import annotations

import io
import os
import tarfile
from pathlib import Path

import pytest
from test_rw_store import on_disk

from conftest import GoTool, LayerfsCLI, StorePaths, make_tar
from fs_helpers import assert_same_tree, require_fuse, snapshot

pytestmark = [pytest.mark.fuse, pytest.mark.root]


def _base_tar() -> bytes:
    """srv/tree with a hard-link pair across subdirs and files a later layer deletes."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tf:

        def add(name: str, data: bytes | None = None, link: str | None = None) -> None:
            info = tarfile.TarInfo(name)
            info.mtime = 1_700_000_000
            if link is not None:
                info.type = tarfile.LNKTYPE
                info.linkname = link
                tf.addfile(info)
            elif data is None:
                info.type = tarfile.DIRTYPE
                info.mode = 0o755
                tf.addfile(info)
            else:
                info.size = len(data)
                info.mode = 0o644
                tf.addfile(info, io.BytesIO(data))

        for d in ("srv", "srv/tree", "srv/tree/sub", "etc"):
            add(d)
        add("srv/tree/a", b"group\n")
        add("srv/tree/sub/hl", link="srv/tree/a")
        add("srv/tree/gone", b"gone\n")
        add("srv/tree/sub/deep", b"deep\n")
        add("etc/x", b"x\n")
        add("etc/y", b"y\n")
    return buf.getvalue()


def _norm(tree: dict[str, dict[str, object]]) -> None:
    for record in tree.values():
        record["mtime"] //= 10**9  # type: ignore[operator]


def test_diff_after_renaming_a_lower_dir_with_links_and_whiteouts(
    cli: LayerfsCLI, go: GoTool, paths: StorePaths, tmp_path: Path
) -> None:
    require_fuse()
    cli.run("import-layer", "--name", "base", input=_base_tar())
    mid = make_tar({"srv/tree/new-mid": b"m\n"}, whiteouts=["srv/tree/.wh.gone"])
    cli.run("import-layer", "--name", "mid", "--parent", "base", input=mid)
    cli.out("create-layer", "--writeable", "--name", "ctr", "mid")
    path = cli.out("mount", "ctr").strip()
    try:
        os.unlink(f"{path}/srv/tree/sub/deep")
        os.rename(f"{path}/srv/tree", f"{path}/srv/moved")
        os.unlink(f"{path}/srv/moved/a")  # one link of the pair goes
        with open(f"{path}/srv/moved/sub/hl", "a") as f:
            f.write("more\n")
        os.mkdir(f"{path}/srv/tree")  # a new dir where the renamed one was
        with open(f"{path}/srv/tree/fresh", "w") as f:
            f.write("fresh\n")
        os.rename(f"{path}/etc/x", f"{path}/etc/y")
        view = snapshot(path)
    finally:
        cli.run("unmount", "ctr")
    tar = cli.run("diff", "ctr").stdout
    cli.run("import-layer", "--name", "copy", "--parent", "mid", input=tar)
    _norm(view)
    got = on_disk(paths, "copy", tmp_path / "layerfs")
    _norm(got)
    assert_same_tree(got, view, ignore=("root_mtime",))
    go_tar = go.run("diff", "ctr").stdout
    go_copy = go.out("create-layer", "mid").split()[0]
    go.run("applydiff", go_copy, input=go_tar)
    got_go = on_disk(paths, go_copy, tmp_path / "go")
    _norm(got_go)
    assert_same_tree(got_go, view, ignore=("root_mtime",))


def test_diff_of_a_wh_named_file_made_in_the_view(
    cli: LayerfsCLI, go: GoTool, paths: StorePaths, tmp_path: Path
) -> None:
    """A file literally named ``.wh.x`` made through the view: what layerfs's tar makes of it
    on apply must be what Go's tar of the same layer makes of it (the same tree)."""
    require_fuse()
    cli.run("import-layer", "--name", "base", input=make_tar({"etc": None, "etc/x": b"x\n"}))
    cli.out("create-layer", "--writeable", "--name", "ctr", "base")
    path = cli.out("mount", "ctr").strip()
    try:
        with open(f"{path}/etc/.wh.x", "w") as f:
            f.write("a name\n")
    finally:
        cli.run("unmount", "ctr")
    trees = {}
    for name, tar in (
        ("layerfs", cli.run("diff", "ctr").stdout),
        ("go", go.run("diff", "ctr").stdout),
    ):
        copy = go.out("create-layer", "base").split()[0]
        go.run("applydiff", copy, input=tar)
        trees[name] = on_disk(paths, copy, tmp_path / name)
        _norm(trees[name])
    assert_same_tree(trees["layerfs"], trees["go"], ignore=("root_mtime",))
