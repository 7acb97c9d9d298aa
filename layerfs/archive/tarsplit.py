"""The ``<id>.tar-split.gz`` codec (vbatts/tar-split 0.11.2 as containers/storage 1.43 writes it).

The file is gzip of newline-separated JSON objects with keys, in this order,
``type`` (1 file, 2 segment), ``name`` or ``name_raw`` (base64, when the name is not UTF-8),
``size`` (omitted when 0), ``payload`` (segment: base64 of raw tar bytes; file: base64 of the
8-byte big-endian CRC-64/ISO of the content, ``null`` when the size is 0) and ``position``.

Besides the codec this module holds :class:`Crc64`, a streaming CRC-64/ISO (Go's
``crc64.MakeTable(crc64.ISO)``) fast enough for whole layers in pure Python.
"""

from __future__ import annotations

import base64
import contextlib
import gzip
import json
import os
import tempfile
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from types import TracebackType
from typing import IO, Any

import anycrc  # type: ignore[import-untyped]

from layerfs.errors import ArchiveError
from layerfs.store.record import go_json_dumps

FILE_TYPE = 1
SEGMENT_TYPE = 2

# ---------------------------------------------------------------------------------------------
# CRC-64/ISO as Go's hash/crc64 computes it (reflected, init and xorout all ones): anycrc's
# "CRC64-GO-ISO" model, a C implementation that chains (calc(b, calc(a)) == calc(a + b)).
# A pure-Python CRC capped imports at about 30 MB/s; this one runs at memory speed.

_CRC64_GO_ISO = anycrc.Model("CRC64-GO-ISO")
_ZEROS = bytes(1 << 20)


class Crc64:
    """Streaming CRC-64/ISO as Go's ``hash/crc64`` with the ISO table computes it."""

    def __init__(self) -> None:
        self._value = 0

    def update(self, data: bytes | bytearray | memoryview) -> None:
        """Add *data* to the checksum."""
        if data:
            self._value = _CRC64_GO_ISO.calc(data, self._value)

    def update_zeros(self, n: int) -> None:
        """Add *n* zero bytes (a sparse hole) without allocating them all."""
        while n > 0:
            chunk = min(n, len(_ZEROS))
            self._value = _CRC64_GO_ISO.calc(memoryview(_ZEROS)[:chunk], self._value)
            n -= chunk

    def value(self) -> int:
        """The checksum as an integer."""
        return int(self._value)

    def digest(self) -> bytes:
        """The checksum as Go's ``Sum(nil)`` gives it: 8 bytes, big-endian."""
        return self.value().to_bytes(8, "big")


# ---------------------------------------------------------------------------------------------
# Entries and the JSON-lines codec


@dataclass(frozen=True)
class Entry:
    """One tar-split record. ``name`` is the raw tar name (bytes); payload is decoded."""

    type: int
    name: bytes = b""
    size: int = 0
    payload: bytes | None = None
    position: int = 0


def encode_entry(e: Entry) -> bytes:
    """One JSON line (with the trailing newline) in Go's key order and omitempty rules."""
    parts = [f'"type":{e.type}']
    if e.name:
        try:
            parts.append('"name":' + go_json_dumps(e.name.decode("utf-8")))
        except UnicodeDecodeError:
            parts.append('"name_raw":"' + base64.b64encode(e.name).decode("ascii") + '"')
    if e.size:
        parts.append(f'"size":{e.size}')
    if e.payload is None:
        parts.append('"payload":null')
    else:
        parts.append('"payload":"' + base64.b64encode(e.payload).decode("ascii") + '"')
    parts.append(f'"position":{e.position}')
    return ("{" + ",".join(parts) + "}\n").encode("utf-8")


def decode_entry(line: bytes) -> Entry:
    """Parse one JSON line; raises :class:`ArchiveError` when it is not a tar-split entry."""
    try:
        obj: Any = json.loads(line)
        etype = int(obj["type"])
        if obj.get("name_raw"):
            name = base64.b64decode(obj["name_raw"], validate=True)
        else:
            name = str(obj.get("name") or "").encode("utf-8", "surrogateescape")
        raw_payload = obj.get("payload")
        payload = None if raw_payload is None else base64.b64decode(raw_payload, validate=True)
        size = int(obj.get("size") or 0)
        position = int(obj.get("position") or 0)
    except (ValueError, KeyError, TypeError, OverflowError) as exc:  # Overflow: int(1e999)
        raise ArchiveError(f"tar-split: malformed entry: {exc}") from exc
    if etype not in (FILE_TYPE, SEGMENT_TYPE) or size < 0:
        raise ArchiveError(f"tar-split: malformed entry of type {etype}")
    return Entry(etype, name, size, payload, position)


