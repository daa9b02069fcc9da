"""The loop-mounted ext4 test devices of tests/devices.py: a real fscrypt vault
that refuses renames from outside with EXDEV, and a teardown that leaves no
mount and no loop device behind, whatever happens in the body.
"""

from __future__ import annotations

import errno
import os
import subprocess
import time
from pathlib import Path

import pytest

from compatfs import fscrypt
from compatfs.testing import devicefs as devices

from .devices import device_root, ext4_image, make_vault

SIZE_MB = 64


def losetup_lines(workdir: Path) -> list[str]:
    """Lines of ``losetup -a`` naming a backing file under *workdir*."""
    out = subprocess.run(["losetup", "-a"], capture_output=True, text=True, check=True).stdout
    return [line for line in out.splitlines() if str(workdir.resolve()) in line]


def proc_mounts_under(workdir: Path) -> list[str]:
    """Lines of /proc/mounts whose mount point lies under *workdir*."""
    base = str(workdir.resolve())
    with open("/proc/mounts", encoding="utf-8") as f:
        return [line for line in f if line.split(" ")[1].startswith(base)]


def assert_in_use(workdir: Path) -> None:
    """Positive control: the checks below do see a live device under *workdir*."""
    assert proc_mounts_under(workdir), "the image is not mounted"
    assert losetup_lines(workdir), "no loop device backed by the image"


def assert_nothing_left(workdir: Path) -> None:
    assert proc_mounts_under(workdir) == []
    assert losetup_lines(workdir) == []
    assert not (workdir / devices.IMAGE_NAME).exists()
    assert not (workdir / devices.MOUNT_NAME).exists()


@pytest.mark.root
def test_vault_is_encrypted_and_the_rest_is_not(tmp_path: Path) -> None:
    with device_root(tmp_path, SIZE_MB) as root:
        assert sorted(p.name for p in root.iterdir()) == ["clear", "lost+found", "novault",
                                                          "vault"]
        (root / "vault" / "file").write_bytes(b"secret")
        assert fscrypt.path_is_encrypted(str(root / "vault"))
        assert not fscrypt.path_is_encrypted(str(root / "clear"))
        assert not fscrypt.path_is_encrypted(str(root / "novault"))
        assert not fscrypt.path_is_encrypted(str(root))


@pytest.mark.root
def test_rename_into_the_vault_is_exdev(tmp_path: Path) -> None:
    with device_root(tmp_path, SIZE_MB) as root:
        (root / "img").mkdir()
        (root / "vault" / "volumes").mkdir()
        (root / "novault" / "sub").mkdir()
        legacy = root / "img" / "disk.qcow2"
        legacy.write_bytes(b"qcow")

        with pytest.raises(OSError) as info:
            os.rename(legacy, root / "vault" / "volumes" / "disk.qcow2")
        assert info.value.errno == errno.EXDEV
        assert legacy.read_bytes() == b"qcow"
        assert not (root / "vault" / "volumes" / "disk.qcow2").exists()

        (root / "vault" / "a").write_bytes(b"in vault")
        os.rename(root / "vault" / "a", root / "vault" / "volumes" / "a")
        assert (root / "vault" / "volumes" / "a").read_bytes() == b"in vault"

        (root / "novault" / "a").write_bytes(b"outside")
        os.rename(root / "novault" / "a", root / "novault" / "sub" / "a")
        assert (root / "novault" / "sub" / "a").read_bytes() == b"outside"


@pytest.mark.root
def test_vault_data_reads_back_and_is_encrypted_on_disk(tmp_path: Path) -> None:
    marker = os.urandom(32)
    data = marker * 2048 + os.urandom((1 << 20) + 123)  # 64 KiB of markers, an odd tail
    with device_root(tmp_path, SIZE_MB) as root:
        for d in ("vault", "novault"):
            with open(root / d / "blob", "wb") as f:
                f.write(data)
                os.fsync(f.fileno())
        assert (root / "vault" / "blob").read_bytes() == data
        os.sync()
        raw = (tmp_path / devices.IMAGE_NAME).read_bytes()
        # Once from novault/blob; the vault's copy reaches the disk only as ciphertext.
        assert marker in raw
        assert raw.count(marker) == 2048


