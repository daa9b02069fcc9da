"""Telling the kernel what the daemon changed by itself.

The kernel keeps, for each view name it looked up, the entry (which inode a
name is) for the reply's entry timeout, the inode's attributes for its
attribute timeout, and the file's pages from one open to the next while
``open`` answers ``keep_cache``. A change made through a view goes through the
kernel, which updates these itself, whichever bind of the one FUSE mount it
came through. What the daemon changes outside a request, the kernel cannot
know; this module tells it, and nothing else in the daemon does.

What the daemon changes while mounted, outside a request:

- the migration switches a name to its new place (:class:`Switch`):
  ``MOVED`` (``rename(2)`` into the new layout: the migration's rename, a
  ``renaming`` move settled, an unresolved name placed by the config watcher):
  the attributes of the name change (ctime, device), nothing else; a
  container volume moved so gains ``snapshotid.txt``, a new name;
  ``COPIED`` (a file or a tree copied, then switched): the attributes of the
  name and of every name beneath it, never the bytes (the copy kept up with
  every write before the switch) nor the names; ``REPLACED`` (set aside: the
  destination wins): another object under the same name, so its attributes,
  its bytes and the names beneath it;
- the migration makes names no view serves, or names that appear (the
  legacy original removed after its copy is served, temporaries, the
  ``.compatfs-set-aside`` directory of a legacy store, ``snapshotid.txt``):
  nothing to tell, since a failed lookup is never cached (below) and
  listings are never cached (pyfuse3 3.5 cannot answer ``opendir`` with
  ``cache_readdir``);
- ``reload`` and a config change only decide where *new* names go, except
  for the unresolved names they let the config watcher place (``MOVED``).

So the kernel is told, for a name it holds (found in the inode table, never
made there): its attributes are stale, at once, in the event loop
(``invalidate_inode(attr_only=True)`` touches no page and cannot wait on a
request); for a replaced object, its pages too; and for a tree copied or
replaced, the same for every name beneath it the kernel holds. Those go to a
worker thread (:meth:`KernelCache.run`, a background task of the daemon):
dropping pages waits for a page being read, whose ``READ`` the event loop
answers, and walking a tree is I/O. The migration reports a move done (its
log line, the next object) only once that thread is through
(:meth:`KernelCache.told`), so whoever learns of the move finds the kernel
told.

Never told: ``invalidate_entry``. No view name vanishes by the daemon's doing
but the names inside a replaced tree, and the entry of a directory (or of a
file) cannot be invalidated safely: the kernel answers it with
``d_invalidate``, which detaches whatever is mounted on or beneath it (a
container's binds of a volume). Expiring an entry without that is
``FUSE_EXPIRE_ONLY`` (Linux 6.2, libfuse 3.13's
``fuse_lowlevel_notify_expire_entry``), which pyfuse3 3.5 does not expose: a
name the kernel looked up that only the set-aside tree had (a container
volume whose destination won) is still found by ``stat`` for at most the
entry timeout, and opening it fails with ``ENOENT``.

Failed lookups are not cached (``ENOENT``, not an entry with inode 0): names
appear without any request through this mount and without the daemon
knowing it can tell the kernel: a record's file in a new-layout store no
view covers (the vault, written by the controller's agents or an operator),
the legacy stores through a descriptor opened before the views were bound,
and the names the migration makes inside trees. A cached failure would hide
such a name for the timeout, which an agent polling for a file it waits for
cannot tell from its absence.
"""

from __future__ import annotations

import errno
import logging
import math
import os

import pyfuse3
import trio

from .inodes import ROOT, InodeTable
from .migration import Switch
from .stores import Store
from .view import View

log = logging.getLogger(__name__)

#: The longest a move's report waits for the kernel to be told (a page being
#: read holds its invalidation until the read is answered).
TOLD_SECONDS = 10.0

#: What the worker thread is given: the inode, where it is now, and whether
#: its bytes changed (else only the attributes beneath it).
Job = tuple[int, Store, str, bool]


