"""User namespaces: which one this process is in, its id maps, and the namespace identities
that mount records compare.

This module is the only reader of ``/proc/*/uid_map``, ``/proc/*/gid_map`` and
``/proc/*/ns/*``; everything else asks it.

Id maps use the kernel's convention: each line of ``/proc/PID/uid_map`` is
``inside outside count``, where *inside* ids are those seen by processes in the namespace
and *outside* ids are those of the parent namespace (for a first-level namespace, the host,
i.e. what the disk stores).
"""

from __future__ import annotations

import contextlib
import hashlib
import itertools
import os
import stat
from dataclasses import dataclass

from layerfs.procfs import pid_alive

#: The id the kernel reports for an id that has no mapping (``/proc/sys/fs/overflowuid``).
OVERFLOW_ID = 65534

#: Set by podman in the processes it re-executes inside its rootless user namespace.
ROOTLESS_UID_ENV = "_CONTAINERS_ROOTLESS_UID"

_FULL_RANGE = 4294967295


@dataclass(frozen=True)
class IdRange:
    """``count`` consecutive ids: ``inside + k`` in the namespace is ``outside + k`` outside it."""

    inside: int
    outside: int
    count: int


@dataclass(frozen=True)
class IdMap:
    """An id map as the kernel keeps it.

    Invariant: ranges do not overlap on either side (the kernel refuses such maps; ``parse``
    checks the same so a hostile or garbled file cannot produce an ambiguous translation).
    """

    ranges: tuple[IdRange, ...]

    @classmethod
    def identity(cls) -> IdMap:
        """The initial namespace's map: every id is itself."""
        return cls((IdRange(0, 0, _FULL_RANGE),))

    @classmethod
    def parse(cls, text: str) -> IdMap:
        """Parse the ``/proc/PID/uid_map`` form (one ``inside outside count`` per line)."""
        ranges = []
        for lineno, line in enumerate(text.splitlines(), 1):
            fields = line.split()
            if not fields:
                continue
            if len(fields) != 3 or not all(f.isdigit() for f in fields):
                raise ValueError(f"id map line {lineno} is not 'inside outside count': {line!r}")
            inside, outside, count = (int(f) for f in fields)
            if count == 0:
                raise ValueError(f"id map line {lineno} has a zero count")
            ranges.append(IdRange(inside, outside, count))
        result = cls(tuple(ranges))
        result._check_disjoint()
        return result

    def _check_disjoint(self) -> None:
        for side in ("inside", "outside"):
            spans = sorted((getattr(r, side), getattr(r, side) + r.count) for r in self.ranges)
            for (_, end), (start, _) in itertools.pairwise(spans):
                if start < end:
                    raise ValueError(f"id map ranges overlap on the {side} side")

    def is_identity(self) -> bool:
        """True for the initial namespace's map: every id maps to itself. A map that changes
        no id but leaves some unmapped (``unshare -r`` as root: ``0 0 1``) is a user
        namespace: there ``trusted.*`` cannot be set and unmapped owners show as 65534."""
        if not self.ranges or any(r.inside != r.outside for r in self.ranges):
            return False
        return sum(r.count for r in self.ranges) >= 0xFFFFFFFF

    def to_outside(self, ident: int) -> int | None:
        """The outside id of ``ident`` seen inside, or None when it is not mapped."""
        for r in self.ranges:
            if r.inside <= ident < r.inside + r.count:
                return r.outside + (ident - r.inside)
        return None

    def to_inside(self, ident: int) -> int | None:
        """The id seen inside for outside id ``ident``, or None when it is not mapped."""
        for r in self.ranges:
            if r.outside <= ident < r.outside + r.count:
                return r.inside + (ident - r.outside)
        return None

    def key(self) -> str:
        """A short stable digest of the map, for keying data that depends on it."""
        text = "\n".join(f"{r.inside} {r.outside} {r.count}" for r in self.ranges)
        return hashlib.sha256(text.encode()).hexdigest()[:16]

    def render(self) -> str:
        """The ``/proc`` form, one range per line (what ``newuidmap`` is given, flattened)."""
        return "".join(f"{r.inside} {r.outside} {r.count}\n" for r in self.ranges)


