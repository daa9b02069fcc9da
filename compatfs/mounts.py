"""System mount plumbing: the mount table, bind mounts, replacing a dead view, unmounting.

Thin wrappers over ``mount(8)``, ``umount(8)`` and ``fusermount3(1)`` so the
kernel's own tools do the privileged work, plus the questions every command
asks of a view (is it compatfs, is it dead, does it answer) and
:func:`within`, which bounds a call through a mount whose daemon may be
stuck. Where a daemon keeps its runtime files is :mod:`compatfs.rundir`'s.

One thing the tools cannot do yet (util-linux 2.38): replace a mount without
uncovering what is under it. :func:`replace_dead` does it with the kernel's
new mount API (``open_tree`` + ``move_mount(MOVE_MOUNT_BENEATH)``, Linux 6.5):
the new bind goes *beneath* the dead view, then the dead view is detached,
so the directory underneath is never visible in between.
"""

from __future__ import annotations

import ctypes
import errno
import os
import subprocess
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeVar

T = TypeVar("T")

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


#: How long a command waits for a view to answer before it calls it stuck.
ANSWER_SECONDS = 5.0


def within(seconds: float, fn: Callable[[], T]) -> T:
    """``fn()``, run in a thread of its own; raises :class:`TimeoutError` if it has
    not returned within *seconds*. For calls that go through a FUSE mount whose
    daemon may be alive but stuck (stopped, or blocked): the kernel then waits
    for its answer without end. The thread is left waiting; it ends with the
    process, whose exit the kernel lets interrupt the request."""
    returned: list[T] = []
    raised: list[BaseException] = []

    def run() -> None:
        try:
            returned.append(fn())
        except BaseException as exc:  # noqa: BLE001 - handed to the caller
            raised.append(exc)

    thread = threading.Thread(target=run, daemon=True, name="compatfs-within")
    thread.start()
    thread.join(seconds)
    if raised:
        raise raised[0]
    if not returned:
        raise TimeoutError(f"no answer within {seconds:g} s")
    return returned[0]


def view_state(path: str, seconds: float = ANSWER_SECONDS) -> str:
    """The compatfs mount at *path*: ``serving``, ``dead`` (its daemon is gone:
    ENOTCONN) or ``not answering`` (its daemon is alive but answers nothing)."""
    try:
        return "dead" if within(seconds, lambda: is_dead(path)) else "serving"
    except TimeoutError:
        return "not answering"


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
    proc = subprocess.run(argv, check=False, capture_output=True, text=True)
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
