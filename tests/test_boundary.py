"""The errno boundary: every handler is inside it, and each failure answers the errno
an agent expects (a bad handle EBADF, an unknown inode ENOENT, anything unexpected EIO,
a failing forget nothing at all); lookups of ``.`` and ``..`` hold references the
kernel's forget gives back; link(2) answers ENOENT and ENAMETOOLONG before EXDEV,
without a kernel and through a real mount."""

from __future__ import annotations

import errno
import inspect
import logging
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pyfuse3
import pytest

from compatfs.backing import Backing
from compatfs.boundary import errno_boundary, is_bounded
from compatfs.debugview import InspectionOperations
from compatfs.enums import Stage, StoreKey, ViewName
from compatfs.index import Index
from compatfs.layout import Layout
from compatfs.operations import Operations
from compatfs.resolver import Resolver
from compatfs.rules import rules_for
from compatfs.testing import devicegen
from compatfs.view import View

from .mounting import mounted
from .test_operations import Ctx, lookup_img, observe_operations

#: Every request handler pyfuse3 may call (its coroutine methods).
HANDLERS = sorted(name for name, fn in vars(pyfuse3.Operations).items()
                  if inspect.iscoroutinefunction(fn))


def unbounded_handlers(cls: type) -> list[str]:
    """The request handlers *cls* defines (not pyfuse3's ENOSYS defaults) outside the boundary."""
    return [name for name in HANDLERS
            if getattr(cls, name) is not getattr(pyfuse3.Operations, name)
            and not is_bounded(getattr(cls, name))]


@pytest.fixture
def ops(tmp_path: Path) -> Iterator[Operations]:
    yield from observe_operations(tmp_path)


# -- every handler is inside ------------------------------------------------------------

@pytest.mark.parametrize("cls", [Operations, InspectionOperations])
def test_every_handler_is_inside_the_boundary(cls):
    assert "forget" in HANDLERS and "lookup" in HANDLERS and "read" in HANDLERS
    assert unbounded_handlers(cls) == []
    assert not is_bounded(cls.init)   # not a request: pyfuse3 calls it once


def test_a_handler_added_outside_the_boundary_is_found():
    class Careless(Operations):
        async def access(self, inode: int, mode: int, ctx: pyfuse3.RequestContext) -> bool:
            return True

        @errno_boundary
        async def poll(self, *args: object) -> None:
            return None

    assert unbounded_handlers(Careless) == ["access"]


async def test_the_inspection_view_refuses_every_change_before_a_store(tmp_path):
    gen = observe_operations(tmp_path)
    live = next(gen)
    try:
        ops = InspectionOperations(live.view, dict)
        img = await lookup_img(ops)
        a = (await ops.lookup(img, b"a.txt", Ctx())).st_ino
        attr, fields = pyfuse3.EntryAttributes(), pyfuse3.SetattrFields()
        for call in (ops.mkdir(img, b"d", 0o755, Ctx()),
                     ops.create(img, b"n", 0o644, os.O_RDWR, Ctx()),
                     ops.mknod(img, b"p", 0o644, 0, Ctx()), ops.symlink(img, b"s", b"a.txt", Ctx()),
                     ops.unlink(img, b"a.txt", Ctx()), ops.rmdir(img, b"a.txt", Ctx()),
                     ops.rename(img, b"a.txt", img, b"b", 0, Ctx()), ops.link(a, img, b"b", Ctx()),
                     ops.setattr(a, attr, fields, None, Ctx()),
                     ops.setxattr(a, b"user.x", b"1", Ctx()), ops.removexattr(a, b"user.x", Ctx()),
                     ops.open(a, os.O_WRONLY, Ctx()), ops.open(a, os.O_RDONLY | os.O_TRUNC, Ctx())):
            assert await errno_of(call) == errno.EROFS
        fh = (await ops.open(a, os.O_RDONLY, Ctx())).fh
        assert await ops.read(fh, 0, 10) == b"hello"
        await ops.release(fh)
        assert sorted(os.listdir(tmp_path / "img")) == ["a.txt"] and ops.faults == 0
    finally:
        next(gen, None)


# -- bad handles, unknown inodes, faults -------------------------------------------------

async def errno_of(call) -> int:
    with pytest.raises(pyfuse3.FUSEError) as err:
        await call
    return err.value.errno


