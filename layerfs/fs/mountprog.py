"""``layerfs-overlay``: a drop-in for fuse-overlayfs's command line (containers/storage's
``mount_program``) that serves the union with the layerfs daemon.

Forms accepted (as podman and mount.fuse3 pass them)::

    layerfs-overlay -o lowerdir=L1:L2,upperdir=U,workdir=W, MERGED      # container (rw)
    layerfs-overlay -o lowerdir=TOP:L2 MERGED                           # image (read-only)
    layerfs-overlay PROG MERGED -o rw,lowerdir=...,dev,suid             # from mount.fuse3

Options may come in several ``-o`` (or ``-oOPTS``) arguments; empty options (a trailing comma)
and options fuse-overlayfs passes on to the kernel or ignores (``rw``, ``context=...``,
``noatime`` ...) are ignored; ``dev``/``suid`` keep devices and set-id bits; ``uidmapping=`` and
``gidmapping=`` are refused until layerfs maps ids. Lower dirs may be symlinks (c/storage's
``l/`` links): they are resolved. As root the view gets ``allow_other`` (with
``default_permissions``), as fuse-overlayfs does.

The program goes to the background once the mount answers (the daemon's readiness line),
exits non-zero with one line on stderr on failure, and the daemon exits on unmount with every
change already in the upper dir (it writes through; nothing is cached in the daemon).

Import cost matters (podman runs this on every container start): only the standard library is
imported until the arguments are checked; the daemon module is imported once, in this
process, and the daemon is a fork of it (no second interpreter start-up).
"""

from __future__ import annotations

import os
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field

PROG = "layerfs-overlay"

REFUSED = {
    "uidmapping": "uid mappings are not supported yet (mount without --uidmap)",
    "gidmapping": "gid mappings are not supported yet (mount without --gidmap)",
}
"""Options fuse-overlayfs knows that layerfs cannot honour: refused, never silently dropped."""

IGNORED_VALUED = frozenset(
    {
        "timeout", "threaded", "fsync", "fast_ino", "writeback", "noxattrs", "plugins",
        "xattr_permissions", "squash_to_root", "squash_to_uid", "squash_to_gid",
        "static_nlink", "volatile", "noacl", "context", "fscontext", "defcontext",
        "rootcontext", "max_read", "max_write", "subtype", "fsname",
    }
)  # fmt: skip
"""fuse-overlayfs options (and kernel/SELinux ones it passes on) that change nothing here."""


class UsageError(Exception):
    """A bad command line; the message is the one line printed."""


@dataclass
class Args:
    """The parsed command line."""

    mountpoint: str = ""
    lowers: list[str] = field(default_factory=list)
    upper: str | None = None
    work: str | None = None
    dev: bool = False
    suid: bool = False
    foreground: bool = False
    debug: bool = False
    ignored: list[str] = field(default_factory=list)


def _apply_options(a: Args, text: str) -> None:
    for opt in text.split(","):
        if not opt:
            continue  # podman's trailing comma
        key, _eq, value = opt.partition("=")
        if key in REFUSED:
            raise UsageError(REFUSED[key])
        if key == "lowerdir":
            a.lowers = [d for d in value.split(":") if d]
        elif key == "upperdir":
            a.upper = value
        elif key == "workdir":
            a.work = value
        elif key in ("dev", "suid"):
            setattr(a, key, True)
        elif key in ("nodev", "nosuid"):
            setattr(a, key[2:], False)
        else:
            a.ignored.append(opt)


