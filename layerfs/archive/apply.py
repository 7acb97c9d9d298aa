"""Apply a layer tar stream to a layer's ``diff/`` directory (containers/storage ApplyDiff).

Extraction is confined to ``diff_dir``: every path is resolved component by component with
``O_NOFOLLOW`` relative to directory file descriptors, so no symlink is ever followed, and a
parent that is a symlink (in this layer or, for implicitly created parents, in a lower layer)
is refused. Whiteouts are converted to the overlay kernel format (char device 0:0 and
``trusted.overlay.opaque``) or kept in the AUFS form for fuse-overlayfs. The stream is read
once, in chunks: digests, sizes, owners and the tar-split are computed on the way.
"""

from __future__ import annotations

import errno
import hashlib
import logging
import os
import shutil
import stat
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import IO, BinaryIO, Literal

from layerfs import overridestat, userns
from layerfs.archive.compression import Compression, open_decompressed
from layerfs.archive.tarsplit import (
    BLK,
    CHR,
    DIR,
    FIFO,
    LNK,
    REG,
    SYM,
    XGL,
    Crc64,
    TarMember,
    TarSplitter,
    TarSplitWriter,
)
from layerfs.errors import ArchiveError
from layerfs.overlayfmt import opaque_xattrs

log = logging.getLogger(__name__)

WHITEOUT_PREFIX = b".wh."
WHITEOUT_OPAQUE = b".wh..wh..opq"
OPAQUE_XATTR_KERNEL = "trusted.overlay.opaque"
OPAQUE_XATTR_USER = "user.overlay.opaque"
CHUNK = 1 << 20

#: Linux limits (``<linux/limits.h>``): a path or symlink target of PATH_MAX bytes or more,
#: or a component longer than NAME_MAX, is refused by the kernel (ENAMETOOLONG).
PATH_MAX = 4096
NAME_MAX = 255

_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC


@dataclass(frozen=True)
class ApplyOptions:
    """How ownership and modes are written (containers/storage's overlay store options).

    ``ignore_chown_errors`` (``overlay.ignore_chown_errors``): a chown the system refuses
    (an id outside the user namespace, or no namespace at all) leaves the file owned by us,
    with one warning for the whole import. ``force_mask`` (``overlay.force_mask``): every
    directory and file gets this mode on disk, anything but a directory or a link becomes an
    empty-or-filled regular file, and the real owner, mode and type go into
    ``user.containers.override_stat`` (:mod:`layerfs.overridestat`), as c/storage writes them.
    """

    ignore_chown_errors: bool = False
    force_mask: int | None = None

    @classmethod
    def from_storage_opts(cls, opts: dict[str, str]) -> ApplyOptions:
        """Options from ``--storage-opt``-style keys (``overlay.`` prefix optional)."""
        ignore = False
        mask: int | None = None
        for key, value in opts.items():
            name = key.removeprefix("overlay.").removeprefix("overlay2.")
            if name == "ignore_chown_errors":
                if value.lower() not in ("true", "false", "1", "0", "yes", "no"):
                    raise ArchiveError(f"storage option {key}={value}: expected true or false")
                ignore = value.lower() in ("true", "1", "yes")
            elif name == "force_mask":
                mask = parse_force_mask(value)
        return cls(ignore_chown_errors=ignore, force_mask=mask)


def parse_force_mask(value: str) -> int:
    """``private`` (0700), ``shared`` (0755) or an octal mode, as c/storage takes it."""
    named = {"private": 0o700, "shared": 0o755}
    if value in named:
        return named[value]
    if value and all(c in "01234567" for c in value) and int(value, 8) <= 0o7777:
        return int(value, 8)
    raise ArchiveError(f"force_mask {value!r}: expected private, shared or an octal mode")


@dataclass(frozen=True)
class ApplyResult:
    """What the layer record needs after an apply (see store-format §1 and §6)."""

    compressed_digest: str
    compressed_size: int
    uncompressed_digest: str
    uncompressed_size: int
    compression: Compression
    uidset: list[int]
    gidset: list[int]


