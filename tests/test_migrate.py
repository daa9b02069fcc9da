"""The migration engine on a real encrypted vault: migrate --now, sparse
files, rollback, and live writes while a file migrates under the daemon."""

from __future__ import annotations

import hashlib
import json
import os
import random
import threading
import time
from pathlib import Path

import pytest

from compatfs.testing import devicegen

from .conftest import layout_config, legacy_snapshot, run_cli, temporaries
from .devices import device_under
from .mounting import mounted

pytestmark = pytest.mark.root


def sha_tree(root: Path, rel: str) -> dict[str, str]:
    """sha256 of every regular file below root/rel, by path relative to root."""
    out = {}
    base = root / rel
    if not base.exists():
        return out
    for dirpath, _, files in os.walk(base):
        for f in files:
            p = Path(dirpath) / f
            if p.is_symlink() or not p.is_file():
                continue
            with open(p, "rb") as fh:
                out[str(p.relative_to(root))] = hashlib.file_digest(fh, "sha256").hexdigest()
    return out


@pytest.fixture
def device(tmp_path):
    with device_under(tmp_path, size_mb=768) as root:
        yield root


@pytest.mark.parametrize("verify,layout", [(None, "eve"), ("readback", "eve"), ("false", "eve"),
                                           (None, "design-note")])
def test_migrate_now_moves_everything_intact_and_a_second_pass_finds_nothing(device, tmp_path,
                                                                             verify, layout):
    root = device
    web, db, pod, fresh = devicegen.make_demo(str(root))
    before = {**sha_tree(root, "img"), **sha_tree(root, "downloads")}
    cas_before = {k.removeprefix("containerd/"): v for k, v in sha_tree(root, "containerd").items()}
    assert cas_before
    run = str(tmp_path / "run")
    config = layout_config(tmp_path, layout)
    if verify is not None:
        config.write_text(config.read_text() + f"migration:\n  verify: {verify}\n")
    proc = run_cli("migrate", "--root", str(root), "--now", "--run-dir", run,
                   "--config", str(config))
    assert proc.returncode == 0, proc.stderr
    # eve 17.3 leaves the downloads in progress and the baseOs.obj object (in no
    # config: no name 17.3 keeps) in the legacy store
    moved = 9 if layout == "design-note" else 6
    assert f"migrated {moved} of {moved} objects" in proc.stderr
    clear = "novault" if layout == "design-note" else "clear"
    vol = lambda d, fmt: f"{d.volume_uuid}#{d.generation}.{fmt}"  # noqa: E731
    placed = {
        f"img/{web.legacy_name(0)}": f"vault/volumes/{vol(web.drives[0], 'qcow2')}",
        f"img/{web.legacy_name(1, sha_upper=True)}": f"{clear}/volumes/{vol(web.drives[1], 'raw')}",
        f"img/{db.legacy_name(0)}": f"vault/volumes/{vol(db.drives[0], 'raw')}",
    }
    after = {**sha_tree(root, "vault"), **sha_tree(root, clear)}
    for legacy, target in placed.items():
        assert after[target] == before[legacy], legacy
        assert not (root / legacy).exists()
    # what stays: the stale purge copy, the unknown app, the stray file
    assert (root / "img" / db.legacy_name(0, purge=1)).exists()
    assert (root / "img" / "notes.txt").exists()
    media = ".application%2Fvnd.oci.image.layer.v1.tar+gzip"
    for legacy, digest in before.items():
        if legacy.startswith("downloads/") and "/verified/" in legacy:
            sha = legacy.split("/")[3].lower()
            if layout == "design-note":
                assert after[f"vault/verifier/verified/{sha}"] == digest == sha
            elif sha == fresh.drives[0].sha:         # the image the checkpoint names
                assert after[f"vault/verifier/verified/{sha}{media}"] == digest == sha
            else:
                assert (root / legacy).exists() and not any(sha in k for k in after)
        elif legacy.startswith("downloads/"):        # in progress: only the design note moves it
            assert (root / legacy).exists() == (layout == "eve"), legacy
    tree = root / "vault/volumes" / vol(pod.drives[0], "container")
    assert ((tree / "rootfs/bin/start").is_symlink()
            and os.readlink(tree / "rootfs/bin/start") == "app")
    assert not (root / "runx/pods/prepared" / pod.legacy_name(0, container=True)).exists()
    # the containerd store moved whole into the vault
    assert not (root / "containerd").exists()
    assert {k.removeprefix("vault/containerd/"): v
            for k, v in sha_tree(root, "vault/containerd").items()} == cas_before
    assert temporaries(root) == []
    again = run_cli("migrate", "--root", str(root), "--now", "--run-dir", run)
    assert again.returncode == 0 and "migrated 0 of 0 objects" in again.stderr
    status = json.loads(run_cli("status", "--root", str(root), "--run-dir", run, "--json").stdout)
    states = {o["legacy"]: o["state"] for o in status["objects"]}
    for legacy in placed:
        assert states[legacy] == "new"
    assert states["containerd"] == "new"
    # a moved tree counts what it holds, not just its directory
    sizes = {o["legacy"]: o["bytes"] for o in status["objects"]}
    assert sizes["containerd"] >= 32 << 10
    assert sizes[f"runx/pods/prepared/{pod.legacy_name(0, container=True)}"] > 8192


