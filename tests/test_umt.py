"""The kernel's own overlayfs suite (unionmount-testsuite, through ``umt-run``) against
``layerfs-overlay``, one pytest test per suite test so that a failure names it and shows the
end of its log. umt-run finds the program on /usr/local/bin with PATH cleared (mount.fuse3):
``scripts/setup`` links it there, to the worktree's virtualenv.

Three suite modes: the default list (real directory rename: 58 tests), ``--verify`` (inode
numbers and the upper dir's layout too) and ``--ov=3 --xdev`` (three layers, rotated and
remounted; a lower-dir rename is expected to fail with EXDEV). Known differences, asserted so
that they cannot change unnoticed:

* ``--verify`` of the three rename tests of populated lower dirs: the suite expects the
  renamed dir's files to stay in the lower layer (kernel overlayfs writes a redirect xattr);
  layerfs copies the tree up into an opaque dir instead, because redirects are unreadable to
  the store's own tools (containers/storage's tar writer, fuse-overlayfs).
* ``--ov=3 --xdev`` ``rename-exdev``: layerfs renames lower dirs for real instead of EXDEV.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

from conftest import require

UMT_RUN = "/work/shared/tools/umt-run"
SYSTEM_PATH = "/usr/local/bin:/usr/bin:/bin"

_DEFAULT_LIST = """open-plain open-trunc open-creat open-creat-trunc open-creat-excl
open-creat-excl-trunc noent-plain noent-trunc noent-creat noent-creat-trunc noent-creat-excl
noent-creat-excl-trunc sym1-plain sym1-trunc sym1-creat sym1-creat-excl sym2-plain sym2-trunc
sym2-creat sym2-creat-excl symx-plain symx-trunc symx-creat symx-creat-excl symx-creat-trunc
truncate dir-open dir-weird-open dir-open-dir dir-sym1-open dir-sym1-weird-open dir-sym2-open
dir-sym2-weird-open readlink mkdir rmdir rmtree rmtree-new hard-link hard-link-dir
hard-link-sym unlink rename-file rename-hard-link rename-new-dir rename-new-pop-dir rename-mass
rename-mass-2 rename-mass-3 rename-mass-4 rename-mass-5 rename-mass-dir rename-mass-sym
impermissible"""
DEFAULT = _DEFAULT_LIST.split()
DIR_RENAMES = ["rename-dir", "rename-empty-dir", "rename-pop-dir", "rename-move-dir"]
VERIFY_DIFFERS = {"rename-dir", "rename-pop-dir", "rename-move-dir"}
OV3_DIFFERS = {"rename-exdev"}


def _umt(tmp_path: Path, name: str, *flags: str) -> tuple[bool, str]:
    require(os.geteuid() == 0, "umt-run needs root")
    require(os.path.exists(UMT_RUN), f"{UMT_RUN} missing")
    require(
        shutil.which("layerfs-overlay", path=SYSTEM_PATH) is not None,
        "layerfs-overlay is not linked into /usr/local/bin (scripts/setup does it)",
    )
    logs = tmp_path / "logs"
    env = dict(os.environ, UMT_LOGS=str(logs))
    r = subprocess.run(
        [UMT_RUN, "layerfs-overlay", *flags, name],
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
    )
    log = logs / f"{name}.log"
    tail = "\n".join(log.read_text(errors="replace").splitlines()[-15:]) if log.exists() else ""
    return r.returncode == 0, f"{r.stdout.strip()}\n--- log tail ---\n{tail}"


@pytest.mark.parametrize("name", DEFAULT + DIR_RENAMES)
def test_umt_default(tmp_path: Path, name: str) -> None:
    ok, why = _umt(tmp_path, name)
    assert ok, why


@pytest.mark.parametrize("name", DEFAULT + DIR_RENAMES)
def test_umt_verify(tmp_path: Path, name: str) -> None:
    ok, why = _umt(tmp_path, name, "--verify")
    if name in VERIFY_DIFFERS:
        assert not ok and "Upper file unexpectedly found" in why, why
    else:
        assert ok, why


@pytest.mark.parametrize("name", [*DEFAULT, "rename-exdev"])
def test_umt_three_layers_xdev(tmp_path: Path, name: str) -> None:
    ok, why = _umt(tmp_path, name, "--ov=3", "--xdev")
    if name in OV3_DIFFERS:
        assert not ok and "Invalid cross-device link" in why, why
    else:
        assert ok, why
