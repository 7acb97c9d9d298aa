"""The ``layerfs`` command line: parsing, dispatch, output and exit codes.

Exit codes: 0 success, 1 an error (one line ``layerfs: …`` on stderr; a traceback only with
``--debug``), 2 a usage error. ``--json`` output uses the store's own record keys, encoded as
containers/storage encodes them.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import stat
import sys
import tempfile
from collections.abc import Callable, Iterator, Sequence
from typing import Any, BinaryIO

from layerfs.errors import AmbiguousLayerError, LayerfsError, LayerUnknownError, describe_os_error
from layerfs.store.layers import Store, default_root
from layerfs.store.record import Layer, go_json_dumps

log = logging.getLogger("layerfs")

Handler = Callable[[Store, argparse.Namespace], int]
_COMMANDS: dict[str, Handler] = {}


def _command(name: str) -> Callable[[Handler], Handler]:
    def register(func: Handler) -> Handler:
        _COMMANDS[name] = func
        return func

    return register


def byte_progress(
    label: str, total: int | None, *, enabled: bool
) -> contextlib.AbstractContextManager[Callable[[int, int], None] | None]:
    """A progress callback for long transfers (rich is imported only when needed)."""
    from layerfs.progress import byte_progress as make

    return make(label, total, enabled=enabled)


def _out(text: str = "") -> None:
    sys.stdout.write(text + "\n")


def _print_json(value: Any) -> None:
    _out(go_json_dumps(value))


def _print_lines(items: Sequence[str], as_json: bool) -> None:
    """One item a line, or a JSON array."""
    if as_json:
        _print_json(list(items))
    else:
        for item in items:
            _out(item)


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
    if args.json:
        sys.stdout.flush()
        sys.stdout.buffer.write(store.layers_json() + b"\n")
        return 0
    layers = store.layers()
    if args.tree:
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


#: Read-only layer commands that also take an image (its top layer), as TARGET commands do.
_IMAGE_AWARE = frozenset(
    [
        "layer",
        "names",
        "metadata",
        "list-layer-data",
        "get-layer-data",
        "diff",
        "changes",
        "diffsize",
    ]
)


def _top_layer_if_image(store: Store, ref: str) -> str:
    """*ref* itself when it names a layer (or is an ambiguous layer prefix: the command
    reports that); else the top layer of the image it names; else *ref* (the command's
    own error names it)."""
    try:
        store.get(ref)
    except AmbiguousLayerError:
        return ref
    except LayerUnknownError:
        return store.images.top_layer_of(ref) or ref
    return ref


def _images_to_top_layers(store: Store, args: argparse.Namespace) -> None:
    for attr in ("layer", "layers", "from_layer"):
        value = getattr(args, attr, None)
        if isinstance(value, str):
            setattr(args, attr, _top_layer_if_image(store, value))
        elif isinstance(value, list):
            setattr(args, attr, [_top_layer_if_image(store, v) for v in value])


@_command("exists")
def _exists(store: Store, args: argparse.Namespace) -> int:
    # a layer or an image (Go's exists checks both, and containers)
    results = {
        ref: store.exists(ref) or store.images.top_layer_of(ref) is not None for ref in args.layers
    }
    if args.json:
        _print_json(results)
    else:
        for ref, ok in results.items():
            _out(f"{ref}: {'true' if ok else 'false'}")
    return 0 if all(results.values()) else 1


@_command("delete-layer")
def _delete_layer(store: Store, args: argparse.Namespace) -> int:
    from layerfs.fs.manager import MountManager

    rc = 0
    for ref in args.layers:
        try:
            MountManager(store).repair(ref)  # a dead daemon's mount must not block the delete
            _out(store.delete_layer(ref))
        except LayerfsError as exc:
            _err(str(exc))
            rc = 1
    return rc


@_command("names")
def _names(store: Store, args: argparse.Namespace) -> int:
    layer = store.get(args.layer)
    _print_lines(layer.names, args.json)
    return 0


def _names_changer(method: str) -> Handler:
    def run(store: Store, args: argparse.Namespace) -> int:
        layer = getattr(store, method)(args.layer, args.name)
        _print_lines(layer.names, args.json)
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
    _print_lines(names, args.json)
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


# --------------------------------------------------------------------- images


def _image_facts(store: Store, record: dict[str, Any]) -> dict[str, Any]:
    """What ``images``/``image`` show of an image record (size as Go's ``ImageSize``)."""
    from layerfs.store.images import image_size

    def layer(layer_id: str) -> tuple[int, str] | None:
        try:
            la = store.get(layer_id)
        except LayerUnknownError:
            return None
        return max(la.size(), 0), la.parent

    return {
        "id": str(record.get("id", "")),
        "names": list(record.get("names") or []),
        "layer": str(record.get("layer") or ""),
        "digest": str(record.get("digest") or ""),
        "size": image_size(record, layer),
        "created": str(record.get("created") or ""),
        "data": list(record.get("big-data-names") or []),
    }


@_command("images")
def _images(store: Store, args: argparse.Namespace) -> int:
    if args.json:
        sys.stdout.flush()
        sys.stdout.buffer.write(store.images.json_bytes() + b"\n")
        return 0
    images = store.images.load()  # before the header: a damaged file prints one line only
    _out(f"{'IMAGE ID':<14}{'NAMES':<34}{'TOP LAYER':<14}{'DIGEST':<21}{'SIZE':>12}  CREATED")
    for record in images:
        f = _image_facts(store, record)
        names = ",".join(f["names"]) or "-"
        digest = f["digest"][:19] or "-"  # the algorithm and 12 hex digits
        _out(
            f"{f['id'][:12]:<14}{names:<34}{f['layer'][:12]:<14}{digest:<21}{f['size']:>12}"
            f"  {f['created']}"
        )
    return 0


@_command("image")
def _image(store: Store, args: argparse.Namespace) -> int:
    from layerfs.store.images import ImageUnknownError, find_image

    rc = 0
    images = store.images.load()
    found: list[dict[str, Any]] = []
    for ref in args.images:
        try:
            found.append(find_image(images, ref))
        except ImageUnknownError as exc:
            _err(str(exc))
            rc = 1
    if args.json:
        sys.stdout.flush()
        sys.stdout.buffer.write(store.images.json_bytes(found) + b"\n")
        return rc
    for record in found:
        f = _image_facts(store, record)
        _out(f"ID: {f['id']}")
        for name in f["names"]:
            _out(f"Name: {name}")
        _out(f"Top Layer: {f['layer']}")
        if f["digest"]:
            _out(f"Digest: {f['digest']}")
        for key in f["data"]:
            _out(f"Data: {key}")
        _out(f"Size: {f['size']}")
        _out(f"Created: {f['created']}")
    return rc


# --------------------------------------------------------------------- contents


@contextlib.contextmanager
def _input_stream(path: str | None) -> Iterator[BinaryIO]:
    if path is None or path == "-":
        yield sys.stdin.buffer
        return
    with open(path, "rb") as f:
        yield f


def _input_size(path: str | None) -> int | None:
    if path is None or path == "-":
        return None
    return os.path.getsize(path)


@_command("import-layer")
def _import_layer(store: Store, args: argparse.Namespace) -> int:
    from layerfs.archive.transfer import import_layer

    with (
        _input_stream(args.file) as stream,
        byte_progress("import", _input_size(args.file), enabled=not args.json) as progress,
    ):
        layer = import_layer(
            store, stream, layer_id=args.id, names=args.name, parent=args.parent, progress=progress
        )
    _show_created(layer, args.json)
    return 0


@_command("applydiff")
def _applydiff(store: Store, args: argparse.Namespace) -> int:
    from layerfs.archive.transfer import apply_diff

    with (
        _input_stream(args.file) as stream,
        byte_progress("applydiff", _input_size(args.file), enabled=not args.json) as progress,
    ):
        layer = apply_diff(store, args.layer, stream, progress=progress)
    if args.json:
        _print_json(layer.to_json_obj())
    return 0


@_command("diff")
def _diff(store: Store, args: argparse.Namespace) -> int:
    from layerfs.archive.compression import Compression
    from layerfs.archive.transfer import export_diff

    chosen = None if args.compress is None else Compression[args.compress.upper()]

    def write(out: BinaryIO) -> None:
        export_diff(store, args.layer, out, from_ref=args.from_layer, compression=chosen)

    _write_output(args.output, write)
    return 0


def _write_output(output: str | None, write: Callable[[BinaryIO], None]) -> None:
    """Run *write* on the output of a tar-writing command: stdout for None or ``-`` (never a
    terminal), a device, FIFO or socket in place, else a temp file beside *output* renamed
    over it when complete (a failure, ENOSPC included, leaves no partial file)."""
    if output and output != "-" and _is_special_output(output):
        # a device, FIFO or socket: written in place (a temp file and a rename would put a
        # regular file into /dev, or replace the FIFO its reader waits on)
        fd = os.open(output, os.O_WRONLY | os.O_CLOEXEC)
        with open(fd, "wb") as out:
            write(out)
        return
    if output and output != "-":
        directory = os.path.dirname(os.path.abspath(output))
        # a new name made with O_EXCL: a fixed temp name in a directory others can write
        # (/tmp) could be a planted symlink that the open would follow
        fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(output)}.", dir=directory)
        try:
            umask = os.umask(0)
            os.umask(umask)
            os.fchmod(fd, 0o666 & ~umask)  # the mode a plain open would give
            with open(fd, "wb") as out:
                write(out)
                out.flush()
                os.fsync(out.fileno())
            os.replace(tmp, output)
        finally:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
        return
    if sys.stdout.isatty():
        raise LayerfsError("refusing to write a tar stream to a terminal; use --output FILE")
    sys.stdout.flush()
    write(sys.stdout.buffer)
    sys.stdout.buffer.flush()


