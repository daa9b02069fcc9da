"""The migration engine's guarantees under faults, on a real encrypted vault.

Every fault point of compatfs/migration/ is hit by a SIGKILL
(``COMPATFS_FAULT``), of ``compatfs migrate --now``, of ``compatfs
rollback`` and of a daemon in stage migrate; a later run must finish the job
with every byte intact, nothing resolvable left behind, no temporary and no
record stuck half-way. Then the rules of docs/migration.md (docs/eve.md
section 3 gives the EVE converter's own): a full disk waits instead of
failing, downgrade-then-upgrade keeps the newer destination, a verified
download that does not hash to its name is
quarantined, one failure never stops the others, small objects go first, and
``compatfs status`` shows a migration as it runs.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import random
import re
import signal
import sqlite3
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest

from compatfs.config import Config
from compatfs.names import DownloadArea, ObjType
from compatfs.plan import make_plan
from compatfs.resolver import Resolver
from compatfs.testing import devicegen
from compatfs.testing.devicegen import AppDef, DriveDef, random_sha, random_uuid

from .conftest import legacy_snapshot, set_aside, staged, temporaries
from .devices import device_under as device
from .mounting import answers_within, assert_clean_exit, mounted

pytestmark = pytest.mark.root

MIB = 1 << 20
#: Index states of an object whose move is not finished (status says migrating, or new
#: while the legacy original is still there).
UNFINISHED = {"renaming", "copying", "copied", "switched", "rolling-back"}
#: Where legacy objects live that the views serve (and so the migrator moves).
VIEW_DIRS = ("img/", "downloads/", "runx/pods/prepared/")
#: Legacy paths whose objects move: the views' and the containerd store (moved whole).
MOVED = (*VIEW_DIRS, "containerd")


# -- helpers --------------------------------------------------------------------------

def cli(*args: str, fault: str | None = None, skip: int = 0,
        timeout: float = 120) -> subprocess.CompletedProcess[str]:
    """``python -m compatfs ARGS``; with *fault*, SIGKILLed at that point after *skip* hits."""
    env = {k: v for k, v in os.environ.items()
           if k not in ("COMPATFS_DEBUG", "COMPATFS_FAULT", "COMPATFS_FAULT_SKIP")}
    if fault is not None:
        env["COMPATFS_FAULT"] = fault
        env["COMPATFS_FAULT_SKIP"] = str(skip)
    return subprocess.run([sys.executable, "-m", "compatfs", *args], capture_output=True,
                          text=True, env=env, timeout=timeout)


def migrate(root: Path, run: Path, *extra: str, config: Path | None = None, **kw):
    args = ["migrate", "--root", str(root), "--now", "--run-dir", str(run), *extra]
    if config is not None:
        args += ["--config", str(config)]
    return cli(*args, **kw)


def rollback(root: Path, run: Path, **kw):
    return cli("rollback", "--root", str(root), "--run-dir", str(run), **kw)


def status(root: Path, run: Path, config: Path | None = None) -> dict:
    extra = ("--config", str(config)) if config is not None else ()
    proc = cli("status", "--root", str(root), "--run-dir", str(run), "--json", *extra)
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)


def status_of(doc: dict, legacy: str) -> dict:
    found = [o for o in doc["objects"] if o["legacy"] == legacy]
    assert len(found) == 1, (legacy, [o["legacy"] for o in doc["objects"]])
    return found[0]


def moves_of(root: Path) -> dict[str, str]:
    """legacy -> target of every object in the views that the plan moves (as
    ``compatfs plan`` reports it, computed in this process: it only reads)."""
    layout = Config().layout(str(root))
    objects = make_plan(layout, Resolver(layout)).as_json()["objects"]
    return {o["legacy"]: o["target"] for o in objects
            if o["action"] != "keep" and o["legacy"].startswith(MOVED)}


def file_sha(path: Path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def digest(path: Path):
    """What an object holds: a file's sha256, or every entry of a tree."""
    if path.is_symlink():
        return ("link", os.readlink(path))
    if path.is_file():
        return file_sha(path)
    if not path.is_dir():
        return None
    out = {}
    for dirpath, dirs, files in os.walk(path):
        for name in dirs + files:
            p = Path(dirpath) / name
            rel = str(p.relative_to(path))
            if p.is_symlink():
                out[rel] = ("link", os.readlink(p))
            elif p.is_dir():
                out[rel] = ("dir", os.lstat(p).st_mode)
            else:
                out[rel] = (file_sha(p), os.lstat(p).st_mode)
    return out


def index_records(root: Path) -> dict[str, tuple[str, str | None, int]]:
    """view -> (state, reason, attempts), read straight from the index database."""
    path = root / "vault/compatfs/index.db"
    if not path.exists():
        return {}
    db = sqlite3.connect(path)
    try:
        rows = db.execute("SELECT view, state, reason, attempts FROM objects").fetchall()
    finally:
        db.close()
    return {v: (s, r, a) for v, s, r, a in rows}


def one_app(rng: random.Random, fmts: list[str], clear_text: bool = False) -> AppDef:
    return AppDef(random_uuid(rng), "app", [
        DriveDef(random_uuid(rng), random_sha(rng), fmt, volume_uuid=random_uuid(rng),
                 clear_text=clear_text) for fmt in fmts])


