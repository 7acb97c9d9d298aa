"""Store discipline (issue 9, D11/D12): callbacks under the lock, failed updates, copies,
whole operations under one lock, first-open races, fsync errors, the records class."""

from __future__ import annotations

import errno
import hashlib
import json
import os
import re
import subprocess
import sys
import textwrap
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from conftest import GoTool, LayerfsCLI, StorePaths, make_tar, require_root, require_tool
from layerfs.archive.image import import_image
from layerfs.errors import LayerfsError, LayerUnknownError, StoreReentryError, StoreSyncError
from layerfs.store.jsonfile import fsync_dir
from layerfs.store.layers import Store
from layerfs.store.record import Layer
from layerfs.store.records import LayerRecords

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)


def _run_python(code: str, *args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    """Run ``code`` in a fresh interpreter on this checkout. A deadlock shows up as
    TimeoutExpired (the child is killed), so a hang fails the test instead of the suite."""
    env = dict(os.environ, PYTHONPATH=REPO)
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code), *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=env,
        check=False,
    )


# --------------------------------------------------------------------- callbacks under the lock


def test_populate_may_read_the_store_but_not_change_it(paths: StorePaths) -> None:
    """populate ran under the write lock; calling back into the Store took the lock again
    on a new descriptor and waited for itself forever."""
    proc = _run_python(
        """
        import sys
        from layerfs.store.layers import Store
        from layerfs.errors import StoreReentryError
        store = Store(sys.argv[1], sys.argv[2])
        base = store.create_layer(names=["base"])
        seen = {}
        def populate(layer, lowers):
            seen["parent"] = store.get("base").id          # a read: allowed
            seen["listed"] = [la.id for la in store.layers()]
            try:
                store.set_metadata("base", "from inside")   # a write: refused
            except StoreReentryError as exc:
                seen["refused"] = str(exc)
            try:
                Store(sys.argv[1], sys.argv[2]).get("base")  # another object: refused
            except StoreReentryError as exc:
                seen["other"] = str(exc)
            return {"metadata": "filled"}
        child = store.create_layer(names=["child"], parent="base", populate=populate)
        assert seen["parent"] == base.id, seen
        assert child.id in seen["listed"] and base.id in seen["listed"], seen
        assert "populate or apply callback" in seen["refused"], seen
        assert "another Store object" in seen["other"], seen
        assert store.get("base").metadata == ""
        assert store.get("child").metadata == "filled"
        print("ok")
        """,
        paths.root,
        paths.runroot,
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "ok"


def test_apply_callback_reentry_is_refused_and_the_layer_removed(paths: StorePaths) -> None:
    proc = _run_python(
        """
        import sys
        from layerfs.store.layers import Store
        from layerfs.errors import LayerfsError
        store = Store(sys.argv[1], sys.argv[2])
        store.create_layer(names=["target"])
        def apply(layer, lowers):
            assert store.exists("target")
            store.add_names("target", ["more"])
        try:
            store.update_layer("target", apply)
        except LayerfsError as exc:
            assert "populate or apply callback" in str(exc), exc
            print("refused:", exc)
        print("exists:", store.exists("target"))
        """,
        paths.root,
        paths.runroot,
    )
    assert proc.returncode == 0, proc.stderr
    assert "refused:" in proc.stdout and "exists: False" in proc.stdout, proc.stdout


def test_reads_under_the_held_lock_need_no_second_acquisition(store: Store) -> None:
    """Inside reading_layer the Store answers from the held lock; a change is refused
    instead of waiting for itself."""
    store.create_layer(names=["a"])
    with store.reading_layer("a") as contents:
        assert store.get("a").id == contents.layer.id
        assert [la.id for la in store.chain("a")] == [contents.layer.id]
        with pytest.raises(StoreReentryError):
            store.delete_layer("a")
    assert store.exists("a")


# --------------------------------------------------------------------- failed update_layer


def test_failed_update_leaves_no_incomplete_layer_in_the_same_store(store: Store) -> None:
    """The incomplete record stayed listed and editable in the Store that ran the update
    (only a fresh Store cleaned it)."""
    layer = store.create_layer(names=["victim"])
    other = store.create_layer(names=["other"])

    def apply(layer: Layer, lowers: list[str]) -> None:
        raise LayerfsError("bad tar")

    with pytest.raises(LayerfsError, match=r"bad tar; layer .* has been removed"):
        store.update_layer("victim", apply)
    assert [la.id for la in store.layers()] == [other.id]
    assert not any(la.incomplete for la in store.layers())
    assert not store.exists("victim")
    with pytest.raises(LayerUnknownError):
        store.set_metadata(layer.id, "edited after the failure")
    assert not os.path.exists(store.layer_dir(layer.id))
    records = json.loads(Path(store.files.stable).read_bytes())
    assert [r["id"] for r in records] == [other.id]


def test_failed_applydiff_through_the_cli_leaves_nothing(cli: LayerfsCLI) -> None:
    layer_id = cli.out("create-layer", "--name", "base").split()[0]
    bad = make_tar({"../escape": b"x"})
    proc = cli.run("applydiff", "base", input=bad, check=False)
    assert proc.returncode == 1
    assert proc.stderr.decode().count("\n") == 1, proc.stderr
    assert layer_id not in cli.out("layers")


# --------------------------------------------------------------------- copies


def test_returned_records_share_no_nested_value_with_the_store(store: Store) -> None:
    """Copies were shallow: a nested flag value, a uid-map entry or an unknown key's value
    edited in a returned record changed the store's own record, and the next save wrote it."""
    store.create_layer(names=["a"])
    store.set_flag("a", "nested", {"list": [1, 2], "obj": {"k": "v"}})
    records = json.loads(Path(store.files.stable).read_bytes())
    records[0]["uidmap"] = [{"container_id": 0, "host_id": 1000, "size": 1}]
    records[0]["future-key"] = {"deep": [1]}
    Path(store.files.stable).write_text(json.dumps(records))

    for fetched in (
        store.get("a"),
        store.layers()[0],
        store.chain("a")[0],
        store.set_metadata("a", "m"),
        store.set_flag("a", "other", 1),
    ):
        fetched.flags["nested"]["list"].append(99)
        fetched.flags["nested"]["obj"]["k"] = "changed"
        fetched.uidmap[0]["host_id"] = 0
        fetched.extra["future-key"]["deep"].append(2)
        fetched.names.append("sneaky")
    store.create_layer(names=["b"])  # a save: would write any leaked edit
    again = store.get("a")
    assert again.flags["nested"] == {"list": [1, 2], "obj": {"k": "v"}}
    assert again.uidmap == [{"container_id": 0, "host_id": 1000, "size": 1}]
    assert again.extra["future-key"] == {"deep": [1]}
    assert again.names == ["a"]
    on_disk = json.loads(Path(store.files.stable).read_bytes())[0]
    assert on_disk["flags"]["nested"] == {"list": [1, 2], "obj": {"k": "v"}}
    assert on_disk["uidmap"][0]["host_id"] == 1000


def test_the_layer_given_to_populate_is_a_copy(store: Store) -> None:
    def populate(layer: Layer, lowers: list[str]) -> None:
        layer.names.append("injected")
        layer.flags["x"] = True

    made = store.create_layer(names=["p"], populate=populate)
    assert made.names == ["p"] and "x" not in made.flags
    assert store.get("p").names == ["p"]


# --------------------------------------------------------------------- the records class


def _layer(layer_id: str, *names: str) -> Layer:
    return Layer(id=layer_id, names=list(names))


def test_records_keep_their_invariants_through_every_change() -> None:
    records, repair = LayerRecords.from_files(
        [_layer("a", "x", "x"), _layer("b", "y"), _layer("a", "z")],
        [_layer("v", "y")],
        source="layers.json",
        volatile_source="volatile-layers.json",
        strict_names=False,
    )
    records.check()
    assert repair
    assert [la.id for la in records] == ["a", "b", "v"]
    a = records.by_id("a")
    assert a is not None and a.names == ["x", "z"]  # first record wins, keeps later names
    assert records.by_name("y") is records.by_id("v")  # the later layer wins a name
    assert records.is_volatile("v") and not records.is_volatile("a")

    c = _layer("c", "n1")
    records.add(c, volatile=False)
    records.check()
    b = records.by_id("b")
    assert b is not None
    losers = records.set_names(b, ["n1", "x", "new"])
    records.check()
    assert c.names == [] and a.names == ["z"] and losers == [c, a]
    records.remove_names(b, ["x", "absent"])
    records.check()
    assert records.by_name("x") is None
    records.remove(b)
    records.check()
    assert records.by_name("n1") is None and "b" not in records
    v = records.by_id("v")
    assert v is not None
    records.remove(v)
    records.check()
    assert records.volatile_count() == 0
    assert [la.id for la in records.in_file(volatile=False)] == ["a", "c"]


def test_records_refuse_an_add_that_would_break_them() -> None:
    records = LayerRecords()
    records.add(_layer("a", "n"), volatile=False)
    with pytest.raises(LayerfsError, match="already in use"):
        records.add(_layer("a"), volatile=False)
    with pytest.raises(LayerfsError, match='name "n" is already in use'):
        records.add(_layer("b", "n"), volatile=True)
    records.check()
    assert "b" not in records and records.volatile_count() == 0


def test_a_read_only_store_refuses_duplicate_names() -> None:
    with pytest.raises(LayerfsError, match="duplicate layer names"):
        LayerRecords.from_files(
            [_layer("a", "n"), _layer("b", "n")],
            [],
            source="layers.json",
            volatile_source="volatile-layers.json",
            strict_names=True,
        )


# --------------------------------------------------------------------- whole operations


def test_import_image_records_no_image_whose_top_layer_vanished(
    tmp_path: Path, paths: StorePaths
) -> None:
    """add_image ran without layers.lock and without checking the top layer: a delete
    between the last layer and the image record left an image naming a missing layer."""
    layer_tar = make_tar({"file": b"content\n"})
    diff_id = "sha256:" + hashlib.sha256(layer_tar).hexdigest()
    layout = tmp_path / "img"
    blobs = layout / "blobs" / "sha256"
    blobs.mkdir(parents=True)

    def blob(data: bytes) -> dict[str, object]:
        digest = hashlib.sha256(data).hexdigest()
        (blobs / digest).write_bytes(data)
        return {"digest": f"sha256:{digest}", "size": len(data)}

    config = json.dumps({"rootfs": {"type": "layers", "diff_ids": [diff_id]}}).encode()
    manifest = json.dumps(
        {
            "schemaVersion": 2,
            "mediaType": "application/vnd.oci.image.manifest.v1+json",
            "config": {"mediaType": "application/vnd.oci.image.config.v1+json", **blob(config)},
            "layers": [{"mediaType": "application/vnd.oci.image.layer.v1.tar", **blob(layer_tar)}],
        }
    ).encode()
    (layout / "index.json").write_text(
        json.dumps({"schemaVersion": 2, "manifests": [blob(manifest)]})
    )
    (layout / "oci-layout").write_text('{"imageLayoutVersion":"1.0.0"}')

    store = paths.store()
    deleter = paths.store()  # another Store object, as another process would be

    def on_layer(layer_id: str, reused: bool) -> None:
        deleter.delete_layer(layer_id)

    with pytest.raises(LayerUnknownError, match="top layer is not in the store"):
        import_image(store, f"oci:{layout}", name="img", on_layer=on_layer)
    assert store.images.load() == []


def _lock_acquisitions(trace: str, lock_path: str) -> list[str]:
    """The F_OFD_SETLKW calls on ``lock_path`` in an ``strace -y`` log, in order."""
    return [
        line
        for line in trace.splitlines()
        if "F_OFD_SETLKW" in line and f"<{lock_path}>" in line and "F_UNLCK" not in line
    ]


@pytest.mark.parametrize("command", ["diff", "changes", "diffsize"])
def test_diff_resolves_and_reads_under_one_lock_acquisition(
    tmp_path: Path, cli: LayerfsCLI, paths: StorePaths, command: str
) -> None:
    """transfer.py resolved the layer under one layers.lock acquisition and read its files
    under another, so a delete or applydiff could land in between. Counted with strace on
    the real CLI: one acquisition must span the whole operation."""
    strace = require_tool("strace")
    cli.run("import-layer", "--name", "base", input=make_tar({"a": b"1"}))
    cli.run("import-layer", "--name", "top", "--parent", "base", input=make_tar({"b": b"2"}))
    log = tmp_path / "trace"
    argv = [strace, "-f", "-y", "-e", "trace=fcntl", "-o", str(log), *cli.argv(command)]
    argv += ["top", "base"]
    proc = subprocess.run(argv, capture_output=True, timeout=120, check=False)
    assert proc.returncode == 0, proc.stderr
    taken = _lock_acquisitions(log.read_text(), paths.layers_lock)
    assert len(taken) == 1, "\n".join(taken)
    assert "F_RDLCK" in taken[0]


def test_store_methods_cover_what_callers_outside_the_store_used(store: Store) -> None:
    """The accessors that replace store.driver/.files/.mount_table/.lock outside store/."""
    a = store.create_layer(names=["a"])
    b = store.create_layer(names=["b"], parent="a")
    chain, dirs = store.chain_with_dirs("b")
    assert [la.id for la in chain] == [b.id, a.id]
    assert dirs == [store.diff_dir(b.id), store.diff_dir(a.id)] == store.diff_dirs("b")
    assert store.diff_dirs_of_chain(chain) == dirs
    assert os.path.isdir(store.diff_dir(a.id)) and os.path.isdir(store.work_dir(a.id))
    assert os.path.dirname(store.merged_dir(a.id)) == store.layer_dir(a.id)
    assert store.tar_split_path(a.id).endswith(f"{a.id}.tar-split.gz")
    assert store.whiteout_format() == ("kernel" if os.geteuid() == 0 else "aufs")
    assert store.has_layer_id(a.id) and not store.has_layer_id("a")
    assert store.mount_records() == {}
    with store.mount_counts() as table:
        assert store.get("a").id == a.id  # reads inside are fine
        assert table == {}


# --------------------------------------------------------------------- first open


def test_many_processes_opening_a_fresh_store_at_once(tmp_path: Path) -> None:
    """.has-mount-program was created with O_EXCL after an exists() check: concurrent
    first opens failed with EEXIST (8 of 320 on main). Forked processes released together
    through one pipe open 40 fresh stores, 8 at a time."""
    failures: list[str] = []
    for trial in range(40):
        root, runroot = str(tmp_path / f"r{trial}"), str(tmp_path / f"run{trial}")
        gate_r, gate_w = os.pipe()
        report_r, report_w = os.pipe()
        pids = []
        for _ in range(8):
            pid = os.fork()
            if pid == 0:  # child: wait at the gate, open the store, report
                code = 1
                try:
                    os.close(gate_w)
                    os.read(gate_r, 1)
                    s = Store(root, runroot)
                    fmt = s.whiteout_format()
                    code = 0 if fmt == ("kernel" if os.geteuid() == 0 else "aufs") else 3
                    if code:
                        os.write(report_w, f"wrong format {fmt}\n".encode())
                except BaseException as exc:
                    os.write(report_w, f"{type(exc).__name__}: {exc}\n".encode())
                finally:
                    os._exit(code)
            pids.append(pid)
        os.close(gate_r)
        os.close(report_w)
        os.close(gate_w)  # opens the gate for all eight at once
        for pid in pids:
            _, status = os.waitpid(pid, 0)
            if os.waitstatus_to_exitcode(status) != 0:
                failures.append(f"trial {trial}: exit {os.waitstatus_to_exitcode(status)}")
        with os.fdopen(report_r) as reports:
            failures += [line.strip() for line in reports if line.strip()]
        marker = os.path.join(root, "overlay", ".has-mount-program")
        with open(marker) as f:
            assert f.read() == ("false" if os.geteuid() == 0 else "true")
        leftovers = [n for n in os.listdir(os.path.join(root, "overlay")) if ".tmp-" in n]
        assert leftovers == []
    assert failures == []


# --------------------------------------------------------------------- fsync errors


@pytest.fixture
def fsync_fs(tmp_path: Path) -> Iterator[Callable[[str], str]]:
    """Mount the fsync_errno_fs FUSE file system; yields a function errno-name -> path."""
    require_root()
    require_tool("fusermount3")
    started: list[tuple[subprocess.Popen[str], str]] = []

    def mount(name: str) -> str:
        mnt = tmp_path / f"fs-{name}"
        mnt.mkdir()
        proc = subprocess.Popen(
            [sys.executable, os.path.join(HERE, "fsync_errno_fs.py"), str(mnt), name],
            stdout=subprocess.PIPE,
            text=True,
            env=dict(os.environ, PYTHONPATH=REPO),
        )
        started.append((proc, str(mnt)))
        assert proc.stdout is not None
        assert proc.stdout.readline().strip() == "ready"  # mounted: requests queue from here
        return str(mnt)

    yield mount
    for proc, mnt in started:
        subprocess.run(["fusermount3", "-u", mnt], capture_output=True, check=False)
        proc.wait(timeout=30)


def test_fsync_dir_raises_eio_from_a_real_file_system(fsync_fs: Callable[[str], str]) -> None:
    """fsync_dir swallowed every fsync error; a directory whose fsync fails with EIO means
    the rename there may be lost, so the caller must hear about it."""
    with pytest.raises(StoreSyncError, match=r"syncing directory .*: .*\(EIO\)") as caught:
        fsync_dir(fsync_fs("EIO"))
    assert caught.value.errno == errno.EIO
    assert "\n" not in str(caught.value)


@pytest.mark.parametrize("name", ["EINVAL", "EOPNOTSUPP", "ENOSYS"])
def test_fsync_dir_accepts_a_file_system_that_cannot_sync_directories(
    fsync_fs: Callable[[str], str], name: str
) -> None:
    fsync_dir(fsync_fs(name))


def test_fsync_dir_raises_for_a_missing_directory(tmp_path: Path) -> None:
    with pytest.raises(StoreSyncError, match="ENOENT"):
        fsync_dir(str(tmp_path / "absent"))


def test_go_reads_what_the_records_class_writes(go: GoTool, paths: StorePaths) -> None:
    """Behaviour is unchanged for the Go tool: names moved between layers and a deleted
    layer, as containers-storage lists them."""
    store = paths.store()
    a = store.create_layer(names=["one", "two"])
    b = store.create_layer(names=["three"], parent=a.id)
    store.add_names(b.id, ["two"])  # moves from a to b
    c = store.create_layer(names=["four"])
    store.delete_layer(c.id)
    listing = go.out("layers")
    blocks = {
        m.group(1): m.group(2)
        for m in re.finditer(r"^([0-9a-f]{64})\n((?:\t.*\n)*)", listing, re.M)
    }
    assert list(blocks) == [a.id, b.id]
    assert re.findall(r"name: (\S+)", blocks[a.id]) == ["one"]
    assert re.findall(r"name: (\S+)", blocks[b.id]) == ["three", "two"]
