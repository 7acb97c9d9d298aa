"""``layerfs completion bash``: the script is run by real bash (``complete -p``, the function
called with COMP_WORDS/COMP_CWORD set, COMPREPLY read back), layer and image names come from
the store at completion time."""

from __future__ import annotations

import json
import os
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import LayerfsCLI, StorePaths, require_tool
from image_helpers import build_oci_image, sample_steps
from layerfs.cli import build_parser
from layerfs.completion import _subparsers


@pytest.fixture
def script(cli: LayerfsCLI, tmp_path: Path) -> Path:
    path = tmp_path / "layerfs.bash"
    path.write_text(cli.out("completion", "bash"))
    return path


@pytest.fixture
def wrapper(tmp_path: Path) -> Path:
    """``layerfs`` on PATH for bash: this checkout's code through this Python."""
    bindir = tmp_path / "bin"
    bindir.mkdir()
    exe = bindir / "layerfs"
    repo = Path(__file__).resolve().parent.parent
    exe.write_text(
        f"#!/bin/sh\nPYTHONPATH={shlex.quote(str(repo))} exec {shlex.quote(sys.executable)}"
        ' -m layerfs "$@"\n'
    )
    exe.chmod(0o755)
    return exe


def complete(script: Path, words: list[str], cwd: Path | None = None) -> list[str]:
    """COMPREPLY of ``_layerfs`` for the command line *words* (the last one being completed)."""
    bash = require_tool("bash")
    arr = " ".join(shlex.quote(w) for w in words)
    code = (
        f"source {shlex.quote(str(script))}\n"
        f"COMP_WORDS=({arr}); COMP_CWORD={len(words) - 1}\n"
        '_layerfs; printf "%s\\n" "${COMPREPLY[@]}"\n'
    )
    r = subprocess.run(
        [bash, "--norc", "--noprofile", "-c", code],
        capture_output=True,
        text=True,
        cwd=cwd,
        check=True,
    )
    assert r.stderr == ""
    return [line for line in r.stdout.splitlines() if line]


def test_registered(script: Path) -> None:
    bash = require_tool("bash")
    r = subprocess.run(
        [bash, "--norc", "-c", f"source {shlex.quote(str(script))}; complete -p layerfs"],
        capture_output=True,
        text=True,
        check=True,
    )
    assert r.stdout.strip() == "complete -F _layerfs layerfs"


def test_every_subcommand_from_the_parser(script: Path) -> None:
    names = sorted(_subparsers(build_parser()).choices)
    assert complete(script, ["layerfs", ""]) == names
    assert {"images", "image", "export", "extract", "inspect", "completion", "umount"} <= set(names)
    assert complete(script, ["layerfs", "ex"]) == ["exists", "export", "extract"]
    assert complete(script, ["layerfs", "--root", "/x", "insp"]) == ["inspect"]
    assert complete(script, ["layerfs", "--ver"]) == ["--version"]


def test_flags_and_choices(script: Path, tmp_path: Path) -> None:
    assert complete(script, ["layerfs", "export", "--"]) == [
        "--help",
        "--output",
        "--compress",
    ]
    assert complete(script, ["layerfs", "export", "--compress", ""]) == [
        "none",
        "gzip",
        "zstd",
        "xz",
        "bzip2",
    ]
    assert complete(script, ["layerfs", "diff", "-c", "z"]) == ["zstd"]
    assert "--largest" in complete(script, ["layerfs", "inspect", "--l"])
    assert complete(script, ["layerfs", "completion", ""]) == ["bash", "names"]
    (tmp_path / "out.tar").write_bytes(b"")
    assert complete(script, ["layerfs", "export", "-o", "ou"], cwd=tmp_path) == ["out.tar"]
    # every flag of every subcommand is offered (the parser is the source)
    for name, sub in _subparsers(build_parser()).choices.items():
        flags = [o for a in sub._actions for o in a.option_strings if o.startswith("--")]
        assert complete(script, ["layerfs", name, "--"]) == flags, name


