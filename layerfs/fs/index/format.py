"""The per-layer index file: encoding and checked decoding, no policy.

One file describes one layer's own ``diff/`` tree (every entry, whiteouts and opaque markers
included, nothing merged). It is data only, little-endian, and laid out so that it can be
memory-mapped and used in place::

    header   64 bytes: magic "LFSLIDX1", version u32, reserved u32, rows u64, xattrs u64,
             key length u64, string-table length u64, 16 reserved bytes (zero)
    key      the cache key the file was built for (opaque bytes), padded to 8
    columns  one fixed-width column per field, ``rows`` items each (see ROW_COLUMNS),
             then the xattr columns (``xattrs`` items each, see XATTR_COLUMNS), each padded to 8
    strings  names, link/redirect targets, xattr names and values
    digest   BLAKE2b-256 of every byte before it

``flags`` holds the ``F_*`` marker facts of :mod:`layerfs.overlayfmt` and one fact of this
format, :data:`F_SEALED`: a directory the producer could not list (its children are unknown;
it has none in the file). Version 2 added it; a version 1 file is refused (rebuilt).

Rows are the tree in breadth-first order: row 0 is the layer root, the children of a directory
are contiguous and strictly sorted by name (bytes order), ``first[r]`` is ``1 + sum(count[:r])``
for every row, and names are stored one after the other in row order. :func:`decode` checks all
of it (sizes, digest, key, every offset and length, the tree shape, names non-empty and without
``/`` or NUL and not ``.``/``..``, sorted unique siblings) before anything is used, and raises
:class:`IndexFormatError` on the first mismatch. Times are seconds (int64) plus nanoseconds
(uint32), so every date a file system can hold is kept exactly.
"""

from __future__ import annotations

import contextlib
import hashlib
import itertools
import mmap
import operator
import os
import stat
import struct
import sys
from array import array
from collections.abc import Iterable, Sequence
from typing import NamedTuple

from layerfs.errors import LayerfsError
from layerfs.overlayfmt import F_REDIRECT, KNOWN_FLAGS

MAGIC = b"LFSLIDX1"
VERSION = 2
_HEADER = struct.Struct("<8sIIQQQQ16x")
HEADER_SIZE = _HEADER.size  # 64
DIGEST_SIZE = 32
MAX_ROWS = 0xFFFFFFFF - 1

ROW_COLUMNS: tuple[tuple[str, str], ...] = (
    ("name_off", "Q"),
    ("link_off", "Q"),
    ("nlink", "Q"),
    ("rdev", "Q"),
    ("size", "q"),
    ("blocks", "q"),
    ("ino", "Q"),
    ("dev", "Q"),
    ("atime_s", "q"),
    ("mtime_s", "q"),
    ("ctime_s", "q"),
    ("parent", "I"),
    ("first", "I"),
    ("count", "I"),
    ("name_len", "I"),
    ("link_len", "I"),
    ("mode", "I"),
    ("uid", "I"),
    ("gid", "I"),
    ("flags", "I"),
    ("atime_ns", "I"),
    ("mtime_ns", "I"),
    ("ctime_ns", "I"),
    ("xattr_first", "I"),
    ("xattr_count", "I"),
)
XATTR_COLUMNS: tuple[tuple[str, str], ...] = (
    ("xname_off", "Q"),
    ("xval_off", "Q"),
    ("xname_len", "I"),
    ("xval_len", "I"),
)
F_SEALED = 1 << 31
"""A directory that could not be listed (EACCES) when the index was built: the view lists it
with its own attributes and answers EACCES below it, as kernel overlayfs does. Set only on
directories, which then have no children in the index."""
ALLOWED_FLAGS = KNOWN_FLAGS | F_SEALED

_NS = 1_000_000_000
_FILE_TYPES = frozenset(
    {
        stat.S_IFDIR,
        stat.S_IFREG,
        stat.S_IFLNK,
        stat.S_IFCHR,
        stat.S_IFBLK,
        stat.S_IFIFO,
        stat.S_IFSOCK,
    }
)


