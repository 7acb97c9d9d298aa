#!/usr/bin/env python3
"""Time ``layerfs inspect`` on the 100k-entry chain ``b`` of ``scripts/bench.py``.

    sudo scripts/bench_inspect.py [--workdir DIR] [--quick] [--repeat N]

Reuses chain ``b`` from bench.py's work dir (``chains.json`` and its store) when it is there,
else builds the same chain (``bench_workloads.build_chain_b``) and imports it into a store of
its own under the work dir. Measures, per run: the CLI end to end (``layerfs inspect --json``,
a fresh process: start-up, resolving, layer indexes from disk, the report), and in this
process the two parts: opening the chain's view (``open_index``: per-layer indexes loaded or
built, then merged) and ``inspect_chain`` itself. The first CLI run after an import also
builds and persists the layer indexes; it is reported apart ("first"). Needs root (import
writes whiteout devices). Called by bench.py at the end of a run (:func:`run`).
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Callable

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
sys.path.insert(0, HERE)
sys.path.insert(0, REPO)

import bench_workloads as bw  # noqa: E402

VENV_PY = os.path.join(REPO, ".venv", "bin", "python")
PY = VENV_PY if os.path.exists(VENV_PY) else sys.executable


def _cli(g: str, r: str, *args: str) -> list[str]:
    return [PY, "-m", "layerfs", "--root", g, "--runroot", r, *args]


def _env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": REPO}


def _chain(workdir: str, quick: bool, log: Callable[[str], None]) -> tuple[str, str, list[str]]:
    """(graph root, run root, layer ids bottom first) of chain b."""
    key = "qb" if quick else "b"
    g, r = os.path.join(workdir, "store"), os.path.join(workdir, "run")
    try:
        with open(os.path.join(workdir, "chains.json")) as f:
            ids = json.load(f)[key]["layers"]
        if all(os.path.isdir(os.path.join(g, "overlay", i, "diff")) for i in ids):
            log(f"bench_inspect: reusing bench.py's chain {key} ({len(ids)} layers)")
            return g, r, ids
    except (OSError, ValueError, KeyError):
        pass
    g, r = os.path.join(workdir, "inspect-store"), os.path.join(workdir, "inspect-run")
    done = os.path.join(workdir, f"inspect-{key}.json")
    try:
        with open(done) as f:
            ids = json.load(f)
        if all(os.path.isdir(os.path.join(g, "overlay", i, "diff")) for i in ids):
            return g, r, ids
    except (OSError, ValueError):
        pass
    outdir = os.path.join(workdir, "inspect-tars", key)
    os.makedirs(outdir, exist_ok=True)
    log(f"bench_inspect: building chain {key}")
    tars, _big = bw.build_chain_b(outdir, 0.1 if quick else 1.0, log)
    ids = []
    for tar in tars:
        parent = ["--parent", ids[-1]] if ids else []
        out = subprocess.run(
            _cli(g, r, "import-layer", *parent, tar),
            capture_output=True,
            text=True,
            check=True,
            env=_env(),
        )
        ids.append(out.stdout.split()[0])
    with open(done, "w") as f:
        json.dump(ids, f)
    return g, r, ids


def run(
    workdir: str, *, quick: bool = False, repeat: int = 5, log: Callable[[str], None] = print
) -> tuple[str, dict[str, object]]:
    """Measure; returns (report text, figures)."""
    from layerfs.fs.index import chain_pins, open_index
    from layerfs.fs.index.inspect import inspect_chain
    from layerfs.store.layers import Store

    g, r, ids = _chain(workdir, quick, log)
    top = ids[-1]
    cli_s: list[float] = []
    first: float | None = None
    report: dict[str, object] = {}
    for i in range(repeat + 1):
        t0 = time.perf_counter()
        out = subprocess.run(
            _cli(g, r, "inspect", "--json", top),
            capture_output=True,
            text=True,
            check=True,
            env=_env(),
        )
        took = time.perf_counter() - t0
        report = json.loads(out.stdout)
        if i == 0:
            first = took  # may build and persist the layer indexes
        else:
            cli_s.append(took)
    store = Store(g, r)
    chain = store.chain(top)
    dirs = [store.diff_dir(la.id) for la in chain]
    pins, fmt = chain_pins(store, chain), store.whiteout_format()
    open_s, inspect_s = [], []
    entries = 0
    for _ in range(repeat):
        t0 = time.perf_counter()
        index, _ = open_index(dirs, pins, whiteout_format=fmt)
        t1 = time.perf_counter()
        inspect_chain(index, [la.id for la in chain])
        t2 = time.perf_counter()
        open_s.append(t1 - t0)
        inspect_s.append(t2 - t1)
        entries = sum(li.rows for li in index.layers)
    figures = {
        "layers": len(ids),
        "layer_entries": entries,
        "view_entries": report.get("visible_entries"),
        "efficiency": report.get("efficiency"),
        "cli_first_s": first,
        "cli_s": statistics.median(cli_s),
        "open_index_s": statistics.median(open_s),
        "inspect_chain_s": statistics.median(inspect_s),
    }
    text = "\n".join(
        [
            f"inspect on chain {'qb' if quick else 'b'}: {len(ids)} layers, {entries} layer "
            f"entries, {figures['view_entries']} in the view, efficiency {figures['efficiency']}",
            f"  CLI end to end (median of {repeat}): {figures['cli_s']:.2f} s "
            f"(first run after import: {first:.2f} s)",
            f"  in process: open_index {figures['open_index_s']:.2f} s, "
            f"inspect_chain {figures['inspect_chain_s']:.2f} s",
        ]
    )
    return text, figures


def main() -> int:
    import argparse

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--workdir", default="/var/tmp/layerfs-bench")
    ap.add_argument("--quick", action="store_true", help="chain qb (a tenth of the entries)")
    ap.add_argument("--repeat", type=int, default=5)
    args = ap.parse_args()
    if os.geteuid() != 0:
        print("bench_inspect.py needs root (importing whiteouts)", file=sys.stderr)
        return 2
    os.makedirs(args.workdir, exist_ok=True)
    text, figures = run(args.workdir, quick=args.quick, repeat=args.repeat)
    print(text)
    print(json.dumps(figures))
    return 0


if __name__ == "__main__":
    sys.exit(main())
