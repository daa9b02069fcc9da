"""The legacy views' namespace: where the bytes behind a legacy path are now,
and where a new one goes.

A *view path* is a legacy path relative to the root of the views:
``img/<name>``, ``downloads/<objType>/<area>/<dir>/<file>``,
``prepared/<name>/...``. It is backed either by the legacy store at the same
relative path, or, when the index has a record for it, by the record's
location in the new layout. Directories of the legacy tree always live in the
legacy store (empty skeleton directories cost nothing and keep a rollback
simple); files, and container volume directories, are what gets placed.

Where a *new* object goes depends on the stage: in ``observe`` everything
stays in the legacy store; in ``redirect`` and ``migrate`` a name the
resolver can place goes straight to its new-layout location, a volume name it
cannot place yet goes to the unresolved area inside the vault, and anything
else stays in the legacy store: names that do not parse, and what the target
layout's rules keep there (in ``eve``: downloads in progress, ``cert.obj``,
verified objects whose name the target keeps cannot be derived). A rename
keeps bytes on their side of the vault boundary when they cannot move by
``rename(2)``, so an agent never waits for a copy and never sees ``EXDEV``.

This module decides; :mod:`compatfs.backing` does the syscalls;
:mod:`compatfs.operations` turns FUSE requests into calls here. Renames are
:mod:`compatfs.viewrename`'s; what a crash left half done is finished before
serving by :func:`compatfs.migration.recover`.
"""

from __future__ import annotations

import errno
import logging
import os
from collections.abc import Iterator

from . import snapshotid
from .backing import Backing
from .enums import PLACING_STAGES, Kind, State, StoreKey, ViewName
from .index import Index
from .indexformat import Record
from .layout import Layout
from .names import (
    DownloadArea,
    NotAVolume,
    check_component,
    is_sha256,
    is_uuid,
    parse_container_volume,
    parse_obj_type,
    parse_verified_sha,
    parse_vm_volume,
)
from .placement import INSIDE, Placement, split, undo
from .resolver import Resolution, Resolver
from .stores import Store
from .viewrename import Rename

log = logging.getLogger(__name__)

#: Bound once: on Python 3.11 reading an enum member off its class costs some
#: 60 ns, and :meth:`View.locate` runs on every request.
_PREPARED: str = ViewName.PREPARED

_AREA_KIND = {"pending": Kind.PENDING, "verifier": Kind.VERIFIER, "verified": Kind.VERIFIED}