def parse(argv: Sequence[str]) -> Args:
    """Parse fuse-overlayfs's command line (without the program name)."""
    a = Args()
    positional: list[str] = []
    i = 0
    while i < len(argv):
        arg = argv[i]
        if arg == "-o":
            if i + 1 >= len(argv):
                raise UsageError("-o needs an argument")
            _apply_options(a, argv[i + 1])
            i += 2
            continue
        if arg.startswith("-o"):
            _apply_options(a, arg[2:])
        elif arg in ("-f", "--foreground"):
            a.foreground = True
        elif arg in ("-d", "--debug"):
            a.debug = a.foreground = True
        elif arg in ("-s", "--"):
            pass  # single-threaded (fuse-overlayfs's libfuse flag): meaningless here
        elif arg in ("-h", "--help"):
            raise UsageError(
                "usage: layerfs-overlay -o lowerdir=L1:L2[,upperdir=U,workdir=W] MERGED"
            )
        elif arg in ("-V", "--version"):
            raise UsageError("layerfs-overlay (layerfs) with fuse-overlayfs's command line")
        elif arg.startswith("-"):
            raise UsageError(f"unknown argument {arg}")
        else:
            positional.append(arg)
        i += 1
    if not positional:
        raise UsageError("no mount point given")
    if len(positional) > 2:
        raise UsageError(f"too many arguments: {' '.join(positional)}")
    a.mountpoint = positional[-1]  # mount.fuse3 passes a source (the program) first
    return a


def _existing_dir(what: str, path: str) -> str:
    try:
        real = os.path.realpath(path, strict=True)
    except OSError as e:
        raise UsageError(f"{what} {path}: {e.strerror}") from None
    if not os.path.isdir(real):
        raise UsageError(f"{what} {path}: not a directory")
    return real


def check(a: Args) -> Args:
    """Resolve and check the dirs; UsageError naming the first problem."""
    if not a.lowers and a.upper is None:
        raise UsageError("no lowerdir specified")
    if a.upper is not None and a.work is None:
        raise UsageError("no workdir specified")
    if a.work is not None and a.upper is None:
        raise UsageError("workdir given without upperdir")
    a.lowers = [_existing_dir("lowerdir", d) for d in a.lowers]
    if a.upper is not None and a.work is not None:
        a.upper = _existing_dir("upperdir", a.upper)
        a.work = _existing_dir("workdir", a.work)
        if os.stat(a.upper).st_dev != os.stat(a.work).st_dev:
            raise UsageError("workdir and upperdir must be on the same file system")
    a.mountpoint = _existing_dir("mount point", a.mountpoint)
    return a


def _serve(a: Args, ready_fd: int | None) -> int:
    import logging

    from layerfs.fs import daemon

    logging.basicConfig(
        stream=sys.stderr,
        level=logging.DEBUG if a.debug else logging.INFO,
        format="%(asctime)s layerfs-overlay[%(process)d] %(levelname)s %(name)s: %(message)s",
    )
    return daemon.serve(
        a.mountpoint,
        a.lowers,
        whiteout_format="aufs",  # what fuse-overlayfs writes (a mount-program store)
        allow_other=os.geteuid() == 0,
        for_container=a.dev or a.suid,
        ready_fd=ready_fd,
        upper_dir=a.upper,
        work_dir=a.work,
    )


def _wait_ready(fd: int) -> str | None:
    """None once the daemon said READY, else the reason it gave (or that it died)."""
    buf = b""
    while True:
        chunk = os.read(fd, 4096)
        if not chunk:
            break
        buf += chunk
        lines = buf.split(b"\n")
        for ln in lines[:-1]:
            if ln == b"READY":
                return None
            if ln.startswith(b"ERROR "):
                return " ".join(ln[6:].decode(errors="replace").split())
    return "the daemon exited before the mount was ready"


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    try:
        a = check(parse(args))
    except UsageError as e:
        print(f"{PROG}: {e}", file=sys.stderr)
        return 1
    if a.foreground:
        return _serve(a, None)
    import layerfs.fs.daemon  # noqa: F401  (imported once, before the fork)

    rfd, wfd = os.pipe()
    pid = os.fork()
    if pid == 0:  # the daemon
        os.close(rfd)
        status = 1
        try:
            os.setsid()
            devnull = os.open(os.devnull, os.O_RDWR)
            log_path = os.environ.get("LAYERFS_OVERLAY_LOG")
            log_fd = (
                os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
                if log_path
                else devnull
            )
            os.dup2(devnull, 0)
            os.dup2(devnull, 1)
            os.dup2(log_fd, 2)
            os.chdir("/")
            status = _serve(a, wfd)
        finally:
            os._exit(status)
    os.close(wfd)
    try:
        reason = _wait_ready(rfd)
    finally:
        os.close(rfd)
    if reason is not None:
        print(f"{PROG}: {reason}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
