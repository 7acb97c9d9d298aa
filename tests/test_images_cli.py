"""``images``, ``image`` and ``--version``; image names wherever a view target is taken.

Oracle: the real Go tool (``containers-storage images``/``image``) on the same store, for
images it made (``create-image``, ``set-image-data``) and for images layerfs imported.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from rootless_helpers import RootlessUser, rootless_user  # noqa: F401  (fixture)

from conftest import GoTool, LayerfsCLI, StorePaths, make_tar
from image_helpers import build_oci_image, sample_steps

pytestmark = [pytest.mark.interop, pytest.mark.root]


def _go_image_text(go: GoTool, ref: str) -> dict[str, Any]:
    """Go's ``image REF`` text parsed into the fields layerfs shows."""
    out: dict[str, Any] = {"names": [], "data": [], "digest": ""}
    for line in go.out("image", ref).splitlines():
        key, _, value = line.partition(": ")
        if key == "ID":
            out["id"] = value
        elif key == "Name":
            out["names"].append(value)
        elif key == "Top Layer":
            out["layer"] = value
        elif key == "Digest":
            out["digest"] = value
        elif key == "Data":
            out["data"].append(value)
        elif key == "Size":
            out["size"] = int(value)
    return out


def _our_image_text(cli: LayerfsCLI, ref: str) -> dict[str, Any]:
    out: dict[str, Any] = {"names": [], "data": [], "digest": ""}
    for line in cli.out("image", ref).splitlines():
        key, _, value = line.partition(": ")
        field = {"ID": "id", "Top Layer": "layer", "Digest": "digest", "Size": "size"}.get(key)
        if key == "Name":
            out["names"].append(value)
        elif key == "Data":
            out["data"].append(value)
        elif key == "Created":
            out["created"] = value
        elif field:
            out[field] = int(value) if field == "size" else value
    return out


def _compare(cli: LayerfsCLI, go: GoTool, refs: list[str]) -> None:
    # --json: the record keys of images.json, byte for byte what Go prints
    assert cli.out("images", "--json").strip() == go.out("images", "-j").strip()
    for ref in refs:
        assert cli.out("image", "--json", ref).strip() == go.out("image", "-j", ref).strip()
        ours = _our_image_text(cli, ref)
        record = json.loads(cli.out("image", "--json", ref))[0]
        assert ours.pop("created") == record["created"]
        assert ours == _go_image_text(go, ref)
    # the listing: one row per image, the same ids, names, top layers and sizes
    rows = cli.out("images").splitlines()
    assert rows[0].split()[:3] == ["IMAGE", "ID", "NAMES"]
    go_ids = [r["id"] for r in json.loads(go.out("images", "-j"))]
    assert [row.split()[0] for row in rows[1:]] == [i[:12] for i in go_ids]
    for row, image_id in zip(rows[1:], go_ids, strict=True):
        want = _go_image_text(go, image_id)
        cols = row.split()
        assert cols[1] == (",".join(want["names"]) or "-")
        assert cols[2] == want["layer"][:12]
        assert cols[3] == (want["digest"][:19] or "-")
        assert int(cols[4]) == want["size"]
        assert cols[5] == json.loads(go.out("image", "-j", image_id))[0]["created"]


def test_images_made_by_go_read_by_layerfs(cli: LayerfsCLI, go: GoTool, paths: StorePaths) -> None:
    base = go.out("import-layer", "-n", "base", input=make_tar({"a": b"x" * 5000})).split()[0]
    top = go.out("import-layer", "-n", "top", base, input=make_tar({"b": b"y" * 10})).split()[0]
    bare = go.out("create-layer").split()[0]  # no diff digest: counts 0 in the size
    one = go.out("create-image", "-n", "one", "-n", "uno", "--metadata", "m", top).split()[0]
    go.run("set-image-data", "-f", "/etc/hostname", "one", "some-key")
    go.run("create-image", "-n", "two", bare)
    go.run("create-image", base)  # no names
    _compare(cli, go, ["one", "uno", one[:10], "two"])
    assert _our_image_text(cli, "one")["size"] > 5000 + 10