def _is_special_output(path: str) -> bool:
    """True when ``path`` exists and is not a regular file (after symlinks)."""
    try:
        mode = os.stat(path).st_mode
    except FileNotFoundError:
        return False
    return not stat.S_ISREG(mode) and not stat.S_ISDIR(mode)


@_command("changes")
def _changes(store: Store, args: argparse.Namespace) -> int:
    from layerfs.archive.transfer import layer_changes

    found = layer_changes(store, args.layer, args.from_layer)
    if args.json:
        _print_json([{"Path": c.path, "Kind": c.kind} for c in found])
    else:
        names = {0: "Modify", 1: "Add", 2: "Delete"}
        for change in found:
            _out(f'{names.get(change.kind, change.kind)} "{change.path}"')
    return 0


@_command("diffsize")
def _diffsize(store: Store, args: argparse.Namespace) -> int:
    from layerfs.archive.transfer import layer_diff_size

    _out(str(layer_diff_size(store, args.layer, args.from_layer)))
    return 0


@_command("import-image")
def _import_image(store: Store, args: argparse.Namespace) -> int:
    from layerfs.archive.image import import_image

    def report(layer_id: str, reused: bool) -> None:
        if not args.json:
            _out(layer_id)

    with byte_progress("import", None, enabled=not args.json) as progress:
        result = import_image(
            store, args.source, name=args.name, progress=progress, on_layer=report
        )
    if args.json:
        _print_json({"image": result.image_id, "layers": result.layer_ids, "reused": result.reused})
    return 0


