"""A fault inside the migrator, or inside a view's write path, never wedges the views.

Every named point of a migration (``compatfs.migration.MIGRATE_FAULT_POINTS``)
is made to raise ``OSError(EIO)`` once (``COMPATFS_FAULT_MODE=raise``,
``COMPATFS_FAULT_TIMES=1``) in a daemon serving stage migrate on a device
image. While and after the fault, within a deadline: the views list, a volume
reads back the bytes it had, a file written through a view reads back, the
daemon is alive, ``status`` and ``ctl`` answer; the fault is counted, the object
it hit is failed (or its move finished, past the point of no return) and, the
fault spent, it migrates on a later try (a fault at the start of a pass: the
next pass runs). Then the write-path handlers of the
views (create, write, setattr) are made to raise, without a kernel: the request
gets an errno and the next one is served.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import random
import re
import time
from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace

import pyfuse3
import pytest

from compatfs.migration import MIGRATE_FAULT_POINTS

from .conftest import temporaries
from .mounting import answers_within, assert_clean_exit, mounted
from .test_migrate_faults import (
    UNFINISHED,
    config,
    crash_device,
    device,
    digest,
    file_sha,
    index_records,
    moves_of,
    one_app,
    vol_target,
    write_random,
)
from .test_operations import Ctx, lookup_img, ops  # noqa: F401 - ops is a fixture

#: How long any one check through a view may take before the view counts as wedged.
ANSWER_S = 10.0
#: How long the object the fault hit may take to end up migrated.
SETTLE_S = 30.0


def fault_device(root: Path) -> None:
    """:func:`crash_device` (renames, copies, a tree, downloads) plus a volume whose
    destination is newer than its legacy copy (set aside)."""
    rng = random.Random(31)
    app = one_app(rng, ["raw"])
    crash_device(root, (app,))
    t0 = 1_700_000_000
    write_random(root / "img" / app.legacy_name(0), 64 << 10, rng, mtime=t0)
    write_random(root / vol_target(app.drives[0]), 128 << 10, rng, mtime=t0 + 3600)


def views_answer(root: Path, volume: str, want: str) -> None:
    """Everything an agent does through the views, once each."""
    assert os.listdir(root / "img"), "img/ lists nothing"
    os.listdir(root / "downloads")
    assert file_sha(root / volume) == want, f"{volume} reads other bytes"
    probe = root / "downloads" / "fault-probe.txt"
    data = os.urandom(10_000)
    with open(probe, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    assert probe.read_bytes() == data
    probe.unlink()


def cli_answers(root: Path, run: Path) -> dict:
    """``status`` and ``ctl`` answer; returns the migration progress ``ctl`` gives."""
    from .conftest import run_cli
    common = ("--root", str(root), "--run-dir", str(run))
    st = run_cli("status", *common, "--json")
    assert st.returncode == 0, st.stderr
    assert json.loads(st.stdout)["mounted"]
    got = run_cli("ctl", *common, "get", "migration")
    assert got.returncode == 0, got.stderr
    return json.loads(got.stdout)


def in_view(moves: dict[str, str]) -> dict[str, str]:
    """The moves the daemon makes: those of the objects its views serve."""
    return {k: v for k, v in moves.items() if k.startswith(("img/", "downloads/"))}


@pytest.mark.root
@pytest.mark.parametrize("point", MIGRATE_FAULT_POINTS)
def test_a_fault_raised_in_the_migrator_never_wedges_the_views(tmp_path, monkeypatch, point):
    run = tmp_path / "run"
    cfg = config(tmp_path, "c.yaml", "migration: {throttle_mib_per_s: 0, rescan_s: 1, "
                                     "retry_backoff_s: 1, retries: 3}\n")
    with device(tmp_path) as root:
        fault_device(root)
        moves = in_view(moves_of(root))
        before = {legacy: digest(root / legacy) for legacy in moves}
        volume = max((m for m in moves if m.startswith("img/")),
                     key=lambda m: (root / m).stat().st_size)
        monkeypatch.setenv("COMPATFS_FAULT", point)
        monkeypatch.setenv("COMPATFS_FAULT_MODE", "raise")
        monkeypatch.setenv("COMPATFS_FAULT_TIMES", "1")
        with mounted(root, run, stage="migrate", config=cfg) as m:
            deadline = time.monotonic() + SETTLE_S
            while f"injected fault at {point}" not in m.log_text():
                assert time.monotonic() < deadline, f"{point} never hit:\n{m.log_text()}"
                assert m.proc.poll() is None, m.log_text()
                time.sleep(0.1)
            answers_within(ANSWER_S, lambda: views_answer(root, volume, before[volume]))
            progress = answers_within(3 * ANSWER_S, lambda: cli_answers(root, run))
            assert progress["faults"] >= 1, progress
            assert m.proc.poll() is None, m.log_text()

            # the fault is spent: the object it hit migrates on a later try
            while True:
                records = index_records(root)
                if all(records.get(k, ("",))[0] == "new" for k in moves) and \
                        not any(r[0] in UNFINISHED or r[0] == "failed" for r in records.values()):
                    break
                assert time.monotonic() < deadline + SETTLE_S, (records, m.log_text())
                time.sleep(0.3)
            answers_within(ANSWER_S, lambda: views_answer(root, volume, before[volume]))
            log = m.log_text()
            hit = re.search(rf"(\S+: migration failed \(injected fault at {point}|"
                            rf"\S+: injected fault at {point} \(EIO\) after its move|"
                            rf"migration pass failed \(injected fault at {point})", log)
            assert hit, log
            assert "Traceback" not in log, log
        assert_clean_exit(m)
        records = index_records(root)
        assert not {v: r for v, r in records.items() if r[0] in UNFINISHED or r[0] == "failed"}
        for legacy, target in moves.items():
            if digest(root / target) != before[legacy]:
                # set aside: the newer destination won, the legacy copy is kept aside
                assert "set aside" in (records[legacy][1] or ""), (legacy, records[legacy])
        assert temporaries(root) == []


# -- the views' write paths ----------------------------------------------------------------

def _broken(exc: BaseException) -> Callable[..., object]:
    def raise_(*args: object, **kw: object) -> object:
        raise exc
    return raise_


@pytest.mark.parametrize("exc,want", [(RuntimeError("injected"), errno.EIO),
                                      (OSError(errno.ENOSPC, "injected"), errno.ENOSPC)],
                         ids=["unexpected", "full-disk"])
async def test_a_fault_in_a_write_path_handler_is_an_errno_and_serving_goes_on(
        ops, monkeypatch, exc, want):  # noqa: F811 - the fixture
    img = await lookup_img(ops)
    fi, entry = await ops.create(img, b"w.txt", 0o644, os.O_RDWR, Ctx())
    faults = ops.faults

    # create: the view cannot make the file
    with monkeypatch.context() as m:
        m.setattr(ops.view, "create", _broken(exc))
        with pytest.raises(pyfuse3.FUSEError) as err:
            await ops.create(img, b"x.txt", 0o644, os.O_RDWR, Ctx())
    assert err.value.errno == want
    # write: the backing write fails
    with monkeypatch.context() as m:
        m.setattr(os, "pwrite", _broken(exc))
        with pytest.raises(pyfuse3.FUSEError) as err:
            await ops.write(fi.fh, 0, b"lost")
    assert err.value.errno == want
    # setattr (truncate): the backing truncate fails
    attr = SimpleNamespace(st_size=3)   # what the handler reads of the kernel's request
    fields = SimpleNamespace(update_size=True, update_mode=False, update_uid=False,
                             update_gid=False, update_atime=False, update_mtime=False)
    with monkeypatch.context() as m:
        m.setattr(os, "ftruncate", _broken(exc))
        with pytest.raises(pyfuse3.FUSEError) as err:
            await ops.setattr(entry.st_ino, attr, fields, fi.fh, Ctx())
    assert err.value.errno == want
    assert ops.faults == faults + (3 if want == errno.EIO else 0)

    # every handler serves the next request
    assert await ops.write(fi.fh, 0, b"hello") == 5
    assert (await ops.setattr(entry.st_ino, attr, fields, fi.fh, Ctx())).st_size == 3
    fi2, _ = await ops.create(img, b"x.txt", 0o644, os.O_RDWR, Ctx())
    await ops.release(fi.fh)
    await ops.release(fi2.fh)
    assert (Path(ops.view.layout.path("img")) / "w.txt").read_bytes() == b"hel"


# -- the migrator without a kernel: an index that cannot be written ---------------------------

def offline_migrator(root: Path, **settings: object):
    """The migration engine of the demo tree at *root*, as ``migrate --now`` builds it."""
    from compatfs.backing import Backing
    from compatfs.config import Migration
    from compatfs.index import Index
    from compatfs.layout import Layout
    from compatfs.migration import Migrator
    from compatfs.resolver import Resolver
    from compatfs.view import View

    layout = Layout(str(root))
    views = ("img", "downloads")
    backing = Backing.open(layout, views, True, False)
    index = Index.open_in(layout.path("state"))
    view = View(layout, backing, index, Resolver(layout), "migrate", views)
    return Migrator(view, Migration(**settings)), backing, index


def test_an_index_that_cannot_be_written_fails_the_object_alone_then_catches_up(
        demo_root, monkeypatch, caplog):
    """The clean-up of a failed move cannot write the index (a full disk): the pass
    ends anyway, the failure is kept in memory and counted, the legacy object is
    still where it was; once the index takes writes again, it is put in order and
    the object moves."""
    import sqlite3

    import trio

    root, _ = demo_root
    monkeypatch.setenv("COMPATFS_FAULT", "renaming")
    monkeypatch.setenv("COMPATFS_FAULT_MODE", "raise")
    monkeypatch.setenv("COMPATFS_FAULT_TIMES", "1")
    m, backing, index = offline_migrator(root, retry_backoff_s=0.0, throttle_mib_per_s=0.0)
    try:
        real_delete = index.delete

        def full(view: str) -> None:
            raise sqlite3.OperationalError("database or disk is full")

        monkeypatch.setattr(index, "delete", full)
        progress = trio.run(m.run_once)
        assert len(m.unrecorded) == 1, m.unrecorded
        (vpath, (item, state, reason, attempts)), = m.unrecorded.items()
        assert (state, attempts) == ("failed", 1) and "injected fault at renaming" in reason
        assert progress.faults >= 1 and progress.failed == 1
        assert index.get(vpath).state == "renaming"          # as the index still says
        legacy = backing.get(item.src_store)
        assert legacy.exists(item.src_rel)                    # served from its legacy place
        assert vpath in m.failures()
        assert progress.objects_done == progress.objects_total

        monkeypatch.setattr(index, "delete", real_delete)     # room again
        trio.run(m.run_once)
        assert m.unrecorded == {}
        assert {r.state for r in index.records.values()} == {"new"}, index.records
        assert not legacy.exists(item.src_rel)
    finally:
        index.close()
        backing.close()


def test_seconds_clamps_what_trio_cannot_wait_for():
    from compatfs.migration import RESCAN_CAP_S, seconds

    assert seconds(float("nan"), 30.0, RESCAN_CAP_S) == 30.0
    assert seconds(float("inf"), 30.0, RESCAN_CAP_S) == RESCAN_CAP_S
    assert seconds(-1.0, 30.0, RESCAN_CAP_S) == 30.0
    assert seconds(2.5, 30.0, RESCAN_CAP_S) == 2.5


@pytest.mark.parametrize("value", [float("nan"), float("inf"), -1.0])
async def test_a_migrator_with_an_unusable_rescan_interval_keeps_running(demo_root, value):
    """``rescan_s: .nan`` (or infinite, or negative) neither ends the migrator nor stops
    it from rescanning: the wait is clamped (trio refuses a NaN timeout)."""
    import trio

    m, backing, index = offline_migrator(demo_root[0], rescan_s=value,
                                         throttle_mib_per_s=value)
    try:
        with trio.move_on_after(1.0):
            await m.run()
        assert index.records and {r.state for r in index.records.values()} == {"new"}
    finally:
        index.close()
        backing.close()


def test_failed_objects_back_off_to_a_cap_and_are_never_given_up(demo_root):
    from compatfs.migration import RETRY_CAP_S

    m, backing, index = offline_migrator(demo_root[0], retries=3, retry_backoff_s=10.0)
    try:
        assert [m._backoff(n) for n in (1, 2, 3, 4, 50)] == \
            [10.0, 20.0, RETRY_CAP_S, RETRY_CAP_S, RETRY_CAP_S]
    finally:
        index.close()
        backing.close()


# -- the daemon's background tasks --------------------------------------------------------------

async def test_a_background_task_that_raises_is_logged_and_started_again(
        tmp_path, monkeypatch, caplog):
    import trio

    from compatfs import daemon as daemon_mod
    from compatfs.config import Config
    from compatfs.rundir import RunDir

    monkeypatch.setattr(daemon_mod, "RESTART_SECONDS", 0.01)
    d = daemon_mod.Daemon(Config(), str(tmp_path), "observe", RunDir(str(tmp_path / "r"),
                                                                       str(tmp_path)))
    runs = []

    async def task() -> None:
        runs.append(1)
        if len(runs) < 3:
            raise RuntimeError(f"boom {len(runs)}")
        await trio.sleep_forever()

    with caplog.at_level(logging.WARNING, logger="compatfs.daemon"):
        with trio.move_on_after(2):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(d._supervised, "the test task", task)
                while len(runs) < 3:
                    await trio.sleep(0.01)
                nursery.cancel_scope.cancel()
    assert len(runs) == 3
    assert "the test task failed (RuntimeError: boom 1); starting it again" in caplog.text
    assert "boom 2" in caplog.text and "Traceback" not in caplog.text


# -- the last resort of tear-down ------------------------------------------------------------------

@pytest.mark.root
def test_detach_unmounts_without_looking_and_never_follows_a_link(tmp_path):
    """What tear-down uses once the FUSE loop is gone: ``umount2(MNT_DETACH)``, no stat
    of the target (which a dead FUSE view would never answer)."""
    from compatfs import mounts

    src, target, link = tmp_path / "src", tmp_path / "target", tmp_path / "link"
    src.mkdir()
    target.mkdir()
    (src / "f").write_text("x")
    link.symlink_to(target)
    mounts.bind(str(src), str(target))
    try:
        assert (target / "f").exists()
        with pytest.raises(OSError):
            mounts.detach(str(link))          # a link is not followed
        assert mounts.mounted_at(str(target)) is not None
        mounts.detach(str(target))
        assert mounts.mounted_at(str(target)) is None
        assert not (target / "f").exists()
    finally:
        if mounts.mounted_at(str(target)) is not None:
            mounts.unmount(str(target), lazy=True)
