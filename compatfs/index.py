"""The durable index: which legacy names live somewhere other than the legacy store.

A legacy name whose bytes sit in the legacy store at the same path needs no
record. Every other one (created in the new layout through a legacy name,
migrated, or parked in the unresolved area) has one row, so it lists and
resolves after a restart or a reboot. The index is SQLite in WAL mode with
``synchronous=FULL``, kept in the state location inside the vault, so it is
encrypted with the data it describes.

Moves are logged before they are made: a row names the new backing and, in
``prev_store``/``prev_rel``, the old one until the move is done. After a
crash, the views' recovery (:meth:`compatfs.view.View.recover`) finishes or
rolls back each half-done move by looking at which of the two exists.

The whole table is mirrored in memory (:attr:`Index.records`,
:attr:`Index.children`), so FUSE requests never query SQLite; only changes
write to it. Each change is one explicit transaction, and the mirror changes
only after it committed: a write that fails (a full disk) leaves both as
they were, and reaches the caller as ``OSError`` with the errno an agent
expects (``ENOSPC``, ``EDQUOT``, ``EIO``), never as an SQLite error.

This module owns an open index; its format (tables, :class:`Record`, the
check of every row) is :mod:`compatfs.indexformat`'s, and finding the index
of a root and proving it sound before use is :mod:`compatfs.indexopen`'s.
"""

from __future__ import annotations

import errno
import logging
import os
import sqlite3
import time
from collections.abc import Iterator
from contextlib import contextmanager

from .indexformat import (
    COLUMNS,
    FIELDS,
    SCHEMA_OBJECTS,
    SCHEMA_VERSION,
    TABLE_COLUMNS,
    UPGRADES,
    Record,
    check_record,
    create_schema,
    decode_name,
    encode_name,
)

log = logging.getLogger(__name__)

DB_NAME = "index.db"

#: SQLite primary result codes compatfs maps to an errno.
_SQLITE_IOERR = 10
SQLITE_FULL = 13
_SQLITE_CANTOPEN = 14

#: What an operator can do about an index that is missing or not compatfs' own.
RESTORE_HINT = ("restore index.db from a backup, or move index.id aside to start over with an "
                "empty index (objects already placed in the new layout then no longer show "
                "under their legacy names; their bytes stay where they are)")
ASIDE_HINT = ("move index.db and index.id aside to start over with an empty index (objects "
              "already placed in the new layout then no longer show under their legacy names; "
              "their bytes stay where they are), or restore both from a backup")


class IndexError_(Exception):
    """The index cannot be opened or is not one compatfs wrote."""


class IndexRefused(IndexError_):
    """The index is not proven sound: the message says what is wrong and what to do."""



def _connect_read_only(path: str) -> sqlite3.Connection:
    """A connection that writes nothing. With a daemon running, its WAL files
    exist and a read-only open shares them; without one, the index is opened
    as immutable (nobody writes it meanwhile, and SQLite creates no file)."""
    from urllib.parse import quote

    uri = "file:" + quote(path)
    if os.path.exists(path + "-shm"):
        return sqlite3.connect(uri + "?mode=ro", uri=True, isolation_level=None,
                               check_same_thread=False)
    return sqlite3.connect(uri + "?mode=ro&immutable=1", uri=True, isolation_level=None,
                           check_same_thread=False)


def _parent(view: str) -> tuple[str, str]:
    head, _, name = view.rpartition("/")
    return head, name