@pytest.mark.root
@pytest.mark.parametrize("raise_in_body", [False, True], ids=["normal-exit", "body-raised"])
def test_nothing_left_behind(tmp_path: Path, raise_in_body: bool) -> None:
    class Boom(Exception):
        pass

    if raise_in_body:
        with pytest.raises(Boom):
            with device_root(tmp_path, SIZE_MB) as root:
                (root / "vault" / "file").write_bytes(b"x")
                assert_in_use(tmp_path)
                raise Boom
    else:
        with device_root(tmp_path, SIZE_MB) as root:
            (root / "vault" / "file").write_bytes(b"x")
            assert_in_use(tmp_path)
    assert_nothing_left(tmp_path)


@pytest.mark.root
def test_nothing_left_when_setup_fails_after_mounting(tmp_path: Path,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    def broken_vault(mount: Path, name: str = "vault", key: bytes | None = None) -> Path:
        assert_in_use(tmp_path)
        raise fscrypt.FscryptError(errno.EOPNOTSUPP, "no vault today")

    monkeypatch.setattr(devices, "make_vault", broken_vault)
    with pytest.raises(fscrypt.FscryptError):
        with device_root(tmp_path, SIZE_MB):
            pytest.fail("the body must not run")
    assert_nothing_left(tmp_path)


@pytest.mark.root
def test_nothing_left_when_the_mount_is_busy(tmp_path: Path) -> None:
    """A file still open at exit forces the lazy unmount; the loop device goes when it closes."""
    with pytest.raises(KeyError):
        with device_root(tmp_path, SIZE_MB) as root:
            busy = open(root / "vault" / "busy", "wb")  # noqa: SIM115
            raise KeyError("leave with a file open")
    try:
        assert proc_mounts_under(tmp_path) == []
    finally:
        busy.close()
    deadline = time.monotonic() + 5
    while losetup_lines(tmp_path) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert_nothing_left(tmp_path)


@pytest.mark.root
def test_unencrypted_vault(tmp_path: Path) -> None:
    with device_root(tmp_path, SIZE_MB, encrypted_vault=False) as root:
        assert (root / "vault").is_dir()
        assert not fscrypt.path_is_encrypted(str(root / "vault"))
        (root / "img").mkdir()
        (root / "vault" / "volumes").mkdir()
        (root / "img" / "disk").write_bytes(b"d")
        os.rename(root / "img" / "disk", root / "vault" / "volumes" / "disk")
        assert (root / "vault" / "volumes" / "disk").read_bytes() == b"d"
    assert_nothing_left(tmp_path)


@pytest.mark.root
def test_make_vault_needs_the_encrypt_feature(tmp_path: Path) -> None:
    with ext4_image(tmp_path, SIZE_MB, encrypt=False) as mnt:
        with pytest.raises(fscrypt.FscryptError) as info:
            make_vault(mnt)
        assert info.value.errno == errno.EOPNOTSUPP
        assert not fscrypt.path_is_encrypted(str(mnt))
    assert_nothing_left(tmp_path)


@pytest.mark.root
def test_make_vault_with_a_given_key(tmp_path: Path) -> None:
    key = bytes(range(64))
    with ext4_image(tmp_path, SIZE_MB) as mnt:
        first = make_vault(mnt, "one", key)
        second = make_vault(mnt, "two", key)  # adding the same key again is fine
        assert fscrypt.path_is_encrypted(str(first))
        assert fscrypt.path_is_encrypted(str(second))
        policies = []
        for vault in (first, second):
            fd = os.open(vault, os.O_RDONLY | os.O_DIRECTORY)
            try:
                policies.append(fscrypt.policy_of(fd))
            finally:
                os.close(fd)
        assert policies[0] == policies[1]  # the same key identifier
    assert_nothing_left(tmp_path)
