"""Store.remove: whatever is at a name goes, beneath the store, links never followed."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from compatfs.backing import Store


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