def vol_target(d: DriveDef) -> str:
    where = "clear" if d.clear_text else "vault"
    return f"{where}/volumes/{d.volume_uuid}#{d.generation}.{d.fmt}"


def write_random(path: Path, size: int, rng: random.Random, mtime: float | None = None) -> str:
    """*size* bytes of distinct 1 MiB blocks at *path*; returns their sha256."""
    path.parent.mkdir(parents=True, exist_ok=True)
    block = rng.randbytes(MIB)
    h = hashlib.sha256()
    with open(path, "wb") as f:
        for i in range(0, size, MIB):
            piece = (i // MIB).to_bytes(8, "little") + block[8:min(MIB, size - i)]
            f.write(piece)
            h.update(piece)
    if mtime is not None:
        os.utime(path, (mtime, mtime))
    return h.hexdigest()


def config(tmp_path: Path, name: str, text: str) -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


#: Config text of the tests whose objects are downloads in progress: only the
#: design note's layout moves those (eve keeps them in the legacy store).
DESIGN_NOTE = "layout: design-note\n"


# -- the device the crash tests run on ------------------------------------------------

def crash_device(root: Path, more: tuple[AppDef, ...] = ()) -> None:
    """The demo device plus an app with a clear-text volume (a second rename) and a
    vault volume, so every fault point is hit more than once (and the apps *more*,
    whose files the caller writes)."""
    apps = devicegen.make_demo(str(root))
    rng = random.Random(21)
    extra = AppDef(random_uuid(rng), "extra", [
        DriveDef(random_uuid(rng), random_sha(rng), "raw", volume_uuid=random_uuid(rng),
                 clear_text=True),
        DriveDef(random_uuid(rng), random_sha(rng), "qcow2", volume_uuid=random_uuid(rng)),
    ])
    devicegen.write_device_state(str(root), [*apps, extra, *more])
    write_random(root / "img" / extra.legacy_name(0), 1 * MIB + 12345, rng)
    devicegen.sparse_file(str(root / "img" / extra.legacy_name(1)), 16 * MIB,
                          {0: rng.randbytes(MIB), 12 * MIB: rng.randbytes(3 * MIB)})


def content(root: Path, path: str):
    """:func:`digest` of *path* without the snapshotid.txt a move adds to a container
    volume (layout eve; checked by :func:`assert_migrated`)."""
    d = digest(root / path)
    if isinstance(d, dict):
        d.pop("snapshotid.txt", None)
    return d


def assert_nothing_lost(root: Path, moves: dict[str, str], before: dict) -> None:
    """Each object holds its original content at its legacy name or at its target."""
    for legacy, target in moves.items():
        assert before[legacy] in (content(root, legacy), content(root, target)), legacy
        if legacy.startswith("runx/pods/prepared/") and (root / target).is_dir():
            # a container volume at its target is complete: snapshotid.txt too
            assert (root / target / "snapshotid.txt").read_bytes() == \
                os.path.basename(legacy).encode(), target


def assert_migrated(root: Path, moves: dict[str, str], before: dict) -> None:
    """Everything moved intact, nothing resolvable left, no temporary, no half-done record."""
    for legacy, target in moves.items():
        assert not os.path.lexists(root / legacy), f"{legacy} is still in the legacy store"
        assert content(root, target) == before[legacy], f"{legacy} -> {target}"
        if legacy.startswith("runx/pods/prepared/"):
            sid = root / target / "snapshotid.txt"
            assert sid.read_bytes() == os.path.basename(legacy).encode()
            assert stat.S_IMODE(sid.stat().st_mode) == 0o644
    left = moves_of(root)
    assert left == {}, f"still to move: {left}"
    assert temporaries(root) == []
    records = index_records(root)
    stuck = {v: r for v, r in records.items() if r[0] in UNFINISHED}
    assert stuck == {}, stuck
    assert sorted(s for s, _, _ in records.values()) == ["new"] * len(moves), records


def assert_idle(root: Path, run: Path) -> None:
    again = migrate(root, run)
    assert again.returncode == 0, again.stderr
    assert "migrated 0 of 0 objects" in again.stderr, again.stderr


# -- 1. crashes -------------------------------------------------------------------------

#: (fault point, hits skipped first): the crash hits the (skip+1)-th object reaching
#: that point. Small objects go first: the container tree and the downloads, then the
#: volumes; the two clear-text volumes are renamed, the others copied.
MIGRATE_FAULTS = [
    ("renaming", 0), ("renaming", 1),
    ("renamed", 0),
    ("copying", 0), ("copying", 2),
    ("bulk-copied", 0),
    ("renamed-into-place", 0),
    ("copied", 0), ("copied", 2),
    ("switched", 0), ("switched", 3),
    ("legacy-removed", 0),
]


@pytest.mark.parametrize("point,skip", MIGRATE_FAULTS, ids=[f"{p}-{s}" for p, s in MIGRATE_FAULTS])
def test_migrate_killed_at_every_fault_point_finishes_on_the_next_run(tmp_path, point, skip):
    run = tmp_path / "run"
    with device(tmp_path) as root:
        crash_device(root)
        moves = moves_of(root)
        assert len(moves) == 8      # eve 17.3: the demo's six and the two extra volumes
        before = {legacy: digest(root / legacy) for legacy in moves}

        crashed = migrate(root, run, fault=point, skip=skip)
        assert crashed.returncode == -signal.SIGKILL, \
            f"the fault {point} (skip {skip}) was never hit:\n{crashed.stderr}"
        assert_nothing_lost(root, moves, before)

        proc = migrate(root, run)
        assert proc.returncode == 0, proc.stderr
        assert_migrated(root, moves, before)
        assert_idle(root, run)


def test_migrate_killed_mid_copy_of_a_large_file(tmp_path):
    run = tmp_path / "run"
    rng = random.Random(5)
    app = one_app(rng, ["raw"])
    with device(tmp_path, size_mb=400) as root:
        devicegen.write_device_state(str(root), [app])
        legacy = root / "img" / app.legacy_name(0)
        want = write_random(legacy, 128 * MIB, rng)  # 4 s at 32 MiB/s
        target = root / vol_target(app.drives[0])
        tmp = staged(root, "vault_volumes", target.name)
        slow = config(tmp_path, "slow.yaml", "migration: {throttle_mib_per_s: 32}\n")
        argv = [sys.executable, "-m", "compatfs", "migrate", "--root", str(root), "--now",
                "--run-dir", str(run), "--config", str(slow)]
        started = time.monotonic()
        proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL)
        try:
            while not tmp.exists() and proc.poll() is None and time.monotonic() - started < 20:
                time.sleep(0.02)
            time.sleep(1.0)  # about 32 MiB into the copy
            assert proc.poll() is None, "the copy ended before it could be interrupted"
            assert tmp.exists()
            proc.kill()
        finally:
            if proc.poll() is None:
                proc.kill()
            proc.wait(timeout=20)
        assert 0 < tmp.stat().st_size < 128 * MIB and not target.exists()
        assert file_sha(legacy) == want
        assert index_records(root)[f"img/{legacy.name}"][0] == "copying"

        # the content is checked below: no read-back, to keep the test short
        fast = config(tmp_path, "fast.yaml", "migration: {throttle_mib_per_s: 0, verify: false}\n")
        done = migrate(root, run, config=fast)
        assert done.returncode == 0, done.stderr
        assert file_sha(target) == want
        assert not legacy.exists()
        assert temporaries(root) == []
        assert {s for s, _, _ in index_records(root).values()} == {"new"}


