"""The FUSE request handlers of the legacy views.

Thin by design: each handler turns a request into calls on
:class:`compatfs.view.View` (which decides where things are) and on open
file descriptors (which carry the bytes). Every request handler is inside
the errno boundary (:mod:`compatfs.boundary`), which alone decides what a
failure answers; what the handlers share between requests (inodes, handles,
listings, the control file) is :class:`compatfs.mountstate.MountState`, the
attributes they build :mod:`compatfs.attributes`'.

Nothing here parses configuration, reads the checkpoint or logs above debug
level on success: every request is a hot path.
"""

from __future__ import annotations

import errno
import os
import stat
from collections.abc import Sequence

import pyfuse3
from pyfuse3 import FUSEError

from .attributes import control_attributes, entry_attributes, setattr_fd, xattr_at
from .boundary import BadHandle, errno_boundary, no_reply_boundary
from .control import CONTROL_NAME
from .handles import backing_flags
from .inodes import BIG_LISTING, ROOT, trim_heap
from .listing import FS_ENCODING, FS_ERRORS, Listing
from .mountstate import MountState
from .placement import join

#: The longest name and path (in bytes, with its terminating NUL) link(2) takes on Linux.
NAME_MAX = 255
PATH_MAX = 4096


class Operations(MountState):
    """pyfuse3 operations over a :class:`View`. The root lists the views."""

    supports_dot_lookup = True
    enable_writeback_cache = False

    # -- lookups and attributes ---------------------------------------------------
    @errno_boundary
    async def lookup(self, parent_inode: int, name: bytes,
                     ctx: pyfuse3.RequestContext) -> pyfuse3.EntryAttributes:
        n = os.fsdecode(name)
        if n == ".":
            return self._dot_entry(parent_inode)
        if n == "..":
            return self._dot_entry(self.inodes.parent_of(parent_inode))
        if parent_inode == ROOT:
            if n not in self.view.views:
                raise FUSEError(errno.ENOENT)
            return self._entry(ROOT, n, self.view.lstat(n))
        if n == CONTROL_NAME and self._is_control_name(parent_inode, n):   # compared first: cheap
            ino = self.inodes.ensure(parent_inode, n)
            self._control_inodes.add(ino)
            self.inodes.ref(ino)
            return control_attributes(ino, self._root_st)
        vpath = join(self.inodes.path(parent_inode), n)
        return self._entry(parent_inode, n, self.view.lstat(vpath))

    def _dot_entry(self, ino: int) -> pyfuse3.EntryAttributes:
        """A lookup of ``.`` or ``..``: a lookup like any other, which the kernel
        will forget like any other, so it takes a reference (the root, which
        is never forgotten, takes none)."""
        if ino == ROOT:
            return self._root_attrs()
        attrs = entry_attributes(ino, self._stat(ino), self.timeout)
        self.inodes.ref(ino)
        return attrs

    @errno_boundary
    async def getattr(self, inode: int, ctx: pyfuse3.RequestContext) -> pyfuse3.EntryAttributes:
        if inode == ROOT:
            return self._root_attrs()
        if inode in self._control_inodes:
            return control_attributes(inode, self._root_st)
        return entry_attributes(inode, self._stat(inode), self.timeout)

    @no_reply_boundary
    async def forget(self, inode_list: Sequence[tuple[int, int]]) -> None:
        for ino, count in inode_list:
            self.inodes.forget(ino, count)
            if not self.inodes.known(ino):
                self._control_inodes.discard(ino)

    @errno_boundary
    async def setattr(self, inode: int, attr: pyfuse3.EntryAttributes,
                      fields: pyfuse3.SetattrFields, fh: int | None,
                      ctx: pyfuse3.RequestContext) -> pyfuse3.EntryAttributes:
        self._refuse_if_read_only()
        if inode == ROOT:
            raise FUSEError(errno.EPERM)
        handle = self._handle(fh) if fh is not None else None
        try:
            vpath = self.inodes.path(inode)
            self.changes.changing(vpath)
            store, rel, _ = self.view.locate(vpath)
        except FileNotFoundError:
            fd = handle.fd if handle is not None else self._open_fd_of(inode)
            if fd is None:
                raise
            setattr_fd(fd, attr, fields)  # unlinked but still open
            st = os.fstat(fd)
            if fields.update_size:
                self.changes.resized((st.st_dev, st.st_ino), attr.st_size)
            return entry_attributes(inode, st, self.timeout)
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
        return entry_attributes(inode, store.lstat(rel), self.timeout)

    @errno_boundary
    async def readlink(self, inode: int, ctx: pyfuse3.RequestContext) -> bytes:
        store, rel, _ = self.view.locate(self.inodes.path(inode))
        return os.fsencode(store.readlink(rel))

    # -- namespace changes --------------------------------------------------------
    @errno_boundary
    async def mknod(self, parent_inode: int, name: bytes, mode: int, rdev: int,
                    ctx: pyfuse3.RequestContext) -> pyfuse3.EntryAttributes:
        vpath, n = self._vpath(parent_inode, name)
        self.changes.changing(vpath)
        p = self.view.plain_place(vpath)
        store, rest = self.view.backing.get(p.store), p.rel
        store.mknod(rest, mode & ~ctx.umask, rdev)
        self._own(vpath.rpartition('/')[0], ctx, lambda u, g: store.chown(rest, u, g))
        return self._entry(parent_inode, n, store.lstat(rest))

    @errno_boundary
    async def mkdir(self, parent_inode: int, name: bytes, mode: int,
                    ctx: pyfuse3.RequestContext) -> pyfuse3.EntryAttributes:
        vpath, n = self._vpath(parent_inode, name)
        self.changes.changing(vpath)
        p = self.view.mkdir(vpath, (mode & ~ctx.umask) & 0o7777)
        store = self.view.backing.get(p.store)
        self._own(vpath.rpartition('/')[0], ctx, lambda u, g: store.chown(p.rel, u, g))
        return self._entry(parent_inode, n, store.lstat(p.rel))

    @errno_boundary
    async def symlink(self, parent_inode: int, name: bytes, target: bytes,
                      ctx: pyfuse3.RequestContext) -> pyfuse3.EntryAttributes:
        vpath, n = self._vpath(parent_inode, name)
        self.changes.changing(vpath)
        p = self.view.plain_place(vpath)
        store, rest = self.view.backing.get(p.store), p.rel
        store.symlink(os.fsdecode(target), rest)
        self._own(vpath.rpartition('/')[0], ctx, lambda u, g: store.chown(rest, u, g))
        return self._entry(parent_inode, n, store.lstat(rest))

    @errno_boundary
    async def unlink(self, parent_inode: int, name: bytes, ctx: pyfuse3.RequestContext) -> None:
        vpath, n = self._vpath(parent_inode, name)
        self.changes.changing(vpath)
        self.view.unlink(vpath)
        self.inodes.detach(parent_inode, n)

    @errno_boundary
    async def rmdir(self, parent_inode: int, name: bytes, ctx: pyfuse3.RequestContext) -> None:
        vpath, n = self._vpath(parent_inode, name)
        self.changes.changing(vpath)
        self.view.rmdir(vpath)
        self.inodes.detach(parent_inode, n)

    @errno_boundary
    async def rename(self, parent_inode_old: int, name_old: bytes, parent_inode_new: int,
                     name_new: bytes, flags: int, ctx: pyfuse3.RequestContext) -> None:
        self._refuse_if_read_only()
        if flags & pyfuse3.RENAME_EXCHANGE:
            raise FUSEError(errno.EINVAL)
        old, n_old = self._vpath(parent_inode_old, name_old)
        new, n_new = self._vpath(parent_inode_new, name_new)
        self.changes.changing(old)
        self.changes.changing(new)
        self.view.rename(old, new, noreplace=bool(flags & pyfuse3.RENAME_NOREPLACE))
        self.inodes.move(parent_inode_old, n_old, parent_inode_new, n_new)

    @errno_boundary
    async def link(self, inode: int, new_parent_inode: int, new_name: bytes,
                   ctx: pyfuse3.RequestContext) -> pyfuse3.EntryAttributes:
        # in link(2)'s order: the source (ENOENT), then the new name (ENAMETOOLONG)
        old = self.inodes.path(inode)
        new, n = self._vpath(new_parent_inode, new_name)
        if len(new_name) > NAME_MAX or len(os.fsencode(new)) >= PATH_MAX:
            raise FUSEError(errno.ENAMETOOLONG)
        self.changes.changing(new)
        try:
            self.view.link(old, new)
        except OSError as exc:
            if exc.errno == errno.EXDEV:
                self.view.lstat(old)   # a source that is gone is ENOENT, not EXDEV
            raise
        st = self.view.lstat(new)
        self.inodes.add_name(inode, new_parent_inode, n)
        self.inodes.by_backing[(st.st_dev, st.st_ino)] = inode
        self.inodes.ref(inode)
        return entry_attributes(inode, st, self.timeout)

    # -- files --------------------------------------------------------------------
    @errno_boundary
    async def open(self, inode: int, flags: int, ctx: pyfuse3.RequestContext) -> pyfuse3.FileInfo:
        if self.read_only and ((flags & os.O_ACCMODE) != os.O_RDONLY or flags & os.O_TRUNC):
            raise FUSEError(errno.EROFS)
        if inode in self._control_inodes:
            return self.control_file.open(self._new_fh(), flags)
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

    @errno_boundary
    async def create(self, parent_inode: int, name: bytes, mode: int, flags: int,
                     ctx: pyfuse3.RequestContext,
                     ) -> tuple[pyfuse3.FileInfo, pyfuse3.EntryAttributes]:
        vpath, n = self._vpath(parent_inode, name)
        fd, _ = self.view.create(vpath, backing_flags(flags), (mode & ~ctx.umask) & 0o7777)
        try:
            self._own(vpath.rpartition('/')[0], ctx, lambda u, g: os.fchown(fd, u, g))
            entry = self._entry(parent_inode, n, os.fstat(fd))
        except BaseException:
            os.close(fd)
            raise
        return self._file_info(fd, entry.st_ino, flags, vpath), entry

    @errno_boundary
    async def read(self, fh: int, off: int, size: int) -> bytes:
        handle = self.handles.get(fh)
        if handle is None:
            return self.control_file.read(fh, off, size)
        return os.pread(handle.fd, size, off)

    @errno_boundary
    async def write(self, fh: int, off: int, buf: bytes) -> int:
        handle = self.handles.get(fh)
        if handle is None:
            raise BadHandle(fh)
        fd = handle.fd
        view = memoryview(buf)
        done = 0
        while done < len(buf):
            done += os.pwrite(fd, view[done:], off + done)
        if handle.stream is not None:
            self.write_behind.wrote(handle.stream, fd, off, done)
        self.changes.wrote(handle.backing, buf, off)
        return done

    @errno_boundary
    async def flush(self, fh: int) -> None:
        # Nothing is buffered here (a write reaches the backing file before it
        # is answered), so a close has nothing to flush: ENOSYS tells the
        # kernel to stop sending FLUSH on this connection, one request less
        # per close(2).
        raise FUSEError(errno.ENOSYS)

    @errno_boundary
    async def release(self, fh: int) -> None:
        if self.control_file.release(fh):
            return
        handle = self.handles.pop(fh, None)
        if handle is None:
            raise BadHandle(fh)
        left = self.open_count.get(handle.ino, 1) - 1
        if left:
            self.open_count[handle.ino] = left
        else:
            self.open_count.pop(handle.ino, None)
        if handle.writable and self.inodes.known(handle.ino):
            st = os.fstat(handle.fd)
            self.inodes.cache_sig[handle.ino] = (st.st_mtime_ns, st.st_size)
        os.close(handle.fd)

    @errno_boundary
    async def fsync(self, fh: int, datasync: bool) -> None:
        (os.fdatasync if datasync else os.fsync)(self._handle(fh).fd)

    # -- directories ----------------------------------------------------------------
    @errno_boundary
    async def opendir(self, inode: int, ctx: pyfuse3.RequestContext) -> int:
        if inode == ROOT:
            names = Listing(self.view.views)
        else:
            names = Listing(self.view.iter_names(self.inodes.path(inode)))
        fh = self._new_fh()
        self.dirs[fh] = (inode, names)
        return fh

    @errno_boundary
    async def readdir(self, fh: int, start_id: int, token: pyfuse3.ReaddirToken) -> None:
        listing = self.dirs.get(fh)
        if listing is None:
            raise BadHandle(fh)
        inode, names = listing
        if inode == ROOT:
            return self._readdir_located("", inode, names, start_id, token)
        base = self.inodes.path(inode)
        # Every name without a record of its own is in one backing directory:
        # stat it there by name (one syscall), and locate only the others.
        store, rel = self.view.names_beneath(base)
        placed = self.view.index.children.get(base, ())
        timeout, lstat, ino_for, reply = self.timeout, self.view.lstat, self._ino_for, \
            pyfuse3.readdir_reply
        try:
            fd = store.open_dir(rel)
        except (FileNotFoundError, NotADirectoryError):
            # the backing directory went since opendir: its names are gone too,
            # those with a record of their own may not be
            return self._readdir_located(base, inode, names, start_id, token)
        try:
            for i in range(start_id, len(names)):
                raw = names.raw(i)
                name = raw.decode(FS_ENCODING, FS_ERRORS)
                try:
                    if name in placed:
                        st = lstat(join(base, name))
                    else:
                        st = os.stat(raw, dir_fd=fd, follow_symlinks=False)
                except (FileNotFoundError, NotADirectoryError):
                    continue  # gone since opendir
                ino = ino_for(inode, name, st)
                if not reply(token, raw, entry_attributes(ino, st, timeout), i + 1):
                    self.inodes.drop_unreferenced(ino)
                    return
                self.inodes.ref(ino)
        finally:
            os.close(fd)

    def _readdir_located(self, base: str, inode: int, names: Listing, start_id: int,
                         token: pyfuse3.ReaddirToken) -> None:
        """readdir locating every name on its own (the root, whose names are the views)."""
        for i in range(start_id, len(names)):
            name = names[i]
            try:
                st = self.view.lstat(join(base, name))
            except (FileNotFoundError, NotADirectoryError):
                continue
            ino = self._ino_for(inode, name, st)
            attrs = entry_attributes(ino, st, self.timeout)
            if not pyfuse3.readdir_reply(token, names.raw(i), attrs, i + 1):
                self.inodes.drop_unreferenced(ino)
                return
            self.inodes.ref(ino)

    @errno_boundary
    async def releasedir(self, fh: int) -> None:
        listing = self.dirs.pop(fh, None)
        if listing is None:
            raise BadHandle(fh)
        if len(listing[1]) >= BIG_LISTING:
            del listing   # its names die here
            trim_heap()

    @errno_boundary
    async def fsyncdir(self, fh: int, datasync: bool) -> None:
        inode, _ = self._dir(fh)
        if inode == ROOT:
            return
        store, rel, _ = self.view.locate(self.inodes.path(inode))
        fd = store.open_dir(rel)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)

    @errno_boundary
    async def statfs(self, ctx: pyfuse3.RequestContext) -> pyfuse3.StatvfsData:
        vfs = self.view.backing.get(self.view.views[0]).statvfs()
        out = pyfuse3.StatvfsData()
        for field in ("f_bsize", "f_frsize", "f_blocks", "f_bfree", "f_bavail", "f_files",
                      "f_ffree", "f_favail", "f_namemax"):
            setattr(out, field, getattr(vfs, field))
        return out

    # -- extended attributes (the backing file's, see MountState.backing_getxattr) --
    @errno_boundary
    async def getxattr(self, inode: int, name: bytes, ctx: pyfuse3.RequestContext) -> bytes:
        if inode in self._control_inodes:
            return self.control_file.getxattr(name)
        return self.backing_getxattr(inode, name)

    @errno_boundary
    async def listxattr(self, inode: int, ctx: pyfuse3.RequestContext) -> list[bytes]:
        if inode in self._control_inodes:
            return self.control_file.listxattr()
        return self.backing_listxattr(inode)

    @errno_boundary
    async def setxattr(self, inode: int, name: bytes, value: bytes,
                       ctx: pyfuse3.RequestContext) -> None:
        self._refuse_if_read_only()
        if inode in self._control_inodes:
            return self.control_file.setxattr(name, value)
        self.changes.changing(self.inodes.path(inode))
        store, rel = self._xattr_store(inode)
        with store.parent(rel) as (fd, leaf):
            xattr_at(os.setxattr, fd, leaf, name, value)

    @errno_boundary
    async def removexattr(self, inode: int, name: bytes, ctx: pyfuse3.RequestContext) -> None:
        self._refuse_if_read_only()
        if inode in self._control_inodes:
            raise FUSEError(errno.EROFS)
        self.changes.changing(self.inodes.path(inode))
        store, rel = self._xattr_store(inode)
        with store.parent(rel) as (fd, leaf):
            xattr_at(os.removexattr, fd, leaf, name)

    def close_all(self) -> None:
        """Close every open backing fd (at shutdown), after the write-behind worker."""
        self.write_behind.close()
        self.handles.close_all()
