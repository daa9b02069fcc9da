"""Every namespace change through a view is all or nothing as the agent sees it.

When a step fails (a directory that cannot be made: ENOSPC, or EPERM under
``chattr +i``; an index that cannot be written), the old name still resolves
to the same bytes, the index record is as it was, no directory compatfs made
is left behind, and the agent gets the failure's own errno. First on the
namespace alone with faults injected at each step, then through real views
on a loop-mounted ext4 with an fscrypt vault (tmpfs has no ``chattr +i``).
"""

from __future__ import annotations

import errno
import os
import sqlite3
import subprocess
from contextlib import contextmanager
from pathlib import Path

import pytest

from compatfs.index import Index
from compatfs.stores import Store
from compatfs.testing import devicegen

from .conftest import layout_config
from .devices import ext4_image, make_vault
from .mounting import mounted
from .test_view import (  # noqa: F401
    DESIGN_NOTE_ONLY,
    OBJ,
    Device,
    device,
    layout_rules,
    mkdirs,
    read,
    views,
    write_new,
)


def tree(path: Path) -> set[str]:
    return {str(p.relative_to(path)) for p in path.rglob("*")} if path.exists() else set()


def fail_once(monkeypatch, cls, name: str, exc: BaseException, when=lambda *a: True):
    """Make ``cls.name`` raise *exc* once, on the first call *when* accepts."""
    real = getattr(cls, name)
    state = {"armed": True}

    def faulty(*args, **kw):
        if state["armed"] and when(*args):
            state["armed"] = False
            raise exc
        return real(*args, **kw)

    monkeypatch.setattr(cls, name, faulty)
    return state


DISK_FULL = sqlite3.OperationalError("database or disk is full")


def enospc() -> OSError:
    return OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


def snapshot(view, root: Path) -> tuple:
    return (dict((k, (r.store, r.rel, r.state, r.prev_store))
                 for k, r in view.index.records.items()),
            tree(root / "vault"), tree(root / "downloads"), tree(root / "img"))


# -- rename of a placed download, a fault at each step ----------------------------------

RENAME_FAULTS = {
    "mkdir": (Store, "mkdir", enospc()),
    "mkdir-eperm": (Store, "mkdir", OSError(errno.EPERM, os.strerror(errno.EPERM))),
    "index": (Index, "move", DISK_FULL),
    "rename": (Store, "rename", enospc()),
}


@DESIGN_NOTE_ONLY      # where downloads in progress are placed (eve keeps them legacy)
@pytest.mark.parametrize("fault", sorted(RENAME_FAULTS))
def test_a_rename_that_fails_changes_nothing(device, views, monkeypatch, fault):
    view = views()
    dl, iid = f"downloads/{OBJ}", device.image_id
    mkdirs(view, f"{dl}/pending/{iid}")
    mkdirs(view, f"{dl}/verifier/{iid}")
    write_new(view, f"{dl}/pending/{iid}/f", b"blob")
    before = snapshot(view, device.root)
    cls, name, exc = RENAME_FAULTS[fault]
    fail_once(monkeypatch, cls, name, exc)
    with pytest.raises(Exception) as info:
        view.rename(f"{dl}/pending/{iid}/f", f"{dl}/verifier/{iid}/f")
    assert info.value is exc                        # the failure's own error, nothing else
    monkeypatch.undo()
    assert snapshot(view, device.root) == before
    assert read(view, f"{dl}/pending/{iid}/f") == b"blob"
    assert view.listdir(f"{dl}/verifier/{iid}") == []
    with pytest.raises(FileNotFoundError):
        view.lstat(f"{dl}/verifier/{iid}/f")
    view.rename(f"{dl}/pending/{iid}/f", f"{dl}/verifier/{iid}/f")   # and then it works
    assert read(view, f"{dl}/verifier/{iid}/f") == b"blob"


