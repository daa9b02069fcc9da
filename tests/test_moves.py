"""How objects are moved (docs/eve.md, E5, E6, E8, E10, E15), on a real fscrypt vault.

- an ``img/`` encrypted under its own key (as vaultmgr made it on 5.6): a move
  out of it is a decrypting copy, so the copy reads back after img's key is gone;
- nothing of compatfs' ever lies in ``vault/volumes`` or ``clear/volumes`` (EVE's
  volume garbage collection deletes names it cannot parse): copies are staged in
  ``vault/compatfs/staging/`` and ``clear/compatfs/staging/``, also across a kill;
- a moved container volume carries ``snapshotid.txt``, and rollback takes it out.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import random
import re
import signal
import stat
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from compatfs import fscrypt
from compatfs.migration import expected_sha as _expected_sha
from compatfs.stores import Store
from compatfs.testing import devicegen
from compatfs.testing.devicefs import make_vault
from compatfs.testing.devicegen import AppDef, DriveDef, random_sha, random_uuid

from .conftest import set_aside, staged, temporaries
from .devices import device_root

pytestmark = pytest.mark.root

MIB = 1 << 20
#: The only names EVE's volumemgr keeps in its volume directories.
VOLUME_NAME = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}"
                         r"#\d+\.[a-z0-9]+")


@contextmanager
def device(tmp_path: Path, encrypted_img: bool = False) -> Iterator[tuple[Path, bytes | None]]:
    """A device root; with *encrypted_img*, ``img/`` is an fscrypt directory under a
    key of its own (yields the key's identifier, to remove it later)."""
    work = tmp_path / "dev"
    work.mkdir()
    with device_root(work, size_mb=256) as root:
        ident = None
        if encrypted_img:
            key = os.urandom(fscrypt.RAW_KEY_SIZE)
            fd = os.open(root, os.O_RDONLY | os.O_DIRECTORY)
            try:
                ident = fscrypt.add_key(fd, key)
            finally:
                os.close(fd)
            make_vault(root, "img", key)
            assert fscrypt.path_is_encrypted(str(root / "img"))
        else:
            (root / "img").mkdir()
        yield root, ident


def cli(*args: str, fault: str | None = None) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("COMPATFS_")}
    if fault is not None:
        env["COMPATFS_FAULT"] = fault
    return subprocess.run([sys.executable, "-m", "compatfs", *args], capture_output=True,
                          text=True, env=env, timeout=180)


def migrate(root: Path, tmp_path: Path, config: Path, fault: str | None = None):
    return cli("migrate", "--root", str(root), "--now", "--run-dir", str(tmp_path / "run"),
               "--config", str(config), fault=fault)


def rollback(root: Path, tmp_path: Path, config: Path):
    return cli("rollback", "--root", str(root), "--run-dir", str(tmp_path / "run"),
               "--config", str(config))


def write_config(tmp_path: Path, text: str = "") -> Path:
    path = tmp_path / "c.yaml"
    path.write_text(text)
    return path


def target(root: Path, d: DriveDef) -> Path:
    where = "clear" if d.clear_text else "vault"
    return root / where / "volumes" / f"{d.volume_uuid}#{d.generation}.{d.fmt}"


def tree(path: Path) -> dict[str, tuple[int, bytes | str]]:
    """Every entry below *path*: mode and content (a link's target)."""
    out: dict[str, tuple[int, bytes | str]] = {}
    for p in sorted(path.rglob("*")):
        st = p.lstat()
        if stat.S_ISLNK(st.st_mode):
            body: bytes | str = os.readlink(p)
        elif stat.S_ISREG(st.st_mode):
            body = p.read_bytes()
        else:
            body = b""
        out[str(p.relative_to(path))] = (stat.S_IMODE(st.st_mode), body)
    return out


def only_final_names(root: Path) -> None:
    """EVE's volume directories hold nothing but volume names: no temporary, no
    set-aside copy, no directory of compatfs'."""
    for d in (root / "vault/volumes", root / "clear/volumes"):
        if d.exists():
            names = os.listdir(d)
            assert all(VOLUME_NAME.fullmatch(n) for n in names), (d, names)


def two_volumes(rng: random.Random) -> AppDef:
    return AppDef(random_uuid(rng), "app", [
        DriveDef(random_uuid(rng), random_sha(rng), "raw", volume_uuid=random_uuid(rng),
                 clear_text=True),
        DriveDef(random_uuid(rng), random_sha(rng), "qcow2", volume_uuid=random_uuid(rng))])


# -- E8: img/ encrypted under its own key ---------------------------------------------------

