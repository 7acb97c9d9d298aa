"""``layerfs unshare`` and the rootless namespace layerfs enters for a plain user: podman's
own user + mount namespace (joined through its pause process, or made by layerfs with
newuidmap/newgidmap and then joined by podman), views mounted there, and the mount records
that know which namespace a view lives in (issue 11 items 2, 7, 8)."""

from __future__ import annotations

import json
import os
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
from layerfs import userns


def _tar_file(user: RootlessUser, name: str, entries: list[E]) -> str:
    path = user.home / name
    path.write_bytes(build_tar(entries))
    os.chown(path, user.uid, user.gid)
    return str(path)


def _map(text: str) -> list[list[str]]:
    return [line.split() for line in text.splitlines() if line.strip()]


def test_unshare_is_root_with_the_subordinate_ids(user: RootlessUser) -> None:
    out = _ok(user, "layerfs", "unshare", "sh", "-c", "id -u; id -g; cat /proc/self/uid_map")
    lines = out.splitlines()
    assert lines[:2] == ["0", "0"]
    assert _map("\n".join(lines[2:])) == [
        ["0", str(user.uid), "1"],
        ["1", str(user.sub_start), str(user.sub_count)],
    ]
    gid_map = _ok(user, "layerfs", "unshare", "cat", "/proc/self/gid_map")
    assert _map(gid_map) == [
        ["0", str(user.gid), "1"],
        ["1", str(user.sub_start), str(user.sub_count)],
    ]
    # no command: the user's $SHELL, here reading a script on stdin
    shell = user.run(["layerfs", "unshare"], env={"SHELL": "/bin/sh"}, input=b"id -u\n")
    assert shell.returncode == 0 and shell.stdout.strip() == "0", shell.stderr
    # a command that does not exist: one line, exit 1
    bad = user.run(["layerfs", "unshare", "no-such-command-here"])
    assert bad.returncode == 1
    assert bad.stderr.strip() == "layerfs: no-such-command-here: No such file or directory"


@pytest.mark.parametrize("first", ["podman", "layerfs"])
def test_one_namespace_shared_with_podman(user: RootlessUser, first: str) -> None:
    """Whoever comes first makes the namespace; the other joins it (its pause process)."""
    probe = "readlink /proc/self/ns/user /proc/self/ns/mnt"
    cmds = {"podman": ["podman", "unshare", "sh", "-c", probe]}
    cmds["layerfs"] = ["layerfs", "unshare", "sh", "-c", probe]
    second = "layerfs" if first == "podman" else "podman"
    a = _ok(user, *cmds[first])
    b = _ok(user, *cmds[second])
    assert a == b
    assert len(set(a.split())) == 2
    again = _ok(user, *cmds[first])
    assert again == a
    host = userns.namespace_id("user", 1)
    assert host not in a.split()
    # layerfs unshare inside podman unshare: already there, the command just runs
    inner = _ok(user, "podman", "unshare", "layerfs", "unshare", "sh", "-c", probe)
    assert inner == a
    # podman started inside layerfs's namespace (podman's markers are set) stays in it
    nested = _ok(user, "layerfs", "unshare", "podman", "unshare", "sh", "-c", probe)
    assert nested == a
    images = user.run(["layerfs", "unshare", "podman", "images", "--format", "json"])
    assert images.returncode == 0, images.stderr


def test_no_subordinate_ids_is_one_line(user: RootlessUser) -> None:
    """A user without a range in /etc/subgid cannot enter: one line naming the file."""
    bind = user.home / "subgid"
    bind.write_text("someone-else:100000:65536\n")
    proc = user.run(["layerfs", "unshare", "true"], setup=f"mount --bind {bind} /etc/subgid")
    assert proc.returncode == 1
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("layerfs: cannot enter the rootless user namespace: ")
    assert f"{user.name} has no range in /etc/subgid" in lines[0]
    # and then store commands simply stay outside (nothing to enter)
    out = user.run(["layerfs", "create-layer"], setup=f"mount --bind {bind} /etc/subgid")
    assert out.returncode == 0, out.stderr