class TarSplitWriter:
    """Write a tar-split file atomically: temp file in the same directory, fsync, rename, 0600.

    Use as a context manager; :meth:`commit` publishes the file, leaving the block without
    committing (or with an exception) removes the temp file.
    """

    def __init__(self, path: str) -> None:
        self._path = path
        directory, base = os.path.split(os.path.abspath(path))
        fd, self._tmp = tempfile.mkstemp(prefix=f".tmp-{base}", dir=directory)
        os.fchmod(fd, 0o600)
        self._raw: IO[bytes] = os.fdopen(fd, "wb")
        self._gz = gzip.GzipFile(fileobj=self._raw, mode="wb", compresslevel=1, mtime=0)
        self._pos = 0
        self._done = False

    def add_segment(self, data: bytes) -> None:
        """Add raw tar bytes (headers, padding, end blocks, trailing data)."""
        self._add(Entry(SEGMENT_TYPE, payload=bytes(data)))

    def add_file(self, name: bytes, size: int, crc: bytes | None) -> None:
        """Add a file entry; *crc* is the 8-byte CRC-64, or None when *size* is 0."""
        self._add(Entry(FILE_TYPE, name=name, size=size, payload=crc if size else None))

    def _add(self, e: Entry) -> None:
        self._gz.write(encode_entry(Entry(e.type, e.name, e.size, e.payload, self._pos)))
        self._pos += 1

    def commit(self) -> None:
        """Finish the gzip stream, fsync and rename over the target path."""
        self._gz.close()
        self._raw.flush()
        os.fsync(self._raw.fileno())
        self._raw.close()
        os.rename(self._tmp, self._path)
        self._done = True

    def abort(self) -> None:
        """Drop the temp file (idempotent)."""
        if self._done:
            return
        self._done = True
        with contextlib.suppress(OSError):
            self._gz.close()
        with contextlib.suppress(OSError):
            self._raw.close()  # flushing may fail again (ENOSPC); the fd is closed anyway
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self._tmp)

    def __enter__(self) -> TarSplitWriter:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.abort()


def iter_entries(path: str) -> Iterator[Entry]:
    """Stream the entries of a tar-split file."""
    try:
        with gzip.open(path, "rb") as f:
            for line in f:
                if line.strip():
                    yield decode_entry(line)
    except (OSError, EOFError, zlib.error) as exc:  # zlib.error: a corrupt deflate stream
        if isinstance(exc, FileNotFoundError):
            raise
        if isinstance(exc, OSError) and exc.errno is not None:
            raise
        raise ArchiveError(f"tar-split {path}: {exc}") from exc


# ---------------------------------------------------------------------------------------------
# A streaming tar reader with raw accounting (what tar-split's forked archive/tar does)

BLOCK = 512
_ZERO_BLOCK = bytes(BLOCK)
#: Trailing data after the end-of-archive marker is kept in segments of at most this size.
PADDING_CHUNK = 1 << 20
#: Largest PAX or GNU long-name header accepted (Go's archive/tar uses 1 MiB as well).
MAX_META_SIZE = 1 << 20

REG, LNK, SYM, CHR, BLK, DIR, FIFO = b"0", b"1", b"2", b"3", b"4", b"5", b"6"
XHD, XGL, GNU_LONGNAME, GNU_LONGLINK, GNU_SPARSE = b"x", b"g", b"L", b"K", b"S"


@dataclass
class TarMember:
    """One tar entry after PAX/GNU extensions are merged (Go's ``tar.Header``)."""

    name: bytes
    linkname: bytes
    typeflag: bytes
    mode: int
    uid: int
    gid: int
    uname: bytes
    gname: bytes
    mtime_ns: int
    atime_ns: int | None
    devmajor: int
    devminor: int
    size: int
    xattrs: dict[str, bytes]
    sparse: list[tuple[int, int]] | None = None
    data_size: int = 0

    @property
    def display_name(self) -> str:
        """The name for messages (undecodable bytes escaped)."""
        return self.name.decode("utf-8", "backslashreplace")


def _parse_string(b: bytes) -> bytes:
    i = b.find(b"\0")
    return b if i < 0 else b[:i]