def test_images_imported_by_layerfs_read_by_go(cli: LayerfsCLI, go: GoTool, tmp_path: Path) -> None:
    layout = build_oci_image(tmp_path, sample_steps())
    cli.run("import-image", "--name", "localhost/sample:1", f"oci:{layout}:t")
    image_id = json.loads(cli.out("images", "--json"))[0]["id"]
    _compare(cli, go, ["localhost/sample:1", image_id, image_id[:7]])
    assert go.out("image", "localhost/sample:1").startswith(f"ID: {image_id}\n")


def test_unknown_and_ambiguous_images(cli: LayerfsCLI, go: GoTool) -> None:
    layer = go.out("create-layer").split()[0]
    ids = [go.out("create-image", layer).split()[0] for _ in range(17)]
    before = cli.out("images", "--json")
    r = cli.run("image", "nosuch", check=False)
    assert r.returncode == 1
    assert r.stderr.decode() == 'layerfs: image "nosuch" not known\n'
    # 17 ids, 16 hex digits: two share a first digit
    firsts = [i[0] for i in ids]
    prefix = next(c for c in firsts if firsts.count(c) > 1)
    r = cli.run("image", prefix, check=False)
    err = r.stderr.decode()
    assert r.returncode == 1 and err.count("\n") == 1
    assert f'image "{prefix}" not known: ambiguous id prefix' in err
    # one good, one bad: the good one is shown, rc 1
    r = cli.run("image", ids[0], "nosuch", check=False)
    assert r.returncode == 1 and r.stdout.decode().startswith(f"ID: {ids[0]}\n")
    assert cli.out("images", "--json") == before
    assert cli.out("images").splitlines()[1:] != []


def test_image_names_are_view_targets(cli: LayerfsCLI, go: GoTool, tmp_path: Path) -> None:
    """Every command taking a TARGET accepts an image name, id and id prefix."""
    layout = build_oci_image(tmp_path, sample_steps())
    cli.run("import-image", "--name", "localhost/sample:1", f"oci:{layout}:t")
    record = json.loads(cli.out("images", "--json"))[0]
    for target in ("localhost/sample:1", record["id"], record["id"][:8]):
        assert cli.out("cat", target, "/etc/hostname") == "second\n"
        assert "hostname" in cli.out("ls", target, "/etc")
        which = json.loads(cli.out("which", "--json", target, "/swap"))
        assert which["layer"] == record["layer"]
        assert cli.out("mounted", target).strip() == "0"
        assert cli.run("inspect", target).returncode == 0
        assert cli.run("export", target, "-o", str(tmp_path / "x.tar")).returncode == 0
        dest = tmp_path / f"dest-{len(target)}"
        dest.mkdir()
        cli.run("extract", target, "/etc/hostname", str(dest))
        assert (dest / "hostname").read_text() == "second\n"
    r = cli.run("ls", "localhost/nosuch:1", check=False)
    assert r.returncode == 1
    assert r.stderr.decode() == (
        'layerfs: layer "localhost/nosuch:1" not known: no layer or image has this name or id\n'
    )


def test_image_names_in_read_only_layer_commands(cli: LayerfsCLI, go: GoTool) -> None:
    """layer, names, metadata, list/get-layer-data, diff, changes, diffsize and exists take an
    image (its top layer) too; commands that change a layer take layers only."""
    base = go.out("import-layer", input=make_tar({"a": b"x" * 10})).split()[0]
    top = go.out("import-layer", base, input=make_tar({"b": b"y" * 5})).split()[0]
    go.run("set-metadata", "-m", "meta", top)
    go.run("set-layer-data", "-f", "/etc/hostname", top, "k")
    image = go.out("create-image", "-n", "img", top).split()[0]
    for args in (
        ["layer"],
        ["layer", "--json"],
        ["names"],
        ["metadata"],
        ["list-layer-data"],
        ["get-layer-data", "{}", "k"],
        ["diff", "--compress", "none"],
        ["changes", "--json"],
        ["diffsize"],
    ):

        def argv(ref: str, a: list[str] = args) -> list[str]:
            return [x.format(ref) for x in a] if "{}" in a else [*a, ref]

        want = cli.run(*argv(top)).stdout
        assert cli.run(*argv("img")).stdout == want, args
        assert cli.run(*argv(image[:9])).stdout == want, args
    assert cli.run("diff", "--compress", "none", "img", base).returncode == 0  # FROM: a layer
    r = cli.run("exists", "img", top, "nosuch", check=False)
    assert r.returncode == 1
    assert r.stdout.decode().splitlines() == [
        "img: true",
        f"{top}: true",
        "nosuch: false",
    ]
    r = cli.run("set-metadata", "-m", "x", "img", check=False)
    assert r.returncode == 1 and r.stderr.decode().startswith('layerfs: layer "img" not known')
    assert go.out("metadata", top).strip().endswith("meta")


