"""The fault-injection test hook: kill (or fail) the process at a named point of a move.

Crash safety is only as good as its tests, and those need to stop a migration
or a rollback between any two of its committed steps. Every step calls
:meth:`Faults.hit` with its point's name; the environment of the process says
whether that point fires. Kept apart from the steps so the hook is one small,
obviously inert thing in production (no ``COMPATFS_FAULT`` set: nothing fires).
"""

from __future__ import annotations

import errno
import os
import signal
from collections.abc import Iterator
from contextlib import contextmanager

#: Named points of a migration, in the order a move reaches them, where the test
#: hook ``COMPATFS_FAULT=<point>`` kills the process (or, with
#: ``COMPATFS_FAULT_MODE=raise``, raises ``OSError(EIO)``): see :meth:`Faults.hit`.
#: ("pass": the start of a pass, before any object.)
MIGRATE_FAULT_POINTS = ("pass", "renaming", "renamed", "copying", "bulk-copied", "copied",
                        "renamed-into-place", "switched", "legacy-removed", "set-aside")
#: The same, of a rollback.
ROLLBACK_FAULT_POINTS = ("rolling-back", "rolled-back")
FAULT_POINTS = MIGRATE_FAULT_POINTS + ROLLBACK_FAULT_POINTS


class Faults:
    """The hook as this process's environment sets it (read once, at construction)."""

    __slots__ = ("_at", "_raise", "_skip", "_times", "settling")

    def __init__(self) -> None:
        self._at = os.environ.get("COMPATFS_FAULT") or None
        self._skip = int(os.environ.get("COMPATFS_FAULT_SKIP", "0"))
        times = os.environ.get("COMPATFS_FAULT_TIMES")
        self._times = int(times) if times else None
        self._raise = os.environ.get("COMPATFS_FAULT_MODE") == "raise"
        #: set while a failed attempt is put back in order: nothing fires then
        self.settling = False

    def hit(self, point: str) -> None:
        """Fault tests set COMPATFS_FAULT=<point> (one of :data:`FAULT_POINTS`) to
        SIGKILL the process here, or with COMPATFS_FAULT_MODE=raise to raise
        ``OSError(EIO)``; COMPATFS_FAULT_SKIP=N lets the first N hits pass, and
        COMPATFS_FAULT_TIMES=N fires N times only. Never while settling a failure."""
        if self._at != point or self.settling:
            return
        if self._skip > 0:
            self._skip -= 1
            return
        if self._times is not None:
            if self._times <= 0:
                return
            self._times -= 1
        if self._raise:
            raise OSError(errno.EIO, f"injected fault at {point}")
        os.kill(os.getpid(), signal.SIGKILL)

    @contextmanager
    def quiet(self) -> Iterator[None]:
        """No fault fires inside (settling a failure must not fail again)."""
        self.settling = True
        try:
            yield
        finally:
            self.settling = False
