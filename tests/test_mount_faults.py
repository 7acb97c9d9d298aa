"""Faults around views: stopped and killed daemons with every command under ``timeout``,
pending mount records, non-UTF-8 mount points elsewhere on the machine, ambiguous
prefixes, and mount failures that must read as one line.

Covers issue 9 items B5, D11 (pending counts), C9 (mountinfo, resolver) and C10 (client
side of mount failures).
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from filelock import FileLock
from test_mount_interop import daemon_pid, fuse_mounts_below, one_line_error, wait_gone

from conftest import GoTool, LayerfsCLI, StorePaths, make_tar, require_root, require_tool
from layerfs.errors import LayerMountedError
from layerfs.fs.mount import probe
from layerfs.procfs import pid_alive
from layerfs.store.lockfile import LockFile
from layerfs.store.pending import layer_lock_path

pytestmark = [pytest.mark.fuse, pytest.mark.root]

LIMIT = 30  # seconds any command may take; a hang fails the test instead of the suite


@pytest.fixture
def chain(cli: LayerfsCLI) -> dict[str, str]:
    """base (a) <- top (b): returns name -> id."""
    require_root()
    ids = {"base": cli.out("import-layer", "--name", "base", input=make_tar({"a": b"A"}))}
    ids["top"] = cli.out(
        "import-layer", "--name", "top", "--parent", "base", input=make_tar({"b": b"B"})
    )
    return {k: v.split()[0] for k, v in ids.items()}


def run(argv: list[str]) -> subprocess.CompletedProcess[bytes]:
    """Run under ``timeout``: exit 124 means it hung."""
    require_tool("timeout")
    return subprocess.run(["timeout", str(LIMIT), *argv], capture_output=True, check=False)


def assert_locks_free(paths: StorePaths) -> None:
    for name in ("layers.lock", "mountpoints.lock"):
        where = paths.root if name == "layers.lock" else paths.runroot
        held = LockFile(os.path.join(where, "overlay-layers", name)).try_write()
        assert held is not None, f"{name} is still held"
        held.release()


@pytest.fixture
def stopped(cli: LayerfsCLI, chain: dict[str, str], paths: StorePaths) -> Iterator[tuple[str, int]]:
    """The view of ``top`` with its daemon stopped (SIGSTOP); continued and cleaned up at
    teardown."""
    path = cli.out("mount", "top").strip()
    pid = daemon_pid(paths, chain["top"])
    os.kill(pid, signal.SIGSTOP)
    try:
        yield path, pid
    finally:
        if pid_alive(pid):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
                os.kill(pid, signal.SIGCONT)
            wait_gone(pid)
        subprocess.run(["umount", "-l", path], capture_output=True, check=False)


# ------------------------------------------------------------------ B5: stopped daemon


def test_a_stopped_daemon_freezes_nothing(
    cli: LayerfsCLI,
    go: GoTool,
    chain: dict[str, str],
    paths: StorePaths,
    stopped: tuple[str, int],
) -> None:
    path, pid = stopped
    says = f"daemon {pid} does not answer"
    assert probe(path, 0.5) == "hung"  # the deadline, not the /proc state, decides here

    proc = run(cli.argv("ps", "--json"))
    assert proc.returncode == 0, proc
    views = json.loads(proc.stdout)
    assert [(v["mountpoint"], v["state"], v["pid"]) for v in views] == [(path, "hung", pid)]
    assert proc.stderr.decode().count("\n") == 1 and says in proc.stderr.decode()
    assert_locks_free(paths)

    proc = run(cli.argv("mounted", "top"))
    assert proc.returncode == 0 and proc.stdout.strip() == b"1", proc
    assert says in proc.stderr.decode() and proc.stderr.decode().count("\n") == 1

    err = one_line_error(run(cli.argv("unmount", "top")))
    assert says in err and "--force" in err
    err = one_line_error(run(cli.argv("mount", "top")))
    assert says in err
    err = one_line_error(run(cli.argv("delete-layer", "top")))
    assert "unmount it first" in err
    assert_locks_free(paths)

    proc = run(cli.argv("create-layer", "--name", "other", "top"))
    assert proc.returncode == 0, proc
    proc = run(go.argv("layers"))
    assert proc.returncode == 0 and b"other" in proc.stdout, proc
    proc = run(go.argv("mount", chain["base"]))  # a Go kernel mount beside it
    assert proc.returncode == 0, proc
    assert run(go.argv("unmount", chain["base"])).returncode == 0

    proc = run(cli.argv("unmount", "--force", "top"))
    assert proc.returncode == 0 and b"unmounted" in proc.stdout, proc
    assert fuse_mounts_below(paths.root) == []
    wait_gone(pid)  # the recorded daemon was killed, stopped or not
    assert json.loads(cli.out("ps", "--json")) == []
    assert_locks_free(paths)


# ------------------------------------------------------------------ killed daemon


COMMANDS = {
    "ps": (["ps", "--json"], b"[]"),
    "mounted": (["mounted", "top"], b"0"),
    "unmount": (["unmount", "top"], b"top mountpoint unmounted"),
    "unmount --force": (["unmount", "--force", "top"], b"top mountpoint unmounted"),
    "mount": (["mount", "top"], None),
    "delete-layer": (["delete-layer", "top"], None),
}


@pytest.mark.parametrize("command", [*COMMANDS, "create-layer", "go layers"])
def test_a_killed_daemon_with_every_command(
    cli: LayerfsCLI, go: GoTool, chain: dict[str, str], paths: StorePaths, command: str
) -> None:
    path = cli.out("mount", "top").strip()
    pid = daemon_pid(paths, chain["top"])
    os.kill(pid, signal.SIGKILL)
    wait_gone(pid)
    if command == "go layers":
        proc = run(go.argv("layers"))
        assert proc.returncode == 0 and b"top" in proc.stdout, proc
    elif command == "create-layer":
        assert run(cli.argv("create-layer", "top")).returncode == 0
    else:
        argv, out = COMMANDS[command]
        proc = run(cli.argv(*argv))
        assert proc.returncode == 0, proc
        if out is not None:
            assert proc.stdout.strip() == out
        if command == "mount":
            assert proc.stdout.strip().decode() == path
            assert sorted(os.listdir(path)) == ["a", "b"]
            cli.run("unmount", "top")
        elif command == "delete-layer":
            assert proc.stdout.strip().decode() == chain["top"]
        assert fuse_mounts_below(paths.root) == []
    assert_locks_free(paths)
    cli.run("unmount", "--force", "top", check=False)
    assert fuse_mounts_below(paths.root) == []


# ------------------------------------------------------------------ D11: pending counts


def test_a_pending_mount_record_blocks_delete(
    cli: LayerfsCLI, chain: dict[str, str], paths: StorePaths
) -> None:
    """A record written by a ``mount`` whose daemon is not ready yet (the per-layer lock is
    held, the path not mounted) is honoured by every delete path; once the lock is free
    the same record is stale and dropped."""
    top = chain["top"]
    merged = os.path.join(paths.root, "overlay", top, "merged")
    os.makedirs(os.path.dirname(layer_lock_path(paths.runroot, top)), exist_ok=True)
    lock = FileLock(layer_lock_path(paths.runroot, top))
    mounts_json = os.path.join(paths.runroot, "overlay-layers", "mountpoints.json")
    with lock:  # what `layerfs mount` holds until READY
        with open(mounts_json, "w") as f:
            json.dump([{"id": top, "path": merged, "count": 1}], f)
        err = one_line_error(run(cli.argv("delete-layer", "top")))
        assert "being mounted" in err
        with pytest.raises(LayerMountedError, match="being mounted"):
            paths.store().delete_layer("top")
        err = one_line_error(run(cli.argv("applydiff", "top", os.devnull)))
        assert "being mounted" in err
        assert one_line_error(run(cli.argv("wipe")))
    assert cli.out("delete-layer", "top").strip() == top
    with open(mounts_json) as f:
        assert json.load(f) == []


def test_delete_refuses_while_a_real_mount_is_starting(
    cli: LayerfsCLI, chain: dict[str, str], paths: StorePaths, tmp_path: Path
) -> None:
    """A real ``layerfs mount`` whose daemon is held at start-up (a ``sitecustomize`` in the
    daemon waits on a FIFO): delete refuses while the mount is pending, and after."""
    hook = tmp_path / "hook"
    hook.mkdir()
    reached, release = tmp_path / "reached", tmp_path / "release"
    os.mkfifo(reached)
    os.mkfifo(release)
    (hook / "sitecustomize.py").write_text(
        "import os\n"
        "with open('/proc/self/cmdline', 'rb') as f:\n"
        "    if b'layerfs.fs.daemon' in f.read():\n"
        f"        open({str(reached)!r}, 'w').close()\n"
        f"        open({str(release)!r}).read()\n"
    )
    here = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    mounting = subprocess.Popen(
        cli.argv("mount", "top"),
        stdout=subprocess.PIPE,
        env=dict(os.environ, PYTHONPATH=f"{hook}{os.pathsep}{here}"),
    )
    try:
        with open(reached):  # the daemon is running, held before it mounts
            pass
        err = one_line_error(run(cli.argv("delete-layer", "top")))
        assert "being mounted" in err
        with pytest.raises(LayerMountedError, match="being mounted"):
            paths.store().delete_layer("top")
    finally:
        with open(release, "w"):
            pass
    out, _ = mounting.communicate(timeout=LIMIT)
    path = out.decode().strip()
    assert mounting.returncode == 0 and sorted(os.listdir(path)) == ["a", "b"]
    err = one_line_error(run(cli.argv("delete-layer", "top")))
    assert "unmount it first" in err
    cli.run("unmount", "top")
    assert cli.out("delete-layer", "top").strip() == chain["top"]


def test_mount_waits_for_a_pending_mount_and_shares_it(
    cli: LayerfsCLI, chain: dict[str, str], paths: StorePaths
) -> None:
    """A second ``mount`` while the first holds the layer lock waits for it (no second
    daemon, no stale-record reset under it)."""
    top = chain["top"]
    os.makedirs(os.path.dirname(layer_lock_path(paths.runroot, top)), exist_ok=True)
    lock = FileLock(layer_lock_path(paths.runroot, top))
    lock.acquire()
    try:
        waiting = subprocess.Popen(cli.argv("mount", "top"), stdout=subprocess.PIPE)
        with pytest.raises(subprocess.TimeoutExpired):
            waiting.wait(timeout=1)  # blocked on the lock, not finished
    finally:
        lock.release()
    out, _ = waiting.communicate(timeout=LIMIT)
    path = out.decode().strip()
    try:
        assert sorted(os.listdir(path)) == ["a", "b"]
    finally:
        cli.run("unmount", "top")


# ------------------------------------------------------------------ C9: mountinfo


def test_a_non_utf8_mount_point_elsewhere_breaks_nothing(
    cli: LayerfsCLI, chain: dict[str, str], paths: StorePaths, tmp_path: Path
) -> None:
    """A tmpfs at ``/tmp/x\\xff…`` (in a private mount namespace, so no other process on
    the machine sees it) while mount, ps, mounted and unmount run."""
    require_tool("unshare")
    odd = b"/tmp/x\xff-" + os.fsencode(tmp_path.name)
    os.mkdir(odd)
    layerfs = " ".join(cli.argv())
    script = f"""