@pytest.mark.parametrize("fault", [None, "bulk-copied"])
def test_encrypted_img_moves_by_decrypting_copies(tmp_path, fault):
    """A clear-text volume from an encrypted img/ lands in clear/volumes as plain
    text (it reads back byte-exact once img's key is removed, and carries no
    policy); a vault one reads back too; the legacy copies are gone. Killed after
    a bulk copy, nothing of compatfs' is in EVE's volume directories, and the
    next run finishes without a temporary left."""
    rng = random.Random(10)
    app = two_volumes(rng)
    config = write_config(tmp_path)
    with device(tmp_path, encrypted_img=True) as (root, ident):
        devicegen.write_device_state(str(root), [app])
        want = {}
        for i, d in enumerate(app.drives):
            data = rng.randbytes(3 * MIB + 17)
            (root / "img" / app.legacy_name(i)).write_bytes(data)
            want[target(root, d)] = data
        if fault is not None:
            crashed = migrate(root, tmp_path, config, fault=fault)
            assert crashed.returncode == -signal.SIGKILL, crashed.stderr
            only_final_names(root)
            staged_now = [staged(root, "clear_volumes", t.name) for t in want
                          if "clear/" in str(t)] + \
                         [staged(root, "vault_volumes", t.name) for t in want if "vault/" in str(t)]
            assert any(p.exists() for p in staged_now), temporaries(root)
            assert all(str(p).startswith((str(root / "vault/compatfs/staging/"),
                                          str(root / "clear/compatfs/staging/")))
                       for p in map(Path, temporaries(root))), temporaries(root)
        proc = migrate(root, tmp_path, config)
        assert proc.returncode == 0, proc.stderr
        assert sorted(os.listdir(root / "img")) == []
        only_final_names(root)
        assert temporaries(root) == []
        fd = os.open(root, os.O_RDONLY | os.O_DIRECTORY)
        try:
            fscrypt.remove_key(fd, ident)
        finally:
            os.close(fd)
        subprocess.run(["sync"], check=True)
        subprocess.run(["sh", "-c", "echo 2 > /proc/sys/vm/drop_caches"], check=True)
        for path, data in want.items():
            assert path.read_bytes() == data, path
        clear = next(p for p in want if "clear/" in str(p))
        fd = os.open(clear, os.O_RDONLY)
        try:
            assert fscrypt.policy_of(fd) is None      # plain text, not img's ciphertext
        finally:
            os.close(fd)


def test_a_rename_out_of_an_encrypted_store_is_exdev(tmp_path):
    """Store.rename refuses what the kernel would do wrongly: moving a file out of
    an fscrypt directory into a plain one (its contents stay encrypted)."""
    with device(tmp_path, encrypted_img=True) as (root, _):
        (root / "img" / "f").write_bytes(b"secret")
        img = Store("img", str(root / "img"), os.open(root / "img", os.O_RDONLY | os.O_DIRECTORY))
        clear = Store("clear", str(root / "clear"),
                      os.open(root / "clear", os.O_RDONLY | os.O_DIRECTORY))
        vault = Store("vault", str(root / "vault"),
                      os.open(root / "vault", os.O_RDONLY | os.O_DIRECTORY))
        try:
            for other in (clear, vault):
                with pytest.raises(OSError) as exc:
                    img.rename("f", other, "f")
                assert exc.value.errno == 18   # EXDEV
            img.rename("f", img, "g")          # within one policy: a rename
            assert (root / "img/g").read_bytes() == b"secret"
            (root / "vault/v").write_bytes(b"v")
            vault.makedirs("volumes")
            inner = Store("vv", str(root / "vault/volumes"),
                          os.open(root / "vault/volumes", os.O_RDONLY | os.O_DIRECTORY))
            try:
                vault.rename("v", inner, "v")  # the vault's own directories share its policy
            finally:
                inner.close()
            assert (root / "vault/volumes/v").read_bytes() == b"v"
        finally:
            for s in (img, clear, vault):
                s.close()


# -- E15: what older versions left in EVE's directories ------------------------------------

def test_temporaries_of_older_versions_are_tidied_and_set_asides_kept(tmp_path):
    """A temporary an older compatfs left in vault/volumes/.compatfs-tmp/ goes; a
    set-aside copy it made stays where it is (never deleted)."""
    rng = random.Random(11)
    app = two_volumes(rng)
    config = write_config(tmp_path)
    with device(tmp_path) as (root, _):
        devicegen.write_device_state(str(root), [app])
        for i in range(2):
            (root / "img" / app.legacy_name(i)).write_bytes(rng.randbytes(MIB))
        old_tmp = root / "vault/volumes/.compatfs-tmp"
        old_tmp.mkdir(parents=True)
        (old_tmp / hashlib.sha256(b"x").hexdigest()).write_bytes(b"half a copy")
        old_aside = root / "vault/volumes/.compatfs-set-aside"
        old_aside.mkdir()
        (old_aside / "v.1").write_bytes(b"kept")
        proc = migrate(root, tmp_path, config)
        assert proc.returncode == 0, proc.stderr
        assert not old_tmp.exists()
        assert (old_aside / "v.1").read_bytes() == b"kept"
        assert temporaries(root) == []


