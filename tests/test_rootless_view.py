"""Views for a user who is not root (issue 11 item 4 and the table's rows 5, 7 and "index
built in one namespace, read in another").

* A subtree the user may not read (a 0700 dir owned by a subuid) does not fail the mount:
  the dir is listed with its attributes, and EACCES comes exactly where the oracle gives it
  (fuse-overlayfs as the same user outside any namespace; kernel overlayfs mounted inside
  ``podman unshare``, where a dir owned by an unmapped id is the unreadable one).
* An index built inside ``podman unshare`` is never served outside it (and the reverse):
  each namespace sees the owners ``stat`` shows it.
* Inside ``podman unshare``, a view of podman's own store is usable by uid 1000 of the
  namespace without ``--allow-other`` (allow_other is the default there, as fuse-overlayfs).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from idmap_helpers import PODMAN_FLAGS, PROG, REPO, busybox_rootfs_tar
from rootless_helpers import RootlessUser, rootless_user  # noqa: F401  (fixture)

from conftest import require
from fs_helpers import Layer, require_fuse_overlayfs, require_kernel_overlay

pytestmark = [pytest.mark.root, pytest.mark.fuse]

PROBE = str(Path(__file__).with_name("view_probe.py"))
ENV = {"PYTHONPATH": str(REPO), "LAYERFS_USERNS": "host"}
"""``LAYERFS_USERNS=host``: layerfs run as the plain user stays outside the user namespace
(once layerfs enters it by itself for store commands, the outside case needs asking for)."""
ALSO = "partial/g:partial/inner/f:partial/inner:merged/low_f:secret"


@pytest.fixture
def base(rootless_user: RootlessUser, request: pytest.FixtureRequest) -> Iterator[Path]:  # noqa: F811
    """A fresh dir in the user's home (the pytest tmp dir is root's, 0700)."""
    d = rootless_user.home / f"rv-{request.node.name[:40]}".replace("[", "-").replace("]", "")
    shutil.rmtree(d, ignore_errors=True)
    d.mkdir()
    os.chown(d, rootless_user.uid, rootless_user.gid)
    try:
        yield d
    finally:
        shutil.rmtree(d, ignore_errors=True)


def _tree(base: Path, owner: int, group: int, sealed_owner: int) -> list[str]:
    """Two layers; ``partial`` (lower only) and the lower part of ``merged`` are 0700 dirs
    owned by *sealed_owner*; ``secret`` is a 0600 file of that owner; the rest is
    *owner*:*group*'s."""
    low = Layer(base / "low")
    low.file("etc/os", b"low\n", uid=owner, gid=group).dir("etc", uid=owner, gid=group)
    low.file("pub/f", b"pub", uid=owner, gid=group).dir("pub", uid=owner, gid=group)
    low.file("partial/g", b"g", uid=sealed_owner, gid=sealed_owner)
    low.file("partial/inner/f", b"f", uid=sealed_owner, gid=sealed_owner)
    low.dir("partial/inner", uid=sealed_owner, gid=sealed_owner)
    low.dir("partial", mode=0o700, uid=sealed_owner, gid=sealed_owner)
    low.file("merged/low_f", b"l", uid=sealed_owner, gid=sealed_owner)
    low.dir("merged", mode=0o700, uid=sealed_owner, gid=sealed_owner)
    low.file("secret", b"s", mode=0o600, uid=sealed_owner, gid=sealed_owner)
    low.finish()
    top = Layer(base / "top")
    top.file("etc/os", b"top\n", uid=owner, gid=group).dir("etc", uid=owner, gid=group)
    top.file("merged/top_f", b"t", uid=owner, gid=group).dir("merged", uid=owner, gid=group)
    top.finish()
    for d in (base / "low", base / "top"):
        os.chown(d, owner, group)
    return [str(base / "top"), str(base / "low")]


def _probe(user: RootlessUser, *roots: str, prefix: tuple[str, ...] = ()) -> dict[str, dict]:  # type: ignore[type-arg]
    r = user.run([*prefix, "python", PROBE, *roots], env={**ENV, "VIEW_PROBE_ALSO": ALSO})
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout)  # type: ignore[no-any-return]


def _check_degraded(view: dict[str, dict], oracle: dict[str, dict]) -> None:  # type: ignore[type-arg]
    assert view == oracle
    assert isinstance(view["partial"]["stat"], list)  # the dir itself is listed ...
    assert view["partial"]["list"] == "EACCES"  # ... but not its contents
    assert view["partial/g"]["stat"] == "EACCES"
    assert view["partial/inner/f"]["stat"] == "EACCES"
    assert view["pub/f"]["data"] == oracle["pub/f"]["data"]
    assert "partial" in view[""]["list"]


