"""A store: one location compatfs serves from, opened once, every syscall relative to it.

Every location compatfs serves from (the legacy directories it mounts over,
and the new-layout directories) is opened as a directory file descriptor
*before* mounting, and every later access is relative to one of those fds.
So the daemon never walks through its own mounts, and unmounting reveals the
legacy directories exactly as they were. :class:`Store` is the only place
compatfs makes syscalls on the real files it serves.

Paths below a location are resolved with ``openat2(2)`` and
``RESOLVE_BENEATH | RESOLVE_NO_SYMLINKS`` (:mod:`compatfs.beneath`): a
symbolic link or ``..`` planted in a store can never lead an access outside
it. The last component is always used with ``*at`` calls that do not follow
symbolic links. Each store also has its :class:`Side` directories: where the
temporaries of copies into it are staged and where its objects are set
aside. Which stores a layout opens is :mod:`compatfs.backing`'s.
"""

from __future__ import annotations

import errno
import os
import shutil
import stat
import time
from collections.abc import Iterator
from contextlib import contextmanager

from .beneath import openat2
from .fscrypt import FscryptError, is_encrypted, policy_of
from .scan import SET_ASIDE_DIR, TMP_DIR


def aside_name(rel: str) -> str:
    """A fresh set-aside name for the object at *rel*, as records keep it:
    ``.compatfs-set-aside/<rel with / as %>.<ns>``. The store maps that prefix
    to its set-aside directory (:attr:`Store.aside`); compatfs never deletes
    from it."""
    return f"{SET_ASIDE_DIR}/{rel.replace('/', '%')}.{time.time_ns()}"


#: Below a new-layout store's own directory (``state``, ``clear_compatfs``...):
#: ``staging/<store key>/`` holds the temporaries of copies under way,
#: ``set-aside/<store key>/`` the copies set aside.
STAGING_DIR = "staging"
ASIDE_DIR = "set-aside"


class Side:
    """A directory of compatfs' own for one store: where the temporaries of its
    copies are staged, or where its set-aside copies are kept.

    A legacy store keeps them inside itself (``.compatfs-tmp/``,
    ``.compatfs-set-aside/``: EVE's converter skips directories in ``img/`` and
    cannot parse those names in ``prepared/``). A new-layout store keeps them
    outside the directories EVE scans and garbage-collects (volumemgr deletes
    every name in its volume directories it cannot parse), in a directory on
    the same filesystem under the same fscrypt policy, so the last step of a
    move is still one ``rename(2)``."""

    __slots__ = ("dir", "store")

    def __init__(self, store: Store, directory: str) -> None:
        self.store = store      # the store the directory is in
        self.dir = directory    # relative to that store

    def name(self, leaf: str) -> str:
        """*leaf* in this directory, relative to :attr:`store`."""
        return f"{self.dir}/{leaf}"

    def make(self) -> None:
        self.store.makedirs(self.dir, 0o700)

    def drop_if_empty(self) -> None:
        """Remove the directory if it is empty (absent or not empty: left)."""
        try:
            self.store.rmdir(self.dir)
        except OSError:
            pass

    def shown(self, leaf: str) -> str:
        """The absolute path of *leaf* here, for reports."""
        return os.path.join(self.store.path, self.name(leaf))


def _policy(fd: int) -> bytes | None:
    try:
        return policy_of(fd)
    except FscryptError:
        return None             # no encryption support: no policy


class StoreMissing(OSError):
    """A location that is not there (yet); requests on it get ENOENT."""