# -- E5: snapshotid.txt -----------------------------------------------------------------------

def pod_app(rng: random.Random) -> AppDef:
    return AppDef(random_uuid(rng), "pod", [
        DriveDef(random_uuid(rng), random_sha(rng), "container", volume_uuid=random_uuid(rng)),
        DriveDef(random_uuid(rng), random_sha(rng), "container", volume_uuid=random_uuid(rng),
                 clear_text=True)])


def test_moved_container_volumes_carry_snapshotid_and_rollback_removes_it(tmp_path):
    """Into the vault (a copy) and into clear/volumes (a rename on one filesystem):
    snapshotid.txt holds the legacy base name byte-exact, no newline, mode 0644;
    after rollback the legacy trees are back as they were, without it."""
    rng = random.Random(12)
    pod = pod_app(rng)
    config = write_config(tmp_path, "mount_prepared: true\n")
    with device(tmp_path) as (root, _):
        devicegen.write_device_state(str(root), [pod])
        prepared = root / "runx/pods/prepared"
        names = [pod.legacy_name(i, container=True) for i in range(2)]
        before = {}
        for n in names:
            devicegen.container_tree(str(prepared / n), rng)
            before[n] = tree(prepared / n)
        proc = migrate(root, tmp_path, config)
        assert proc.returncode == 0, proc.stderr
        for n, d in zip(names, pod.drives, strict=True):
            assert not (prepared / n).exists()
            moved = target(root, d)
            sid = moved / "snapshotid.txt"
            assert sid.read_bytes() == n.encode(), sid
            assert stat.S_IMODE(sid.stat().st_mode) == 0o644
            rest = tree(moved)
            del rest["snapshotid.txt"]
            assert rest == before[n]
        only_final_names(root)
        assert temporaries(root) == []

        proc = rollback(root, tmp_path, config)
        assert proc.returncode == 0, proc.stderr
        for n, d in zip(names, pod.drives, strict=True):
            assert tree(prepared / n) == before[n]
            assert not target(root, d).exists()


def test_no_snapshotid_when_the_destination_existed(tmp_path):
    """An existing container volume wins (eve): it is left exactly as it was (no
    snapshotid.txt added) and the legacy tree is set aside whole."""
    rng = random.Random(13)
    pod = pod_app(rng)
    pod.drives.pop()
    config = write_config(tmp_path, "mount_prepared: true\n")
    with device(tmp_path) as (root, _):
        devicegen.write_device_state(str(root), [pod])
        prepared = root / "runx/pods/prepared"
        name = pod.legacy_name(0, container=True)
        devicegen.container_tree(str(prepared / name), rng)
        legacy = tree(prepared / name)
        dest = target(root, pod.drives[0])
        (dest / "rootfs").mkdir(parents=True)
        (dest / "rootfs/mine").write_bytes(b"the new EVE's")
        existing = tree(dest)
        proc = migrate(root, tmp_path, config)
        assert proc.returncode == 0, proc.stderr
        assert tree(dest) == existing
        aside = list((prepared / ".compatfs-set-aside").iterdir())
        assert len(aside) == 1 and tree(aside[0]) == legacy
        assert set_aside(root, "vault_volumes") == []
        only_final_names(root)


# -- E2: the generation a volume is placed under -----------------------------------------------