def test_unreadable_subtree_as_plain_user(rootless_user: RootlessUser, base: Path) -> None:  # noqa: F811
    """Outside any namespace: the subuid's 0700 dir cannot be read by the user; the mount
    works and answers like fuse-overlayfs mounted by the same user on the same dirs."""
    require_fuse_overlayfs()
    u = rootless_user
    lowers = _tree(base, u.uid, u.gid, u.sub_start + 1)
    opts = "lowerdir=" + ":".join(lowers)
    mnts = {}
    for name in ("lf", "fo"):
        mnts[name] = base / name
        mnts[name].mkdir()
        os.chown(mnts[name], u.uid, u.gid)
    try:
        r = u.run([PROG, "-o", opts, str(mnts["lf"])], env=ENV)
        assert r.returncode == 0, r.stderr
        r = u.run(["fuse-overlayfs", "-o", opts, str(mnts["fo"])])
        require(r.returncode == 0, f"fuse-overlayfs as {u.name}: {r.stderr.strip()}")
        got = _probe(u, str(mnts["lf"]), str(mnts["fo"]))
    finally:
        for m in mnts.values():
            u.run(["fusermount3", "-u", str(m)])
    view, oracle = got[str(mnts["lf"])], got[str(mnts["fo"])]
    assert view["secret"]["data"] == "EACCES"
    # a merged dir whose lower part is unreadable: fuse-overlayfs silently shows the upper
    # part only; kernel overlayfs answers EACCES (test below), and so does layerfs
    assert view.pop("merged")["list"] == "EACCES" and oracle.pop("merged")["list"] == ["top_f"]
    assert view.pop("merged/low_f")["stat"] == "EACCES"
    assert oracle.pop("merged/low_f")["stat"] == "ENOENT"
    oracle.pop("merged/top_f")
    _check_degraded(view, oracle)


def _in_namespace(user: RootlessUser, script: str) -> subprocess.CompletedProcess[str]:
    return user.run(["podman", "unshare", "sh", "-c", script], env=ENV, timeout=300)


def test_unreadable_subtree_inside_podman_unshare(
    rootless_user: RootlessUser,  # noqa: F811
    base: Path,
) -> None:
    """Inside the user's namespace the user is root, but a 0700 dir owned by an unmapped id
    (host root) stays unreadable: kernel overlayfs mounted there is the oracle."""
    require_kernel_overlay()
    u = rootless_user
    lowers = _tree(base, u.uid, u.gid, 0)
    opts = "lowerdir=" + ":".join(lowers)
    k, lf = base / "kernel", base / "lf"
    for m in (k, lf):
        m.mkdir()
        os.chown(m, u.uid, u.gid)
    out = base / "probe.json"
    script = (
        f"trap 'umount {k} 2>/dev/null; umount {lf} 2>/dev/null' EXIT; set -e; "
        f"mount -t overlay overlay -o {opts} {k}; "
        f"{PROG} -o {opts} {lf}; "
        f"VIEW_PROBE_ALSO={ALSO} python {PROBE} {k} {lf} > {out}"
    )
    r = _in_namespace(u, script)
    assert r.returncode == 0, r.stderr
    got = json.loads(out.read_text())
    view, oracle = got[str(lf)], got[str(k)]
    assert view["secret"]["stat"][2] == 65534  # host root is not mapped: the overflow id
    assert view["merged"]["list"] == "EACCES" and view["merged/low_f"]["stat"] == "EACCES"
    _check_degraded(view, oracle)


# -- podman's own store ----------------------------------------------------------------------


@pytest.fixture(scope="module")
def podman_image(rootless_user: RootlessUser) -> Iterator[dict[str, str]]:  # noqa: F811
    """A busybox image imported by the user's rootless podman: its store, run root and
    top layer."""
    u = rootless_user
    tar = busybox_rootfs_tar(u.home / "rv-rootfs.tar")
    os.chown(tar, u.uid, u.gid)
    ref = "localhost/lfs-rv:1"
    r = u.run(["podman", *PODMAN_FLAGS, "import", str(tar), ref], timeout=300)
    assert r.returncode == 0, r.stderr
    r = u.run(
        ["podman", *PODMAN_FLAGS, "image", "inspect", "-f", "{{.GraphDriver.Data.UpperDir}}", ref]
    )
    assert r.returncode == 0, r.stderr
    upper = r.stdout.strip()
    try:
        yield {
            "root": str(u.home / ".local/share/containers/storage"),
            "runroot": str(u.runtime_dir / "containers"),
            "layer": Path(upper).parent.name,
            "diff": upper,
            "ref": ref,
        }
    finally:
        u.run(["podman", *PODMAN_FLAGS, "rmi", "-f", ref])
        tar.unlink(missing_ok=True)


