"""Rollback: every placed or migrated object back to its legacy name.

A device leaving compatfs (stage ``rollback``) must hand old EVE exactly the
tree it had. Rollback moves each object back with the migration's own
guarantees and steps (:mod:`~compatfs.migration.steps`): a ``rolling-back``
record first, then a rename (or a copy into a temporary in the legacy store,
renamed into place), then the new copy removed; a crash between any two is
finished by the recovery. A legacy copy newer than the placed one wins.
"""

from __future__ import annotations

import errno
import logging
import os
import stat

import trio

from .. import filecopy, treecopy
from ..enums import State, StoreKey
from ..indexformat import Record
from ..placement import split
from ..stores import Store
from .moves import refuse_if_held
from .scheduler import Migrator
from .steps import drop_tmp_dir, fsync_parent, signature, tmp_place

log = logging.getLogger(__name__)


class Rollback:
    """Moves every placed or migrated object back to its legacy name, with the
    migrator's guarantees: copy to a temporary name, rename into place, commit,
    then remove the new copy; a ``rolling-back`` record says which step a crash
    interrupted. Uses *migrator*'s stores, index, steps, throttle and settings."""

    def __init__(self, migrator: Migrator) -> None:
        self.backing = migrator.backing
        self.index = migrator.index
        self.steps = migrator.steps
        self.throttle = migrator.throttle
        self.compare = migrator.settings.verify != "off"

    def _legacy(self, vpath: str) -> tuple[Store, str]:
        top, rest = split(vpath)
        return self.backing.get(top), rest

    async def run(self) -> tuple[int, list[str]]:
        """Roll everything back; returns (objects moved, problems)."""
        moved, problems = 0, []
        for rec in sorted(self.index.records.values(), key=lambda r: r.view):
            try:
                if await self.one(rec):
                    moved += 1
            except Exception as exc:  # noqa: BLE001 - one failure never stops the others
                problems.append(f"{rec.view}: {exc}")
                log.warning("rollback of %s failed: %s", rec.view, exc)
        return moved, problems

    async def one(self, rec: Record) -> bool:
        """Roll *rec*'s object back; True if it moved."""
        legacy, rest = self._legacy(rec.view)
        if rec.store == split(rec.view)[0] and rec.state != State.ROLLING_BACK:
            self.index.delete(rec.view)  # failed or quarantined: still in the legacy store
            return False
        if rec.state == State.ROLLING_BACK:
            return self.steps.finish_rollback(rec)
        src = self.backing.get(rec.store)
        if split(rec.view)[0] == StoreKey.ROOT:      # the CAS tree: no view guards it
            refuse_if_held(f"{src.path}/{rec.rel}")
        st = src.lstat(rec.rel)
        head = rest.rpartition("/")[0]
        if head:
            legacy.makedirs(head)
        if legacy.exists(rest):
            cur = legacy.lstat(rest)
            if cur.st_mtime_ns > st.st_mtime_ns and not stat.S_ISDIR(cur.st_mode):
                where = src.move_aside(rec.rel)  # the legacy one is newer: it wins
                self.index.delete(rec.view)
                log.warning("%s: the legacy copy is newer; the new-layout copy was set aside "
                            "at %s", rec.view, src.aside_shown(where))
                return True
            legacy.move_aside(rest)
        self.index.put(Record(rec.view, rec.store, rec.rel, rec.kind, State.ROLLING_BACK,
                              target_store=split(rec.view)[0], target_rel=rest,
                              sig=signature(st)))
        self.steps.faults.hit("rolling-back")
        try:
            src.rename(rec.rel, legacy, rest)
        except OSError as exc:
            if exc.errno != errno.EXDEV:
                raise
            await self._copy_back(src, rec.rel, legacy, rest, stat.S_ISDIR(st.st_mode))
        fsync_parent(legacy, rest)
        self.steps.faults.hit("rolled-back")
        moved = self.index.get(rec.view)
        assert moved is not None
        return self.steps.finish_rollback(moved)

    async def _copy_back(self, src: Store, rel: str, legacy: Store, rest: str,
                         is_dir: bool) -> None:
        stage, tmp = tmp_place(legacy, rest)
        legacy.staging.make()
        stage.remove(tmp)           # what an interrupted rollback left
        if is_dir:
            dfd, dname = stage.open_dir(legacy.staging.dir), tmp.rpartition("/")[2]  # real fd
            try:
                with src.parent(rel) as (sfd, sname):
                    await trio.to_thread.run_sync(
                        lambda: treecopy.copy_tree(sfd, sname, dfd, dname,
                                                 throttle=self.throttle, compare=self.compare))
            finally:
                os.close(dfd)
        else:
            sfd = src.open(rel, os.O_RDONLY)
            try:
                fd = stage.open(tmp, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
                try:
                    await trio.to_thread.run_sync(
                        lambda: filecopy.copy_extents(sfd, fd, throttle=self.throttle,
                                                    compare=self.compare))
                    treecopy.copy_xattrs(sfd, fd)
                    treecopy.finish_file(fd, os.fstat(sfd))
                finally:
                    os.close(fd)
            finally:
                os.close(sfd)
        stage.rename(tmp, legacy, rest)
        drop_tmp_dir(legacy)
