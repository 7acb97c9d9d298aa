"""The mount process: one daemon per union mount.

``python -m layerfs.fs.daemon MOUNTPOINT DIFF_DIR... [options]`` (diff dirs top layer first).
Without ``--foreground`` it forks once and the parent exits at once (the caller starts it with
``start_new_session``), so the daemon is re-parented and outlives the CLI.

Life cycle: load the cached index (or build and save it), ``pyfuse3.init`` (mounts), then run
``pyfuse3.main`` under trio. A task in the same nursery stat()s the mountpoint from a worker
thread, which only returns once the kernel's FUSE INIT and the root getattr were answered by the
loop, raises the FUSE bdi's ``read_ahead_kb``, and only then writes ``READY`` to the readiness fd.
SIGTERM/SIGINT/SIGHUP call ``pyfuse3.terminate()``; the main loop then ends and
``pyfuse3.close(unmount=True)`` unmounts. An external ``umount``/``fusermount3 -u`` ends the loop
the same way.

Readiness protocol (one line each, ASCII, on ``--ready-fd``): ``PID <pid>`` as soon as the final
process runs, then ``READY`` or ``ERROR <message>``; EOF without either means the daemon died
(the log file says why).
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import shutil
import signal
import stat
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence

import pyfuse3
import trio

from layerfs.errors import LayerfsError, describe_os_error
from layerfs.fs.idmap import IdMapping, IdMappingError, from_options
from layerfs.fs.index import LayerPin, open_index
from layerfs.fs.ops import WORKER_TASKS, UnionOperations

log = logging.getLogger("layerfs.fs.daemon")

DEFAULT_READ_AHEAD_KB = 1024


def mount_options(allow_other: bool, for_container: bool, writable: bool = False) -> set[str]:
    """FUSE mount options for a view; ``allow_other`` always comes with default_permissions.
    A *writable* view (an upper dir) has no ``ro``."""
    opts = {"fsname=layerfs", "subtype=layerfs", "noatime", "default_permissions"}
    if not writable:
        opts.add("ro")
    if allow_other:
        opts.add("allow_other")
    opts |= {"suid", "dev"} if for_container else {"nosuid", "nodev"}
    return opts


def set_read_ahead(mountpoint: str, kb: int) -> bool:
    """Set ``/sys/class/bdi/<maj:min>/read_ahead_kb`` of the FUSE mount; False if not possible."""
    st = os.stat(mountpoint)
    path = f"/sys/class/bdi/{os.major(st.st_dev)}:{os.minor(st.st_dev)}/read_ahead_kb"
    try:
        with open(path, "w") as f:
            f.write(str(kb))
    except OSError as e:
        log.info("cannot set %s: %s", path, e)
        return False
    return True


FUSE_DEVICE = "/dev/fuse"
FUSE_DEVICE_NUMBER = os.makedev(10, 229)
FUSERMOUNT = "fusermount3"
FUSERMOUNT_DIR = "/usr/bin"  # where libfuse looks first; then $PATH
FUSE_CONF = "/etc/fuse.conf"


class MountSetupError(Exception):
    """A mount cannot work; the message is the one line the user gets (on the ERROR line)."""


def _fusermount_path() -> str | None:
    first = os.path.join(FUSERMOUNT_DIR, FUSERMOUNT)
    if os.access(first, os.X_OK) and os.path.isfile(first):
        return first
    return shutil.which(FUSERMOUNT)


def _user_allow_other() -> bool:
    try:
        with open(FUSE_CONF, "rb") as f:
            return any(line.strip() == b"user_allow_other" for line in f)
    except OSError:
        return False


def preflight(mountpoint: str, allow_other: bool) -> None:
    """Check what a FUSE mount needs before building the index; raise MountSetupError naming
    the first thing missing. libfuse itself only says "fuse_session_mount failed"."""
    try:
        st = os.stat(mountpoint)
    except FileNotFoundError:
        raise MountSetupError(f"mount point {mountpoint} does not exist") from None
    except OSError as e:
        raise MountSetupError(f"mount point {mountpoint}: {e.strerror}") from None
    if not stat.S_ISDIR(st.st_mode):
        raise MountSetupError(f"mount point {mountpoint} is not a directory")
    try:
        fd = os.open(FUSE_DEVICE, os.O_RDWR | os.O_CLOEXEC)
    except OSError as e:
        raise MountSetupError(f"cannot open {FUSE_DEVICE}: {e.strerror}") from None
    try:
        dev = os.fstat(fd)
    finally:
        os.close(fd)
    if not stat.S_ISCHR(dev.st_mode) or dev.st_rdev != FUSE_DEVICE_NUMBER:
        raise MountSetupError(f"cannot open {FUSE_DEVICE}: it is not the FUSE device (10:229)")
    if os.geteuid() == 0:
        return  # root mounts directly (also root of a user namespace)
    fusermount = _fusermount_path()
    if fusermount is None:
        raise MountSetupError(f"{FUSERMOUNT} not found: it is needed to mount without root")
    if allow_other and not _user_allow_other():
        raise MountSetupError(f"allow_other needs user_allow_other in {FUSE_CONF} (or root)")


@contextlib.contextmanager
def _stderr_captured() -> Iterator[list[str]]:
    """Collect what is written to fd 2 (libfuse and fusermount3 report there) into the
    yielded list of non-empty lines; the text is copied to the real stderr (the log) too."""
    lines: list[str] = []
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile() as tmp:
        os.dup2(tmp.fileno(), 2)
        try:
            yield lines
        finally:
            sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)
            tmp.seek(0)
            data = tmp.read()
            if data:
                os.write(2, data)
            text = data.decode(errors="replace")
            lines.extend(ln.strip() for ln in text.splitlines() if ln.strip())


def log_pyfuse3_features(ops: UnionOperations) -> None:
    """One line at start-up: whether the kernel caches are on (the patched pyfuse3) or not."""
    version = getattr(pyfuse3, "__version__", "?")
    missing = ops.features.missing
    if not missing:
        log.info("pyfuse3 %s: kernel readdir and symlink caches, zero-message open", version)
    elif ops.kernel_caching:
        log.info(
            "pyfuse3 %s without the layerfs patches (no %s): every open, listing and readlink"
            " is a request (slower; scripts/setup builds the patched pyfuse3)",
            version,
            ", ".join(missing),
        )
    else:
        log.info("pyfuse3 %s: kernel caching off for this view", version)


def init_fuse(ops: pyfuse3.Operations, mountpoint: str, options: set[str]) -> None:
    """``pyfuse3.init`` with libfuse's own complaint as the error (MountSetupError)."""
    with _stderr_captured() as said:
        try:
            pyfuse3.init(ops, mountpoint, options)
            return
        except RuntimeError:
            pass
    reason = said[-1] if said else "the kernel refused the FUSE mount"
    raise MountSetupError(f"cannot mount {mountpoint}: {reason}")