class IndexFormatError(LayerfsError):
    """A layer index file is damaged, foreign or inconsistent; it is never used."""


class Entry(NamedTuple):
    """One entry of a layer as a producer reports it (a walk of ``diff/``, later a TOC).

    ``path`` is relative to the layer root (``b""`` for the root itself); times are
    nanoseconds; ``flags`` are the ``F_*`` marker facts of :mod:`layerfs.overlayfmt`;
    ``link`` is the symlink target, or the redirect value of a directory with ``F_REDIRECT``;
    ``xattrs`` are the entry's other xattrs (name, value)."""

    path: bytes
    mode: int
    uid: int
    gid: int
    nlink: int
    rdev: int
    size: int
    blocks: int
    ino: int
    dev: int
    atime_ns: int
    mtime_ns: int
    ctime_ns: int
    flags: int = 0
    link: bytes | None = None
    xattrs: tuple[tuple[bytes, bytes], ...] = ()


def _pad(n: int) -> int:
    return (n + 7) & ~7


def _layout(rows: int, xattrs: int, key_len: int) -> tuple[dict[str, tuple[int, int]], int]:
    """Column name -> (offset, byte length), and the offset of the string table."""
    off = HEADER_SIZE + _pad(key_len)
    out: dict[str, tuple[int, int]] = {}
    for cols, n in ((ROW_COLUMNS, rows), (XATTR_COLUMNS, xattrs)):
        for name, tc in cols:
            length = n * (8 if tc in "Qq" else 4)
            out[name] = (off, length)
            off += _pad(length)
    return out, off


def encode(entries: Iterable[Entry], key: bytes) -> bytes:
    """The index file for a layer whose entries are *entries*, in any order (parents need not
    come first). ValueError if the entries do not form one tree rooted at ``b""``."""
    by_path: dict[bytes, Entry] = {}
    for e in entries:
        if e.path in by_path:
            raise ValueError(f"duplicate entry {os.fsdecode(e.path)!r}")
        by_path[e.path] = e
    if b"" not in by_path or not stat.S_ISDIR(by_path[b""].mode):
        raise ValueError("a layer needs a root directory entry")
    kids: dict[bytes, list[bytes]] = {}
    for p in by_path:
        if p:
            head, _, _ = p.rpartition(b"/")
            if head not in by_path or not stat.S_ISDIR(by_path[head].mode):
                raise ValueError(f"{os.fsdecode(p)!r} has no parent directory entry")
            kids.setdefault(head, []).append(p)
    cols: dict[str, list[int]] = {c: [] for c, _ in (*ROW_COLUMNS, *XATTR_COLUMNS)}
    strings = bytearray()
    order: list[tuple[bytes, int]] = [(b"", 0)]  # (path, parent row)
    nxattr = 0
    i = 0
    while i < len(order):
        path, parent = order[i]
        e = by_path[path]
        children = sorted(kids.get(path, ()))
        c = cols
        c["parent"].append(parent)
        c["first"].append(len(order))
        c["count"].append(len(children))
        order += [(ch, i) for ch in children]
        base = path.rpartition(b"/")[2]
        c["name_off"].append(len(strings))
        c["name_len"].append(len(base))
        strings += base
        for col in ("nlink", "rdev", "size", "blocks", "ino", "dev", "mode", "uid", "gid", "flags"):
            c[col].append(getattr(e, col))
        for t in ("atime", "mtime", "ctime"):
            s, ns = divmod(getattr(e, t + "_ns"), _NS)
            c[t + "_s"].append(s)
            c[t + "_ns"].append(ns)
        i += 1
    for e_path, _ in order:
        e = by_path[e_path]
        link = e.link or b""
        cols["link_off"].append(len(strings))
        cols["link_len"].append(len(link))
        strings += link
        cols["xattr_first"].append(nxattr)
        cols["xattr_count"].append(len(e.xattrs))
        for k, v in sorted(e.xattrs):
            cols["xname_off"].append(len(strings))
            cols["xname_len"].append(len(k))
            strings += k
            cols["xval_off"].append(len(strings))
            cols["xval_len"].append(len(v))
            strings += v
            nxattr += 1
    rows = len(order)
    if rows > MAX_ROWS:
        raise ValueError(f"a layer of {rows} entries is too large to index")
    layout, str_off = _layout(rows, nxattr, len(key))
    total = str_off + len(strings) + DIGEST_SIZE
    buf = bytearray(total)
    _HEADER.pack_into(buf, 0, MAGIC, VERSION, 0, rows, nxattr, len(key), len(strings))
    buf[HEADER_SIZE : HEADER_SIZE + len(key)] = key
    for name, tc in (*ROW_COLUMNS, *XATTR_COLUMNS):
        a = array(tc, cols[name])
        if sys.byteorder != "little":
            a.byteswap()
        off, length = layout[name]
        buf[off : off + length] = a.tobytes()
    buf[str_off : str_off + len(strings)] = strings
    buf[total - DIGEST_SIZE :] = hashlib.blake2b(
        memoryview(buf)[: total - DIGEST_SIZE], digest_size=DIGEST_SIZE
    ).digest()
    return bytes(buf)