class _HashingReader:
    """Counts and sha256-hashes everything read through it."""

    def __init__(self, inner: IO[bytes]) -> None:
        self._inner = inner
        self.hash = hashlib.sha256()
        self.count = 0

    def read(self, n: int = -1) -> bytes:
        data = self._inner.read(n)
        if data:
            self.hash.update(data)
            self.count += len(data)
        return data

    def drain(self) -> None:
        while self.read(CHUNK):
            pass

    def digest(self) -> str:
        return "sha256:" + self.hash.hexdigest()


# --------------------------------------------------------------------------- name handling


def go_clean(name: bytes) -> bytes:
    """Go's ``filepath.Clean`` on a raw name (used for tar-split's duplicate check)."""
    rooted = name.startswith(b"/")
    out: list[bytes] = []
    for comp in name.split(b"/"):
        if comp in (b"", b"."):
            continue
        if comp == b"..":
            if out and out[-1] != b"..":
                out.pop()
            elif not rooted:
                out.append(comp)
            continue
        out.append(comp)
    joined = b"/".join(out)
    if rooted:
        return b"/" + joined
    return joined or b"."


def go_base(name: bytes) -> bytes:
    """Go's ``path.Base``: the last element, trailing slashes removed."""
    stripped = name.rstrip(b"/")
    if not stripped:
        return b"/" if name else b"."
    return stripped.rsplit(b"/", 1)[-1]


def layer_path(name: bytes, what: str) -> list[bytes] | None:
    """Split a tar name into components inside the layer; None means the layer root.

    Absolute names are confined (``/abs/x`` is ``abs/x``, ``/../x`` is ``x``) as
    containers/storage does; a relative name that climbs out of the root is refused.
    """
    if not name:
        raise ArchiveError('entry "": empty file name')
    rooted = name.startswith(b"/")
    out: list[bytes] = []
    for comp in name.split(b"/"):
        if comp in (b"", b"."):
            continue
        if comp == b"..":
            if out:
                out.pop()
            elif not rooted:
                raise ArchiveError(f'entry "{_show(what)}": path escapes the layer')
            continue
        out.append(comp)
    return out or None


def check_name_limits(m: TarMember, diff_dir: str = "") -> None:
    """Refuse an entry whose path, link target or a component the kernel cannot handle.

    The path is measured as it appears in the view (``/`` plus the cleaned name) and as it
    is on the host (``diff_dir`` plus that): a path of PATH_MAX bytes or more could be
    extracted (component by component) but not looked up, listed or mounted afterwards by
    tools that use whole paths (the Go driver, the view's index), so it is refused at
    import, as the Go tool refuses it (ENAMETOOLONG). Hard-link targets have the same
    limits, symlink targets the PATH_MAX one.
    """
    parts = layer_path(m.name, m.display_name) or []
    _check_parts(parts, "path", m, diff_dir)
    if m.typeflag == LNK and m.linkname:
        target = layer_path(m.linkname, m.display_name) or []
        _check_parts(target, "hard link target", m, diff_dir)
    elif m.typeflag == SYM and len(m.linkname) >= PATH_MAX:
        raise ArchiveError(
            f'entry "{_abbrev(m.display_name)}": symlink target is {len(m.linkname)} bytes; '
            f"the limit is {PATH_MAX - 1} (PATH_MAX)"
        )