set -e
mount -t tmpfs tmpfs "$ODD"
trap 'umount -l "$ODD"; {layerfs} unmount --force top >/dev/null 2>&1 || true' EXIT
grep -c x "$MI" >/dev/null
{layerfs} mount top
{layerfs} ps
{layerfs} mounted top
{layerfs} unmount top
"""
    env = dict(os.environb)
    env[b"ODD"] = odd
    env[b"MI"] = b"/proc/self/mountinfo"
    try:
        proc = subprocess.run(
            [
                "timeout",
                str(LIMIT * 4),
                "unshare",
                "-m",
                "--propagation",
                "private",
                "sh",
                "-c",
                script,
            ],
            capture_output=True,
            env=env,
            check=False,
        )
    finally:
        os.rmdir(odd)
    assert proc.returncode == 0, proc.stderr.decode(errors="replace")
    out = proc.stdout.decode(errors="replace")
    assert "Traceback" not in proc.stderr.decode(errors="replace")
    assert out.splitlines()[0].endswith("/merged") and "mountpoint unmounted" in out
    assert fuse_mounts_below(paths.root) == []


def test_mountinfo_reads_non_utf8_points(tmp_path: Path) -> None:
    """The table reader keeps such a path as a surrogate-escaped str (os.fsdecode)."""
    require_root()
    require_tool("unshare")
    odd = b"/tmp/y\xfe-" + os.fsencode(tmp_path.name)
    os.mkdir(odd)
    check = (
        "import os; from layerfs.mountinfo import is_mountpoint; "
        "print(is_mountpoint(os.fsdecode(os.environb[b'ODD'])))"
    )
    script = f'mount -t tmpfs tmpfs "$ODD" && {sys.executable} -c "{check}"; umount "$ODD"'
    env = dict(os.environb)
    env[b"ODD"] = odd
    try:
        proc = subprocess.run(
            [
                "timeout",
                str(LIMIT),
                "unshare",
                "-m",
                "--propagation",
                "private",
                "sh",
                "-c",
                script,
            ],
            capture_output=True,
            env=env,
            check=False,
        )
    finally:
        os.rmdir(odd)
    assert proc.stdout.strip() == b"True", proc


# ------------------------------------------------------------------ C9: one resolver


@pytest.fixture
def twins(cli: LayerfsCLI, go: GoTool) -> tuple[str, str]:
    """Two layers whose ids share the prefix ``abc``, and two images sharing ``fee``."""
    require_root()
    a = "abc1" + "0" * 60
    b = "abc2" + "0" * 60
    cli.run("import-layer", "--id", a, input=make_tar({"f": b"1"}))
    cli.run("import-layer", "--id", b, input=make_tar({"f": b"2"}))
    go.run("create-image", "-i", "fee1" + "0" * 60, a)
    go.run("create-image", "-i", "fee2" + "0" * 60, b)
    return a, b


@pytest.mark.parametrize(
    "argv",
    [
        ["layer", "{p}"],
        ["delete-layer", "{p}"],
        ["mount", "{p}"],
        ["ls", "{p}"],
        ["cat", "{p}", "f"],
        ["which", "{p}", "f"],
        ["mounted", "{p}"],
        ["unmount", "{p}"],
    ],
    ids=lambda a: a[0],
)
@pytest.mark.parametrize("prefix", ["abc", "fee"])
def test_an_ambiguous_prefix_gives_one_message_everywhere(
    cli: LayerfsCLI, twins: tuple[str, str], argv: list[str], prefix: str
) -> None:
    proc = run(cli.argv(*(a.format(p=prefix) for a in argv)))
    err = one_line_error(proc)
    if prefix == "fee" and argv[0] in ("layer", "delete-layer"):
        assert err == 'layerfs: layer "fee" not known\n'  # layer commands take no images
        return
    assert f'"{prefix}" not known: ambiguous id prefix, candidates: {prefix}1' in err
    assert f", {prefix}2" in err


# ------------------------------------------------------------------ C10: mount failures


def test_a_missing_mount_point_parent_is_one_line(
    cli: LayerfsCLI, chain: dict[str, str], tmp_path: Path
) -> None:
    where = str(tmp_path / "no" / "such" / "dir")
    err = one_line_error(run(cli.argv("mount", "top", where)))
    assert str(tmp_path / "no" / "such") in err and "does not exist" in err
    assert not os.path.exists(tmp_path / "no")
    assert json.loads(cli.out("ps", "--json")) == []


def test_an_unusable_dev_fuse_is_one_line_without_stale_log_lines(
    cli: LayerfsCLI, chain: dict[str, str], paths: StorePaths
) -> None:
    """/dev/fuse replaced by /dev/null for the mount (private mount namespace): the error
    is the daemon's own ERROR line, never the tail of earlier runs' log."""
    require_tool("unshare")
    logs = os.path.join(paths.runroot, "layerfs", "logs")
    os.makedirs(logs, exist_ok=True)
    with open(os.path.join(logs, f"{chain['top']}.log"), "w") as f:
        f.write("STALE line from an earlier run\n")
    layerfs = " ".join(cli.argv())
    proc = run(
        [
            "unshare",
            "-m",
            "--propagation",
            "private",
            "sh",
            "-c",
            f"mount --bind /dev/null /dev/fuse && exec {layerfs} mount top",
        ]
    )
    err = one_line_error(proc)
    assert err.startswith("layerfs: mounting ") and "STALE" not in err
    assert json.loads(cli.out("ps", "--json")) == []
    assert fuse_mounts_below(paths.root) == []
    with open(os.path.join(paths.runroot, "overlay-layers", "mountpoints.json")) as f:
        assert json.load(f) == []


def test_a_daemon_that_dies_silently_points_at_its_log(
    cli: LayerfsCLI, chain: dict[str, str], paths: StorePaths, tmp_path: Path
) -> None:
    """A daemon that exits before it reports anything (here a ``sitecustomize`` ends every
    daemon process at start-up) gives one line pointing at the log file."""
    hook = tmp_path / "hook"
    hook.mkdir()
    (hook / "sitecustomize.py").write_text(
        "import os\n"
        "with open('/proc/self/cmdline', 'rb') as f:\n"
        "    if b'layerfs.fs.daemon' in f.read():\n"
        "        os._exit(3)\n"
    )
    logs = os.path.join(paths.runroot, "layerfs", "logs")
    os.makedirs(logs, exist_ok=True)
    log = os.path.join(logs, f"{chain['top']}.log")
    with open(log, "w") as f:
        f.write("ERROR STALE line from an earlier run\n")
    here = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    proc = subprocess.run(
        ["timeout", str(LIMIT), *cli.argv("mount", "top")],
        capture_output=True,
        env=dict(os.environ, PYTHONPATH=f"{hook}{os.pathsep}{here}"),
        check=False,
    )
    err = one_line_error(proc)
    assert "exited before the mount was ready" in err and log in err and "STALE" not in err
    assert json.loads(cli.out("ps", "--json")) == []
