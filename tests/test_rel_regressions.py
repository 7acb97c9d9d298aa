"""Regression tests for bugs the reliability suite found in layerfs/store and layerfs/archive."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from conftest import GoTool, StorePaths
from layerfs.store import overlay


class _Killed(BaseException):
    """Stands in for SIGKILL: nothing after the raise runs."""


@pytest.mark.interop
def test_kill_while_writing_link_does_not_let_go_wipe_l_dir(
    go: GoTool, paths: StorePaths, monkeypatch: pytest.MonkeyPatch
) -> None:
    """overlay._write_small: ``link`` used to be created empty and then written, so a kill in
    between left an empty ``link``; containers-storage 1.43, removing that incomplete layer,
    then deleted ``l/`` + "" — the whole ``l/`` directory — breaking every other layer."""
    store = paths.store()
    keep = store.create_layer(names=["keep"])
    doomed = store.create_layer(names=["doomed"])
    store.driver.remove(doomed.id)  # rebuild its dirs, dying right after link is opened

    real_write = os.write

    def dying_write(fd: int, data: bytes) -> int:
        if os.readlink(f"/proc/self/fd/{fd}").startswith(store.driver.layer_dir(doomed.id)):
            raise _Killed
        return real_write(fd, data)

    monkeypatch.setattr(overlay.os, "write", dying_write)
    with pytest.raises(_Killed):
        store.driver.create(doomed.id, "")
    monkeypatch.undo()
    link_file = os.path.join(store.driver.layer_dir(doomed.id), "link")
    assert not os.path.exists(link_file) or open(link_file).read().strip()
    records = json.load(open(paths.layers_json))
    for r in records:
        if r["id"] == doomed.id:
            r["flags"] = {"incomplete": True}
    with open(paths.layers_json, "w") as f:
        json.dump(records, f)
    go.out("layers")  # Go deletes the incomplete layer
    with open(os.path.join(store.driver.layer_dir(keep.id), "link")) as f:
        link = f.read().strip()
    assert os.path.islink(os.path.join(store.driver.link_dir, link)), "Go removed l/ entries"


def test_corrupt_deflate_in_tar_split_is_an_archive_error(tmp_path: Path) -> None:
    """tarsplit.iter_entries: a gzip member with a corrupt deflate block raised zlib.error
    (not a LayerfsError), so `layerfs diff` on a damaged tar-split printed a traceback."""
    import gzip
    import zlib

    from layerfs.archive.tarsplit import iter_entries
    from layerfs.errors import ArchiveError

    good = gzip.compress(b'{"type":2,"payload":null,"position":0}\n' * 50, compresslevel=0)
    bad = good[:10] + bytes([good[10] ^ 0x06]) + good[11:]  # a stored block of bad length
    path = tmp_path / "x.tar-split.gz"
    path.write_bytes(bad)
    with pytest.raises(zlib.error):
        gzip.decompress(bad)
    with pytest.raises(ArchiveError, match="tar-split"):
        list(iter_entries(str(path)))


def test_infinite_number_in_tar_split_is_an_archive_error() -> None:
    """tarsplit.decode_entry: ``"size":1e999`` decodes to float inf and int() raised
    OverflowError, which escaped as a non-LayerfsError."""
    from layerfs.archive.tarsplit import decode_entry
    from layerfs.errors import ArchiveError

    for line in (b'{"type":1,"size":1e999}', b'{"type":2,"position":-1e999}'):
        with pytest.raises(ArchiveError, match="malformed entry"):
            decode_entry(line)


def test_path_like_layer_id_in_layers_json_is_refused(tmp_path: Path) -> None:
    """record.Layer.from_json_obj: an incomplete record with id "../../../../victim" made a
    plain `layers` listing (the load-time repair) rmtree a directory outside the store."""
    from layerfs.errors import CorruptStoreError
    from layerfs.store.layers import Store

    victim = tmp_path / "victim"
    victim.mkdir()
    (victim / "passwd").write_text("safe")
    store = Store(str(tmp_path / "a" / "b" / "root"), str(tmp_path / "run"))
    for bad in ("../../../../victim", "..", "a/b"):
        record = {"id": bad, "created": "2026-01-01T00:00:00Z", "flags": {"incomplete": True}}
        with open(store.files.stable, "w") as f:
            json.dump([record], f)
        with pytest.raises(CorruptStoreError, match="not a safe file name"):
            Store(store.root, store.runroot).layers()
        assert (victim / "passwd").read_text() == "safe"


def test_path_like_id_in_mountpoints_json_is_refused(tmp_path: Path) -> None:
    """mounts.MountTable._load: ids from mountpoints.json name per-layer lock and daemon
    files (``<runroot>/layerfs/locks/<id>.lock``); a path-like id reached outside."""
    from layerfs.errors import CorruptStoreError
    from layerfs.store.mounts import MountTable

    table = MountTable(str(tmp_path / "run" / "overlay-layers"))
    table.ensure_dir()
    with open(table.path, "w") as f:
        json.dump([{"id": "../../../x", "path": "/", "count": 1}], f)
    with pytest.raises(CorruptStoreError, match="unsafe layer id"):
        table.snapshot()