def test_sparse_image_stays_sparse(device, tmp_path):
    root = device
    rng = random.Random(4)
    app = devicegen.AppDef(devicegen.random_uuid(rng), "big", [
        devicegen.DriveDef(devicegen.random_uuid(rng), devicegen.random_sha(rng), "raw")])
    devicegen.write_device_state(str(root), [app])
    data = {i * (256 << 20): rng.randbytes(4 << 20) for i in range(16)}  # 64 MiB of data
    legacy = root / "img" / app.legacy_name(0)
    devicegen.sparse_file(str(legacy), 4 << 30, data)
    with open(legacy, "rb") as f:
        want = hashlib.file_digest(f, "sha256").hexdigest()
    proc = run_cli("migrate", "--root", str(root), "--now", "--run-dir", str(tmp_path / "run"))
    assert proc.returncode == 0, proc.stderr
    target = root / "vault/volumes" / f"{app.drives[0].volume_uuid}#0.raw"
    st = os.stat(target)
    assert st.st_size == 4 << 30
    assert st.st_blocks * 512 <= (64 << 20) * 1.01, st.st_blocks * 512
    with open(target, "rb") as f:
        assert hashlib.file_digest(f, "sha256").hexdigest() == want


@pytest.mark.parametrize("layout", ["eve", "design-note"])
def test_rollback_restores_exactly_what_old_eve_expects(device, tmp_path, layout):
    root = device
    devicegen.make_demo(str(root))
    before = legacy_snapshot(root)
    run = str(tmp_path / "run")
    config = str(layout_config(tmp_path, layout))
    assert run_cli("migrate", "--root", str(root), "--now", "--run-dir", run,
                   "--config", config).returncode == 0
    assert legacy_snapshot(root) != before
    proc = run_cli("rollback", "--root", str(root), "--run-dir", run, "--config", config)
    assert proc.returncode == 0, proc.stderr
    assert f"moved {9 if layout == 'design-note' else 6} objects back" in proc.stderr
    after = legacy_snapshot(root)
    assert set(after) >= set(before)
    for path, (mode, size, mtime, digest) in before.items():
        assert after[path] == (mode, size, mtime, digest), path
    assert sha_tree(root, "vault/volumes") == {} and sha_tree(root, "novault/volumes") == {}
    assert sha_tree(root, "clear/volumes") == {}
    assert sha_tree(root, "vault/verifier") == {}
    assert not (root / "vault/containerd").exists()
    assert temporaries(root) == []


