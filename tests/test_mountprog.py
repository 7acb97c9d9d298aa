"""``layerfs-overlay``, the mount program: every command-line form containers/storage and
mount.fuse3 use (issue 10 item 3), each mounted for real and checked against kernel overlayfs
on the same dirs; the refusals and bad dirs with their one-line errors."""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from conftest import require, wait_until
from fs_helpers import Layer, assert_same_tree, kernel_overlay, require_fuse, snapshot
from layerfs.fs.mount import daemon_pid_alive, detach, find_mount_process, is_mountpoint
from layerfs.fs.mountprog import UsageError, parse

PROG = os.path.join(os.path.dirname(sys.executable), "layerfs-overlay")
SYSTEM_PATH = "/usr/local/bin:/usr/bin:/bin"


def _store(base: Path) -> dict[str, str]:
    """A c/storage-like layout: two layers with ``l/`` symlinks to their diff dirs, and a
    container's empty diff and work dirs."""
    Layer(base / "p1" / "diff").file("etc/os", b"base\n").file("bin/sh", b"#!", mode=0o755).dir(
        "var/lib"
    ).finish()
    top = Layer(base / "p2" / "diff")
    top.file("etc/os", b"top\n").file("etc/new", b"n").whiteout("bin/sh").finish()
    (base / "l").mkdir()
    os.symlink("../p1/diff", base / "l" / "AAA")
    os.symlink("../p2/diff", base / "l" / "BBB")
    for d in ("ctr/diff", "ctr/work", "ctr/merged", "p2/merged"):
        (base / d).mkdir(parents=True)
    return {
        "lower": f"{base}/l/BBB:{base}/l/AAA",
        "upper": f"{base}/ctr/diff",
        "work": f"{base}/ctr/work",
        "merged": f"{base}/ctr/merged",
    }


