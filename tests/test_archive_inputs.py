"""Inputs at and over the limits (issue 9, C9/C10), through the CLI: tar paths over
PATH_MAX/NAME_MAX, hostile image JSON, and ``diff --output`` to devices and FIFOs."""

from __future__ import annotations

import hashlib
import io
import json
import os
import stat
import subprocess
import tarfile
from pathlib import Path
from typing import Any

import pytest

from conftest import GoTool, LayerfsCLI, StorePaths, make_tar, require_root

LAYER_ID = "a" * 64


def _tar(*members: tuple[str, str, bytes | str]) -> bytes:
    """A PAX tar of (kind, name, data-or-linkname) members; kind is file, dir, sym or link."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tf:
        for kind, name, value in members:
            info = tarfile.TarInfo(name)
            info.mtime = 1_700_000_000
            if kind == "file":
                assert isinstance(value, bytes)
                info.size = len(value)
                tf.addfile(info, io.BytesIO(value))
                continue
            if kind == "dir":
                info.type, info.mode = tarfile.DIRTYPE, 0o755
            elif kind == "sym":
                info.type, info.linkname = tarfile.SYMTYPE, str(value)
            else:
                info.type, info.linkname = tarfile.LNKTYPE, str(value)
            tf.addfile(info)
    return buf.getvalue()


def _deep(total: int, last: str = "f") -> str:
    """A relative path of about ``total`` bytes made of 200-byte components, ending in last."""
    parts: list[str] = []
    while sum(len(p) + 1 for p in parts) + len(last) + 1 < total - 200:
        parts.append("d" * 200)
    rest = total - (sum(len(p) + 1 for p in parts) + len(last) + 1) - 1
    if rest > 0:
        parts.append("e" * rest)
    return "/".join([*parts, last])


def _assert_one_line_error(proc: subprocess.CompletedProcess[bytes], *needles: str) -> str:
    err = proc.stderr.decode()
    assert proc.returncode == 1, err
    assert err.startswith("layerfs: ") and err.count("\n") == 1, err
    assert "Traceback" not in err and "b'" not in err, err
    for needle in needles:
        assert needle in err, err
    return err


def _assert_no_layer_left(cli: LayerfsCLI, paths: StorePaths) -> None:
    assert cli.out("layers") == ""
    assert sorted(os.listdir(os.path.join(paths.root, "overlay"))) == [".has-mount-program", "l"]
    assert os.listdir(os.path.join(paths.root, "overlay", "l")) == []
    leftovers = [
        n
        for n in os.listdir(os.path.join(paths.root, "overlay-layers"))
        if n.endswith(".tar-split.gz") or n.startswith(".tmp-")
    ]
    assert leftovers == []


# --------------------------------------------------------------------- C9: path limits


HOSTILE_PATHS = {
    "path-over-path-max": (_tar(("file", _deep(4200), b"x")), "PATH_MAX"),
    "component-over-name-max": (_tar(("file", "dir/" + "n" * 256, b"x")), "NAME_MAX"),
    "dir-component-over-name-max": (_tar(("dir", "z" * 300, b"")), "NAME_MAX"),
    "symlink-target-over-path-max": (_tar(("sym", "s", "t/" * 2100)), "symlink target"),
    "hardlink-target-over-name-max": (
        _tar(("file", "ok", b"x"), ("link", "hl", "m" * 256)),
        "hard link target",
    ),
}


@pytest.mark.parametrize("case", sorted(HOSTILE_PATHS))
def test_names_over_the_kernel_limits_are_refused_at_import(
    cli: LayerfsCLI, paths: StorePaths, case: str
) -> None:
    """A PAX path over PATH_MAX imported (extraction goes component by component) and then
    broke mount and ls. Refused now, naming the entry, with nothing left behind."""
    data, needle = HOSTILE_PATHS[case]
    proc = cli.run("import-layer", "--name", "x", input=data, check=False)
    err = _assert_one_line_error(proc, needle, "entry ")
    assert len(err) < 600, err  # the entry is named, abbreviated
    _assert_no_layer_left(cli, paths)


def test_a_path_that_fits_in_the_view_but_not_below_the_layer_dir(
    cli: LayerfsCLI, paths: StorePaths
) -> None:
    """Under PATH_MAX as seen in the view, over it with the store's layer directory in
    front: Go refuses it (its lstat of the host path fails), and so do we."""
    proc = cli.run("import-layer", input=_tar(("file", _deep(4050), b"x")), check=False)
    _assert_one_line_error(proc, "PATH_MAX", "layer directory")
    _assert_no_layer_left(cli, paths)


def test_a_path_at_the_limit_imports_and_can_be_read(cli: LayerfsCLI, paths: StorePaths) -> None:
    diff_dir = os.path.join(paths.root, "overlay", LAYER_ID, "diff")
    room = 4095 - len(os.fsencode(diff_dir))  # "/" + the path: the host path is 4095 bytes
    name = _deep(room, last="f" * 200)
    assert len(os.fsencode(diff_dir)) + 1 + len(name) == 4095
    longest = "y" * 255
    data = _tar(("file", name, b"deep\n"), ("file", longest, b"long name\n"))
    cli.run("import-layer", "--id", LAYER_ID, input=data)
    assert cli.run("cat", LAYER_ID, "/" + name).stdout == b"deep\n"
    assert cli.run("cat", LAYER_ID, "/" + longest).stdout == b"long name\n"
    listed = json.loads(cli.out("ls", "--json", LAYER_ID, "/"))
    assert {r["name"] for r in listed} == {name.split("/")[0], longest}


@pytest.mark.parametrize(
    "case", ["path-over-path-max", "component-over-name-max", "symlink-target-over-path-max"]
)
def test_the_go_tool_refuses_the_same_tars(go: GoTool, case: str) -> None:
    """What containers-storage import-layer does with these tars: it refuses them too."""
    data, _ = HOSTILE_PATHS[case]
    proc = go.run("import-layer", input=data, check=False)
    assert proc.returncode != 0
    assert b"file name too long" in proc.stderr
    assert go.out("layers") == ""


# --------------------------------------------------------------------- C10: hostile JSON


def _docker_archive(
    path: Path,
    manifest: Any,
    *,
    config: Any = None,
    raw_config: bytes | None = None,
    raw_manifest: bytes | None = None,
) -> Path:
    layer = make_tar({"file": b"content\n"})
    diff_id = "sha256:" + hashlib.sha256(layer).hexdigest()
    if raw_config is None:
        if config is None:
            config = {"rootfs": {"type": "layers", "diff_ids": [diff_id]}}
        raw_config = json.dumps(config).encode()
    with tarfile.open(path, "w") as tf:
        members = {
            "config.json": raw_config,
            "0/layer.tar": layer,
            "manifest.json": raw_manifest
            if raw_manifest is not None
            else json.dumps(manifest).encode(),
        }
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
    return path


GOOD_ENTRY = {"Config": "config.json", "Layers": ["0/layer.tar"], "RepoTags": ["x:1"]}

HOSTILE_ARCHIVES: dict[str, tuple[dict[str, Any], str]] = {
    "no-config": ({"manifest": [{"Layers": ["0/layer.tar"]}]}, '"Config"'),
    "config-not-a-string": ({"manifest": [{**GOOD_ENTRY, "Config": 7}]}, '"Config"'),
    "entry-not-an-object": ({"manifest": ["config.json"]}, "not a JSON object"),
    "manifest-not-a-list": ({"manifest": GOOD_ENTRY}, "expected a JSON list"),
    "layers-a-string": ({"manifest": [{**GOOD_ENTRY, "Layers": "0/layer.tar"}]}, '"Layers"'),
    "layers-hold-a-number": ({"manifest": [{**GOOD_ENTRY, "Layers": [1]}]}, '"Layers"'),
    "no-layers": ({"manifest": [{**GOOD_ENTRY, "Layers": []}]}, '"Layers"'),
    "repotags-a-number": ({"manifest": [{**GOOD_ENTRY, "RepoTags": 5}]}, '"RepoTags"'),
    "missing-config-file": ({"manifest": [{**GOOD_ENTRY, "Config": "nope.json"}]}, "missing"),
    "rootfs-a-list": ({"manifest": [GOOD_ENTRY], "config": {"rootfs": []}}, '"rootfs"'),
    "diff-ids-a-number": (
        {"manifest": [GOOD_ENTRY], "config": {"rootfs": {"diff_ids": 10**30}}},
        '"diff_ids"',
    ),
    "diff-id-a-path": (
        {"manifest": [GOOD_ENTRY], "config": {"rootfs": {"diff_ids": ["sha256:../../x"]}}},
        "bad diff_id",
    ),
    "config-not-an-object": ({"manifest": [GOOD_ENTRY], "config": [1, 2]}, "image config"),
    "huge-integer": (
        {"manifest": [GOOD_ENTRY], "raw_config": b'{"rootfs": ' + b"9" * 5000 + b"}"},
        "not valid JSON",
    ),
    "deep-nesting": (
        {"manifest": [GOOD_ENTRY], "raw_config": b"[" * 100_000 + b"]" * 100_000},
        "nested too deeply",
    ),
    "manifest-not-json": ({"raw_manifest": b"\xff\xfe{"}, "not valid JSON"),
}


@pytest.mark.parametrize("case", sorted(HOSTILE_ARCHIVES))
def test_hostile_docker_archives_give_one_line_errors(
    tmp_path: Path, cli: LayerfsCLI, paths: StorePaths, case: str
) -> None:
    """A docker-archive without Config gave a KeyError traceback; every other unchecked key
    or type in manifest.json and the config likewise."""
    spec, needle = HOSTILE_ARCHIVES[case]
    archive = _docker_archive(
        tmp_path / "image.tar",
        spec.get("manifest"),
        config=spec.get("config"),
        raw_config=spec.get("raw_config"),
        raw_manifest=spec.get("raw_manifest"),
    )
    proc = cli.run("import-image", f"docker-archive:{archive}", check=False)
    _assert_one_line_error(proc, needle)
    assert cli.out("layers") == ""
    assert not os.path.exists(os.path.join(paths.root, "overlay-images", "images.json"))


def test_a_well_formed_docker_archive_still_imports(tmp_path: Path, cli: LayerfsCLI) -> None:
    archive = _docker_archive(tmp_path / "image.tar", [GOOD_ENTRY])
    cli.run("import-image", f"docker-archive:{archive}")
    assert cli.run("cat", "x:1", "/file").stdout == b"content\n"


class _Layout:
    """A hand-made OCI layout with one layer; pieces can be replaced by hostile JSON."""

    def __init__(self, root: Path) -> None:
        self.root = root
        (root / "blobs" / "sha256").mkdir(parents=True)
        (root / "oci-layout").write_text('{"imageLayoutVersion":"1.0.0"}')
        self.layer = make_tar({"file": b"content\n"})
        self.diff_id = "sha256:" + hashlib.sha256(self.layer).hexdigest()

    def blob(self, data: bytes | Any) -> dict[str, Any]:
        raw = data if isinstance(data, bytes) else json.dumps(data).encode()
        digest = hashlib.sha256(raw).hexdigest()
        (self.root / "blobs" / "sha256" / digest).write_bytes(raw)
        return {"digest": f"sha256:{digest}", "size": len(raw)}

    def manifest(self, **overrides: Any) -> dict[str, Any]:
        config = self.blob({"rootfs": {"type": "layers", "diff_ids": [self.diff_id]}})
        manifest: dict[str, Any] = {
            "schemaVersion": 2,
            "mediaType": "application/vnd.oci.image.manifest.v1+json",
            "config": {"mediaType": "application/vnd.oci.image.config.v1+json", **config},
            "layers": [
                {"mediaType": "application/vnd.oci.image.layer.v1.tar", **self.blob(self.layer)}
            ],
        }
        manifest.update(overrides)
        return manifest

    def index(self, manifests: Any) -> None:
        (self.root / "index.json").write_text(
            json.dumps({"schemaVersion": 2, "manifests": manifests})
        )


def _oci_cases(layout: _Layout) -> dict[str, tuple[Any, str]]:
    good = layout.blob(layout.manifest())
    layer_desc = layout.manifest()["layers"][0]
    nested = good
    for _ in range(6):
        nested = layout.blob({"schemaVersion": 2, "manifests": [nested]})
    return {
        "manifests-an-object": ({"m": good}, '"manifests"'),
        "descriptor-a-string": (["sha256:abc"], "malformed descriptor"),
        "platform-a-list": ([{**good, "platform": []}, good], '"platform"'),
        "size-negative": ([{**good, "size": -1}], "not a byte count"),
        "size-a-float": ([{**good, "size": 1e400}], "not a byte count"),
        "size-a-string": ([{**good, "size": "12"}], "not a byte count"),
        "size-wrong": ([{**good, "size": 10**30}], "descriptor says"),
        "layers-a-string": ([layout.blob(layout.manifest(layers="x"))], '"layers"'),
        "no-config": ([layout.blob({"schemaVersion": 2, "layers": [layer_desc]})], '"config"'),
        "config-a-list": ([layout.blob(layout.manifest(config=[1]))], "malformed descriptor"),
        "layer-size-wrong": (
            [layout.blob(layout.manifest(layers=[{**layer_desc, "size": 3}]))],
            "descriptor says 3",
        ),
        "indexes-nested-too-deep": ([nested], "nested more than"),
    }


@pytest.mark.parametrize(
    "case",
    [
        "manifests-an-object",
        "descriptor-a-string",
        "platform-a-list",
        "size-negative",
        "size-a-float",
        "size-a-string",
        "size-wrong",
        "layers-a-string",
        "no-config",
        "config-a-list",
        "layer-size-wrong",
        "indexes-nested-too-deep",
    ],
)
def test_hostile_oci_layouts_give_one_line_errors(
    tmp_path: Path, cli: LayerfsCLI, paths: StorePaths, case: str
) -> None:
    layout = _Layout(tmp_path / "img")
    manifests, needle = _oci_cases(layout)[case]
    layout.index(manifests)
    proc = cli.run("import-image", f"oci:{layout.root}", check=False)
    _assert_one_line_error(proc, needle)
    assert cli.out("layers") == ""
    assert not os.path.exists(os.path.join(paths.root, "overlay-images", "images.json"))


def test_a_well_formed_oci_layout_still_imports(tmp_path: Path, cli: LayerfsCLI) -> None:
    layout = _Layout(tmp_path / "img")
    layout.index([layout.blob(layout.manifest())])
    cli.run("import-image", "--name", "ok", f"oci:{layout.root}")
    assert cli.run("cat", "ok", "/file").stdout == b"content\n"


# --------------------------------------------------------------------- diff --output


@pytest.fixture
def one_layer(cli: LayerfsCLI) -> bytes:
    """Import a layer named "l"; returns its diff as written to stdout."""
    cli.run("import-layer", "--name", "l", input=make_tar({"a": b"1" * 5000, "b": None}))
    return cli.run("diff", "l").stdout


def _no_partials(directory: str) -> list[str]:
    return [n for n in os.listdir(directory) if n.endswith(".partial")]


def test_diff_to_a_fifo_writes_into_the_fifo(
    tmp_path: Path, cli: LayerfsCLI, one_layer: bytes
) -> None:
    """A temp file and a rename replaced the FIFO with a regular file; its reader got
    nothing."""
    fifo = tmp_path / "pipe"
    os.mkfifo(fifo)
    # Both ends are held open here, so neither the writer's open nor a read blocks; the
    # diff (about 10 KiB) fits in the pipe buffer, and is read once our writer end closes.
    read_fd = os.open(fifo, os.O_RDONLY | os.O_NONBLOCK)
    hold_fd = os.open(fifo, os.O_WRONLY)
    try:
        cli.run("diff", "--output", str(fifo), "l")
    finally:
        os.close(hold_fd)
    os.set_blocking(read_fd, True)
    with os.fdopen(read_fd, "rb") as f:
        received = f.read()
    assert stat.S_ISFIFO(os.lstat(fifo).st_mode)
    assert received == one_layer
    assert _no_partials(str(tmp_path)) == []


def test_diff_to_a_character_device_writes_into_it(
    tmp_path: Path, cli: LayerfsCLI, one_layer: bytes
) -> None:
    require_root()
    null = tmp_path / "null"
    os.mknod(null, stat.S_IFCHR | 0o666, os.makedev(1, 3))
    cli.run("diff", "--output", str(null), "l")
    assert stat.S_ISCHR(os.lstat(null).st_mode)
    assert os.lstat(null).st_rdev == os.makedev(1, 3)
    assert _no_partials(str(tmp_path)) == []


def test_diff_to_dev_null_leaves_dev_alone(cli: LayerfsCLI, one_layer: bytes) -> None:
    before = sorted(os.listdir("/dev"))
    cli.run("diff", "--output", "/dev/null", "l")
    assert stat.S_ISCHR(os.lstat("/dev/null").st_mode)
    assert sorted(os.listdir("/dev")) == before


def test_diff_to_dev_stdout_that_is_a_pipe(cli: LayerfsCLI, one_layer: bytes) -> None:
    proc = cli.run("diff", "--output", "/dev/stdout", "l")
    assert proc.stdout == one_layer
    assert os.path.islink("/dev/stdout") or not os.path.isfile("/dev/stdout")


def test_diff_to_a_regular_file_is_still_atomic(
    tmp_path: Path, cli: LayerfsCLI, one_layer: bytes
) -> None:
    out = tmp_path / "out.tar"
    out.write_bytes(b"old")
    cli.run("diff", "--output", str(out), "l")
    assert out.read_bytes() == one_layer
    assert _no_partials(str(tmp_path)) == []
