"""Crash injection: SIGKILL a process in the middle of store mutations, then check both tools.

Each trial starts a worker that runs a long series of mutations and prints an
acknowledgement after each one returns (and an intent line before each delete). The worker
is killed at a random moment. Afterwards the store must load in layerfs and in
containers-storage, every acknowledged layer and name must be there, no incomplete record
may survive a write-locked load, and ``gc`` must leave no orphan behind.
"""

from __future__ import annotations

import os
import random
import sys

import pytest

from conftest import GoTool, StorePaths, run_and_kill

pytestmark = pytest.mark.interop

TRIALS = int(os.environ.get("LAYERFS_CRASH_TRIALS", "50"))

_WORKER = r"""
import sys
from layerfs.store.layers import Store
store = Store(sys.argv[1], sys.argv[2])
trial = sys.argv[3]
parent = None
for i in range(10_000):
    layer = store.create_layer(names=[f"t{trial}-{i}"], parent=parent,
                               volatile=(i % 5 == 4))
    print("C", layer.id, f"t{trial}-{i}", flush=True)
    store.add_names(layer.id, [f"t{trial}-{i}-alias"])
    print("N", layer.id, f"t{trial}-{i}-alias", flush=True)
    store.set_big_data(layer.id, "Blob", b"x" * 4096)
    print("B", layer.id, flush=True)
    if i % 3 == 2:
        print("d", layer.id, flush=True)
        store.delete_layer(layer.id)
        print("D", layer.id, flush=True)
    else:
        parent = layer.id if i % 7 else None
"""


def test_sigkill_during_mutations_loses_no_acknowledged_work(go: GoTool, paths: StorePaths) -> None:
    rng = random.Random(int(os.environ.get("LAYERFS_CRASH_SEED", "20261128")))
    paths.store()
    expected: dict[str, set[str]] = {}  # acknowledged layers -> acknowledged names
    kills = 0
    for trial in range(TRIALS):
        _, out, killed = run_and_kill(
            [sys.executable, "-c", _WORKER, paths.root, paths.runroot, str(trial)],
            rng.uniform(0.25, 0.9),
        )
        kills += killed
        # run_and_kill starts the delay at the worker's first acknowledgement, and 10,000
        # iterations outlast it by far: every trial kills mid-run, whatever the machine's speed
        assert killed, f"trial {trial}: the worker finished before the kill"
        in_doubt: set[str] = set()
        for line in out.split("\n")[:-1]:  # a line cut by the kill is not an acknowledgement
            kind, layer_id, *rest = line.split()
            if kind == "C":
                expected[layer_id] = {rest[0]}
            elif kind == "N":
                expected[layer_id].add(rest[0])
            elif kind == "d":
                in_doubt.add(layer_id)
            elif kind == "D":
                expected.pop(layer_id, None)
                in_doubt.discard(layer_id)
        # A fresh read-write load repairs; then both tools must agree on the survivors.
        store = paths.store()
        present = {la.id: set(la.names) for la in store.layers()}
        assert not any(la.incomplete for la in store.layers())
        for layer_id, names in expected.items():
            if layer_id in in_doubt:
                continue
            assert layer_id in present, f"trial {trial}: acknowledged layer {layer_id} lost"
            assert names <= present[layer_id], f"trial {trial}: names lost on {layer_id}"
        for layer_id in in_doubt:
            if layer_id not in present:
                expected.pop(layer_id, None)
        go_listing = go.out("layers")  # 1.43 predates volatile-layers.json: stable ones only
        stable = {la.id for la in store.layers() if not store.is_volatile(la.id)}
        assert all(layer_id in go_listing for layer_id in stable)
        store.gc()
        home = os.path.join(paths.root, "overlay")
        assert set(os.listdir(home)) - {"l", ".has-mount-program"} == set(present)
        leftovers = [n for n in os.listdir(store.files.layers_dir) if n.startswith(".tmp-")]
        assert leftovers == []
    assert kills == TRIALS
