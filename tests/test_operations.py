"""The FUSE handlers without a kernel: the errno boundary, lookups, readdir."""

from __future__ import annotations

import errno
import logging
import os
from collections.abc import Iterator
from pathlib import Path

import pyfuse3
import pytest

from compatfs.backing import Backing
from compatfs.enums import Stage, StoreKey, ViewName
from compatfs.index import Index
from compatfs.layout import Layout
from compatfs.operations import Operations
from compatfs.resolver import Resolver
from compatfs.view import View


class Ctx:
    """What the kernel tells a handler about the caller."""

    uid = os.geteuid()
    gid = os.getegid()
    pid = os.getpid()
    umask = 0o022


def observe_operations(tmp_path: Path) -> Iterator[Operations]:
    """Operations of stage observe over img/ (holding a.txt) and downloads/ in *tmp_path*."""
    layout = Layout(str(tmp_path))
    views = (ViewName.IMG, ViewName.DOWNLOADS)
    backing = Backing.open(layout, views, create_new=False, require_encrypted=False)
    (tmp_path / "img" / "a.txt").write_bytes(b"hello")
    view = View(layout, backing, Index(None), Resolver(layout), Stage.OBSERVE, views)
    o = Operations(view)
    yield o
    o.close_all()
    backing.close()


@pytest.fixture
def ops(tmp_path: Path) -> Iterator[Operations]:
    yield from observe_operations(tmp_path)


async def lookup_img(ops: Operations) -> int:
    return (await ops.lookup(pyfuse3.ROOT_INODE, b"img", Ctx())).st_ino


async def test_backing_errno_is_kept(ops):
    img = await lookup_img(ops)
    with pytest.raises(pyfuse3.FUSEError) as err:
        await ops.lookup(img, b"missing", Ctx())
    assert err.value.errno == errno.ENOENT
    with pytest.raises(pyfuse3.FUSEError) as err:
        await ops.mkdir(img, b"a.txt", 0o755, Ctx())
    assert err.value.errno == errno.EEXIST
    assert ops.faults == 0


async def test_unexpected_error_is_eio_logged_and_the_mount_keeps_serving(ops, monkeypatch, caplog):
    img = await lookup_img(ops)

    def broken(vpath):
        raise RuntimeError("injected fault")

    with monkeypatch.context() as m:
        m.setattr(ops.view, "lstat", broken)
        with caplog.at_level(logging.ERROR, logger="compatfs.operations"):
            with pytest.raises(pyfuse3.FUSEError) as err:
                await ops.lookup(img, b"a.txt", Ctx())
    assert err.value.errno == errno.EIO
    assert ops.faults == 1
    assert "injected fault" in caplog.text and "Traceback" in caplog.text
    attrs = await ops.lookup(img, b"a.txt", Ctx())  # still serving
    assert attrs.st_size == 5


async def test_only_fuse_error_leaves_any_handler(ops, monkeypatch):
    img = await lookup_img(ops)
    monkeypatch.setattr(ops.view, "locate", lambda *a: (_ for _ in ()).throw(ValueError("x")))
    monkeypatch.setattr(ops.view, "lstat", lambda *a: (_ for _ in ()).throw(ValueError("x")))
    monkeypatch.setattr(ops.view, "listdir", lambda *a: (_ for _ in ()).throw(ValueError("x")))
    calls = [
        ops.getattr(img, Ctx()),
        ops.open(img, os.O_RDONLY, Ctx()),
        ops.opendir(img, Ctx()),
        ops.readlink(img, Ctx()),
        ops.unlink(img, b"a.txt", Ctx()),
        ops.rename(img, b"a.txt", img, b"b.txt", 0, Ctx()),
    ]
    for call in calls:
        with pytest.raises(pyfuse3.FUSEError) as err:
            await call
        assert err.value.errno in (errno.EIO, errno.ENOENT)
    with pytest.raises(pyfuse3.FUSEError) as err:       # a handle never opened
        await ops.read(12345, 0, 10)
    assert err.value.errno == errno.EBADF