def read_id_map(kind: str = "uid", pid: int | str = "self") -> IdMap:
    """The ``kind`` ("uid" or "gid") map of process ``pid``; identity when the kernel has no
    such file (no user-namespace support)."""
    if kind not in ("uid", "gid"):
        raise ValueError(f"kind must be 'uid' or 'gid', not {kind!r}")
    try:
        with open(f"/proc/{pid}/{kind}_map", encoding="ascii") as f:
            text = f.read()
    except FileNotFoundError:
        return IdMap.identity()
    return IdMap.parse(text)


def in_user_namespace() -> bool:
    """True when this process's uid map is not the identity: it runs in a user namespace
    below the initial one (``podman unshare``, a rootless container, ``layerfs unshare``)."""
    return not read_id_map("uid").is_identity()


def is_rootless() -> bool:
    """True when this process does not have real root on the host: a non-zero euid, or euid
    0 inside a user namespace, or a process podman marked as rootless."""
    if os.geteuid() != 0:
        return True
    if os.environ.get(ROOTLESS_UID_ENV):
        return True
    return in_user_namespace()


def host_uid() -> int:
    """The host (initial-namespace) uid of this process: the outside id of our euid through
    every level we can see (one level: what ``/proc/self/uid_map`` says)."""
    env = os.environ.get(ROOTLESS_UID_ENV)
    if env and env.isdigit():
        return int(env)
    outside = read_id_map("uid").to_outside(os.geteuid())
    return outside if outside is not None else OVERFLOW_ID


def namespace_id(kind: str, pid: int | str = "self") -> str | None:
    """The identity of process ``pid``'s ``kind`` namespace ("mnt", "user", ...), as the kernel
    names it (``mnt:[4026531841]``), or None when it cannot be read (the process is gone, or
    belongs to another user)."""
    try:
        return os.readlink(f"/proc/{pid}/ns/{kind}")
    except OSError:
        return None


# --------------------------------------------------------------------- entering a namespace
#
# As podman does it (pkg/rootless): a process in a new user namespace cannot write its own
# id map beyond its own uid, so the privileged helpers newuidmap/newgidmap write it from
# outside, from the ranges /etc/subuid and /etc/subgid give the user: inside 0 is the user,
# inside 1.. are the subordinate ids, in the order of the file. A pause process keeps the
# namespaces alive between commands; its pid is in podman's ``pause.pid``, so layerfs and
# podman join the same user and mount namespaces (the same mounts, the same counts) whichever
# of them came first.

CLONE_NEWNS = 0x00020000
CLONE_NEWUSER = 0x10000000

#: Set in the environment of a process that runs inside the rootless namespace (podman's names).
USERNS_CONFIGURED_ENV = "_CONTAINERS_USERNS_CONFIGURED"
ROOTLESS_GID_ENV = "_CONTAINERS_ROOTLESS_GID"


class UsernsError(Exception):
    """The namespace cannot be entered; the message says why and what fixes it."""


def subid_ranges(kind: str, user: str, uid: int, path: str | None = None) -> list[tuple[int, int]]:
    """The ``(start, count)`` ranges ``/etc/sub{kind}`` (or *path*) gives *user* (by name or
    uid), in file order; empty when the file or the user's lines are missing. Malformed
    lines are skipped."""
    ranges = []
    try:
        with open(path or f"/etc/sub{kind}", encoding="utf-8") as f:
            lines = f.read().splitlines()
    except OSError:
        return []
    for line in lines:
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        parts = line.split(":")
        if len(parts) != 3 or parts[0] not in (user, str(uid)):
            continue
        if parts[1].isdigit() and parts[2].isdigit() and int(parts[2]) > 0:
            ranges.append((int(parts[1]), int(parts[2])))
    return ranges


def rootless_map(own: int, ranges: list[tuple[int, int]]) -> IdMap:
    """The map podman gives its namespace: 0 is *own*, then the subordinate ranges from 1."""
    out = [IdRange(0, own, 1)]
    inside = 1
    for start, count in ranges:
        out.append(IdRange(inside, start, count))
        inside += count
    return IdMap(tuple(out))


def _user_name(uid: int) -> str:
    import pwd

    try:
        return pwd.getpwuid(uid).pw_name
    except KeyError:
        return os.environ.get("USER", str(uid))


def pause_pid_path() -> str:
    """Podman's ``pause.pid``: ``$XDG_RUNTIME_DIR/libpod/tmp/pause.pid`` (podman's fallback
    without XDG_RUNTIME_DIR: ``/tmp/podman-run-UID/libpod/tmp``)."""
    runtime = os.environ.get("XDG_RUNTIME_DIR") or f"/tmp/podman-run-{host_uid()}"
    return os.path.join(runtime, "libpod", "tmp", "pause.pid")


