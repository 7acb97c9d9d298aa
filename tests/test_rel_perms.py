"""Permissions of a browse mount, checked as an unprivileged user (setpriv to nobody).

- Without ``--allow-other`` a root-made view is closed to every other user (FUSE's own rule).
- With ``--allow-other`` the kernel enforces file modes (``default_permissions``): a 0600
  root file stays unreadable to nobody, a 0644 one is readable.
- Browse mounts carry ``nosuid,nodev``: a setuid-root copy of ``id`` keeps its S_ISUID bit
  in ``st_mode`` but runs without privilege, and a device node cannot be opened.
(``--allow-other`` needs ``user_allow_other`` in /etc/fuse.conf only for non-root mounters.)
"""

from __future__ import annotations

import io
import os
import shutil
import stat
import subprocess
import tarfile
import tempfile
from collections.abc import Iterator

import pytest

from conftest import LayerfsCLI, require_root, require_tool
from rel_helpers import daemon_pids, mounts_below, wait_gone

pytestmark = [pytest.mark.fuse, pytest.mark.root]

NOBODY = ["--reuid=65534", "--regid=65534", "--clear-groups"]


def _layer_tar() -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tf:

        def add(name: str, data: bytes, mode: int, kind: bytes = tarfile.REGTYPE) -> None:
            info = tarfile.TarInfo(name)
            info.mode, info.type, info.mtime = mode, kind, 1_700_000_000
            if kind == tarfile.CHRTYPE:
                info.devmajor, info.devminor = 1, 3
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data) if data else None)

        add("secret", b"root only\n", 0o600)
        add("public", b"for everyone\n", 0o644)
        with open(shutil.which("id") or "/usr/bin/id", "rb") as f:
            add("suid-id", f.read(), 0o4755)
        add("null", b"", 0o666, tarfile.CHRTYPE)
    return buf.getvalue()


def _as_nobody(*argv: str) -> subprocess.CompletedProcess[str]:
    setpriv = require_tool("setpriv")
    return subprocess.run([setpriv, *NOBODY, *argv], capture_output=True, text=True, timeout=60)


@pytest.fixture
def world_dir() -> Iterator[str]:
    """A directory nobody can traverse (pytest's tmp dirs are 0700)."""
    d = tempfile.mkdtemp(prefix="layerfs-perm-")
    os.chmod(d, 0o755)
    yield d
    for point in sorted(mounts_below(d), reverse=True):
        subprocess.run(["umount", "-l", point], check=False)
    shutil.rmtree(d, ignore_errors=True)


def _options(path: str) -> set[str]:
    with open("/proc/self/mountinfo") as f:
        for line in f:
            fields = line.split()
            if fields[4] == path:
                sep = fields.index("-")
                return set(fields[5].split(",")) | set(fields[sep + 3].split(","))
    raise AssertionError(f"{path} not in mountinfo")


def test_browse_mount_permissions_for_other_users(cli: LayerfsCLI, world_dir: str) -> None:
    require_root()
    require_tool("fusermount3")
    cli.run("import-layer", "--name", "perm", input=_layer_tar())
    mnt = os.path.join(world_dir, "view")
    os.mkdir(mnt, 0o755)
    public = os.path.join(mnt, "public")

    cli.out("mount", "perm", mnt)
    try:
        proc = _as_nobody("ls", mnt)
        assert proc.returncode != 0 and "Permission denied" in proc.stderr, proc
        proc = _as_nobody("cat", public)
        assert proc.returncode != 0 and "Permission denied" in proc.stderr, proc
        assert open(public).read() == "for everyone\n"  # the mounter itself can read
    finally:
        cli.run("unmount", mnt)

    cli.out("mount", "--allow-other", "perm", mnt)
    try:
        opts = _options(mnt)
        assert {"nosuid", "nodev", "allow_other", "default_permissions"} <= opts, opts
        proc = _as_nobody("cat", public)
        assert proc.returncode == 0 and proc.stdout == "for everyone\n", proc
        proc = _as_nobody("cat", os.path.join(mnt, "secret"))
        assert proc.returncode != 0 and "Permission denied" in proc.stderr, proc
        assert open(os.path.join(mnt, "secret")).read() == "root only\n"
        suid = os.path.join(mnt, "suid-id")
        st = os.stat(suid)
        assert st.st_mode & stat.S_ISUID and st.st_uid == 0
        proc = _as_nobody(suid, "-u")
        assert proc.returncode == 0 and proc.stdout.strip() == "65534", proc  # no elevation
        with pytest.raises(PermissionError):  # nodev: even root cannot open the device
            open(os.path.join(mnt, "null"), "rb")
    finally:
        cli.run("unmount", mnt)
    pids = daemon_pids(mnt)
    assert all(wait_gone(p) for p in pids)
    assert not mounts_below(world_dir)
