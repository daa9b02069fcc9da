"""The migration package without root and without FUSE: plain directories under tmp_path.

A :class:`~compatfs.migration.Migrator` moves the demo device's legacy objects
into the new layout and :class:`~compatfs.migration.Rollback` moves them back;
:class:`~compatfs.migration.DirtyLog` and :class:`~compatfs.migration.LiveChanges`
on their own; and :func:`~compatfs.migration.recover` on a record left in each
state a crash can leave a move in (renaming, copying, copied, switched,
rolling-back). Nothing here needs privileges: no mount, no loop device, no
fscrypt (``require_encrypted=False``).
"""

from __future__ import annotations

import dataclasses
import errno
import hashlib
import os
from collections.abc import Iterator
from pathlib import Path

import pytest
import trio

from compatfs.backing import Backing
from compatfs.config import Migration
from compatfs.enums import State, StoreKey
from compatfs.index import Index
from compatfs.indexformat import Record
from compatfs.layout import Layout
from compatfs.migration import (
    DIRTY_BLOCK,
    DirtyLog,
    LiveChanges,
    Migrator,
    Rollback,
    Steps,
    recover,
)
from compatfs.migration.faults import Faults
from compatfs.migration.steps import signature, tmp_place
from compatfs.resolver import Resolver
from compatfs.testing import devicegen
from compatfs.view import View

VIEWS = ("img", "downloads")


