"""Detect and (de)compress layer streams: none, bzip2, gzip, xz, zstd.

Detection looks only at magic bytes (never a file name), like containers/storage
``DetectCompression``. Everything streams: readers and writers work in chunks and
never hold a whole layer in memory.
"""

from __future__ import annotations

import bz2
import gzip
import io
import lzma
import zlib
from enum import IntEnum
from typing import Any, BinaryIO, cast

import zstandard

from layerfs.errors import ArchiveError

#: How many bytes :func:`open_decompressed` peeks at; the longest magic is 6 bytes.
PEEK_SIZE = 10


class Compression(IntEnum):
    """Compression of a layer blob; values are the ``compression`` key of a layer record."""

    NONE = 0
    BZIP2 = 1
    GZIP = 2
    XZ = 3
    ZSTD = 4


_MAGICS: tuple[tuple[bytes, Compression], ...] = (
    (b"\x42\x5a\x68", Compression.BZIP2),
    (b"\x1f\x8b\x08", Compression.GZIP),
    (b"\xfd\x37\x7a\x58\x5a\x00", Compression.XZ),
    (b"\x28\xb5\x2f\xfd", Compression.ZSTD),
)


def detect(prefix: bytes) -> Compression:
    """Return the compression whose magic number starts *prefix*, else ``NONE``."""
    for magic, kind in _MAGICS:
        if prefix.startswith(magic):
            return kind
    return Compression.NONE


class _PrefixedReader(io.RawIOBase):
    """A raw reader that yields *prefix* first and then the rest of *raw*."""

    def __init__(self, prefix: bytes, raw: BinaryIO) -> None:
        super().__init__()
        self._prefix = prefix
        self._raw = raw

    def readable(self) -> bool:
        return True

    def readinto(self, buf: Any) -> int:
        view = memoryview(buf).cast("B")
        if self._prefix:
            n = min(len(view), len(self._prefix))
            view[:n] = self._prefix[:n]
            self._prefix = self._prefix[n:]
            return n
        data = self._raw.read(len(view))
        if not data:
            return 0
        view[: len(data)] = data
        return len(data)


class _ErrorMappingReader(io.RawIOBase):
    """Wrap a decompressing reader so that codec errors become :class:`ArchiveError`."""

    def __init__(
        self, inner: Any, kind: Compression, tracker: _ZstdFrameTracker | None = None
    ) -> None:
        super().__init__()
        self._inner = inner
        self._kind = kind
        self._tracker = tracker

    def readable(self) -> bool:
        return True

    def readinto(self, buf: Any) -> int:
        view = memoryview(buf).cast("B")
        try:
            data = self._inner.read(len(view))
        except (
            OSError,
            EOFError,
            ValueError,
            zlib.error,
            lzma.LZMAError,
            zstandard.ZstdError,
        ) as exc:
            if isinstance(exc, OSError) and exc.errno is not None:
                raise
            name = self._kind.name.lower()
            raise ArchiveError(f"{name} stream is corrupt: {exc or type(exc).__name__}") from exc
        if not data:
            if self._tracker is not None and not self._tracker.complete():
                raise ArchiveError("zstd stream is corrupt: unexpected EOF inside a frame")
            return 0
        view[: len(data)] = data
        return len(data)


class _ZstdFrameTracker(io.RawIOBase):
    """Pass compressed bytes through while following zstd frame and block boundaries.

    zstandard's stream reader ends quietly when the input stops inside a frame; this walker
    lets :class:`_ErrorMappingReader` tell a complete stream from a truncated one.
    """

    def __init__(self, inner: Any) -> None:
        super().__init__()
        self._inner = inner
        self._buf = b""
        self._need = 4
        self._skip = 0
        self._state = "magic"
        self._checksum = False

    def readable(self) -> bool:
        return True

    def readinto(self, buf: Any) -> int:
        view = memoryview(buf).cast("B")
        data = self._inner.read(len(view))
        if not data:
            return 0
        view[: len(data)] = data
        self._feed(data)
        return len(data)

    def complete(self) -> bool:
        """True when the bytes seen so far end exactly at a frame boundary."""
        return self._state == "magic" and not self._buf and not self._skip

    def _feed(self, data: bytes) -> None:
        i, n = 0, len(data)
        while i < n:
            if self._skip:
                k = min(self._skip, n - i)
                self._skip -= k
                i += k
                continue
            take = min(self._need - len(self._buf), n - i)
            self._buf += data[i : i + take]
            i += take
            if len(self._buf) < self._need:
                return
            chunk, self._buf = self._buf, b""
            self._step(chunk)

    def _step(self, b: bytes) -> None:
        state = self._state
        if state == "magic":
            magic = int.from_bytes(b, "little")
            if magic == 0xFD2FB528:
                self._state, self._need = "fhd", 1
            elif magic & 0xFFFFFFF0 == 0x184D2A50:
                self._state, self._need = "skippable", 4
            else:
                raise ArchiveError("zstd stream is corrupt: bad frame magic")
        elif state == "skippable":
            self._skip = int.from_bytes(b, "little")
            self._state, self._need = "magic", 4
        elif state == "fhd":
            d = b[0]
            single = d >> 5 & 1
            self._checksum = bool(d >> 2 & 1)
            rest = (0 if single else 1) + (0, 1, 2, 4)[d & 3] + (single, 2, 4, 8)[d >> 6]
            self._state, self._need = ("hdr", rest) if rest else ("block", 3)
        elif state == "hdr":
            self._state, self._need = "block", 3
        elif state == "block":
            h = int.from_bytes(b, "little")
            self._skip = 1 if (h >> 1) & 3 == 1 else h >> 3
            if h & 1:
                self._state, self._need = ("checksum", 4) if self._checksum else ("magic", 4)
        else:  # checksum
            self._state, self._need = "magic", 4


