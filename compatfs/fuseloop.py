"""How a mount waits for the kernel's next FUSE request.

pyfuse3 3.5 reads requests in worker tasks that take turns through a
``trio.Lock``, and starts or ends a task whenever none (or more than one) is
waiting. That suits handlers that await; compatfs' never do (a handler runs
to its end between two requests, see :mod:`compatfs.operations`). The
turn-taking cost every request a trip through trio's scheduler for the lock
besides the one for the descriptor: about half of what a small request cost
the daemon (docs/benchmarks.md has the counts and the profile).

:class:`Session` runs pyfuse3's loop with exactly one reader task, which
waits for the ``/dev/fuse`` descriptor itself:

- a request already queued (the kernel queues ``RELEASE`` after ``close(2)``
  returns, readahead sends several ``READ`` at once, several agents ask at
  once) is read at once, found with a ``poll`` of no timeout;
- otherwise, and after every :data:`STREAK` requests in a row, the task
  waits through trio's scheduler, so the other tasks of the daemon (the
  migration, the config watcher, the signal handler) run between requests
  however busy the agents keep the mount.

pyfuse3 looks its wait up by name at every request (``_wait_fuse_readable``,
a module-level function of its Cython module), so :meth:`Session.serve`
puts its own in place for the duration. If pyfuse3 has no such name (a
release other than the 3.5 line this was written against) or the session's
descriptor cannot be told apart, pyfuse3's own loop runs unchanged and the
daemon logs that it does.
"""

from __future__ import annotations

import logging
import os
import select

import pyfuse3
import trio

log = logging.getLogger(__name__)

#: the name under which pyfuse3 3.5 looks up its wait for the descriptor
_WAIT = "_wait_fuse_readable"
#: requests read in a row without a trip through trio's scheduler, at most
STREAK = 16


def fuse_fds() -> set[int]:
    """This process's open descriptors of ``/dev/fuse``."""
    out = set()
    for name in os.listdir("/proc/self/fd"):
        try:
            if os.readlink(f"/proc/self/fd/{name}") == "/dev/fuse":
                out.add(int(name))
        except OSError:
            continue   # closed meanwhile (the listing's own descriptor)
    return out


class Session:
    """One FUSE session's request loop. Call :meth:`before_init`, then
    ``pyfuse3.init``, then :meth:`after_init` (which tells the session's
    descriptor from any other ``/dev/fuse`` the process has), then
    :meth:`serve`."""

    def __init__(self) -> None:
        self._before: set[int] = set()
        self.fd: int | None = None
        self._poll = select.poll()
        self._streak = 0

    def before_init(self) -> None:
        self._before = fuse_fds()

    def after_init(self) -> None:
        new = fuse_fds() - self._before
        self.fd = new.pop() if len(new) == 1 else None
        if self.fd is not None:
            self._poll.register(self.fd, select.POLLIN)

    @property
    def own_loop(self) -> bool:
        """Whether :meth:`serve` will wait for requests itself (else pyfuse3's loop runs)."""
        return self.fd is not None and callable(getattr(pyfuse3, _WAIT, None))

    async def _wait(self) -> bool:
        """Until a request can be read; False when the session is closing."""
        if self._poll.poll(0):
            self._streak += 1
            if self._streak < STREAK:
                return True
        self._streak = 0
        try:
            await trio.lowlevel.wait_readable(self.fd)  # type: ignore[arg-type]
        except trio.ClosedResourceError:   # pyfuse3.terminate()
            return False
        return True

    async def serve(self) -> None:
        """pyfuse3's main loop, until ``pyfuse3.terminate()`` (see the module doc)."""
        if not self.own_loop:
            log.info("serving through pyfuse3's own request loop")
            await pyfuse3.main()
            return
        original = getattr(pyfuse3, _WAIT)
        setattr(pyfuse3, _WAIT, self._wait)
        try:
            await pyfuse3.main(min_tasks=1, max_tasks=1)
        finally:
            setattr(pyfuse3, _WAIT, original)