async def test_a_bad_file_or_directory_handle_answers_ebadf_logged_at_debug(ops, caplog):
    img = await lookup_img(ops)
    dh = await ops.opendir(img, Ctx())
    await ops.releasedir(dh)
    with caplog.at_level(logging.DEBUG, logger="compatfs.operations"):
        for call in (ops.read(777, 0, 10), ops.write(777, 0, b"x"), ops.fsync(777, False),
                     ops.release(777), ops.readdir(dh, 0, None), ops.fsyncdir(dh, False),
                     ops.setattr(img, pyfuse3.EntryAttributes(), pyfuse3.SetattrFields(), 777,
                                 Ctx()),
                     ops.releasedir(dh)):
            assert await errno_of(call) == errno.EBADF
    assert "no open handle 777" in caplog.text and f"no open handle {dh}" in caplog.text
    assert ops.faults == 0 and "Traceback" not in caplog.text


async def test_an_unknown_inode_answers_enoent(ops, caplog):
    await lookup_img(ops)
    unknown = 4242
    with caplog.at_level(logging.DEBUG, logger="compatfs.operations"):
        for call in (ops.getattr(unknown, Ctx()), ops.lookup(unknown, b"x", Ctx()),
                     ops.lookup(unknown, b"..", Ctx()), ops.open(unknown, os.O_RDONLY, Ctx()),
                     ops.opendir(unknown, Ctx()), ops.readlink(unknown, Ctx()),
                     ops.mkdir(unknown, b"d", 0o755, Ctx()),
                     ops.getxattr(unknown, b"user.x", Ctx())):
            assert await errno_of(call) == errno.ENOENT
    assert "inode 4242 is not known" in caplog.text
    assert ops.faults == 0 and "Traceback" not in caplog.text


async def test_an_unexpected_key_error_is_a_fault(ops, monkeypatch, caplog):
    img = await lookup_img(ops)

    def broken(vpath):
        raise KeyError("a bug, not a missing file")

    monkeypatch.setattr(ops.view, "lstat", broken)
    with caplog.at_level(logging.ERROR, logger="compatfs.operations"):
        assert await errno_of(ops.lookup(img, b"a.txt", Ctx())) == errno.EIO
    assert ops.faults == 1
    assert "a bug, not a missing file" in caplog.text and "Traceback" in caplog.text


async def test_forget_never_raises_a_fault_is_logged_and_counted(ops, monkeypatch, caplog):
    img = await lookup_img(ops)
    a = (await ops.lookup(img, b"a.txt", Ctx())).st_ino

    def broken(ino, count):
        raise RuntimeError("injected forget fault")

    with monkeypatch.context() as m:
        m.setattr(ops.inodes, "forget", broken)
        with caplog.at_level(logging.ERROR, logger="compatfs.operations"):
            assert await ops.forget([(a, 1)]) is None
    assert ops.faults == 1
    assert "injected forget fault" in caplog.text and "Traceback" in caplog.text
    await ops.forget([(a, 1)])                     # the next forget is served
    assert not ops.inodes.known(a)


# -- lookups of . and .. ---------------------------------------------------------------

async def test_dot_and_dotdot_lookups_take_references_forget_gives_back(ops):
    img = await lookup_img(ops)
    sub = (await ops.mkdir(img, b"sub", 0o755, Ctx())).st_ino
    assert ops.inodes.references(img) == 1 and ops.inodes.references(sub) == 1
    dot = await ops.lookup(sub, b".", Ctx())
    up = await ops.lookup(sub, b"..", Ctx())
    assert (dot.st_ino, up.st_ino) == (sub, img)
    assert ops.inodes.references(sub) == 2 and ops.inodes.references(img) == 2
    await ops.forget([(sub, 1), (img, 1)])
    assert ops.inodes.references(sub) == 1 and ops.inodes.references(img) == 1
    await ops.forget([(sub, 1)])
    assert not ops.inodes.known(sub)               # the last reference: forgotten
    assert ops.inodes.known(img)
    root = await ops.lookup(img, b"..", Ctx())     # the root is never forgotten
    assert root.st_ino == pyfuse3.ROOT_INODE and ops.inodes.references(img) == 1


# -- link(2) --------------------------------------------------------------------------

