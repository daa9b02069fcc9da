"""compatfs.kernelcache without a kernel: what the worker thread may touch."""

from __future__ import annotations

import os
import threading
from pathlib import Path

import trio

from compatfs import kernelcache
from compatfs.inodes import ROOT, InodeTable
from compatfs.kernelcache import KernelCache
from compatfs.migration import Switch
from compatfs.stores import Store


class OneStoreView:
    """A view whose every name is in one store."""

    def __init__(self, store: Store) -> None:
        self.store = store

    def locate(self, vpath: str) -> tuple[Store, str, None]:
        return self.store, vpath, None


async def test_a_tree_walk_reads_the_inode_table_only_in_the_event_loop(tmp_path: Path,
                                                                        monkeypatch):
    """The table is no thread-safe structure (its hash table grows and its
    names are repacked while the loop serves lookups): a walk that read it from
    the worker thread missed names the kernel holds, or raised IndexError."""
    root = tmp_path / "store"
    (root / "d" / "e").mkdir(parents=True)
    (root / "d" / "f").write_bytes(b"")
    (root / "d" / "e" / "g").write_bytes(b"")
    inodes = InodeTable()
    d = inodes.lookup(ROOT, "d")
    e, f = inodes.lookup(d, "e"), inodes.lookup(d, "f")
    g = inodes.lookup(e, "g")
    threads = set()
    real_find = inodes.find

    def find(parent: int, name: str) -> int | None:
        threads.add(threading.get_ident())
        return real_find(parent, name)

    monkeypatch.setattr(inodes, "find", find)
    told: list[int] = []
    monkeypatch.setattr(kernelcache, "forget_attributes",
                        lambda ino, pages=False: told.append(ino))
    store = Store("img", str(root), os.open(root, os.O_RDONLY | os.O_DIRECTORY))
    try:
        cache = KernelCache(inodes, OneStoreView(store))  # type: ignore[arg-type]
        async with trio.open_nursery() as nursery:
            nursery.start_soon(cache.run)
            cache.changed("d", Switch.COPIED)
            await cache.told()
            nursery.cancel_scope.cancel()
    finally:
        store.close()
    assert sorted(told) == sorted([d, e, f, g])
    assert threads == {threading.get_ident()}

