"""Import without root (issue 11 item 3; table rows 1, 2, 3, 8): a plain user's
``import-layer``/``import-image`` into their own store, in the rootless namespace layerfs
enters and, with ``LAYERFS_USERNS=host``, outside any namespace; device nodes, unmapped ids,
``ignore_chown_errors`` and ``force_mask`` with ``user.containers.override_stat``. The real
``containers-storage``, run by the user inside ``podman unshare`` on the same store, is the
oracle: it must read what we write, byte for byte."""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path

import pytest
from rootless_helpers import (  # noqa: F401  (fixture)
    RootlessUser,
    fresh_user,
    reset_user,
    rootless_user,
)
from rootless_helpers import ok as _ok

from archive_helpers import E, build_tar
from conftest import require_tool
from layerfs import overridestat
from layerfs.overridestat import OverrideStat, format_override, parse_override

HOST = {"LAYERFS_USERNS": "host"}


def _put(user: RootlessUser, name: str, data: bytes) -> str:
    path = user.home / name
    path.write_bytes(data)
    os.chown(path, user.uid, user.gid)
    return str(path)


def _store(user: RootlessUser) -> Path:
    return user.home / ".local/share/layerfs"


def _layers(user: RootlessUser, env: dict[str, str] | None = None) -> list[str]:
    return [x["id"] for x in json.loads(_ok(user, "layerfs", "layers", "--json", env=env))]


OWN_TREE = [
    E("d/", "dir", mode=0o555),
    E("d/sub/", "dir", mode=0o500),
    E("d/sub/f", data=b"deep\n", mode=0o444),
    E("top", data=b"top\n"),
]


def test_own_files_default_store_in_the_namespace(user: RootlessUser) -> None:
    """Row 1: the layer's diff/ is 0555 and so are its directories: the import still works,
    and every directory gets its mode back afterwards."""
    tar = _put(user, "own.tar", build_tar(OWN_TREE))
    layer = _ok(user, "layerfs", "import-layer", tar).split()[0]
    diff = _store(user) / "overlay" / layer / "diff"
    assert stat.S_IMODE(diff.stat().st_mode) == 0o555
    assert stat.S_IMODE((diff / "d").stat().st_mode) == 0o555
    assert stat.S_IMODE((diff / "d/sub").stat().st_mode) == 0o500
    assert (diff / "d/sub/f").read_bytes() == b"deep\n"
    # container uid 0 is the user on disk (the namespace maps it so)
    assert (diff / "top").stat().st_uid == user.uid
    assert _ok(user, "layerfs", "cat", layer, "/d/sub/f") == "deep\n"


def test_own_files_outside_any_namespace(user: RootlessUser) -> None:
    """Row 1 with LAYERFS_USERNS=host: the user's own ids need no namespace either."""
    mine = [
        E(x.name, x.kind, data=x.data, mode=x.mode, uid=user.uid, gid=user.gid) for x in OWN_TREE
    ]
    tar = _put(user, "own.tar", build_tar(mine))
    layer = _ok(user, "layerfs", "import-layer", tar, env=HOST).split()[0]
    diff = _store(user) / "overlay" / layer / "diff"
    assert stat.S_IMODE((diff / "d/sub").stat().st_mode) == 0o500
    assert (diff / "d/sub/f").stat().st_uid == user.uid
    assert (_store(user) / "overlay/.has-mount-program").read_text() == "true"
    assert _ok(user, "layerfs", "cat", layer, "/d/sub/f", env=HOST) == "deep\n"


