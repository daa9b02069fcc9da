"""Inode numbers of the views and the kernel's lookup counts.

The views serve names from several filesystems (the legacy store, the vault,
novault), whose inode numbers may collide, so compatfs gives out its own. An
inode is known by (parent inode, name); its view path is rebuilt by walking
up the parents (the views are a few levels deep). An inode stays while the
kernel holds a reference (lookup count above zero), even after its name is
gone, and its number is reused after the last ``forget``. A file with
several hard links is one inode with several names: the first is kept in the
arrays, the others in :attr:`InodeTable.aliases`.

A device lists 100,000 legacy names, and the kernel may hold all of them, so
the table keeps no Python object per inode (a str, a dict entry and an int
cost about 190 bytes a name): three arrays indexed by inode number (the
parent with the name's hash, where the name's bytes are, the lookup count),
every name's bytes packed in one ``bytearray`` (repacked when half of it is
names no longer given out), and an open-addressing hash table of inode numbers
(linear probing, at most half full) finding (parent, name). The paths of
directories (few) are cached as str, so :meth:`InodeTable.path` decodes only
the leaf.
"""

from __future__ import annotations

import ctypes
import errno
import sys
from array import array

import pyfuse3

ROOT = pyfuse3.ROOT_INODE
_GONE = 0  # parent of an inode whose name was removed
_FREE = 0xFFFF  # name length of an inode number not given out (names are shorter)
_H = 0xFFFFFFFF
_ENC, _ERR = sys.getfilesystemencoding(), sys.getfilesystemencodeerrors()  # os.fsencode's
#: a listing of at least this many names is worth giving its memory back for
BIG_LISTING = 10_000
_malloc_trim = getattr(ctypes.CDLL(None), "malloc_trim", None)   # glibc's; musl has none


def trim_heap() -> None:
    """Give the free pages of the C heap back to the kernel (glibc's
    ``malloc_trim``; nothing elsewhere), after a big directory listing died.

    The names of a listing of 100,000 (11 MiB of str) die when the directory
    is released, their bytes copied into the table; what else the C heap grew
    meanwhile leaves about 2 MiB of free pages in it that glibc keeps.
    Trimming them takes about 0.2 ms."""
    if _malloc_trim is not None:
        _malloc_trim(0)


class UnknownInode(LookupError):
    """The kernel named an inode this table does not hold (already forgotten,
    or never given out); the errno boundary answers ``ENOENT``."""

    def __init__(self, ino: int) -> None:
        super().__init__(f"inode {ino} is not known")
        self.ino = ino


