"""The crash-safe steps a migration and a rollback are made of.

Every step commits its intent to the index before it touches bytes, so that
``kill -9`` or a power cut between any two leaves a record the recovery can
finish or undo. Migrate and rollback share the same steps: a temporary in the
destination store's staging directory (:func:`tmp_place`, named by
:func:`tmp_leaf`, so no agent's file is ever taken for one), renamed into
place after whatever is there is set aside (:meth:`Steps.rename_into_place`),
the ``copied``/``switched`` commits around it (:meth:`Steps.place`), the open
handles switched to the copy (:meth:`Steps.switch_handles`), the legacy
original dropped (:meth:`Steps.finish_removal`), a half-made copy dropped
(:meth:`Steps.drop_copy`), a set-aside finished (:meth:`Steps.finish_set_aside`),
a rollback finished (:meth:`Steps.finish_rollback`) and a failed attempt put
back in order (:meth:`Steps.settle`). The scheduler decides what moves and
when; these only move.
"""

from __future__ import annotations

import hashlib
import logging
import os
import stat
from collections.abc import Callable

from .. import snapshotid
from ..backing import Backing
from ..changes import FileKey
from ..enums import MIGRATING_STATES, Kind, State, StoreKey
from ..handles import HandleTable
from ..index import Index
from ..indexformat import Record
from ..placement import split
from ..scan import TMP_DIR
from ..stores import Side, Store
from .faults import Faults
from .progress import Item, Switch, why

log = logging.getLogger(__name__)

#: The suffix of a temporary's name beside its target (compatfs before temporaries
#: had a directory of their own).
OLD_TMP_SUFFIX = ".compatfs-tmp"


def tmp_leaf(rel: str) -> str:
    """The name of the temporary of *rel* in its store's staging directory: the
    sha256 of *rel*, one name per target, of fixed length whatever *rel* is."""
    return hashlib.sha256(os.fsencode(rel)).hexdigest()


def tmp_place(store: Store, rel: str) -> tuple[Store, str]:
    """Where the temporary of *rel* (a name in *store*) is made: (store, name)."""
    return store.staging.store, store.staging.name(tmp_leaf(rel))


def signature(st: os.stat_result) -> str:
    """A file as it was when copied: changed since if any of these differ."""
    return f"{st.st_dev}:{st.st_ino}:{st.st_size}:{st.st_mtime_ns}"


def fsync_parent(store: Store, rel: str) -> None:
    """Make a name made or removed in *store* durable: fsync its directory."""
    head = rel.rpartition("/")[0]
    fd = store.open_dir(head)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def drop_tmp_dir(store: Store) -> None:
    """Remove the store's staging directory if it is empty (a legacy store shows
    old EVE exactly what it had once a rollback is done), and the one an older
    compatfs made inside a new-layout store."""
    store.staging.drop_if_empty()
    if store.staging.store is not store:
        Side(store, TMP_DIR).drop_if_empty()


