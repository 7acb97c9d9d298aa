"""Rootless podman on ``layerfs-overlay`` (issue 11 item 6): a plain user with subuid ranges
runs a container that writes, commits it and runs the committed image, with and without
``--uidmap``, using this checkout's ``layerfs-overlay`` as the overlay driver's mount program;
the same steps with fuse-overlayfs as the mount program are the oracle (outputs, ``podman
diff`` and the committed image's tree listed from inside a container).

Each program gets its own store (``--root``/``--runroot`` in the user's home and runtime dir):
podman refuses to switch a store's mount program. podman starts the mount program inside its
rootless user namespace (root there), so the view has ``allow_other`` and, with ``--uidmap``,
receives ``uidmapping=``/``gidmapping=`` from containers/storage.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest
from idmap_helpers import PODMAN_FLAGS, REPO, RUN_FLAGS, busybox_rootfs_tar
from rootless_helpers import VENV_BIN, RootlessUser, rootless_user  # noqa: F401  (fixture)

from conftest import require

pytestmark = [pytest.mark.root, pytest.mark.fuse, pytest.mark.interop]

WRITE = (
    "set -e; id; echo hi > /tmp/new; mkdir -p /var/lib/daemon/sub; touch /var/lib/daemon/sub/f; "
    "chown 1:1 /tmp/new /var/lib/daemon/sub/f; rm /etc/group; mv /etc/passwd /etc/passwd.old; "
    "echo more >> /var/lib/daemon/state; cat /home/u/notes; rm -r /home/u; mkdir /home/u; "
    "chown 1000:1000 /home/u; " + "{tree}"
)
# /etc/hosts, hostname, resolv.conf: podman's bind mounts, different in every container
TREE = (
    "find /etc /tmp /var /home /bin | grep -v -e /etc/host -e /etc/resolv | sort | "
    "while read p; do stat -c '%n %f %u:%g %s' $p; done"
)
WRITE = WRITE.replace("{tree}", TREE)
READ = f"set -e; id; {TREE}; cat /tmp/new /var/lib/daemon/state"


@pytest.fixture(scope="module")
def wrapper(rootless_user: RootlessUser) -> Iterator[str]:  # noqa: F811
    """``layerfs-overlay`` of this checkout, as a program podman can be pointed at."""
    u = rootless_user
    path = u.home / "bin" / "layerfs-overlay"
    path.parent.mkdir(exist_ok=True)
    path.write_text(
        "#!/bin/sh\n"
        f'echo "$@" >> {u.home}/layerfs-overlay.args\n'
        f"LAYERFS_OVERLAY_LOG={u.home}/layerfs-overlay.log PYTHONPATH={REPO} "
        f'exec {VENV_BIN}/python -m layerfs.fs.mountprog "$@"\n'
    )
    path.chmod(0o755)
    yield str(path)
    path.unlink(missing_ok=True)


@pytest.fixture(scope="module")
def rootfs(rootless_user: RootlessUser) -> Iterator[Path]:  # noqa: F811
    tar = busybox_rootfs_tar(rootless_user.home / "rp-rootfs.tar")
    os.chown(tar, rootless_user.uid, rootless_user.gid)
    yield tar
    tar.unlink(missing_ok=True)


class Podman:
    """The user's podman on a private store with one mount program."""

    def __init__(self, user: RootlessUser, name: str, program: str) -> None:
        self.user = user
        self.root = user.home / f"rp-{name}"
        self.runroot = user.runtime_dir / f"rp-{name}"
        self.program = program

    def __call__(self, *args: str, check: bool = True) -> str:
        argv = [
            "podman",
            *PODMAN_FLAGS,
            "--root",
            str(self.root),
            "--runroot",
            str(self.runroot),
            "--storage-driver",
            "overlay",
            "--storage-opt",
            f"overlay.mount_program={self.program}",
            *args,
        ]
        r = self.user.run(argv, timeout=300)
        if check and r.returncode != 0:
            log = self.user.home / "layerfs-overlay.log"
            tail = log.read_text()[-3000:] if log.exists() else "(no layerfs-overlay log)"
            raise AssertionError(f"{' '.join(args)}: {r.stderr}\n{tail}")
        return r.stdout

    def cleanup(self) -> None:
        self("rm", "-af", check=False)
        self("rmi", "-af", check=False)
        self.user.run(["podman", "unshare", "rm", "-rf", str(self.root), str(self.runroot)])
        shutil.rmtree(self.root, ignore_errors=True)


def _steps(p: Podman, tar: Path, maps: list[str]) -> dict[str, str]:
    """Import, run a writer, diff, commit, run the committed image: every output."""
    out = {}
    p("import", str(tar), "localhost/rp:base")
    out["write"] = p(
        "run", *RUN_FLAGS, *maps, "--name", "w", "localhost/rp:base", "sh", "-c", WRITE
    )
    out["diff"] = "\n".join(sorted(p("diff", "w").splitlines()))  # in the upper dir's order
    p("commit", "w", "localhost/rp:next")
    out["read"] = p("run", "--rm", *RUN_FLAGS, *maps, "localhost/rp:next", "sh", "-c", READ)
    out["read-plain"] = p("run", "--rm", *RUN_FLAGS, "localhost/rp:next", "sh", "-c", READ)
    p("rm", "w")
    return out


@pytest.mark.parametrize(
    "maps",
    [[], ["--uidmap", "0:1:65536", "--gidmap", "0:1:65536"]],
    ids=["default", "uidmap"],
)
def test_run_commit_like_fuse_overlayfs(
    rootless_user: RootlessUser,  # noqa: F811
    wrapper: str,
    rootfs: Path,
    maps: list[str],
) -> None:
    require(shutil.which("fuse-overlayfs") is not None, "fuse-overlayfs not installed")
    u = rootless_user
    log = u.home / "layerfs-overlay.log"
    log.unlink(missing_ok=True)
    args = u.home / "layerfs-overlay.args"
    args.unlink(missing_ok=True)
    results = {}
    for name, program in (("lf", wrapper), ("fo", shutil.which("fuse-overlayfs") or "")):
        p = Podman(u, name, program)
        try:
            results[name] = _steps(p, rootfs, maps)
        finally:
            p.cleanup()
    lf, fo = results["lf"], results["fo"]
    for key in fo:
        assert lf[key] == fo[key], (
            f"{key}:\n--- layerfs-overlay\n{lf[key]}\n--- fuse-overlayfs\n{fo[key]}"
        )
    assert "private" in lf["write"] and "hi" in lf["read"]
    assert log.exists() and "mount live" in log.read_text()  # our program served the mounts
    calls = args.read_text()
    # with --uidmap, containers/storage hands the container's map to the mount program, in
    # the ':'-leading form
    assert ("uidmapping=:0:1:65536" in calls and "gidmapping=:0:1:65536" in calls) == bool(maps)