# --------------------------------------------------------------------- views


@_command("mount")
def _mount(store: Store, args: argparse.Namespace) -> int:
    from layerfs.fs.manager import MountManager

    manager = MountManager(store)
    if args.foreground:
        return _mount_foreground(store, manager, args)
    layer_id, path, count = manager.mount(
        args.target,
        args.mountpoint,
        allow_other=args.allow_other,
        for_container=args.for_container,
        debug=args.debug,
        read_write=args.read_write,
        id_options=_id_options(args),
    )
    if args.json:
        _print_json({"id": layer_id, "mountpoint": path, "count": count})
    else:
        _out(path)
    if getattr(args, "entered_userns", False):
        _err("the view is in the rootless user namespace: see it through layerfs unshare")
    return 0


def _id_options(args: argparse.Namespace) -> list[str]:
    """``mount``'s id mapping flags as fuse-overlayfs options (:mod:`layerfs.fs.idmap`)."""
    opts = [f"uidmapping={m}" for m in args.uidmapping or ()]
    opts += [f"gidmapping={m}" for m in args.gidmapping or ()]
    opts += ["squash_to_root"] if args.squash_to_root else []
    opts += [f"squash_to_uid={args.squash_to_uid}"] if args.squash_to_uid is not None else []
    opts += [f"squash_to_gid={args.squash_to_gid}"] if args.squash_to_gid is not None else []
    return opts


