"""The migration's scheduler: what moves, in what order, when, and again after a failure.

One object at a time goes through the states of :mod:`compatfs.enums`
(``renaming``; ``copying``, ``copied``, ``switched``; ``new``), each committed
before the next step starts (:mod:`~compatfs.migration.steps`,
:mod:`~compatfs.migration.moves`), so a crash at any instant leaves what
:func:`~compatfs.migration.recovery.recover` finishes or undoes at the next start.
``failed`` and ``quarantined`` objects stay served from their legacy place: a
failure is tried again after a back-off that doubles up to :data:`RETRY_CAP_S`
(at every start, and on ``migrate --now``); a verified download that does not
match its sha256 only when asked for by name.

An error nobody foresaw (a full index, a name sqlite refuses, a bug) ends the
attempt at that one object only: :meth:`Steps.settle` brings its record back to
a state the views serve, the object is marked ``failed`` (in memory and written
later when the index cannot be written now), the error is counted in
``Progress.faults``, and the other objects, the views and the daemon go on.
The scheduler also owns the queue's order (open objects, then small ones first),
pause and resume, and the passes (one now, or one every ``rescan_s``).
"""

from __future__ import annotations

import errno
import logging
import math
import os
import threading
import time
from collections.abc import Awaitable, Callable

import trio

from .. import filecopy
from ..config import Migration
from ..enums import Kind, State, StoreKey, ViewName
from ..handles import HandleTable
from ..indexformat import Record
from ..placement import split
from ..plan import Action, make_plan
from ..throttle import Throttle
from ..view import View
from .faults import Faults
from .livecopy import LiveChanges
from .moves import Mover
from .progress import (
    Converging,
    InUse,
    Item,
    NoSpace,
    Progress,
    Quarantined,
    Switch,
    expected_sha,
    why,
)
from .recovery import recover
from .steps import Steps

log = logging.getLogger(__name__)

MIB = 1 << 20

#: The longest wait before a failed object is tried again: reached after
#: ``retries`` attempts, and kept as long as the daemon runs (never given up).
RETRY_CAP_S = 3600.0
#: The longest wait between two passes (a huge or infinite ``rescan_s``).
RESCAN_CAP_S = 86400.0

#: What a failure that could not be recorded yet waits with: the object, the state
#: to record (None: only its record to put in order), the reason and the attempts.
Unrecorded = tuple[Item, str | None, str, int]


def seconds(value: float, default: float, cap: float) -> float:
    """*value* as a usable delay: NaN or negative gives *default*, more than *cap* gives
    *cap* (trio refuses a NaN timeout, and an infinite one would never rescan)."""
    if math.isnan(value) or value < 0:
        return default
    return min(value, cap)


