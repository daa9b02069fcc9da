"""What the control file and the metrics may know of a running daemon, and ask of it.

Both used to be handed the whole daemon and walk its parts. Now the daemon
gives them a :class:`DaemonState`, a frozen snapshot taken when they ask, and
the control file a :class:`Commands` to act through: neither can reach the
views, the index or the migration behind them, and neither imports a module
above this one.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

from .latency import LatencyHistogram


@dataclass(frozen=True)
class DaemonState:
    root: str
    stage: str
    layout: str                       # the target layout's name
    eve_release: str | None           # the EVE release its rules follow, if any
    paused: bool
    records: Mapping[str, int]        # index records by state
    migration: Mapping[str, Any]      # the migration's progress, as in ``status``
    faults: int                       # unexpected errors answered with EIO
    problems: tuple[str, ...]         # with the checkpoint or latch
    throttle_mib_per_s: float
    requests: LatencyHistogram = field(default_factory=LatencyHistogram)
    write_behind_started: int = 0
    write_behind_dropped: int = 0


class Commands(Protocol):
    """What the control file may ask a daemon to do."""

    def pause(self) -> None: ...

    def resume(self) -> None: ...

    def migrate_now(self, vpath: str) -> None: ...

    def reload(self) -> None: ...

    def set_throttle(self, mib_per_s: float) -> None: ...