#: (fault point, which object the crash hits): rollback goes through the records in
#: order of legacy name; the first is a download (copied back into img's filesystem),
#: "clear" a clear-text volume (renamed back), "tree" the container volume.
ROLLBACK_FAULTS = [("rolling-back", "first"), ("rolling-back", "tree"),
                   ("rolled-back", "first"), ("rolled-back", "clear")]


def rollback_skip(root: Path, which: str) -> int:
    db = sqlite3.connect(root / "vault/compatfs/index.db")
    try:
        rows = db.execute("SELECT view, store FROM objects ORDER BY view").fetchall()
    finally:
        db.close()
    if which == "first":
        return 0
    if which == "tree":
        return next(i for i, (view, _) in enumerate(rows) if view.startswith("prepared/"))
    return next(i for i, (_, store) in enumerate(rows) if store == "clear_volumes")


@pytest.mark.parametrize("point,which", ROLLBACK_FAULTS,
                         ids=[f"{p}-{w}" for p, w in ROLLBACK_FAULTS])
def test_rollback_killed_at_every_fault_point_finishes_on_the_next_run(tmp_path, point, which):
    run = tmp_path / "run"
    with device(tmp_path) as root:
        crash_device(root)
        before = legacy_snapshot(root)
        assert migrate(root, run).returncode == 0
        assert legacy_snapshot(root) != before

        skip = rollback_skip(root, which)
        crashed = rollback(root, run, fault=point, skip=skip)
        assert crashed.returncode == -signal.SIGKILL, crashed.stderr
        proc = rollback(root, run)
        assert proc.returncode == 0, proc.stderr
        assert legacy_snapshot(root) == before
        for new in ("vault/volumes", "clear/volumes", "vault/verifier", "vault/downloader"):
            assert [p for p in (root / new).rglob("*") if not p.is_dir()] == [], new
        assert temporaries(root) == []
        assert index_records(root) == {}


def test_rollback_keeps_a_newer_legacy_copy(tmp_path):
    """Downgraded without a rollback, old EVE wrote the volume again under its legacy
    name; the rollback keeps that newer copy and sets the new-layout one aside."""
    run = tmp_path / "run"
    rng = random.Random(14)
    app = one_app(rng, ["raw"])
    with device(tmp_path) as root:
        devicegen.write_device_state(str(root), [app])
        legacy = root / "img" / app.legacy_name(0)
        target = root / vol_target(app.drives[0])
        old = write_random(legacy, MIB, rng, mtime=1_700_000_000)
        assert migrate(root, run).returncode == 0 and file_sha(target) == old
        newer = write_random(legacy, 2 * MIB, rng, mtime=1_700_003_600)

        proc = rollback(root, run)
        assert proc.returncode == 0, proc.stderr
        assert file_sha(legacy) == newer
        assert index_records(root) == {}
        # the older new-layout copy is not lost: set aside where it was
        kept = set_aside(root, "vault_volumes")
        assert [file_sha(p) for p in kept] == [old]
        assert [p.name for p in (root / "vault/volumes").iterdir()] == []
        assert temporaries(root) == []


