"""Full disk: a store on a small tmpfs, filled to every level around each kind of write.

For each free-space level (0 .. a few hundred KiB, in page steps) the test runs a names
change (a layers.json save), a layer import (tar contents, tar-split, two saves) and a
big-data write through the CLI. Each attempt either succeeds completely or fails with exit 1
and "No space left on device" on one line; after a failure the previous layers.json is
byte-for-byte intact and loads in layerfs and containers-storage, no ``.tmp-*`` file is left,
no layer stays registered and no new directory appears under ``overlay/``; once the filler is
removed the same operation succeeds. (Copy-up into a writable layer does not exist yet:
writable views come later, so ENOSPC during copy-up is not tested here.)
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from conftest import GoTool, LayerfsCLI, StorePaths, require_root, require_tool
from rel_helpers import figures, make_tar, scaled

pytestmark = [pytest.mark.root, pytest.mark.interop]

PAGE = 4096
LEVELS = scaled(24, 96)  # free-space levels per operation
STEP = PAGE * 4


@contextlib.contextmanager
def small_tmpfs(where: Path, size: str) -> Iterator[Path]:
    where.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(where)], check=True)
    try:
        yield where
    finally:
        with open("/proc/self/mounts") as f:
            below = [ln.split()[1] for ln in f if ln.split()[1].startswith(str(where) + "/")]
        for point in sorted(below, reverse=True):
            subprocess.run(["umount", "-l", point], check=False)
        subprocess.run(["umount", "-l", str(where)], check=True)


class Filler:
    """Occupies all but ``free`` bytes of a file system."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def leave(self, free: int) -> None:
        self.release()
        fd = os.open(self.path, os.O_WRONLY | os.O_CREAT, 0o600)
        try:
            chunk = bytes(1 << 16)
            with contextlib.suppress(OSError):
                while True:
                    os.write(fd, chunk)
            with contextlib.suppress(OSError):
                while True:
                    os.write(fd, chunk[:PAGE])
            size = os.fstat(fd).st_size
            os.ftruncate(fd, max(0, size - free))
        finally:
            os.close(fd)

    def release(self) -> None:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.path)


def _state(paths: StorePaths) -> tuple[bytes, list[str], list[str]]:
    with open(paths.layers_json, "rb") as f:
        data = f.read()
    overlay = sorted(os.listdir(os.path.join(paths.root, "overlay")))
    meta = sorted(os.listdir(os.path.join(paths.root, "overlay-layers")))
    return data, overlay, meta


def _check_failed(proc: subprocess.CompletedProcess[bytes], what: str) -> None:
    err = proc.stderr.decode(errors="replace")
    assert proc.returncode == 1, f"{what}: rc {proc.returncode}: {err}"
    lines = err.strip().split("\n")
    assert len(lines) == 1 and lines[0].startswith("layerfs: "), f"{what}: {err!r}"
    assert "no space left on device" in err.lower(), f"{what}: ENOSPC not named: {err!r}"
    assert "Traceback" not in err


def test_full_disk_during_saves_imports_and_big_data(tmp_path: Path) -> None:
    require_root()
    require_tool("containers-storage")
    with small_tmpfs(tmp_path / "small", "2m") as mnt, figures("full disk (tmpfs)") as fig:
        paths = StorePaths(str(mnt / "root"), str(tmp_path / "runroot"))
        cli, go = LayerfsCLI(paths), GoTool(paths)
        filler = Filler(mnt / "filler")
        base = cli.out("create-layer", "--name", "base").split()[0]
        for k in range(40):  # make layers.json a few pages long
            cli.run("add-names", "--name", f"padding-name-{k}-" + "x" * 100, base)
        cli.run("set-layer-data", base, "Blob", input=b"old" * 1000)
        tar = make_tar({"d/": None, **{f"d/f{k}": os.urandom(3000) for k in range(30)}})
        try:
            for level in range(LEVELS):
                free = level * STEP // 2
                attempts = [
                    ("names", ["add-names", "--name", f"n{level}", base], None),
                    ("import", ["import-layer", "--name", f"imp{level}", "--parent", base], tar),
                    ("big data", ["set-layer-data", base, "Blob"], os.urandom(free + 9000)),
                ]
                for what, argv, data in attempts:
                    filler.leave(free)
                    before = _state(paths)
                    proc = cli.run(*argv, input=data, check=False)
                    fig.ops += 1
                    if proc.returncode == 0:
                        filler.release()
                        if what == "import":
                            cli.run("delete-layer", f"imp{level}")
                        continue
                    fig.trials += 1
                    _check_failed(proc, f"{what} with {free} bytes free")
                    after = _state(paths)
                    assert after[0] == before[0], f"{what}: layers.json changed"
                    assert after[1] == before[1], f"{what}: overlay/ changed: {after[1]}"
                    assert not [n for n in after[2] if n.startswith(".tmp-")], after[2]
                    assert after[2] == before[2], f"{what}: overlay-layers/ changed"
                    listed = json.loads(cli.out("layers", "--json"))  # loads, even when full
                    assert [la["id"] for la in listed] == [base]
                    if what == "big data":
                        assert cli.out("get-layer-data", base, "Blob").encode() == b"old" * 1000
                    filler.release()
                    go.out("layers")  # Go itself cannot start on a full disk (rc 1, no message)
                    proc = cli.run(*argv, input=data, check=False)  # work resumes
                    assert proc.returncode == 0, proc.stderr.decode()
                    if what == "big data":
                        cli.run("set-layer-data", base, "Blob", input=b"old" * 1000)
                    if what == "import":
                        cli.run("delete-layer", f"imp{level}")
            assert fig.trials >= LEVELS, "too few attempts hit a full disk"
            for name in os.listdir(os.path.join(paths.root, "overlay-layers")):
                assert not name.startswith(".tmp-")
            cli.run("gc")
            assert sorted(os.listdir(os.path.join(paths.root, "overlay"))) == sorted(
                ["l", ".has-mount-program", base]
            )
        finally:
            filler.release()
            go.shutdown()


def test_deleting_works_on_a_full_disk(tmp_path: Path) -> None:
    """c/storage users hit `rm` failing on ENOSPC (podman#13967): deleting must not need
    space beyond what the deleted layer frees. The store's space reserve is given up for the
    save of the incomplete flag and refilled afterwards."""
    require_root()
    with small_tmpfs(tmp_path / "small", "1m") as mnt:
        paths = StorePaths(str(mnt / "root"), str(tmp_path / "runroot"))
        cli = LayerfsCLI(paths)
        cli.run("import-layer", "--name", "victim", input=make_tar({"f": os.urandom(200_000)}))
        filler = Filler(mnt / "filler")
        filler.leave(0)
        try:
            with pytest.raises(OSError) as err:
                (mnt / "probe").write_bytes(b"x" * PAGE)
            assert err.value.errno == errno.ENOSPC
            proc = cli.run("delete-layer", "victim", check=False)
            assert proc.returncode == 0, proc.stderr.decode()
            assert json.loads(cli.out("layers", "--json")) == []
        finally:
            filler.release()
