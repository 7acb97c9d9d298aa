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

from conftest import GO_TOOL, LayerfsCLI, StorePaths, require, require_root, require_tool
from fs_helpers import assert_same_tree, kernel_overlay, snapshot

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

    def go_diff(self, layer: str) -> bytes:
        """The layer as an OCI tar, exported by containers-storage (podman's own code) on this
        store with this store's options."""
        argv = [GO_TOOL, "-g", str(self.base / "root"), "-R", str(self.base / "run")]
        argv += ["-s", "overlay"]
        if self.mount_program:
            argv += ["--storage-opt", f"overlay.mount_program={self.mount_program}"]
        proc = subprocess.run([*argv, "diff", layer], capture_output=True, timeout=600)
        assert proc.returncode == 0, proc.stderr.decode(errors="replace")
        return proc.stdout

    def close(self) -> None:
        subprocess.run(self.argv("rm", "--all", "--force"), capture_output=True, env=self.env)
        subprocess.run(self.argv("system", "reset", "--force"), capture_output=True, env=self.env)
        with open("/proc/self/mounts") as f:
            points = [line.split()[1] for line in f]
        for point in sorted((p for p in points if p.startswith(str(self.base))), reverse=True):
            subprocess.run(["umount", "-l", point], capture_output=True)


@dataclass
class Outcome:
    """What one store made of the steps: the containers' outputs, and the layer diff dirs
    (top first) of the images and of the stopped containers (their upper dir first)."""

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


PARENTS = {"step1": "minbase", "c1": "minbase", "step2": "step1", "c2": "step1"}
"""Each written layer (a commit's top layer, a stopped container's own layer) and the image
it was made on."""


def _canonical(outcomes: dict[str, Outcome], tar: Path, cli: LayerfsCLI) -> None:
    """Every written layer of each store, exported by containers-storage's ``diff`` (the
    code podman's commit runs) and imported on the same parents into one kernel-format
    layerfs store as ``<store>-<layer>``: the trees can then be read by kernel overlay alone,
    whatever whiteout format each podman store keeps."""
    cli.run("import-layer", "--name", "minbase", input=tar.read_bytes(), timeout=600)
    for name, outcome in outcomes.items():
        for layer, parent in PARENTS.items():
            layer_id = Path(outcome.chains[layer][0]).parent.name
            data = outcome.podman.go_diff(layer_id)
            under = "minbase" if parent == "minbase" else f"{name}-{parent}"
            cli.run("import-layer", "--name", f"{name}-{layer}", "--parent", under, input=data)


@dataclass
class Stores:
    outcomes: dict[str, Outcome]
    canonical: StorePaths


@pytest.fixture(scope="module")
def stores(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stores]:
    """The same steps on two podman stores, ``ours`` (layerfs-overlay) and ``kernel``
    (native kernel overlay, the oracle), and their written layers in one canonical store."""
    require_root()
    require_tool("podman")
    require_tool("runc")
    require_tool(GO_TOOL)
    program = mount_program()
    tar = minbase_tar()
    base = tmp_path_factory.mktemp("podman")
    inputs = base / "in"
    inputs.mkdir()
    big_tarball(inputs / "big.tar")
    shutil.copy(small_deb(base), inputs / "hello-layerfs.deb")
    podmans: dict[str, Podman] = {}
    for name, prog in (("ours", program), ("kernel", None)):
        conf = base / f"{name}-storage.conf"
        # podman reads this before its flags: keep the host's storage.conf out of the test
        conf.write_text(
            f'[storage]\ndriver = "overlay"\nrunroot = "{base}/{name}/run"\n'
            f'graphroot = "{base}/{name}/root"\n'
        )
        env = dict(os.environ, CONTAINERS_STORAGE_CONF=str(conf), CONTAINERS_CONF="/dev/null")
        podmans[name] = Podman(base / name, prog, env)
    canonical = StorePaths(str(base / "canonical" / "root"), str(base / "canonical" / "run"))
    try:
        outcomes = {name: _steps(podman, tar, inputs) for name, podman in podmans.items()}
        _canonical(outcomes, tar, LayerfsCLI(canonical))
        yield Stores(outcomes, canonical)
    finally:
        for podman in podmans.values():
            podman.close()
        with open("/proc/self/mounts") as f:
            points = [line.split()[1] for line in f]
        for point in sorted((p for p in points if p.startswith(str(base))), reverse=True):
            subprocess.run(["umount", "-l", point], capture_output=True)


