"""import-image from OCI layouts (umoci) and docker-archive tarballs; Go reads the result."""

from __future__ import annotations

import hashlib
import io
import json
import os
import subprocess
import tarfile
from pathlib import Path

import pytest

from conftest import GoTool, LayerfsCLI, StorePaths, require_root
from image_helpers import build_oci_image, config_diff_ids, layer_blobs, sample_steps

pytestmark = pytest.mark.interop


@pytest.fixture
def image(tmp_path: Path) -> Path:
    require_root()
    return build_oci_image(tmp_path / "build", sample_steps())


def _sha256_of_stream(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def test_import_image_chain_matches_the_config_diff_ids(
    image: Path, cli: LayerfsCLI, go: GoTool
) -> None:
    out = cli.out("import-image", "--name", "localhost/sample:t", f"oci:{image}:t").split()
    assert len(out) == 3
    diff_ids = config_diff_ids(image)
    for layer_id, diff_id in zip(out, diff_ids, strict=True):
        exported = cli.run("diff", "--compress", "none", layer_id).stdout
        assert _sha256_of_stream(exported) == diff_id
        assert json.loads(cli.out("layer", "--json", layer_id))[0]["diff-digest"] == diff_id
    # same ids as containers/image gives them, so skopeo and layerfs share layers
    assert out[0] == diff_ids[0].split(":")[1]
    images = go.out("images")
    assert "localhost/sample:t" in images
    top = json.loads(cli.out("layer", "--json", "localhost/sample:t"))[0]
    assert top["id"] == out[-1]
    assert go.out("layers").count("\n") >= 3


def test_reimport_reuses_layers(image: Path, cli: LayerfsCLI) -> None:
    first = json.loads(cli.out("import-image", "--json", f"oci:{image}:t"))
    again = json.loads(cli.out("import-image", "--json", "--name", "other:tag", f"oci:{image}:t"))
    assert again["layers"] == first["layers"] and again["reused"] == [True, True, True]
    assert len(json.loads(cli.out("layers", "--json"))) == 3


def test_skopeo_and_layerfs_land_on_the_same_layers(
    image: Path, paths: StorePaths, cli: LayerfsCLI, go: GoTool
) -> None:
    skopeo = subprocess.run(
        [
            "skopeo",
            "copy",
            f"oci:{image}:t",
            f"containers-storage:[overlay@{paths.root}+{paths.runroot}]localhost/by-skopeo:t",
        ],
        capture_output=True,
        text=True,
    )
    assert skopeo.returncode == 0, skopeo.stderr
    ids = json.loads(cli.out("import-image", "--json", f"oci:{image}:t"))
    assert ids["reused"] == [True, True, True]
    skopeo_layers = json.loads(cli.out("layers", "--json"))
    assert [r["id"] for r in skopeo_layers] == ids["layers"]


def test_a_corrupt_blob_is_rejected_and_nothing_is_kept(
    image: Path, cli: LayerfsCLI, paths: StorePaths
) -> None:
    blob = layer_blobs(image)[1]
    os.chmod(blob, 0o644)
    data = bytearray(blob.read_bytes())
    data[-20] ^= 0xFF  # inside the gzip trailer/data: the digest no longer matches
    blob.write_bytes(bytes(data))
    proc = cli.run("import-image", f"oci:{image}:t", check=False)
    assert proc.returncode == 1
    err = proc.stderr.decode()
    assert err.count("\n") == 1 and "layerfs: " in err
    layers = json.loads(cli.out("layers", "--json"))
    assert len(layers) == 1  # the good bottom layer stays; the bad one left nothing
    assert not any(r.get("flags") for r in layers)
    assert not os.path.exists(os.path.join(paths.root, "overlay-images", "images.json")) or (
        json.load(open(os.path.join(paths.root, "overlay-images", "images.json"))) == []
    )


def test_docker_archive_import(tmp_path: Path, cli: LayerfsCLI) -> None:
    layers = []
    for i, content in enumerate((b"first\n", b"second\n")):
        src = tmp_path / f"l{i}"
        src.mkdir()
        (src / f"file{i}").write_bytes(content)
        tar_path = tmp_path / f"layer{i}.tar"
        with tarfile.open(tar_path, "w", format=tarfile.PAX_FORMAT) as tf:
            tf.add(src / f"file{i}", arcname=f"file{i}")
        layers.append(tar_path)
    diff_ids = [_sha256_of_stream(p.read_bytes()) for p in layers]
    config = json.dumps(
        {"architecture": "amd64", "os": "linux", "rootfs": {"type": "layers", "diff_ids": diff_ids}}
    ).encode()
    config_name = hashlib.sha256(config).hexdigest() + ".json"
    manifest = [
        {
            "Config": config_name,
            "RepoTags": ["example.com/app:1"],
            "Layers": [f"{i}/layer.tar" for i in range(2)],
        }
    ]
    archive = tmp_path / "image.tar"
    with tarfile.open(archive, "w") as tf:
        for name, data in (
            (config_name, config),
            ("manifest.json", json.dumps(manifest).encode()),
        ):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
        for i, path in enumerate(layers):
            tf.add(path, arcname=f"{i}/layer.tar")
    out = cli.out("import-image", f"docker-archive:{archive}").split()
    assert len(out) == 2
    assert cli.run("cat", "example.com/app:1", "/file1").stdout == b"second\n"
    assert cli.run("cat", "example.com/app:1", "/file0").stdout == b"first\n"
