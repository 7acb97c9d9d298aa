"""A real unprivileged user for the rootless tests, set up the way a normal host has one.

The ``rootless_user`` fixture (session scope) creates a user with subordinate uid and gid
ranges in ``/etc/subuid``/``/etc/subgid``, a home, and a private ``XDG_RUNTIME_DIR``. This VM
has no udev, so ``/dev/fuse`` is 0600: the fixture makes it 0666 for the run, as a normal
host has it. The venv's interpreter lives under ``/root`` (0700 here), so ``/root`` gets the
search bit (``o+x``, not read) for the run. Everything is restored when the session ends,
and the user is removed.

Commands run as the user through ``setpriv`` with a clean environment (no root
``PATH``, ``HOME`` or ``XDG_*`` leaking in).
"""

from __future__ import annotations

import contextlib
import fcntl
import grp
import json
import os
import pwd
import shutil
import stat
import subprocess
import sys
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import pytest

from conftest import require, require_root, require_tool
from layerfs.procfs import pid_alive

#: One user per checkout running tests at once: ``LAYERFS_TEST_USER`` and
#: ``LAYERFS_TEST_SUBID`` (start of the subordinate range) override the defaults.
USER_NAME = os.environ.get("LAYERFS_TEST_USER", "lfs-rootless")
#: The subordinate range given to the test user (uids and gids alike).
SUB_START = int(os.environ.get("LAYERFS_TEST_SUBID", "300000"))
SUB_COUNT = 65536
#: Who holds the widened modes of /dev/fuse and /root: {"pids": [...], "modes": {path: mode}}.
_PERM_STATE = Path("/run/layerfs-test-perms.json")
_PERM_LOCK = "/run/layerfs-test-perms.lock"
REPO = Path(__file__).resolve().parent.parent
VENV_BIN = Path(sys.executable).parent


@dataclass(frozen=True)
class RootlessUser:
    """The test user: its ids, home, runtime dir and subordinate range."""

    name: str
    uid: int
    gid: int
    home: Path
    runtime_dir: Path
    sub_start: int
    sub_count: int

    def env(self, extra: Mapping[str, str] | None = None) -> dict[str, str]:
        """The environment a login shell of the user would have, plus the venv on PATH."""
        env = {
            "HOME": str(self.home),
            "USER": self.name,
            "LOGNAME": self.name,
            "PATH": f"{VENV_BIN}:/usr/local/bin:/usr/bin:/bin:/usr/sbin:/sbin",
            "XDG_RUNTIME_DIR": str(self.runtime_dir),
            "LANG": "C.UTF-8",
        }
        if os.environ.get("PYTHONPATH"):  # a worktree's code under test, not main's
            env["PYTHONPATH"] = os.environ["PYTHONPATH"]
        if extra:
            env.update(extra)
        return env

    def run(
        self,
        argv: Sequence[str],
        *,
        env: Mapping[str, str] | None = None,
        cwd: str | os.PathLike[str] | None = None,
        input: bytes | None = None,
        timeout: float = 120,
        check: bool = False,
        setup: str | None = None,
    ) -> subprocess.CompletedProcess[str]:
        """Run ``argv`` as the user (text output); ``env`` adds to :meth:`env`.

        ``setup``: shell commands run as root first, in a private mount namespace of this
        command alone (e.g. a bind mount over ``/dev/fuse`` or ``/etc/fuse.conf``), so the
        host and other test runs never see them."""
        cmd = [
            "setpriv",
            f"--reuid={self.uid}",
            f"--regid={self.gid}",
            "--init-groups",
            "--reset-env",
            "--",
            "env",
            *(f"{k}={v}" for k, v in self.env(env).items()),
            *argv,
        ]
        if setup is not None:
            cmd = ["unshare", "--mount", "--propagation", "private", "sh", "-ec",
                   f'{setup}\nexec "$@"', "sh", *cmd]  # fmt: skip
        proc = subprocess.run(
            cmd,
            cwd=cwd or self.home,
            input=input.decode("latin-1") if input is not None else None,
            capture_output=True,
            text=True,
            timeout=timeout,
        )
        if check and proc.returncode != 0:
            raise AssertionError(
                f"{argv!r} as {self.name} exited {proc.returncode}:\n{proc.stdout}\n{proc.stderr}"
            )
        return proc

    def layerfs(self, *args: str, **kwargs: object) -> subprocess.CompletedProcess[str]:
        """``layerfs ARGS`` from this checkout's venv, as the user."""
        return self.run([str(VENV_BIN / "layerfs"), *args], **kwargs)  # type: ignore[arg-type]


