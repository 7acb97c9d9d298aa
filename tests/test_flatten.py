"""``layerfs export`` (the flattened view as one tar) and ``layerfs extract`` (one file or
subtree into a directory).

Oracle: kernel overlayfs mounted read-only on the same diff dirs (the rich chain of
``fs_helpers``); the tar is extracted as root by GNU tar with every xattr and compared entry by
entry. ``nlink`` is left out of the comparison: the kernel reports a lower file's own link
count (``bin/link-b`` keeps 3 after ``link-a`` is whited out) and a merged directory's 1,
while an extracted tree counts its own names; the hard-link *groups* are compared instead.
"""

from __future__ import annotations

import io
import os
import pty
import shutil
import stat
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

import pytest
from rootless_helpers import RootlessUser, rootless_user  # noqa: F401  (fixture)

from conftest import LayerfsCLI, StorePaths, require_root, require_tool
from fs_helpers import T0, assert_same_tree, kernel_overlay, make_rich_chain, snapshot
from layerfs.archive.compression import open_decompressed
from layerfs.archive.flatten import pax_time, write_view_tar
from layerfs.fs.index import build_index

pytestmark = [pytest.mark.root]


def rich_store(paths: StorePaths, tmp: Path) -> tuple[str, list[str]]:
    """A store whose 3-layer chain holds the rich chain; returns (top id, diff dirs top first)."""
    store = paths.store()
    built = make_rich_chain(tmp / "built")
    parent = None
    ids = []
    for name in ("base", "mid", "top"):
        parent = store.create_layer(names=[name], parent=parent).id
        ids.append(parent)
    dirs = [store.diff_dir(i) for i in reversed(ids)]
    for src, dst in zip(built, dirs, strict=True):
        os.rmdir(dst)
        os.rename(src, dst)
    return ids[-1], dirs


def _untar(tar: Path, dest: Path) -> None:
    require_tool("tar")
    dest.mkdir()
    r = subprocess.run(
        ["tar", "--xattrs", "--xattrs-include=*", "-xpf", str(tar), "-C", str(dest)],
        capture_output=True,
        text=True,
    )
    assert r.returncode == 0, r.stderr


def test_export_is_the_kernel_tree(cli: LayerfsCLI, paths: StorePaths, tmp_path: Path) -> None:
    require_root()
    _top, dirs = rich_store(paths, tmp_path)
    out = tmp_path / "flat.tar"
    cli.run("export", "top", "-o", str(out))
    _untar(out, tmp_path / "x")
    got = snapshot(str(tmp_path / "x"))
    with kernel_overlay(dirs, tmp_path / "k") as k:
        want = snapshot(k)
    assert_same_tree(got, want, ignore=("ino", "nlink"))
    assert len(got) == 45
    # the xattrs really went through (not merely absent on both sides)
    assert got["bin/cap"]["xattrs"].get(b"security.capability")
    assert got["xa"]["xattrs"][b"user.foo"] == b"bar" and got["xa"]["xattrs"][b"trusted.t"]
    assert got["etc"]["xattrs"] == {b"user.dirattr": b"top"}
    assert got["owned"]["mtime"] == -1_000_000_001


def test_tar_entries(paths: StorePaths, cli: LayerfsCLI, tmp_path: Path) -> None:
    """No whiteout or marker entry; hard links as link entries; ns mtimes and xattrs in PAX;
    numeric owners only."""
    require_root()
    _top, _dirs = rich_store(paths, tmp_path)
    data = cli.run("export", "top").stdout
    with tarfile.open(fileobj=io.BytesIO(data)) as tf:
        members = {m.name: m for m in tf.getmembers()}
    assert not [n for n in members if ".wh." in n]
    assert "./etc/gone" not in members and "./olddir/x" not in members
    assert "./opq/lower1" not in members and "./keep/sub/deep/file" not in members
    assert members["./bin/link-c"].islnk() and members["./bin/link-c"].linkname == "./bin/link-b"
    assert members["./bin/l1-b"].linkname == "./bin/l1-a"
    assert members["./bin/link-b"].isreg() and members["./bin/link-b"].size == 6
    assert members["./etc/passwd"].pax_headers["mtime"] == pax_time(T0 + 2)
    assert members["."].isdir()  # (tarfile drops a directory name's trailing "/")
    assert members["./bin/cap"].pax_headers["SCHILY.xattr.security.capability"]
    assert not [m for m in members.values() if m.uname or m.gname]
    assert not [k for m in members.values() for k in m.pax_headers if "overlay" in k]
    assert members["./dev/null"].ischr() and (members["./dev/null"].devmajor, 3) == (1, 3)
    assert members["./dev/initctl"].isfifo()
    assert data.endswith(bytes(1024))


