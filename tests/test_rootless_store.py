"""The rootless store (issue 11 items 1 and 8; table rows 4, 6, 11): default paths as a
plain user and as euid 0 inside ``podman unshare``, the fallback run root, and the one-line
causes a plain user's ``layerfs mount`` gives when FUSE cannot be used."""

from __future__ import annotations

import json
import os
import re
import stat

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

HOST = {"LAYERFS_USERNS": "host"}
PROBE = (
    "from layerfs.store.layers import default_root, default_runroot; "
    "print(default_root()); print(default_runroot())"
)


def test_plain_user_defaults_to_xdg(user: RootlessUser) -> None:
    out = _ok(user, "python", "-c", PROBE).split()
    assert out == [f"{user.home}/.local/share/layerfs", f"{user.runtime_dir}/layerfs"]
    out = _ok(user, "python", "-c", PROBE, env={"XDG_DATA_HOME": f"{user.home}/d"}).split()
    assert out[0] == f"{user.home}/d/layerfs"
    env = {"LAYERFS_ROOT": "/x/g", "LAYERFS_RUNROOT": "/x/r", "CONTAINERS_GRAPHROOT": "/c"}
    assert _ok(user, "python", "-c", PROBE, env=env).split() == ["/x/g", "/x/r"]


def test_inside_podman_unshare_the_default_is_podmans_store(user: RootlessUser) -> None:
    """Row 6: euid 0 with a non-identity map is rootless: podman's CONTAINERS_GRAPHROOT /
    CONTAINERS_RUNROOT, not /var/lib/layerfs; the Go tool sees the layer made there."""
    require_tool("containers-storage")
    out = _ok(user, "podman", "unshare", "python", "-c", PROBE).split()
    podman_root = f"{user.home}/.local/share/containers/storage"
    assert out[0] == podman_root
    assert out[1].startswith(str(user.runtime_dir))  # podman's run root
    made = _ok(user, "podman", "unshare", "layerfs", "create-layer", "--name", "from-layerfs")
    layer = made.split()[0]
    go = _ok(
        user,
        "podman",
        "unshare",
        "sh",
        "-c",
        "containers-storage -g $CONTAINERS_GRAPHROOT -R $CONTAINERS_RUNROOT -s overlay layers",
    )
    assert layer in go and "from-layerfs" in go
    # LAYERFS_ROOT still wins
    env = {"LAYERFS_ROOT": f"{user.home}/mine"}
    assert (
        _ok(user, "podman", "unshare", "python", "-c", PROBE, env=env).split()[0]
        == env["LAYERFS_ROOT"]
    )
    # without podman's variables (a namespace of our own): XDG, as for the plain user
    inside = _ok(user, "layerfs", "unshare", "python", "-c", PROBE).split()
    assert inside == [f"{user.home}/.local/share/layerfs", f"{user.runtime_dir}/layerfs"]


def test_fallback_run_root_is_private(user: RootlessUser) -> None:
    """Row 11: without XDG_RUNTIME_DIR the run root is /tmp/layerfs-run-UID, made 0700; a
    directory made there in advance by someone else, or open to others, is refused."""
    no_xdg = {"XDG_RUNTIME_DIR": "", **HOST}
    fallback = f"/tmp/layerfs-run-{user.uid}"
    _ok(user, "layerfs", "layers", env=no_xdg)
    st = os.lstat(fallback)
    assert (st.st_uid, stat.S_IMODE(st.st_mode)) == (user.uid, 0o700)
    assert os.path.isdir(f"{fallback}/layerfs")
    # inside the namespace the same directory (the host uid names it)
    inside = _ok(user, "layerfs", "unshare", "python", "-c", PROBE, env={"XDG_RUNTIME_DIR": ""})
    assert inside.split()[1] == f"{fallback}/layerfs"

    reset_user(user)
    os.mkdir(fallback)
    os.chmod(fallback, 0o777)  # made by root in advance
    proc = user.run(["layerfs", "layers"], env=no_xdg)
    assert proc.returncode == 1
    assert proc.stderr == (
        f"layerfs: run root {fallback} belongs to uid 0, not to you; "
        "remove it or set XDG_RUNTIME_DIR\n"
    )
    os.chown(fallback, user.uid, user.gid)  # the user's own, but open to everyone
    proc = user.run(["layerfs", "layers"], env=no_xdg)
    assert proc.returncode == 1
    assert proc.stderr == (
        f"layerfs: run root {fallback} is writable by others (mode 0777); "
        f"chmod 700 {fallback} or set XDG_RUNTIME_DIR\n"
    )
    assert os.listdir(fallback) == []  # nothing was put there