def user_pids(uid: int) -> list[int]:
    """Pids of every process running as *uid* (real uid, from /proc)."""
    pids = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/status") as f:
                for line in f:
                    if line.startswith("Uid:"):
                        if int(line.split()[1]) == uid:
                            pids.append(int(entry))
                        break
        except (OSError, ValueError):
            continue
    return pids


def reset_user(user: RootlessUser) -> None:
    """Back to a fresh login: every process of the test user (daemons, the rootless
    namespace's pause process: all started by the tests) killed by pid and waited for, and
    the stores and runtime state under its home and runtime dir removed (their mounts live
    only in namespaces that died with those processes)."""
    for _attempt in range(100):
        pids = user_pids(user.uid)
        if not pids:
            break
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, 9)
        for pid in pids:
            with contextlib.suppress(ChildProcessError, OSError):
                os.waitpid(pid, os.WNOHANG)
        _wait_gone(pids)
    _detach_below(str(user.home), str(user.runtime_dir), f"/tmp/layerfs-run-{user.uid}")
    for sub in (".local", ".config", ".cache"):
        shutil.rmtree(user.home / sub, ignore_errors=True)
    for child in user.runtime_dir.iterdir():
        if child.is_dir() and not child.is_symlink():
            shutil.rmtree(child, ignore_errors=True)
        else:
            child.unlink()
    shutil.rmtree(f"/tmp/layerfs-run-{user.uid}", ignore_errors=True)
    shutil.rmtree(f"/tmp/podman-run-{user.uid}", ignore_errors=True)


def _detach_below(*tops: str) -> None:
    """Lazily unmount whatever this (the host's) mount namespace has below *tops*: views a
    failed test left, whose daemons were just killed (a dead FUSE mount blocks removal)."""
    from layerfs.mountinfo import entries

    points = [e.point for e in entries() if any(e.point.startswith(t + "/") for t in tops)]
    for point in reversed(points):
        subprocess.run(["umount", "-l", point], capture_output=True, check=False)


def _wait_gone(pids: list[int]) -> None:
    """Wait (bounded) until every pid is gone or a zombie of someone else."""
    import time

    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        if not any(pid_alive(p) for p in pids):
            return
        time.sleep(0.01)


def _drop_user(name: str) -> None:
    with contextlib.suppress(KeyError):
        uid = pwd.getpwnam(name).pw_uid
        subprocess.run(["pkill", "-KILL", "-u", str(uid)], check=False)
        subprocess.run(["userdel", "-r", "-f", name], capture_output=True, check=False)
    for path in ("/etc/subuid", "/etc/subgid"):
        with contextlib.suppress(FileNotFoundError):
            lines = Path(path).read_text().splitlines(keepends=True)
            Path(path).write_text("".join(x for x in lines if not x.startswith(f"{name}:")))


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