def _column(buf: memoryview, off: int, length: int, tc: str) -> Sequence[int]:
    raw = buf[off : off + length]
    if sys.byteorder == "little":
        return raw.cast(tc)  # type: ignore[call-overload,no-any-return]
    a = array(tc, raw.tobytes())
    a.byteswap()
    return a


class LayerIndex:
    """A decoded, checked layer index (read-only; columns are views of the file's bytes).

    Built by :func:`decode` only; the columns are the names of ROW_COLUMNS/XATTR_COLUMNS."""

    def __init__(
        self,
        buf: memoryview,
        keep: object,
        rows: int,
        cols: dict[str, Sequence[int]],
        strings: memoryview,
    ) -> None:
        self._buf = buf
        self._keep = keep  # the mmap, when mapped
        self.rows = rows
        self.strings = strings
        self.parent = cols["parent"]
        self.first = cols["first"]
        self.count = cols["count"]
        self.name_off = cols["name_off"]
        self.name_len = cols["name_len"]
        self.link_off = cols["link_off"]
        self.link_len = cols["link_len"]
        self.mode = cols["mode"]
        self.uid = cols["uid"]
        self.gid = cols["gid"]
        self.flags = cols["flags"]
        self.nlink = cols["nlink"]
        self.rdev = cols["rdev"]
        self.size = cols["size"]
        self.blocks = cols["blocks"]
        self.ino = cols["ino"]
        self.dev = cols["dev"]
        self.atime_s = cols["atime_s"]
        self.atime_ns = cols["atime_ns"]
        self.mtime_s = cols["mtime_s"]
        self.mtime_ns = cols["mtime_ns"]
        self.ctime_s = cols["ctime_s"]
        self.ctime_ns = cols["ctime_ns"]
        self.xattr_first = cols["xattr_first"]
        self.xattr_count = cols["xattr_count"]
        self.xname_off = cols["xname_off"]
        self.xname_len = cols["xname_len"]
        self.xval_off = cols["xval_off"]
        self.xval_len = cols["xval_len"]
        self.has_sealed = bool(rows) and max(self.flags) >= F_SEALED
        """Some directory of this layer is :data:`F_SEALED`."""

    def name(self, row: int) -> bytes:
        o = self.name_off[row]
        return bytes(self.strings[o : o + self.name_len[row]])

    def link(self, row: int) -> bytes:
        o = self.link_off[row]
        return bytes(self.strings[o : o + self.link_len[row]])

    def xattrs(self, row: int) -> list[tuple[bytes, bytes]]:
        s = self.strings
        out = []
        x0 = self.xattr_first[row]
        for x in range(x0, x0 + self.xattr_count[row]):
            no, vo = self.xname_off[x], self.xval_off[x]
            out.append(
                (bytes(s[no : no + self.xname_len[x]]), bytes(s[vo : vo + self.xval_len[x]]))
            )
        return out

    def lookup(self, row: int, name: bytes) -> int | None:
        """Row of child *name* of directory row *row*, or None (binary search)."""
        lo = self.first[row]
        hi = lo + self.count[row]
        while lo < hi:
            mid = (lo + hi) // 2
            n = self.name(mid)
            if n < name:
                lo = mid + 1
            elif n > name:
                hi = mid
            else:
                return mid
        return None

    def close(self) -> None:
        """Release the mapping (only when nothing refers to the columns any more)."""
        if isinstance(self._keep, mmap.mmap):
            self._keep.close()


