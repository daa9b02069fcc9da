"""``compatfs debug-mount``: a read-only inspection view beside the live one.

Mounted anywhere a person likes, it lists the same legacy names as the live
views and serves the same bytes, and each name carries extended attributes
saying where it is and why:

- ``user.compatfs.location``: where the bytes are now (relative to the root);
- ``user.compatfs.target``: where they belong in the new layout;
- ``user.compatfs.state``: legacy, new, migrating, failed or unresolved;
- ``user.compatfs.reason``: why it stays, failed or was set aside (absent if none).

It changes nothing on disk: it creates no directory, opens the index
read-only, is mounted ``ro`` and answers ``EROFS`` to every change. (While a
daemon runs, SQLite's shared-memory file beside the index, ``index.db-shm``,
takes this reader's read marks, as it does for every reader; it holds no
data. Without a daemon the index is opened immutable and nothing is touched.)
While the live views are mounted, the legacy directories it opens are those
views, so it shows what the agents see.

It shows a change at once, whoever makes it: it is a FUSE connection of its
own, whose kernel caches the live daemon cannot reach (a notification goes
to the connection it is written on), so nothing it answers is cached: every
entry and attribute carries a timeout of 0 (:data:`TIMEOUT`) and the kernel
asks again at each lookup and stat. Costly for a view agents use, right for
one a person inspects. Where a name is comes from the index, read again
whenever the daemon has committed to it since (SQLite's ``data_version``,
one query per lookup, stat, listing or open).
"""

from __future__ import annotations

import logging
import os
import signal
import time
from collections.abc import Callable

import pyfuse3
import trio
from pyfuse3 import FUSEError

from .boundary import errno_boundary
from .config import Config
from .device import inspect_device
from .enums import ViewName, views_for
from .fuseloop import Session
from .operations import Operations
from .status import ObjectStatus, collect, view_path
from .view import View

log = logging.getLogger(__name__)

XATTRS = ("location", "target", "state", "reason")
PREFIX = "user.compatfs."
#: How often the inspection data (plan, index) is read again.
REFRESH_SECONDS = 5.0
#: The entry and attribute timeout of every reply: nothing is cached (see above).
TIMEOUT = 0.0


class InspectionOperations(Operations):
    """The view's handlers, read-only, with the user.compatfs.* attributes.

    Every change is refused with ``EROFS`` before it reaches a store
    (:attr:`Operations.read_only`); the extended attributes are the view's
    (:meth:`Operations.backing_getxattr`) plus where each name is and why."""

    read_only = True

    def __init__(self, view: View, statuses: Callable[[], dict[str, ObjectStatus]],
                 timeout: float = TIMEOUT, fresh: Callable[[], None] = lambda: None) -> None:
        super().__init__(view, timeout)
        self._statuses = statuses
        self._fresh = fresh

    # Where a name is, read again first if the daemon changed it (Inspector.fresh);
    # each inside the errno boundary too (what fresh() does not catch is a fault).
    @errno_boundary
    async def lookup(self, parent_inode: int, name: bytes,
                     ctx: pyfuse3.RequestContext) -> pyfuse3.EntryAttributes:
        self._fresh()
        return await super().lookup(parent_inode, name, ctx)

    @errno_boundary
    async def getattr(self, inode: int, ctx: pyfuse3.RequestContext) -> pyfuse3.EntryAttributes:
        self._fresh()
        return await super().getattr(inode, ctx)

    @errno_boundary
    async def opendir(self, inode: int, ctx: pyfuse3.RequestContext) -> int:
        self._fresh()
        return await super().opendir(inode, ctx)

    @errno_boundary
    async def open(self, inode: int, flags: int, ctx: pyfuse3.RequestContext) -> pyfuse3.FileInfo:
        self._fresh()
        return await super().open(inode, flags, ctx)

    def _status(self, inode: int) -> ObjectStatus | None:
        return self._statuses().get(self.inodes.path(inode))

    @errno_boundary
    async def getxattr(self, inode: int, name: bytes, ctx: pyfuse3.RequestContext) -> bytes:
        n = os.fsdecode(name)
        if n.startswith(PREFIX) and n[len(PREFIX):] in XATTRS:
            st = self._status(inode)
            value = getattr(st, n[len(PREFIX):]) if st is not None else None
            if value is None:
                raise FUSEError(pyfuse3.ENOATTR)
            return str(value).encode()
        return self.backing_getxattr(inode, name)

    @errno_boundary
    async def listxattr(self, inode: int, ctx: pyfuse3.RequestContext) -> list[bytes]:
        names = self.backing_listxattr(inode)
        st = self._status(inode)
        if st is not None:
            names += [(PREFIX + k).encode() for k in XATTRS if getattr(st, k) is not None]
        return names


class Inspector:
    """The debug-mount daemon of one root at one mountpoint."""

    def __init__(self, cfg: Config, root: str, mountpoint: str) -> None:
        self.cfg = cfg
        self.mountpoint = os.path.abspath(mountpoint)
        # read-only, and a refused index is refused here, not shown as empty
        self.device = inspect_device(cfg, root, views_for(cfg.mount_prepared))
        self.layout = self.device.layout
        self.backing = self.device.backing
        self.index = self.device.index
        self.resolver = self.device.resolver
        self.view = self.device.view
        self.ops = InspectionOperations(self.view, self.statuses, fresh=self.fresh)
        self._statuses: dict[str, ObjectStatus] = {}
        self._read_at = 0.0
        self._version: object = None
        self._failed = ""   # why the index last failed to be read again

    def fresh(self) -> None:
        """Read the index again if another connection (the daemon) committed to it
        since it was last read; what was read stays if it cannot be read now."""
        if self.index.path is None:
            return
        try:
            version = self.index.db.execute("PRAGMA data_version").fetchone()
            if version != self._version:
                self.index.reload()
                self._version = version
        except Exception as exc:  # noqa: BLE001 - inspection keeps serving old data
            # tried again at every request; said once (not at each stat of an ls -l)
            if str(exc) != self._failed:
                log.warning("reading the index again failed: %s", exc)
            self._failed = str(exc)
            return
        self._failed = ""

    def statuses(self) -> dict[str, ObjectStatus]:
        """Where each legacy name is and why, read again when older than a few seconds."""
        if time.monotonic() - self._read_at > REFRESH_SECONDS:
            self._read_at = time.monotonic()
            try:
                if self.index.path is not None:
                    self.index.reload()
                _, objects, _ = collect(self.layout, self.resolver,
                                        ViewName.PREPARED in self.view.views)
            except Exception as exc:  # noqa: BLE001 - inspection keeps serving old data
                log.warning("reading the device state failed: %s", exc)
                return self._statuses
            self._statuses = {v: o for o in objects
                              if (v := view_path(self.layout, o.legacy)) is not None}
        return self._statuses

    async def serve(self, ready: Callable[[], None]) -> None:
        options = {"fsname=compatfs-debug", "subtype=compatfs", "ro", "allow_other",
                   "default_permissions"}
        with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
            session = Session()
            session.before_init()
            pyfuse3.init(self.ops, self.mountpoint, options)
            session.after_init()
            try:
                async with trio.open_nursery() as nursery:
                    async def main() -> None:
                        await session.serve()
                        nursery.cancel_scope.cancel()

                    nursery.start_soon(main)
                    ready()
                    async for _ in signals:
                        break
                    pyfuse3.terminate()
            finally:
                pyfuse3.close(unmount=True)
                self.ops.close_all()
                self.index.close()
                self.backing.close()
