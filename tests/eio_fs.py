"""A tiny read-only FUSE file system whose directory ``d`` lists an opaque-marker xattr that
cannot be read (``getxattr`` fails with EIO), or, with ``--listxattr``, whose ``listxattr``
fails. ``python eio_fs.py MOUNTPOINT [--listxattr]``; prints ``READY`` once mounted and serves
until unmounted. Used to test that such a layer is refused, not read as "not opaque"."""

from __future__ import annotations

import errno
import os
import stat
import sys

import pyfuse3
import trio

ROOT = pyfuse3.ROOT_INODE
DIR = ROOT + 1
FILE = ROOT + 2


class EIOFS(pyfuse3.Operations):
    def __init__(self, fail_list: bool) -> None:
        super().__init__()
        self.fail_list = fail_list

    def _attr(self, ino: int) -> pyfuse3.EntryAttributes:
        a = pyfuse3.EntryAttributes()
        a.st_ino = ino
        a.st_mode = (stat.S_IFDIR | 0o755) if ino in (ROOT, DIR) else (stat.S_IFREG | 0o644)
        a.st_nlink = 2 if ino in (ROOT, DIR) else 1
        a.st_size = 0
        a.st_uid = a.st_gid = 0
        a.st_atime_ns = a.st_mtime_ns = a.st_ctime_ns = 1_600_000_000 * 10**9
        return a

    async def getattr(self, inode: int, ctx: pyfuse3.RequestContext) -> pyfuse3.EntryAttributes:
        return self._attr(inode)

    async def lookup(
        self, parent: int, name: bytes, ctx: pyfuse3.RequestContext
    ) -> pyfuse3.EntryAttributes:
        if parent == ROOT and name == b"d":
            return self._attr(DIR)
        if parent == DIR and name == b"f":
            return self._attr(FILE)
        raise pyfuse3.FUSEError(errno.ENOENT)

    async def opendir(self, inode: int, ctx: pyfuse3.RequestContext) -> int:
        return inode

    async def readdir(self, fh: int, start_id: int, token: pyfuse3.ReaddirToken) -> None:
        entries = [(b"d", DIR)] if fh == ROOT else [(b"f", FILE)]
        for i, (name, ino) in enumerate(entries):
            if i < start_id:
                continue
            if not pyfuse3.readdir_reply(token, name, self._attr(ino), i + 1):
                return

    async def listxattr(self, inode: int, ctx: pyfuse3.RequestContext) -> list[bytes]:
        if inode == DIR:
            if self.fail_list:
                raise pyfuse3.FUSEError(errno.EIO)
            return [b"trusted.overlay.opaque"]
        return []

    async def getxattr(self, inode: int, name: bytes, ctx: pyfuse3.RequestContext) -> bytes:
        if inode == DIR:
            raise pyfuse3.FUSEError(errno.EIO)
        raise pyfuse3.FUSEError(pyfuse3.ENOATTR)


def main() -> None:
    mnt = sys.argv[1]
    fs = EIOFS("--listxattr" in sys.argv[2:])
    pyfuse3.init(fs, mnt, {"fsname=eiofs", "ro"})
    print("READY", flush=True)
    try:
        trio.run(pyfuse3.main)
    finally:
        pyfuse3.close(unmount=True)
    os._exit(0)


if __name__ == "__main__":
    main()
