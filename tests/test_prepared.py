"""The container-volume view (``mount_prepared: true``) over runx/pods/prepared."""

from __future__ import annotations

import os
import random
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from compatfs import fscrypt
from compatfs.testing import devicegen

from .devices import device_root
from .mounting import mounted

pytestmark = pytest.mark.root

VIEWS = ("img", "downloads", "prepared")


def test_container_volume_created_through_its_legacy_name_lands_in_the_vault(tmp_path):
    rng = random.Random(11)
    (tmp_path / "dev").mkdir()
    with device_root(tmp_path / "dev", size_mb=128) as root:
        pod = devicegen.AppDef(devicegen.random_uuid(rng), "pod", [
            devicegen.DriveDef(devicegen.random_uuid(rng), devicegen.random_sha(rng), "container")])
        devicegen.write_device_state(str(root), [pod])
        old_pod = root / "runx/pods/prepared" / f"{devicegen.random_sha(rng)}-{pod.uuid}"
        (old_pod / "rootfs").mkdir(parents=True)
        (old_pod / "rootfs" / "old").write_text("legacy")
        config = tmp_path / "c.yaml"
        config.write_text("mount_prepared: true\n")
        name = pod.legacy_name(0, container=True)
        with mounted(root, tmp_path / "run", stage="redirect", config=config, views=VIEWS):
            prepared = root / "runx/pods/prepared"
            (prepared / name / "rootfs" / "bin").mkdir(parents=True)
            (prepared / name / "rootfs" / "bin" / "app").write_bytes(b"\x7fELF" + b"x" * 1000)
            os.symlink("app", prepared / name / "rootfs" / "bin" / "start")
            (prepared / name / "config.json").write_text("{}")
            assert sorted(os.listdir(prepared)) == sorted([name, old_pod.name])
            assert os.readlink(prepared / name / "rootfs" / "bin" / "start") == "app"
            assert (prepared / old_pod.name / "rootfs" / "old").read_text() == "legacy"
            placed = root / "vault/volumes" / f"{pod.drives[0].volume_uuid}#0.container"
            assert (placed / "rootfs" / "bin" / "app").read_bytes()[:4] == b"\x7fELF"
            assert (placed / "config.json").exists()
        # unmounted: the legacy directory holds only what was there before
        assert os.listdir(root / "runx/pods/prepared") == [old_pod.name]
        with mounted(root, tmp_path / "run", stage="observe", config=config, views=VIEWS):
            prepared = root / "runx/pods/prepared"
            assert name in os.listdir(prepared)  # the index remembers it
            assert (prepared / name / "config.json").read_text() == "{}"
            import shutil
            shutil.rmtree(prepared / name)
            assert not placed.exists()


# -- E5: snapshotid.txt in the container volumes an old agent makes ---------------------------

def pod_with_two_volumes(rng: random.Random) -> devicegen.AppDef:
    return devicegen.AppDef(devicegen.random_uuid(rng), "pod", [
        devicegen.DriveDef(devicegen.random_uuid(rng), devicegen.random_sha(rng), "container",
                           volume_uuid=devicegen.random_uuid(rng), generation=4),
        devicegen.DriveDef(devicegen.random_uuid(rng), devicegen.random_sha(rng), "container",
                           volume_uuid=devicegen.random_uuid(rng))])


def placed_at(root: Path, d: devicegen.DriveDef) -> Path:
    return root / "vault/volumes" / f"{d.volume_uuid}#{d.generation}.container"


