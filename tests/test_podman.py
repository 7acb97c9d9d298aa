"""podman runs, writes and commits containers through ``layerfs-overlay`` (its mount program).

Two private podman stores run the same steps on the same Debian minbase image: one with
``overlay.mount_program=layerfs-overlay`` (the code under test), one with podman's native
kernel overlay (the oracle). The containers create, edit, delete and rename files across
layers (a lower directory too), unpack a large tarball, install and remove a ``.deb`` with
dpkg (many small fsynced writes to the dpkg database) and are committed; the committed image
is run again. The committed images' trees are compared entry by entry, each store's layers
mounted by that store's own reader (kernel overlay for the native store, fuse-overlayfs for
the mount-program store, whose ``.wh.`` whiteouts the kernel does not read), and so are the
outputs of the containers.

Flags every podman command here needs on this VM:

- ``--runtime runc``: crun refuses this VM's hybrid cgroup layout ("cgroups in hybrid mode
  not supported"); ``--cgroup-manager cgroupfs``: no systemd session to ask.
- ``--ulimit nofile=1024:1024 --ulimit nproc=1024:1024``: podman's default limits are above
  this VM's hard limits, and the runtime may not raise them (``setrlimit RLIMIT_NOFILE:
  Operation not permitted``).
- ``--network none``: no network for containers here (and none is needed).

The minbase rootfs is built once (``debootstrap --variant=minbase bookworm``, network to
deb.debian.org) into ``$LAYERFS_TEST_CACHE`` (default ``/var/tmp/layerfs-test-cache``) and
reused by later sessions. ``LAYERFS_TEST_MOUNT_PROGRAM`` points the test at another mount
program (``/usr/bin/fuse-overlayfs`` proves the harness itself).
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import os
import shutil
import stat
import subprocess
import sys
import tarfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from conftest import require, require_root, require_tool
from fs_helpers import assert_same_tree, fuse_overlayfs, kernel_overlay, snapshot

pytestmark = [pytest.mark.fuse, pytest.mark.root, pytest.mark.interop]

MODULE_START_NS = time.time_ns() - 10**9  # anything newer was written by this test run
CACHE = Path(os.environ.get("LAYERFS_TEST_CACHE", "/var/tmp/layerfs-test-cache"))
PODMAN_FLAGS = ["--runtime", "runc", "--cgroup-manager", "cgroupfs", "--events-backend", "file"]
RUN_FLAGS = [
    "--network",
    "none",
    "--ulimit",
    "nofile=1024:1024",
    "--ulimit",
    "nproc=1024:1024",
]


def mount_program() -> str:
    """The mount program under test: this virtualenv's ``layerfs-overlay`` unless overridden."""
    path = os.environ.get("LAYERFS_TEST_MOUNT_PROGRAM") or str(
        Path(sys.executable).parent / "layerfs-overlay"
    )
    require(os.access(path, os.X_OK), f"mount program {path} is not installed (scripts/setup)")
    return path


def minbase_tar() -> Path:
    """A tar of a Debian bookworm minbase rootfs, built once into the cache dir."""
    tar = CACHE / "minbase-bookworm.tar"
    if tar.exists():
        return tar
    debootstrap = require_tool("debootstrap")
    CACHE.mkdir(parents=True, exist_ok=True)
    rootfs = CACHE / f"minbase-rootfs.{os.getpid()}"
    shutil.rmtree(rootfs, ignore_errors=True)
    proc = subprocess.run(
        [debootstrap, "--variant=minbase", "bookworm", str(rootfs), "http://deb.debian.org/debian"],
        capture_output=True,
        text=True,
        timeout=1200,
    )
    require(proc.returncode == 0, f"debootstrap failed: {proc.stderr.strip()[-300:]}")
    partial = tar.with_suffix(f".tar.{os.getpid()}")
    tar_flags = ["--numeric-owner", "--xattrs", "--xattrs-include=*"]
    subprocess.run(["tar", *tar_flags, "-C", str(rootfs), "-cf", str(partial), "."], check=True)
    partial.rename(tar)  # atomic: a concurrent session sees a whole tar or none
    shutil.rmtree(rootfs, ignore_errors=True)
    return tar


