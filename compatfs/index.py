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

Losing the index loses where placed objects are, so an index is proven sound
before it is used (:func:`open_index`), and one that is not is refused with
what to do, never taken for an empty one:

* the state directory and ``index.db`` are reached from the root without
  following a symbolic link, and must be root's, closed to others, and (the
  file) a regular file with one link;
* SQLite's ``quick_check`` passes, the schema holds exactly compatfs' tables
  and columns (no trigger, no view), and every record names a known store,
  kind and state and safe relative paths;
* compatfs writes an identity into the index when it creates it (a random id
  and a digest of the root it serves) and the same id into a marker file
  beside it, ``index.id``. A marker without its index (deleted, emptied,
  replaced) or an index of another id or root is refused; neither is a first
  start.

Legacy names are arbitrary bytes: a name that is valid UTF-8 is stored as
TEXT, any other as a BLOB of its bytes (``os.fsencode``), read back with
``os.fsdecode``, so every name round-trips.
"""

from __future__ import annotations

import errno
import hashlib
import logging
import os
import secrets
import sqlite3
import stat
import time
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Iterator

from .backing import CAS_PARENT, NEW_STORES, RESOLVE_BENEATH, RESOLVE_NO_SYMLINKS, ROOT_STORE, \
    VIEW_STORES, openat2
from .enums import Kind

log = logging.getLogger(__name__)

SCHEMA_VERSION = 2
DB_NAME = "index.db"
#: The marker compatfs writes beside the index it made (see the module docstring).
MARKER_NAME = "index.id"
_MARKER_MAGIC = "compatfs-index"
#: Where a first start builds the index before renaming it into place.
_BUILD_NAME = DB_NAME + ".new"

_SCHEMA = """
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
_UPGRADES = {
    2: ["ALTER TABLE objects ADD COLUMN target_store TEXT",
        "ALTER TABLE objects ADD COLUMN target_rel TEXT",
        "ALTER TABLE objects ADD COLUMN sig TEXT",
        "ALTER TABLE objects ADD COLUMN reason TEXT",
        "ALTER TABLE objects ADD COLUMN attempts INTEGER NOT NULL DEFAULT 0"],
}
#: The columns of ``objects`` in each schema version compatfs wrote.
_TABLE_COLUMNS = {1: frozenset(_V1_COLUMNS),
                  2: frozenset(_V1_COLUMNS) | {"target_store", "target_rel", "sig", "reason",
                                               "attempts"}}
#: Everything sqlite_master may hold: two tables and their primary-key indexes.
_SCHEMA_OBJECTS = frozenset({("table", "objects"), ("table", "meta"),
                             ("index", "sqlite_autoindex_objects_1"),
                             ("index", "sqlite_autoindex_meta_1")})

_FIELDS = ("view", "store", "rel", "kind", "state", "prev_store", "prev_rel", "target_store",
           "target_rel", "sig", "reason", "attempts")
_COLUMNS = ", ".join(_FIELDS)
#: Fields holding names (stored losslessly as TEXT or BLOB).
_NAME_FIELDS = frozenset({"view", "rel", "prev_rel", "target_rel", "reason"})

#: The state of a record kept only for its reason: the bytes are at the legacy
#: path (a reconcile found the legacy copy newer; the placed one was set
#: aside). Served, listed and migrated like a legacy object with no record.
KEPT_LEGACY = "legacy"
#: Every state a record can be in: the views' and the migrator's.
STATES = frozenset({"new", "unresolved", "renaming", "copying", "copied", "switched",
                    "failed", "quarantined", "rolling-back", KEPT_LEGACY})
#: Every store a record can name (layout keys, the root, the CAS parent).
STORES = frozenset(VIEW_STORES.values()) | frozenset(NEW_STORES) | {ROOT_STORE, CAS_PARENT}
#: The first component of every view path (the root store names the legacy CAS tree).
VIEW_TOPS = frozenset(VIEW_STORES) | {ROOT_STORE}

#: SQLite primary result codes compatfs maps to an errno.
_SQLITE_IOERR = 10
_SQLITE_FULL = 13
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