def failure_message(stage: str, mountpoint: str, e: Exception) -> str:
    """The one line for a failed mount (no traceback, no ``b'...'``)."""
    if isinstance(e, MountSetupError):
        return str(e)
    text = describe_os_error(e) if isinstance(e, OSError) else str(e) or type(e).__name__
    if stage == "index":
        return f"cannot index the layers: {text}"
    return f"cannot mount {mountpoint}: {text}"


class _Ready:
    """Writes the readiness lines; tolerant of a reader that went away."""

    def __init__(self, fd: int | None) -> None:
        self.fd = fd

    def send(self, line: str) -> None:
        if self.fd is None:
            return
        try:
            os.write(self.fd, (line.replace("\n", " ") + "\n").encode())
        except OSError:
            self.fd = None

    def close(self) -> None:
        if self.fd is not None:
            with contextlib.suppress(OSError):
                os.close(self.fd)
            self.fd = None


async def _announce(mountpoint: str, read_ahead_kb: int, ready: _Ready) -> None:
    parent_dev = os.stat(os.path.dirname(os.path.abspath(mountpoint)) or "/").st_dev
    st = await trio.to_thread.run_sync(os.stat, mountpoint)
    if st.st_dev == parent_dev:
        ready.send("ERROR mount did not appear at " + mountpoint)
        pyfuse3.terminate()
        return
    if read_ahead_kb > 0:
        set_read_ahead(mountpoint, read_ahead_kb)
    log.info("mount live at %s", mountpoint)
    ready.send("READY")
    ready.close()