def test_a_rename_over_a_placed_name_that_fails_keeps_both(device, views, monkeypatch):
    view = views()
    web0, stray = f"img/{device.web.legacy_name(0)}", f"img/{device.stray.legacy_name(0)}"
    write_new(view, web0, b"old")
    write_new(view, stray, b"new")
    before = snapshot(view, device.root)
    fail_once(monkeypatch, Store, "rename", enospc())
    with pytest.raises(OSError) as info:
        view.rename(stray, web0)
    assert info.value.errno == errno.ENOSPC
    monkeypatch.undo()
    assert snapshot(view, device.root) == before
    assert read(view, web0) == b"old" and read(view, stray) == b"new"


def test_a_legacy_rename_whose_index_write_fails_is_taken_back(device, views, monkeypatch):
    """A legacy file renamed over a placed name: the rename(2) happens first;
    if the index then cannot drop the placed name's record, it is undone."""
    view = views()
    web0 = f"img/{device.web.legacy_name(0)}"
    write_new(view, web0, b"placed")
    (device.root / "img" / "conv.tmp").write_bytes(b"converted")
    before = snapshot(view, device.root)
    fail_once(monkeypatch, Index, "delete", DISK_FULL)
    with pytest.raises(sqlite3.OperationalError):
        view.rename("img/conv.tmp", web0)
    monkeypatch.undo()
    assert snapshot(view, device.root) == before
    assert read(view, web0) == b"placed" and read(view, "img/conv.tmp") == b"converted"
    view.rename("img/conv.tmp", web0)
    assert read(view, web0) == b"converted" and view.index.get(web0) is None
    assert not (device.root / "vault" / "volumes" / device.vol(device.web)).exists()


@DESIGN_NOTE_ONLY
@pytest.mark.parametrize("fault", ["mkdir", "index", "open"])
def test_a_create_that_fails_leaves_nothing(device, views, monkeypatch, fault):
    view = views()
    dl, iid = f"downloads/{OBJ}", device.image_id
    mkdirs(view, f"{dl}/pending/{iid}")
    before = snapshot(view, device.root)
    cls, name, exc = {"mkdir": (Store, "mkdir", enospc()), "index": (Index, "put", DISK_FULL),
                      "open": (Store, "open", enospc())}[fault]
    fail_once(monkeypatch, cls, name, exc)
    with pytest.raises(Exception) as info:
        write_new(view, f"{dl}/pending/{iid}/f", b"blob")
    assert info.value is exc
    monkeypatch.undo()
    assert snapshot(view, device.root) == before     # no vault/downloader/pending/<id> left


@pytest.mark.parametrize("fault", ["mkdir", "index"])
def test_a_mkdir_that_fails_leaves_nothing(device, views, monkeypatch, fault):
    view = views()
    vol = f"prepared/{device.pod.legacy_name(0, container=True)}"
    assert view.placement(vol, is_dir=True).store == "vault_volumes"
    before = snapshot(view, device.root)
    cls, name, exc = {"mkdir": (Store, "mkdir", enospc()),
                      "index": (Index, "put", DISK_FULL)}[fault]
    fail_once(monkeypatch, cls, name, exc)
    with pytest.raises(Exception) as info:
        view.mkdir(vol, 0o755)
    assert info.value is exc
    monkeypatch.undo()
    assert snapshot(view, device.root) == before


def test_an_unlink_whose_index_write_fails_still_happened(device, views, monkeypatch):
    """The unlink(2) is the commit point: the name is gone for the agent even
    when the index cannot be written, and the next start drops the record."""
    view = views()
    web0 = f"img/{device.web.legacy_name(0)}"
    write_new(view, web0, b"placed")
    fail_once(monkeypatch, Index, "delete", DISK_FULL)
    view.unlink(web0)
    monkeypatch.undo()
    with pytest.raises(FileNotFoundError):
        view.lstat(web0)
    assert web0 not in view.listdir("img")


# -- for real: chattr +i and a full filesystem, through the views ---------------------------

