"""Build real OCI images with umoci (several layers, deletions, replaced directories)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from collections.abc import Callable
from pathlib import Path

from conftest import require_tool

Step = Callable[[Path], None]


def _umoci(*args: str) -> None:
    subprocess.run(["umoci", *args], check=True, capture_output=True)


def build_oci_image(workdir: Path, steps: list[Step], tag: str = "t") -> Path:
    """An OCI layout at workdir/img with one layer per step (each edits the rootfs)."""
    require_tool("umoci")
    layout = workdir / "img"
    _umoci("init", "--layout", str(layout))
    _umoci("new", "--image", f"{layout}:{tag}")
    for i, step in enumerate(steps):
        bundle = workdir / f"bundle{i}"
        _umoci("unpack", "--image", f"{layout}:{tag}", str(bundle))
        step(bundle / "rootfs")
        _umoci("repack", "--image", f"{layout}:{tag}", str(bundle))
        shutil.rmtree(bundle)
    return layout


def sample_steps() -> list[Step]:
    """Three layers: a base tree; deletions and a replaced directory; a file over a dir."""

    def base(root: Path) -> None:
        (root / "etc").mkdir()
        (root / "etc" / "hostname").write_text("base\n")
        (root / "etc" / "gone").write_text("deleted later\n")
        (root / "data" / "sub").mkdir(parents=True)
        (root / "data" / "sub" / "old").write_text("old contents\n")
        (root / "data" / "keep").write_text("kept\n")
        (root / "bin").mkdir()
        (root / "bin" / "tool").write_text("#!/bin/sh\necho tool\n")
        os.chmod(root / "bin" / "tool", 0o4755)
        os.symlink("tool", root / "bin" / "alias")
        os.link(root / "bin" / "tool", root / "bin" / "hardlink")
        (root / "swap").mkdir()
        (root / "swap" / "inner").write_text("inside a dir that becomes a file\n")

    def second(root: Path) -> None:
        (root / "etc" / "gone").unlink()
        shutil.rmtree(root / "data" / "sub")
        (root / "data" / "sub").mkdir()
        (root / "data" / "sub" / "new").write_text("new contents\n")
        (root / "etc" / "hostname").write_text("second\n")

    def third(root: Path) -> None:
        shutil.rmtree(root / "swap")
        (root / "swap").write_text("now a file\n")
        (root / "big").write_bytes(os.urandom(3 * 1024 * 1024))

    return [base, second, third]


def config_diff_ids(layout: Path, tag: str = "t") -> list[str]:
    """The rootfs.diff_ids of the tagged image's config."""
    index = json.loads((layout / "index.json").read_text())
    desc = next(
        m
        for m in index["manifests"]
        if (m.get("annotations") or {}).get("org.opencontainers.image.ref.name") == tag
    )
    manifest = json.loads(_blob(layout, desc["digest"]).read_text())
    config = json.loads(_blob(layout, manifest["config"]["digest"]).read_text())
    return list(config["rootfs"]["diff_ids"])


def layer_blobs(layout: Path, tag: str = "t") -> list[Path]:
    """Paths of the tagged image's layer blobs, bottom first."""
    index = json.loads((layout / "index.json").read_text())
    desc = next(
        m
        for m in index["manifests"]
        if (m.get("annotations") or {}).get("org.opencontainers.image.ref.name") == tag
    )
    manifest = json.loads(_blob(layout, desc["digest"]).read_text())
    return [_blob(layout, la["digest"]) for la in manifest["layers"]]


def _blob(layout: Path, digest: str) -> Path:
    algo, _, hex_part = digest.partition(":")
    return layout / "blobs" / algo / hex_part
