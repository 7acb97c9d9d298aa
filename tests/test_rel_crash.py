"""Crash injection across every kind of store mutation, checked by both tools.

Extends tests/test_crash_store.py (create/names/big data/delete through the API) with
``import_layer`` (a kill lands inside tar extraction), ``remove_names`` and explicit ids, so
an operation that was started but not acknowledged is still accounted for exactly; and with
``layerfs mount``/``unmount`` CLI processes killed mid-way, after which ``layerfs ps``
must leave mountpoints.json agreeing with the kernel's mount table and the daemons alive.

Counts: LAYERFS_STRESS scales them (see rel_helpers); CI runs 40 + 16 trials.
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time

import pytest

from conftest import GoTool, LayerfsCLI, StorePaths, require_root, run_and_kill, wait_until
from layerfs.store.jsonfile import SpaceReserve
from layerfs.store.layers import Store
from rel_helpers import daemon_pids, figures, make_tar, mounts_below, scaled, wait_gone

pytestmark = [pytest.mark.interop]

STORE_TRIALS = scaled(40, 800, "LAYERFS_REL_CRASH_TRIALS")
MOUNT_TRIALS = scaled(16, 200, "LAYERFS_REL_MOUNT_TRIALS")
SEED = int(os.environ.get("LAYERFS_CRASH_SEED", "20261129"))

# Intent line "? OP args" before each mutation, acknowledgement "OP args" after it returns.
_WORKER = r"""
import io, random, sys
from layerfs.store.layers import Store
from layerfs.store.record import new_layer_id
from layerfs.archive.transfer import import_layer
sys.path.insert(0, sys.argv[5])
from rel_helpers import make_tar

store = Store(sys.argv[1], sys.argv[2])
trial, rng = sys.argv[3], random.Random(int(sys.argv[4]))
big = make_tar({f"d{k // 50}/f{k}": bytes(rng.randrange(1, 3000)) for k in range(400)})
small = make_tar({"etc/": None, "etc/hosts": b"127.0.0.1 localhost\n"})

def say(*words):
    print(*words, flush=True)

for i in range(100_000):
    layers = store.layers()
    ids = [la.id for la in layers]
    parents = {la.parent for la in layers}
    leaves = [x for x in ids if x not in parents]
    ops = ["create", "import", "names", "unname", "data", "delete"]
    op = "delete" if len(ids) > 24 and leaves else rng.choice(ops)
    if op in ("names", "unname", "data") and not ids:
        op = "create"
    if op == "delete" and not leaves:
        op = "create"
    name = f"t{trial}-{i}"
    if op in ("create", "import"):
        lid = new_layer_id()
        parent = rng.choice(ids) if ids and rng.random() < 0.5 else None
        say("?", "C", lid, name)
        if op == "create":
            store.create_layer(lid, names=[name], parent=parent)
        else:
            import_layer(store, io.BytesIO(big if rng.random() < 0.5 else small),
                         layer_id=lid, names=[name], parent=parent)
        say("C", lid, name)
    elif op == "names":
        lid = rng.choice(ids)
        say("?", "N", lid, name + "-alias")
        store.add_names(lid, [name + "-alias"])
        say("N", lid, name + "-alias")
    elif op == "unname":
        la = rng.choice(layers)
        if not la.names:
            continue
        gone = rng.choice(la.names)
        say("?", "R", la.id, gone)
        store.remove_names(la.id, [gone])
        say("R", la.id, gone)
    elif op == "data":
        lid = rng.choice(ids)
        say("?", "B", lid, name)
        store.set_big_data(lid, "Blob", name.encode() * 100)
        say("B", lid, name)
    else:
        lid = rng.choice(leaves)
        say("?", "D", lid)
        store.delete_layer(lid)
        say("D", lid)
