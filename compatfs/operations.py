"""The FUSE request handlers of the legacy views.

Thin by design: each handler turns a request into calls on
:class:`compatfs.view.View` (which decides where things are) and on open
file descriptors (which carry the bytes). Every handler passes through one
errno boundary, :func:`_boundary`: a backing ``OSError`` keeps its errno,
anything unexpected is logged with its traceback and answered with ``EIO``,
and the mount keeps serving.

Nothing here parses configuration, reads the checkpoint or logs above debug
level on success: every request is a hot path.
"""

from __future__ import annotations

import errno
import functools
import logging
import os
import stat
from time import perf_counter_ns
from typing import Any, Awaitable, Callable, TypeVar

import pyfuse3
from pyfuse3 import FUSEError

from .changes import NO_CHANGES, ChangeObserver
from .control import CONTROL_NAME, Control, ControlError
from .handles import Handle, HandleTable, backing_flags
from .inodes import ROOT, InodeTable
from .latency import LatencyHistogram
from .placement import join
from .view import View
from .writebehind import Stream, WriteBehind

log = logging.getLogger(__name__)

F = TypeVar("F", bound=Callable[..., Awaitable[Any]])

def _boundary(fn: F) -> F:
    """The errno boundary: only FUSEError leaves a handler."""

    @functools.wraps(fn)
    async def wrapper(self: "Operations", *args: Any) -> Any:
        start = perf_counter_ns()
        try:
            return await fn(self, *args)
        except FUSEError:
            raise
        except OSError as exc:
            if log.isEnabledFor(logging.DEBUG):
                log.debug("%s%r: %s", fn.__name__, args[:2], exc)
            raise FUSEError(exc.errno or errno.EIO) from None
        except KeyError:
            raise FUSEError(errno.ENOENT) from None
        except Exception:
            self.faults += 1
            log.exception("unexpected error in %s%r; answered EIO", fn.__name__, args[:2])
            raise FUSEError(errno.EIO) from None
        finally:
            self.latency.add(perf_counter_ns() - start)

    return wrapper  # type: ignore[return-value]


