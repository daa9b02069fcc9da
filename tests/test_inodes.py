"""The inode table (compatfs.inodes): names, hard links, forget, rename and
reuse of inode numbers, checked against a plain-dict model of the same rules,
also across the hash table's growth and the packing of its name bytes."""

from __future__ import annotations

import random

import pytest

from compatfs.inodes import ROOT, InodeTable, UnknownInode


class Model:
    """The rules, with a dict per directory: what the table must answer."""

    def __init__(self) -> None:
        self.first: dict[int, tuple[int, str]] = {ROOT: (ROOT, "")}
        self.gone: set[int] = set()   # known, but their first name removed
        self.others: dict[int, list[tuple[int, str]]] = {}
        self.dirs: dict[int, dict[str, int]] = {}
        self.refs: dict[int, int] = {ROOT: 1}

    def path(self, ino: int) -> str | None:
        parts = []
        while ino != ROOT:
            if ino in self.gone:
                return None
            parent, name = self.first[ino]
            parts.append(name)
            ino = parent
        return "/".join(reversed(parts))


def check(table: InodeTable, model: Model) -> None:
    assert len(table) == len(model.first)
    for parent, names in model.dirs.items():
        for name, ino in names.items():
            assert table.find(parent, name) == ino, (parent, name)
    for ino in model.first:
        assert table.known(ino)
        assert table.references(ino) == model.refs.get(ino, 0)
        want = model.path(ino)
        if want is None:
            with pytest.raises(FileNotFoundError):
                table.path(ino)
        else:
            assert table.path(ino) == want


def test_names_paths_and_unknown_inodes() -> None:
    t = InodeTable()
    img = t.lookup(ROOT, "img")
    sub = t.lookup(img, "sub")
    f = t.lookup(sub, "é\udcff.raw")   # an undecodable byte, as os.fsdecode gives it
    assert t.path(f) == "img/sub/é\udcff.raw" and t.path(ROOT) == ""
    assert t.find(sub, "é\udcff.raw") == f and t.find(sub, "other") is None
    assert t.find(img, "é\udcff.raw") is None      # same name, other directory
    assert t.parent_of(f) == sub and t.parent_of(ROOT) == ROOT
    with pytest.raises(UnknownInode):
        t.path(999)
    t.forget(f, 1)
    assert not t.known(f) and t.find(sub, "é\udcff.raw") is None


def test_a_directory_rename_changes_the_paths_beneath() -> None:
    t = InodeTable()
    img = t.lookup(ROOT, "img")
    a = t.lookup(img, "a")
    f = t.lookup(a, "f")
    assert t.path(f) == "img/a/f"                  # caches img/a
    t.move(img, "a", img, "b")
    assert t.path(f) == "img/b/f" and t.find(img, "a") is None and t.find(img, "b") == a
    t.detach(img, "b")
    with pytest.raises(FileNotFoundError):
        t.path(f)


def test_numbers_of_forgotten_inodes_are_reused() -> None:
    t = InodeTable()
    img = t.lookup(ROOT, "img")
    a = t.lookup(img, "a")
    t.forget(a, 1)
    b = t.lookup(img, "bbbbbbbb")
    assert b == a and t.path(b) == "img/bbbbbbbb" and t.find(img, "a") is None


def test_hard_links_share_one_inode_until_the_last_name_goes() -> None:
    t = InodeTable()
    img = t.lookup(ROOT, "img")
    ino = t.ensure_linked(img, "x", (1, 2))
    t.ref(ino)
    assert t.ensure_linked(img, "y", (1, 2)) == ino
    assert t.find(img, "y") == ino
    t.detach(img, "x")                             # the first name: y takes its place
    assert t.path(ino) == "img/y" and t.find(img, "x") is None
    t.move(img, "y", img, "z")
    assert t.path(ino) == "img/z" and t.find(img, "z") == ino
    t.forget(ino, 1)
    assert not t.known(ino) and t.find(img, "z") is None


def test_a_directory_with_entries_is_not_dropped() -> None:
    t = InodeTable()
    img = t.lookup(ROOT, "img")
    d = t.ensure(img, "d")
    t.lookup(d, "f")
    t.drop_unreferenced(d)
    assert t.known(d)
    e = t.ensure(img, "e")
    t.drop_unreferenced(e)
    assert not t.known(e) and t.find(img, "e") is None