class Store:
    """One location, opened once; all access relative to its fd."""

    __slots__ = ("aside", "encrypted", "fd", "key", "path", "policy", "staging")

    def __init__(self, key: str, path: str, fd: int) -> None:
        self.key = key
        self.path = path
        self.fd = fd
        #: the fscrypt policy of the store's directory (None: not encrypted)
        self.encrypted = is_encrypted(fd)
        self.policy = _policy(fd) if self.encrypted else None
        #: where the temporaries of copies into this store are made, and where
        #: objects of this store are set aside (:class:`Side`; a new-layout
        #: store's are moved out of it by :meth:`Backing.open`)
        self.staging = Side(self, TMP_DIR)
        self.aside = Side(self, SET_ASIDE_DIR)

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    # -- resolution ---------------------------------------------------------
    @contextmanager
    def parent(self, rel: str) -> Iterator[tuple[int, str]]:
        """(fd of the directory holding *rel*, last component), safely resolved."""
        head, _, name = rel.rpartition("/")
        if not head:
            yield self.fd, name
            return
        fd = openat2(self.fd, head, os.O_PATH | os.O_DIRECTORY)
        try:
            yield fd, name
        finally:
            os.close(fd)

    def open_dir(self, rel: str) -> int:
        """An fd for listing the directory *rel* ('' is the store itself)."""
        return openat2(self.fd, rel or ".", os.O_RDONLY | os.O_DIRECTORY)

    # -- metadata -------------------------------------------------------------
    def lstat(self, rel: str) -> os.stat_result:
        if not rel:
            return os.fstat(self.fd)
        if "/" not in rel:   # in the store's own directory: no parent to open (a hot path)
            return os.stat(rel, dir_fd=self.fd, follow_symlinks=False)
        with self.parent(rel) as (fd, name):
            return os.stat(name, dir_fd=fd, follow_symlinks=False)

    def exists(self, rel: str) -> bool:
        try:
            self.lstat(rel)
        except FileNotFoundError:
            return False
        except NotADirectoryError:
            return False
        return True

    def listdir(self, rel: str) -> list[str]:
        fd = self.open_dir(rel)
        try:
            return os.listdir(fd)
        finally:
            os.close(fd)

    def iter_names(self, rel: str) -> Iterator[str]:
        """The names in the directory *rel*, one at a time, as the directory is read
        (no list of them all; the directory stays open until the last)."""
        fd = self.open_dir(rel)
        try:
            with os.scandir(fd) as entries:
                for entry in entries:
                    yield entry.name
        finally:
            os.close(fd)

    def chmod(self, rel: str, mode: int) -> None:
        with self.parent(rel) as (fd, name):
            st = os.stat(name, dir_fd=fd, follow_symlinks=False)
            if stat.S_ISLNK(st.st_mode):
                return  # a symbolic link has no mode of its own on Linux
            os.chmod(name, mode, dir_fd=fd)

    def chown(self, rel: str, uid: int, gid: int) -> None:
        with self.parent(rel) as (fd, name):
            os.chown(name, uid, gid, dir_fd=fd, follow_symlinks=False)

    def utime(self, rel: str, atime_ns: int | None, mtime_ns: int | None) -> None:
        with self.parent(rel) as (fd, name):
            st = os.stat(name, dir_fd=fd, follow_symlinks=False)
            ns = (st.st_atime_ns if atime_ns is None else atime_ns,
                  st.st_mtime_ns if mtime_ns is None else mtime_ns)
            os.utime(name, ns=ns, dir_fd=fd, follow_symlinks=False)

    def truncate(self, rel: str, size: int) -> None:
        fd = self.open(rel, os.O_WRONLY)
        try:
            os.ftruncate(fd, size)
        finally:
            os.close(fd)

    def readlink(self, rel: str) -> str:
        with self.parent(rel) as (fd, name):
            return os.readlink(name, dir_fd=fd)

    # -- namespace ------------------------------------------------------------
    def open(self, rel: str, flags: int, mode: int = 0o600) -> int:
        """Open the file *rel*; never follows a symbolic link."""
        flags |= os.O_NOFOLLOW | os.O_CLOEXEC
        if "/" not in rel:   # in the store's own directory (a hot path)
            return os.open(rel, flags, mode, dir_fd=self.fd)
        with self.parent(rel) as (fd, name):
            return os.open(name, flags, mode, dir_fd=fd)

    def mkdir(self, rel: str, mode: int) -> None:
        with self.parent(rel) as (fd, name):
            os.mkdir(name, mode, dir_fd=fd)

    def makedirs(self, rel: str, mode: int = 0o755) -> list[str]:
        """``mkdir -p`` of *rel* below the store, component by component.

        Returns the directories it made, outermost first, so a caller whose
        next step fails can take them away again (:meth:`remove_made`)."""
        made: list[str] = []
        if not rel:
            return made
        done = ""
        try:
            for part in rel.split("/"):
                done = f"{done}/{part}" if done else part
                try:
                    self.mkdir(done, mode)
                    made.append(done)
                except FileExistsError:
                    if not stat.S_ISDIR(self.lstat(done).st_mode):
                        raise NotADirectoryError(errno.ENOTDIR, os.strerror(errno.ENOTDIR),
                                                 done) from None
        except BaseException:
            self.remove_made(made)      # all or nothing: no half-made chain is left
            raise
        return made

    def remove_made(self, made: list[str]) -> None:
        """Remove directories :meth:`makedirs` made, innermost first, if still
        empty (never raises: this runs while another error is on its way)."""
        for rel in reversed(made):
            try:
                self.rmdir(rel)
            except OSError:
                return

    def aside_place(self, where: str) -> tuple[Store, str]:
        """The store and name a set-aside name (:func:`aside_name`) stands for."""
        leaf = where.partition("/")[2] if where.startswith(SET_ASIDE_DIR + "/") else where
        return self.aside.store, self.aside.name(leaf)

    def aside_shown(self, where: str) -> str:
        """The absolute path of the set-aside name *where*, for reports."""
        store, name = self.aside_place(where)
        return os.path.join(store.path, name)

    def move_aside(self, rel: str, where: str | None = None) -> str:
        """Rename *rel* into the store's set-aside directory (made when missing)
        and return its set-aside name (:meth:`aside_shown` gives its path).
        Kept, never deleted: an operator decides what to do with it. *where*
        repeats a move a crash interrupted: if something is there already it
        is done (a set-aside copy is never replaced)."""
        where = where or aside_name(rel)
        store, name = self.aside_place(where)
        if store.exists(name):
            return where
        self.aside.make()
        self.rename(rel, store, name)
        return where

    def symlink(self, target: str, rel: str) -> None:
        with self.parent(rel) as (fd, name):
            os.symlink(target, name, dir_fd=fd)

    def mknod(self, rel: str, mode: int, rdev: int) -> None:
        with self.parent(rel) as (fd, name):
            os.mknod(name, mode, rdev, dir_fd=fd)

    def link(self, rel: str, other: Store, other_rel: str) -> None:
        with self.parent(rel) as (fd, name), other.parent(other_rel) as (ofd, oname):
            os.link(name, oname, src_dir_fd=fd, dst_dir_fd=ofd, follow_symlinks=False)

    def unlink(self, rel: str) -> None:
        with self.parent(rel) as (fd, name):
            os.unlink(name, dir_fd=fd)

    def rmdir(self, rel: str) -> None:
        with self.parent(rel) as (fd, name):
            os.rmdir(name, dir_fd=fd)

    def remove(self, rel: str) -> bool:
        """Remove whatever is at *rel*: a file, a link or a whole directory tree
        (links inside are removed, never followed). False if nothing was there."""
        try:
            with self.parent(rel) as (fd, name):
                st = os.stat(name, dir_fd=fd, follow_symlinks=False)
                if stat.S_ISDIR(st.st_mode):
                    shutil.rmtree(name, dir_fd=fd)
                else:
                    os.unlink(name, dir_fd=fd)
        except FileNotFoundError:
            return False
        return True

    def rename(self, rel: str, other: Store, other_rel: str) -> None:
        """``renameat(2)`` from *rel* here to *other_rel* in *other*.

        Raises ``OSError(EXDEV)`` across filesystems or into an encrypted
        directory tree, as the kernel does, and also out of an encrypted store
        into one without its policy: the kernel would move the file but keep
        its contents encrypted under the old key (unreadable once that key is
        gone), so such a move must be a decrypting copy.
        """
        if self.policy is not None and other.policy != self.policy:
            raise OSError(errno.EXDEV, "the destination has another encryption policy "
                          "(a move out of an fscrypt directory is a decrypting copy)",
                          other_rel)
        with self.parent(rel) as (fd, name), other.parent(other_rel) as (ofd, oname):
            os.rename(name, oname, src_dir_fd=fd, dst_dir_fd=ofd)

    def statvfs(self) -> os.statvfs_result:
        return os.fstatvfs(self.fd)