# -- 2. the daemon dies after a switch ---------------------------------------------------

def test_daemon_killed_after_the_switch_serves_the_same_bytes_and_finishes(tmp_path, monkeypatch):
    run = tmp_path / "run"
    rng = random.Random(6)
    app = one_app(rng, ["raw"])
    with device(tmp_path) as root:
        devicegen.write_device_state(str(root), [app])
        legacy = root / "img" / app.legacy_name(0)
        want = write_random(legacy, 8 * MIB, rng)
        target = root / vol_target(app.drives[0])
        # slow enough that the daemon reports ready before the copy ends
        slow = config(tmp_path, "slow.yaml", "migration: {throttle_mib_per_s: 4, rescan_s: 1}\n")
        monkeypatch.setenv("COMPATFS_FAULT", "switched")
        with mounted(root, run, stage="migrate", config=slow) as m:
            assert m.proc.wait(timeout=30) == -signal.SIGKILL, m.log_text()
            with pytest.raises(OSError) as dead:
                os.stat(legacy)
            assert dead.value.errno == errno.ENOTCONN  # fail closed, never the store beneath
        monkeypatch.delenv("COMPATFS_FAULT")
        # killed between the switch and the removal: both copies are there
        assert file_sha(legacy) == want and file_sha(target) == want
        assert index_records(root)[f"img/{legacy.name}"][0] == "switched"

        fast = config(tmp_path, "fast.yaml", "migration: {rescan_s: 1}\n")
        with mounted(root, run, stage="migrate", config=fast) as m:
            assert file_sha(legacy) == want  # through the view
            deadline = time.monotonic() + 20
            while status_of(status(root, run), f"img/{legacy.name}")["state"] != "new":
                assert time.monotonic() < deadline, m.log_text()
                time.sleep(0.2)
            assert file_sha(legacy) == want
            assert "Traceback" not in m.log_text(), m.log_text()
        assert not legacy.exists()  # the legacy store, now that the views are gone
        assert file_sha(target) == want
        assert temporaries(root) == []
        assert {s for s, _, _ in index_records(root).values()} == {"new"}


# -- 3. a full disk ---------------------------------------------------------------------

def test_a_volume_that_cannot_fit_waits_and_the_rest_moves(tmp_path):
    run = tmp_path / "run"
    rng = random.Random(7)
    big_app = one_app(rng, ["raw"])
    small_app = one_app(rng, ["raw", "qcow2", "raw"])
    with device(tmp_path, size_mb=160) as root:
        devicegen.write_device_state(str(root), [big_app, small_app])
        big = f"img/{big_app.legacy_name(0)}"
        want = {big: write_random(root / big, 80 * MIB, rng)}
        targets = {big: vol_target(big_app.drives[0])}
        for i in range(3):
            name = f"img/{small_app.legacy_name(i)}"
            want[name] = write_random(root / name, MIB + i * 4096, rng)
            targets[name] = vol_target(small_app.drives[i])
        free = os.statvfs(root).f_bavail * os.statvfs(root).f_frsize
        assert free < 80 * MIB, "the device is too large for this test"

        proc = migrate(root, run)
        assert proc.returncode == 1, proc.stderr
        assert f"waiting: {big}:" in proc.stderr, proc.stderr
        assert "failed" not in proc.stderr, proc.stderr
        assert "migrated 3 of 4 objects" in proc.stderr, proc.stderr
        for name, digest_ in want.items():
            here = root / name if name == big else root / targets[name]
            assert file_sha(here) == digest_, name
        for name in want:
            if name != big:
                assert not (root / name).exists()
        assert not (root / targets[big]).exists()
        assert temporaries(root) == []
        assert big not in index_records(root)  # a full disk is not an attempt
        doc = status(root, run)
        assert status_of(doc, big)["state"] == "legacy"
        for name in want:
            if name != big:
                assert status_of(doc, name)["state"] == "new"

        again = migrate(root, run)  # still waiting, still not a failure
        assert again.returncode == 1 and f"waiting: {big}:" in again.stderr, again.stderr
        assert file_sha(root / big) == want[big]
        assert big not in index_records(root)