def forget_attributes(ino: int, pages: bool = False) -> None:
    """Tell the kernel the attributes (and with *pages*, the cached bytes) of
    *ino* are stale. An inode the kernel does not hold is not an error."""
    try:
        pyfuse3.invalidate_inode(ino, attr_only=not pages)
    except OSError as exc:
        if exc.errno != errno.ENOENT:
            log.debug("invalidating inode %d: %s", ino, exc)


class KernelCache:
    """What the daemon tells the kernel when it changes a name by itself.

    :meth:`changed` is called in the event loop (the migration's switch, the
    config watcher); :meth:`run` is the background task that does what may
    wait, in a worker thread."""

    def __init__(self, inodes: InodeTable, view: View) -> None:
        self.inodes = inodes
        self.view = view
        self._send, self._receive = trio.open_memory_channel[Job](math.inf)
        self._pending = 0
        self._idle = trio.Event()
        self._idle.set()

    def inode(self, vpath: str) -> int | None:
        """The inode of *vpath* if the kernel may hold it (it was looked up)."""
        ino = ROOT
        for part in vpath.split("/"):
            found = self.inodes.find(ino, part)
            if found is None:
                return None
            ino = found
        return ino

    def changed(self, vpath: str, how: Switch) -> None:
        """*vpath* is served from another place now, got there *how*."""
        ino = self.inode(vpath)
        if ino is None:
            return   # never looked up, so nothing of it or beneath it is cached
        forget_attributes(ino)
        if how == Switch.MOVED:
            return   # the same object, the same inodes beneath
        try:
            store, rel, _ = self.view.locate(vpath)
        except OSError:
            return
        self._send.send_nowait((ino, store, rel, how == Switch.REPLACED))
        self._pending += 1
        if self._idle.is_set():
            self._idle = trio.Event()

    async def told(self) -> None:
        """Return once the kernel was told all :meth:`changed` was given so far (the
        migration reports a move done only then), or after :data:`TOLD_SECONDS`."""
        with trio.move_on_after(TOLD_SECONDS):
            await self._idle.wait()

    async def run(self) -> None:
        """Drop pages and the attributes beneath trees, off the event loop."""
        async for job in self._receive:
            try:
                await trio.to_thread.run_sync(self._apply, *job, abandon_on_cancel=True)
            finally:
                self._pending -= 1
                if not self._pending:
                    self._idle.set()

    def _apply(self, ino: int, store: Store, rel: str, pages: bool) -> None:
        if pages:
            forget_attributes(ino, pages=True)
        for child in self._known_beneath(ino, store, rel):
            forget_attributes(child, pages)

    def _known_beneath(self, ino: int, store: Store, rel: str) -> list[int]:
        """The inodes the kernel may hold beneath the directory *ino*, backed by
        *rel* in *store* (nothing when it is not a directory). Only directories
        the kernel looked into are listed."""
        found: list[int] = []
        todo = [(ino, rel)]
        while todo:
            parent, where = todo.pop()
            try:
                fd = store.open_dir(where)
            except OSError:
                continue   # not a directory (a file), or gone again
            try:
                with os.scandir(fd) as entries:
                    names = [(e.name, e.is_dir(follow_symlinks=False)) for e in entries]
            except OSError:
                names = []
            finally:
                os.close(fd)
            # the table is the event loop's (no structure a thread may read while
            # a lookup grows or repacks it): one trip there per directory
            children = trio.from_thread.run_sync(self._find_all, parent, names)
            for (name, is_dir), child in zip(names, children, strict=True):
                if child is None:
                    continue
                found.append(child)
                if is_dir:
                    todo.append((child, f"{where}/{name}" if where else name))
        return found

    def _find_all(self, parent: int, names: list[tuple[str, bool]]) -> list[int | None]:
        find = self.inodes.find
        return [find(parent, name) for name, _ in names]
