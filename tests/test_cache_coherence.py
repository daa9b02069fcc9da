"""The kernel's caches never show a name as it was before compatfs changed it.

With the daemon's default timeouts (10 s for entries and attributes), a name
is stat'ed and read through a view (its attributes and pages cached), then
changed without any request through that view: by the migration (a copy
switched, a legacy copy set aside), by the config watcher (an unresolved name
placed), or through another view (the debug mount, the other bind of the
same mount). Right after, every way of looking shows the change.
"""

from __future__ import annotations

import os
import random
import time
from pathlib import Path

import pytest

from compatfs.rundir import RunDir
from compatfs.testing import devicegen

from .conftest import run_cli
from .devices import device_under
from .mounting import Mounted, mounted

pytestmark = pytest.mark.root

MIB = 1 << 20


@pytest.fixture
def device(tmp_path):
    with device_under(tmp_path, size_mb=256) as root:
        yield root


def vm_app(rng: random.Random) -> devicegen.AppDef:
    """An app with one raw drive, whose legacy name carries purge counter 1: a
    config without that counter does not map it (it stays, or is parked), one
    with it does."""
    return devicegen.AppDef(devicegen.random_uuid(rng), "vm", [
        devicegen.DriveDef(devicegen.random_uuid(rng), devicegen.random_sha(rng), "raw",
                           volume_uuid=devicegen.random_uuid(rng))], purge=0)


def map_it(root: Path, app: devicegen.AppDef) -> None:
    """The controller's new config maps the purge-1 name."""
    app.purge = 1
    devicegen.write_device_state(str(root), [app])


def target_of(root: Path, app: devicegen.AppDef) -> Path:
    d = app.drives[0]
    return root / "vault/volumes" / f"{d.volume_uuid}#{d.generation}.raw"


def wait_for_log(m: Mounted, text: str, seconds: float = 60.0) -> None:
    deadline = time.monotonic() + seconds
    while text not in m.log_text():
        assert time.monotonic() < deadline, f"no {text!r} within {seconds:g} s:\n{m.log_text()}"
        time.sleep(0.05)


def cache_attributes(path: Path) -> os.stat_result:
    """Have the kernel cache *path*'s attributes now (a setattr's reply carries
    them, for the full timeout from here) and return them."""
    os.chmod(path, os.stat(path).st_mode & 0o7777)
    return os.stat(path)


def test_a_copied_file_shows_its_new_attributes_at_once(device, tmp_path):
    """The migration copies a file an agent has just stat'ed and read: right after
    the switch the view shows the copy's attributes, the same bytes, and a write
    lands in the copy."""
    root = device
    app = vm_app(random.Random(41))
    devicegen.write_device_state(str(root), [app])
    name = app.legacy_name(0, purge=1)
    data = random.Random(42).randbytes(4 * MIB)
    (root / "img").mkdir()
    (root / "img" / name).write_bytes(data)
    config = tmp_path / "c.yaml"
    config.write_text("migration:\n  rescan_s: 1\n  retry_backoff_s: 0\n"
                      "  throttle_mib_per_s: 0\n")
    with mounted(root, tmp_path / "run", stage="migrate", config=config) as m:
        view = root / "img" / name
        assert view.read_bytes() == data   # its pages and attributes are cached
        before = cache_attributes(view)
        map_it(root, app)
        wait_for_log(m, f"migrated img/{name}")
        copy = os.stat(target_of(root, app))
        assert copy.st_ctime_ns != before.st_ctime_ns   # the check below can tell them apart
        seen = os.stat(view)
        assert (seen.st_ctime_ns, seen.st_blocks, seen.st_size, seen.st_mtime_ns) == \
            (copy.st_ctime_ns, copy.st_blocks, copy.st_size, copy.st_mtime_ns)
        assert view.read_bytes() == data
        with open(view, "r+b") as f:
            f.write(b"written after the switch")
        with open(target_of(root, app), "rb") as f:
            assert f.read(24) == b"written after the switch"


def test_an_unresolved_name_placed_by_a_config_change_shows_its_new_attributes_at_once(
        device, tmp_path):
    """A volume made through the view while the config does not map it is parked;
    the config watcher places it when a new config does: right after, the view
    shows the placed file's attributes."""
    root = device
    app = vm_app(random.Random(43))
    devicegen.write_device_state(str(root), [app])
    name = app.legacy_name(0, purge=1)
    with mounted(root, tmp_path / "run", stage="redirect") as m:
        view = root / "img" / name
        view.write_bytes(b"parked for now")
        assert (root / "vault/compatfs/unresolved/img" / name).exists()
        before = cache_attributes(view)
        map_it(root, app)
        wait_for_log(m, f"img/{name}: placed at")
        placed = os.stat(target_of(root, app))
        assert placed.st_ctime_ns != before.st_ctime_ns
        seen = os.stat(view)
        assert (seen.st_ctime_ns, seen.st_size, seen.st_mtime_ns) == \
            (placed.st_ctime_ns, placed.st_size, placed.st_mtime_ns)
        assert view.read_bytes() == b"parked for now"


