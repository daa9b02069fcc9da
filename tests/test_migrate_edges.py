"""Edges of the migration that lose or change data unless handled on purpose, on a
real encrypted vault: a container volume changed through its view while its
tree is copied, a file with more than one name, extended attributes, and the
temporaries' directory left in a new-layout directory."""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
import time
from pathlib import Path

import pytest

from compatfs.scan import TMP_DIR
from compatfs.testing import devicegen
from compatfs.testing.devicegen import AppDef, DriveDef, random_sha, random_uuid

from .conftest import staged
from .devices import device_root
from .mounting import mounted

pytestmark = pytest.mark.root

MIB = 1 << 20
VIEWS = ("img", "downloads", "prepared")


def cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "compatfs", *args], capture_output=True,
                          text=True, timeout=120)


def states(root: Path, run: Path, config: Path) -> dict[str, dict]:
    proc = cli("status", "--root", str(root), "--run-dir", str(run), "--config", str(config),
               "--json")
    assert proc.returncode == 0, proc.stderr
    return {o["legacy"]: o for o in json.loads(proc.stdout)["objects"]}


def wait_state(root: Path, run: Path, config: Path, legacy: str, want: str,
               deadline: float = 60) -> dict:
    until = time.monotonic() + deadline
    while True:
        obj = states(root, run, config).get(legacy)
        if obj is not None and obj["state"] == want:
            return obj
        assert time.monotonic() < until, obj
        time.sleep(0.2)


def test_a_file_made_in_a_container_volume_while_its_tree_is_copied_is_not_lost(tmp_path):
    rng = random.Random(31)
    (tmp_path / "dev").mkdir()
    with device_root(tmp_path / "dev", size_mb=256) as root:
        pod = AppDef(random_uuid(rng), "pod", [
            DriveDef(random_uuid(rng), random_sha(rng), "container",
                     volume_uuid=random_uuid(rng))])
        devicegen.write_device_state(str(root), [pod])
        name = pod.legacy_name(0, container=True)
        legacy = root / "runx/pods/prepared" / name
        devicegen.container_tree(str(legacy), rng)
        (legacy / "rootfs" / "big").write_bytes(rng.randbytes(12 * MIB))   # a slow copy
        config = tmp_path / "c.yaml"
        config.write_text("mount_prepared: true\n"
                          "migration: {throttle_mib_per_s: 3, rescan_s: 1, retry_backoff_s: 1}\n")
        vault = root / "vault/volumes"
        target = f"{pod.drives[0].volume_uuid}#0.container"
        run = tmp_path / "run"
        with mounted(root, run, stage="migrate", config=config, views=VIEWS) as m:
            until = time.monotonic() + 30
            while not staged(root, "vault_volumes", target).exists():
                assert time.monotonic() < until, m.log_text()
                time.sleep(0.05)
            view = root / "runx/pods/prepared" / name
            (view / "made-during-the-copy").write_text("the agent's")
            (view / "rootfs" / "etc" / "hostname").write_text("changed\n")
            wait_state(root, run, config, f"runx/pods/prepared/{name}", "new")
            assert (view / "made-during-the-copy").read_text() == "the agent's"
            assert (view / "rootfs" / "etc" / "hostname").read_text() == "changed\n"
            assert "something inside was changed during the copy" in m.log_text()
        assert (vault / target / "made-during-the-copy").read_text() == "the agent's"
        assert (vault / target / "rootfs" / "etc" / "hostname").read_text() == "changed\n"
        assert not legacy.exists()


def test_a_file_with_two_names_stays_and_says_why_and_xattrs_move_with_a_file(tmp_path):
    rng = random.Random(32)
    (tmp_path / "dev").mkdir()
    with device_root(tmp_path / "dev", size_mb=128) as root:
        app = AppDef(random_uuid(rng), "app", [
            DriveDef(random_uuid(rng), random_sha(rng), "raw", volume_uuid=random_uuid(rng)),
            DriveDef(random_uuid(rng), random_sha(rng), "qcow2", volume_uuid=random_uuid(rng))])
        devicegen.write_device_state(str(root), [app])
        linked = root / "img" / app.legacy_name(0)
        linked.parent.mkdir(parents=True, exist_ok=True)
        linked.write_bytes(rng.randbytes(MIB))
        os.link(linked, root / "img" / "a-second-name")
        tagged = root / "img" / app.legacy_name(1)
        tagged.write_bytes(rng.randbytes(MIB))
        os.setxattr(tagged, "user.origin", b"agent")
        content = tagged.read_bytes()
        config = tmp_path / "c.yaml"
        config.write_text("migration: {retries: 1}\n")
        run = tmp_path / "run"

        proc = cli("migrate", "--root", str(root), "--now", "--run-dir", str(run),
                   "--config", str(config))
        assert "hard links" in proc.stderr, proc.stderr
        assert "Traceback" not in proc.stderr, proc.stderr

        # the linked file is untouched, both its names still one file, and status says why
        assert os.stat(linked).st_nlink == 2
        obj = states(root, run, config)[f"img/{linked.name}"]
        assert obj["state"] == "failed" and "hard links" in (obj.get("reason") or ""), obj
        # the other moved with its extended attribute
        moved = root / "vault/volumes" / f"{app.drives[1].volume_uuid}#0.qcow2"
        assert moved.read_bytes() == content
        assert os.getxattr(moved, "user.origin") == b"agent"
        # no directory of compatfs' own is left among the new layout's names
        assert not (root / "vault/volumes" / TMP_DIR).exists()
        assert sorted(os.listdir(root / "vault/volumes")) == [moved.name]
