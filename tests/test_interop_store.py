"""Interop with the real containers-storage binary on one store (store-format.md §10)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading

import pytest

from conftest import GoTool, LayerfsCLI, StorePaths, holds_lock, wait_until, waits_for_lock
from layerfs.store.layers import Store

pytestmark = pytest.mark.interop


def _go_ids(go: GoTool) -> list[str]:
    return [line for line in go.out("layers").splitlines() if line and not line.startswith("\t")]


def test_layers_made_by_layerfs_are_listed_inspected_and_mounted_by_go(
    go: GoTool, cli: LayerfsCLI
) -> None:
    base = cli.out("create-layer", "--name", "base").splitlines()[0]
    child = cli.out("create-layer", "--name", "child", "--name", "a<b", "base").splitlines()[0]
    assert _go_ids(go) == [base, child]
    (shown,) = json.loads(go.out("layer", "-j", "child").strip())
    assert shown["id"] == child and shown["parent"] == base and shown["names"] == ["child", "a<b"]
    mountpoint = go.out("mount", child).strip()
    try:
        assert os.path.ismount(mountpoint)
        assert go.out("mounted", child).strip() == f"{child} mounted"
        store = Store(go.paths.root, go.paths.runroot)
        assert store.mount_count(child) == 1
    finally:
        go.run("unmount", child)
    assert not os.path.ismount(mountpoint)


def test_layers_made_by_go_are_read_by_layerfs(go: GoTool, cli: LayerfsCLI, tmp_path) -> None:
    base = go.out("create-layer", "-n", "gobase").splitlines()[0]
    payload = tmp_path / "d"
    payload.mkdir()
    (payload / "f").write_text("hello")
    tar = tmp_path / "l.tar"
    subprocess.run(["tar", "-C", str(payload), "-cf", str(tar), "."], check=True)
    top = go.out("import-layer", "-n", "gotop", "-f", str(tar), "gobase").splitlines()[0]
    records = json.loads(cli.out("layers", "--json"))
    assert [r["id"] for r in records] == [base, top]
    assert records[1]["parent"] == base
    assert records[1]["diff-size"] == os.path.getsize(tar)
    assert records[1]["uidset"] == [0]
    on_disk = open(go.paths.layers_json, "rb").read()
    assert cli.out("layers", "--json").strip().encode() == on_disk
    assert cli.out("exists", "gotop", top[:8]).splitlines() == ["gotop: true", f"{top[:8]}: true"]


def test_names_added_on_either_side_are_seen_by_the_other(go: GoTool, cli: LayerfsCLI) -> None:
    one = cli.out("create-layer", "--name", "one").splitlines()[0]
    two = go.out("create-layer", "-n", "two").splitlines()[0]
    go.run("add-names", "-n", "from-go", "one")
    assert cli.out("names", one).split() == ["one", "from-go"]
    cli.run("add-names", "--name", "from-go", two)  # moves the name
    assert "from-go" not in go.out("get-names", one)
    assert "from-go" in go.out("get-names", two)
    go.run("set-names", "-n", "only", one)
    assert cli.out("names", one).split() == ["only"]


def test_go_waits_while_layerfs_holds_the_write_lock(go: GoTool, paths: StorePaths) -> None:
    store = paths.store()
    made = store.create_layer(names=["x"]).id
    with store.lock.write():
        proc = subprocess.Popen(go.argv("layers"), stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        try:
            wait_until(
                lambda: proc.poll() is not None or waits_for_lock(paths.layers_lock, proc.pid),
                "containers-storage is blocked on layers.lock (in /proc/locks)",
            )
            assert proc.poll() is None, "containers-storage did not wait for our write lock"
        except BaseException:
            proc.kill()
            proc.wait()
            raise
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err.decode(errors="replace")
    assert made in out.decode()


def test_layerfs_waits_while_go_holds_the_lock(go: GoTool, paths: StorePaths) -> None:
    """Go holds layers.lock for the whole of a slow import fed from a pipe."""
    store = paths.store()
    store.create_layer(names=["x"])
    proc = subprocess.Popen(go.argv("import-layer", "-n", "slow"), stdin=subprocess.PIPE)
    assert proc.stdin is not None
    done = threading.Event()

    def ours() -> None:
        paths.store().create_layer(names=["after"])
        done.set()

    worker = threading.Thread(target=ours)
    try:
        wait_until(
            lambda: proc.poll() is not None or holds_lock(paths.layers_lock, proc.pid, "WRITE"),
            "containers-storage holds layers.lock while it reads the layer from stdin",
        )
        assert proc.poll() is None, "containers-storage ended before it was fed"
        worker.start()
        wait_until(
            lambda: done.is_set() or waits_for_lock(paths.layers_lock, kind="OFDLCK"),
            "our create_layer is blocked on layers.lock",
        )
        assert not done.is_set(), "layerfs wrote while containers-storage held the lock"
        assert holds_lock(paths.layers_lock, proc.pid, "WRITE")
        proc.stdin.write(b"\0" * 1024)
        proc.stdin.close()
        assert proc.wait(30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        if worker.is_alive() or done.is_set():
            worker.join(30)
    assert done.is_set()
    assert {la.names[0] for la in store.layers()} == {"x", "slow", "after"}


def test_a_long_lived_layerfs_process_sees_go_writes(go: GoTool, paths: StorePaths) -> None:
    store = paths.store()
    assert store.layers() == []
    made = go.out("create-layer", "-n", "late").splitlines()[0]
    assert store.get("late").id == made
    go.run("set-metadata", "-m", "meta from go", made)
    assert store.get(made).metadata == "meta from go"
    store.set_metadata(made, "meta from layerfs")
    assert go.out("metadata", made).strip() == f"{made}: meta from layerfs"


def test_incomplete_records_are_cleaned_the_same_way(go: GoTool, paths: StorePaths) -> None:
    for cleaner in ("go", "layerfs"):
        store = paths.store()
        layer = store.create_layer(names=[f"broken-{cleaner}"])
        records = json.load(open(paths.layers_json))
        records[-1]["flags"] = {"incomplete": True}
        with open(paths.layers_json, "w") as f:
            json.dump(records, f)
        if cleaner == "go":
            assert layer.id not in go.out("layers")
        else:
            assert not paths.store().exists(layer.id)
        assert layer.id not in open(paths.layers_json).read()
        assert not os.path.exists(os.path.join(paths.root, "overlay", layer.id))
        assert _go_ids(go) == [la.id for la in paths.store().layers()]


def test_duplicate_names_resolve_the_same_way(go: GoTool, paths: StorePaths) -> None:
    store = paths.store()
    store.create_layer("first", names=["dup"])
    store.create_layer("second")
    original = json.load(open(paths.layers_json))
    original[1]["names"] = ["dup"]
    for reader in ("go", "layerfs"):
        with open(paths.layers_json, "w") as f:
            json.dump(original, f)
        if reader == "go":
            go.run("layers")
        else:
            paths.store().layers()
        fixed = json.load(open(paths.layers_json))
        assert [r.get("names", []) for r in fixed] == [[], ["dup"]], reader


def test_big_data_keys_round_trip_both_ways(go: GoTool, paths: StorePaths, tmp_path) -> None:
    store = paths.store()
    layer = store.create_layer(names=["bd"])
    for key in ("Key", "keY", "a b"):
        store.set_big_data(layer.id, key, f"ours {key}".encode())
        assert go.out("get-layer-data", "bd", key) == f"ours {key}"
    for key in ("Other", "othR", "c d"):
        src = tmp_path / "in"
        src.write_bytes(f"go {key}".encode())
        go.run("set-layer-data", "-f", str(src), "bd", key)
        assert store.get_big_data("bd", key) == f"go {key}".encode()
    listed = go.out("list-layer-data", "bd").split("\n")
    assert [x for x in listed if x] == ["Key", "keY", "a b", "Other", "othR", "c d"]
    assert store.big_data_names("bd") == ["Key", "keY", "a b", "Other", "othR", "c d"]


def test_go_deletes_what_layerfs_made_and_vice_versa(go: GoTool, cli: LayerfsCLI) -> None:
    ours = cli.out("create-layer", "--name", "ours").splitlines()[0]
    theirs = go.out("create-layer", "-n", "theirs").splitlines()[0]
    go.run("delete-layer", ours)
    cli.run("delete-layer", "theirs")
    assert _go_ids(go) == []
    assert json.loads(cli.out("layers", "--json")) == []
    home = os.path.join(cli.paths.root, "overlay")
    assert set(os.listdir(home)) == {"l", ".has-mount-program"}
    assert os.listdir(os.path.join(home, "l")) == []
    assert theirs


def test_untouched_go_records_stay_byte_identical_after_our_rewrite(
    go: GoTool, paths: StorePaths
) -> None:
    go.run("create-layer", "-n", "g1")
    go.run("create-layer", "-n", "g<2>")
    before = open(paths.layers_json, "rb").read()
    store = paths.store()
    mine = store.create_layer(names=["mine"])
    store.delete_layer(mine.id)
    assert open(paths.layers_json, "rb").read() == before


def test_concurrent_layerfs_and_go_writers_lose_nothing(go: GoTool, paths: StorePaths) -> None:
    """4 layerfs and 4 Go processes create, rename and delete at once."""
    paths.store()  # create the store
    rounds = 6
    script = (
        "import sys\n"
        "from layerfs.store.layers import Store\n"
        "s = Store(sys.argv[1], sys.argv[2])\n"
        "w = sys.argv[3]\n"
        f"for i in range({rounds}):\n"
        "    keep = s.create_layer(names=[f'{w}-keep-{i}'])\n"
        "    print(keep.id, flush=True)\n"
        "    s.add_names(keep.id, [f'{w}-extra-{i}'])\n"
        "    tmp = s.create_layer(names=[f'{w}-tmp-{i}'])\n"
        "    s.delete_layer(tmp.id)\n"
    )
    procs: list[tuple[str, subprocess.Popen[bytes]]] = []
    for w in range(4):
        procs.append(
            (
                f"py{w}",
                subprocess.Popen(
                    [sys.executable, "-c", script, paths.root, paths.runroot, f"py{w}"],
                    stdout=subprocess.PIPE,
                ),
            )
        )
    go_script = (
        'for i in $(seq 0 {last}); do id=$("$@" create-layer -n {w}-keep-$i | head -1) || exit 1;'
        ' echo $id; "$@" add-names -n {w}-extra-$i $id >/dev/null || exit 1;'
        ' t=$("$@" create-layer -n {w}-tmp-$i | head -1) || exit 1;'
        ' "$@" delete-layer $t >/dev/null || exit 1; done'
    )
    for w in range(4):
        procs.append(
            (
                f"go{w}",
                subprocess.Popen(
                    ["bash", "-c", go_script.format(last=rounds - 1, w=f"go{w}"), "x", *go.argv()],
                    stdout=subprocess.PIPE,
                ),
            )
        )
    acknowledged: dict[str, list[str]] = {}
    for name, proc in procs:
        out, _ = proc.communicate(timeout=300)
        assert proc.returncode == 0, f"{name} failed"
        acknowledged[name] = out.decode().split()
    expected = {
        layer_id: {f"{w}-keep-{i}", f"{w}-extra-{i}"}
        for w, ids in acknowledged.items()
        for i, layer_id in enumerate(ids)
    }
    assert len(expected) == 8 * rounds
    ours = {la.id: set(la.names) for la in paths.store().layers()}
    assert ours == expected
    assert set(_go_ids(go)) == set(expected)
