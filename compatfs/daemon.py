"""The compatfs daemon: set up, mount, serve, and tear down, in that order.

One process serves every view: pyfuse3 runs one FUSE session per process,
so the daemon mounts a single FUSE filesystem in a private directory (its run
dir) whose top-level directories are the views, and bind-mounts each onto its
legacy path (``<root>/img``, ``<root>/downloads``, and ``<root>/runx/pods/
prepared`` when enabled). One process means one index, one inode table and
one view of the config, with no cross-process locking; the bind mounts share
the FUSE connection, so when the daemon dies every view fails with
``ENOTCONN`` at once instead of exposing the legacy directories underneath.

Order of set-up: open the device (:mod:`compatfs.device`: every backing
directory before anything covers it, and the index), recover, mount FUSE
privately, bind the views, check each answers, report readiness. Tear-down
runs in reverse on SIGTERM, SIGINT or when the FUSE session ends.

Nothing but the FUSE loop may end the serving: the background tasks (the
migrator, the config watcher, the metrics writer) each run under
:meth:`Daemon._supervised`, which logs an exception, waits, and starts the task
again. Tear-down never unmounts from the thread that must answer the kernel:
the views are unbound in a worker thread while ``pyfuse3.main()`` still
serves (``umount(8)`` stats its target, a FUSE request), and if the loop is
gone already, the views are detached with ``umount2(MNT_DETACH)`` directly.
"""

from __future__ import annotations

import errno
import logging
import os
import signal
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field

import pyfuse3
import trio

from . import metrics, mounts
from .changes import NO_CHANGES
from .config import Config
from .control import Control
from .daemonstate import DaemonState
from .device import Device, DeviceError, free_views, open_device
from .enums import ALL_VIEWS, SERVED_STAGES, Stage, ViewName, count_by_state, views_for
from .fuseloop import Session
from .handles import HandleTable
from .kernelcache import KernelCache
from .migration import Migrator, Switch
from .operations import Operations
from .rules import release_text
from .rundir import RunDir

log = logging.getLogger(__name__)

#: How often the daemon checks whether the checkpoint or latch changed.
CONFIG_POLL_SECONDS = 2.0
#: How often the metrics file is rewritten.
METRICS_SECONDS = 5.0
#: The first wait before a background task that raised is started again (doubling).
RESTART_SECONDS = 1.0
#: The longest such wait.
RESTART_CAP_SECONDS = 300.0
#: How long tear-down waits for the views to be unbound while the loop serves.
UNBIND_SECONDS = 30.0


class DaemonError(DeviceError):
    """The daemon cannot start; the message says why, in one line (as a device
    that cannot be opened does)."""


