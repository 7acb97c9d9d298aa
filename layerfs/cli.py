"""The ``layerfs`` command line: parsing, dispatch, output and exit codes.

Exit codes: 0 success, 1 an error (one line ``layerfs: …`` on stderr; a traceback only with
``--debug``), 2 a usage error. ``--json`` output uses the store's own record keys, encoded as
containers/storage encodes them.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Callable, Sequence
from typing import Any

from layerfs.errors import LayerfsError, LayerUnknownError
from layerfs.store.layers import Store
from layerfs.store.record import Layer, go_json_dumps

log = logging.getLogger("layerfs")

Handler = Callable[[Store, argparse.Namespace], int]
_COMMANDS: dict[str, Handler] = {}


def _command(name: str) -> Callable[[Handler], Handler]:
    def register(func: Handler) -> Handler:
        _COMMANDS[name] = func
        return func

    return register


def _out(text: str = "") -> None:
    sys.stdout.write(text + "\n")


def _print_json(value: Any) -> None:
    _out(go_json_dumps(value))


# --------------------------------------------------------------------- layer commands


@_command("create-layer")
def _create_layer(store: Store, args: argparse.Namespace) -> int:
    layer = store.create_layer(
        args.id,
        names=args.name,
        parent=args.parent,
        volatile=args.volatile,
        writeable=args.writeable,
    )
    _show_created(layer, args.json)
    return 0


def _show_created(layer: Layer, as_json: bool) -> None:
    if as_json:
        _print_json(layer.to_json_obj())
        return
    _out(layer.id)
    for name in layer.names:
        _out(f"\t{name}")


@_command("layers")
def _layers(store: Store, args: argparse.Namespace) -> int:
    layers = store.layers()
    if args.json:
        _print_json([la.to_json_obj() for la in layers])
    elif args.tree:
        _print_tree(layers)
    else:
        for layer in layers:
            _out(layer.id)
            for name in layer.names:
                _out(f"\tname: {name}")
    return 0


def _print_tree(layers: list[Layer]) -> None:
    children: dict[str, list[Layer]] = {}
    ids = {la.id for la in layers}
    for layer in layers:
        parent = layer.parent if layer.parent in ids else ""
        children.setdefault(parent, []).append(layer)

    def label(layer: Layer) -> str:
        return layer.id + (f" ({', '.join(layer.names)})" if layer.names else "")

    def walk(parent: str, prefix: str) -> None:
        kids = children.get(parent, [])
        for i, child in enumerate(kids):
            last = i == len(kids) - 1
            _out(prefix + ("└── " if last else "├── ") + label(child))
            walk(child.id, prefix + ("    " if last else "│   "))

    _out("(base)")
    walk("", "")


@_command("layer")
def _layer(store: Store, args: argparse.Namespace) -> int:
    rc = 0
    found: list[Layer] = []
    for ref in args.layers:
        try:
            found.append(store.get(ref))
        except LayerUnknownError as exc:
            _err(str(exc))
            rc = 1
    if args.json:
        _print_json([la.to_json_obj() for la in found])
        return rc
    for layer in found:
        _out(f"ID: {layer.id}")
        for mapping, label in ((layer.uidmap, "UID"), (layer.gidmap, "GID")):
            for m in mapping:
                _out(
                    f"{label} mapping: (container={m.get('container_id')}, "
                    f"host={m.get('host_id')}, size={m.get('size')})"
                )
        if layer.parent:
            _out(f"Parent: {layer.parent}")
        for name in layer.names:
            _out(f"Name: {name}")
        _out(f"Created: {layer.created}")
        if layer.diff_digest:
            _out(f"Diff Digest: {layer.diff_digest}")
            _out(f"Size: {layer.size()}")
        if store.is_volatile(layer.id):
            _out("Volatile: true")
    return rc


@_command("exists")
def _exists(store: Store, args: argparse.Namespace) -> int:
    results = {ref: store.exists(ref) for ref in args.layers}
    if args.json:
        _print_json(results)
    else:
        for ref, ok in results.items():
            _out(f"{ref}: {'true' if ok else 'false'}")
    return 0 if all(results.values()) else 1


@_command("delete-layer")
def _delete_layer(store: Store, args: argparse.Namespace) -> int:
    rc = 0
    for ref in args.layers:
        try:
            _out(store.delete_layer(ref))
        except LayerfsError as exc:
            _err(str(exc))
            rc = 1
    return rc


@_command("names")
def _names(store: Store, args: argparse.Namespace) -> int:
    layer = store.get(args.layer)
    if args.json:
        _print_json(layer.names)
    else:
        for name in layer.names:
            _out(name)
    return 0


def _names_changer(method: str) -> Handler:
    def run(store: Store, args: argparse.Namespace) -> int:
        layer = getattr(store, method)(args.layer, args.name)
        if args.json:
            _print_json(layer.names)
        else:
            for name in layer.names:
                _out(name)
        return 0

    return run


for _cmd, _method in (
    ("add-names", "add_names"),
    ("set-names", "set_names"),
    ("remove-names", "remove_names"),
):
    _COMMANDS[_cmd] = _names_changer(_method)


@_command("metadata")
def _metadata(store: Store, args: argparse.Namespace) -> int:
    layer = store.get(args.layer)
    if args.json:
        _print_json(layer.metadata)
    else:
        _out(layer.metadata)
    return 0


@_command("set-metadata")
def _set_metadata(store: Store, args: argparse.Namespace) -> int:
    if (args.metadata is None) == (args.file is None):
        raise LayerfsError("set-metadata needs exactly one of -m TEXT or -f FILE")
    text = args.metadata
    if args.file is not None:
        with open(args.file, encoding="utf-8") as f:
            text = f.read()
    store.set_metadata(args.layer, text)
    return 0


@_command("list-layer-data")
def _list_layer_data(store: Store, args: argparse.Namespace) -> int:
    names = store.big_data_names(args.layer)
    if args.json:
        _print_json(names)
    else:
        for name in names:
            _out(name)
    return 0


@_command("get-layer-data")
def _get_layer_data(store: Store, args: argparse.Namespace) -> int:
    data = store.get_big_data(args.layer, args.key)
    if args.file:
        with open(args.file, "wb") as f:
            f.write(data)
    else:
        sys.stdout.flush()
        sys.stdout.buffer.write(data)
        sys.stdout.buffer.flush()
    return 0


@_command("set-layer-data")
def _set_layer_data(store: Store, args: argparse.Namespace) -> int:
    if args.file and args.file != "-":
        with open(args.file, "rb") as f:
            data = f.read()
    else:
        data = sys.stdin.buffer.read()
    store.set_big_data(args.layer, args.key, data)
    return 0


@_command("wipe")
def _wipe(store: Store, args: argparse.Namespace) -> int:
    deleted = store.wipe()
    if args.json:
        _print_json(deleted)
    return 0


@_command("status")
def _status(store: Store, args: argparse.Namespace) -> int:
    pairs = store.status()
    if args.json:
        _print_json(dict(pairs))
    else:
        for key, value in pairs:
            _out(f"{key}: {value}")
    return 0


@_command("gc")
def _gc(store: Store, args: argparse.Namespace) -> int:
    removed = store.gc()
    if args.json:
        _print_json(removed)
    else:
        for path in removed:
            _out(f"removed {path}")
    return 0


# --------------------------------------------------------------------- parser


def build_parser() -> argparse.ArgumentParser:
    """The argument parser for every subcommand."""
    parser = argparse.ArgumentParser(
        prog="layerfs",
        description="A containers/storage-compatible layer store with a FUSE union view.",
    )
    parser.add_argument("--root", help="graph root (default $LAYERFS_ROOT or /var/lib/layerfs)")
    parser.add_argument("--runroot", help="run root (default $LAYERFS_RUNROOT or /run/layerfs)")
    parser.add_argument("--debug", action="store_true", help="verbose logs and tracebacks")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    def add(name: str, help_text: str, *, json_flag: bool = True) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=help_text, description=help_text)
        if json_flag:
            p.add_argument("--json", action="store_true", help="print JSON")
        return p

    p = add("create-layer", "create an empty layer (prints its id first)")
    p.add_argument("--name", "-n", action="append", default=[], help="a name (repeatable)")
    p.add_argument("--id", "-i", help="use this id instead of a random one")
    p.add_argument("--volatile", action="store_true", help="keep it in volatile-layers.json")
    p.add_argument("--writeable", "-w", action="store_true", help="meant as a container layer")
    p.add_argument("parent", nargs="?", help="parent layer (id, name or id prefix)")

    p = add("layers", "list layers")
    p.add_argument("--tree", "-t", action="store_true", help="draw the parent tree")

    p = add("layer", "show layers")
    p.add_argument("layers", nargs="+", metavar="LAYER")

    p = add("exists", "check that layers exist (exit 1 if any does not)")
    p.add_argument("layers", nargs="+", metavar="LAYER")

    p = add("delete-layer", "delete layers (refused with children, images or mounts)")
    p.add_argument("layers", nargs="+", metavar="LAYER")

    p = add("names", "print a layer's names")
    p.add_argument("layer")
    for name, verb in (
        ("add-names", "add names to"),
        ("set-names", "replace the names of"),
        ("remove-names", "remove names from"),
    ):
        p = add(name, f"{verb} a layer; names move from their current owner")
        p.add_argument("--name", "-n", action="append", default=[], required=name != "set-names")
        p.add_argument("layer")

    p = add("metadata", "print a layer's metadata")
    p.add_argument("layer")
    p = add("set-metadata", "set a layer's metadata", json_flag=False)
    p.add_argument("--metadata", "-m", help="the text")
    p.add_argument("--file", "-f", help="read the text from this file")
    p.add_argument("layer")

    p = add("list-layer-data", "list a layer's big-data keys")
    p.add_argument("layer")
    p = add("get-layer-data", "write a big-data item to stdout or a file", json_flag=False)
    p.add_argument("--file", "-f", help="write here instead of stdout")
    p.add_argument("layer")
    p.add_argument("key")
    p = add("set-layer-data", "store a big-data item from stdin or a file", json_flag=False)
    p.add_argument("--file", "-f", help="read from this file instead of stdin")
    p.add_argument("layer")
    p.add_argument("key")

    add("wipe", "delete every layer")
    add("status", "show store and driver facts")
    add("gc", "remove data that belongs to no layer record")
    return parser


def _err(message: str) -> None:
    sys.stderr.write(f"layerfs: {message}\n")


def main(argv: Sequence[str] | None = None) -> int:
    """Run the CLI; returns the exit code."""
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.debug else logging.WARNING,
        format="layerfs: %(levelname)s: %(message)s",
    )
    handler = _COMMANDS[args.command]
    try:
        store = Store(args.root, args.runroot, read_only=False)
        return handler(store, args)
    except LayerfsError as exc:
        if args.debug:
            log.exception("failed")
        _err(str(exc))
        return 1
    except OSError as exc:
        if args.debug:
            log.exception("failed")
        where = f" {exc.filename}" if exc.filename else ""
        _err(f"{exc.strerror or exc}{':' if where else ''}{where}")
        return 1
    except KeyboardInterrupt:
        return 130


__all__ = ["build_parser", "main"]