async def _on_signals() -> None:
    with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT, signal.SIGHUP) as sigs:
        async for signum in sigs:
            log.info("signal %d: unmounting", signum)
            pyfuse3.terminate()
            return


async def _serve(mountpoint: str, read_ahead_kb: int, ready: _Ready) -> None:
    async with trio.open_nursery() as nursery:
        nursery.start_soon(_on_signals)
        nursery.start_soon(_announce, mountpoint, read_ahead_kb, ready)
        # Metadata handlers never await; opens and uncached reads wait in worker threads, so
        # more than one task is needed to keep receiving requests meanwhile (see ops.py).
        await pyfuse3.main(min_tasks=1, max_tasks=WORKER_TASKS)
        nursery.cancel_scope.cancel()


def serve(
    mountpoint: str,
    diff_dirs: Sequence[str],
    layer_ids: Sequence[str] | None = None,
    *,
    pins: Sequence[LayerPin | None] | None = None,
    whiteout_format: str = "kernel",
    index_path: str | None = None,
    allow_other: bool = False,
    for_container: bool = False,
    read_ahead_kb: int = DEFAULT_READ_AHEAD_KB,
    ready_fd: int | None = None,
    upper_dir: str | None = None,
    work_dir: str | None = None,
    upper_layer_id: str | None = None,
    ids: IdMapping | None = None,
) -> int:
    """Mount the view and serve it until unmounted or signalled. Returns an exit status.

    With *upper_dir* (and *work_dir*, the overlay work dir on the same file system) the view
    is read-write: *diff_dirs* are its lower layers (top first, possibly none) and every change
    lands in *upper_dir* in *whiteout_format* (:mod:`layerfs.fs.rwops`).

    Runs in the calling process (the CLI can call it for ``--foreground``). *pins* (one per
    diff dir) say which layers may use a persisted index; *whiteout_format* is the store's
    (:mod:`layerfs.overlayfmt`). *index_path* is obsolete and ignored (the index is per
    layer now). *ids*: the view's id mapping (:mod:`layerfs.fs.idmap`; None shows ids as
    stored)."""
    ready = _Ready(ready_fd)
    ready.send(f"PID {os.getpid()}")
    stage = "check"
    try:
        preflight(mountpoint, allow_other)
        stage = "index"
        t0 = time.monotonic()
        index = None
        if diff_dirs or upper_dir is None:
            index, cached = open_index(diff_dirs, pins, whiteout_format=whiteout_format)
            log.info(
                "index %s: %d entries, %d layers, %.3f s",
                "loaded" if cached else "built",
                len(index),
                len(diff_dirs),
                time.monotonic() - t0,
            )
        stage = "mount"
        ops: pyfuse3.Operations
        if upper_dir is not None:
            from layerfs.fs.rwops import open_rw_operations

            ops = open_rw_operations(
                index,
                upper_dir,
                work_dir or "",
                whiteout_format=whiteout_format,
                layer_ids=layer_ids,
                upper_layer_id=upper_layer_id,
                ids=ids,
            )
        else:
            assert index is not None
            ops = UnionOperations(index, layer_ids, ids=ids)
            log_pyfuse3_features(ops)
        writable = upper_dir is not None
        init_fuse(ops, mountpoint, mount_options(allow_other, for_container, writable))
    except Exception as e:
        msg = failure_message(stage, mountpoint, e)
        if isinstance(e, (MountSetupError, OSError, LayerfsError)):
            log.error("mount of %s failed: %s", mountpoint, msg)
        else:
            log.exception("mount of %s failed: %s", mountpoint, msg)
        ready.send(f"ERROR {msg}")
        ready.close()
        return 1
    status = 0
    try:
        trio.run(_serve, mountpoint, read_ahead_kb, ready)
    except BaseException as e:
        log.exception("main loop failed")
        ready.send(f"ERROR main loop: {e}")
        status = 1
    finally:
        ready.close()
        pyfuse3.close(unmount=True)
        log.info("unmounted %s", mountpoint)
    return status


