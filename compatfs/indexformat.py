"""The index's format: its tables, the Record a row reads as, what a row may hold.

Kept apart from :mod:`compatfs.index` (an open index and its memory mirror)
and :mod:`compatfs.indexopen` (finding the index of a root and proving it
sound) because both need it and it needs neither: the SQL schema and its
upgrades, the columns of each schema version, the :class:`Record` every row
reads as, how names are stored losslessly, and :func:`check_record`, the
check every record read back passes before it is trusted.

Legacy names are arbitrary bytes: a name that is valid UTF-8 is stored as
TEXT, any other as a BLOB of its bytes (``os.fsencode``), read back with
``os.fsdecode``, so every name round-trips.
"""

from __future__ import annotations

import errno
import os
import sqlite3
from dataclasses import dataclass

from .enums import Kind, State, StoreKey, ViewName

SCHEMA_VERSION = 2

SCHEMA_SQL = """
CREATE TABLE objects (
    view       TEXT PRIMARY KEY,  -- legacy path: <view>/<rest>, view in img, downloads, prepared
    store      TEXT NOT NULL,     -- location key of the backing (layout key)
    rel        TEXT NOT NULL,     -- backing path relative to that location
    kind       TEXT NOT NULL,     -- vm-volume, oci-volume, pending, verifier, verified, other
    state      TEXT NOT NULL,     -- new, unresolved (and the migrator's states)
    prev_store TEXT,              -- set while a move of the backing is in flight
    prev_rel   TEXT,
    updated_ns INTEGER NOT NULL,
    target_store TEXT,            -- migration: where the bytes are going
    target_rel   TEXT,
    sig        TEXT,              -- migration: dev:ino:size:mtime_ns of the source copied
    reason     TEXT,              -- why it failed, was set aside or quarantined
    attempts   INTEGER NOT NULL DEFAULT 0
);
CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
"""

_V1_COLUMNS = ("view", "store", "rel", "kind", "state", "prev_store", "prev_rel", "updated_ns")
#: Columns added by each schema version, for upgrading an older index in place.
UPGRADES = {
    2: ["ALTER TABLE objects ADD COLUMN target_store TEXT",
        "ALTER TABLE objects ADD COLUMN target_rel TEXT",
        "ALTER TABLE objects ADD COLUMN sig TEXT",
        "ALTER TABLE objects ADD COLUMN reason TEXT",
        "ALTER TABLE objects ADD COLUMN attempts INTEGER NOT NULL DEFAULT 0"],
}
#: The columns of ``objects`` in each schema version compatfs wrote.
TABLE_COLUMNS = {1: frozenset(_V1_COLUMNS),
                 2: frozenset(_V1_COLUMNS) | {"target_store", "target_rel", "sig", "reason",
                                              "attempts"}}
#: Everything sqlite_master may hold: two tables and their primary-key indexes.
SCHEMA_OBJECTS = frozenset({("table", "objects"), ("table", "meta"),
                            ("index", "sqlite_autoindex_objects_1"),
                            ("index", "sqlite_autoindex_meta_1")})

FIELDS = ("view", "store", "rel", "kind", "state", "prev_store", "prev_rel", "target_store",
          "target_rel", "sig", "reason", "attempts")
COLUMNS = ", ".join(FIELDS)
#: Fields holding names (stored losslessly as TEXT or BLOB).
NAME_FIELDS = frozenset({"view", "rel", "prev_rel", "target_rel", "reason"})

#: The state of a record kept only for its reason: the bytes are at the legacy
#: path (a reconcile found the legacy copy newer; the placed one was set
#: aside). Served, listed and migrated like a legacy object with no record.
#: Every state a record can be in: the views' and the migrator's.
STATES = frozenset(State)
#: Every store a record can name (layout keys, the root, the CAS parent).
STORES = frozenset(StoreKey)
#: Every kind a record can be of.
KINDS = frozenset(Kind)
#: The first component of every view path (the root store names the legacy CAS tree).
VIEW_TOPS = frozenset(ViewName) | {StoreKey.ROOT}


@dataclass(slots=True)
class Record:
    """One row of the index: where the bytes of the legacy name *view* are, and
    (during a move) where they were or are going; see the schema above."""

    view: str
    store: str
    rel: str
    kind: str
    state: str
    prev_store: str | None = None
    prev_rel: str | None = None
    target_store: str | None = None
    target_rel: str | None = None
    sig: str | None = None
    reason: str | None = None
    attempts: int = 0


# -- names, losslessly ------------------------------------------------------------------

def encode_name(value: str | None) -> str | bytes | None:
    """A name as SQLite stores it: TEXT when it is valid UTF-8, else its bytes."""
    if value is None:
        return None
    try:
        value.encode("utf-8")
        return value
    except UnicodeEncodeError:
        pass
    try:
        return os.fsencode(value)
    except UnicodeEncodeError:
        raise OSError(errno.EINVAL, "a name that is no sequence of bytes", value) from None


def decode_name(value: object) -> object:
    return os.fsdecode(value) if isinstance(value, bytes) else value


def _safe_rel(value: object) -> bool:
    """A non-empty relative path without ``..``, ``.``, empty parts or NUL."""
    if not isinstance(value, str) or not value or value.startswith("/") or "\0" in value:
        return False
    return all(part not in ("", ".", "..") for part in value.split("/"))


def check_record(rec: Record, raw: tuple[object, ...] = ()) -> str | None:
    """Why *rec* is not a record compatfs writes, or None. *raw* is the row as stored."""
    for field, value in zip(FIELDS, raw, strict=True) if bytes in map(type, raw) else ():
        if isinstance(value, bytes):
            if field not in NAME_FIELDS:
                return f"{field} is a BLOB"
            try:
                value.decode("utf-8")
            except UnicodeDecodeError:
                continue
            return f"{field} is a BLOB of valid UTF-8 (compatfs stores that as TEXT)"
    if not _safe_rel(rec.view) or rec.view.partition("/")[0] not in VIEW_TOPS \
            or "/" not in rec.view:
        return "the legacy name is not a path below a view"
    if rec.store not in STORES:
        return f"unknown store {rec.store!r}"
    if not _safe_rel(rec.rel):
        return f"unsafe path {rec.rel!r}"
    if rec.kind not in KINDS:
        return f"unknown kind {rec.kind!r}"
    if rec.state not in STATES:
        return f"unknown state {rec.state!r}"
    for store, rel in ((rec.prev_store, rec.prev_rel), (rec.target_store, rec.target_rel)):
        if store is None and rel is None:
            continue
        if store not in STORES or not _safe_rel(rel):
            return f"bad move endpoint {store!r}/{rel!r}"
    if rec.sig is not None and not isinstance(rec.sig, str) \
            or rec.reason is not None and not isinstance(rec.reason, str):
        return "sig or reason is not text"
    if not isinstance(rec.attempts, int) or isinstance(rec.attempts, bool) or rec.attempts < 0:
        return f"attempts {rec.attempts!r} is not a count"
    return None


def create_schema(db: sqlite3.Connection, identity: dict[str, str] | None = None) -> None:
    db.execute("BEGIN IMMEDIATE")
    for statement in SCHEMA_SQL.split(";"):
        if statement.strip():
            db.execute(statement)
    db.execute("INSERT INTO meta VALUES ('schema', ?)", (str(SCHEMA_VERSION),))
    for key, value in (identity or {}).items():
        db.execute("INSERT INTO meta VALUES (?, ?)", (key, value))
    db.execute("COMMIT")