def _mount_foreground(store: Store, manager: Any, args: argparse.Namespace) -> int:
    """Run the daemon in this terminal with logs on stderr (not recorded in the counts)."""
    from layerfs.fs import daemon

    layer_id = manager.resolve(args.target)
    plan = manager.plan(layer_id, args.read_write)
    lowers = [store.diff_dir(i) for i in plan.lowers]
    path = os.path.abspath(args.mountpoint or store.merged_dir(layer_id))
    manager._check_mountpoint(path, lowers + ([plan.upper] if plan.upper else []))
    manager._make_dir(path, created_parents=args.mountpoint is None)
    argv = [path, *lowers, "--foreground"]
    for lower_id in plan.lowers:
        argv += ["--layer-id", lower_id]
    if plan.upper is not None and plan.work is not None:
        argv += ["--upper", plan.upper, "--work", plan.work]
    argv += ["--whiteout-format", store.whiteout_format()]
    if args.allow_other:
        argv.append("--allow-other")
    if args.for_container:
        argv.append("--for-container")
    if args.debug:
        argv.append("--debug")
    for opt in _id_options(args):
        argv += ["--id-option", opt]
    return daemon.main(argv)


@_command("unmount")
def _unmount(store: Store, args: argparse.Namespace) -> int:
    from layerfs.fs.manager import MountManager

    layer_id, count = MountManager(store).unmount(args.target, force=args.force)
    if args.json:
        _print_json({"id": layer_id, "count": count})
    elif count == 0:
        _out(f"{args.target} mountpoint unmounted")
    else:
        _out(f"{args.target} still mounted ({count})")
    return 0


@_command("mounted")
def _mounted(store: Store, args: argparse.Namespace) -> int:
    from layerfs.fs.manager import MountManager

    count = MountManager(store).mounted(args.target)
    if args.json:
        _print_json({"target": args.target, "count": count})
    else:
        _out(str(count))
    return 0


@_command("ps")
def _ps(store: Store, args: argparse.Namespace) -> int:
    from layerfs.fs.manager import MountManager

    views = MountManager(store).ps()
    if args.json:
        _print_json(
            [
                {
                    "id": v.layer_id,
                    "names": list(v.names),
                    "mountpoint": v.path,
                    "count": v.count,
                    "pid": v.pid,
                    "state": v.state,
                    "read_write": v.read_write,
                }
                for v in views
            ]
        )
        return 0
    _out(f"{'LAYER':<14}{'NAMES':<24}{'COUNT':>6} {'PID':>8}  {'STATE':<10}MOUNTPOINT")
    for v in views:
        names = ",".join(v.names) or "-"
        _out(
            f"{v.layer_id[:12]:<14}{names[:23]:<24}{v.count:>6} {v.pid or '-':>8}  "
            f"{v.state:<10}{v.path}"
        )
    return 0


def _open_view(store: Store, target: str) -> tuple[Any, list[str]]:
    from layerfs.fs.manager import MountManager

    layer_id = MountManager(store).resolve(target)
    chain = store.chain(layer_id)
    return _chain_index(store, chain), [la.id for la in chain]


def _chain_index(store: Store, chain: list[Layer]) -> Any:
    from layerfs.fs.index import chain_pins, open_index

    diff_dirs = [store.diff_dir(la.id) for la in chain]
    index, _ = open_index(
        diff_dirs, chain_pins(store, chain), whiteout_format=store.whiteout_format()
    )
    return index


@contextlib.contextmanager
def _reading_view(store: Store, target: str) -> Iterator[tuple[Any, list[str]]]:
    """The view of *target* (layer or image) and its layer ids (top first), with
    ``layers.lock`` held shared for the block: no layer of the chain is deleted or changed
    while the block reads it."""
    from layerfs.fs.manager import MountManager

    layer_id = MountManager(store).resolve(target)
    with store.reading_layer(layer_id) as contents:
        yield _chain_index(store, contents.chain), [la.id for la in contents.chain]


@_command("export")
def _export(store: Store, args: argparse.Namespace) -> int:
    from layerfs.archive.compression import Compression, open_compressor
    from layerfs.archive.flatten import write_view_tar

    chosen = Compression[args.compress.upper()]

    def write(out: BinaryIO) -> None:
        with _reading_view(store, args.target) as (index, _):
            sink = open_compressor(out, chosen)
            stats = write_view_tar(sink, index)
            if sink is not out:
                sink.close()
        if stats.sockets_skipped:
            log.warning("%d socket(s) left out (a tar cannot hold sockets)", stats.sockets_skipped)

    _write_output(args.output, write)
    return 0


