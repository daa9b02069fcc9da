"""A device rolled forward through every stage and back, through the boot
script, with its data checked at every step, a killed daemon recovering, and
an inspection through the debug mount (issue: running compatfs on devices)."""

from __future__ import annotations

import hashlib
import os
import signal
import subprocess
import time

import pytest

from compatfs import mounts
from compatfs.rundir import RunDir
from compatfs.testing import devicegen

from .conftest import legacy_snapshot, run_cli
from .devices import device_root
from .mounting import teardown
from .test_mountscripts import SCRIPTS_DIR, run, script_env

pytestmark = pytest.mark.root


def digest(path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def legacy_contents(root) -> dict[str, str]:
    """sha256 of every file under the legacy names (through the views when mounted)."""
    out = {}
    for top in ("img", "downloads"):
        for dirpath, _, files in os.walk(root / top):
            for f in files:
                p = os.path.join(dirpath, f)
                out[os.path.relpath(p, root)] = digest(p)
    return out


def views_answer(root) -> bool:
    try:
        return all(mounts.is_compatfs(str(root / v)) and os.listdir(root / v) is not None
                   for v in ("img", "downloads"))
    except OSError:
        return False


def test_forward_and_back_through_the_boot_script(tmp_path, capsys):
    (tmp_path / "dev").mkdir()
    with device_root(tmp_path / "dev", size_mb=512) as root:
        web, db, pod, fresh = devicegen.make_demo(str(root))
        run_dir = tmp_path / "run"
        config = tmp_path / "compatfs.yaml"
        common = ("--root", str(root), "--run-dir", str(run_dir), "--config", str(config))
        original = legacy_snapshot(root)
        expected = legacy_contents(root)
        measured = {}
        sup = None
        try:
            # off: nothing mounted, the legacy tree as it is
            config.write_text("stage: off\n")
            proc = run("compatfs-boot", *common)
            assert proc.returncode == 0, proc.stderr
            assert mounts.mounted_at(str(root / "img")) is None
            assert legacy_contents(root) == expected

            # observe, then redirect: every legacy name reads the same through the views
            for stage in ("observe", "redirect"):
                config.write_text(f"stage: {stage}\n")
                proc = run("compatfs-boot", *common)
                assert proc.returncode == 0, proc.stderr
                assert f"compatfs: ready (stage {stage})" in proc.stdout + proc.stderr
                assert legacy_contents(root) == expected, stage
                if stage == "redirect":  # volumemgr creates a volume: it lands in the vault
                    new = root / "img" / fresh.legacy_name(0)
                    new.write_bytes(b"created in redirect")
                    expected[f"img/{new.name}"] = digest(new)
                    assert (root / "vault/volumes"
                            / f"{fresh.drives[0].volume_uuid}#0.raw").exists()
                assert run("compatfs-stop", "--root", str(root),
                           "--run-dir", str(run_dir)).returncode == 0
                assert mounts.mounted_at(str(root / "img")) is None

            # migrate, supervised: everything moves; a killed daemon comes back
            config.write_text("stage: migrate\nmigration:\n  rescan_s: 1\n")
            log = tmp_path / "supervisor.log"
            with open(log, "wb") as out:
                sup = subprocess.Popen([str(SCRIPTS_DIR / "compatfs-boot"), "--supervise", *common],
                                       stdout=out, stderr=out, env=script_env(),
                                       stdin=subprocess.DEVNULL, start_new_session=True)
            rundir = RunDir(str(run_dir), str(root))
            deadline = time.monotonic() + 30
            while not (rundir.live_pid() and views_answer(root)) and time.monotonic() < deadline:
                time.sleep(0.1)
            target = root / "vault/volumes" / f"{web.drives[0].volume_uuid}#0.qcow2"
            started = time.monotonic()
            while not target.exists() and time.monotonic() - started < 60:
                time.sleep(0.1)
            assert target.exists(), log.read_text()
            first = rundir.live_pid()
            os.kill(first, signal.SIGKILL)
            killed = time.monotonic()
            while not (rundir.live_pid() not in (None, first) and views_answer(root)):
                assert time.monotonic() - killed < 20, log.read_text()
                time.sleep(0.05)
            measured["recovery_s"] = time.monotonic() - killed
            assert measured["recovery_s"] < 5.0
            assert legacy_contents(root) == expected  # nothing lost, through the views

            # inspect it through the debug mount
            look = tmp_path / "look"
            look.mkdir()
            proc = run_cli("debug-mount", "--root", str(root), "--run-dir", str(run_dir), str(look))
            assert proc.returncode == 0, proc.stderr
            try:
                name = look / "img" / web.legacy_name(0)
                deadline = time.monotonic() + 30
                while os.getxattr(name, "user.compatfs.state") != b"new":
                    assert time.monotonic() < deadline
                    time.sleep(0.5)
                assert os.getxattr(name, "user.compatfs.location").decode() == \
                    str(target.relative_to(root))
                assert digest(name) == expected[f"img/{web.legacy_name(0)}"]
            finally:
                run_cli("debug-mount", "--unmount", str(look))
            sup.send_signal(signal.SIGTERM)
            assert sup.wait(timeout=40) == 0, log.read_text()
            sup = None
            assert mounts.mounted_at(str(root / "img")) is None

            # rollback: the legacy layout old EVE expects, with the new volume in it
            config.write_text("stage: rollback\n")
            proc = run("compatfs-boot", *common, timeout=120)
            assert proc.returncode == 0, proc.stderr
            assert mounts.mounted_at(str(root / "img")) is None
            after = legacy_snapshot(root)
            for path, value in original.items():
                assert after[path] == value, path
            assert legacy_contents(root) == expected
            assert not any((root / "vault/volumes").iterdir())

            # and off again
            config.write_text("stage: off\n")
            assert run("compatfs-boot", *common).returncode == 0
            assert mounts.mounted_at(str(root / "img")) is None
            with capsys.disabled():
                print(f"\nrollout: views answered again {measured['recovery_s']:.2f} s after "
                      "the daemon was SIGKILLed in stage migrate")
        finally:
            if sup is not None and sup.poll() is None:
                sup.send_signal(signal.SIGTERM)
                try:
                    sup.wait(timeout=40)
                except subprocess.TimeoutExpired:
                    sup.kill()
            run_cli("umount", "--root", str(root), "--run-dir", str(run_dir))
            teardown(root, run_dir, ("img", "downloads"))
