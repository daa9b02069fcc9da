"""System mount plumbing: the mount table, bind mounts, unmounting, run dirs.

Thin wrappers over ``mount(8)``, ``umount(8)`` and ``fusermount3(1)`` so the
kernel's own tools do the privileged work, plus :class:`RunDir`, where a
daemon keeps its pid, its private FUSE mountpoint and its log.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import time
from dataclasses import dataclass

FSTYPE = "fuse.compatfs"
DEFAULT_RUN_DIR = "/run/compatfs"


@dataclass(frozen=True)
class MountEntry:
    mount_point: str
    fstype: str
    source: str


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
            entries.append(MountEntry(_unescape(fields[4]), fields[sep + 1], fields[sep + 2]))
    return entries


def mounted_at(path: str) -> MountEntry | None:
    """The topmost mount exactly at *path*, if any."""
    path = os.path.abspath(path)
    found = None
    for entry in mount_table():
        if entry.mount_point == path:
            found = entry
    return found


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