def _parse_number(b: bytes, what: str) -> int:
    if b and b[0] & 0x80:
        # base-256, two's complement; the first byte's top bit is the marker
        inv = 0xFF if b[0] & 0x40 else 0x00
        v = 0
        for i, c in enumerate(b):
            c ^= inv
            if i == 0:
                c &= 0x7F
            v = (v << 8) | c
        return ~v if inv else v
    s = b.strip(b" \0")
    if not s:
        return 0
    try:
        return int(s, 8)
    except ValueError:
        raise ArchiveError(f"invalid tar header: bad {what} field {b!r}") from None


def _parse_pax_time(v: bytes, key: str) -> int:
    s = v.decode("ascii", "replace")
    try:
        neg = s.startswith("-")
        whole, _, frac = s.lstrip("-").partition(".")
        ns = int(whole or "0") * 1_000_000_000 + int((frac + "000000000")[:9] or "0")
        return -ns if neg else ns
    except ValueError:
        raise ArchiveError(f"invalid tar header: bad PAX {key} {s!r}") from None


def _parse_pax(data: bytes) -> list[tuple[str, bytes]]:
    """PAX records ``"%d %s=%s\\n"`` in order (keys are ASCII, values raw bytes)."""
    out: list[tuple[str, bytes]] = []
    pos = 0
    while pos < len(data):
        if data[pos] == 0 and not data[pos:].strip(b"\0"):
            break
        sp = data.find(b" ", pos)
        try:
            length = int(data[pos:sp]) if sp > pos else -1
        except ValueError:
            length = -1
        if length <= 0 or pos + length > len(data) or data[pos + length - 1] != 0x0A:
            raise ArchiveError("invalid tar header: malformed PAX record")
        key, eq, value = data[sp + 1 : pos + length - 1].partition(b"=")
        if not eq:
            raise ArchiveError("invalid tar header: malformed PAX record")
        out.append((key.decode("utf-8", "surrogateescape"), value))
        pos += length
    return out