@pytest.mark.parametrize("codec", ["gzip", "zstd", "xz", "bzip2"])
def test_compressed_export(cli: LayerfsCLI, paths: StorePaths, tmp_path: Path, codec: str) -> None:
    require_root()
    rich_store(paths, tmp_path)
    plain = cli.run("export", "top").stdout
    packed = tmp_path / "t"
    cli.run("export", "--compress", codec, "-o", str(packed), "top")
    with open(packed, "rb") as f:
        kind, stream = open_decompressed(f)
        assert kind.name.lower() == codec
        assert stream.read() == plain


def test_pax_time() -> None:
    assert pax_time(0) == "0"
    assert pax_time(1_600_000_000_123_456_789) == "1600000000.123456789"
    assert pax_time(-1_000_000_001) == "-1.000000001"
    assert pax_time(5_000_000_000) == "5"
    assert pax_time(-5) == "-0.000000005"


def test_export_streams(tmp_path: Path) -> None:
    """A 256 MiB file goes through without the tar (or the file) being held in memory."""
    layer = tmp_path / "l"
    layer.mkdir()
    with open(layer / "huge", "wb") as f:
        for i in range(256):
            f.write(bytes([i]) * (1 << 20))
    # VmHWM is this process's own peak (a new mm at exec); ru_maxrss would also count the
    # peak of the pytest process it was forked from, which Linux carries across exec
    code = (
        "import sys\n"
        "from layerfs.fs.index import build_index\n"
        "from layerfs.archive.flatten import write_view_tar\n"
        f"idx = build_index([{str(layer)!r}])\n"
        "with open('/dev/null', 'wb') as out:\n"
        "    print(write_view_tar(out, idx).bytes)\n"
        "status = open('/proc/self/status').read().split('VmHWM:')[1]\n"
        "print(status.split()[0])\n"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    written, maxrss_kib = (int(x) for x in r.stdout.split())
    assert written == 256 << 20
    assert maxrss_kib < 128 * 1024, f"peak RSS {maxrss_kib} KiB for a 256 MiB file"


def test_output_is_atomic(cli: LayerfsCLI, paths: StorePaths, tmp_path: Path) -> None:
    """Disk full on -o: one line, no partial file, the previous file untouched."""
    require_root()
    rich_store(paths, tmp_path)
    small = tmp_path / "small"
    small.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(small)], check=True)
    try:
        (small / "out.tar").write_bytes(b"previous")
        r = cli.run("export", "top", "-o", str(small / "out.tar"), check=False)
        assert r.returncode == 1
        err = r.stderr.decode()
        assert err.startswith("layerfs: ") and err.count("\n") == 1
        assert "No space left on device" in err
        assert sorted(os.listdir(small)) == ["out.tar"]
        assert (small / "out.tar").read_bytes() == b"previous"
    finally:
        subprocess.run(["umount", str(small)], check=True)


def test_output_temp_file_is_not_a_planted_symlink(
    cli: LayerfsCLI, paths: StorePaths, tmp_path: Path
) -> None:
    """-o into a directory others can write (e.g. /tmp): a symlink planted where a fixed temp
    name would be is never followed, and the tar still lands whole at -o."""
    require_root()
    rich_store(paths, tmp_path)
    shared = tmp_path / "shared"
    shared.mkdir(mode=0o1777)
    victim = tmp_path / "victim"
    victim.write_bytes(b"precious")
    for name in (".out.tar.partial", ".out.tar.tmp", "out.tar.partial"):
        os.symlink(victim, shared / name)
    cli.run("export", "top", "-o", str(shared / "out.tar"))
    assert victim.read_bytes() == b"precious"
    with tarfile.open(shared / "out.tar") as tf:
        assert tf.getnames()
    assert sorted(os.listdir(shared)) == sorted(
        ["out.tar", ".out.tar.partial", ".out.tar.tmp", "out.tar.partial"]
    )


def test_refuses_a_terminal(cli: LayerfsCLI, paths: StorePaths, tmp_path: Path) -> None:
    require_root()
    rich_store(paths, tmp_path)
    leader, follower = pty.openpty()
    try:
        r = subprocess.run(cli.argv("export", "top"), stdout=follower, stderr=subprocess.PIPE)
    finally:
        os.close(follower)
        os.close(leader)
    assert r.returncode == 1
    assert r.stderr.decode() == (
        "layerfs: refusing to write a tar stream to a terminal; use --output FILE\n"
    )


def test_unknown_target(cli: LayerfsCLI, tmp_path: Path) -> None:
    r = cli.run("export", "nosuch", "-o", str(tmp_path / "o.tar"), check=False)
    assert r.returncode == 1
    assert r.stderr.decode() == (
        'layerfs: layer "nosuch" not known: no layer or image has this name or id\n'
    )
    assert not (tmp_path / "o.tar").exists() and not (tmp_path / ".o.tar.partial").exists()


