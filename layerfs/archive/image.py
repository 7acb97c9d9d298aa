"""Import whole images: OCI image layouts (``oci:DIR[:TAG]``) and ``docker-archive:FILE``.

Layers are imported in order as a chain. Their ids follow containers/image (what skopeo
and podman use), so the same image imported by either tool lands on the same layers: the
first layer's id is its DiffID's hex, every later one ``sha256(parent_id + "+" + diffid_hex)``.
A layer whose id already exists is reused, since the id encodes its DiffID and its whole
parent chain. Every blob is checked against its descriptor digest and every layer against
the config's ``rootfs.diff_ids``; a mismatch is an error and keeps nothing of that layer.
The image record (id = config digest) goes to ``overlay-images/images.json`` with the
manifest and config as big data, as containers/storage stores them.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import tarfile
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass, field
from typing import Any, BinaryIO

from layerfs.archive.apply import ApplyResult
from layerfs.archive.transfer import Progress, import_layer
from layerfs.errors import ArchiveError, DuplicateIDError, InvalidArgumentError
from layerfs.store.layers import Store

MANIFEST_TYPES = (
    "application/vnd.oci.image.manifest.v1+json",
    "application/vnd.docker.distribution.manifest.v2+json",
)
INDEX_TYPES = (
    "application/vnd.oci.image.index.v1+json",
    "application/vnd.docker.distribution.manifest.list.v2+json",
)
_MAX_JSON = 16 * 1024 * 1024
_MAX_INDEX_DEPTH = 4
_SHA256_RE = re.compile(r"^sha256:[0-9a-f]{64}$")


@dataclass
class ImageSource:
    """What an importer needs: config, manifest, and a way to open each layer blob."""

    reference: str
    manifest: bytes
    manifest_digest: str
    config: bytes
    config_digest: str
    layer_digests: list[str]  # descriptor digests, or diff ids for docker-archive
    open_layer: Callable[[int], Any]  # index -> context manager yielding a binary stream
    default_name: str | None
    layer_sizes: list[int | None] = field(default_factory=list)  # from descriptors, if given


@dataclass(frozen=True)
class ImportedImage:
    """The result of an image import."""

    image_id: str
    layer_ids: list[str]
    reused: list[bool]


def chain_layer_id(parent_id: str, diff_id: str) -> str:
    """The layer id containers/image gives a layer with this DiffID on this parent."""
    hex_part = diff_id.split(":", 1)[1]
    if not parent_id:
        return hex_part
    return hashlib.sha256(f"{parent_id}+{hex_part}".encode()).hexdigest()


def import_image(
    store: Store,
    source: str,
    *,
    name: str | None = None,
    progress: Progress | None = None,
    on_layer: Callable[[str, bool], None] | None = None,
) -> ImportedImage:
    """Import an image given in skopeo's transport syntax; see the module docstring."""
    transport, _, rest = source.partition(":")
    opener: Callable[[str], AbstractContextManager[ImageSource]]
    if transport == "oci":
        opener = _open_oci
    elif transport == "docker-archive":
        opener = _open_docker_archive
    else:
        raise InvalidArgumentError(
            f'unsupported image source "{source}": use oci:DIR[:TAG] or docker-archive:FILE'
        )
    with opener(rest) as image:
        return _import(store, image, name or image.default_name, progress, on_layer)