@pytest.mark.parametrize("layout", ["eve", "design-note"])
def test_container_volume_made_through_the_view_carries_snapshotid(tmp_path, layout):
    """5.6's volumemgr makes a container volume with MkdirAll and names its
    containerd snapshot after the directory's base name, and deletes it with
    RemoveAll. In stage redirect on a real fscrypt vault: eve writes snapshotid.txt
    (that base name, no newline, 0644) into vault/volumes/<vol>#<gen>.container as
    the mkdir happens; the agent lists it, and both ``rm -rf`` and rmdir after
    removing its own files work. design-note writes nothing."""
    rng = random.Random(21)
    (tmp_path / "dev").mkdir()
    with device_root(tmp_path / "dev", size_mb=128) as root:
        assert fscrypt.path_is_encrypted(str(root / "vault"))
        pod = pod_with_two_volumes(rng)
        devicegen.write_device_state(str(root), [pod])
        config = tmp_path / "c.yaml"
        config.write_text(f"mount_prepared: true\nlayout: {layout}\n")
        eve = layout == "eve"
        names = [pod.legacy_name(i, container=True) for i in range(2)]
        with mounted(root, tmp_path / "run", stage="redirect", config=config, views=VIEWS):
            prepared = root / "runx/pods/prepared"
            for n in names:
                (prepared / n / "rootfs" / "bin").mkdir(parents=True)
                (prepared / n / "rootfs" / "bin" / "app").write_bytes(b"\x7fELF" + b"x" * 4096)
                (prepared / n / "image-config.json").write_text("{}")
            for n, d in zip(names, pod.drives, strict=True):
                placed = placed_at(root, d)
                sid = placed / "snapshotid.txt"
                assert (placed / "rootfs/bin/app").read_bytes()[:4] == b"\x7fELF"
                mine = ["image-config.json", "rootfs"]
                if eve:
                    st = sid.lstat()
                    assert stat.S_ISREG(st.st_mode) and stat.S_IMODE(st.st_mode) == 0o644
                    assert sid.read_bytes() == n.encode()      # byte-exact, no newline
                    assert (prepared / n / "snapshotid.txt").read_bytes() == n.encode()
                    mine.append("snapshotid.txt")
                else:
                    assert not sid.exists()
                assert sorted(os.listdir(prepared / n)) == mine
            # the first goes as RemoveAll (or rm -rf) does it
            proc = subprocess.run(["rm", "-rf", str(prepared / names[0])], capture_output=True,
                                  text=True)
            assert proc.returncode == 0, proc.stderr
            assert not placed_at(root, pod.drives[0]).exists()
            # the second as an agent that removes what it made, then the directory
            second = prepared / names[1]
            os.unlink(second / "rootfs/bin/app")
            os.rmdir(second / "rootfs/bin")
            os.rmdir(second / "rootfs")
            os.unlink(second / "image-config.json")
            os.rmdir(second)
            assert not placed_at(root, pod.drives[1]).exists()
            assert os.listdir(prepared) == []
        assert os.listdir(root / "runx/pods/prepared") == []
        assert os.listdir(root / "vault/volumes") == []


def test_parked_container_volume_gets_snapshotid_when_the_migrator_places_it(tmp_path):
    """A container volume made while the config does not map it (a purge counter the
    config does not have yet) is parked in the vault without snapshotid.txt; once the
    config maps it, ``migrate --now`` places it at its final name with it."""
    rng = random.Random(22)
    (tmp_path / "dev").mkdir()
    with device_root(tmp_path / "dev", size_mb=128) as root:
        pod = pod_with_two_volumes(rng)
        pod.drives.pop()
        devicegen.write_device_state(str(root), [pod])
        config = tmp_path / "c.yaml"
        config.write_text("mount_prepared: true\n")
        name = pod.legacy_name(0, container=True, purge=1)
        parked = root / "vault/compatfs/unresolved/prepared" / name
        with mounted(root, tmp_path / "run", stage="redirect", config=config, views=VIEWS):
            vdir = root / "runx/pods/prepared" / name
            (vdir / "rootfs").mkdir(parents=True)
            (vdir / "rootfs/data").write_bytes(b"parked")
            assert sorted(os.listdir(parked)) == ["rootfs"]
        pod.purge = 1
        devicegen.write_device_state(str(root), [pod])
        proc = subprocess.run([sys.executable, "-m", "compatfs", "migrate", "--root", str(root),
                               "--now", "--run-dir", str(tmp_path / "run"), "--config",
                               str(config)], capture_output=True, text=True, timeout=180)
        assert proc.returncode == 0, proc.stderr
        placed = placed_at(root, pod.drives[0])
        assert sorted(os.listdir(placed)) == ["rootfs", "snapshotid.txt"]
        assert (placed / "snapshotid.txt").read_bytes() == name.encode()
        assert (placed / "rootfs/data").read_bytes() == b"parked"
        assert not parked.exists()
