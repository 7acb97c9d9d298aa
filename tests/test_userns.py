"""layerfs.userns: id maps parsed as the kernel keeps them, and the namespaces seen from a
real unprivileged user (the ``rootless_user`` fixture) and from its user namespace."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from rootless_helpers import RootlessUser, rootless_user  # noqa: F401  (fixture)

from layerfs import userns


def test_parse_and_translate() -> None:
    m = userns.IdMap.parse("         0       1001          1\n         1     300000      65536\n")
    assert not m.is_identity()
    assert m.to_outside(0) == 1001
    assert m.to_outside(1) == 300000
    assert m.to_outside(65536) == 365535
    assert m.to_outside(65537) is None
    assert m.to_inside(1001) == 0
    assert m.to_inside(300005) == 6
    assert m.to_inside(0) is None
    assert userns.IdMap.parse(m.render()) == m
    assert m.key() != userns.IdMap.identity().key()


@pytest.mark.parametrize(
    "text",
    ["0 0\n", "0 x 1\n", "0 0 0\n", "0 100 10\n5 200 10\n", "0 100 10\n20 105 10\n"],
)
def test_parse_refuses_garbled_or_overlapping(text: str) -> None:
    with pytest.raises(ValueError):
        userns.IdMap.parse(text)


def test_initial_namespace_is_identity() -> None:
    if os.geteuid() == 0 and not userns.in_user_namespace():
        assert userns.read_id_map("uid").is_identity()
        assert userns.read_id_map("gid").is_identity()
        assert not userns.is_rootless() or os.environ.get(userns.ROOTLESS_UID_ENV)
    assert userns.namespace_id("mnt", os.getpid()) == userns.namespace_id("mnt")
    assert userns.namespace_id("mnt", 2**22 + 12345) is None


def test_plain_user_and_its_namespace(rootless_user: RootlessUser) -> None:  # noqa: F811
    probe = (
        "from layerfs import userns; import os; "
        "print(userns.is_rootless(), userns.in_user_namespace(), userns.host_uid(), os.geteuid())"
    )
    out = rootless_user.run(["python", "-c", probe], check=True).stdout.split()
    assert out == ["True", "False", str(rootless_user.uid), str(rootless_user.uid)]
    # podman's own namespace: the user's uid is 0 inside, the subordinate range follows.
    inside = rootless_user.run(["podman", "unshare", "python", "-c", probe], check=True)
    assert inside.stdout.split() == ["True", "True", str(rootless_user.uid), "0"]
    maps = rootless_user.run(["podman", "unshare", "cat", "/proc/self/uid_map"], check=True)
    parsed = userns.IdMap.parse(maps.stdout)
    assert parsed.to_outside(0) == rootless_user.uid
    assert parsed.to_outside(1) == rootless_user.sub_start


def test_subid_ranges_and_podmans_map(tmp_path: Path) -> None:
    sub = tmp_path / "subuid"
    sub.write_text(
        "# comment\nalice:100000:65536\nbob:200000:10\n1000:300000:5\nalice:x:1\nalice:9:0\n"
    )
    ranges = userns.subid_ranges("uid", "alice", 1000, str(sub))
    assert ranges == [(100000, 65536), (300000, 5)]
    assert userns.subid_ranges("uid", "carol", 1001, str(sub)) == []
    assert userns.subid_ranges("uid", "alice", 1000, str(tmp_path / "missing")) == []
    m = userns.rootless_map(1000, ranges)
    assert m.render() == "0 1000 1\n1 100000 65536\n65537 300000 5\n"
    assert m.to_outside(65537) == 300000


def test_partial_identity_map_is_a_user_namespace() -> None:
    """``unshare -r`` as root maps 0 to 0 and nothing else: no id changes, but it is a user
    namespace (trusted.* refused, other ids unmapped), so layerfs must treat it as one."""
    assert not userns.IdMap.parse("0 0 1\n").is_identity()
    assert userns.IdMap.parse("0 0 4294967295\n").is_identity()
    code = "from layerfs import userns; print(userns.in_user_namespace(), userns.is_rootless())"
    r = subprocess.run(
        ["unshare", "-Ur", sys.executable, "-c", code], capture_output=True, text=True, check=True
    )
    assert r.stdout.split() == ["True", "True"]
