"""Export a layer: tar-split replay or a generated tar, plus Changes and DiffSize (§6, §7).

``write_diff`` replays the stored tar-split byte for byte when there is one (the caller
decides that FROM is the parent); otherwise it generates a tar of ``diff/`` the way the Go
overlay driver's native diff does: no root entry, names without ``./`` in sorted walk order,
whiteout devices as ``.wh.NAME`` and opaque directories as ``DIR/.wh..wh..opq`` where a lower
layer really has the directory.
"""

from __future__ import annotations

import errno
import grp
import os
import pwd
import stat
import tarfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from functools import lru_cache
from typing import BinaryIO

from layerfs.archive.apply import (
    OPAQUE_XATTR_KERNEL,
    OPAQUE_XATTR_USER,
    WHITEOUT_OPAQUE,
    WHITEOUT_PREFIX,
    layer_path,
    lstat_in,
    open_parent_dir,
)
from layerfs.archive.tarsplit import FILE_TYPE, SEGMENT_TYPE, Crc64, iter_entries
from layerfs.errors import ArchiveError

CHUNK = 1 << 20

MODIFY, ADD, DELETE = 0, 1, 2


@dataclass(frozen=True)
class Change:
    """One entry of ``changes``: path is absolute (``/a/b``); kind 0 Modify, 1 Add, 2 Delete."""

    path: str
    kind: int


# --------------------------------------------------------------------------- helpers


def _open_in(root: str, parts: Sequence[bytes], flags: int) -> int | None:
    """Open ``root/parts`` without following symlinks anywhere; None if it is not there."""
    fd = open_parent_dir(root, parts)
    if fd is None:
        return None
    try:
        return os.open(parts[-1], flags | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=fd)
    except OSError as exc:
        if exc.errno in (errno.ENOENT, errno.ELOOP, errno.ENOTDIR):
            return None
        raise
    finally:
        os.close(fd)


def _lstat(root: str, parts: Sequence[bytes]) -> os.stat_result | None:
    """lstat ``root/parts`` without following symlinks; None if it is absent."""
    return lstat_in(root, parts) if parts else None


def _is_whiteout(st: os.stat_result | None) -> bool:
    return (
        st is not None
        and stat.S_ISCHR(st.st_mode)
        and os.major(st.st_rdev) == 0
        and os.minor(st.st_rdev) == 0
    )


def _is_opaque(path: bytes | int) -> bool:
    for key in (OPAQUE_XATTR_KERNEL, OPAQUE_XATTR_USER):
        try:
            if os.getxattr(path, key, follow_symlinks=False) == b"y":
                return True
        except OSError:
            continue
    return False


def _walk(root: str) -> Iterator[tuple[list[bytes], os.stat_result]]:
    """Depth-first walk of *root* in Go's order (names sorted bytewise), root excluded."""
    broot = os.fsencode(root)

    def rec(rel: list[bytes]) -> Iterator[tuple[list[bytes], os.stat_result]]:
        here = os.path.join(broot, *rel) if rel else broot
        for name in sorted(os.listdir(here)):
            parts = [*rel, name]
            st = os.lstat(os.path.join(here, name))
            yield parts, st
            if stat.S_ISDIR(st.st_mode):
                yield from rec(parts)

    yield from rec([])


# --------------------------------------------------------------------------- replay


def _replay(out: BinaryIO, diff_dir: str, lowers: Sequence[str], tar_split_path: str) -> None:
    for e in iter_entries(tar_split_path):
        if e.type == SEGMENT_TYPE:
            if e.payload:
                out.write(e.payload)
            continue
        if e.type != FILE_TYPE or e.size <= 0:
            continue
        show = e.name.decode("utf-8", "backslashreplace")
        parts = layer_path(e.name, show)
        fd = None
        if parts is not None:
            for root in (diff_dir, *lowers):
                fd = _open_in(root, parts, os.O_RDONLY)
                if fd is not None:
                    break
        if fd is None:
            raise ArchiveError(f'file "{show}" of the tar-split is missing from the layer')
        crc = Crc64()
        left = e.size
        with os.fdopen(fd, "rb") as f:
            while left:
                data = f.read(min(CHUNK, left))
                if not data:
                    break
                crc.update(data)
                out.write(data)
                left -= len(data)
        if left or crc.digest() != e.payload:
            raise ArchiveError(f"file integrity checksum failed for {show}")