"""


class Model:
    """What the acknowledged operations say the store holds."""

    def __init__(self) -> None:
        self.names: dict[str, set[str]] = {}
        self.blob: dict[str, str] = {}
        self.doubt: tuple[str, ...] = ()

    def apply(self, words: list[str]) -> None:
        op, lid, *rest = words
        if op == "C":
            self.names[lid] = {rest[0]}
        elif op == "N":
            for owned in self.names.values():
                owned.discard(rest[0])
            self.names[lid].add(rest[0])
        elif op == "R":
            self.names[lid].discard(rest[0])
        elif op == "B":
            self.blob[lid] = rest[0]
        elif op == "D":
            self.names.pop(lid, None)
            self.blob.pop(lid, None)

    def feed(self, out: str) -> int:
        acks = 0
        self.doubt = ()
        for line in out.split("\n")[:-1]:  # a line cut by the kill is not an acknowledgement
            words = line.split()
            if words[0] == "?":
                self.doubt = tuple(words[1:])
            else:
                self.apply(words)
                self.doubt = ()
                acks += 1
        return acks

    def reconcile(self, present: dict[str, set[str]], blobs: dict[str, str | None]) -> None:
        """Check the store against the model, allowing the one in-doubt operation either way;
        then adopt the outcome of that operation."""
        doubt = self.doubt
        if doubt and doubt[0] == "C":
            lid, name = doubt[1], doubt[2]
            if lid in present:
                assert present[lid] == {name}, f"half-created layer {lid}: {present[lid]}"
                self.names[lid] = {name}
        elif doubt and doubt[0] == "D" and doubt[1] not in present:
            self.names.pop(doubt[1], None)
            self.blob.pop(doubt[1], None)
        elif doubt and _took_effect(doubt, present, blobs):
            self.apply(list(doubt))
        assert set(present) == set(self.names), (
            f"lost {set(self.names) - set(present)}, unexpected {set(present) - set(self.names)}"
        )
        for lid, names in self.names.items():
            assert present[lid] == names, f"names of {lid}: {present[lid]} != {names}"
        for lid, text in self.blob.items():
            assert blobs[lid] == text, f"big data of {lid}: {blobs[lid]!r} != {text!r}"


def _took_effect(
    doubt: tuple[str, ...], present: dict[str, set[str]], blobs: dict[str, str | None]
) -> bool:
    """Whether an unacknowledged names or big-data change is visible in the store."""
    op, lid, arg = doubt[0], doubt[1], doubt[2] if len(doubt) > 2 else ""
    if op == "N":
        return arg in present.get(lid, set())
    if op == "R":
        return lid in present and arg not in present[lid]
    return op == "B" and blobs.get(lid) == arg


def _go_ids(go: GoTool) -> set[str]:
    return {ln for ln in go.out("layers").split("\n") if ln and not ln.startswith("\t")}


def _raw_records(paths: StorePaths) -> list[dict[str, object]]:
    with open(paths.layers_json, "rb") as f:
        data = f.read()
    return json.loads(data) if data else []


def check_store(paths: StorePaths, go: GoTool) -> tuple[Store, dict[str, set[str]]]:
    """Both tools load; after one write nothing incomplete or orphaned is left."""
    go.out("layers")  # Go loads the crashed store first (it may repair it too)
    store = paths.store()
    store.gc()  # a write: repairs incomplete records, then collects orphans
    records = _raw_records(paths)
    assert not [r for r in records if (r.get("flags") or {}).get("incomplete")]  # type: ignore[union-attr]
    present = {la.id: set(la.names) for la in store.layers()}
    assert {r["id"] for r in records} == set(present)
    assert _go_ids(go) == set(present), "Go and layerfs disagree after repair"
    home = os.path.join(paths.root, "overlay")
    assert set(os.listdir(home)) - {"l", ".has-mount-program"} == set(present)
    for link in os.listdir(os.path.join(home, "l")):
        target = os.readlink(os.path.join(home, "l", link))
        assert os.path.isdir(os.path.join(home, "l", target)), f"dangling l/{link}"
    for lid in present:
        with open(os.path.join(home, lid, "link")) as f:
            assert os.path.islink(os.path.join(home, "l", f.read().strip()))
    allowed = {"layers.json", "volatile-layers.json", "layers.lock", SpaceReserve.NAME}
    allowed |= set(present) | {f"{lid}.tar-split.gz" for lid in present}
    extra = set(os.listdir(store.files.layers_dir)) - allowed
    assert not extra, f"left after gc: {extra}"
    return store, present


def test_sigkill_during_store_mutations_and_imports(go: GoTool, paths: StorePaths) -> None:
    rng = random.Random(SEED)
    paths.store()
    model = Model()
    helpers = os.path.dirname(__file__)
    with figures("crash: store mutations + import (API)") as fig:
        kills = 0
        for trial in range(STORE_TRIALS):
            seed = str(rng.randrange(1 << 30))
            worker, out, killed = run_and_kill(
                [
                    sys.executable,
                    "-c",
                    _WORKER,
                    paths.root,
                    paths.runroot,
                    str(trial),
                    seed,
                    helpers,
                ],
                rng.uniform(0.15, 0.7),
            )
            kills += killed
            assert worker.returncode == -signal.SIGKILL, f"worker ended early:\n{out[-2000:]}"
            fig.ops += model.feed(out)
            store, present = check_store(paths, go)
            blobs = {lid: _blob_name(store, lid) for lid in present}
            model.reconcile(present, blobs)
            fig.trials += 1
        fig.notes["kills"] = kills


def _blob_name(store: Store, lid: str) -> str | None:
    """The worker writes ``name * 100``; recover ``name`` (None when there is no item)."""
    from layerfs.errors import BigDataUnknownError

    try:
        data = store.get_big_data(lid, "Blob").decode()
    except BigDataUnknownError:
        return None
    name = data[: len(data) // 100]
    assert name * 100 == data, f"torn big-data item on {lid}"
    return name


# --------------------------------------------------------------------- mount / unmount


def _recorded(paths: StorePaths) -> dict[str, tuple[str, int]]:
    try:
        with open(os.path.join(paths.runroot, "overlay-layers", "mountpoints.json")) as f:
            return {e["id"]: (e["path"], e["count"]) for e in json.load(f) if e["count"] > 0}
    except FileNotFoundError:
        return {}


def check_mounts(cli: LayerfsCLI, paths: StorePaths) -> tuple[dict[str, int], set[str]]:
    """After ``layerfs ps`` repairs: records == live FUSE mounts == running daemons.

    Returns the counts and the live FUSE mounts that no record owns (there must be none:
    the manager records a mount before its daemon starts)."""
    wait_until(  # a daemon orphaned by a killed mount may still be starting or ending
        lambda: len(daemon_pids(paths.root)) == len(mounts_below(paths.root, "fuse")),
        "there is one daemon per live FUSE mount",
        timeout=60,
    )
    views = json.loads(cli.out("ps", "--json"))
    recorded = _recorded(paths)
    live = set(mounts_below(paths.root, "fuse"))
    paths_recorded = {p for p, _ in recorded.values()}
    assert paths_recorded <= live, f"records {recorded} vs mounts {live}"
    assert {v["id"]: v["count"] for v in views} == {k: c for k, (_, c) in recorded.items()}
    pids = daemon_pids(paths.root)
    assert len(pids) == len(live), f"daemons {pids} for mounts {live}"
    for path in live:
        os.statvfs(path)  # alive, not ENOTCONN
    return {k: c for k, (_, c) in recorded.items()}, live - paths_recorded


def _clean_leak(path: str) -> None:
    """Detach a leaked view and end its daemon (found by its mount point)."""
    pids = daemon_pids(path)
    subprocess.run(["umount", "-l", path], check=False)
    for pid in pids:
        if not wait_gone(pid, 5):
            os.kill(pid, signal.SIGKILL)


def test_sigkill_during_mount_and_unmount(cli: LayerfsCLI, go: GoTool, paths: StorePaths) -> None:
    require_root()
    rng = random.Random(SEED + 1)
    # Go bind-mounts G/overlay onto itself on first use; done after FUSE views exist, that
    # (recursive) bind copies them, and the copies outlive a layerfs unmount. Load it first.
    paths.store()
    go.out("layers")
    ids = []
    for k in range(3):
        tar = make_tar({f"dir{k}/": None, **{f"dir{k}/f{j}": b"x" * j for j in range(50)}})
        ids.append(cli.out("import-layer", "--name", f"m{k}", input=tar).split()[0])
    expected = dict.fromkeys(ids, 0)
    with figures("crash: CLI mount/unmount") as fig:
        try:
            for _ in range(MOUNT_TRIALS):
                lid = rng.choice(ids)
                op = "mount" if expected[lid] == 0 or rng.random() < 0.55 else "unmount"
                proc = subprocess.Popen(
                    cli.argv(op, lid), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
                )
                # Fault injection, not synchronisation: a random moment to SIGKILL the CLI
                # (before, during or after its work); every outcome is accepted below.
                time.sleep(rng.uniform(0.0, 0.4))
                killed = proc.poll() is None
                if killed:
                    proc.send_signal(signal.SIGKILL)
                _, err = proc.communicate(timeout=120)
                if not killed:
                    assert proc.returncode == 0, err.decode()
                    fig.ops += 1
                counts, leaked = check_mounts(cli, paths)
                assert not leaked, f"{op} {'killed' if killed else 'done'}: unrecorded {leaked}"
                step = 1 if op == "mount" else -1
                want = max(0, expected[lid] + step)
                got = counts.get(lid, 0)
                if killed:
                    assert got in (expected[lid], want), f"{op} killed: count {got}"
                else:
                    assert got == want, f"{op} acknowledged: count {got}, want {want}"
                expected[lid] = got
                for other in ids:
                    if other != lid:
                        assert counts.get(other, 0) == expected[other]
                fig.trials += 1
            go.out("layers")  # the Go tool loads the store and its mount records
        finally:
            for lid in ids:
                cli.run("unmount", "--force", lid, check=False)
            pids = daemon_pids(paths.root)
            for pid in pids:
                wait_gone(pid)
        assert not mounts_below(paths.root, "fuse"), "a FUSE mount leaked"
        assert not [p for p in daemon_pids(paths.root) if not wait_gone(p, 5)], "daemon leaked"


@pytest.mark.fuse
def test_mount_killed_after_the_daemon_is_up_leaks_nothing(
    cli: LayerfsCLI, paths: StorePaths
) -> None:
    require_root()
    lid = cli.out("import-layer", "--name", "x", input=make_tar({"a": b"A"})).split()[0]
    merged = os.path.join(paths.root, "overlay", lid, "merged")
    proc = subprocess.Popen(cli.argv("mount", lid), stdout=subprocess.DEVNULL)
    wait_until(
        lambda: mounts_below(merged) or proc.poll() is not None,
        f"the view of {lid} is in the mount table",
        timeout=60,
        interval=0.001,
    )
    # the view is live; the mount command may not have recorded it yet (if it already has, or
    # has even finished, the checks below hold just the same)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    assert proc.returncode in (0, -signal.SIGKILL), f"mount failed rc={proc.returncode}"
    try:
        cli.out("ps")
        recorded = _recorded(paths)
        live = mounts_below(paths.root, "fuse")
        assert [p for p, _ in recorded.values()] == live, f"records {recorded}, mounts {live}"
        cli.run("unmount", "--force", lid)
        assert not mounts_below(paths.root, "fuse")
        assert not daemon_pids(merged)
    finally:
        if mounts_below(merged):
            _clean_leak(merged)