def test_a_disk_that_fills_up_mid_copy_backs_off_and_loses_nothing(tmp_path):
    """Two volumes that each fit, but not together: both pass the space check,
    copy side by side, and one runs into ENOSPC half-way."""
    run = tmp_path / "run"
    rng = random.Random(13)
    app = one_app(rng, ["raw", "raw"])
    # throttled so that the two copies take turns: the one that fails has removed its
    # temporary before the other writes again
    cfg = config(tmp_path, "c.yaml", "migration: {concurrency: 2, reserve_percent: 0, "
                                     "throttle_mib_per_s: 16, retry_backoff_s: 0}\n")
    with device(tmp_path, size_mb=112) as root:
        devicegen.write_device_state(str(root), [app])
        vfs = os.statvfs(root)
        size = int(vfs.f_bavail * vfs.f_frsize * 0.29) // MIB * MIB   # 4 size > free > 3 size
        names = [f"img/{app.legacy_name(i)}" for i in range(2)]
        want = {n: write_random(root / n, size, rng) for n in names}
        targets = {n: root / vol_target(d) for n, d in zip(names, app.drives, strict=True)}

        proc = migrate(root, run, config=cfg)
        assert proc.returncode == 1, proc.stderr
        waiting = dict(re.findall(r"waiting: (img/\S+): (.*)", proc.stderr))
        # usually one copy fills the disk and the other finishes; on a loaded machine
        # the second may write before the first has removed its temporary: both wait
        assert 1 <= len(waiting) <= 2, proc.stderr
        assert all("filled up" in why for why in waiting.values()), proc.stderr
        assert "failed" not in proc.stderr, proc.stderr
        for n in names:
            if n in waiting:     # untouched, not half-copied, and not counted as an attempt
                assert file_sha(root / n) == want[n] and not targets[n].exists()
                assert n not in index_records(root)
            else:
                assert file_sha(targets[n]) == want[n] and not (root / n).exists()
        assert temporaries(root) == []

        # one at a time there is room for each in turn (a moved one's legacy copy is gone)
        again = migrate(root, run, config=config(tmp_path, "one.yaml",
                                                 "migration: {concurrency: 1}\n"))
        assert again.returncode == 0, again.stderr
        for n in names:
            assert file_sha(targets[n]) == want[n] and not (root / n).exists()
        assert temporaries(root) == []


# -- 4. downgrade then upgrade ------------------------------------------------------------

@pytest.mark.parametrize("layout", ["eve", "design-note"])
@pytest.mark.parametrize("fault", [None, "set-aside"])
def test_an_existing_destination_and_the_legacy_copy_both_survive(tmp_path, fault, layout):
    """A destination newer and one older than the legacy copy. eve: both destinations
    stay byte-exact and both legacy copies are set aside byte-exact and reported;
    design-note: the newer wins and the other is set aside byte-exact (the older
    destination in vault/compatfs/set-aside/, never inside vault/volumes)."""
    run = tmp_path / "run"
    rng = random.Random(8)
    app = one_app(rng, ["raw", "qcow2"])
    t0 = 1_700_000_000
    cfg = config(tmp_path, "layout.yaml", f"layout: {layout}\n")
    with device(tmp_path) as root:
        devicegen.write_device_state(str(root), [app])
        kept, replaced = (f"img/{app.legacy_name(i)}" for i in range(2))
        kept_target, replaced_target = (root / vol_target(d) for d in app.drives)
        legacy_kept = write_random(root / kept, 2 * MIB, rng, mtime=t0)
        newer = write_random(kept_target, 3 * MIB, rng, mtime=t0 + 3600)
        legacy_replaced = write_random(root / replaced, 2 * MIB, rng, mtime=t0 + 3600)
        older = write_random(replaced_target, 3 * MIB, rng, mtime=t0)
        set_asides = {kept, replaced} if layout == "eve" else {kept}

        if fault is not None:
            crashed = migrate(root, run, fault=fault, config=cfg)
            assert crashed.returncode == -signal.SIGKILL, crashed.stderr
            # killed between the commit and the move: the legacy name already belongs
            # to the destination, and the legacy copy is intact
            hit = [n for n in set_asides if n in index_records(root)]
            assert len(hit) == 1, index_records(root)
            state, reason, _ = index_records(root)[hit[0]]
            assert state == "new" and "set aside" in reason, reason
            assert (root / hit[0]).exists()
        proc = migrate(root, run, config=cfg)
        assert proc.returncode == 0, proc.stderr
        # the newer destination: untouched; the legacy copy is set aside, not deleted
        assert file_sha(kept_target) == newer
        assert kept_target.stat().st_mtime_ns == (t0 + 3600) * 10**9
        aside = sorted((root / "img/.compatfs-set-aside").iterdir())
        for n in (kept, replaced):
            assert not (root / n).exists()
        if layout == "eve":
            # the older destination wins too, untouched; both legacy copies set aside
            assert file_sha(replaced_target) == older
            assert replaced_target.stat().st_mtime_ns == t0 * 10**9
            assert sorted(file_sha(p) for p in aside) == sorted([legacy_kept, legacy_replaced])
            assert set_aside(root, "vault_volumes") == []
        else:
            # the older destination is set aside, then replaced by the legacy content
            assert [file_sha(p) for p in aside] == [legacy_kept], aside
            assert file_sha(replaced_target) == legacy_replaced
            assert [file_sha(p) for p in set_aside(root, "vault_volumes")] == [older]
        assert sorted(os.listdir(root / "vault/volumes")) == \
            sorted([kept_target.name, replaced_target.name])
        assert temporaries(root) == []

        proc = cli("status", "--root", str(root), "--run-dir", str(run), "--json",
                   "--config", str(cfg))
        doc = json.loads(proc.stdout)
        for n in set_asides:
            o = status_of(doc, n)
            assert o["state"] == "new" and "set aside" in (o["reason"] or ""), o
            assert any(str(p.relative_to(root)) in o["reason"] for p in aside), o
            assert o["location"] == vol_target(app.drives[0 if n == kept else 1]), o
        if layout == "design-note":
            o = status_of(doc, replaced)
            assert o["state"] == "new" and "older" in (o["reason"] or ""), o
            assert str(set_aside(root, "vault_volumes")[0].relative_to(root)) in o["reason"], o
        assert {s for s, _, _ in index_records(root).values()} == {"new"}
        assert file_sha(kept_target) == newer