def big_tarball(path: Path) -> None:
    """A deterministic tree of ~2400 files (small and large, symlinks, hard links)."""
    with tarfile.open(path, "w", format=tarfile.PAX_FORMAT) as tf:
        for d in range(40):
            info = tarfile.TarInfo(f"d{d}")
            info.type, info.mode, info.mtime = tarfile.DIRTYPE, 0o755, 1_650_000_000 + d
            tf.addfile(info)
            for f in range(60):
                data = hashlib.sha256(f"{d}/{f}".encode()).digest() * (1 + (f * 37) % 300)
                info = tarfile.TarInfo(f"d{d}/f{f}")
                info.size, info.mode, info.mtime = len(data), 0o600 + f % 64, 1_650_000_000 + f
                info.uid, info.gid = f % 3, d % 5
                tf.addfile(info, io.BytesIO(data))
            link = tarfile.TarInfo(f"d{d}/link")
            link.type, link.linkname, link.mtime = tarfile.SYMTYPE, "f1", 1_650_000_000
            tf.addfile(link)
            hard = tarfile.TarInfo(f"d{d}/hard")
            hard.type, hard.linkname, hard.mtime = tarfile.LNKTYPE, f"d{d}/f2", 1_650_000_000
            tf.addfile(hard)
        data = bytes(range(256)) * (16 * 4096)  # 16 MiB
        info = tarfile.TarInfo("large.bin")
        info.size, info.mode, info.mtime = len(data), 0o644, 1_650_000_000
        tf.addfile(info, io.BytesIO(data))


def small_deb(work: Path) -> Path:
    """A small package built with dpkg-deb: a script, data files and a conffile."""
    dpkg_deb = require_tool("dpkg-deb")
    src = work / "pkg"
    (src / "DEBIAN").mkdir(parents=True)
    (src / "DEBIAN" / "control").write_text(
        "Package: hello-layerfs\nVersion: 1.0\nArchitecture: all\n"
        "Maintainer: layerfs tests <root@localhost>\nDescription: a package for the tests\n"
    )
    (src / "DEBIAN" / "conffiles").write_text("/etc/hello-layerfs.conf\n")
    (src / "etc").mkdir()
    (src / "etc" / "hello-layerfs.conf").write_text("greeting=hello\n")
    (src / "usr" / "bin").mkdir(parents=True)
    script = src / "usr" / "bin" / "hello-layerfs"
    script.write_text("#!/bin/sh\necho hello from layerfs\n")
    script.chmod(0o755)
    share = src / "usr" / "share" / "hello-layerfs"
    share.mkdir(parents=True)
    for i in range(50):
        (share / f"data{i}").write_text(f"data {i}\n" * (i + 1))
    out = work / "hello-layerfs.deb"
    subprocess.run(
        [dpkg_deb, "--root-owner-group", "-Zxz", "--build", str(src), str(out)],
        check=True,
        capture_output=True,
    )
    return out


# Step 1, on the imported base image: every change lands in container 1's upper dir.
STEP1 = r"""
set -e
echo created > /etc/created.txt
echo edited >> /etc/debian_version
rm /etc/issue.net
rm -r /usr/share/doc/apt
mv /usr/share/man /usr/share/man-renamed
mv /etc/motd /root/motd-moved
chmod 0600 /etc/shells
chown 1:1 /etc/shells
ln -s /etc/created.txt /etc/created.link
ln /etc/created.txt /etc/created.hard
rm -r /usr/share/lintian && mkdir /usr/share/lintian && echo fresh > /usr/share/lintian/new
mkfifo /etc/a-fifo
mkdir /opt/big && tar -xf /in/big.tar -C /opt/big
dpkg -i /in/hello-layerfs.deb
echo "hello-layerfs hold" | dpkg --set-selections
hello-layerfs
cat /etc/created.link
ls /usr/share/man-renamed | head -3
"""

# Step 2, on the committed image of step 1: changes to what step 1 added, and to the base.
STEP2 = r"""
set -e
rm /etc/created.txt
echo more >> /etc/created.hard
rm -r /opt/big/d0
mkdir /opt/big/d0 && echo new > /opt/big/d0/new
mv /usr/share/man-renamed /usr/share/man-again
mv /opt/big/d1 /opt/d1-moved
echo appended >> /opt/big/d2/f3
truncate -s 10 /opt/big/large.bin
echo "hello-layerfs install" | dpkg --set-selections
dpkg -r hello-layerfs
test ! -e /usr/bin/hello-layerfs
cat /etc/created.hard
"""

# Step 3, on the committed image of step 2: read what both commits left.
STEP3 = r"""
set -e
cat /etc/created.hard /etc/debian_version /usr/share/lintian/new /opt/big/d0/new
test ! -e /etc/created.txt && test ! -e /etc/issue.net && test ! -e /usr/share/man
test ! -e /usr/share/man-renamed && test ! -e /usr/share/doc/apt && test ! -e /opt/big/d1
ls /usr/share/man-again | head -3
ls /opt/big/d0 /opt/d1-moved | head -5
stat -c '%A %U %G %s %N' /etc/shells /etc/created.link /etc/a-fifo
dpkg -l hello-layerfs | tail -1
cat /etc/hello-layerfs.conf
wc -c /opt/big/large.bin
"""