def _layerfs(img: dict[str, str], *args: str) -> list[str]:
    return ["layerfs", "--root", img["root"], "--runroot", img["runroot"], *args]


def _ls_owners(user: RootlessUser, img: dict[str, str], path: str, ns: bool) -> dict[str, str]:
    prefix = ["podman", "unshare"] if ns else []
    r = user.run([*prefix, *_layerfs(img, "ls", "--json", img["layer"], path)], env=ENV)
    assert r.returncode == 0, r.stderr
    return {e["name"]: f"{e['uid']}:{e['gid']}" for e in json.loads(r.stdout)}


def _stat_owners(user: RootlessUser, img: dict[str, str], path: str, ns: bool) -> dict[str, str]:
    prefix = ["podman", "unshare"] if ns else []
    d = img["diff"] + path
    r = user.run([*prefix, "sh", "-c", f"cd {d} && stat -c '%n %u:%g' *"])
    assert r.returncode == 0, r.stderr
    return dict(line.split() for line in r.stdout.splitlines())


def test_index_built_in_one_namespace_read_in_another(
    rootless_user: RootlessUser,  # noqa: F811
    podman_image: dict[str, str],
) -> None:
    """The layer is pinned (podman recorded its digest), so ``layerfs ls`` saves its index
    beside it. Built inside ``podman unshare`` and then read outside (and back), each
    namespace sees the owners ``stat`` shows it there, never the other namespace's."""
    u, img = rootless_user, podman_image
    index = Path(img["diff"]).parent / "layerfs.index"
    index.unlink(missing_ok=True)
    for ns in (True, False, True, False):
        for path in ("/etc", "/var/lib", "/home"):
            assert _ls_owners(u, img, path, ns) == _stat_owners(u, img, path, ns), (ns, path)
        if ns:
            assert index.exists()  # built and saved inside (everything readable there)
    inside = _ls_owners(u, img, "/etc", True)
    outside = _ls_owners(u, img, "/etc", False)
    assert inside["shadow"] == "0:42"
    assert outside["shadow"] == f"{u.uid}:{u.sub_start + 41}"
    home_out = _ls_owners(u, img, "/home", False)
    assert home_out["u"] == f"{u.sub_start + 999}:{u.sub_start + 999}"


def test_view_inside_podman_unshare_serves_other_uids(
    rootless_user: RootlessUser,  # noqa: F811
    podman_image: dict[str, str],
) -> None:
    """Row 7: inside ``podman unshare``, a view of podman's store mounted without
    ``--allow-other`` is usable by uid 1000 of the namespace (allow_other is the default
    there, with default_permissions: uid 1000 reads its own 0700 dir, not root's shadow)."""
    u, img = rootless_user, podman_image
    mnt = u.home / "rv-row7"
    mnt.mkdir(exist_ok=True)
    os.chown(mnt, u.uid, u.gid)
    as_1000 = "setpriv --reuid=1000 --regid=1000 --clear-groups"
    script = (
        f"set -e; {' '.join(_layerfs(img, 'mount', img['layer'], str(mnt)))} >/dev/null; "
        f"trap '{' '.join(_layerfs(img, 'unmount', str(mnt)))} >/dev/null' EXIT; "
        f"{as_1000} cat {mnt}/home/u/notes; {as_1000} ls {mnt}/etc; "
        f"if {as_1000} cat {mnt}/etc/shadow 2>/dev/null; then echo shadow-readable; fi; "
        f"grep ' {mnt} ' /proc/self/mountinfo"
    )
    r = _in_namespace(u, script)
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    assert lines[0] == "private"
    assert "passwd" in lines[1:-1] and "shadow-readable" not in lines
    assert "allow_other" in lines[-1] and "default_permissions" in lines[-1]
    shutil.rmtree(mnt, ignore_errors=True)


