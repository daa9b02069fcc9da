"""Which processes hold something under a directory, as ``fuser -m`` would say,
and which mounts sit inside it.

Trees that no view covers (the legacy ``containerd`` store) may be moved only
while nobody uses them: a containerd still rooted there would lose what it
writes. "Uses" means an open file descriptor, a current or root directory, a
mapped file or the executable at or below the directory, read from
``/proc/<pid>``. Paths are compared as the processes see them, so a process
in another mount namespace that reaches the tree under another path is not
seen; that is a limit of this check, which the caller documents.

A mount point at or below the directory stops a move too: EVE's ZFS installs
mount a dataset at ``containerd/io.containerd.snapshotter.v1.zfs``; a copy
would take the dataset's files out of it, and the dataset would be left
mounted at a name nothing uses. Mounts are read from this process's
``/proc/self/mountinfo`` (:func:`compatfs.mounts.mount_table`).
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from .mounts import MountEntry, mount_table


@dataclass(frozen=True)
class Holder:
    pid: int
    command: str
    what: str        # "fd 7", "cwd", "root", "exe" or "mapped"

    def __str__(self) -> str:
        return f"pid {self.pid} ({self.command}, {self.what})"


def _below(path: str, top: str) -> bool:
    return path == top or path.startswith(top + "/")


def _command(pid: str) -> str:
    try:
        with open(f"/proc/{pid}/comm", encoding="utf-8", errors="replace") as f:
            return f.read().strip()
    except OSError:
        return "?"


def holders(top: str, *, limit: int = 5, ignore: int | None = None) -> list[Holder]:
    """Up to *limit* processes (other than *ignore*, default this one) holding
    anything at or below the directory *top*."""
    top = os.path.realpath(top)
    me = os.getpid() if ignore is None else ignore
    found: list[Holder] = []
    try:
        pids = [p for p in os.listdir("/proc") if p.isdigit() and int(p) != me]
    except OSError:
        return found
    for pid in pids:
        hit = _held_by(pid, top)
        if hit is not None:
            found.append(Holder(int(pid), _command(pid), hit))
            if len(found) >= limit:
                break
    return found


def _held_by(pid: str, top: str) -> str | None:
    base = f"/proc/{pid}"
    for link in ("cwd", "root", "exe"):
        try:
            if _below(os.readlink(f"{base}/{link}"), top):
                return link
        except OSError:
            continue           # gone, a kernel thread, or not ours to read
    try:
        fds = os.listdir(f"{base}/fd")
    except OSError:
        fds = []
    for fd in fds:
        try:
            if _below(os.readlink(f"{base}/fd/{fd}"), top):
                return f"fd {fd}"
        except OSError:
            continue
    try:
        with open(f"{base}/maps", encoding="utf-8", errors="surrogateescape") as f:
            for line in f:
                parts = line.split(None, 5)
                if len(parts) == 6 and _below(parts[5].rstrip("\n").removesuffix(" (deleted)"),
                                              top):
                    return "mapped"
    except OSError:
        pass
    return None


def mounts_inside(top: str) -> list[MountEntry]:
    """The mounts at or below the directory *top*, in mount order."""
    top = os.path.realpath(top)
    return [m for m in mount_table() if _below(m.mount_point, top)]


def busy(top: str) -> str | None:
    """Why the tree *top* cannot be moved now (a mount inside it, or processes
    holding it), or None when nothing stops it. Checked just before a move."""
    inside = mounts_inside(top)
    if inside:
        return ("a mount point at or inside it: " + ", ".join(f"{m.mount_point} ({m.fstype})"
                                                     for m in inside[:5])
                + "; it moves once nothing is mounted inside")
    held = holders(top)
    if held:
        return ("in use by " + ", ".join(map(str, held))
                + "; it moves once nothing holds it (stop containerd)")
    return None