async def test_link_answers_enoent_and_enametoolong(ops):
    img = await lookup_img(ops)
    a = (await ops.lookup(img, b"a.txt", Ctx())).st_ino
    assert await errno_of(ops.link(a, img, b"n" * 256, Ctx())) == errno.ENAMETOOLONG
    deep = img
    for _ in range(21):                            # a directory 21 x 201 bytes deep
        deep = (await ops.mkdir(deep, b"d" * 200, 0o755, Ctx())).st_ino
    assert await errno_of(ops.link(a, deep, b"x", Ctx())) == errno.ENAMETOOLONG
    assert await errno_of(ops.link(4242, img, b"b", Ctx())) == errno.ENOENT
    await ops.unlink(img, b"a.txt", Ctx())
    assert await errno_of(ops.link(a, img, b"b", Ctx())) == errno.ENOENT
    assert ops.faults == 0


DOWNLOAD = "0b5d7f0e-4a53-4c3b-9a55-0f0b6b1a9c11"


@pytest.fixture
def placing_ops(tmp_path):
    """Operations in stage redirect of the design note, which places a download
    in progress (downloads/<obj>/pending/<uuid>/<name>) in the vault."""
    root = tmp_path / "persist"
    pending = root / "downloads" / "appImg.obj" / "pending" / DOWNLOAD
    pending.mkdir(parents=True)
    (root / "img").mkdir()
    (pending / "legacy.img").write_bytes(b"legacy")
    layout = Layout(str(root), rules=rules_for("design-note"))
    views = (ViewName.IMG, ViewName.DOWNLOADS)
    backing = Backing.open(layout, views, create_new=True, require_encrypted=False)
    o = Operations(View(layout, backing, Index(None), Resolver(layout), Stage.REDIRECT, views))
    yield o, pending
    o.close_all()
    backing.close()


async def test_link_checks_its_source_and_new_name_before_exdev(placing_ops):
    ops, _ = placing_ops
    ino = pyfuse3.ROOT_INODE
    for part in ("downloads", "appImg.obj", "pending", DOWNLOAD):
        ino = (await ops.lookup(ino, part.encode(), Ctx())).st_ino
    fi, placed = await ops.create(ino, b"placed.img", 0o644, os.O_RDWR, Ctx())
    await ops.release(fi.fh)
    store, rel, _ = ops.view.locate(f"downloads/appImg.obj/pending/{DOWNLOAD}/placed.img")
    assert store is ops.view.backing.get(StoreKey.DOWNLOADER)
    # a placed file is never hard-linked (EXDEV), but a long name is ENAMETOOLONG first
    assert await errno_of(ops.link(placed.st_ino, ino, b"b.img", Ctx())) == errno.EXDEV
    assert await errno_of(ops.link(placed.st_ino, ino, b"n" * 300, Ctx())) == errno.ENAMETOOLONG
    store.unlink(rel)                               # gone behind the view's back
    assert await errno_of(ops.link(placed.st_ino, ino, b"c.img", Ctx())) == errno.ENOENT
    assert ops.faults == 0


@pytest.mark.root
def test_link_errnos_through_a_mounted_view():
    base = Path(tempfile.mkdtemp(prefix="compatfs-link-", dir="/tmp"))
    try:
        root = base / "persist"
        root.mkdir()
        devicegen.make_demo(str(root))
        pending = root / "downloads" / "appImg.obj" / "pending" / DOWNLOAD
        pending.mkdir(parents=True)
        config = base / "c.yaml"
        config.write_text("layout: design-note\nrequire_encrypted_vault: false\n"
                          "vault_wait_s: 0\nmigration: {rescan_s: 3600}\n")
        with mounted(root, base / "run", stage=Stage.REDIRECT, config=config) as m:
            legacy = root / "img" / "a.txt"
            legacy.write_bytes(b"a")

            def link_errno(src: Path, dst: Path | str) -> int:
                with pytest.raises(OSError) as err:
                    os.link(src, dst)
                return err.value.errno

            assert link_errno(legacy, root / "img" / ("n" * 256)) == errno.ENAMETOOLONG
            assert link_errno(legacy, str(root / "img") + "/d" * 2100) == errno.ENAMETOOLONG
            assert link_errno(root / "img" / "missing", root / "img" / "b") == errno.ENOENT
            placed = pending / "placed.img"
            placed.write_bytes(b"placed in the vault")
            assert link_errno(placed, pending / "b.img") == errno.EXDEV
            os.stat(placed)                          # the kernel holds its entry now
            in_vault = [p for p in (root / "vault").rglob("placed.img")]
            assert len(in_vault) == 1
            in_vault[0].unlink()                     # gone behind the view's back
            assert link_errno(placed, pending / "c.img") == errno.ENOENT
            log = m.log_text()
        assert "unexpected error" not in log and "Traceback" not in log, log
    finally:
        shutil.rmtree(base, ignore_errors=True)
