"""What a copy carries besides data, and whole trees: mode, owner, xattrs, times.

Everything here is blocking and meant to run in a worker thread. A copied
file is finished (:func:`finish_file`: owner, mode, capabilities, times,
fsync) after its data (:mod:`compatfs.filecopy`) and xattrs are in place;
trees (container volumes) are copied with :func:`copy_tree`.

Trees are walked with directory fds only: every component is opened
relative to its parent with ``O_NOFOLLOW``; no path is spelt from a root
and no symbolic link is ever followed.
"""

from __future__ import annotations

import errno
import logging
import os
import stat
import threading
from collections.abc import Callable

from .filecopy import DEFAULT_CHUNK, CopyResult, Mover
from .throttle import Throttle

log = logging.getLogger(__name__)

#: setxattr errors that mean "the destination does not take this attribute": skip it.
_XATTR_REFUSED = frozenset({errno.ENOTSUP, errno.EOPNOTSUPP, errno.EPERM})
#: getxattr/listxattr errors that mean "nothing to read here".
_XATTR_UNREADABLE = frozenset({errno.ENOTSUP, errno.EOPNOTSUPP, errno.ENODATA, errno.EPERM,
                               errno.EACCES})
#: Prefixes of attributes that describe fscrypt state, never copied.
_SKIPPED_XATTR_PREFIXES = ("encryption.",)
_CAPABILITY = "security.capability"


def _get_xattr(target: int | str, name: str, follow_symlinks: bool = True) -> bytes | None:
    """The value of xattr *name* of *target*, or None when there is none to read."""
    try:
        return os.getxattr(target, name, follow_symlinks=follow_symlinks)
    except OSError as exc:
        if exc.errno in _XATTR_UNREADABLE:
            return None
        raise


def finish_file(dst_fd: int, st: os.stat_result) -> None:
    """Give dst the mode, owner and times of *st*, then fsync it.

    Ownership is set before the mode, since chown(2) clears setuid/setgid; a
    ``security.capability`` already on dst (chown clears it too) is put back.
    Call it after the data and xattrs are in place: writing data clears them.
    """
    caps = _get_xattr(dst_fd, _CAPABILITY)
    os.fchown(dst_fd, st.st_uid, st.st_gid)
    os.fchmod(dst_fd, stat.S_IMODE(st.st_mode))
    if caps is not None and _get_xattr(dst_fd, _CAPABILITY) != caps:
        os.setxattr(dst_fd, _CAPABILITY, caps)
    os.utime(dst_fd, ns=(st.st_atime_ns, st.st_mtime_ns))
    os.fsync(dst_fd)


def copy_xattrs(src: int | str, dst: int | str, *, follow_symlinks: bool = True) -> None:
    """Copy every extended attribute src has and dst accepts.

    Attributes dst refuses (``ENOTSUP``/``EOPNOTSUPP``/``EPERM``: a namespace
    the filesystem or the file type does not take, such as ``user.*`` on a
    symbolic link) are skipped one by one, as are fscrypt's ``encryption.*``;
    the kernel does not list the encryption context itself. Other errors
    (``ENOSPC``, ``EIO``) are raised.
    """
    try:
        names = os.listxattr(src, follow_symlinks=follow_symlinks)
    except OSError as exc:
        if exc.errno in (errno.ENOTSUP, errno.EOPNOTSUPP):
            return
        raise
    for name in names:
        if name.startswith(_SKIPPED_XATTR_PREFIXES):
            continue
        value = _get_xattr(src, name, follow_symlinks)
        if value is None:
            continue
        try:
            os.setxattr(dst, name, value, follow_symlinks=follow_symlinks)
        except OSError as exc:
            if exc.errno not in _XATTR_REFUSED:
                raise
            log.debug("xattr %s not copied: %s", name, exc)


def fsync_dir(dir_fd: int) -> None:
    """Make the entries of the directory *dir_fd* durable."""
    try:
        os.fsync(dir_fd)
    except OSError as exc:
        if exc.errno != errno.EINVAL:   # a filesystem that cannot fsync directories
            raise