@pytest.mark.parametrize("seed", range(6))
def test_random_operations_match_the_model(seed: int) -> None:
    rng = random.Random(seed)
    t, m = InodeTable(), Model()
    m.dirs[ROOT] = {}
    dirs = [ROOT]
    pool = [f"n{i}" for i in range(300)] + ["é", "\udcfe", "x" * 200]

    def add(parent: int, name: str, ino: int) -> None:
        m.dirs.setdefault(parent, {})[name] = ino

    def remove_name(parent: int, name: str) -> int | None:
        names = m.dirs.get(parent, {})
        ino = names.pop(name, None)
        if ino is None:
            return None
        if not names:
            m.dirs.pop(parent, None)
        others = m.others.get(ino)
        if others:
            if m.first[ino] == (parent, name) and ino not in m.gone:
                m.first[ino] = others.pop()
            elif (parent, name) in others:
                others.remove((parent, name))
            if not others:
                del m.others[ino]
            return -1
        return ino

    def drop_first(ino: int) -> None:
        parent, name = m.first[ino]
        del m.dirs[parent][name]
        if not m.dirs[parent]:
            del m.dirs[parent]

    def release(ino: int) -> None:
        for parent, name in m.others.pop(ino, []):
            if m.dirs.get(parent, {}).get(name) == ino:
                del m.dirs[parent][name]
                if not m.dirs[parent]:
                    del m.dirs[parent]
        del m.first[ino]
        m.gone.discard(ino)
        m.refs.pop(ino, None)
        if ino in dirs:
            dirs.remove(ino)

    for step in range(4000):
        op = rng.random()
        parent = rng.choice(dirs)
        name = rng.choice(pool)
        if op < 0.35:                                   # lookup
            ino = t.lookup(parent, name)
            want = m.dirs.get(parent, {}).get(name)
            if want is None:
                m.first[ino] = (parent, name)
                add(parent, name, ino)
            else:
                assert ino == want
            m.refs[ino] = m.refs.get(ino, 0) + 1
            if rng.random() < 0.2 and ino not in dirs:
                dirs.append(ino)
        elif op < 0.55:                                 # forget
            live = [i for i in m.first if i != ROOT]
            if live:
                ino = rng.choice(live)
                n = rng.randint(1, 2)
                if ino in m.dirs and m.refs.get(ino, 0) <= n:
                    continue            # the kernel holds a directory while it holds entries
                t.forget(ino, n)
                m.refs[ino] = m.refs.get(ino, 0) - n
                if m.refs[ino] <= 0:
                    if ino not in m.gone:
                        drop_first(ino)
                    release(ino)
        elif op < 0.65:                                 # unlink
            t.detach(parent, name)
            ino = remove_name(parent, name)
            if ino is not None and ino > 0:
                m.gone.add(ino)
                if m.refs.get(ino, 0) <= 0:
                    release(ino)
        elif op < 0.8:                                  # rename
            new_parent, new_name = rng.choice(dirs), rng.choice(pool)
            if new_parent == parent and new_name == name:
                continue
            ino = m.dirs.get(parent, {}).get(name)
            if ino is not None and (ino == new_parent or ino in dirs):
                continue                                # no directory under itself
            t.move(parent, name, new_parent, new_name)
            gone = remove_name(new_parent, new_name)
            if gone is not None and gone > 0:
                m.gone.add(gone)
                if m.refs.get(gone, 0) <= 0:
                    release(gone)
            if ino is None:
                continue
            aliased = ino in m.others
            remove_name(parent, name)
            if aliased:
                m.others.setdefault(ino, []).append((new_parent, new_name))
            else:
                m.first[ino] = (new_parent, new_name)
            add(new_parent, new_name, ino)
        elif op < 0.9:                                  # hard link of a file
            files = [i for i in m.first if i not in dirs and i not in m.gone]
            if not files or name in m.dirs.get(parent, {}):
                continue
            ino = rng.choice(files)
            t.add_name(ino, parent, name)
            t.ref(ino)
            add(parent, name, ino)
            m.others.setdefault(ino, []).append((parent, name))
            m.refs[ino] = m.refs.get(ino, 0) + 1
        else:                                           # readdir entry not sent
            ino = t.ensure(parent, name)
            want = m.dirs.get(parent, {}).get(name)
            if want is None:
                m.first[ino] = (parent, name)
                add(parent, name, ino)
            t.drop_unreferenced(ino)
            if m.refs.get(ino, 0) <= 0 and ino not in m.dirs and ino != ROOT:
                drop_first(ino)
                release(ino)
        if step % 97 == 0:
            check(t, m)
    check(t, m)


def test_many_names_grow_the_table_and_pack_their_bytes() -> None:
    t = InodeTable()
    img = t.lookup(ROOT, "img")
    names = [f"{i:06d}-{'v' * (i % 90)}.qcow2" for i in range(20_000)]
    inos = [t.lookup(img, n) for n in names]
    packed = len(t._blob)
    for i, ino in enumerate(inos):
        if i % 4:
            t.forget(ino, 1)                           # three quarters of the names go
    assert len(t._blob) < packed / 2                   # their bytes were packed away
    for i, n in enumerate(names):
        if i % 4:
            assert t.find(img, n) is None
        else:
            assert t.find(img, n) == inos[i] and t.path(inos[i]) == f"img/{n}"
    gone = [n for i, n in enumerate(names) if i % 4]
    again = [t.lookup(img, "new-" + n) for n in gone]
    assert sorted(again) == sorted(ino for i, ino in enumerate(inos) if i % 4)
    assert len(t) == 2 + len(names)
    assert all(t.path(ino) == f"img/new-{n}" for ino, n in zip(again, gone, strict=True))


def test_names_whose_hashes_collide_stay_apart() -> None:
    t = InodeTable()
    img = t.lookup(ROOT, "img")
    seen: dict[int, str] = {}
    i = 0
    while True:                                        # a birthday search: ~80,000 names
        name = f"c{i}"
        low = (hash(name) ^ img) & 0xFFFFFFFF          # the table's 32-bit key
        if low in seen:
            break
        seen[low] = name
        i += 1
    a, b = seen[low], name
    ia = t.lookup(img, a)
    assert t.find(img, b) is None
    ib = t.lookup(img, b)
    assert ia != ib and t.find(img, a) == ia and t.find(img, b) == ib
    t.forget(ia, 1)
    assert t.find(img, a) is None and t.find(img, b) == ib and t.path(ib) == f"img/{b}"


def test_trim_heap_is_glibcs_malloc_trim_where_there_is_one() -> None:
    import ctypes

    from compatfs import inodes
    expected = getattr(ctypes.CDLL(None), "malloc_trim", None) is not None
    assert (inodes._malloc_trim is not None) == expected
    inodes.trim_heap()                                 # callable, whatever the libc
