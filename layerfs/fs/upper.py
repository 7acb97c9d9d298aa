"""Every mutation of a read-write view's upper dir, and how the upper dir is read.

Paths handed to :class:`Upper` are *view paths* relative to the view root (``b""`` is the
root), which inside the upper dir are the same relative paths. Every entry that appears under
a final name is complete: files, dirs and links are prepared under a temporary name in
``WORK/work`` (same file system) and renamed into place; a whiteout or opaque dir that
replaces an entry is swapped in with ``RENAME_EXCHANGE`` and the old entry is deleted from the
work dir afterwards. A rename that must leave a whiteout moves the entry and writes the
whiteout in one ``renameat2`` (:meth:`Upper.move`). A crash therefore leaves only complete
entries under final names, each view name showing its old or its new state, and leftovers in
``WORK/work``, which :meth:`Upper.clean_work` removes at the next mount.

Locking: the caller (:mod:`layerfs.fs.rwops`) serialises every mutation (one lock per view);
this module holds no state besides a counter for temporary names. Methods may run in a worker
thread (copy-ups of big files and trees) while the event loop keeps answering lookups and reads,
which then see either the old or the new entry, never a partial one.
"""

from __future__ import annotations

import ctypes
import errno
import itertools
import logging
import os
import shutil
import stat
from collections.abc import Iterable

from layerfs.overlayfmt import (
    FUSE_OPAQUE,
    LAYERFS_PREFIX,
    OPAQUE_MARKER,
    OPAQUE_MARKER_MODE,
    ORIGIN_XATTR,
    TRUSTED_OPAQUE,
    TRUSTED_PREFIX,
    USER_OPAQUE,
    WH_PREFIX,
    WhiteoutFormat,
    is_upper_whiteout,
    is_write_internal_xattr,
    opaque_marker_file,
    opaque_xattrs,
)

log = logging.getLogger(__name__)

LOWER_LINKS_XATTR = LAYERFS_PREFIX + b"lowerlinks"
"""On an upper dir made only as the parent of a copied-up hard-link group member (where kernel
overlayfs, which keeps such groups in its index dir, leaves the lower dir alone): the dir's
mtime (ns, decimal) when marked. While the mtime is unchanged and no copy-up, setattr or
xattr change reached the dir (those drop the mark), the view shows the lower dir's link
count instead of a merged dir's 1."""

WORK_SUBDIR = b"work"
"""Temporary entries live in ``WORK/work`` (the name kernel overlayfs and fuse-overlayfs use)."""

TEMP_PREFIX = b"#layerfs."

RENAME_NOREPLACE = 1
RENAME_EXCHANGE = 2
RENAME_WHITEOUT = 4
_AT_FDCWD = -100

_libc = ctypes.CDLL(None, use_errno=True)

COPY_CHUNK = 1 << 30
FICLONE = 0x40049409


def renameat2(old: bytes, new: bytes, flags: int) -> None:
    """renameat2(2) with absolute paths; OSError on failure."""
    if _libc.renameat2(_AT_FDCWD, old, _AT_FDCWD, new, ctypes.c_uint(flags)) != 0:
        code = ctypes.get_errno()
        raise OSError(code, os.strerror(code), os.fsdecode(new))


def copy_data(src_fd: int, dst_fd: int, size: int) -> None:
    """Copy *size* bytes: a reflink (FICLONE) when the file system shares extents, else
    ``copy_file_range`` (in-kernel, sparse-aware on most file systems), else read/write."""
    import fcntl

    try:
        fcntl.ioctl(dst_fd, FICLONE, src_fd)
        return
    except OSError:
        pass
    off = 0
    try:
        while off < size:
            n = os.copy_file_range(src_fd, dst_fd, min(COPY_CHUNK, size - off), off, off)
            if n == 0:
                break
            off += n
        return
    except OSError as e:
        if e.errno not in (errno.EXDEV, errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP):
            raise
    while off < size:
        buf = os.pread(src_fd, min(1 << 20, size - off), off)
        if not buf:
            break
        os.pwrite(dst_fd, buf, off)
        off += len(buf)


