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
else stays in the legacy store. A rename keeps bytes on their side of the
vault boundary when they cannot move by ``rename(2)``, so an agent never
waits for a copy and never sees ``EXDEV``.

This module decides; :mod:`compatfs.backing` does the syscalls;
:mod:`compatfs.operations` turns FUSE requests into calls here.
"""

from __future__ import annotations

import errno
import logging
import os
import stat
from dataclasses import dataclass

from .backing import Backing, Store
from .index import Index, Record
from .layout import Layout
from .names import (
    DownloadArea, NotAVolume, check_component, is_sha256, is_uuid, parse_container_volume,
    parse_obj_type, parse_verified_sha, parse_vm_volume,
)
from .resolver import Resolution, Resolver

log = logging.getLogger(__name__)

#: Stages in which new objects are placed in the new layout.
PLACING_STAGES = frozenset({"redirect", "migrate"})

_AREA_KIND = {"pending": "pending", "verifier": "verifier", "verified": "verified"}


@dataclass(frozen=True, slots=True)
class Placement:
    """Where an object is, or is to be: a store key and a path relative to it."""

    store: str
    rel: str
    kind: str = "other"
    state: str = "legacy"   # legacy, new, unresolved; inside: within a placed directory

    @property
    def is_legacy(self) -> bool:
        """No index record: the legacy store, or inside a placed directory."""
        return self.state in ("legacy", "inside")


def split(vpath: str) -> tuple[str, str]:
    """``img/a/b`` -> (``img``, ``a/b``)."""
    top, _, rest = vpath.partition("/")
    return top, rest


def join(vdir: str, name: str) -> str:
    return f"{vdir}/{name}" if vdir else name


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

    # -- where things are -------------------------------------------------------
    def locate(self, vpath: str) -> tuple[Store, str, Record | None]:
        """The store and relative path backing *vpath*, and its index record."""
        rec = self.index.records.get(vpath)
        if rec is not None:
            return self.backing.get(rec.store), rec.rel, rec
        top, rest = split(vpath)
        if top == "prepared" and "/" in rest:
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

    def listdir(self, vdir: str) -> list[str]:
        """Names in the view directory *vdir*: the legacy store's plus the index's.

        In the backing store's order (the caller snapshots it; no sort needed)."""
        store, rel, rec = self.locate(vdir)
        names = store.listdir(rel)
        placed = self.index.children.get(vdir)
        if placed:
            names.extend(placed.difference(names))
        return names

    # -- where new things go ---------------------------------------------------
    def _inside(self, vpath: str) -> Placement | None:
        """A name inside a placed directory (a container volume) lives there too."""
        top, rest = split(vpath)
        if top != "prepared" or "/" not in rest:
            return None
        head, _, tail = rest.partition("/")
        rec = self.index.records.get(f"prepared/{head}")
        if rec is None:
            return None
        return Placement(rec.store, f"{rec.rel}/{tail}", "other", "inside")

    def plain_place(self, vpath: str) -> Placement:
        """Where a symbolic link or special file named *vpath* is made: never placed."""
        top, rest = split(vpath)
        return self._inside(vpath) or Placement(top, rest)

    def placement(self, vpath: str, is_dir: bool) -> Placement:
        """Where a new object named *vpath* belongs in the current stage."""
        inside = self._inside(vpath)
        if inside is not None:
            return inside
        top, rest = split(vpath)
        legacy = Placement(top, rest)
        if self.stage not in PLACING_STAGES:
            return legacy
        parts = rest.split("/")
        try:
            if top == "img" and len(parts) == 1 and not is_dir:
                res = self.resolver.resolve_vm(parse_vm_volume(parts[0]))
                return self._volume(res, vpath, "vm-volume")
            if top == "prepared" and len(parts) == 1 and is_dir:
                res = self.resolver.resolve_container(parse_container_volume(parts[0]))
                return self._volume(res, vpath, "oci-volume")
            if top == "downloads" and len(parts) == 4 and not is_dir:
                return self._download(parts) or legacy
        except NotAVolume:
            return legacy
        return legacy

    def _volume(self, res: Resolution, vpath: str, kind: str) -> Placement:
        if res.target is None or res.location is None:
            return Placement("unresolved", vpath, kind, "unresolved")
        rel = os.path.relpath(res.target, self.layout.path(res.location))
        return Placement(res.location, rel, kind, "new")

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
        assert res.target is not None and res.location is not None
        rel = os.path.relpath(res.target, self.layout.path(res.location))
        return Placement(res.location, rel, _AREA_KIND[area_name], "new")

    def _usable(self, p: Placement) -> bool:
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
        if self._usable(p):
            return p
        if p.state == "new":
            alt = Placement("unresolved", vpath, p.kind, "unresolved")
            if p.kind in ("vm-volume", "oci-volume") and self._usable(alt):
                log.debug("%s: %s/%s is taken; parked in the unresolved area", vpath, p.store, p.rel)
                return alt
        top, rest = split(vpath)
        return Placement(top, rest)

    def _prepare(self, p: Placement) -> Store:
        store = self.backing.get(p.store)
        head = p.rel.rpartition("/")[0]
        if not p.is_legacy and head:
            store.makedirs(head, 0o700)
        return store

    # -- changes ------------------------------------------------------------------
    def create(self, vpath: str, flags: int, mode: int) -> tuple[int, Placement]:
        """Create and open the file *vpath*; returns (fd, where it went)."""
        p = self.place_new(vpath, is_dir=False)
        store = self._prepare(p)
        if p.is_legacy:
            return store.open(p.rel, flags | os.O_CREAT, mode), p
        self.index.put(Record(vpath, p.store, p.rel, p.kind, p.state))
        try:
            fd = store.open(p.rel, flags | os.O_CREAT | os.O_EXCL, mode)
        except BaseException:
            self.index.delete(vpath)
            raise
        return fd, p

    def mkdir(self, vpath: str, mode: int) -> Placement:
        p = self.place_new(vpath, is_dir=True)
        store = self._prepare(p)
        if not p.is_legacy:
            self.index.put(Record(vpath, p.store, p.rel, p.kind, p.state))
        try:
            store.mkdir(p.rel, mode)
        except BaseException:
            if not p.is_legacy:
                self.index.delete(vpath)
            raise
        return p

    def unlink(self, vpath: str) -> None:
        store, rel, rec = self.locate(vpath)
        if rec is None:
            store.unlink(rel)
            return
        try:
            store.unlink(rel)
        except FileNotFoundError:
            pass
        self.index.delete(vpath)
        self._drop_legacy_shadow(vpath, directory=False)
        self._tidy_new_dirs(rec.store, rel)

    def rmdir(self, vpath: str) -> None:
        store, rel, rec = self.locate(vpath)
        if rec is not None:
            store.rmdir(rel)
            self.index.delete(vpath)
            self._drop_legacy_shadow(vpath, directory=True)
            return
        if vpath in self.index.children:
            raise OSError(errno.ENOTEMPTY, os.strerror(errno.ENOTEMPTY), vpath)
        store.rmdir(rel)

    def _drop_legacy_shadow(self, vpath: str, directory: bool) -> None:
        """Remove a legacy-store object the record shadowed (a copy left behind)."""
        top, rest = split(vpath)
        legacy = self.backing.get(top)
        try:
            (legacy.rmdir if directory else legacy.unlink)(rest)
        except (FileNotFoundError, NotADirectoryError):
            pass
        except OSError as exc:
            log.warning("%s: could not remove the legacy copy: %s", vpath, exc.strerror)

    def _tidy_new_dirs(self, store_key: str, rel: str) -> None:
        """Remove now-empty parent directories a placement created (downloads)."""
        if store_key not in ("downloader", "verifier"):
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
        """Rename *old* to *new* in the view, replacing *new* like rename(2)."""
        src_store, src_rel, src_rec = self.locate(old)
        st = src_store.lstat(src_rel)
        is_dir = stat.S_ISDIR(st.st_mode)
        dst_exists = self._exists(new)
        if dst_exists and noreplace:
            raise FileExistsError(errno.EEXIST, os.strerror(errno.EEXIST), new)
        if dst_exists and is_dir and new in self.index.children:
            raise OSError(errno.ENOTEMPTY, os.strerror(errno.ENOTEMPTY), new)
        if src_rec is not None:
            self._rename_placed(src_rec, new, is_dir, dst_exists)
            return
        src_in, dst_in = self._inside(old), self._inside(new)
        if src_in is None and dst_in is None:
            self._rename_legacy(old, new, is_dir, dst_exists)
            return
        # within placed directories (container volumes): rename(2) there, or EXDEV
        dst = dst_in or self.plain_place(new)
        src_store.rename(src_rel, self.backing.get(dst.store), dst.rel)

    def _exists(self, vpath: str) -> bool:
        try:
            self.lstat(vpath)
        except (FileNotFoundError, NotADirectoryError):
            return False
        return True

    def _remove_target(self, new: str, is_dir: bool) -> None:
        """rename(2) over an existing *new*: drop what the record of *new* pointed at."""
        rec = self.index.records.get(new)
        if rec is None:
            return
        store = self.backing.get(rec.store)
        try:
            (store.rmdir if is_dir else store.unlink)(rec.rel)
        except FileNotFoundError:
            pass
        self.index.delete(new)
        self._drop_legacy_shadow(new, directory=is_dir)

    def _rename_legacy(self, old: str, new: str, is_dir: bool, dst_exists: bool) -> None:
        """Bytes in the legacy store stay there; the migrator places them later."""
        old_top, old_rest = split(old)
        new_top, new_rest = split(new)
        if dst_exists:
            self._remove_target(new, is_dir)
        self.backing.get(old_top).rename(old_rest, self.backing.get(new_top), new_rest)
        if is_dir and old in self.index.children or (is_dir and self.index.has_below(old)):
            self.index.rename_prefix(old, new)

    def _rename_placed(self, rec: Record, new: str, is_dir: bool, dst_exists: bool) -> None:
        """A placed object: follow the new name to its place when rename(2) can."""
        if dst_exists and new in self.index.records:
            self._remove_target(new, is_dir)
        elif dst_exists:
            # a legacy-store object under the new name is replaced, as by
            # rename(2); left underneath, it would reappear when the name moves on
            top, rest = split(new)
            legacy = self.backing.get(top)
            (legacy.rmdir if is_dir else legacy.unlink)(rest)
        want = self.placement(new, is_dir)
        cur_store = self.backing.get(rec.store)
        if want.is_legacy or (want.store, want.rel) == (rec.store, rec.rel) \
                or not self._usable(want):
            # keep the bytes where they are; only the legacy name changes
            self.index.move(rec.view, Record(new, rec.store, rec.rel,
                                             want.kind if not want.is_legacy else rec.kind,
                                             rec.state))
            return
        self.index.move(rec.view, Record(new, want.store, want.rel, want.kind, want.state,
                                         rec.store, rec.rel))
        target = self._prepare(want)
        try:
            cur_store.rename(rec.rel, target, want.rel)
        except OSError as exc:
            if exc.errno != errno.EXDEV:
                self.index.move(new, Record(rec.view, rec.store, rec.rel, rec.kind, rec.state))
                raise
            # across the vault boundary: the bytes stay, the migrator moves them
            self.index.put(Record(new, rec.store, rec.rel, want.kind, rec.state))
            return
        self.index.put(Record(new, want.store, want.rel, want.kind, want.state))
        self._tidy_new_dirs(rec.store, rec.rel)

    def link(self, old: str, new: str) -> None:
        src_store, src_rel, src_rec = self.locate(old)
        p = self.placement(new, is_dir=False)
        if src_rec is not None or not p.is_legacy:
            raise OSError(errno.EXDEV, "hard links only within the legacy store", new)
        new_top, new_rest = split(new)
        src_store.link(src_rel, self.backing.get(new_top), new_rest)

    # -- recovery -----------------------------------------------------------------
    def recover(self) -> list[str]:
        """Finish or undo moves a crash interrupted; drop records whose bytes are gone.

        Returns what was done, one line per object, for the log.
        """
        done: list[str] = []
        for rec in list(self.index.records.values()):
            try:
                self._recover_one(rec, done)
            except OSError as exc:  # one bad record never stops the others
                done.append(f"{rec.view}: not recovered: {exc}")
        return done

    def _recover_one(self, rec: Record, done: list[str]) -> None:
        if not self.backing.has(rec.store):
            return  # a location not available now (locked vault): leave it be
        store = self.backing.get(rec.store)
        if rec.prev_store is not None and rec.prev_rel is not None:
            if not store.exists(rec.rel) and self.backing.has(rec.prev_store) \
                    and self.backing.get(rec.prev_store).exists(rec.prev_rel):
                try:
                    self.backing.get(rec.prev_store).rename(rec.prev_rel, self._prepare(
                        Placement(rec.store, rec.rel, rec.kind, rec.state)), rec.rel)
                    done.append(f"{rec.view}: finished an interrupted move")
                except OSError:
                    # back in the unresolved area it is unresolved again, so a
                    # later config change can still place it
                    state = "unresolved" if rec.prev_store == "unresolved" else rec.state
                    self.index.put(Record(rec.view, rec.prev_store, rec.prev_rel,
                                          rec.kind, state))
                    done.append(f"{rec.view}: rolled back an interrupted move")
                    return
            self.index.put(Record(rec.view, rec.store, rec.rel, rec.kind, rec.state))
        if not store.exists(rec.rel):
            self.index.delete(rec.view)
            done.append(f"{rec.view}: its bytes are gone; record dropped")
            return
        top, rest = split(rec.view)
        parent = rest.rpartition("/")[0]
        if top in self.views and parent:
            self.backing.get(top).makedirs(parent)

    def replace_unresolved(self) -> list[tuple[str, Placement]]:
        """Move objects parked in the unresolved area to their final names,
        now that the config may map them. Returns the objects moved."""
        moved = []
        for rec in [r for r in self.index.records.values() if r.state == "unresolved"]:
            want = self.placement(rec.view, is_dir=rec.kind == "oci-volume")
            if want.state != "new" or not self._usable(want):
                continue
            cur = self.backing.get(rec.store)
            self.index.put(Record(rec.view, want.store, want.rel, want.kind, want.state,
                                  rec.store, rec.rel))
            try:
                cur.rename(rec.rel, self._prepare(want), want.rel)
            except OSError as exc:
                self.index.put(rec)
                if exc.errno != errno.EXDEV:
                    log.warning("%s: cannot move to %s/%s: %s", rec.view, want.store, want.rel,
                                exc.strerror)
                continue
            self.index.put(Record(rec.view, want.store, want.rel, want.kind, want.state))
            moved.append((rec.view, want))
        return moved
