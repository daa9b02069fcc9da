"""The kernel's fscrypt interface: ask whether a directory is encrypted, and
(for tests, the demo and device bring-up) add a key and set a v2 policy.

Only ``ioctl(2)`` on an open directory; nothing here spells a path.
"""

from __future__ import annotations

import errno
import fcntl
import os
import struct


def _ioc(direction: int, nr: int, size: int) -> int:
    return (direction << 30) | (size << 16) | (ord("f") << 8) | nr


_READ, _WRITE = 2, 1
#: The ioctl numbers carry the size of the v1 policy (12) for historical reasons.
FS_IOC_SET_ENCRYPTION_POLICY = _ioc(_READ, 19, 12)
FS_IOC_GET_ENCRYPTION_POLICY_EX = _ioc(_READ | _WRITE, 22, 9)
FS_IOC_ADD_ENCRYPTION_KEY = _ioc(_READ | _WRITE, 23, 80)
FS_IOC_GET_ENCRYPTION_KEY_STATUS = _ioc(_READ | _WRITE, 26, 128)
FS_IOC_REMOVE_ENCRYPTION_KEY = _ioc(_READ | _WRITE, 24, 64)

KEY_SPEC_TYPE_DESCRIPTOR = 1
KEY_STATUS_PRESENT = 2

KEY_SPEC_TYPE_IDENTIFIER = 2
POLICY_V2 = 2
MODE_AES_256_XTS = 1
MODE_AES_256_CTS = 4
POLICY_FLAGS_PAD_16 = 2
RAW_KEY_SIZE = 64
_POLICY_V2_SIZE = 24
_ADD_KEY_HEADER = 80


class FscryptError(OSError):
    """An fscrypt request failed; errno as the kernel gave it."""


def policy_of(dir_fd: int) -> bytes | None:
    """The encryption policy of the open directory *dir_fd*, or None if it has none.

    Raises :class:`FscryptError` when the filesystem cannot tell (no
    encryption support, not a directory).
    """
    buf = bytearray(struct.pack("=Q", _POLICY_V2_SIZE) + bytes(_POLICY_V2_SIZE))
    try:
        fcntl.ioctl(dir_fd, FS_IOC_GET_ENCRYPTION_POLICY_EX, buf, True)
    except OSError as exc:
        if exc.errno == errno.ENODATA:
            return None
        raise FscryptError(exc.errno, f"cannot read encryption policy: {exc.strerror}") from None
    size = struct.unpack_from("=Q", buf)[0]
    return bytes(buf[8:8 + size])


def is_encrypted(dir_fd: int) -> bool:
    """True when the kernel reports an fscrypt policy on *dir_fd*.

    A filesystem without encryption support counts as not encrypted.
    """
    try:
        return policy_of(dir_fd) is not None
    except FscryptError as exc:
        if exc.errno in (errno.ENOTTY, errno.EOPNOTSUPP, errno.EINVAL):
            return False
        raise


def path_is_encrypted(path: str) -> bool:
    """:func:`is_encrypted` for a directory path (not for the FUSE hot path)."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        return is_encrypted(fd)
    finally:
        os.close(fd)


def key_present(dir_fd: int) -> bool | None:
    """Whether the key of the encrypted directory *dir_fd* is in the filesystem's
    keyring (the vault is unlocked); None when the kernel cannot tell (a v1
    policy whose key was added to a process keyring, the old way)."""
    policy = policy_of(dir_fd)
    if policy is None:
        return True  # not encrypted: nothing to unlock
    if policy[0] == POLICY_V2:
        spec = struct.pack("=II32s", KEY_SPEC_TYPE_IDENTIFIER, 0, policy[8:24])
    else:
        spec = struct.pack("=II32s", KEY_SPEC_TYPE_DESCRIPTOR, 0, policy[4:12])
    buf = bytearray(spec + bytes(128 - len(spec)))
    try:
        fcntl.ioctl(dir_fd, FS_IOC_GET_ENCRYPTION_KEY_STATUS, buf, True)
    except OSError:
        return None
    status = struct.unpack_from("=I", buf, 64)[0]
    if status == KEY_STATUS_PRESENT:
        return True
    return False if policy[0] == POLICY_V2 else None


def add_key(mount_fd: int, raw_key: bytes) -> bytes:
    """Add a raw v2 key to the filesystem of *mount_fd*; returns its 16-byte identifier."""
    if len(raw_key) != RAW_KEY_SIZE:
        raise ValueError(f"raw key must be {RAW_KEY_SIZE} bytes")
    header = struct.pack("=II32sII32x", KEY_SPEC_TYPE_IDENTIFIER, 0, bytes(32),
                         len(raw_key), 0)
    assert len(header) == _ADD_KEY_HEADER
    buf = bytearray(header + raw_key)
    try:
        fcntl.ioctl(mount_fd, FS_IOC_ADD_ENCRYPTION_KEY, buf, True)
    except OSError as exc:
        raise FscryptError(exc.errno, f"cannot add encryption key: {exc.strerror}") from None
    return bytes(buf[8:24])


def remove_key(mount_fd: int, identifier: bytes) -> None:
    """Remove a v2 key from the filesystem of *mount_fd*: its directories lock
    (tests use this to stand for a vault that is not unlocked yet)."""
    buf = bytearray(struct.pack("=II32s", KEY_SPEC_TYPE_IDENTIFIER, 0, identifier) + bytes(24))
    try:
        fcntl.ioctl(mount_fd, FS_IOC_REMOVE_ENCRYPTION_KEY, buf, True)
    except OSError as exc:
        raise FscryptError(exc.errno, f"cannot remove encryption key: {exc.strerror}") from None


def set_policy(dir_fd: int, identifier: bytes) -> None:
    """Encrypt the empty directory *dir_fd* with a v2 AES-256 policy under *identifier*."""
    policy = struct.pack("=BBBB4x16s", POLICY_V2, MODE_AES_256_XTS, MODE_AES_256_CTS,
                         POLICY_FLAGS_PAD_16, identifier)
    assert len(policy) == _POLICY_V2_SIZE
    try:
        fcntl.ioctl(dir_fd, FS_IOC_SET_ENCRYPTION_POLICY, policy)
    except OSError as exc:
        raise FscryptError(exc.errno, f"cannot set encryption policy: {exc.strerror}") from None
