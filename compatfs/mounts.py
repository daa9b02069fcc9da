"""System mount plumbing: the mount table, bind mounts, unmounting, run dirs.

Thin wrappers over ``mount(8)``, ``umount(8)`` and ``fusermount3(1)`` so the
kernel's own tools do the privileged work, plus :class:`RunDir`, where a
daemon keeps its pid, its private FUSE mountpoint and its log.

One thing the tools cannot do yet (util-linux 2.38): replace a mount without
uncovering what is under it. :func:`replace_dead` does it with the kernel's
new mount API (``open_tree`` + ``move_mount(MOVE_MOUNT_BENEATH)``, Linux 6.5):
the new bind goes *beneath* the dead view, then the dead view is detached,
so the directory underneath is never visible in between.
"""

from __future__ import annotations

import ctypes
import errno
import hashlib
import json
import os
import subprocess
import time
from dataclasses import dataclass

FSTYPE = "fuse.compatfs"

# The new mount API; these syscall numbers are the same on every architecture.
_SYS_OPEN_TREE = 428
_SYS_MOVE_MOUNT = 429
_OPEN_TREE_CLONE = 1
_OPEN_TREE_CLOEXEC = os.O_CLOEXEC
_MOVE_MOUNT_F_EMPTY_PATH = 0x04
_MOVE_MOUNT_BENEATH = 0x200
_AT_FDCWD = -100
_AT_EMPTY_PATH = 0x1000
_MNT_DETACH = 2
_libc = ctypes.CDLL(None, use_errno=True)
_libc.syscall.restype = ctypes.c_long
_libc.umount2.argtypes = [ctypes.c_char_p, ctypes.c_int]
#: What an older kernel answers to MOVE_MOUNT_BENEATH (or to the new API at all).
BENEATH_UNSUPPORTED = frozenset({errno.EINVAL, errno.ENOSYS})
DEFAULT_RUN_DIR = "/run/compatfs"


@dataclass(frozen=True)
class MountEntry:
    mount_point: str
    fstype: str
    source: str
    mount_id: int = 0
    parent_id: int = 0


def _unescape(field: str) -> str:
    """mountinfo escapes space, tab, newline and backslash as octal."""
    out, i = [], 0
    while i < len(field):
        if field[i] == "\\" and field[i + 1:i + 4].isdigit():
            out.append(chr(int(field[i + 1:i + 4], 8)))
            i += 4
        else:
            out.append(field[i])
            i += 1
    return "".join(out)


def mount_table() -> list[MountEntry]:
    """The calling process's mounts, in mount order."""
    entries = []
    with open("/proc/self/mountinfo", encoding="utf-8", errors="surrogateescape") as f:
        for line in f:
            fields = line.split()
            sep = fields.index("-")
            entries.append(MountEntry(_unescape(fields[4]), fields[sep + 1], fields[sep + 2],
                                      int(fields[0]), int(fields[1])))
    return entries


def mounted_at(path: str) -> MountEntry | None:
    """The topmost mount exactly at *path*, if any: the one no other mount there
    sits on (a mount placed beneath another is listed after it)."""
    path = os.path.abspath(path)
    here = [entry for entry in mount_table() if entry.mount_point == path]
    below = {entry.parent_id for entry in here}
    top = [entry for entry in here if entry.mount_id not in below]
    return top[-1] if top else (here[-1] if here else None)