@pytest.mark.parametrize("layout", ["eve", "design-note"])
def test_generation_mismatch_places_under_the_volume_generation(tmp_path, layout):
    """The app's VolumeRef says generation 5 (a VM volume) and 0 (a container volume),
    the Volumes 3 and 2. eve: ``migrate --now`` puts both under the Volume's
    generation, the name new volumemgr opens, byte-exact (the container with
    snapshotid.txt), and ``plan`` and ``status`` report each mismatch as a problem.
    design-note: the VolumeRef's generation, no problem."""
    rng = random.Random(15)
    vm = DriveDef(random_uuid(rng), random_sha(rng), "qcow2", volume_uuid=random_uuid(rng),
                  generation=3)
    pod = DriveDef(random_uuid(rng), random_sha(rng), "container", volume_uuid=random_uuid(rng),
                   generation=2)
    app = AppDef(random_uuid(rng), "gen", [vm, pod])
    ref_gen = {vm.volume_uuid: 5, pod.volume_uuid: 0}
    config = write_config(tmp_path, f"mount_prepared: true\nlayout: {layout}\n")
    eve = layout == "eve"
    with device(tmp_path) as (root, _):
        assert fscrypt.path_is_encrypted(str(root / "vault"))
        devicegen.write_device_state(str(root), [app])
        resp = devicegen.build_config([app])
        for ref in resp.config.apps[0].volumeRefList:
            ref.generationCount = ref_gen[ref.uuid]
        devicegen.write_atomic(str(root / "checkpoint/lastconfig"),
                               devicegen.encode_checkpoint(resp))
        img = root / "img" / app.legacy_name(0)
        devicegen.sparse_file(str(img), 8 * MIB, {0: b"head", 5 * MIB: rng.randbytes(70000)})
        want = hashlib.sha256(img.read_bytes()).hexdigest()
        name = app.legacy_name(1, container=True)
        devicegen.container_tree(str(root / "runx/pods/prepared" / name), rng)
        legacy_tree = tree(root / "runx/pods/prepared" / name)

        def mismatches(problems: list[str]) -> set[str]:
            return {u for u in ref_gen for p in problems
                    if u in p and f"volumeRefList says generation {ref_gen[u]}" in p}

        plan = cli("plan", "--root", str(root), "--config", str(config))
        assert plan.returncode == 0, plan.stderr
        problems = [ln for ln in plan.stdout.splitlines() if ln.startswith("problem: ")]
        assert mismatches(problems) == (set(ref_gen) if eve else set()), plan.stdout
        proc = migrate(root, tmp_path, config)
        assert proc.returncode == 0, proc.stderr

        gen = (lambda d: d.generation) if eve else (lambda d: ref_gen[d.volume_uuid])
        vm_at = root / "vault/volumes" / f"{vm.volume_uuid}#{gen(vm)}.qcow2"
        pod_at = root / "vault/volumes" / f"{pod.volume_uuid}#{gen(pod)}.container"
        assert sorted(os.listdir(root / "vault/volumes")) == sorted([vm_at.name, pod_at.name])
        assert hashlib.sha256(vm_at.read_bytes()).hexdigest() == want
        assert not img.exists()
        moved = tree(pod_at)
        if eve:
            assert moved.pop("snapshotid.txt") == (0o644, name.encode())
        assert moved == legacy_tree
        only_final_names(root)

        status = cli("status", "--root", str(root), "--run-dir", str(tmp_path / "run"),
                     "--config", str(config), "--json")
        assert status.returncode == 0, status.stderr
        doc = json.loads(status.stdout)
        assert mismatches(doc["problems"]) == (set(ref_gen) if eve else set()), doc["problems"]
        states = {o["legacy"]: o["state"] for o in doc["objects"]}
        assert states[f"img/{app.legacy_name(0)}"] == "new"
        assert states[f"runx/pods/prepared/{name}"] == "new"


# -- E10: verified names ----------------------------------------------------------------------

def test_verified_names_are_checked_by_the_sha_before_the_first_dot():
    sha = hashlib.sha256(b"x").hexdigest()
    assert _expected_sha("verified", sha) == sha
    assert _expected_sha("verified", f"{sha}.application%2Fvnd.oci.image.layer.v1.tar+gzip") == sha
    assert _expected_sha("verified", "notasha.x") is None
    assert _expected_sha("vault_volumes", sha) is None


def test_snapshotid_write_refuses_a_fifo_and_rewrites_a_regular_file(tmp_path):
    """Something an agent left at the name in its tree: a FIFO is refused without
    being opened (an open for writing would block or, with O_NONBLOCK and no reader,
    fail with ENXIO), a regular file is rewritten to exactly the legacy name."""
    from compatfs import snapshotid

    tree = tmp_path / "vol"
    tree.mkdir()
    store = Store("vault_volumes", str(tmp_path), os.open(tmp_path, os.O_RDONLY | os.O_DIRECTORY))
    try:
        os.mkfifo(tree / "snapshotid.txt")
        with pytest.raises(OSError) as info:
            snapshotid.write(store, "vol", "abc-def")
        assert info.value.errno == errno.EINVAL
        assert stat.S_ISFIFO(os.lstat(tree / "snapshotid.txt").st_mode)
        os.unlink(tree / "snapshotid.txt")
        (tree / "snapshotid.txt").write_bytes(b"a much longer old content\n")
        os.chmod(tree / "snapshotid.txt", 0o600)
        snapshotid.write(store, "vol", "abc-def")
        assert (tree / "snapshotid.txt").read_bytes() == b"abc-def"
        assert stat.S_IMODE(os.lstat(tree / "snapshotid.txt").st_mode) == 0o644
    finally:
        store.close()