def _peek(raw: BinaryIO) -> bytes:
    """Read up to :data:`PEEK_SIZE` bytes, retrying short reads until EOF."""
    prefix = b""
    while len(prefix) < PEEK_SIZE:
        chunk = raw.read(PEEK_SIZE - len(prefix))
        if not chunk:
            break
        prefix += chunk
    return prefix


def open_decompressed(raw: BinaryIO) -> tuple[Compression, BinaryIO]:
    """Detect the compression of *raw* and return ``(kind, streaming plain reader)``.

    The peeked bytes are replayed, so *raw* may be a pipe. Corrupt compressed data
    raises :class:`ArchiveError` when it is read.
    """
    prefix = _peek(raw)
    kind = detect(prefix)
    source = io.BufferedReader(_PrefixedReader(prefix, raw), 1 << 16)
    if kind == Compression.NONE:
        return kind, cast(BinaryIO, source)
    inner: Any
    if kind == Compression.GZIP:
        inner = gzip.GzipFile(fileobj=source, mode="rb")
    elif kind == Compression.BZIP2:
        inner = bz2.BZ2File(source, "rb")
    elif kind == Compression.XZ:
        inner = lzma.LZMAFile(source, "rb")  # noqa: SIM115 - returned to the caller
    else:
        inner = None
    tracker = None
    if kind == Compression.ZSTD:
        tracker = _ZstdFrameTracker(source)
        inner = zstandard.ZstdDecompressor().stream_reader(
            cast(BinaryIO, tracker), read_size=1 << 17, read_across_frames=True
        )
    reader = io.BufferedReader(_ErrorMappingReader(inner, kind, tracker), 1 << 16)
    return kind, cast(BinaryIO, reader)


class _ZstdWriter(io.RawIOBase):
    """Streaming zstd writer that finishes the frame on close without closing *out*."""

    def __init__(self, out: BinaryIO) -> None:
        super().__init__()
        self._writer = zstandard.ZstdCompressor(level=3).stream_writer(out, closefd=False)

    def writable(self) -> bool:
        return True

    def write(self, data: Any) -> int:
        self._writer.write(data)
        return len(memoryview(data).cast("B"))

    def close(self) -> None:
        if not self.closed:
            self._writer.flush(zstandard.FLUSH_FRAME)
            self._writer.close()  # type: ignore[no-untyped-call]
        super().close()


class _Passthrough(io.RawIOBase):
    """Uncompressed 'compressor': writes straight through and leaves *out* open."""

    def __init__(self, out: BinaryIO) -> None:
        super().__init__()
        self._out = out

    def writable(self) -> bool:
        return True

    def write(self, data: Any) -> int:
        self._out.write(data)
        return len(memoryview(data).cast("B"))


def open_compressor(out: BinaryIO, c: Compression) -> BinaryIO:
    """Return a writer that compresses into *out* with *c*.

    Closing the returned object finishes the compressed stream but does not close *out*.
    """
    if c == Compression.NONE:
        return cast(BinaryIO, _Passthrough(out))
    if c == Compression.GZIP:
        return cast(BinaryIO, gzip.GzipFile(fileobj=out, mode="wb", compresslevel=6, mtime=0))
    if c == Compression.BZIP2:
        return cast(BinaryIO, bz2.BZ2File(out, "wb"))
    if c == Compression.XZ:
        return cast(BinaryIO, lzma.LZMAFile(out, "wb"))
    if c == Compression.ZSTD:
        return cast(BinaryIO, _ZstdWriter(out))
    raise ArchiveError(f"unsupported compression {c!r}")