@contextmanager
def immutable(path: Path):
    subprocess.run(["chattr", "+i", str(path)], check=True)
    try:
        yield
    finally:
        subprocess.run(["chattr", "-i", str(path)], check=True)


def fill(root: Path) -> Path:
    """Fill the filesystem of *root* to the last block (root's reserve too)."""
    filler = root / "filler"
    fd = os.open(filler, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        for size in (1 << 20, 4096):
            chunk = b"\1" * size
            while True:
                try:
                    os.write(fd, chunk)
                except OSError as exc:
                    assert exc.errno == errno.ENOSPC
                    break
        os.fsync(fd)
    finally:
        os.close(fd)
    return filler


@pytest.fixture
def device_views(tmp_path):
    """A device on ext4 with an fscrypt vault, served in stage redirect, in the
    design note's layout (which places downloads in progress in the vault)."""
    (tmp_path / "dev").mkdir()
    with ext4_image(tmp_path / "dev", size_mb=64) as root:
        make_vault(root, "vault")
        (root / "novault").mkdir()
        devicegen.make_demo(str(root))
        with mounted(root, tmp_path / "run", stage="redirect",
                     config=layout_config(tmp_path, "design-note")) as m:
            yield root, m


def download(root: Path, uuid: str) -> tuple[Path, Path]:
    pending = root / "downloads" / OBJ / "pending" / uuid
    verifier = root / "downloads" / OBJ / "verifier" / uuid
    pending.mkdir(parents=True)
    verifier.mkdir(parents=True)
    (pending / "f").write_bytes(b"blob" * 1000)
    return pending / "f", verifier / "f"


UUID = "0b5d7f0e-4a53-4c3b-9a55-0f0b6b1a9c11"


@pytest.mark.root
def test_a_rename_into_an_immutable_directory_fails_and_changes_nothing(device_views):
    root, m = device_views
    src, dst = download(root, UUID)
    assert (root / "vault" / "downloader" / "pending" / UUID / "f").exists()   # placed
    before = tree(root / "vault")
    with immutable(root / "vault" / "verifier" / "verifier"):
        with pytest.raises(OSError) as info:
            os.rename(src, dst)
        assert info.value.errno == errno.EPERM
        assert src.read_bytes() == b"blob" * 1000        # the old name, the same bytes
        assert not dst.exists() and os.listdir(dst.parent) == []
        assert tree(root / "vault") == before            # no record moved, nothing made
    with immutable(root / "vault" / "downloader" / "pending" / UUID):
        with pytest.raises(OSError) as info:
            os.unlink(src)
        assert info.value.errno == errno.EPERM
        assert src.read_bytes() == b"blob" * 1000
    os.rename(src, dst)                                  # and then it works
    assert dst.read_bytes() == b"blob" * 1000 and not src.exists()
    assert "Traceback" not in m.log_text()


@pytest.mark.root
def test_a_full_filesystem_fails_changes_with_enospc_and_changes_nothing(device_views):
    root, m = device_views
    src, dst = download(root, UUID)
    other = root / "downloads" / OBJ / "pending" / "1c0b7d2e-9f3a-4b1c-8d2e-3f4a5b6c7d8e"
    other.mkdir()
    before = tree(root / "vault")
    filler = fill(root)
    try:
        with pytest.raises(OSError) as info:
            os.rename(src, dst)        # vault/verifier/verifier/<uuid> cannot be made
        assert info.value.errno == errno.ENOSPC
        assert src.read_bytes() == b"blob" * 1000 and not dst.exists()
        with pytest.raises(OSError) as info:
            (other / "g").write_bytes(b"x")   # vault/downloader/pending/<uuid2> either
        assert info.value.errno == errno.ENOSPC
        assert not (other / "g").exists()
        assert tree(root / "vault") == before
    finally:
        filler.unlink()
    os.rename(src, dst)
    assert dst.read_bytes() == b"blob" * 1000
    (other / "g").write_bytes(b"x")
    assert (other / "g").read_bytes() == b"x"
    assert "Traceback" not in m.log_text()