async def test_root_lists_only_the_views_and_refuses_changes(ops):
    with pytest.raises(pyfuse3.FUSEError) as err:
        await ops.lookup(pyfuse3.ROOT_INODE, b"etc", Ctx())
    assert err.value.errno == errno.ENOENT
    with pytest.raises(pyfuse3.FUSEError) as err:
        await ops.mkdir(pyfuse3.ROOT_INODE, b"x", 0o755, Ctx())
    assert err.value.errno == errno.EPERM


async def test_lookup_counts_follow_forget(ops):
    img = await lookup_img(ops)
    a1 = await ops.lookup(img, b"a.txt", Ctx())
    a2 = await ops.lookup(img, b"a.txt", Ctx())
    assert a1.st_ino == a2.st_ino
    assert ops.inodes.references(a1.st_ino) == 2
    await ops.forget([(a1.st_ino, 1)])
    assert ops.inodes.known(a1.st_ino)
    await ops.forget([(a1.st_ino, 1)])
    assert not ops.inodes.known(a1.st_ino)
    a3 = await ops.lookup(img, b"a.txt", Ctx())
    assert ops.inodes.references(a3.st_ino) == 1


async def test_readdir_entries_hold_references_only_when_sent(ops):
    img = await lookup_img(ops)
    for i in range(50):
        os.close(ops.view.backing.get(StoreKey.IMG).open(f"f{i:02}", os.O_CREAT | os.O_WRONLY))
    fh = await ops.opendir(img, Ctx())
    sent = []

    def reply(token, name, attrs, next_id):
        if len(sent) == 10:
            return False
        sent.append((name, attrs.st_ino))
        return True

    import compatfs.operations as mod
    real = mod.pyfuse3.readdir_reply
    mod.pyfuse3.readdir_reply = reply
    try:
        await ops.readdir(fh, 0, None)
    finally:
        mod.pyfuse3.readdir_reply = real
    assert len(sent) == 10
    assert all(ops.inodes.references(ino) == 1 for _, ino in sent)
    assert len(ops.inodes) == 2 + 10  # root, img and the ten sent; the eleventh was dropped


async def test_create_write_read_release(ops):
    img = await lookup_img(ops)
    fi, attrs = await ops.create(img, b"new.bin", 0o640, os.O_RDWR, Ctx())
    assert await ops.write(fi.fh, 0, b"abc") == 3
    assert await ops.read(fi.fh, 0, 10) == b"abc"
    await ops.release(fi.fh)
    assert (ops.view.backing.get(StoreKey.IMG).lstat("new.bin").st_mode & 0o777) == 0o640 & ~0o022
    assert not ops.handles


def collect_readdir(monkeypatch) -> list[bytes]:
    """The names the handlers hand the kernel through ``readdir_reply``."""
    import compatfs.operations as mod
    sent: list[bytes] = []

    def reply(token, name, attrs, next_id):
        sent.append(name)
        return True

    monkeypatch.setattr(mod.pyfuse3, "readdir_reply", reply)
    return sent


async def test_a_directory_removed_between_opendir_and_readdir_lists_nothing(ops, tmp_path,
                                                                             monkeypatch):
    """As a local file system does: a directory removed while open lists no names
    (no error); readdir of a listing larger than one buffer runs after opendir."""
    d = tmp_path / "img" / "d"
    d.mkdir()
    for i in range(5):
        (d / f"f{i}").write_bytes(b"x")
    img = await lookup_img(ops)
    dino = (await ops.lookup(img, b"d", Ctx())).st_ino
    fh = await ops.opendir(dino, Ctx())
    for i in range(5):
        (d / f"f{i}").unlink()
    d.rmdir()
    sent = collect_readdir(monkeypatch)
    await ops.readdir(fh, 0, None)
    assert sent == []
    await ops.releasedir(fh)
