"""``layerfs-overlay``: a drop-in for fuse-overlayfs's command line (containers/storage's
``mount_program``) that serves the union with the layerfs daemon.

Forms accepted (as podman and mount.fuse3 pass them)::

    layerfs-overlay -o lowerdir=L1:L2,upperdir=U,workdir=W, MERGED      # container (rw)
    layerfs-overlay -o lowerdir=TOP:L2 MERGED                           # image (read-only)
    layerfs-overlay PROG MERGED -o rw,lowerdir=...,dev,suid             # from mount.fuse3

Options may come in several ``-o`` (or ``-oOPTS``) arguments; empty options (a trailing comma)
and options fuse-overlayfs passes on to the kernel or ignores (``rw``, ``context=...``,
``noatime`` ...) are ignored; ``dev``/``suid`` keep devices and set-id bits; ``uidmapping=``,
``gidmapping=``, ``squash_to_root``, ``squash_to_uid=`` and ``squash_to_gid=`` map ids as
fuse-overlayfs maps them (:mod:`layerfs.fs.idmap`; a bad value is a one-line error). As root,
also root of a user namespace (rootless podman runs this there), the view gets ``allow_other``
(with ``default_permissions``), as fuse-overlayfs does, so that every container uid can use it.

Dirs are read and checked as kernel overlayfs (``mount -t overlay``) reads and checks them:

* a backslash escapes the next character (``\\:`` and ``\\,`` are a colon and a comma inside a
  path; a comma splits options only when unescaped and outside double quotes);
* ``lowerdir`` dirs are separated by ``:``; the dirs after a ``::`` are data-only lower layers
  (checked like the others, not shown: only metacopy files, which layerfs does not follow,
  read data from them); a leading or trailing ``:``, ``:::``, or a regular dir after a
  data-only one is refused;
* dirs are resolved (c/storage's ``l/`` symlinks) and refused when they overlap: upperdir and
  workdir must be separate subtrees (neither inside the other, not the same), and a lower dir
  may not be upperdir, workdir or another lower dir, nor lie inside one of them (upperdir or
  workdir inside a lower dir is allowed, as the kernel allows it).

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

REFUSED: dict[str, str] = {}
"""Options fuse-overlayfs knows that layerfs cannot honour: refused, never silently dropped."""

ID_OPTIONS = frozenset(
    {"uidmapping", "gidmapping", "squash_to_root", "squash_to_uid", "squash_to_gid"}
)
"""Id mapping options, handed to :func:`layerfs.fs.idmap.from_options`."""

IGNORED_VALUED = frozenset(
    {
        "timeout", "threaded", "fsync", "fast_ino", "writeback", "noxattrs", "plugins",
        "xattr_permissions", "static_nlink", "volatile", "noacl", "context", "fscontext",
        "defcontext", "rootcontext", "max_read", "max_write", "subtype", "fsname",
    }
)  # fmt: skip
"""fuse-overlayfs options (and kernel/SELinux ones it passes on) that change nothing here."""


class UsageError(Exception):
    """A bad command line; the message is the one line printed."""


@dataclass
class Args:
    """The parsed command line. Before :func:`check` the dirs are as given (unescaped); after
    it they are resolved real paths."""

    mountpoint: str = ""
    lowers: list[str] = field(default_factory=list)
    data_lowers: list[str] = field(default_factory=list)
    """Data-only lower layers (after ``::``): checked like the lowers, never shown."""
    upper: str | None = None
    work: str | None = None
    dev: bool = False
    suid: bool = False
    foreground: bool = False
    debug: bool = False
    ignored: list[str] = field(default_factory=list)
    id_options: list[str] = field(default_factory=list)
    """The id mapping options, in order (a later one replaces an earlier of its name)."""
    replaced: list[tuple[str, str]] = field(default_factory=list)
    """(option, dir) given before a later option of the same name replaced it: the kernel
    resolves each when it reads it, so each must still be an existing dir."""


def _split_options(text: str) -> list[str]:
    """Split an ``-o`` string at each comma that is neither backslash-escaped nor inside double
    quotes (SELinux ``context="...:c1,c2"``); escapes are kept for the value parsers."""
    opts: list[str] = []
    cur: list[str] = []
    quoted = False
    i = 0
    while i < len(text):
        c = text[i]
        if c == "\\":
            cur.append(text[i : i + 2])
            i += 2
            continue
        if c == '"':
            quoted = not quoted
        elif c == "," and not quoted:
            opts.append("".join(cur))
            cur = []
            i += 1
            continue
        cur.append(c)
        i += 1
    opts.append("".join(cur))
    return opts


def _unescape(text: str) -> str:
    """Drop each escaping backslash, keeping the character it escapes (a lone trailing
    backslash is dropped), as the kernel does for every overlay dir."""
    out: list[str] = []
    i = 0
    while i < len(text):
        if text[i] == "\\":
            i += 1
            if i == len(text):
                break
        out.append(text[i])
        i += 1
    return "".join(out)


def _split_lowerdir(value: str) -> tuple[list[str], list[str]]:
    """``lowerdir=`` split as the kernel splits it: (regular lower dirs, data-only lower dirs),
    unescaped. Empty *value* gives no dirs (the kernel reads it as "no lower dirs")."""
    if not value:
        return [], []
    if value.startswith(":"):
        raise UsageError(f"lowerdir starts with ':' ({value}); escape a ':' in a name as '\\:'")
    parts: list[str] = []
    seps: list[int] = []  # seps[k]: the colons between parts[k] and parts[k + 1]
    cur: list[str] = []
    i = 0
    while i < len(value):
        c = value[i]
        if c == "\\":
            cur.append(value[i : i + 2])
            i += 2
            continue
        if c != ":":
            cur.append(c)
            i += 1
            continue
        n = len(value) - i - len(value[i:].lstrip(":"))
        if n > 2:
            raise UsageError(
                f"lowerdir={value}: only ':' or '::' may separate dirs "
                "(escape a ':' in a name as '\\:')"
            )
        if i + n == len(value):
            raise UsageError(f"lowerdir ends with ':' ({value}); escape a ':' in a name as '\\:'")
        parts.append("".join(cur))
        seps.append(n)
        cur = []
        i += n
    parts.append("".join(cur))
    regular = [parts[0]]
    data: list[str] = []
    for sep, part in zip(seps, parts[1:], strict=True):
        if sep == 2:
            data.append(part)
        elif data:
            raise UsageError(
                f"lowerdir={value}: a regular lower dir ({_unescape(part)}) cannot follow "
                "data-only lower dirs (those after '::')"
            )
        else:
            regular.append(part)
    return [_unescape(p) for p in regular], [_unescape(p) for p in data]


def _dir_option(key: str, value: str) -> str:
    path = _unescape(value)
    if not path:
        raise UsageError(f"{key}= needs a directory")
    return path


def _apply_options(a: Args, text: str) -> None:
    for opt in _split_options(text):
        if not opt:
            continue  # podman's trailing comma
        key, _eq, value = opt.partition("=")
        if key in REFUSED:
            raise UsageError(REFUSED[key])
        if key == "lowerdir":
            a.replaced += [(key, d) for d in a.lowers + a.data_lowers]
            a.lowers, a.data_lowers = _split_lowerdir(value)
        elif key == "upperdir":
            a.replaced += [(key, a.upper)] if a.upper is not None else []
            a.upper = _dir_option(key, value)
        elif key == "workdir":
            a.replaced += [(key, a.work)] if a.work is not None else []
            a.work = _dir_option(key, value)
        elif key in ("dev", "suid"):
            setattr(a, key, True)
        elif key in ("nodev", "nosuid"):
            setattr(a, key[2:], False)
        elif key in ID_OPTIONS:
            a.id_options.append(opt)
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


@dataclass(frozen=True)
class _Layer:
    """One resolved dir of the mount, for the overlap checks."""

    role: str  # "upperdir", "workdir" or "lowerdir"
    given: str  # as given (unescaped): what error messages name
    real: str
    ident: tuple[int, int]  # (st_dev, st_ino): the kernel compares inodes, not path strings

    @classmethod
    def of(cls, role: str, given: str) -> _Layer:
        real = _existing_dir(role, given)
        st = os.stat(real)
        return cls(role, given, real, (st.st_dev, st.st_ino))

    def ancestors(self) -> list[tuple[int, int]]:
        """The identities of the dirs above this one up to its file system's root (the
        kernel walks dentry parents, which stay inside one file system).

        Limitation: inside a bind mount of a subtree the path's parents are followed, not the
        bound subtree's parents in its file system."""
        out: list[tuple[int, int]] = []
        path = self.real
        while path != "/":
            path = os.path.dirname(path)
            try:
                st = os.stat(path)
            except OSError:
                break
            if st.st_dev != self.ident[0]:
                break
            out.append((st.st_dev, st.st_ino))
        return out


