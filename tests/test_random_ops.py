"""Random operations on one file through the view, checked against a model.

A seeded sequence of ``pwrite`` (offsets up to 64 MiB, sizes up to 256 KiB),
``pread`` checks, ``ftruncate``, ``fsync``/``fdatasync``, ``fstat`` checks and
close/reopen with ``O_RDWR`` or ``O_RDWR|O_APPEND`` (after which writes append,
``pwrite`` included, as Linux does) runs against an in-memory ``bytearray``.
Every read is compared as it happens; at the end the whole file read through
the view, and the backing file read directly after unmounting, must both equal
the model. A failure names the seed and the step, so it can be replayed.

A Hypothesis state machine covers the same ground with shrinking, kept small
so it stays quick.
"""

from __future__ import annotations

import hashlib
import os
import random
import time
from pathlib import Path

import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    invariant,
    precondition,
    rule,
    run_state_machine_as_test,
)

from compatfs import mounts

from .mounting import mounted

pytestmark = pytest.mark.root

MAX_OFFSET = 64 << 20
MAX_WRITE = 256 << 10
PAGE = 4096
OPS = 2000
SEEDS = (1, 2, 3)
#: A seed takes about 3 s here; this only catches a pathological slowdown
#: (a busy machine must not turn it into a flaky failure).
BUDGET_SECONDS = 30.0


def _first_difference(a: bytes | bytearray, b: bytes | bytearray) -> str:
    n = min(len(a), len(b))
    for i in range(0, n, PAGE):
        if a[i:i + PAGE] != b[i:i + PAGE]:
            j = next(k for k in range(i, min(i + PAGE, n)) if a[k] != b[k])
            return f"first difference at byte {j} (got {a[j]:#x}, model {b[j]:#x})"
    if len(a) != len(b):
        return f"sizes differ: got {len(a)}, model {len(b)}"
    return "equal"


def _read_whole(path: Path, chunk: int = 4 << 20) -> bytes:
    out = bytearray()
    fd = os.open(path, os.O_RDONLY)
    try:
        while True:
            block = os.read(fd, chunk)
            if not block:
                return bytes(out)
            out += block
    finally:
        os.close(fd)


