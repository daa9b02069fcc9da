"""Shared fixtures: device-like legacy trees and running the CLI."""

from __future__ import annotations

import contextlib
import errno
import hashlib
import os
import random
import stat
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from compatfs.scan import TMP_DIR
from compatfs.testing import devicegen

REPO = Path(__file__).resolve().parent.parent


def run_cli(*args: str, check: bool = False, **kw) -> subprocess.CompletedProcess[str]:
    """Run ``python -m compatfs ARGS`` the way a user would; output captured as text."""
    env = dict(os.environ)
    env.pop("COMPATFS_DEBUG", None)
    proc = subprocess.run([sys.executable, "-m", "compatfs", *args], capture_output=True,
                          text=True, env=env, timeout=120, **kw)
    if check and proc.returncode != 0:
        raise AssertionError(f"compatfs {' '.join(args)} exited {proc.returncode}:\n"
                             f"{proc.stdout}\n{proc.stderr}")
    return proc


def tree_snapshot(root: Path) -> dict[str, tuple]:
    """Everything observable about a tree: type, mode, size, mtime, inode, content hash."""
    snap = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            p = os.path.join(dirpath, name)
            st = os.lstat(p)
            digest = None
            if os.path.isfile(p) and not os.path.islink(p):
                with open(p, "rb") as f:
                    digest = hashlib.file_digest(f, "sha256").hexdigest()
            snap[os.path.relpath(p, root)] = (st.st_mode, st.st_size, st.st_mtime_ns,
                                              st.st_ino, st.st_blocks, digest)
    return snap


#: Where old EVE looks, relative to the root.
LEGACY_DIRS = ("img", "downloads", "runx/pods/prepared", "containerd")


def legacy_snapshot(root: Path) -> dict[str, tuple]:
    """What old EVE sees: every path in the legacy directories with its mode, size
    and mtime (files and links) and its content (a file's sha256, a link's target)."""
    snap = {}
    for rel in LEGACY_DIRS:
        for dirpath, dirnames, filenames in os.walk(root / rel):
            for name in dirnames + filenames:
                p = Path(dirpath) / name
                st = os.lstat(p)
                if stat.S_ISDIR(st.st_mode):
                    snap[str(p.relative_to(root))] = (st.st_mode, 0, 0, None)
                    continue
                if stat.S_ISLNK(st.st_mode):
                    content = os.readlink(p)
                elif stat.S_ISREG(st.st_mode):
                    with open(p, "rb") as f:
                        content = hashlib.file_digest(f, "sha256").hexdigest()
                else:
                    content = None
                snap[str(p.relative_to(root))] = (st.st_mode, st.st_size, st.st_mtime_ns, content)
    return snap


def staged(root: Path, store: str, rel: str) -> Path:
    """Where compatfs stages the copy of *rel* into the new-layout store *store*
    (a location key) under the default layout paths: ``<own>/staging/<store>/``."""
    from compatfs.backing import own_location
    from compatfs.layout import Layout
    from compatfs.migration import tmp_leaf
    from compatfs.stores import STAGING_DIR
    return Path(Layout(str(root)).path(own_location(store))) / STAGING_DIR / store / tmp_leaf(rel)


def set_aside(root: Path, store: str) -> list[Path]:
    """What compatfs set aside from the new-layout store *store* (default paths)."""
    from compatfs.backing import own_location
    from compatfs.layout import Layout
    from compatfs.stores import ASIDE_DIR
    d = Path(Layout(str(root)).path(own_location(store))) / ASIDE_DIR / store
    return sorted(d.iterdir()) if d.is_dir() else []


def temporaries(root: Path) -> list[str]:
    """compatfs' temporaries left under *root*: whatever is inside a staging
    directory (``<own>/staging/<store>/``, e.g. ``vault/compatfs/staging/vault_volumes/``)
    or a store's ``.compatfs-tmp/`` (a legacy store's, or an older compatfs'); the
    empty directories themselves may stay."""
    dirs = [d for d in root.rglob(TMP_DIR) if d.is_dir()]
    dirs += [d for d in root.glob("*/compatfs/staging/*") if d.is_dir()]
    return sorted(str(p) for d in dirs for p in d.iterdir())


def layout_config(directory: Path, layout: str, release: str | None = None) -> Path:
    """A config file choosing the target *layout* (and EVE *release*), for the CLI
    and the daemon (``--config``); eve 17.3 is what no config gives."""
    path = directory / f"compatfs-{layout}{'-' + release if release else ''}.yaml"
    path.write_text(f"layout: {layout}\n" + (f'eve_release: "{release}"\n' if release else ""))
    return path


@pytest.fixture
def demo_root(tmp_path: Path) -> tuple[Path, list[devicegen.AppDef]]:
    """The demo device under tmp_path/persist, with its app definitions."""
    root = tmp_path / "persist"
    root.mkdir()
    apps = devicegen.make_demo(str(root))
    return root, apps


@pytest.fixture
def rng() -> random.Random:
    return random.Random(1234)


@contextlib.contextmanager
def tmpfs(mnt: Path, size: str) -> Iterator[Path]:
    """A tmpfs of *size* (``1m``, ``16m``) on *mnt*, unmounted afterwards: a disk
    that fills."""
    mnt.mkdir(exist_ok=True)
    subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size},mode=0755", "tmpfs", str(mnt)],
                   check=True)
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=False)


def fill(path: Path) -> Path:
    """Write zeros into *path*/filler until the filesystem is full; returns the file."""
    filler = path / "filler"
    with open(filler, "wb") as f:
        try:
            while True:
                f.write(b"\0" * 65536)
                f.flush()
        except OSError as exc:
            assert exc.errno == errno.ENOSPC
    return filler