class Index:
    """The index of one device, open for reading and writing.

    The constructor opens a file as it is (tests, tools); the daemon,
    ``status`` and the debug view open the index of a root with
    :func:`compatfs.indexopen.open_index`, which proves it sound first.
    """

    def __init__(self, path: str | None, read_only: bool = False, *,
                 state_fd: int | None = None, name: str | None = None) -> None:
        """Open (creating) the index at *path*; ``None`` keeps it in memory only.

        *read_only* never writes: not even SQLite's own files (for status and
        the debug view, beside a daemon that may be writing). *state_fd* is the
        held directory the file is in (for telling a full disk from an I/O
        error); *name* the path to show in messages (default *path*).
        """
        self.path = path
        self.name = name or path or ":memory:"
        self.read_only = read_only
        self.state_fd = state_fd
        self.version = SCHEMA_VERSION
        self._columns: frozenset[str] = TABLE_COLUMNS[SCHEMA_VERSION]
        self._failing = False
        self.records: dict[str, Record] = {}
        self.children: dict[str, set[str]] = {}
        try:
            if read_only and path is not None:
                self.db = _connect_read_only(path)
            else:
                fresh = path is None or not os.path.exists(path) or os.path.getsize(path) == 0
                self.db = sqlite3.connect(path or ":memory:", isolation_level=None,
                                          check_same_thread=False)
                self.db.execute("PRAGMA journal_mode=WAL")
                self.db.execute("PRAGMA synchronous=FULL")
                if fresh:
                    create_schema(self.db)
            self.db.execute("PRAGMA trusted_schema=OFF")
            self._check_schema()
            if not read_only and self.version < SCHEMA_VERSION:
                self._upgrade()
            self.reload()
        except sqlite3.DatabaseError as exc:
            self._close_quietly()
            raise IndexRefused(f"{self.name}: {exc}; {ASIDE_HINT}") from None
        except IndexError_:
            self._close_quietly()
            raise

    def _close_quietly(self) -> None:
        db = getattr(self, "db", None)
        if db is not None:
            db.close()

    # -- soundness --------------------------------------------------------------------
    def check_integrity(self) -> None:
        """SQLite's ``integrity_check`` (every page, every record's format, and
        the primary keys against their tables; about 10 ms for 10,000 records,
        see docs/operations.md): raises :class:`IndexRefused`."""
        try:
            rows = self.db.execute("PRAGMA integrity_check").fetchall()
        except sqlite3.DatabaseError as exc:
            raise IndexRefused(f"{self.name}: {exc}; {ASIDE_HINT}") from None
        if rows != [("ok",)]:
            raise IndexRefused(f"{self.name} fails SQLite's integrity check ({rows[0][0]}); "
                               f"{ASIDE_HINT}")

    def _check_schema(self) -> None:
        """Exactly compatfs' tables and columns, and a schema version it wrote."""
        found = {(t, n) for t, n in self.db.execute("SELECT type, name FROM sqlite_master")}
        if ("table", "objects") not in found or ("table", "meta") not in found:
            raise IndexRefused(f"{self.name} has no compatfs tables (it is empty or not an "
                               f"index compatfs wrote); {ASIDE_HINT}")
        if found - SCHEMA_OBJECTS:
            extra = ", ".join(sorted(f"{t} {n}" for t, n in found - SCHEMA_OBJECTS))
            raise IndexRefused(f"{self.name} holds what compatfs never writes ({extra}); "
                               f"{ASIDE_HINT}")
        meta = {r[1] for r in self.db.execute("PRAGMA table_info(meta)")}
        if meta != {"key", "value"}:
            raise IndexRefused(f"{self.name}: the meta table is not compatfs'; {ASIDE_HINT}")
        row = self.db.execute("SELECT value FROM meta WHERE key='schema'").fetchone()
        try:
            version = int(row[0]) if row is not None else None
        except (TypeError, ValueError):
            version = None
        if version is None or version < 1:
            raise IndexRefused(f"{self.name}: schema {row[0] if row else None!r} is not one "
                               f"compatfs wrote; {ASIDE_HINT}")
        if version > SCHEMA_VERSION:
            raise IndexRefused(f"{self.name}: schema {version} is newer than this compatfs "
                               f"({SCHEMA_VERSION}); refusing to touch it (run the newer "
                               "compatfs, or roll back with it)")
        columns = frozenset(r[1] for r in self.db.execute("PRAGMA table_info(objects)"))
        if columns != TABLE_COLUMNS[version]:
            raise IndexRefused(f"{self.name}: the objects table does not have the columns of "
                               f"schema {version}; {ASIDE_HINT}")
        self.version, self._columns = version, columns

    def _upgrade(self) -> None:
        """Bring an index written by an older compatfs up to this schema."""
        with self._transaction("upgrade"):
            for v in range(self.version + 1, SCHEMA_VERSION + 1):
                for statement in UPGRADES[v]:
                    self.db.execute(statement)
            self.db.execute("UPDATE meta SET value=? WHERE key='schema'", (str(SCHEMA_VERSION),))
        self.version, self._columns = SCHEMA_VERSION, TABLE_COLUMNS[SCHEMA_VERSION]

    def reload(self) -> None:
        """Read every record again, each checked (raises :class:`IndexRefused`)."""
        select = ", ".join(f if f in self._columns else ("0" if f == "attempts" else "NULL")
                           for f in FIELDS)
        try:
            rows = self.db.execute(f"SELECT {select} FROM objects").fetchall()
        except sqlite3.DatabaseError as exc:
            raise IndexRefused(f"{self.name}: {exc}; {ASIDE_HINT}") from None
        records: dict[str, Record] = {}
        children: dict[str, set[str]] = {}
        for raw in rows:
            rec = Record(*(map(decode_name, raw) if bytes in map(type, raw) else raw))
            why = check_record(rec, raw)
            if why is None and rec.view in records:
                why = "a second record for the same name"
            if why is not None:   # what was read before stays (a read-only reader)
                raise IndexRefused(f"{self.name}: the record of {rec.view!r} is not one compatfs "
                                   f"writes ({why}): the index was altered; {ASIDE_HINT}")
            records[rec.view] = rec
            head, name = _parent(rec.view)
            children.setdefault(head, set()).add(name)
        self.records, self.children = records, children

    @classmethod
    def open_in(cls, state_dir: str) -> Index:
        """The index file in *state_dir*, as it is, created if missing: for tests
        and tools. The daemon, ``status`` and the debug view use
        :func:`compatfs.indexopen.open_index`, which proves the index of a root sound."""
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
    @contextmanager
    def _transaction(self, what: str) -> Iterator[None]:
        """One transaction; any SQLite failure rolls it back and is raised as
        :class:`OSError` (``ENOSPC``/``EDQUOT`` for a full disk or quota,
        ``EIO`` otherwise), logged in one line."""
        if self.read_only:
            raise OSError(errno.EROFS, "the index is open read-only", self.name)
        try:
            self.db.execute("BEGIN IMMEDIATE")
            try:
                yield
                self.db.execute("COMMIT")
            except BaseException:
                if self.db.in_transaction:
                    try:
                        self.db.execute("ROLLBACK")
                    except sqlite3.Error:
                        pass  # SQLite rolled back already
                raise
        except sqlite3.Error as exc:
            raise self._os_error(exc, what) from None
        if self._failing:
            self._failing = False
            log.warning("index %s: writing again", self.name)

    def _os_error(self, exc: sqlite3.Error, what: str) -> OSError:
        code = (getattr(exc, "sqlite_errorcode", None) or 0) & 0xFF
        if code == SQLITE_FULL:
            err = errno.ENOSPC
        elif code in (_SQLITE_IOERR, _SQLITE_CANTOPEN):
            err = self._probe_errno()
        else:
            err = errno.EIO
        if not self._failing or err == errno.EIO:
            log.warning("index %s: %s failed: %s (%s); answered %s", self.name, what, exc,
                        getattr(exc, "sqlite_errorname", "?"), errno.errorcode[err])
        self._failing = err != errno.EIO
        return OSError(err, f"index {what}: {os.strerror(err)}", self.name)

    def _probe_errno(self) -> int:
        """SQLite reports a failed write of any cause as an I/O error (a quota
        too); one small write beside the index tells which it was."""
        if self.state_fd is None:
            return errno.EIO
        probe = DB_NAME + "-probe"
        try:
            fd = os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW
                         | os.O_CLOEXEC, 0o600, dir_fd=self.state_fd)
            try:
                os.write(fd, b"\0" * 4096)
                os.fsync(fd)
            finally:
                os.close(fd)
                os.unlink(probe, dir_fd=self.state_fd)
        except OSError as exc:
            if exc.errno in (errno.ENOSPC, errno.EDQUOT):
                return exc.errno
        return errno.EIO

    def _write(self, rec: Record) -> None:
        self.db.execute(
            f"INSERT OR REPLACE INTO objects ({COLUMNS}, updated_ns) "
            "VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?)",
            (encode_name(rec.view), rec.store, encode_name(rec.rel), rec.kind, rec.state,
             rec.prev_store,
             encode_name(rec.prev_rel), rec.target_store, encode_name(rec.target_rel), rec.sig,
             encode_name(rec.reason), rec.attempts, time.time_ns()))

    def put(self, rec: Record) -> None:
        """Insert or replace the record for ``rec.view``."""
        with self._transaction("put"):
            self._write(rec)
        self._forget(rec.view)
        self._remember(rec)

    def delete(self, view: str) -> None:
        with self._transaction("delete"):
            self.db.execute("DELETE FROM objects WHERE view=?", (encode_name(view),))
        self._forget(view)

    def move(self, old_view: str, rec: Record) -> None:
        """Replace the record of *old_view* by *rec* (a rename), atomically."""
        with self._transaction("move"):
            self.db.execute("DELETE FROM objects WHERE view=?", (encode_name(old_view),))
            self._write(rec)
        self._forget(old_view)
        self._forget(rec.view)
        self._remember(rec)

    def rename_prefix(self, old_dir: str, new_dir: str) -> None:
        """A directory rename: every record below *old_dir* moves below *new_dir*."""
        prefix = old_dir + "/"
        moved = [r for v, r in self.records.items() if v.startswith(prefix)]
        taken = [r.view for r in moved if new_dir + r.view[len(old_dir):] in self.records]
        if taken:   # the views answer this before asking; the index never merges two names
            raise OSError(errno.ENOTEMPTY, os.strerror(errno.ENOTEMPTY), new_dir)
        with self._transaction("rename"):
            for r in moved:
                self.db.execute("UPDATE objects SET view=? WHERE view=?",
                                (encode_name(new_dir + r.view[len(old_dir):]), encode_name(r.view)))
        for r in moved:
            self._forget(r.view)
            r.view = new_dir + r.view[len(old_dir):]
            self._remember(r)

    def meta(self, key: str) -> str | None:
        row = self.db.execute("SELECT value FROM meta WHERE key=?", (key,)).fetchone()
        return row[0] if row else None

    def set_identity(self, index_id: str, root_digest: str) -> None:
        """Record *index_id* and *root_digest* as this index's identity, in one transaction."""
        with self._transaction("identity"):
            self.db.execute("INSERT INTO meta VALUES ('id', ?)", (index_id,))
            self.db.execute("INSERT OR REPLACE INTO meta VALUES ('root', ?)", (root_digest,))

    def set_meta(self, key: str, value: str) -> None:
        with self._transaction("meta"):
            self.db.execute("INSERT OR REPLACE INTO meta VALUES (?,?)", (key, value))

    def close(self) -> None:
        self.db.close()
        if self.state_fd is not None:
            os.close(self.state_fd)
            self.state_fd = None