def _parse(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m layerfs.fs.daemon", description=__doc__)
    p.add_argument("mountpoint")
    p.add_argument(
        "diff_dirs", nargs="*", help="layer diff dirs, top layer first (the lowers with --upper)"
    )
    p.add_argument("--upper", dest="upper_dir", help="upper dir: the view is read-write")
    p.add_argument("--work", dest="work_dir", help="work dir (same file system as --upper)")
    p.add_argument("--upper-layer-id", help="layer id of the upper dir (for messages)")
    p.add_argument("--layer-id", action="append", default=[], help="one per diff dir, in order")
    p.add_argument("--index", dest="index_path", help="obsolete, ignored")
    p.add_argument(
        "--digest", action="append", default=[], help="one per diff dir: diff digest or ''"
    )
    p.add_argument(
        "--tar-split", action="append", default=[], help="one per diff dir: tar-split or ''"
    )
    p.add_argument(
        "--index-file", action="append", default=[], help="one per diff dir: index file or ''"
    )
    p.add_argument("--whiteout-format", choices=("kernel", "aufs"), default="kernel")
    p.add_argument("--allow-other", action="store_true")
    p.add_argument("--for-container", action="store_true", help="keep suid and dev")
    p.add_argument("--foreground", action="store_true")
    p.add_argument("--log", dest="log_path", help="log file (default: stderr)")
    p.add_argument("--ready-fd", type=int)
    p.add_argument("--read-ahead-kb", type=int, default=DEFAULT_READ_AHEAD_KB)
    p.add_argument("--debug", action="store_true")
    p.add_argument(
        "--id-option",
        action="append",
        default=[],
        metavar="OPT",
        help="uidmapping=, gidmapping=, squash_to_root, squash_to_uid=, squash_to_gid= "
        "(fuse-overlayfs syntax; repeatable)",
    )
    return p.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    a = _parse(argv)
    if a.upper_dir is None and not a.diff_dirs:
        print("at least one diff dir is needed without --upper", file=sys.stderr)
        return 2
    if (a.upper_dir is None) != (a.work_dir is None):
        print("--upper and --work go together", file=sys.stderr)
        return 2
    try:
        ids = from_options(a.id_option)
    except IdMappingError as e:
        print(e, file=sys.stderr)
        return 2
    mountpoint = os.path.abspath(a.mountpoint)
    diff_dirs = [os.path.abspath(d) for d in a.diff_dirs]
    index_path = os.path.abspath(a.index_path) if a.index_path else None
    if a.log_path:
        log_fd = os.open(a.log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC, 0o600)
        os.dup2(log_fd, 2)
        os.close(log_fd)
    logging.basicConfig(
        stream=sys.stderr,
        level=logging.DEBUG if a.debug else logging.INFO,
        format="%(asctime)s layerfs-daemon[%(process)d] %(levelname)s %(name)s: %(message)s",
    )
    if not a.foreground:
        if os.fork() > 0:
            os._exit(0)
        with contextlib.suppress(OSError):
            os.setsid()
        devnull = os.open(os.devnull, os.O_RDWR)
        os.dup2(devnull, 0)
        os.dup2(devnull if not a.log_path else 2, 1)
        os.close(devnull)
        os.chdir("/")
    pins: list[LayerPin | None] | None = None
    if a.index_file:
        n = len(diff_dirs)
        if not (len(a.layer_id) == len(a.digest) == len(a.tar_split) == len(a.index_file) == n):
            print(
                "--layer-id, --digest, --tar-split, --index-file: one each per diff dir",
                file=sys.stderr,
            )
            return 2
        pins = [
            LayerPin(lid, dg, ts or None, os.path.abspath(ix)) if ix else None
            for lid, dg, ts, ix in zip(a.layer_id, a.digest, a.tar_split, a.index_file, strict=True)
        ]
    return serve(
        mountpoint,
        diff_dirs,
        a.layer_id or None,
        pins=pins,
        whiteout_format=a.whiteout_format,
        index_path=index_path,
        allow_other=a.allow_other,
        for_container=a.for_container,
        read_ahead_kb=a.read_ahead_kb,
        ready_fd=a.ready_fd,
        upper_dir=os.path.abspath(a.upper_dir) if a.upper_dir else None,
        work_dir=os.path.abspath(a.work_dir) if a.work_dir else None,
        upper_layer_id=a.upper_layer_id,
        ids=ids,
    )


if __name__ == "__main__":
    sys.exit(main())
