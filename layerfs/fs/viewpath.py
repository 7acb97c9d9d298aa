"""Path resolution inside a union view, confined to it (for ``cat``, ``ls`` and ``which``).

A view path is resolved the way the kernel resolves a path for a process ``chroot``-ed into
the view: component by component from the view's root, following symbolic links, with

* absolute link targets resolved from the view's root, never the host's;
* ``..`` going to the parent of the directory actually reached (after following links, not
  by editing the text), and staying at the root when already there;
* at most :data:`MAX_SYMLINKS` links followed per resolution (``ELOOP`` beyond);
* the last component followed only on request (``ls``/``which`` of a link show the link, like
  ``ls -ld``; ``cat`` follows it) -- a trailing ``/`` always follows and demands a directory;
* ``ENOENT``, ``ENOTDIR`` and ``ELOOP`` where the kernel gives them.

It reads only the in-memory :class:`~layerfs.fs.index.UnionIndex`; nothing on the host is
ever looked up, so no link can lead out of the view.
"""

from __future__ import annotations

import errno
import os
import stat
from dataclasses import dataclass

from layerfs.errors import LayerfsError
from layerfs.fs.index import ROOT_INO, UnionIndex

MAX_SYMLINKS = 40
"""Links followed in one resolution before ELOOP (Linux's MAXSYMLINKS)."""


class ViewPathError(LayerfsError):
    """A path does not resolve in the view; ``errno`` says why (ENOENT, ENOTDIR, ELOOP)."""

    def __init__(self, path: str, code: int) -> None:
        self.path = path
        self.errno = code
        super().__init__(f"{path}: {os.strerror(code)} (in the view)")


@dataclass(frozen=True)
class Resolved:
    """Where a view path leads: the inode, its canonical path (``/``-rooted, no links, no
    ``.``/``..``) and whether any symbolic link was followed on the way."""

    ino: int
    path: str
    followed: bool


def resolve(
    index: UnionIndex, path: str | bytes, *, follow_last: bool, shown: str | None = None
) -> Resolved:
    """Resolve *path* (absolute or relative to the view root) in *index*.

    Raises :class:`ViewPathError` (naming *shown*, default *path*) when it does not resolve.
    The index is immutable, so no locking is needed."""
    shown = os.fsdecode(path) if shown is None else shown
    raw = os.fsencode(path)
    pending = [c for c in raw.split(b"/") if c]
    if raw.endswith(b"/") and pending:
        pending.append(b".")  # "link/" follows the link and must be a directory
    pending.reverse()  # a stack: the next component is at the end
    stack: list[tuple[int, bytes]] = [(ROOT_INO, b"")]  # (inode, name) from the root down
    hops = 0
    followed = False
    while pending:
        comp = pending.pop()
        cur = stack[-1][0]
        if not index.is_dir(cur):
            raise ViewPathError(shown, errno.ENOTDIR)
        if comp == b".":
            continue
        if comp == b"..":
            if len(stack) > 1:
                stack.pop()
            continue
        child = index.lookup(cur, comp)
        if child is None:
            raise ViewPathError(shown, errno.ENOENT)
        if stat.S_ISLNK(index.attr(child).mode) and (pending or follow_last):
            hops += 1
            if hops > MAX_SYMLINKS:
                raise ViewPathError(shown, errno.ELOOP)
            target = index.readlink(child)
            if not target:
                raise ViewPathError(shown, errno.ENOENT)
            followed = True
            parts = [c for c in target.split(b"/") if c]
            if target.endswith(b"/") and parts:
                parts.append(b".")
            pending.extend(reversed(parts))
            if target.startswith(b"/"):
                del stack[1:]
            continue
        stack.append((child, comp))
    canonical = "/" + os.fsdecode(b"/".join(name for _, name in stack[1:]))
    return Resolved(stack[-1][0], canonical, followed)


def resolve_parent(index: UnionIndex, path: str | bytes) -> tuple[Resolved, bytes]:
    """Resolve every component of *path* but the last (following links), and return it with
    the last name (``b""`` for the root). For ``which``, which must also explain a last
    component that is not in the view (deleted by a whiteout)."""
    shown = os.fsdecode(path)
    raw = os.fsencode(path).rstrip(b"/")
    head, _, name = raw.rpartition(b"/")
    if name in (b".", b".."):
        return resolve(index, raw, follow_last=True, shown=shown), b""
    parent = resolve(index, head + b"/" if head else b"/", follow_last=True, shown=shown)
    return parent, name