@_command("inspect")
def _inspect(store: Store, args: argparse.Namespace) -> int:
    from layerfs.fs.index.inspect import inspect_chain, report_json, report_text

    with _reading_view(store, args.target) as (index, ids):
        report = inspect_chain(index, ids, largest=args.largest)
    if args.json:
        _print_json(report_json(report))
    else:
        _out(report_text(report, args.target))
    return 0


def _completion(args: argparse.Namespace) -> int:
    """``completion``: run without making a store (a root typed wrongly on the command line
    being completed must not become a new store); ``names`` reads an existing one only."""
    from layerfs import completion
    from layerfs.store.layers import default_root

    if args.what == "bash":
        _out(completion.bash_script(build_parser()).rstrip("\n"))
        return 0
    root = os.path.abspath(args.root or default_root())
    if os.path.isdir(os.path.join(root, "overlay-layers")):
        store = Store(args.root, args.runroot, read_only=True)
        _print_lines(completion.store_names(store), args.json)
    return 0


@_command("extract")
def _extract(store: Store, args: argparse.Namespace) -> int:
    from layerfs.archive.flatten import extract_path

    with _reading_view(store, args.target) as (index, _):
        stats = extract_path(index, args.path, args.dest)
    if args.json:
        _print_json({"entries": stats.entries, "bytes": stats.bytes})
    return 0


@_command("which")
def _which(store: Store, args: argparse.Namespace) -> int:
    import errno

    from layerfs.fs.viewpath import ViewPathError, resolve_parent

    index, ids = _open_view(store, args.target)
    # Directories on the way are resolved in the view (following symbolic links, confined to
    # it); the last component is explained as it is, a link included (like ls -ld).
    followed = False
    try:
        parent, name = resolve_parent(index, args.path)
    except ViewPathError as e:
        if e.errno != errno.ENOENT:
            raise
        path = args.path  # a directory on the way is not in the view: explain it as given
    else:
        followed = parent.followed
        path = parent.path.rstrip("/") + "/" + os.fsdecode(name) if name else parent.path
    info = index.which(path)

    def layer(i: int | None) -> str | None:
        return None if i is None else ids[i]

    result = {
        "path": info.path,
        "requested": args.path,
        "followed_symlinks": followed,
        "visible": info.visible,
        "layer": layer(info.layer),
        "kind": info.kind,
        "merged": [ids[i] for i in info.merged],
        "shadowed": [ids[i] for i in info.shadowed],
        "whiteout": layer(info.whiteout_layer),
    }
    if args.json:
        _print_json(result)
        return 0 if info.visible else 1
    if info.visible:
        _out(f"{info.path}: {info.kind} from layer {result['layer']}")
    elif info.whiteout_layer is not None:
        _out(f"{info.path}: deleted (whiteout) in layer {result['whiteout']}")
    else:
        _out(f"{info.path}: not in the view")
    if followed:
        _out(f"  resolved from {args.path} (symbolic links followed)")
    if info.visible:
        for other in result["merged"]:
            if other != result["layer"]:
                _out(f"  merged with directory in {other}")
        for other in result["shadowed"]:
            _out(f"  shadows {other}")
        return 0
    if info.whiteout_layer is not None:
        for other in result["shadowed"]:
            _out(f"  hides {other}")
    return 1


@_command("ls")
def _ls(store: Store, args: argparse.Namespace) -> int:
    import stat as st

    from layerfs.fs.viewpath import resolve

    index, ids = _open_view(store, args.target)
    # resolved in the view, following links on the way; a link itself is shown (ls -ld),
    # unless the path ends in "/"
    ino = resolve(index, args.path, follow_last=False).ino
    entries = index.children(ino) if index.is_dir(ino) else [(os.fsencode(args.path), ino)]
    rows = []
    for name, child in entries:
        a = index.attr(child)
        rows.append(
            {
                "name": os.fsdecode(name),
                "mode": st.filemode(a.mode),
                "uid": a.uid,
                "gid": a.gid,
                "size": a.size,
                "mtime_ns": a.mtime_ns,
                "layer": ids[index.layer_index(child)],
                "target": os.fsdecode(index.readlink(child)) if st.S_ISLNK(a.mode) else None,
            }
        )
    if args.json:
        _print_json(rows)
        return 0
    for r in rows:
        link = f" -> {r['target']}" if r["target"] is not None else ""
        _out(
            f"{r['mode']} {r['uid']:>5} {r['gid']:>5} {r['size']:>10} "
            f"{r['layer'][:12]}  {r['name']}{link}"
        )
    return 0


