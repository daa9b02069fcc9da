"""What one move is, how far a pass has got, and the ways a move can end early.

The scheduler, the moves, the steps and the recovery all speak of the same
:class:`Item` (one object to move, as the plan decided) and the same foreseen
endings (:class:`NoSpace`, :class:`Converging`, :class:`Unmovable`,
:class:`InUse`, :class:`Quarantined`), and report into one :class:`Progress`;
they live here, below all of them, so none imports another for them.
"""

from __future__ import annotations

import errno
import time
from dataclasses import dataclass, field
from enum import StrEnum

from ..enums import Kind
from ..names import is_sha256


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


class Switch(StrEnum):
    """How a legacy name came to be served from its new place, as the migration
    reports it (the daemon tells the kernel what it may have cached wrongly)."""

    #: the same object under another backing name (rename(2)): only the
    #: attributes of the name change (its ctime, its device)
    MOVED = "moved"
    #: an identical copy (a file or a tree copied and switched): the attributes of
    #: the name and of every name beneath it change, the bytes and names do not
    COPIED = "copied"
    #: another object (the destination won, the legacy one was set aside): the
    #: attributes, the bytes and the names beneath may all differ
    REPLACED = "replaced"


def expected_sha(location: str, rel: str) -> str | None:
    """The sha256 a verified object's content must have: its name's, ``<sha>`` or
    ``<sha>.<escaped media type>`` (EVE 11.8+); None for any other object."""
    if location != Kind.VERIFIED:
        return None
    head = rel.rpartition("/")[2].partition(".")[0]
    return head.lower() if is_sha256(head) else None


@dataclass
class Progress:
    """How far the current pass is: objects and bytes, per object under way, and
    what failed or waits (and why)."""

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

    def as_json(self) -> dict[str, object]:
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


class Quarantined(Exception):
    """A content-addressed object does not hash to its name."""


def why(exc: BaseException) -> str:
    """An error in one line: ``strerror (ENAME)`` for a system call, else its type and text."""
    if isinstance(exc, Unmovable):
        return str(exc)
    if isinstance(exc, OSError):
        return f"{exc.strerror or exc} ({errno.errorcode.get(exc.errno or 0, '?')})"
    return f"{type(exc).__name__}: {exc}"