# -- 5. integrity --------------------------------------------------------------------------

def test_a_verified_download_that_does_not_match_its_name_is_quarantined(tmp_path):
    """EVE 7.9 to 11.7 re-hash verified files at start and delete a mismatch, and
    name them by their bare sha (whether or not the checkpoint names it)."""
    run = tmp_path / "run"
    cfg = config(tmp_path, "c.yaml", 'layout: eve\neve_release: "11.7"\n')
    rng = random.Random(9)
    good = rng.randbytes(200 << 10)
    bad = rng.randbytes(100 << 10)
    claimed = devicegen.sha_of(rng.randbytes(10))       # not the sha of *bad*
    with device(tmp_path) as root:
        devicegen.write_device_state(str(root), [])
        good_path = devicegen.download_file(str(root), ObjType.APP_IMG, DownloadArea.VERIFIED,
                                            devicegen.sha_of(good), "good.img", good)
        bad_path = devicegen.download_file(str(root), ObjType.APP_IMG, DownloadArea.VERIFIED,
                                           claimed.upper(), "bad.img", bad)
        bad_rel = os.path.relpath(bad_path, root)
        proc = migrate(root, run, config=cfg)
        assert proc.returncode == 1, proc.stderr
        assert f"quarantined: {bad_rel}:" in proc.stderr, proc.stderr
        assert "migrated 1 of 2 objects" in proc.stderr, proc.stderr
        assert not os.path.exists(good_path)
        assert file_sha(root / "vault/verifier/verified" / devicegen.sha_of(good)) == \
            devicegen.sha_of(good)
        assert Path(bad_path).read_bytes() == bad                # stays where it was
        assert not (root / "vault/verifier/verified" / claimed).exists()
        assert temporaries(root) == []
        o = status_of(status(root, run, cfg), bad_rel)
        assert o["state"] == "failed" and "sha256" in (o["reason"] or ""), o
        state, _, attempts = index_records(root)[bad_rel]
        assert state == "quarantined"

        again = migrate(root, run, config=cfg)  # quarantined: tried again only when asked
        assert "migrated 0 of 0 objects" in again.stderr, again.stderr
        assert index_records(root)[bad_rel][2] == attempts
        assert Path(bad_path).read_bytes() == bad


# -- 6. bounded retries, and one failure never stops the others -----------------------------

def failing_device(root: Path, rng: random.Random, blocker_kind: str):
    """Two volumes and a pending download whose destination directory is not a
    directory (*blocker_kind*: a dangling symbolic link or a regular file)."""
    app = one_app(rng, ["raw", "raw"])
    image_id = random_uuid(rng)
    devicegen.write_device_state(str(root), [app])
    want = {f"img/{app.legacy_name(i)}": write_random(root / "img" / app.legacy_name(i),
                                                       MIB, rng) for i in range(2)}
    blob = rng.randbytes(64 << 10)
    pending = os.path.relpath(devicegen.download_file(
        str(root), ObjType.APP_IMG, DownloadArea.PENDING, image_id, "x.img", blob), root)
    blocker = root / "vault/downloader/pending" / image_id
    blocker.parent.mkdir(parents=True)
    if blocker_kind == "symlink":
        blocker.symlink_to("/nonexistent/compatfs-test")
    else:
        blocker.write_bytes(b"in the way")
    return app, want, pending, blob


def test_a_failing_object_is_retried_on_every_run_while_the_others_move(tmp_path):
    """A failed object is never given up on: every ``migrate --now`` (like every
    start of the daemon) tries it again, and once its cause is gone it moves."""
    run = tmp_path / "run"
    cfg = config(tmp_path, "c.yaml", DESIGN_NOTE + "migration: {retries: 2, retry_backoff_s: 0}\n")
    with device(tmp_path) as root:
        app, want, pending, blob = failing_device(root, random.Random(10), "symlink")

        first = migrate(root, run, config=cfg)
        assert first.returncode == 1, first.stderr
        assert f"failed: {pending}: Not a directory (ENOTDIR)" in first.stderr, first.stderr
        assert "migrated 2 of 3 objects" in first.stderr, first.stderr
        for i, (name, digest_) in enumerate(want.items()):
            assert file_sha(root / vol_target(app.drives[i])) == digest_
            assert not (root / name).exists()
        state, reason, attempts = index_records(root)[pending]
        assert (state, attempts) == ("failed", 1) and "ENOTDIR" in reason, reason

        for n in (2, 3):   # past ``retries``: still tried on every run
            again = migrate(root, run, config=cfg)
            assert again.returncode == 1 and "migrated 0 of 1 objects" in again.stderr, \
                again.stderr
            assert f"failed: {pending}:" in again.stderr, again.stderr
            state, _, attempts = index_records(root)[pending]
            assert (state, attempts) == ("failed", n)

        assert (root / pending).read_bytes() == blob
        assert temporaries(root) == []
        o = status_of(status(root, run, cfg), pending)
        assert o["state"] == "failed" and o["reason"] == reason, o

        (root / "vault/downloader/pending" / pending.split("/")[3]).unlink()  # the cause
        fixed = migrate(root, run, config=cfg)
        assert fixed.returncode == 0 and "migrated 1 of 1 objects" in fixed.stderr, fixed.stderr
        assert not (root / pending).exists()
        assert {s for s, _, _ in index_records(root).values()} == {"new"}