@_command("cat")
def _cat(store: Store, args: argparse.Namespace) -> int:
    import stat as st

    from layerfs.fs.backing import BackingOpener
    from layerfs.fs.viewpath import resolve

    index, _ = _open_view(store, args.target)
    ino = resolve(index, args.path, follow_last=True).ino  # confined to the view
    if not st.S_ISREG(index.attr(ino).mode):
        raise LayerfsError(f"{args.path}: not a regular file")
    sys.stdout.flush()
    layer, rel = index.backing_in_layer(ino)
    fd = BackingOpener(index.diff_dirs).open(layer, rel)  # never a symlink on the way
    assert fd is not None
    with open(fd, "rb") as f:
        while chunk := f.read(1 << 20):
            sys.stdout.buffer.write(chunk)
    sys.stdout.buffer.flush()
    return 0


# --------------------------------------------------------------------- parser


class _VersionAction(argparse.Action):
    """``--version``: computed only when asked (it imports pyfuse3)."""

    def __init__(self, option_strings: Sequence[str], dest: str, **kw: Any) -> None:
        super().__init__(option_strings, dest, nargs=0, default=argparse.SUPPRESS, **kw)

    def __call__(self, parser: argparse.ArgumentParser, *_: Any) -> None:
        from layerfs.version import version_text

        _out(version_text())
        parser.exit()


