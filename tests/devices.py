"""The device images of :mod:`compatfs.testing.devicefs`, under the names tests use.

:func:`device_root` and :func:`ext4_image` skip the test, with the reason, where
the machine has no loop devices at all (a container started without them, as
``mountscripts/compatfs-ci-container`` does unless ``--privileged``): the ext4 +
fscrypt images cannot exist there. Anywhere else a loop device that fails is a
failure, as before.
"""

from __future__ import annotations

import contextlib
import errno
import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from compatfs.testing import devicefs
from compatfs.testing.devicefs import (  # noqa: F401
    IMAGE_NAME,
    MOUNT_NAME,
    DeviceError,
    loops_backed_by,
    make_vault,
    mounts_under,
)

LOOP_CONTROL = "/dev/loop-control"


def no_loop_devices(control: str = LOOP_CONTROL) -> str | None:
    """Why this machine has no loop devices, or None when it has (or when it is not
    root: then the loop device fails as before, the test needs root)."""
    if os.geteuid() != 0:
        return None
    try:
        fd = os.open(control, os.O_RDWR | os.O_CLOEXEC)
    except FileNotFoundError:
        why = f"{control} does not exist"
    except OSError as exc:
        if exc.errno not in (errno.EPERM, errno.EACCES, errno.ENXIO, errno.ENODEV):
            raise
        why = f"{control} cannot be opened ({os.strerror(exc.errno)})"
    else:
        os.close(fd)
        return None
    hint = (" (compatfs-ci-container --privileged gives them)"
            if os.environ.get("COMPATFS_CI_CONTAINER") else "")
    return (f"no loop devices here: {why}; the ext4 + fscrypt device images need "
            f"them{hint}")


def skip_without_loop_devices() -> None:
    why = no_loop_devices()
    if why is not None:
        pytest.skip(why)


@contextlib.contextmanager
def ext4_image(workdir: Path, size_mb: int = 256, encrypt: bool = True) -> Iterator[Path]:
    """:func:`compatfs.testing.devicefs.ext4_image`, skipped without loop devices."""
    skip_without_loop_devices()
    with devicefs.ext4_image(workdir, size_mb, encrypt) as mnt:
        yield mnt


@contextlib.contextmanager
def device_root(workdir: Path, size_mb: int = 256, encrypted_vault: bool = True) -> Iterator[Path]:
    """:func:`compatfs.testing.devicefs.device_root`, skipped without loop devices."""
    skip_without_loop_devices()
    with devicefs.device_root(workdir, size_mb, encrypted_vault) as root:
        yield root


@contextlib.contextmanager
def device_under(tmp_path: Path, size_mb: int = 256) -> Iterator[Path]:
    """:func:`device_root` in ``tmp_path/dev``: the device a test's fixture yields."""
    work = tmp_path / "dev"
    work.mkdir()
    with device_root(work, size_mb=size_mb) as root:
        yield root
