"""Layer record encoding: Go's key order, omission rules, escapes and time format."""

from __future__ import annotations

import pytest

from layerfs.errors import CorruptStoreError
from layerfs.store.record import (
    Layer,
    decode_layers,
    encode_layers,
    format_created,
    go_json_dumps,
    new_layer_id,
    parse_created_ns,
)

# Written by containers-storage 1.43 (create-layer, import-layer, set-metadata, set-layer-data).
GO_WRITTEN = (
    b'[{"id":"2e9feae8331aa3e82853f7832023b519140b5b5bb20139c3ddcb26ea92402eb6","names":["base"],'
    b'"created":"2026-11-28T04:08:38.045542979Z"},{"id":"47df982bd0ee4d3f6a173dce81d9af12c8108ff7'
    b'254b03ac322d4be8f8cc7485","names":["top"],"parent":"2e9feae8331aa3e82853f7832023b519140b5b5'
    b'bb20139c3ddcb26ea92402eb6","metadata":"a\\u003cb","created":"2026-11-28T04:08:38.06739208Z",'
    b'"compressed-diff-digest":"sha256:832790465c6a31f18c0f4d0e370bd7515aa452af77bdabe6c79e1d8a594d'
    b'5c40","compressed-size":10240,"diff-digest":"sha256:832790465c6a31f18c0f4d0e370bd7515aa452af7'
    b'7bdabe6c79e1d8a594d5c40","diff-size":10240,"uidset":[0],"gidset":[0],"big-data-names":["keY"]}]'
)


def test_go_written_records_round_trip_byte_for_byte() -> None:
    layers = decode_layers(GO_WRITTEN, "layers.json")
    assert [la.names for la in layers] == [["base"], ["top"]]
    assert layers[1].metadata == "a<b"
    assert layers[1].size() == 10240
    assert encode_layers(layers) == GO_WRITTEN


def test_omission_rules_keep_only_id_and_created_when_empty() -> None:
    layer = Layer(id="abc", created="2026-01-01T00:00:00Z")
    assert go_json_dumps(layer.to_json_obj()) == '{"id":"abc","created":"2026-01-01T00:00:00Z"}'
    assert layer.size() == -1


def test_key_order_follows_the_go_struct_and_unknown_keys_survive() -> None:
    raw = (
        b'[{"future-key":{"a":1},"big-data-names":["k"],"flags":{"z":1,"a":true},'
        b'"id":"x","created":"0001-01-01T00:00:00Z","compression":2,"toc-digest":"sha256:00"}]'
    )
    (layer,) = decode_layers(raw, "f")
    text = encode_layers([layer]).decode()
    assert text.index('"id"') < text.index('"created"') < text.index('"toc-digest"')
    assert text.index('"toc-digest"') < text.index('"compression"') < text.index('"flags"')
    assert text.index('"flags"') < text.index('"big-data-names"') < text.index('"future-key"')
    assert '"future-key":{"a":1}' in text


def test_go_string_escapes() -> None:
    value = "<a&b>\u2028\u2029\b\f\n\t\x01é\\b"
    assert go_json_dumps(value) == (
        '"\\u003ca\\u0026b\\u003e\\u2028\\u2029\\u0008\\u000c\\n\\t\\u0001é\\\\b"'
    )


@pytest.mark.parametrize(
    ("ns", "text"),
    [
        (1_795_000_000_108_711_134, "2026-11-18T11:06:40.108711134Z"),
        (1_795_000_000_100_000_000, "2026-11-18T11:06:40.1Z"),
        (1_795_000_000_000_000_000, "2026-11-18T11:06:40Z"),
    ],
)
def test_created_format_trims_trailing_zeros_like_rfc3339nano(ns: int, text: str) -> None:
    assert format_created(ns) == text
    assert parse_created_ns(text) == ns


def test_created_with_offset_and_zero_time() -> None:
    assert parse_created_ns("2026-11-18T12:06:40.5+01:00") == 1_795_000_000_500_000_000
    assert parse_created_ns("0001-01-01T00:00:00Z") < 0


@pytest.mark.parametrize(
    "data",
    [
        b"[",
        b"\0\0\0\0",
        b'{"id":"x"}',
        b"[1]",
        b'[{"names":["a"]}]',
        b'[{"id":"x","names":"a"}]',
        b'[{"id":"x","created":"yesterday"}]',
        b"\xff\xfe",
    ],
)
def test_corrupt_arrays_raise_and_name_the_file(data: bytes) -> None:
    with pytest.raises(CorruptStoreError, match=r"layers\.json"):
        decode_layers(data, "/s/layers.json")


def test_empty_and_null_mean_no_layers() -> None:
    assert decode_layers(b"", "f") == []
    assert decode_layers(b"null", "f") == []


def test_random_ids_are_64_hex_and_never_all_digit_prefixes() -> None:
    for _ in range(200):
        layer_id = new_layer_id()
        assert len(layer_id) == 64
        int(layer_id, 16)
        assert not layer_id[:12].isdigit()
