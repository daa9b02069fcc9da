"""The words compatfs' records, stages and reports are made of, each spelt once.

Index records, the config file, ``status``, the metrics and the tests all speak
of the same states, stages, kinds, stores and views. They are string enums
(:class:`enum.StrEnum`): a member *is* its text, so it is stored in SQLite,
written to JSON and compared with text read back without conversion, while a
typo in the code is an ``AttributeError`` instead of a silent mismatch.

Nothing here imports another compatfs module: every layer may use it.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable
from enum import StrEnum
from typing import Protocol


class Stage(StrEnum):
    """The rollout stage a device is in (the ``stage`` key of the config)."""

    OFF = "off"
    OBSERVE = "observe"
    REDIRECT = "redirect"
    MIGRATE = "migrate"
    ROLLBACK = "rollback"


#: Stages in which the views place new objects in the new layout.
PLACING_STAGES = frozenset({Stage.REDIRECT, Stage.MIGRATE})
#: Stages the daemon serves (``rollback`` and ``off`` are run without views).
SERVED_STAGES = (Stage.OBSERVE, Stage.REDIRECT, Stage.MIGRATE)


class State(StrEnum):
    """The state of an index record: where an object is in its life."""

    NEW = "new"                  # placed in the new layout by a view
    UNRESOLVED = "unresolved"    # made before its volume could be resolved: kept legacy
    RENAMING = "renaming"        # being moved by rename (same file system)
    COPYING = "copying"          # being copied to a temporary in its destination
    COPIED = "copied"            # copy complete, not yet renamed into place
    SWITCHED = "switched"        # moved: the new copy is served
    FAILED = "failed"            # its move failed; retried after a back-off
    QUARANTINED = "quarantined"  # failed and kept aside until asked for by name
    ROLLING_BACK = "rolling-back"  # being copied back to its legacy name
    LEGACY = "legacy"            # kept at its legacy name, with a reason


#: States of a record whose object is between its legacy and its new name.
MIGRATING_STATES = frozenset({State.RENAMING, State.COPYING, State.COPIED})


class Kind(StrEnum):
    """What a legacy object is, as the plan classifies it."""

    VM_VOLUME = "vm-volume"
    OCI_VOLUME = "oci-volume"
    PENDING = "pending"
    VERIFIER = "verifier"
    VERIFIED = "verified"
    OTHER = "other"


class ViewName(StrEnum):
    """The legacy directories compatfs serves, each a top-level name of its mount."""

    IMG = "img"
    DOWNLOADS = "downloads"
    PREPARED = "prepared"


#: Every view, in the order they are mounted (and unmounted in reverse).
ALL_VIEWS: tuple[ViewName, ...] = (ViewName.IMG, ViewName.DOWNLOADS, ViewName.PREPARED)


def views_for(mount_prepared: bool) -> tuple[ViewName, ...]:
    """The views a daemon serves: the containers' prepared tree only when configured."""
    return ALL_VIEWS if mount_prepared else ALL_VIEWS[:2]


class StoreKey(StrEnum):
    """The backing directories compatfs opens, by the key its index records name."""

    ROOT = "persist"                  # the root itself (the legacy containerd tree moves
                                      # out of it as one name)
    IMG = "img"
    DOWNLOADS = "downloads"
    PREPARED = "prepared"
    VAULT_VOLUMES = "vault_volumes"
    CLEAR_VOLUMES = "clear_volumes"
    NOVAULT_VOLUMES = "novault_volumes"
    DOWNLOADER = "downloader"
    VERIFIER = "verifier"
    VERIFIED = "verified"
    UNRESOLVED = "unresolved"
    CAS = "cas"
    CAS_PARENT = "cas_parent"         # the directory the CAS location is a name in


class _Stated(Protocol):
    @property
    def state(self) -> str: ...


def count_by_state(records: Iterable[_Stated]) -> dict[str, int]:
    """How many *records* are in each state (only states that occur), sorted by state."""
    return dict(sorted(Counter(rec.state for rec in records).items()))