def test_root_owned_entries(user: RootlessUser) -> None:
    """Row 2: owners 0 and 5 become the user and subordinate id 4 in the namespace; outside
    one the chown is refused with one line naming the fixes, and nothing is left behind;
    ``ignore_chown_errors`` imports it with one warning."""
    tar = _put(user, "owned.tar", build_tar([E("a", data=b"a"), E("b", data=b"b", uid=5, gid=7)]))
    layer = _ok(user, "layerfs", "import-layer", tar).split()[0]
    diff = _store(user) / "overlay" / layer / "diff"
    assert (diff / "a").stat().st_uid == user.uid
    st = (diff / "b").stat()
    assert (st.st_uid, st.st_gid) == (user.sub_start + 4, user.sub_start + 6)
    rec = json.loads(_ok(user, "layerfs", "layer", "--json", layer))
    rec = rec[0] if isinstance(rec, list) else rec
    assert rec["uidset"] == [0, 5] and rec["gidset"] == [0, 7]

    reset_user(user)
    tar = _put(user, "owned.tar", build_tar([E("a", data=b"a"), E("b", data=b"b", uid=5, gid=7)]))
    out = user.run(["layerfs", "import-layer", tar], env=HOST)
    assert out.returncode == 1
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1, out.stderr
    assert lines[0].startswith('layerfs: entry "a": cannot give it owner 0:0 (Operation not ')
    assert "/etc/subuid" in lines[0] and "ignore_chown_errors" in lines[0]
    assert _layers(user, HOST) == []
    assert sorted(os.listdir(_store(user) / "overlay")) == [".has-mount-program", "l"]

    opt = ["--storage-opt", "overlay.ignore_chown_errors=true"]
    proc = user.run(["layerfs", *opt, "import-layer", tar], env=HOST)
    assert proc.returncode == 0, proc.stderr
    warn = proc.stderr.strip().splitlines()
    assert len(warn) == 1 and "2 entries the system would not chown" in warn[0], proc.stderr
    layer = proc.stdout.split()[0]
    assert (_store(user) / "overlay" / layer / "diff/b").stat().st_uid == user.uid


def test_unmapped_id_names_it_and_the_fix(user: RootlessUser) -> None:
    """An owner beyond the subordinate range: one line, the store untouched."""
    big = user.sub_count + 34464  # 100000 with the fixture's 65536 ids
    tar = _put(user, "big.tar", build_tar([E("ok", data=b"x"), E("far", data=b"y", uid=big)]))
    out = user.run(["layerfs", "import-layer", tar])
    assert out.returncode == 1
    assert out.stderr == (
        f'layerfs: entry "far": uid {big} is not mapped: widen /etc/subuid '
        "(or use ignore_chown_errors)\n"
    )
    assert _layers(user) == []
    tar = _put(user, "big.tar", build_tar([E("far", data=b"y", gid=big)]))
    out = user.run(["layerfs", "import-layer", tar])
    assert "gid 100000 is not mapped: widen /etc/subgid" in out.stderr


def test_device_nodes_skipped_with_one_warning(user: RootlessUser) -> None:
    """Row 8 (devices): as containers-storage does in a user namespace; the tar-split still
    holds them, so ``diff`` gives back the original tar."""
    entries = [E("dev/", "dir"), E("dev/null", "chr", dev=(1, 3)), E("dev/sda", "blk", dev=(8, 0))]
    data = build_tar([*entries, E("dev/fifo", "fifo"), E("etc/x", data=b"x")])
    tar = _put(user, "dev.tar", data)
    proc = user.run(["layerfs", "import-layer", tar])
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr == (
        "layerfs: WARNING: skipped 2 device nodes (a user namespace cannot create them), "
        "e.g. dev/null\n"
    )
    layer = proc.stdout.split()[0]
    diff = _store(user) / "overlay" / layer / "diff"
    assert sorted(os.listdir(diff / "dev")) == ["fifo"]
    out = user.run(["layerfs", "diff", "--output", str(user.home / "out.tar"), layer])
    assert out.returncode == 0, out.stderr
    assert (user.home / "out.tar").read_bytes() == data


