"""Store.remove: whatever is at a name goes, beneath the store, links never followed."""

from __future__ import annotations

import errno
import os
from pathlib import Path

import pytest

from compatfs.backing import Backing, VaultNotEncrypted
from compatfs.layout import Layout
from compatfs.scan import SET_ASIDE_DIR
from compatfs.stores import Store


@pytest.fixture
def store(tmp_path: Path):
    (tmp_path / "s").mkdir()
    s = Store("test", str(tmp_path / "s"), os.open(tmp_path / "s", os.O_RDONLY | os.O_DIRECTORY))
    yield s
    s.close()


def test_remove_a_file_a_tree_and_nothing(store: Store, tmp_path: Path) -> None:
    base = tmp_path / "s"
    (base / "d").mkdir()
    (base / "d" / "f").write_bytes(b"x")
    tree = base / "d" / "tree"
    (tree / "a" / "b").mkdir(parents=True)
    (tree / "a" / "b" / "file").write_bytes(b"y")
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "keep").write_bytes(b"keep")
    os.symlink(outside, tree / "a" / "link-out")        # removed, never followed
    assert store.remove("d/f") is True and not (base / "d" / "f").exists()
    assert store.remove("d/tree") is True and not tree.exists()
    assert (outside / "keep").read_bytes() == b"keep"
    assert store.remove("d/tree") is False
    assert store.remove("missing/below") is False
    assert (base / "d").is_dir()


def test_remove_does_not_go_through_a_symbolic_link(store: Store, tmp_path: Path) -> None:
    outside = tmp_path / "outside"
    (outside / "victim").mkdir(parents=True)
    os.symlink(outside, tmp_path / "s" / "link")
    with pytest.raises(OSError):
        store.remove("link/victim")
    assert (outside / "victim").is_dir()
    assert store.remove("link") is True                  # the link itself goes
    assert (outside / "victim").is_dir()


def test_makedirs_returns_what_it_made_and_remove_made_takes_it_back(store: Store,
                                                                     tmp_path: Path) -> None:
    base = tmp_path / "s"
    (base / "a").mkdir()
    made = store.makedirs("a/b/c", 0o700)
    assert made == ["a/b", "a/b/c"]
    (base / "a" / "b" / "c" / "keep").write_bytes(b"k")
    store.remove_made(made)                    # not empty: left alone, no error
    assert (base / "a" / "b" / "c" / "keep").exists()
    os.unlink(base / "a" / "b" / "c" / "keep")
    store.remove_made(made)
    assert sorted(os.listdir(base)) == ["a"] and os.listdir(base / "a") == []


def test_makedirs_that_fails_half_way_leaves_nothing(store: Store, tmp_path: Path) -> None:
    base = tmp_path / "s"
    (base / "a").mkdir()
    with pytest.raises(OSError) as e:                    # a/made is made, then ENAMETOOLONG
        store.makedirs("a/made/" + "n" * 300, 0o700)
    assert e.value.errno == errno.ENAMETOOLONG
    assert os.listdir(base / "a") == []                  # a/made went again; a was there


def test_move_aside_keeps_the_object_and_is_idempotent(store: Store, tmp_path: Path) -> None:
    base = tmp_path / "s"
    (base / "d").mkdir()
    (base / "d" / "v").write_bytes(b"old")
    where = store.move_aside("d/v")
    assert where.startswith(SET_ASIDE_DIR + "/d%v.")
    assert (base / where).read_bytes() == b"old" and not (base / "d" / "v").exists()
    assert store.move_aside("d/v", where) == where      # a repeat after a crash: done
    assert (base / where).read_bytes() == b"old"


def test_a_refused_plain_vault_is_left_as_it_was(tmp_path: Path) -> None:
    root = tmp_path / "persist"
    (root / "vault").mkdir(parents=True)
    (root / "vault" / "mine").write_bytes(b"operator's")
    before = sorted(os.listdir(root)), sorted(os.listdir(root / "vault"))
    with pytest.raises(VaultNotEncrypted):
        Backing.open(Layout(str(root)), ("img", "downloads"), create_new=True,
                     require_encrypted=True)
    assert (sorted(os.listdir(root)), sorted(os.listdir(root / "vault"))) == before
    # no vault at all: the root decides (not encrypted), and nothing is made either
    os.unlink(root / "vault" / "mine")
    os.rmdir(root / "vault")
    with pytest.raises(VaultNotEncrypted):
        Backing.open(Layout(str(root)), ("img",), create_new=True, require_encrypted=True)
    assert os.listdir(root) == []
    # allowed when not required: the locations are made
    Backing.open(Layout(str(root)), ("img",), create_new=True, require_encrypted=False).close()
    assert (root / "vault" / "volumes").is_dir()