# -- names, losslessly ------------------------------------------------------------------

def _encode(value: str | None) -> str | bytes | None:
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


def _decode(value: object) -> object:
    return os.fsdecode(value) if isinstance(value, bytes) else value


def _safe_rel(value: object) -> bool:
    """A non-empty relative path without ``..``, ``.``, empty parts or NUL."""
    if not isinstance(value, str) or not value or value.startswith("/") or "\0" in value:
        return False
    return all(part not in ("", ".", "..") for part in value.split("/"))


def check_record(rec: Record, raw: tuple = ()) -> str | None:
    """Why *rec* is not a record compatfs writes, or None. *raw* is the row as stored."""
    for field, value in zip(_FIELDS, raw) if bytes in map(type, raw) else ():
        if isinstance(value, bytes):
            if field not in _NAME_FIELDS:
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
    if rec.kind not in frozenset(Kind):
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
    :func:`open_index`, which proves it sound first.
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
        self._columns: frozenset[str] = _TABLE_COLUMNS[SCHEMA_VERSION]
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
                    _create_schema(self.db)
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
        if found - _SCHEMA_OBJECTS:
            extra = ", ".join(sorted(f"{t} {n}" for t, n in found - _SCHEMA_OBJECTS))
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
        if columns != _TABLE_COLUMNS[version]:
            raise IndexRefused(f"{self.name}: the objects table does not have the columns of "
                               f"schema {version}; {ASIDE_HINT}")
        self.version, self._columns = version, columns

    def _upgrade(self) -> None:
        """Bring an index written by an older compatfs up to this schema."""
        with self._transaction("upgrade"):
            for v in range(self.version + 1, SCHEMA_VERSION + 1):
                for statement in _UPGRADES[v]:
                    self.db.execute(statement)
            self.db.execute("UPDATE meta SET value=? WHERE key='schema'", (str(SCHEMA_VERSION),))
        self.version, self._columns = SCHEMA_VERSION, _TABLE_COLUMNS[SCHEMA_VERSION]

    def reload(self) -> None:
        """Read every record again, each checked (raises :class:`IndexRefused`)."""
        select = ", ".join(f if f in self._columns else ("0" if f == "attempts" else "NULL")
                           for f in _FIELDS)
        try:
            rows = self.db.execute(f"SELECT {select} FROM objects").fetchall()
        except sqlite3.DatabaseError as exc:
            raise IndexRefused(f"{self.name}: {exc}; {ASIDE_HINT}") from None
        records: dict[str, Record] = {}
        children: dict[str, set[str]] = {}
        for raw in rows:
            rec = Record(*(map(_decode, raw) if bytes in map(type, raw) else raw))
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
    def open_in(cls, state_dir: str) -> "Index":
        """The index file in *state_dir*, as it is, created if missing: for tests
        and tools. The daemon, ``status`` and the debug view use
        :func:`open_index`, which proves the index of a root sound."""
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
        if code == _SQLITE_FULL:
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
            f"INSERT OR REPLACE INTO objects ({_COLUMNS}, updated_ns) "
            "VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?)",
            (_encode(rec.view), rec.store, _encode(rec.rel), rec.kind, rec.state, rec.prev_store,
             _encode(rec.prev_rel), rec.target_store, _encode(rec.target_rel), rec.sig,
             _encode(rec.reason), rec.attempts, time.time_ns()))

    def put(self, rec: Record) -> None:
        """Insert or replace the record for ``rec.view``."""
        with self._transaction("put"):
            self._write(rec)
        self._forget(rec.view)
        self._remember(rec)

    def delete(self, view: str) -> None:
        with self._transaction("delete"):
            self.db.execute("DELETE FROM objects WHERE view=?", (_encode(view),))
        self._forget(view)

    def move(self, old_view: str, rec: Record) -> None:
        """Replace the record of *old_view* by *rec* (a rename), atomically."""
        with self._transaction("move"):
            self.db.execute("DELETE FROM objects WHERE view=?", (_encode(old_view),))
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
                                (_encode(new_dir + r.view[len(old_dir):]), _encode(r.view)))
        for r in moved:
            self._forget(r.view)
            r.view = new_dir + r.view[len(old_dir):]
            self._remember(r)

    def meta(self, key: str) -> str | None:
        row = self.db.execute("SELECT value FROM meta WHERE key=?", (key,)).fetchone()
        return row[0] if row else None

    def set_meta(self, key: str, value: str) -> None:
        with self._transaction("meta"):
            self.db.execute("INSERT OR REPLACE INTO meta VALUES (?,?)", (key, value))

    def close(self) -> None:
        self.db.close()
        if self.state_fd is not None:
            os.close(self.state_fd)
            self.state_fd = None


