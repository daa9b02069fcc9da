"""The name grammars of both layouts: parse and format, nothing else.

Legacy names are parsed exactly as old EVE wrote them (see
``docs/layouts.md``)::

    VM volume file        <sha>-<appUUID>#<purge>.<format>   (purge > 0)
                          <sha>-<appUUID>.<format>           (purge == 0)
    container directory   <sha>-<appUUID>#<purge>  or  <sha>-<appUUID>
    new volume            <volumeUUID>#<generation>.<format>

Parsing is strict. A name that does not parse raises :class:`NotAVolume`
with the reason; old EVE logged such names and ignored them, and compatfs
leaves them where they are. Every component that ends up in a path goes
through :func:`check_component`, so nothing parsed here can climb out of the
directory it is joined to.
"""

from __future__ import annotations

import enum
import re
from dataclasses import dataclass

#: Longest file name a Linux filesystem accepts, in bytes.
NAME_MAX = 255

UINT32_MAX = 2**32 - 1
INT64_MAX = 2**63 - 1

_SHA_RE = re.compile(r"[0-9A-Fa-f]{64}")
_UUID_RE = re.compile(
    r"[0-9A-Fa-f]{8}-[0-9A-Fa-f]{4}-[0-9A-Fa-f]{4}-[0-9A-Fa-f]{4}-[0-9A-Fa-f]{12}"
)
_COUNTER_RE = re.compile(r"0|[1-9][0-9]*")
_FORMAT_RE = re.compile(r"[a-z0-9]{1,16}")

#: The volume formats EVE writes as file name suffixes (lower case).
KNOWN_FORMATS = frozenset({"raw", "qcow", "qcow2", "vhd", "vmdk", "vhdx", "iso", "ova", "pvc"})

#: Suffix of a container volume in the new layout (it is a directory).
CONTAINER_FORMAT = "container"


class NotAVolume(ValueError):
    """A name does not follow the grammar it was parsed with; ``reason`` says why."""

    def __init__(self, name: str, reason: str) -> None:
        super().__init__(f"{name!r}: {reason}")
        self.name = name
        self.reason = reason


class ObjType(enum.Enum):
    """Object types of the legacy download tree."""

    APP_IMG = "appImg.obj"
    BASE_OS = "baseOs.obj"
    CERT = "cert.obj"


class DownloadArea(enum.Enum):
    """The three areas under ``downloads/<objType>/``."""

    PENDING = "pending"
    VERIFIER = "verifier"
    VERIFIED = "verified"


def check_component(name: str) -> str:
    """Return *name* if it is safe as one path component, else raise.

    Refused: empty, ``.``, ``..``, a ``/``, a NUL byte, or longer than
    ``NAME_MAX`` bytes in UTF-8 (or not encodable: a surrogate escape from
    an undecodable byte is fine, it round-trips through ``os.fsencode``).
    """
    if not name:
        raise NotAVolume(name, "empty name")
    if name in (".", ".."):
        raise NotAVolume(name, "'.' and '..' are not names")
    if "/" in name:
        raise NotAVolume(name, "contains '/'")
    if "\0" in name:
        raise NotAVolume(name, "contains a NUL byte")
    try:
        size = len(name.encode("utf-8", "surrogateescape"))
    except UnicodeEncodeError:
        raise NotAVolume(name, "not encodable as a file name") from None
    if size > NAME_MAX:
        raise NotAVolume(name, f"longer than {NAME_MAX} bytes")
    return name


def is_sha256(text: str) -> bool:
    """True for 64 hex digits of any case."""
    return _SHA_RE.fullmatch(text) is not None


def is_uuid(text: str) -> bool:
    """True for a UUID in canonical 8-4-4-4-12 form, any case."""
    return _UUID_RE.fullmatch(text) is not None


def _counter(name: str, text: str, what: str, limit: int) -> int:
    if _COUNTER_RE.fullmatch(text) is None:
        raise NotAVolume(name, f"{what} {text!r} is not a canonical decimal number")
    value = int(text)
    if value > limit:
        raise NotAVolume(name, f"{what} {value} is out of range")
    return value


