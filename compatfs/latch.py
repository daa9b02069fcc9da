"""zedmanager's latch: which sha an (app, image, purge counter) was built from.

One JSON object per file in ``status/zedmanager/AppAndImageToHash``::

    {"AppUUID": "...", "ImageID": "...", "Hash": "...", "PurgeCounter": N}

named ``<AppUUID>.<ImageID>.json`` when the purge counter is 0, else
``<AppUUID>.<ImageID>.<PurgeCounter>.json``. A file that cannot be used is
reported as a problem and skipped; it never stops the others.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass

from .names import UINT32_MAX, is_sha256, is_uuid
from .untrusted import UntrustedFileError, read_regular

#: A latch file larger than this is not JSON zedmanager wrote.
MAX_LATCH_FILE = 64 * 1024

LatchKey = tuple[str, str, int]   # (app UUID lower, image UUID lower, purge counter)


@dataclass(frozen=True)
class Latch:
    hashes: dict[LatchKey, str]
    problems: tuple[str, ...]

    def lookup(self, app_uuid: str, image_uuid: str, purge: int) -> str | None:
        return self.hashes.get((app_uuid.lower(), image_uuid.lower(), purge))


EMPTY_LATCH = Latch({}, ())


def _parse_entry(data: bytes) -> tuple[LatchKey, str]:
    try:
        obj = json.loads(data)
    except (ValueError, UnicodeDecodeError, RecursionError) as exc:
        raise ValueError(f"bad JSON: {exc}") from None
    if not isinstance(obj, dict):
        raise ValueError("not a JSON object")
    app, image, sha = obj.get("AppUUID"), obj.get("ImageID"), obj.get("Hash")
    purge = obj.get("PurgeCounter", 0)
    if not isinstance(app, str) or not is_uuid(app):
        raise ValueError("AppUUID is not a UUID")
    if not isinstance(image, str) or not is_uuid(image):
        raise ValueError("ImageID is not a UUID")
    if not isinstance(sha, str) or not is_sha256(sha):
        raise ValueError("Hash is not a sha256")
    if isinstance(purge, bool) or not isinstance(purge, int) or not 0 <= purge <= UINT32_MAX:
        raise ValueError("PurgeCounter is not a uint32")
    return (app.lower(), image.lower(), purge), sha


def expected_file_name(app_uuid: str, image_uuid: str, purge: int) -> str:
    """The file name zedmanager uses for this key."""
    key = f"{app_uuid}.{image_uuid}" if purge == 0 else f"{app_uuid}.{image_uuid}.{purge}"
    return key + ".json"


def load(directory: str, beneath: str | None = None) -> Latch:
    """Read every latch file in *directory*; absence of the directory is an empty latch.

    With *beneath*, no file is read through a symbolic link below that directory.
    """
    try:
        entries = sorted(os.scandir(directory), key=lambda e: e.name)
    except FileNotFoundError:
        return EMPTY_LATCH
    except OSError as exc:
        return Latch({}, (f"latch {directory}: cannot list: {exc.strerror}",))
    hashes: dict[LatchKey, str] = {}
    problems: list[str] = []
    for entry in entries:
        if not entry.name.endswith(".json"):
            continue
        where = os.path.join(directory, entry.name)
        try:
            data = read_regular(where, MAX_LATCH_FILE, beneath=beneath)
            key, sha = _parse_entry(data)
            if entry.name.lower() != expected_file_name(*key).lower():
                raise ValueError(f"contents are for {expected_file_name(*key)}")
        except FileNotFoundError:
            continue   # removed since the listing
        except UntrustedFileError as exc:
            problems.append(f"latch {exc}; ignored")
            continue
        except ValueError as exc:
            problems.append(f"latch {where}: {exc}; ignored")
            continue
        hashes[key] = sha
    return Latch(hashes, tuple(problems))
