"""Real block-device ``/persist`` roots: an ext4 image on a loop device,
optionally with an fscrypt-encrypted ``vault/``. Used by ``compatfs demo``,
the tests and the benchmarks.

A plain temporary directory behaves unlike a device in the one way that
matters most to compatfs: on a device, ``/persist/vault`` is an fscrypt
directory, and ``rename(2)`` of a file from outside it (``/persist/img``,
``/persist/clear``) into it fails with ``EXDEV`` -- the bytes have to be
copied (or reflinked) and re-encrypted, not just relinked. Tests that move
files into the vault, or that ask :mod:`compatfs.fscrypt` whether a directory
is encrypted, need the real thing, which these helpers build
(on a device, ``/persist`` is ext4 with fscrypt and ``vault/`` one policy; see
docs/eve.md):

* :func:`ext4_image` -- a sparse ext4 image made with ``mkfs.ext4 -O encrypt``,
  attached with ``losetup`` and mounted on ``WORKDIR/mnt``;
* :func:`make_vault` -- an empty directory with a v2 policy under a fresh raw
  key (the key lives in the filesystem's keyring until it is unmounted);
* :func:`device_root` -- both together: a ``/persist``-like root holding an
  encrypted ``vault/`` and the plain ``clear/`` (EVE) and ``novault/`` (design
  note) directories for clear-text volumes.

They need root and loop devices (tests using them are marked ``root``).

Teardown always runs, also when the body raises or setup fails halfway: the
mount point (and anything mounted below it, such as a FUSE view a test put on
top) is unmounted, retried a few times and detached lazily as a last resort;
every loop device backed by the image is detached; the image is deleted.
The only thing teardown cannot undo is a file the test itself still holds
open inside the mount after the ``with`` block: the mount is then detached
lazily and the kernel frees the loop device when that file is closed.
"""

from __future__ import annotations

import contextlib
import os
import re
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

from .. import fscrypt

#: Names inside *workdir* that :func:`ext4_image` uses.
IMAGE_NAME = "ext4.img"
MOUNT_NAME = "mnt"

_UMOUNT_ATTEMPTS = 5
_UMOUNT_DELAY = 0.1
_CMD_TIMEOUT = 60


class DeviceError(RuntimeError):
    """Setting up or tearing down a device image failed."""


def _run(*argv: str) -> subprocess.CompletedProcess[str]:
    """Run *argv*; raise :class:`DeviceError` with its output when it fails."""
    proc = subprocess.run(argv, check=False, capture_output=True, text=True,
                          timeout=_CMD_TIMEOUT)
    if proc.returncode != 0:
        raise DeviceError(f"{' '.join(argv)} exited {proc.returncode}: "
                          f"{(proc.stderr or proc.stdout).strip()}")
    return proc


def _unescape_mount_field(field: str) -> str:
    """Undo the octal escapes (``\\040`` for a space, ...) of /proc/mounts."""
    return re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), field)


def mounts_under(path: Path) -> list[str]:
    """Mount points at or below *path*, as listed in /proc/mounts (in mount order)."""
    base = os.path.realpath(path)
    found = []
    with open("/proc/mounts", encoding="utf-8", errors="surrogateescape") as f:
        for line in f:
            fields = line.split(" ")
            if len(fields) < 2:
                continue
            target = _unescape_mount_field(fields[1])
            if target == base or target.startswith(base.rstrip("/") + "/"):
                found.append(target)
    return found


def loops_backed_by(image: Path) -> list[str]:
    """The loop devices whose backing file is *image* (empty if it does not exist)."""
    if not os.path.exists(image):
        return []
    proc = _run("losetup", "--noheadings", "--output", "NAME", "--associated", str(image))
    return [line.strip() for line in proc.stdout.splitlines() if line.strip()]


def _unmount(target: str) -> None:
    """Unmount *target*: a few polite attempts, then a lazy detach."""
    last = ""
    for attempt in range(_UMOUNT_ATTEMPTS):
        proc = subprocess.run(["umount", target], check=False, capture_output=True, text=True,
                              timeout=_CMD_TIMEOUT)
        if proc.returncode == 0:
            return
        last = (proc.stderr or proc.stdout).strip()
        if target not in mounts_under(Path(target)):
            return                      # gone meanwhile (unmounted by someone else)
        if attempt + 1 < _UMOUNT_ATTEMPTS:
            time.sleep(_UMOUNT_DELAY)
    proc = subprocess.run(["umount", "-l", target], check=False, capture_output=True,
                          text=True, timeout=_CMD_TIMEOUT)
    if proc.returncode != 0 and target in mounts_under(Path(target)):
        raise DeviceError(f"cannot unmount {target}: {last}; umount -l: "
                          f"{(proc.stderr or proc.stdout).strip()}")