# --------------------------------------------------------------------------- generated diff


@lru_cache(maxsize=1024)
def _uname(uid: int) -> str:
    try:
        return pwd.getpwuid(uid).pw_name
    except KeyError:
        return ""


@lru_cache(maxsize=1024)
def _gname(gid: int) -> str:
    try:
        return grp.getgrgid(gid).gr_name
    except KeyError:
        return ""


def _export_xattrs(path: bytes) -> dict[str, str]:
    """Xattrs worth carrying in a layer tar (overlay markers and SELinux labels excluded)."""
    out: dict[str, str] = {}
    try:
        keys = os.listxattr(path, follow_symlinks=False)
    except OSError:
        return out
    for key in sorted(keys):
        if key.startswith(
            ("trusted.overlay.", "user.overlay.", "trusted.layerfs.", "user.layerfs.")
        ):
            continue  # (trusted.layerfs.*: a read-write view's bookkeeping, e.g. origin inodes)
        if not (key == "security.capability" or key.startswith(("user.", "trusted."))):
            continue
        try:
            value = os.getxattr(path, key, follow_symlinks=False)
        except OSError:
            continue
        out["SCHILY.xattr." + key] = value.decode("utf-8", "surrogateescape")
    return out


def _header(name: bytes, st: os.stat_result, typ: bytes, **kw: object) -> tarfile.TarInfo:
    ti = tarfile.TarInfo(name.decode("utf-8", "surrogateescape"))
    ti.type = typ
    ti.mode = stat.S_IMODE(st.st_mode)
    ti.uid, ti.gid = st.st_uid, st.st_gid
    ti.uname, ti.gname = _uname(st.st_uid), _gname(st.st_gid)
    ti.mtime = int(st.st_mtime)
    ti.size = 0
    for k, v in kw.items():
        setattr(ti, k, v)
    return ti


def _emit(out: BinaryIO, ti: tarfile.TarInfo) -> None:
    out.write(ti.tobuf(tarfile.PAX_FORMAT, "utf-8", "surrogateescape"))


def _generate(out: BinaryIO, diff_dir: str, lowers: Sequence[str]) -> None:
    broot = os.fsencode(diff_dir)
    seen_inodes: dict[tuple[int, int], bytes] = {}
    for parts, st in _walk(diff_dir):
        rel = b"/".join(parts)
        path = os.path.join(broot, rel)
        mode = st.st_mode
        if _is_whiteout(st):
            wname = b"/".join([*parts[:-1], WHITEOUT_PREFIX + parts[-1]])
            _emit(out, _header(wname, st, tarfile.REGTYPE, mode=0))
            continue
        if stat.S_ISSOCK(mode):
            continue
        pax = _export_xattrs(path)
        if stat.S_ISDIR(mode):
            _emit(out, _header(rel + b"/", st, tarfile.DIRTYPE, pax_headers=pax))
            if _is_opaque(path) and _opaque_hides_lower(lowers, parts):
                _emit(
                    out,
                    _header(
                        rel + b"/" + WHITEOUT_OPAQUE,
                        st,
                        tarfile.REGTYPE,
                        mode=stat.S_IMODE(mode) & 0o777,
                        mtime=0,
                    ),
                )
            continue
        if stat.S_ISLNK(mode):
            target = os.readlink(path).decode("utf-8", "surrogateescape")
            _emit(out, _header(rel, st, tarfile.SYMTYPE, linkname=target, pax_headers=pax))
            continue
        if stat.S_ISCHR(mode) or stat.S_ISBLK(mode):
            typ = tarfile.CHRTYPE if stat.S_ISCHR(mode) else tarfile.BLKTYPE
            dev = {"devmajor": os.major(st.st_rdev), "devminor": os.minor(st.st_rdev)}
            _emit(out, _header(rel, st, typ, pax_headers=pax, **dev))
            continue
        if stat.S_ISFIFO(mode):
            _emit(out, _header(rel, st, tarfile.FIFOTYPE, pax_headers=pax))
            continue
        if not stat.S_ISREG(mode):
            continue
        key = (st.st_dev, st.st_ino)
        if st.st_nlink > 1 and key in seen_inodes:
            first = seen_inodes[key].decode("utf-8", "surrogateescape")
            _emit(out, _header(rel, st, tarfile.LNKTYPE, linkname=first, pax_headers=pax))
            continue
        if st.st_nlink > 1:
            seen_inodes[key] = rel
        _emit(out, _header(rel, st, tarfile.REGTYPE, size=st.st_size, pax_headers=pax))
        _copy_file(out, path, st.st_size, rel)
    out.write(bytes(1024))