def _check_overlaps(upper: _Layer | None, work: _Layer | None, lowers: list[_Layer]) -> None:
    """Refuse the layouts kernel overlayfs refuses, in its order: upperdir and workdir not
    separate subtrees; a lower dir that is another layer ("conflicting lowerdir path"); a lower
    dir inside another layer ("overlapping lowerdir path")."""
    if (
        upper is not None
        and work is not None
        and (
            upper.ident == work.ident
            or upper.ident in work.ancestors()
            or work.ident in upper.ancestors()
        )
    ):
        raise UsageError(
            f"workdir {work.given} and upperdir {upper.given} must be separate subtrees"
        )
    taken: dict[tuple[int, int], _Layer] = {}
    for layer in (upper, work, *lowers):
        if layer is None:
            continue
        other = taken.get(layer.ident)
        if other is not None:
            raise UsageError(
                f"lowerdir {layer.given}: the same directory as {other.role} {other.given}"
            )
        taken[layer.ident] = layer
    for layer in lowers:
        for ident in layer.ancestors():
            other = taken.get(ident)
            if other is not None:
                raise UsageError(
                    f"lowerdir {layer.given}: inside {other.role} {other.given} "
                    "(layers may not overlap)"
                )


def _mount_id(path: str) -> int:
    """The id of the mount *path* is in (``mnt_id`` of an ``O_PATH`` fd, as
    ``/proc/self/fdinfo`` shows it): the kernel wants upperdir and workdir in one mount, not
    just one file system (a bind mount is another mount)."""
    fd = os.open(path, os.O_PATH | os.O_DIRECTORY)
    try:
        with open(f"/proc/self/fdinfo/{fd}") as f:
            for line in f:
                key, _sep, value = line.partition(":")
                if key == "mnt_id":
                    return int(value)
    finally:
        os.close(fd)
    return os.stat(path).st_dev  # no mnt_id (not Linux?): the file system must do