def test_view_in_the_namespace_is_live_elsewhere_not_stale(user: RootlessUser) -> None:
    """Issue row 9: mounted in the namespace, ``ps`` outside must not reset the count."""
    tar = _tar_file(user, "l.tar", [E("d/", "dir"), E("d/f", data=b"hello\n", uid=5, gid=5)])
    layer = _ok(user, "layerfs", "import-layer", tar).split()[0]
    proc = user.run(["layerfs", "mount", layer])
    assert proc.returncode == 0, proc.stderr
    path = proc.stdout.strip()
    assert proc.stderr == (
        "layerfs: the view is in the rootless user namespace: see it through layerfs unshare\n"
    )
    store = user.home / ".local/share/layerfs"
    assert path == str(store / "overlay" / layer / "merged")
    # outside: not in our mountinfo, but live in the namespace
    ps = json.loads(_ok(user, "layerfs", "ps", "--json", env={"LAYERFS_USERNS": "host"}))
    assert [(v["id"], v["state"], v["count"]) for v in ps] == [(layer, "elsewhere", 1)]
    assert _ok(user, "layerfs", "mounted", layer).strip() == "1"
    assert "elsewhere" in _ok(user, "layerfs", "ps")
    assert _ok(user, "layerfs", "mounted", layer).strip() == "1"  # still: nothing was reset
    # inside: live, readable, with the container's owners
    inside = _ok(user, "layerfs", "unshare", "sh", "-c", f"layerfs ps; stat -c '%u %s' {path}/d/f")
    assert " live " in inside
    assert inside.splitlines()[-1] == "5 6"
    # a second mount from outside joins the namespace and shares the view
    assert _ok(user, "layerfs", "mount", layer).strip() == path
    assert _ok(user, "layerfs", "mounted", layer).strip() == "2"
    # the daemon record names the namespace it lives in
    record = Path(user.runtime_dir, "layerfs/layerfs/daemons", f"{layer}.json").read_text()
    pause = _pause_pid(user)
    assert f'"mnt_ns": "{userns.namespace_id("mnt", pause)}"' in record
    # explicitly outside (LAYERFS_USERNS=host): refused with one line, count kept
    out = user.run(["layerfs", "unmount", layer], env={"LAYERFS_USERNS": "host"})
    assert out.returncode == 1
    assert "in another mount namespace" in out.stderr
    assert "run it in that namespace (layerfs unshare layerfs ...)" in out.stderr
    assert len(out.stderr.strip().splitlines()) == 1
    assert _ok(user, "layerfs", "unmount", layer).strip() == f"{layer} still mounted (1)"
    assert _ok(user, "layerfs", "unmount", layer).strip() == f"{layer} mountpoint unmounted"
    assert json.loads(_ok(user, "layerfs", "ps", "--json")) == []


def _pause_pid(user: RootlessUser) -> int:
    return int((user.runtime_dir / "libpod/tmp/pause.pid").read_text())


def test_podman_sees_the_view_layerfs_mounted(user: RootlessUser) -> None:
    """Mounts made in the namespace are where podman's are: ``podman unshare`` sees them."""
    tar = _tar_file(user, "l.tar", [E("hello", data=b"from layerfs\n")])
    layer = _ok(user, "layerfs", "import-layer", tar).split()[0]
    path = _ok(user, "layerfs", "mount", layer).strip()
    assert _ok(user, "podman", "unshare", "cat", f"{path}/hello") == "from layerfs\n"
    assert not os.path.exists(f"{path}/hello")  # the host (this test, as root) does not
    _ok(user, "layerfs", "unmount", layer)


