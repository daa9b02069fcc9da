"""The hidden ``.compatfs`` file of each view, as the FUSE layer serves it.

:mod:`compatfs.control` is the interface (its keys, commands and errnos);
this module is the file that carries it: which inodes are control files, the
status documents open for reading, and the extended-attribute requests made
on it, with a :class:`compatfs.control.ControlError` turned into its errno.
The handlers of :class:`compatfs.operations.Operations` hand a request here
when it names a control file and never otherwise, so the views' own paths
pay nothing for it but a set lookup.
"""

from __future__ import annotations

import errno
import os

import pyfuse3
from pyfuse3 import FUSEError

from .boundary import BadHandle
from .control import Control, ControlError


class ControlFile:
    """The control files of one mount; without a *control*, there are none."""

    __slots__ = ("_documents", "control", "inodes")

    def __init__(self, control: Control | None) -> None:
        self.control = control
        #: the inode of each view's control file the kernel holds
        self.inodes: set[int] = set()
        #: the status document of each open control file, by file handle
        self._documents: dict[int, bytes] = {}

    @property
    def served(self) -> bool:
        return self.control is not None

    def _interface(self) -> Control:
        if self.control is None:   # no inode is a control file then: never reached
            raise FUSEError(errno.ENOENT)
        return self.control

    def open(self, fh: int, flags: int) -> pyfuse3.FileInfo:
        """Open a control file as *fh*: read-only, its content the status now."""
        if (flags & os.O_ACCMODE) != os.O_RDONLY:
            raise FUSEError(errno.EROFS)
        self._documents[fh] = self._interface().document()
        return pyfuse3.FileInfo(fh=fh, direct_io=True)

    def read(self, fh: int, off: int, size: int) -> bytes:
        document = self._documents.get(fh)
        if document is None:
            raise BadHandle(fh)
        return document[off:off + size]

    def release(self, fh: int) -> bool:
        """Close *fh* if it is an open control file; whether it was one."""
        return self._documents.pop(fh, None) is not None

    def getxattr(self, name: bytes) -> bytes:
        try:
            return self._interface().get(os.fsdecode(name))
        except ControlError as exc:
            raise FUSEError(exc.errno) from None

    def listxattr(self) -> list[bytes]:
        return self._interface().names()

    def setxattr(self, name: bytes, value: bytes) -> None:
        try:
            self._interface().set(os.fsdecode(name), value)
        except ControlError as exc:
            raise FUSEError(exc.errno) from None