def check(a: Args) -> Args:
    """Resolve and check the dirs; UsageError naming the first problem."""
    if not a.lowers:
        raise UsageError("no lowerdir specified")
    if a.id_options:
        from layerfs.fs.idmap import IdMappingError, from_options

        try:
            from_options(a.id_options)
        except IdMappingError as e:
            raise UsageError(str(e)) from None
    if a.upper is not None and a.work is None:
        raise UsageError("no workdir specified")
    if a.work is not None and a.upper is None:
        raise UsageError("workdir given without upperdir")
    for role, given in a.replaced:
        _existing_dir(role, given)
    lowers = [_Layer.of("lowerdir", d) for d in a.lowers + a.data_lowers]
    upper = work = None
    if a.upper is not None and a.work is not None:
        upper = _Layer.of("upperdir", a.upper)
        work = _Layer.of("workdir", a.work)
        if _mount_id(upper.real) != _mount_id(work.real):
            raise UsageError(
                f"workdir {work.given} and upperdir {upper.given} must be in the same mount"
            )
    _check_overlaps(upper, work, lowers)
    a.lowers = [layer.real for layer in lowers[: len(a.lowers)]]
    a.data_lowers = [layer.real for layer in lowers[len(a.lowers) :]]
    if upper is not None and work is not None:
        a.upper, a.work = upper.real, work.real
    a.mountpoint = _existing_dir("mount point", a.mountpoint)
    return a


def _serve(a: Args, ready_fd: int | None) -> int:
    import logging

    from layerfs.fs import daemon
    from layerfs.fs.idmap import from_options

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
        ids=from_options(a.id_options),
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