@dataclass
class Podman:
    """One private podman store (root, runroot and tmp dirs under ``base``)."""

    base: Path
    mount_program: str | None
    env: dict[str, str] = field(default_factory=dict)

    def argv(self, *args: str) -> list[str]:
        opts = ["--storage-driver", "overlay"]
        if self.mount_program:
            opts += ["--storage-opt", f"overlay.mount_program={self.mount_program}"]
        return [
            "podman",
            "--root",
            str(self.base / "root"),
            "--runroot",
            str(self.base / "run"),
            "--tmpdir",
            str(self.base / "tmp"),
            *opts,
            *PODMAN_FLAGS,
            *args,
        ]

    def run(self, *args: str, timeout: float = 600) -> str:
        proc = subprocess.run(
            self.argv(*args), capture_output=True, text=True, timeout=timeout, env=self.env
        )
        assert proc.returncode == 0, (
            f"podman {' '.join(args[:3])}... ({self.mount_program or 'kernel overlay'}) failed "
            f"rc={proc.returncode}: {proc.stderr.strip()[-2000:]}"
        )
        return proc.stdout

    def chain(self, name: str) -> list[str]:
        """The layer diff dirs of an image or a container, top first."""
        kind = "container" if name.startswith("c") else "image"
        upper = self.run(kind, "inspect", "--format", "{{.GraphDriver.Data.UpperDir}}", name)
        lower = self.run(kind, "inspect", "--format", "{{.GraphDriver.Data.LowerDir}}", name)
        lowers = [d for d in lower.strip().split(":") if d and d != "<no value>"]
        return [upper.strip(), *lowers]

    def close(self) -> None:
        subprocess.run(self.argv("rm", "--all", "--force"), capture_output=True, env=self.env)
        subprocess.run(self.argv("system", "reset", "--force"), capture_output=True, env=self.env)
        with open("/proc/self/mounts") as f:
            points = [line.split()[1] for line in f]
        for point in sorted((p for p in points if p.startswith(str(self.base))), reverse=True):
            subprocess.run(["umount", "-l", point], capture_output=True)


@dataclass
class Outcome:
    """What one store made of the steps: the containers' outputs, and the layer chains (diff
    dirs, top first) of the images and of the stopped containers (their upper dir first)."""

    podman: Podman
    outputs: list[str]
    chains: dict[str, list[str]]


def _steps(podman: Podman, tar: Path, inputs: Path) -> Outcome:
    podman.run("import", str(tar), "minbase")
    run = ["run", *RUN_FLAGS, "-v", f"{inputs}:/in:ro"]
    outputs = [podman.run(*run, "--name", "c1", "minbase", "sh", "-c", STEP1)]
    podman.run("commit", "--quiet", "c1", "step1")
    outputs.append(podman.run(*run, "--name", "c2", "step1", "sh", "-c", STEP2))
    podman.run("commit", "--quiet", "c2", "step2")
    outputs.append(podman.run(*run, "--rm", "step2", "sh", "-c", STEP3))
    chains = {name: podman.chain(name) for name in ("minbase", "step1", "step2", "c1", "c2")}
    return Outcome(podman, outputs, chains)


@pytest.fixture(scope="module")
def stores(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Outcome]]:
    """The same steps on three stores: ``ours`` (layerfs-overlay), ``fuse`` (fuse-overlayfs,
    the reference mount program: podman's commit of a mount-program store goes through the
    same Go code for both) and ``kernel`` (native kernel overlay, the oracle of what the
    containers wrote)."""
    require_root()
    require_tool("podman")
    require_tool("runc")
    program = mount_program()
    reference = require_tool("fuse-overlayfs")
    tar = minbase_tar()
    base = tmp_path_factory.mktemp("podman")
    inputs = base / "in"
    inputs.mkdir()
    big_tarball(inputs / "big.tar")
    shutil.copy(small_deb(base), inputs / "hello-layerfs.deb")
    stores: dict[str, Podman] = {}
    for name, prog in (("ours", program), ("fuse", reference), ("kernel", None)):
        conf = base / f"{name}-storage.conf"
        # podman reads this before its flags: keep the host's storage.conf out of the test
        conf.write_text(
            f'[storage]\ndriver = "overlay"\nrunroot = "{base}/{name}/run"\n'
            f'graphroot = "{base}/{name}/root"\n'
        )
        env = dict(os.environ, CONTAINERS_STORAGE_CONF=str(conf), CONTAINERS_CONF="/dev/null")
        stores[name] = Podman(base / name, prog, env)
    try:
        yield {name: _steps(podman, tar, inputs) for name, podman in stores.items()}
    finally:
        for podman in stores.values():
            podman.close()


