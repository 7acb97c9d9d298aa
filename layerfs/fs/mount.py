"""Client side of a union mount: start the daemon, wait until the mount is live, detect dead
mounts, unmount. Knows nothing about the store: callers pass diff dirs and layer ids."""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import errno
import os
import select
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from typing import TYPE_CHECKING

import layerfs
from layerfs.errors import MountError
from layerfs.mountinfo import entry_at, is_mountpoint, mounts
from layerfs.procfs import pid_alive

if TYPE_CHECKING:
    from layerfs.fs.index import LayerPin

__all__ = [
    "abort_connection",
    "daemon_pid_alive",
    "detach",
    "find_daemon_pid",
    "find_mount_process",
    "is_dead_fuse_mount",
    "is_mountpoint",
    "mountinfo",
    "probe",
    "spawn_daemon",
    "unmount",
]

MNT_DETACH = 2


def _libc() -> ctypes.CDLL:
    return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)


def _umount2(path: str, flags: int) -> int:
    """umount2(2); returns 0 or the errno."""
    if _libc().umount2(os.fsencode(path), flags) == 0:
        return 0
    return ctypes.get_errno()


def spawn_daemon(
    diff_dirs: Sequence[str],
    layer_ids: Sequence[str],
    mountpoint: str,
    *,
    index_path: str | None = None,
    pins: Sequence[LayerPin | None] | None = None,
    whiteout_format: str = "kernel",
    log_path: str,
    allow_other: bool = False,
    for_container: bool = False,
    debug: bool = False,
    timeout: float = 300.0,
    upper_dir: str | None = None,
    work_dir: str | None = None,
    upper_layer_id: str | None = None,
    id_options: Sequence[str] = (),
) -> int:
    """Start a daemon serving the chain *diff_dirs* (top first) at *mountpoint*; return its pid
    once the mount is live (the daemon has answered a stat of the mountpoint).

    The daemon runs in its own session and is re-parented (it forks once), so it outlives the
    caller. Raises MountError with one line when it fails or does not get ready within
    *timeout* seconds: the daemon's own ERROR line, else a pointer to its log file (never
    the log's tail, which may hold earlier runs); nothing is then left mounted or running.
    *pins* (one per diff dir, see :class:`~layerfs.fs.index.LayerPin`) let pinned layers use
    their persisted index; *whiteout_format* is the store's. *index_path* is obsolete and
    ignored. With *upper_dir* and *work_dir* the view is read-write: *diff_dirs* are then its
    lower layers (possibly none) and changes land in *upper_dir* (*upper_layer_id* names it in
    messages). *id_options*: the view's id mapping (``uidmapping=...``, checked by the caller).
    """
    if (upper_dir is None) != (work_dir is None):
        raise MountError("a read-write view needs both an upper and a work dir")
    if layer_ids and len(layer_ids) != len(diff_dirs):
        raise MountError(f"{len(layer_ids)} layer ids for {len(diff_dirs)} layers")
    mountpoint = os.path.abspath(mountpoint)
    cmd = [sys.executable, "-m", "layerfs.fs.daemon", mountpoint]
    cmd += [os.path.abspath(d) for d in diff_dirs]
    for lid in layer_ids:
        cmd += ["--layer-id", lid]
    if pins is not None:
        if len(pins) != len(diff_dirs) or len(layer_ids) != len(diff_dirs):
            raise MountError(f"{len(pins)} layer pins for {len(diff_dirs)} layers")
        for pin in pins:
            cmd += ["--digest", pin.digest if pin else ""]
            cmd += ["--tar-split", (pin.tar_split or "") if pin else ""]
            cmd += ["--index-file", (pin.index_path or "") if pin else ""]
    cmd += ["--whiteout-format", whiteout_format]
    if upper_dir is not None and work_dir is not None:
        cmd += ["--upper", os.path.abspath(upper_dir), "--work", os.path.abspath(work_dir)]
        if upper_layer_id:
            cmd += ["--upper-layer-id", upper_layer_id]
    cmd += ["--log", os.path.abspath(log_path)]
    if allow_other:
        cmd.append("--allow-other")
    if for_container:
        cmd.append("--for-container")
    if debug:
        cmd.append("--debug")
    for opt in id_options:
        cmd += ["--id-option", opt]
    env = dict(os.environ)
    pkg_root = os.path.dirname(os.path.dirname(os.path.abspath(layerfs.__file__)))
    env["PYTHONPATH"] = pkg_root + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    rfd, wfd = os.pipe()
    try:
        cmd += ["--ready-fd", str(wfd)]
        with open(log_path, "ab") as logf:
            proc = subprocess.Popen(
                cmd,
                pass_fds=(wfd,),
                start_new_session=True,
                stdin=subprocess.DEVNULL,
                stdout=logf,
                stderr=logf,
                env=env,
                cwd="/",
            )
        os.close(wfd)
        wfd = -1
        lines = _read_ready(rfd, timeout)
    finally:
        if wfd >= 0:
            os.close(wfd)
        os.close(rfd)
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(timeout=5)  # the forking parent exits at once
    pid = None
    for line in lines:
        if line.startswith("PID "):
            pid = int(line[4:])
    if lines and lines[-1] == "READY" and pid is not None:
        return pid
    errs = [ln[6:] for ln in lines if ln.startswith("ERROR ")]
    if errs:
        msg = _one_line(errs[-1])
    else:
        msg = f"the daemon exited before the mount was ready (see {log_path})"
        # timed out or died silently: make sure nothing is left behind
        if pid is not None and daemon_pid_alive(pid):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
            msg = f"the daemon was not ready after {timeout:g} s (see {log_path})"
        if is_mountpoint(mountpoint):
            detach(mountpoint)
    raise MountError(f"mounting {mountpoint} failed: {msg}")


