"""``openat2(2)``: opening a path below a directory without ever leaving it.

The one wrapper of the system call (Python has none), shared by everything
that opens paths compatfs does not control: the stores
(:mod:`compatfs.stores`), the untrusted files (:mod:`compatfs.untrusted`),
the index's state directory (:mod:`compatfs.indexopen`) and ``status``. With
``RESOLVE_BENEATH | RESOLVE_NO_SYMLINKS`` a symbolic link or ``..`` planted
below the directory can never lead the open outside it. It imports no other
compatfs module, so every layer may use it.
"""

from __future__ import annotations

import ctypes
import os

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
    fd: int = _libc.syscall(_SYS_OPENAT2, dir_fd, os.fsencode(path), ctypes.byref(how),
                            ctypes.sizeof(how))
    if fd < 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err), path)
    return fd