def _copy_file(out: BinaryIO, path: bytes, size: int, rel: bytes) -> None:
    left = size
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    with os.fdopen(fd, "rb") as f:
        while left:
            data = f.read(min(CHUNK, left))
            if not data:
                raise ArchiveError(f'file "{rel.decode(errors="replace")}" shrank while exporting')
            out.write(data)
            left -= len(data)
    if size % 512:
        out.write(bytes(512 - size % 512))


def _opaque_hides_lower(lowers: Sequence[str], parts: list[bytes]) -> bool:
    """Go: a marker only if the nearest lower entry at this path exists and is no whiteout."""
    for lower in lowers:
        st = _lstat(lower, parts)
        if st is None:
            continue
        return not _is_whiteout(st)
    return False


def write_diff(
    out: BinaryIO, diff_dir: str, lower_diff_dirs: Sequence[str], tar_split_path: str | None
) -> None:
    """Write the layer's uncompressed tar to *out* (replay if *tar_split_path*, else generate)."""
    if tar_split_path is not None:
        _replay(out, diff_dir, lower_diff_dirs, tar_split_path)
    else:
        _generate(out, diff_dir, lower_diff_dirs)


# --------------------------------------------------------------------------- changes, size


def _lower_has_whiteout(lowers_entry: str, parts: list[bytes]) -> bool:
    return any(_is_whiteout(_lstat(lowers_entry, parts[:i])) for i in range(1, len(parts) + 1))


def changes(diff_dir: str, lower_diff_dirs: Sequence[str]) -> list[Change]:
    """The overlay driver's native Changes of *diff_dir* against its lowers (Go's rules)."""
    broot = os.fsencode(diff_dir)
    out: list[Change] = []
    changed_dirs: set[bytes] = set()
    for parts, st in _walk(diff_dir):
        rel = b"/" + b"/".join(parts)
        kind = ADD
        if _is_whiteout(st) or (
            stat.S_ISDIR(st.st_mode)
            and _is_opaque(os.path.join(broot, *parts))
            and any(_lstat(lower, parts) is not None for lower in lower_diff_dirs)
        ):
            kind = DELETE
        else:
            skip = False
            for lower in lower_diff_dirs:
                if _lower_has_whiteout(lower, parts):
                    break
                lst = _lstat(lower, parts)
                if lst is None:
                    continue
                if (
                    stat.S_ISDIR(lst.st_mode)
                    and stat.S_ISDIR(st.st_mode)
                    and lst.st_size == st.st_size
                    and lst.st_mode == st.st_mode
                    and lst.st_mtime_ns == st.st_mtime_ns
                ):
                    skip = True
                kind = MODIFY
                break
            if skip:
                continue
        if stat.S_ISDIR(st.st_mode):
            changed_dirs.add(rel)
        if kind in (ADD, DELETE):
            missing: list[bytes] = []
            parent = rel.rsplit(b"/", 1)[0]
            while parent and parent not in changed_dirs:
                missing.append(parent)
                changed_dirs.add(parent)
                parent = parent.rsplit(b"/", 1)[0]
            out.extend(Change(os.fsdecode(p), MODIFY) for p in reversed(missing))
        out.append(Change(os.fsdecode(rel), kind))
    return out


def diff_size(diff_dir: str) -> int:
    """Sum of the sizes of non-directory entries in *diff_dir*, hard links counted once."""
    total = 0
    seen: set[tuple[int, int]] = set()
    for _parts, st in _walk(diff_dir):
        if stat.S_ISDIR(st.st_mode) or st.st_size == 0:
            continue
        key = (st.st_dev, st.st_ino)
        if key in seen:
            continue
        seen.add(key)
        total += st.st_size
    return total
