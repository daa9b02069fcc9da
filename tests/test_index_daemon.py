"""The index under the real daemon and ``compatfs status``: a refused index stops
``mount`` and is what ``status`` reports (exit 4); a full disk reaches an agent
as ``ENOSPC`` through a view while the daemon keeps serving; views left dead
by a killed daemon are reported as such (exit 3) with every object still listed.
"""

from __future__ import annotations

import errno
import json
import os
import random
import signal
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest

from compatfs import mounts
from compatfs.index import DB_NAME
from compatfs.indexopen import MARKER_NAME
from compatfs.status import EXIT_INDEX_REFUSED, EXIT_OK, EXIT_VIEWS_DEAD
from compatfs.testing import devicegen
from compatfs.testing.devicegen import AppDef, DriveDef

from .conftest import fill, run_cli, tmpfs
from .mounting import assert_clean_exit, mounted

pytestmark = pytest.mark.root

CONFIG = "require_encrypted_vault: false\nvault_wait_s: 0\n"


def app(rng: random.Random) -> AppDef:
    u = lambda: devicegen.random_uuid(rng)  # noqa: E731
    return AppDef(u(), "web", [DriveDef(u(), devicegen.random_sha(rng), "qcow2", volume_uuid=u()),
                               DriveDef(u(), devicegen.random_sha(rng), "raw", volume_uuid=u())])


def device(root: Path, rng: random.Random) -> tuple[AppDef, Path]:
    """A plain device tree with one app in its checkpoint; (app, config file)."""
    root.mkdir(parents=True)
    (root / "img").mkdir()
    (root / "downloads").mkdir()
    (root / "vault").mkdir(mode=0o700)   # a plain vault (require_encrypted_vault: false)
    web = app(rng)
    devicegen.write_device_state(str(root), [web], rng=rng)
    config = root.parent / "compatfs.yaml"
    config.write_text(CONFIG)
    return web, config


def status(root: Path, run: Path, config: Path) -> tuple[int, dict, str]:
    proc = run_cli("status", "--root", str(root), "--run-dir", str(run), "--config", str(config),
                   "--json")
    assert "Traceback" not in proc.stderr and "internal error" not in proc.stderr, proc.stderr
    return proc.returncode, json.loads(proc.stdout), proc.stderr


def placed_device(tmp_path: Path, rng: random.Random) -> tuple[Path, Path, Path, AppDef]:
    """A device where a daemon placed one volume in the vault, then stopped."""
    root, run = tmp_path / "persist", tmp_path / "run"
    web, config = device(root, rng)
    with mounted(root, run, stage="redirect", config=config) as m:
        (root / "img" / web.legacy_name(0)).write_bytes(b"placed" * 1000)
        m.kill(signal.SIGTERM)
        assert_clean_exit(m)
    assert (root / "vault" / "volumes" / f"{web.drives[0].volume_uuid}#0.qcow2").exists()
    return root, run, config, web


def no_views(root: Path) -> bool:
    return all(mounts.mounted_at(str(root / v)) is None for v in ("img", "downloads"))


# -- a refused index ------------------------------------------------------------------------

def delete_index(state: Path) -> None:
    for name in (DB_NAME, DB_NAME + "-wal", DB_NAME + "-shm"):
        (state / name).unlink(missing_ok=True)


def craft_record(state: Path) -> None:
    db = sqlite3.connect(state / DB_NAME)
    db.execute("INSERT INTO objects (view, store, rel, kind, state, updated_ns) "
               "VALUES ('img/x', 'nostore', 'a', 'vm-volume', 'new', 0)")
    db.commit()
    db.close()


def empty_index(state: Path) -> None:
    delete_index(state)
    (state / DB_NAME).write_bytes(b"")


def drop_table(state: Path) -> None:
    db = sqlite3.connect(state / DB_NAME)
    db.execute("DROP TABLE objects")
    db.commit()
    db.close()


def symlink_index(state: Path) -> None:
    outside = state.parent.parent.parent / "outside.db"
    os.rename(state / DB_NAME, outside)
    os.symlink(outside, state / DB_NAME)


BREAKS = {"deleted": (delete_index, "is missing, but index.id says compatfs made one"),
          "emptied": (empty_index, "is empty (0 bytes)"),
          "no table": (drop_table, "has no compatfs tables"),
          "symlink": (symlink_index, "is a symbolic link; refusing to open it"),
          "crafted record": (craft_record, "unknown store 'nostore'")}


