"""The durable index: which legacy names live somewhere other than the legacy store.

A legacy name whose bytes sit in the legacy store at the same path needs no
record. Every other one (created in the new layout through a legacy name,
migrated, or parked in the unresolved area) has one row, so it lists and
resolves after a restart or a reboot. The index is SQLite in WAL mode with
``synchronous=FULL``, kept in the state location inside the vault, so it is
encrypted with the data it describes.

Moves are logged before they are made: a row names the new backing and, in
``prev_store``/``prev_rel``, the old one until the move is done. After a
crash, :meth:`Index.recover` finishes or rolls back each half-done move by
looking at which of the two exists.

The whole table is mirrored in memory (:attr:`Index.records`,
:attr:`Index.children`), so FUSE requests never query SQLite; only changes
write to it.
"""

from __future__ import annotations

import os
import sqlite3
import time
from dataclasses import dataclass

SCHEMA_VERSION = 2
DB_NAME = "index.db"

_SCHEMA = """
CREATE TABLE IF NOT EXISTS objects (
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
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
"""

#: Columns added by each schema version, for upgrading an older index in place.
_UPGRADES = {
    2: ["ALTER TABLE objects ADD COLUMN target_store TEXT",
        "ALTER TABLE objects ADD COLUMN target_rel TEXT",
        "ALTER TABLE objects ADD COLUMN sig TEXT",
        "ALTER TABLE objects ADD COLUMN reason TEXT",
        "ALTER TABLE objects ADD COLUMN attempts INTEGER NOT NULL DEFAULT 0"],
}

_COLUMNS = ("view, store, rel, kind, state, prev_store, prev_rel, target_store, target_rel, "
            "sig, reason, attempts")


class IndexError_(Exception):
    """The index cannot be opened or is not one compatfs wrote."""


@dataclass(slots=True)
class Record:
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


def _connect_read_only(path: str) -> sqlite3.Connection:
    """A connection that writes nothing. With a daemon running, its WAL files
    exist and a read-only open shares them; without one, the index is opened
    as immutable (nobody writes it meanwhile, and SQLite creates no file)."""
    from urllib.parse import quote

    uri = "file:" + quote(path)
    if os.path.exists(path + "-shm"):
        db = sqlite3.connect(uri + "?mode=ro", uri=True, isolation_level=None,
                             check_same_thread=False)
    else:
        db = sqlite3.connect(uri + "?mode=ro&immutable=1", uri=True, isolation_level=None,
                             check_same_thread=False)
    return db


def _parent(view: str) -> tuple[str, str]:
    head, _, name = view.rpartition("/")
    return head, name