@contextlib.contextmanager
def _widened_modes(adds: Mapping[str, int]) -> Iterator[None]:
    """Each path with its mode bits widened for the duration, then its old mode back.

    Several test runs (other checkouts) may overlap: the old modes and the live holders are
    kept in a small state file under an fcntl lock, and the modes go back only when the last
    live holder leaves (a killed holder is pruned by the next one)."""

    def update(enter: bool) -> None:
        with open(_PERM_LOCK, "a") as lock:
            fcntl.lockf(lock, fcntl.LOCK_EX)
            try:
                state = json.loads(_PERM_STATE.read_text())
            except (FileNotFoundError, ValueError):
                state = {"pids": [], "modes": {}}
            pids = [p for p in state["pids"] if p != os.getpid() and _pid_alive(p)]
            if enter:
                if not pids:  # a killed holder's widening is undone before recording
                    for path, mode in state["modes"].items():
                        os.chmod(path, mode)
                    state["modes"] = {}
                for path, add in adds.items():
                    old = state["modes"].setdefault(path, stat.S_IMODE(os.stat(path).st_mode))
                    os.chmod(path, old | add)
                pids.append(os.getpid())
            elif not pids:
                for path, old in state["modes"].items():
                    os.chmod(path, old)
                state["modes"] = {}
            state["pids"] = pids
            _PERM_STATE.write_text(json.dumps(state))

    update(True)
    try:
        yield
    finally:
        update(False)


@pytest.fixture(scope="session")
def rootless_user() -> Iterator[RootlessUser]:
    """A plain user with subuid/subgid ranges, ``/dev/fuse`` usable, removed afterwards."""
    require_root()
    for tool in ("useradd", "userdel", "setpriv", "newuidmap", "newgidmap"):
        require_tool(tool)
    require(os.path.exists("/dev/fuse"), "/dev/fuse is missing")
    _drop_user(USER_NAME)  # a leftover from a killed run
    subprocess.run(
        [
            "useradd",
            "--create-home",
            "--shell",
            "/bin/sh",
            "--no-user-group",
            "-g",
            "users",
            "-K",
            "SUB_UID_COUNT=0",
            "-K",
            "SUB_GID_COUNT=0",
            USER_NAME,
        ],
        check=True,
        capture_output=True,
    )
    try:
        entry = pwd.getpwnam(USER_NAME)
        for path in ("/etc/subuid", "/etc/subgid"):
            with open(path, "a") as f:
                f.write(f"{USER_NAME}:{SUB_START}:{SUB_COUNT}\n")
        runtime = Path(f"/run/user/{entry.pw_uid}")
        shutil.rmtree(runtime, ignore_errors=True)
        runtime.mkdir(parents=True, mode=0o700)
        os.chown(runtime, entry.pw_uid, entry.pw_gid)
        user = RootlessUser(
            name=USER_NAME,
            uid=entry.pw_uid,
            gid=entry.pw_gid,
            home=Path(entry.pw_dir),
            runtime_dir=runtime,
            sub_start=SUB_START,
            sub_count=SUB_COUNT,
        )
        with _widened_modes({"/dev/fuse": 0o666, "/root": 0o001}):
            yield user
    finally:
        uid = pwd.getpwnam(USER_NAME).pw_uid if _user_exists(USER_NAME) else None
        if uid is not None:  # its daemons die with it: their dead mounts must not stay
            for pid in user_pids(uid):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, 9)
            _wait_gone(user_pids(uid))
            _detach_below(pwd.getpwnam(USER_NAME).pw_dir, f"/run/user/{uid}")
        _drop_user(USER_NAME)
        if uid is not None:
            shutil.rmtree(f"/run/user/{uid}", ignore_errors=True)


def _user_exists(name: str) -> bool:
    try:
        pwd.getpwnam(name)
    except KeyError:
        return False
    return True


def users_group_id() -> int:
    """The gid of the ``users`` group the test user belongs to."""
    return grp.getgrnam("users").gr_gid


@pytest.fixture(name="user")
def fresh_user(rootless_user: RootlessUser) -> Iterator[RootlessUser]:
    """The test user, fresh before and after: no namespace, no store, no views."""
    reset_user(rootless_user)
    yield rootless_user
    reset_user(rootless_user)


def ok(user: RootlessUser, *argv: str, **kw: object) -> str:
    """Run ``argv`` as the user; its stdout, or a failure showing both outputs."""
    proc = user.run(list(argv), **kw)  # type: ignore[arg-type]
    assert proc.returncode == 0, f"{argv}: {proc.returncode}\n{proc.stdout}\n{proc.stderr}"
    return proc.stdout