def _import(
    store: Store,
    image: ImageSource,
    name: str | None,
    progress: Progress | None,
    on_layer: Callable[[str, bool], None] | None,
) -> ImportedImage:
    diff_ids = _config_diff_ids(_parse_json(image.config, "image config"), image.reference)
    if len(diff_ids) != len(image.layer_digests):
        raise ArchiveError(
            f"{image.reference}: the config lists {len(diff_ids)} diff_ids for "
            f"{len(image.layer_digests)} layers"
        )
    parent = ""
    layer_ids: list[str] = []
    reused: list[bool] = []
    for index, diff_id in enumerate(diff_ids):
        layer_id = chain_layer_id(parent, diff_id)
        is_top = index == len(diff_ids) - 1
        if store.has_layer_id(layer_id):
            reused.append(True)
        else:
            blob_digest = image.layer_digests[index]
            sizes = image.layer_sizes
            blob_size = sizes[index] if index < len(sizes) else None

            def check(
                result: ApplyResult,
                blob: str = blob_digest,
                want: str = diff_id,
                size: int | None = blob_size,
            ) -> None:
                if result.compressed_digest != blob and result.uncompressed_digest != blob:
                    raise ArchiveError(
                        f"layer blob {blob}: content digest is {result.compressed_digest}"
                    )
                if size is not None and result.compressed_size != size:
                    raise ArchiveError(
                        f"layer blob {blob}: {result.compressed_size} bytes, but its "
                        f"descriptor says {size}"
                    )
                if result.uncompressed_digest != want:
                    raise ArchiveError(
                        f"layer blob {blob}: uncompressed digest {result.uncompressed_digest} "
                        f"does not match the config's diff_id {want}"
                    )

            try:
                with image.open_layer(index) as stream:
                    import_layer(
                        store,
                        stream,
                        layer_id=layer_id,
                        parent=parent or None,
                        check=check,
                        progress=progress,
                    )
                reused.append(False)
            except DuplicateIDError:  # another process imported the same layer meanwhile
                reused.append(True)
        if is_top and name:
            store.add_names(layer_id, [name])  # moves the name from an older top layer
        layer_ids.append(layer_id)
        if on_layer is not None:
            on_layer(layer_id, reused[-1])
        parent = layer_id
    image_id = image.config_digest.split(":", 1)[1]
    store.add_image(
        image_id,
        names=[name] if name else [],
        top_layer=parent,
        manifest=image.manifest,
        manifest_digest=image.manifest_digest,
        config=image.config,
        config_digest=image.config_digest,
    )
    return ImportedImage(image_id, layer_ids, reused)


# --------------------------------------------------------------------- OCI layout


@contextmanager
def _open_oci(spec: str) -> Iterator[ImageSource]:
    directory, _, tag = spec.partition(":")
    if not os.path.isfile(os.path.join(directory, "oci-layout")):
        raise ArchiveError(f"{directory}: not an OCI image layout (no oci-layout file)")
    index = _parse_json(_read_small(os.path.join(directory, "index.json")), "index.json")
    descriptor = _pick_manifest(_list_of(index, "manifests", "index.json"), tag, directory)
    manifest_bytes, manifest = _read_blob_json(directory, descriptor)
    depth = 0
    while manifest.get("mediaType") in INDEX_TYPES or "manifests" in manifest:
        depth += 1
        if depth > _MAX_INDEX_DEPTH:
            raise ArchiveError(
                f"{directory}: image indexes nested more than {_MAX_INDEX_DEPTH} deep"
            )
        where = f"blob {descriptor['digest']}"
        descriptor = _pick_manifest(_list_of(manifest, "manifests", where), "", directory)
        manifest_bytes, manifest = _read_blob_json(directory, descriptor)
    where = f"manifest {descriptor['digest']}"
    if "config" not in manifest:
        raise ArchiveError(f'{where}: no "config" descriptor')
    config_desc = _check_descriptor(manifest["config"])
    config_bytes, _ = _read_blob_json(directory, config_desc)
    layers = [_check_descriptor(la) for la in _list_of(manifest, "layers", where)]

    @contextmanager
    def open_layer(i: int) -> Iterator[BinaryIO]:
        path = _blob_path(directory, layers[i]["digest"])
        try:
            f = open(path, "rb")  # noqa: SIM115 - closed below
        except FileNotFoundError as exc:
            raise ArchiveError(f"layer blob {layers[i]['digest']} is missing ({path})") from exc
        with f:
            yield f

    yield ImageSource(
        reference=f"oci:{spec}",
        manifest=manifest_bytes,
        manifest_digest=descriptor["digest"],
        config=config_bytes,
        config_digest=config_desc["digest"],
        layer_digests=[la["digest"] for la in layers],
        layer_sizes=[la.get("size") for la in layers],
        open_layer=open_layer,
        default_name=f"localhost/{os.path.basename(os.path.abspath(directory))}:{tag or 'latest'}",
    )