def is_bookkeeping_xattr(fmt: WhiteoutFormat, name: bytes) -> bool:
    """True for an upper xattr that is the format's or the view's own bookkeeping (not copied
    to a new upper entry); escaped view xattrs (``trusted.overlay.overlay.X`` in the kernel
    format, ``trusted.layerfs.layerfs.X``) are the user's and are copied."""
    if name.startswith(LAYERFS_PREFIX + b"layerfs."):
        return False
    if fmt == "kernel" and name.startswith(TRUSTED_PREFIX + b"overlay."):
        return False
    return is_write_internal_xattr(fmt, name)


def list_xattrs(path: bytes) -> list[tuple[bytes, bytes]]:
    """All xattrs of *path* (not following a symlink); empty where xattrs are unsupported."""
    try:
        names = os.listxattr(path, follow_symlinks=False)
    except OSError as e:
        if e.errno in (errno.ENOTSUP, errno.ENODATA):
            return []
        raise
    out = []
    for n in names:
        try:
            out.append((os.fsencode(n), os.getxattr(path, n, follow_symlinks=False)))
        except OSError as e:
            if e.errno not in (errno.ENODATA, errno.ENOTSUP):
                raise
    return out


class Upper:
    """The upper dir of one read-write view (see the module docstring for the invariants)."""

    def __init__(self, root: str | bytes, work: str | bytes, fmt: WhiteoutFormat) -> None:
        self.root = os.fsencode(root)
        self.work = os.path.join(os.fsencode(work), WORK_SUBDIR)
        self.fmt = fmt
        self._seq = itertools.count(1)
        self.st_dev = os.stat(self.root).st_dev

    # -- paths ----------------------------------------------------------------------------
    def path(self, rel: bytes) -> bytes:
        return self.root + b"/" + rel if rel else self.root

    def temp(self) -> bytes:
        """A fresh temporary path in the work dir (nothing exists there)."""
        return self.work + b"/" + TEMP_PREFIX + str(next(self._seq)).encode()

    def clean_work(self) -> int:
        """Create ``WORK/work`` if missing and delete everything in it (a crash's temporary
        entries, deleted trees not yet freed). Returns how many entries were removed. Called
        at mount, before the view is served."""
        os.makedirs(self.work, mode=0o700, exist_ok=True)
        if os.stat(self.work).st_dev != self.st_dev:
            raise OSError(errno.EXDEV, "the work dir is not on the upper dir's file system")
        n = 0
        for name in os.listdir(self.work):
            self.remove_tree(self.work + b"/" + name)
            n += 1
        return n

    # -- reading --------------------------------------------------------------------------
    def lstat(self, rel: bytes) -> os.stat_result | None:
        try:
            return os.lstat(self.path(rel))
        except FileNotFoundError:
            return None
        except NotADirectoryError:
            return None

    def whiteout_by_name(self, rel: bytes) -> bool:
        """aufs: True if a ``.wh.NAME`` entry beside *rel* whites it out (fuse-overlayfs)."""
        if self.fmt != "aufs" or not rel:
            return False
        head, _, name = rel.rpartition(b"/")
        sib = (head + b"/" if head else b"") + WH_PREFIX + name
        return self.lstat(sib) is not None

    def entry(self, rel: bytes, by_name: bool = True) -> tuple[os.stat_result | None, bool]:
        """(the upper entry at *rel*, or None; True if *rel* is whited out in the upper).
        Without *by_name* an aufs ``.wh.NAME`` beside it is not looked for: the caller knows
        none can matter (no lower entry and no upper entry there, or an entry already shown:
        this module never writes ``.wh.NAME`` files, so none appears while mounted)."""
        st = self.lstat(rel)
        if st is not None and is_upper_whiteout(self.fmt, rel, st.st_mode, st.st_rdev):
            return None, True
        if by_name and self.whiteout_by_name(rel):
            return None, True
        return st, False

    def is_opaque(self, rel: bytes) -> bool:
        """True if the upper dir *rel* hides the lower dirs at its path."""
        p = self.path(rel)
        names = [TRUSTED_OPAQUE] + ([USER_OPAQUE, FUSE_OPAQUE] if self.fmt == "aufs" else [])
        for n in names:
            try:
                if os.getxattr(p, n, follow_symlinks=False) == b"y":
                    return True
            except OSError:
                pass
        if self.fmt == "aufs":
            return os.path.lexists(p + b"/" + OPAQUE_MARKER)
        return False

    def origin(self, rel: bytes) -> int | None:
        """The view inode number recorded on the upper entry (copy-up), or None."""
        try:
            v = os.getxattr(self.path(rel), ORIGIN_XATTR, follow_symlinks=False)
        except OSError:
            return None
        try:
            return int(v)
        except ValueError:
            return None

    def listdir(self, rel: bytes) -> tuple[dict[bytes, os.stat_result], set[bytes]]:
        """(visible entries of the upper dir *rel* with their lstat, names whited out)."""
        entries: dict[bytes, os.stat_result] = {}
        wh: set[bytes] = set()
        try:
            it = os.scandir(self.path(rel))
        except (FileNotFoundError, NotADirectoryError):
            return entries, wh
        with it:
            for de in it:
                name = os.fsencode(de.name)
                st = de.stat(follow_symlinks=False)
                if is_upper_whiteout(self.fmt, name, st.st_mode, st.st_rdev):
                    wh.add(name)
                elif self.fmt == "aufs" and name.startswith(WH_PREFIX):
                    if name != OPAQUE_MARKER and len(name) > len(WH_PREFIX):
                        wh.add(name[len(WH_PREFIX) :])
                else:
                    entries[name] = st
        for n in wh:
            entries.pop(n, None)
        return entries, wh

    def keeps_lower_links(self, rel: bytes, st: os.stat_result) -> bool:
        """True if the upper dir *rel* (lstat *st*) carries a still valid
        :data:`LOWER_LINKS_XATTR` mark."""
        try:
            v = os.getxattr(self.path(rel), LOWER_LINKS_XATTR, follow_symlinks=False)
        except OSError:
            return False
        return v == str(st.st_mtime_ns).encode()

    # -- small mutations ------------------------------------------------------------------
    def mark_lower_links(self, rel: bytes) -> None:
        p = self.path(rel)
        mtime = os.lstat(p).st_mtime_ns
        _set_bookkeeping(p, LOWER_LINKS_XATTR, str(mtime).encode())

    def drop_lower_links(self, rel: bytes) -> None:
        try:
            os.removexattr(self.path(rel), LOWER_LINKS_XATTR, follow_symlinks=False)
        except OSError as e:
            # EPERM: trusted.* in a user namespace, where no such mark can have been set
            if e.errno not in (
                errno.ENODATA,
                errno.ENOTSUP,
                errno.ENOENT,
                errno.ENOTDIR,
                errno.EPERM,
            ):
                raise

    def set_origin(self, path: bytes, ino: int) -> None:
        _set_bookkeeping(path, ORIGIN_XATTR, str(ino).encode())

    def mark_opaque(self, path: bytes) -> None:
        """Mark the directory at absolute *path* opaque in the view's format."""
        marker = opaque_marker_file(self.fmt)
        for k, v in opaque_xattrs(self.fmt):
            try:
                os.setxattr(path, k, v, follow_symlinks=False)
            except PermissionError:
                # trusted.* in a user namespace: the marker file is enough (aufs), else the
                # user.* form rootless overlayfs (userxattr) and containers/storage read
                if marker is None and k.startswith(b"trusted."):
                    os.setxattr(path, b"user." + k[8:], v, follow_symlinks=False)
                elif marker is None:
                    raise
        if marker is not None:
            fd = os.open(
                path + b"/" + marker, os.O_CREAT | os.O_WRONLY | os.O_CLOEXEC, OPAQUE_MARKER_MODE
            )
            os.close(fd)

    def make_whiteout(self, path: bytes) -> None:
        os.mknod(path, stat.S_IFCHR | 0o000, os.makedev(0, 0))

    def remove_tree(self, path: bytes) -> None:
        """Delete *path* whatever it is (a dir recursively)."""
        try:
            st = os.lstat(path)
        except FileNotFoundError:
            return
        if stat.S_ISDIR(st.st_mode):
            shutil.rmtree(path)
        else:
            os.unlink(path)

    def clear_name_whiteout(self, rel: bytes) -> None:
        """aufs: drop a ``.wh.NAME`` beside *rel* (after NAME was made again)."""
        if self.fmt != "aufs" or not rel:
            return
        head, _, name = rel.rpartition(b"/")
        sib = self.path((head + b"/" if head else b"") + WH_PREFIX + name)
        if os.path.lexists(sib):
            self.remove_tree(sib)

    def place(self, tmp: bytes, rel: bytes) -> None:
        """Move the prepared entry *tmp* (in the work dir) to *rel*, replacing a whiteout or
        nothing there; a replaced whiteout is deleted after the swap."""
        dst = self.path(rel)
        st = self.lstat(rel)
        if st is None:
            os.rename(tmp, dst)
        elif stat.S_ISDIR(st.st_mode) or stat.S_ISDIR(os.lstat(tmp).st_mode):
            renameat2(tmp, dst, RENAME_EXCHANGE)
            self.remove_tree(tmp)
        else:
            os.rename(tmp, dst)
        self.clear_name_whiteout(rel)

    def clear_dir(self, rel: bytes, opaque: bool, ino: int) -> None:
        """Empty the upper dir *rel* on disk (its whiteouts, an aufs opaque marker) without
        changing the view, which shows it empty: an empty copy with its owner, mode, times and
        xattrs (origin *ino*; opaque if *opaque*, i.e. a lower dir is below) is swapped in and
        the old dir deleted from the work dir. Used before a rename replaces the dir, so that
        one rename can replace it (kernel overlayfs: ``ovl_clear_empty``). In the aufs format
        an opaque copy holds a marker file and stays non-empty."""
        p = self.path(rel)
        if not os.listdir(p):
            return
        st = os.lstat(p)
        tmp = self.temp()
        os.mkdir(tmp, 0o700)
        try:
            keep = [kv for kv in list_xattrs(p) if not is_bookkeeping_xattr(self.fmt, kv[0])]
            self.copy_attrs(
                tmp, st.st_mode, st.st_uid, st.st_gid, st.st_atime_ns, st.st_mtime_ns, keep
            )
            self.set_origin(tmp, ino)
            if opaque:
                self.mark_opaque(tmp)
                os.utime(tmp, ns=(st.st_atime_ns, st.st_mtime_ns))
        except BaseException:
            self.remove_tree(tmp)
            raise
        renameat2(tmp, p, RENAME_EXCHANGE)
        self.remove_tree(tmp)

    def move(self, src: bytes, dst: bytes, whiteout: bool) -> None:
        """Rename the upper entry *src* over *dst* (nothing, a whiteout, a non-dir, or a dir
        empty on disk: :meth:`clear_dir`) in one step; with *whiteout* a whiteout takes the
        place of *src* in the same step (``RENAME_WHITEOUT``, or ``RENAME_EXCHANGE`` with a
        whiteout at *dst*), as kernel overlayfs does. A crash leaves the old or the new names
        (at worst a whiteout over nothing, which shows nothing). Only where the upper file
        system lacks ``RENAME_WHITEOUT``, or an aufs opaque dir is replaced, is the whiteout
        made in a second step (not crash-atomic)."""
        s, d = self.path(src), self.path(dst)
        dst_st = self.lstat(dst)
        name = dst.rpartition(b"/")[2]
        if dst_st is not None and is_upper_whiteout(self.fmt, name, dst_st.st_mode, dst_st.st_rdev):
            renameat2(s, d, RENAME_EXCHANGE)  # the whiteout moves to src
            if not whiteout:
                os.unlink(s)
            return
        if not whiteout:
            if dst_st is not None and stat.S_ISDIR(dst_st.st_mode) and os.listdir(d):
                renameat2(s, d, RENAME_EXCHANGE)
                self.remove(src)
            else:
                os.rename(s, d)
            return
        try:
            renameat2(s, d, RENAME_WHITEOUT)
            return
        except OSError as e:
            if e.errno not in (errno.EINVAL, errno.EOPNOTSUPP, errno.ENOTEMPTY):
                raise
        if dst_st is not None and stat.S_ISDIR(dst_st.st_mode):
            renameat2(s, d, RENAME_EXCHANGE)
        else:
            os.rename(s, d)
        self.whiteout(src)

    def whiteout(self, rel: bytes) -> None:
        """Make *rel* a whiteout, replacing what the upper has there (deleted afterwards)."""
        tmp = self.temp()
        self.make_whiteout(tmp)
        st = self.lstat(rel)
        if st is None:
            os.rename(tmp, self.path(rel))
            return
        renameat2(tmp, self.path(rel), RENAME_EXCHANGE)
        self.remove_tree(tmp)

    def remove(self, rel: bytes) -> None:
        """Delete the upper entry at *rel* (a dir with its whiteouts), atomically: it leaves
        its name in one rename into the work dir."""
        st = self.lstat(rel)
        if st is None:
            return
        if stat.S_ISDIR(st.st_mode):
            tmp = self.temp()
            os.rename(self.path(rel), tmp)
            self.remove_tree(tmp)
        else:
            os.unlink(self.path(rel))

    def keep_times(self, rel: bytes) -> tuple[int, int] | None:
        st = self.lstat(rel)
        return None if st is None else (st.st_atime_ns, st.st_mtime_ns)

    def restore_times(self, rel: bytes, times: tuple[int, int] | None) -> None:
        self.restore_times_abs(self.path(rel), times)

    def restore_times_abs(self, path: bytes, times: tuple[int, int] | None) -> None:
        if times is not None:
            os.utime(path, ns=times, follow_symlinks=False)

    # -- copy-up of one entry ---------------------------------------------------------------
    def copy_attrs(
        self,
        dst: bytes,
        mode: int,
        uid: int,
        gid: int,
        atime_ns: int,
        mtime_ns: int,
        xattrs: Iterable[tuple[bytes, bytes]],
    ) -> None:
        """Owner, xattrs, mode and times of a copied-up entry at absolute *dst* (in that order:
        chown clears set-id bits, writing some xattrs such as ACLs sets the mode)."""
        os.chown(dst, uid, gid, follow_symlinks=False)
        for k, v in xattrs:
            if is_bookkeeping_xattr(self.fmt, k):
                continue
            try:
                os.setxattr(dst, k, v, follow_symlinks=False)
            except OSError as e:
                if e.errno not in (errno.ENOTSUP, errno.EPERM):
                    raise
        if not stat.S_ISLNK(mode):
            os.chmod(dst, stat.S_IMODE(mode))
        os.utime(dst, ns=(atime_ns, mtime_ns), follow_symlinks=False)

    def prepare_copy(
        self,
        mode: int,
        rdev: int,
        size: int,
        src_fd: int | None,
        link_target: bytes | None,
        with_data: bool = True,
    ) -> bytes:
        """Create the copy of a lower entry in the work dir (content read from *src_fd*, which
        the caller opened and closes) and return its temporary path; the caller sets the
        attributes (:meth:`copy_attrs`) and places it."""
        tmp = self.temp()
        if stat.S_ISDIR(mode):
            os.mkdir(tmp, 0o700)
        elif stat.S_ISREG(mode):
            fd = os.open(tmp, os.O_CREAT | os.O_EXCL | os.O_WRONLY | os.O_CLOEXEC, 0o600)
            try:
                if with_data and size > 0 and src_fd is not None:
                    copy_data(src_fd, fd, size)
            except BaseException:
                os.close(fd)
                os.unlink(tmp)
                raise
            os.close(fd)
        elif stat.S_ISLNK(mode):
            os.symlink(link_target or b"", tmp)
        else:
            os.mknod(tmp, stat.S_IFMT(mode) | 0o600, rdev)
        return tmp


def _set_bookkeeping(path: bytes, name: bytes, value: bytes) -> None:
    """Set one of the view's own ``trusted.layerfs.*`` marks. In a user namespace (rootless
    podman runs the mount program there) ``trusted.*`` cannot be set: the mark is then left
    out (EPERM), and the view does without it (a copied-up entry takes its upper inode
    number; a hard-link group's parent dirs show a link count of 1 after remount)."""
    try:
        os.setxattr(path, name, value, follow_symlinks=False)
    except PermissionError:
        log.debug("cannot set %s on %s (user namespace): left out", name, path)