class InodeTable:
    """Inode numbers by (parent, name), with the kernel's lookup count of each."""

    def __init__(self) -> None:
        # per inode number (0 unused, 1 the root):
        #: parent << 32 | low 32 bits of hash(name) ^ parent (the hash table's key)
        self._key = array("Q", [0, ROOT << 32])
        #: offset << 16 | length of the name's bytes in _blob; length _FREE: not given out
        self._name_at = array("Q", [_FREE, 0])
        self._lookups = array("q", [0, 1])
        self._blob = bytearray()
        self._garbage = 0                    # bytes of _blob no inode names any more
        #: the hash table: slot -> inode number (0: empty)
        self._slots = array("I", bytes(4 * 64))
        self._mask = 63
        self._used = 0
        #: names (first ones and aliases) per directory inode, for drop_unreferenced
        self._entries: dict[int, int] = {}
        #: (parent, name) of further hard links -> inode
        self._alias_of: dict[tuple[int, str], int] = {}
        #: view path of directories met as a path's parent (all dropped when one changes)
        self._dir_paths: dict[int, str] = {}
        self._free: list[int] = []
        #: (mtime_ns, size) last served per open file, to keep its page cache
        self.cache_sig: dict[int, tuple[int, int]] = {}
        #: further (parent, name) of inodes with several hard links
        self.aliases: dict[int, list[tuple[int, str]]] = {}
        #: backing (st_dev, st_ino) -> inode, for files with several hard links
        self.by_backing: dict[tuple[int, int], int] = {}

    def __len__(self) -> int:
        return len(self._lookups) - len(self._free) - 1

    def known(self, ino: int) -> bool:
        return 0 < ino < len(self._lookups) and self._name_at[ino] & 0xFFFF != _FREE

    # -- names ----------------------------------------------------------------------
    def _name(self, ino: int) -> str:
        at = self._name_at[ino]
        off = at >> 16
        return self._blob[off:off + (at & 0xFFFF)].decode(_ENC, _ERR)

    def _set_name(self, ino: int, parent: int, name: str) -> None:
        """*ino* is now *name* in *parent*, in the hash table."""
        raw = name.encode(_ENC, _ERR)
        if len(raw) >= _FREE:
            raise OSError(errno.ENAMETOOLONG, "name too long")
        if ino in self._dir_paths:
            self._dir_paths.clear()
        old = self._name_at[ino] & 0xFFFF
        if old != _FREE:
            self._garbage += old
        self._key[ino] = parent << 32 | ((hash(name) ^ parent) & _H)
        self._name_at[ino] = len(self._blob) << 16 | len(raw)
        self._blob += raw
        self._insert(ino)
        self._entries[parent] = self._entries.get(parent, 0) + 1
        self._maybe_compact()

    def _maybe_compact(self) -> None:
        if self._garbage > 65536 and self._garbage * 2 > len(self._blob):
            self._compact()

    def _compact(self) -> None:
        """Pack the bytes of the names still given out, dropping the others'."""
        blob, name_at, old = bytearray(), self._name_at, self._blob
        for ino in range(1, len(name_at)):
            at = name_at[ino]
            n = at & 0xFFFF
            if n != _FREE:
                start = at >> 16
                name_at[ino] = len(blob) << 16 | n
                blob += old[start:start + n]
        self._blob, self._garbage = blob, 0

    def path(self, ino: int) -> str:
        """The view path of *ino* ('' for the root); :class:`UnknownInode` when
        unknown, ``FileNotFoundError`` when its name (or a parent's) is gone."""
        # every request on an inode comes here: known() and _name() written out
        name_at = self._name_at
        if not 0 < ino < len(name_at):
            raise UnknownInode(ino)
        at = name_at[ino]
        n = at & 0xFFFF
        if n == _FREE:
            raise UnknownInode(ino)
        if ino == ROOT:
            return ""
        parent = self._key[ino] >> 32
        if parent == _GONE:
            raise FileNotFoundError(2, "no longer in the view")
        off = at >> 16
        leaf = self._blob[off:off + n].decode(_ENC, _ERR)
        if parent == ROOT:
            return leaf
        base = self._dir_paths.get(parent)
        if base is None:
            base = self._dir_paths[parent] = self.path(parent)
        return base + "/" + leaf

    def parent_of(self, ino: int) -> int:
        """The directory holding *ino* (the root for the root and for an inode
        whose name is gone); :class:`UnknownInode` when unknown."""
        if not self.known(ino):
            raise UnknownInode(ino)
        return self._key[ino] >> 32 or ROOT

    # -- the hash table ---------------------------------------------------------------
    def _slot(self, parent: int, name: str) -> int:
        """The slot holding (parent, name), or ``-1 - slot`` of the empty slot ending its probe.

        Written out again in :meth:`ensure` (every lookup and readdir entry):
        locals only, the name encoded only on a full-key match."""
        h = (hash(name) ^ parent) & _H
        key = parent << 32 | h
        slots, mask, keys = self._slots, self._mask, self._key
        s = h & mask
        raw = None
        while True:
            ino = slots[s]
            if not ino:
                return -1 - s
            if keys[ino] == key:
                if raw is None:
                    raw = name.encode(_ENC, _ERR)
                at = self._name_at[ino]
                if at & 0xFFFF == len(raw) and self._blob.startswith(raw, at >> 16):
                    return s
            s = (s + 1) & mask

    def _insert(self, ino: int) -> None:
        """Put *ino* (its key set) in the hash table."""
        if (self._used + 1) * 2 > self._mask + 1:
            self._grow()
        slots, mask = self._slots, self._mask
        s = self._key[ino] & mask
        while slots[s]:
            s = (s + 1) & mask
        slots[s] = ino
        self._used += 1

    def _grow(self) -> None:
        old = self._slots
        self._mask = mask = (self._mask + 1) * 2 - 1
        self._slots = slots = array("I", bytes(4 * (mask + 1)))
        keys = self._key
        for ino in old:
            if ino:
                s = keys[ino] & mask
                while slots[s]:
                    s = (s + 1) & mask
                slots[s] = ino

    def _remove(self, ino: int) -> None:
        """Take the first name of *ino* out of the hash table and its directory."""
        slots, mask, keys = self._slots, self._mask, self._key
        i = keys[ino] & mask
        while slots[i] != ino:
            if not slots[i]:
                return
            i = (i + 1) & mask
        j = i
        while True:   # shift back the entries after it that may not stay behind a hole
            j = (j + 1) & mask
            other = slots[j]
            if not other:
                break
            home = keys[other] & mask
            # other stays if its home is cyclically in (i, j]
            if (i < home <= j) if i <= j else (home > i or home <= j):
                continue
            slots[i] = other
            i = j
        slots[i] = 0
        self._used -= 1
        entries, parent = self._entries, keys[ino] >> 32
        left = entries[parent] - 1
        if left:
            entries[parent] = left
        else:
            del entries[parent]

    def _count_down(self, parent: int) -> None:
        entries = self._entries
        left = entries[parent] - 1
        if left:
            entries[parent] = left
        else:
            del entries[parent]

    # -- lookups ------------------------------------------------------------------------
    def find(self, parent: int, name: str) -> int | None:
        """The inode named *name* in *parent*, if it is known (never made here)."""
        s = self._slot(parent, name)
        if s >= 0:
            return self._slots[s]
        return self._alias_of.get((parent, name)) if self._alias_of else None

    def add_name(self, ino: int, parent: int, name: str) -> None:
        """Give *ino* one more name (a hard link)."""
        if self.find(parent, name) == ino:
            return
        self.detach(parent, name)
        if self._key[ino] >> 32 == _GONE:
            self._set_name(ino, parent, name)
        else:
            self.aliases.setdefault(ino, []).append((parent, name))
            self._alias_of[(parent, name)] = ino
            self._entries[parent] = self._entries.get(parent, 0) + 1

    def ensure_linked(self, parent: int, name: str, backing: tuple[int, int]) -> int:
        """:meth:`ensure` for a file with several hard links: one inode for all its names."""
        ino = self.find(parent, name)
        if ino is not None:
            self.by_backing[backing] = ino
            return ino
        ino = self.by_backing.get(backing)
        if ino is not None and self.known(ino):
            self.add_name(ino, parent, name)
            return ino
        ino = self.ensure(parent, name)
        self.by_backing[backing] = ino
        return ino

    def ensure(self, parent: int, name: str) -> int:
        """The inode named *name* in *parent*, made (with no references) when new."""
        h = (hash(name) ^ parent) & _H   # _slot, written out
        key = parent << 32 | h
        slots, mask, keys = self._slots, self._mask, self._key
        s = h & mask
        raw = None
        while True:
            ino = slots[s]
            if not ino:
                break
            if keys[ino] == key:
                if raw is None:
                    raw = name.encode(_ENC, _ERR)
                at = self._name_at[ino]
                if at & 0xFFFF == len(raw) and self._blob.startswith(raw, at >> 16):
                    return ino
            s = (s + 1) & mask
        if self._alias_of:
            found = self._alias_of.get((parent, name))
            if found is not None:
                return found
        if raw is None:
            raw = name.encode(_ENC, _ERR)
        if len(raw) >= _FREE:
            raise OSError(errno.ENAMETOOLONG, "name too long")
        blob = self._blob
        if self._free:
            ino = self._free.pop()
            keys[ino] = key
            self._name_at[ino] = len(blob) << 16 | len(raw)
            self._lookups[ino] = 0
        else:
            ino = len(keys)
            keys.append(key)
            self._name_at.append(len(blob) << 16 | len(raw))
            self._lookups.append(0)
        blob += raw
        if (self._used + 1) * 2 > mask + 1:
            self._insert(ino)   # grows the table, then probes again
        else:
            slots[s] = ino
            self._used += 1
        entries = self._entries
        entries[parent] = entries.get(parent, 0) + 1
        return ino

    # -- references ------------------------------------------------------------------------
    def references(self, ino: int) -> int:
        """The kernel's lookup count of *ino*."""
        return self._lookups[ino] if self.known(ino) else 0

    def ref(self, ino: int, count: int = 1) -> None:
        self._lookups[ino] += count

    def lookup(self, parent: int, name: str) -> int:
        """:meth:`ensure` plus one kernel reference (lookup, create, mkdir)."""
        ino = self.ensure(parent, name)
        self._lookups[ino] += 1
        return ino

    def _release(self, ino: int) -> None:
        """Give the number of *ino* back (its first name already out of the hash table)."""
        if self.aliases:
            for parent, name in self.aliases.pop(ino, ()):
                if self._alias_of.get((parent, name)) == ino:
                    del self._alias_of[(parent, name)]
                    self._count_down(parent)
        if ino in self._dir_paths:
            self._dir_paths.clear()
        if self.cache_sig:
            self.cache_sig.pop(ino, None)
        self._garbage += self._name_at[ino] & 0xFFFF
        self._name_at[ino] = _FREE
        self._key[ino] = 0
        self._lookups[ino] = 0
        self._free.append(ino)
        if self._garbage > 65536:
            self._maybe_compact()

    def drop_unreferenced(self, ino: int) -> None:
        """Forget *ino* if the kernel holds no reference (a readdir entry not sent)."""
        if ino != ROOT and self.known(ino) and self._lookups[ino] <= 0 \
                and ino not in self._entries:
            if self._key[ino] >> 32 != _GONE:
                self._remove(ino)
            self._release(ino)

    # -- names removed and moved --------------------------------------------------------------
    def _drop_alias(self, ino: int, parent: int, name: str) -> bool:
        """Remove (parent, name) from the names of *ino*; True if it had others."""
        others = self.aliases.get(ino)
        if not others:
            return False
        if self._key[ino] >> 32 == parent and self._name(ino) == name:
            # its first name went: another takes its place in the hash table
            new_parent, new_name = others.pop()
            del self._alias_of[(new_parent, new_name)]
            self._count_down(new_parent)
            self._set_name(ino, new_parent, new_name)
        else:
            try:
                others.remove((parent, name))
            except ValueError:
                pass
        if not others:
            del self.aliases[ino]
        return True

    def _pop_name(self, parent: int, name: str) -> int | None:
        """Take (parent, name) out of the directory; the inode it named, if any."""
        s = self._slot(parent, name)
        if s >= 0:
            ino = self._slots[s]
            self._remove(ino)
            return ino
        if self._alias_of:
            found = self._alias_of.pop((parent, name), None)
            if found is not None:
                self._count_down(parent)
            return found
        return None

    def detach(self, parent: int, name: str) -> None:
        """The name is gone (unlink, rmdir, replaced by a rename)."""
        ino = self._pop_name(parent, name)
        if ino is None:
            return
        if self._drop_alias(ino, parent, name):
            return
        if ino in self._dir_paths:
            self._dir_paths.clear()
        self._key[ino] &= _H   # parent _GONE
        if self._lookups[ino] <= 0:
            self._release(ino)

    def move(self, parent: int, name: str, new_parent: int, new_name: str) -> None:
        self.detach(new_parent, new_name)
        ino = self._pop_name(parent, name)
        if ino is None:
            return
        if self._drop_alias(ino, parent, name):
            self.aliases.setdefault(ino, []).append((new_parent, new_name))
            self._alias_of[(new_parent, new_name)] = ino
            self._entries[new_parent] = self._entries.get(new_parent, 0) + 1
        else:
            self._set_name(ino, new_parent, new_name)

    def forget(self, ino: int, count: int) -> None:
        if ino == ROOT or not 0 < ino < len(self._name_at) \
                or self._name_at[ino] & 0xFFFF == _FREE:
            return
        left = self._lookups[ino] - count
        self._lookups[ino] = left
        if left <= 0:
            if self._key[ino] >> 32 != _GONE:
                self._remove(ino)
            self._release(ino)
