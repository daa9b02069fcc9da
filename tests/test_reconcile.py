"""A legacy copy beside a placed one: the newer is served, the other set aside.

A boot whose vault stays locked serves stage observe without the index (it
lives in the vault), so an agent re-creates its volume in the legacy store
and writes to it; the next start with the vault unlocked finds both copies
of one name. :meth:`View.recover` (before serving) keeps the newer (mtime,
then ctime; for a container volume the newest below it) and sets the other
aside, recorded first so a crash in between is finished at the next start.
First on the namespace alone, then through real views on an fscrypt vault
that is locked and unlocked for real.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import pytest

from compatfs import fscrypt
from compatfs.enums import State
from compatfs.index import DB_NAME
from compatfs.migration import recover
from compatfs.scan import SET_ASIDE_DIR
from compatfs.stores import Store
from compatfs.testing import devicegen

from .conftest import run_cli
from .devices import ext4_image, make_vault
from .mounting import mounted
from .test_view import (  # noqa: F401
    OBJ,
    device,
    layout_rules,
    mkdirs,
    on_disk,
    read,
    reopen,
    views,
    write_new,
)

HOUR = 3600 * 10**9


def age(path: Path, ns: int) -> None:
    os.utime(path, ns=(ns, ns), follow_symlinks=False)


def aside(directory: Path) -> list[Path]:
    """What compatfs set aside from the store at *directory*: in the store for a
    legacy one, in vault/compatfs/set-aside/<store> for the vault's volumes."""
    if directory.parts[-2:] == ("vault", "volumes"):
        d = directory.parent / "compatfs/set-aside/vault_volumes"
        assert not (directory / SET_ASIDE_DIR).exists()
    else:
        d = directory / SET_ASIDE_DIR
    return sorted(d.iterdir()) if d.exists() else []


def test_an_older_legacy_copy_is_set_aside(device, views, tmp_path):
    db = str(tmp_path / DB_NAME)
    view = views("redirect", db)
    web0 = f"img/{device.web.legacy_name(0)}"
    write_new(view, web0, b"placed, newer")
    legacy = device.root / "img" / device.web.legacy_name(0)
    legacy.write_bytes(b"legacy, older")
    age(legacy, time.time_ns() - HOUR)
    done = recover(view)
    assert len(done) == 1 and "set img/" in done[0], done
    assert read(view, web0) == b"placed, newer"
    assert not legacy.exists()
    [kept] = aside(device.root / "img")
    assert kept.read_bytes() == b"legacy, older"
    rec = on_disk(db)[web0]
    assert (rec.store, rec.state, rec.target_store) == ("vault_volumes", "new", None)
    assert "older legacy copy" in rec.reason and str(kept.name) in rec.reason
    assert sorted(view.listdir("img")) == sorted([SET_ASIDE_DIR, device.web.legacy_name(0)])
    assert recover(reopen(views, db)) == []                     # idempotent


def test_a_newer_legacy_copy_is_served_and_the_placed_one_set_aside(device, views, tmp_path):
    db = str(tmp_path / DB_NAME)
    view = views("redirect", db)
    web0 = f"img/{device.web.legacy_name(0)}"
    write_new(view, web0, b"placed, older")
    placed = device.root / "vault" / "volumes" / device.vol(device.web)
    age(placed, time.time_ns() - HOUR)
    (device.root / "img" / device.web.legacy_name(0)).write_bytes(b"legacy, newer")
    recover(view)
    assert read(view, web0) == b"legacy, newer"
    [kept] = aside(device.root / "vault" / "volumes")
    assert kept.read_bytes() == b"placed, older" and not placed.exists()
    rec = on_disk(db)[web0]
    assert (rec.store, rec.rel, rec.state) == ("img", device.web.legacy_name(0), State.LEGACY)
    assert (rec.prev_store, rec.target_store) == (None, None)
    assert "newer legacy copy" in rec.reason and kept.name in rec.reason
    assert view.listdir("img").count(device.web.legacy_name(0)) == 1
    # the kept legacy name behaves as a legacy one: a rename takes it along
    view.rename(web0, "img/renamed.raw")
    assert read(view, "img/renamed.raw") == b"legacy, newer"
    assert view.index.get(web0) is None and view.index.get("img/renamed.raw") is None
    assert recover(reopen(views, db)) == []