class TarSplitter:
    """Read a tar stream entry by entry, keeping every byte that is not file content.

    After :meth:`next` returns a member, :meth:`take_raw` gives the raw bytes consumed since
    the previous member's content (padding, extended headers, the header); the member's
    content is then read with :meth:`read`. After :meth:`next` returns None,
    :meth:`take_raw` holds the end-of-archive bytes and :meth:`trailing` yields the rest.
    End-of-archive rules follow Go's archive/tar: EOF at a header boundary ends the archive
    cleanly, as do one or two zero blocks; a zero block followed by a non-zero one is an error.
    """

    def __init__(self, stream: IO[bytes]) -> None:
        self._f = stream
        self._raw = bytearray()
        self._remaining = 0
        self._pad = 0
        self._last = ""

    def _read_full(self, n: int) -> bytes:
        parts = []
        got = 0
        while got < n:
            chunk = self._f.read(min(n - got, 1 << 20))
            if not chunk:
                break
            parts.append(chunk)
            got += len(chunk)
        return b"".join(parts)

    def _where(self) -> str:
        return f'after entry "{self._last}"' if self._last else "at the start of the archive"

    def take_raw(self) -> bytes:
        """Return and clear the raw bytes accounted since the last call."""
        out = bytes(self._raw)
        self._raw.clear()
        return out

    def read(self, n: int) -> bytes:
        """Read up to *n* bytes of the current member's stored content ("" at its end)."""
        n = min(n, self._remaining)
        if n <= 0:
            return b""
        data = self._read_full(n)
        if len(data) < n:
            raise ArchiveError(f'entry "{self._last}": unexpected EOF in file content')
        self._remaining -= n
        return data

    def _skip_rest(self) -> None:
        while self._remaining:
            self.read(1 << 20)
        if self._pad:
            pad = self._read_full(self._pad)
            if pad and len(pad) < self._pad:
                raise ArchiveError(f"unexpected EOF in padding {self._where()}")
            self._raw += pad
            self._pad = 0 if pad else -1

    def _read_meta(self, size: int, kind: str) -> bytes:
        if size < 0 or size > MAX_META_SIZE:
            raise ArchiveError(f"invalid tar header: {kind} of {size} bytes {self._where()}")
        data = self._read_full(size)
        pad = self._read_full(-size % BLOCK)
        if len(data) < size or len(pad) < -size % BLOCK:
            raise ArchiveError(f"unexpected EOF in {kind} {self._where()}")
        self._raw += data + pad
        return data

    def next(self) -> TarMember | None:
        """Advance to the next member, or return None at the end of the archive."""
        self._skip_rest()
        if self._pad < 0:  # EOF where padding was expected: Go ends cleanly
            return None
        pax: list[tuple[str, bytes]] = []
        long_name: bytes | None = None
        long_link: bytes | None = None
        while True:
            blk = self._read_full(BLOCK)
            if not blk:
                return None
            if len(blk) < BLOCK:
                self._raw += blk
                raise ArchiveError(f"unexpected EOF in tar header {self._where()}")
            self._raw += blk
            if blk == _ZERO_BLOCK:
                blk2 = self._read_full(BLOCK)
                self._raw += blk2
                if not blk2 or blk2 == _ZERO_BLOCK:
                    return None
                if len(blk2) < BLOCK:
                    raise ArchiveError(f"unexpected EOF in end-of-archive marker {self._where()}")
                raise ArchiveError(f"invalid tar header {self._where()}")
            self._check_sum(blk)
            typeflag = blk[156:157]
            size = _parse_number(blk[124:136], "size")
            if typeflag in (XHD, XGL):
                data = self._read_meta(size, "PAX header")
                records = _parse_pax(data)
                if typeflag == XGL:
                    m = self._member(blk, records, None, None)
                    m.size, m.data_size, m.uid, m.gid = 0, 0, 0, 0
                    self._remaining = self._pad = 0
                    self._last = m.display_name
                    return m
                pax = records
                continue
            if typeflag in (GNU_LONGNAME, GNU_LONGLINK):
                data = _parse_string(self._read_meta(size, "GNU long name"))
                if typeflag == GNU_LONGNAME:
                    long_name = data
                else:
                    long_link = data
                continue
            m = self._member(blk, pax, long_name, long_link)
            self._last = m.display_name
            return m

    def _check_sum(self, blk: bytes) -> None:
        want = _parse_number(blk[148:156], "checksum")
        unsigned = sum(blk[:148]) + 8 * 32 + sum(blk[156:])
        signed = sum(c - 256 if c > 127 else c for c in blk[:148] + blk[156:]) + 8 * 32
        if want not in (unsigned, signed):
            raise ArchiveError(f"invalid tar header (checksum mismatch) {self._where()}")

    def _member(
        self,
        blk: bytes,
        pax: list[tuple[str, bytes]],
        long_name: bytes | None,
        long_link: bytes | None,
    ) -> TarMember:
        magic, version = blk[257:263], blk[263:265]
        name = _parse_string(blk[0:100])
        gnu = magic == b"ustar " and version == b" \0"
        atime: int | None = None
        if magic == b"ustar\0" and version == b"00":
            star = blk[508:512] == b"tar\0"
            prefix = _parse_string(blk[345:476] if star else blk[345:500])
            if prefix:
                name = prefix + b"/" + name
        elif gnu and blk[345] != 0:
            atime = _parse_number(blk[345:357], "atime") * 1_000_000_000
        typeflag = blk[156:157]
        m = TarMember(
            name=name,
            linkname=_parse_string(blk[157:257]),
            typeflag=typeflag,
            mode=_parse_number(blk[100:108], "mode"),
            uid=_parse_number(blk[108:116], "uid"),
            gid=_parse_number(blk[116:124], "gid"),
            uname=_parse_string(blk[265:297]),
            gname=_parse_string(blk[297:329]),
            mtime_ns=_parse_number(blk[136:148], "mtime") * 1_000_000_000,
            atime_ns=atime,
            devmajor=_parse_number(blk[329:337], "devmajor"),
            devminor=_parse_number(blk[337:345], "devminor"),
            size=_parse_number(blk[124:136], "size"),
            xattrs={},
        )
        sparse_name: bytes | None = None
        sparse_size: int | None = None
        sparse_major = sparse_minor = b""
        sparse_map: list[int] = []
        for key, value in pax:
            try:
                if key == "path":
                    m.name = value
                elif key == "linkpath":
                    m.linkname = value
                elif key == "uname":
                    m.uname = value
                elif key == "gname":
                    m.gname = value
                elif key == "uid":
                    m.uid = int(value)
                elif key == "gid":
                    m.gid = int(value)
                elif key == "size":
                    m.size = int(value)
                elif key == "mtime":
                    m.mtime_ns = _parse_pax_time(value, key)
                elif key == "atime":
                    m.atime_ns = _parse_pax_time(value, key)
                elif key.startswith("SCHILY.xattr."):
                    m.xattrs[key[len("SCHILY.xattr.") :]] = value
                elif key == "GNU.sparse.name":
                    sparse_name = value
                elif key in ("GNU.sparse.size", "GNU.sparse.realsize"):
                    sparse_size = int(value)
                elif key == "GNU.sparse.major":
                    sparse_major = value
                elif key == "GNU.sparse.minor":
                    sparse_minor = value
                elif key in ("GNU.sparse.offset", "GNU.sparse.numbytes"):
                    sparse_map.append(int(value))
                elif key == "GNU.sparse.map":
                    sparse_map = [int(x) for x in value.split(b",") if x]
            except ValueError:
                raise ArchiveError(f"invalid tar header: bad PAX {key} {self._where()}") from None
        if long_name is not None:
            m.name = long_name
        if long_link is not None:
            m.linkname = long_link
        if m.typeflag in (b"\0", b"7"):
            m.typeflag = DIR if m.name.endswith(b"/") and m.typeflag == b"\0" else REG
        if m.size < 0 or m.uid < 0 or m.gid < 0:
            raise ArchiveError(f'invalid tar header for entry "{m.display_name}"')
        header_only = m.typeflag in (LNK, SYM, CHR, BLK, DIR, FIFO)
        physical = 0 if header_only else m.size
        if m.typeflag == GNU_SPARSE:
            physical = m.size
            m.sparse = self._old_gnu_sparse(blk)
            m.size = _parse_number(blk[483:495], "realsize")
            m.typeflag = REG
        elif sparse_size is not None or sparse_map or sparse_major:
            if sparse_name is not None:
                m.name = sparse_name
            if sparse_major == b"1" and sparse_minor == b"0":
                sparse_map, used = self._sparse_map_10(m)
                physical -= used
            if len(sparse_map) % 2:
                raise ArchiveError(f'entry "{m.display_name}": malformed sparse map')
            m.sparse = [(sparse_map[i], sparse_map[i + 1]) for i in range(0, len(sparse_map), 2)]
            if sparse_size is not None:
                m.size = sparse_size
        if m.sparse is not None:
            end = 0
            for off, n in m.sparse:
                if off < end or n < 0 or off + n > m.size:
                    raise ArchiveError(f'entry "{m.display_name}": malformed sparse map')
                end = off + n
            if sum(n for _, n in m.sparse) != physical:
                raise ArchiveError(f'entry "{m.display_name}": sparse map does not match size')
        if physical < 0:
            raise ArchiveError(f'invalid tar header for entry "{m.display_name}"')
        m.data_size = physical
        self._remaining = physical
        self._pad = -physical % BLOCK
        return m

    def _old_gnu_sparse(self, blk: bytes) -> list[tuple[int, int]]:
        out: list[tuple[int, int]] = []

        def take(area: bytes, count: int) -> None:
            for i in range(count):
                off = _parse_number(area[i * 24 : i * 24 + 12], "sparse offset")
                n = _parse_number(area[i * 24 + 12 : i * 24 + 24], "sparse size")
                if off or n:
                    out.append((off, n))

        take(blk[386:482], 4)
        extended = blk[482]
        while extended:
            ext = self._read_full(BLOCK)
            if len(ext) < BLOCK:
                raise ArchiveError(f"unexpected EOF in sparse header {self._where()}")
            self._raw += ext
            take(ext[:504], 21)
            extended = ext[504]
        return out

    def _sparse_map_10(self, m: TarMember) -> tuple[list[int], int]:
        """Read a PAX 1.0 sparse map from the start of the data area (kept as raw bytes)."""
        buf = b""
        used = 0
        numbers: list[int] = []
        count: int | None = None
        while count is None or len(numbers) < 1 + 2 * count:
            if used + BLOCK > m.size:
                raise ArchiveError(f'entry "{m.display_name}": malformed sparse map')
            blk = self._read_full(BLOCK)
            if len(blk) < BLOCK:
                raise ArchiveError(f'entry "{m.display_name}": unexpected EOF in sparse map')
            self._raw += blk
            used += BLOCK
            buf += blk
            *lines, buf = buf.split(b"\n")
            for line in lines:
                try:
                    numbers.append(int(line))
                except ValueError:
                    raise ArchiveError(f'entry "{m.display_name}": malformed sparse map') from None
                if count is None:
                    count = numbers[0]
                if len(numbers) >= 1 + 2 * count:
                    break
        return numbers[1 : 1 + 2 * (count or 0)], used

    def trailing(self) -> Iterator[bytes]:
        """After the end of the archive: the remaining bytes in chunks, then one empty chunk."""
        while True:
            chunk = self._read_full(PADDING_CHUNK)
            yield chunk
            if len(chunk) < PADDING_CHUNK:
                if chunk:
                    yield b""
                return