def _check_parts(parts: Sequence[bytes], what: str, m: TarMember, diff_dir: str) -> None:
    for comp in parts:
        if len(comp) > NAME_MAX:
            raise ArchiveError(
                f'entry "{_abbrev(m.display_name)}": {what} has a {len(comp)}-byte name '
                f'"{_abbrev(_show(comp))}"; the limit is {NAME_MAX} (NAME_MAX)'
            )
    length = sum(len(c) + 1 for c in parts)  # "/a/b": one slash per component
    if length >= PATH_MAX:
        raise ArchiveError(
            f'entry "{_abbrev(m.display_name)}": {what} is {length} bytes; '
            f"the limit is {PATH_MAX - 1} (PATH_MAX)"
        )
    host = len(os.fsencode(diff_dir)) + length
    if diff_dir and host >= PATH_MAX:
        raise ArchiveError(
            f'entry "{_abbrev(m.display_name)}": {what} is {length} bytes, {host} with the '
            f"layer directory {diff_dir} in front; the limit is {PATH_MAX - 1} (PATH_MAX)"
        )


def _abbrev(text: str, keep: int = 48) -> str:
    """A long name shortened to its start and end, so an error stays one readable line."""
    if len(text) <= 2 * keep + 3:
        return text
    return f"{text[:keep]}...{text[-keep:]}"


def _show(s: str | bytes) -> str:
    if isinstance(s, bytes):
        return s.decode("utf-8", "backslashreplace")
    return s


def _display(parts: Sequence[bytes]) -> str:
    return _show(b"/".join(parts))


# --------------------------------------------------------------------------- extraction


