"""The layer store API: lookups, names, metadata, big data, delete, repair, bad input."""

from __future__ import annotations

import json
import os
import stat
import subprocess

import pytest

from conftest import StorePaths, require_root
from layerfs.errors import (
    AmbiguousLayerError,
    BigDataUnknownError,
    CorruptStoreError,
    DuplicateIDError,
    InvalidArgumentError,
    LayerfsError,
    LayerHasChildrenError,
    LayerMountedError,
    LayerUnknownError,
    NameInUseError,
)
from layerfs.store.layers import Store


def _snapshot(root: str) -> dict[str, tuple[int, bytes | None]]:
    """Every file under root with its mode and content (dirs: None), to prove 'untouched'."""
    out: dict[str, tuple[int, bytes | None]] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            path = os.path.join(dirpath, name)
            st = os.lstat(path)
            data = None
            if stat.S_ISREG(st.st_mode):
                with open(path, "rb") as f:
                    data = f.read()
            out[path] = (st.st_mode, data)
    return out


def test_layout_matches_the_overlay_driver(store: Store, paths: StorePaths) -> None:
    base = store.create_layer(names=["base"])
    child = store.create_layer(parent="base")
    home = os.path.join(paths.root, "overlay")
    for layer in (base, child):
        d = os.path.join(home, layer.id)
        assert stat.S_IMODE(os.stat(d).st_mode) == 0o700
        assert stat.S_IMODE(os.stat(os.path.join(d, "diff")).st_mode) == 0o555
        link = open(os.path.join(d, "link")).read()
        assert len(link) == 26 and link.isalnum() and link.upper() == link
        assert os.readlink(os.path.join(home, "l", link)) == f"../{layer.id}/diff"
        assert os.path.isdir(os.path.join(d, "work")) and os.path.isdir(os.path.join(d, "merged"))
    assert os.path.isdir(os.path.join(home, base.id, "empty"))
    assert not os.path.exists(os.path.join(home, base.id, "lower"))
    base_link = open(os.path.join(home, base.id, "link")).read()
    assert open(os.path.join(home, child.id, "lower")).read() == f"l/{base_link}"
    grandchild = store.create_layer(parent=child.id)
    child_link = open(os.path.join(home, child.id, "link")).read()
    lower = open(os.path.join(home, grandchild.id, "lower")).read()
    assert lower == f"l/{child_link}:l/{base_link}"
    assert stat.S_IMODE(os.stat(paths.layers_json).st_mode) == 0o600


def test_lookup_by_id_name_and_unique_prefix(store: Store) -> None:
    a = store.create_layer("aaaa1111", names=["alpha"])
    store.create_layer("aaaa2222")
    assert store.get("aaaa1111").id == a.id
    assert store.get("alpha").id == a.id
    assert store.get("aaaa1").id == a.id
    with pytest.raises(AmbiguousLayerError, match=r"aaaa1111.*aaaa2222"):
        store.get("aaaa")
    for ref in ("", "zzz"):
        with pytest.raises(LayerUnknownError):
            store.get(ref)
    assert store.exists("alpha") and not store.exists("aaaa")


def test_parent_by_name_or_prefix_is_stored_as_full_id(store: Store) -> None:
    base = store.create_layer(names=["base"])
    assert store.create_layer(parent="base").parent == base.id
    assert store.create_layer(parent=base.id[:10]).parent == base.id
    with pytest.raises(LayerUnknownError):
        store.create_layer(parent="missing")


def test_ids_and_names_are_unique(store: Store) -> None:
    store.create_layer("one", names=["n1"])
    with pytest.raises(DuplicateIDError):
        store.create_layer("one")
    with pytest.raises(NameInUseError, match="n1"):
        store.create_layer(names=["n1"])
    with pytest.raises(InvalidArgumentError):
        store.create_layer("../escape")
    assert store.create_layer(names=["x", "x"]).names == ["x"]


def test_names_move_to_their_new_owner(store: Store) -> None:
    a = store.create_layer(names=["shared", "a"])
    b = store.create_layer(names=["b"])
    assert store.add_names(b.id, ["shared"]).names == ["b", "shared"]
    assert store.get(a.id).names == ["a"]
    assert store.set_names(a.id, ["shared"]).names == ["shared"]
    assert store.get(b.id).names == ["b"]
    assert store.remove_names(a.id, ["shared", "nope"]).names == []
    assert not store.exists("shared")
    raw = open(store.files.stable).read()
    assert '"names":[]' not in raw


def test_metadata_flags_and_size(store: Store) -> None:
    layer = store.create_layer(metadata="m1")
    assert store.set_metadata(layer.id, "a<b&c").metadata == "a<b&c"
    assert "a\\u003cb\\u0026c" in open(store.files.stable).read()
    assert store.set_flag(layer.id, "k", {"x": 1}).flags == {"k": {"x": 1}}
    assert store.clear_flag(layer.id, "k").flags == {}
    with pytest.raises(InvalidArgumentError):
        store.set_flag(layer.id, "incomplete", True)
    assert store.size(layer.id) == -1


