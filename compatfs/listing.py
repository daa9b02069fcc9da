"""A directory's names as an open directory handle holds them, packed.

``opendir`` takes a snapshot of the names, and ``readdir`` answers from it in
batches (the kernel asks for a buffer's worth at a time), however the
directory changes meanwhile. As a list of str, a snapshot costs about 110
bytes a name, and a directory of 100,000 names leaves the C heap fragmented
once the snapshot is freed. A :class:`Listing` packs the names instead: their
bytes (as the kernel is given them) in one ``bytes`` object and the end of
each in an array, built while the directory is read, so no object per name
exists at any moment. Both are single allocations, given back whole when the
handle is released.

Every method is on ``readdir``'s path: an entry costs one slice.
"""

from __future__ import annotations

import sys
from array import array
from collections.abc import Iterable

FS_ENCODING, FS_ERRORS = sys.getfilesystemencoding(), sys.getfilesystemencodeerrors()  # os.fsencode


class Listing:
    """The names of one directory, in the order listed."""

    __slots__ = ("_blob", "_ends")

    def __init__(self, names: Iterable[str]) -> None:
        blob = bytearray()
        ends = array("Q")
        for name in names:
            blob += name.encode(FS_ENCODING, FS_ERRORS)
            ends.append(len(blob))
        self._blob = bytes(blob)
        self._ends = ends

    def __len__(self) -> int:
        return len(self._ends)

    def raw(self, i: int) -> bytes:
        """The *i*-th name as the kernel is given it."""
        ends = self._ends
        return self._blob[ends[i - 1] if i else 0:ends[i]]

    def __getitem__(self, i: int) -> str:
        return self.raw(i).decode(FS_ENCODING, FS_ERRORS)

    def names(self) -> list[str]:
        """Every name (for tests and tools; not on a request's path)."""
        return [self[i] for i in range(len(self))]