class Model:
    """The file as it should be, and the random driver of one run."""

    def __init__(self, path: Path, seed: int) -> None:
        self.path = path
        self.seed = seed
        self.rng = random.Random(seed)
        self.data = bytearray()
        self.append = False
        self.fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_RDWR, 0o644)
        self.step = 0
        self.op = ""
        self.counts: dict[str, int] = {}

    # -- random choices biased to the interesting places -----------------------------
    def offset(self) -> int:
        size = len(self.data)
        pick = self.rng.random()
        if pick < 0.3 or size == 0:
            return self.rng.randrange(MAX_OFFSET)
        if pick < 0.6:   # around the end of the file
            return max(0, size + self.rng.randint(-2 * PAGE, 2 * PAGE))
        if pick < 0.85:  # a page boundary inside the file, give or take a byte or two
            return max(0, (self.rng.randrange(size) // PAGE) * PAGE
                       + self.rng.choice((-1, 0, 0, 1, 7)))
        return self.rng.randrange(size)

    def length(self) -> int:
        pick = self.rng.random()
        if pick < 0.5:
            return self.rng.randint(1, 2 * PAGE)
        if pick < 0.65:
            return self.rng.choice((PAGE, 2 * PAGE, 128 << 10, MAX_WRITE))
        if pick < 0.9:
            return self.rng.randint(1, 64 << 10)
        return self.rng.randint(1, MAX_WRITE)

    def payload(self, n: int) -> bytes:
        if self.rng.random() < 0.2:
            return bytes([self.rng.randrange(256)]) * n   # runs, zeros included
        return self.rng.randbytes(n)

    # -- the model of each operation ---------------------------------------------------
    def _put(self, off: int, buf: bytes) -> None:
        if off > len(self.data):
            self.data.extend(bytes(off - len(self.data)))
        self.data[off:off + len(buf)] = buf

    def fail(self, what: str) -> None:
        pytest.fail(f"seed {self.seed}, step {self.step} ({self.op}): {what}")

    def do_pwrite(self) -> None:
        off, buf = self.offset(), self.payload(self.length())
        n = os.pwrite(self.fd, buf, off)
        if n != len(buf):
            self.fail(f"short pwrite {n} of {len(buf)}")
        # O_APPEND: Linux appends even for pwrite (pwrite(2), BUGS)
        self._put(len(self.data) if self.append else off, buf)

    def do_write_append(self) -> None:
        if not self.append:
            return self.do_pwrite()
        buf = self.payload(self.length())
        if os.write(self.fd, buf) != len(buf):
            self.fail("short append write")
        self._put(len(self.data), buf)

    def do_pread(self) -> None:
        off, n = self.offset(), self.length()
        got = os.pread(self.fd, n, off)
        want = bytes(self.data[off:off + n])
        if got != want:
            self.fail(f"pread({n}, {off}): {_first_difference(got, want)}")

    def do_pread_eof(self) -> None:
        size = len(self.data)
        off = max(0, size - self.rng.randint(0, 3 * PAGE))
        got = os.pread(self.fd, 4 * PAGE, off)
        if got != bytes(self.data[off:off + 4 * PAGE]):
            self.fail(f"pread across EOF at {off}: "
                      f"{_first_difference(got, self.data[off:off + 4 * PAGE])}")

    def do_ftruncate(self) -> None:
        pick = self.rng.random()
        size = len(self.data)
        if pick < 0.4:
            new = max(0, size + self.rng.randint(-3 * PAGE, 3 * PAGE))
        elif pick < 0.5:
            new = 0
        else:
            new = self.rng.randrange(MAX_OFFSET)
        os.ftruncate(self.fd, new)
        if new < size:
            del self.data[new:]
        else:
            self.data.extend(bytes(new - size))

    def do_sync(self) -> None:
        (os.fsync if self.rng.random() < 0.5 else os.fdatasync)(self.fd)

    def do_fstat(self) -> None:
        st = os.fstat(self.fd)
        if st.st_size != len(self.data):
            self.fail(f"fstat size {st.st_size}, model {len(self.data)}")
        st = os.stat(self.path)
        if st.st_size != len(self.data):
            self.fail(f"stat size {st.st_size}, model {len(self.data)}")

    def do_reopen(self) -> None:
        os.close(self.fd)
        self.append = self.rng.random() < 0.35
        flags = os.O_RDWR | (os.O_APPEND if self.append else 0)
        self.fd = os.open(self.path, flags)
        if self.rng.random() < 0.5:
            # a fresh handle must see everything at once, also through the page cache
            self.do_pread()

    OPS = (("pwrite", do_pwrite, 30), ("append", do_write_append, 8), ("pread", do_pread, 30),
           ("pread_eof", do_pread_eof, 6), ("ftruncate", do_ftruncate, 6), ("sync", do_sync, 4),
           ("fstat", do_fstat, 8), ("reopen", do_reopen, 8))

    def run(self, ops: int) -> None:
        names = [o[0] for o in self.OPS]
        funcs = {o[0]: o[1] for o in self.OPS}
        weights = [o[2] for o in self.OPS]
        for self.step in range(ops):
            self.op = self.rng.choices(names, weights)[0]
            self.counts[self.op] = self.counts.get(self.op, 0) + 1
            try:
                funcs[self.op](self)
            except OSError as exc:
                self.fail(f"unexpected {exc!r}")
        os.close(self.fd)
        self.fd = -1


@pytest.mark.parametrize("seed", SEEDS)
def test_random_operations_match_the_model(tmp_path, seed):
    root = tmp_path / "persist"
    (root / "img").mkdir(parents=True)
    name = f"{'ab' * 32}-{'0' * 8}-0000-4000-8000-{seed:012d}.raw"
    start = time.monotonic()
    with mounted(root, tmp_path / "run") as m:
        model = Model(root / "img" / name, seed)
        try:
            model.run(OPS)
        finally:
            if model.fd >= 0:
                os.close(model.fd)
        through_view = _read_whole(root / "img" / name)
        assert hashlib.sha256(through_view).digest() == hashlib.sha256(model.data).digest(), \
            f"seed {seed}: whole file through the view: " \
            f"{_first_difference(through_view, model.data)}"
        assert "Traceback" not in m.log_text(), m.log_text()
    assert mounts.mounted_at(str(root / "img")) is None
    backing = root / "img" / name   # the legacy store, revealed by the unmount
    on_disk = _read_whole(backing)
    assert hashlib.sha256(on_disk).digest() == hashlib.sha256(model.data).digest(), \
        f"seed {seed}: backing file: {_first_difference(on_disk, model.data)}"
    # every kind of operation ran, so the seed tested what it claims to
    assert set(model.counts) == {o[0] for o in Model.OPS}, model.counts
    assert time.monotonic() - start < BUDGET_SECONDS, f"seed {seed} took too long"


# -- the same, with Hypothesis' stateful testing (shrinks a failure to a short story) ----------

SMALL_OFFSETS = st.one_of(st.integers(0, 3 * PAGE), st.integers(0, 4 << 20),
                          st.sampled_from([PAGE - 1, PAGE, PAGE + 1, (1 << 20) - 1, 1 << 20]))
SMALL_DATA = st.one_of(st.binary(min_size=1, max_size=64),
                       st.builds(lambda b, n: b * n, st.binary(min_size=1, max_size=3),
                                 st.integers(1, 70_000)))


class FileMachine(RuleBasedStateMachine):
    """One file in the view against a bytearray; set ``directory`` before running."""

    directory: Path = Path("/nonexistent")
    counter = 0

    def __init__(self) -> None:
        super().__init__()
        FileMachine.counter += 1
        self.path = self.directory / f"hyp-{FileMachine.counter}"
        self.fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_RDWR, 0o644)
        self.append = False
        self.data = bytearray()

    def _put(self, off: int, buf: bytes) -> None:
        if off > len(self.data):
            self.data.extend(bytes(off - len(self.data)))
        self.data[off:off + len(buf)] = buf

    @rule(off=SMALL_OFFSETS, buf=SMALL_DATA)
    def pwrite(self, off: int, buf: bytes) -> None:
        assert os.pwrite(self.fd, buf, off) == len(buf)
        self._put(len(self.data) if self.append else off, buf)

    @rule(off=SMALL_OFFSETS, n=st.integers(1, 3 * PAGE))
    def pread(self, off: int, n: int) -> None:
        assert os.pread(self.fd, n, off) == bytes(self.data[off:off + n])

    @rule(size=SMALL_OFFSETS)
    def ftruncate(self, size: int) -> None:
        os.ftruncate(self.fd, size)
        if size < len(self.data):
            del self.data[size:]
        else:
            self.data.extend(bytes(size - len(self.data)))

    @rule(append=st.booleans())
    def reopen(self, append: bool) -> None:
        os.close(self.fd)
        self.append = append
        self.fd = os.open(self.path, os.O_RDWR | (os.O_APPEND if append else 0))

    @precondition(lambda self: self.append)
    @rule(buf=SMALL_DATA)
    def append_write(self, buf: bytes) -> None:
        assert os.write(self.fd, buf) == len(buf)
        self._put(len(self.data), buf)

    @rule()
    def fsync(self) -> None:
        os.fsync(self.fd)

    @invariant()
    def size_matches(self) -> None:
        assert os.fstat(self.fd).st_size == len(self.data)

    def teardown(self) -> None:
        os.close(self.fd)
        assert _read_whole(self.path) == bytes(self.data)
        os.unlink(self.path)


def test_hypothesis_state_machine(tmp_path):
    root = tmp_path / "persist"
    (root / "img").mkdir(parents=True)
    with mounted(root, tmp_path / "run") as m:
        FileMachine.directory = root / "img"
        run_state_machine_as_test(FileMachine, settings=settings(
            max_examples=30, stateful_step_count=25, deadline=None, database=None,
            derandomize=True, suppress_health_check=[HealthCheck.too_slow,
                                                     HealthCheck.data_too_large]))
        assert "Traceback" not in m.log_text(), m.log_text()
        assert os.listdir(root / "img") == []