def _fuse_node(user: RootlessUser, mode: str) -> str:
    """Root shell lines: a FUSE device node of *mode* on a tmpfs, bound over /dev/fuse (in
    the command's own mount namespace only)."""
    dev = user.home / "devs"
    dev.mkdir(exist_ok=True)
    return (
        f"mount -t tmpfs -o mode=755 tmpfs {dev}\n"
        f"mknod -m {mode} {dev}/fuse c 10 229\n"
        f"mount --bind {dev}/fuse /dev/fuse\n"
    )


def _layer(user: RootlessUser, env: dict[str, str] | None = None, setup: str | None = None) -> str:
    tar = user.home / "l.tar"
    tar.write_bytes(build_tar([E("f", data=b"x", uid=user.uid, gid=user.gid)]))
    os.chown(tar, user.uid, user.gid)
    return _ok(user, "layerfs", "import-layer", str(tar), env=env, setup=setup).split()[0]


def _cause(stderr: str) -> str:
    """The cause of a one-line ``layerfs: mounting PATH failed: CAUSE`` error."""
    lines = stderr.splitlines()
    assert len(lines) == 1, stderr
    match = re.fullmatch(r"layerfs: mounting (/\S+) failed: (.*)", lines[0])
    assert match is not None, stderr
    return match.group(2)


def _nothing_mounted(user: RootlessUser, env: dict[str, str] | None = None) -> None:
    assert json.loads(_ok(user, "layerfs", "ps", "--json", env=env)) == []


@pytest.mark.parametrize("where", ["host", "namespace"])
def test_dev_fuse_not_accessible_is_one_line(user: RootlessUser, where: str) -> None:
    """Row 4: /dev/fuse 0600 (a host without udev): the cause, not a libfuse log tail."""
    env = HOST if where == "host" else None
    setup = _fuse_node(user, "600")
    # (the namespace is made by the first command, a copy of its mount namespace: make it
    # where /dev/fuse is the 0600 node)
    layer = _layer(user, env, setup)
    proc = user.run(["layerfs", "mount", layer], env=env, setup=setup)
    assert proc.returncode == 1
    assert _cause(proc.stderr) == "cannot open /dev/fuse: Permission denied"
    _nothing_mounted(user, env)


def test_allow_other_without_user_allow_other_is_one_line(user: RootlessUser) -> None:
    fuse_conf = user.home / "fuse.conf"
    fuse_conf.write_text("# mount_max = 1000\n")
    layer = _layer(user, HOST)
    setup = f"mount --bind {fuse_conf} /etc/fuse.conf"
    proc = user.run(["layerfs", "mount", "--allow-other", layer], env=HOST, setup=setup)
    assert proc.returncode == 1
    assert _cause(proc.stderr) == "allow_other needs user_allow_other in /etc/fuse.conf (or root)"
    _nothing_mounted(user, HOST)


def test_fusermount3_missing_is_one_line(user: RootlessUser) -> None:
    require_tool("fusermount3")
    layer = _layer(user, HOST)
    paths = {"/usr/bin/fusermount3", os.path.realpath("/usr/bin/fusermount3")}
    setup = "\n".join(f"mount --bind /dev/null {p}" for p in sorted(paths) if os.path.exists(p))
    proc = user.run(["layerfs", "mount", layer], env=HOST, setup=setup)
    assert proc.returncode == 1
    assert _cause(proc.stderr) == "fusermount3 not found: it is needed to mount without root"
    _nothing_mounted(user, HOST)


def test_plain_user_mount_outside_works(user: RootlessUser) -> None:
    """And with everything in place, the plain user's mount outside a namespace works
    (fusermount3), is live in ``ps`` and goes away on unmount."""
    layer = _layer(user, HOST)
    path = _ok(user, "layerfs", "mount", layer, env=HOST).strip()
    assert _ok(user, "cat", f"{path}/f") == "x"
    ps = json.loads(_ok(user, "layerfs", "ps", "--json", env=HOST))
    assert [(v["state"], v["count"]) for v in ps] == [("live", 1)]
    # seen from inside the rootless namespace: live elsewhere, and left alone
    inside = json.loads(_ok(user, "layerfs", "unshare", "layerfs", "ps", "--json"))
    assert [(v["state"], v["count"]) for v in inside] == [("elsewhere", 1)]
    refused = user.run(["layerfs", "unshare", "layerfs", "unmount", layer])
    assert refused.returncode == 1
    assert "run it outside the user namespace (LAYERFS_USERNS=host" in refused.stderr
    _ok(user, "layerfs", "unmount", layer, env=HOST)
    _nothing_mounted(user, HOST)


