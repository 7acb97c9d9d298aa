"""``layerfs inspect``: per-layer added/modified/deleted, wasted bytes and efficiency.

Oracles: the rich chain of ``fs_helpers`` with every figure computed by hand (below), the same
chain in the mount-program forms (``.wh.`` files, ``.wh..wh..opq``), and random chains whose
per-layer changes are checked against the definition itself: the path sets of the merged view
of the layers below a layer and of the view with it on top (``merge.py``, one merge each).
"""

from __future__ import annotations

import json
import os
import shutil
import stat
import tempfile
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from test_flatten import rich_store

from conftest import LayerfsCLI, StorePaths, require_root
from fs_helpers import build_random_layer, chains, make_rich_chain
from layerfs.fs.index import UnionIndex, build_index
from layerfs.fs.index.inspect import human, inspect_chain, report_json, report_text

pytestmark = [pytest.mark.root]

IDS = ["top", "mid", "base"]

# Hand-computed from make_rich_chain (l2 = base, l1 = mid, l0 = top); bytes once per inode.
BASE = {  # 49 entries, all added; the bytes are every regular file of l2
    "added": {"entries": 49, "bytes": 3_147_377},
    "modified": {"entries": 0, "bytes": 0},
    "deleted": {"entries": 0, "bytes": 0},
    "stored_bytes": 3_147_377,
    # shadowed: etc/hosts 20 + data/a 100 + f2d 23 = 143;
    # removed: etc/gone 17, olddir/{x,y,sub/z} 3, opq/lower{1,2} 2, opq2/old 3, d2f/inner 23,
    # keep/sub/deep/file 4, whdir/inner 1, data/c 100 = 153 (bin/link-a is whited out but
    # its inode stays visible as link-b and link-c: not wasted)
    "shadowed_bytes": 143,
    "removed_bytes": 153,
    "wasted_bytes": 296,
    "visible_bytes": 3_147_377 - 296,
}
MID = {
    # opq/new1 4, data/f 10, bin/l1-a 7 (+ l1-b, the same inode), keep/sub/file2 1
    "added": {"entries": 5, "bytes": 22},
    # etc, etc/hosts 16, opq (opaque), data, d2f (a file over a dir) 10, bin, keep, keep/sub
    "modified": {"entries": 8, "bytes": 26},
    # etc/gone 17; olddir + x y sub sub/z 3; opq's lower1 lower2 lowerdir 2; data/c 100;
    # d2f/inner 23; whdir + inner 1 (never-existed hides nothing: not counted)
    "deleted": {"entries": 13, "bytes": 146},
    "stored_bytes": 48,
    "shadowed_bytes": 0,
    "removed_bytes": 0,
    "wasted_bytes": 0,
    "visible_bytes": 48,
}
TOP = {
    # olddir (whited out below), olddir/z 9, f2d/inside 6, opq2/new 3, top-only 3, whdir 18,
    # emptydir
    "added": {"entries": 7, "bytes": 39},
    # f2d (a dir over a file), etc, data, data/a 7, bin, opq2 (opaque), keep, keep/sub
    "modified": {"entries": 8, "bytes": 7},
    # bin/link-a 6, opq2/old 3, keep/sub/deep + file 4
    "deleted": {"entries": 4, "bytes": 13},
    "stored_bytes": 46,
    "shadowed_bytes": 0,
    "removed_bytes": 0,
    "wasted_bytes": 0,
    "visible_bytes": 46,
}


def _strip(layer: dict[str, object]) -> dict[str, object]:
    return {k: v for k, v in layer.items() if k not in ("id", "largest")}


def _check_rich(data: dict[str, object], ids: list[str]) -> None:
    layers = data["layers"]
    assert isinstance(layers, list)
    assert [la["id"] for la in layers] == list(reversed(ids))  # base first
    assert [_strip(la) for la in layers] == [BASE, MID, TOP]
    assert data["visible_entries"] == 44
    assert data["stored_bytes"] == 3_147_377 + 48 + 46
    assert data["visible_bytes"] == 3_147_377 - 296 + 48 + 46
    assert data["wasted_bytes"] == 296
    assert data["efficiency"] == round((3_147_377 - 296 + 94) / (3_147_377 + 94), 6)
    assert data["changes_exact"] is True
    base_largest = layers[0]["largest"]
    assert base_largest[0] == {"path": "/big", "size": 3 * 1024 * 1024 + 17, "state": "visible"}
    assert base_largest[1] == {"path": "/bin/sh", "size": 1004, "state": "visible"}
    assert {"path": "/data/c", "size": 100, "state": "removed"} in base_largest


def test_rich_chain_by_hand(tmp_path: Path) -> None:
    require_root()
    dirs = make_rich_chain(tmp_path)
    report = inspect_chain(build_index(dirs), IDS)
    _check_rich(report_json(report), IDS)
    shadowed = inspect_chain(build_index(dirs), IDS, largest=50).layers[0].largest
    assert {"/etc/hosts": "shadowed", "/f2d": "shadowed", "/etc/gone": "removed"}.items() <= {
        f.path: f.state for f in shadowed
    }.items()