def test_read_write_view_in_the_namespace_matches_kernel_overlay(user: RootlessUser) -> None:
    """A writable layer mounted read-write in the namespace writes the rootless forms
    (char 0:0 whiteouts, ``user.overlay.opaque``, nothing under ``trusted.``): after unmount,
    kernel overlay with ``userxattr`` on the same dirs shows what the view showed."""
    base = [E("d/", "dir"), E("d/old", data=b"old"), E("keep", data=b"k"), E("gone", data=b"g")]
    tar = _tar_file(user, "base.tar", [*base, E("o/", "dir", uid=7, gid=7), E("o/f", uid=7)])
    b = _ok(user, "layerfs", "import-layer", tar).split()[0]
    w = _ok(user, "layerfs", "create-layer", "--writeable", b).split()[0]
    listing = "find . -mindepth 1 -printf '%P %M %U %G %s\\n' | sort"
    script = f"""set -e
v=$(layerfs mount {w})
rm -rf $v/d && mkdir $v/d && echo new > $v/d/new
echo more >> $v/keep; rm $v/gone; echo mine > $v/o/g; chown 7:7 $v/o/g
(cd $v && {listing}) > ~/view.txt
layerfs unmount {w} >/dev/null
G=$HOME/.local/share/layerfs/overlay
getfattr -h --absolute-names -d -m - $G/{w}/diff/d | grep '^[a-z]' || true
stat -c '%F %t:%T' $G/{w}/diff/gone
mkdir -p ~/k; mount -t overlay -o lowerdir=$G/{w}/diff:$G/{b}/diff,userxattr none ~/k
(cd ~/k && {listing}) > ~/kernel.txt; umount ~/k
cmp ~/view.txt ~/kernel.txt && echo SAME
"""
    out = _ok(user, "layerfs", "unshare", "sh", "-c", script)
    view = (user.home / "view.txt").read_text()
    assert out.splitlines() == ['user.overlay.opaque="y"', "character special file 0:0", "SAME"], (
        out + view + (user.home / "kernel.txt").read_text()
    )
    assert "d/new " in view and "d/old" not in view and "gone" not in view
    assert "o/g -rw-r--r-- 7 7 5" in view


def test_concurrent_first_commands_make_one_namespace(user: RootlessUser) -> None:
    """Four layerfs commands started at once, none finding a pause process: one namespace."""
    script = (
        "for i in 1 2 3 4; do layerfs unshare readlink /proc/self/ns/user > ~/ns.$i & done; "
        "wait; cat ~/ns.1 ~/ns.2 ~/ns.3 ~/ns.4"
    )
    out = _ok(user, "sh", "-c", script).split()
    assert len(out) == 4 and len(set(out)) == 1, out


def test_dead_pause_process_is_replaced(user: RootlessUser) -> None:
    """A pause.pid naming a dead process (or one that is not ours) is not joined."""
    first = _ok(user, "layerfs", "unshare", "readlink", "/proc/self/ns/user").strip()
    pid = _pause_pid(user)
    os.kill(pid, 9)  # the pause process this test had layerfs start (init reaps it)
    second = _ok(user, "layerfs", "unshare", "readlink", "/proc/self/ns/user").strip()
    assert second != first
    assert _pause_pid(user) != pid
    (user.runtime_dir / "libpod/tmp/pause.pid").write_text("1")  # init: not the user's
    third = _ok(user, "layerfs", "unshare", "readlink", "/proc/self/ns/user").strip()
    assert third not in (first, second, userns.namespace_id("user", 1))


def test_unshare_as_root_is_refused() -> None:
    from layerfs.cli import main

    if os.geteuid() != 0 or userns.in_user_namespace():
        pytest.skip("needs real root")
    assert main(["unshare", "true"]) == 1


def test_foreign_fallback_pause_dir_is_refused(user: RootlessUser) -> None:
    """Without XDG_RUNTIME_DIR the pause pid lives in /tmp/podman-run-UID (podman's
    fallback): a directory someone else made there in advance is not used."""
    foreign = Path(f"/tmp/podman-run-{user.uid}")
    foreign.mkdir(mode=0o777)
    os.chmod(foreign, 0o777)
    proc = user.run(["layerfs", "unshare", "true"], env={"XDG_RUNTIME_DIR": ""})
    assert proc.returncode == 1
    assert proc.stderr == (
        f"layerfs: cannot enter the rootless user namespace: {foreign} is not a private "
        "directory of yours; remove it\n"
    )
    assert os.listdir(foreign) == []  # nothing was put there
