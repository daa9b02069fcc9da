"""How one object moves: by rename, by a copy of a file or of a tree, or by being set aside.

Each way is a sequence of :mod:`~compatfs.migration.steps`, committed to the
index in order (``renaming``; ``copying``, ``copied``, ``switched``, ``new``),
with the checks that must hold at the switch: room in the destination, nobody
holding a tree no view covers, a file still the one that was copied, a copy
that kept up with its writes (:mod:`~compatfs.migration.livecopy`). An
attempt that cannot go on raises (:mod:`~compatfs.migration.progress`'s
errors or an ``OSError``); the scheduler puts it back in order and decides
when to try again. Bytes are moved by :mod:`compatfs.filecopy` and :mod:`compatfs.treecopy`.
"""

from __future__ import annotations

import errno
import logging
import os
import stat
import threading

import trio

from .. import filecopy, inuse, snapshotid, treecopy
from ..changes import FileKey
from ..config import Migration
from ..enums import State, StoreKey
from ..handles import HandleTable
from ..indexformat import Record
from ..stores import Store, aside_name
from ..throttle import Throttle
from ..view import View
from . import livecopy
from .livecopy import DirtyLog, in_background
from .progress import (
    Converging,
    InUse,
    Item,
    NoSpace,
    Progress,
    Quarantined,
    Switch,
    Unmovable,
)
from .steps import Steps, fsync_parent, tmp_place

log = logging.getLogger(__name__)


def refuse_if_held(path: str) -> None:
    """Raise :class:`InUse` naming the mounts inside *path*, or who holds anything
    at or below it."""
    held = inuse.busy(path)
    if held:
        raise InUse(held)


