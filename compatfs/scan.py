"""Finding the legacy objects on disk.

Walks the legacy locations of a :class:`Layout` once, without following
symbolic links, and yields one :class:`LegacyObject` per thing old EVE would
have recognised (or per thing it would have ignored, with the reason). Name
parsing is delegated to :mod:`compatfs.names`; nothing here resolves.
"""

from __future__ import annotations

import os
import stat
from collections.abc import Iterator, Mapping
from dataclasses import dataclass

from .enums import Kind
from .layout import Layout
from .names import (
    DownloadArea,
    LegacyVolumeName,
    NotAVolume,
    ObjType,
    check_component,
    is_sha256,
    is_uuid,
    parse_container_volume,
    parse_obj_type,
    parse_verified_sha,
    parse_vm_volume,
)

#: compatfs' own directories at the top of a store (see compatfs.migration.steps): copies
#: it set aside, and the temporaries of moves under way (named by a hash of their
#: target, so no agent's file, whatever its name, is ever taken for one)
SET_ASIDE_DIR = ".compatfs-set-aside"
TMP_DIR = ".compatfs-tmp"

_AREA_KIND = {
    DownloadArea.PENDING: Kind.PENDING,
    DownloadArea.VERIFIER: Kind.VERIFIER,
    DownloadArea.VERIFIED: Kind.VERIFIED,
}


@dataclass(frozen=True)
class LegacyObject:
    """One thing found in a legacy location.

    ``reason`` is set when it is not something compatfs can place (then
    ``kind`` is ``other`` unless the kind is clear but the name is not).
    ``download`` holds (objType, area, directory, file name) for downloads.
    """

    kind: Kind
    path: str
    bytes: int
    mtime_ns: int
    is_dir: bool
    volume: LegacyVolumeName | None = None
    download: tuple[ObjType, DownloadArea, str, str] | None = None
    reason: str | None = None


def _allocated(st: os.stat_result) -> int:
    return st.st_blocks * 512


def tree_bytes(path: str) -> int:
    """Allocated bytes of a directory tree, not following symbolic links."""
    total = 0
    stack = [path]
    while stack:
        current = stack.pop()
        try:
            it = os.scandir(current)
        except OSError:
            continue
        with it:
            for entry in it:
                try:
                    st = entry.stat(follow_symlinks=False)
                except OSError:
                    continue
                total += _allocated(st)
                if stat.S_ISDIR(st.st_mode):
                    stack.append(entry.path)
    return total


def _entries(path: str) -> list[tuple[os.DirEntry[str], os.stat_result]]:
    """The entries of *path* with their lstat, sorted; entries that vanish are skipped."""
    try:
        with os.scandir(path) as it:
            entries = sorted(it, key=lambda e: e.name)
    except (FileNotFoundError, NotADirectoryError):
        return []
    out = []
    for entry in entries:
        if entry.name in (SET_ASIDE_DIR, TMP_DIR):
            continue  # compatfs' own: copies it set aside, temporaries of moves under way
        try:
            out.append((entry, entry.stat(follow_symlinks=False)))
        except FileNotFoundError:
            continue
    return out


def _other(entry: os.DirEntry[str], st: os.stat_result, reason: str) -> LegacyObject:
    return LegacyObject(Kind.OTHER, entry.path, _allocated(st), st.st_mtime_ns,
                        stat.S_ISDIR(st.st_mode), reason=reason)


def _kind_word(st: os.stat_result) -> str:
    if stat.S_ISLNK(st.st_mode):
        return "symbolic link (not followed)"
    if stat.S_ISDIR(st.st_mode):
        return "directory"
    if stat.S_ISREG(st.st_mode):
        return "regular file"
    return "special file"


#: Where each legacy location is read from, when not at its layout path (the
#: daemon reads the legacy directories its mounts cover through its dir fds).
Bases = Mapping[str, str]


def _base(layout: Layout, key: str, bases: Bases | None) -> str:
    return bases[key] if bases and key in bases else layout.path(key)


def scan_img(layout: Layout, bases: Bases | None = None) -> Iterator[LegacyObject]:
    """``img/``: one regular file per VM volume."""
    for entry, st in _entries(_base(layout, "img", bases)):
        if not stat.S_ISREG(st.st_mode):
            yield _other(entry, st, f"{_kind_word(st)} where VM volume files live")
            continue
        try:
            name = parse_vm_volume(entry.name)
        except NotAVolume as exc:
            yield _other(entry, st, f"not a volume: {exc.reason}")
            continue
        yield LegacyObject(Kind.VM_VOLUME, entry.path, _allocated(st), st.st_mtime_ns, False,
                           volume=name)