CLOCK_FILES = ("var/log/dpkg.log",)  # dpkg writes the time into it


def _tree(stores: Stores, name: str, mnt: Path) -> dict[str, dict[str, Any]]:
    """The tree of a written layer over its image, read by kernel overlay from the canonical
    store; file contents the clock writes are left out."""
    store = stores.canonical.store()
    with kernel_overlay([store.diff_dir(la.id) for la in store.chain(name)], mnt) as path:
        snap = snapshot(path)
    for clocked in CLOCK_FILES:
        if clocked in snap:
            snap[clocked]["data"] = None
    return snap


def _same_times_where_deterministic(
    got: dict[str, dict[str, Any]], want: dict[str, dict[str, Any]]
) -> None:
    """Keep mtimes only where the oracle's is older than the test run (kept from the base
    image or the tarball, through copy-up and rename); newer ones are the clock's, and ours
    must then be newer too, but for directories: containers-storage exports a mount-program
    store's layer with its naive differ, which leaves out a directory whose only change is
    its mtime (moby's rule: a directory's mtime is no measure of change)."""
    for path, record in want.items():
        if path in got and record["mtime"] >= MODULE_START_NS:
            if record["type"] != stat.S_IFDIR:
                assert got[path]["mtime"] >= MODULE_START_NS, f"{path}: mtime went back in time"
            got[path]["mtime"] = record["mtime"] = None


@pytest.mark.parametrize("layer", ["c1", "step1", "c2", "step2"])
def test_written_layers_match_kernel_overlay(stores: Stores, layer: str, tmp_path: Path) -> None:
    """What each container wrote through layerfs-overlay (its own layer), and each image
    podman committed from it, is what the same steps give on native kernel overlay: type,
    mode, owner, size, content, symlink target, rdev, xattrs, hard-link groups, whiteouts
    and opaque directories (as the entries they hide), old mtimes kept."""
    got = _tree(stores, f"ours-{layer}", tmp_path / "ours")
    want = _tree(stores, f"kernel-{layer}", tmp_path / "kernel")
    _same_times_where_deterministic(got, want)
    # directory link counts are the kernel's view of how a layer is encoded, not content:
    # overlayfs reports one link for a merged directory, and the naive differ exports a
    # directory made again over a deleted one as the directory plus a whiteout per hidden
    # entry (merged) where the kernel store's export has an opaque marker (not merged), and
    # leaves out a directory whose only change is its mtime (then merged on the other side)
    assert_same_tree(got, want, ignore=("root_mtime",), dir_nlink=False)
    assert stat.S_ISFIFO(got["etc/a-fifo"]["type"])
    moved = "usr/share/man-renamed" if layer in ("c1", "step1") else "usr/share/man-again"
    assert "usr/share/man" not in got and f"{moved}/de" in got  # a lower dir renamed


def test_containers_print_the_same(stores: Stores) -> None:
    """Every container, the last one run on the twice-committed image, prints on
    layerfs-overlay what it prints on kernel overlay."""
    ours, kernel = stores.outcomes["ours"], stores.outcomes["kernel"]
    assert ours.outputs == kernel.outputs
    assert "hello from layerfs" in ours.outputs[0]
    assert "rc  hello-layerfs" in ours.outputs[2]  # removed, its conffile kept


def test_image_mount_through_layerfs_overlay(stores: Stores, tmp_path: Path) -> None:
    """``podman image mount`` runs the mount program read-only (``lowerdir=TOP:...`` only):
    the view shows what kernel overlay shows of the same image, canonicalised."""
    ours = stores.outcomes["ours"].podman
    path = ours.run("image", "mount", "step2").strip()
    try:
        with open("/proc/self/mountinfo") as f:
            fstype = next(ln.split(" - ")[1].split()[0] for ln in f if ln.split()[4] == path)
        assert fstype.startswith("fuse")
        got = snapshot(path)
    finally:
        ours.run("image", "unmount", "step2")
    for clocked in CLOCK_FILES:
        got[clocked]["data"] = None
    want = _tree(stores, "ours-step2", tmp_path / "canonical")
    # the canonical copy went through a layer tar (whole-second mtimes) and the naive
    # differ (directories whose only change is their mtime left out)
    for snap in (got, want):
        for record in snap.values():
            record["mtime"] = None if record["type"] == stat.S_IFDIR else record["mtime"] // 10**9
    assert_same_tree(got, want, ignore=("root_mtime",), dir_nlink=False)
