"""The backing store: the only place compatfs makes syscalls on real files.

Every location compatfs serves from (the legacy directories it mounts over,
and the new-layout directories) is opened as a directory file descriptor
*before* mounting, and every later access is relative to one of those fds.
So the daemon never walks through its own mounts, and unmounting reveals the
legacy directories exactly as they were.

Paths below a location are resolved with ``openat2(2)`` and
``RESOLVE_BENEATH | RESOLVE_NO_SYMLINKS``: a symbolic link or ``..`` planted
in a store can never lead an access outside it. The last component is always
used with ``*at`` calls that do not follow symbolic links.
"""

from __future__ import annotations

import ctypes
import errno
import logging
import os
import shutil
import stat
import time
from contextlib import contextmanager
from typing import Iterator

from .fscrypt import FscryptError, is_encrypted, policy_of
from .layout import Layout
from .mounts import clone_without_submounts
from .scan import SET_ASIDE_DIR, TMP_DIR

log = logging.getLogger(__name__)


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

    __slots__ = ("store", "dir")

    def __init__(self, store: "Store", directory: str) -> None:
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

_libc = ctypes.CDLL(None, use_errno=True)
_SYS_OPENAT2 = 437  # the same number on every architecture Linux added it to

RESOLVE_NO_XDEV = 0x01
RESOLVE_NO_MAGICLINKS = 0x02
RESOLVE_NO_SYMLINKS = 0x04
RESOLVE_BENEATH = 0x08


class _OpenHow(ctypes.Structure):
    _fields_ = [("flags", ctypes.c_uint64), ("mode", ctypes.c_uint64),
                ("resolve", ctypes.c_uint64)]


def openat2(dir_fd: int, path: str, flags: int, mode: int = 0,
            resolve: int = RESOLVE_BENEATH | RESOLVE_NO_SYMLINKS) -> int:
    """``openat2(2)``: open *path* below *dir_fd* without leaving it."""
    how = _OpenHow(flags | os.O_CLOEXEC, mode, resolve)
    fd = _libc.syscall(_SYS_OPENAT2, dir_fd, os.fsencode(path), ctypes.byref(how),
                       ctypes.sizeof(how))
    if fd < 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err), path)
    return fd


class StoreMissing(OSError):
    """A location that is not there (yet); requests on it get ENOENT."""


class Store:
    """One location, opened once; all access relative to its fd."""

    __slots__ = ("key", "path", "fd", "policy", "encrypted", "staging", "aside")

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
        with self.parent(rel) as (fd, name):
            return os.open(name, flags | os.O_NOFOLLOW | os.O_CLOEXEC, mode, dir_fd=fd)

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

    def aside_place(self, where: str) -> tuple["Store", str]:
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

    def link(self, rel: str, other: "Store", other_rel: str) -> None:
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

    def rename(self, rel: str, other: "Store", other_rel: str) -> None:
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


#: The legacy locations a view is mounted over, by view name.
VIEW_STORES = {"img": "img", "downloads": "downloads", "prepared": "prepared"}

#: Where new-layout data may be placed (of the two clear-text volume locations,
#: only the one the target layout names is made: :func:`new_stores`; the other is
#: opened when it exists, to serve what an earlier run under the other layout placed).
NEW_STORES = ("vault_volumes", "clear_volumes", "novault_volumes", "downloader", "verifier",
              "verified", "unresolved", "cas")
#: The clear-text volume locations: EVE's (``clear/volumes``) and the design note's.
CLEAR_STORES = frozenset({"clear_volumes", "novault_volumes"})

#: The root itself: the legacy ``containerd`` tree is moved out of it as one name.
ROOT_STORE = "persist"
#: The directory the CAS location is a name in (``vault`` for ``vault/containerd``).
CAS_PARENT = "cas_parent"

#: New-layout locations that must be encrypted (all but the clear-text volumes).
VAULT_STORES = frozenset(NEW_STORES) - CLEAR_STORES | {CAS_PARENT}


def new_stores(layout: Layout) -> tuple[str, ...]:
    """The new-layout locations *layout*'s target uses: every one but the clear-text
    volume location of the other target layout."""
    return tuple(k for k in NEW_STORES if k not in CLEAR_STORES
                 or k == layout.rules.clear_volumes)


