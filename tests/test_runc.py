"""runc runs a real container whose root filesystem is a layerfs view (--for-container):
read-only for an image's layers, read-write for a writable layer."""

from __future__ import annotations

import io
import json
import os
import shutil
import subprocess
import tarfile
from pathlib import Path

import pytest

from conftest import LayerfsCLI, StorePaths, require_root, require_tool
from fs_helpers import HIDDEN_XATTR_PREFIXES, assert_same_tree, kernel_overlay, snapshot

pytestmark = [pytest.mark.fuse, pytest.mark.root]


def _layer(entries: list[tuple[str, str, bytes | str | None, int]]) -> bytes:
    """entries: (name, kind 'f'|'d'|'l', data or link target, mode)."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tf:
        for name, kind, data, mode in entries:
            info = tarfile.TarInfo(name)
            info.mode = mode
            info.mtime = 1_700_000_000
            if kind == "d":
                info.type = tarfile.DIRTYPE
                tf.addfile(info)
            elif kind == "l":
                info.type = tarfile.SYMTYPE
                info.linkname = str(data)
                tf.addfile(info)
            else:
                assert isinstance(data, bytes)
                info.size = len(data)
                tf.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def _busybox_base() -> bytes:
    busybox = Path(require_tool("busybox")).resolve().read_bytes()
    entries: list[tuple[str, str, bytes | str | None, int]] = [
        (d, "d", None, 0o755) for d in ("bin", "proc", "dev", "sys", "tmp", "etc", "data")
    ]
    entries.append(("bin/busybox", "f", busybox, 0o755))
    for tool in ("sh", "cat", "ls", "id", "test", "stat"):
        entries.append((f"bin/{tool}", "l", "busybox", 0o777))
    entries.append(("etc/from-base", "f", b"base layer\n", 0o644))
    entries.append(("etc/deleted", "f", b"should vanish\n", 0o644))
    return _layer(entries)


def test_runc_runs_a_container_on_a_layerfs_view(cli: LayerfsCLI, tmp_path: Path) -> None:
    require_root()
    runc = require_tool("runc")
    cli.run("import-layer", "--name", "bb-base", input=_busybox_base())
    cli.run(
        "import-layer",
        "--name",
        "bb-mid",
        "--parent",
        "bb-base",
        input=_layer([("data/from-mid", "f", b"middle layer\n", 0o644)]),
    )
    cli.run(
        "import-layer",
        "--name",
        "bb-top",
        "--parent",
        "bb-mid",
        input=_layer(
            [
                ("etc/.wh.deleted", "f", b"", 0o644),
                ("etc/from-top", "f", b"top layer\n", 0o644),
            ]
        ),
    )
    rootfs = cli.out("mount", "--for-container", "bb-top").strip()
    bundle = tmp_path / "bundle"
    bundle.mkdir()
    container = f"layerfs-test-{os.getpid()}"
    try:
        subprocess.run([runc, "spec", "--bundle", str(bundle)], check=True)
        spec_path = bundle / "config.json"
        spec = json.loads(spec_path.read_text())
        spec["root"] = {"path": rootfs, "readonly": True}
        spec["process"]["terminal"] = False
        spec["process"]["args"] = [
            "sh",
            "-c",
            "cat /etc/from-base /data/from-mid /etc/from-top && test ! -e /etc/deleted && echo ok",
        ]
        spec_path.write_text(json.dumps(spec))
        proc = subprocess.run(
            [runc, "run", "--bundle", str(bundle), container],
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert proc.returncode == 0, proc.stderr
        assert proc.stdout.splitlines() == ["base layer", "middle layer", "top layer", "ok"]
    finally:
        subprocess.run([runc, "delete", "--force", container], capture_output=True)
        cli.run("unmount", "bb-top", check=False)
        shutil.rmtree(bundle, ignore_errors=True)


def test_runc_writes_through_a_read_write_layerfs_mount(
    cli: LayerfsCLI, paths: StorePaths, tmp_path: Path
) -> None:
    """A container on a read-write ``layerfs mount`` of a writable layer writes, deletes a
    lower file and renames a lower directory; after unmount the layer's upper dir holds
    exactly that (kernel overlay of the dirs shows the tree the view showed)."""
    require_root()
    runc = require_tool("runc")
    cli.run("import-layer", "--name", "bb-base", input=_busybox_base())
    cli.run(
        "import-layer",
        "--name",
        "bb-mid",
        "--parent",
        "bb-base",
        input=_layer(
            [
                ("data/sub", "d", None, 0o755),
                ("data/sub/from-mid", "f", b"middle layer\n", 0o644),
            ]
        ),
    )
    layer = cli.out("create-layer", "--writeable", "--name", "bb-ctr", "bb-mid").split()[0]
    rootfs = cli.out("mount", "--for-container", "bb-ctr").strip()
    bundle = tmp_path / "bundle"
    bundle.mkdir()
    container = f"layerfs-rw-test-{os.getpid()}"
    try:
        subprocess.run([runc, "spec", "--bundle", str(bundle)], check=True)
        spec_path = bundle / "config.json"
        spec = json.loads(spec_path.read_text())
        spec["root"] = {"path": rootfs, "readonly": False}
        spec["process"]["terminal"] = False
        spec["process"]["args"] = [
            "sh",
            "-c",
            "echo written > /etc/written && rm /etc/deleted && mv /data/sub /data/moved"
            " && echo more >> /etc/from-base && cat /data/moved/from-mid && echo ok",
        ]
        spec_path.write_text(json.dumps(spec))
        proc = subprocess.run(
            [runc, "run", "--bundle", str(bundle), container],
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert proc.returncode == 0, proc.stderr
        assert proc.stdout.splitlines() == ["middle layer", "ok"]
        view = snapshot(rootfs)
    finally:
        subprocess.run([runc, "delete", "--force", container], capture_output=True)
        cli.run("unmount", "bb-ctr", check=False)
        shutil.rmtree(bundle, ignore_errors=True)
    store = paths.store()
    with kernel_overlay([store.diff_dir(la.id) for la in store.chain(layer)], tmp_path / "k") as k:
        on_disk = snapshot(k, (*HIDDEN_XATTR_PREFIXES, b"trusted.layerfs."))
    assert_same_tree(on_disk, view)
    assert "data/sub" not in on_disk and "etc/deleted" not in on_disk
    assert on_disk["data/moved/from-mid"]["size"] == len(b"middle layer\n")
