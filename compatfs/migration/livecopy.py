"""A file's copy that keeps up with the agent writing to it.

A file open for writing through a view keeps being written while it is
copied: every write the daemon serves for that file marks a dirty range and
every size change lowers the size the copy is cut to first (:class:`DirtyLog`,
filled by the FUSE thread through :class:`LiveChanges`, the migration's
:class:`~compatfs.changes.ChangeObserver`). Dirty ranges are copied again in
worker threads until few are left (:func:`follow`), then writes are mirrored
and the rest is copied in slices inside the event loop, so the last step
(the switch) sees a copy that equals its source. This module knows dirty
blocks and file descriptors; what is copied, and when, is the moves'.
"""

from __future__ import annotations

import functools
import logging
import os
import threading
from collections.abc import Callable
from typing import TypeVar

import trio
import trio.lowlevel

from .. import filecopy
from ..changes import FileKey

log = logging.getLogger(__name__)

MIB = 1 << 20

#: Dirty bytes left below which the copy stops chasing writes in a worker thread.
FINAL_PASS_BYTES = 8 * MIB
#: Passes in a worker thread before writes are mirrored instead.
MAX_PASSES = 4
#: Dirty bytes copied per step inside the event loop once writes are mirrored.
SLICE_BYTES = 4 * MIB
#: Granularity of dirty tracking: small writes close together are copied as one.
DIRTY_BLOCK = 64 << 10

_niced = threading.local()
_T = TypeVar("_T")


async def in_background(fn: Callable[[], _T]) -> _T:
    """Run *fn* in a worker thread at the lowest CPU priority: the copies (and the
    encryption their fdatasyncs do in the copying thread) yield to the agents."""
    def run() -> _T:
        if not getattr(_niced, "done", False):
            try:
                os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), 19)
            except OSError:
                pass
            _niced.done = True
        return fn()

    return await trio.to_thread.run_sync(run)


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

    __slots__ = ("blocks", "mirror", "mirror_error", "shrunk_to", "touched")

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
            first, last = offset // DIRTY_BLOCK, (offset + length - 1) // DIRTY_BLOCK
            self.blocks.update(range(first, last + 1))

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

    __slots__ = ("_opened", "dirty", "trees")

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


async def follow(vpath: str, dirty: DirtyLog, src_fd: int, tmp_fd: int) -> None:
    """After the bulk copy of *src_fd* to *tmp_fd*: copy what was written meanwhile
    in worker threads while much is dirty (at most :data:`MAX_PASSES` passes), then
    mirror new writes and copy the rest in the event loop (:func:`converge`)."""
    passes = 0
    while dirty.bytes > FINAL_PASS_BYTES and passes < MAX_PASSES:
        passes += 1
        shrunk_to, ranges = dirty.take()
        log.debug("%s: pass %d over %d dirty ranges", vpath, passes, len(ranges))
        await in_background(functools.partial(DirtyLog.apply, src_fd, tmp_fd, shrunk_to, ranges))
    if dirty.blocks:
        await converge(vpath, dirty, src_fd, tmp_fd)


async def converge(vpath: str, dirty: DirtyLog, src_fd: int, tmp_fd: int) -> None:
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
        await trio.lowlevel.checkpoint()
    log.debug("%s: converged with writes mirrored", vpath)
