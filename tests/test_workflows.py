"""Old agents' workflows through the mounted views, on a device-like root.

Every test here runs the real daemon (tests/mounting.py) over a loop-mounted
ext4 root with a real fscrypt vault (tests/devices.py), where ``rename(2)``
from outside into the vault fails with ``EXDEV`` as on a device. The agents'
habits are 5.6.0's (docs/eve.md sections 7 and 9: downloads land in
``pending/<id>/``, are checked in ``verifier/<id>/`` and kept in
``verified/<SHA>/``; volumemgr builds ``img/<sha>-<app>[#<purge>].<fmt>``
and resizes and deletes it; docs/views.md); after each step the
test looks *under* the views (through directory fds opened before mounting)
and into the new layout, so it sees where the bytes really are.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import random
import shutil
import signal
import sqlite3
import stat
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from compatfs.testing import devicegen
from compatfs.testing.devicegen import AppDef, DriveDef

from .conftest import layout_config, run_cli
from .devices import device_root
from .mounting import assert_clean_exit, mounted

pytestmark = pytest.mark.root

OBJ = "appImg.obj"
MOVE_DEADLINE = 10.0  # the daemon polls the checkpoint every 2 s


# -- helpers ----------------------------------------------------------------------

@contextlib.contextmanager
def under(path: Path) -> Iterator[int]:
    """A directory fd on *path* opened before a view covers it: what is really there."""
    path.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        yield fd
    finally:
        os.close(fd)


def files_under(fd: int) -> set[str]:
    """Every non-directory below the directory *fd*, as relative paths."""
    out = set()
    for dirpath, _, filenames, _ in os.fwalk(".", dir_fd=fd):
        for name in filenames:
            out.add(os.path.normpath(os.path.join(dirpath, name)))
    return out


def files_in(path: Path) -> set[str]:
    """Every non-directory below *path* (a plain directory, not a view)."""
    return {str(p.relative_to(path)) for p in path.rglob("*") if not p.is_dir()}


def index_rows(root: Path) -> dict[str, tuple[str, str, str]]:
    """The daemon's index, read from disk: view -> (store, rel, state)."""
    db_path = root / "vault" / "compatfs" / "index.db"
    db = sqlite3.connect(f"file:{db_path}?mode=ro", uri=True)
    try:
        rows = db.execute("SELECT view, store, rel, state, prev_store FROM objects").fetchall()
    finally:
        db.close()
    assert all(r[4] is None for r in rows), rows  # no move left half-done
    return {r[0]: (r[1], r[2], r[3]) for r in rows}


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def view_snapshot(root: Path) -> dict[str, tuple[int, int, int, int, str | None]]:
    """Everything the agents see through the views: type, mode, size, mtime, content hash."""
    snap = {}
    for view in ("img", "downloads"):
        for dirpath, dirnames, filenames in os.walk(root / view):
            for name in dirnames + filenames:
                p = os.path.join(dirpath, name)
                st = os.lstat(p)
                digest = None
                if stat.S_ISREG(st.st_mode):
                    with open(p, "rb") as f:
                        digest = sha256(f.read())
                snap[os.path.relpath(p, root)] = (stat.S_IFMT(st.st_mode), stat.S_IMODE(st.st_mode),
                                                  st.st_size, st.st_mtime_ns, digest)
    return snap


def wait_for(predicate, what: str, deadline: float = MOVE_DEADLINE) -> None:
    end = time.monotonic() + deadline
    while not predicate():
        if time.monotonic() > end:
            raise AssertionError(f"not within {deadline} s: {what}")
        time.sleep(0.1)