def same_file(st_a: os.stat_result, st_b: os.stat_result) -> bool:
    """True when both stats describe the same, unchanged file (device, inode, size, mtime)."""
    return ((st_a.st_dev, st_a.st_ino, st_a.st_size, st_a.st_mtime_ns)
            == (st_b.st_dev, st_b.st_ino, st_b.st_size, st_b.st_mtime_ns))


# -- trees ------------------------------------------------------------------------------

_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
_O_NOATIME = getattr(os, "O_NOATIME", 0)


def _open_dir(name: str, dir_fd: int) -> int:
    """Open the directory *name* in *dir_fd*; a symbolic link there is refused (ENOTDIR)."""
    return os.open(name, _DIR_FLAGS, dir_fd=dir_fd)


def _open_source(name: str, dir_fd: int, flags: int) -> int:
    """Open *name* in *dir_fd* with *flags* (no link followed), without touching its atime."""
    flags |= os.O_NOFOLLOW | os.O_CLOEXEC
    if _O_NOATIME:
        try:
            return os.open(name, flags | _O_NOATIME, dir_fd=dir_fd)
        except PermissionError:
            pass                      # O_NOATIME needs ownership or CAP_FOWNER
    return os.open(name, flags, dir_fd=dir_fd)


def _changed(name: str) -> OSError:
    """The error for a source entry that was replaced between two looks at it."""
    return OSError(errno.ESTALE, "changed while being copied", name)


class _TreeCopy:
    """One copy_tree call: the mover, the hard links seen, the totals."""

    def __init__(self, mover: Mover, dst_root_fd: int) -> None:
        self.mover = mover
        self.dst_root_fd = dst_root_fd
        self.links: dict[tuple[int, int], tuple[str, ...]] = {}
        self.size = 0

    def _link(self, first: tuple[str, ...], dst_fd: int, here: tuple[str, ...], name: str) -> None:
        """Hard-link dst's copy at *first* (components below the root) as *name*."""
        *parents, last = first
        if tuple(parents) == here:
            os.link(last, name, src_dir_fd=dst_fd, dst_dir_fd=dst_fd, follow_symlinks=False)
            return
        fds = [os.dup(self.dst_root_fd)]
        try:
            for part in parents:
                fds.append(_open_dir(part, fds[-1]))
            os.link(last, name, src_dir_fd=fds[-1], dst_dir_fd=dst_fd, follow_symlinks=False)
        finally:
            for fd in fds:
                os.close(fd)

    def _file(self, src_dir: int, dst_dir: int, name: str, lst: os.stat_result) -> None:
        """Copy the regular file *name* (lstat *lst*) to a new file in dst_dir, finished."""
        src = _open_source(name, src_dir, os.O_RDONLY | os.O_NONBLOCK)
        try:
            st = os.fstat(src)
            if not stat.S_ISREG(st.st_mode) or (st.st_dev, st.st_ino) != (lst.st_dev, lst.st_ino):
                raise _changed(name)
            dst = os.open(name, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW
                          | os.O_CLOEXEC, 0o600, dir_fd=dst_dir)
            try:
                if st.st_size:
                    self.mover.copy(src, dst, 0, st.st_size, flush=False)
                os.ftruncate(dst, st.st_size)
                self.size += st.st_size
                copy_xattrs(src, dst)          # after the data: writing clears capabilities
                finish_file(dst, st)
                self.mover.flush(src, dst, synced=True)   # one sync per small file, not two
            finally:
                os.close(dst)
        finally:
            os.close(src)

    def _special(self, dst_dir: int, name: str, st: os.stat_result, src_path: str) -> None:
        """A symbolic link, device node or FIFO, already created as *name* in dst_dir."""
        os.chown(name, st.st_uid, st.st_gid, dir_fd=dst_dir, follow_symlinks=False)
        if not stat.S_ISLNK(st.st_mode):   # a link has no mode; chown cleared set-id bits
            os.chmod(name, stat.S_IMODE(st.st_mode), dir_fd=dst_dir)
        # Reached through the directory's fd, never through a path from a root.
        copy_xattrs(src_path, f"/proc/self/fd/{dst_dir}/{name}", follow_symlinks=False)
        os.utime(name, ns=(st.st_atime_ns, st.st_mtime_ns), dir_fd=dst_dir,
                 follow_symlinks=False)

    def directory(self, src_fd: int, dst_fd: int, st: os.stat_result,
                  here: tuple[str, ...]) -> None:
        """Copy the contents of src_fd into the new directory dst_fd, then its metadata."""
        with os.scandir(src_fd) as it:
            names = sorted(entry.name for entry in it)
        for name in names:
            self.mover.check_stop()
            lst = os.stat(name, dir_fd=src_fd, follow_symlinks=False)
            mode = lst.st_mode
            key = (lst.st_dev, lst.st_ino)
            if not stat.S_ISDIR(mode) and lst.st_nlink > 1 and key in self.links:
                self._link(self.links[key], dst_fd, here, name)
                continue
            if stat.S_ISDIR(mode):
                os.mkdir(name, 0o700, dir_fd=dst_fd)
                sub_src = _open_source(name, src_fd, os.O_RDONLY | os.O_DIRECTORY)
                try:
                    sub_st = os.fstat(sub_src)
                    if (sub_st.st_dev, sub_st.st_ino) != key:
                        raise _changed(name)
                    sub_dst = _open_dir(name, dst_fd)
                    try:
                        self.directory(sub_src, sub_dst, sub_st, here + (name,))
                    finally:
                        os.close(sub_dst)
                finally:
                    os.close(sub_src)
                continue
            if stat.S_ISREG(mode):
                self._file(src_fd, dst_fd, name, lst)
            elif stat.S_ISLNK(mode):
                os.symlink(os.readlink(name, dir_fd=src_fd), name, dir_fd=dst_fd)
                self._special(dst_fd, name, lst, f"/proc/self/fd/{src_fd}/{name}")
            elif stat.S_ISCHR(mode) or stat.S_ISBLK(mode) or stat.S_ISFIFO(mode):
                os.mknod(name, stat.S_IFMT(mode) | 0o600, lst.st_rdev, dir_fd=dst_fd)
                self._special(dst_fd, name, lst, f"/proc/self/fd/{src_fd}/{name}")
            else:
                log.debug("skipping %s (a socket or unknown type, mode %o)", name, mode)
                continue
            if lst.st_nlink > 1:
                self.links[key] = here + (name,)
        copy_xattrs(src_fd, dst_fd)
        os.fchown(dst_fd, st.st_uid, st.st_gid)
        os.fchmod(dst_fd, stat.S_IMODE(st.st_mode))
        os.utime(dst_fd, ns=(st.st_atime_ns, st.st_mtime_ns))
        os.fsync(dst_fd)