class _Extractor:
    """Creates entries under one root directory fd; never follows a symlink."""

    def __init__(
        self,
        diff_dir: str,
        lowers: Sequence[str],
        whiteout_format: str,
        options: ApplyOptions | None = None,
    ) -> None:
        self.root = os.open(diff_dir, _DIR_FLAGS)
        self.root_path = diff_dir
        self.lowers = list(lowers)
        self.aufs = whiteout_format == "aufs"
        self.options = options or ApplyOptions()
        #: (path, atime, mtime, mode to restore or None), in creation order
        self.dirs: list[tuple[list[bytes], int, int, int | None]] = []
        #: Without CAP_DAC_OVERRIDE (any euid but 0) a 0555 directory, the layer root
        #: included, cannot take new entries: directories are kept u+rwx while the tar is
        #: extracted and get their real mode back in :meth:`finish` (or :meth:`close`).
        self.unprivileged = os.geteuid() != 0
        self.rootless = userns.is_rootless()
        self.root_mode: int | None = None
        self.skipped_devices: list[str] = []
        self.chown_failures: list[str] = []
        if self.unprivileged:
            mode = stat.S_IMODE(os.fstat(self.root).st_mode)
            if mode & 0o700 != 0o700:
                os.chmod(self.root, mode | 0o700)
                self.root_mode = mode

    def close(self) -> None:
        if self.root_mode is not None:
            os.chmod(self.root, self.root_mode)
            self.root_mode = None
        os.close(self.root)

    # -- resolution

    def _open_dir(
        self, parts: Sequence[bytes], entry: str, *, create: bool, root: int | None = None
    ) -> int:
        """Open the directory *parts* below the root, creating missing ones when asked."""
        fd = os.dup(self.root if root is None else root)
        try:
            for i, comp in enumerate(parts):
                try:
                    nfd = os.open(comp, _DIR_FLAGS, dir_fd=fd)
                except FileNotFoundError:
                    if not create:
                        raise
                    self._refuse_lower_symlink(parts[: i + 1], entry)
                    os.mkdir(comp, 0o755, dir_fd=fd)
                    nfd = os.open(comp, _DIR_FLAGS, dir_fd=fd)
                except OSError as exc:
                    if exc.errno not in (errno.ELOOP, errno.ENOTDIR):
                        raise
                    st = os.stat(comp, dir_fd=fd, follow_symlinks=False)
                    what = "a symlink" if stat.S_ISLNK(st.st_mode) else "not a directory"
                    raise ArchiveError(
                        f'entry "{entry}": parent "{_display(parts[: i + 1])}" is {what}'
                    ) from None
                os.close(fd)
                fd = nfd
        except BaseException:
            os.close(fd)
            raise
        return fd

    def _under_non_dir(self, parts: Sequence[bytes]) -> bool:
        """True when a component of *parts* exists in this layer as a non-directory
        (a symlink does not count: the normal path refuses it as a parent)."""
        fd = os.dup(self.root)
        try:
            for comp in parts:
                try:
                    st = os.stat(comp, dir_fd=fd, follow_symlinks=False)
                except FileNotFoundError:
                    return False
                if stat.S_ISLNK(st.st_mode):
                    return False
                if not stat.S_ISDIR(st.st_mode):
                    return True
                nfd = os.open(comp, _DIR_FLAGS, dir_fd=fd)
                os.close(fd)
                fd = nfd
            return False
        finally:
            os.close(fd)

    def _refuse_lower_symlink(self, parts: Sequence[bytes], entry: str) -> None:
        """Refuse to create a directory where the nearest lower layer has a symlink."""
        for lower in self.lowers:
            st = lstat_in(lower, parts)
            if st is None:
                continue
            if stat.S_ISLNK(st.st_mode):
                raise ArchiveError(
                    f'entry "{entry}": parent "{_display(parts)}" is a symlink in a lower layer'
                )
            return  # a directory, a file or a whiteout: the nearest lower decides

    # -- entries

    def extract(self, m: TarMember, src: TarSplitter) -> bytes | None:
        """Create one entry; return the CRC-64 of its content (None when size is 0)."""
        name = m.display_name
        if m.typeflag == XGL:
            return None
        parts = layer_path(m.name, name)
        base = go_base(m.name)
        if parts is None:
            if m.typeflag != DIR:
                raise ArchiveError(f'entry "{name}": cannot replace the layer root')
            return _drain_crc(m, src)
        if base.startswith(WHITEOUT_PREFIX) and self._under_non_dir(parts[:-1]):
            # e.g. umoci's "swap" (now a file) followed by "swap/.wh.inner": the file already
            # hides everything below it, so the whiteout is moot; Go drops it the same way.
            return _drain_crc(m, src)
        if base.startswith(WHITEOUT_PREFIX) and not self.aufs:
            self._whiteout(m, parts, name)
            return _drain_crc(m, src)
        if base == WHITEOUT_OPAQUE and self.aufs:
            pfd = self._open_dir(parts[:-1], name, create=True)
            try:
                os.setxattr(pfd, OPAQUE_XATTR_USER, b"y")
            finally:
                os.close(pfd)
        if base == WHITEOUT_PREFIX:
            raise ArchiveError(f'entry "{name}": bare whiteout name ".wh."')
        if m.typeflag == LNK:
            self._hardlink(m, parts, name)
            return _drain_crc(m, src)
        pfd = self._open_dir(parts[:-1], name, create=True)
        try:
            return self._create(pfd, parts, m, src, name)
        finally:
            os.close(pfd)

    def _whiteout(self, m: TarMember, parts: list[bytes], name: str) -> None:
        base = parts[-1]
        pfd = self._open_dir(parts[:-1], name, create=True)
        try:
            if base == WHITEOUT_OPAQUE:
                for key, value in opaque_xattrs("kernel"):
                    os.setxattr(pfd, key, value)
                return
            orig = base[len(WHITEOUT_PREFIX) :]
            if orig in (b"", b".", b".."):
                raise ArchiveError(f'entry "{name}": bare whiteout name "{_show(base)}"')
            if _exists(pfd, orig):
                raise ArchiveError(f'entry "{name}": whiteout target "{_show(orig)}" exists')
            try:
                os.mknod(orig, stat.S_IFCHR, os.makedev(0, 0), dir_fd=pfd)
            except PermissionError:
                raise ArchiveError(
                    f'entry "{name}": cannot create whiteout device (mknod not permitted; '
                    'use the "aufs" whiteout format when not root)'
                ) from None
            self._chown(orig, pfd, m, name)
        finally:
            os.close(pfd)

    def _hardlink(self, m: TarMember, parts: list[bytes], name: str) -> None:
        if not m.linkname:
            raise ArchiveError(f'entry "{name}": hard link with an empty target')
        target = layer_path(m.linkname, name)
        if target is None:
            raise ArchiveError(f'entry "{name}": hard link to the layer root')
        tshow = _display(target)
        try:
            tfd = self._open_dir(target[:-1], name, create=False)
        except FileNotFoundError:
            raise ArchiveError(
                f'entry "{name}": hard link target "{tshow}" is not in this layer'
            ) from None
        try:
            try:
                st = os.stat(target[-1], dir_fd=tfd, follow_symlinks=False)
            except FileNotFoundError:
                raise ArchiveError(
                    f'entry "{name}": hard link target "{tshow}" is not in this layer'
                ) from None
            if stat.S_ISDIR(st.st_mode):
                raise ArchiveError(f'entry "{name}": hard link target "{tshow}" is a directory')
            pfd = self._open_dir(parts[:-1], name, create=True)
            try:
                self._make_room(pfd, parts[-1], is_dir=False, name=name)
                os.link(
                    target[-1], parts[-1], src_dir_fd=tfd, dst_dir_fd=pfd, follow_symlinks=False
                )
            finally:
                os.close(pfd)
        finally:
            os.close(tfd)

    def _make_room(self, pfd: int, base: bytes, *, is_dir: bool, name: str) -> bool:
        """Remove what is in the way (Go replaces all but dir-over-dir). True if a dir stays."""
        try:
            st = os.stat(base, dir_fd=pfd, follow_symlinks=False)
        except FileNotFoundError:
            return False
        if stat.S_ISDIR(st.st_mode):
            if is_dir:
                return True
            shutil.rmtree(base, dir_fd=pfd)
        else:
            os.unlink(base, dir_fd=pfd)
        return False

    def _create(
        self, pfd: int, parts: list[bytes], m: TarMember, src: TarSplitter, name: str
    ) -> bytes | None:
        base = parts[-1]
        perm = m.mode & 0o7777
        crc: bytes | None = None
        t = m.typeflag
        if self.options.force_mask is not None and t not in (DIR, SYM, LNK):
            t = REG  # devices, FIFOs: a regular file; the override says what it stands for
        if t in (CHR, BLK) and self.rootless:
            # a user namespace cannot make device nodes; containers/storage skips them too
            self._make_room(pfd, base, is_dir=False, name=name)
            self.skipped_devices.append(name)
            return _drain_crc(m, src)
        if t == REG:
            self._make_room(pfd, base, is_dir=False, name=name)
            fd = os.open(
                base,
                os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC,
                0o600,
                dir_fd=pfd,
            )
            try:
                crc = _write_content(fd, m, src) if m.typeflag == REG else _drain_crc(m, src)
                self._finish_fd(fd, m, perm, name)
            finally:
                os.close(fd)
            return crc
        if t == DIR:
            if not self._make_room(pfd, base, is_dir=True, name=name):
                os.mkdir(base, 0o700, dir_fd=pfd)
            fd = os.open(base, _DIR_FLAGS, dir_fd=pfd)
            disk = perm if self.options.force_mask is None else self.options.force_mask
            restore: int | None = None
            if self.unprivileged and disk & 0o700 != 0o700:
                restore, disk = disk, disk | 0o700
            try:
                self._chown(fd, None, m, name)
                self._xattrs_fd(fd, m)
                self._override(fd, m)
                os.chmod(fd, disk)
            finally:
                os.close(fd)
            self.dirs.append((parts, *_times(m), restore))
            return _drain_crc(m, src)
        if t == SYM:
            _check_symlink_target(parts, m.linkname, name)
            self._make_room(pfd, base, is_dir=False, name=name)
            os.symlink(m.linkname, base, dir_fd=pfd)
        elif t in (CHR, BLK):
            self._make_room(pfd, base, is_dir=False, name=name)
            kind = stat.S_IFCHR if t == CHR else stat.S_IFBLK
            try:
                os.mknod(base, kind | 0o600, os.makedev(m.devmajor, m.devminor), dir_fd=pfd)
            except PermissionError:
                raise ArchiveError(
                    f'entry "{name}": cannot create device node (mknod not permitted)'
                ) from None
        elif t == FIFO:
            self._make_room(pfd, base, is_dir=False, name=name)
            os.mkfifo(base, 0o600, dir_fd=pfd)
        else:
            raise ArchiveError(f'entry "{name}": unhandled tar header type {t.decode("latin-1")!r}')
        self._chown(base, pfd, m, name)
        proc = f"/proc/self/fd/{pfd}/".encode() + base
        for key, value in m.xattrs.items():
            _setxattr(proc, key, value, name)
        if t != SYM:
            os.chmod(base, perm, dir_fd=pfd)  # not a symlink: we just created it
        os.utime(base, ns=_times(m), dir_fd=pfd, follow_symlinks=False)
        return _drain_crc(m, src)

    def _xattrs_fd(self, fd: int, m: TarMember) -> None:
        for key, value in m.xattrs.items():
            _setxattr(fd, key, value, m.display_name)

    def _finish_fd(self, fd: int, m: TarMember, perm: int, name: str) -> None:
        self._chown(fd, None, m, name)  # before chmod so set-id bits survive
        self._xattrs_fd(fd, m)  # after chown, which drops security.capability
        self._override(fd, m)
        os.chmod(fd, perm if self.options.force_mask is None else self.options.force_mask)
        os.utime(fd, ns=_times(m))

    def _override(self, fd: int, m: TarMember) -> None:
        """With ``force_mask``: record the entry's real owner, mode and type."""
        if self.options.force_mask is None:
            return
        kinds = {DIR: stat.S_IFDIR, CHR: stat.S_IFCHR, BLK: stat.S_IFBLK, FIFO: stat.S_IFIFO}
        mode = kinds.get(m.typeflag, stat.S_IFREG) | (m.mode & 0o7777)
        rdev = os.makedev(m.devmajor, m.devminor) if m.typeflag in (CHR, BLK) else 0
        value = overridestat.format_override(m.uid, m.gid, mode, rdev)
        os.setxattr(fd, overridestat.XATTR, value)

    def _chown(self, target: int | bytes, dir_fd: int | None, m: TarMember, name: str) -> None:
        """Give the entry the tar's owner; one line naming the id and the fix when the
        system refuses (or a note for the summary warning with ``ignore_chown_errors``)."""
        try:
            if dir_fd is None:
                assert isinstance(target, int)
                os.chown(target, m.uid, m.gid)
            else:
                os.chown(target, m.uid, m.gid, dir_fd=dir_fd, follow_symlinks=False)
        except OSError as exc:
            if exc.errno not in (errno.EINVAL, errno.EPERM):
                raise
            if self.options.ignore_chown_errors:
                self.chown_failures.append(name)
                return
            raise ArchiveError(f'entry "{name}": {chown_advice(m.uid, m.gid, exc)}') from None

    def finish(self) -> None:
        """Set directory times now that their contents are written, and give directories
        kept writable during the extraction their real mode (deepest first, so a parent
        that loses its own permissions is changed last)."""
        for parts, atime, mtime, restore in reversed(self.dirs):
            try:
                fd = self._open_dir(parts, _display(parts), create=False)
            except (FileNotFoundError, ArchiveError):
                continue  # replaced by a later entry
            try:
                if restore is not None:
                    os.chmod(fd, restore)
                os.utime(fd, ns=(atime, mtime))
            finally:
                os.close(fd)
        if self.skipped_devices:
            log.warning(
                "skipped %d device node%s (a user namespace cannot create them), e.g. %s",
                len(self.skipped_devices),
                "" if len(self.skipped_devices) == 1 else "s",
                self.skipped_devices[0],
            )
        if self.chown_failures:
            log.warning(
                "kept our own owner on %d entr%s the system would not chown "
                "(ignore_chown_errors), e.g. %s",
                len(self.chown_failures),
                "y" if len(self.chown_failures) == 1 else "ies",
                self.chown_failures[0],
            )