def build_parser() -> argparse.ArgumentParser:
    """The argument parser for every subcommand."""
    parser = argparse.ArgumentParser(
        prog="layerfs",
        description="A containers/storage-compatible layer store with a FUSE union view.",
    )
    parser.add_argument("--root", help="graph root (default $LAYERFS_ROOT or /var/lib/layerfs)")
    parser.add_argument("--runroot", help="run root (default $LAYERFS_RUNROOT or /run/layerfs)")
    parser.add_argument("--debug", action="store_true", help="verbose logs and tracebacks")
    parser.add_argument(
        "--version", action=_VersionAction, help="print the version and the pyfuse3/libfuse used"
    )
    parser.add_argument(
        "--storage-opt",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="a driver option, as containers/storage takes them: overlay.ignore_chown_errors="
        "true, overlay.force_mask=private|shared|MODE (repeatable)",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    def add(
        name: str, help_text: str, *, json_flag: bool = True, aliases: Sequence[str] = ()
    ) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=help_text, description=help_text, aliases=list(aliases))
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

    p = add("import-layer", "create a layer from a tar stream (gzip/zstd/xz/bzip2 detected)")
    p.add_argument("--name", "-n", action="append", default=[], help="a name (repeatable)")
    p.add_argument("--id", "-i", help="use this id instead of a random one")
    p.add_argument("--parent", "-p", help="parent layer (id, name or id prefix)")
    p.add_argument("file", nargs="?", help="the tar stream (default: stdin)")

    p = add("applydiff", "apply a tar stream on top of a layer's contents")
    p.add_argument("layer")
    p.add_argument("file", nargs="?", help="the tar stream (default: stdin)")

    p = add("diff", "write a layer's changes as a tar stream", json_flag=False)
    p.add_argument(
        "--compress",
        "-c",
        choices=["none", "gzip", "zstd", "xz", "bzip2"],
        help="output compression (default: the layer's own)",
    )
    p.add_argument("--output", "-o", help="write here instead of stdout")
    p.add_argument("layer")
    p.add_argument("from_layer", nargs="?", metavar="FROM", help="must be the parent")

    p = add("changes", "list a layer's changes (Add, Modify, Delete)")
    p.add_argument("layer")
    p.add_argument("from_layer", nargs="?", metavar="FROM", help="must be the parent")

    p = add("diffsize", "print the size of a layer's changes", json_flag=False)
    p.add_argument("layer")
    p.add_argument("from_layer", nargs="?", metavar="FROM", help="must be the parent")

    p = add("import-image", "import an image: oci:DIR[:TAG] or docker-archive:FILE")
    p.add_argument("--name", "-n", help="image name (default: from the source)")
    p.add_argument("source")

    add("images", "list images (id, names, top layer, size, created)")
    p = add("image", "show images (by id, name or id prefix)")
    p.add_argument("images", nargs="+", metavar="IMAGE")

    p = add("mount", "mount a layer's or image's union view and print where")
    access = p.add_mutually_exclusive_group()
    access.add_argument(
        "--rw",
        dest="read_write",
        action="store_const",
        const=True,
        help="read-write (the default for a container's or --writeable layer; else refused)",
    )
    access.add_argument(
        "--ro",
        dest="read_write",
        action="store_const",
        const=False,
        help="read-only, also for a writable layer (then a private view Go never sees)",
    )
    p.add_argument("--for-container", action="store_true", help="keep suid/dev for a runtime")
    p.add_argument("--allow-other", action="store_true", help="let other users in")
    p.add_argument("--foreground", action="store_true", help="run the daemon here, with logs")
    for kind in ("uid", "gid"):
        p.add_argument(
            f"--{kind}mapping",
            action="append",
            metavar="STORED:SHOWN:LEN[:...]",
            help=f"show {kind}s mapped, as fuse-overlayfs's {kind}mapping= (the last one counts)",
        )
    p.add_argument("--squash-to-root", action="store_true", help="show every owner as 0:0")
    p.add_argument("--squash-to-uid", type=int, metavar="UID", help="show every owner as UID")
    p.add_argument("--squash-to-gid", type=int, metavar="GID", help="show every group as GID")
    p.add_argument("target", help="layer id, name or prefix, or image name")
    p.add_argument("mountpoint", nargs="?", help="default: <root>/overlay/<id>/merged")

    p = add("unmount", "drop one user of a view; unmount at zero", aliases=["umount"])
    p.add_argument("--force", "-f", action="store_true", help="unmount whatever the count")
    p.add_argument("target", help="layer, image or mount point")

    p = add("mounted", "print a layer's mount count (0 when not mounted)")
    p.add_argument("target")

    add("ps", "list live views with their counts and daemons")

    p = add("export", "write the flattened view as one tar (whiteouts applied)", json_flag=False)
    p.add_argument("--output", "-o", help="write here (atomically) instead of stdout")
    p.add_argument(
        "--compress",
        "-c",
        choices=["none", "gzip", "zstd", "xz", "bzip2"],
        default="none",
        help="output compression (default: none)",
    )
    p.add_argument("target", help="layer id, name or prefix, or image name, id or prefix")

    p = add("extract", "copy one file or subtree of a view into a directory")
    p.add_argument("target")
    p.add_argument("path", help="path in the view (a directory is copied with its contents)")
    p.add_argument("dest", help="an existing directory; nothing is written outside it")

    p = add("inspect", "per layer: entries and bytes added, modified, deleted, wasted")
    p.add_argument("--largest", type=int, default=5, metavar="N", help="files listed per layer")
    p.add_argument("target")

    p = add("which", "show which layer supplies a path, and what it shadows")
    p.add_argument("target")
    p.add_argument("path")

    p = add("ls", "list a directory of a view without mounting it")
    p.add_argument("target")
    p.add_argument("path", nargs="?", default="/")

    p = add("cat", "print a file of a view without mounting it", json_flag=False)
    p.add_argument("target")
    p.add_argument("path")

    p = add("completion", "print a bash completion script (or, 'names', what TARGET can be)")
    p.add_argument("what", choices=["bash", "names"])

    add("wipe", "delete every layer")
    add("status", "show store and driver facts")
    add("gc", "remove data that belongs to no layer record")

    p = add("unshare", "run COMMAND (default $SHELL) in the rootless namespace", json_flag=False)
    p.add_argument("cmd", nargs=argparse.REMAINDER, metavar="COMMAND", help="command and args")
    return parser