# ------------------------------------------------------------------------------ extract


def test_extract_subtree_and_file(cli: LayerfsCLI, paths: StorePaths, tmp_path: Path) -> None:
    require_root()
    _top, dirs = rich_store(paths, tmp_path)
    dest = tmp_path / "dest"
    dest.mkdir()
    cli.run("extract", "top", "/bin", str(dest))
    cli.run("extract", "top", "etc/hosts", str(dest))
    cli.run("extract", "top", "/lnk", str(dest))  # a link stays a link
    with kernel_overlay(dirs, tmp_path / "k") as k:
        want = snapshot(os.path.join(k, "bin"))
        hosts = snapshot(os.path.join(k, "etc", "hosts"))
    assert_same_tree(snapshot(str(dest / "bin")), want, ignore=("ino", "nlink"))
    assert_same_tree(snapshot(str(dest / "hosts")), hosts, ignore=("ino", "nlink"))
    assert os.readlink(dest / "lnk") == "etc/passwd"
    assert os.stat(dest / "bin" / "link-b").st_ino == os.stat(dest / "bin" / "link-c").st_ino
    # the whole view into an empty directory is the kernel's tree
    whole = tmp_path / "whole"
    whole.mkdir()
    cli.run("extract", "top", "/", str(whole))
    with kernel_overlay(dirs, tmp_path / "k") as k:
        full = snapshot(k)
    got = snapshot(str(whole))
    del got[""], full[""]  # DEST keeps its own mode, owner and times
    assert_same_tree(got, full, ignore=("ino", "nlink"))


def test_extract_stays_in_dest(cli: LayerfsCLI, paths: StorePaths, tmp_path: Path) -> None:
    """No escape: not through `..` or links in PATH (resolved in the view), not through
    symlinks already in DEST (replaced, never followed)."""
    require_root()
    rich_store(paths, tmp_path)
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "hosts").write_text("precious\n")
    dest = tmp_path / "dest"
    dest.mkdir()
    os.symlink(str(outside / "hosts"), dest / "hosts")  # a file where a link points out
    os.symlink(str(outside), dest / "etc")  # a directory where a link points out
    cli.run("extract", "top", "/../../../etc/hosts", str(dest))
    cli.run("extract", "top", "/etc", str(dest))
    assert (outside / "hosts").read_text() == "precious\n"
    assert sorted(os.listdir(outside)) == ["hosts"]
    assert not (dest / "hosts").is_symlink() and (dest / "hosts").read_text() == (
        "10.0.0.1 middle\n"
    )
    assert stat.S_ISDIR(os.lstat(dest / "etc").st_mode)
    assert sorted(os.listdir(dest / "etc")) == ["hosts", "passwd"]


def test_extract_errors(cli: LayerfsCLI, paths: StorePaths, tmp_path: Path) -> None:
    require_root()
    rich_store(paths, tmp_path)
    dest = tmp_path / "dest"
    dest.mkdir()
    cases = {
        ("/etc/gone", str(dest)): "layerfs: /etc/gone: No such file or directory (in the view)\n",
        ("/etc/passwd/x", str(dest)): ("layerfs: /etc/passwd/x: Not a directory (in the view)\n"),
        ("/etc", str(tmp_path / "nodir")): f"layerfs: {tmp_path / 'nodir'}: No such file or"
        " directory\n",
        ("/etc", str(dest / "file")): f"layerfs: {dest / 'file'}: not a directory\n",
    }
    (dest / "file").write_text("x")
    for (path, where), message in cases.items():
        r = cli.run("extract", "top", path, where, check=False)
        assert r.returncode == 1, (path, where)
        assert r.stderr.decode() == message
    os.mkdir(dest / "hosts")
    r = cli.run("extract", "top", "/etc/hosts", str(dest), check=False)
    assert r.stderr.decode() == f"layerfs: {dest / 'hosts'}: exists and is a directory\n"
    assert sorted(os.listdir(dest)) == ["file", "hosts"]