def chown_advice(uid: int, gid: int, exc: OSError) -> str:
    """Why a chown to *uid*:*gid* failed and what fixes it, in one line."""
    if exc.errno == errno.EINVAL and userns.in_user_namespace():
        if userns.read_id_map("uid").to_outside(uid) is None:
            return f"uid {uid} is not mapped: widen /etc/subuid (or use ignore_chown_errors)"
        return f"gid {gid} is not mapped: widen /etc/subgid (or use ignore_chown_errors)"
    return (
        f"cannot give it owner {uid}:{gid} ({exc.strerror}): run as root, or in a user "
        "namespace with subordinate ids (/etc/subuid, /etc/subgid; layerfs unshare), "
        "or use ignore_chown_errors"
    )


def _exists(dfd: int, name: bytes) -> bool:
    try:
        os.stat(name, dir_fd=dfd, follow_symlinks=False)
    except FileNotFoundError:
        return False
    return True


def open_parent_dir(root: str, parts: Sequence[bytes]) -> int | None:
    """A descriptor of the directory holding ``root/parts``, reached without following any
    symlink; None if it is absent or unreachable. The caller closes it."""
    try:
        fd = os.open(root, _DIR_FLAGS)
    except OSError:
        return None
    for comp in parts[:-1]:
        try:
            nfd = os.open(comp, _DIR_FLAGS, dir_fd=fd)
        except OSError:
            os.close(fd)
            return None
        os.close(fd)
        fd = nfd
    return fd


