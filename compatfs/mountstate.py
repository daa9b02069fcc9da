"""What one mount's FUSE handlers share between requests, and how they look it up.

The handlers (:mod:`compatfs.operations`) answer requests; what they answer
from lives here: the view, the inode table and the kernel's references,
the open file handles (a :class:`compatfs.handles.HandleTable` the migration
is given too) and directory listings, the view's control files, the boundary's
fault and latency counters, and the few steps every handler takes on them
(the path of an inode, the attributes of an entry, a handle by its number,
an open file registered). It answers no request itself.

A subclass that serves the same names without changing them (``debug-mount``)
sets :attr:`MountState.read_only`: every handler that would change something
checks it first and answers ``EROFS``. It may add extended attributes of its
own around :meth:`MountState.backing_getxattr` and
:meth:`MountState.backing_listxattr`, what the views answer for a name.

Every method is on a request's path: no I/O beyond what the request needs.
"""

from __future__ import annotations

import errno
import os
import stat
from collections.abc import Callable

import pyfuse3
from pyfuse3 import FUSEError

from .attributes import entry_attributes, root_attributes, xattr_at
from .boundary import BadHandle
from .changes import NO_CHANGES, ChangeObserver
from .control import CONTROL_NAME, Control
from .controlfile import ControlFile
from .handles import Handle, HandleTable
from .inodes import ROOT, InodeTable
from .latency import LatencyHistogram
from .listing import Listing
from .placement import join
from .stores import Store
from .view import View
from .writebehind import Stream, WriteBehind


class MountState(pyfuse3.Operations):
    """What the handlers of one mount share; :class:`compatfs.operations.Operations` adds them."""

    #: whether every change is refused with EROFS (the inspection view)
    read_only = False

    def __init__(self, view: View, timeout: float = 10.0, *, handles: HandleTable | None = None,
                 changes: ChangeObserver = NO_CHANGES, control: Control | None = None) -> None:
        super().__init__()
        self.view = view
        self.inodes = InodeTable()
        self.timeout = timeout
        #: every open file; the migration is given this table to switch handles
        self.handles = handles if handles is not None else HandleTable()
        self.open_count: dict[int, int] = {}
        #: open directory handles: the inode listed and its names, snapshot at opendir
        self.dirs: dict[int, tuple[int, Listing]] = {}
        self._next_fh = 1
        #: unexpected errors answered with EIO, and the time per request (the boundary's)
        self.faults = 0
        self.latency = LatencyHistogram()
        self.write_behind = WriteBehind()
        #: told of every change an agent makes, for a copy under way to follow
        self.changes = changes
        #: the control interface behind each view's hidden .compatfs file
        self.control_file = ControlFile(control)
        self._control_inodes = self.control_file.inodes
        self._root_st = view.backing.get(view.views[0]).lstat("")

    # -- helpers ------------------------------------------------------------------
    def _root_attrs(self) -> pyfuse3.EntryAttributes:
        return root_attributes(self._root_st, len(self.view.views), self.timeout)

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
        return entry_attributes(ino, st, self.timeout)

    def _open_fd_of(self, ino: int) -> int | None:
        """An open backing fd of *ino*, for a file whose last name is gone."""
        for h in self.handles.values():
            if h.ino == ino:
                return h.fd
        return None

    def _is_control_name(self, parent: int, name: str) -> bool:
        """Whether *name* in *parent* is a view's hidden control file."""
        return name == CONTROL_NAME and self.control_file.served \
            and self.inodes.parent_of(parent) == ROOT

    def _refuse_if_read_only(self) -> None:
        if self.read_only:
            raise FUSEError(errno.EROFS)

    def _vpath(self, parent: int, name: bytes) -> tuple[str, str]:
        """The view path of *name* in *parent*, about to be made or changed."""
        self._refuse_if_read_only()
        n = os.fsdecode(name)
        if parent == ROOT:
            raise FUSEError(errno.EPERM)  # the root only holds the views
        if self._is_control_name(parent, n):
            raise FUSEError(errno.EPERM)  # the control file is not a legacy name
        return join(self.inodes.path(parent), n), n

    def _new_fh(self) -> int:
        fh = self._next_fh
        self._next_fh += 1
        return fh

    def _add_handle(self, handle: Handle) -> int:
        fh = self._new_fh()
        self.handles.add(fh, handle)
        self.open_count[handle.ino] = self.open_count.get(handle.ino, 0) + 1
        return fh

    def _handle(self, fh: int) -> Handle:
        handle = self.handles.get(fh)
        if handle is None:
            raise BadHandle(fh)
        return handle

    def _dir(self, fh: int) -> tuple[int, Listing]:
        listing = self.dirs.get(fh)
        if listing is None:
            raise BadHandle(fh)
        return listing

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

    def _file_info(self, fd: int, ino: int, flags: int, vpath: str) -> pyfuse3.FileInfo:
        writable = (flags & os.O_ACCMODE) != os.O_RDONLY
        if writable:
            self.changes.changing(vpath)
        st = os.fstat(fd)
        if flags & os.O_TRUNC:
            self.changes.resized((st.st_dev, st.st_ino), 0)   # the backing open truncated it
        fi = pyfuse3.FileInfo(fh=self._add_handle(Handle(fd, ino, writable, flags, vpath,
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

    # -- extended attributes (passed through, never following a symbolic link) -------
    # The kernel asks for security.capability before every write, so getxattr
    # is a hot path: one l*xattr call on the name inside its (already open)
    # parent directory, without opening the file itself.
    def _xattr_store(self, inode: int) -> tuple[Store, str]:
        if inode == ROOT:
            raise FUSEError(errno.ENODATA)
        store, rel, _ = self.view.locate(self.inodes.path(inode))
        return store, rel

    def backing_getxattr(self, inode: int, name: bytes) -> bytes:
        """The extended attribute *name* of the file *inode* names in the view."""
        store, rel = self._xattr_store(inode)
        with store.parent(rel) as (fd, leaf):
            value: bytes = xattr_at(os.getxattr, fd, leaf, name)
            return value

    def backing_listxattr(self, inode: int) -> list[bytes]:
        """The extended attribute names of the file *inode* names in the view."""
        store, rel = self._xattr_store(inode)
        with store.parent(rel) as (fd, leaf):
            return [os.fsencode(n) for n in xattr_at(os.listxattr, fd, leaf)]