def _create_schema(db: sqlite3.Connection, identity: dict[str, str] | None = None) -> None:
    db.execute("BEGIN IMMEDIATE")
    for statement in _SCHEMA.split(";"):
        if statement.strip():
            db.execute(statement)
    db.execute("INSERT INTO meta VALUES ('schema', ?)", (str(SCHEMA_VERSION),))
    for key, value in (identity or {}).items():
        db.execute("INSERT INTO meta VALUES (?, ?)", (key, value))
    db.execute("COMMIT")


# -- the index of a root: found safely, proven sound -------------------------------------

def root_digest(root: str) -> str:
    """What an index records of the root it serves."""
    return hashlib.sha256(os.fsencode(os.path.abspath(root))).hexdigest()


def _check_owned(st: os.stat_result, what: str) -> None:
    if st.st_uid != os.geteuid():
        raise IndexRefused(f"{what} belongs to uid {st.st_uid}, not to compatfs "
                           f"(uid {os.geteuid()}); refusing to trust it")
    if st.st_mode & 0o022:
        raise IndexRefused(f"{what} is writable by others (mode {stat.S_IMODE(st.st_mode):o}); "
                           "refusing to trust it")


def _open_state_dir(root_fd: int, rel: str, shown: str, create: bool) -> int | None:
    """The state directory below the root, reached through no symbolic link;
    made (mode 0700) when *create*; None when missing and not *create*."""
    flags = os.O_RDONLY | os.O_DIRECTORY
    resolve = RESOLVE_BENEATH | RESOLVE_NO_SYMLINKS
    try:
        fd = openat2(root_fd, rel, flags, resolve=resolve)
    except FileNotFoundError:
        if not create:
            return None
        done = ""
        for part in rel.split("/"):
            done = f"{done}/{part}" if done else part
            try:
                parent = openat2(root_fd, os.path.dirname(done) or ".", flags, resolve=resolve)
            except OSError as exc:
                raise IndexRefused(f"{shown}: {exc.strerror}") from None
            try:
                os.mkdir(part, 0o700, dir_fd=parent)
            except FileExistsError:
                pass
            except OSError as exc:
                raise IndexRefused(f"{shown}: cannot make it: {exc.strerror}") from None
            finally:
                os.close(parent)
        fd = openat2(root_fd, rel, flags, resolve=resolve)
    except OSError as exc:
        why = {errno.ELOOP: "a symbolic link is on the way",
               errno.EXDEV: "a symbolic link is on the way",
               errno.EACCES: "permission denied (run as root)"}.get(exc.errno or 0, exc.strerror)
        raise IndexRefused(f"{shown}: {why}; refusing to look for the index there") from None
    try:
        _check_owned(os.fstat(fd), shown)
    except BaseException:
        os.close(fd)
        raise
    return fd


def _lstat(state_fd: int, name: str) -> os.stat_result | None:
    try:
        return os.stat(name, dir_fd=state_fd, follow_symlinks=False)
    except FileNotFoundError:
        return None


def _check_file(st: os.stat_result, shown: str) -> None:
    if not stat.S_ISREG(st.st_mode):
        what = "a symbolic link" if stat.S_ISLNK(st.st_mode) else "not a regular file"
        raise IndexRefused(f"{shown} is {what}; refusing to open it. Remove it and "
                           f"{RESTORE_HINT}")
    if st.st_nlink != 1:
        raise IndexRefused(f"{shown} has {st.st_nlink} hard links; refusing to write through "
                           "them (copy it to a file of its own)")
    _check_owned(st, shown)


