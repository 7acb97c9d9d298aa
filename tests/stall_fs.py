"""A tiny read-only FUSE file system whose file ``slow`` blocks every read until released.

``python stall_fs.py MOUNTPOINT``: prints ``READY`` once mounted, ``WAITING`` each time a read
of ``slow`` starts to block; ``setfattr -n user.release -v 1 MOUNTPOINT`` (any value) lets the
waiting and all later reads through. ``fast`` never blocks. Used as a layer below a layerfs
view, to show that a read stuck on its backing file does not hold up metadata requests."""

from __future__ import annotations

import errno
import os
import stat
import sys

import pyfuse3
import trio

ROOT = pyfuse3.ROOT_INODE
SLOW = ROOT + 1
FAST = ROOT + 2
DATA = {SLOW: b"slow data\n" * 1000, FAST: b"fast data\n"}
NAMES = {b"slow": SLOW, b"fast": FAST}


class StallFS(pyfuse3.Operations):
    def __init__(self) -> None:
        super().__init__()
        self.released = trio.Event()

    def _attr(self, ino: int) -> pyfuse3.EntryAttributes:
        a = pyfuse3.EntryAttributes()
        a.st_ino = ino
        a.st_mode = (stat.S_IFDIR | 0o755) if ino == ROOT else (stat.S_IFREG | 0o644)
        a.st_nlink = 2 if ino == ROOT else 1
        a.st_size = len(DATA.get(ino, b""))
        a.st_uid = a.st_gid = 0
        a.st_atime_ns = a.st_mtime_ns = a.st_ctime_ns = 1_600_000_000 * 10**9
        return a

    async def getattr(self, inode: int, ctx: pyfuse3.RequestContext) -> pyfuse3.EntryAttributes:
        return self._attr(inode)

    async def lookup(
        self, parent: int, name: bytes, ctx: pyfuse3.RequestContext
    ) -> pyfuse3.EntryAttributes:
        if parent == ROOT and name in NAMES:
            return self._attr(NAMES[name])
        raise pyfuse3.FUSEError(errno.ENOENT)

    async def opendir(self, inode: int, ctx: pyfuse3.RequestContext) -> int:
        return inode

    async def readdir(self, fh: int, start_id: int, token: pyfuse3.ReaddirToken) -> None:
        entries = sorted(NAMES.items())
        for i in range(start_id, len(entries)):
            name, ino = entries[i]
            if not pyfuse3.readdir_reply(token, name, self._attr(ino), i + 1):
                return

    async def listxattr(self, inode: int, ctx: pyfuse3.RequestContext) -> list[bytes]:
        return []

    async def getxattr(self, inode: int, name: bytes, ctx: pyfuse3.RequestContext) -> bytes:
        raise pyfuse3.FUSEError(pyfuse3.ENOATTR)

    async def setxattr(
        self, inode: int, name: bytes, value: bytes, ctx: pyfuse3.RequestContext
    ) -> None:
        if inode != ROOT or name != b"user.release":
            raise pyfuse3.FUSEError(errno.EPERM)
        self.released.set()

    async def open(self, inode: int, flags: int, ctx: pyfuse3.RequestContext) -> pyfuse3.FileInfo:
        return pyfuse3.FileInfo(fh=inode)

    async def read(self, fh: int, off: int, size: int) -> bytes:
        if fh == SLOW and not self.released.is_set():
            print("WAITING", flush=True)
            await self.released.wait()
        return DATA[fh][off : off + size]


def main() -> None:
    mnt = sys.argv[1]
    pyfuse3.init(StallFS(), mnt, {"fsname=stallfs"})
    print("READY", flush=True)
    try:
        trio.run(pyfuse3.main)
    finally:
        pyfuse3.close(unmount=True)
    os._exit(0)


if __name__ == "__main__":
    main()
