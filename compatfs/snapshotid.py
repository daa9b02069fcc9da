"""``snapshotid.txt``: the file in a container volume that names its containerd snapshot.

Old EVE (5.6) makes a container volume's writable snapshot under the key
``<sha>-<app>[#<purge>]``, the base name of its directory in
``runx/pods/prepared``; new EVE finds a volume at ``<vol>#<gen>.container``
and reads the snapshot key from ``snapshotid.txt`` inside it, falling back to
that directory's own base name (docs/eve.md, section 2 and rule E5). So in
layout ``eve`` every container volume compatfs puts at its new-layout name
carries the file: a legacy tree the migrator moves, and a new one an old agent
makes through the views (``mkdir`` of a name that places, or a parked one
reaching its final name). Rollback takes it out again, and so does the views'
``rmdir`` when it is all that is left of a volume the agent emptied (the agent
never made it, so it would not remove it).

Below the migrator and the views, which both call it: it knows files, not
records.
"""

from __future__ import annotations

import errno
import os
import stat

from .enums import Kind
from .rules import Rules
from .stores import Store

#: EVE's name for the file (``snapshotIDFile`` in its containerd package).
SNAPSHOT_ID_FILE = "snapshotid.txt"


def wanted(rules: Rules, kind: str) -> bool:
    """An object of *kind* at its new-layout name carries ``snapshotid.txt`` under *rules*."""
    return kind == Kind.OCI_VOLUME and rules.snapshot_id


def legacy_name(vpath: str) -> str:
    """What the file holds for the view path *vpath*: its base name, ``<sha>-<app>[#<purge>]``."""
    return vpath.rpartition("/")[2]


def write(store: Store, tree: str, name: str) -> None:
    """``<tree>/snapshotid.txt`` := *name*, byte-exact, no newline, mode 0644, durable
    (file and directory synced). Raises ``OSError`` (``EINVAL`` when something that is
    not a regular file has the name; ``ELOOP`` for a symbolic link)."""
    path = f"{tree}/{SNAPSHOT_ID_FILE}"
    try:
        if not stat.S_ISREG(store.lstat(path).st_mode):   # never open a FIFO or a device
            raise OSError(errno.EINVAL, f"{SNAPSHOT_ID_FILE} in it is not a regular file")
    except FileNotFoundError:
        pass
    # truncated only once it is known to be a regular file (the check above can race
    # with a rename in the tree; the fstat below cannot)
    fd = store.open(path, os.O_WRONLY | os.O_CREAT | os.O_NONBLOCK | os.O_NOCTTY, 0o644)
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise OSError(errno.EINVAL, f"{SNAPSHOT_ID_FILE} in it is not a regular file")
        os.ftruncate(fd, 0)
        os.fchmod(fd, 0o644)
        data = memoryview(os.fsencode(name))
        done = 0
        while done < len(data):
            done += os.write(fd, data[done:])
        os.fsync(fd)
    finally:
        os.close(fd)
    _sync_dir(store, tree)


def drop(store: Store, tree: str, name: str) -> bool:
    """Remove ``<tree>/snapshotid.txt`` if it is one compatfs wrote (a regular file
    holding exactly *name*); True if it was removed."""
    path = f"{tree}/{SNAPSHOT_ID_FILE}"
    want = os.fsencode(name)
    try:
        fd = store.open(path, os.O_RDONLY | os.O_NONBLOCK)
    except (FileNotFoundError, NotADirectoryError):
        return False
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode) or st.st_size != len(want) \
                or os.pread(fd, len(want) + 1, 0) != want:
            return False
    finally:
        os.close(fd)
    store.unlink(path)
    _sync_dir(store, tree)
    return True


def _sync_dir(store: Store, tree: str) -> None:
    dfd = store.open_dir(tree)
    try:
        os.fsync(dfd)
    finally:
        os.close(dfd)