@pytest.mark.parametrize("how", list(BREAKS))
def test_mount_refuses_a_broken_index_and_status_says_why(tmp_path, rng, how):
    root, run, config, web = placed_device(tmp_path, rng)
    state = root / "vault" / "compatfs"
    breaker, expected = BREAKS[how]
    breaker(state)
    for stage in ("redirect", "observe"):
        proc = run_cli("mount", "--root", str(root), "--run-dir", str(run), "--config",
                       str(config), "--stage", stage, "--timeout", "20")
        try:
            assert proc.returncode == 1, proc.stderr
            lines = proc.stderr.strip().splitlines()
            assert len(lines) == 1 and lines[0].startswith("compatfs: error: "), proc.stderr
            assert expected in lines[0]
            assert no_views(root)
        finally:
            run_cli("umount", "--root", str(root), "--run-dir", str(run), "--config", str(config))
    code, doc, stderr = status(root, run, config)
    assert code == EXIT_INDEX_REFUSED
    assert doc["index"]["state"] == "refused" and expected in doc["index"]["problem"]
    assert expected in stderr
    text = run_cli("status", "--root", str(root), "--run-dir", str(run), "--config", str(config))
    assert text.returncode == EXIT_INDEX_REFUSED
    assert "index refused: " in text.stdout and "mount would refuse" in text.stdout
    assert not (state / "index.db.new").exists()


def test_status_beside_a_running_daemon_reports_an_index_altered_under_it(tmp_path, rng):
    root, run, config, web = placed_device(tmp_path, rng)
    with mounted(root, run, stage="redirect", config=config):
        code, doc, _ = status(root, run, config)
        assert code == EXIT_OK and doc["mounted"] and doc["index"]["records"] == 1
        craft_record(root / "vault" / "compatfs")
        code, doc, stderr = status(root, run, config)
        assert code == EXIT_INDEX_REFUSED and doc["mounted"]
        assert "unknown store 'nostore'" in doc["index"]["problem"]
        assert "unknown store 'nostore'" in stderr


def test_status_of_a_sound_index_exits_0(tmp_path, rng):
    root, run, config, web = placed_device(tmp_path, rng)
    code, doc, _ = status(root, run, config)
    assert code == EXIT_OK
    assert doc["index"] == {"path": "vault/compatfs/index.db", "state": "sound", "records": 1,
                            "problem": None}
    assert {o["legacy"]: o["state"] for o in doc["objects"]} == {f"img/{web.legacy_name(0)}": "new"}
    # moving the marker aside is the documented way to start over, knowingly
    delete_index(root / "vault" / "compatfs")
    assert status(root, run, config)[0] == EXIT_INDEX_REFUSED
    os.rename(root / "vault" / "compatfs" / MARKER_NAME, tmp_path / "index.id.old")
    code, doc, _ = status(root, run, config)
    assert code == EXIT_OK and doc["index"]["state"] == "none"


# -- a full disk ------------------------------------------------------------------------------

@pytest.fixture
def small_root(tmp_path: Path):
    """A device root on a 16 MiB tmpfs: a disk that fills."""
    with tmpfs(tmp_path / "small", "16m") as mnt:
        yield mnt


def test_a_full_disk_is_enospc_through_the_view_and_the_daemon_keeps_serving(small_root,
                                                                            tmp_path, rng):
    root, run = small_root / "persist", tmp_path / "run"
    web, config = device(root, rng)
    first, second = root / "img" / web.legacy_name(0), root / "img" / web.legacy_name(1)
    with mounted(root, run, stage="redirect", config=config) as m:
        first.write_bytes(b"first" * 100)
        filler = fill(small_root)
        with pytest.raises(OSError) as err:
            os.close(os.open(second, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644))
        assert err.value.errno == errno.ENOSPC
        # nothing half-made: the name is not listed, the first one still reads
        assert sorted(os.listdir(root / "img")) == [web.legacy_name(0)]
        assert first.read_bytes() == b"first" * 100
        assert not second.exists()
        # a rename of a placed name is one index change too: refused whole
        with pytest.raises(OSError) as err:
            os.rename(first, root / "img" / "renamed.txt")
        assert err.value.errno == errno.ENOSPC
        assert sorted(os.listdir(root / "img")) == [web.legacy_name(0)]
        assert first.read_bytes() == b"first" * 100
        log = m.log_text()
        assert "Traceback" not in log and "unexpected error" not in log, log
        assert "index" in log and "ENOSPC" in log
        filler.unlink()
        second.write_bytes(b"second")
        assert second.read_bytes() == b"second"
        m.kill(signal.SIGTERM)
        assert_clean_exit(m)
    assert (root / "vault" / "volumes" / f"{web.drives[1].volume_uuid}#0.raw").read_bytes() \
        == b"second"