def _bad(why: str) -> IndexFormatError:
    return IndexFormatError(why)


def decode(data: bytes | bytearray | mmap.mmap, key: bytes) -> LayerIndex:
    """Check *data* completely against the format and *key*; return the index over it."""
    buf = memoryview(data)
    if len(buf) < HEADER_SIZE + DIGEST_SIZE:
        raise _bad("file too short")
    magic, version, _res, rows, nx, key_len, str_len = _HEADER.unpack_from(buf, 0)
    if magic != MAGIC:
        raise _bad("not a layerfs layer index")
    if version != VERSION:
        raise _bad(f"index version {version}, expected {VERSION}")
    if bytes(buf[52:64]) != b"\0" * 12 or _res != 0:
        raise _bad("reserved header bytes set")
    if not 1 <= rows <= MAX_ROWS or nx > 0xFFFFFFFF or key_len > 1 << 20 or str_len > 1 << 40:
        raise _bad("header counts out of range")
    layout, str_off = _layout(rows, nx, key_len)
    total = str_off + str_len + DIGEST_SIZE
    if total != len(buf):
        raise _bad(f"file is {len(buf)} bytes, header says {total}")
    h = hashlib.blake2b(buf[: total - DIGEST_SIZE], digest_size=DIGEST_SIZE).digest()
    if h != bytes(buf[total - DIGEST_SIZE :]):
        raise _bad("checksum mismatch")
    if bytes(buf[HEADER_SIZE : HEADER_SIZE + key_len]) != key:
        raise _bad("built for another layer state")
    cols = {n: _column(buf, *layout[n], tc) for n, tc in (*ROW_COLUMNS, *XATTR_COLUMNS)}
    strings = buf[str_off : str_off + str_len]
    _check(rows, nx, str_len, cols, strings)
    return LayerIndex(buf, data, rows, cols, strings)