def own_location(key: str) -> str:
    """The layout key of compatfs' own directory for the new-layout store *key*:
    beside it, on its filesystem and under its fscrypt policy, outside every
    directory EVE scans (``state`` for the vault's stores)."""
    return {"clear_volumes": "clear_compatfs", "novault_volumes": "novault_compatfs"}.get(
        key, "state")


def store_path(layout: Layout, key: str) -> str:
    """The directory of the store *key* (a location key, or one of the two above)."""
    if key == ROOT_STORE:
        return layout.root
    if key == CAS_PARENT:
        return os.path.dirname(layout.path("cas"))
    return layout.path(key)


class VaultNotEncrypted(Exception):
    """A vault-bound location is not encrypted and the config requires it."""


def _refuse_plain_vault(root: "Store", layout: Layout) -> None:
    """Raise :class:`VaultNotEncrypted` if a vault-bound location would be (or
    is) a directory the kernel does not encrypt.

    Checked before anything is made: for each vault-bound location, the
    deepest directory of its path that exists already decides, since a
    directory made below it inherits its policy (or its lack of one). So a
    refused plain vault is left exactly as it was found."""
    cas_parent = os.path.dirname(layout.rel("cas"))
    for key, rel in [(k, layout.rel(k)) for k in VAULT_STORES - {CAS_PARENT}] \
            + [(CAS_PARENT, cas_parent)]:
        parts = rel.split("/") if rel else []
        while True:
            try:
                fd = root.open_dir("/".join(parts))
            except (FileNotFoundError, NotADirectoryError):
                if not parts:
                    raise
                parts.pop()
                continue
            try:
                encrypted = is_encrypted(fd)
            finally:
                os.close(fd)
            break
        if not encrypted:
            path = os.path.join(layout.root, *parts)
            raise VaultNotEncrypted(
                f"{path} is not encrypted (the kernel reports no fscrypt policy); "
                f"refusing to place vault-bound data ({key}) there. Unlock or create the "
                "vault, or set require_encrypted_vault: false")


def _own_sides(root: Store, layout: Layout, stores: dict[str, Store],
               create: bool) -> dict[str, Store]:
    """Open compatfs' own directory of each new-layout store in *stores* (made
    when *create*) and point the store's staging and set-aside there
    (``<own>/staging/<key>``, ``<own>/set-aside/<key>``). A store whose own
    directory is missing (not *create*: nothing is placed) keeps none: a copy
    or a set-aside there fails with ENOENT rather than land in EVE's directory."""
    owns: dict[str, Store] = {}
    for key in [k for k in NEW_STORES if k in stores] \
            + ([CAS_PARENT] if CAS_PARENT in stores else []):
        store = stores[key]
        own_key = own_location(key)
        own = owns.get(own_key)
        if own is None:
            rel = layout.rel(own_key)
            if create:
                root.makedirs(rel, 0o700)
            try:
                own = Store(own_key, layout.path(own_key), root.open_dir(rel))
            except FileNotFoundError:
                own = None
            else:
                owns[own_key] = own
                if own.policy != store.policy \
                        or os.fstat(own.fd).st_dev != os.fstat(store.fd).st_dev:
                    log.warning("%s is not on the filesystem, or not under the fscrypt "
                                "policy, of %s: moves into %s cannot finish with a rename "
                                "and will fail", own.path, store.path, key)
        if own is None:
            base = layout.rel(own_key)
            store.staging = _Missing(root, f"{base}/{STAGING_DIR}/{key}")
            store.aside = _Missing(root, f"{base}/{ASIDE_DIR}/{key}")
            continue
        store.staging = Side(own, f"{STAGING_DIR}/{key}")
        store.aside = Side(own, f"{ASIDE_DIR}/{key}")
    return owns


class _Missing(Side):
    """The staging of a store whose own directory is missing: nothing is made there."""

    def make(self) -> None:
        raise FileNotFoundError(errno.ENOENT, "compatfs' own directory for this location "
                                "is missing (made in stages redirect and migrate)",
                                self.dir)

    def drop_if_empty(self) -> None:
        pass