def test_a_destination_blocked_by_a_file_fails_alone(tmp_path):
    run = tmp_path / "run"
    with device(tmp_path) as root:
        app, want, pending, blob = failing_device(root, random.Random(10), "file")
        proc = migrate(root, run, config=config(tmp_path, "c.yaml", DESIGN_NOTE))
        assert proc.returncode == 1, proc.stderr
        assert f"failed: {pending}:" in proc.stderr, proc.stderr
        for i, name in enumerate(want):
            assert file_sha(root / vol_target(app.drives[i])) == want[name]
        assert (root / pending).read_bytes() == blob


# -- 7. small objects first --------------------------------------------------------------------

def test_small_objects_migrate_before_a_large_one(tmp_path):
    run = tmp_path / "run"
    rng = random.Random(11)
    sizes = [24 * MIB, 3 * MIB, MIB, 2 * MIB]
    # names sort the large one first, and the small ones against their size
    shas = ["0" * 64, "1" * 64, "2" * 64, "3" * 64]
    app = AppDef(random_uuid(rng), "app", [
        DriveDef(random_uuid(rng), sha, "raw", volume_uuid=random_uuid(rng)) for sha in shas])
    cfg = config(tmp_path, "c.yaml", "migration: {concurrency: 1, throttle_mib_per_s: 0}\n")
    with device(tmp_path) as root:
        devicegen.write_device_state(str(root), [app])
        for i, size in enumerate(sizes):
            write_random(root / "img" / app.legacy_name(i), size, rng)
        proc = migrate(root, run, "--log-level", "info", config=cfg)
        assert proc.returncode == 0, proc.stderr
        order = re.findall(r"migrated (img/\S+) to", proc.stderr)
        by_size = [f"img/{app.legacy_name(i)}" for i in sorted(range(4), key=sizes.__getitem__)]
        assert order == by_size, proc.stderr


# -- 8. status while the daemon migrates ------------------------------------------------------

def test_status_shows_a_migration_in_progress_then_done(tmp_path):
    run = tmp_path / "run"
    rng = random.Random(12)
    app = one_app(rng, ["raw"])
    cfg = config(tmp_path, "c.yaml", "migration: {throttle_mib_per_s: 8, rescan_s: 1}\n")
    with device(tmp_path) as root:
        devicegen.write_device_state(str(root), [app])
        legacy = f"img/{app.legacy_name(0)}"
        want = write_random(root / legacy, 32 * MIB, rng)
        with mounted(root, run, stage="migrate", config=cfg) as m:
            seen = None
            deadline = time.monotonic() + 20
            while seen is None:
                assert time.monotonic() < deadline, m.log_text()
                doc = status(root, run)
                o = status_of(doc, legacy)
                assert o["state"] != "new", "migrated before status saw it move"
                if o["state"] == "migrating" and o["progress"] and o["progress"]["done"] > 0:
                    seen = doc, o
                time.sleep(0.2)
            doc, o = seen
            assert doc["mounted"] and doc["stage"] == "migrate"
            assert 0 < o["progress"]["done"] <= o["progress"]["total"] <= 33 * MIB, o
            assert o["target"] == vol_target(app.drives[0]), o
            assert doc["migration"]["rate"] > 0 and doc["migration"]["objects_total"] == 1, doc
            assert doc["totals"]["by_state"]["migrating"]["objects"] == 1
            while status_of(status(root, run), legacy)["state"] != "new":
                assert time.monotonic() < deadline + 20, m.log_text()
                time.sleep(0.2)
            done = status_of(status(root, run), legacy)
            assert done["location"] == vol_target(app.drives[0]), done
            assert file_sha(root / legacy) == want  # through the view
        assert not (root / legacy).exists()
        assert file_sha(root / vol_target(app.drives[0])) == want
        assert temporaries(root) == []
        assert_idle(root, run)


# -- 9. a fault ends one object; failed objects are retried -------------------------------------