def _pick_manifest(manifests: list[Any], tag: str, where: str) -> dict[str, Any]:
    checked: list[dict[str, Any]] = [_check_descriptor(m) for m in manifests]
    if tag:
        for m in checked:
            annotations = _object_at(m, "annotations", "manifest descriptor")
            if annotations.get("org.opencontainers.image.ref.name") == tag:
                return m
        raise ArchiveError(f'{where}: no manifest tagged "{tag}"')
    if len(checked) == 1:
        return checked[0]
    for m in checked:
        platform = _object_at(m, "platform", "manifest descriptor")
        if platform.get("os") == "linux" and platform.get("architecture") in ("amd64", None):
            return m
    raise ArchiveError(f"{where}: {len(manifests)} manifests and no tag given; add :TAG")


def _check_descriptor(desc: Any) -> dict[str, Any]:
    if not isinstance(desc, dict) or not isinstance(desc.get("digest"), str):
        raise ArchiveError(f"malformed descriptor {_brief(desc)}")
    if not _SHA256_RE.match(desc["digest"]):
        raise ArchiveError(f'unsupported or malformed digest "{_brief(desc["digest"])}"')
    size = desc.get("size")
    if size is not None and (type(size) is not int or size < 0):
        raise ArchiveError(f"descriptor {desc['digest']}: size {_brief(size)} is not a byte count")
    return desc


def _blob_path(directory: str, digest: str) -> str:
    algo, _, hex_part = digest.partition(":")
    return os.path.join(directory, "blobs", algo, hex_part)


def _read_blob_json(directory: str, desc: dict[str, Any]) -> tuple[bytes, dict[str, Any]]:
    _check_descriptor(desc)
    data = _read_small(_blob_path(directory, desc["digest"]))
    actual = "sha256:" + hashlib.sha256(data).hexdigest()
    if actual != desc["digest"]:
        raise ArchiveError(f"blob {desc['digest']}: content digest is {actual}")
    if desc.get("size") is not None and desc["size"] != len(data):
        raise ArchiveError(
            f"blob {desc['digest']}: {len(data)} bytes, but its descriptor says {desc['size']}"
        )
    return data, _parse_json(data, f"blob {desc['digest']}")


# --------------------------------------------------------------------- docker-archive


@contextmanager
def _open_docker_archive(path: str) -> Iterator[ImageSource]:
    try:
        archive = tarfile.open(path, "r:")  # noqa: SIM115 - closed by the with below
    except (OSError, tarfile.TarError) as exc:
        raise ArchiveError(f"{path}: not a docker-archive tarball ({exc})") from exc
    with archive:
        members = {m.name.removeprefix("./"): m for m in archive.getmembers()}

        def read_member(name: str) -> bytes:
            member = members.get(name.removeprefix("./"))
            if member is None or not member.isfile():
                raise ArchiveError(f"{path}: entry {name} is missing")
            if member.size > _MAX_JSON:
                raise ArchiveError(f"{path}: entry {name} is too large for metadata")
            extracted = archive.extractfile(member)
            assert extracted is not None
            return extracted.read()

        manifest_list = _parse_json(read_member("manifest.json"), "manifest.json", want=list)
        if len(manifest_list) != 1:
            raise ArchiveError(f"{path}: holds {len(manifest_list)} images; one is supported")
        where = f"{path}: manifest.json"
        entry = manifest_list[0]
        if not isinstance(entry, dict):
            raise ArchiveError(f"{where}: the image entry is not a JSON object")
        config_name = entry.get("Config")
        if not isinstance(config_name, str) or not config_name:
            raise ArchiveError(f'{where}: the image entry has no "Config" file name')
        config_bytes = read_member(config_name)
        config_digest = "sha256:" + hashlib.sha256(config_bytes).hexdigest()
        diff_ids = _config_diff_ids(_parse_json(config_bytes, "image config"), path)
        layer_names = _strings(entry, "Layers", where)
        if not layer_names:
            raise ArchiveError(f'{where}: the image entry has no "Layers"')

        @contextmanager
        def open_layer(i: int) -> Iterator[BinaryIO]:
            member = members.get(layer_names[i].removeprefix("./"))
            if member is not None and member.issym():
                target = os.path.normpath(
                    os.path.join(os.path.dirname(member.name), member.linkname)
                )
                member = members.get(target)
            if member is None or not member.isfile():
                raise ArchiveError(f"{path}: layer {layer_names[i]} is missing")
            stream = archive.extractfile(member)
            assert stream is not None
            yield stream  # type: ignore[misc]

        manifest = {
            "schemaVersion": 2,
            "mediaType": MANIFEST_TYPES[1],
            "config": {
                "mediaType": "application/vnd.docker.container.image.v1+json",
                "size": len(config_bytes),
                "digest": config_digest,
            },
            "layers": [
                {"mediaType": "application/vnd.docker.image.rootfs.diff.tar", "digest": d}
                for d in diff_ids
            ],
        }
        manifest_bytes = json.dumps(manifest, separators=(",", ":")).encode()
        tags = _strings(entry, "RepoTags", where)
        yield ImageSource(
            reference=f"docker-archive:{path}",
            manifest=manifest_bytes,
            manifest_digest="sha256:" + hashlib.sha256(manifest_bytes).hexdigest(),
            config=config_bytes,
            config_digest=config_digest,
            layer_digests=diff_ids[: len(layer_names)]
            + [""] * max(0, len(layer_names) - len(diff_ids)),
            open_layer=open_layer,
            default_name=tags[0] if tags else None,
        )