def test_big_data_keys_order_and_file_names(store: Store) -> None:
    layer = store.create_layer()
    for key in ("Key", "keY", "a b", "plain.1"):
        store.set_big_data(layer.id, key, key.encode() * 2)
    store.set_big_data(layer.id, "Key", b"rewritten")
    assert store.big_data_names(layer.id) == ["Key", "keY", "a b", "plain.1"]
    assert store.get_big_data(layer.id, "Key") == b"rewritten"
    files = sorted(os.listdir(os.path.join(store.files.layers_dir, layer.id)))
    assert files == ["=S2V5", "=YSBi", "keY", "plain.1"]
    with pytest.raises(BigDataUnknownError, match="missing"):
        store.get_big_data(layer.id, "missing")
    for bad in ("", "..", "a/"):
        with pytest.raises(InvalidArgumentError):
            store.set_big_data(layer.id, bad, b"x")


def test_delete_refuses_parents_even_by_name(store: Store) -> None:
    base = store.create_layer(names=["base"])
    child = store.create_layer(parent=base.id)
    with pytest.raises(LayerHasChildrenError, match=child.id):
        store.delete_layer("base")
    assert store.exists(base.id)
    store.delete_layer(child.id)
    store.delete_layer("base")
    assert store.layers() == []
    assert os.listdir(store.driver.link_dir) == []


def test_delete_refuses_a_mounted_layer_and_drops_stale_counts(
    store: Store, paths: StorePaths, tmp_path: os.PathLike[str]
) -> None:
    layer = store.create_layer()
    live = str(tmp_path)  # a real mount point stands in for a live view: /
    with store.mount_table.update() as table:
        from layerfs.store.mounts import MountRecord

        table[layer.id] = MountRecord(layer.id, "/", 1)
    with pytest.raises(LayerMountedError, match="unmount it first"):
        store.delete_layer(layer.id)
    with store.mount_table.update() as table:
        table[layer.id] = MountRecord(layer.id, live, 2)  # not a mount point: stale
    store.delete_layer(layer.id)
    assert json.load(open(os.path.join(paths.runroot, "overlay-layers", "mountpoints.json"))) == []


def test_volatile_layers_live_in_their_own_file(store: Store) -> None:
    stable = store.create_layer(names=["s"])
    vol = store.create_layer(names=["v"], volatile=True)
    assert [x["id"] for x in json.load(open(store.files.stable))] == [stable.id]
    assert [x["id"] for x in json.load(open(store.files.volatile))] == [vol.id]
    assert store.is_volatile("v") and not store.is_volatile("s")
    assert [la.id for la in Store(store.root, store.runroot).layers()] == [stable.id, vol.id]


def test_incomplete_layers_are_removed_on_load(store: Store, paths: StorePaths) -> None:
    keep = store.create_layer(names=["keep"])
    broken = store.create_layer(names=["broken"])
    records = json.load(open(paths.layers_json))
    records[1]["flags"] = {"incomplete": True}
    with open(paths.layers_json, "w") as f:
        json.dump(records, f)
    fresh = Store(paths.root, paths.runroot)
    assert [la.id for la in fresh.layers()] == [keep.id]
    assert not os.path.exists(fresh.driver.layer_dir(broken.id))
    assert [r["id"] for r in json.load(open(paths.layers_json))] == [keep.id]


def test_duplicate_names_go_to_the_later_layer(store: Store, paths: StorePaths) -> None:
    store.create_layer("first", names=["dup", "f"])
    store.create_layer("second", names=["s"])
    records = json.load(open(paths.layers_json))
    records[1]["names"] = ["s", "dup"]
    with open(paths.layers_json, "w") as f:
        json.dump(records, f)
    fresh = Store(paths.root, paths.runroot)
    assert fresh.get("dup").id == "second"
    assert fresh.get("first").names == ["f"]
    saved = json.load(open(paths.layers_json))
    assert saved[0]["names"] == ["f"]
    ro = Store(paths.root, paths.runroot, read_only=True)
    assert ro.get("dup").id == "second"  # already repaired on disk
    records = json.load(open(paths.layers_json))
    records[0]["names"] = ["f", "dup"]
    with open(paths.layers_json, "w") as f:
        json.dump(records, f)
    with pytest.raises(CorruptStoreError, match="duplicate layer names"):
        Store(paths.root, paths.runroot, read_only=True).layers()


@pytest.mark.parametrize(
    "damage",
    [b'[{"id":"x","created":"2026-01-01T00:00:00Z"}', b"\0" * 300, b"[{]", b'{"not":"array"}'],
    ids=["truncated", "nul-filled", "garbage", "object"],
)
def test_corrupt_layers_json_fails_loudly_and_changes_nothing(
    store: Store, paths: StorePaths, damage: bytes
) -> None:
    store.create_layer(names=["victim"])
    with open(paths.layers_json, "wb") as f:
        f.write(damage)
    before = _snapshot(paths.root)
    fresh = Store(paths.root, paths.runroot)
    for action in (
        fresh.layers,
        lambda: fresh.create_layer(names=["new"]),
        lambda: fresh.delete_layer("victim"),
        fresh.gc,
        fresh.wipe,
    ):
        with pytest.raises(CorruptStoreError, match=r"layers\.json"):
            action()
    assert _snapshot(paths.root) == before


