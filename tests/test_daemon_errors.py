"""A mount that cannot work fails with one line naming the cause, on the readiness ERROR line.

Each failure is real: a missing mount point, a ``/dev/fuse`` made unusable in a private mount
namespace (``unshare -m``), a missing ``fusermount3``, ``allow_other`` without
``user_allow_other``, fusermount3's own refusal, an unreadable layer directory. The daemon runs
in the foreground and the test reads its readiness pipe directly.
"""

from __future__ import annotations

import os
import shlex
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

import layerfs
from conftest import require_root, require_tool
from fs_helpers import Layer
from layerfs.fs.mount import detach, is_mountpoint

pytestmark = [pytest.mark.fuse, pytest.mark.root]

NOBODY = ["--reuid=65534", "--regid=65534", "--clear-groups"]
PKG_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(layerfs.__file__)))


@pytest.fixture
def world() -> Iterator[Path]:
    """A directory everyone can traverse (pytest's tmp dirs are 0700)."""
    d = Path(tempfile.mkdtemp(prefix="layerfs-derr-"))
    os.chmod(d, 0o755)
    yield d
    shutil.rmtree(d, ignore_errors=True)


def _layer(world: Path) -> str:
    return str(Layer(world / "layer").file("f", b"f").finish())


def _daemon(
    mountpoint: Path, dirs: list[str], *extra: str, setup: str = "", nobody: bool = False
) -> tuple[int, list[str], str]:
    """Run the daemon in the foreground (in a private mount namespace after running the shell
    commands *setup*, as nobody if asked); return (exit status, readiness lines, stderr)."""
    require_root()
    r, w = os.pipe()
    cmd = [sys.executable, "-m", "layerfs.fs.daemon", str(mountpoint), *dirs]
    cmd += ["--foreground", "--ready-fd", str(w), *extra]
    if nobody:
        cmd = [require_tool("setpriv"), *NOBODY, *cmd]
    if setup:
        shell = ["sh", "-ec", setup + '\nexec "$@"', "sh"]
        cmd = [require_tool("unshare"), "-m", "--propagation", "private", *shell, *cmd]
    env = dict(os.environ, PYTHONPATH=PKG_ROOT, PATH="/usr/sbin:/usr/bin:/sbin:/bin")
    try:
        proc = subprocess.Popen(
            cmd, pass_fds=(w,), env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE
        )
    finally:
        os.close(w)
    with os.fdopen(r, "rb") as f:
        lines = f.read().decode().splitlines()
    try:
        _, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
        if is_mountpoint(str(mountpoint)):  # it should never have mounted
            detach(str(mountpoint))
    return proc.returncode, lines, err.decode(errors="replace")


def _error(result: tuple[int, list[str], str]) -> str:
    rc, lines, err = result
    assert rc == 1, (lines, err)
    assert lines[0].startswith("PID ")
    assert len(lines) == 2 and lines[1].startswith("ERROR "), lines
    line = lines[1][len("ERROR ") :]
    assert "b'" not in line and "Traceback" not in line and "\n" not in line
    assert "Traceback" not in err, err
    return line


def _fuse_node(world: Path, mode: str, nodev: bool = False) -> str:
    """Shell commands: a FUSE device node with *mode* on a tmpfs, bind-mounted on /dev/fuse."""
    dev = world / ("nodev" if nodev else "dev")
    dev.mkdir()
    opts = "nodev,mode=755" if nodev else "mode=755"
    return (
        f"mount -t tmpfs -o {opts} tmpfs {dev}\n"
        f"mknod -m {mode} {dev}/fuse c 10 229\n"
        f"mount --bind {dev}/fuse /dev/fuse\n"
    )


def test_missing_mount_point(world: Path) -> None:
    mp = world / "no" / "such"
    assert _error(_daemon(mp, [_layer(world)])) == f"mount point {mp} does not exist"


def test_mount_point_not_a_directory(world: Path) -> None:
    mp = world / "file"
    mp.write_text("")
    assert _error(_daemon(mp, [_layer(world)])) == f"mount point {mp} is not a directory"


def test_dev_fuse_permission_denied(world: Path) -> None:
    (world / "mnt").mkdir()
    setup = _fuse_node(world, "666", nodev=True)  # a device on a nodev mount: EACCES, even root
    line = _error(_daemon(world / "mnt", [_layer(world)], setup=setup))
    assert line == "cannot open /dev/fuse: Permission denied"


def test_dev_fuse_not_the_fuse_device(world: Path) -> None:
    (world / "mnt").mkdir()
    line = _error(_daemon(world / "mnt", [_layer(world)], setup="mount --bind /dev/null /dev/fuse"))
    assert line == "cannot open /dev/fuse: it is not the FUSE device (10:229)"


def test_fusermount3_missing_for_a_user(world: Path) -> None:
    fusermount = shutil.which("fusermount3") or "/usr/bin/fusermount3"
    require_tool("fusermount3")
    (world / "mnt").mkdir()
    os.chown(world / "mnt", 65534, 65534)
    setup = _fuse_node(world, "666")
    for path in {fusermount, "/usr/bin/fusermount3", os.path.realpath(fusermount)}:
        if os.path.exists(path):
            setup += f"mount --bind /dev/null {shlex.quote(path)}\n"
    line = _error(_daemon(world / "mnt", [_layer(world)], setup=setup, nobody=True))
    assert line == "fusermount3 not found: it is needed to mount without root"


def test_allow_other_without_user_allow_other(world: Path) -> None:
    require_tool("fusermount3")
    (world / "mnt").mkdir()
    os.chown(world / "mnt", 65534, 65534)
    (world / "fuse.conf").write_text("# no user_allow_other here\n")
    setup = _fuse_node(world, "666") + f"mount --bind {world}/fuse.conf /etc/fuse.conf\n"
    result = _daemon(world / "mnt", [_layer(world)], "--allow-other", setup=setup, nobody=True)
    assert _error(result) == "allow_other needs user_allow_other in /etc/fuse.conf (or root)"


def test_fusermount3_refusal_is_the_message(world: Path) -> None:
    """Past the checks, fusermount3 itself refuses (nobody cannot write the mount point): its
    own words are the message, not pyfuse3's "fuse_session_mount failed"."""
    require_tool("fusermount3")
    mp = world / "mnt"
    mp.mkdir()  # root's, 0755: not writable by nobody
    result = _daemon(mp, [_layer(world)], setup=_fuse_node(world, "666"), nobody=True)
    line = _error(result)
    assert line.startswith(f"cannot mount {mp}: fusermount3: "), line
    assert "fuse_session_mount" not in line and str(mp) in line


def test_missing_layer_dir_is_named(world: Path) -> None:
    (world / "mnt").mkdir()
    gone = world / "gone"
    result = _daemon(world / "mnt", [str(gone)])
    assert (
        _error(result)
        == f"cannot index the layers: cannot read layer {gone}: No such file or directory"
    )