def test_live_writes_during_migration_reach_the_new_copy(device, tmp_path):
    """A writer keeps writing random blocks (with fsyncs) through the legacy
    name while that file migrates and its handles switch; nothing is lost."""
    root = device
    rng = random.Random(9)
    app = devicegen.AppDef(devicegen.random_uuid(rng), "vm", [
        devicegen.DriveDef(devicegen.random_uuid(rng), devicegen.random_sha(rng), "raw")])
    devicegen.write_device_state(str(root), [app])
    size = 64 << 20
    model = bytearray(rng.randbytes(size))
    legacy = root / "img" / app.legacy_name(0)
    legacy.parent.mkdir()
    legacy.write_bytes(model)
    config = tmp_path / "c.yaml"
    config.write_text("migration:\n  throttle_mib_per_s: 16\n  rescan_s: 1\n  verify: true\n")
    target = root / "vault/volumes" / f"{app.drives[0].volume_uuid}#0.raw"
    stop = threading.Event()
    errors: list[BaseException] = []
    writes = {"before": 0, "after": 0}

    def writer(fd: int) -> None:
        wrng = random.Random(10)
        try:
            while not stop.is_set():
                off = wrng.randrange(0, size - 65536) & ~511
                block = wrng.randbytes(wrng.choice((512, 4096, 65536)))
                os.pwrite(fd, block, off)
                model[off:off + len(block)] = block
                writes["after" if target.exists() else "before"] += 1
                if wrng.random() < 0.05:
                    os.fsync(fd)
        except BaseException as exc:  # noqa: BLE001
            errors.append(exc)

    with mounted(root, tmp_path / "run", stage="migrate", config=config):
        fd = os.open(legacy, os.O_RDWR)
        reader = os.open(legacy, os.O_RDONLY)
        try:
            t = threading.Thread(target=writer, args=(fd,))
            t.start()
            deadline = time.monotonic() + 60
            while not target.exists() and time.monotonic() < deadline:
                time.sleep(0.1)
            time.sleep(1.0)  # keep writing to the switched handle
            stop.set()
            t.join()
            assert not errors, errors
            assert target.exists(), "the file did not migrate within 60 s"
            assert writes["before"] > 50 and writes["after"] > 50, writes
            os.fsync(fd)
            assert os.pread(reader, size, 0) == bytes(model)  # an old read-only handle
            with open(legacy, "rb") as f:
                assert f.read() == bytes(model)
        finally:
            os.close(fd)
            os.close(reader)
    with open(target, "rb") as f:
        assert f.read() == bytes(model)
    assert not legacy.exists()
    assert temporaries(root) == []


def test_containerd_store_in_use_waits_and_moves_once_released(device, tmp_path):
    """No view covers /persist/containerd: while a process holds anything in it
    (here its working directory, as a running containerd would hold files), it
    stays where it is and says why; everything else moves; released, it moves."""
    import subprocess

    root = device
    devicegen.make_demo(str(root))
    cas_before = sha_tree(root, "containerd")
    run = str(tmp_path / "run")
    holder = subprocess.Popen(["sleep", "120"], cwd=root / "containerd")
    try:
        proc = run_cli("migrate", "--root", str(root), "--now", "--run-dir", run)
        assert proc.returncode == 1, proc.stderr
        assert "migrated 5 of 6 objects" in proc.stderr     # eve 17.3 moves 6 (test above)
        assert f"waiting: persist/containerd: in use by pid {holder.pid} (sleep, cwd)" \
            in proc.stderr
        assert sha_tree(root, "containerd") == cas_before
        assert not (root / "vault/containerd").exists()
        assert temporaries(root) == []
        # rollback of everything else works; the unmoved store is simply not touched
    finally:
        holder.kill()
        holder.wait()
    again = run_cli("migrate", "--root", str(root), "--now", "--run-dir", run)
    assert again.returncode == 0 and "migrated 1 of 1 objects" in again.stderr, again.stderr
    assert not (root / "containerd").exists()
    assert len(sha_tree(root, "vault/containerd")) == len(cas_before)

    # a rollback while the new store is held is refused for that store alone
    holder = subprocess.Popen(["sleep", "120"], cwd=root / "vault/containerd")
    try:
        back = run_cli("rollback", "--root", str(root), "--run-dir", run)
        assert back.returncode != 0
        assert "in use by pid" in back.stderr and "containerd" in back.stderr
        assert (root / "vault/containerd").exists() and not (root / "containerd").exists()
    finally:
        holder.kill()
        holder.wait()
    back = run_cli("rollback", "--root", str(root), "--run-dir", run)
    assert back.returncode == 0, back.stderr
    assert sha_tree(root, "containerd") == cas_before


