"""Files compatfs does not own (``compatfs.untrusted``): never a hang, never a link
followed, never more than a bound read; and a running daemon keeps answering
whatever is put at the checkpoint's name."""

from __future__ import annotations

import os
import shutil
import socket
import stat
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from compatfs.testing import devicegen
from compatfs.untrusted import UntrustedFileError, read_regular

from .mounting import mounted

# -- the helper ---------------------------------------------------------------------

def test_reads_a_regular_file(tmp_path: Path) -> None:
    path = tmp_path / "f"
    path.write_bytes(b"x" * 3000)
    assert read_regular(str(path), 3000) == b"x" * 3000


def test_absence_is_file_not_found(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError):
        read_regular(str(tmp_path / "missing"), 10)


@pytest.mark.parametrize("make, what", [
    ("fifo", "a FIFO"), ("socket", "a socket"), ("chardev", "a character device"),
    ("dir", "a directory"), ("symlink", "a symbolic link"), ("dangling", "a symbolic link"),
])
def test_refuses_anything_but_a_regular_file(tmp_path: Path, make: str, what: str) -> None:
    path = tmp_path / "f"
    target = tmp_path / "target"
    target.write_bytes(b"data")
    if make == "fifo":
        os.mkfifo(path)
    elif make == "socket":
        with socket.socket(socket.AF_UNIX) as sock:
            sock.bind(str(path))
    elif make == "chardev":
        os.mknod(path, 0o600 | stat.S_IFCHR, os.makedev(1, 5))   # /dev/zero: endless
    elif make == "dir":
        path.mkdir()
    elif make == "symlink":
        path.symlink_to(target)
    else:
        path.symlink_to(tmp_path / "nowhere")
    started = time.monotonic()
    with pytest.raises(UntrustedFileError) as info:
        read_regular(str(path), 1 << 20)
    assert time.monotonic() - started < 1
    assert str(info.value) == f"{path}: is {what}, not a regular file" + \
        (" (not followed)" if what == "a symbolic link" else "")


def test_follows_a_link_only_when_asked(tmp_path: Path) -> None:
    target = tmp_path / "target"
    target.write_bytes(b"data")
    (tmp_path / "link").symlink_to(target)
    assert read_regular(str(tmp_path / "link"), 10, follow_symlinks=True) == b"data"
    os.unlink(target)
    os.mkfifo(target)
    with pytest.raises(UntrustedFileError, match="is a FIFO"):
        read_regular(str(tmp_path / "link"), 10, follow_symlinks=True)


def test_size_bound(tmp_path: Path) -> None:
    path = tmp_path / "f"
    path.write_bytes(b"y" * 101)
    assert read_regular(str(path), 101) == b"y" * 101
    with pytest.raises(UntrustedFileError, match="too large: 101 bytes, larger than 100 bytes"):
        read_regular(str(path), 100)


def test_a_file_that_grows_while_read_is_cut_at_the_bound(tmp_path: Path, monkeypatch) -> None:
    path = tmp_path / "f"
    path.write_bytes(b"z" * 10)
    real_fstat = os.fstat

    def fstat_then_grow(fd: int) -> os.stat_result:
        st = real_fstat(fd)
        with open(path, "ab") as f:
            f.write(b"z" * 100)
        return st

    monkeypatch.setattr(os, "fstat", fstat_then_grow)
    with pytest.raises(UntrustedFileError, match="too large"):
        read_regular(str(path), 50)


# -- a running daemon ---------------------------------------------------------------

def _answers_within(seconds: float, call: Callable[[], object]) -> bool:
    """Run *call* in a thread; True if it returned (or raised) within *seconds*."""
    done = threading.Event()

    def run() -> None:
        try:
            call()
        except OSError:
            pass
        finally:
            done.set()

    threading.Thread(target=run, daemon=True).start()
    return done.wait(seconds)


def _problems(ctl: Path) -> str:
    return os.getxattr(ctl, "user.compatfs.problems").decode()


def _until(predicate: Callable[[], bool], seconds: float) -> bool:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.2)
    return predicate()


@pytest.mark.root
def test_views_keep_answering_when_the_checkpoint_becomes_a_fifo(tmp_path: Path) -> None:
    """The daemon re-reads the checkpoint every 2 s; a FIFO swapped in at its name
    used to block that read on the event loop, and with it every view."""
    from compatfs.daemon import CONFIG_POLL_SECONDS

    root = tmp_path / "persist"
    root.mkdir()
    web = devicegen.make_demo(str(root))[0]
    lastconfig = root / "checkpoint" / "lastconfig"
    saved = tmp_path / "lastconfig.saved"
    outside = tmp_path / "outside"
    outside.mkdir()
    with mounted(root, tmp_path / "run") as m:
        ctl = root / "img" / ".compatfs"
        volume = root / "img" / web.legacy_name(0)
        assert _problems(ctl) == "[]"
        shutil.copyfile(lastconfig, saved)
        os.unlink(lastconfig)
        os.mkfifo(lastconfig)

        def every_view_answers() -> None:
            for call in (lambda: os.listdir(root / "img"),
                         lambda: os.listdir(root / "downloads"),
                         lambda: volume.read_bytes()[:4096],
                         lambda: _problems(ctl)):
                assert _answers_within(5, call), "a view stopped answering"

        until = time.monotonic() + 3 * CONFIG_POLL_SECONDS + 1
        while time.monotonic() < until:
            every_view_answers()
            time.sleep(0.3)
        assert "is a FIFO, not a regular file" in _problems(ctl)

        # a link to a file outside the root is reported, not followed
        shutil.copyfile(saved, outside / "lastconfig")
        os.unlink(lastconfig)
        lastconfig.symlink_to(outside / "lastconfig")
        assert _until(lambda: "is a symbolic link" in _problems(ctl), 4 * CONFIG_POLL_SECONDS)
        every_view_answers()

        # a real checkpoint again is picked up
        os.unlink(lastconfig)
        devicegen.write_atomic(str(lastconfig), saved.read_bytes())
        assert _until(lambda: _problems(ctl) == "[]", 4 * CONFIG_POLL_SECONDS)
        every_view_answers()
        assert m.proc.poll() is None
    assert "Traceback" not in m.log_text(), m.log_text()
    assert "is a FIFO, not a regular file" in m.log_text()