def copy_tree(src_dir_fd: int, src_name: str, dst_dir_fd: int, dst_name: str, *,
              throttle: Throttle | None = None, stop: threading.Event | None = None,
              progress: Callable[[int], None] | None = None,
              compare: bool = False) -> CopyResult:
    """Copy the directory tree src_dir_fd/src_name to the new dst_dir_fd/dst_name, intact.

    Regular files (sparse), directories, symbolic links (never followed),
    hard links, device nodes and FIFOs keep their type, content, mode
    (set-id and sticky bits too), owner, xattrs and times; sockets are
    skipped. Everything is fsynced, the new entry in dst_dir_fd too. A
    symbolic link at src_name is refused (``NotADirectoryError``), an existing
    dst_name too (``FileExistsError``). On error or :class:`CopyAborted` the
    partial dst_name is left for the caller to remove. ``size`` counts each
    file once however many links it has; ``sha256`` is None.
    """
    src_fd = _open_source(src_name, src_dir_fd, os.O_RDONLY | os.O_DIRECTORY)
    try:
        st = os.fstat(src_fd)
        os.mkdir(dst_name, 0o700, dir_fd=dst_dir_fd)
        dst_fd = _open_dir(dst_name, dst_dir_fd)
        try:
            mover = Mover(throttle=throttle, stop=stop, progress=progress,
                           chunk=DEFAULT_CHUNK, hash=False, compare=compare)
            tree = _TreeCopy(mover, dst_fd)
            tree.directory(src_fd, dst_fd, st, ())
        finally:
            os.close(dst_fd)
        fsync_dir(dst_dir_fd)
    finally:
        os.close(src_fd)
    return CopyResult(size=tree.size, data_bytes=mover.data_bytes, sha256=None)
