"""compatfs debug-mount: a read-only inspection view beside the live one."""

from __future__ import annotations

import errno
import os
import random

import pytest

from compatfs import mounts
from compatfs.testing import devicegen

from .conftest import run_cli, tree_snapshot
from .devices import device_root
from .mounting import mounted

pytestmark = pytest.mark.root


def without_atime(snap: dict) -> dict:
    """The snapshot less atimes and SQLite's shared-memory read marks (index.db-shm),
    which every reader of a live WAL database updates; no data lives there."""
    return {k: v[:2] + v[3:] for k, v in snap.items() if not k.endswith("index.db-shm")}


def test_inspects_a_live_device_and_changes_nothing(tmp_path):
    (tmp_path / "dev").mkdir()
    with device_root(tmp_path / "dev", size_mb=256) as root:
        web, db, pod, fresh = devicegen.make_demo(str(root))
        run = tmp_path / "run"
        look = tmp_path / "look"
        look.mkdir()
        with mounted(root, run, stage="redirect"):
            placed = root / "img" / fresh.legacy_name(0)
            placed.write_bytes(b"placed through the view")
            before = tree_snapshot(root / "vault")
            proc = run_cli("debug-mount", "--root", str(root), "--run-dir", str(run), str(look))
            assert proc.returncode == 0, proc.stderr
            try:
                img = look / "img"
                assert sorted(os.listdir(img)) == sorted(os.listdir(root / "img"))
                assert (img / fresh.legacy_name(0)).read_bytes() == b"placed through the view"

                def attr(name: str, key: str) -> str:
                    return os.getxattr(img / name, f"user.compatfs.{key}").decode()

                vol = fresh.drives[0].volume_uuid
                assert attr(fresh.legacy_name(0), "state") == "new"
                assert attr(fresh.legacy_name(0), "location") == f"vault/volumes/{vol}#0.raw"
                assert attr(web.legacy_name(0), "state") == "legacy"
                assert attr(web.legacy_name(0), "location") == f"img/{web.legacy_name(0)}"
                assert attr(web.legacy_name(0), "target").startswith("vault/volumes/")
                stale = db.legacy_name(0, purge=1)
                assert attr(stale, "state") == "unresolved"
                assert "stale" in attr(stale, "reason")
                with pytest.raises(OSError) as err:
                    os.getxattr(img / web.legacy_name(0), "user.compatfs.reason")
                assert err.value.errno == errno.ENODATA
                assert "user.compatfs.state" in os.listxattr(img / web.legacy_name(0))
                for change in (lambda: (img / "new.raw").write_bytes(b"x"),
                               lambda: os.unlink(img / web.legacy_name(0)),
                               lambda: os.mkdir(img / "d"),
                               lambda: os.chmod(img / web.legacy_name(0), 0o600),
                               lambda: open(img / web.legacy_name(0), "r+b"),
                               lambda: os.setxattr(img / web.legacy_name(0), "user.x", b"1")):
                    with pytest.raises(OSError) as err:
                        change()
                    assert err.value.errno == errno.EROFS
            finally:
                assert run_cli("debug-mount", "--unmount", str(look)).returncode == 0
            assert mounts.mounted_at(str(look)) is None
            assert without_atime(tree_snapshot(root / "vault")) == without_atime(before)
            assert mounts.is_compatfs(str(root / "img"))  # the live views go on


def test_inspects_an_unmounted_tree_without_touching_it(tmp_path):
    root = tmp_path / "persist"
    root.mkdir()
    rng = random.Random(2)
    app = devicegen.AppDef(devicegen.random_uuid(rng), "a", [
        devicegen.DriveDef(devicegen.random_uuid(rng), devicegen.random_sha(rng), "raw")])
    devicegen.write_device_state(str(root), [app])
    devicegen.sparse_file(str(root / "img" / app.legacy_name(0)), 1 << 20, {0: b"disk"})
    before = tree_snapshot(root)
    look = tmp_path / "look"
    look.mkdir()
    proc = run_cli("debug-mount", "--root", str(root), "--run-dir", str(tmp_path / "run"),
                   str(look))
    assert proc.returncode == 0, proc.stderr
    try:
        name = look / "img" / app.legacy_name(0)
        assert os.getxattr(name, "user.compatfs.state") == b"legacy"
        assert name.read_bytes()[:4] == b"disk"
        assert "downloads" not in os.listdir(look)  # absent, and not created
    finally:
        run_cli("debug-mount", "--unmount", str(look))
    assert without_atime(tree_snapshot(root)) == without_atime(before)