def test_a_legacy_copy_set_aside_shows_the_destination_at_once(device, tmp_path):
    """The destination wins (layout eve): the legacy file an agent has just read
    is set aside and the name serves the destination. Same size and mtime as the
    legacy file, so only being told keeps the kernel from serving the pages it
    holds; and the set-aside directory, a name that was not there, is found."""
    root = device
    app = vm_app(random.Random(44))
    devicegen.write_device_state(str(root), [app])
    name = app.legacy_name(0, purge=1)
    (root / "img").mkdir()
    legacy = root / "img" / name
    legacy.write_bytes(b"L" * MIB)
    target = target_of(root, app)
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_bytes(b"D" * MIB)
    mtime = os.stat(legacy).st_mtime_ns
    os.utime(target, ns=(mtime, mtime))
    config = tmp_path / "c.yaml"
    config.write_text("layout: eve\nmigration:\n  rescan_s: 1\n  retry_backoff_s: 0\n")
    with mounted(root, tmp_path / "run", stage="migrate", config=config) as m:
        view = root / "img" / name
        aside = root / "img/.compatfs-set-aside"
        assert view.read_bytes() == b"L" * MIB
        assert not aside.exists()
        before = cache_attributes(view)
        map_it(root, app)
        wait_for_log(m, f"migrated img/{name}")
        dst = os.stat(target)
        assert dst.st_ctime_ns != before.st_ctime_ns
        seen = os.stat(view)
        assert (seen.st_ctime_ns, seen.st_size, seen.st_mtime_ns) == \
            (dst.st_ctime_ns, dst.st_size, dst.st_mtime_ns)
        assert view.read_bytes() == b"D" * MIB
        assert aside.is_dir() and ".compatfs-set-aside" in os.listdir(root / "img")
        (kept,) = os.listdir(aside)
        assert (aside / kept).read_bytes() == b"L" * MIB


def test_changes_through_one_view_show_at_once_in_the_debug_mount_and_the_other_bind(
        device, tmp_path):
    """Changes through a view show at once through the other bind of the same
    FUSE mount (its private mountpoint) and through the debug mount, a
    connection of its own that nobody can tell: a created, grown, renamed and
    removed file, and a placed volume renamed away from its index record."""
    root = device
    app = vm_app(random.Random(45))
    app.purge = 1
    devicegen.write_device_state(str(root), [app])
    run, look = tmp_path / "run", tmp_path / "look"
    look.mkdir()
    with mounted(root, run, stage="redirect"):
        img = root / "img"
        other = Path(RunDir(str(run), str(root)).mountpoint) / "img"
        volume = app.legacy_name(0)
        (img / volume).write_bytes(b"placed")          # a record, before the debug mount
        assert target_of(root, app).exists()
        proc = run_cli("debug-mount", "--root", str(root), "--run-dir", str(run), str(look))
        assert proc.returncode == 0, proc.stderr
        try:
            debug = look / "img"
            views = (img, other, debug)
            (img / "notes.txt").write_bytes(b"one")
            for v in views:     # each caches the name and its attributes
                assert (v / "notes.txt").read_bytes() == b"one"
                assert (v / volume).read_bytes() == b"placed"
            with open(img / "notes.txt", "ab") as f:
                f.write(b" two")
            for v in views:
                assert os.stat(v / "notes.txt").st_size == 7, v
                assert (v / "notes.txt").read_bytes() == b"one two", v
            os.rename(other / "notes.txt", other / "renamed.txt")
            for v in views:
                assert not (v / "notes.txt").exists(), v
                assert (v / "renamed.txt").read_bytes() == b"one two", v
            os.unlink(img / "renamed.txt")
            for v in views:
                assert not (v / "renamed.txt").exists(), v
                assert "renamed.txt" not in os.listdir(v), v
            # the record moves to the new name; the placed bytes stay where they are
            os.rename(img / volume, img / "moved.raw")
            for v in views:
                assert not (v / volume).exists(), v
                assert volume not in os.listdir(v), v
                assert (v / "moved.raw").read_bytes() == b"placed", v
        finally:
            assert run_cli("debug-mount", "--unmount", str(look)).returncode == 0


def test_a_copied_tree_shows_the_new_attributes_of_the_names_inside_at_once(device, tmp_path):
    """The migration copies a container volume whose files an agent has just
    stat'ed: right after the switch, the names inside show the copies'
    attributes (the kernel holds each of them, not just the tree's)."""
    root = device
    rng = random.Random(46)
    pod = devicegen.AppDef(devicegen.random_uuid(rng), "pod", [
        devicegen.DriveDef(devicegen.random_uuid(rng), devicegen.random_sha(rng), "container",
                           volume_uuid=devicegen.random_uuid(rng))])
    devicegen.write_device_state(str(root), [pod])
    name = pod.legacy_name(0, container=True, purge=1)
    legacy = root / "runx/pods/prepared" / name
    (legacy / "rootfs/etc").mkdir(parents=True)
    (legacy / "rootfs/etc/hostname").write_bytes(b"pod\n")
    (legacy / "image-config.json").write_bytes(b"{}")
    config = tmp_path / "c.yaml"
    config.write_text("mount_prepared: true\nmigration:\n  rescan_s: 1\n  retry_backoff_s: 0\n"
                      "  throttle_mib_per_s: 0\n")
    with mounted(root, tmp_path / "run", stage="migrate", config=config,
                 views=("img", "downloads", "prepared")) as m:
        inside = legacy / "rootfs/etc/hostname"
        assert inside.read_bytes() == b"pod\n"
        before = cache_attributes(inside)
        map_it(root, pod)
        wait_for_log(m, f"migrated prepared/{name}")
        d = pod.drives[0]
        copy = os.stat(root / "vault/volumes" / f"{d.volume_uuid}#{d.generation}.container"
                       / "rootfs/etc/hostname")
        assert copy.st_ctime_ns != before.st_ctime_ns
        seen = os.stat(inside)
        assert (seen.st_ctime_ns, seen.st_size, seen.st_mtime_ns) == \
            (copy.st_ctime_ns, copy.st_size, copy.st_mtime_ns)
        assert inside.read_bytes() == b"pod\n"
        assert "snapshotid.txt" in os.listdir(legacy)
