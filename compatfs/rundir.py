"""Where the daemon of one root keeps its runtime files: its pid, info, metrics, log
and private FUSE mountpoint.

A directory only root can write, checked component by component from ``/``
(:func:`open_private_dir`), in which every file is made and read relative to
a held fd without following a symbolic link (:class:`RunDir`), so nobody
but root can plant or swap what the daemon and the CLI read and write
there. Kept apart from :mod:`compatfs.mounts` (mounting and unmounting),
which needs none of it.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import secrets
import stat
from collections.abc import Iterator
from typing import Any

#: Where run dirs are kept unless ``--run-dir`` or ``COMPATFS_RUN_DIR`` says otherwise.
DEFAULT_RUN_DIR = "/run/compatfs"


class RunDirError(Exception):
    """The run dir or one of its entries cannot be trusted; the message names the
    path and what to do, in one line."""


#: How a run dir (or one of its directories) is opened: never through a symlink.
_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
#: The largest runtime file compatfs reads back (pid, info.json, last-stage).
READ_LIMIT = 64 * 1024
#: Modes of what the daemon creates in its run dir; explicit, so no umask changes them.
DIR_MODE = 0o755          # the run dir and key dir: metrics and info are for monitoring too
MOUNTPOINT_MODE = 0o700   # the private FUSE mountpoint, before the mount covers it
PUBLIC_FILE_MODE = 0o644  # pid, info.json, metrics.prom, last-stage
LOG_MODE = 0o600          # daemon.log, debug-mount.log


def _kind(st: os.stat_result) -> str:
    return "a symbolic link" if stat.S_ISLNK(st.st_mode) else "not a directory"


def _why_not_own(st: os.stat_result) -> str | None:
    """Why a directory with *st* cannot hold the daemon's files, or None."""
    if st.st_uid != os.geteuid():
        return f"owned by uid {st.st_uid}, not {os.geteuid()}"
    if st.st_mode & 0o022:
        return f"mode {stat.S_IMODE(st.st_mode):04o} lets group or others write in it"
    return None


def _safe_ancestor(st: os.stat_result) -> bool:
    """No one but root (or us) can rename or replace what is in this directory."""
    return st.st_uid in (0, os.geteuid()) and (
        not st.st_mode & 0o022 or bool(st.st_mode & stat.S_ISVTX))


def _open_dir_at(parent: int, name: str, path: str, *, create: bool, mode: int,
                 ancestor: bool) -> int | None:
    """An fd on directory *name* in *parent*, made with *mode* if missing and
    *create* (None if missing otherwise). A symlink is followed only as an
    ancestor and only when root owns it (``/var/run -> /run``)."""
    try:
        return os.open(name, _DIR_FLAGS, dir_fd=parent)
    except FileNotFoundError:
        if not create:
            return None
    except OSError as exc:
        if exc.errno not in (errno.ELOOP, errno.ENOTDIR):
            raise
        st = os.stat(name, dir_fd=parent, follow_symlinks=False)
        if ancestor and stat.S_ISLNK(st.st_mode) and st.st_uid == 0:
            return os.open(name, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC, dir_fd=parent)
        raise RunDirError(f"run dir {path}: {_kind(st)}; compatfs keeps its runtime files "
                          "only in a real directory (remove it, or choose another "
                          "--run-dir)") from None
    try:
        os.mkdir(name, mode, dir_fd=parent)
    except FileExistsError:
        pass   # made meanwhile by someone else: checked like any other
    fd = os.open(name, _DIR_FLAGS, dir_fd=parent)
    if os.fstat(fd).st_uid == os.geteuid():
        os.fchmod(fd, mode)   # the umask of whoever runs us plays no part
    return fd


def open_private_dir(path: str, *, create: bool) -> int | None:
    """An fd on directory *path*, which no one but this process's user can change.

    Walked from ``/`` one component at a time with ``O_NOFOLLOW``, every check
    on the opened fd (``fstat``), so nothing can be swapped between check and
    use: every ancestor is root's (or ours) and closed to others or sticky
    (``/tmp``); *path* itself is a real directory, ours, writable by us alone.
    Missing components are made with mode 0755 if *create*, else None.
    """
    path = os.path.abspath(path)
    parts = [part for part in path.split("/") if part]
    fd = os.open("/", _DIR_FLAGS)
    try:
        here = "/"
        for i, name in enumerate(parts):
            last = i == len(parts) - 1
            if not _safe_ancestor(os.fstat(fd)):
                raise RunDirError(f"{here}: writable by others (and not sticky) or not root's, "
                                  f"so the run dir {path} inside it is not safe; choose a "
                                  "--run-dir under a directory only root can write, such as /run")
            here = os.path.join(here, name)
            child = _open_dir_at(fd, name, here, create=create, mode=DIR_MODE, ancestor=not last)
            os.close(fd)
            fd = -1
            if child is None:
                return None
            fd = child
        why = _why_not_own(os.fstat(fd))
        if why is not None:
            raise RunDirError(f"run dir {path}: {why}; compatfs refuses to keep root's runtime "
                              f"files there ('chown root: {path}; chmod 0755 {path}', or remove "
                              "it and let compatfs make it)")
        result, fd = fd, -1
        return result
    finally:
        if fd >= 0:
            os.close(fd)


