"""runc runs a real container whose root filesystem is a layerfs view (--for-container)."""

from __future__ import annotations

import io
import json
import os
import shutil
import subprocess
import tarfile
from pathlib import Path

import pytest

from conftest import LayerfsCLI, require_root, require_tool

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
