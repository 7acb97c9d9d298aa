"""Hostile input end to end, and fuzzing of every parser that reads untrusted bytes.

The corpus goes through ``layerfs import-layer`` (most cases on top of a parent layer that
plants symlinks, so cross-layer attacks are included) and must give exit 1 with a single
``layerfs: ...`` line, no traceback, nothing written outside the store (a victim directory
beside it is compared before and after), the layer list unchanged and no new directory or
file in the store after ``gc``. tests/test_apply.py covers the same kinds of input as unit
tests of apply_tar; these check the CLI, the store's clean-up and the cross-layer cases.

The hypothesis tests feed mutated tar streams to import_layer/apply_tar, mutated tar-split
files to iter_entries, mutated JSON to decode_layers and to a Store: nothing but a
LayerfsError subclass may escape, nothing may be written outside the store, no partial layer
may stay registered.
"""

from __future__ import annotations

import bz2
import contextlib
import gzip
import io
import json
import lzma
import os
import tempfile
from pathlib import Path

import pytest
import zstandard
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from conftest import LayerfsCLI, StorePaths, require_root
from layerfs.archive.apply import apply_tar
from layerfs.archive.tarsplit import iter_entries
from layerfs.archive.transfer import import_layer
from layerfs.errors import LayerfsError
from layerfs.store.layers import Store
from layerfs.store.record import decode_layers
from rel_helpers import (
    make_tar,
    pax_entry,
    raw_entry,
    raw_header,
    scaled,
    tree_snapshot,
)

EXAMPLES = scaled(100, 2000, "LAYERFS_REL_EXAMPLES")
DEEP = b"../" * 20
_FIXED_VICTIM = "/tmp/layerfs-rel-victim"  # the corpus is built before tmp_path exists


def _victim_abs() -> bytes:
    return _FIXED_VICTIM.encode()