class Index:
    """The index of one device, open for reading and writing."""

    def __init__(self, path: str | None, read_only: bool = False) -> None:
        """Open (creating) the index at *path*; ``None`` keeps it in memory only.

        *read_only* never writes: not even SQLite's own files (for status and
        the debug view, beside a daemon that may be writing).
        """
        self.path = path
        self.read_only = read_only
        try:
            if read_only and path is not None:
                self.db = _connect_read_only(path)
                self.records: dict[str, Record] = {}
                self.children: dict[str, set[str]] = {}
                self.reload()
                return
            self.db = sqlite3.connect(path or ":memory:", isolation_level=None,
                                      check_same_thread=False)
            self.db.execute("PRAGMA journal_mode=WAL")
            self.db.execute("PRAGMA synchronous=FULL")
            self.db.executescript(_SCHEMA)
            row = self.db.execute("SELECT value FROM meta WHERE key='schema'").fetchone()
            if row is None:
                self.db.execute("INSERT INTO meta VALUES ('schema', ?)", (str(SCHEMA_VERSION),))
            else:
                self._upgrade(path, row[0])
            rows = self.db.execute(f"SELECT {_COLUMNS} FROM objects").fetchall()
        except sqlite3.DatabaseError as exc:
            raise IndexError_(f"{path}: {exc}") from None
        self.records: dict[str, Record] = {}
        self.children: dict[str, set[str]] = {}
        for r in rows:
            self._remember(Record(*r))

    def _upgrade(self, path: str | None, found: str) -> None:
        """Bring an index written by an older compatfs up to this schema."""
        try:
            version = int(found)
        except ValueError:
            raise IndexError_(f"{path}: schema {found!r} is not one compatfs wrote") from None
        if version > SCHEMA_VERSION:
            raise IndexError_(f"{path}: schema {version} is newer than this compatfs "
                              f"({SCHEMA_VERSION}); refusing to touch it")
        with self.db:
            for v in range(version + 1, SCHEMA_VERSION + 1):
                for statement in _UPGRADES[v]:
                    self.db.execute(statement)
            self.db.execute("UPDATE meta SET value=? WHERE key='schema'", (str(SCHEMA_VERSION),))

    def reload(self) -> None:
        """Read every record again (a read-only index beside a daemon that writes)."""
        try:
            rows = self.db.execute(f"SELECT {_COLUMNS} FROM objects").fetchall()
        except sqlite3.DatabaseError as exc:
            raise IndexError_(f"{self.path}: {exc}") from None
        self.records, self.children = {}, {}
        for r in rows:
            self._remember(Record(*r))

    @classmethod
    def open_in(cls, state_dir: str) -> "Index":
        os.makedirs(state_dir, mode=0o700, exist_ok=True)
        return cls(os.path.join(state_dir, DB_NAME))

    # -- memory mirror --------------------------------------------------------
    def _remember(self, rec: Record) -> None:
        self.records[rec.view] = rec
        head, name = _parent(rec.view)
        self.children.setdefault(head, set()).add(name)

    def _forget(self, view: str) -> None:
        if self.records.pop(view, None) is None:
            return
        head, name = _parent(view)
        names = self.children.get(head)
        if names is not None:
            names.discard(name)
            if not names:
                del self.children[head]

    def get(self, view: str) -> Record | None:
        return self.records.get(view)

    def names_in(self, view_dir: str) -> set[str]:
        return self.children.get(view_dir, set())

    def has_below(self, view_dir: str) -> bool:
        """True when any record lies below *view_dir* (for rmdir and dir renames)."""
        prefix = view_dir + "/"
        return any(v.startswith(prefix) for v in self.records)

    # -- changes (each one transaction) ---------------------------------------
    def _write(self, rec: Record) -> None:
        self.db.execute(
            f"INSERT OR REPLACE INTO objects ({_COLUMNS}, updated_ns) "
            "VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?)",
            (rec.view, rec.store, rec.rel, rec.kind, rec.state, rec.prev_store, rec.prev_rel,
             rec.target_store, rec.target_rel, rec.sig, rec.reason, rec.attempts,
             time.time_ns()))

    def put(self, rec: Record) -> None:
        """Insert or replace the record for ``rec.view``."""
        with self.db:
            self._write(rec)
        self._forget(rec.view)
        self._remember(rec)

    def delete(self, view: str) -> None:
        with self.db:
            self.db.execute("DELETE FROM objects WHERE view=?", (view,))
        self._forget(view)

    def move(self, old_view: str, rec: Record) -> None:
        """Replace the record of *old_view* by *rec* (a rename), atomically."""
        with self.db:
            self.db.execute("DELETE FROM objects WHERE view=?", (old_view,))
            self._write(rec)
        self._forget(old_view)
        self._forget(rec.view)
        self._remember(rec)

    def rename_prefix(self, old_dir: str, new_dir: str) -> None:
        """A directory rename: every record below *old_dir* moves below *new_dir*."""
        prefix = old_dir + "/"
        moved = [r for v, r in self.records.items() if v.startswith(prefix)]
        with self.db:
            for r in moved:
                self.db.execute("UPDATE objects SET view=? WHERE view=?",
                                (new_dir + r.view[len(old_dir):], r.view))
        for r in moved:
            self._forget(r.view)
            r.view = new_dir + r.view[len(old_dir):]
            self._remember(r)

    def meta(self, key: str) -> str | None:
        row = self.db.execute("SELECT value FROM meta WHERE key=?", (key,)).fetchone()
        return row[0] if row else None

    def set_meta(self, key: str, value: str) -> None:
        with self.db:
            self.db.execute("INSERT OR REPLACE INTO meta VALUES (?,?)", (key, value))

    def close(self) -> None:
        self.db.close()
