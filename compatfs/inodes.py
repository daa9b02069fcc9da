"""Inode numbers of the views and the kernel's lookup counts.

The views serve names from several filesystems (the legacy store, the vault,
novault), whose inode numbers may collide, so compatfs gives out its own. A
node is known by (parent inode, name); its view path is rebuilt by walking up
the parents (the views are a few levels deep). A node stays while the kernel
holds a reference (lookup count above zero), even after its name is gone,
and is dropped on the last ``forget``.
"""

from __future__ import annotations

import os

import pyfuse3

ROOT = pyfuse3.ROOT_INODE


class Node:
    __slots__ = ("ino", "parent", "name", "lookups", "cache_sig")

    def __init__(self, ino: int, parent: int, name: str) -> None:
        self.ino = ino
        self.parent = parent
        self.name = name
        self.lookups = 0
        self.cache_sig: tuple[int, int] | None = None  # (mtime_ns, size) last served


class InodeTable:
    def __init__(self) -> None:
        root = Node(ROOT, ROOT, "")
        root.lookups = 1
        self.nodes: dict[int, Node] = {ROOT: root}
        self.by_name: dict[tuple[int, str], int] = {}
        self._next = ROOT + 1

    def get(self, ino: int) -> Node:
        node = self.nodes.get(ino)
        if node is None:
            raise KeyError(ino)
        return node

    def path(self, ino: int) -> str:
        """The view path of *ino* ('' for the root)."""
        parts = []
        node = self.nodes[ino]
        while node.ino != ROOT:
            if node.parent == 0:
                raise FileNotFoundError(2, "no longer in the view")
            parts.append(node.name)
            node = self.nodes[node.parent]
        return "/".join(reversed(parts))

    def child(self, parent: int, name: str) -> Node:
        """The node named *name* in *parent*, made when new."""
        key = (parent, name)
        ino = self.by_name.get(key)
        if ino is not None:
            return self.nodes[ino]
        node = Node(self._next, parent, name)
        self._next += 1
        self.nodes[node.ino] = node
        self.by_name[key] = node.ino
        return node

    def find(self, parent: int, name: str) -> Node | None:
        ino = self.by_name.get((parent, name))
        return None if ino is None else self.nodes[ino]

    def detach(self, parent: int, name: str) -> None:
        """The name is gone (unlink, rmdir, replaced by rename)."""
        ino = self.by_name.pop((parent, name), None)
        if ino is None:
            return
        node = self.nodes[ino]
        node.parent = 0
        if node.lookups <= 0:
            del self.nodes[ino]

    def move(self, parent: int, name: str, new_parent: int, new_name: str) -> None:
        self.detach(new_parent, new_name)
        ino = self.by_name.pop((parent, name), None)
        if ino is None:
            return
        node = self.nodes[ino]
        node.parent, node.name = new_parent, new_name
        self.by_name[(new_parent, new_name)] = ino

    def forget(self, ino: int, count: int) -> None:
        node = self.nodes.get(ino)
        if node is None or ino == ROOT:
            return
        node.lookups -= count
        if node.lookups <= 0:
            self.by_name.pop((node.parent, node.name), None)
            del self.nodes[ino]


def fsname(name: bytes) -> str:
    return os.fsdecode(name)
