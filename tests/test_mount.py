"""Real mounts: the daemon as a subprocess, its views over a legacy tree."""

from __future__ import annotations

import errno
import os
import signal

import pytest

from compatfs import mounts
from compatfs.testing import devicegen

from .conftest import run_cli, tree_snapshot
from .mounting import assert_clean_exit, mounted

pytestmark = pytest.mark.root


@pytest.fixture
def legacy_root(tmp_path):
    root = tmp_path / "persist"
    root.mkdir()
    apps = devicegen.make_demo(str(root))
    return root, apps


def test_views_list_legacy_names_and_unmount_reveals_the_same_tree(legacy_root, tmp_path):
    root, (web, *_) = legacy_root
    before = tree_snapshot(root)
    with mounted(root, tmp_path / "run") as m:
        assert mounts.is_compatfs(str(root / "img"))
        assert web.legacy_name(0) in os.listdir(root / "img")
        st_view = os.stat(root / "img" / web.legacy_name(0))
        assert st_view.st_size == before[f"img/{web.legacy_name(0)}"][1]
        with open(root / "img" / web.legacy_name(0), "rb") as f:
            assert f.read(4) == b"QFI\xfb"
        m.kill(signal.SIGTERM)
        assert_clean_exit(m)
    assert mounts.mounted_at(str(root / "img")) is None
    after = tree_snapshot(root)
    assert {k: v[:2] + v[3:] for k, v in after.items()} == \
        {k: v[:2] + v[3:] for k, v in before.items()}  # atime aside, nothing changed


def test_second_mount_of_the_same_root_is_a_clear_error(legacy_root, tmp_path):
    root, _ = legacy_root
    with mounted(root, tmp_path / "run"):
        proc = run_cli("mount", "--root", str(root), "--run-dir", str(tmp_path / "run"))
        assert proc.returncode == 1
        assert "already mounted" in proc.stderr and "Traceback" not in proc.stderr


def test_killed_daemon_leaves_dead_mounts_not_the_legacy_store(legacy_root, tmp_path):
    root, (web, *_) = legacy_root
    with mounted(root, tmp_path / "run") as m:
        m.kill(signal.SIGKILL)
        with pytest.raises(OSError) as err:
            os.listdir(root / "img")
        assert err.value.errno == errno.ENOTCONN
        # a new mount cleans up what the dead daemon left and serves again
        with mounted(root, tmp_path / "run"):
            assert web.legacy_name(0) in os.listdir(root / "img")


def test_umount_command_stops_the_background_daemon(legacy_root, tmp_path):
    root, _ = legacy_root
    run = tmp_path / "run"
    try:
        proc = run_cli("mount", "--root", str(root), "--run-dir", str(run))
        assert proc.returncode == 0, proc.stderr
        assert mounts.is_compatfs(str(root / "img"))
        assert mounts.is_compatfs(str(root / "downloads"))
        proc = run_cli("umount", "--root", str(root), "--run-dir", str(run))
        assert proc.returncode == 0, proc.stderr
        assert mounts.mounted_at(str(root / "img")) is None
        assert mounts.mounted_at(str(root / "downloads")) is None
    finally:
        from .mounting import teardown
        teardown(root, run, ("img", "downloads"))


def test_redirect_refuses_an_unencrypted_vault(legacy_root, tmp_path):
    root, _ = legacy_root
    proc = run_cli("mount", "--root", str(root), "--run-dir", str(tmp_path / "run"),
                   "--stage", "redirect")
    assert proc.returncode == 1
    assert "not encrypted" in proc.stderr and "Traceback" not in proc.stderr
    assert mounts.mounted_at(str(root / "img")) is None


def test_stage_off_mounts_nothing(legacy_root, tmp_path):
    root, _ = legacy_root
    proc = run_cli("mount", "--root", str(root), "--run-dir", str(tmp_path / "run"),
                   "--stage", "off", "--foreground")
    assert proc.returncode == 1 and "stage is off" in proc.stderr
    assert mounts.mounted_at(str(root / "img")) is None


def test_remount_after_a_crash_never_uncovers_the_legacy_directory(legacy_root, tmp_path):
    """Between the crash and the new view, img/ is dead (fails closed) or the new
    view; a watcher stat'ing it all along never sees the legacy filesystem."""
    import threading

    root, (web, *_) = legacy_root
    legacy_dev = os.stat(root).st_dev
    seen: set[str] = set()
    stop = threading.Event()

    def watch() -> None:
        while not stop.is_set():
            try:
                dev = os.stat(root / "img").st_dev
            except OSError as exc:
                seen.add(errno.errorcode.get(exc.errno, str(exc.errno)))
                continue
            seen.add("legacy" if dev == legacy_dev else "view")

    with mounted(root, tmp_path / "run") as m:
        m.kill(signal.SIGKILL)
        watcher = threading.Thread(target=watch)
        watcher.start()
        try:
            with mounted(root, tmp_path / "run") as again:
                assert web.legacy_name(0) in os.listdir(root / "img")
                stop.set()
                watcher.join()
                assert "replaced the view of a daemon that died" in again.log_text()
                # exactly one mount at each view: the dead one is gone, not stacked
                for view in ("img", "downloads"):
                    at = [e for e in mounts.mount_table() if e.mount_point == str(root / view)]
                    assert len(at) == 1 and at[0].fstype == mounts.FSTYPE, at
                # the legacy directories opened from under the dead views are the real
                # ones, and writable: a download and the verifier's rename
                obj = root / "downloads" / "appImg.obj"
                for area in ("pending", "verifier"):
                    (obj / area / IMAGE).mkdir(parents=True)
                (obj / "pending" / IMAGE / "new.img").write_bytes(b"downloaded")
                os.rename(obj / "pending" / IMAGE / "new.img", obj / "verifier" / IMAGE / "x.img")
        finally:
            stop.set()
            watcher.join()
    assert "legacy" not in seen, seen
    assert "view" in seen
    obj = root / "downloads" / "appImg.obj"                      # unmounted: on disk
    assert (obj / "verifier" / IMAGE / "x.img").read_bytes() == b"downloaded"
    assert not (obj / "pending" / IMAGE / "new.img").exists()


IMAGE = "5d0e7fd1-6f4f-4e6a-9a36-0c7d1b8f2e11"
