"""Compression detection and streaming (de)compression."""

from __future__ import annotations

import bz2
import gzip
import io
import lzma
import os

import pytest
import zstandard

from layerfs.archive.compression import Compression, detect, open_compressor, open_decompressed
from layerfs.errors import ArchiveError

PAYLOAD = os.urandom(50_000) + b"\0" * 100_000

COMPRESSORS = {
    Compression.NONE: lambda b: b,
    Compression.GZIP: gzip.compress,
    Compression.BZIP2: bz2.compress,
    Compression.XZ: lzma.compress,
    Compression.ZSTD: lambda b: zstandard.ZstdCompressor().compress(b),
}


@pytest.mark.parametrize("kind", list(Compression))
def test_detect_and_stream(kind: Compression) -> None:
    blob = COMPRESSORS[kind](PAYLOAD)
    assert detect(blob[:10]) == kind
    got, reader = open_decompressed(io.BytesIO(blob))
    assert got == kind
    out = b""
    while chunk := reader.read(7000):
        out += chunk
    assert out == PAYLOAD


@pytest.mark.parametrize("kind", list(Compression))
def test_compressor_round_trip(kind: Compression) -> None:
    sink = io.BytesIO()
    w = open_compressor(sink, kind)
    for i in range(0, len(PAYLOAD), 4096):
        w.write(PAYLOAD[i : i + 4096])
    w.close()
    assert not sink.closed
    assert open_decompressed(io.BytesIO(sink.getvalue()))[1].read() == PAYLOAD


def test_detect_uses_magic_only() -> None:
    assert detect(b"") == Compression.NONE
    assert detect(b"\x1f\x8b") == Compression.NONE  # too short for gzip's 3-byte magic
    assert detect(b"BZh91AY") == Compression.BZIP2
    assert open_decompressed(io.BytesIO(b"ab"))[1].read() == b"ab"


def test_multi_frame_zstd_and_multi_member_gzip() -> None:
    z = zstandard.ZstdCompressor()
    assert open_decompressed(io.BytesIO(z.compress(b"a") + z.compress(b"b")))[1].read() == b"ab"
    assert open_decompressed(io.BytesIO(gzip.compress(b"a") + gzip.compress(b"b")))[1].read() == (
        b"ab"
    )


@pytest.mark.parametrize("kind", [k for k in Compression if k != Compression.NONE])
def test_compressed_junk_is_an_archive_error(kind: Compression) -> None:
    blob = bytearray(COMPRESSORS[kind](PAYLOAD))
    junk = bytes(blob[:6]) + b"\x55" * 4000
    with pytest.raises(ArchiveError):
        open_decompressed(io.BytesIO(junk))[1].read()
    truncated = bytes(blob[: len(blob) // 2])
    with pytest.raises(ArchiveError):
        open_decompressed(io.BytesIO(truncated))[1].read()


class _OneByteReader(io.RawIOBase):
    def __init__(self, data: bytes) -> None:
        self._data = data

    def readable(self) -> bool:
        return True

    def read(self, n: int = -1) -> bytes:
        out, self._data = self._data[:1], self._data[1:]
        return out


def test_peek_survives_short_reads() -> None:
    blob = gzip.compress(b"hello")
    kind, r = open_decompressed(_OneByteReader(blob))  # type: ignore[arg-type]
    assert kind == Compression.GZIP and r.read() == b"hello"