def _run(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(list(args), capture_output=True, text=True, env=env, timeout=120)


def _unmount_and_wait(mnt: str) -> None:
    pid = find_mount_process(mnt, b"layerfs-overlay")
    assert subprocess.run(["umount", mnt]).returncode == 0
    if pid is not None:
        wait_until(lambda: not daemon_pid_alive(pid), f"layerfs-overlay {pid} exits", 30)


@pytest.fixture
def store(tmp_path: Path) -> Iterator[dict[str, str]]:
    require_fuse()
    s = _store(tmp_path)
    yield s
    for m in (s["merged"], str(tmp_path / "p2" / "merged")):
        if is_mountpoint(m):
            detach(m)


def _kernel_view(lowers: list[str], tmp: Path) -> dict[str, dict[str, object]]:
    with kernel_overlay([os.path.realpath(d) for d in lowers], tmp / "oracle") as m:
        return snapshot(m)


def test_container_form_with_trailing_comma(store: dict[str, str], tmp_path: Path) -> None:
    opts = f"lowerdir={store['lower']},upperdir={store['upper']},workdir={store['work']},"
    r = _run(PROG, "-o", opts, store["merged"])
    assert r.returncode == 0, r.stderr
    assert r.stderr == ""
    m = store["merged"]
    assert is_mountpoint(m)
    lowers = store["lower"].split(":")
    assert_same_tree(snapshot(m), _kernel_view(lowers, tmp_path), ignore=("mtime",))
    data = os.urandom(3 << 20)
    with open(f"{m}/etc/os", "ab") as f:
        f.write(data)
    os.unlink(f"{m}/etc/new")
    _unmount_and_wait(m)
    with open(f"{store['upper']}/etc/os", "rb") as f:
        assert hashlib.sha256(f.read()).digest() == hashlib.sha256(b"top\n" + data).digest()
    # the upper dir is what fuse-overlayfs would have written: kernel overlay agrees
    with kernel_overlay([store["upper"], *[os.path.realpath(d) for d in lowers]], tmp_path / "k"):
        assert not os.path.lexists(tmp_path / "k" / "etc" / "new")
        assert (tmp_path / "k" / "etc" / "os").read_bytes() == b"top\n" + data


def test_image_form_is_read_only(store: dict[str, str], tmp_path: Path) -> None:
    top = os.path.dirname(store["merged"]).replace("ctr", "p2")
    lowers = [f"{top}/diff", store["lower"].split(":")[1]]
    r = _run(PROG, "-o", "lowerdir=" + ":".join(lowers), f"{top}/merged")
    assert r.returncode == 0, r.stderr
    assert_same_tree(snapshot(f"{top}/merged"), _kernel_view(lowers, tmp_path), ignore=("mtime",))
    with pytest.raises(OSError) as e:
        open(f"{top}/merged/etc/x", "w")
    assert e.value.strerror == "Read-only file system"
    _unmount_and_wait(f"{top}/merged")


def test_mount_fuse3_form(store: dict[str, str], tmp_path: Path) -> None:
    """``mount -t fuse.layerfs-overlay``: mount.fuse3 finds the program on the system PATH and
    passes ``PROG PROG MNT -o rw,...,dev,suid`` (options it does not know are ignored)."""
    require(
        shutil.which("layerfs-overlay", path=SYSTEM_PATH) is not None,
        "layerfs-overlay is not linked into /usr/local/bin (scripts/setup does it)",
    )
    require(shutil.which("mount.fuse3") is not None, "mount.fuse3 missing")
    opts = (
        f"rw,lowerdir={store['lower']},upperdir={store['upper']},workdir={store['work']},"
        "dev,suid,noatime,context=system_u:object_r:container_file_t:s0"
    )
    r = _run("mount", "-t", "fuse.layerfs-overlay", "layerfs-overlay", store["merged"], "-o", opts)
    assert r.returncode == 0, r.stderr
    m = store["merged"]
    os.mknod(f"{m}/null", 0o20666, os.makedev(1, 3))  # dev: the device works
    with open(f"{m}/null", "rb") as f:
        assert f.read() == b""
    with open("/proc/self/mountinfo") as f:
        line = next(ln for ln in f if f" {m} " in ln)
    assert "nodev" not in line.split()[5] and "nosuid" not in line.split()[5]
    _unmount_and_wait(m)
    assert os.path.exists(f"{store['upper']}/null")


def test_bad_uidmapping_one_line(store: dict[str, str]) -> None:
    """Mappings are accepted (tests/test_idmap.py); a garbled one is one line, no mount."""
    opts = (
        f"lowerdir={store['lower']},upperdir={store['upper']},workdir={store['work']},,"
        "uidmapping=:0:1,gidmapping=:0:1:65536"
    )
    r = _run(PROG, "-o", opts, store["merged"])
    assert r.returncode != 0
    assert r.stderr.strip().splitlines() == [
        "layerfs-overlay: uidmapping=:0:1: fields must come in STORED:SHOWN:LEN triples"
    ]
    assert not is_mountpoint(store["merged"])


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ("lowerdir=/nonexistent/l", "lowerdir /nonexistent/l: No such file or directory"),
        ("upperdir=/nonexistent/u", "upperdir /nonexistent/u: No such file or directory"),
        ("workdir=/nonexistent/w", "workdir /nonexistent/w: No such file or directory"),
        ("workdir=", "no workdir specified"),
        ("lowerdir=", "no lowerdir specified"),
    ],
)
def test_bad_dirs_one_line(store: dict[str, str], change: str, message: str) -> None:
    opts = {"lowerdir": store["lower"], "upperdir": store["upper"], "workdir": store["work"]}
    key, _, value = change.partition("=")
    opts[key] = value
    if not value:
        del opts[key]
        if key == "lowerdir":
            del opts["upperdir"], opts["workdir"]
    text = ",".join(f"{k}={v}" for k, v in opts.items())
    r = _run(PROG, "-o", text, store["merged"])
    assert r.returncode != 0
    assert r.stderr.strip().splitlines() == [f"layerfs-overlay: {message}"]
    assert not is_mountpoint(store["merged"])


def test_missing_mountpoint(store: dict[str, str]) -> None:
    r = _run(PROG, "-o", f"lowerdir={store['lower']}", "/nonexistent/mnt")
    assert r.stderr.strip().splitlines() == [
        "layerfs-overlay: mount point /nonexistent/mnt: No such file or directory"
    ]
    assert r.returncode != 0


def test_parse_forms() -> None:
    """The parser alone: the forms above, several -o, -oOPTS, and what is ignored."""
    a = parse(["-o", "lowerdir=A:B,upperdir=U,workdir=W,", "M"])
    assert (a.lowers, a.upper, a.work, a.mountpoint, a.dev) == (["A", "B"], "U", "W", "M", False)
    a = parse(["layerfs-overlay", "M", "-o", "rw,lowerdir=A,dev,suid,context=x:y", "-onoatime"])
    assert (a.lowers, a.mountpoint, a.dev, a.suid) == (["A"], "M", True, True)
    assert a.ignored == ["rw", "context=x:y", "noatime"]
    a = parse(["-o", "lowerdir=A,gidmapping=0:1:2,squash_to_root", "M"])
    assert a.id_options == ["gidmapping=0:1:2", "squash_to_root"]
    with pytest.raises(UsageError, match="too many arguments"):
        parse(["a", "b", "c"])