def test_missing_parent_and_cycles_are_reported_with_the_chain(
    store: Store, paths: StorePaths
) -> None:
    store.create_layer("aaa")
    store.create_layer("bbb", parent="aaa")
    records = json.load(open(paths.layers_json))
    records[0]["parent"] = "bbb"
    with open(paths.layers_json, "w") as f:
        json.dump(records, f)
    fresh = Store(paths.root, paths.runroot)
    with pytest.raises(CorruptStoreError, match="parent cycle: bbb -> aaa -> bbb"):
        fresh.chain("bbb")
    records[0]["parent"] = "gone"
    with open(paths.layers_json, "w") as f:
        json.dump(records, f)
    with pytest.raises(CorruptStoreError, match='names parent "gone"'):
        Store(paths.root, paths.runroot).chain("bbb")


def test_read_only_store_directory_gives_a_clear_error(paths: StorePaths) -> None:
    require_root()  # root ignores directory modes, so a read-only bind mount makes it read-only
    store = paths.store()
    store.create_layer(names=["one"])
    before = _snapshot(paths.root)
    layers_dir = store.files.layers_dir
    subprocess.run(["mount", "--bind", "-o", "ro", layers_dir, layers_dir], check=True)
    try:
        subprocess.run(["mount", "-o", "remount,bind,ro", layers_dir], check=True)
        with pytest.raises(LayerfsError, match=r"layers.(json|lock).*(Read-only|read-only)"):
            Store(paths.root, paths.runroot).create_layer(names=["two"])
    finally:
        subprocess.run(["umount", layers_dir], check=True)
    assert _snapshot(paths.root) == before


def test_layers_by_digest(store: Store, paths: StorePaths) -> None:
    store.create_layer("d1")
    records = json.load(open(paths.layers_json))
    records[0]["diff-digest"] = "sha256:" + "a" * 64
    with open(paths.layers_json, "w") as f:
        json.dump(records, f)
    fresh = Store(paths.root, paths.runroot)
    assert [la.id for la in fresh.layers_by_digest("uncompressed", "sha256:" + "a" * 64)] == ["d1"]
    with pytest.raises(LayerUnknownError):
        fresh.layers_by_digest("compressed", "sha256:" + "a" * 64)
    with pytest.raises(InvalidArgumentError):
        fresh.layers_by_digest("uncompressed", "")


def test_gc_removes_only_what_no_record_owns(store: Store) -> None:
    keep = store.create_layer()
    orphan_dir = os.path.join(store.driver.home, "f" * 64)
    os.makedirs(os.path.join(orphan_dir, "diff"))
    orphan_split = os.path.join(store.files.layers_dir, "e" * 64 + ".tar-split.gz")
    open(orphan_split, "wb").close()
    orphan_data = os.path.join(store.files.layers_dir, "d" * 64)
    os.makedirs(orphan_data)
    dangling = os.path.join(store.driver.link_dir, "DANGLING")
    os.symlink("../nothing/diff", dangling)
    tmp_left = os.path.join(store.files.layers_dir, ".tmp-layers.json123")
    open(tmp_left, "w").close()
    removed = set(store.gc())
    assert removed == {orphan_dir, orphan_split, orphan_data, dangling, tmp_left}
    assert os.path.isdir(store.driver.layer_dir(keep.id))
    assert store.gc() == []


def test_wipe_deletes_everything_newest_first(store: Store) -> None:
    base = store.create_layer()
    child = store.create_layer(parent=base.id)
    assert store.wipe() == [child.id, base.id]
    assert open(store.files.stable).read() == "[]"


def test_a_second_store_object_sees_writes(paths: StorePaths) -> None:
    one, two = paths.store(), paths.store()
    assert two.layers() == []
    layer = one.create_layer(names=["seen"])
    assert two.get("seen").id == layer.id
    two.set_metadata("seen", "from two")
    assert one.get(layer.id).metadata == "from two"


def test_hand_edit_with_same_token_is_noticed_through_mtime(paths: StorePaths) -> None:
    store = paths.store()
    layer = store.create_layer()
    records = json.load(open(paths.layers_json))
    records[0]["metadata"] = "edited by hand"
    with open(paths.layers_json, "w") as f:
        json.dump(records, f)
    assert store.get(layer.id).metadata == "edited by hand"


def test_failed_populate_leaves_no_layer(store: Store) -> None:
    def boom(layer: object, lowers: list[str]) -> None:
        raise LayerfsError("junk input")

    with pytest.raises(LayerfsError, match="junk input"):
        store.create_layer(names=["bad"], populate=boom)
    assert store.layers() == []
    assert set(os.listdir(store.driver.home)) == {"l", ".has-mount-program"}