def _corpus() -> dict[str, tuple[bytes, bool]]:
    """name -> (stream, on top of the planted parent?)"""
    v = _victim_abs()
    ok = raw_entry(b"ok", b"fine")
    big_name = b"n" * (2 << 20)
    bomb_header = raw_header(b"bomb", size_field=b"77777777777\0")  # 8 GiB declared
    good_gz = gzip.compress(make_tar({"a": b"x" * 5000, "b": b"y" * 5000}))
    corpus: dict[str, tuple[bytes, bool]] = {
        "dotdot": (raw_entry(b"../victim/passwd", b"pwned"), False),
        "deep-dotdot-abs": (raw_entry(DEEP + v.lstrip(b"/") + b"/passwd", b"pwned"), False),
        "inner-dotdot": (ok + raw_entry(b"a/../../../x", b"p"), False),
        "symlink-abs-parent": (
            raw_entry(b"link", typeflag=b"2", link=v) + raw_entry(b"link/passwd", b"p"),
            False,
        ),
        "symlink-rel-parent": (
            raw_entry(b"up", typeflag=b"2", link=DEEP + v.lstrip(b"/"))
            + raw_entry(b"up/passwd", b"p"),
            False,
        ),
        "symlink-chain": (
            raw_entry(b"b", typeflag=b"2", link=v)
            + raw_entry(b"a", typeflag=b"2", link=b"b")
            + raw_entry(b"a/passwd", b"p"),
            False,
        ),
        "symlink-then-dir-over": (
            raw_entry(b"d", typeflag=b"2", link=v)
            + raw_entry(b"d/", typeflag=b"5")
            + raw_entry(b"d/passwd", b"p")
            + raw_entry(b"d", typeflag=b"2", link=v)
            + raw_entry(b"d/x", b"p"),
            False,
        ),
        "cross-layer-abs-symlink": (raw_entry(b"etc/passwd", b"pwned"), True),
        "cross-layer-rel-symlink": (raw_entry(b"up/passwd", b"pwned"), True),
        "cross-layer-hardlink": (raw_entry(b"h", typeflag=b"1", link=b"lowerfile"), True),
        "cross-layer-hardlink-via-symlink": (
            raw_entry(b"h", typeflag=b"1", link=b"etc/passwd"),
            True,
        ),
        "hardlink-dotdot": (raw_entry(b"h", typeflag=b"1", link=b"../victim/passwd"), False),
        "hardlink-deep": (raw_entry(b"h", typeflag=b"1", link=DEEP + b"etc/shadow"), False),
        "hardlink-abs-outside": (raw_entry(b"h", typeflag=b"1", link=v + b"/passwd"), False),
        "device-escape": (raw_entry(b"../victim/null", typeflag=b"3"), False),
        "fifo-escape": (raw_entry(DEEP + b"tmp/fifo", typeflag=b"6"), False),
        "root-symlink": (raw_entry(b".", typeflag=b"2", link=v), False),
        "slash-symlink": (raw_entry(b"./", typeflag=b"2", link=b"/"), False),
        "empty-name": (raw_entry(b"", b"x"), False),
        "bare-whiteout": (raw_entry(b"d/.wh."), False),
        "whiteout-dotdot": (raw_entry(b".wh..."), False),
        "duplicate": (raw_entry(b"f", b"1") + raw_entry(b"./f", b"2"), False),
        "pax-path-escape": (
            pax_entry({b"path": b"../victim/passwd"}, raw_entry(b"x", b"p")),
            False,
        ),
        "pax-linkpath-escape": (
            pax_entry(
                {b"linkpath": b"../../victim/passwd"}, raw_entry(b"h", typeflag=b"1", link=b"x")
            ),
            False,
        ),
        "gnu-longlink-escape": (
            raw_entry(b"././@LongLink", DEEP + b"victim\0", b"K")
            + raw_entry(b"h", typeflag=b"1", link=b"x"),
            False,
        ),
        "huge-pax-header": (pax_entry({b"comment": b"c" * (2 << 20)}, ok), False),
        "huge-gnu-longname": (raw_entry(b"././@LongLink", big_name, b"L") + ok, False),
        "pax-bad-record": (raw_entry(b"PaxHeaders/x", b"99999 path=a\n", b"x") + ok, False),
        "size-bomb-truncated": (bomb_header + bytes(4096), False),
        "gzip-size-bomb": (gzip.compress(bomb_header + bytes(1 << 16)), False),
        "negative-size": (raw_header(b"f", size_field=b"\xff" * 12), False),
        "bad-checksum": (raw_header(b"f", checksum_ok=False) + bytes(1024), False),
        "bad-octal": (raw_header(b"f", size_field=b"12x4\0\0\0\0\0\0\0\0"), False),
        "truncated-gzip": (good_gz[: len(good_gz) // 2], False),
        "gzip-bad-crc": (good_gz[:-8] + bytes(8), False),
        "gzip-corrupt-middle": (
            good_gz[:20] + bytes(b ^ 0x5A for b in good_gz[20:60]) + good_gz[60:],
            False,
        ),
        "zstd-truncated": (
            zstandard.ZstdCompressor().compress(make_tar({"a": bytes(9000)}))[:-9],
            False,
        ),
        "xz-truncated": (lzma.compress(make_tar({"a": os.urandom(9000)}))[:-40], False),
        "bzip2-truncated": (bz2.compress(make_tar({"a": os.urandom(9000)}))[:-30], False),
        "junk": (b"\x00\x01garbage" * 300, False),
        "zero-block-then-data": (bytes(512) + ok, False),
        "unknown-type": (raw_entry(b"f", typeflag=b"Z"), False),
    }
    return corpus


CORPUS = _corpus()


@pytest.fixture
def planted(cli: LayerfsCLI) -> str:
    """A parent layer whose symlinks lead to the victim (``etc`` directly, ``up`` via ``etc``)."""
    v = _victim_abs()
    tar = (
        raw_entry(b"etc", typeflag=b"2", link=v)
        + raw_entry(b"up", typeflag=b"2", link=b"etc")  # relative, chained to the absolute one
        + raw_entry(b"lowerfile", b"data")
    )
    return cli.out("import-layer", "--name", "planted", input=tar).split()[0]


def _store_state(paths: StorePaths) -> dict[str, object]:
    """Every path in the store with its type and (for files) content; the lock token and
    directory mtimes legitimately change on a rejected import and are left out."""
    out: dict[str, object] = {}
    for top in ("overlay", "overlay-layers"):
        for rel, (mode, size, _) in tree_snapshot(os.path.join(paths.root, top)).items():
            p = os.path.join(paths.root, top, rel)
            if rel == "layers.lock":
                continue
            if os.path.isfile(p) and not os.path.islink(p):
                with open(p, "rb") as f:
                    out[f"{top}/{rel}"] = (mode, f.read())
            else:
                out[f"{top}/{rel}"] = (mode, size if os.path.islink(p) else 0)
    return out


def test_corpus_is_big_enough() -> None:
    assert len(CORPUS) >= 25


@pytest.mark.parametrize("case", sorted(CORPUS))
def test_hostile_tar_through_the_cli(
    case: str, cli: LayerfsCLI, paths: StorePaths, planted: str, tmp_path: Path
) -> None:
    require_root()
    data, on_parent = CORPUS[case]
    victim = Path(_FIXED_VICTIM)
    victim.mkdir(exist_ok=True)
    (victim / "passwd").write_text("safe")
    try:
        outside_before = tree_snapshot(str(victim))
        tmp_before = sorted(os.listdir(tmp_path))
        layers_before = cli.out("layers", "--json")
        cli.run("gc")
        state_before = _store_state(paths)
        argv = ["import-layer", "--name", "hostile"] + (["--parent", planted] if on_parent else [])
        proc = cli.run(*argv, input=data, check=False, timeout=120)
        err = proc.stderr.decode(errors="replace")
        assert proc.returncode == 1, f"{case}: rc {proc.returncode}, stderr {err!r}"
        lines = err.rstrip("\n").split("\n")
        assert len(lines) == 1 and lines[0].startswith("layerfs: "), f"{case}: {err!r}"
        assert "Traceback" not in err
        assert tree_snapshot(str(victim)) == outside_before, f"{case}: victim changed"
        assert (victim / "passwd").read_text() == "safe"
        assert sorted(os.listdir(tmp_path)) == tmp_before
        assert cli.out("layers", "--json") == layers_before, f"{case}: layer list changed"
        assert cli.run("gc").stdout.strip() == b"", f"{case}: gc found leftovers"
        assert _store_state(paths) == state_before, f"{case}: store files changed"
    finally:
        for p in sorted(victim.rglob("*"), reverse=True):
            if p.is_dir() and not p.is_symlink():
                p.rmdir()
            else:
                p.unlink()
        victim.rmdir()


# ----------------------------------------------------------------------------- fuzzing

_SEEDS = [
    make_tar({"d/": None, "d/f": b"hello", "g": b"x" * 700}),
    raw_entry(b"l", typeflag=b"2", link=b"d")
    + raw_entry(b"d/", typeflag=b"5")
    + raw_entry(b"d/h", typeflag=b"1", link=b"l")
    + raw_entry(b"d/.wh.x"),
    pax_entry({b"path": b"p/q", b"SCHILY.xattr.user.a": b"v"}, raw_entry(b"x", b"data")),
    gzip.compress(make_tar({"a": b"a" * 3000, "b/": None})),
    zstandard.ZstdCompressor().compress(make_tar({"z": b"z" * 100})),
]


@st.composite
def mutated(draw: st.DrawFn, seeds: list[bytes]) -> bytes:
    data = bytearray(draw(st.sampled_from(seeds)))
    for _ in range(draw(st.integers(1, 6))):
        kind = draw(st.sampled_from(["flip", "set", "cut", "insert", "dup"]))
        if not data:
            break
        at = draw(st.integers(0, len(data) - 1))
        if kind == "flip":
            data[at] ^= 1 << draw(st.integers(0, 7))
        elif kind == "set":
            data[at] = draw(st.sampled_from([0, 0x2F, 0x2E, 0xFF, 0x30, 0x37, 0x20]))
        elif kind == "cut":
            del data[at : at + draw(st.integers(1, 600))]
        elif kind == "insert":
            data[at:at] = draw(st.binary(min_size=1, max_size=64))
        else:
            data += data[at : at + 512]
    return bytes(data)


_FUZZ = settings(
    max_examples=EXAMPLES,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    database=None,
)


@_FUZZ
@given(data=st.one_of(mutated(_SEEDS), st.binary(max_size=3000)))
def test_fuzz_import_layer(data: bytes) -> None:
    with tempfile.TemporaryDirectory() as top:
        store = Store(os.path.join(top, "root"), os.path.join(top, "run"))
        outside = sorted(os.listdir(top))
        home = os.path.join(top, "root", "overlay")
        before = sorted(os.listdir(home))
        try:
            import_layer(store, io.BytesIO(data), names=["fuzz"])
        except LayerfsError:
            assert [la.id for la in Store(store.root, store.runroot).layers()] == []
            store.gc()
            assert sorted(os.listdir(home)) == before
            assert not [n for n in os.listdir(store.files.layers_dir) if n.startswith(".tmp")]
        assert sorted(os.listdir(top)) == outside


@_FUZZ
@given(data=mutated(_SEEDS))
def test_fuzz_apply_tar_with_lowers(data: bytes) -> None:
    with tempfile.TemporaryDirectory() as top:
        lower = os.path.join(top, "lower")
        os.mkdir(lower)
        os.mkdir(os.path.join(top, "diff"))
        apply_tar(io.BytesIO(raw_entry(b"etc", typeflag=b"2", link=b"/etc")), lower)
        before = tree_snapshot(lower)
        with contextlib.suppress(LayerfsError):
            apply_tar(
                io.BytesIO(data),
                os.path.join(top, "diff"),
                lower_diff_dirs=[lower],
                tar_split_path=os.path.join(top, "ts"),
            )
        assert sorted(os.listdir(top)) in (["diff", "lower"], ["diff", "lower", "ts"])
        assert tree_snapshot(lower) == before


def _tarsplit_seed() -> bytes:
    with tempfile.TemporaryDirectory() as top:
        ts = os.path.join(top, "ts")
        os.mkdir(os.path.join(top, "d"))
        apply_tar(io.BytesIO(_SEEDS[0] + _SEEDS[2]), os.path.join(top, "d"), tar_split_path=ts)
        with open(ts, "rb") as f:
            return f.read()


_TS = _tarsplit_seed()
_TS_LINES = gzip.decompress(_TS)


@_FUZZ
@given(
    data=st.one_of(
        mutated([_TS]),
        mutated([_TS_LINES]).map(gzip.compress),
        st.lists(
            st.sampled_from(
                [
                    b'{"type":1}',
                    b'{"type":2,"payload":"!!"}',
                    b'{"type":"x"}',
                    b"[]",
                    b"null",
                    b'{"type":1,"name_raw":"////"}',
                    b'{"type":1,"size":-1}',
                    b'{"type":1,"size":1e999}',
                    b'{"type":2,"payload":null,"position":"x"}',
                    b"\xff\xfe",
                    b'{"type":1,"name":5}',
                ]
            ),
            max_size=5,
        ).map(lambda ls: gzip.compress(b"\n".join(ls))),
    )
)
def test_fuzz_tar_split_reader(data: bytes) -> None:
    with tempfile.TemporaryDirectory() as top:
        path = os.path.join(top, "x.tar-split.gz")
        with open(path, "wb") as f:
            f.write(data)
        try:
            for _ in iter_entries(path):
                pass
        except LayerfsError:
            pass


def _layers_seed() -> bytes:
    with tempfile.TemporaryDirectory() as top:
        store = Store(os.path.join(top, "r"), os.path.join(top, "rr"))
        a = store.create_layer(names=["a", "b<>&"])
        store.create_layer(names=["c"], parent=a.id)
        store.set_big_data(a.id, "k", b"v")
        with open(store.files.stable, "rb") as f:
            return f.read()


_LAYERS = _layers_seed()
_json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=8),
    lambda kids: (
        st.lists(kids, max_size=3) | st.dictionaries(st.text(max_size=6), kids, max_size=3)
    ),
    max_leaves=8,
)


