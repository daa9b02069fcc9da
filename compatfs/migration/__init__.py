"""The migration: legacy objects moved into the new layout while agents keep using them.

One module per responsibility, lower ones first:

- :mod:`.progress`: what one move is (:class:`Item`), how far a pass is
  (:class:`Progress`), and how a move can end early (the errors);
- :mod:`.faults`: the ``COMPATFS_FAULT`` test hook and its named points;
- :mod:`.livecopy`: a file's copy keeping up with writes (:class:`DirtyLog`,
  :class:`LiveChanges`, the migration's change observer);
- :mod:`.steps`: the crash-safe steps migrate and rollback share;
- :mod:`.moves`: one object moved by rename, by copy, or set aside;
- :mod:`.recovery`: the one recovery of views and migration, run at start;
- :mod:`.scheduler`: :class:`Migrator`, the queue, passes, retries, pause;
- :mod:`.rollback`: :class:`Rollback`, everything back to its legacy name.

What callers need is exported here.
"""

from .faults import FAULT_POINTS, MIGRATE_FAULT_POINTS, ROLLBACK_FAULT_POINTS
from .livecopy import DIRTY_BLOCK, DirtyLog, LiveChanges
from .progress import (
    Converging,
    InUse,
    Item,
    NoSpace,
    Progress,
    Quarantined,
    Switch,
    Unmovable,
    expected_sha,
)
from .recovery import recover
from .rollback import Rollback
from .scheduler import RESCAN_CAP_S, RETRY_CAP_S, Migrator, seconds
from .steps import Steps, tmp_leaf

__all__ = [
    "DIRTY_BLOCK", "FAULT_POINTS", "MIGRATE_FAULT_POINTS", "RESCAN_CAP_S", "RETRY_CAP_S",
    "ROLLBACK_FAULT_POINTS", "Converging", "DirtyLog", "InUse", "Item", "LiveChanges",
    "Migrator", "NoSpace", "Progress", "Quarantined", "Rollback", "Steps", "Switch", "Unmovable",
    "expected_sha", "recover", "seconds", "tmp_leaf",
]
