"""Write-behind: start writeback of what an agent streams through a view.

A write served by the daemon lands in the backing file's page cache, as a
native write would, and stays dirty until the kernel's flusher decides to
write it (after ``dirty_expire_centisecs``, or once the machine holds
``dirty_background_ratio`` of dirty memory) or until the agent calls
``fsync``. A native writer's data reaches the page cache at memory speed, so
waiting costs it little; data streamed through FUSE reaches it several times
slower, and when the agent's ``fsync`` comes, writeback (on the vault,
encryption then I/O) starts from zero for the whole file while the disk sat
idle during the write.

So, like the write-behind of network filesystem clients, a handle that writes
sequentially has writeback started for each :data:`STEP` bytes it leaves
behind (``sync_file_range(SYNC_FILE_RANGE_WRITE)``: start, do not wait; the
pages stay cached). The call runs in one worker thread, never in the event
loop: on an encrypted directory starting writeback means encrypting the
pages in the caller. Random writes (a guest's disk) are never pushed early;
a queue that is full drops the hint instead of waiting. Nothing here changes
what is durable when: ``fsync`` still decides that.
"""

from __future__ import annotations

import ctypes
import logging
import os
import queue
import threading

log = logging.getLogger(__name__)

#: A sequential run pushes writeback for every STEP bytes it leaves behind.
STEP = 8 << 20
#: Hints waiting for the worker; beyond this they are dropped (never waited for).
QUEUE_LIMIT = 16

_SYNC_FILE_RANGE_WRITE = 2
_libc = ctypes.CDLL(None, use_errno=True)
_sync_file_range = _libc.sync_file_range
_sync_file_range.argtypes = [ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint]
_sync_file_range.restype = ctypes.c_int


class Stream:
    """Where one handle's sequential run stands: [pushed, end) is not pushed yet."""

    __slots__ = ("end", "pushed")

    def __init__(self) -> None:
        self.end = -1
        self.pushed = 0


class WriteBehind:
    """One worker thread that starts writeback of ranges handed to it."""

    def __init__(self, step: int = STEP) -> None:
        self.step = step
        self.started = 0      # hints carried out
        self.dropped = 0      # hints dropped because the queue was full
        self._queue: queue.Queue[tuple[int, int, int] | None] = queue.Queue(QUEUE_LIMIT)
        self._thread: threading.Thread | None = None

    def wrote(self, stream: Stream, fd: int, off: int, n: int) -> None:
        """Account a write of *n* bytes at *off* on *fd*; maybe hand a range on.

        Called on the hot path: two comparisons unless a step is complete.
        """
        if off != stream.end:                 # not a continuation: a new run starts here
            stream.pushed = off
        stream.end = off + n
        if stream.end - stream.pushed >= self.step:
            self._hint(fd, stream.pushed, stream.end - stream.pushed)
            stream.pushed = stream.end

    def _hint(self, fd: int, off: int, length: int) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._work, name="compatfs-write-behind",
                                            daemon=True)
            self._thread.start()
        try:
            dup = os.dup(fd)        # the handle may close before the worker gets to it
        except OSError:
            return
        try:
            self._queue.put_nowait((dup, off, length))
        except queue.Full:
            os.close(dup)
            self.dropped += 1

    def _work(self) -> None:
        while True:
            job = self._queue.get()
            if job is None:
                return
            fd, off, length = job
            try:
                if _sync_file_range(fd, off, length, _SYNC_FILE_RANGE_WRITE) != 0:
                    err = ctypes.get_errno()
                    log.debug("sync_file_range(%d, %d): %s", off, length, os.strerror(err))
                else:
                    self.started += 1
            finally:
                os.close(fd)

    def close(self) -> None:
        """Let the worker finish what is queued, then stop it."""
        if self._thread is None:
            return
        self._queue.put(None)
        self._thread.join()
        self._thread = None