def test_version_needs_no_fuse_or_root() -> None:
    r = subprocess.run(
        [sys.executable, "-m", "layerfs", "--version"], capture_output=True, text=True, check=True
    )
    lines = r.stdout.splitlines()
    from layerfs import __version__

    assert lines[0].startswith(f"layerfs {__version__} ")
    assert lines[1].startswith("pyfuse3 3.")
    assert ("patched" in lines[1]) or ("stock" in lines[1])
    assert lines[2].startswith("libfuse 3.")
    assert r.stderr == ""


def test_version_as_an_ordinary_user_without_fuse(
    rootless_user: RootlessUser,  # noqa: F811
) -> None:
    """An ordinary user, /dev/fuse hidden (bound over by /dev/null in a private mount
    namespace): the same three lines."""
    want = subprocess.run(
        [sys.executable, "-m", "layerfs", "--version"], capture_output=True, text=True, check=True
    ).stdout
    u = rootless_user
    env = u.env({"PYTHONPATH": str(Path(__file__).resolve().parent.parent)})
    as_user = [f"--reuid={u.uid}", f"--regid={u.gid}", "--init-groups", "--reset-env", "--"]
    hide_fuse = ["unshare", "--mount", "sh", "-c", 'mount --bind /dev/null /dev/fuse && exec "$@"']
    user_env = [f"{k}={v}" for k, v in env.items()]
    argv = [*hide_fuse, "-", "setpriv", *as_user, "env", *user_env, "python", "-m", "layerfs"]
    r = subprocess.run([*argv, "--version"], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert r.stdout == want


def test_version_tells_stock_from_patched() -> None:
    """The stock pyfuse3 in .venv-stock is reported as such (the same detection as the daemon)."""
    from pathlib import Path as P

    from conftest import require

    stock = P(__file__).resolve().parent.parent / ".venv-stock" / "bin" / "python"
    require(stock.exists(), ".venv-stock (scripts/setup makes it) is missing")
    env = {"PYTHONPATH": str(P(__file__).resolve().parent.parent), "PATH": "/usr/bin:/bin"}
    r = subprocess.run(
        [str(stock), "-m", "layerfs", "--version"], capture_output=True, text=True, env=env
    )
    assert r.returncode == 0, r.stderr
    line = r.stdout.splitlines()[1]
    assert "stock: no layerfs patches, no cache_readdir, cache_symlinks, no_open" in line


@pytest.mark.parametrize(
    "record",
    [
        {"id": 5, "names": ["x"], "layer": "l"},
        {"id": "i1", "names": "x", "layer": "l"},
        {"id": "i1", "names": ["x", 7], "layer": "l"},
        {"id": "i1", "names": ["x"], "layer": ["l"]},
    ],
)
def test_images_json_with_wrong_types_is_refused(
    cli: LayerfsCLI, go: GoTool, paths: StorePaths, record: dict[str, Any]
) -> None:
    """A record whose fields have the wrong JSON types (Go cannot decode it either): every
    command that reads images.json says so in one line, never shows the garbage or a Python
    repr of it, and leaves the file as it was; a plain layer stays usable where images.json
    is not needed to find it."""
    layer = cli.out("create-layer", "--name", "plain").split()[0]
    path = Path(paths.root) / "overlay-images" / "images.json"
    path.parent.mkdir(exist_ok=True)
    raw = json.dumps([record]).encode()
    path.write_bytes(raw)
    for argv in (["images"], ["images", "--json"], ["image", "x"], ["export", "x"]):
        r = cli.run(*argv, check=False)
        err = r.stderr.decode()
        assert r.returncode == 1 and r.stdout == b"", (argv, r.stdout)
        assert err.startswith("layerfs: ") and err.count("\n") == 1, (argv, err)
        assert "images.json" in err and "[" not in err.split("images.json", 1)[1], (argv, err)
    assert path.read_bytes() == raw
    assert cli.out("ls", "plain", "/") == ""
    assert cli.out("layer", layer).startswith("ID: ")