def _libc_call(name: str, *args: int) -> None:
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    if getattr(libc, name)(*args) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"{name}: {os.strerror(err)}")


def _private_dirs(path: str) -> None:
    """``makedirs(path, 0o700)``, refusing (before and after) a directory on the way that is
    not ours or that others may write to (``/tmp/podman-run-UID`` made by someone else)."""
    top = path
    while os.path.dirname(top) not in ("/", "/tmp", os.environ.get("XDG_RUNTIME_DIR", "/")):
        top = os.path.dirname(top)

    def check() -> None:
        st = os.lstat(top)
        if not stat.S_ISDIR(st.st_mode) or st.st_uid != os.geteuid() or st.st_mode & 0o022:
            raise UsernsError(f"{top} is not a private directory of yours; remove it")

    if os.path.lexists(top):
        check()
    os.makedirs(path, mode=0o700, exist_ok=True)
    check()


def _live_pause_pid(path: str) -> int | None:
    """The pid in *path* when it is a live process of ours in another user namespace."""
    try:
        with open(path, encoding="ascii") as f:
            text = f.read().strip()
    except (OSError, UnicodeDecodeError):
        return None
    if not text.isdigit():
        return None
    pid = int(text)
    try:
        st = os.stat(f"/proc/{pid}")
    except OSError:
        return None
    if st.st_uid != os.getuid() or not pid_alive(pid):
        return None
    theirs = namespace_id("user", pid)
    if theirs is None or theirs == namespace_id("user"):
        return None
    return pid


def join(pid: int) -> None:
    """Join the user and mount namespaces of process *pid* (single-threaded callers only, as
    the kernel requires); afterwards this process is uid/gid 0 there. The working directory
    is kept by path."""
    cwd = os.getcwd()
    user_fd = os.open(f"/proc/{pid}/ns/user", os.O_RDONLY | os.O_CLOEXEC)
    try:
        mnt_fd = os.open(f"/proc/{pid}/ns/mnt", os.O_RDONLY | os.O_CLOEXEC)
        try:
            _libc_call("setns", user_fd, CLONE_NEWUSER)
            _libc_call("setns", mnt_fd, CLONE_NEWNS)
        finally:
            os.close(mnt_fd)
    finally:
        os.close(user_fd)
    os.setresgid(0, 0, 0)
    os.setresuid(0, 0, 0)
    with contextlib.suppress(OSError):  # denied in this namespace: the primary group will do
        os.setgroups([])
    try:
        os.chdir(cwd)
    except OSError:
        os.chdir("/")


def _write_maps(pid: int, uid_map: IdMap, gid_map: IdMap) -> None:
    import subprocess

    for tool, idmap in (("newuidmap", uid_map), ("newgidmap", gid_map)):
        argv = [tool, str(pid)]
        for r in idmap.ranges:
            argv += [str(r.inside), str(r.outside), str(r.count)]
        try:
            proc = subprocess.run(argv, capture_output=True, text=True, check=False)
        except FileNotFoundError:
            raise UsernsError(f"{tool} is not installed (Debian: apt install uidmap)") from None
        if proc.returncode != 0:
            detail = (proc.stderr.strip().splitlines() or ["failed"])[-1]
            raise UsernsError(f"{tool} refused the map ({detail}); check /etc/sub{tool[3:6]}")