def _is_id(value: object) -> bool:
    """An index id as compatfs makes them: 32 lower-case hex digits."""
    return isinstance(value, str) and len(value) == 32 \
        and all(c in "0123456789abcdef" for c in value)


def _read_marker(state_fd: int, shown: str) -> str | None:
    """The id in the marker, or None when there is none."""
    try:
        fd = os.open(MARKER_NAME, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC,
                     dir_fd=state_fd)
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise IndexRefused(f"{shown}: {exc.strerror}; refusing to trust it") from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise IndexRefused(f"{shown} is not a regular file; refusing to trust it")
        _check_owned(st, shown)
        data = os.read(fd, 4097)
    finally:
        os.close(fd)
    fields = data.decode("ascii", "replace").split()
    if len(fields) != 2 or fields[0] != _MARKER_MAGIC or not _is_id(fields[1]):
        raise IndexRefused(f"{shown} is not a marker compatfs wrote; restore it from a backup, "
                           f"or {ASIDE_HINT}")
    return fields[1]


def _fsync_dir(fd: int) -> None:
    os.fsync(fd)


def _write_marker(state_fd: int, index_id: str) -> None:
    """The marker, written whole or not at all (a temporary renamed into place)."""
    tmp = MARKER_NAME + ".new"
    try:
        os.unlink(tmp, dir_fd=state_fd)
    except FileNotFoundError:
        pass
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC,
                 0o600, dir_fd=state_fd)
    try:
        os.fchmod(fd, 0o600)
        os.write(fd, f"{_MARKER_MAGIC} {index_id}\n".encode())
        os.fsync(fd)
    finally:
        os.close(fd)
    os.rename(tmp, MARKER_NAME, src_dir_fd=state_fd, dst_dir_fd=state_fd)
    _fsync_dir(state_fd)


def _build(state_fd: int, root: str) -> str:
    """A first start: the index with its identity, built beside and renamed into place."""
    for name in (_BUILD_NAME, _BUILD_NAME + "-journal", _BUILD_NAME + "-wal",
                 _BUILD_NAME + "-shm"):
        try:
            os.unlink(name, dir_fd=state_fd)   # a first start that was interrupted
        except FileNotFoundError:
            pass
    fd = os.open(_BUILD_NAME, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW
                 | os.O_CLOEXEC, 0o600, dir_fd=state_fd)
    os.fchmod(fd, 0o600)
    try:
        db = sqlite3.connect(f"/proc/self/fd/{state_fd}/{_BUILD_NAME}", isolation_level=None)
        try:
            db.execute("PRAGMA journal_mode=DELETE")
            db.execute("PRAGMA synchronous=FULL")
            index_id = secrets.token_hex(16)
            _create_schema(db, {"id": index_id, "root": root_digest(root)})
        finally:
            db.close()
        os.fsync(fd)
    except sqlite3.Error as exc:   # a full disk on a first start; the next start builds again
        full = ((getattr(exc, "sqlite_errorcode", None) or 0) & 0xFF) == _SQLITE_FULL
        raise OSError(errno.ENOSPC if full else errno.EIO, f"making the index: {exc}") from None
    finally:
        os.close(fd)
    os.rename(_BUILD_NAME, DB_NAME, src_dir_fd=state_fd, dst_dir_fd=state_fd)
    _fsync_dir(state_fd)
    return index_id