@pytest.mark.parametrize("planted", ["symlink", "fifo"])
def test_a_special_file_at_the_legacy_name_never_wins(device, views, tmp_path, planted):
    """A newer symbolic link (out of the root) or FIFO at a placed name is not a
    copy of it: the placed copy stays served and the planted file is set aside."""
    db = str(tmp_path / DB_NAME)
    view = views("redirect", db)
    web0 = f"img/{device.web.legacy_name(0)}"
    write_new(view, web0, b"placed")
    placed = device.root / "vault" / "volumes" / device.vol(device.web)
    age(placed, time.time_ns() - HOUR)
    legacy = device.root / "img" / device.web.legacy_name(0)
    if planted == "symlink":
        os.symlink("/etc/shadow", legacy)
    else:
        os.mkfifo(legacy)
    done = recover(view)
    assert len(done) == 1, done
    assert read(view, web0) == b"placed" and placed.exists()
    assert not os.path.lexists(legacy)
    [kept] = aside(device.root / "img")
    assert kept.is_symlink() if planted == "symlink" else kept.is_fifo()
    rec = on_disk(db)[web0]
    assert (rec.store, rec.state) == ("vault_volumes", "new")
    kind = "symbolic link" if planted == "symlink" else "FIFO"
    assert f"a {kind} at its legacy path" in rec.reason, rec.reason
    assert recover(reopen(views, db)) == []


@pytest.mark.parametrize("changed_last", ["legacy", "placed"])
def test_on_equal_mtimes_the_later_ctime_wins(device, views, tmp_path, changed_last):
    view = views("redirect", str(tmp_path / DB_NAME))
    web0 = f"img/{device.web.legacy_name(0)}"
    write_new(view, web0, b"placed")
    legacy = device.root / "img" / device.web.legacy_name(0)
    legacy.write_bytes(b"legacy")
    placed = device.root / "vault" / "volumes" / device.vol(device.web)
    first, last = (placed, legacy) if changed_last == "legacy" else (legacy, placed)
    age(first, 10**18)
    time.sleep(0.05)                 # ctime has the kernel's coarse clock
    age(last, 10**18)
    recover(view)
    assert read(view, web0) == changed_last.encode()


def test_a_container_volume_is_judged_by_the_newest_thing_in_it(device, views, tmp_path):
    db = str(tmp_path / DB_NAME)
    view = views("redirect", db)
    vol = f"prepared/{device.pod.legacy_name(0, container=True)}"
    view.mkdir(vol, 0o755)
    placed = device.root / "vault" / "volumes" / device.vol(device.pod)
    (placed / "rootfs").mkdir()
    (placed / "rootfs" / "old").write_bytes(b"placed")
    legacy = device.root / "runx" / "pods" / "prepared" / device.pod.legacy_name(0, container=True)
    (legacy / "rootfs").mkdir(parents=True)
    (legacy / "rootfs" / "new").write_bytes(b"legacy")
    long_ago = time.time_ns() - HOUR
    for p in (placed / "rootfs" / "old", placed / "rootfs", placed):
        age(p, long_ago)
    age(legacy, long_ago - HOUR)      # the directory itself is older: what is in it counts
    recover(view)
    assert read(view, f"{vol}/rootfs/new") == b"legacy"
    [kept] = aside(device.root / "vault" / "volumes")
    assert (kept / "rootfs" / "old").read_bytes() == b"placed"


class Crash(BaseException):
    pass


@pytest.mark.parametrize("legacy_newer", [False, True])
def test_a_crash_between_record_and_move_is_finished_at_the_next_start(
        device, views, tmp_path, monkeypatch, legacy_newer):
    db = str(tmp_path / DB_NAME)
    view = views("redirect", db)
    web0 = f"img/{device.web.legacy_name(0)}"
    write_new(view, web0, b"placed")
    placed = device.root / "vault" / "volumes" / device.vol(device.web)
    legacy = device.root / "img" / device.web.legacy_name(0)
    legacy.write_bytes(b"legacy")
    age(placed if legacy_newer else legacy, time.time_ns() - HOUR)

    def die(*a, **k):
        raise Crash()

    monkeypatch.setattr(Store, "move_aside", die)
    with pytest.raises(Crash):
        recover(view)
    monkeypatch.undo()
    rec = on_disk(db)[web0]
    assert rec.target_rel and rec.target_rel.startswith(SET_ASIDE_DIR)   # the intent, on disk
    again = reopen(views, db)
    done = recover(again)
    assert len(done) == 1 and "aside" in done[0], done
    assert read(again, web0) == (b"legacy" if legacy_newer else b"placed")
    loser_dir = device.root / ("vault/volumes" if legacy_newer else "img")
    [kept] = aside(loser_dir)
    assert kept.read_bytes() == (b"placed" if legacy_newer else b"legacy")
    rec = on_disk(db)[web0]
    assert rec.target_store is None and rec.prev_store is None and rec.reason
    assert recover(reopen(views, db)) == []