def test_unreadable_subtree_read_write_inside_podman_unshare(
    rootless_user: RootlessUser,  # noqa: F811
    base: Path,
) -> None:
    """The same lowers under an upper dir (a container's view): reads as above, and creating
    a name inside the unreadable dir is EACCES in both, beside it works in both."""
    require_kernel_overlay()
    u = rootless_user
    lowers = _tree(base, u.uid, u.gid, 0)
    dirs = []
    for name in ("kernel", "lf"):
        for sub in ("mnt", "upper", "work"):
            d = base / name / sub
            d.mkdir(parents=True)
            os.chown(d, u.uid, u.gid)
        os.chown(base / name, u.uid, u.gid)
        dirs.append(base / name)
    k, lf = dirs

    def opts(d: Path) -> str:
        return f"lowerdir={':'.join(lowers)},upperdir={d}/upper,workdir={d}/work"

    out = base / "probe.json"
    touches = " ".join(
        f"if touch {d}/mnt/{p} 2>>{base}/touch.err; then echo {d.name}:{p}:ok; "
        f"else echo {d.name}:{p}:refused; fi;"
        for d in (k, lf)
        for p in ("pub/new", "partial/new", "merged/new")
    )
    script = (
        f"trap 'umount {k}/mnt 2>/dev/null; umount {lf}/mnt 2>/dev/null' EXIT; set -e; "
        f"mount -t overlay overlay -o userxattr,{opts(k)} {k}/mnt; "
        f"{PROG} -o {opts(lf)} {lf}/mnt; {touches} "
        f"VIEW_PROBE_ALSO={ALSO} python {PROBE} {k}/mnt {lf}/mnt > {out}"
    )
    r = _in_namespace(u, script)
    assert r.returncode == 0, r.stderr
    said: dict[str, set[str]] = {"kernel": set(), "lf": set()}
    for line in r.stdout.split():
        who, what = line.split(":", 1)
        said[who].add(what)
    assert said["lf"] == said["kernel"], (base / "touch.err").read_text()
    assert "lf:pub/new:ok" in r.stdout.split() and "lf:partial/new:refused" in r.stdout.split()
    got = json.loads(out.read_text())
    _check_degraded(got[f"{lf}/mnt"], got[f"{k}/mnt"])


def test_copy_up_of_unmapped_owner_is_eoverflow(tmp_path: Path) -> None:
    """In a user namespace mapping only root (``unshare -r``; 65534 is not mapped), a lower
    file of an unmapped owner cannot be written (copied up): kernel overlayfs says EOVERFLOW,
    the FUSE view EACCES (the kernel itself refuses writes to an inode whose reported owner
    has no mapping, before asking the daemon); a file of a mapped owner can."""
    require_kernel_overlay()
    low = Layer(tmp_path / "low")
    low.file("far", b"f", mode=0o666, uid=5, gid=5).file("near", b"n").finish()
    dirs = {}
    for name in ("kernel", "lf"):
        for sub in ("mnt", "upper", "work"):
            (tmp_path / name / sub).mkdir(parents=True)
        d = tmp_path / name
        dirs[name] = f"lowerdir={tmp_path}/low,upperdir={d}/upper,workdir={d}/work"
    k, lf = tmp_path / "kernel" / "mnt", tmp_path / "lf" / "mnt"
    tries = " ".join(
        f"if sh -c 'echo x >> {m}/{f}' 2>>{tmp_path}/err; then echo {n}:{f}:ok; "
        f"else echo {n}:{f}:refused; fi;"
        for n, m in (("kernel", k), ("lf", lf))
        for f in ("far", "near")
    )
    script = (
        f"trap 'umount {k} 2>/dev/null; umount {lf} 2>/dev/null' EXIT; set -e; "
        f"mount -t overlay overlay -o userxattr,{dirs['kernel']} {k}; "
        f"{PROG} -o {dirs['lf']} {lf}; {tries}"
    )
    r = subprocess.run(
        ["unshare", "-Urm", "sh", "-c", script],
        capture_output=True,
        text=True,
        env={**os.environ, **ENV},
    )
    assert r.returncode == 0, r.stderr
    assert sorted(r.stdout.split()) == [
        "kernel:far:refused",
        "kernel:near:ok",
        "lf:far:refused",
        "lf:near:ok",
    ], (tmp_path / "err").read_text()
    err = (tmp_path / "err").read_text().splitlines()
    assert err[0].endswith("kernel/mnt/far: Value too large for defined data type"), err
    assert err[1].endswith("lf/mnt/far: Permission denied"), err