@dataclass
class Daemon:
    """The one process serving every view of a root; its device comes from
    :func:`compatfs.device.open_device` in :meth:`prepare`."""

    cfg: Config
    root: str
    stage: Stage
    run: RunDir
    attr_timeout: float = 10.0
    views: tuple[ViewName, ...] = ()
    bound: list[str] = field(default_factory=list)
    dead_views: frozenset[ViewName] = frozenset()   # a dead daemon's, to replace

    def __post_init__(self) -> None:
        self.stage = Stage(self.stage)
        self.layout = self.cfg.layout(self.root)
        self.views = self.views or views_for(self.cfg.mount_prepared)
        self.device: Device
        self.migrator: Migrator
        self.ops: Operations
        #: what the kernel is told of the names the daemon changes by itself
        self.kernel: KernelCache | None = None

    # -- set-up ---------------------------------------------------------------------
    def prepare(self) -> None:
        """Open everything the views need, before anything is mounted."""
        if self.stage == Stage.OFF:
            raise DaemonError("stage is off: nothing to mount")
        if self.stage not in SERVED_STAGES:
            raise DaemonError(f"stage {self.stage} is not served by the daemon; "
                              "use 'compatfs rollback' to move a device back")
        self.dead_views = free_views(self.layout, self.views, replace_dead=True)
        os.umask(0)   # before the run dir is made: see open_device
        try:
            self.run.make()     # a RunDirError (an unsafe run dir) goes to the caller as is
        except OSError as exc:
            raise DaemonError(f"run dir {self.run.dir}: {exc.strerror or exc}") from None
        self.device = open_device(self.cfg, self.root, self.stage, self.views,
                                  covered=self.dead_views)
        self.stage = self.device.stage
        self._log_stage_change()
        handles = HandleTable()
        self.migrator = Migrator(self.device.view, self.cfg.migration, handles,
                                 self.device.bases(), on_switch=self._switched,
                                 switch_told=self._switch_told)
        self.throttle_mib_per_s = self.cfg.migration.throttle_mib_per_s
        self.device.recover(self.migrator)
        self._session = Session()
        self.ops = Operations(
            self.device.view, self.attr_timeout, handles=handles,
            changes=self.migrator.changes if self.stage == Stage.MIGRATE else NO_CHANGES,
            control=Control(self.snapshot, self))
        self.kernel = KernelCache(self.ops.inodes, self.device.view)

    # -- what the control file and the metrics see and ask -------------------------------
    def snapshot(self) -> DaemonState:
        """The daemon's state now, for the control file and the metrics."""
        rules = self.layout.rules
        return DaemonState(
            root=self.layout.root, stage=self.stage, layout=rules.layout,
            eve_release=release_text(rules.release) if rules.release is not None else None,
            paused=self.migrator.paused, records=count_by_state(self.device.index.records.values()),
            migration=self.migrator.progress.as_json(), faults=self.ops.faults,
            problems=tuple(self.device.resolver.problems),
            throttle_mib_per_s=self.throttle_mib_per_s, requests=self.ops.latency.copy(),
            write_behind_started=self.ops.write_behind.started,
            write_behind_dropped=self.ops.write_behind.dropped)

    def pause(self) -> None:
        self.migrator.pause()

    def resume(self) -> None:
        self.migrator.resume()

    def migrate_now(self, vpath: str) -> None:
        self.migrator.migrate_now(vpath)

    def reload(self) -> None:
        # read in the config watcher, off the event loop, within its poll period
        self.device.resolver.invalidate()
        self.migrator.wake()

    def set_throttle(self, mib_per_s: float) -> None:
        self.migrator.throttle.set_rate(mib_per_s * (1 << 20) or None)
        self.throttle_mib_per_s = mib_per_s

    def _log_stage_change(self) -> None:
        """Every change of stage is logged with the stage before and after."""
        before = self.device.index.meta("stage") if self.device.index.path else None
        if before is None:
            before = (self.run.read_text(self.run.LAST_STAGE) or "").strip() or None
        if before != self.stage:
            log.info("stage: %s -> %s", before or "none", self.stage, extra={"stage": self.stage})
        if self.device.index.path:
            self.device.index.set_meta("stage", self.stage)
        self.run.write_file(self.run.LAST_STAGE, self.stage + "\n")

    # -- serving --------------------------------------------------------------------
    async def serve(self, ready: Callable[[], None]) -> None:
        """Mount, bind, report *ready*, serve until told to stop, tear down."""
        mountpoint = self.run.check_mountpoint()
        options = {"fsname=compatfs", "subtype=compatfs", "allow_other", "default_permissions"}
        with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
            self._session.before_init()
            pyfuse3.init(self.ops, mountpoint, options)
            self._session.after_init()
            try:
                await self._serve(signals, ready)
            finally:
                # The FUSE loop is gone: umount(8) would stat a view nobody answers
                # and wait for ever. Detach what is still bound, without a stat.
                self._detach_views()
                pyfuse3.close(unmount=True)
                self.ops.close_all()
                self.device.close()
                self.run.clear()
                self.run.close()

    async def _serve(self, signals: AsyncIterator[int], ready: Callable[[], None]) -> None:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._main, nursery)
            try:
                await self._serving(nursery, signals, ready)
            finally:
                # Whatever ended the serving (a signal, an error here), pyfuse3.main()
                # still answers the kernel until the nursery cancels it, after this.
                await self._stop_serving()

    async def _serving(self, nursery: trio.Nursery, signals: AsyncIterator[int],
                       ready: Callable[[], None]) -> None:
        """Bind the views, report *ready*, start the background tasks, wait for a signal."""
        await trio.to_thread.run_sync(self._bind_views)
        await trio.to_thread.run_sync(self._check_views)
        self.run.write_info({"root": self.layout.root, "stage": self.stage,
                             "views": list(self.views), "pid": os.getpid(),
                             "mountpoint": self.run.mountpoint,
                             "started": time.time()})
        log.info("serving %s at %s (stage %s)", ", ".join(self.views),
                 self.layout.root, self.stage, extra={"stage": self.stage})
        ready()
        nursery.start_soon(self._supervised, "the config watcher", self._watch_config)
        nursery.start_soon(self._supervised, "the metrics writer", self._write_metrics)
        if self.kernel is not None:
            nursery.start_soon(self._supervised, "the kernel notices", self.kernel.run)
        if self.stage == Stage.MIGRATE:
            nursery.start_soon(self._supervised, "the migrator", self.migrator.run)
        async for signum in signals:
            log.info("%s: unmounting", signal.Signals(signum).name)
            break

    async def _stop_serving(self) -> None:
        """Unbind the views in a worker thread (the loop answers the stats of
        ``umount(8)``), then end the FUSE loop. Shielded: a cancelled serving
        still tears down; bounded: what is not unbound in time is detached later."""
        self.migrator.stop.set()  # a copy in a worker thread stops at its next chunk
        with trio.move_on_after(UNBIND_SECONDS) as scope:
            scope.shield = True
            try:
                await trio.to_thread.run_sync(self._unbind_views, abandon_on_cancel=True)
            except Exception as exc:  # noqa: BLE001 - tear-down goes on
                log.warning("unbinding views: %s", exc)
        if scope.cancelled_caught:
            log.warning("unbinding the views took over %g s; detaching them", UNBIND_SECONDS)
        pyfuse3.terminate()

    async def _supervised(self, name: str, task: Callable[[], Awaitable[object]]) -> None:
        """Run the background *task* for as long as the daemon serves: an exception
        in it is logged (its traceback at debug level) and the task is started
        again after a back-off, never cancelling the FUSE loop."""
        wait = RESTART_SECONDS
        while True:
            started = time.monotonic()
            try:
                await task()
                log.warning("%s stopped; starting it again in %g s", name, wait)
            except Exception as exc:
                log.warning("%s failed (%s: %s); starting it again in %g s", name,
                            type(exc).__name__, exc, wait)
                log.debug("%s failed", name, exc_info=True)
            if time.monotonic() - started > RESTART_CAP_SECONDS:
                wait = RESTART_SECONDS     # it ran well for a while: a fresh back-off
            await trio.sleep(wait)
            wait = min(wait * 2, RESTART_CAP_SECONDS)

    async def _write_metrics(self) -> None:
        """Keep <run dir>/metrics.prom current, for a device agent to ship."""
        while True:
            try:
                metrics.write(self.snapshot(), self.run)
            except OSError as exc:
                log.debug("metrics file: %s", exc)
            await trio.sleep(METRICS_SECONDS)

    async def _main(self, nursery: trio.Nursery) -> None:
        await self._session.serve()
        nursery.cancel_scope.cancel()

    def _bind_views(self) -> None:
        for view in self.views:
            target = self.layout.path(view)
            source = os.path.join(self.run.mountpoint, view)
            if view not in self.dead_views:
                mounts.bind(source, target)
            else:
                try:
                    mounts.replace_dead(source, target)
                except OSError as exc:
                    if exc.errno not in mounts.BENEATH_UNSUPPORTED:
                        raise
                    log.warning("%s: this kernel cannot mount beneath a dead view (%s); "
                                "the legacy directory shows until the new view is bound",
                                target, exc.strerror)
                    mounts.unmount(target, lazy=True)
                    mounts.bind(source, target)
                log.info("%s: replaced the view of a daemon that died", target)
            self.bound.append(target)

    def _check_views(self) -> None:
        dev = os.stat(self.run.mountpoint).st_dev
        for target in self.bound:
            if os.stat(target).st_dev != dev:
                raise DaemonError(f"{target} does not show the view after binding")

    def _unbind_views(self) -> None:
        while self.bound:
            target = self.bound[-1]
            mounts.unmount(target, lazy=True)
            self.bound.pop()

    def _detach_views(self) -> None:
        """The last resort, once nothing answers FUSE requests: detach every view still
        bound with ``umount2(MNT_DETACH)``, which never stats it."""
        while self.bound:
            target = self.bound.pop()
            try:
                mounts.detach(target)
                log.info("%s: detached", target)
            except OSError as exc:
                if exc.errno not in (errno.EINVAL, errno.ENOENT):  # not mounted (any more)
                    log.warning("detaching %s: %s", target, exc.strerror)

    async def _watch_config(self) -> None:
        """Re-resolve when the controller's config changes; place what became placeable.

        The checkpoint and latch are read in a worker thread: they are not
        compatfs' files, and the event loop must keep answering the kernel
        however long reading them takes.
        """
        while True:
            await trio.sleep(CONFIG_POLL_SECONDS)
            try:
                if not await trio.to_thread.run_sync(self.device.resolver.refresh):
                    continue
                log.info("checkpoint or latch changed; re-resolving")
                for problem in self.device.resolver.problems:
                    log.warning("%s", problem)
                for vpath, where in self.device.view.replace_unresolved():
                    self._switched(vpath, Switch.MOVED)
                    log.info("%s: placed at %s/%s", vpath, where.store, where.rel,
                             extra={"object": vpath})
                self.migrator.wake()
            except Exception:
                log.exception("re-resolving after a config change failed; will retry")

    def _switched(self, vpath: str, how: Switch) -> None:
        """*vpath* is served from another place now (the migration, the config
        watcher): the kernel drops what it cached of it (:mod:`compatfs.kernelcache`)."""
        if self.kernel is not None:
            self.kernel.changed(vpath, how)

    async def _switch_told(self) -> None:
        if self.kernel is not None:
            await self.kernel.told()


def cleanup_stale(cfg: Config, root: str, run: RunDir, *, views: bool = True) -> list[str]:
    """Unmount what a dead daemon left (its views answer ENOTCONN); returns what was done.

    Without *views*, its dead views stay, failing closed, for the next daemon
    to replace without uncovering the legacy directories (``Daemon._bind_views``).
    """
    layout = cfg.layout(root)
    done = []
    for view in reversed(ALL_VIEWS) if views else ():
        path = layout.path(view)
        if mounts.is_compatfs(path):
            mounts.unmount(path, lazy=True)
            done.append(f"unmounted {path}")
    if mounts.mounted_at(run.mountpoint) is not None:
        mounts.fuse_unmount(run.mountpoint, lazy=True)
        done.append(f"unmounted {run.mountpoint}")
    run.clear()
    return done
