"""The container-volume view (``mount_prepared: true``) over runx/pods/prepared."""

from __future__ import annotations

import os
import random

import pytest

from compatfs import devicegen

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
