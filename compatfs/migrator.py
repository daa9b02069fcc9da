"""The migration engine: moves every legacy object into the new layout while
old agents keep using it.

One object at a time goes through these states, each committed to the index
before the next step starts, so ``kill -9`` or a power cut at any instant
leaves something :meth:`Migrator.recover` can finish or undo:

``renaming``
    a same-filesystem move by ``rename(2)`` is under way (novault, no
    encryption boundary); recovery looks at which name exists.
``copying``
    the bytes are being copied to a temporary in the destination store's
    staging directory (:attr:`compatfs.backing.Store.staging`: for a
    new-layout store ``<own>/staging/<store>/`` beside EVE's directories,
    which EVE's garbage collection never visits; named by :func:`tmp_leaf`,
    so no agent's file is ever taken for one); the legacy object is served
    and untouched. Recovery deletes the temporary (also one an older
    compatfs left in ``<store>/.compatfs-tmp/`` or at ``<target>.compatfs-tmp``).
``copied``
    the copy is complete under its final name and ``sig`` records the
    source as it was (device, inode, size, mtime). Recovery switches if
    the source is unchanged, else deletes the copy.
``switched``
    the view serves the new copy; the legacy original is still there.
    Recovery removes it if it is still the file that was copied (else sets
    it aside).
``new``
    done: only the new copy exists.
``failed`` / ``quarantined``
    the last attempt failed (it is tried again after a back-off that doubles
    up to :data:`RETRY_CAP_S`, at every start, and on ``migrate --now``), or
    a verified download did not match its sha256 (tried again only when
    asked by name); the legacy object is still served, and the reason is kept.

An error nobody foresaw (a full index, a name sqlite refuses, a bug) ends the
attempt at that one object only: :meth:`Migrator._settle` brings its record
back to a state the views serve (finishing what is past the point of no
return, undoing the rest), the object is marked ``failed`` (in memory and
written later when the index cannot be written now), the error is counted in
``Progress.faults``, and the other objects, the views and the daemon go on.

A file open for writing through a view keeps being written while it is
copied: every write the daemon serves for that file marks a dirty range
and every size change lowers the size the copy is cut to first
(:class:`DirtyLog`), dirty ranges are copied again until few are left, and
the last ones are copied, the copy renamed into place and every open handle
re-opened on it in one synchronous step of the event loop, so no FUSE
request sees the file half-switched. Bytes are moved by
:mod:`compatfs.filecopy` and :mod:`compatfs.treecopy`; this module decides what, when, and in what order.
"""

from __future__ import annotations

import errno
import hashlib
import logging
import math
import os
import signal
import stat
import threading
import time
from dataclasses import dataclass, field
from typing import Callable

import trio

from . import filecopy, inuse, snapshotid, treecopy
from .backing import CAS_PARENT, ROOT_STORE
from .changes import ChangeObserver, FileKey
from .config import Migration
from .handles import HandleTable
from .indexformat import Record
from .names import is_sha256
from .plan import make_plan
from .scan import TMP_DIR
from .stores import Side, Store, aside_name
from .throttle import Throttle
from .view import KEPT_LEGACY, View, split

log = logging.getLogger(__name__)

MIB = 1 << 20

#: Dirty bytes left below which the copy stops chasing writes in a worker thread.
FINAL_PASS_BYTES = 8 * MIB
#: Passes in a worker thread before writes are mirrored instead.
MAX_PASSES = 4
#: Dirty bytes copied per step inside the event loop once writes are mirrored.
SLICE_BYTES = 4 * MIB

MIGRATING_STATES = frozenset({"renaming", "copying", "copied"})

#: Named points of a migration, in the order a move reaches them, where the test
#: hook ``COMPATFS_FAULT=<point>`` kills the process (or, with
#: ``COMPATFS_FAULT_MODE=raise``, raises ``OSError(EIO)``): see :meth:`Migrator._fault`.
#: ("pass": the start of a pass, before any object.)
MIGRATE_FAULT_POINTS = ("pass", "renaming", "renamed", "copying", "bulk-copied", "copied",
                        "renamed-into-place", "switched", "legacy-removed", "set-aside")
#: The same, of a rollback.
ROLLBACK_FAULT_POINTS = ("rolling-back", "rolled-back")
FAULT_POINTS = MIGRATE_FAULT_POINTS + ROLLBACK_FAULT_POINTS

#: The longest wait before a failed object is tried again: reached after
#: ``retries`` attempts, and kept as long as the daemon runs (never given up).
RETRY_CAP_S = 3600.0
#: The longest wait between two passes (a huge or infinite ``rescan_s``).
RESCAN_CAP_S = 86400.0


def seconds(value: float, default: float, cap: float) -> float:
    """*value* as a usable delay: NaN or negative gives *default*, more than *cap* gives
    *cap* (trio refuses a NaN timeout, and an infinite one would never rescan)."""
    if math.isnan(value) or value < 0:
        return default
    return min(value, cap)


def tmp_leaf(rel: str) -> str:
    """The name of the temporary of *rel* in its store's staging directory: the
    sha256 of *rel*, one name per target, of fixed length whatever *rel* is."""
    return hashlib.sha256(os.fsencode(rel)).hexdigest()


def tmp_place(store: Store, rel: str) -> tuple[Store, str]:
    """Where the temporary of *rel* (a name in *store*) is made: (store, name)."""
    return store.staging.store, store.staging.name(tmp_leaf(rel))


#: The suffix of a temporary's name beside its target (compatfs before temporaries
#: had a directory of their own).
OLD_TMP_SUFFIX = ".compatfs-tmp"

_niced = threading.local()


async def in_background(fn: Callable[[], object]) -> object:
    """Run *fn* in a worker thread at the lowest CPU priority: the copies (and the
    encryption their fdatasyncs do in the copying thread) yield to the agents."""
    def run() -> object:
        if not getattr(_niced, "done", False):
            try:
                os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), 19)
            except OSError:
                pass
            _niced.done = True
        return fn()

    return await trio.to_thread.run_sync(run)


def signature(st: os.stat_result) -> str:
    return f"{st.st_dev}:{st.st_ino}:{st.st_size}:{st.st_mtime_ns}"


#: Granularity of dirty tracking: small writes close together are copied as one.
DIRTY_BLOCK = 64 << 10


