"""Reading the checkpointed controller config into plain Python records.

The checkpoint is a protobuf ``ConfigResponse`` or, on newer devices, an
``AuthContainer`` whose ``protectedPayload.payload`` is a serialized
``ConfigResponse``. The message classes come from the ``.proto`` subset in
``compatfs/proto``; every other field of the real messages is skipped as an
unknown field. The result is a :class:`DeviceConfig` of frozen dataclasses, so
nothing downstream touches protobuf objects.

Before EVE 5.18 zedagent rewrites the checkpoint in place (truncate, then
write), so a reader can find it empty, partial, or (read across a rewrite)
mixed. :func:`read` decodes only a settled version read whole
(:func:`read_stable`); a checkpoint still changing is a
:class:`CheckpointChanging`, and the resolver keeps its last good config.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass

from google.protobuf.message import DecodeError

from .proto import eve_auth_pb2, eve_config_pb2
from .untrusted import UntrustedFileError, read_regular_with_stat

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


#: A checkpoint is used only once it has stayed the same this long: before EVE
#: 5.18 zedagent rewrites it in place (truncate, then write), so a file changed
#: moments ago may be a writer's unfinished work even when it parses (protobuf
#: parses every prefix that ends between two top-level fields).
SETTLE_SECONDS = 0.1
#: How long a read waits for a checkpoint being rewritten to settle before it
#: gives up (:class:`CheckpointChanging`); the caller keeps its last good one.
STABLE_READ_SECONDS = 1.0
#: The pause between two reads of a file that changed while it was read.
_RETRY_PAUSE = 0.02


class CheckpointChanging(CheckpointError):
    """The checkpoint kept changing while it was read: it is being rewritten."""


def _file_signature(path: str, st: os.stat_result) -> FileSignature:
    return FileSignature(path, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)


def _old_enough(sig: FileSignature, settle: float) -> bool:
    """Last changed at least *settle* seconds ago by the wall clock. A write sets
    mtime and ctime to the (coarse, at most a few ms behind) current time, so a
    write during a read of such a file shows as a changed signature. A time in
    the future (a device whose clock went back) is never old enough."""
    return time.time_ns() - max(sig.mtime_ns, sig.ctime_ns) >= settle * 1e9


def read_stable(path: str, beneath: str | None = None, *, settle: float = SETTLE_SECONDS,
                budget: float = STABLE_READ_SECONDS) -> tuple[bytes, FileSignature]:
    """The bytes of one settled version of the file *path* and its signature.

    A read counts only when the open file's signature (inode, size, mtime,
    ctime) is the same before and after it and the bytes read are its size.
    It is used only when that version is settled: last changed at least
    *settle* seconds ago, or read again *settle* seconds later with the same
    signature and the same bytes. Anything else is read again after a short
    pause, until *budget* seconds have gone; then :class:`CheckpointChanging`.
    A file replaced by rename while it is read is not torn (the old inode is
    read whole); the next signature check sees the new one.
    ``FileNotFoundError`` passes through; a file that is not usable at all
    (see :func:`compatfs.untrusted.read_regular`) raises :class:`CheckpointError`.
    """
    deadline = time.monotonic() + budget
    seen: tuple[FileSignature, bytes, float] | None = None   # a stable read, and when
    reads, why = 0, ""
    while True:
        try:
            data, before, after = read_regular_with_stat(path, MAX_CHECKPOINT_BYTES,
                                                         beneath=beneath)
        except UntrustedFileError as exc:
            raise CheckpointError(str(exc)) from None
        reads += 1
        now = time.monotonic()
        sig = _file_signature(path, before)
        pause = _RETRY_PAUSE
        if _file_signature(path, after) != sig:
            why, seen = "it changed while it was read", None
        elif len(data) != sig.size:
            why, seen = f"{len(data)} bytes read of its {sig.size}", None
        elif _old_enough(sig, settle):
            return data, sig
        elif seen is not None and seen[0] == sig and seen[1] == data:
            if now - seen[2] >= settle:
                return data, sig
            pause = seen[2] + settle - now
        else:
            why, seen = "it was written moments ago", (sig, data, now)
            pause = settle
        if now + pause > deadline:
            raise CheckpointChanging(
                f"{path}: being rewritten: {why} ({reads} reads in {budget:g} s)")
        time.sleep(pause)


def read(path: str, beneath: str | None = None) -> DeviceConfig:
    """Read and decode the checkpoint at *path* (with no link below *beneath*).

    Raises :class:`CheckpointError` naming the file for anything but absence
    (``FileNotFoundError`` is passed through: no checkpoint is not an error).
    Only a regular file is read, never through a symbolic link, and never
    blocking (see :mod:`compatfs.untrusted`).
    """
    return read_with_signature(path, beneath)[0]


def read_with_signature(path: str, beneath: str | None = None
                        ) -> tuple[DeviceConfig, FileSignature]:
    """:func:`read`, plus the signature of the version decoded: only a settled
    read is decoded (:func:`read_stable`), never one caught mid-rewrite."""
    data, sig = read_stable(path, beneath)
    try:
        return decode(data), sig
    except CheckpointError as exc:
        raise CheckpointError(f"{path}: {exc}") from None