def _spawn_pause(uid_map: IdMap, gid_map: IdMap) -> int:
    """Fork a process that makes a new user + mount namespace, have its id maps written, and
    leave it sleeping there (it keeps the namespaces alive). Returns its pid."""
    r1, w1 = os.pipe()
    r2, w2 = os.pipe()
    pid = os.fork()
    if pid == 0:  # the pause process
        try:
            os.close(r1)
            os.close(w2)
            _libc_call("unshare", CLONE_NEWUSER | CLONE_NEWNS)
            os.write(w1, b"1")
            os.close(w1)
            if os.read(r2, 1) != b"1":
                os._exit(1)
            os.close(r2)
            os.setsid()
            os.chdir("/")
            null = os.open(os.devnull, os.O_RDWR)
            for fd in (0, 1, 2):
                os.dup2(null, fd)
            os.closerange(3, 4096)
            import signal

            signal.signal(signal.SIGINT, signal.SIG_IGN)
            signal.signal(signal.SIGHUP, signal.SIG_IGN)
            for sleep in ("/usr/bin/sleep", "/bin/sleep"):
                try:
                    os.execv(sleep, ["layerfs-userns-pause", "infinity"])
                except OSError:
                    continue
            while True:
                signal.pause()
        except BaseException:
            os._exit(1)
    os.close(w1)
    os.close(r2)
    try:
        if os.read(r1, 1) != b"1":
            os.waitpid(pid, 0)
            raise UsernsError(
                "cannot create a user namespace (unprivileged user namespaces disabled? "
                "see sysctl kernel.unprivileged_userns_clone / user.max_user_namespaces)"
            )
        try:
            _write_maps(pid, uid_map, gid_map)
        except BaseException:
            os.kill(pid, 9)
            os.waitpid(pid, 0)
            raise
        os.write(w2, b"1")
    finally:
        os.close(r1)
        os.close(w2)
    return pid


def enter() -> int:
    """Enter the rootless user + mount namespace, as podman does, and return the pid of the
    pause process that holds it: podman's (or an earlier layerfs's) when ``pause.pid`` names
    a live one, else a new one, recorded in ``pause.pid`` for podman and later commands.

    Afterwards this process is uid 0 in the namespace, and the environment carries podman's
    markers (``_CONTAINERS_USERNS_CONFIGURED``, ``_CONTAINERS_ROOTLESS_UID``/``GID``) so that
    podman, containers-storage and layerfs started from here know where they are. The caller
    must be single-threaded (the kernel refuses ``setns`` to a threaded process)."""

    if in_user_namespace():
        raise UsernsError("already in a user namespace")
    uid, gid = os.getuid(), os.getgid()
    path = pause_pid_path()
    for _attempt in range(3):
        pid = _find_or_make_pause(path, uid, gid)
        try:
            join(pid)
            break
        except (FileNotFoundError, ProcessLookupError):
            continue  # it died between the look and the join: look again
    else:
        raise UsernsError(f"the pause process in {path} keeps disappearing")
    os.environ[USERNS_CONFIGURED_ENV] = "done"
    os.environ[ROOTLESS_UID_ENV] = str(uid)
    os.environ[ROOTLESS_GID_ENV] = str(gid)
    return pid


def _find_or_make_pause(path: str, uid: int, gid: int) -> int:
    """The live pause process named in *path*, else a new one recorded there."""
    import fcntl

    pid = _live_pause_pid(path)
    if pid is None:
        user = _user_name(uid)
        uids = subid_ranges("uid", user, uid)
        gids = subid_ranges("gid", user, uid)
        if not uids or not gids:
            missing = "/etc/subuid" if not uids else "/etc/subgid"
            raise UsernsError(
                f"{user} has no range in {missing}; add one (e.g. usermod --add-subuids "
                f"100000-165535 --add-subgids 100000-165535 {user})"
            )
        _private_dirs(os.path.dirname(path))
        with open(path + ".layerfs.lock", "a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)  # two layerfs at once make one namespace
            pid = _live_pause_pid(path)
            if pid is None:
                pid = _spawn_pause(rootless_map(uid, uids), rootless_map(gid, gids))
                tmp = f"{path}.tmp-{os.getpid()}"
                with open(tmp, "w", encoding="ascii") as f:
                    f.write(str(pid))
                os.replace(tmp, path)
    return pid


def can_enter() -> bool:
    """True when :func:`enter` may work here: a plain user in the initial namespace (not
    already inside, not real root) with subordinate uid and gid ranges."""
    if os.geteuid() == 0 or in_user_namespace() or os.environ.get(USERNS_CONFIGURED_ENV):
        return False
    uid = os.getuid()
    user = _user_name(uid)
    return bool(subid_ranges("uid", user, uid)) and bool(subid_ranges("gid", user, uid))


def pause_pid() -> int | None:
    """The live pause process that holds this user's rootless namespace (podman's or one
    layerfs started), seen from inside or outside it; None when there is none."""
    try:
        with open(pause_pid_path(), encoding="ascii") as f:
            text = f.read().strip()
    except (OSError, UnicodeDecodeError):
        return None
    if not text.isdigit():
        return None
    try:
        if os.stat(f"/proc/{text}").st_uid != os.getuid():
            return None
    except OSError:
        return None
    return int(text)
