"""What the kernel asks a mounted view, counted by opcode, and the request loop.

The kernel's caches answer what the daemon told it may be cached: a listing
carries every name's attributes (no lookup or getattr follows it), a close
sends no FLUSH (the daemon answers the first with ENOSYS: nothing is ever
buffered), and a file reopened unchanged keeps its pages (no READ). The
counts come from the kernel's own trace event (``fuse:fuse_request_send``,
:mod:`compatfs.testing.fusetrace`); a change that made the kernel ask again
fails here, not only in a benchmark. The request loop
(:mod:`compatfs.fuseloop`) is checked for its fallback and for not starving
the daemon's other tasks under a steady stream of requests.
"""

from __future__ import annotations

import os
import select
import signal
import subprocess
import threading
import time
from pathlib import Path

import pyfuse3
import pytest
import trio

from compatfs import fuseloop
from compatfs.testing import devicegen, fusetrace

from .mounting import assert_clean_exit, mounted

pytestmark = pytest.mark.root

FILES = 300


@pytest.fixture(scope="module")
def tracer():
    why = fusetrace.unavailable()
    if why is not None:
        pytest.skip(why)
    with fusetrace.counting() as counter:
        yield counter


@pytest.fixture
def small_files(tmp_path: Path) -> tuple[Path, list[str]]:
    root = tmp_path / "persist"
    root.mkdir()
    devicegen.make_demo(str(root))
    names = [f"small-{i:04d}.dat" for i in range(FILES)]
    for i, n in enumerate(names):
        (root / "img" / n).write_bytes(bytes([i % 256]) * 1024)
    return root, names


def counted(tracer: fusetrace.RequestCounter, path: Path, step) -> dict[str, int]:
    """The requests *step()* made the kernel send to the mount serving *path*."""
    conn = fusetrace.connection_of(str(path))
    tracer.counts({conn})
    step()
    return dict(tracer.counts({conn})[conn])


def test_a_listing_answers_every_stat_after_it(tracer, small_files, tmp_path):
    root, names = small_files
    img = root / "img"
    with mounted(root, tmp_path / "run"):
        listed = counted(tracer, img, lambda: os.listdir(img))
        assert listed.get("READDIRPLUS", 0) >= 1, listed
        stats = counted(tracer, img, lambda: [os.stat(img / n) for n in names])
        assert stats == {}, f"stat after a listing asked the daemon: {stats}"
        again = counted(tracer, img, lambda: [os.lstat(img / n) for n in names])
        assert again == {}, again


def test_close_sends_no_flush_and_an_unchanged_file_keeps_its_pages(tracer, small_files,
                                                                      tmp_path):
    root, names = small_files
    path = root / "img" / names[7]

    def read_ten_times() -> None:
        for _ in range(10):
            with open(path, "rb") as f:
                assert f.read() == bytes([7]) * 1024

    with mounted(root, tmp_path / "run"):
        first = counted(tracer, path, read_ten_times)
        assert first.get("OPEN") == 10 and first.get("RELEASE") == 10, first
        assert first.get("FLUSH", 0) <= 1, first     # the first is answered ENOSYS
        assert first.get("READ", 0) == 1, first      # then the pages are kept
        later = counted(tracer, path, read_ten_times)
        assert "FLUSH" not in later and "READ" not in later, later
        # a change through the view is read back, not the kept pages
        with open(path, "r+b") as f:
            f.write(b"\xff" * 1024)
        with open(path, "rb") as f:
            assert f.read() == b"\xff" * 1024