def scan_prepared(layout: Layout, bases: Bases | None = None) -> Iterator[LegacyObject]:
    """``runx/pods/prepared/``: one directory per container volume."""
    for entry, st in _entries(_base(layout, "prepared", bases)):
        if not stat.S_ISDIR(st.st_mode):
            yield _other(entry, st, f"{_kind_word(st)} where container volumes live")
            continue
        try:
            name = parse_container_volume(entry.name)
        except NotAVolume as exc:
            yield _other(entry, st, f"not a volume: {exc.reason}")
            continue
        yield LegacyObject(Kind.OCI_VOLUME, entry.path, tree_bytes(entry.path) + _allocated(st),
                           st.st_mtime_ns, True, volume=name)


def _scan_area(obj_type: ObjType, area: DownloadArea, path: str) -> Iterator[LegacyObject]:
    kind = _AREA_KIND[area]
    for sub, sub_st in _entries(path):
        if not stat.S_ISDIR(sub_st.st_mode):
            yield _other(sub, sub_st, f"{_kind_word(sub_st)} where {area.value}/ keeps directories")
            continue
        try:
            if area is DownloadArea.VERIFIED:
                directory = parse_verified_sha(sub.name)
            else:
                check_component(sub.name)
                if not (is_uuid(sub.name) or is_sha256(sub.name)):
                    raise NotAVolume(sub.name, "not an image ID (UUID) nor a claimed sha256")
                directory = sub.name
        except NotAVolume as exc:
            yield _other(sub, sub_st, f"not a download directory: {exc.reason}")
            continue
        files = _entries(sub.path)
        regular = 0
        for f, st in files:
            if not stat.S_ISREG(st.st_mode):
                yield _other(f, st, f"{_kind_word(st)} inside a download directory")
                continue
            regular += 1
            if area is DownloadArea.VERIFIED and regular > 1:
                yield LegacyObject(kind, f.path, _allocated(st), st.st_mtime_ns, False,
                                   download=(obj_type, area, directory, f.name),
                                   reason=f"verified/{sub.name} holds more than one file; "
                                          f"only {files[0][0].name} is the verified object")
                continue
            try:
                check_component(f.name)
            except NotAVolume as exc:  # pragma: no cover - the kernel forbids these
                yield _other(f, st, exc.reason)
                continue
            yield LegacyObject(kind, f.path, _allocated(st), st.st_mtime_ns, False,
                               download=(obj_type, area, directory, f.name))


def scan_downloads(layout: Layout, bases: Bases | None = None) -> Iterator[LegacyObject]:
    """``downloads/<objType>/{pending,verifier,verified}/<dir>/<file>``."""
    areas = {a.value: a for a in DownloadArea}
    for top, top_st in _entries(_base(layout, "downloads", bases)):
        try:
            obj_type = parse_obj_type(top.name)
        except NotAVolume as exc:
            yield _other(top, top_st, f"not a download tree: {exc.reason}")
            continue
        if not stat.S_ISDIR(top_st.st_mode):
            yield _other(top, top_st, f"{_kind_word(top_st)} where a download tree belongs")
            continue
        for area_entry, st in _entries(top.path):
            area = areas.get(area_entry.name)
            if area is None or not stat.S_ISDIR(st.st_mode):
                yield _other(area_entry, st, "not one of pending, verifier, verified")
                continue
            yield from _scan_area(obj_type, area, area_entry.path)


def scan_containerd(layout: Layout, bases: Bases | None = None) -> Iterator[LegacyObject]:
    """``containerd/``: moved as one tree into the CAS location."""
    path = _base(layout, "containerd", bases)
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return
    if not stat.S_ISDIR(st.st_mode):
        yield LegacyObject(Kind.OTHER, path, _allocated(st), st.st_mtime_ns, False,
                           reason=f"{_kind_word(st)} where the containerd directory belongs")
        return
    if not _entries(path):
        return
    yield LegacyObject(Kind.OTHER, path, tree_bytes(path) + _allocated(st), st.st_mtime_ns, True)


def scan(layout: Layout, include_prepared: bool = True,
         bases: Bases | None = None) -> Iterator[LegacyObject]:
    """Every legacy object under *layout*, location by location, names sorted."""
    yield from scan_img(layout, bases)
    if include_prepared:
        yield from scan_prepared(layout, bases)
    yield from scan_downloads(layout, bases)
    yield from scan_containerd(layout, bases)