def open_index(root: str, state_rel: str, *, create: bool, read_only: bool = False,
               root_fd: int | None = None) -> Index | None:
    """The index of the device at *root*, proven sound; None when there is none
    yet and *create* is false (a first start: nothing was ever placed).

    *state_rel* is the state location relative to the root; *root_fd* an open
    directory fd of the root (opened here when not given). Raises
    :class:`IndexRefused` with one line saying what is wrong and what to do.
    With *create*, a missing index (and its marker) is made, an index of an
    older compatfs gets its identity, and a lost marker is written again from
    a sound index that names this root.
    """
    root = os.path.abspath(root)
    shown_dir = os.path.join(root, state_rel)
    shown = os.path.join(shown_dir, DB_NAME)
    own_root = root_fd is None
    if own_root:
        root_fd = os.open(root, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        state_fd = _open_state_dir(root_fd, state_rel, shown_dir, create and not read_only)
    finally:
        if own_root:
            os.close(root_fd)
    if state_fd is None:
        return None
    index: Index | None = None
    try:
        marker = _read_marker(state_fd, os.path.join(shown_dir, MARKER_NAME))
        st = _lstat(state_fd, DB_NAME)
        if st is None and marker is not None:
            raise IndexRefused(f"{shown} is missing, but {MARKER_NAME} says compatfs made one "
                               f"(id {marker}): it was deleted or lost; {RESTORE_HINT}")
        if st is None:
            if not create or read_only:
                os.close(state_fd)
                return None
            marker = _build(state_fd, root)
            _write_marker(state_fd, marker)
            log.info("index: made %s (id %s)", shown, marker)
            st = _lstat(state_fd, DB_NAME)
            assert st is not None
        _check_file(st, shown)
        if st.st_size == 0:
            raise IndexRefused(f"{shown} is empty (0 bytes): it was truncated or replaced; "
                               + (RESTORE_HINT if marker else ASIDE_HINT))
        for suffix in ("-wal", "-shm"):
            side = _lstat(state_fd, DB_NAME + suffix)
            if side is not None:
                _check_file(side, shown + suffix)
        index = Index(f"/proc/self/fd/{state_fd}/{DB_NAME}", read_only, state_fd=state_fd,
                      name=shown)
        # SQLite opens the file by its path again: it must be the one checked
        path = index.db.execute("PRAGMA database_list").fetchone()[2]
        again = os.stat(path, follow_symlinks=False)
        if (again.st_dev, again.st_ino) != (st.st_dev, st.st_ino):
            raise IndexRefused(f"{shown} changed while it was opened; try again")
        index.check_integrity()
        _check_identity(index, marker, root, state_fd, not read_only)
        return index
    except sqlite3.Error as exc:
        if index is not None:
            index.close()
        else:
            os.close(state_fd)
        raise IndexRefused(f"{shown}: {exc}; {ASIDE_HINT}") from None
    except BaseException:
        if index is not None:
            index.close()   # closes state_fd too
        else:
            os.close(state_fd)
        raise


def _check_identity(index: Index, marker: str | None, root: str, state_fd: int,
                    adopt: bool) -> None:
    index_id, digest = index.meta("id"), index.meta("root")
    if index_id is None:
        if marker is not None:
            raise IndexRefused(f"{index.name} has no identity, but {MARKER_NAME} says compatfs "
                               f"made one (id {marker}) here: it was replaced; {RESTORE_HINT}")
        if adopt:   # written by a compatfs from before identities: adopt it
            index_id = secrets.token_hex(16)
            with index._transaction("identity"):
                index.db.execute("INSERT INTO meta VALUES ('id', ?)", (index_id,))
                index.db.execute("INSERT OR REPLACE INTO meta VALUES ('root', ?)",
                                 (root_digest(root),))
            _write_marker(state_fd, index_id)
            log.info("index: %s is from an older compatfs; marked as this root's (id %s)",
                     index.name, index_id)
        return
    if not _is_id(index_id):
        raise IndexRefused(f"{index.name}: its id {index_id!r} is not one compatfs wrote; "
                           f"{ASIDE_HINT}")
    if digest != root_digest(root):
        raise IndexRefused(f"{index.name} was made for another root, not {root}: it was copied "
                           f"here, or the root moved; serve it at the root it was made for, "
                           f"or {ASIDE_HINT}")
    if marker is not None and marker != index_id:
        raise IndexRefused(f"{index.name} (id {index_id}) is not the index compatfs made here "
                           f"(id {marker} in {MARKER_NAME}): it was replaced; {RESTORE_HINT}")
    if marker is None and adopt:
        _write_marker(state_fd, index_id)
        log.warning("index: %s was missing; written again from %s (id %s)", MARKER_NAME,
                    index.name, index_id)
