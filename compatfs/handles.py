"""The files agents hold open through the views, and what the migration may ask of them.

The FUSE layer owns every open handle; the migration must know which names
are open (to move them first), whether a file is open for writing (to mirror
its writes) and, at the moment a file moves, re-open its handles on the new
copy. :class:`HandleTable` is that whole interface: the migration is given
the table, never the FUSE operations.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import TYPE_CHECKING

from .changes import FileKey
from .writebehind import Stream

if TYPE_CHECKING:
    from .stores import Store

#: Flags that must not reach the backing open: the kernel does the caching.
#: O_TRUNC stays: libfuse enables atomic_o_trunc, so the kernel passes it in
#: open and sends no separate truncate; dropping it kept the old bytes.
_STRIP_FLAGS = os.O_DIRECT | os.O_CREAT | os.O_EXCL | os.O_NOCTTY

def backing_flags(flags: int) -> int:
    """The flags an agent opened a view's file with, as the backing file is opened."""
    return flags & ~_STRIP_FLAGS


@dataclass(slots=True)
class Handle:
    fd: int
    ino: int
    writable: bool
    flags: int = 0                        # as the agent opened it (for re-opening)
    vpath: str = ""                       # the legacy name it was opened by
    backing: FileKey = (0, 0)             # (st_dev, st_ino) of the file behind it
    stream: Stream | None = None          # where its sequential writes stand, if writable


class HandleTable(dict[int, Handle]):
    """Open handles by FUSE file handle number.

    A ``dict`` itself, so the FUSE layer's per-request ``get``, ``[]`` and ``pop``
    are the C dict's (a wrapper method would add a call to every read and
    write); the migration uses only the methods below."""

    __slots__ = ()

    def add(self, fh: int, handle: Handle) -> None:
        self[fh] = handle

    # -- what the migration asks ----------------------------------------------------
    def open_paths(self) -> set[str]:
        """The legacy names agents hold open now."""
        return {h.vpath for h in self.values()}

    def open_for_writing(self, key: FileKey) -> bool:
        """Whether an agent holds the file *key* open for writing."""
        return any(h.writable and h.backing == key for h in self.values())

    def switch(self, key: FileKey, store: Store, rel: str) -> int:
        """Re-open every handle on the file *key* on *store*/*rel* (its new copy),
        with the flags it was opened with; returns how many. Synchronous: no other
        request runs in between, so no write is lost or reordered."""
        switched = 0
        for h in self.values():
            if h.backing != key:
                continue
            fd = store.open(rel, backing_flags(h.flags) & ~os.O_TRUNC)
            os.close(h.fd)
            h.fd = fd
            st = os.fstat(fd)
            h.backing = (st.st_dev, st.st_ino)
            switched += 1
        return switched

    def close_all(self) -> None:
        """Close every backing fd (at shutdown)."""
        for h in self.values():
            try:
                os.close(h.fd)
            except OSError:
                pass
        self.clear()