def test_daemon_moves_the_containerd_store_once_released_and_says_so_once(device, tmp_path):
    """In stage migrate the daemon waits for a held containerd store, telling the
    log once (not every pass), and moves it in the background once released."""
    import subprocess

    root = device
    devicegen.make_demo(str(root))
    cas_before = {k.removeprefix("containerd/"): v for k, v in sha_tree(root, "containerd").items()}
    config = tmp_path / "c.yaml"
    config.write_text("migration:\n  rescan_s: 1\n  retry_backoff_s: 0\n  throttle_mib_per_s: 0\n")
    holder = subprocess.Popen(["sleep", "120"], cwd=root / "containerd")
    try:
        with mounted(root, tmp_path / "run", stage="migrate", config=config) as m:
            deadline = time.monotonic() + 30   # the rest moves meanwhile
            while not sha_tree(root, "vault/volumes") and time.monotonic() < deadline:
                time.sleep(0.2)
            assert sha_tree(root, "vault/volumes"), m.log_text()
            time.sleep(4)            # several more passes while it is held
            assert (root / "containerd").is_dir() and not (root / "vault/containerd").exists()
            said = [line for line in m.log_text().splitlines()
                    if f"persist/containerd: in use by pid {holder.pid} (sleep, cwd)" in line]
            assert len(said) == 1, m.log_text()
            holder.kill()
            holder.wait()
            deadline = time.monotonic() + 30
            while (root / "containerd").exists() and time.monotonic() < deadline:
                time.sleep(0.2)
            assert not (root / "containerd").exists(), m.log_text()
    finally:
        holder.kill()
        holder.wait()
    assert {k.removeprefix("vault/containerd/"): v
            for k, v in sha_tree(root, "vault/containerd").items()} == cas_before
    assert temporaries(root) == []


@pytest.mark.parametrize("layout", ["eve", "design-note"])
@pytest.mark.parametrize("newer", [True, False], ids=["destination-newer", "destination-older"])
def test_containerd_store_downgrade_then_upgrade(device, tmp_path, newer, layout):
    """A CAS location that already exists: in eve it always wins, in design-note the
    newer wins; the other copy is set aside byte-exact (never deleted): the legacy
    store in the root's .compatfs-set-aside/, the new one in vault/compatfs/set-aside/."""
    root = device
    devicegen.make_demo(str(root))
    legacy = {k.removeprefix("containerd/"): v for k, v in sha_tree(root, "containerd").items()}
    cas = root / "vault/containerd"
    (cas / "io.containerd.metadata.v1.bolt").mkdir(parents=True)
    (cas / "io.containerd.metadata.v1.bolt" / "meta.db").write_bytes(b"new containerd")
    existing = {k.removeprefix("vault/containerd/"): v
                for k, v in sha_tree(root, "vault/containerd").items()}
    t_legacy = os.stat(root / "containerd").st_mtime
    os.utime(cas, (t_legacy + (3600 if newer else -3600),) * 2)
    run = str(tmp_path / "run")
    config = tmp_path / "c.yaml"
    config.write_text(f"layout: {layout}\n")
    proc = run_cli("migrate", "--root", str(root), "--now", "--run-dir", run,
                   "--config", str(config))
    assert proc.returncode == 0, proc.stderr
    assert not (root / "containerd").exists()
    now = {k.removeprefix("vault/containerd/"): v
           for k, v in sha_tree(root, "vault/containerd").items()}
    status = json.loads(run_cli("status", "--root", str(root), "--run-dir", run,
                                "--config", str(config), "--json").stdout)
    obj = next(o for o in status["objects"] if o["legacy"] == "containerd")
    assert obj["state"] == "new", obj
    assert "set aside" in (obj["reason"] or ""), obj
    new_aside = root / "vault/compatfs/set-aside/cas_parent"
    if newer or layout == "eve":
        assert now == existing
        aside = list((root / ".compatfs-set-aside").iterdir())
        assert len(aside) == 1 and aside[0].name.startswith("containerd.")
        kept = sha_tree(root, f".compatfs-set-aside/{aside[0].name}")
        assert {k.split("/", 2)[2]: v for k, v in kept.items()} == legacy
        assert not new_aside.exists() or not list(new_aside.iterdir())
    else:
        assert now == legacy
        assert not (root / ".compatfs-set-aside").exists()
        aside = list(new_aside.iterdir())
        assert len(aside) == 1 and aside[0].name.startswith("containerd.")
        rel = aside[0].relative_to(root)
        kept = sha_tree(root, str(rel))
        assert {k.removeprefix(f"{rel}/"): v for k, v in kept.items()} == existing
    assert not (root / "vault/.compatfs-set-aside").exists()
    assert temporaries(root) == []