def lstat_in(root: str, parts: Sequence[bytes]) -> os.stat_result | None:
    """lstat ``root/parts`` without following any symlink; None if absent or unreachable."""
    fd = open_parent_dir(root, parts)
    if fd is None:
        return None
    try:
        return os.stat(parts[-1], dir_fd=fd, follow_symlinks=False)
    except OSError:
        return None
    finally:
        os.close(fd)


def _check_symlink_target(parts: list[bytes], target: bytes, name: str) -> None:
    """Go refuses a symlink whose target, joined to its directory, leaves the layer."""
    if not target:
        raise ArchiveError(f'entry "{name}": symlink with an empty target')
    if target.startswith(b"/"):
        return
    depth = len(parts) - 1
    for comp in target.split(b"/"):
        if comp == b"..":
            depth -= 1
            if depth < 0:
                raise ArchiveError(
                    f'entry "{name}": symlink target "{_show(target)}" escapes the layer'
                )
        elif comp not in (b"", b"."):
            depth += 1


def _setxattr(target: int | bytes, key: str, value: bytes, name: str) -> None:
    try:
        if isinstance(target, int):
            os.setxattr(target, key, value)
        else:
            os.setxattr(target, key, value, follow_symlinks=False)
    except OSError as exc:
        if exc.errno in (errno.ENOTSUP, errno.EOPNOTSUPP):
            log.warning('entry "%s": xattr %s not supported here, skipped', name, key)
            return
        raise ArchiveError(f'entry "{name}": cannot set xattr {key}: {exc.strerror}') from None