@dataclass(frozen=True)
class LegacyVolumeName:
    """A parsed legacy volume name.

    ``sha`` keeps the case it was written in (the controller may send either);
    compare with :attr:`sha_lower`. ``fmt`` is ``None`` for a container
    directory.
    """

    sha: str
    app_uuid: str
    purge: int = 0
    fmt: str | None = None

    @property
    def sha_lower(self) -> str:
        return self.sha.lower()

    @property
    def app_lower(self) -> str:
        return self.app_uuid.lower()

    def format(self) -> str:
        """The name as old EVE wrote it."""
        stem = f"{self.sha}-{self.app_uuid}"
        if self.purge:
            stem += f"#{self.purge}"
        return stem if self.fmt is None else f"{stem}.{self.fmt}"


def _parse_stem(name: str, stem: str) -> tuple[str, str, int]:
    sha, dash, rest = stem.partition("-")
    if not dash:
        raise NotAVolume(name, "no '-' between sha and app UUID")
    if not is_sha256(sha):
        raise NotAVolume(name, "sha is not 64 hex digits")
    app, hash_, purge_text = rest.partition("#")
    if not is_uuid(app):
        raise NotAVolume(name, "app instance UUID is not a canonical UUID")
    purge = 0
    if hash_:
        purge = _counter(name, purge_text, "purge counter", UINT32_MAX)
        if purge == 0:
            # old EVE never wrote '#0': the suffix is omitted for zero
            raise NotAVolume(name, "purge counter 0 is written without '#0'")
    return sha, app, purge


def parse_vm_volume(name: str) -> LegacyVolumeName:
    """Parse a legacy VM volume file name, ``<sha>-<uuid>[#<purge>].<format>``."""
    check_component(name)
    stem, dot, fmt = name.rpartition(".")
    if not dot:
        raise NotAVolume(name, "no '.<format>' suffix")
    if _FORMAT_RE.fullmatch(fmt) is None:
        raise NotAVolume(name, f"format {fmt!r} is not a lower-case format name")
    sha, app, purge = _parse_stem(name, stem)
    return LegacyVolumeName(sha, app, purge, fmt)


def parse_container_volume(name: str) -> LegacyVolumeName:
    """Parse a legacy container volume directory name, ``<sha>-<uuid>[#<purge>]``."""
    check_component(name)
    sha, app, purge = _parse_stem(name, name)
    return LegacyVolumeName(sha, app, purge, None)


@dataclass(frozen=True)
class VolumeName:
    """A new-layout volume name, ``<volumeUUID>#<generation>.<format>``."""

    volume_uuid: str
    generation: int
    fmt: str

    def format(self) -> str:
        return f"{self.volume_uuid}#{self.generation}.{self.fmt}"


def parse_volume(name: str) -> VolumeName:
    """Parse a new-layout volume name."""
    check_component(name)
    stem, dot, fmt = name.rpartition(".")
    if not dot or _FORMAT_RE.fullmatch(fmt) is None:
        raise NotAVolume(name, "no lower-case '.<format>' suffix")
    vol, hash_, gen_text = stem.partition("#")
    if not hash_:
        raise NotAVolume(name, "no '#<generation>'")
    if not is_uuid(vol):
        raise NotAVolume(name, "volume UUID is not a canonical UUID")
    gen = _counter(name, gen_text, "generation counter", INT64_MAX)
    return VolumeName(vol, gen, fmt)


def parse_obj_type(name: str) -> ObjType:
    """``appImg.obj`` and friends; anything else raises :class:`NotAVolume`."""
    try:
        return ObjType(name)
    except ValueError:
        raise NotAVolume(name, "not a download object type") from None


def parse_image_id(name: str) -> str:
    """The ``<imageID>`` directory of the pending and verifier areas."""
    check_component(name)
    if not is_uuid(name):
        raise NotAVolume(name, "image ID is not a canonical UUID")
    return name


def parse_verified_sha(name: str) -> str:
    """The ``<SHA>`` directory of the verified area; returns it lower-cased."""
    check_component(name)
    if not is_sha256(name):
        raise NotAVolume(name, "verified directory is not a 64-digit sha256")
    return name.lower()


#: Characters that change a terminal or start a new line: C0 controls, DEL, C1.
_CONTROL = {c: f"\\x{c:02x}" for c in (*range(0x20), *range(0x7f, 0xa0))}


def shown(text: str) -> str:
    """*text* (a name, or a line holding names) as a report prints it: control
    characters as ``\\xNN``, so a name can neither drive the operator's terminal
    nor start a line of its own. Bytes that are not UTF-8 stay as they are."""
    return text.translate(_CONTROL)