# -- dead views ---------------------------------------------------------------------------------

def test_status_reports_dead_views_and_still_lists_every_object(tmp_path, rng):
    root, run = tmp_path / "persist", tmp_path / "run"
    web, config = device(root, rng)
    (root / "img" / "notes.txt").write_text("legacy\n")        # under the view, legacy
    legacy_vol = root / "img" / web.legacy_name(1)
    legacy_vol.write_bytes(b"legacy volume")
    with mounted(root, run, stage="redirect", config=config) as m:
        (root / "img" / web.legacy_name(0)).write_bytes(b"placed")
        m.kill(signal.SIGKILL)
        with pytest.raises(OSError) as err:
            os.listdir(root / "img")
        assert err.value.errno == errno.ENOTCONN
        code, doc, stderr = status(root, run, config)
        assert code == EXIT_VIEWS_DEAD
        assert doc["views"] == {"img": "dead", "downloads": "dead"}
        assert "views dead: img, downloads" in stderr and "'compatfs mount' replaces" in stderr
        states = {o["legacy"]: (o["state"], o["location"]) for o in doc["objects"]}
        assert states[f"img/{web.legacy_name(0)}"] == (
            "new", f"vault/volumes/{web.drives[0].volume_uuid}#0.qcow2")
        assert states[f"img/{web.legacy_name(1)}"] == ("legacy", f"img/{web.legacy_name(1)}")
        assert states["img/notes.txt"][0] == "unresolved"
        text = run_cli("status", "--root", str(root), "--run-dir", str(run), "--config",
                       str(config))
        assert text.returncode == EXIT_VIEWS_DEAD
        assert "views dead: img, downloads" in text.stdout
        # a new mount replaces them, and status is well again
        with mounted(root, run, stage="redirect", config=config):
            code, doc, _ = status(root, run, config)
            assert code == EXIT_OK
            assert doc["views"] == {"img": "serving", "downloads": "serving"}
            assert {o["legacy"] for o in doc["objects"]} == set(states)


# -- names that are not UTF-8 -------------------------------------------------------------------

def test_a_name_that_is_not_utf8_is_placed_kept_and_reported(tmp_path, rng):
    root, run = tmp_path / "persist", tmp_path / "run"
    web, config = device(root, rng)
    # the design note's layout places a download in progress (eve keeps it legacy)
    config.write_text("layout: design-note\n" + config.read_text())
    image_id = devicegen.random_uuid(rng)
    pending = os.fsencode(root / "downloads" / "appImg.obj" / "pending" / image_id)
    name = b"\xff\xfe-part.img"
    with mounted(root, run, stage="redirect", config=config) as m:
        os.makedirs(pending)
        with open(os.path.join(pending, name), "wb") as f:
            f.write(b"bytes of a download")
        assert os.listdir(pending) == [name]
        m.kill(signal.SIGTERM)
        assert_clean_exit(m)
    # placed in the vault under its exact bytes, and the index kept it
    placed = os.path.join(os.fsencode(root / "vault" / "downloader" / "pending"),
                          image_id.encode(), name)
    with open(placed, "rb") as f:
        assert f.read() == b"bytes of a download"
    with mounted(root, run, stage="redirect", config=config):
        assert os.listdir(pending) == [name]
        with open(os.path.join(pending, name), "rb") as f:
            assert f.read() == b"bytes of a download"
        code, doc, _ = status(root, run, config)
        assert code == EXIT_OK
        legacy = os.fsdecode(b"downloads/appImg.obj/pending/" + image_id.encode() + b"/" + name)
        assert {o["legacy"]: o["state"] for o in doc["objects"]}[legacy] == "new"
        text = subprocess.run([sys.executable, "-m", "compatfs", "status", "--root", str(root),
                               "--run-dir", str(run), "--config", str(config)],
                              capture_output=True, timeout=120,
                              env={**os.environ, "PYTHONIOENCODING": "utf-8:strict"})
        assert text.returncode == EXIT_OK, text.stderr
        assert b"/" + name + b"  [" in text.stdout      # the name's own bytes