def _times(m: TarMember) -> tuple[int, int]:
    atime = m.atime_ns if m.atime_ns is not None else m.mtime_ns
    return max(atime, m.mtime_ns), m.mtime_ns


def _drain_crc(m: TarMember, src: TarSplitter) -> bytes | None:
    """Consume content that is not written anywhere (still checksummed, as Go does)."""
    if m.size == 0 and m.data_size == 0:
        return None
    crc = Crc64()
    while True:
        data = src.read(CHUNK)
        if not data:
            break
        crc.update(data)
    return crc.digest() if m.size else None


def _write_content(fd: int, m: TarMember, src: TarSplitter) -> bytes | None:
    """Write a regular file's content in chunks; sparse maps become holes."""
    crc = Crc64()
    if m.sparse is None:
        while True:
            data = src.read(CHUNK)
            if not data:
                break
            crc.update(data)
            _write_all(fd, data)
        return crc.digest() if m.size else None
    pos = 0
    for off, n in m.sparse:
        crc.update_zeros(off - pos)
        os.lseek(fd, off, os.SEEK_SET)
        left = n
        while left:
            data = src.read(min(CHUNK, left))
            if not data:
                raise ArchiveError(f'entry "{m.display_name}": unexpected EOF in file content')
            crc.update(data)
            _write_all(fd, data)
            left -= len(data)
        pos = off + n
    crc.update_zeros(m.size - pos)
    os.ftruncate(fd, m.size)
    return crc.digest() if m.size else None


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        n = os.write(fd, view)
        view = view[n:]


