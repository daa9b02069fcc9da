"""What the views answer about a file's attributes, apart from the handlers.

A view's attributes are the backing file's (``stat``), under compatfs' own
inode number; its extended attributes are the backing file's, passed through
without following a symbolic link. Setting attributes on a file that is
unlinked but still open goes through its open descriptor. These are the
pieces of :class:`compatfs.operations.Operations` that need no state of
their own, kept here so that the handlers read as the requests they answer.

Every entry and attribute is cached by the kernel for the daemon's timeout;
a failed lookup is not (``ENOENT``, never an entry with inode 0): why, and
how the kernel learns what the daemon changes by itself, is
:mod:`compatfs.kernelcache`'s.

Every function is on a hot path (``getattr``, ``lookup``, ``readdir`` build
attributes; the kernel asks ``getxattr security.capability`` before every
write): no I/O beyond the one call each needs.
"""

from __future__ import annotations

import os
import stat
from collections.abc import Callable
from typing import Any

import pyfuse3


def entry_attributes(ino: int, st: os.stat_result, timeout: float) -> pyfuse3.EntryAttributes:
    """The attributes of *st* under inode *ino*, cached by the kernel for *timeout* s."""
    a = pyfuse3.EntryAttributes()
    a.st_ino = ino
    a.generation = 0
    a.entry_timeout = timeout
    a.attr_timeout = timeout
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


def root_attributes(root_st: os.stat_result, views: int, timeout: float) -> pyfuse3.EntryAttributes:
    """The mount's root, which holds only its *views* (reached through their binds)."""
    a = entry_attributes(pyfuse3.ROOT_INODE, root_st, timeout)
    a.st_mode = stat.S_IFDIR | 0o700
    a.st_nlink = 2 + views
    return a


def control_attributes(ino: int, root_st: os.stat_result) -> pyfuse3.EntryAttributes:
    """A view's hidden control file: root's, empty, never cached (its content is the
    daemon's state at each read)."""
    a = entry_attributes(ino, root_st, 0)
    a.st_mode = stat.S_IFREG | 0o600
    a.st_nlink = 1
    a.st_size = 0
    a.st_blocks = 0
    a.st_uid = a.st_gid = 0
    return a


def setattr_fd(fd: int, attr: pyfuse3.EntryAttributes, fields: pyfuse3.SetattrFields) -> None:
    """``setattr`` on an open descriptor (a file whose last name is gone)."""
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


def xattr_at(call: Callable[..., Any], dir_fd: int, name: str, *args: Any) -> Any:
    """An os.*xattr *call* on *name* inside the open directory *dir_fd*, not
    following a symbolic link; on the directory itself when *name* is empty.
    The l*xattr calls take no directory fd, so the name is reached through
    /proc/self/fd, which does not look the directory up again."""
    if not name:
        return call(dir_fd, *args)
    return call(f"/proc/self/fd/{dir_fd}/{name}", *args, follow_symlinks=False)
