"""Reading the checkpointed controller config into plain Python records.

The checkpoint is a protobuf ``ConfigResponse`` or, on newer devices, an
``AuthContainer`` whose ``protectedPayload.payload`` is a serialized
``ConfigResponse``. The message classes come from the ``.proto`` subset in
``compatfs/proto``; every other field of the real messages is skipped as an
unknown field. The result is a :class:`DeviceConfig` of frozen dataclasses, so
nothing downstream touches protobuf objects.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from google.protobuf.message import DecodeError

from .proto import eve_auth_pb2, eve_config_pb2
from .untrusted import UntrustedFileError, read_regular

#: Enum Format number -> the lower-case suffix EVE writes (None when it has none).
FORMAT_SUFFIX: dict[int, str | None] = {
    0: None, 1: "raw", 2: "qcow", 3: "qcow2", 4: "vhd", 5: "vmdk",
    6: "ova", 7: "vhdx", 8: "container", 9: "iso", 10: "pvc",
}

#: A checkpoint larger than this is refused rather than read into memory. Real
#: ones are a few MiB at most (a config with hundreds of apps and their
#: certificates); 64 MiB leaves room for growth and still bounds the memory a
#: planted file can cost.
MAX_CHECKPOINT_BYTES = 64 * 1024 * 1024


class CheckpointError(Exception):
    """The checkpoint exists but cannot be used; the message says why."""


@dataclass(frozen=True)
class DriveSpec:
    image_uuid: str
    image_name: str
    sha: str            # as written in the config, may be empty
    fmt: str | None


@dataclass(frozen=True)
class VolumeRefSpec:
    uuid: str
    generation: int


@dataclass(frozen=True)
class AppSpec:
    uuid: str
    name: str
    purge: int
    drives: tuple[DriveSpec, ...]
    volume_refs: tuple[VolumeRefSpec, ...]


@dataclass(frozen=True)
class VolumeSpec:
    uuid: str
    name: str
    generation: int
    clear_text: bool
    content_tree: str   # origin.downloadContentTreeID, may be empty


@dataclass(frozen=True)
class ContentTreeSpec:
    uuid: str
    name: str
    sha: str
    fmt: str | None


@dataclass(frozen=True)
class DeviceConfig:
    """What compatfs needs of one controller config."""

    apps: tuple[AppSpec, ...]
    volumes: dict[str, VolumeSpec]            # keyed by lower-case UUID
    content_trees: dict[str, ContentTreeSpec]  # keyed by lower-case UUID
    config_hash: str
    wrapping: str                              # "ConfigResponse" or "AuthContainer"


EMPTY_CONFIG = DeviceConfig((), {}, {}, "", "none")


def _has_content(msg: eve_config_pb2.ConfigResponse) -> bool:
    return msg.HasField("config") or bool(msg.configHash)


def _has_known_content(msg: eve_config_pb2.ConfigResponse) -> bool:
    cfg = msg.config
    return bool(cfg.apps or cfg.volumes or cfg.contentInfo or msg.configHash)


def _parse_response(data: bytes) -> tuple[eve_config_pb2.ConfigResponse | None, str]:
    msg = eve_config_pb2.ConfigResponse()
    try:
        msg.ParseFromString(data)
    except (DecodeError, RuntimeError, ValueError) as exc:
        return None, str(exc) or type(exc).__name__
    return msg, ""


def _unwrap(data: bytes) -> tuple[eve_config_pb2.ConfigResponse | None, str]:
    auth = eve_auth_pb2.AuthContainer()
    try:
        auth.ParseFromString(data)
    except (DecodeError, RuntimeError, ValueError) as exc:
        return None, str(exc) or type(exc).__name__
    payload = auth.protectedPayload.payload
    if not payload:
        return None, "no protectedPayload.payload"
    inner, why = _parse_response(payload)
    if inner is None:
        return None, f"payload is not a ConfigResponse: {why}"
    if not _has_content(inner):
        return None, "payload holds no config"
    return inner, ""


def _score(msg: eve_config_pb2.ConfigResponse) -> int:
    """How much of *msg* looks like a real config: objects with valid UUIDs."""
    from .names import is_uuid

    cfg = msg.config
    return (sum(is_uuid(a.uuidandversion.uuid) for a in cfg.apps)
            + sum(is_uuid(v.uuid) for v in cfg.volumes)
            + sum(is_uuid(t.uuid) for t in cfg.contentInfo))


def decode(data: bytes) -> DeviceConfig:
    """Decode checkpoint bytes; raises :class:`CheckpointError` with the reason.

    ``ConfigResponse`` is tried first, then ``AuthContainer``. Field 1 of both
    is a sub-message, so an ``AuthContainer`` also parses as a
    ``ConfigResponse``, and (rarely) unknown fields of a wrapped one look
    like known ones. So: when only one reading carries apps, volumes,
    content trees or a config hash, it wins; when both do, the one with
    more objects that have valid UUIDs wins, a tie going to the bare
    reading. Bytes that give neither a config are an error: a real
    checkpoint always carries one.
    """
    if not data:
        raise CheckpointError("checkpoint is empty")
    direct, direct_why = _parse_response(data)
    inner, inner_why = _unwrap(data)
    direct_ok = direct is not None and _has_known_content(direct)
    inner_ok = inner is not None and _has_known_content(inner)
    if direct_ok and inner_ok:
        assert direct is not None and inner is not None
        if _score(inner) > _score(direct):
            return _convert(inner, "AuthContainer")
        return _convert(direct, "ConfigResponse")
    if direct_ok:
        assert direct is not None
        return _convert(direct, "ConfigResponse")
    if inner is not None:
        return _convert(inner, "AuthContainer")
    raise CheckpointError(
        f"neither a ConfigResponse ({direct_why or 'no config in it'}) "
        f"nor an AuthContainer ({inner_why})")


def _str(value: str) -> str:
    return value.strip()


def _convert(resp: eve_config_pb2.ConfigResponse, wrapping: str) -> DeviceConfig:
    cfg = resp.config
    apps = []
    for app in cfg.apps:
        drives = tuple(
            DriveSpec(
                image_uuid=_str(d.image.uuidandversion.uuid).lower(),
                image_name=d.image.name,
                sha=_str(d.image.sha256),
                fmt=FORMAT_SUFFIX.get(d.image.iformat),
            )
            for d in app.drives
        )
        refs = tuple(
            VolumeRefSpec(_str(r.uuid).lower(), r.generationCount) for r in app.volumeRefList
        )
        apps.append(AppSpec(
            uuid=_str(app.uuidandversion.uuid).lower(),
            name=app.displayname,
            purge=app.purge.counter,
            drives=drives,
            volume_refs=refs,
        ))
    volumes = {}
    for v in cfg.volumes:
        spec = VolumeSpec(
            uuid=_str(v.uuid).lower(), name=v.displayName, generation=v.generationCount,
            clear_text=v.clear_text, content_tree=_str(v.origin.downloadContentTreeID).lower(),
        )
        volumes[spec.uuid] = spec
    trees = {}
    for t in cfg.contentInfo:
        tree = ContentTreeSpec(
            uuid=_str(t.uuid).lower(), name=t.displayName, sha=_str(t.sha256),
            fmt=FORMAT_SUFFIX.get(t.iformat),
        )
        trees[tree.uuid] = tree
    return DeviceConfig(tuple(apps), volumes, trees, resp.configHash, wrapping)


@dataclass(frozen=True)
class FileSignature:
    """What identifies one version of a file; a change means re-read it."""

    path: str
    ino: int
    size: int
    mtime_ns: int
    ctime_ns: int


def signature(path: str) -> FileSignature | None:
    """The signature of *path* itself (a link is not followed), or None when absent."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return None
    return FileSignature(path, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)


def read(path: str, beneath: str | None = None) -> DeviceConfig:
    """Read and decode the checkpoint at *path* (with no link below *beneath*).

    Raises :class:`CheckpointError` naming the file for anything but absence
    (``FileNotFoundError`` is passed through: no checkpoint is not an error).
    Only a regular file is read, never through a symbolic link, and never
    blocking (see :mod:`compatfs.untrusted`).
    """
    try:
        data = read_regular(path, MAX_CHECKPOINT_BYTES, beneath=beneath)
    except UntrustedFileError as exc:
        raise CheckpointError(str(exc)) from None
    try:
        return decode(data)
    except CheckpointError as exc:
        raise CheckpointError(f"{path}: {exc}") from None