def _check(
    rows: int, nx: int, str_len: int, c: dict[str, Sequence[int]], strings: memoryview
) -> None:
    """Every structural rule of the module docstring (mostly at C speed over whole columns)."""
    count, first, parent, mode = c["count"], c["first"], c["parent"], c["mode"]
    # tree shape: first[] is the running sum of count[], the children tile rows 1..rows-1,
    # each row's children come after it (so parents precede children: no cycles)
    acc = list(itertools.accumulate(count, initial=1))
    if acc[-1] != rows or acc[:-1] != list(first):
        raise _bad("child ranges do not tile the rows")
    if min(map(operator.sub, first, range(rows))) < 1:
        raise _bad("a directory's children precede it")
    want_parent = [0, *itertools.chain.from_iterable(map(itertools.repeat, range(rows), count))]
    if want_parent != list(parent):
        raise _bad("parent column does not match the child ranges")
    del acc, want_parent
    types = set(map(stat.S_IFMT, mode))
    if not types <= _FILE_TYPES:
        raise _bad("unknown file type")
    if stat.S_IFMT(mode[0]) != stat.S_IFDIR:
        raise _bad("root is not a directory")
    if any(stat.S_IFMT(m) != stat.S_IFDIR for m in itertools.compress(mode, count)):
        raise _bad("a non-directory has children")
    flags_max = max(c["flags"])
    if flags_max & ~ALLOWED_FLAGS or (
        flags_max >= F_SEALED and any(f & ~ALLOWED_FLAGS for f in c["flags"])
    ):
        raise _bad("unknown flags")
    if flags_max >= F_SEALED:
        for r in itertools.compress(range(rows), (f & F_SEALED for f in c["flags"])):
            if stat.S_IFMT(mode[r]) != stat.S_IFDIR or count[r]:
                raise _bad("a sealed entry that is not an empty directory")
    for t in ("atime_ns", "mtime_ns", "ctime_ns"):
        if max(c[t]) >= _NS:
            raise _bad("nanoseconds out of range")
    # strings: every (offset, length) inside the table; names packed in row order
    for off, ln, n in (
        ("name_off", "name_len", rows),
        ("link_off", "link_len", rows),
        ("xname_off", "xname_len", nx),
        ("xval_off", "xval_len", nx),
    ):
        if n and max(map(operator.add, c[off], c[ln])) > str_len:
            raise _bad("string reference out of range")
    name_off, name_len = c["name_off"], c["name_len"]
    if name_len[0] != 0 or list(itertools.accumulate(name_len, initial=0))[:-1] != list(name_off):
        raise _bad("names not packed in row order")
    if rows > 1 and min(itertools.islice(name_len, 1, None)) < 1:
        raise _bad("empty name")
    names_end = name_off[rows - 1] + name_len[rows - 1]
    region = strings[:names_end].tobytes()
    if b"/" in region or b"\0" in region:
        raise _bad("name with '/' or NUL")
    # siblings strictly sorted (unique), no '.'/'..'
    for r in range(rows):
        n = count[r]
        if not n:
            continue
        lo = first[r]
        prev = b""
        for k in range(lo, lo + n):
            o = name_off[k]
            name = region[o : o + name_len[k]]
            if name <= prev or name in (b".", b".."):
                raise _bad("children not sorted, duplicated, or named '.'/'..'")
            prev = name
    # links: symlinks have a target, only redirected directories have a value otherwise
    link_len, flags = c["link_len"], c["flags"]
    for r in itertools.compress(range(rows), link_len):
        m = stat.S_IFMT(mode[r])
        if not (m == stat.S_IFLNK or (m == stat.S_IFDIR and flags[r] & F_REDIRECT)):
            raise _bad("link value on a non-link")
    for r in itertools.compress(range(rows), map(stat.S_ISLNK, mode)):
        if not link_len[r]:
            raise _bad("symlink without target")
    xf, xc = c["xattr_first"], c["xattr_count"]
    if list(itertools.accumulate(xc, initial=0))[:-1] != list(xf) or sum(xc) != nx:
        raise _bad("xattr ranges do not tile the xattr table")
    if nx:
        if min(c["xname_len"]) < 1:
            raise _bad("empty xattr name")
        for x in range(nx):
            o = c["xname_off"][x]
            if 0 in strings[o : o + c["xname_len"][x]].tobytes():
                raise _bad("xattr name with NUL")


def read_file(path: str | bytes, key: bytes) -> LayerIndex:
    """Map and decode the index file at *path*. OSError if it cannot be read,
    IndexFormatError if it is not a valid index for *key*."""
    # O_NONBLOCK: a FIFO (or device) planted as the index must not block the open
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW | os.O_NONBLOCK)
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise _bad("not a regular file")
        if st.st_size < HEADER_SIZE + DIGEST_SIZE:
            raise _bad("file too short")
        mm = mmap.mmap(fd, st.st_size, prot=mmap.PROT_READ)
    finally:
        os.close(fd)
    try:
        return decode(mm, key)
    except BaseException:
        import contextlib

        with contextlib.suppress(BufferError):
            mm.close()
        raise


def write_file(path: str | bytes, data: bytes) -> None:
    """Write *data* atomically (temp file in the same directory, fsync, rename)."""
    p = os.fsencode(path)
    tmp = p + b".tmp.%d" % os.getpid()
    try:
        fd = os.open(
            tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC | os.O_NOFOLLOW, 0o644
        )
        try:
            _write_all(fd, data)
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, p)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def _write_all(fd: int, data: bytes) -> None:
    mv = memoryview(data)
    while mv:
        n = os.write(fd, mv)
        mv = mv[n:]
