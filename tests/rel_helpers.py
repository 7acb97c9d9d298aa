"""Helpers for the reliability suite (tests/test_rel_*.py).

Counts scale with ``LAYERFS_STRESS`` (unset or 0: the short CI version; 1: the long one run
by ``scripts/stress``; any larger integer multiplies the stress counts). Each test reports
its figures (trials, failures, operations, seconds) as a JSON line appended to the file named
by ``LAYERFS_REL_REPORT``; ``scripts/stress`` prints them as a table.
"""

from __future__ import annotations

import io
import json
import os
import subprocess
import tarfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

from conftest import make_tar as make_tar  # re-exported: one tar builder for every suite
from conftest import process_gone, wait_until

STRESS = int(os.environ.get("LAYERFS_STRESS", "0") or "0")


def scaled(ci: int, stress: int, env: str | None = None) -> int:
    """``ci`` normally; ``stress`` (times LAYERFS_STRESS) under scripts/stress; the variable
    ``env``, when set, overrides both (scripts/stress --crash-trials and friends)."""
    if env and os.environ.get(env):
        return int(os.environ[env])
    if STRESS <= 0:
        return ci
    return stress * STRESS


@dataclass
class Figures:
    """Figures of one reliability test, written to LAYERFS_REL_REPORT at the end."""

    kind: str
    trials: int = 0
    failures: int = 0
    ops: int = 0
    notes: dict[str, object] = field(default_factory=dict)
    started: float = field(default_factory=time.monotonic)

    def write(self) -> None:
        path = os.environ.get("LAYERFS_REL_REPORT")
        if not path:
            return
        line = {
            "kind": self.kind,
            "trials": self.trials,
            "failures": self.failures,
            "ops": self.ops,
            "seconds": round(time.monotonic() - self.started, 1),
            **self.notes,
        }
        with open(path, "a") as f:
            f.write(json.dumps(line) + "\n")


@contextmanager
def figures(kind: str) -> Iterator[Figures]:
    """Collect figures; written even when the test fails (failures counted as 1 at least)."""
    fig = Figures(kind)
    try:
        yield fig
    except BaseException:
        fig.failures = max(fig.failures, 1)
        fig.write()
        raise
    fig.write()


# ------------------------------------------------------------------------------ tars


def tar_of_tree(top: str, arcname: str, limit: int) -> bytes:
    """A tar of up to ``limit`` regular files and their directories below ``top``."""
    buf = io.BytesIO()
    count = 0
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tf:
        for dirpath, dirnames, filenames in os.walk(top):
            dirnames.sort()
            rel = os.path.relpath(dirpath, top)
            base = arcname if rel == "." else f"{arcname}/{rel}"
            tf.add(dirpath, base, recursive=False)
            for name in sorted(filenames):
                path = os.path.join(dirpath, name)
                if not os.path.isfile(path) or os.path.islink(path):
                    continue
                tf.add(path, f"{base}/{name}", recursive=False)
                count += 1
                if count >= limit:
                    return _close(tf, buf)
    return buf.getvalue()


def _close(tf: tarfile.TarFile, buf: io.BytesIO) -> bytes:
    tf.close()
    return buf.getvalue()


# ------------------------------------------------------------------------------ mounts, pids


def mounts_below(top: str, fstype_prefix: str = "") -> list[str]:
    """Mount points at or below ``top`` (optionally only of a file-system type prefix)."""
    out = []
    with open("/proc/self/mounts") as f:
        for line in f:
            fields = line.split()
            point = fields[1].replace("\\040", " ")
            if (point == top or point.startswith(top + "/")) and fields[2].startswith(
                fstype_prefix
            ):
                out.append(point)
    return out


def daemon_pids(needle: str) -> list[int]:
    """PIDs of layerfs daemons whose command line contains ``needle`` (for leak checks)."""
    proc = subprocess.run(
        ["pgrep", "-f", f"layerfs.fs.daemon {needle}"], capture_output=True, text=True
    )
    return [int(p) for p in proc.stdout.split()]


def wait_gone(pid: int, timeout: float = 10.0) -> bool:
    """Wait until every thread of ``pid`` has exited (gone or a zombie); True if it did,
    False after ``timeout`` seconds (callers decide whether that is a failure)."""
    try:
        wait_until(lambda: process_gone(pid), f"process {pid} has exited", timeout)
    except AssertionError:
        return False
    return True


def rss_kib(pid: int) -> int:
    """VmRSS of a process in KiB."""
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise AssertionError(f"no VmRSS for {pid}")


def tree_snapshot(top: str) -> dict[str, tuple[int, int, int]]:
    """(mode, size, mtime_ns) of everything below ``top``, for "nothing changed" checks."""
    out = {}
    for dirpath, dirnames, filenames in os.walk(top):
        for name in dirnames + filenames:
            p = os.path.join(dirpath, name)
            st = os.lstat(p)
            out[os.path.relpath(p, top)] = (st.st_mode, st.st_size, st.st_mtime_ns)
    return out


# ------------------------------------------------------------------------------ raw tar blocks


def raw_header(
    name: bytes,
    typeflag: bytes = b"0",
    size: int = 0,
    link: bytes = b"",
    *,
    mode: int = 0o644,
    size_field: bytes | None = None,
    checksum_ok: bool = True,
) -> bytes:
    """One ustar header block built by hand (for names and fields tarfile refuses)."""
    blk = bytearray(512)
    blk[0 : min(len(name), 100)] = name[:100]
    blk[100:108] = b"%07o\0" % mode
    blk[108:116] = b"0000000\0"
    blk[116:124] = b"0000000\0"
    blk[124:136] = size_field if size_field is not None else b"%011o\0" % size
    blk[136:148] = b"14000000000\0"
    blk[156:157] = typeflag
    blk[157 : 157 + min(len(link), 100)] = link[:100]
    blk[257:265] = b"ustar\x0000"
    blk[148:156] = b"        "
    total = sum(blk) + (0 if checksum_ok else 1)
    blk[148:156] = b"%06o\0 " % total
    return bytes(blk)


def raw_entry(name: bytes, data: bytes = b"", typeflag: bytes = b"0", link: bytes = b"") -> bytes:
    """Header plus content padded to a block."""
    return raw_header(name, typeflag, len(data), link) + data + bytes(-len(data) % 512)


def pax_entry(records: dict[bytes, bytes], then: bytes) -> bytes:
    """A PAX extended header with ``records``, followed by the entry ``then``."""
    body = b""
    for key, value in records.items():
        rest = b" " + key + b"=" + value + b"\n"
        n = len(rest) + 1
        while len(str(n).encode()) + len(rest) != n:
            n += 1
        body += str(n).encode() + rest
    return raw_entry(b"PaxHeaders/x", body, b"x") + then