#: Commands that create the store or touch layer files: as a plain user with subordinate ids
#: they run in the rootless user namespace (:func:`_enter_namespace_for`).
_NAMESPACE_COMMANDS = frozenset(
    {
        "create-layer",
        "delete-layer",
        "import-layer",
        "applydiff",
        "import-image",
        "diff",
        "changes",
        "diffsize",
        "mount",
        "unmount",
        "umount",
        "which",
        "ls",
        "cat",
        "export",
        "extract",
        "inspect",
        "wipe",
        "gc",
    }
)


def _enter_namespace_for(args: argparse.Namespace) -> None:
    """Enter the rootless user + mount namespace (podman's) when this command needs it.

    A plain user with ranges in /etc/subuid and /etc/subgid keeps a store whose files belong
    to container ids (subordinate ids on disk); only inside the namespace can layerfs give
    files those owners, read 0700 directories of other container users, and see the views
    mounted there. So such a user's store is made in the namespace (whatever the first
    command is), and afterwards every command that touches layer files enters it, unless the
    store was made outside one (``overlay/.has-mount-program`` says ``true``: made by a plain
    user without subordinate ids, in the mount-program format) or ``LAYERFS_USERNS=host`` is
    set. Listing commands on an existing store (``layers``, ``ps``, ...) run where they are
    started."""
    if os.environ.get("LAYERFS_USERNS") == "host":
        return
    from layerfs import userns

    if not userns.can_enter():
        return
    root = os.path.abspath(args.root or default_root())
    try:
        with open(os.path.join(root, "overlay", ".has-mount-program"), "rb") as f:
            marker: bytes | None = f.read(64).strip()
    except OSError:
        marker = None  # no store yet: it is made inside
    if marker == b"true" or (marker is not None and args.command not in _NAMESPACE_COMMANDS):
        return
    try:
        userns.enter()
    except (userns.UsernsError, OSError) as exc:
        raise LayerfsError(f"cannot enter the rootless user namespace: {exc}") from None
    args.entered_userns = True


def _unshare(args: argparse.Namespace) -> int:
    """``layerfs unshare [COMMAND...]``: like ``podman unshare``."""
    from layerfs import userns

    cmd = list(args.cmd)
    if cmd and cmd[0] == "--":
        cmd = cmd[1:]
    if not cmd:
        cmd = [os.environ.get("SHELL") or "/bin/sh"]
    if os.geteuid() == 0 and not userns.in_user_namespace():
        raise LayerfsError("unshare is for a plain user; root needs no user namespace")
    if not userns.in_user_namespace():
        try:
            userns.enter()
        except (userns.UsernsError, OSError) as exc:
            raise LayerfsError(f"cannot enter the rootless user namespace: {exc}") from None
    sys.stdout.flush()
    sys.stderr.flush()
    try:
        os.execvp(cmd[0], cmd)
    except OSError as exc:
        raise LayerfsError(f"{cmd[0]}: {exc.strerror}") from None


def _storage_opts(items: Sequence[str]) -> dict[str, str]:
    """``KEY=VALUE`` strings as a dict; a malformed one is a one-line error."""
    opts: dict[str, str] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise LayerfsError(f"--storage-opt {item!r}: expected KEY=VALUE")
        opts[key.strip()] = value.strip()
    from layerfs.archive.apply import ApplyOptions

    ApplyOptions.from_storage_opts(opts)  # a bad value is refused before anything starts
    return opts


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
    try:
        if args.command == "unshare":
            return _unshare(args)
        if args.command != "completion":  # completion prints a script; it never needs a store
            _enter_namespace_for(args)
    except LayerfsError as exc:
        _err(str(exc))
        return 1
    handler = _COMMANDS.get("unmount" if args.command == "umount" else args.command)
    try:
        if handler is None:
            return _completion(args)
        store = Store(args.root, args.runroot, read_only=False)
        store.storage_opts = _storage_opts(args.storage_opt)
        if args.command in _IMAGE_AWARE:
            # one shared acquisition for resolving image names and the command's reads,
            # so a layer cannot change between the two
            with store.reading():
                _images_to_top_layers(store, args)
                return handler(store, args)
        return handler(store, args)
    except LayerfsError as exc:
        if args.debug:
            log.exception("failed")
        _err(str(exc))
        return 1
    except OSError as exc:
        if args.debug:
            log.exception("failed")
        _err(describe_os_error(exc))
        return 1
    except KeyboardInterrupt:
        return 130


__all__ = ["build_parser", "main"]