@contextlib.contextmanager
def _tree(outcome: Outcome, name: str, mnt: Path) -> Iterator[dict[str, dict[str, Any]]]:
    """An image's or a stopped container's tree as the store's own reader shows it: kernel
    overlay for the native store, fuse-overlayfs for a mount-program store (whose ``.wh.``
    whiteouts the kernel does not read)."""
    chain = outcome.chains[name]
    reader = fuse_overlayfs if outcome.podman.mount_program else kernel_overlay
    with reader(chain, mnt) as path:
        yield snapshot(path)


def _same_times_where_deterministic(
    got: dict[str, dict[str, Any]], want: dict[str, dict[str, Any]]
) -> None:
    """Keep mtimes only where both are older than the test run (kept from the base image or
    the tarball, through copy-up and rename); newer ones are the clock's. A file the oracle
    changed must be newer on our side too. A directory's mtime also depends on which parent
    directories a commit writes into the layer, so it is kept only when both sides kept the
    old time."""
    since = MODULE_START_NS
    for path, record in want.items():
        if path not in got:
            continue
        new = record["mtime"] >= since
        if new and record["type"] != stat.S_IFDIR:
            assert got[path]["mtime"] >= since, f"{path}: mtime went back in time"
        if new or (record["type"] == stat.S_IFDIR and got[path]["mtime"] >= since):
            got[path]["mtime"] = record["mtime"] = None


CLOCK_FILES = ("var/log/dpkg.log",)  # dpkg writes the time into it
COMMIT_QUIRK = "usr/share/lintian"
"""Made again over its deleted self in step 1 (an opaque dir): podman's commit of a
mount-program store drops the opacity (its apply of ``.wh..wh..opq`` into a ``.wh.``-format
layer removes what the new layer holds, marks nothing), so the step1 image differs from the
kernel store's there, whichever mount program wrote the container."""


def _comparable(snap: dict[str, dict[str, Any]], drop: str | None = None) -> None:
    for path in CLOCK_FILES:
        if path in snap:
            snap[path]["data"] = None
    if drop is not None:
        for path in [p for p in snap if p == drop or p.startswith(drop + "/")]:
            del snap[path]


@pytest.mark.parametrize("container", ["c1", "c2"])
def test_container_writes_match_kernel_overlay(
    stores: dict[str, Outcome], container: str, tmp_path: Path
) -> None:
    """What each container wrote through layerfs-overlay (its upper dir over its image) is
    the tree the same container wrote through kernel overlay (for c2, whose image is a
    commit, but for :data:`COMMIT_QUIRK`)."""
    with (
        _tree(stores["ours"], container, tmp_path / "ours") as got,
        _tree(stores["kernel"], container, tmp_path / "kernel") as want,
    ):
        pass
    drop = COMMIT_QUIRK if container == "c2" else None
    _comparable(got, drop)
    _comparable(want, drop)
    _same_times_where_deterministic(got, want)
    # fuse-overlayfs, our reader here, reports every directory with one link
    assert_same_tree(got, want, ignore=("root_mtime",), dir_nlink=False)
    assert stat.S_ISFIFO(got["etc/a-fifo"]["type"])
    assert "usr/share/man" not in got


@pytest.mark.parametrize("image", ["step1", "step2"])
def test_committed_images_match_fuse_overlayfs(
    stores: dict[str, Outcome], image: str, tmp_path: Path
) -> None:
    """podman's commit of a mount-program store makes the same images from layerfs-overlay's
    upper dirs as from fuse-overlayfs's (kernel overlay is no oracle here: that commit path
    drops the opacity of a directory made again over a deleted one, for either program)."""
    with (
        _tree(stores["ours"], image, tmp_path / "ours") as got,
        _tree(stores["fuse"], image, tmp_path / "fuse") as want,
    ):
        pass
    _comparable(got)
    _comparable(want)
    _same_times_where_deterministic(got, want)
    assert_same_tree(got, want, ignore=("root_mtime",))


def test_containers_print_the_same(stores: dict[str, Outcome]) -> None:
    """Every container, the last one run on the twice-committed image, prints on
    layerfs-overlay what it prints on fuse-overlayfs; those that read no re-made directory
    print what they print on kernel overlay."""
    ours, fuse, kernel = stores["ours"], stores["fuse"], stores["kernel"]
    assert ours.outputs == fuse.outputs
    assert ours.outputs[:2] == kernel.outputs[:2]
    assert "hello from layerfs" in ours.outputs[0]
    assert "rc  hello-layerfs" in ours.outputs[2]  # removed, its conffile kept