def test_podmans_store_from_the_host(user: RootlessUser) -> None:
    """Row 5 (the store side): layerfs on rootless podman's own store, run from the host:
    it enters podman's namespace, so a 0700 directory owned by a container user is read
    as podman reads it, and a view it mounts is counted where podman's Go code counts."""
    require_tool("podman")
    rootfs = user.home / "rootfs.tar"
    rootfs.write_bytes(
        build_tar(
            [
                E("etc/", "dir"),
                E("etc/hostname", data=b"pod\n"),
                E("secret/", "dir", mode=0o700, uid=5, gid=5),
                E("secret/key", data=b"k", mode=0o600, uid=5, gid=5),
            ]
        )
    )
    os.chown(rootfs, user.uid, user.gid)
    _ok(user, "podman", "import", str(rootfs), "localhost/t:1")
    info = json.loads(_ok(user, "podman", "info", "--format", "json"))
    graph, run = info["store"]["graphRoot"], info["store"]["runRoot"]
    store = ["--root", graph, "--runroot", run]
    listing = _ok(user, "layerfs", *store, "ls", "localhost/t:1", "/secret").split()
    assert listing[-1] == "key" and listing[1:3] == ["5", "5"]
    assert _ok(user, "layerfs", *store, "cat", "localhost/t:1", "/secret/key") == "k"
    layer = json.loads(_ok(user, "layerfs", *store, "layers", "--json"))[-1]["id"]
    path = _ok(user, "layerfs", *store, "mount", layer).strip()
    counts = _ok(user, "podman", "unshare", "cat", f"{run}/overlay-layers/mountpoints.json")
    assert json.loads(counts) == [{"id": layer, "path": path, "count": 1}]
    assert _ok(user, "podman", "unshare", "cat", f"{path}/etc/hostname") == "pod\n"
    _ok(user, "layerfs", *store, "unmount", layer)
    counts = _ok(user, "podman", "unshare", "cat", f"{run}/overlay-layers/mountpoints.json")
    assert json.loads(counts) == []


def test_podmans_own_mount_is_never_reset_from_the_host(user: RootlessUser) -> None:
    """Go's kernel overlay mount in podman's namespace (a running container's, here
    containers-storage's ``mount``): ``layerfs ps``/``mounted`` on the host see it live
    elsewhere (through the pause process's mount table) and leave podman's count alone."""
    require_tool("containers-storage")
    rootfs = user.home / "rootfs.tar"
    rootfs.write_bytes(build_tar([E("etc/", "dir"), E("etc/hostname", data=b"pod\n")]))
    os.chown(rootfs, user.uid, user.gid)
    _ok(user, "podman", "import", str(rootfs), "localhost/t:1")
    info = json.loads(_ok(user, "podman", "info", "--format", "json"))
    graph, run = info["store"]["graphRoot"], info["store"]["runRoot"]
    store = ["--root", graph, "--runroot", run]
    layer = json.loads(_ok(user, "layerfs", *store, "layers", "--json"))[-1]["id"]
    cs = f"containers-storage -g {graph} -R {run} -s overlay"
    path = _ok(user, "podman", "unshare", "sh", "-c", f"{cs} mount {layer}").strip()
    ps = json.loads(_ok(user, "layerfs", *store, "ps", "--json"))
    assert [(v["id"], v["state"], v["count"]) for v in ps] == [(layer, "elsewhere", 1)]
    assert _ok(user, "layerfs", *store, "mounted", layer).strip() == "1"
    counts = _ok(user, "podman", "unshare", "cat", f"{run}/overlay-layers/mountpoints.json")
    assert json.loads(counts) == [{"id": layer, "path": path, "count": 1}]
    # layerfs mount from the host joins the namespace and shares Go's mount
    assert _ok(user, "layerfs", *store, "mount", layer).strip() == path
    assert _ok(user, "layerfs", *store, "mounted", layer).strip() == "2"
    _ok(user, "layerfs", *store, "unmount", layer)
    _ok(user, "podman", "unshare", "sh", "-c", f"{cs} unmount {layer}")
    assert json.loads(_ok(user, "layerfs", *store, "ps", "--json")) == []