def _one_line(message: str) -> str:
    """A daemon's message as one line (whitespace runs folded)."""
    return " ".join(message.split()) or "the daemon gave no reason"


def _read_ready(fd: int, timeout: float) -> list[str]:
    deadline = time.monotonic() + timeout
    buf = b""
    while True:
        left = deadline - time.monotonic()
        if left <= 0:
            break
        r, _, _ = select.select([fd], [], [], left)
        if not r:
            break
        chunk = os.read(fd, 4096)
        if not chunk:
            break
        buf += chunk
        done = [ln for ln in buf.split(b"\n") if ln == b"READY" or ln.startswith(b"ERROR ")]
        if done:
            break
    return [ln.decode(errors="replace") for ln in buf.split(b"\n") if ln]


mountinfo = mounts  # re-exported: the table reader lives in layerfs.mountinfo


def is_dead_fuse_mount(path: str) -> bool:
    """True if *path* is a FUSE mount whose daemon is gone (ENOTCONN). Never blocks for
    longer than :data:`PROBE_TIMEOUT` (see :func:`probe`)."""
    return probe(path) == "dead"


PROBE_TIMEOUT = 2.0


def probe(path: str, timeout: float = PROBE_TIMEOUT, dev: int | None = None) -> str:
    """Ask the file system mounted at *path* for its statfs, with a deadline.

    Returns ``"live"`` (it answered), ``"dead"`` (ENOTCONN: its daemon is gone), ``"hung"``
    (no answer within *timeout* seconds: a stopped or stuck daemon) or, given the device
    *dev* mountinfo lists for *path*, ``"hidden"`` when the path leads to another file system
    (a later mount over a parent directory covers the view). statfs, not stat, decides
    liveness: the view's attributes are cached by the kernel for a very long time, so a
    plain stat of a dead mount's root can still succeed; statfs always reaches the daemon.
    The calls run in a daemon thread, so a hung mount cannot hold this process; the thread
    ends with the request (or with the process). Callers must not hold a store lock.
    """
    result: list[str] = []

    def run() -> None:
        try:
            os.statvfs(path)
            st = os.stat(path) if dev is not None else None
        except OSError as e:
            result.append("dead" if e.errno == errno.ENOTCONN else "live")
            return
        result.append("hidden" if st is not None and st.st_dev != dev else "live")

    thread = threading.Thread(target=run, name=f"probe {path}", daemon=True)
    thread.start()
    thread.join(timeout)
    return result[0] if result else "hung"


def abort_connection(path: str) -> bool:
    """Abort the FUSE connection of the mount at *path* (``/sys/fs/fuse/connections/<dev>/
    abort``): every request waiting on its daemon fails at once and the mount is dead.
    Reads the device from mountinfo, never touches the mount. False if not possible."""
    entry = entry_at(path)
    if entry is None or not entry.fstype.startswith("fuse"):
        return False
    dev = os.makedev(entry.major, entry.minor)
    for name in (str(dev), str(entry.minor)):
        try:
            with open(f"/sys/fs/fuse/connections/{name}/abort", "w") as f:
                f.write("1")
            return True
        except OSError:
            continue
    return False


