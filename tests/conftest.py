"""Shared fixtures: temporary stores, the real containers-storage binary, the layerfs CLI.

In CI (``CI=true``) a test whose tool or privilege is missing fails instead of skipping,
so a green run always means the interop and FUSE checks really ran.
"""

from __future__ import annotations

import contextlib
import io
import os
import shutil
import signal
import subprocess
import sys
import tarfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import pytest

from layerfs.store.layers import Store

IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")
GO_TOOL = "containers-storage"


def require_tool(name: str) -> str:
    """Path of a tool the test needs; fail in CI, skip elsewhere, when it is missing."""
    path = shutil.which(name)
    if path is None:
        message = f"{name} is not installed (scripts/test installs it)"
        if IN_CI:
            pytest.fail(message)
        pytest.skip(message)
    return path


def require_root() -> None:
    """Fail in CI, skip elsewhere, unless running as root."""
    if os.geteuid() != 0:
        if IN_CI:
            pytest.fail("this test needs root")
        pytest.skip("this test needs root")


def make_tar(
    entries: dict[str, bytes | None], whiteouts: Sequence[str] = (), *, mode: int = 0o644
) -> bytes:
    """A PAX tar: empty ``.wh.`` files first, then files (bytes, ``mode``) and directories
    (None, 0755)."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tf:
        for name in whiteouts:
            tf.addfile(tarfile.TarInfo(name))
        for name, data in entries.items():
            info = tarfile.TarInfo(name)
            info.mtime = 1_700_000_000
            if data is None:
                info.type = tarfile.DIRTYPE
                info.mode = 0o755
                tf.addfile(info)
            else:
                info.size = len(data)
                info.mode = mode
                tf.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def run_and_kill(
    argv: Sequence[str], delay: float, timeout: float = 60
) -> tuple[subprocess.Popen[str], str, bool]:
    """Start ``argv``, SIGKILL it after ``delay`` seconds if still running; returns the
    process, its whole stdout and whether the kill landed."""
    worker = subprocess.Popen(list(argv), stdout=subprocess.PIPE, text=True)
    time.sleep(delay)
    killed = worker.poll() is None
    if killed:
        worker.send_signal(signal.SIGKILL)
    out, _ = worker.communicate(timeout=timeout)
    return worker, out, killed


@dataclass
class StorePaths:
    """A graph root and run root in a temporary directory."""

    root: str
    runroot: str

    def store(self, *, read_only: bool = False) -> Store:
        """A :class:`Store` on these paths."""
        return Store(self.root, self.runroot, read_only=read_only)

    @property
    def layers_json(self) -> str:
        return os.path.join(self.root, "overlay-layers", "layers.json")

    @property
    def layers_lock(self) -> str:
        return os.path.join(self.root, "overlay-layers", "layers.lock")


@pytest.fixture
def paths(tmp_path: Path) -> Iterator[StorePaths]:
    """Fresh store paths; any mount left below them is detached at teardown."""
    sp = StorePaths(str(tmp_path / "root"), str(tmp_path / "runroot"))
    yield sp
    _detach_mounts_below(str(tmp_path))


@pytest.fixture
def store(paths: StorePaths) -> Store:
    """A new, empty store."""
    return paths.store()


class GoTool:
    """Runs ``containers-storage -g ROOT -R RUNROOT -s overlay ...`` on a store."""

    def __init__(self, paths: StorePaths) -> None:
        self.binary = require_tool(GO_TOOL)
        self.paths = paths

    def argv(self, *args: str) -> list[str]:
        return [
            self.binary,
            "-g",
            self.paths.root,
            "-R",
            self.paths.runroot,
            "-s",
            "overlay",
            *args,
        ]

    def run(
        self, *args: str, input: bytes | None = None, check: bool = True, timeout: float = 60
    ) -> subprocess.CompletedProcess[bytes]:
        proc = subprocess.run(
            self.argv(*args), input=input, capture_output=True, timeout=timeout, check=False
        )
        if check and proc.returncode != 0:
            raise AssertionError(
                f"containers-storage {' '.join(args)} failed rc={proc.returncode}: "
                f"{proc.stderr.decode(errors='replace')}"
            )
        return proc

    def out(self, *args: str, input: bytes | None = None) -> str:
        return self.run(*args, input=input).stdout.decode()

    def shutdown(self) -> None:
        """Release the store (Go bind-mounts G/overlay onto itself while in use)."""
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.run("shutdown", check=False, timeout=30)


@pytest.fixture
def go(paths: StorePaths) -> Iterator[GoTool]:
    """The real Go tool on the same store as ``paths``; shut down at teardown."""
    require_root()
    tool = GoTool(paths)
    yield tool
    tool.shutdown()


class LayerfsCLI:
    """Runs the layerfs CLI as a subprocess on a store."""

    def __init__(self, paths: StorePaths) -> None:
        self.paths = paths

    def argv(self, *args: str) -> list[str]:
        return [
            sys.executable,
            "-m",
            "layerfs",
            "--root",
            self.paths.root,
            "--runroot",
            self.paths.runroot,
            *args,
        ]

    def run(
        self, *args: str, input: bytes | None = None, check: bool = True, timeout: float = 120
    ) -> subprocess.CompletedProcess[bytes]:
        proc = subprocess.run(
            self.argv(*args), input=input, capture_output=True, timeout=timeout, check=False
        )
        if check and proc.returncode != 0:
            raise AssertionError(
                f"layerfs {' '.join(args)} failed rc={proc.returncode}: "
                f"{proc.stderr.decode(errors='replace')}"
            )
        return proc

    def out(self, *args: str, input: bytes | None = None) -> str:
        return self.run(*args, input=input).stdout.decode()


@pytest.fixture
def cli(paths: StorePaths) -> LayerfsCLI:
    """The layerfs CLI on the same store as ``paths``."""
    return LayerfsCLI(paths)


def _detach_mounts_below(top: str) -> None:
    with open("/proc/self/mounts") as f:
        points = [line.split()[1].replace("\\040", " ") for line in f]
    for point in sorted((p for p in points if p.startswith(top + "/")), reverse=True):
        subprocess.run(["umount", "-l", point], capture_output=True, check=False)
