"""A legacy containerd tree with a mount inside it is not moved (docs/eve.md section 8, E14).

EVE's ZFS installs mount a dataset at
``containerd/io.containerd.snapshotter.v1.zfs``. Moving the tree would copy
the dataset's files out of it and leave the dataset mounted at a name nothing
uses, so the tree waits, ``plan`` and ``status`` say why, and it moves once
the mount is gone; the check is repeated just before the switch, as the
in-use check is. Tested with a real tmpfs mounted inside a real tree.
"""

from __future__ import annotations

import json
import os
import subprocess
import time
from pathlib import Path

import pytest

from compatfs.inuse import busy, mounts_inside
from compatfs.testing import devicegen

from .conftest import run_cli, temporaries, tmpfs
from .devices import device_under
from .mounting import mounted
from .test_migrate import sha_tree

ZFS = "io.containerd.snapshotter.v1.zfs"


@pytest.fixture
def device(tmp_path):
    with device_under(tmp_path, size_mb=512) as root:
        yield root


@pytest.fixture
def config(tmp_path) -> Path:
    """The design note's layout moves containerd whatever the release."""
    path = tmp_path / "c.yaml"
    path.write_text("layout: design-note\n"
                    "migration:\n  rescan_s: 1\n  retry_backoff_s: 0\n  throttle_mib_per_s: 0\n")
    return path


def test_mounts_inside_and_busy(tmp_path):
    top = tmp_path / "containerd"
    (top / "sub").mkdir(parents=True)
    (tmp_path / "containerd2").mkdir()
    assert mounts_inside(str(top)) == [] and busy(str(top)) is None
    with tmpfs(tmp_path / "containerd2", "1m"):            # a sibling sharing the prefix
        assert mounts_inside(str(top)) == []
    with tmpfs(top / "sub", "1m"):
        found = mounts_inside(str(top))
        assert [(m.mount_point, m.fstype) for m in found] == [(str(top / "sub"), "tmpfs")]
        why = busy(str(top))
        assert why is not None and why.startswith("a mount point at or inside it: ")
        assert f"{top / 'sub'} (tmpfs)" in why
    with tmpfs(top, "1m"):                                   # the tree itself a mount point
        assert [m.mount_point for m in mounts_inside(str(top))] == [str(top)]
    assert mounts_inside(str(top)) == []


def _containerd_entry(doc: dict) -> dict:
    return next(o for o in doc["objects"] if o["legacy"] == "containerd")


def test_migrate_now_leaves_a_tree_with_a_mount_inside_and_moves_it_once_unmounted(
        device, tmp_path, config):
    root = device
    devicegen.make_demo(str(root))
    before = sha_tree(root, "containerd")
    run = str(tmp_path / "run")
    mnt = root / "containerd" / ZFS
    with tmpfs(mnt, "4m"):
        (mnt / "dataset-file").write_bytes(b"in the zfs dataset")
        plan = json.loads(run_cli("plan", "--root", str(root), "--config", str(config),
                                  "--json", check=True).stdout)
        entry = _containerd_entry(plan)
        assert entry["target"] and entry["action"] != "keep", entry
        assert entry["reason"].startswith(f"waits: a mount point at or inside it: {mnt} (tmpfs)")
        text = run_cli("plan", "--root", str(root), "--config", str(config), check=True).stdout
        assert f"waits: a mount point at or inside it: {mnt} (tmpfs)" in text

        proc = run_cli("migrate", "--root", str(root), "--config", str(config), "--now",
                       "--run-dir", run)
        assert proc.returncode == 1, proc.stderr
        assert f"waiting: persist/containerd: a mount point at or inside it: {mnt} (tmpfs)" \
            in proc.stderr, proc.stderr
        assert {k: v for k, v in sha_tree(root, "containerd").items()
                if not k.startswith(f"containerd/{ZFS}/")} == before
        assert not (root / "vault/containerd").exists()
        assert os.path.ismount(mnt)
        status = run_cli("status", "--root", str(root), "--config", str(config),
                         "--run-dir", run).stdout
        assert "waits: a mount point at or inside it" in status, status
        assert temporaries(root) == []
        subprocess.run(["umount", str(mnt)], check=True)
    again = run_cli("migrate", "--root", str(root), "--config", str(config), "--now",
                    "--run-dir", run)
    assert again.returncode == 0 and "migrated 1 of 1 objects" in again.stderr, again.stderr
    assert not (root / "containerd").exists()
    assert {k.removeprefix("vault/"): v for k, v in sha_tree(root, "vault/containerd").items()} \
        == before
    status = json.loads(run_cli("status", "--root", str(root), "--config", str(config),
                                "--run-dir", run, "--json").stdout)
    assert _containerd_entry(status)["state"] == "new"


def test_daemon_waits_for_the_mount_to_go_and_status_says_why(device, tmp_path, config):
    root = device
    devicegen.make_demo(str(root))
    before = sha_tree(root, "containerd")
    mnt = root / "containerd" / ZFS
    run = tmp_path / "run"
    with tmpfs(mnt, "4m"):
        with mounted(root, run, stage="migrate", config=config) as m:
            deadline = time.monotonic() + 30   # the rest moves meanwhile
            while not sha_tree(root, "vault/volumes") and time.monotonic() < deadline:
                time.sleep(0.2)
            assert sha_tree(root, "vault/volumes"), m.log_text()
            time.sleep(3)                       # several more passes with the mount inside
            assert (root / "containerd").is_dir() and not (root / "vault/containerd").exists()
            said = [line for line in m.log_text().splitlines()
                    if f"persist/containerd: a mount point at or inside it: {mnt}" in line]
            assert len(said) == 1, m.log_text()
            status = run_cli("status", "--root", str(root), "--config", str(config),
                             "--run-dir", str(run), "--json")
            doc = json.loads(status.stdout)
            entry = _containerd_entry(doc)
            assert entry["state"] == "legacy", entry
            assert entry["reason"].startswith("waits: a mount point at or inside it"), entry
            assert "a mount point" in doc["migration"]["waiting"]["persist/containerd"], doc
            subprocess.run(["umount", str(mnt)], check=True)
            deadline = time.monotonic() + 30
            while (root / "containerd").exists() and time.monotonic() < deadline:
                time.sleep(0.2)
            assert not (root / "containerd").exists(), m.log_text()
    assert {k.removeprefix("vault/"): v for k, v in sha_tree(root, "vault/containerd").items()} \
        == before
    assert temporaries(root) == []