@pytest.fixture(autouse=True)
def _no_fault_hook(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("COMPATFS_FAULT", "COMPATFS_FAULT_MODE", "COMPATFS_FAULT_SKIP",
                 "COMPATFS_FAULT_TIMES"):
        monkeypatch.delenv(name, raising=False)


def digest(path: Path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def legacy_files(root: Path) -> dict[str, str]:
    """view path -> sha256 of every regular file in the legacy views."""
    out = {}
    for view in VIEWS:
        base = root / view
        for dirpath, _, files in os.walk(base):
            for name in files:
                p = Path(dirpath) / name
                if p.is_file() and not p.is_symlink():
                    out[f"{view}/{p.relative_to(base)}"] = digest(p)
    return out


class Device:
    """The demo device on a plain tree, opened as ``compatfs migrate --now`` does."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.layout = Layout(str(root))
        self.backing = Backing.open(self.layout, VIEWS, True, False)
        self.index = Index.open_in(self.layout.path("state"))
        self.view = View(self.layout, self.backing, self.index, Resolver(self.layout),
                         "migrate", VIEWS)

    def migrator(self, **settings: object) -> Migrator:
        return Migrator(self.view, Migration(**settings), None, {})  # type: ignore[arg-type]

    def close(self) -> None:
        self.index.close()
        self.backing.close()


@pytest.fixture
def device(tmp_path: Path) -> Iterator[Device]:
    root = tmp_path / "persist"
    root.mkdir()
    devicegen.make_demo(str(root))
    dev = Device(root)
    try:
        yield dev
    finally:
        dev.close()


# -- a whole migration, and back --------------------------------------------------------------

def test_a_migrator_moves_the_legacy_volumes_into_the_new_layout(device: Device) -> None:
    before = legacy_files(device.root)
    m = device.migrator(throttle_mib_per_s=0.0, reserve_percent=0)
    progress = trio.run(m.run_once)
    assert progress.objects_total > 0 and progress.objects_done == progress.objects_total
    assert progress.failed == 0 and progress.faults == 0 and m.failures() == {}
    moved = {r.view: r for r in device.index.records.values()}
    assert moved and {r.state for r in moved.values()} == {State.NEW}
    for vpath, rec in moved.items():
        top, _, rest = vpath.partition("/")
        assert rec.store != top, rec                      # placed outside the legacy store
        assert not (device.root / top / rest).exists(), vpath
        store = device.backing.get(rec.store)
        placed = Path(store.path) / rec.rel
        if vpath in before:                               # the same bytes, at the new place
            assert digest(placed) == before[vpath], vpath
    # what did not move is still served from where it was, unchanged
    for vpath, sha in before.items():
        if vpath not in moved:
            assert digest(device.root / vpath) == sha, vpath
    # nothing half-made is left: a second pass has nothing to do
    again = trio.run(m.run_once)
    assert again.objects_total == 0


def test_a_rollback_brings_every_switched_volume_back(device: Device) -> None:
    before = legacy_files(device.root)
    m = device.migrator(throttle_mib_per_s=0.0, reserve_percent=0)
    trio.run(m.run_once)
    placed = [Path(device.backing.get(r.store).path) / r.rel
              for r in device.index.records.values()]
    assert placed and all(p.exists() for p in placed)
    moved, problems = trio.run(Rollback(m).run)
    assert problems == [] and moved == len(placed)
    assert device.index.records == {}
    assert not any(p.exists() for p in placed)
    assert legacy_files(device.root) == before


# -- the dirty log ----------------------------------------------------------------------------

def test_a_dirty_log_merges_neighbouring_blocks_and_starts_again() -> None:
    d = DirtyLog()
    assert not d.pending and d.take() == (None, [])
    d.write(b"a", 0)
    d.add(DIRTY_BLOCK, DIRTY_BLOCK + 1)                  # spans blocks 1 and 2
    d.write(b"b" * 10, 5 * DIRTY_BLOCK - 5)              # blocks 4 and 5
    assert d.touched and d.pending and d.bytes == 5 * DIRTY_BLOCK
    assert d.take() == (None, [(0, 3 * DIRTY_BLOCK), (4 * DIRTY_BLOCK, 2 * DIRTY_BLOCK)])
    assert not d.pending and d.touched


def test_a_shrink_forgets_the_blocks_above_it_and_the_lowest_size_is_kept() -> None:
    d = DirtyLog()
    d.write(b"x", 10 * DIRTY_BLOCK)
    d.write(b"x", 2 * DIRTY_BLOCK)
    d.resize(3 * DIRTY_BLOCK)
    assert d.blocks == {2}
    d.resize(20 * DIRTY_BLOCK)                            # growing keeps the lower size
    assert d.take() == (3 * DIRTY_BLOCK, [(2 * DIRTY_BLOCK, DIRTY_BLOCK)])


def test_apply_gives_the_copy_the_size_first_then_the_blocks(tmp_path: Path) -> None:
    src = tmp_path / "src"
    src.write_bytes(b"s" * (3 * DIRTY_BLOCK))
    dst = tmp_path / "dst"
    dst.write_bytes(b"old" * (2 * DIRTY_BLOCK))          # longer, and stale
    d = DirtyLog()
    d.resize(DIRTY_BLOCK // 2)                            # cut: stale bytes above go
    d.write(b"s", 2 * DIRTY_BLOCK)
    sfd, dfd = os.open(src, os.O_RDONLY), os.open(dst, os.O_RDWR)
    try:
        DirtyLog.apply(sfd, dfd, *d.take())
    finally:
        os.close(sfd)
        os.close(dfd)
    got = dst.read_bytes()
    assert len(got) == 3 * DIRTY_BLOCK
    assert got[:DIRTY_BLOCK // 2] == (b"old" * DIRTY_BLOCK)[:DIRTY_BLOCK // 2]
    assert got[DIRTY_BLOCK // 2:2 * DIRTY_BLOCK] == bytes(2 * DIRTY_BLOCK - DIRTY_BLOCK // 2)
    assert got[2 * DIRTY_BLOCK:] == b"s" * DIRTY_BLOCK


def test_a_mirrored_write_reaches_the_copy_and_a_refusal_is_kept(tmp_path: Path) -> None:
    d = DirtyLog()
    fd = os.open(tmp_path / "copy", os.O_RDWR | os.O_CREAT, 0o600)
    try:
        d.mirror = fd
        d.write(b"hello", 7)
        assert os.pread(fd, 12, 0) == bytes(7) + b"hello" and not d.blocks
    finally:
        os.close(fd)
    d.write(b"lost", 0)                                   # a closed mirror: kept, not raised
    assert isinstance(d.mirror_error, OSError) and d.mirror_error.errno == errno.EBADF
    d.write(b"more", 0)                                   # and nothing else is tried
    assert d.mirror_error.errno == errno.EBADF


# -- the change observer ------------------------------------------------------------------

def test_live_changes_reach_only_the_files_and_trees_being_copied() -> None:
    dirty: dict[tuple[int, int], DirtyLog] = {}
    trees: dict[str, bool] = {}
    opened: list[str] = []
    changes = LiveChanges(dirty, trees, opened.append)
    assert not changes.following
    changes.wrote((1, 2), b"x", 0)                        # nothing followed: ignored
    changes.resized((1, 2), 0)
    log = dirty[(1, 2)] = DirtyLog()
    assert changes.following
    changes.wrote((1, 3), b"x", 0)                        # another file
    assert not log.touched
    changes.wrote((1, 2), b"x", DIRTY_BLOCK)
    changes.resized((1, 2), 5)
    assert log.blocks == set() and log.shrunk_to == 5 and log.touched
    del dirty[(1, 2)]
    trees["prepared/a"] = False
    assert changes.following
    changes.changing("prepared/ab/x")                     # a sibling sharing a prefix
    assert trees == {"prepared/a": False}
    changes.changing("prepared/a/rootfs/f")
    assert trees == {"prepared/a": True}
    changes.opened("img/v.img")
    assert opened == ["img/v.img"]


# -- recovery of a record left in each state --------------------------------------------------

class Plain:
    """One legacy file ``img/v.img`` and the vault volumes store, on a plain tree."""

    SRC = "img/v.img"
    DST = "v.raw"
    DATA = b"legacy bytes " * 1000

    def __init__(self, root: Path) -> None:
        (root / "img").mkdir(parents=True)
        self.legacy = root / "img" / "v.img"
        self.legacy.write_bytes(self.DATA)
        layout = Layout(str(root))
        self.backing = Backing.open(layout, ("img",), create_new=True, require_encrypted=False)
        self.index = Index(None)
        self.view = View(layout, self.backing, self.index, Resolver(layout), "migrate",
                         ("img",))
        self.dst = self.backing.get(StoreKey.VAULT_VOLUMES)
        self.target = Path(self.dst.path) / self.DST

    def record(self, state: State, **fields: object) -> None:
        rec = Record(self.SRC, "img", "v.img", "vm-volume", state,
                     target_store=StoreKey.VAULT_VOLUMES, target_rel=self.DST)
        self.index.put(dataclasses.replace(rec, **fields))  # type: ignore[arg-type]

    def temporary(self, data: bytes) -> Path:
        self.dst.staging.make()
        store, name = tmp_place(self.dst, self.DST)
        path = Path(store.path) / name
        path.write_bytes(data)
        return path

    def recover(self) -> list[str]:
        return recover(self.view, Steps(self.backing, self.index, Faults()))


@pytest.fixture
def plain(tmp_path: Path) -> Iterator[Plain]:
    p = Plain(tmp_path)
    try:
        yield p
    finally:
        p.backing.close()


def test_recovery_of_a_rename_that_had_not_happened(plain: Plain) -> None:
    plain.record(State.RENAMING)
    assert plain.recover() == [f"{plain.SRC}: an interrupted rename had not happened; stays"]
    assert plain.index.get(plain.SRC) is None and plain.legacy.read_bytes() == plain.DATA
    assert plain.recover() == []


def test_recovery_of_a_rename_that_had_happened(plain: Plain) -> None:
    plain.record(State.RENAMING)
    plain.legacy.rename(plain.target)
    assert plain.recover() == [f"{plain.SRC}: finished an interrupted rename"]
    rec = plain.index.get(plain.SRC)
    assert rec is not None and (rec.store, rec.rel, rec.state) == \
        (StoreKey.VAULT_VOLUMES, plain.DST, State.NEW)
    assert rec.target_store is None


def test_recovery_of_an_interrupted_copy_drops_the_temporary(plain: Plain) -> None:
    plain.record(State.COPYING)
    tmp = plain.temporary(plain.DATA[:100])
    assert plain.recover() == [f"{plain.SRC}: dropped an interrupted copy; it will start again"]
    assert not tmp.exists() and not plain.target.exists()
    assert plain.index.get(plain.SRC) is None and plain.legacy.read_bytes() == plain.DATA


def test_recovery_of_a_finished_copy_switches_to_it(plain: Plain) -> None:
    plain.record(State.COPIED, sig=signature(plain.legacy.lstat()))
    tmp = plain.temporary(plain.DATA)
    assert plain.recover() == [f"{plain.SRC}: switched to its finished copy"]
    assert not tmp.exists() and not plain.legacy.exists()
    assert plain.target.read_bytes() == plain.DATA
    rec = plain.index.get(plain.SRC)
    assert rec is not None and (rec.store, rec.state) == (StoreKey.VAULT_VOLUMES, State.NEW)


def test_recovery_of_a_finished_copy_whose_source_changed_drops_it(plain: Plain) -> None:
    plain.record(State.COPIED, sig=signature(plain.legacy.lstat()))
    tmp = plain.temporary(plain.DATA)
    plain.legacy.write_bytes(b"written after the copy")
    assert plain.recover() == \
        [f"{plain.SRC}: its source changed after the copy; the copy was dropped"]
    assert not tmp.exists() and not plain.target.exists()
    assert plain.index.get(plain.SRC) is None
    assert plain.legacy.read_bytes() == b"written after the copy"


def test_recovery_after_the_switch_removes_the_legacy_original(plain: Plain) -> None:
    plain.target.write_bytes(plain.DATA)
    plain.index.put(Record(plain.SRC, StoreKey.VAULT_VOLUMES, plain.DST, "vm-volume",
                           State.SWITCHED, target_store="img", target_rel="v.img",
                           sig=signature(plain.legacy.lstat())))
    assert plain.recover() == [f"{plain.SRC}: removed the legacy original after the switch"]
    assert not plain.legacy.exists() and plain.target.read_bytes() == plain.DATA
    rec = plain.index.get(plain.SRC)
    assert rec is not None and rec.state == State.NEW


@pytest.mark.parametrize("moved_back", [True, False])
def test_recovery_of_an_interrupted_rollback(plain: Plain, moved_back: bool) -> None:
    plain.target.write_bytes(plain.DATA)
    if not moved_back:
        plain.legacy.unlink()
    plain.index.put(Record(plain.SRC, StoreKey.VAULT_VOLUMES, plain.DST, "vm-volume",
                           State.ROLLING_BACK, target_store="img", target_rel="v.img"))
    done = plain.recover()
    rec = plain.index.get(plain.SRC)
    if moved_back:      # both copies: the move back happened; finished as rollback would
        assert done == [f"{plain.SRC}: finished an interrupted rollback"]
        assert rec is None and not plain.target.exists()
        assert plain.legacy.read_bytes() == plain.DATA
    else:               # the move back had not happened: served from the new copy again
        assert done == [f"{plain.SRC}: an interrupted rollback was undone; served from "
                        f"{StoreKey.VAULT_VOLUMES}"]
        assert rec is not None and (rec.store, rec.state) == (StoreKey.VAULT_VOLUMES, State.NEW)
        assert plain.target.read_bytes() == plain.DATA
    assert plain.recover() == []
