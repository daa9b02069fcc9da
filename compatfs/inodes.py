"""Inode numbers of the views and the kernel's lookup counts.

The views serve names from several filesystems (the legacy store, the vault,
novault), whose inode numbers may collide, so compatfs gives out its own. An
inode is known by (parent inode, name); its view path is rebuilt by walking
up the parents (the views are a few levels deep). An inode stays while the
kernel holds a reference (lookup count above zero), even after its name is
gone, and its number is reused after the last ``forget``. A file with
several hard links is one inode with several names: the first is kept in the
arrays, the others in :attr:`InodeTable.aliases`.

The table is kept in flat arrays indexed by inode number plus one small dict
of names per directory: a device lists 100,000 legacy names, and the kernel
may hold all of them, so a Python object per inode would cost several times
the memory.
"""

from __future__ import annotations

from array import array

import pyfuse3

ROOT = pyfuse3.ROOT_INODE
_GONE = 0  # parent of an inode whose name was removed


class UnknownInode(LookupError):
    """The kernel named an inode this table does not hold (already forgotten,
    or never given out); the errno boundary answers ``ENOENT``."""

    def __init__(self, ino: int) -> None:
        super().__init__(f"inode {ino} is not known")
        self.ino = ino


class InodeTable:
    """Inode numbers by (parent, name), with the kernel's lookup count of each."""

    def __init__(self) -> None:
        self._parent = array("Q", [0, ROOT])
        self._lookups = array("q", [0, 1])
        self._names: list[str | None] = [None, ""]
        self._children: dict[int, dict[str, int]] = {}
        self._free: list[int] = []
        #: (mtime_ns, size) last served per open file, to keep its page cache
        self.cache_sig: dict[int, tuple[int, int]] = {}
        #: further (parent, name) of inodes with several hard links
        self.aliases: dict[int, list[tuple[int, str]]] = {}
        #: backing (st_dev, st_ino) -> inode, for files with several hard links
        self.by_backing: dict[tuple[int, int], int] = {}

    def __len__(self) -> int:
        return len(self._names) - len(self._free) - 1

    def known(self, ino: int) -> bool:
        return 0 < ino < len(self._names) and self._names[ino] is not None

    def path(self, ino: int) -> str:
        """The view path of *ino* ('' for the root); :class:`UnknownInode` when
        unknown, ``FileNotFoundError`` when its name (or a parent's) is gone."""
        if not self.known(ino):
            raise UnknownInode(ino)
        parts: list[str] = []
        while ino != ROOT:
            parent = self._parent[ino]
            if parent == _GONE:
                raise FileNotFoundError(2, "no longer in the view")
            parts.append(self._names[ino])  # type: ignore[arg-type]
            ino = parent
        return "/".join(reversed(parts))

    def parent_of(self, ino: int) -> int:
        """The directory holding *ino* (the root for the root and for an inode
        whose name is gone); :class:`UnknownInode` when unknown."""
        if not self.known(ino):
            raise UnknownInode(ino)
        return self._parent[ino] or ROOT

    def find(self, parent: int, name: str) -> int | None:
        names = self._children.get(parent)
        return None if names is None else names.get(name)

    def add_name(self, ino: int, parent: int, name: str) -> None:
        """Give *ino* one more name (a hard link)."""
        if self.find(parent, name) == ino:
            return
        self.detach(parent, name)
        self._children.setdefault(parent, {})[name] = ino
        if self._parent[ino] == _GONE:
            self._parent[ino] = parent
            self._names[ino] = name
        else:
            self.aliases.setdefault(ino, []).append((parent, name))

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
        names = self._children.get(parent)
        if names is None:
            names = self._children[parent] = {}
        ino = names.get(name)
        if ino is not None:
            return ino
        if self._free:
            ino = self._free.pop()
            self._parent[ino] = parent
            self._lookups[ino] = 0
            self._names[ino] = name
        else:
            ino = len(self._names)
            self._parent.append(parent)
            self._lookups.append(0)
            self._names.append(name)
        names[name] = ino
        return ino

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

    def _unlink_name(self, ino: int) -> None:
        parent = self._parent[ino]
        names = self._children.get(parent)
        if names is not None:
            names.pop(self._names[ino], None)  # type: ignore[arg-type]
            if not names:
                del self._children[parent]

    def _release(self, ino: int) -> None:
        for parent, name in self.aliases.pop(ino, ()):
            names = self._children.get(parent)
            if names is not None and names.get(name) == ino:
                del names[name]
                if not names:
                    del self._children[parent]
        self._names[ino] = None
        self._parent[ino] = _GONE
        self._lookups[ino] = 0
        self.cache_sig.pop(ino, None)
        self._free.append(ino)

    def drop_unreferenced(self, ino: int) -> None:
        """Forget *ino* if the kernel holds no reference (a readdir entry not sent)."""
        if ino != ROOT and self.known(ino) and self._lookups[ino] <= 0 \
                and ino not in self._children:
            self._unlink_name(ino)
            self._release(ino)

    def _drop_alias(self, ino: int, parent: int, name: str) -> bool:
        """Remove (parent, name) from the names of *ino*; True if it had others."""
        others = self.aliases.get(ino)
        if not others:
            return False
        if (self._parent[ino], self._names[ino]) == (parent, name):
            self._parent[ino], self._names[ino] = others.pop()
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
        names = self._children.get(parent)
        ino = names.pop(name, None) if names is not None else None
        if ino is not None and not names:
            del self._children[parent]
        return ino

    def detach(self, parent: int, name: str) -> None:
        """The name is gone (unlink, rmdir, replaced by a rename)."""
        ino = self._pop_name(parent, name)
        if ino is None:
            return
        if self._drop_alias(ino, parent, name):
            return
        self._parent[ino] = _GONE
        if self._lookups[ino] <= 0:
            self._release(ino)

    def move(self, parent: int, name: str, new_parent: int, new_name: str) -> None:
        self.detach(new_parent, new_name)
        ino = self._pop_name(parent, name)
        if ino is None:
            return
        if self._drop_alias(ino, parent, name):
            self.aliases.setdefault(ino, []).append((new_parent, new_name))
        else:
            self._parent[ino] = new_parent
            self._names[ino] = new_name
        self._children.setdefault(new_parent, {})[new_name] = ino

    def forget(self, ino: int, count: int) -> None:
        if ino == ROOT or not self.known(ino):
            return
        self._lookups[ino] -= count
        if self._lookups[ino] <= 0:
            if self._parent[ino] != _GONE:
                self._unlink_name(ino)
            self._release(ino)
