"""The device images of :mod:`compatfs.testing.devicefs`, under the names tests use."""

from compatfs.testing.devicefs import (  # noqa: F401
    IMAGE_NAME,
    MOUNT_NAME,
    DeviceError,
    device_root,
    ext4_image,
    loops_backed_by,
    make_vault,
    mounts_under,
)