class View:
    """The namespace of the mounted views over one device."""

    def __init__(self, layout: Layout, backing: Backing, index: Index, resolver: Resolver,
                 stage: str, views: tuple[str, ...]) -> None:
        self.layout = layout
        self.backing = backing
        self.index = index
        self.resolver = resolver
        self.stage = stage
        self.views = views
        self._rename = Rename(self)

    # -- where things are -------------------------------------------------------
    def locate(self, vpath: str) -> tuple[Store, str, Record | None]:
        """The store and relative path backing *vpath*, and its index record."""
        rec = self.index.records.get(vpath)
        if rec is not None:
            return self.backing.get(rec.store), rec.rel, rec
        top, rest = split(vpath)
        if top == _PREPARED and "/" in rest:
            head, _, tail = rest.partition("/")
            rec = self.index.records.get(f"prepared/{head}")
            if rec is not None:
                return self.backing.get(rec.store), f"{rec.rel}/{tail}", None
        if top not in self.views:
            raise FileNotFoundError(errno.ENOENT, "no such view", vpath)
        return self.backing.get(top), rest, None

    def lstat(self, vpath: str) -> os.stat_result:
        store, rel, _ = self.locate(vpath)
        return store.lstat(rel)

    def names_beneath(self, vdir: str) -> tuple[Store, str]:
        """Where the names in the view directory *vdir* that have no record of
        their own are: one backing directory (a store and a path in it), so a
        listing can stat them relative to it instead of locating each
        (:meth:`locate` gives the same answer for every such name; the names
        with a record are :attr:`Index.children` of *vdir*)."""
        top, rest = split(vdir)
        if top == _PREPARED and rest:
            head, _, tail = rest.partition("/")
            rec = self.index.records.get(f"prepared/{head}")
            if rec is not None:
                return self.backing.get(rec.store), f"{rec.rel}/{tail}" if tail else rec.rel
        if top not in self.views:
            raise FileNotFoundError(errno.ENOENT, "no such view", vdir)
        return self.backing.get(top), rest

    def listdir(self, vdir: str) -> list[str]:
        """Names in the view directory *vdir*: the legacy store's plus the index's.

        In the backing store's order (the caller snapshots it; no sort needed)."""
        return list(self.iter_names(vdir))

    def iter_names(self, vdir: str) -> Iterator[str]:
        """:meth:`listdir`, one name at a time as the backing directory is read."""
        store, rel, _ = self.locate(vdir)
        placed = self.index.children.get(vdir)
        if not placed:
            yield from store.iter_names(rel)
            return
        seen = set()
        for name in store.iter_names(rel):
            if name in placed:
                seen.add(name)
            yield name
        yield from placed.difference(seen)

    # -- where new things go ---------------------------------------------------
    def inside(self, vpath: str) -> Placement | None:
        """A name inside a placed directory (a container volume) lives there too."""
        top, rest = split(vpath)
        if top != ViewName.PREPARED or "/" not in rest:
            return None
        head, _, tail = rest.partition("/")
        rec = self.index.records.get(f"prepared/{head}")
        if rec is None:
            return None
        return Placement(rec.store, f"{rec.rel}/{tail}", Kind.OTHER, INSIDE)

    def plain_place(self, vpath: str) -> Placement:
        """Where a symbolic link or special file named *vpath* is made: never placed."""
        top, rest = split(vpath)
        return self.inside(vpath) or Placement(top, rest)

    def placement(self, vpath: str, is_dir: bool) -> Placement:
        """Where a new object named *vpath* belongs in the current stage."""
        inside = self.inside(vpath)
        if inside is not None:
            return inside
        top, rest = split(vpath)
        legacy = Placement(top, rest)
        if self.stage not in PLACING_STAGES:
            return legacy
        parts = rest.split("/")
        try:
            if top == ViewName.IMG and len(parts) == 1 and not is_dir:
                res = self.resolver.resolve_vm(parse_vm_volume(parts[0]))
                return self._volume(res, vpath, Kind.VM_VOLUME) or legacy
            if top == ViewName.PREPARED and len(parts) == 1 and is_dir:
                res = self.resolver.resolve_container(parse_container_volume(parts[0]))
                return self._volume(res, vpath, Kind.OCI_VOLUME) or legacy
            if top == ViewName.DOWNLOADS and len(parts) == 4 and not is_dir:
                return self._download(parts) or legacy
        except NotAVolume:
            return legacy
        return legacy

    def _volume(self, res: Resolution, vpath: str, kind: str) -> Placement | None:
        """The new volume's place: its final name, the unresolved area while
        nothing maps it, or None (the legacy store) when the rules keep it there."""
        if res.target is None or res.location is None:
            if res.by_rule:
                return None
            return Placement(StoreKey.UNRESOLVED, vpath, kind, State.UNRESOLVED)
        rel = os.path.relpath(res.target, self.layout.path(res.location))
        return Placement(res.location, rel, kind, State.NEW)

    def _download(self, parts: list[str]) -> Placement | None:
        obj_type = parse_obj_type(parts[0])
        area_name, directory, file_name = parts[1], parts[2], parts[3]
        if area_name not in _AREA_KIND:
            return None
        area = DownloadArea(area_name)
        check_component(file_name)
        if area is DownloadArea.VERIFIED:
            directory = parse_verified_sha(directory)
        else:
            check_component(directory)
            if not (is_uuid(directory) or is_sha256(directory)):
                return None
        res = self.resolver.resolve_download(obj_type, area, directory, file_name)
        if res.target is None or res.location is None:
            return None     # the rules keep it in the legacy store (eve: in progress)
        rel = os.path.relpath(res.target, self.layout.path(res.location))
        return Placement(res.location, rel, _AREA_KIND[area_name], State.NEW)

    def usable(self, p: Placement) -> bool:
        """A new-layout placement is usable when its store is open and the name is free."""
        if p.is_legacy:
            return True
        if not self.backing.has(p.store):
            return False
        return not self.backing.get(p.store).exists(p.rel)

    def place_new(self, vpath: str, is_dir: bool) -> Placement:
        """:meth:`placement`, falling back to the legacy store when the new
        location is taken (never clobber what is there) or unavailable."""
        p = self.placement(vpath, is_dir)
        if self.usable(p):
            return p
        if p.state == State.NEW:
            alt = Placement(StoreKey.UNRESOLVED, vpath, p.kind, State.UNRESOLVED)
            if p.kind in (Kind.VM_VOLUME, Kind.OCI_VOLUME) and self.usable(alt):
                log.debug("%s: %s/%s is taken; parked in the unresolved area",
                          vpath, p.store, p.rel)
                return alt
        top, rest = split(vpath)
        return Placement(top, rest)

    def prepare(self, p: Placement) -> tuple[Store, list[str]]:
        """The store of *p*, with the directories above a new-layout name made;
        returns the store and the directories made (to undo on failure)."""
        store = self.backing.get(p.store)
        head = p.rel.rpartition("/")[0]
        if not p.is_legacy and head:
            return store, store.makedirs(head, 0o700)
        return store, []

    # -- changes ------------------------------------------------------------------
    # Every change is all or nothing as the agent sees it: until its commit
    # point (the index write or the one syscall that makes it visible) a
    # failure undoes what was done (directories made, index rows written) and
    # raises the failure's own errno; after it, only clean-up is left, which
    # logs instead of failing a change that has happened. A crash (nothing
    # runs after it: BaseException in tests) is left to the recovery
    # (:func:`compatfs.migration.recover`).

    def create(self, vpath: str, flags: int, mode: int) -> tuple[int, Placement]:
        """Create and open the file *vpath*; returns (fd, where it went)."""
        p = self.place_new(vpath, is_dir=False)
        if p.is_legacy:
            return self.backing.get(p.store).open(p.rel, flags | os.O_CREAT, mode), p
        store, made = self.prepare(p)
        try:
            self.index.put(Record(vpath, p.store, p.rel, p.kind, p.state))
            try:
                fd = store.open(p.rel, flags | os.O_CREAT | os.O_EXCL, mode)
            except Exception:
                self.forget(vpath)
                raise
        except Exception:
            store.remove_made(made)
            raise
        return fd, p

    def mkdir(self, vpath: str, mode: int) -> Placement:
        """Make the directory *vpath*. A container volume made at its final name
        holds ``snapshotid.txt`` from the start (:meth:`_wants_snapshot_id`):
        written before the reply, and if it cannot be, the mkdir is undone."""
        p = self.place_new(vpath, is_dir=True)
        if p.is_legacy:
            self.backing.get(p.store).mkdir(p.rel, mode)
            return p
        store, made = self.prepare(p)
        try:
            self.index.put(Record(vpath, p.store, p.rel, p.kind, p.state))
            try:
                store.mkdir(p.rel, mode)
                if self._wants_snapshot_id(p):
                    try:
                        snapshotid.write(store, p.rel, snapshotid.legacy_name(vpath))
                    except Exception:
                        undo(vpath, store.remove, p.rel)   # made just now: nothing else in it
                        raise
            except Exception:
                self.forget(vpath)
                raise
        except Exception:
            store.remove_made(made)
            raise
        return p

    def _wants_snapshot_id(self, p: Placement) -> bool:
        """A directory placed at *p* carries ``snapshotid.txt`` (layout eve, a container
        volume at its final name: old EVE keys its containerd snapshot by the legacy
        name, new EVE reads the key from there; docs/eve.md, E5)."""
        return p.state == State.NEW and snapshotid.wanted(self.layout.rules, p.kind)

    def placed(self, rec: Record | None, vpath: str) -> bool:
        """*rec* places *vpath* outside the legacy store (not a record kept
        only for its state or reason, whose bytes are at the legacy path)."""
        return rec is not None and rec.store != split(vpath)[0]

    def forget(self, vpath: str) -> None:
        """Drop the record of *vpath*, whose bytes are not (or no longer) at
        its place. Never raises: if the index cannot be written now (a full
        disk), the record goes from memory, so the agent sees what is true,
        and the next start drops the row on disk (its bytes are not there)."""
        try:
            self.index.delete(vpath)
        except Exception as exc:  # noqa: BLE001 - the change has happened
            log.warning("%s: cannot drop its index record (%s); it goes at the next start",
                        vpath, exc)
            self.index._forget(vpath)

    def unlink(self, vpath: str) -> None:
        store, rel, rec = self.locate(vpath)
        if rec is None:
            store.unlink(rel)
            return
        try:
            store.unlink(rel)
        except FileNotFoundError:
            pass
        self.forget(vpath)
        if self.placed(rec, vpath):
            self.drop_legacy_shadow(vpath, directory=False)
            self.tidy_new_dirs(rec.store, rel)

    def rmdir(self, vpath: str) -> None:
        store, rel, rec = self.locate(vpath)
        if rec is not None:
            self._rmdir_recorded(vpath, store, rel, rec)
            self.forget(vpath)
            if self.placed(rec, vpath):
                self.drop_legacy_shadow(vpath, directory=True)
            return
        if vpath in self.index.children:
            raise OSError(errno.ENOTEMPTY, os.strerror(errno.ENOTEMPTY), vpath)
        store.rmdir(rel)

    def _rmdir_recorded(self, vpath: str, store: Store, rel: str, rec: Record) -> None:
        """rmdir(2) of a directory with a record. A container volume whose only
        entry left is the ``snapshotid.txt`` compatfs wrote (a regular file holding
        its legacy name) is empty to the agent, which never made that file: it goes
        with the directory; should the rmdir still fail, it is written back."""
        try:
            store.rmdir(rel)
            return
        except OSError as exc:
            if exc.errno != errno.ENOTEMPTY or rec.kind != Kind.OCI_VOLUME \
                    or store.listdir(rel) != [snapshotid.SNAPSHOT_ID_FILE]:
                raise
            name = snapshotid.legacy_name(vpath)
            if not snapshotid.drop(store, rel, name):
                raise
        try:
            store.rmdir(rel)
        except Exception:
            undo(vpath, snapshotid.write, store, rel, name)
            raise

    def drop_legacy_shadow(self, vpath: str, directory: bool) -> None:
        """Remove a legacy-store object the record shadowed (a copy left behind)."""
        top, rest = split(vpath)
        legacy = self.backing.get(top)
        try:
            (legacy.rmdir if directory else legacy.unlink)(rest)
        except (FileNotFoundError, NotADirectoryError):
            pass
        except OSError as exc:
            log.warning("%s: could not remove the legacy copy: %s", vpath, exc.strerror)

    def tidy_new_dirs(self, store_key: str, rel: str) -> None:
        """Remove now-empty parent directories a placement created (downloads)."""
        if store_key not in (StoreKey.DOWNLOADER, StoreKey.VERIFIER):
            return
        store = self.backing.get(store_key)
        head = rel.rpartition("/")[0]
        while head:
            try:
                store.rmdir(head)
            except OSError:
                return
            head = head.rpartition("/")[0]
    def rename(self, old: str, new: str, noreplace: bool = False) -> None:
        """Rename *old* to *new* in the view, replacing *new* like rename(2)
        (:class:`compatfs.viewrename.Rename`)."""
        self._rename(old, new, noreplace)

    def link(self, old: str, new: str) -> None:
        src_store, src_rel, src_rec = self.locate(old)
        p = self.placement(new, is_dir=False)
        if self.placed(src_rec, old) or not p.is_legacy:
            raise OSError(errno.EXDEV, "hard links only within the legacy store", new)
        new_top, new_rest = split(new)
        src_store.link(src_rel, self.backing.get(new_top), new_rest)

    def replace_unresolved(self) -> list[tuple[str, Placement]]:
        """Move objects parked in the unresolved area to their final names,
        now that the config may map them. Returns the objects moved."""
        moved = []
        for rec in [r for r in self.index.records.values() if r.state == State.UNRESOLVED]:
            want = self.placement(rec.view, is_dir=rec.kind == Kind.OCI_VOLUME)
            if want.state != State.NEW or not self.usable(want):
                continue
            cur = self.backing.get(rec.store)
            # a container volume carries snapshotid.txt at its final name: written
            # into it first, so it arrives with it (taken out again if it does not)
            sid, name = self._wants_snapshot_id(want), snapshotid.legacy_name(rec.view)
            if sid:
                try:
                    snapshotid.write(cur, rec.rel, name)
                except OSError as exc:
                    log.warning("%s: stays parked: cannot write %s in it: %s", rec.view,
                                snapshotid.SNAPSHOT_ID_FILE, exc.strerror or exc)
                    continue
            try:
                self.index.put(Record(rec.view, want.store, want.rel, want.kind, want.state,
                                      rec.store, rec.rel))
            except Exception:
                if sid:
                    undo(rec.view, snapshotid.drop, cur, rec.rel, name)
                raise
            try:
                cur.rename(rec.rel, self.prepare(want)[0], want.rel)
            except OSError as exc:
                self.index.put(rec)
                if sid:
                    undo(rec.view, snapshotid.drop, cur, rec.rel, name)
                if exc.errno != errno.EXDEV:
                    log.warning("%s: cannot move to %s/%s: %s", rec.view, want.store, want.rel,
                                exc.strerror)
                continue
            self.index.put(Record(rec.view, want.store, want.rel, want.kind, want.state))
            moved.append((rec.view, want))
        return moved
