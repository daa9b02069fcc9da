"""What the views tell the migration about changes agents make while it runs.

A copy under way must follow the agents: bytes written to a file being copied,
a size set by truncate or ``O_TRUNC``, a name changed inside a tree being
copied, and which names agents open (those move first). The FUSE layer
reports each through :class:`ChangeObserver` and knows nothing else of the
migration; outside stage migrate it is given :data:`NO_CHANGES`, whose methods
do nothing.
"""

from __future__ import annotations

from typing import Protocol

#: A file's identity on its file system: (st_dev, st_ino).
FileKey = tuple[int, int]


class ChangeObserver(Protocol):
    @property
    def following(self) -> bool:
        """Whether a copy is under way: when not, a caller may skip the work of
        finding what to report (a stat for a file's key, say)."""

    def wrote(self, key: FileKey, buf: bytes | memoryview, offset: int) -> None:
        """*buf* was written at *offset* to the file *key*."""

    def resized(self, key: FileKey, size: int) -> None:
        """The file *key* was given *size* (truncate, ``O_TRUNC``)."""

    def changing(self, vpath: str) -> None:
        """The name *vpath* (or what is inside it) is about to change."""

    def opened(self, vpath: str) -> None:
        """An agent opened the file *vpath*."""


class _NoChanges:
    """The observer when nothing migrates."""

    __slots__ = ()

    @property
    def following(self) -> bool:
        return False

    def wrote(self, key: FileKey, buf: bytes | memoryview, offset: int) -> None:
        return None

    def resized(self, key: FileKey, size: int) -> None:
        return None

    def changing(self, vpath: str) -> None:
        return None

    def opened(self, vpath: str) -> None:
        return None


NO_CHANGES: ChangeObserver = _NoChanges()