def test_a_name_that_is_not_utf8_fails_alone_and_the_views_answer(demo_root, tmp_path):
    """A pending download whose name is not UTF-8: whatever the index makes of it, the
    views keep answering, the daemon keeps serving, and ``migrate --now`` says what
    happened to that one object in one line."""
    root, _ = demo_root
    run = tmp_path / "run"
    cfg = config(tmp_path, "c.yaml", DESIGN_NOTE + "require_encrypted_vault: false\n"
                 "vault_wait_s: 0\nmigration: {rescan_s: 1, retry_backoff_s: 1}\n")
    image = random_uuid(random.Random(16))
    pending = f"downloads/appImg.obj/pending/{image}"
    bad = os.path.join(os.fsencode(str(root / pending)), b"\xff\xfe.img")
    os.makedirs(root / pending)
    blob = os.urandom(64 << 10)
    with open(bad, "wb") as f:
        f.write(blob)
    shown = "\\udcff\\udcfe.img"            # how the log spells the name
    with mounted(root, run, stage="migrate", config=cfg) as m:
        deadline = time.monotonic() + 20
        while not re.search(rf"{re.escape(pending)}/{re.escape(shown)}: migration failed|"
                            rf"migrated {re.escape(pending)}/{re.escape(shown)}", m.log_text()):
            assert time.monotonic() < deadline, m.log_text()
            assert m.proc.poll() is None, m.log_text()
            time.sleep(0.1)

        def through_the_views() -> None:
            assert os.listdir(root / "img")
            assert os.listdir(os.fsencode(str(root / pending))) == [b"\xff\xfe.img"]
            with open(bad, "rb") as f:
                assert f.read() == blob

        answers_within(10, through_the_views)
        assert status(root, run, cfg)["mounted"]
        time.sleep(1.5)   # a later pass tries it again: still no harm
        answers_within(10, through_the_views)
        assert m.proc.poll() is None, m.log_text()
    assert_clean_exit(m)

    proc = migrate(root, run, config=cfg)
    assert "internal error" not in proc.stderr, proc.stderr
    assert proc.returncode in (0, 1), proc.stderr
    if proc.returncode == 1:
        lines = [ln for ln in proc.stderr.splitlines() if ln.startswith("compatfs: failed:")]
        assert len(lines) == 1 and f"{pending}/{shown}" in lines[0], proc.stderr
    assert re.search(r"compatfs: migrated \d+ of \d+ objects", proc.stderr), proc.stderr


def test_an_agents_own_compatfs_tmp_file_is_not_taken_for_a_temporary(tmp_path):
    """``pending/<id>/X.compatfs-tmp``, written by an agent, lives beside the copy of
    ``pending/<id>/X`` in the vault: the migrator's temporaries are elsewhere."""
    run = tmp_path / "run"
    rng = random.Random(15)
    with device(tmp_path) as root:
        devicegen.write_device_state(str(root), [])
        image = random_uuid(rng)
        blob = rng.randbytes(300 << 10)
        devicegen.download_file(str(root), ObjType.APP_IMG, DownloadArea.PENDING, image,
                                "x.img", blob)
        name = f"downloads/appImg.obj/pending/{image}"
        mine = rng.randbytes(5000)
        cfg = config(tmp_path, "c.yaml", DESIGN_NOTE + "migration: {rescan_s: 1}\n")
        with mounted(root, run, stage="redirect", config=cfg):
            (root / name / "x.img.compatfs-tmp").write_bytes(mine)   # placed in the vault
        assert index_records(root)[f"{name}/x.img.compatfs-tmp"][0] == "new"
        with mounted(root, run, stage="migrate", config=cfg) as m:
            deadline = time.monotonic() + 20
            while index_records(root).get(f"{name}/x.img", ("",))[0] != "new":
                assert time.monotonic() < deadline, m.log_text()
                time.sleep(0.2)
            assert (root / name / "x.img").read_bytes() == blob
            assert (root / name / "x.img.compatfs-tmp").read_bytes() == mine
            assert sorted(os.listdir(root / name)) == ["x.img", "x.img.compatfs-tmp"]
        assert temporaries(root) == []


def test_failed_objects_are_retried_at_start_and_by_name_quarantined_only_by_name(tmp_path):
    run = tmp_path / "run"
    rng = random.Random(17)
    # a long back-off: only a start or a command explains a new attempt
    cfg = config(tmp_path, "c.yaml",
                 DESIGN_NOTE + "migration: {rescan_s: 1, retry_backoff_s: 3600}\n")
    with device(tmp_path) as root:
        app, want, pending, blob = failing_device(root, rng, "symlink")
        bad = rng.randbytes(100 << 10)
        bad_rel = os.path.relpath(devicegen.download_file(
            str(root), ObjType.APP_IMG, DownloadArea.VERIFIED,
            devicegen.sha_of(rng.randbytes(10)), "bad.img", bad), root)

        def attempts(name: str, state: str, n: int, m) -> None:
            deadline = time.monotonic() + 20
            while index_records(root).get(name, ("", None, 0))[::2] != (state, n):
                assert time.monotonic() < deadline, (index_records(root).get(name),
                                                     m.log_text())
                time.sleep(0.2)

        with mounted(root, run, stage="migrate", config=cfg) as m:
            attempts(pending, "failed", 1, m)
            attempts(bad_rel, "quarantined", 1, m)
            time.sleep(2.5)   # passes every second: neither is tried again
            assert index_records(root)[pending][2] == 1
        with mounted(root, run, stage="migrate", config=cfg) as m:
            attempts(pending, "failed", 2, m)          # tried again at start
            time.sleep(1.5)
            assert index_records(root)[bad_rel][2] == 1  # quarantined: not at start
            common = ("--root", str(root), "--run-dir", str(run))
            assert cli("ctl", *common, "migrate-now", bad_rel).returncode == 0
            attempts(bad_rel, "quarantined", 2, m)      # asked by name: at once

            (root / "vault/downloader/pending" / pending.split("/")[3]).unlink()  # the cause
            assert cli("ctl", *common, "migrate-now", pending).returncode == 0
            deadline = time.monotonic() + 20
            while index_records(root)[pending][0] != "new":
                assert time.monotonic() < deadline, m.log_text()
                time.sleep(0.2)
            assert (root / pending).read_bytes() == blob    # through the view
            assert (root / bad_rel).read_bytes() == bad
        assert temporaries(root) == []