@st.composite
def edited_records(draw: st.DrawFn) -> bytes:
    records = json.loads(_LAYERS)
    rec = draw(st.sampled_from(records))
    key = draw(st.sampled_from([*sorted(rec), "flags", "id", "parent", "names", "created"]))
    value = draw(
        st.one_of(
            _json_values,
            st.sampled_from(
                [
                    "../../../victim",
                    "../../../../victim",
                    "/",
                    "..",
                    ".",
                    "a/b",
                    "",
                    {"incomplete": True},
                    ["../x"],
                    -1,
                    2**70,
                    "2026-13-45T99:99:99Z",
                ]
            ),
        )
    )
    rec[key] = value
    if draw(st.booleans()):
        rec.setdefault("flags", {})
        if isinstance(rec["flags"], dict):
            rec["flags"]["incomplete"] = True
    return json.dumps(records).encode()


_layers_inputs = st.one_of(mutated([_LAYERS]), edited_records(), st.binary(max_size=200))


@_FUZZ
@given(data=_layers_inputs)
def test_fuzz_decode_layers(data: bytes) -> None:
    with contextlib.suppress(LayerfsError):
        decode_layers(data, "layers.json")


@_FUZZ
@given(data=_layers_inputs)
def test_fuzz_store_over_mutated_layers_json(data: bytes) -> None:
    with tempfile.TemporaryDirectory() as top:
        os.mkdir(os.path.join(top, "victim"))
        with open(os.path.join(top, "victim", "passwd"), "w") as f:
            f.write("safe")
        store = Store(os.path.join(top, "a", "b", "root"), os.path.join(top, "run"))
        with open(store.files.stable, "wb") as f:
            f.write(data)
        outside = tree_snapshot(os.path.join(top, "victim"))
        try:
            fresh = Store(store.root, store.runroot)
            for layer in fresh.layers():
                fresh.chain(layer.id)
            fresh.gc()
            fresh.create_layer(names=["after"])
        except LayerfsError:
            pass
        assert tree_snapshot(os.path.join(top, "victim")) == outside
        assert sorted(os.listdir(top)) == ["a", "run", "victim"]