class Steps:
    """The steps over one device's stores and index.

    *switched* is told the legacy name of every object that is served from its
    new place from now on, and how it got there (:class:`Switch`); *handles*
    (the FUSE layer's open files, or None when nothing is served) are re-opened
    on a file's copy when it switches."""

    def __init__(self, backing: Backing, index: Index, faults: Faults,
                 handles: HandleTable | None = None,
                 switched: Callable[[str, Switch], None] | None = None) -> None:
        self.backing = backing
        self.index = index
        self.faults = faults
        self.handles = handles
        self._switched = switched

    def switched(self, vpath: str, how: Switch) -> None:
        """*vpath* is served from its new place now, got there *how*."""
        if self._switched is not None:
            self._switched(vpath, how)

    # -- temporaries ------------------------------------------------------------------
    def temporaries(self, store: Store, rel: str) -> list[tuple[Store, str]]:
        """Every place a temporary of *rel* in *store* may be: its staging
        directory, then where older compatfs versions made it (``.compatfs-tmp/``
        in the store; ``<rel>.compatfs-tmp`` unless that name is an object of
        the index, e.g. an agent's own file placed there)."""
        places = [tmp_place(store, rel)]
        if store.staging.store is not store:
            places.append((store, f"{TMP_DIR}/{tmp_leaf(rel)}"))
        old = rel + OLD_TMP_SUFFIX
        if not any(r.store == store.key and r.rel == old for r in self.index.records.values()):
            places.append((store, old))
        return places

    def find_temporary(self, store: Store, rel: str) -> tuple[Store, str] | None:
        for place in self.temporaries(store, rel):
            if place[0].exists(place[1]):
                return place
        return None

    def drop_copy(self, item: Item, dst: Store, renamed_into_place: bool) -> None:
        """Remove the temporary of *item*; with *renamed_into_place* (``copied``), the
        copy at the target's name if the temporary is gone (it was renamed)."""
        try:
            removed = False
            for store, name in self.temporaries(dst, item.dst_rel):
                removed = store.remove(name) or removed
            if not removed and renamed_into_place:
                dst.remove(item.dst_rel)
        except NotADirectoryError:
            pass
        except OSError as exc:
            # e.g. ELOOP: a symbolic link where the destination directory should be.
            # The object fails alone; the other objects and the views go on.
            log.warning("%s: cannot remove its copy in %s: %s", item.vpath, item.dst_store,
                        exc)

    def tidy_temporaries(self) -> None:
        """Between two passes (nothing copies): remove the temporaries no record
        is copying in a new-layout store's staging directory, and what an older
        compatfs left in ``<store>/.compatfs-tmp/`` there (new EVE removes what
        it cannot parse from its volume directories, or trips on it); then the
        directories left empty. A legacy store's (rollback's) is only removed
        when empty."""
        busy = {(r.target_store, tmp_leaf(r.target_rel)) for r in self.index.records.values()
                if r.state in MIGRATING_STATES and r.target_store and r.target_rel}
        for key, store in self.backing.stores.items():
            if store.staging.store is store:
                drop_tmp_dir(store)
                continue
            for place in (store.staging, Side(store, TMP_DIR)):
                try:
                    leaves = place.store.listdir(place.dir)
                except OSError:
                    continue   # absent (or not a directory: left alone)
                for leaf in leaves:
                    if (key, leaf) in busy:
                        continue
                    try:
                        place.store.remove(place.name(leaf))
                    except OSError as exc:
                        log.warning("cannot remove the temporary %s: %s", place.shown(leaf),
                                    why(exc))
                place.drop_if_empty()

    # -- into place -------------------------------------------------------------------
    def rename_into_place(self, dst: Store, rel: str, tmp: tuple[Store, str]) -> str | None:
        """The temporary *tmp* (store, name) becomes *rel* in *dst*. Whatever is at
        *rel* already is set aside first, never replaced (the design note's older
        destination, or one that appeared since the plan); returns the reason to
        report then."""
        reason = self.displace(dst, rel)
        tmp[0].rename(tmp[1], dst, rel)
        fsync_parent(dst, rel)
        return reason

    def displace(self, dst: Store, rel: str) -> str | None:
        """Set aside what is at *rel* in *dst* (a destination the legacy copy wins
        over); the reason to report, or None if nothing was there."""
        if not dst.exists(rel):
            return None
        where = dst.move_aside(rel)
        fsync_parent(dst, rel)
        reason = (f"the destination existed and was older; it was set aside at "
                  f"{dst.aside_shown(where)}")
        log.warning("%s/%s: %s", dst.key, rel, reason)
        return reason

    def place(self, item: Item, dst: Store, st: os.stat_result) -> None:
        """The complete copy of the source as *st* describes it is at its temporary
        name: commit that, rename it into place, commit the switch. A crash between
        any two steps is finished by the recovery (``copied``)."""
        self.index.put(Record(item.vpath, item.src_store, item.src_rel, item.kind, State.COPIED,
                              target_store=item.dst_store, target_rel=item.dst_rel,
                              sig=signature(st)))
        self.faults.hit("copied")
        reason = self.rename_into_place(dst, item.dst_rel, tmp_place(dst, item.dst_rel))
        self.faults.hit("renamed-into-place")
        self.index.put(Record(item.vpath, item.dst_store, item.dst_rel, item.kind,
                              State.SWITCHED, target_store=item.src_store,
                              target_rel=item.src_rel, sig=signature(st), reason=reason))

    def switch_handles(self, key: FileKey, dst: Store, rel: str) -> None:
        """Re-open every handle agents hold on the file *key* on its copy *dst*/*rel*."""
        if self.handles is not None:
            self.handles.switch(key, dst, rel)

    # -- after the switch -------------------------------------------------------------
    def remove_legacy(self, item: Item) -> None:
        """Drop the legacy original, only if it is still the file that was copied."""
        rec = self.index.get(item.vpath)
        if rec is None or rec.state != State.SWITCHED:
            return
        self.finish_removal(rec)

    def finish_removal(self, rec: Record) -> None:
        """A ``switched`` record: remove the legacy original it names if it is still
        what was copied (else set it aside), then commit ``new``."""
        assert rec.target_store is not None and rec.target_rel is not None
        legacy = self.backing.get(rec.target_store)
        try:
            st = legacy.lstat(rec.target_rel)
        except FileNotFoundError:
            st = None
        if st is not None:
            if stat.S_ISDIR(st.st_mode):
                legacy.remove(rec.target_rel)
            elif rec.sig is not None and signature(st) == rec.sig:
                legacy.unlink(rec.target_rel)
            else:
                where = legacy.move_aside(rec.target_rel)
                log.warning("%s: the legacy copy changed after it was copied; set aside at %s",
                            rec.view, legacy.aside_shown(where))
            fsync_parent(legacy, rec.target_rel)
        self.faults.hit("legacy-removed")
        self.index.put(Record(rec.view, rec.store, rec.rel, rec.kind, State.NEW,
                              reason=rec.reason))

    def finish_set_aside(self, rec: Record) -> str | None:
        """A set-aside was committed (a ``new`` record naming where the legacy copy
        goes) but the legacy copy may not have been moved: move it, drop the move
        from the record. Returns a line for the log if something was moved."""
        assert rec.target_store is not None and rec.target_rel is not None
        if not self.backing.has(rec.target_store):
            return None  # not served now: finished when it is
        legacy, rest = self.backing.get(rec.target_store), split(rec.view)[1]
        line = None
        aside_store, aside_rel = legacy.aside_place(rec.target_rel)
        if legacy.exists(rest) and not aside_store.exists(aside_rel):
            legacy.move_aside(rest, rec.target_rel)
            line = (f"{rec.view}: set the legacy copy aside at "
                    f"{legacy.aside_shown(rec.target_rel)}")
        self.index.put(Record(rec.view, rec.store, rec.rel, rec.kind, State.NEW,
                              reason=rec.reason))
        return line

    def finish_rollback(self, rec: Record) -> bool:
        """A ``rolling-back`` record whose legacy name is back in place (or was never
        reached): finish the rollback of it, or undo it. True if it was rolled back."""
        top, rest = split(rec.view)
        legacy, src = self.backing.get(top), self.backing.get(rec.store)
        if not legacy.exists(rest):
            self.index.put(Record(rec.view, rec.store, rec.rel, rec.kind, State.NEW))
            return False  # the move had not happened; the next run starts it again
        if rec.kind == Kind.OCI_VOLUME:
            # the legacy tree comes back as old EVE had it: without what the move added
            snapshotid.drop(legacy, rest, snapshotid.legacy_name(rec.view))
        if src.remove(rec.rel):
            fsync_parent(src, rec.rel)
        drop_tmp_dir(src)           # the migration's, left empty in the new layout
        for store, name in self.temporaries(legacy, rest):
            store.remove(name)
        drop_tmp_dir(legacy)
        self.index.delete(rec.view)
        return True

    # -- after a failure --------------------------------------------------------------
    def settle(self, item: Item) -> bool:
        """After an attempt at *item* ended (an error, an abort): bring its record to
        a state the views serve, with nothing half-made left. Past the point of no
        return (renamed, switched, set aside) the move is finished, as the recovery
        would; before it, the legacy object stays served and what was copied goes.
        True if the object ended up migrated.

        Faults of the test hook do not fire here. Index errors are raised (the
        caller keeps the object to record later); a temporary that cannot be
        removed is logged, never raised."""
        with self.faults.quiet():
            rec = self.index.get(item.vpath)
            state = rec.state if rec is not None else None
            if rec is not None and state == State.SWITCHED:
                self.finish_removal(rec)
                return True
            if rec is not None and state == State.NEW:
                if rec.target_store and rec.target_rel:
                    self.finish_set_aside(rec)
                return True
            dst = self.backing.stores.get(item.dst_store)
            if rec is not None and state == State.RENAMING:
                src = self.backing.stores.get(item.src_store)
                if dst is not None and src is not None and dst.exists(item.dst_rel) \
                        and not src.exists(item.src_rel):
                    self.index.put(Record(item.vpath, item.dst_store, item.dst_rel, item.kind,
                                          State.NEW))
                    self.switched(item.vpath, Switch.MOVED)
                    return True
            elif dst is not None:
                self.drop_copy(item, dst, renamed_into_place=state == State.COPIED)
            if rec is not None and state in MIGRATING_STATES:
                if item.src_store == StoreKey.UNRESOLVED:
                    self.index.put(Record(item.vpath, item.src_store, item.src_rel, item.kind,
                                          State.UNRESOLVED))
                else:
                    self.index.delete(item.vpath)
            return False
