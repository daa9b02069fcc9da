"""Reading files compatfs does not own, without ever blocking on them.

The checkpoint, zedmanager's latch files and the configuration file are
written by others. Whatever sits at their names, a FIFO, a device node, a
symbolic link to somewhere else, a file of gigabytes, must not stop the
daemon: ``open(2)`` of a FIFO for reading waits for a writer, and the daemon
reads the checkpoint again while it serves. So every such read goes through
:func:`read_regular`, which opens with ``O_NONBLOCK`` (opening a FIFO returns
at once), ``O_NOFOLLOW`` unless the caller allows a link (the last component
is never followed: on EVE ``checkpoint/lastconfig`` and the latch files are
regular files that zedagent and zedmanager rename into place, so a link
there was put there by someone else), checks with ``fstat`` that what it
opened is a regular file, and reads at most a stated number of bytes. Given
the root the file must lie *beneath*, no component of the path below the root
is followed either (``openat2(2)`` with ``RESOLVE_BENEATH |
RESOLVE_NO_SYMLINKS``, as the backing store resolves every path): a linked
``checkpoint/`` directory cannot lead the reading out of the root.
"""

from __future__ import annotations

import errno
import os
import stat

_KINDS = ((stat.S_ISDIR, "a directory"), (stat.S_ISFIFO, "a FIFO"),
          (stat.S_ISSOCK, "a socket"), (stat.S_ISCHR, "a character device"),
          (stat.S_ISBLK, "a block device"), (stat.S_ISLNK, "a symbolic link"))


class UntrustedFileError(Exception):
    """The file cannot be used; ``str()`` is one line naming it and saying why."""


def kind(mode: int) -> str:
    """'a FIFO', 'a directory', ... for a file that is not regular."""
    for test, name in _KINDS:
        if test(mode):
            return name
    return "not a regular file"


def _open(path: str, flags: int, beneath: str | None) -> int:
    if beneath is None:
        return os.open(path, flags)
    from .beneath import openat2  # the one openat2 wrapper

    rel = os.path.relpath(path, beneath)
    if rel == os.curdir or rel.split(os.sep, 1)[0] == os.pardir:
        raise UntrustedFileError(f"{path}: not beneath {beneath}")
    root = os.open(beneath, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        return openat2(root, rel, flags)
    finally:
        os.close(root)


def read_regular(path: str, limit: int, *, follow_symlinks: bool = False,
                 beneath: str | None = None) -> bytes:
    """The bytes of the regular file *path*, at most *limit* of them.

    ``FileNotFoundError`` passes through (absence often means "not yet");
    anything else that makes the file unusable raises
    :class:`UntrustedFileError`: not a regular file, a symbolic link (unless
    *follow_symlinks*; with *beneath*, a link anywhere below that directory),
    larger than *limit*, or unreadable.
    """
    return read_regular_with_stat(path, limit, follow_symlinks=follow_symlinks,
                                  beneath=beneath)[0]


def read_regular_with_stat(path: str, limit: int, *, follow_symlinks: bool = False,
                           beneath: str | None = None
                           ) -> tuple[bytes, os.stat_result, os.stat_result]:
    """:func:`read_regular`, plus the ``fstat`` of the file read, taken on the
    open file just before and just after reading it: a caller that must not
    use a file caught in the middle of a rewrite compares the two."""
    flags = os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC | os.O_NOCTTY
    if not follow_symlinks:
        flags |= os.O_NOFOLLOW
    try:
        fd = _open(path, flags, beneath)
    except FileNotFoundError:
        raise
    except OSError as exc:
        try:   # say what is there when that is why (a socket gives ENXIO, a link ELOOP)
            mode = os.stat(path, follow_symlinks=follow_symlinks).st_mode
        except OSError:
            mode = stat.S_IFREG
        if stat.S_ISLNK(mode):
            raise UntrustedFileError(f"{path}: is a symbolic link, not a regular file "
                                     "(not followed)") from None
        if not stat.S_ISREG(mode):
            raise UntrustedFileError(f"{path}: is {kind(mode)}, not a regular file") from None
        if beneath is not None and exc.errno in (errno.ELOOP, errno.EXDEV):
            raise UntrustedFileError(f"{path}: its path below {beneath} goes through a "
                                     "symbolic link; not followed") from None
        raise UntrustedFileError(f"{path}: cannot open: {exc.strerror}") from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise UntrustedFileError(f"{path}: is {kind(st.st_mode)}, not a regular file")
        if st.st_size > limit:
            raise UntrustedFileError(
                f"{path}: too large: {st.st_size} bytes, larger than {limit} bytes")
        chunks, total = [], 0
        while total <= limit:
            chunk = os.read(fd, min(limit + 1 - total, 1 << 20))
            if not chunk:
                break
            chunks.append(chunk)
            total += len(chunk)
        if total > limit:   # it grew while being read
            raise UntrustedFileError(f"{path}: too large: larger than {limit} bytes")
        return b"".join(chunks), st, os.fstat(fd)
    except OSError as exc:
        raise UntrustedFileError(f"{path}: cannot read: {exc.strerror}") from None
    finally:
        os.close(fd)
