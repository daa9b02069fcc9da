"""Finding the index of a root and proving it sound before it is used.

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

The open index itself is :mod:`compatfs.index`'s; this module owns the way
to it (the state directory, the marker, the identity, a first start's build)
and the refusals.
"""

from __future__ import annotations

import errno
import hashlib
import logging
import os
import secrets
import sqlite3
import stat

from .beneath import RESOLVE_BENEATH, RESOLVE_NO_SYMLINKS, openat2
from .index import ASIDE_HINT, DB_NAME, RESTORE_HINT, SQLITE_FULL, Index, IndexRefused
from .indexformat import create_schema

log = logging.getLogger(__name__)

#: The marker compatfs writes beside the index it made (see the module docstring).
MARKER_NAME = "index.id"
_MARKER_MAGIC = "compatfs-index"
#: Where a first start builds the index before renaming it into place.
_BUILD_NAME = DB_NAME + ".new"


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
            create_schema(db, {"id": index_id, "root": root_digest(root)})
        finally:
            db.close()
        os.fsync(fd)
    except sqlite3.Error as exc:   # a full disk on a first start; the next start builds again
        full = ((getattr(exc, "sqlite_errorcode", None) or 0) & 0xFF) == SQLITE_FULL
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
    dir_fd = root_fd if root_fd is not None \
        else os.open(root, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        state_fd = _open_state_dir(dir_fd, state_rel, shown_dir, create and not read_only)
    finally:
        if root_fd is None:
            os.close(dir_fd)
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
            index.set_identity(index_id, root_digest(root))
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