@pytest.mark.parametrize(("wh", "opq"), [("file", "file"), ("char", "user"), ("file", "user")])
def test_mount_program_forms_give_the_same_report(tmp_path: Path, wh: str, opq: str) -> None:
    """The same chain written in the mount-program forms, read as such, reports the same."""
    require_root()
    dirs = make_rich_chain(tmp_path, wh, opq)
    data = report_json(inspect_chain(build_index(dirs, "aufs"), IDS))
    _check_rich(data, IDS)


def _paths(index: UnionIndex) -> dict[bytes, int]:
    return {rel: row for row, (rel, _) in enumerate(index.walk(), start=1)}


@pytest.mark.parametrize("fmt", ["kernel", "aufs"])
@settings(max_examples=40, deadline=None, suppress_health_check=list(HealthCheck))
@given(layers=chains)
def test_random_chains_against_the_definition(
    fmt: str, layers: list[list[tuple[list[str], str]]]
) -> None:
    """Per layer: added/modified/deleted entries are exactly the path-set differences of the
    merged views below it and with it on top; the pass ends with the final view's paths."""
    base = Path(tempfile.mkdtemp(prefix="lfs-inspect-"))
    try:
        dirs = [build_random_layer(base / f"l{i}", ops, i) for i, ops in enumerate(layers)]
        chain = list(reversed(dirs))
        ids = [f"id{i}" for i in range(len(chain))]
        report = inspect_chain(build_index(chain, fmt), ids)
        assert report.consistent
        for k in range(len(chain)):  # chain index k (0 = top); report layers are base first
            got = report.layers[len(chain) - 1 - k]
            with_view = build_index(chain[k:], fmt)
            below = _paths(build_index(chain[k + 1 :], fmt)) if k + 1 < len(chain) else {}
            above = _paths(with_view)
            mine = {p for p, row in above.items() if with_view.layer[row] == 0}
            assert got.added.entries == len(mine - below.keys()), k
            assert got.modified.entries == len(mine & below.keys()), k
            assert got.deleted.entries == len(below.keys() - above.keys()), k
            sizes = [
                with_view.size[row]
                for p, row in above.items()
                if p in mine and stat.S_ISREG(with_view.mode[row])
            ]
            # build_random_layer makes no hard links: bytes are plain sums
            assert got.added.bytes + got.modified.bytes == sum(sizes)
    finally:
        shutil.rmtree(base, ignore_errors=True)


def test_hard_links_counted_once(tmp_path: Path) -> None:
    """Three names of one 1000-byte inode: 3 entries, 1000 bytes; two names deleted above,
    one kept: nothing wasted; all deleted: 1000 bytes removed."""
    low = tmp_path / "low"
    low.mkdir()
    (low / "a").write_bytes(b"x" * 1000)
    os.link(low / "a", low / "b")
    os.link(low / "a", low / "c")
    up = tmp_path / "up"
    up.mkdir()
    for name in ("a", "b"):
        os.mknod(up / name, stat.S_IFCHR, os.makedev(0, 0))
    rep = inspect_chain(build_index([str(up), str(low)]), ["up", "low"])
    low_rep, up_rep = rep.layers
    assert (low_rep.added.entries, low_rep.added.bytes, low_rep.stored_bytes) == (3, 1000, 1000)
    assert (up_rep.deleted.entries, up_rep.deleted.bytes) == (2, 1000)
    assert (low_rep.wasted_bytes, rep.efficiency) == (0, 1.0)
    os.mknod(up / "c", stat.S_IFCHR, os.makedev(0, 0))
    rep = inspect_chain(build_index([str(up), str(low)]), ["up", "low"])
    assert (rep.layers[0].removed_bytes, rep.visible_bytes, rep.efficiency) == (1000, 0, 0.0)
    assert rep.layers[0].largest[0].state == "removed"


def test_cli(cli: LayerfsCLI, paths: StorePaths, tmp_path: Path) -> None:
    require_root()
    _top, dirs = rich_store(paths, tmp_path)
    ids = [os.path.basename(os.path.dirname(d)) for d in dirs]  # top first
    data = json.loads(cli.out("inspect", "--json", "top"))
    _check_rich(data, ids)
    text = cli.out("inspect", "top")
    assert text.splitlines()[0] == "top: 3 layers, 44 entries in the view"
    assert "efficiency 99.99 %: 3.0 MiB visible of 3.0 MiB stored, 296 B wasted" in text
    assert "removed   /data/c" in text
    assert (
        len(
            json.loads(cli.out("inspect", "--json", "--largest", "1", "top"))["layers"][0][
                "largest"
            ]
        )
        == 1
    )
    r = cli.run("inspect", "nosuch", check=False)
    assert r.returncode == 1 and r.stderr.decode().count("\n") == 1


def test_human_and_text() -> None:
    assert [human(n) for n in (0, 1023, 1024, 1536, 5 << 30)] == [
        "0 B",
        "1023 B",
        "1.0 KiB",
        "1.5 KiB",
        "5.0 GiB",
    ]
    empty = tempfile.mkdtemp()
    try:
        report = inspect_chain(build_index([empty]), ["only"])
        assert report.efficiency == 1.0
        assert "1 layers, 0 entries" in report_text(report, "x")
    finally:
        os.rmdir(empty)