class Backing:
    """Every store compatfs serves from, opened before mounting."""

    def __init__(self, stores: dict[str, Store], owns: dict[str, Store] | None = None) -> None:
        self.stores = stores
        #: compatfs' own directories the new-layout stores stage in, by layout key
        self.owns = owns or {}

    @classmethod
    def open(cls, layout: Layout, views: tuple[str, ...], create_new: bool,
             require_encrypted: bool, read_only: bool = False,
             covered: frozenset[str] = frozenset()) -> "Backing":
        """Open the legacy locations of *views* and every new-layout location.

        Legacy locations are created when missing (they become mountpoints).
        New-layout locations are created only when *create_new* (a stage that
        places data there); otherwise a missing one is simply absent. With
        *require_encrypted*, a vault-bound location the kernel does not report
        as encrypted raises :class:`VaultNotEncrypted` (only when *create_new*:
        in observe nothing is placed there). *read_only* creates nothing at all:
        a missing legacy location is then simply absent too. The views in
        *covered* have a dead daemon's mount on their legacy location: the
        directories under them are opened through one clone of the root's
        mount without submounts (:func:`compatfs.mounts.clone_without_submounts`).
        A rename between them and a new-layout location is then ``EXDEV``
        until the next start, which the views and the migrator answer as they
        answer the vault boundary (the bytes stay; the migrator copies).
        """
        stores: dict[str, Store] = {}
        # Every location is reached from the root like any other path: beneath
        # it and through no symbolic link, so a link planted at, say,
        # vault/verifier cannot send data (or mkdir) outside the root.
        root = Store(ROOT_STORE, layout.root,
                     os.open(layout.root, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC))
        clone: Store | None = None    # the root without submounts, for covered views
        try:
            if create_new and require_encrypted and not read_only:
                _refuse_plain_vault(root, layout)   # before anything is created
            for view in views:
                key = VIEW_STORES[view]
                if read_only:
                    try:
                        stores[view] = Store(key, layout.path(key), root.open_dir(layout.rel(key)))
                    except FileNotFoundError:
                        pass
                    continue
                if view in covered:
                    if clone is None:
                        clone = Store(ROOT_STORE, layout.root, clone_without_submounts(root.fd))
                    stores[view] = Store(key, layout.path(key), clone.open_dir(layout.rel(key)))
                    continue
                root.makedirs(layout.rel(key), 0o755)
                stores[view] = Store(key, layout.path(key), root.open_dir(layout.rel(key)))
            cas_parent = os.path.dirname(layout.rel("cas"))
            used = new_stores(layout)
            for key, rel in [(k, layout.rel(k)) for k in NEW_STORES] + [(CAS_PARENT, cas_parent)]:
                path = os.path.join(layout.root, rel)
                if create_new and not read_only and key != "cas" and rel \
                        and (key in used or key == CAS_PARENT):
                    # EVE's volumemgr makes its volume directories 0700
                    private = key in VAULT_STORES or key == "clear_volumes"
                    root.makedirs(rel, 0o700 if private else 0o755)
                try:
                    store = Store(key, path, root.open_dir(rel))
                except FileNotFoundError:
                    continue
                stores[key] = store
                if create_new and require_encrypted and key in VAULT_STORES and not store.encrypted:
                    raise VaultNotEncrypted(
                        f"{path} is not encrypted (the kernel reports no fscrypt policy); "
                        "refusing to place vault-bound data there. Unlock or create the "
                        "vault, or set require_encrypted_vault: false")
            stores[ROOT_STORE] = root
            owns = _own_sides(root, layout, stores, create_new and not read_only)
        except BaseException:
            root.close()
            for s in stores.values():
                s.close()
            raise
        finally:
            if clone is not None:
                clone.close()       # the stores opened through it keep it alive
        return cls(stores, owns)

    def get(self, key: str) -> Store:
        store = self.stores.get(key)
        if store is None:
            raise StoreMissing(errno.ENOENT, f"location {key} is not available")
        return store

    def has(self, key: str) -> bool:
        return key in self.stores

    def close(self) -> None:
        for s in list(self.stores.values()) + list(self.owns.values()):
            s.close()
        self.stores.clear()
        self.owns.clear()