class RunDir:
    """Where the daemon of one root keeps its runtime files.

    ``<run dir>/<key>/``, *key* the first 16 hex digits of the SHA-256 of the
    root. Every file is created and read relative to an fd on the verified key
    dir (:func:`open_private_dir`), never through a path: created with an
    explicit mode, ``O_NOFOLLOW``, temporaries ``O_EXCL`` with a unique name and
    renamed into place; read back as regular files only, without blocking,
    bounded. The daemon holds the fd from :meth:`make` on; the CLI's readers
    open it for each read and find nothing when the directory does not exist.
    """

    LOG = "daemon.log"
    DEBUG_LOG = "debug-mount.log"
    PID = "pid"
    INFO = "info.json"
    METRICS = "metrics.prom"
    LAST_STAGE = "last-stage"
    MOUNTPOINT = "mnt"

    def __init__(self, run_root: str, root: str) -> None:
        self.root = os.path.abspath(root)
        self.run_root = os.path.abspath(run_root)
        key = hashlib.sha256(os.fsencode(self.root)).hexdigest()[:16]
        self.dir = os.path.join(self.run_root, key)
        self.pid_file = os.path.join(self.dir, self.PID)
        self.info_file = os.path.join(self.dir, self.INFO)
        self.mountpoint = os.path.join(self.dir, self.MOUNTPOINT)
        self.log_file = os.path.join(self.dir, self.LOG)
        self.metrics_file = os.path.join(self.dir, self.METRICS)
        self._fd: int | None = None

    # -- the directory --------------------------------------------------------------
    def _open(self, create: bool) -> int | None:
        top = open_private_dir(self.run_root, create=create)
        if top is None:
            return None
        try:
            fd = _open_dir_at(top, os.path.basename(self.dir), self.dir, create=create,
                              mode=DIR_MODE, ancestor=False)
        finally:
            os.close(top)
        if fd is not None:
            why = _why_not_own(os.fstat(fd))
            if why is not None:
                os.close(fd)
                raise RunDirError(f"run dir {self.dir}: {why}; compatfs refuses to keep root's "
                                  f"runtime files there (remove it: compatfs makes it again)")
        return fd

    @contextlib.contextmanager
    def _dir_fd(self) -> Iterator[int | None]:
        """The held fd, or one opened for the caller's read (None: no run dir)."""
        if self._fd is not None:
            yield self._fd
            return
        fd = self._open(create=False)
        try:
            yield fd
        finally:
            if fd is not None:
                os.close(fd)

    def make(self) -> None:
        """Make (or check) the run dir, its key dir and the private mountpoint,
        and hold the key dir open for every later file."""
        if self._fd is None:
            self._fd = self._open(create=True)
        try:
            os.mkdir(self.MOUNTPOINT, MOUNTPOINT_MODE, dir_fd=self._fd)
        except FileExistsError:
            pass
        self.check_mountpoint()

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    def check_mountpoint(self) -> str:
        """The private mountpoint's path, once it is checked as a real directory of
        ours in the verified key dir (right before mounting on it)."""
        if self._fd is None:
            self.make()
        assert self._fd is not None
        where = f"run dir {self.mountpoint}"
        try:
            fd = os.open(self.MOUNTPOINT, _DIR_FLAGS, dir_fd=self._fd)
        except OSError as exc:
            if exc.errno not in (errno.ELOOP, errno.ENOTDIR):
                raise
            st = os.stat(self.MOUNTPOINT, dir_fd=self._fd, follow_symlinks=False)
            raise RunDirError(f"{where}: {_kind(st)}; compatfs mounts only on a real directory "
                              f"of its own (remove it: compatfs makes it again)") from None
        try:
            held = os.fstat(fd)
            why = _why_not_own(held)
            if why is not None:
                raise RunDirError(f"{where}: {why}; remove it (compatfs makes it again)")
            # Every component of the path is root's and closed to others (checked
            # above), so the path names this directory when FUSE mounts on it.
            now = os.stat(self.mountpoint, follow_symlinks=False)
            if (now.st_dev, now.st_ino) != (held.st_dev, held.st_ino):
                raise RunDirError(f"{where}: changed while compatfs was checking it")
        finally:
            os.close(fd)
        return self.mountpoint

    # -- files ----------------------------------------------------------------------
    def _read(self, name: str) -> bytes | None:
        """A runtime file's bytes, or None when it is missing, not a regular file
        (a FIFO, a symlink, a directory) or larger than :data:`READ_LIMIT`."""
        with self._dir_fd() as dfd:
            if dfd is None:
                return None
            try:
                fd = os.open(name, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC,
                             dir_fd=dfd)
            except OSError:
                return None
        try:
            if not stat.S_ISREG(os.fstat(fd).st_mode):
                return None
            data = os.read(fd, READ_LIMIT + 1)
            return data if len(data) <= READ_LIMIT else None
        except OSError:
            return None
        finally:
            os.close(fd)

    def read_text(self, name: str) -> str | None:
        data = self._read(name)
        return None if data is None else data.decode("utf-8", "replace")

    def write_file(self, name: str, text: str, mode: int = PUBLIC_FILE_MODE) -> None:
        """Replace *name* atomically: a temporary of a name no one can guess,
        created exclusively with *mode*, renamed over it (a symlink at *name* is
        replaced, never followed)."""
        if self._fd is None:
            self.make()
        dfd = self._fd
        tmp = f".{name}.{os.getpid()}.{secrets.token_hex(8)}.tmp"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC,
                     mode, dir_fd=dfd)
        try:
            os.fchmod(fd, mode)
            data = text.encode()
            while data:
                data = data[os.write(fd, data):]
            os.close(fd)
            fd = -1
            os.replace(tmp, name, src_dir_fd=dfd, dst_dir_fd=dfd)
        except BaseException:
            if fd >= 0:
                os.close(fd)
            with contextlib.suppress(OSError):
                os.unlink(tmp, dir_fd=dfd)
            raise

    def open_log(self, name: str = LOG) -> int:
        """An fd appending to the log *name* (made 0600), for a daemon's output;
        a symlink, a FIFO or anything not a regular file of ours is refused."""
        if self._fd is None:
            self.make()
        where = os.path.join(self.dir, name)
        try:
            fd = os.open(name, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_NOFOLLOW
                         | os.O_NONBLOCK | os.O_CLOEXEC, LOG_MODE, dir_fd=self._fd)
        except OSError as exc:
            if exc.errno in (errno.ELOOP, errno.ENXIO, errno.EISDIR):   # link, FIFO, dir
                raise RunDirError(f"{where}: not a regular file; remove it (compatfs makes it "
                                  "again)") from None
            raise
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode) or st.st_uid != os.geteuid():
            os.close(fd)
            raise RunDirError(f"{where}: not a regular file of uid {os.geteuid()}; remove it "
                              "(compatfs makes it again)")
        os.set_blocking(fd, True)
        os.fchmod(fd, LOG_MODE)
        return fd

    def write_info(self, info: dict[str, Any]) -> None:
        self.write_file(self.INFO, json.dumps(info))
        self.write_file(self.PID, f"{os.getpid()}\n")

    def live_pid(self) -> int | None:
        """The pid of a running daemon for this root, or None."""
        text = self.read_text(self.PID)
        try:
            pid = int((text or "").strip())
        except ValueError:
            return None
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                cmdline = f.read()
        except OSError:
            return None
        return pid if b"compatfs" in cmdline else None

    def info(self) -> dict[str, Any] | None:
        text = self.read_text(self.INFO)
        try:
            info = json.loads(text) if text is not None else None
        except ValueError:
            return None
        return info if isinstance(info, dict) else None

    def clear(self) -> None:
        """Remove the files of a daemon that stopped, and any temporary left by a kill."""
        with self._dir_fd() as dfd:
            if dfd is None:
                return
            names = [self.PID, self.INFO, self.METRICS]
            names += [n for n in os.listdir(dfd) if n.startswith(".") and n.endswith(".tmp")]
            for name in names:
                try:
                    os.unlink(name, dir_fd=dfd)   # unlink never follows a symlink
                except (FileNotFoundError, IsADirectoryError, PermissionError):
                    pass
