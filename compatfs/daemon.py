"""The compatfs daemon: set up, mount, serve, and tear down, in that order.

One process serves every view: pyfuse3 runs one FUSE session per process,
so the daemon mounts a single FUSE filesystem in a private directory (its run
dir) whose top-level directories are the views, and bind-mounts each onto its
legacy path (``<root>/img``, ``<root>/downloads``, and ``<root>/runx/pods/
prepared`` when enabled). One process means one index, one inode table and
one view of the config, with no cross-process locking; the bind mounts share
the FUSE connection, so when the daemon dies every view fails with
``ENOTCONN`` at once instead of exposing the legacy directories underneath.

Order of set-up: open every backing directory (before anything covers it),
recover the index, mount FUSE privately, bind the views, check each answers,
report readiness. Tear-down runs in reverse on SIGTERM, SIGINT or when the
FUSE session ends.

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
from dataclasses import dataclass, field
from typing import Awaitable, Callable

import pyfuse3
import trio

from . import __version__, fscrypt, metrics, mounts
from .backing import ROOT_STORE, Backing
from .changes import NO_CHANGES
from .config import Config
from .control import Control
from .daemonstate import DaemonState
from .enums import count_by_state, views_for as _views_for
from .handles import HandleTable
from .enums import PLACING_STAGES
from .index import Index, IndexRefused
from .indexopen import open_index
from .migration import Migrator
from .operations import Operations
from .resolver import Resolver
from .rules import release_text
from .rundir import RunDir
from .view import View

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


class DaemonError(Exception):
    """The daemon cannot start; the message says why, in one line."""


def views_for(cfg: Config) -> tuple[str, ...]:
    return _views_for(cfg.mount_prepared)


@dataclass
class Daemon:
    cfg: Config
    root: str
    stage: str
    run: RunDir
    attr_timeout: float = 10.0
    views: tuple[str, ...] = ()
    offline: bool = False    # migrate --now / rollback: no views served, no stage change
    bound: list[str] = field(default_factory=list)
    dead_views: set[str] = field(default_factory=set)   # a dead daemon's, to replace

    def __post_init__(self) -> None:
        self.layout = self.cfg.layout(self.root)
        self.views = self.views or views_for(self.cfg)

    # -- set-up ---------------------------------------------------------------------
    def prepare(self) -> None:
        """Open everything the views need, before anything is mounted."""
        if self.stage == "off":
            raise DaemonError("stage is off: nothing to mount")
        if self.stage not in ("observe", "redirect", "migrate"):
            raise DaemonError(f"stage {self.stage} is not served by the daemon; "
                              "use 'compatfs rollback' to move a device back")
        for view in self.views:
            target = self.layout.path(view)
            entry = mounts.mounted_at(target)
            if entry is None:
                continue
            state = mounts.view_state(target) if entry.fstype == mounts.FSTYPE else None
            if not self.offline and state == "dead":
                self.dead_views.add(view)     # a dead daemon's: replaced, not uncovered
                continue
            if state == "not answering":
                raise DaemonError(f"{target} is served by a compatfs daemon that is alive but "
                                  "does not answer (stopped or blocked); kill it, then mount "
                                  "again: its views are replaced without uncovering the "
                                  "legacy directories")
            raise DaemonError(f"{target} is already a mount point")
        # The views create files for agents with exactly the mode the agent asked
        # for minus the agent's own umask (applied in Operations); the kernel
        # must not mask it again with ours. So every file and directory the
        # daemon makes for itself passes an explicit mode: the run dir's in
        # rundir.RunDir, the vault's in Backing and the migrator.
        os.umask(0)
        if not self.offline:
            try:
                self.run.make()     # a RunDirError (an unsafe run dir) goes to the caller as is
            except OSError as exc:
                raise DaemonError(f"run dir {self.run.dir}: {exc.strerror or exc}") from None
        if self.stage in PLACING_STAGES and not self._wait_for_vault():
            log.warning("the vault %s was not unlocked within %g s; serving in stage observe "
                        "instead of %s", self.layout.path("vault"), self.cfg.vault_wait_s,
                        self.stage)
            self.stage = "observe"
        placing = self.stage in PLACING_STAGES
        require = self.cfg.require_encrypted_vault
        try:
            self.backing = Backing.open(self.layout, self.views, placing, require,
                                        covered=frozenset(self.dead_views))
        except OSError as exc:   # from makedirs/open, beneath the root without links
            where = os.path.join(self.layout.root, os.fsdecode(exc.filename or ""))
            raise DaemonError(f"cannot open {where}: {exc.strerror} (compatfs opens its "
                              "locations without following symbolic links; what is there "
                              "must be a directory, or absent for compatfs to make it)") from None
        except Exception as exc:  # noqa: BLE001 - VaultNotEncrypted: its message says all
            raise DaemonError(str(exc)) from None
        self.index = self._open_index(placing, require)
        if not self.offline:
            self._log_stage_change()
        self.resolver = Resolver(self.layout, self.cfg.overrides)
        for problem in self.resolver.problems:
            log.warning("%s", problem)
        self.view = View(self.layout, self.backing, self.index, self.resolver, self.stage,
                         self.views)
        handles = HandleTable()
        bases = {view: f"/proc/self/fd/{self.backing.get(view).fd}" for view in self.views}
        self.migrator = Migrator(self.view, self.cfg.migration,
                                 None if self.offline else handles, bases,
                                 on_switch=self._invalidate)
        self.throttle_mib_per_s = self.cfg.migration.throttle_mib_per_s
        for line in self.migrator.recover():
            log.info("recovery: %s", line)
        self.ops = Operations(
            self.view, self.attr_timeout, handles=handles,
            changes=self.migrator.changes if self.stage == "migrate" else NO_CHANGES,
            control=Control(self.snapshot, self))

    # -- what the control file and the metrics see and ask -------------------------------
    def snapshot(self) -> DaemonState:
        """The daemon's state now, for the control file and the metrics."""
        rules = self.layout.rules
        return DaemonState(
            root=self.layout.root, stage=self.stage, layout=rules.layout,
            eve_release=release_text(rules.release) if rules.release is not None else None,
            paused=self.migrator.paused, records=count_by_state(self.index.records.values()),
            migration=self.migrator.progress.as_json(), faults=self.ops.faults,
            problems=tuple(self.resolver.problems),
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
        self.resolver.invalidate()
        self.migrator.wake()

    def set_throttle(self, mib_per_s: float) -> None:
        self.migrator.throttle.set_rate(mib_per_s * (1 << 20) or None)
        self.throttle_mib_per_s = mib_per_s

    def _wait_for_vault(self) -> bool:
        """Wait up to ``vault_wait_s`` for the vault to exist and be unlocked.

        A vault that exists but is not encrypted is not waited for: placing
        data there is refused later (require_encrypted_vault), or allowed.
        """
        deadline = time.monotonic() + self.cfg.vault_wait_s
        path = self.layout.path("vault")
        while True:
            try:
                fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
            except FileNotFoundError:
                unlocked = False
            else:
                try:
                    unlocked = fscrypt.key_present(fd) is not False
                except OSError:
                    unlocked = True  # no encryption support: nothing to wait for
                finally:
                    os.close(fd)
            if unlocked:
                return True
            if time.monotonic() >= deadline:
                return False
            time.sleep(0.5)

    def _log_stage_change(self) -> None:
        """Every change of stage is logged with the stage before and after."""
        before = self.index.meta("stage") if self.index.path else None
        if before is None:
            before = (self.run.read_text(self.run.LAST_STAGE) or "").strip() or None
        if before != self.stage:
            log.info("stage: %s -> %s", before or "none", self.stage)
        if self.index.path:
            self.index.set_meta("stage", self.stage)
        self.run.write_file(self.run.LAST_STAGE, self.stage + "\n")

    def _open_index(self, placing: bool, require: bool) -> Index:
        """The index, proven sound (:func:`compatfs.index.open_index`): made on a
        first start in a placing stage; in observe, an empty in-memory one when
        none was ever made."""
        state = self.layout.path("state")
        try:
            if placing and require and os.path.isdir(state) \
                    and not fscrypt.path_is_encrypted(state):
                raise DaemonError(f"{state} is not encrypted; refusing to keep the index "
                                  "there (require_encrypted_vault)")
            index = open_index(self.layout.root, self.layout.rel("state"), create=placing,
                               root_fd=self.backing.get(ROOT_STORE).fd)
        except IndexRefused as exc:
            raise DaemonError(str(exc)) from None
        except OSError as exc:
            raise DaemonError(f"cannot open the index in {state}: {exc.strerror or exc}") from None
        return index if index is not None else Index(None)  # observe, nothing ever placed

    def close(self) -> None:
        """Close what :meth:`prepare` opened (for work without mounting)."""
        self.index.close()
        self.backing.close()

    # -- serving --------------------------------------------------------------------
    async def serve(self, ready: Callable[[], None]) -> None:
        """Mount, bind, report *ready*, serve until told to stop, tear down."""
        mountpoint = self.run.check_mountpoint()
        options = {"fsname=compatfs", "subtype=compatfs", "allow_other", "default_permissions"}
        with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
            pyfuse3.init(self.ops, mountpoint, options)
            try:
                await self._serve(signals, ready)
            finally:
                # The FUSE loop is gone: umount(8) would stat a view nobody answers
                # and wait for ever. Detach what is still bound, without a stat.
                self._detach_views()
                pyfuse3.close(unmount=True)
                self.ops.close_all()
                self.index.close()
                self.backing.close()
                self.run.clear()
                self.run.close()

    async def _serve(self, signals, ready: Callable[[], None]) -> None:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._main, nursery)
            try:
                await self._serving(nursery, signals, ready)
            finally:
                # Whatever ended the serving (a signal, an error here), pyfuse3.main()
                # still answers the kernel until the nursery cancels it, after this.
                await self._stop_serving()

    async def _serving(self, nursery: trio.Nursery, signals, ready: Callable[[], None]) -> None:
        """Bind the views, report *ready*, start the background tasks, wait for a signal."""
        await trio.to_thread.run_sync(self._bind_views)
        await trio.to_thread.run_sync(self._check_views)
        self.run.write_info({"root": self.layout.root, "stage": self.stage,
                             "views": list(self.views), "pid": os.getpid(),
                             "mountpoint": self.run.mountpoint,
                             "started": time.time()})
        log.info("serving %s at %s (stage %s)", ", ".join(self.views),
                 self.layout.root, self.stage)
        ready()
        nursery.start_soon(self._supervised, "the config watcher", self._watch_config)
        nursery.start_soon(self._supervised, "the metrics writer", self._write_metrics)
        if self.stage == "migrate":
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
            except Exception as exc:  # noqa: BLE001 - the views never depend on it
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
        await pyfuse3.main()
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
                if not await trio.to_thread.run_sync(self.resolver.refresh):
                    continue
                log.info("checkpoint or latch changed; re-resolving")
                for problem in self.resolver.problems:
                    log.warning("%s", problem)
                for vpath, where in self.view.replace_unresolved():
                    log.info("%s: placed at %s/%s", vpath, where.store, where.rel)
                    self._invalidate(vpath)
                self.migrator.wake()
            except Exception:
                log.exception("re-resolving after a config change failed; will retry")

    def _invalidate(self, vpath: str) -> None:
        """Tell the kernel the attributes of *vpath* changed (compatfs moved it)."""
        ino: int | None = pyfuse3.ROOT_INODE
        for part in vpath.split("/"):
            ino = self.ops.inodes.find(ino, part)  # type: ignore[arg-type]
            if ino is None:
                return
        try:
            pyfuse3.invalidate_inode(ino, attr_only=True)
        except OSError:
            pass


def cleanup_stale(cfg: Config, root: str, run: RunDir, *, views: bool = True) -> list[str]:
    """Unmount what a dead daemon left (its views answer ENOTCONN); returns what was done.

    Without *views*, its dead views stay, failing closed, for the next daemon
    to replace without uncovering the legacy directories (``Daemon._bind_views``).
    """
    layout = cfg.layout(root)
    done = []
    for view in ("prepared", "downloads", "img") if views else ():
        path = layout.path(view)
        if mounts.is_compatfs(path):
            mounts.unmount(path, lazy=True)
            done.append(f"unmounted {path}")
    if mounts.mounted_at(run.mountpoint) is not None:
        mounts.fuse_unmount(run.mountpoint, lazy=True)
        done.append(f"unmounted {run.mountpoint}")
    run.clear()
    return done