# --------------------------------------------------------------------------- the entry point


def apply_tar(
    stream: BinaryIO,
    diff_dir: str,
    *,
    lower_diff_dirs: Sequence[str] = (),
    tar_split_path: str | None = None,
    whiteout_format: Literal["kernel", "aufs"] = "kernel",
    progress: Callable[[int, int], None] | None = None,
    options: ApplyOptions | None = None,
) -> ApplyResult:
    """Extract the (possibly compressed) layer tar *stream* into *diff_dir*.

    ``lower_diff_dirs`` are the parent chain's diff dirs, nearest first. When
    ``tar_split_path`` is given the tar-split is written there atomically (0600).
    ``progress(compressed_bytes_read, uncompressed_bytes_read)`` is called after each entry.
    Raises :class:`ArchiveError` naming the entry for malformed or hostile input; on error
    nothing is left outside *diff_dir* (the caller deletes the layer).
    """
    raw = _HashingReader(stream)
    current = "(start of archive)"
    writer = TarSplitWriter(tar_split_path) if tar_split_path else None
    ex: _Extractor | None = None
    try:
        kind, plain = open_decompressed(raw)  # type: ignore[arg-type]
        tarin = _HashingReader(plain)
        splitter = TarSplitter(tarin)  # type: ignore[arg-type]
        ex = _Extractor(diff_dir, lower_diff_dirs, whiteout_format, options)
        seen: set[bytes] = set()
        uids: set[int] = set()
        gids: set[int] = set()
        while True:
            m = splitter.next()
            segment = splitter.take_raw()
            if writer and segment:
                writer.add_segment(segment)
            if m is None:
                break
            current = m.display_name
            check_name_limits(m, diff_dir)
            key = go_clean(m.name)
            if key in seen:
                raise ArchiveError(f'entry "{current}": duplicates of file paths not supported')
            seen.add(key)
            if not go_base(m.name).startswith(WHITEOUT_PREFIX):
                uids.add(m.uid & 0xFFFFFFFF)
                gids.add(m.gid & 0xFFFFFFFF)
            crc = ex.extract(m, splitter)
            if writer:
                writer.add_file(m.name, m.size, crc)
            if progress:
                progress(raw.count, tarin.count)
        current = "(end of archive)"
        ex.finish()
        for chunk in splitter.trailing():
            if writer:
                writer.add_segment(chunk)
        raw.drain()
        if writer:
            writer.commit()
        if progress:
            progress(raw.count, tarin.count)
        return ApplyResult(
            compressed_digest=raw.digest(),
            compressed_size=raw.count,
            uncompressed_digest=tarin.digest(),
            uncompressed_size=tarin.count,
            compression=kind,
            uidset=sorted(uids),
            gidset=sorted(gids),
        )
    except OSError as exc:
        if exc.errno in (errno.ENOSPC, errno.EDQUOT):
            raise ArchiveError(f'entry "{current}": no space left on device') from exc
        detail = exc.strerror or str(exc)
        raise ArchiveError(f'entry "{current}": {detail}') from exc
    finally:
        if ex is not None:
            ex.close()
        if writer:
            writer.abort()