# --------------------------------------------------------------------- helpers


def _read_small(path: str) -> bytes:
    try:
        with open(path, "rb") as f:
            data = f.read(_MAX_JSON + 1)
    except FileNotFoundError as exc:
        raise ArchiveError(f"{path}: missing") from exc
    if len(data) > _MAX_JSON:
        raise ArchiveError(f"{path}: too large for image metadata")
    return data


def _parse_json(data: bytes, what: str, want: type = dict) -> Any:
    try:
        value = json.loads(data)
    except ValueError as exc:  # includes bad UTF-8 and integers of over 4300 digits
        raise ArchiveError(f"{what}: not valid JSON ({exc})") from exc
    except RecursionError as exc:
        raise ArchiveError(f"{what}: JSON nested too deeply") from exc
    if not isinstance(value, want):
        raise ArchiveError(f"{what}: expected a JSON {want.__name__}")
    return value


def _brief(value: Any) -> str:
    """A short, one-line rendering of a hostile JSON value for an error message."""
    text = json.dumps(value, ensure_ascii=True, default=str) if value is not None else "null"
    return text if len(text) <= 80 else text[:77] + "..."


def _object_at(obj: dict[str, Any], key: str, where: str) -> dict[str, Any]:
    """``obj[key]`` as a JSON object; missing or null is ``{}``."""
    value = obj.get(key)
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise ArchiveError(f'{where}: "{key}" is not a JSON object: {_brief(value)}')
    return value


def _list_of(obj: dict[str, Any], key: str, where: str) -> list[Any]:
    """``obj[key]`` as a JSON array; missing or null is ``[]``."""
    value = obj.get(key)
    if value is None:
        return []
    if not isinstance(value, list):
        raise ArchiveError(f'{where}: "{key}" is not a JSON array: {_brief(value)}')
    return value


def _strings(obj: dict[str, Any], key: str, where: str) -> list[str]:
    """``obj[key]`` as a JSON array of strings; missing or null is ``[]``."""
    values = _list_of(obj, key, where)
    for value in values:
        if not isinstance(value, str) or not value:
            raise ArchiveError(f'{where}: "{key}" holds a non-string: {_brief(value)}')
    return values


def _config_diff_ids(config: dict[str, Any], where: str) -> list[str]:
    """The config's ``rootfs.diff_ids``, each a well-formed sha256 digest."""
    rootfs = _object_at(config, "rootfs", f"{where}: image config")
    diff_ids = _list_of(rootfs, "diff_ids", f"{where}: image config rootfs")
    for diff_id in diff_ids:
        if not isinstance(diff_id, str) or not _SHA256_RE.match(diff_id):
            raise ArchiveError(f"{where}: bad diff_id {_brief(diff_id)}")
    return diff_ids
