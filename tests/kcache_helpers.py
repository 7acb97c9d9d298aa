"""Workloads and request counting for the kernel-caching tests (tests/test_kcache*.py)."""

from __future__ import annotations

import os
import stat
from collections import Counter
from collections.abc import Callable

from conftest import require
from layerfs.fs.fusetrace import TraceUnavailable, counting


def walk(root: str) -> int:
    """``find``-like: list every directory, lstat every entry, read every symlink."""
    n = 0
    for d, dirs, files in os.walk(root):
        for name in dirs + files:
            st = os.lstat(os.path.join(d, name))
            if stat.S_ISLNK(st.st_mode):
                os.readlink(os.path.join(d, name))
            n += 1
    return n


def read_all(root: str) -> int:
    """Open and read every regular file (``os.open``: no isatty ioctl as Python's open())."""
    total = 0
    for d, _, files in os.walk(root):
        for name in files:
            p = os.path.join(d, name)
            if not stat.S_ISREG(os.lstat(p).st_mode):
                continue
            fd = os.open(p, os.O_RDONLY)
            try:
                while chunk := os.read(fd, 1 << 20):
                    total += len(chunk)
            finally:
                os.close(fd)
    return total


def counted(mnt: str, fn: Callable[[str], object]) -> Counter[str]:
    """The FUSE requests *fn(mnt)* caused (skip, or fail under CI, without the tracepoint)."""
    try:
        with counting(mnt) as counts:
            fn(mnt)
    except TraceUnavailable as e:
        require(False, str(e))
    return counts