def test_a_mount_kept_busy_still_answers_its_control_file_and_stops_on_sigterm(small_files,
                                                                               tmp_path):
    root, names = small_files
    img = root / "img"
    stop = threading.Event()
    served = [0] * 8

    def hammer(k: int) -> None:
        # opens and closes keep a request queued most of the time (RELEASE is
        # sent after close returns), which the loop reads without yielding
        while not stop.is_set():
            try:
                fd = os.open(img / names[(served[k] * 7 + k) % FILES], os.O_RDONLY)
                os.close(fd)
            except OSError:
                return   # the mount went away: the daemon stopped
            served[k] += 1

    with mounted(root, tmp_path / "run") as m:
        threads = [threading.Thread(target=hammer, args=(k,), daemon=True) for k in range(8)]
        for t in threads:
            t.start()
        try:
            time.sleep(0.5)
            # the control file is answered by the handlers; its settings by the daemon's state
            assert os.getxattr(img / ".compatfs", "user.compatfs.stage") == b"observe"
            m.proc.send_signal(signal.SIGTERM)
            try:
                m.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                pytest.fail(f"a busy daemon did not stop within 30 s of SIGTERM:\n"
                            f"{m.log_text()[-3000:]}")
        finally:
            stop.set()
            for t in threads:
                t.join(10)
        assert_clean_exit(m)
        assert "own request loop" not in m.log_text()   # compatfs.fuseloop served
        assert sum(served) > 100, served


def test_fuse_fds_finds_a_dev_fuse_descriptor():
    fd = os.open("/dev/fuse", os.O_RDWR | os.O_CLOEXEC)
    try:
        assert fd in fuseloop.fuse_fds()
    finally:
        os.close(fd)
    assert fd not in fuseloop.fuse_fds()


def test_session_tells_its_descriptor_from_others():
    other = os.open("/dev/fuse", os.O_RDWR | os.O_CLOEXEC)
    session = fuseloop.Session()
    session.before_init()
    mine = os.open("/dev/fuse", os.O_RDWR | os.O_CLOEXEC)
    try:
        session.after_init()
        assert session.fd == mine
        assert session.own_loop
    finally:
        os.close(mine)
        os.close(other)


def test_without_pyfuse3s_wait_the_session_runs_pyfuse3s_own_loop(monkeypatch):
    calls: list[dict] = []

    async def main(**kw) -> None:
        calls.append(kw)

    monkeypatch.setattr(pyfuse3, "main", main)
    monkeypatch.delattr(pyfuse3, "_wait_fuse_readable")
    session = fuseloop.Session()
    session.fd = 99
    assert not session.own_loop
    trio.run(session.serve)
    assert calls == [{}]


def test_the_session_puts_its_wait_in_place_only_while_serving(monkeypatch):
    seen = []
    original = pyfuse3._wait_fuse_readable

    async def main(**kw) -> None:
        seen.append((kw, pyfuse3._wait_fuse_readable))

    monkeypatch.setattr(pyfuse3, "main", main)
    session = fuseloop.Session()
    session.fd = 99
    trio.run(session.serve)
    (kw, wait), = seen
    assert kw == {"min_tasks": 1, "max_tasks": 1}
    assert wait == session._wait
    assert pyfuse3._wait_fuse_readable is original


def test_requests_queued_in_a_row_still_let_the_other_tasks_run():
    """However many requests are queued, the loop yields to trio's scheduler at
    least every STREAK of them (the migration and the signal handler run there).
    trio runs the tasks ready at a yield in a random order, the loop's own among
    them, so another task may wait for a second streak, never longer."""
    r, w = os.pipe()
    os.write(w, b"x")   # always readable: a queue that never empties
    session = fuseloop.Session()
    session.fd = r
    session._poll.register(r, select.POLLIN)
    waits_before_other_ran: list[int] = []

    async def main() -> None:
        ran = trio.Event()

        async def other() -> None:
            ran.set()

        async with trio.open_nursery() as nursery:
            nursery.start_soon(other)
            waits = 0
            while not ran.is_set() and waits < 10 * fuseloop.STREAK:
                assert await session._wait()
                waits += 1
            waits_before_other_ran.append(waits)

    try:
        trio.run(main)
    finally:
        os.close(r)
        os.close(w)
    assert 1 <= waits_before_other_ran[0] <= 2 * fuseloop.STREAK
