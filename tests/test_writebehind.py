"""Write-behind: sequential writes through a view have their writeback started early."""

from __future__ import annotations

import hashlib
import os
import time
from pathlib import Path

import pytest

from compatfs.rundir import RunDir
from compatfs.testing import devicegen
from compatfs.writebehind import Stream, WriteBehind

from .mounting import mounted

MiB = 1 << 20


def write_through(wb: WriteBehind, path: Path, offsets: list[int], n: int = MiB) -> None:
    """pwrite *n* bytes at each offset in turn, telling *wb* as the daemon does."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    stream = Stream()
    try:
        for off in offsets:
            assert os.pwrite(fd, os.urandom(n), off) == n
            wb.wrote(stream, fd, off, n)
    finally:
        os.close(fd)        # the worker holds its own duplicate
    wb.close()


def test_a_sequential_run_starts_writeback_every_step(tmp_path: Path) -> None:
    wb = WriteBehind(step=4 * MiB)
    write_through(wb, tmp_path / "f", [i * MiB for i in range(18)])
    assert (wb.started, wb.dropped) == (4, 0)     # 16 of the 18 MiB handed on


def test_random_writes_are_never_pushed(tmp_path: Path) -> None:
    wb = WriteBehind(step=4 * MiB)
    write_through(wb, tmp_path / "f", [(i * 7919 % 64) * MiB for i in range(64)])
    assert wb.started == 0


def test_a_broken_run_counts_again_from_where_it_restarts(tmp_path: Path) -> None:
    wb = WriteBehind(step=4 * MiB)
    # 3 MiB, a jump, then 4 MiB in a row: only the second run reaches a step
    offsets = [0, MiB, 2 * MiB, 100 * MiB, 101 * MiB, 102 * MiB, 103 * MiB]
    write_through(wb, tmp_path / "f", offsets)
    assert wb.started == 1


def test_a_closed_handle_does_not_break_the_worker(tmp_path: Path) -> None:
    """The hint holds its own fd: closing the handle first is fine, and a
    bad fd (sync_file_range fails) is neither counted nor fatal."""
    wb = WriteBehind(step=MiB)
    pipe_r, pipe_w = os.pipe()
    wb._hint(pipe_w, 0, MiB)       # sync_file_range on a pipe: ESPIPE
    os.close(pipe_r)
    os.close(pipe_w)
    write_through(wb, tmp_path / "f", [0, MiB])
    assert wb.started == 2


@pytest.mark.root
def test_sequential_writes_through_a_view_start_writeback(tmp_path: Path) -> None:
    root = tmp_path / "persist"
    root.mkdir()
    web, *_ = devicegen.make_demo(str(root))
    data = os.urandom(24 * MiB)
    with mounted(root, tmp_path / "run") as m:
        target = root / "img" / web.legacy_name(0)
        with open(target, "r+b") as f:
            for off in range(0, len(data), MiB):
                f.write(data[off:off + MiB])
            f.flush()
            os.fsync(f.fileno())
        with open(target, "rb") as f:
            assert hashlib.sha256(f.read(len(data))).digest() == hashlib.sha256(data).digest()
        metrics = RunDir(str(m.run_dir), str(root)).metrics_file
        started = 0.0
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline and started < 2:
            if os.path.exists(metrics):
                with open(metrics) as f:
                    for line in f:
                        if line.startswith('compatfs_write_behind_total{outcome="started"}'):
                            started = float(line.split()[-1])
            time.sleep(0.2)
        assert started >= 2, m.log_text()