class DirtyLog:
    """What changed in a file while it is being copied (filled by the FUSE thread):
    the 64 KiB blocks written, and the lowest size it was given (:attr:`shrunk_to`,
    by a truncate, ``O_TRUNC`` or any other size change).

    Whoever brings the copy up to date (:meth:`apply`) gives the copy that size
    first, then copies the dirty blocks: a byte above it that was not written
    again reads as zero in the source, and now in the copy too. Old bytes the
    bulk copy or a pass (worker threads) wrote above a size set meanwhile are
    wiped by the next :meth:`apply`, and the last one runs in the event loop.

    Once :attr:`mirror` is set (an fd of the copy), the FUSE thread applies
    every later write and size change to the copy as well, so the set of dirty
    blocks only shrinks; one the copy refuses (a full disk) is recorded in
    :attr:`mirror_error` and ends this attempt, never the guest's request.
    """

    __slots__ = ("blocks", "shrunk_to", "touched", "mirror", "mirror_error")

    def __init__(self) -> None:
        self.blocks: set[int] = set()
        self.shrunk_to: int | None = None   # lowest size given since the last take()
        self.touched = False   # written or resized at all since the copy began
        self.mirror = -1
        self.mirror_error: OSError | None = None

    def write(self, buf: bytes | memoryview, offset: int) -> None:
        """The FUSE thread wrote *buf* at *offset* of the source."""
        self.touched = True
        if self.mirror < 0:
            self.add(offset, len(buf))
            return
        if self.mirror_error is not None:
            return
        try:
            view = memoryview(buf)
            done = 0
            while done < len(view):
                done += os.pwrite(self.mirror, view[done:], offset + done)
        except OSError as exc:
            self.mirror_error = exc

    def resize(self, size: int) -> None:
        """The FUSE thread gave the source the size *size* (shrinking or growing it)."""
        self.touched = True
        if self.mirror >= 0:
            if self.mirror_error is None:
                try:
                    os.ftruncate(self.mirror, size)
                except OSError as exc:
                    self.mirror_error = exc
            return
        if self.shrunk_to is None or size < self.shrunk_to:
            self.shrunk_to = size
            # blocks wholly above it read as zeros now: nothing left to copy there
            first = -(-size // DIRTY_BLOCK)
            if self.blocks and max(self.blocks) >= first:
                self.blocks = {b for b in self.blocks if b < first}

    def add(self, offset: int, length: int) -> None:
        self.touched = True
        if length > 0:
            self.blocks.update(range(offset // DIRTY_BLOCK, (offset + length - 1) // DIRTY_BLOCK + 1))

    @property
    def bytes(self) -> int:
        return len(self.blocks) * DIRTY_BLOCK

    @property
    def pending(self) -> bool:
        """Something to apply to the copy: dirty blocks or a size to give it."""
        return bool(self.blocks) or self.shrunk_to is not None

    def take(self) -> tuple[int | None, list[tuple[int, int]]]:
        """The lowest size given and the dirty blocks so far as merged (offset,
        length) ranges, for :meth:`apply`; the log starts again."""
        shrunk_to, self.shrunk_to = self.shrunk_to, None
        blocks, self.blocks = sorted(self.blocks), set()
        ranges: list[tuple[int, int]] = []
        for b in blocks:
            off = b * DIRTY_BLOCK
            if ranges and ranges[-1][0] + ranges[-1][1] == off:
                ranges[-1] = (ranges[-1][0], ranges[-1][1] + DIRTY_BLOCK)
            else:
                ranges.append((off, DIRTY_BLOCK))
        return shrunk_to, ranges

    @staticmethod
    def apply(src_fd: int, dst_fd: int, shrunk_to: int | None,
              ranges: list[tuple[int, int]]) -> None:
        """Bring the copy *dst_fd* up to date with what :meth:`take` returned: the
        size first, then the blocks (then the source's size, as copy_ranges does)."""
        if shrunk_to is not None:
            os.ftruncate(dst_fd, shrunk_to)
        filecopy.copy_ranges(src_fd, dst_fd, ranges)


class LiveChanges:
    """The migration's :class:`~compatfs.changes.ChangeObserver`: writes and sizes
    reach the dirty log of a file being copied, changes inside a tree being copied
    mark it for another copy, and an opened name moves up the queue."""

    __slots__ = ("dirty", "trees", "_opened")

    def __init__(self, dirty: dict[FileKey, DirtyLog], trees: dict[str, bool],
                 opened: Callable[[str], None]) -> None:
        self.dirty = dirty
        self.trees = trees
        self._opened = opened

    @property
    def following(self) -> bool:
        return bool(self.dirty) or bool(self.trees)

    def wrote(self, key: FileKey, buf: bytes | memoryview, offset: int) -> None:
        if self.dirty:
            log = self.dirty.get(key)
            if log is not None:
                log.write(buf, offset)

    def resized(self, key: FileKey, size: int) -> None:
        if self.dirty:
            log = self.dirty.get(key)
            if log is not None:
                log.resize(size)

    def changing(self, vpath: str) -> None:
        for top in self.trees:
            if vpath == top or vpath.startswith(top + "/"):
                self.trees[top] = True

    def opened(self, vpath: str) -> None:
        self._opened(vpath)


@dataclass
class Item:
    """One object to move."""

    vpath: str
    kind: str
    is_dir: bool
    src_store: str
    src_rel: str
    dst_store: str
    dst_rel: str
    bytes: int
    action: str                  # copy, rename, set-aside (the plan's PlanEntry.action)
    expect_sha: str | None = None
    reason: str | None = None    # the plan's: why it is set aside, or what it displaces


def _expected_sha(location: str, rel: str) -> str | None:
    """The sha256 a verified object's content must have: its name's, ``<sha>`` or
    ``<sha>.<escaped media type>`` (EVE 11.8+); None for any other object."""
    if location != "verified":
        return None
    head = rel.rpartition("/")[2].partition(".")[0]
    return head.lower() if is_sha256(head) else None


@dataclass
class Progress:
    objects_total: int = 0
    objects_done: int = 0
    bytes_total: int = 0
    bytes_done: int = 0
    started: float = field(default_factory=time.monotonic)
    current: dict[str, tuple[int, int]] = field(default_factory=dict)  # vpath -> (done, total)
    failed: int = 0
    waiting: dict[str, str] = field(default_factory=dict)              # vpath -> why
    #: unexpected errors inside the migrator since it started (carried from pass to pass)
    faults: int = 0

    def rate(self) -> float:
        elapsed = time.monotonic() - self.started
        return self.bytes_done / elapsed if elapsed > 0 else 0.0

    def eta(self) -> float | None:
        rate = self.rate()
        left = self.bytes_total - self.bytes_done
        return left / rate if rate > 0 else None

    def as_json(self) -> dict:
        return {"objects_total": self.objects_total, "objects_done": self.objects_done,
                "bytes_total": self.bytes_total, "bytes_done": self.bytes_done,
                "rate": self.rate(), "eta_s": self.eta(), "failed": self.failed,
                "faults": self.faults,
                "current": {k: {"done": d, "total": t} for k, (d, t) in self.current.items()},
                "waiting": dict(self.waiting)}


class NoSpace(Exception):
    """The destination has not enough room (before or during a copy)."""


class Converging(Exception):
    """Writes outpaced the copy; try again later."""


class Unmovable(Exception):
    """The object cannot be moved as it is (the message says why); it stays served
    where it is, failed with that reason, and is looked at again after a back-off."""


class InUse(Exception):
    """A tree no view covers is held by a process or has a mount inside; it moves
    once neither is true."""


def _refuse_if_held(path: str) -> None:
    """Raise :class:`InUse` naming the mounts inside *path*, or who holds anything
    at or below it."""
    why = inuse.busy(path)
    if why:
        raise InUse(why)


class Migrator:
    """Moves legacy objects of one :class:`View` into the new layout.

    With *handles* (the daemon's open files), writes through the views are
    followed (:attr:`changes` is the observer the views report to) and open
    handles are switched; without (``compatfs migrate --now``, nothing else
    writes), neither is needed.
    """

    def __init__(self, view: View, settings: Migration, handles: HandleTable | None = None,
                 bases: dict[str, str] | None = None,
                 on_switch: Callable[[str], None] | None = None) -> None:
        self.view = view
        self.backing = view.backing
        self.index = view.index
        self.settings = settings
        self.handles = handles
        self.bases = bases or {}
        self.on_switch = on_switch
        rate = settings.throttle_mib_per_s * MIB
        if not math.isfinite(rate) or rate < 0:
            rate = 0.0                    # NaN or infinite: no limit rather than no copy
        self.throttle = Throttle(rate or None)
        self.progress = Progress()
        self.stop = threading.Event()
        self.paused = False
        self.urgent: set[str] = set()
        #: names asked for by migrate-now: tried in the next pass even if failed
        #: (whatever their back-off) or quarantined
        self.asked: set[str] = set()
        self.pending: set[str] = set()
        self.retry_at: dict[str, float] = {}
        self.dirty: dict[tuple[int, int], DirtyLog] = {}
        #: legacy names of the trees being copied -> changed through a view since
        #: the copy began (set by the views, shared like :attr:`dirty`)
        self.trees: dict[str, bool] = {}
        self.in_use: dict[str, str] = {}    # last "in use" reason said, per object
        #: objects whose failure could not be written to the index, or whose record
        #: could not be put back in order: vpath -> (item, state to record or None,
        #: reason, attempts), written at the start of every pass until the index takes it
        self.unrecorded: dict[str, tuple[Item, str | None, str, int]] = {}
        self._wake = trio.Event()
        self._fault_at = os.environ.get("COMPATFS_FAULT") or None
        self._fault_count = int(os.environ.get("COMPATFS_FAULT_SKIP", "0"))
        times = os.environ.get("COMPATFS_FAULT_TIMES")
        self._fault_times = int(times) if times else None
        self._fault_raise = os.environ.get("COMPATFS_FAULT_MODE") == "raise"
        self._settling = False
        #: what the views report to while this migrator runs
        self.changes: ChangeObserver = LiveChanges(self.dirty, self.trees, self.prioritize)

    # -- test hook: fail at a named point -----------------------------------------------
    def _fault(self, point: str) -> None:
        """Fault tests set COMPATFS_FAULT=<point> (one of :data:`FAULT_POINTS`) to
        SIGKILL the process here, or with COMPATFS_FAULT_MODE=raise to raise
        ``OSError(EIO)``; COMPATFS_FAULT_SKIP=N lets the first N hits pass, and
        COMPATFS_FAULT_TIMES=N fires N times only. Never while settling a failure."""
        if self._fault_at != point or self._settling:
            return
        if self._fault_count > 0:
            self._fault_count -= 1
            return
        if self._fault_times is not None:
            if self._fault_times <= 0:
                return
            self._fault_times -= 1
        if self._fault_raise:
            raise OSError(errno.EIO, f"injected fault at {point}")
        os.kill(os.getpid(), signal.SIGKILL)

    # -- what there is to do ----------------------------------------------------------
    def _vpath_of(self, path: str) -> str | None:
        for view, base in self.bases.items():
            if path == base or path.startswith(base + "/"):
                return view + path[len(base):]
        layout = self.view.layout
        for view in self.view.views:
            base = layout.path(view)
            if path.startswith(base + "/"):
                return view + path[len(base):]
        return None

    def work(self) -> list[Item]:
        """Every object that should move now, as the plan decides."""
        layout = self.view.layout
        plan = make_plan(layout, self.view.resolver, "prepared" in self.view.views,
                         self.bases or None, refresh=False)
        items = []
        containerd = layout.path("containerd")
        for e in plan.entries:
            if e.obj.path == containerd:
                vpath: str | None = self.cas_vpath()
            else:
                vpath = self._vpath_of(e.obj.path)
            if vpath is None or e.target is None or e.location is None:
                continue
            rec = self.index.get(vpath)
            if rec is not None and rec.state == "quarantined" and vpath not in self.asked:
                continue  # its content does not match its name: only when asked by name
            if rec is not None and rec.state not in ("failed", "quarantined", KEPT_LEGACY):
                continue  # placed, or already under way (a kept legacy copy is not)
            top, rest = split(vpath)
            dst_store = e.location
            if e.location == "cas":       # the CAS tree is one name in its parent directory
                dst_store = CAS_PARENT
                dst_rel = os.path.basename(e.target)
            else:
                dst_rel = os.path.relpath(e.target, layout.path(e.location))
            action = e.action
            if action not in ("copy", "rename", "set-aside"):
                continue
            if action == "copy" and self._renameable(top, dst_store):
                action = "rename"
            items.append(Item(vpath, e.obj.kind, e.obj.is_dir, top, rest, dst_store, dst_rel,
                              e.obj.bytes, action, _expected_sha(e.location, dst_rel),
                              e.reason))
        for rec in list(self.index.records.values()):
            if rec.state != "unresolved":
                continue
            want = self.view.placement(rec.view, rec.kind == "oci-volume")
            if want.state == "new" and not self.backing.get(want.store).exists(want.rel):
                items.append(Item(rec.view, rec.kind, rec.kind == "oci-volume", rec.store,
                                  rec.rel, want.store, want.rel, 0, "copy"))
        return items

    def cas_vpath(self) -> str:
        """The index key of the legacy containerd tree: no view serves it, so it is
        named by the root store and its path there."""
        return f"{ROOT_STORE}/{self.view.layout.rel('containerd')}"

    def _check_unused(self, item: Item) -> None:
        """Raise :class:`InUse` if a process holds anything in the tree *item* moves
        (only for trees no view covers; the views know their own open files)."""
        if item.src_store != ROOT_STORE:
            return
        _refuse_if_held(f"{self.backing.get(ROOT_STORE).path}/{item.src_rel}")
        if self.backing.has(item.dst_store):   # a destination it would replace
            _refuse_if_held(f"{self.backing.get(item.dst_store).path}/{item.dst_rel}")

    def _renameable(self, src_key: str, dst_key: str) -> bool:
        """rename(2) can move objects of *src_key* to *dst_key*: one filesystem, no
        encryption on either side. Decided on the open stores: the plan reads the
        legacy stores through /proc/self/fd/N, whose lstat is procfs', so it never
        sees a legacy store on the destination's filesystem and says copy."""
        if not (self.backing.has(src_key) and self.backing.has(dst_key)):
            return False
        src, dst = self.backing.get(src_key), self.backing.get(dst_key)
        return (not src.encrypted and not dst.encrypted
                and os.fstat(src.fd).st_dev == os.fstat(dst.fd).st_dev)

    def _order(self, items: list[Item]) -> list[Item]:
        """Objects an agent has open first, then small before large."""
        open_paths = self._open_paths()
        first = self.urgent | self.asked
        return sorted(items, key=lambda i: (i.vpath not in first,
                                            i.vpath not in open_paths, i.bytes, i.vpath))

    def _open_paths(self) -> set[str]:
        if self.handles is None:
            return set()
        return self.handles.open_paths()

    def wake(self) -> None:
        """Look for work now (the config changed, a command asked)."""
        self._wake.set()

    def pause(self) -> None:
        """Start no new copy; the ones under way stop at their next step and are undone."""
        self.paused = True
        self.stop.set()

    def resume(self) -> None:
        self.paused = False
        self.stop = threading.Event()
        self.wake()

    def migrate_now(self, vpath: str) -> None:
        """Move *vpath* to the front of the queue and start a pass now (a failed or
        quarantined object too, whatever its back-off)."""
        self.asked.add(vpath)
        self.urgent.add(vpath)
        self.retry_at.pop(vpath, None)
        self.wake()

    def prioritize(self, vpath: str) -> None:
        """An agent opened *vpath*: move it to the front of the queue."""
        if vpath in self.pending and vpath not in self.urgent:
            self.urgent.add(vpath)
            self._wake.set()

    # -- running ----------------------------------------------------------------------
    async def run(self, task_status=trio.TASK_STATUS_IGNORED) -> None:
        """Migrate forever: work the queue, then rescan every ``rescan_s``.

        A pass that raises (a scan or an index that fails) is counted and logged,
        and the next one starts after ``retry_backoff_s``, doubling, at most
        ``rescan_s`` later; nothing here ends the daemon's other tasks."""
        task_status.started()
        failures = 0
        while True:
            wait = seconds(self.settings.rescan_s, Migration.rescan_s, RESCAN_CAP_S)
            if not self.paused:
                try:
                    await self.run_once()
                    failures = 0
                except Exception as exc:  # noqa: BLE001 - the views never depend on a pass
                    failures += 1
                    self.progress.faults += 1
                    wait = min(wait, self._backoff(failures))
                    log.warning("migration pass failed (%s); next pass in %.0f s",
                                _why(exc), wait)
                    log.debug("the migration pass failed", exc_info=True)
            with trio.move_on_after(wait):
                await self._wake.wait()
            self._wake = trio.Event()

    def _backoff(self, attempts: int) -> float:
        """The wait after the *attempts*-th failure in a row: ``retry_backoff_s``,
        doubling, and :data:`RETRY_CAP_S` from ``retries`` attempts on."""
        if attempts >= max(1, self.settings.retries):
            return RETRY_CAP_S
        return min(self._wait_s() * 2 ** max(0, attempts - 1), RETRY_CAP_S)

    def _wait_s(self) -> float:
        """The wait before an object that waits (no room, in use, busy) is tried again."""
        return seconds(self.settings.retry_backoff_s, Migration.retry_backoff_s, RETRY_CAP_S)

    async def run_once(self) -> Progress:
        """One pass over everything there is to do now; returns its progress."""
        self._record_unrecorded()
        self._fault("pass")
        await trio.to_thread.run_sync(self.view.resolver.refresh)
        now = time.monotonic()
        asked = set(self.asked)
        work = await trio.to_thread.run_sync(self.work)
        items = [i for i in work if i.vpath not in self.unrecorded
                 and (i.vpath in asked or self.retry_at.get(i.vpath, 0) <= now)]
        self.pending = {i.vpath for i in items}
        self.progress = Progress(objects_total=len(items), bytes_total=sum(i.bytes for i in items),
                                 faults=self.progress.faults)
        queue = self._order(items)
        limiter = trio.Semaphore(self.settings.concurrency)
        async with trio.open_nursery() as nursery:
            while queue and not self.paused:
                await limiter.acquire()
                queue = self._order(queue)
                item = queue.pop(0)
                nursery.start_soon(self._one, item, limiter)
        self.urgent.clear()
        self.asked -= asked
        self._tidy_temporaries()
        return self.progress

    def _tidy_temporaries(self) -> None:
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
                _drop_tmp_dir(store)
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
                                    _why(exc))
                place.drop_if_empty()

    async def _one(self, item: Item, limiter: trio.Semaphore) -> None:
        try:
            await self.migrate(item)
        except Exception as exc:  # noqa: BLE001 - never the pass, the others, the views
            self.progress.faults += 1
            log.warning("%s: unexpected error after its migration: %s", item.vpath, _why(exc))
            log.debug("%s: unexpected error", item.vpath, exc_info=True)
        finally:
            limiter.release()
            self.progress.objects_done += 1
            self.progress.current.pop(item.vpath, None)

    async def migrate(self, item: Item) -> None:
        """Move one object; a failure is retried after a back-off (:meth:`_backoff`)."""
        rec = self.index.get(item.vpath)
        attempts = rec.attempts if rec is not None else 0
        try:
            if item.action == "set-aside":
                self._set_aside(item)
            elif item.action == "rename" and await self._rename(item):
                pass
            elif item.is_dir:
                await self._copy_tree(item)
            else:
                await self._copy_file(item)
            self.retry_at.pop(item.vpath, None)
            log.info("migrated %s to %s/%s", item.vpath, item.dst_store, item.dst_rel)
        except NoSpace as exc:
            self._undo(item)
            self.progress.waiting[item.vpath] = str(exc)
            self.retry_at[item.vpath] = time.monotonic() + self._wait_s()
            log.info("%s: %s; will retry", item.vpath, exc)
        except Converging as exc:
            self._undo(item)
            self.retry_at[item.vpath] = time.monotonic() + self._wait_s()
            log.info("%s: %s; will retry", item.vpath, exc)
        except InUse as exc:
            self._undo(item)
            self.progress.waiting[item.vpath] = str(exc)
            self.retry_at[item.vpath] = time.monotonic() + self._wait_s()
            # a containerd that keeps running would repeat this every pass: say it once
            # per change of holder
            level = logging.DEBUG if self.in_use.get(item.vpath) == str(exc) else logging.INFO
            self.in_use[item.vpath] = str(exc)
            log.log(level, "%s: %s", item.vpath, exc)
        except filecopy.CopyAborted:
            self._undo(item)
        except Quarantined as exc:
            self._undo(item)
            self._keep_legacy(item, "quarantined", str(exc), attempts + 1)
            self.progress.failed += 1
            log.warning("%s: %s; quarantined, left where it is", item.vpath, exc)
        except Exception as exc:  # noqa: BLE001 - one failure never stops the others
            if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT):
                # a full disk mid-copy: back off and try again, not a failure
                try:
                    migrated = self._settle(item)
                except Exception:  # noqa: BLE001 - the index is full too: a failure
                    pass
                else:
                    if not migrated:
                        self.progress.waiting[item.vpath] = \
                            f"the destination filled up: {exc.strerror}"
                        self.retry_at[item.vpath] = time.monotonic() + self._wait_s()
                        log.info("%s: destination full mid-copy; will retry", item.vpath)
                    return
            self._failed(item, exc, attempts + 1)

    def _failed(self, item: Item, exc: Exception, attempts: int) -> None:
        """An unforeseen error ended the attempt at *item*: put its record in order,
        mark it failed (or keep that in memory), count it, and set its next try."""
        self.progress.faults += 1
        reason = _why(exc)
        log.debug("%s: migration failed", item.vpath, exc_info=exc)
        try:
            migrated = self._settle(item)
        except Exception as settle_exc:  # noqa: BLE001 - e.g. the index cannot be written
            log.warning("%s: migration failed (%s) and its record cannot be put back in "
                        "order now (%s); will try again", item.vpath, reason, _why(settle_exc))
            log.debug("%s: settling failed", item.vpath, exc_info=True)
            self.unrecorded[item.vpath] = (item, "failed", reason, attempts)
            migrated = False
        delay = self._backoff(attempts)
        self.retry_at[item.vpath] = time.monotonic() + delay
        if migrated:
            self.retry_at.pop(item.vpath, None)
            log.warning("%s: %s after its move; the move was finished", item.vpath, reason)
            return
        self.progress.failed += 1  # in this pass, whether or not it is retried later
        if item.vpath not in self.unrecorded:
            self._keep_legacy(item, "failed", reason, attempts)
        log.warning("%s: migration failed (%s); attempt %d, next in %.0f s", item.vpath,
                    reason, attempts, delay)

    def _keep_legacy(self, item: Item, state: str, reason: str, attempts: int) -> None:
        """Mark *item* failed or quarantined (served from its legacy place). If the
        index cannot take it now, it is kept in memory and written on the next pass."""
        try:
            self.index.put(Record(item.vpath, item.src_store, item.src_rel, item.kind, state,
                                  reason=reason, attempts=attempts))
        except Exception as exc:  # noqa: BLE001 - full disk, a name sqlite refuses...
            again = item.vpath in self.unrecorded
            log.log(logging.DEBUG if again else logging.WARNING,
                    "%s: cannot record that it is %s (%s); kept in memory", item.vpath,
                    state, _why(exc))
            self.unrecorded[item.vpath] = (item, state, reason, attempts)
        else:
            self.unrecorded.pop(item.vpath, None)

    def _record_unrecorded(self) -> None:
        """Write the failures the index could not take before (:attr:`unrecorded`)."""
        for vpath, (item, state, reason, attempts) in list(self.unrecorded.items()):
            try:
                migrated = self._settle(item)
            except Exception as exc:  # noqa: BLE001 - still not writable: next pass
                log.debug("%s: record still not in order: %s", vpath, _why(exc))
                continue
            rec = self.index.get(vpath)
            if state is None or migrated or \
                    (rec is not None and rec.state not in ("failed", "quarantined")):
                self.unrecorded.pop(vpath, None)   # in order; or placed meanwhile
                continue
            self._keep_legacy(item, state, reason, attempts)
            if vpath not in self.unrecorded:
                log.info("%s: that it is %s is recorded now", vpath, state)

    def failures(self) -> dict[str, str]:
        """vpath -> reason of every object whose last attempt failed, recorded or not."""
        out = {r.view: r.reason or r.state for r in self.index.records.values()
               if r.state in ("failed", "quarantined")}
        out.update({vpath: f"{reason} (not recorded in the index yet)"
                    for vpath, (_, state, reason, _) in self.unrecorded.items() if state})
        return out

    # -- space --------------------------------------------------------------------------
    def _check_space(self, dst: Store, need: int) -> None:
        vfs = dst.statvfs()
        free = vfs.f_bavail * vfs.f_frsize
        reserve = vfs.f_blocks * vfs.f_frsize * self.settings.reserve_percent / 100
        if free - need < reserve:
            raise NoSpace(f"needs {need} bytes and {self.settings.reserve_percent:g} % in "
                          f"reserve on {dst.path}; {free} bytes free")

    # -- rename -------------------------------------------------------------------------
    async def _rename(self, item: Item) -> bool:
        """rename(2) when the kernel allows it; False when it does not (copy instead)."""
        self._check_unused(item)
        src, dst = self.backing.get(item.src_store), self.backing.get(item.dst_store)
        self.index.put(Record(item.vpath, item.src_store, item.src_rel, item.kind, "renaming",
                              target_store=item.dst_store, target_rel=item.dst_rel))
        self._fault("renaming")
        head = item.dst_rel.rpartition("/")[0]
        if head:
            dst.makedirs(head, 0o700)
        snapshot = item.is_dir and self._wants_snapshot_id(item)
        if snapshot:
            # in the legacy tree, before the rename: the tree appears with it (old
            # EVE never reads it; rollback takes it out again)
            snapshotid.write(src, item.src_rel, snapshotid.legacy_name(item.vpath))
        reason = self._displace(dst, item.dst_rel)
        try:
            src.rename(item.src_rel, dst, item.dst_rel)
        except OSError as exc:
            self.index.delete(item.vpath)
            if snapshot:
                snapshotid.drop(src, item.src_rel, snapshotid.legacy_name(item.vpath))
            if exc.errno == errno.EXDEV:
                return False
            raise
        self._fsync_parent(dst, item.dst_rel)
        self._fault("renamed")
        self.index.put(Record(item.vpath, item.dst_store, item.dst_rel, item.kind, "new",
                              reason=reason))
        self._switched(item.vpath)
        return True

    # -- copy of a file -------------------------------------------------------------------
    async def _copy_file(self, item: Item) -> None:
        src, dst = self.backing.get(item.src_store), self.backing.get(item.dst_store)
        # an agent's file: never block on it (a FIFO swapped in since the scan)
        src_fd = src.open(item.src_rel, os.O_RDONLY | os.O_NONBLOCK)
        stage, tmp_rel = tmp_place(dst, item.dst_rel)
        tmp_fd = -1
        key = None
        try:
            st0 = os.fstat(src_fd)
            if not stat.S_ISREG(st0.st_mode):
                raise Unmovable("it is no longer a regular file")
            if st0.st_nlink > 1:
                # a copy would part this name from the file's other names
                raise Unmovable(f"it has {st0.st_nlink} hard links; compatfs moves a file "
                                "only while it has one name")
            self._check_space(dst, st0.st_blocks * 512)
            self.index.put(Record(item.vpath, item.src_store, item.src_rel, item.kind,
                                  "copying", target_store=item.dst_store,
                                  target_rel=item.dst_rel))
            self._fault("copying")
            head = item.dst_rel.rpartition("/")[0]
            if head:
                dst.makedirs(head, 0o700)
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
            result = await self._in_thread(filecopy.copy_extents, src_fd, tmp_fd, hash=want_hash,
                                           compare=verify != "off", item=item)
            log.debug("%s: bulk copy done, %d data bytes", item.vpath, result.data_bytes)
            self._fault("bulk-copied")
            dirty = self.dirty.get(key) if key else None
            passes = 0
            while dirty is not None and dirty.bytes > FINAL_PASS_BYTES and passes < MAX_PASSES:
                passes += 1
                shrunk_to, ranges = dirty.take()
                log.debug("%s: pass %d over %d dirty ranges", item.vpath, passes, len(ranges))
                await in_background(lambda: DirtyLog.apply(src_fd, tmp_fd, shrunk_to, ranges))
            if dirty is not None and dirty.blocks:
                await self._converge(item, dirty, src_fd, tmp_fd)
            written = dirty is not None and dirty.touched
            if item.expect_sha is not None and not written and result.sha256 != item.expect_sha:
                raise Quarantined(f"content sha256 {result.sha256} does not match its name")
            if verify == "readback" and not written and not self._open_for_writing(key):
                copied = await in_background(
                    lambda: filecopy.sha256_of(tmp_fd, throttle=self.throttle, stop=self.stop))
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
        self._remove_legacy(item)

    async def _converge(self, item: Item, dirty: DirtyLog, src_fd: int, tmp_fd: int) -> None:
        """Mirror new writes, and copy what is still dirty in slices run in the event
        loop: a slice and a FUSE write never interleave, so the copy cannot take an
        older block after the mirror wrote a newer one. A size given before the
        mirror starts is applied first, in the same step (no request in between);
        later ones the FUSE thread mirrors like writes."""
        shrunk_to, dirty.shrunk_to = dirty.shrunk_to, None
        if shrunk_to is not None:
            os.ftruncate(tmp_fd, shrunk_to)
        dirty.mirror = tmp_fd
        while dirty.blocks:
            if dirty.mirror_error is not None:
                raise dirty.mirror_error
            blocks = sorted(dirty.blocks)[:SLICE_BYTES // DIRTY_BLOCK]
            dirty.blocks.difference_update(blocks)
            filecopy.copy_ranges(src_fd, tmp_fd, [(b * DIRTY_BLOCK, DIRTY_BLOCK) for b in blocks])
            await trio.sleep(0)
        log.debug("%s: converged with writes mirrored", item.vpath)

    def _open_for_writing(self, key: tuple[int, int] | None) -> bool:
        if self.handles is None or key is None:
            return False
        return self.handles.open_for_writing(key)

    async def _in_thread(self, fn, src_fd: int, dst_fd: int, *, hash: bool, compare: bool,
                         item: Item):
        def progress(n: int) -> None:
            done, total = self.progress.current.get(item.vpath, (0, 0))
            self.progress.current[item.vpath] = (done + n, total)
            self.progress.bytes_done += n

        return await in_background(
            lambda: fn(src_fd, dst_fd, throttle=self.throttle, stop=self.stop, hash=hash,
                       compare=compare, progress=progress))

    def _finish_switch(self, item: Item, src: Store, dst: Store, src_fd: int, tmp_fd: int,
                       key: tuple[int, int] | None) -> None:
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
            named = src.lstat(item.src_rel)
        except (FileNotFoundError, NotADirectoryError):
            named = None
        if rec is None or rec.state != "copying" \
                or (rec.store, rec.rel) != (item.src_store, item.src_rel) \
                or named is None or (named.st_dev, named.st_ino) != (st.st_dev, st.st_ino):
            raise Converging("removed, renamed or replaced while it was copied")
        if dirty is not None and dirty.pending:
            DirtyLog.apply(src_fd, tmp_fd, *dirty.take())
        st = os.fstat(src_fd)
        os.ftruncate(tmp_fd, st.st_size)
        treecopy.copy_xattrs(src_fd, tmp_fd)   # as they are now: set through a view meanwhile too
        treecopy.finish_file(tmp_fd, st)
        self._place_and_switch(item, dst, st)
        if self.handles is not None and key is not None:
            self.handles.switch(key, dst, item.dst_rel)
        self._switched(item.vpath)
        self._fault("switched")

    def _place_and_switch(self, item: Item, dst: Store, st: os.stat_result) -> None:
        """The complete copy of the source as *st* describes it is at its temporary
        name: commit that, rename it into place, commit the switch. A crash between
        any two steps is finished by :meth:`recover` (``copied``)."""
        self.index.put(Record(item.vpath, item.src_store, item.src_rel, item.kind, "copied",
                              target_store=item.dst_store, target_rel=item.dst_rel,
                              sig=signature(st)))
        self._fault("copied")
        reason = self._rename_into_place(dst, item.dst_rel, tmp_place(dst, item.dst_rel))
        self._fault("renamed-into-place")
        self.index.put(Record(item.vpath, item.dst_store, item.dst_rel, item.kind, "switched",
                              target_store=item.src_store, target_rel=item.src_rel,
                              sig=signature(st), reason=reason))

    def _rename_into_place(self, dst: Store, rel: str, tmp: tuple[Store, str]) -> str | None:
        """The temporary *tmp* (store, name) becomes *rel* in *dst*. Whatever is at
        *rel* already is set aside first, never replaced (the design note's older
        destination, or one that appeared since the plan); returns the reason to
        report then."""
        reason = self._displace(dst, rel)
        tmp[0].rename(tmp[1], dst, rel)
        self._fsync_parent(dst, rel)
        return reason

    def _displace(self, dst: Store, rel: str) -> str | None:
        """Set aside what is at *rel* in *dst* (a destination the legacy copy wins
        over); the reason to report, or None if nothing was there."""
        if not dst.exists(rel):
            return None
        where = dst.move_aside(rel)
        self._fsync_parent(dst, rel)
        reason = (f"the destination existed and was older; it was set aside at "
                  f"{dst.aside_shown(where)}")
        log.warning("%s/%s: %s", dst.key, rel, reason)
        return reason

    def _switched(self, vpath: str) -> None:
        self.progress.current.pop(vpath, None)
        if self.on_switch is not None:
            self.on_switch(vpath)

    def _remove_legacy(self, item: Item) -> None:
        """Drop the legacy original, only if it is still the file that was copied."""
        rec = self.index.get(item.vpath)
        if rec is None or rec.state != "switched":
            return
        self._finish_removal(rec)

    def _finish_removal(self, rec: Record) -> None:
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
            self._fsync_parent(legacy, rec.target_rel)
        self._fault("legacy-removed")
        self.index.put(Record(rec.view, rec.store, rec.rel, rec.kind, "new", reason=rec.reason))

    # -- copy of a directory (container volume) ---------------------------------------------
    async def _copy_tree(self, item: Item) -> None:
        if any(p == item.vpath or p.startswith(item.vpath + "/") for p in self._open_paths()):
            raise Converging("files inside are open")
        await trio.to_thread.run_sync(self._check_unused, item)
        src, dst = self.backing.get(item.src_store), self.backing.get(item.dst_store)
        stage, tmp_rel = tmp_place(dst, item.dst_rel)
        self._check_space(dst, item.bytes)
        self.index.put(Record(item.vpath, item.src_store, item.src_rel, item.kind, "copying",
                              target_store=item.dst_store, target_rel=item.dst_rel))
        self._fault("copying")
        head = item.dst_rel.rpartition("/")[0]
        if head:
            dst.makedirs(head, 0o700)
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
            if self._wants_snapshot_id(item):
                # inside the copy before its rename: the tree appears with it, complete
                snapshotid.write(stage, tmp_rel, snapshotid.legacy_name(item.vpath))
            # from here to the switch nothing awaits: no request comes in between
            if self.trees.get(item.vpath):
                raise Converging("something inside was changed during the copy")
        finally:
            self.trees.pop(item.vpath, None)
            os.close(dfd)
        if any(p == item.vpath or p.startswith(item.vpath + "/") for p in self._open_paths()):
            raise Converging("files inside were opened during the copy")
        self._check_unused(item)   # again, just before the switch (blocking: no await between)
        st = src.lstat(item.src_rel)
        self._place_and_switch(item, dst, st)
        self._switched(item.vpath)
        self._remove_legacy(item)

    # -- downgrade then upgrade ---------------------------------------------------------
    def _wants_snapshot_id(self, item: Item) -> bool:
        """A container volume gets ``snapshotid.txt`` when it moves (layout eve)."""
        return snapshotid.wanted(self.view.layout.rules, item.kind)

    def _set_aside(self, item: Item) -> None:
        """The destination wins (the plan says why: layout eve keeps it always, the
        design note when it is newer); the legacy object is kept aside, not deleted.

        The record (naming where the legacy copy goes) is committed before the
        legacy object is moved: a crash in between leaves the legacy name served
        by the destination and :meth:`recover` finishes the move, never a legacy
        name that resolves to nothing."""
        self._check_unused(item)
        src = self.backing.get(item.src_store)
        where = aside_name(item.src_rel)
        reason = (f"{item.reason or 'the destination exists and wins'}; the legacy copy "
                  f"was set aside at {src.aside_shown(where)}")
        self.index.put(Record(item.vpath, item.dst_store, item.dst_rel, item.kind, "new",
                              target_store=item.src_store, target_rel=where, reason=reason))
        self._fault("set-aside")
        src.move_aside(item.src_rel, where)
        self.index.put(Record(item.vpath, item.dst_store, item.dst_rel, item.kind, "new",
                              reason=reason))
        self._switched(item.vpath)
        log.warning("%s: %s/%s exists: %s", item.vpath, item.dst_store, item.dst_rel, reason)

    # -- helpers --------------------------------------------------------------------------
    @staticmethod
    def _fsync_parent(store: Store, rel: str) -> None:
        head = rel.rpartition("/")[0]
        fd = store.open_dir(head)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)

    def _settle(self, item: Item) -> bool:
        """After an attempt at *item* ended (an error, an abort): bring its record to
        a state the views serve, with nothing half-made left. Past the point of no
        return (renamed, switched, set aside) the move is finished, as
        :meth:`recover` would; before it, the legacy object stays served and what
        was copied goes. True if the object ended up migrated.

        Faults of the test hook do not fire here. Index errors are raised (the
        caller keeps the object in :attr:`unrecorded`); a temporary that cannot be
        removed is logged, never raised."""
        self._settling = True
        try:
            rec = self.index.get(item.vpath)
            state = rec.state if rec is not None else None
            if rec is not None and state == "switched":
                self._finish_removal(rec)
                return True
            if rec is not None and state == "new":
                if rec.target_store and rec.target_rel:
                    self._recover_set_aside(rec)
                return True
            dst = self.backing.stores.get(item.dst_store)
            if rec is not None and state == "renaming":
                src = self.backing.stores.get(item.src_store)
                if dst is not None and src is not None and dst.exists(item.dst_rel) \
                        and not src.exists(item.src_rel):
                    self.index.put(Record(item.vpath, item.dst_store, item.dst_rel, item.kind,
                                          "new"))
                    self._switched(item.vpath)
                    return True
            elif dst is not None:
                self._drop_copy(item, dst, renamed_into_place=state == "copied")
            if rec is not None and state in MIGRATING_STATES:
                if item.src_store == "unresolved":
                    self.index.put(Record(item.vpath, item.src_store, item.src_rel, item.kind,
                                          "unresolved"))
                else:
                    self.index.delete(item.vpath)
            return False
        finally:
            self._settling = False

    def _drop_copy(self, item: Item, dst: Store, renamed_into_place: bool) -> None:
        """Remove the temporary of *item*; with *renamed_into_place* (``copied``), the
        copy at the target's name if the temporary is gone (it was renamed)."""
        try:
            removed = False
            for store, name in self._temporaries(dst, item.dst_rel):
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

    def _temporaries(self, store: Store, rel: str) -> list[tuple[Store, str]]:
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

    def _find_temporary(self, store: Store, rel: str) -> tuple[Store, str] | None:
        for place in self._temporaries(store, rel):
            if place[0].exists(place[1]):
                return place
        return None

    def _undo(self, item: Item) -> None:
        """:meth:`_settle` after an attempt that ended as foreseen (no room, in use,
        aborted); if the index cannot take it, it is tried again on the next pass."""
        try:
            self._settle(item)
        except Exception as exc:  # noqa: BLE001 - e.g. the index's disk is full
            self.progress.faults += 1
            log.warning("%s: its record cannot be put back in order now (%s); will try "
                        "again", item.vpath, _why(exc))
            self.unrecorded[item.vpath] = (item, None, "", 0)

    def _undo_copy(self, item: Item) -> None:
        """After a copy a crash interrupted: no temporary left, the legacy object served."""
        self._settle(item)

    # -- crash recovery -------------------------------------------------------------------
    def recover(self) -> list[str]:
        """Finish or undo every migration a crash interrupted. Runs before serving."""
        done = []
        for rec in list(self.index.records.values()):
            try:
                line = self._recover_one(rec)
            except Exception as exc:  # noqa: BLE001 - one record never stops the others
                line = f"{rec.view}: not recovered: {_why(exc)}"
            if line:
                done.append(line)
        self._tidy_temporaries()
        return done

    def _recover_one(self, rec: Record) -> str | None:
        if rec.state == "rolling-back":
            return self._recover_rollback(rec)
        if rec.state == "new" and rec.target_store and rec.target_rel:
            return self._recover_set_aside(rec)
        if rec.state not in ("renaming", "copying", "copied", "switched"):
            return None
        if not (self.backing.has(rec.store) and rec.target_store
                and self.backing.has(rec.target_store) and rec.target_rel):
            return None
        here, there = self.backing.get(rec.store), self.backing.get(rec.target_store)
        if rec.state == "renaming":
            if there.exists(rec.target_rel) and not here.exists(rec.rel):
                self.index.put(Record(rec.view, rec.target_store, rec.target_rel, rec.kind, "new"))
                return f"{rec.view}: finished an interrupted rename"
            if rec.kind == "oci-volume":    # what the move wrote into it first
                snapshotid.drop(here, rec.rel, snapshotid.legacy_name(rec.view))
            self.index.delete(rec.view)
            return f"{rec.view}: an interrupted rename had not happened; stays"
        if rec.state == "copying":
            item = Item(rec.view, rec.kind, rec.kind == "oci-volume", rec.store, rec.rel,
                        rec.target_store, rec.target_rel, 0, "copy")
            self._undo_copy(item)
            return f"{rec.view}: dropped an interrupted copy; it will start again"
        if rec.state == "copied":
            try:
                st = here.lstat(rec.rel)
            except FileNotFoundError:
                st = None
            tmp = self._find_temporary(there, rec.target_rel)
            unchanged = st is not None and (stat.S_ISDIR(st.st_mode) or signature(st) == rec.sig)
            if unchanged and (tmp is not None or there.exists(rec.target_rel)):
                reason = None
                if tmp is not None:
                    reason = self._rename_into_place(there, rec.target_rel, tmp)
                self.index.put(Record(rec.view, rec.target_store, rec.target_rel, rec.kind,
                                      "switched", target_store=rec.store, target_rel=rec.rel,
                                      sig=rec.sig, reason=reason))
                self._finish_removal(self.index.get(rec.view))  # type: ignore[arg-type]
                return f"{rec.view}: switched to its finished copy"
            # the source changed (or went) after the copy: the copy is stale
            if tmp is not None:
                tmp[0].remove(tmp[1])
            else:
                there.remove(rec.target_rel)
            self.index.delete(rec.view)
            return f"{rec.view}: its source changed after the copy; the copy was dropped"
        # switched
        self._finish_removal(rec)
        return f"{rec.view}: removed the legacy original after the switch"

    def _recover_set_aside(self, rec: Record) -> str | None:
        """A set-aside was committed but the legacy copy may not have been moved."""
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
        self.index.put(Record(rec.view, rec.store, rec.rel, rec.kind, "new", reason=rec.reason))
        return line

    def _recover_rollback(self, rec: Record) -> str | None:
        """A rollback was interrupted and the views are served again: if the new copy
        is still there it is what is served; a half-made legacy temporary goes."""
        if not (self.backing.has(rec.store) and rec.target_store and rec.target_rel
                and self.backing.has(rec.target_store)):
            return None
        legacy = self.backing.get(rec.target_store)
        for store, name in self._temporaries(legacy, rec.target_rel):
            store.remove(name)
        _drop_tmp_dir(legacy)
        if self.backing.get(rec.store).exists(rec.rel):
            if legacy.exists(rec.target_rel):
                # both exist: the move back happened; finish it as rollback would
                Rollback(self)._resume(rec)
                return f"{rec.view}: finished an interrupted rollback"
            self.index.put(Record(rec.view, rec.store, rec.rel, rec.kind, "new"))
            return f"{rec.view}: an interrupted rollback was undone; served from {rec.store}"
        self.index.delete(rec.view)
        return f"{rec.view}: an interrupted rollback had finished; served from the legacy store"


def _drop_tmp_dir(store: Store) -> None:
    """Remove the store's staging directory if it is empty (a legacy store shows
    old EVE exactly what it had once a rollback is done), and the one an older
    compatfs made inside a new-layout store."""
    store.staging.drop_if_empty()
    if store.staging.store is not store:
        Side(store, TMP_DIR).drop_if_empty()


def _why(exc: BaseException) -> str:
    """An error in one line: ``strerror (ENAME)`` for a system call, else its type and text."""
    if isinstance(exc, Unmovable):
        return str(exc)
    if isinstance(exc, OSError):
        return f"{exc.strerror or exc} ({errno.errorcode.get(exc.errno or 0, '?')})"
    return f"{type(exc).__name__}: {exc}"


# -- rollback ---------------------------------------------------------------------------

class Rollback:
    """Moves every placed or migrated object back to its legacy name, with the
    migrator's guarantees: copy to a temporary name, rename into place, commit,
    then remove the new copy; a ``rolling-back`` record says which step a crash
    interrupted."""

    def __init__(self, migrator: Migrator) -> None:
        self.m = migrator
        self.backing = migrator.backing
        self.index = migrator.index

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
        legacy, rest = self._legacy(rec.view)
        if rec.store == split(rec.view)[0] and rec.state != "rolling-back":
            self.index.delete(rec.view)  # failed or quarantined: still in the legacy store
            return False
        if rec.state == "rolling-back":
            return self._resume(rec)
        src = self.backing.get(rec.store)
        if split(rec.view)[0] == ROOT_STORE:      # the CAS tree: no view guards it
            _refuse_if_held(f"{src.path}/{rec.rel}")
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
        self.index.put(Record(rec.view, rec.store, rec.rel, rec.kind, "rolling-back",
                              target_store=split(rec.view)[0], target_rel=rest,
                              sig=signature(st)))
        self.m._fault("rolling-back")
        try:
            src.rename(rec.rel, legacy, rest)
        except OSError as exc:
            if exc.errno != errno.EXDEV:
                raise
            await self._copy_back(src, rec.rel, legacy, rest, stat.S_ISDIR(st.st_mode))
        self.m._fsync_parent(legacy, rest)
        self.m._fault("rolled-back")
        return self._resume(self.index.get(rec.view))  # type: ignore[arg-type]

    async def _copy_back(self, src: Store, rel: str, legacy: Store, rest: str, is_dir: bool) -> None:
        stage, tmp = tmp_place(legacy, rest)
        legacy.staging.make()
        stage.remove(tmp)           # what an interrupted rollback left
        if is_dir:
            dfd, dname = stage.open_dir(legacy.staging.dir), tmp.rpartition("/")[2]  # real fd
            try:
                with src.parent(rel) as (sfd, sname):
                    await trio.to_thread.run_sync(
                        lambda: treecopy.copy_tree(sfd, sname, dfd, dname,
                                                 throttle=self.m.throttle,
                                                 compare=self.m.settings.verify != "off"))
            finally:
                os.close(dfd)
        else:
            sfd = src.open(rel, os.O_RDONLY)
            try:
                dfd = stage.open(tmp, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
                try:
                    await trio.to_thread.run_sync(
                        lambda: filecopy.copy_extents(sfd, dfd, throttle=self.m.throttle,
                                                    compare=self.m.settings.verify != "off"))
                    treecopy.copy_xattrs(sfd, dfd)
                    treecopy.finish_file(dfd, os.fstat(sfd))
                finally:
                    os.close(dfd)
            finally:
                os.close(sfd)
        stage.rename(tmp, legacy, rest)
        _drop_tmp_dir(legacy)

    def _resume(self, rec: Record) -> bool:
        """The legacy name is back in place (or was never reached): finish or undo."""
        legacy, rest = self._legacy(rec.view)
        src = self.backing.get(rec.store)
        if not legacy.exists(rest):
            self.index.put(Record(rec.view, rec.store, rec.rel, rec.kind, "new"))
            return False  # the move had not happened; the next run starts it again
        if rec.kind == "oci-volume":
            # the legacy tree comes back as old EVE had it: without what the move added
            snapshotid.drop(legacy, rest, snapshotid.legacy_name(rec.view))
        if src.remove(rec.rel):
            self.m._fsync_parent(src, rec.rel)
        _drop_tmp_dir(src)          # the migration's, left empty in the new layout
        for store, name in self.m._temporaries(legacy, rest):
            store.remove(name)
        _drop_tmp_dir(legacy)
        self.index.delete(rec.view)
        return True


class Quarantined(Exception):
    """A content-addressed object does not hash to its name."""