def _unmount_tree(mnt: Path) -> None:
    """Unmount everything at or below *mnt*, deepest (and most recent) first."""
    for _ in range(100):                # bounded: each round removes at least one mount
        targets = mounts_under(mnt)
        if not targets:
            return
        # The last-listed among the deepest is on top: unmount it first.
        depth = max(t.count("/") for t in targets)
        _unmount([t for t in targets if t.count("/") == depth][-1])
    raise DeviceError(f"mounts keep appearing under {mnt}: {mounts_under(mnt)}")


def _detach_loops(image: Path, known: list[str]) -> None:
    """Detach every loop device backed by *image*, including *known* ones."""
    devices = dict.fromkeys(known + loops_backed_by(image))
    errors = []
    for dev in devices:
        proc = subprocess.run(["losetup", "--detach", dev], check=False, capture_output=True,
                              text=True, timeout=_CMD_TIMEOUT)
        if proc.returncode != 0 and dev in loops_backed_by(image):
            errors.append(f"{dev}: {(proc.stderr or proc.stdout).strip()}")
    if errors:
        raise DeviceError(f"cannot detach loop devices of {image}: {'; '.join(errors)}")


def _remove_empty_dir(path: Path) -> None:
    with contextlib.suppress(FileNotFoundError):
        os.rmdir(path)


@contextlib.contextmanager
def ext4_image(workdir: Path, size_mb: int = 256, encrypt: bool = True) -> Iterator[Path]:
    """Mount a fresh sparse ext4 image (fscrypt-capable unless *encrypt* is False)
    on ``workdir/mnt`` and yield that path; everything is undone on exit.

    The image is ``workdir/ext4.img``; it must not exist yet.
    """
    workdir = Path(os.path.realpath(workdir))
    image = workdir / IMAGE_NAME
    mnt = workdir / MOUNT_NAME
    loops: list[str] = []
    with contextlib.ExitStack() as cleanup:
        fd = os.open(image, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
        cleanup.callback(image.unlink, missing_ok=True)
        try:
            os.ftruncate(fd, size_mb << 20)
        finally:
            os.close(fd)
        features = ["-O", "encrypt"] if encrypt else []
        _run("mkfs.ext4", "-q", "-F", *features, "-E", "nodiscard", "-b", "4096", str(image))

        if not mnt.exists():
            mnt.mkdir()
            cleanup.callback(_remove_empty_dir, mnt)
        # Registered before the steps they undo, so that a step interrupted after
        # it took effect (a loop device attached, a mount made) is undone too:
        # both look at the system, not at what the step reported.
        cleanup.callback(_detach_loops, image, loops)
        cleanup.callback(_unmount_tree, mnt)

        dev = _run("losetup", "--find", "--show", str(image)).stdout.strip()
        loops.append(dev)
        _run("mount", "-t", "ext4", dev, str(mnt))
        yield mnt


def make_vault(mount: Path, name: str = "vault", key: bytes | None = None) -> Path:
    """Make ``mount/name`` an fscrypt v2 directory under *key* (64 random bytes
    by default), added to the keyring of the filesystem mounted on *mount*.
    """
    vault = Path(mount) / name
    raw_key = os.urandom(fscrypt.RAW_KEY_SIZE) if key is None else key
    vault.mkdir()
    root_fd = os.open(mount, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        identifier = fscrypt.add_key(root_fd, raw_key)
    finally:
        os.close(root_fd)
    dir_fd = os.open(vault, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        fscrypt.set_policy(dir_fd, identifier)
    finally:
        os.close(dir_fd)
    return vault


@contextlib.contextmanager
def device_root(workdir: Path, size_mb: int = 256, encrypted_vault: bool = True) -> Iterator[Path]:
    """A device-like ``/persist`` on a fresh ext4 image: ``vault/`` (fscrypt-encrypted
    unless *encrypted_vault* is False) and plain ``clear/`` and ``novault/``. Yields the root.

    The filesystem supports encryption either way, so only the vault differs.
    """
    with ext4_image(workdir, size_mb) as root:
        if encrypted_vault:
            make_vault(root, "vault")
        else:
            (root / "vault").mkdir()
        (root / "clear").mkdir()
        (root / "novault").mkdir()
        yield root