class Mover:
    """Moves single objects of one :class:`View`, reporting into :attr:`progress`.

    :attr:`dirty` and :attr:`trees` are what a copy under way follows (filled
    through :class:`~compatfs.migration.livecopy.LiveChanges` while *handles*
    is given); :attr:`stop` ends a copy at its next chunk."""

    def __init__(self, view: View, settings: Migration, steps: Steps,
                 handles: HandleTable | None, throttle: Throttle) -> None:
        self.view = view
        self.backing = view.backing
        self.index = view.index
        self.settings = settings
        self.steps = steps
        self.handles = handles
        self.throttle = throttle
        self.progress = Progress()
        self.stop = threading.Event()
        self.dirty: dict[FileKey, DirtyLog] = {}
        #: legacy names of the trees being copied -> changed through a view since
        #: the copy began (set by the views, shared like :attr:`dirty`)
        self.trees: dict[str, bool] = {}

    def open_paths(self) -> set[str]:
        """The legacy names agents hold open now (none when nothing is served)."""
        if self.handles is None:
            return set()
        return self.handles.open_paths()

    def switched(self, vpath: str, how: Switch) -> None:
        self.steps.switched(vpath, how)

    # -- checks -----------------------------------------------------------------------
    def check_space(self, dst: Store, need: int) -> None:
        vfs = dst.statvfs()
        free = vfs.f_bavail * vfs.f_frsize
        reserve = vfs.f_blocks * vfs.f_frsize * self.settings.reserve_percent / 100
        if free - need < reserve:
            raise NoSpace(f"needs {need} bytes and {self.settings.reserve_percent:g} % in "
                          f"reserve on {dst.path}; {free} bytes free")

    def check_unused(self, item: Item) -> None:
        """Raise :class:`InUse` if a process holds anything in the tree *item* moves
        (only for trees no view covers; the views know their own open files)."""
        if item.src_store != StoreKey.ROOT:
            return
        refuse_if_held(f"{self.backing.get(StoreKey.ROOT).path}/{item.src_rel}")
        if self.backing.has(item.dst_store):   # a destination it would replace
            refuse_if_held(f"{self.backing.get(item.dst_store).path}/{item.dst_rel}")

    def wants_snapshot_id(self, item: Item) -> bool:
        """A container volume gets ``snapshotid.txt`` when it moves (layout eve)."""
        return snapshotid.wanted(self.view.layout.rules, item.kind)

    def _begin(self, item: Item, dst: Store, state: State) -> None:
        """Commit *state* (``renaming`` or ``copying``: what the recovery then finishes
        or undoes; its fault point has its name), and make the directories the
        object goes in."""
        self.index.put(Record(item.vpath, item.src_store, item.src_rel, item.kind, state,
                              target_store=item.dst_store, target_rel=item.dst_rel))
        self.steps.faults.hit(state)
        head = item.dst_rel.rpartition("/")[0]
        if head:
            dst.makedirs(head, 0o700)

    # -- rename -----------------------------------------------------------------------
    async def rename(self, item: Item) -> bool:
        """rename(2) when the kernel allows it; False when it does not (copy instead)."""
        self.check_unused(item)
        src, dst = self.backing.get(item.src_store), self.backing.get(item.dst_store)
        self._begin(item, dst, State.RENAMING)
        snapshot = item.is_dir and self.wants_snapshot_id(item)
        if snapshot:
            # in the legacy tree, before the rename: the tree appears with it (old
            # EVE never reads it; rollback takes it out again)
            snapshotid.write(src, item.src_rel, snapshotid.legacy_name(item.vpath))
        reason = self.steps.displace(dst, item.dst_rel)
        try:
            src.rename(item.src_rel, dst, item.dst_rel)
        except OSError as exc:
            self.index.delete(item.vpath)
            if snapshot:
                snapshotid.drop(src, item.src_rel, snapshotid.legacy_name(item.vpath))
            if exc.errno == errno.EXDEV:
                return False
            raise
        fsync_parent(dst, item.dst_rel)
        self.steps.faults.hit("renamed")
        self.index.put(Record(item.vpath, item.dst_store, item.dst_rel, item.kind, State.NEW,
                              reason=reason))
        self.switched(item.vpath, Switch.MOVED)
        return True

    # -- copy of a file ---------------------------------------------------------------
    async def copy_file(self, item: Item) -> None:
        """Copy a file to its temporary, follow its writes, switch, drop the original."""
        src, dst = self.backing.get(item.src_store), self.backing.get(item.dst_store)
        # an agent's file: never block on it (a FIFO swapped in since the scan)
        src_fd = src.open(item.src_rel, os.O_RDONLY | os.O_NONBLOCK)
        stage, tmp_rel = tmp_place(dst, item.dst_rel)
        tmp_fd = -1
        key: FileKey | None = None
        try:
            st0 = os.fstat(src_fd)
            if not stat.S_ISREG(st0.st_mode):
                raise Unmovable("it is no longer a regular file")
            if st0.st_nlink > 1:
                # a copy would part this name from the file's other names
                raise Unmovable(f"it has {st0.st_nlink} hard links; compatfs moves a file "
                                "only while it has one name")
            self.check_space(dst, st0.st_blocks * 512)
            self._begin(item, dst, State.COPYING)
            dst.staging.make()
            try:
                stage.unlink(tmp_rel)
            except FileNotFoundError:
                pass
            tmp_fd = stage.open(tmp_rel, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
            key = (st0.st_dev, st0.st_ino)
            if self.handles is not None:
                self.dirty[key] = DirtyLog()
            self.progress.current[item.vpath] = (0, st0.st_blocks * 512)  # data, not holes
            verify = self.settings.verify
            want_hash = item.expect_sha is not None or verify == "readback"
            result = await self._bulk_copy(src_fd, tmp_fd, hash=want_hash,
                                           compare=verify != "off", item=item)
            log.debug("%s: bulk copy done, %d data bytes", item.vpath, result.data_bytes,
                      extra={"object": item.vpath})
            self.steps.faults.hit("bulk-copied")
            dirty = self.dirty.get(key)
            if dirty is not None:
                await livecopy.follow(item.vpath, dirty, src_fd, tmp_fd)
            written = dirty is not None and dirty.touched
            if item.expect_sha is not None and not written and result.sha256 != item.expect_sha:
                raise Quarantined(f"content sha256 {result.sha256} does not match its name")
            if verify == "readback" and not written and not self._open_for_writing(key):
                fd = tmp_fd
                copied = await in_background(
                    lambda: filecopy.sha256_of(fd, throttle=self.throttle, stop=self.stop))
                if copied != result.sha256:
                    raise OSError(errno.EIO, "the copy reads back different from its source")
            # the last step runs in the event loop: no FUSE request interleaves
            self._finish_switch(item, src, dst, src_fd, tmp_fd, key)
        finally:
            if key is not None:
                self.dirty.pop(key, None)
            if tmp_fd >= 0:
                os.close(tmp_fd)
            os.close(src_fd)
        self.steps.remove_legacy(item)

    def _open_for_writing(self, key: FileKey | None) -> bool:
        if self.handles is None or key is None:
            return False
        return self.handles.open_for_writing(key)

    async def _bulk_copy(self, src_fd: int, dst_fd: int, *, hash: bool, compare: bool,
                         item: Item) -> filecopy.CopyResult:
        def progress(n: int) -> None:
            done, total = self.progress.current.get(item.vpath, (0, 0))
            self.progress.current[item.vpath] = (done + n, total)
            self.progress.bytes_done += n

        return await in_background(
            lambda: filecopy.copy_extents(src_fd, dst_fd, throttle=self.throttle,
                                        stop=self.stop, hash=hash, compare=compare,
                                        progress=progress))

    def _finish_switch(self, item: Item, src: Store, dst: Store, src_fd: int, tmp_fd: int,
                       key: FileKey | None) -> None:
        """Last dirty ranges, metadata, rename into place, commit, switch handles.

        The name must still be the file that was copied, under the record this
        copy committed: an agent that removed it (and maybe made a new file by
        that name, placed where the copy would go) or renamed it during the copy
        keeps what it did; this copy is dropped (:class:`Converging`)."""
        dirty = self.dirty.pop(key, None) if key else None
        if dirty is not None and dirty.mirror_error is not None:
            raise dirty.mirror_error
        st = os.fstat(src_fd)
        rec = self.index.get(item.vpath)
        try:
            named: os.stat_result | None = src.lstat(item.src_rel)
        except (FileNotFoundError, NotADirectoryError):
            named = None
        if rec is None or rec.state != State.COPYING \
                or (rec.store, rec.rel) != (item.src_store, item.src_rel) \
                or named is None or (named.st_dev, named.st_ino) != (st.st_dev, st.st_ino):
            raise Converging("removed, renamed or replaced while it was copied")
        if dirty is not None and dirty.pending:
            DirtyLog.apply(src_fd, tmp_fd, *dirty.take())
        st = os.fstat(src_fd)
        os.ftruncate(tmp_fd, st.st_size)
        treecopy.copy_xattrs(src_fd, tmp_fd)   # as they are now: set through a view meanwhile too
        treecopy.finish_file(tmp_fd, st)
        self.steps.place(item, dst, st)
        if key is not None:
            self.steps.switch_handles(key, dst, item.dst_rel)
        self.switched(item.vpath, Switch.COPIED)
        self.steps.faults.hit("switched")

    # -- copy of a directory (container volume) -----------------------------------------
    def _open_inside(self, item: Item) -> bool:
        return any(p == item.vpath or p.startswith(item.vpath + "/") for p in self.open_paths())

    async def copy_tree(self, item: Item) -> None:
        """Copy a tree to its temporary; switch only if nothing in it changed meanwhile."""
        if self._open_inside(item):
            raise Converging("files inside are open")
        await trio.to_thread.run_sync(self.check_unused, item)
        src, dst = self.backing.get(item.src_store), self.backing.get(item.dst_store)
        stage, tmp_rel = tmp_place(dst, item.dst_rel)
        self.check_space(dst, item.bytes)
        self._begin(item, dst, State.COPYING)
        dst.staging.make()
        stage.remove(tmp_rel)
        dfd, dname = stage.open_dir(dst.staging.dir), tmp_rel.rpartition("/")[2]  # fsync: real fd
        if self.handles is not None:
            self.trees[item.vpath] = False   # the views mark it when they change it
        try:
            with src.parent(item.src_rel) as (sfd, sname):
                await in_background(
                    lambda: treecopy.copy_tree(sfd, sname, dfd, dname, throttle=self.throttle,
                                             stop=self.stop,
                                             compare=self.settings.verify != "off"))
            if self.wants_snapshot_id(item):
                # inside the copy before its rename: the tree appears with it, complete
                snapshotid.write(stage, tmp_rel, snapshotid.legacy_name(item.vpath))
            # from here to the switch nothing awaits: no request comes in between
            if self.trees.get(item.vpath):
                raise Converging("something inside was changed during the copy")
        finally:
            self.trees.pop(item.vpath, None)
            os.close(dfd)
        if self._open_inside(item):
            raise Converging("files inside were opened during the copy")
        self.check_unused(item)   # again, just before the switch (blocking: no await between)
        st = src.lstat(item.src_rel)
        self.steps.place(item, dst, st)
        self.switched(item.vpath, Switch.COPIED)
        self.steps.remove_legacy(item)

    # -- downgrade then upgrade -----------------------------------------------------------
    def set_aside(self, item: Item) -> None:
        """The destination wins (the plan says why: layout eve keeps it always, the
        design note when it is newer); the legacy object is kept aside, not deleted.

        The record (naming where the legacy copy goes) is committed before the
        legacy object is moved: a crash in between leaves the legacy name served
        by the destination and the recovery finishes the move, never a legacy
        name that resolves to nothing."""
        self.check_unused(item)
        src = self.backing.get(item.src_store)
        where = aside_name(item.src_rel)
        reason = (f"{item.reason or 'the destination exists and wins'}; the legacy copy "
                  f"was set aside at {src.aside_shown(where)}")
        self.index.put(Record(item.vpath, item.dst_store, item.dst_rel, item.kind, State.NEW,
                              target_store=item.src_store, target_rel=where, reason=reason))
        self.steps.faults.hit("set-aside")
        src.move_aside(item.src_rel, where)
        self.index.put(Record(item.vpath, item.dst_store, item.dst_rel, item.kind, State.NEW,
                              reason=reason))
        self.switched(item.vpath, Switch.REPLACED)
        log.warning("%s: %s/%s exists: %s", item.vpath, item.dst_store, item.dst_rel, reason,
                    extra={"object": item.vpath, "state": State.NEW})