def is_dead(path: str) -> bool:
    """*path* is a FUSE mount whose daemon is gone (opening it gives ENOTCONN)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    except OSError as exc:
        return exc.errno == errno.ENOTCONN
    os.close(fd)
    return False


def _check(result: int, what: str, path: str) -> int:
    if result < 0:
        err = ctypes.get_errno()
        raise OSError(err, f"{what}: {os.strerror(err)}", path)
    return result


def clone_without_submounts(dir_fd: int) -> int:
    """An fd on a detached, non-recursive clone of the mount *dir_fd* is on, rooted
    at *dir_fd*'s directory (``open_tree(OPEN_TREE_CLONE)``).

    The clone carries no submounts, so a path opened below it reaches the
    directories as they are under whatever is mounted on them (a dead view).
    It is detached and goes away with the last fd opened through it. A rename
    between it and the original mount is ``EXDEV`` (two mounts).
    """
    tree = _check(_libc.syscall(_SYS_OPEN_TREE, ctypes.c_int(dir_fd), b"",
                                ctypes.c_uint(_OPEN_TREE_CLONE | _OPEN_TREE_CLOEXEC
                                              | _AT_EMPTY_PATH)),
                  "open_tree", f"/proc/self/fd/{dir_fd}")
    try:   # open_tree gives an O_PATH fd; ioctls and listing need a real one
        return os.open(".", os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC, dir_fd=tree)
    finally:
        os.close(tree)


def replace_dead(source: str, target: str) -> None:
    """Bind *source* in place of the dead mount at *target*, never uncovering the
    directory under it: bind beneath the dead mount, then detach the dead one.

    Raises ``OSError`` with an errno in :data:`BENEATH_UNSUPPORTED` when the
    kernel cannot mount beneath (before Linux 6.5); nothing has changed then.
    """
    fd = _check(_libc.syscall(_SYS_OPEN_TREE, ctypes.c_int(_AT_FDCWD), os.fsencode(source),
                              ctypes.c_uint(_OPEN_TREE_CLONE | _OPEN_TREE_CLOEXEC)),
                "open_tree", source)
    try:
        _check(_libc.syscall(_SYS_MOVE_MOUNT, ctypes.c_int(fd), b"", ctypes.c_int(_AT_FDCWD),
                             os.fsencode(target),
                             ctypes.c_uint(_MOVE_MOUNT_F_EMPTY_PATH | _MOVE_MOUNT_BENEATH)),
               "move_mount beneath", target)
    finally:
        os.close(fd)
    # The path resolves to the topmost mount: the dead one. Detached, the new
    # bind beneath it is what the path shows.
    _check(_libc.umount2(os.fsencode(target), _MNT_DETACH), "umount2", target)


_UMOUNT_NOFOLLOW = 8


def detach(path: str) -> None:
    """Detach the mount at *path* at once (``umount2(MNT_DETACH)``), the last resort
    when nothing answers its FUSE requests any more: unlike ``umount(8)``, nothing
    here stats *path* in userspace (which would wait for an answer for ever), and a
    symbolic link at *path* is not followed."""
    _check(_libc.umount2(os.fsencode(path), _MNT_DETACH | _UMOUNT_NOFOLLOW), "umount2", path)


def is_compatfs(path: str) -> bool:
    entry = mounted_at(path)
    return entry is not None and entry.fstype == FSTYPE


def _run(argv: list[str]) -> None:
    proc = subprocess.run(argv, capture_output=True, text=True)
    if proc.returncode != 0:
        msg = (proc.stderr or proc.stdout).strip().splitlines()
        raise OSError(f"{' '.join(argv)}: {msg[-1] if msg else f'exit {proc.returncode}'}")


def bind(source: str, target: str) -> None:
    _run(["mount", "--bind", source, target])


def unmount(path: str, lazy: bool = False, attempts: int = 5) -> None:
    """Unmount *path*; retries a busy mount, then detaches it lazily if *lazy*."""
    for i in range(attempts):
        try:
            _run(["umount", path])
            return
        except OSError:
            if mounted_at(path) is None:
                return
            if i + 1 < attempts:
                time.sleep(0.1 * (i + 1))
    if lazy:
        _run(["umount", "-l", path])
    else:
        raise OSError(f"{path} is busy; not unmounted")


def fuse_unmount(path: str, lazy: bool = False) -> None:
    _run(["fusermount3", "-u", *(["-z"] if lazy else []), path])


class RunDir:
    """Where the daemon of one root keeps its runtime files."""

    def __init__(self, run_root: str, root: str) -> None:
        self.root = os.path.abspath(root)
        key = hashlib.sha256(os.fsencode(self.root)).hexdigest()[:16]
        self.dir = os.path.join(run_root, key)
        self.pid_file = os.path.join(self.dir, "pid")
        self.info_file = os.path.join(self.dir, "info.json")
        self.mountpoint = os.path.join(self.dir, "mnt")
        self.log_file = os.path.join(self.dir, "daemon.log")
        self.metrics_file = os.path.join(self.dir, "metrics.prom")

    def make(self) -> None:
        os.makedirs(self.mountpoint, mode=0o700, exist_ok=True)

    def live_pid(self) -> int | None:
        """The pid of a running daemon for this root, or None."""
        try:
            with open(self.pid_file) as f:
                pid = int(f.read().strip())
        except (OSError, ValueError):
            return None
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                cmdline = f.read()
        except OSError:
            return None
        return pid if b"compatfs" in cmdline else None

    @staticmethod
    def _write(path: str, text: str) -> None:
        tmp = path + ".tmp"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o644)
        with os.fdopen(fd, "w") as f:
            f.write(text)
        os.replace(tmp, path)

    def write_info(self, info: dict) -> None:
        self._write(self.info_file, json.dumps(info))
        self._write(self.pid_file, f"{os.getpid()}\n")

    def info(self) -> dict | None:
        try:
            with open(self.info_file) as f:
                return json.load(f)
        except (OSError, ValueError):
            return None

    def clear(self) -> None:
        for p in (self.pid_file, self.info_file, self.metrics_file):
            try:
                os.unlink(p)
            except FileNotFoundError:
                pass
