"""The CLI's contract: exit codes, one-line errors, --help everywhere, --json output."""

from __future__ import annotations

import json
import os

import pytest

from conftest import LayerfsCLI
from layerfs.cli import build_parser


def _subcommands() -> list[str]:
    parser = build_parser()
    action = next(a for a in parser._actions if a.dest == "command")
    return sorted(action.choices)  # type: ignore[arg-type]


@pytest.mark.parametrize("command", _subcommands())
def test_every_command_has_help(cli: LayerfsCLI, command: str) -> None:
    proc = cli.run(command, "--help")
    assert proc.returncode == 0 and b"usage: layerfs" in proc.stdout


def test_usage_errors_exit_2(cli: LayerfsCLI) -> None:
    assert cli.run("no-such-command", check=False).returncode == 2
    assert cli.run("layer", check=False).returncode == 2
    assert cli.run("layers", "--bogus", check=False).returncode == 2


def test_errors_are_one_line_and_exit_1(cli: LayerfsCLI) -> None:
    proc = cli.run("layer", "abc", check=False)
    assert proc.returncode == 1
    assert proc.stderr.decode() == 'layerfs: layer "abc" not known\n'
    cli.run("create-layer", "--name", "p")
    cli.run("create-layer", "p")
    proc = cli.run("delete-layer", "p", check=False)
    assert proc.returncode == 1
    lines = proc.stderr.decode().splitlines()
    assert len(lines) == 1 and "layer has children" in lines[0]


def test_corrupt_store_error_names_the_file(cli: LayerfsCLI) -> None:
    cli.run("create-layer")
    with open(cli.paths.root + "/overlay-layers/layers.json", "wb") as f:
        f.write(b"[{")
    proc = cli.run("layers", check=False)
    assert proc.returncode == 1
    err = proc.stderr.decode()
    assert err.count("\n") == 1 and "layers.json" in err and "Traceback" not in err
    debug = cli.run("--debug", "layers", check=False)
    assert b"Traceback" in debug.stderr


def test_create_prints_id_first_and_json_uses_store_keys(cli: LayerfsCLI) -> None:
    out = cli.out("create-layer", "--name", "a", "--name", "b").splitlines()
    assert len(out[0]) == 64 and out[1:] == ["\ta", "\tb"]
    record = json.loads(cli.out("create-layer", "--json", "--id", "given", out[0]))
    assert record["id"] == "given" and record["parent"] == out[0] and "created" in record
    listing = json.loads(cli.out("layers", "--json"))
    assert [r["id"] for r in listing] == [out[0], "given"]
    assert cli.out("layers", "--tree").splitlines()[0] == "(base)"
    assert cli.out("layer", "given").splitlines()[0] == "ID: given"


def test_layer_data_and_metadata_commands(cli: LayerfsCLI, tmp_path: os.PathLike[str]) -> None:
    cli.run("create-layer", "--name", "x")
    cli.run("set-layer-data", "x", "Key", input=b"\x00binary\xff")
    assert cli.run("get-layer-data", "x", "Key").stdout == b"\x00binary\xff"
    assert cli.out("list-layer-data", "x") == "Key\n"
    cli.run("set-metadata", "-m", "hello", "x")
    assert cli.out("metadata", "x") == "hello\n"
    assert cli.out("set-names", "--name", "y", "x") == "y\n"
    assert cli.out("exists", "y") == "y: true\n"
    assert cli.run("exists", "x", check=False).returncode == 1
    status = json.loads(cli.out("status", "--json"))
    assert status["Driver"] == "overlay" and status["Layers"] == "1"


def test_os_errors_name_their_path_as_text() -> None:
    from layerfs.errors import describe_os_error

    err = OSError(13, "Permission denied", b"/store/diff/caf\xc3\xa9\xff")
    text = describe_os_error(err)
    assert text == "/store/diff/café" + os.fsdecode(b"\xff") + ": Permission denied"
    assert "b'" not in text
    assert describe_os_error(OSError(5, "Input/output error")) == "Input/output error"