# -- for real: a vault locked at boot, then unlocked ---------------------------------------

def lock(root: Path) -> None:
    fd = os.open(root / "vault", os.O_RDONLY | os.O_DIRECTORY)
    try:
        identifier = fscrypt.policy_of(fd)[8:24]
    finally:
        os.close(fd)
    mfd = os.open(root, os.O_RDONLY | os.O_DIRECTORY)
    try:
        fscrypt.remove_key(mfd, identifier)
    finally:
        os.close(mfd)
    fd = os.open(root / "vault", os.O_RDONLY | os.O_DIRECTORY)
    try:
        assert fscrypt.key_present(fd) is False
    finally:
        os.close(fd)


def unlock(root: Path, key: bytes) -> None:
    mfd = os.open(root, os.O_RDONLY | os.O_DIRECTORY)
    try:
        fscrypt.add_key(mfd, key)
    finally:
        os.close(mfd)


def status_of(root: Path, run: Path, config: Path, legacy: str) -> dict:
    proc = run_cli("status", "--root", str(root), "--run-dir", str(run), "--config",
                   str(config), "--json")
    assert proc.returncode == 0, proc.stderr
    found = [o for o in json.loads(proc.stdout)["objects"] if o["legacy"] == legacy]
    assert len(found) == 1, found
    return found[0]


@pytest.mark.root
@pytest.mark.parametrize("legacy_newer", [True, False])
def test_writes_during_a_locked_vault_boot_are_not_shadowed(tmp_path, legacy_newer):
    (tmp_path / "dev").mkdir()
    config = tmp_path / "c.yaml"
    config.write_text("vault_wait_s: 0\n")
    run = tmp_path / "run"
    key = os.urandom(fscrypt.RAW_KEY_SIZE)
    with ext4_image(tmp_path / "dev", size_mb=128) as root:
        make_vault(root, "vault", key)
        (root / "novault").mkdir()
        apps = devicegen.make_demo(str(root))
        fresh = next(a for a in apps if a.name == "fresh")
        name = fresh.legacy_name(0)
        vault_copy = root / "vault" / "volumes" / \
            f"{fresh.drives[0].volume_uuid}#{fresh.drives[0].generation}.{fresh.drives[0].fmt}"
        # 1. redirect: volumemgr creates the volume; it is placed in the vault
        with mounted(root, run, stage="redirect", config=config):
            (root / "img" / name).write_bytes(b"vault v1")
        assert vault_copy.read_bytes() == b"vault v1"
        assert not (root / "img" / name).exists()
        # 2. a boot with the vault locked: observe, no index; the agent re-creates it
        lock(root)
        with mounted(root, run, stage="redirect", config=config) as m:
            assert os.getxattr(root / "img" / ".compatfs", "user.compatfs.stage") == b"observe"
            assert not (root / "img" / name).exists()
            (root / "img" / name).write_bytes(b"agent v2, written while locked")
            assert "serving in stage observe" in m.log_text()
        assert (root / "img" / name).read_bytes() == b"agent v2, written while locked"
        if not legacy_newer:      # the opposite order: the legacy copy is the older one
            os.utime(root / "img" / name, ns=(10**18, 10**9))
        # 3. unlocked again, redirect: both copies exist; the newer is served
        unlock(root, key)
        with mounted(root, run, stage="redirect", config=config) as m:
            got = (root / "img" / name).read_bytes()
            log = m.log_text()
        want, lost = (b"agent v2, written while locked", b"vault v1") if legacy_newer \
            else (b"vault v1", b"agent v2, written while locked")
        assert got == want
        assert "both a legacy copy and a copy in vault_volumes exist" in log
        loser_dir = root / "vault" / "volumes" if legacy_newer else root / "img"
        [kept] = aside(loser_dir)
        assert kept.read_bytes() == lost
        st = status_of(root, run, config, f"img/{name}")
        assert st["reason"] and kept.name in st["reason"], st
        assert st["state"] == ("legacy" if legacy_newer else "new"), st
        # 4. and stage migrate moves the agent's copy into the vault
        if legacy_newer:
            with mounted(root, run, stage="migrate", config=config):
                deadline = time.monotonic() + 30
                while not vault_copy.exists() and time.monotonic() < deadline:
                    time.sleep(0.2)
                assert (root / "img" / name).read_bytes() == want
            assert vault_copy.read_bytes() == want
            assert status_of(root, run, config, f"img/{name}")["state"] == "new"