def detach(path: str) -> bool:
    """Lazy-unmount *path* (umount2 MNT_DETACH, else ``fusermount3 -uz``). Returns False if
    nothing was mounted there; raises MountError if it could not be detached."""
    if not is_mountpoint(path):
        return False
    err = _umount2(path, MNT_DETACH)
    if err == 0:
        return True
    if err == errno.EPERM:
        r = subprocess.run(["fusermount3", "-uz", path], capture_output=True, text=True)
        if r.returncode == 0:
            return True
        raise MountError(f"detaching {path} failed: {r.stderr.strip()}")
    raise MountError(f"detaching {path} failed: {os.strerror(err)}")


def find_mount_process(mountpoint: str, program: bytes) -> int | None:
    """The pid of a process whose command line names *program* and *mountpoint* (a FUSE
    server found in /proc when its pid was never recorded)."""
    target = os.fsencode(os.path.abspath(mountpoint))
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                argv = f.read().split(b"\0")
        except OSError:
            continue
        if target in argv and any(arg.endswith(program) for arg in argv):
            return int(entry)
    return None


def find_daemon_pid(mountpoint: str) -> int | None:
    """The pid of the layerfs daemon serving *mountpoint* (e.g. when the mounting command was
    killed before it recorded the pid)."""
    return find_mount_process(mountpoint, b"layerfs.fs.daemon")


def daemon_pid_alive(pid: int) -> bool:
    """True while any thread of process *pid* is alive (not a zombie)."""
    return pid_alive(pid)


def _wait_gone(pid: int, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while daemon_pid_alive(pid):
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.01)
    return True


def unmount(path: str, pid: int | None, timeout: float = 10.0) -> None:
    """Cleanly unmount *path* (umount2, else ``fusermount3 -u``) and wait up to *timeout*
    seconds for the daemon *pid* to exit (SIGTERM after that, then MountError).
    A busy mount raises MountError and stays mounted."""
    if is_mountpoint(path):
        err = _umount2(path, 0)
        if err == errno.EPERM:
            r = subprocess.run(["fusermount3", "-u", path], capture_output=True, text=True)
            if r.returncode != 0:
                raise MountError(f"unmounting {path} failed: {r.stderr.strip()}")
        elif err == errno.EBUSY:
            raise MountError(f"unmounting {path} failed: mount is busy")
        elif err == errno.EINVAL:
            # listed in mountinfo but not a mount point through its path: another mount
            # over a parent directory hides it; it is still there and still served
            raise MountError(
                f"unmounting {path} failed: the view is hidden by another mount over a "
                "parent directory and cannot be reached through its path"
            )
        elif err != 0:
            raise MountError(f"unmounting {path} failed: {os.strerror(err)}")
    if pid is None:
        return
    if _wait_gone(pid, timeout):
        return
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGTERM)
    if not _wait_gone(pid, 2.0):
        raise MountError(f"daemon {pid} for {path} did not exit after unmount")


MS_BIND = 4096
MS_PRIVATE = 1 << 18


def _mount2(source: str | None, target: str, flags: int) -> int:
    """mount(2) without a file-system type or data; returns 0 or the errno."""
    src = os.fsencode(source) if source is not None else None
    if _libc().mount(src, os.fsencode(target), None, ctypes.c_ulong(flags), None) == 0:
        return 0
    return ctypes.get_errno()


def make_private_mount(path: str) -> bool:
    """Make *path* a mount point of its own with private propagation, as the Go overlay
    driver does with its home on its first command (containers/storage ``MakePrivate``):
    bind-mount it onto itself unless mountinfo already lists it as a mount point, then set
    MS_PRIVATE. Done before the first view under *path*, so that Go later finds it done and
    does not bind over (and hide) a live view. False if not permitted (not root).

    Caller holds the graph root's ``storage.lock``, which Go holds while it does the same.
    """
    if not is_mountpoint(path):
        err = _mount2(path, path, MS_BIND)
        if err in (errno.EPERM, errno.EACCES):
            return False
        if err:
            raise MountError(f"cannot bind-mount {path} onto itself: {os.strerror(err)}")
    err = _mount2(None, path, MS_PRIVATE)
    if err in (errno.EPERM, errno.EACCES):
        return False
    if err:
        raise MountError(f"cannot make {path} a private mount: {os.strerror(err)}")
    return True


def force_detach(path: str, pid: int | None, *, is_ours: bool) -> None:
    """Take a view down whatever its daemon does: abort the FUSE connection (requests
    waiting on a stopped daemon fail at once), detach the mount, SIGKILL the daemon *pid*
    if *is_ours* (the caller checked it is the layerfs daemon of *path*) and wait for it."""
    abort_connection(path)
    detach(path)
    if pid is None or not is_ours:
        return
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGKILL)
    if not _wait_gone(pid, 10.0):
        raise MountError(f"daemon {pid} for {path} did not exit after SIGKILL")