class Operations(pyfuse3.Operations):
    """pyfuse3 operations over a :class:`View`. The root lists the views."""

    supports_dot_lookup = True
    enable_writeback_cache = False

    def __init__(self, view: View, timeout: float = 10.0, *, handles: HandleTable | None = None,
                 changes: ChangeObserver = NO_CHANGES, control: Control | None = None) -> None:
        super().__init__()
        self.view = view
        self.inodes = InodeTable()
        self.timeout = timeout
        #: every open file; the migration is given this table to switch handles
        self.handles = handles if handles is not None else HandleTable()
        self.open_count: dict[int, int] = {}
        self.dirs: dict[int, tuple[int, list[str]]] = {}
        self._next_fh = 1
        self.faults = 0
        self.latency = LatencyHistogram()
        self.write_behind = WriteBehind()
        #: told of every change an agent makes, for a copy under way to follow
        self.changes = changes
        #: the control interface behind each view's hidden .compatfs file
        self.control = control
        self._control_inodes: set[int] = set()
        self._documents: dict[int, bytes] = {}
        self._root_st = view.backing.get(view.views[0]).lstat("")

    # -- helpers ------------------------------------------------------------------
    def _attrs(self, ino: int, st: os.stat_result) -> pyfuse3.EntryAttributes:
        a = pyfuse3.EntryAttributes()
        a.st_ino = ino
        a.generation = 0
        a.entry_timeout = self.timeout
        a.attr_timeout = self.timeout
        a.st_mode = st.st_mode
        a.st_nlink = st.st_nlink
        a.st_uid = st.st_uid
        a.st_gid = st.st_gid
        a.st_rdev = st.st_rdev
        a.st_size = st.st_size
        a.st_blksize = st.st_blksize
        a.st_blocks = st.st_blocks
        a.st_atime_ns = st.st_atime_ns
        a.st_mtime_ns = st.st_mtime_ns
        a.st_ctime_ns = st.st_ctime_ns
        return a

    def _root_attrs(self) -> pyfuse3.EntryAttributes:
        a = self._attrs(ROOT, self._root_st)
        a.st_mode = stat.S_IFDIR | 0o700   # its views are reached through their binds only
        a.st_nlink = 2 + len(self.view.views)
        return a

    def _stat(self, ino: int) -> os.stat_result:
        try:
            return self.view.lstat(self.inodes.path(ino))
        except FileNotFoundError:
            fd = self._open_fd_of(ino)  # unlinked but still open
            if fd is None:
                raise
            return os.fstat(fd)

    def _ino_for(self, parent: int, name: str, st: os.stat_result) -> int:
        """The inode for a name; every name of a hard-linked file gets the same one."""
        if st.st_nlink > 1 and not stat.S_ISDIR(st.st_mode):
            return self.inodes.ensure_linked(parent, name, (st.st_dev, st.st_ino))
        return self.inodes.ensure(parent, name)

    def _entry(self, parent: int, name: str, st: os.stat_result) -> pyfuse3.EntryAttributes:
        ino = self._ino_for(parent, name, st)
        self.inodes.ref(ino)
        return self._attrs(ino, st)

    def _open_fd_of(self, ino: int) -> int | None:
        """An open backing fd of *ino*, for a file whose last name is gone."""
        for h in self.handles:
            if h.ino == ino:
                return h.fd
        return None

    def _vpath(self, parent: int, name: bytes) -> tuple[str, str]:
        n = os.fsdecode(name)
        if parent == ROOT:
            raise FUSEError(errno.EPERM)  # the root only holds the views
        if n == CONTROL_NAME and self.control is not None and self.inodes.parent_of(parent) == ROOT:
            raise FUSEError(errno.EPERM)  # the control file is not a legacy name
        return join(self.inodes.path(parent), n), n

    def _new_fh(self, handle: Handle) -> int:
        fh = self._next_fh
        self._next_fh += 1
        self.handles.add(fh, handle)
        self.open_count[handle.ino] = self.open_count.get(handle.ino, 0) + 1
        return fh

    def _own(self, parent_vpath: str, ctx: pyfuse3.RequestContext,
             chown: Callable[[int, int], None]) -> None:
        """New objects belong to the caller, not to the daemon; the group comes
        from a set-group-ID parent directory instead, as the kernel does."""
        if ctx.uid == os.geteuid() and ctx.gid == os.getegid():
            return
        gid = ctx.gid
        if gid != os.getegid() and self.view.lstat(parent_vpath).st_mode & stat.S_ISGID:
            gid = -1
        chown(ctx.uid, gid)

    # -- lookups and attributes ---------------------------------------------------
    @_boundary
    async def lookup(self, parent_inode: int, name: bytes, ctx: pyfuse3.RequestContext) -> pyfuse3.EntryAttributes:
        n = os.fsdecode(name)
        if n == ".":
            return await self.getattr(parent_inode, ctx)
        if n == "..":
            return await self.getattr(self.inodes.parent_of(parent_inode), ctx)
        if parent_inode == ROOT:
            if n not in self.view.views:
                raise FUSEError(errno.ENOENT)
            return self._entry(ROOT, n, self.view.lstat(n))
        if n == CONTROL_NAME and self.control is not None \
                and self.inodes.parent_of(parent_inode) == ROOT:
            ino = self.inodes.ensure(parent_inode, n)
            self._control_inodes.add(ino)
            self.inodes.ref(ino)
            return self._control_attrs(ino)
        vpath = join(self.inodes.path(parent_inode), n)
        return self._entry(parent_inode, n, self.view.lstat(vpath))

    def _control_attrs(self, ino: int) -> pyfuse3.EntryAttributes:
        a = self._attrs(ino, self._root_st)
        a.st_mode = stat.S_IFREG | 0o600
        a.st_nlink = 1
        a.st_size = 0
        a.st_blocks = 0
        a.st_uid = a.st_gid = 0
        a.attr_timeout = a.entry_timeout = 0
        return a

    @_boundary
    async def getattr(self, inode: int, ctx: pyfuse3.RequestContext) -> pyfuse3.EntryAttributes:
        if inode == ROOT:
            return self._root_attrs()
        if inode in self._control_inodes:
            return self._control_attrs(inode)
        return self._attrs(inode, self._stat(inode))

    async def forget(self, inode_list: list[tuple[int, int]]) -> None:
        for ino, count in inode_list:
            self.inodes.forget(ino, count)
            if not self.inodes.known(ino):
                self._control_inodes.discard(ino)

    @_boundary
    async def setattr(self, inode: int, attr: pyfuse3.EntryAttributes, fields: pyfuse3.SetattrFields,
                      fh: int | None, ctx: pyfuse3.RequestContext) -> pyfuse3.EntryAttributes:
        if inode == ROOT:
            raise FUSEError(errno.EPERM)
        handle = self.handles.get(fh) if fh is not None else None
        try:
            vpath = self.inodes.path(inode)
            self.changes.changing(vpath)
            store, rel, _ = self.view.locate(vpath)
        except FileNotFoundError:
            fd = handle.fd if handle is not None else self._open_fd_of(inode)
            if fd is None:
                raise
            self._setattr_fd(fd, attr, fields)  # unlinked but still open
            st = os.fstat(fd)
            if fields.update_size:
                self.changes.resized((st.st_dev, st.st_ino), attr.st_size)
            return self._attrs(inode, st)
        if fields.update_size:
            if handle is not None:
                os.ftruncate(handle.fd, attr.st_size)
            else:
                store.truncate(rel, attr.st_size)
            if self.changes.following:
                if handle is not None:
                    self.changes.resized(handle.backing, attr.st_size)
                else:
                    st = store.lstat(rel)
                    self.changes.resized((st.st_dev, st.st_ino), attr.st_size)
        if fields.update_mode:
            store.chmod(rel, stat.S_IMODE(attr.st_mode))
        if fields.update_uid or fields.update_gid:
            store.chown(rel, attr.st_uid if fields.update_uid else -1,
                        attr.st_gid if fields.update_gid else -1)
        if fields.update_atime or fields.update_mtime:
            store.utime(rel, attr.st_atime_ns if fields.update_atime else None,
                        attr.st_mtime_ns if fields.update_mtime else None)
        return self._attrs(inode, store.lstat(rel))

    @staticmethod
    def _setattr_fd(fd: int, attr: pyfuse3.EntryAttributes, fields: pyfuse3.SetattrFields) -> None:
        if fields.update_size:
            os.ftruncate(fd, attr.st_size)
        if fields.update_mode:
            os.fchmod(fd, stat.S_IMODE(attr.st_mode))
        if fields.update_uid or fields.update_gid:
            os.fchown(fd, attr.st_uid if fields.update_uid else -1,
                      attr.st_gid if fields.update_gid else -1)
        if fields.update_atime or fields.update_mtime:
            st = os.fstat(fd)
            os.utime(fd, ns=(attr.st_atime_ns if fields.update_atime else st.st_atime_ns,
                             attr.st_mtime_ns if fields.update_mtime else st.st_mtime_ns))

    @_boundary
    async def readlink(self, inode: int, ctx: pyfuse3.RequestContext) -> bytes:
        store, rel, _ = self.view.locate(self.inodes.path(inode))
        return os.fsencode(store.readlink(rel))

    # -- namespace changes --------------------------------------------------------
    @_boundary
    async def mknod(self, parent_inode: int, name: bytes, mode: int, rdev: int,
                    ctx: pyfuse3.RequestContext) -> pyfuse3.EntryAttributes:
        vpath, n = self._vpath(parent_inode, name)
        self.changes.changing(vpath)
        p = self.view.plain_place(vpath)
        store, rest = self.view.backing.get(p.store), p.rel
        store.mknod(rest, mode & ~ctx.umask, rdev)
        self._own(vpath.rpartition('/')[0], ctx, lambda u, g: store.chown(rest, u, g))
        return self._entry(parent_inode, n, store.lstat(rest))

    @_boundary
    async def mkdir(self, parent_inode: int, name: bytes, mode: int,
                    ctx: pyfuse3.RequestContext) -> pyfuse3.EntryAttributes:
        vpath, n = self._vpath(parent_inode, name)
        self.changes.changing(vpath)
        p = self.view.mkdir(vpath, (mode & ~ctx.umask) & 0o7777)
        store = self.view.backing.get(p.store)
        self._own(vpath.rpartition('/')[0], ctx, lambda u, g: store.chown(p.rel, u, g))
        return self._entry(parent_inode, n, store.lstat(p.rel))

    @_boundary
    async def symlink(self, parent_inode: int, name: bytes, target: bytes,
                      ctx: pyfuse3.RequestContext) -> pyfuse3.EntryAttributes:
        vpath, n = self._vpath(parent_inode, name)
        self.changes.changing(vpath)
        p = self.view.plain_place(vpath)
        store, rest = self.view.backing.get(p.store), p.rel
        store.symlink(os.fsdecode(target), rest)
        self._own(vpath.rpartition('/')[0], ctx, lambda u, g: store.chown(rest, u, g))
        return self._entry(parent_inode, n, store.lstat(rest))

    @_boundary
    async def unlink(self, parent_inode: int, name: bytes, ctx: pyfuse3.RequestContext) -> None:
        vpath, n = self._vpath(parent_inode, name)
        self.changes.changing(vpath)
        self.view.unlink(vpath)
        self.inodes.detach(parent_inode, n)

    @_boundary
    async def rmdir(self, parent_inode: int, name: bytes, ctx: pyfuse3.RequestContext) -> None:
        vpath, n = self._vpath(parent_inode, name)
        self.changes.changing(vpath)
        self.view.rmdir(vpath)
        self.inodes.detach(parent_inode, n)

    @_boundary
    async def rename(self, parent_inode_old: int, name_old: bytes, parent_inode_new: int,
                     name_new: bytes, flags: int, ctx: pyfuse3.RequestContext) -> None:
        if flags & pyfuse3.RENAME_EXCHANGE:
            raise FUSEError(errno.EINVAL)
        old, n_old = self._vpath(parent_inode_old, name_old)
        new, n_new = self._vpath(parent_inode_new, name_new)
        self.changes.changing(old)
        self.changes.changing(new)
        self.view.rename(old, new, noreplace=bool(flags & pyfuse3.RENAME_NOREPLACE))
        self.inodes.move(parent_inode_old, n_old, parent_inode_new, n_new)

    @_boundary
    async def link(self, inode: int, new_parent_inode: int, new_name: bytes,
                   ctx: pyfuse3.RequestContext) -> pyfuse3.EntryAttributes:
        new, n = self._vpath(new_parent_inode, new_name)
        self.changes.changing(new)
        self.view.link(self.inodes.path(inode), new)
        st = self.view.lstat(new)
        self.inodes.add_name(inode, new_parent_inode, n)
        self.inodes.by_backing[(st.st_dev, st.st_ino)] = inode
        self.inodes.ref(inode)
        return self._attrs(inode, st)

    # -- files --------------------------------------------------------------------
    def _file_info(self, fd: int, ino: int, flags: int, vpath: str) -> pyfuse3.FileInfo:
        writable = (flags & os.O_ACCMODE) != os.O_RDONLY
        if writable:
            self.changes.changing(vpath)
        st = os.fstat(fd)
        if flags & os.O_TRUNC:
            self.changes.resized((st.st_dev, st.st_ino), 0)   # the backing open truncated it
        fi = pyfuse3.FileInfo(fh=self._new_fh(Handle(fd, ino, writable, flags, vpath,
                                                     (st.st_dev, st.st_ino),
                                                     Stream() if writable else None)))
        self.changes.opened(vpath)
        if flags & os.O_DIRECT:
            fi.direct_io = True
        else:
            sig = (st.st_mtime_ns, st.st_size)
            fi.keep_cache = self.inodes.cache_sig.get(ino) == sig
            self.inodes.cache_sig[ino] = sig
        return fi

    @_boundary
    async def open(self, inode: int, flags: int, ctx: pyfuse3.RequestContext) -> pyfuse3.FileInfo:
        if inode in self._control_inodes:
            if (flags & os.O_ACCMODE) != os.O_RDONLY or self.control is None:
                raise FUSEError(errno.EROFS)
            fh = self._next_fh
            self._next_fh += 1
            self._documents[fh] = self.control.document()
            return pyfuse3.FileInfo(fh=fh, direct_io=True)
        try:
            vpath = self.inodes.path(inode)
            store, rel, _ = self.view.locate(vpath)
        except FileNotFoundError:
            old = self._open_fd_of(inode)  # reopened through /proc/self/fd while unlinked
            if old is None:
                raise
            fd = os.open(f"/proc/self/fd/{old}", backing_flags(flags) | os.O_CLOEXEC)
            return self._file_info(fd, inode, flags, "")
        fd = store.open(rel, backing_flags(flags))
        return self._file_info(fd, inode, flags, vpath)

    @_boundary
    async def create(self, parent_inode: int, name: bytes, mode: int, flags: int,
                     ctx: pyfuse3.RequestContext) -> tuple[pyfuse3.FileInfo, pyfuse3.EntryAttributes]:
        vpath, n = self._vpath(parent_inode, name)
        fd, _ = self.view.create(vpath, backing_flags(flags), (mode & ~ctx.umask) & 0o7777)
        try:
            self._own(vpath.rpartition('/')[0], ctx, lambda u, g: os.fchown(fd, u, g))
            entry = self._entry(parent_inode, n, os.fstat(fd))
        except BaseException:
            os.close(fd)
            raise
        return self._file_info(fd, entry.st_ino, flags, vpath), entry

    @_boundary
    async def read(self, fh: int, off: int, size: int) -> bytes:
        handle = self.handles.get(fh)
        if handle is None:
            return self._documents[fh][off:off + size]
        return os.pread(handle.fd, size, off)

    @_boundary
    async def write(self, fh: int, off: int, buf: bytes) -> int:
        handle = self.handles[fh]
        fd = handle.fd
        view = memoryview(buf)
        done = 0
        while done < len(buf):
            done += os.pwrite(fd, view[done:], off + done)
        if handle.stream is not None:
            self.write_behind.wrote(handle.stream, fd, off, done)
        self.changes.wrote(handle.backing, buf, off)
        return done

    @_boundary
    async def flush(self, fh: int) -> None:
        return None

    @_boundary
    async def release(self, fh: int) -> None:
        if self._documents.pop(fh, None) is not None:
            return
        handle = self.handles.pop(fh)
        if handle is None:
            raise FUSEError(errno.EBADF)
        left = self.open_count.get(handle.ino, 1) - 1
        if left:
            self.open_count[handle.ino] = left
        else:
            self.open_count.pop(handle.ino, None)
        if handle.writable and self.inodes.known(handle.ino):
            st = os.fstat(handle.fd)
            self.inodes.cache_sig[handle.ino] = (st.st_mtime_ns, st.st_size)
        os.close(handle.fd)

    @_boundary
    async def fsync(self, fh: int, datasync: bool) -> None:
        (os.fdatasync if datasync else os.fsync)(self.handles[fh].fd)

    # -- directories ----------------------------------------------------------------
    @_boundary
    async def opendir(self, inode: int, ctx: pyfuse3.RequestContext) -> int:
        if inode == ROOT:
            names = list(self.view.views)
        else:
            names = self.view.listdir(self.inodes.path(inode))
        fh = self._next_fh
        self._next_fh += 1
        self.dirs[fh] = (inode, names)
        return fh

    @_boundary
    async def readdir(self, fh: int, start_id: int, token: pyfuse3.ReaddirToken) -> None:
        inode, names = self.dirs[fh]
        base = self.inodes.path(inode)
        for i in range(start_id, len(names)):
            name = names[i]
            try:
                st = self.view.lstat(join(base, name))
            except (FileNotFoundError, NotADirectoryError):
                continue  # gone since opendir
            ino = self._ino_for(inode, name, st)
            if not pyfuse3.readdir_reply(token, os.fsencode(name), self._attrs(ino, st), i + 1):
                self.inodes.drop_unreferenced(ino)
                return
            self.inodes.ref(ino)

    @_boundary
    async def releasedir(self, fh: int) -> None:
        self.dirs.pop(fh, None)

    @_boundary
    async def fsyncdir(self, fh: int, datasync: bool) -> None:
        inode, _ = self.dirs[fh]
        if inode == ROOT:
            return
        store, rel, _ = self.view.locate(self.inodes.path(inode))
        fd = store.open_dir(rel)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)

    @_boundary
    async def statfs(self, ctx: pyfuse3.RequestContext) -> pyfuse3.StatvfsData:
        vfs = self.view.backing.get(self.view.views[0]).statvfs()
        out = pyfuse3.StatvfsData()
        for field in ("f_bsize", "f_frsize", "f_blocks", "f_bfree", "f_bavail", "f_files",
                      "f_ffree", "f_favail", "f_namemax"):
            setattr(out, field, getattr(vfs, field))
        return out

    # -- extended attributes (passed through, never following a symbolic link) -------
    # The kernel asks for security.capability before every write, so getxattr
    # is a hot path: one l*xattr call on the name inside its (already open)
    # parent directory, without opening the file itself.
    def _xattr_path(self, inode: int) -> tuple[Any, str]:
        if inode == ROOT:
            raise FUSEError(errno.ENODATA)
        store, rel, _ = self.view.locate(self.inodes.path(inode))
        return store.parent(rel), rel

    def _control_call(self, call: Callable[..., Any], *args: Any) -> Any:
        try:
            return call(*args)
        except ControlError as exc:
            raise FUSEError(exc.errno) from None

    @_boundary
    async def getxattr(self, inode: int, name: bytes, ctx: pyfuse3.RequestContext) -> bytes:
        if inode in self._control_inodes and self.control is not None:
            return self._control_call(self.control.get, os.fsdecode(name))
        parent, rel = self._xattr_path(inode)
        with parent as (fd, leaf):
            return _xattr(os.getxattr, fd, leaf, name)

    @_boundary
    async def listxattr(self, inode: int, ctx: pyfuse3.RequestContext) -> list[bytes]:
        if inode in self._control_inodes and self.control is not None:
            return self.control.names()
        parent, rel = self._xattr_path(inode)
        with parent as (fd, leaf):
            return [os.fsencode(n) for n in _xattr(os.listxattr, fd, leaf)]

    @_boundary
    async def setxattr(self, inode: int, name: bytes, value: bytes, ctx: pyfuse3.RequestContext) -> None:
        if inode in self._control_inodes and self.control is not None:
            return self._control_call(self.control.set, os.fsdecode(name), value)
        self.changes.changing(self.inodes.path(inode))
        parent, rel = self._xattr_path(inode)
        with parent as (fd, leaf):
            _xattr(os.setxattr, fd, leaf, name, value)

    @_boundary
    async def removexattr(self, inode: int, name: bytes, ctx: pyfuse3.RequestContext) -> None:
        if inode in self._control_inodes:
            raise FUSEError(errno.EROFS)
        self.changes.changing(self.inodes.path(inode))
        parent, rel = self._xattr_path(inode)
        with parent as (fd, leaf):
            _xattr(os.removexattr, fd, leaf, name)

    def close_all(self) -> None:
        """Close every open backing fd (at shutdown), after the write-behind worker."""
        self.write_behind.close()
        self.handles.close_all()


def _xattr(call: Callable[..., Any], dir_fd: int, name: str, *args: Any) -> Any:
    """An os.*xattr *call* on *name* inside the open directory *dir_fd*, not
    following a symbolic link; on the directory itself when *name* is empty.
    The l*xattr calls take no directory fd, so the name is reached through
    /proc/self/fd, which does not look the directory up again."""
    if not name:
        return call(dir_fd, *args)
    return call(f"/proc/self/fd/{dir_fd}/{name}", *args, follow_symlinks=False)