def qemu_img(*args: str) -> str:
    proc = subprocess.run(["qemu-img", *args], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout


def new_uuid(rng: random.Random) -> str:
    return devicegen.random_uuid(rng)


@pytest.fixture
def device(tmp_path: Path) -> Iterator[Path]:
    """A device root with an encrypted vault and empty legacy img/ and downloads/."""
    (tmp_path / "dev").mkdir()
    with device_root(tmp_path / "dev", size_mb=256) as root:
        (root / "img").mkdir()
        (root / "downloads").mkdir()
        yield root


def two_apps(rng: random.Random) -> tuple[AppDef, AppDef]:
    web = AppDef(new_uuid(rng), "web", [
        DriveDef(new_uuid(rng), devicegen.random_sha(rng), "qcow2", volume_uuid=new_uuid(rng)),
        DriveDef(new_uuid(rng), devicegen.random_sha(rng), "raw", volume_uuid=new_uuid(rng),
                 clear_text=True),
    ])
    db = AppDef(new_uuid(rng), "db", [
        DriveDef(new_uuid(rng), devicegen.random_sha(rng), "qcow2", volume_uuid=new_uuid(rng),
                 generation=3),
    ], purge=2)
    return web, db


# -- 1. downloader and verifier -------------------------------------------------------

def test_design_note_downloader_and_verifier_through_the_views(device, tmp_path, rng):
    """The design note moves downloads in progress into the vault as they are written."""
    root = device
    config = layout_config(tmp_path, "design-note")
    vault = root / "vault"
    image_id = new_uuid(rng)
    blob = rng.randbytes(300 << 10)
    sha = sha256(blob)
    name = "ubuntu.img"
    dl = root / "downloads" / OBJ
    # a download already in progress in the legacy store when compatfs came
    old_id, old_blob = new_uuid(rng), rng.randbytes(70 << 10)
    old_sha = sha256(old_blob)
    (dl / "pending" / old_id).mkdir(parents=True)
    (dl / "pending" / old_id / "old.img").write_bytes(old_blob[:1000])
    with under(root / "downloads") as legacy, \
            mounted(root, tmp_path / "run", stage="redirect", config=config) as m:
        # downloader: mkdir -p, create, write in two sessions, a sidecar progress file
        pending = dl / "pending" / image_id
        os.makedirs(pending)
        with open(pending / name, "wb") as f:
            f.write(blob[:100 << 10])
        (pending / f"{name}.progress").write_text(
            json.dumps({"done": 100 << 10, "state": "downloading"}))
        placed = vault / "downloader" / "pending" / image_id / name
        assert placed.read_bytes() == blob[:100 << 10]
        with open(pending / name, "ab") as f:  # resume
            f.write(blob[100 << 10:])
        final_progress = json.dumps({"done": len(blob)})  # shorter: a rewrite must truncate
        (pending / f"{name}.progress").write_text(final_progress)
        assert (pending / f"{name}.progress").read_text() == final_progress
        assert (vault / "downloader" / "pending" / image_id / f"{name}.progress").read_text() \
            == final_progress
        assert placed.read_bytes() == blob
        assert (pending / name).read_bytes() == blob
        assert sorted(os.listdir(pending)) == [name, f"{name}.progress"]
        # the legacy store holds the directories only (and the older download)
        assert files_under(legacy) == {f"{OBJ}/pending/{old_id}/old.img"}
        assert stat.S_ISDIR(os.stat(f"{OBJ}/pending/{image_id}", dir_fd=legacy).st_mode)

        # verifier: rename into verifier/<id>/<f>, chmod 0400 file and 0500 dir
        verifier_dir = dl / "verifier" / image_id
        os.makedirs(verifier_dir)
        os.rename(pending / name, verifier_dir / name)  # must not be EXDEV
        os.chmod(verifier_dir / name, 0o400)
        os.chmod(verifier_dir, 0o500)
        in_verifier = vault / "verifier" / "verifier" / image_id / name
        assert in_verifier.read_bytes() == blob
        assert not placed.exists()
        assert stat.S_IMODE(in_verifier.stat().st_mode) == 0o400
        assert stat.S_IMODE((verifier_dir / name).stat().st_mode) == 0o400
        assert stat.S_IMODE(verifier_dir.stat().st_mode) == 0o500
        assert os.listdir(pending) == [f"{name}.progress"]
        assert (verifier_dir / name).read_bytes() == blob

        # verified: rename into verified/<SHA>/<f>, chmod 0500 on that directory
        verified_dir = dl / "verified" / sha.upper()
        os.makedirs(verified_dir)
        os.rename(verifier_dir / name, verified_dir / name)
        os.chmod(verified_dir, 0o500)
        in_verified = vault / "verifier" / "verified" / sha
        assert in_verified.read_bytes() == blob
        assert stat.S_IMODE(in_verified.stat().st_mode) == 0o400
        assert not in_verifier.exists()
        assert not in_verifier.parent.exists()  # the placement's own directory is tidied
        assert stat.S_IMODE(verified_dir.stat().st_mode) == 0o500
        assert os.listdir(verified_dir) == [name]
        assert (verified_dir / name).read_bytes() == blob
        assert sha256((verified_dir / name).read_bytes()) == sha

        # RemoveAll of the emptied directories (the sidecar goes with pending/<id>)
        shutil.rmtree(pending)
        shutil.rmtree(verifier_dir)
        assert not pending.exists() and not verifier_dir.exists()
        assert not (vault / "downloader" / "pending" / image_id).exists()
        assert files_in(vault / "downloader") == set()

        # the older download goes the same way; its bytes cannot enter the vault
        # by rename(2), so they stay in the legacy store, and the agent sees no EXDEV
        with open(dl / "pending" / old_id / "old.img", "ab") as f:
            f.write(old_blob[1000:])
        os.makedirs(dl / "verifier" / old_id)
        os.rename(dl / "pending" / old_id / "old.img", dl / "verifier" / old_id / "old.img")
        os.chmod(dl / "verifier" / old_id / "old.img", 0o400)
        os.makedirs(dl / "verified" / old_sha.upper())
        os.rename(dl / "verifier" / old_id / "old.img",
                  dl / "verified" / old_sha.upper() / "old.img")
        shutil.rmtree(dl / "pending" / old_id)
        shutil.rmtree(dl / "verifier" / old_id)
        legacy_verified = f"{OBJ}/verified/{old_sha.upper()}/old.img"
        assert files_under(legacy) == {legacy_verified}
        assert stat.S_IMODE(os.stat(legacy_verified, dir_fd=legacy).st_mode) == 0o400
        assert (dl / "verified" / old_sha.upper() / "old.img").read_bytes() == old_blob
        assert not (vault / "verifier" / "verified" / old_sha).exists()

        # a second object caught mid-verification; the verifier restarts and
        # removes its whole tree
        other_id = new_uuid(rng)
        other = rng.randbytes(50 << 10)
        os.makedirs(dl / "pending" / other_id)
        (dl / "pending" / other_id / "alpine.qcow2").write_bytes(other)
        os.makedirs(dl / "verifier" / other_id)
        os.rename(dl / "pending" / other_id / "alpine.qcow2",
                  dl / "verifier" / other_id / "alpine.qcow2")
        os.chmod(dl / "verifier" / other_id, 0o500)
        assert (vault / "verifier" / "verifier" / other_id / "alpine.qcow2").read_bytes() == other
        shutil.rmtree(dl / "verifier")
        assert not (dl / "verifier").exists()
        assert files_in(vault / "verifier" / "verifier") == set()
        assert not (vault / "verifier" / "verifier" / other_id).exists()

        # what is left: the verified object, in the vault, under its legacy name
        assert files_in(vault / "verifier" / "verified") == {sha}
        assert files_under(legacy) == {legacy_verified}
        views = index_rows(root)
        assert views == {f"downloads/{OBJ}/verified/{sha.upper()}/{name}":
                         ("verified", sha, "new")}
        assert (verified_dir / name).read_bytes() == blob
        m.kill(signal.SIGTERM)
        assert_clean_exit(m)


def test_eve_downloads_in_progress_stay_legacy_and_verified_ones_take_the_release_name(
        device, tmp_path, rng):
    """E11-E13 through the mounted views in stage redirect: the downloader and the
    verifier work in the legacy store (no EVE release reads their files moved) and
    read back through the view; a verified image the checkpoint names is created
    at the name EVE 17.3 keeps; a cert.obj one stays legacy; status says why."""
    root = device
    vault = root / "vault"
    blob = rng.randbytes(200 << 10)
    sha = sha256(blob)
    app = AppDef(new_uuid(rng), "img", [DriveDef(new_uuid(rng), sha, "qcow2",
                                                 volume_uuid=new_uuid(rng))])
    devicegen.write_device_state(str(root), [app])
    image_id = new_uuid(rng)
    dl = root / "downloads" / OBJ
    run = tmp_path / "run"
    with under(root / "downloads") as legacy, mounted(root, run, stage="redirect") as m:
        pending = dl / "pending" / image_id
        os.makedirs(pending)
        with open(pending / "disk.qcow2", "wb") as f:
            f.write(blob[:50 << 10])
        with open(pending / "disk.qcow2", "ab") as f:       # resumed
            f.write(blob[50 << 10:])
        assert (pending / "disk.qcow2").read_bytes() == blob
        assert files_under(legacy) == {f"{OBJ}/pending/{image_id}/disk.qcow2"}
        assert files_in(vault / "downloader") == set() and files_in(vault / "verifier") == set()
        os.makedirs(dl / "verifier" / image_id)
        os.rename(pending / "disk.qcow2", dl / "verifier" / image_id / "disk.qcow2")
        assert files_under(legacy) == {f"{OBJ}/verifier/{image_id}/disk.qcow2"}
        # the verifier of this device writes the verified object anew (a copy)
        verified_dir = dl / "verified" / sha.upper()
        os.makedirs(verified_dir)
        shutil.copyfile(dl / "verifier" / image_id / "disk.qcow2", verified_dir / "disk.qcow2")
        name = f"{sha}.application%2Fvnd.oci.image.layer.v1.tar+gzip"
        assert (vault / "verifier" / "verified" / name).read_bytes() == blob
        assert (verified_dir / "disk.qcow2").read_bytes() == blob
        # a certificate is not a blob: it stays in the legacy store
        cert_sha = sha256(b"cert")
        os.makedirs(root / "downloads" / "cert.obj" / "verified" / cert_sha)
        (root / "downloads" / "cert.obj" / "verified" / cert_sha / "ca.pem").write_bytes(b"cert")
        assert f"cert.obj/verified/{cert_sha}/ca.pem" in files_under(legacy)
        assert index_rows(root) == {f"downloads/{OBJ}/verified/{sha.upper()}/disk.qcow2":
                                    ("verified", name, "new")}
        doc = json.loads(run_cli("status", "--root", str(root), "--run-dir", str(run),
                                 "--json", check=True).stdout)
        m.kill(signal.SIGTERM)
        assert_clean_exit(m)
    assert doc["layout"] == "eve 17.3"
    objects = {o["legacy"]: o for o in doc["objects"]}
    kept = objects[f"downloads/{OBJ}/verifier/{image_id}/disk.qcow2"]
    assert (kept["state"], kept["target"]) == ("legacy", None)
    assert "no EVE release reads verifier/" in kept["reason"]
    cert = objects[f"downloads/cert.obj/verified/{cert_sha}/ca.pem"]
    assert cert["state"] == "legacy" and "cert.obj" in cert["reason"]
    placed = objects[f"downloads/{OBJ}/verified/{sha.upper()}/disk.qcow2"]
    assert (placed["state"], placed["location"]) == ("new", f"vault/verifier/verified/{name}")


# -- 2. volumemgr ------------------------------------------------------------------------

def test_volumemgr_creates_lists_resizes_and_deletes_volumes(device, tmp_path, rng):
    root = device
    web, db = two_apps(rng)
    devicegen.write_device_state(str(root), [web, db], wrap=True, rng=rng)
    img = root / "img"
    vm = img / web.legacy_name(0)
    clear = img / web.legacy_name(1)
    purged = img / db.legacy_name(0)
    assert "#2" in purged.name
    d0, d1, d2 = web.drives[0], web.drives[1], db.drives[0]
    vm_at = root / "vault" / "volumes" / f"{d0.volume_uuid}#0.qcow2"
    clear_at = root / "clear" / "volumes" / f"{d1.volume_uuid}#0.raw"
    purged_at = root / "vault" / "volumes" / f"{d2.volume_uuid}#3.qcow2"
    with under(img) as legacy, mounted(root, tmp_path / "run", stage="redirect") as m:
        (img / "notes.txt").write_text("operator notes\n")  # not a volume: stays
        qemu_img("create", "-q", "-f", "qcow2", str(vm), "64M")
        qemu_img("create", "-q", "-f", "raw", str(clear), "16M")
        qemu_img("convert", "-O", "qcow2", str(vm), str(purged))  # copy of an image
        assert vm_at.is_file() and clear_at.is_file() and purged_at.is_file()
        assert vm_at.read_bytes()[:4] == b"QFI\xfb"
        assert files_under(legacy) == {"notes.txt"}
        assert files_in(root / "vault" / "volumes") == {vm_at.name, purged_at.name}
        assert files_in(root / "clear" / "volumes") == {clear_at.name}
        info = json.loads(qemu_img("info", "--output=json", str(vm)))
        assert info["format"] == "qcow2" and info["virtual-size"] == 64 << 20

        # readdir + stat, as volumemgr lists /persist/img: sizes and mtimes of the backing
        os.utime(purged, ns=(1_600_000_000_000_000_000, 1_600_000_000_000_000_000))
        listed = {e.name: e.stat(follow_symlinks=False) for e in os.scandir(img)}
        assert set(listed) == {vm.name, clear.name, purged.name, "notes.txt"}
        for legacy_name, backing in ((vm, vm_at), (clear, clear_at), (purged, purged_at)):
            st, bst = listed[legacy_name.name], backing.stat()
            assert (st.st_size, st.st_mtime_ns) == (bst.st_size, bst.st_mtime_ns), legacy_name
        assert listed[purged.name].st_mtime_ns == 1_600_000_000_000_000_000
        assert listed[clear.name].st_size == 16 << 20
        newest = max((vm, purged), key=lambda p: listed[p.name].st_mtime_ns)
        assert newest == vm  # the newest copy wins: mtimes must be the real ones

        # resize: truncate, and qemu-img resize of a raw volume
        os.truncate(clear, 32 << 20)
        assert clear_at.stat().st_size == 32 << 20 == clear.stat().st_size
        with open(clear, "r+b") as f:
            f.seek(20 << 20)
            f.write(b"tail")
        qemu_img("resize", "-q", "-f", "raw", str(clear), "48M")
        assert clear_at.stat().st_size == 48 << 20 == clear.stat().st_size
        with open(clear_at, "rb") as f:
            f.seek(20 << 20)
            assert f.read(4) == b"tail"
        os.truncate(clear, 8 << 20)
        assert clear_at.stat().st_size == 8 << 20 == clear.stat().st_size

        # delete an unused volume: the vault file and the record go
        rows = index_rows(root)
        assert rows[f"img/{purged.name}"] == ("vault_volumes", purged_at.name, "new")
        assert rows[f"img/{clear.name}"] == ("clear_volumes", clear_at.name, "new")
        os.unlink(purged)
        assert not purged_at.exists()
        assert purged.name not in os.listdir(img)
        assert f"img/{purged.name}" not in index_rows(root)
        assert sorted(os.listdir(img)) == sorted([vm.name, clear.name, "notes.txt"])
        m.kill(signal.SIGTERM)
        assert_clean_exit(m)


# -- 3. a volume the config does not map yet ---------------------------------------------

def test_unresolved_volume_moves_to_its_name_when_the_checkpoint_maps_it(device, tmp_path, rng):
    root = device
    web, db = two_apps(rng)
    devicegen.write_device_state(str(root), [web], rng=rng)  # db not in the config yet
    name = db.legacy_name(0)
    data = rng.randbytes(1 << 20)
    parked = root / "vault" / "compatfs" / "unresolved" / "img" / name
    final = root / "vault" / "volumes" / f"{db.drives[0].volume_uuid}#3.qcow2"
    with under(root / "img") as legacy, mounted(root, tmp_path / "run", stage="redirect") as m:
        path = root / "img" / name
        path.write_bytes(data)
        assert parked.read_bytes() == data
        assert files_under(legacy) == set()
        assert name in os.listdir(root / "img")
        assert path.stat().st_size == len(data)
        assert index_rows(root)[f"img/{name}"] == ("unresolved", f"img/{name}", "unresolved")
        held = open(path, "rb")  # an open file keeps working across the move
        try:
            devicegen.write_device_state(str(root), [web, db], rng=rng)
            wait_for(final.exists, f"{name} placed at {final}")
            assert final.read_bytes() == data
            assert not parked.exists()
            held.seek(512 << 10)
            assert held.read(16) == data[512 << 10:(512 << 10) + 16]
        finally:
            held.close()
        assert path.read_bytes() == data
        assert path.stat().st_size == len(data)
        assert os.listdir(root / "img") == [name]
        assert index_rows(root)[f"img/{name}"] == ("vault_volumes", final.name, "new")
        with open(path, "r+b") as f:  # writes reach the final place
            f.write(b"MOVED")
        assert final.read_bytes()[:5] == b"MOVED"
        m.kill(signal.SIGTERM)
        assert_clean_exit(m)


# -- 4. durability ----------------------------------------------------------------------------

def test_placed_names_survive_umount_and_a_killed_daemon(device, tmp_path, rng):
    """In the design note's layout, where downloads in progress are placed too."""
    root = device
    config = layout_config(tmp_path, "design-note")
    web, db = two_apps(rng)
    devicegen.write_device_state(str(root), [web], rng=rng)  # db stays unresolved
    img, dl = root / "img", root / "downloads" / OBJ
    blob = rng.randbytes(64 << 10)
    image_id = new_uuid(rng)
    run = tmp_path / "run"
    with mounted(root, run, stage="redirect", config=config) as m:
        (img / web.legacy_name(0)).write_bytes(rng.randbytes(200 << 10))
        (img / web.legacy_name(1)).write_bytes(rng.randbytes(100 << 10))
        (img / db.legacy_name(0)).write_bytes(rng.randbytes(50 << 10))
        (img / "notes.txt").write_text("stays in the legacy store\n")
        os.makedirs(dl / "pending" / image_id)
        (dl / "pending" / image_id / "part.img").write_bytes(blob[:1000])
        os.makedirs(dl / "verified" / sha256(blob).upper())
        (dl / "verified" / sha256(blob).upper() / "debian.qcow2").write_bytes(blob)
        os.chmod(dl / "verified" / sha256(blob).upper() / "debian.qcow2", 0o400)
        before = view_snapshot(root)
        m.kill(signal.SIGTERM)
        assert_clean_exit(m)
    assert len(index_rows(root)) == 5
    assert (root / "vault" / "verifier" / "verified" / sha256(blob)).read_bytes() == blob
    with mounted(root, run, stage="redirect", config=config) as m:
        assert view_snapshot(root) == before
        # changes right before a SIGKILL must survive too
        with open(dl / "pending" / image_id / "part.img", "ab") as f:
            f.write(blob[1000:])
        (img / web.legacy_name(0)).unlink()
        extra_id = new_uuid(rng)
        os.makedirs(dl / "pending" / extra_id)
        (dl / "pending" / extra_id / "x.iso").write_bytes(b"iso" * 1000)
        after = view_snapshot(root)
        m.kill(signal.SIGKILL)
        with pytest.raises(OSError):
            os.listdir(img)
        with mounted(root, run, stage="redirect", config=config):
            assert view_snapshot(root) == after
            assert (dl / "pending" / image_id / "part.img").read_bytes() == blob
            assert web.legacy_name(0) not in os.listdir(img)
    # back to observe (a rollout stepped back): placed names are still served
    vault_files = files_in(root / "vault")
    with mounted(root, run, stage="observe", config=config):
        assert view_snapshot(root) == after
    assert files_in(root / "vault") == vault_files
    assert set(index_rows(root)) == {
        f"img/{web.legacy_name(1)}", f"img/{db.legacy_name(0)}",
        f"downloads/{OBJ}/pending/{image_id}/part.img",
        f"downloads/{OBJ}/pending/{extra_id}/x.iso",
        f"downloads/{OBJ}/verified/{sha256(blob).upper()}/debian.qcow2",
    }


# -- 5. observe --------------------------------------------------------------------------------

def test_observe_leaves_everything_in_the_legacy_store(device, tmp_path, rng):
    root = device
    web, _ = two_apps(rng)
    devicegen.write_device_state(str(root), [web], rng=rng)
    dl = root / "downloads" / OBJ
    blob = rng.randbytes(40 << 10)
    sha = sha256(blob)
    ids = [new_uuid(rng) for _ in range(3)]
    run = tmp_path / "run"
    with under(root / "downloads") as legacy_dl, under(root / "img") as legacy_img, \
            mounted(root, run, stage="observe"):
        for i in ids:
            os.makedirs(dl / "pending" / i)
            with open(dl / "pending" / i / "f.img", "wb") as f:
                f.write(blob[:100])
            with open(dl / "pending" / i / "f.img", "ab") as f:
                f.write(blob[100:])
        # ids[0] stays pending, ids[1] is being verified, ids[2] is verified
        os.makedirs(dl / "verifier" / ids[1])
        os.rename(dl / "pending" / ids[1] / "f.img", dl / "verifier" / ids[1] / "f.img")
        os.chmod(dl / "verifier" / ids[1] / "f.img", 0o400)
        os.makedirs(dl / "verifier" / ids[2])
        os.rename(dl / "pending" / ids[2] / "f.img", dl / "verifier" / ids[2] / "f.img")
        os.makedirs(dl / "verified" / sha.upper())
        os.rename(dl / "verifier" / ids[2] / "f.img", dl / "verified" / sha.upper() / "f.img")
        os.chmod(dl / "verified" / sha.upper(), 0o500)
        for i in ids[1:]:
            shutil.rmtree(dl / "pending" / i)
        shutil.rmtree(dl / "verifier" / ids[2])
        (root / "img" / web.legacy_name(0)).write_bytes(b"v" * 4096)

        assert files_under(legacy_dl) == {
            f"{OBJ}/pending/{ids[0]}/f.img",
            f"{OBJ}/verifier/{ids[1]}/f.img",
            f"{OBJ}/verified/{sha.upper()}/f.img",
        }
        with open(f"{OBJ}/verified/{sha.upper()}/f.img", "rb", opener=lambda p, fl: os.open(
                p, fl, dir_fd=legacy_dl)) as f:
            assert f.read() == blob
        assert files_under(legacy_img) == {web.legacy_name(0)}
        assert os.listdir(root / "vault") == [] and os.listdir(root / "clear") == []

        proc = run_cli("status", "--root", str(root), "--run-dir", str(run), "--json")
        assert proc.returncode == 0, proc.stderr
        doc = json.loads(proc.stdout)
    assert doc["stage"] == "observe" and doc["mounted"]
    objects = {o["legacy"]: o for o in doc["objects"]}
    # eve 17.3: downloads stay in the legacy store by rule (the verified one's sha
    # is in no config, so no name 17.3 keeps can be derived); each says why
    expected = {
        f"downloads/{OBJ}/pending/{ids[0]}/f.img": (None, "no EVE release reads pending/"),
        f"downloads/{OBJ}/verifier/{ids[1]}/f.img": (None, "no EVE release reads verifier/"),
        f"downloads/{OBJ}/verified/{sha.upper()}/f.img": (None, "no name EVE 17.3 keeps"),
        f"img/{web.legacy_name(0)}": (f"vault/volumes/{web.drives[0].volume_uuid}#0.qcow2", None),
    }
    assert set(objects) == set(expected)
    for legacy, (target, why) in expected.items():
        o = objects[legacy]
        assert (o["state"], o["location"], o["target"]) == ("legacy", legacy, target), o
        assert why is None and o["reason"] is None or why in o["reason"], o
    assert os.listdir(root / "vault") == []


# -- 6. names that must not be placed -------------------------------------------------------

def test_crafted_names_stay_in_the_legacy_store(device, tmp_path, rng):
    root = device
    web, _ = two_apps(rng)
    devicegen.write_device_state(str(root), [web], rng=rng)
    d = web.drives[0]
    app = web.uuid
    good = web.legacy_name(0)
    crafted = [
        f"{d.sha[:63]}-{app}.qcow2",               # sha of 63 digits
        f"{d.sha}0-{app}.qcow2",                   # sha of 65 digits
        f"{d.sha}-{app}#0.qcow2",                  # '#0' is never written
        f"{d.sha}-{app}#01.qcow2",                 # leading zero
        f"{d.sha}-{app}.QCOW2",                    # upper-case format
        f"{d.sha}-{app[:-1]}g.qcow2",              # not hex
        f"{d.sha}-{app.replace('-', '')}.qcow2",   # not canonical
        f"{d.sha}-{app}",                          # no format
        f"{d.sha}-{app}.qcow2.tmp",                # a temporary next to a volume
        "..qcow2", "notes.txt",
    ]
    # well-formed, but the drive is qcow2: not its volume; parked as unresolved
    other_formats = [f"{d.sha}-{app}.{fmt}" for fmt in ("raw", "vhdx", "img")]
    dl = root / "downloads" / OBJ
    bad_dirs = [("pending", "not-a-uuid"), ("verifier", app[:-1]), ("verified", d.sha[:63]),
                ("verified", d.sha + "0")]
    with under(root / "img") as legacy_img, under(root / "downloads") as legacy_dl, \
            mounted(root, tmp_path / "run", stage="redirect"):
        for n in crafted:
            (root / "img" / n).write_bytes(n.encode())
        (root / "img" / good).write_bytes(b"good")  # control: a real name is placed
        for n in other_formats:
            (root / "img" / n).write_bytes(n.encode())
        for area, directory in bad_dirs:
            os.makedirs(dl / area / directory)
            (dl / area / directory / "f").write_bytes(directory.encode())
        os.makedirs(root / "downloads" / "other.obj" / "pending" / new_uuid(rng))
        assert files_under(legacy_img) == set(crafted)
        assert files_under(legacy_dl) == {f"{OBJ}/{a}/{dd}/f" for a, dd in bad_dirs}
        assert files_in(root / "vault" / "volumes") == {f"{d.volume_uuid}#0.qcow2"}
        assert files_in(root / "vault" / "compatfs" / "unresolved") == \
            {f"img/{n}" for n in other_formats}
        assert files_in(root / "vault" / "downloader") == set()
        assert files_in(root / "vault" / "verifier") == set()
        rows = index_rows(root)
        assert set(rows) == {f"img/{good}"} | {f"img/{n}" for n in other_formats}
        assert {rows[f"img/{n}"][2] for n in other_formats} == {"unresolved"}
        for n in crafted + other_formats:
            assert (root / "img" / n).read_bytes() == n.encode()
        assert sorted(os.listdir(root / "img")) == sorted(crafted + other_formats + [good])


def test_a_planted_symlink_is_served_as_a_link_and_does_not_stop_the_mount(device, tmp_path, rng):
    """downloads/appImg.obj replaced by a link to a directory outside the root
    while unmounted: compatfs still mounts (recovery of the records below it
    fails alone), serves the link as a link and creates nothing through it."""
    root = device
    outside = tmp_path / "outside"
    (outside / "pending").mkdir(parents=True)
    (outside / "pending" / "keep").write_bytes(b"outside the root")
    image_id = new_uuid(rng)
    run = tmp_path / "run"
    config = layout_config(tmp_path, "design-note")    # it places downloads in progress
    with mounted(root, run, stage="redirect", config=config):
        os.makedirs(root / "downloads" / OBJ / "pending" / image_id)
        (root / "downloads" / OBJ / "pending" / image_id / "f").write_bytes(b"placed")
        (root / "img" / "notes.txt").write_text("legacy\n")
    placed = root / "vault" / "downloader" / "pending" / image_id / "f"
    assert placed.read_bytes() == b"placed"
    shutil.rmtree(root / "downloads" / OBJ)
    os.symlink(outside, root / "downloads" / OBJ)
    before = sorted(str(p.relative_to(outside)) for p in outside.rglob("*"))
    with mounted(root, run, stage="redirect", config=config) as m:
        link = root / "downloads" / OBJ
        assert stat.S_ISLNK(os.lstat(link).st_mode)
        assert os.readlink(link) == str(outside)
        assert (root / "img" / "notes.txt").read_text() == "legacy\n"
        (root / "img" / "more.txt").write_text("still serving\n")
        assert "not recovered" in m.log_text()
    assert sorted(str(p.relative_to(outside)) for p in outside.rglob("*")) == before
    assert placed.read_bytes() == b"placed"
    assert f"downloads/{OBJ}/pending/{image_id}/f" in index_rows(root)
