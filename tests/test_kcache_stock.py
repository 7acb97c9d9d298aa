"""layerfs on a stock pyfuse3 (``.venv-stock``, which scripts/setup makes): the fallback works.

The daemon detects that the patches are missing, says so in one log line, and serves the
same view through the old request pattern; and a FUSE subset of the suite passes with it
(run by that interpreter, so its daemons import the stock pyfuse3 too).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from kcache_helpers import counted, walk

from conftest import require, require_root
from fs_helpers import (
    assert_same_tree,
    cleanup_mount,
    kernel_overlay,
    make_rich_chain,
    require_fuse,
    snapshot,
)

pytestmark = [pytest.mark.fuse, pytest.mark.root]

ROOT = Path(__file__).resolve().parent.parent
STOCK_PYTHON = ROOT / ".venv-stock" / "bin" / "python"

FUSE_SUBSET = [
    "tests/test_fs_mount.py",
    "tests/test_views.py",
    "tests/test_whiteout_formats.py",
    "tests/test_ops_faults.py",
    "tests/test_kcache.py::test_cached_answers_are_identical_to_kernel_overlay",
    "tests/test_kcache.py::test_metadata_answered_while_a_read_stalls",
    "tests/test_kcache.py::test_remount_after_applydiff_shows_the_new_content",
]


def _stock_python() -> str:
    require(STOCK_PYTHON.exists(), f"{STOCK_PYTHON} is missing (scripts/setup makes it)")
    r = subprocess.run(
        [
            str(STOCK_PYTHON),
            "-c",
            "import layerfs.fs.ops as o; print(o.pyfuse3_features().missing)",
        ],
        capture_output=True,
        text=True,
        cwd=ROOT,
    )
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "['cache_readdir', 'cache_symlinks', 'no_open']", r.stdout
    return str(STOCK_PYTHON)


def _spawn_stock(dirs: list[str], mnt: Path) -> tuple[int, str]:
    """Mount with the daemon run by the stock interpreter; (pid, log path)."""
    mnt.mkdir(parents=True, exist_ok=True)
    log = str(mnt.parent / (mnt.name + ".log"))
    code = (
        "import sys; from layerfs.fs.mount import spawn_daemon; "
        "print(spawn_daemon(sys.argv[2:], [], sys.argv[1], log_path=sys.argv[1] + '.log'))"
    )
    r = subprocess.run(
        [_stock_python(), "-c", code, str(mnt), *dirs], capture_output=True, text=True, cwd="/"
    )
    assert r.returncode == 0, r.stderr
    return int(r.stdout.strip()), log


def test_stock_pyfuse3_fallback_serves_the_same_view(tmp_path: Path) -> None:
    require_root()
    require_fuse()
    chain = [str(d) for d in make_rich_chain(tmp_path / "chain")]
    with kernel_overlay(chain, tmp_path / "kernel") as k:
        want = snapshot(k)
    mnt = tmp_path / "mnt"
    pid, log = _spawn_stock(chain, mnt)
    try:
        cold = snapshot(str(mnt))
        warm = counted(str(mnt), walk)
    finally:
        cleanup_mount(str(mnt), pid)
    assert_same_tree(cold, want, ignore=("ino",))
    # without the patches every listing and symlink is a request again, warm or not
    assert warm["OPENDIR"] > 0 and warm["READDIRPLUS"] > 0 and warm["READLINK"] > 0, warm
    lines = [ln for ln in Path(log).read_text().splitlines() if "daemon: pyfuse3 " in ln]
    assert len(lines) == 1
    assert "without the layerfs patches" in lines[0]
    assert "cache_readdir, cache_symlinks, no_open" in lines[0]


def test_fuse_subset_passes_with_stock_pyfuse3() -> None:
    """The FUSE subset run by ``.venv-stock`` (its daemons then use the stock pyfuse3)."""
    require_root()
    python = _stock_python()
    env = dict(os.environ)
    r = subprocess.run(
        [python, "-m", "pytest", "-q", "-p", "no:cacheprovider", "--timeout=600", *FUSE_SUBSET],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env=env,
    )
    tail = "\n".join(r.stdout.splitlines()[-30:])
    assert r.returncode == 0, tail + r.stderr[-2000:]
    assert " passed" in tail and "failed" not in tail and "skipped" not in tail, tail
    print(tail.splitlines()[-1], file=sys.stderr)
