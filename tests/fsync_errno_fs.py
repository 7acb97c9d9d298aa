"""A one-directory FUSE file system whose ``fsyncdir`` fails with a chosen errno.

Usage: ``python fsync_errno_fs.py MOUNTPOINT ERRNO_NAME``. Prints ``ready`` once mounted and
serves until unmounted. Tests use it to give ``fsync_dir`` a real directory whose fsync fails.
"""

from __future__ import annotations

import errno
import os
import stat
import sys
from typing import Any

import pyfuse3
import trio


class FsyncErrnoFS(pyfuse3.Operations):
    """The root directory only; ``fsyncdir`` raises ``code``."""

    def __init__(self, code: int) -> None:
        super().__init__()
        self.code = code

    async def getattr(self, inode: Any, ctx: Any = None) -> pyfuse3.EntryAttributes:
        if inode != pyfuse3.ROOT_INODE:
            raise pyfuse3.FUSEError(errno.ENOENT)
        attr = pyfuse3.EntryAttributes()
        attr.st_ino = inode
        attr.st_mode = stat.S_IFDIR | 0o755
        attr.st_nlink = 2
        attr.st_uid = os.getuid()
        attr.st_gid = os.getgid()
        return attr

    async def lookup(self, parent_inode: Any, name: Any, ctx: Any = None) -> Any:
        raise pyfuse3.FUSEError(errno.ENOENT)

    async def opendir(self, inode: Any, ctx: Any) -> Any:
        return pyfuse3.FileHandleT(inode)

    async def readdir(self, fh: Any, start_id: int, token: Any) -> None:
        return None

    async def releasedir(self, fh: Any) -> None:
        return None

    async def fsyncdir(self, fh: Any, datasync: bool) -> None:
        raise pyfuse3.FUSEError(self.code)


def main() -> None:
    mountpoint, name = sys.argv[1], sys.argv[2]
    pyfuse3.init(FsyncErrnoFS(getattr(errno, name)), mountpoint, {"fsname=fsyncerrno"})
    sys.stdout.write("ready\n")
    sys.stdout.flush()
    try:
        trio.run(pyfuse3.main)
    finally:
        pyfuse3.close(unmount=False)


if __name__ == "__main__":
    main()