class Migrator:
    """Moves legacy objects of one :class:`View` into the new layout.

    With *handles* (the daemon's open files), writes through the views are
    followed (:attr:`changes` is the observer the views report to) and open
    handles are switched; without (``compatfs migrate --now``, nothing else
    writes), neither is needed. *bases* maps a view to the directory its legacy
    objects are found in when that is not the layout's; *on_switch* is told
    each legacy name served from its new place from now on, and how it got
    there (:class:`~compatfs.migration.progress.Switch`); *switch_told*, awaited
    before a move is reported done, returns once what *on_switch* started is
    finished (the kernel told).
    """

    def __init__(self, view: View, settings: Migration, handles: HandleTable | None = None,
                 bases: dict[str, str] | None = None,
                 on_switch: Callable[[str, Switch], None] | None = None,
                 switch_told: Callable[[], Awaitable[None]] | None = None) -> None:
        self.view = view
        self.backing = view.backing
        self.index = view.index
        self.settings = settings
        self.handles = handles
        self.bases = bases or {}
        self.on_switch = on_switch
        self.switch_told = switch_told
        rate = settings.throttle_mib_per_s * MIB
        if not math.isfinite(rate) or rate < 0:
            rate = 0.0                    # NaN or infinite: no limit rather than no copy
        self.throttle = Throttle(rate or None)
        self.faults = Faults()
        self.steps = Steps(self.backing, self.index, self.faults, handles, self._switched)
        self.moves = Mover(view, settings, self.steps, handles, self.throttle)
        self.paused = False
        self.urgent: set[str] = set()
        #: names asked for by migrate-now: tried in the next pass even if failed
        #: (whatever their back-off) or quarantined
        self.asked: set[str] = set()
        self.pending: set[str] = set()
        self.retry_at: dict[str, float] = {}
        self.in_use: dict[str, str] = {}    # last "in use" reason said, per object
        #: objects whose failure could not be written to the index, or whose record
        #: could not be put back in order: vpath -> (item, state to record or None,
        #: reason, attempts), written at the start of every pass until the index takes it
        self.unrecorded: dict[str, Unrecorded] = {}
        self._wake = trio.Event()
        #: what the views report to while this migrator runs
        self.changes = LiveChanges(self.moves.dirty, self.moves.trees, self.prioritize)

    @property
    def progress(self) -> Progress:
        """The current (or last) pass's progress."""
        return self.moves.progress

    @property
    def stop(self) -> threading.Event:
        """Set to end the copies under way at their next step (they are undone)."""
        return self.moves.stop

    def recover(self) -> list[str]:
        """Finish or undo what a crash interrupted, the views' moves and this
        migration's, before serving (:func:`~compatfs.migration.recovery.recover`)."""
        return recover(self.view, self.steps)

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
        plan = make_plan(layout, self.view.resolver, ViewName.PREPARED in self.view.views,
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
            if rec is not None and rec.state == State.QUARANTINED and vpath not in self.asked:
                continue  # its content does not match its name: only when asked by name
            if rec is not None and rec.state not in (State.FAILED, State.QUARANTINED,
                                                     State.LEGACY):
                continue  # placed, or already under way (a kept legacy copy is not)
            top, rest = split(vpath)
            dst_store = e.location
            if e.location == StoreKey.CAS:   # the CAS tree is one name in its parent directory
                dst_store = StoreKey.CAS_PARENT
                dst_rel = os.path.basename(e.target)
            else:
                dst_rel = os.path.relpath(e.target, layout.path(e.location))
            action = e.action
            if action not in (Action.COPY, Action.RENAME, Action.SET_ASIDE):
                continue
            if action == Action.COPY and self._renameable(top, dst_store):
                action = Action.RENAME
            items.append(Item(vpath, e.obj.kind, e.obj.is_dir, top, rest, dst_store, dst_rel,
                              e.obj.bytes, action, expected_sha(e.location, dst_rel),
                              e.reason))
        for rec in list(self.index.records.values()):
            if rec.state != State.UNRESOLVED:
                continue
            want = self.view.placement(rec.view, rec.kind == Kind.OCI_VOLUME)
            if want.state == State.NEW and not self.backing.get(want.store).exists(want.rel):
                items.append(Item(rec.view, rec.kind, rec.kind == Kind.OCI_VOLUME, rec.store,
                                  rec.rel, want.store, want.rel, 0, "copy"))
        return items

    def cas_vpath(self) -> str:
        """The index key of the legacy containerd tree: no view serves it, so it is
        named by the root store and its path there."""
        return f"{StoreKey.ROOT}/{self.view.layout.rel('containerd')}"

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
        open_paths = self.moves.open_paths()
        first = self.urgent | self.asked
        return sorted(items, key=lambda i: (i.vpath not in first,
                                            i.vpath not in open_paths, i.bytes, i.vpath))

    # -- commands ---------------------------------------------------------------------
    def wake(self) -> None:
        """Look for work now (the config changed, a command asked)."""
        self._wake.set()

    def pause(self) -> None:
        """Start no new copy; the ones under way stop at their next step and are undone."""
        self.paused = True
        self.moves.stop.set()

    def resume(self) -> None:
        self.paused = False
        self.moves.stop = threading.Event()
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
    async def run(self, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
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
                except Exception as exc:
                    failures += 1
                    self.progress.faults += 1
                    wait = min(wait, self._backoff(failures))
                    log.warning("migration pass failed (%s); next pass in %.0f s",
                                why(exc), wait)
                    log.debug("the migration pass failed", exc_info=True)
            with trio.move_on_after(wait):
                await self._wake.wait()
            self._wake = trio.Event()

    def _backoff(self, attempts: int) -> float:
        """The wait after the *attempts*-th failure in a row: ``retry_backoff_s``,
        doubling, and :data:`RETRY_CAP_S` from ``retries`` attempts on."""
        if attempts >= max(1, self.settings.retries):
            return RETRY_CAP_S
        factor: int = 2 ** max(0, attempts - 1)
        return min(self._wait_s() * factor, RETRY_CAP_S)

    def _wait_s(self) -> float:
        """The wait before an object that waits (no room, in use, busy) is tried again."""
        return seconds(self.settings.retry_backoff_s, Migration.retry_backoff_s, RETRY_CAP_S)

    async def run_once(self) -> Progress:
        """One pass over everything there is to do now; returns its progress."""
        self._record_unrecorded()
        self.faults.hit("pass")
        await trio.to_thread.run_sync(self.view.resolver.refresh)
        now = time.monotonic()
        asked = set(self.asked)
        work = await trio.to_thread.run_sync(self.work)
        items = [i for i in work if i.vpath not in self.unrecorded
                 and (i.vpath in asked or self.retry_at.get(i.vpath, 0) <= now)]
        self.pending = {i.vpath for i in items}
        self.moves.progress = Progress(objects_total=len(items),
                                       bytes_total=sum(i.bytes for i in items),
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
        self.steps.tidy_temporaries()
        return self.progress

    async def _one(self, item: Item, limiter: trio.Semaphore) -> None:
        try:
            await self.migrate(item)
        except Exception as exc:
            self.progress.faults += 1
            log.warning("%s: unexpected error after its migration: %s", item.vpath, why(exc),
                        extra={"object": item.vpath})
            log.debug("%s: unexpected error", item.vpath, exc_info=True)
        finally:
            limiter.release()
            self.progress.objects_done += 1
            self.progress.current.pop(item.vpath, None)

    def _retry_later(self, item: Item, waiting: str | None) -> None:
        if waiting is not None:
            self.progress.waiting[item.vpath] = waiting
        self.retry_at[item.vpath] = time.monotonic() + self._wait_s()

    async def migrate(self, item: Item) -> None:
        """Move one object; a failure is retried after a back-off (:meth:`_backoff`)."""
        rec = self.index.get(item.vpath)
        attempts = rec.attempts if rec is not None else 0
        try:
            if item.action == "set-aside":
                self.moves.set_aside(item)
            elif item.action == "rename" and await self.moves.rename(item):
                pass
            elif item.is_dir:
                await self.moves.copy_tree(item)
            else:
                await self.moves.copy_file(item)
            if self.switch_told is not None:
                await self.switch_told()
            self.retry_at.pop(item.vpath, None)
            log.info("migrated %s to %s/%s", item.vpath, item.dst_store, item.dst_rel,
                     extra={"object": item.vpath, "state": State.SWITCHED})
        except NoSpace as exc:
            self._undo(item)
            self._retry_later(item, str(exc))
            log.info("%s: %s; will retry", item.vpath, exc, extra={"object": item.vpath})
        except Converging as exc:
            self._undo(item)
            self._retry_later(item, None)
            log.info("%s: %s; will retry", item.vpath, exc, extra={"object": item.vpath})
        except InUse as exc:
            self._undo(item)
            self._retry_later(item, str(exc))
            # a containerd that keeps running would repeat this every pass: say it once
            # per change of holder
            level = logging.DEBUG if self.in_use.get(item.vpath) == str(exc) else logging.INFO
            self.in_use[item.vpath] = str(exc)
            log.log(level, "%s: %s", item.vpath, exc, extra={"object": item.vpath})
        except filecopy.CopyAborted:
            self._undo(item)
        except Quarantined as exc:
            self._undo(item)
            self._keep_legacy(item, State.QUARANTINED, str(exc), attempts + 1)
            self.progress.failed += 1
            log.warning("%s: %s; quarantined, left where it is", item.vpath, exc,
                        extra={"object": item.vpath, "state": State.QUARANTINED})
        except Exception as exc:  # noqa: BLE001 - one failure never stops the others
            if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT):
                # a full disk mid-copy: back off and try again, not a failure
                settled: bool | None
                try:
                    settled = self.steps.settle(item)
                except Exception:  # noqa: BLE001 - the index is full too: a failure
                    settled = None
                if settled is not None:
                    if not settled:
                        self._retry_later(item, f"the destination filled up: {exc.strerror}")
                        log.info("%s: destination full mid-copy; will retry", item.vpath,
                                 extra={"object": item.vpath})
                    return
            self._failed(item, exc, attempts + 1)

    def _undo(self, item: Item) -> None:
        """Settle *item* after an attempt that ended as foreseen (no room, in use,
        aborted); if the index cannot take it, it is tried again on the next pass."""
        try:
            self.steps.settle(item)
        except Exception as exc:  # noqa: BLE001 - e.g. the index's disk is full
            self.progress.faults += 1
            log.warning("%s: its record cannot be put back in order now (%s); will try "
                        "again", item.vpath, why(exc), extra={"object": item.vpath})
            self.unrecorded[item.vpath] = (item, None, "", 0)

    def _failed(self, item: Item, exc: Exception, attempts: int) -> None:
        """An unforeseen error ended the attempt at *item*: put its record in order,
        mark it failed (or keep that in memory), count it, and set its next try."""
        self.progress.faults += 1
        reason = why(exc)
        log.debug("%s: migration failed", item.vpath, exc_info=exc)
        try:
            migrated = self.steps.settle(item)
        except Exception as settle_exc:
            log.warning("%s: migration failed (%s) and its record cannot be put back in "
                        "order now (%s); will try again", item.vpath, reason, why(settle_exc),
                        extra={"object": item.vpath})
            log.debug("%s: settling failed", item.vpath, exc_info=True)
            self.unrecorded[item.vpath] = (item, State.FAILED, reason, attempts)
            migrated = False
        delay = self._backoff(attempts)
        self.retry_at[item.vpath] = time.monotonic() + delay
        if migrated:
            self.retry_at.pop(item.vpath, None)
            log.warning("%s: %s after its move; the move was finished", item.vpath, reason,
                        extra={"object": item.vpath, "state": State.SWITCHED})
            return
        self.progress.failed += 1  # in this pass, whether or not it is retried later
        if item.vpath not in self.unrecorded:
            self._keep_legacy(item, State.FAILED, reason, attempts)
        log.warning("%s: migration failed (%s); attempt %d, next in %.0f s", item.vpath,
                    reason, attempts, delay, extra={"object": item.vpath, "state": State.FAILED})

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
                    state, why(exc), extra={"object": item.vpath, "state": state})
            self.unrecorded[item.vpath] = (item, state, reason, attempts)
        else:
            self.unrecorded.pop(item.vpath, None)

    def _record_unrecorded(self) -> None:
        """Write the failures the index could not take before (:attr:`unrecorded`)."""
        for vpath, (item, state, reason, attempts) in list(self.unrecorded.items()):
            try:
                migrated = self.steps.settle(item)
            except Exception as exc:  # noqa: BLE001 - still not writable: next pass
                log.debug("%s: record still not in order: %s", vpath, why(exc))
                continue
            rec = self.index.get(vpath)
            if state is None or migrated or \
                    (rec is not None and rec.state not in (State.FAILED, State.QUARANTINED)):
                self.unrecorded.pop(vpath, None)   # in order; or placed meanwhile
                continue
            self._keep_legacy(item, state, reason, attempts)
            if vpath not in self.unrecorded:
                log.info("%s: that it is %s is recorded now", vpath, state,
                         extra={"object": vpath, "state": state})

    def failures(self) -> dict[str, str]:
        """vpath -> reason of every object whose last attempt failed, recorded or not."""
        out = {r.view: r.reason or r.state for r in self.index.records.values()
               if r.state in (State.FAILED, State.QUARANTINED)}
        out.update({vpath: f"{reason} (not recorded in the index yet)"
                    for vpath, (_, state, reason, _) in self.unrecorded.items() if state})
        return out

    def _switched(self, vpath: str, how: Switch) -> None:
        self.progress.current.pop(vpath, None)
        if self.on_switch is not None:
            self.on_switch(vpath, how)

