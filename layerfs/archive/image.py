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
import tarfile
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass
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
    config = _parse_json(image.config, "image config")
    diff_ids = (config.get("rootfs") or {}).get("diff_ids")
    if not isinstance(diff_ids, list) or len(diff_ids) != len(image.layer_digests):
        raise ArchiveError(
            f"{image.reference}: the config lists {len(diff_ids or [])} diff_ids for "
            f"{len(image.layer_digests)} layers"
        )
    parent = ""
    layer_ids: list[str] = []
    reused: list[bool] = []
    for index, diff_id in enumerate(diff_ids):
        if not isinstance(diff_id, str) or ":" not in diff_id:
            raise ArchiveError(f"{image.reference}: bad diff_id {diff_id!r}")
        layer_id = chain_layer_id(parent, diff_id)
        is_top = index == len(diff_ids) - 1
        if store.has_layer_id(layer_id):
            reused.append(True)
        else:
            blob_digest = image.layer_digests[index]

            def check(result: ApplyResult, blob: str = blob_digest, want: str = diff_id) -> None:
                if result.compressed_digest != blob and result.uncompressed_digest != blob:
                    raise ArchiveError(
                        f"layer blob {blob}: content digest is {result.compressed_digest}"
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
    descriptor = _pick_manifest(index.get("manifests") or [], tag, directory)
    manifest_bytes, manifest = _read_blob_json(directory, descriptor)
    while manifest.get("mediaType") in INDEX_TYPES or "manifests" in manifest:
        descriptor = _pick_manifest(manifest.get("manifests") or [], "", directory)
        manifest_bytes, manifest = _read_blob_json(directory, descriptor)
    config_desc = manifest.get("config") or {}
    config_bytes, _ = _read_blob_json(directory, config_desc)
    layers = manifest.get("layers") or []
    for layer in layers:
        _check_descriptor(layer)

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
        open_layer=open_layer,
        default_name=f"localhost/{os.path.basename(os.path.abspath(directory))}:{tag or 'latest'}",
    )


def _pick_manifest(manifests: list[Any], tag: str, where: str) -> dict[str, Any]:
    if tag:
        for m in manifests:
            annotations = m.get("annotations") or {}
            if annotations.get("org.opencontainers.image.ref.name") == tag:
                return _check_descriptor(m)
        raise ArchiveError(f'{where}: no manifest tagged "{tag}"')
    if len(manifests) == 1:
        return _check_descriptor(manifests[0])
    for m in manifests:
        platform = m.get("platform") or {}
        if platform.get("os") == "linux" and platform.get("architecture") in ("amd64", None):
            return _check_descriptor(m)
    raise ArchiveError(f"{where}: {len(manifests)} manifests and no tag given; add :TAG")


def _check_descriptor(desc: Any) -> dict[str, Any]:
    if not isinstance(desc, dict) or not isinstance(desc.get("digest"), str):
        raise ArchiveError(f"malformed descriptor {desc!r:.100}")
    algo, _, hex_part = desc["digest"].partition(":")
    if algo != "sha256" or len(hex_part) != 64 or hex_part.strip("0123456789abcdef"):
        raise ArchiveError(f'unsupported or malformed digest "{desc["digest"]}"')
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
        entry = manifest_list[0]
        config_bytes = read_member(entry["Config"])
        config_digest = "sha256:" + hashlib.sha256(config_bytes).hexdigest()
        config = _parse_json(config_bytes, "image config")
        diff_ids = (config.get("rootfs") or {}).get("diff_ids") or []
        layer_names: list[str] = list(entry.get("Layers") or [])

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
        tags = entry.get("RepoTags") or []
        yield ImageSource(
            reference=f"docker-archive:{path}",
            manifest=manifest_bytes,
            manifest_digest="sha256:" + hashlib.sha256(manifest_bytes).hexdigest(),
            config=config_bytes,
            config_digest=config_digest,
            layer_digests=[str(d) for d in diff_ids][: len(layer_names)]
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
    except ValueError as exc:
        raise ArchiveError(f"{what}: not valid JSON ({exc})") from exc
    if not isinstance(value, want):
        raise ArchiveError(f"{what}: expected a JSON {want.__name__}")
    return value