def test_force_mask_records_override_stat(user: RootlessUser) -> None:
    """force_mask: modes on disk are the mask, devices and FIFOs regular files, and the
    real owner/mode/type is in user.containers.override_stat, c/storage's format."""
    data = build_tar(
        [
            E("bin/", "dir", mode=0o755),
            E("bin/su", data=b"#!", mode=0o4755, uid=0, gid=0),
            E("home/", "dir", mode=0o700, uid=5, gid=5),
            E("null", "chr", dev=(1, 3), mode=0o666),
            E("pipe", "fifo", mode=0o600, uid=5, gid=6),
            E("link", "sym", "bin/su"),
        ]
    )
    tar = _put(user, "fm.tar", data)
    proc = user.run(["layerfs", "--storage-opt", "overlay.force_mask=0700", "import-layer", tar])
    assert proc.returncode == 0, proc.stderr
    diff = _store(user) / "overlay" / proc.stdout.split()[0] / "diff"

    def over(name: str) -> bytes:
        return os.getxattr(diff / name, overridestat.XATTR, follow_symlinks=False)

    assert over("bin") == b"0:0:0755:dir"
    assert over("bin/su") == b"0:0:4755:file"
    assert over("home") == b"5:5:0700:dir"
    assert over("null") == b"0:0:0666:char-1-3"
    assert over("pipe") == b"5:6:0600:pipe"
    for name in ("bin", "bin/su", "home", "null", "pipe"):
        st = (diff / name).lstat()
        assert stat.S_IMODE(st.st_mode) == 0o700, name
        assert stat.S_ISDIR(st.st_mode) or stat.S_ISREG(st.st_mode), name
    assert (diff / "link").is_symlink()
    with pytest.raises(OSError):
        over("link")
    bad = user.run(["layerfs", "--storage-opt", "overlay.force_mask=abc", "import-layer", tar])
    assert bad.returncode == 1
    assert bad.stderr.strip().splitlines() == [
        "layerfs: force_mask 'abc': expected private, shared or an octal mode"
    ]


def test_override_stat_format() -> None:
    """The xattr format, as containers/storage pkg/idtools writes and parses it."""
    assert format_override(1000, 1011, stat.S_IFREG | 0o644) == b"1000:1011:0644:file"
    assert format_override(1, 2, stat.S_IFDIR | 0o1777) == b"1:2:1777:dir"
    assert format_override(0, 0, stat.S_IFBLK | 0o600, os.makedev(8, 0)) == b"0:0:0600:block-8-0"
    assert parse_override(b"1006:1017:0600:char-10-11") == OverrideStat(
        1006, 1017, stat.S_IFCHR | 0o600, os.makedev(10, 11)
    )
    assert parse_override(b"0:0:755") == OverrideStat(0, 0, 0o755)  # old writers: no type
    assert parse_override(b"0:0:0755:dir").apply_to(stat.S_IFREG | 0o700) == stat.S_IFDIR | 0o755
    assert parse_override(b"0:0:0640").apply_to(stat.S_IFREG | 0o700) == stat.S_IFREG | 0o640
    for bad in (b"0:0", b"x:0:0755", b"0:0:0999", b"0:0:0755:weird", b"0:0:0755:char-1", b"\xff"):
        with pytest.raises(ValueError):
            parse_override(bad)


