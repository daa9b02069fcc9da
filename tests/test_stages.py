"""Staged rollouts: moving a device forward and back with one config change,
a vault that is not unlocked in time, and readiness for systemd."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time

import pytest

from compatfs import fscrypt, mounts
from compatfs.rundir import RunDir
from compatfs.testing import devicegen

from .conftest import legacy_snapshot, run_cli
from .devices import device_root
from .mounting import mounted, teardown
from .test_migrate import sha_tree

pytestmark = pytest.mark.root


def test_forward_through_every_stage_and_back(tmp_path):
    (tmp_path / "dev").mkdir()
    with device_root(tmp_path / "dev", size_mb=512) as root:
        web, db, pod, fresh = devicegen.make_demo(str(root))
        config = tmp_path / "compatfs.yaml"
        run = tmp_path / "run"
        common = ("--root", str(root), "--run-dir", str(run), "--config", str(config))
        original = legacy_snapshot(root)
        contents = {**sha_tree(root, "img"), **sha_tree(root, "downloads")}
        try:
            for stage in ("observe", "redirect", "migrate"):
                config.write_text(f"stage: {stage}\nmigration:\n  rescan_s: 1\n")
                proc = run_cli("reload", *common)
                assert proc.returncode == 0, proc.stderr
                assert run_cli("ctl", *common, "get", "stage").stdout.strip() == stage
                for legacy, digest in contents.items():  # every legacy name reads the same
                    with open(root / legacy, "rb") as f:
                        import hashlib
                        assert hashlib.file_digest(f, "sha256").hexdigest() == digest, (
                            stage, legacy)
            deadline = time.monotonic() + 60
            target = root / "vault/volumes" / f"{web.drives[0].volume_uuid}#0.qcow2"
            while not target.exists() and time.monotonic() < deadline:
                time.sleep(0.2)
            assert target.exists(), "stage migrate did not migrate"
            with open(RunDir(str(run), str(root)).log_file) as f:
                log = f.read()
            assert "stage: observe -> redirect" in log and "stage: redirect -> migrate" in log
            config.write_text("stage: rollback\n")
            proc = run_cli("reload", *common)
            assert proc.returncode == 0, proc.stderr
            assert mounts.mounted_at(str(root / "img")) is None
            assert legacy_snapshot(root) == original
            config.write_text("stage: off\n")
            assert run_cli("reload", *common).returncode == 0
            assert mounts.mounted_at(str(root / "img")) is None
        finally:
            run_cli("umount", "--root", str(root), "--run-dir", str(run))
            teardown(root, run, ("img", "downloads"))


def test_a_locked_vault_falls_back_to_observe(tmp_path):
    (tmp_path / "dev").mkdir()
    with device_root(tmp_path / "dev", size_mb=128) as root:
        devicegen.make_demo(str(root))
        fd = os.open(root / "vault", os.O_RDONLY)
        identifier = fscrypt.policy_of(fd)[8:24]
        os.close(fd)
        mfd = os.open(root, os.O_RDONLY)
        fscrypt.remove_key(mfd, identifier)
        os.close(mfd)
        fd = os.open(root / "vault", os.O_RDONLY)
        assert fscrypt.key_present(fd) is False
        os.close(fd)
        config = tmp_path / "c.yaml"
        config.write_text("vault_wait_s: 1\n")
        started = time.monotonic()
        with mounted(root, tmp_path / "run", stage="redirect", config=config) as m:
            assert time.monotonic() - started < 15
            ctl = root / "img" / ".compatfs"
            assert os.getxattr(ctl, "user.compatfs.stage") == b"observe"
            assert "was not unlocked within 1 s; serving in stage observe" in m.log_text()
            (root / "img" / "new.raw").write_bytes(b"x")  # stays in the legacy store
        assert (root / "img" / "new.raw").exists()


def test_ready_is_notified_to_systemd(tmp_path):
    root = tmp_path / "persist"
    root.mkdir()
    devicegen.make_demo(str(root))
    address = str(tmp_path / "notify")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(address)
    sock.settimeout(20)
    env = dict(os.environ, NOTIFY_SOCKET=address)
    proc = subprocess.Popen([sys.executable, "-m", "compatfs", "mount", "--foreground",
                             "--root", str(root), "--run-dir", str(tmp_path / "run")],
                            env=env, stderr=subprocess.DEVNULL)
    try:
        assert sock.recv(64) == b"READY=1"
        assert mounts.is_compatfs(str(root / "img"))  # ready means the views answer
        os.listdir(root / "img")
    finally:
        proc.terminate()
        proc.wait(timeout=20)
        sock.close()
        teardown(root, tmp_path / "run", ("img", "downloads"))
    assert proc.returncode == 0