def test_a_held_containerd_store_is_not_set_aside_either(device, tmp_path):
    import subprocess

    root = device
    devicegen.make_demo(str(root))
    before = sha_tree(root, "containerd")
    (root / "vault/containerd").mkdir()
    os.utime(root / "vault/containerd", (os.stat(root / "containerd").st_mtime + 3600,) * 2)
    holder = subprocess.Popen(["sleep", "120"], cwd=root / "containerd")
    try:
        proc = run_cli("migrate", "--root", str(root), "--now", "--run-dir",
                       str(tmp_path / "run"))
        assert proc.returncode == 1 and "waiting: persist/containerd: in use by pid" \
            in proc.stderr, proc.stderr
        assert sha_tree(root, "containerd") == before
        assert not (root / ".compatfs-set-aside").exists()
    finally:
        holder.kill()
        holder.wait()


def test_eve_7_10_keeps_containerd_and_names_verified_objects_by_bare_sha(device, tmp_path):
    """E10, E14 for a target before 7.11: containerd/ is that release's system
    containerd root and stays (status says why); verified objects of both blob
    types move to vault/verifier/verified/<lower sha> whatever the config says."""
    root = device
    devicegen.make_demo(str(root))
    cas_before = sha_tree(root, "containerd")
    verified = {k: v for k, v in sha_tree(root, "downloads").items() if "/verified/" in k}
    assert len(verified) == 2
    run = str(tmp_path / "run")
    config = str(layout_config(tmp_path, "eve", "7.10"))
    proc = run_cli("migrate", "--root", str(root), "--now", "--run-dir", run, "--config", config)
    assert proc.returncode == 0, proc.stderr
    assert "migrated 6 of 6 objects" in proc.stderr       # 4 volumes, 2 verified objects
    assert sha_tree(root, "containerd") == cas_before and not (root / "vault/containerd").exists()
    for legacy, digest in verified.items():
        assert sha_tree(root, "vault/verifier/verified")[
            f"vault/verifier/verified/{legacy.split('/')[3].lower()}"] == digest
    status = json.loads(run_cli("status", "--root", str(root), "--run-dir", run, "--config",
                                config, "--json", check=True).stdout)
    assert status["layout"] == "eve 7.10"
    text = run_cli("status", "--root", str(root), "--run-dir", run, "--config", config,
                   check=True).stdout
    assert text.splitlines()[0].endswith("not mounted, target layout eve 7.10")
    obj = next(o for o in status["objects"] if o["legacy"] == "containerd")
    assert obj["state"] == "legacy" and "EVE 7.10 runs its own containerd" in obj["reason"]


def test_what_design_note_placed_is_still_served_under_eve(device, tmp_path):
    """A device migrated under layout design-note (clear-text volume in
    novault/volumes) whose config then says eve: the volume stays where it is,
    and its legacy name still reads it through the views (the store of the other
    layout is opened, never made)."""
    root = device
    web, db, pod, fresh = devicegen.make_demo(str(root))
    clear_name = f"img/{web.legacy_name(1, sha_upper=True)}"
    want = sha_tree(root, "img")[clear_name]
    run = tmp_path / "run"
    moved = run_cli("migrate", "--root", str(root), "--now", "--run-dir", str(run),
                    "--config", str(layout_config(tmp_path, "design-note")))
    assert moved.returncode == 0, moved.stderr
    placed = f"novault/volumes/{web.drives[1].volume_uuid}#{web.drives[1].generation}.raw"
    assert sha_tree(root, "novault")[placed] == want
    with mounted(root, run, stage="redirect", config=layout_config(tmp_path, "eve")):
        with open(root / clear_name, "rb") as f:
            assert hashlib.sha256(f.read()).hexdigest() == want
    assert not (root / "clear/volumes").exists() or not os.listdir(root / "clear/volumes")
    assert sha_tree(root, "novault")[placed] == want