def test_store_names_at_completion_time(
    script: Path, wrapper: Path, cli: LayerfsCLI, paths: StorePaths
) -> None:
    layer = cli.out("create-layer", "--name", "alpha").split()[0]
    cli.run("create-layer", "--name", "beta", layer)
    store = ["--root", paths.root, "--runroot", paths.runroot]
    got = complete(script, [str(wrapper), *store, "ls", ""])
    assert set(got) >= {"alpha", "beta", layer}
    assert complete(script, [str(wrapper), *store, "mount", "--rw", "al"]) == ["alpha"]
    assert complete(script, [str(wrapper), *store, "delete-layer", "alpha", "bet"]) == ["beta"]
    # a view path (the second positional of cat) gets no store names
    assert complete(script, [str(wrapper), *store, "cat", "alpha", "al"]) == []
    # the store given on the line is the one asked: another root has none of these
    other = ["--root", paths.root + "-other", "--runroot", paths.runroot + "-other"]
    assert complete(script, [str(wrapper), *other, "ls", "al"]) == []
    assert not os.path.exists(paths.root + "-other")  # completing made no store there


def test_names_command(cli: LayerfsCLI, tmp_path: Path) -> None:
    layer = cli.out("create-layer", "--name", "n1", "--name", "n2").split()[0]
    assert cli.out("completion", "names").split() == [layer, "n1", "n2"]
    layout = build_oci_image(tmp_path, sample_steps()[:1])
    cli.run("import-image", "--name", "localhost/one:1", f"oci:{layout}:t")
    image = json.loads(cli.out("images", "--json"))[0]
    names = cli.out("completion", "names").split()
    assert {image["id"], "localhost/one:1", image["layer"]} <= set(names)
    assert len(names) == len(set(names))


def complete_line(script: Path, line: str) -> list[str]:
    """COMPREPLY for the command line *line* typed so far, as bash hands it over: COMP_LINE
    and COMP_POINT, and COMP_WORDS split at COMP_WORDBREAKS (so at ':' too)."""
    bash = require_tool("bash")
    code = (
        f"source {shlex.quote(str(script))}\n"
        f"COMP_LINE={shlex.quote(line)}; COMP_POINT=${{#COMP_LINE}}\n"
        'read -ra COMP_WORDS <<< "${COMP_LINE//:/ : }"\n'
        '[[ $COMP_LINE == *" " ]] && COMP_WORDS+=("")\n'
        "COMP_CWORD=$((${#COMP_WORDS[@]} - 1))\n"
        '_layerfs; printf "%s\\n" "${COMPREPLY[@]}"\n'
    )
    r = subprocess.run(
        [bash, "--norc", "--noprofile", "-c", code], capture_output=True, text=True, check=True
    )
    assert r.stderr == ""
    return [line for line in r.stdout.splitlines() if line]


def test_image_names_with_a_colon(
    script: Path, wrapper: Path, cli: LayerfsCLI, paths: StorePaths, tmp_path: Path
) -> None:
    """Image names carry a ':' (the tag), where bash splits words: the reply is what follows
    the last ':' and earlier arguments with a ':' count as one."""
    layout = build_oci_image(tmp_path, sample_steps()[:1])
    cli.run("import-image", "--name", "localhost/sample:1", f"oci:{layout}:t")
    cli.run("create-layer", "--name", "other")
    pre = f"{wrapper} --root {paths.root} --runroot {paths.runroot}"
    assert complete_line(script, f"{pre} ls localhost/sam") == ["localhost/sample:1"]
    assert complete_line(script, f"{pre} ls localhost/sample:") == ["1"]
    assert complete_line(script, f"{pre} export --compress z") == ["zstd"]
    # the second positional of diff is FROM (a layer): counted right after a name with ':'
    assert "other" in complete_line(script, f"{pre} diff localhost/sample:1 ")
    # the second positional of which is a view path: no names
    assert complete_line(script, f"{pre} which localhost/sample:1 ") == []