def test_export_as_python_tarfile_roundtrip(tmp_path: Path) -> None:
    """Without a store or root features: a plain chain written and read back by tarfile."""
    low = tmp_path / "low"
    (low / "d").mkdir(parents=True)
    (low / "d" / "f").write_bytes(b"hello")
    os.link(low / "d" / "f", low / "d" / "g")
    os.utime(low / "d" / "f", ns=(0, 1_700_000_000_000_000_000))
    up = tmp_path / "up"
    up.mkdir()
    (up / "new").write_bytes(b"n" * 513)
    os.utime(up / "new", ns=(0, -5_000_000_000))  # whole seconds, before 1970
    buf = io.BytesIO()
    stats = write_view_tar(buf, build_index([str(up), str(low)]))
    assert (stats.entries, stats.bytes) == (5, 5 + 513)
    buf.seek(0)
    with tarfile.open(fileobj=buf) as tf:
        names = tf.getnames()
        assert names == [".", "./d", "./d/f", "./d/g", "./new"]
        extracted = tf.extractfile("./new")
        assert extracted is not None and extracted.read() == b"n" * 513
        assert tf.getmember("./new").mtime == -5
        assert "mtime" not in tf.getmember("./d/f").pax_headers  # whole seconds: ustar field


@pytest.mark.parametrize(("wh", "opq"), [("file", "file"), ("char", "user")])
def test_mount_program_format_export(tmp_path: Path, wh: str, opq: str) -> None:
    """A mount-program store (``.wh.`` files, ``.wh..wh..opq``, user.overlay.opaque) exports
    the same tree the kernel shows for the kernel-form chain: no marker gets into the tar."""
    require_root()
    dirs = make_rich_chain(tmp_path / "aufs", wh, opq)
    kdirs = make_rich_chain(tmp_path / "kform")
    tar = tmp_path / "flat.tar"
    with open(tar, "wb") as f:
        write_view_tar(f, build_index(dirs, "aufs"))
    with tarfile.open(tar) as tf:
        assert not [n for n in tf.getnames() if ".wh." in n]
    _untar(tar, tmp_path / "x")
    got = snapshot(str(tmp_path / "x"))
    with kernel_overlay(kdirs, tmp_path / "k") as k:
        want = snapshot(k)
    assert_same_tree(got, want, ignore=("ino", "nlink"))


def test_sockets_are_left_out(tmp_path: Path) -> None:
    import socket

    layer = tmp_path / "l"
    layer.mkdir()
    (layer / "f").write_bytes(b"f")
    sock = socket.socket(socket.AF_UNIX)
    try:
        sock.bind(str(layer / "s"))
        buf = io.BytesIO()
        stats = write_view_tar(buf, build_index([str(layer)]))
    finally:
        sock.close()
    assert (stats.entries, stats.sockets_skipped) == (2, 1)
    buf.seek(0)
    with tarfile.open(fileobj=buf) as tf:
        assert tf.getnames() == [".", "./f"]


def test_extract_as_an_ordinary_user(rootless_user: RootlessUser) -> None:  # noqa: F811
    """Without root: contents, modes, times, symlinks and user.* xattrs are written; owners
    stay the caller's, trusted.* is skipped; a device is a one-line error."""
    u = rootless_user
    base = Path(tempfile.mkdtemp(prefix="lfs-extract-", dir="/var/tmp"))
    try:
        base.chmod(0o755)
        layer = base / "layer"
        layer.mkdir()
        f = layer / "f"
        f.write_bytes(b"data")
        f.chmod(0o644)  # readable by the ordinary user
        os.chown(f, 1234, 1234)
        os.setxattr(f, "user.k", b"v")
        os.setxattr(f, "trusted.t", b"t")
        os.utime(f, ns=(T0, T0))
        os.symlink("f", layer / "l")
        dest = base / "dest"
        dest.mkdir()
        os.chown(dest, u.uid, u.gid)
        repo = Path(__file__).resolve().parent.parent
        code = (
            "import sys\n"
            "from layerfs.fs.index import build_index\n"
            "from layerfs.archive.flatten import extract_path\n"
            "idx = build_index([sys.argv[1]])\n"
            "print(extract_path(idx, sys.argv[2], sys.argv[3]).entries)\n"
        )
        env = {"PYTHONPATH": str(repo)}
        r = u.run(["python", "-c", code, str(layer), "/", str(dest)], env=env)
        assert r.returncode == 0, r.stderr
        assert r.stdout.split() == ["2"]
        st = os.stat(dest / "f")
        assert (st.st_uid, stat.S_IMODE(st.st_mode), st.st_mtime_ns) == (u.uid, 0o644, T0)
        assert (dest / "f").read_bytes() == b"data"
        assert os.getxattr(dest / "f", "user.k") == b"v"
        assert "trusted.t" not in os.listxattr(dest / "f")
        assert os.readlink(dest / "l") == "f"
        os.mknod(layer / "dev", stat.S_IFCHR | 0o600, os.makedev(1, 3))
        r = u.run(["python", "-c", code, str(layer), "/dev", str(dest)], env=env)
        assert r.returncode == 1
        assert r.stderr.strip().endswith(f"{dest / 'dev'}: creating a device needs root")
    finally:
        shutil.rmtree(base, ignore_errors=True)