def test_go_reads_what_we_write_and_we_read_what_go_writes(user: RootlessUser) -> None:
    """Row 8 (opaque dirs): inside ``podman unshare``, on one store, layerfs writes
    ``user.overlay.opaque`` (never trusted.*) and a char 0:0 whiteout, containers-storage
    replays our layer byte for byte; containers-storage's own import reads the same in
    ``layerfs ls``, and kernel overlay (userxattr) in the namespace shows what layerfs shows."""
    require_tool("containers-storage")
    base = build_tar([E("d/", "dir"), E("d/old", data=b"old"), E("gone", data=b"g")])
    top = build_tar([E("d/", "dir"), E("d/.wh..wh..opq"), E("d/new", data=b"new"), E(".wh.gone")])
    _put(user, "base.tar", base)
    _put(user, "top.tar", top)
    cs = "containers-storage -g $G -R $R -s overlay"
    script = f"""set -e
G=$HOME/store R=$XDG_RUNTIME_DIR/store
export LAYERFS_ROOT=$G LAYERFS_RUNROOT=$R
b=$(layerfs import-layer --name b ~/base.tar)
t=$(layerfs import-layer --name t --parent b ~/top.tar | head -1)
getfattr -h --absolute-names -d -m - $G/overlay/$t/diff/d | grep '^[a-z]'
stat -c '%F %t:%T' $G/overlay/$t/diff/gone
{cs} diff -u -f ~/replay.tar t
cmp ~/replay.tar ~/top.tar && echo SAME
{cs} import-layer -n gb -f ~/base.tar >/dev/null
{cs} import-layer -n gt -f ~/top.tar gb >/dev/null
echo LS; layerfs ls gt /; layerfs ls gt /d
mkdir -p ~/m; gb=$({cs} layer -j gb | sed 's/.*"id":"\\([0-9a-f]*\\)".*/\\1/')
gt=$({cs} layer -j gt | sed 's/.*"id":"\\([0-9a-f]*\\)".*/\\1/')
mount -t overlay -o lowerdir=$G/overlay/$gt/diff:$G/overlay/$gb/diff,userxattr none ~/m
echo K; ls -A ~/m ~/m/d; umount ~/m
"""
    out = _ok(user, "podman", "unshare", "sh", "-c", script)
    xattrs, rest = out.split("character special file", 1)
    assert xattrs.strip().splitlines() == ['user.overlay.opaque="y"']
    assert rest.splitlines()[0].strip() == "0:0"
    assert "SAME" in out
    ls = out.split("LS\n", 1)[1].split("K\n", 1)[0].splitlines()
    assert [line.split()[-1] for line in ls] == ["d", "new"]
    kernel = out.split("K\n", 1)[1].split()
    assert kernel == [f"{user.home}/m:", "d", f"{user.home}/m/d:", "new"]


def test_import_image_and_view_match_kernel_overlay(user: RootlessUser) -> None:
    """Row 3: ``import-image oci:…`` as the plain user (setuid bits, hard links, deletions,
    a replaced directory); the mounted view in the namespace equals kernel overlay there."""
    from image_helpers import build_oci_image, sample_steps

    work = user.home / "imgwork"
    work.mkdir()
    layout = build_oci_image(work, sample_steps())
    for dirpath, dirnames, filenames in os.walk(work):
        for name in [*dirnames, *filenames, "."]:
            os.lchown(os.path.join(dirpath, name), user.uid, user.gid)
    res = json.loads(
        _ok(user, "layerfs", "import-image", "--json", "--name", "img", f"oci:{layout}:t")
    )
    top = res["layers"][-1]
    assert _ok(user, "layerfs", "cat", "img", "/etc/hostname") == "second\n"
    listing = "find . -mindepth 1 -printf '%P %M %U %G %s %l\\n' | sort"
    script = f"""set -e
G=$HOME/.local/share/layerfs
v=$(layerfs mount img)
(cd $v && {listing}) > ~/view.txt
mkdir -p ~/k; cd $G/overlay
mount -t overlay -o lowerdir={top}/diff:$(cat {top}/lower),userxattr none ~/k
(cd ~/k && {listing}) > ~/kernel.txt
umount ~/k; layerfs unmount img >/dev/null
cmp ~/view.txt ~/kernel.txt && echo SAME
"""
    out = _ok(user, "layerfs", "unshare", "sh", "-c", script)
    view = (user.home / "view.txt").read_text()
    assert out.strip() == "SAME", view + (user.home / "kernel.txt").read_text()
    assert "bin/tool -rwsr-xr-x 0 0" in view
    assert "data/sub/new " in view and "data/sub/old" not in view and "etc/gone" not in view


def test_store_made_by_a_listing_command_is_still_a_namespace_store(user: RootlessUser) -> None:
    """The first command on a fresh store may be ``layers``: the store is made in the
    namespace all the same, so a later import of root-owned entries works."""
    assert _layers(user) == []
    assert (_store(user) / "overlay/.has-mount-program").read_text() == "false"
    tar = _put(user, "owned.tar", build_tar([E("a", data=b"a", uid=3, gid=3)]))
    layer = _ok(user, "layerfs", "import-layer", tar).split()[0]
    assert (_store(user) / "overlay" / layer / "diff/a").stat().st_uid == user.sub_start + 2
