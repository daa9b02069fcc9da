"""compatfs/filecopy.py, treecopy.py and throttle.py: sparse, throttled,
stoppable, page-cache-bounded copies of files and container trees, with
copy_file_range and its read/write fallback, into a real fscrypt vault too.
"""

from __future__ import annotations

import ctypes
import errno
import hashlib
import mmap
import os
import socket
import stat
import struct
import threading
import time
from pathlib import Path

import pytest

from compatfs import filecopy, treecopy
from compatfs.throttle import Throttle

from .devices import device_root

MiB = 1 << 20
PAGE = mmap.PAGESIZE
_libc = ctypes.CDLL(None, use_errno=True)
_libc.mmap.restype = ctypes.c_void_p
_libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int,
                       ctypes.c_int, ctypes.c_long]
_libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
_libc.mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_void_p]
_libc.fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64]


# -- helpers ----------------------------------------------------------------------------


def make_sparse(path: Path, size: int, pieces: list[tuple[int, bytes]]) -> None:
    """A file of apparent *size* holding *pieces* (offset, data) and holes elsewhere."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        os.ftruncate(fd, size)
        for off, data in pieces:
            os.pwrite(fd, data, off)
        os.fsync(fd)
    finally:
        os.close(fd)


def sha(path: Path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def allocated(path: Path) -> int:
    return os.lstat(path).st_blocks * 512


def data_extents(path: Path) -> list[tuple[int, int]]:
    """(start, end) of every data extent, per SEEK_DATA/SEEK_HOLE."""
    fd = os.open(path, os.O_RDONLY)
    try:
        size, off, out = os.fstat(fd).st_size, 0, []
        while off < size:
            try:
                data = os.lseek(fd, off, os.SEEK_DATA)
            except OSError as exc:
                assert exc.errno == errno.ENXIO
                break
            hole = os.lseek(fd, data, os.SEEK_HOLE)
            out.append((data, hole))
            off = hole
        return out
    finally:
        os.close(fd)


def punch(path: Path, off: int, length: int) -> None:
    fd = os.open(path, os.O_WRONLY)
    try:
        assert _libc.fallocate(fd, 3, off, length) == 0, os.strerror(ctypes.get_errno())
    finally:
        os.close(fd)


def resident(path: Path) -> int:
    """Bytes of *path* in the page cache (mincore(2) over a shared read-only mapping)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        size = os.fstat(fd).st_size
        if size == 0:
            return 0
        addr = _libc.mmap(None, size, mmap.PROT_READ, mmap.MAP_SHARED, fd, 0)
        assert addr not in (None, ctypes.c_void_p(-1).value), os.strerror(ctypes.get_errno())
        try:
            pages = (size + PAGE - 1) // PAGE
            vec = (ctypes.c_ubyte * pages)()
            assert _libc.mincore(addr, size, vec) == 0, os.strerror(ctypes.get_errno())
            return (pages - bytes(vec).count(0)) * PAGE
        finally:
            _libc.munmap(addr, size)
    finally:
        os.close(fd)


def record_fsyncs(monkeypatch) -> set[tuple[int, int]]:
    """(st_dev, st_ino) of everything fsync(2)ed from now on."""
    synced: set[tuple[int, int]] = set()
    real = os.fsync

    def fsync(fd: int) -> None:
        st = os.fstat(fd)
        real(fd)
        synced.add((st.st_dev, st.st_ino))

    monkeypatch.setattr(os, "fsync", fsync)
    return synced


class Files:
    """Open src for reading and a new dst for writing; closed on exit."""

    def __init__(self, src: Path, dst: Path, dst_flags: int = os.O_CREAT | os.O_EXCL) -> None:
        self.src = os.open(src, os.O_RDONLY)
        self.dst = os.open(dst, os.O_RDWR | dst_flags, 0o600)

    def __enter__(self) -> Files:
        return self

    def __exit__(self, *exc: object) -> None:
        os.close(self.src)
        os.close(self.dst)


def copy_file(src: Path, dst: Path, **kw) -> filecopy.CopyResult:
    with Files(src, dst) as f:
        return filecopy.copy_extents(f.src, f.dst, **kw)


def sparse_layout(trailing_hole: bool,
                  size: int = 256 * MiB) -> tuple[int, list[tuple[int, bytes]]]:
    """*size* apparent; ~5 MiB of data at several offsets, one unaligned, ending
    either in data at the very last byte or in a trailing hole."""
    pieces = [(0, os.urandom(MiB)), (3 * MiB + 100, os.urandom(64 * 1024)),
              (size * 3 // 10, os.urandom(2 * MiB)), (size * 8 // 10, os.urandom(MiB))]
    if not trailing_hole:
        pieces.append((size - MiB, os.urandom(MiB)))
    return size, pieces


# -- sparse files, ranges, hashing --------------------------------------------------------


@pytest.mark.parametrize("trailing_hole", [False, True], ids=["data-at-end", "trailing-hole"])
def test_sparse_file_copies_identically_and_stays_sparse(tmp_path: Path,
                                                          trailing_hole: bool) -> None:
    size, pieces = sparse_layout(trailing_hole)
    src, dst = tmp_path / "src", tmp_path / "dst"
    make_sparse(src, size, pieces)
    data = sum(len(d) for _, d in pieces)
    result = copy_file(src, dst, hash=True)
    assert os.stat(dst).st_size == size
    assert sha(dst) == sha(src) == result.sha256
    assert result.size == size
    # data_bytes counts what SEEK_DATA reports (whole blocks), never holes.
    assert data <= result.data_bytes <= allocated(src)
    assert allocated(dst) <= data * 1.01 + 64 * 1024
    assert allocated(dst) < size // 20
    assert data_extents(dst) == data_extents(src)


@pytest.mark.parametrize("trailing_hole", [False, True], ids=["data-at-end", "trailing-hole"])
def test_compare_copies_sparse_files_exactly_and_reads_every_piece_back(
        tmp_path: Path, trailing_hole: bool, monkeypatch) -> None:
    size, pieces = sparse_layout(trailing_hole)
    src, dst = tmp_path / "src", tmp_path / "dst"
    make_sparse(src, size, pieces)
    reads: list[tuple[int, int]] = []          # (offset, length) read from dst
    real = os.preadv

    def preadv(fd: int, buffers, off: int) -> int:
        n = real(fd, buffers, off)
        if os.fstat(fd).st_ino == dst_ino[0]:
            reads.append((off, n))
        return n

    dst_ino = [0]
    with Files(src, dst) as f:
        dst_ino[0] = os.fstat(f.dst).st_ino
        monkeypatch.setattr(os, "preadv", preadv)
        r = filecopy.copy_extents(f.src, f.dst, compare=True, chunk=MiB)
    monkeypatch.undo()
    assert sha(dst) == sha(src)
    assert data_extents(dst) == data_extents(src)
    assert r.sha256 is None
    # Every data byte written was read back, holes were not.
    assert sum(n for _, n in reads) == r.data_bytes
    covered = sorted(reads)
    for (a, n), (b, _) in zip(covered, covered[1:], strict=False):  # consecutive pairs
        assert a + n <= b


def test_compare_fails_when_the_destination_does_not_keep_its_bytes(tmp_path: Path) -> None:
    """/dev/null takes every write and gives nothing back: the writes alone
    report success, the comparison fails the copy with EIO."""
    src = tmp_path / "src"
    make_sparse(src, 4 * MiB, [(MiB, os.urandom(MiB))])
    sfd = os.open(src, os.O_RDONLY)
    dfd = os.open("/dev/null", os.O_RDWR)
    try:
        assert os.pwrite(dfd, b"x" * 4096, MiB) == 4096     # the write path sees nothing wrong
        with pytest.raises(filecopy.CopyMismatch) as info:
            filecopy.copy_extents(sfd, dfd, compare=True, end=4 * MiB)
        assert info.value.errno == errno.EIO
        assert f"[{MiB}, " in str(info.value)
    finally:
        os.close(sfd)
        os.close(dfd)


def test_start_end_ranges_copy_exactly_that_range(tmp_path: Path) -> None:
    size, pieces = sparse_layout(trailing_hole=True, size=64 * MiB)
    src = tmp_path / "src"
    make_sparse(src, size, pieces)
    content = src.read_bytes()
    cut = pieces[2][0] + 12345        # inside a data extent
    dst = tmp_path / "dst"
    with Files(src, dst) as f:
        first = filecopy.copy_extents(f.src, f.dst, end=cut, hash=True)
        # With end given, dst is not truncated to src's size and holds only [0, cut).
        assert os.fstat(f.dst).st_size == cut
        assert os.pread(f.dst, cut, 0) == content[:cut]
        second = filecopy.copy_extents(f.src, f.dst, start=cut, hash=True)
    assert first.size == cut and second.size == size - cut
    assert first.sha256 == hashlib.sha256(content[:cut]).hexdigest()
    assert second.sha256 == hashlib.sha256(content[cut:]).hexdigest()
    assert sha(dst) == sha(src)
    assert allocated(dst) <= allocated(src) + 64 * 1024

    # A middle range lands at the same offsets in a fresh file, nothing else written.
    lo, hi = 2 * MiB, pieces[2][0] + MiB
    mid = tmp_path / "mid"
    with Files(src, mid) as f:
        r = filecopy.copy_extents(f.src, f.dst, start=lo, end=hi, hash=True)
    got = mid.read_bytes()
    assert r.sha256 == hashlib.sha256(content[lo:hi]).hexdigest()
    assert got[lo:hi] == content[lo:hi][:len(got) - lo]
    assert got[:lo] == bytes(lo)
    assert all(a >= lo and b <= hi for a, b in data_extents(mid))


def test_hash_covers_holes_as_zeros_and_is_the_bytes_written(tmp_path: Path,
                                                            monkeypatch) -> None:
    src, dst = tmp_path / "src", tmp_path / "dst"
    make_sparse(src, 40 * MiB + 7, [(5 * MiB, b"x" * 5000), (40 * MiB, b"tail...")])
    calls = []
    monkeypatch.setattr(os, "copy_file_range",
                        lambda *a: calls.append(a) or pytest.fail("hash=True must read itself"))
    r = copy_file(src, dst, hash=True, chunk=MiB)
    assert r.sha256 == hashlib.sha256(src.read_bytes()).hexdigest() == sha(dst)
    assert calls == []
    monkeypatch.undo()
    # Without hash there is no digest.
    assert copy_file(src, tmp_path / "dst2").sha256 is None


def test_empty_file_and_shrinking_destination(tmp_path: Path) -> None:
    src, dst = tmp_path / "src", tmp_path / "dst"
    src.write_bytes(b"")
    r = copy_file(src, dst, hash=True)
    assert r == filecopy.CopyResult(0, 0, hashlib.sha256(b"").hexdigest())
    assert dst.stat().st_size == 0


# -- copy_file_range and its fallback --------------------------------------------------------


def test_copy_file_range_and_fallback_give_identical_results(tmp_path: Path,
                                                             monkeypatch) -> None:
    size, pieces = sparse_layout(trailing_hole=True, size=64 * MiB)
    src = tmp_path / "src"
    make_sparse(src, size, pieces)

    real = os.copy_file_range
    used = []
    monkeypatch.setattr(os, "copy_file_range", lambda *a: used.append(a) or real(*a))
    fast = copy_file(src, tmp_path / "fast", chunk=MiB)
    assert used, "copy_file_range was not used where it works"

    refused = []

    def exdev(*a):
        refused.append(a)
        raise OSError(errno.EXDEV, "cross-device")

    monkeypatch.setattr(os, "copy_file_range", exdev)
    slow = copy_file(src, tmp_path / "slow", chunk=MiB)
    assert len(refused) == 1, "the fallback must be decided once per call, not per chunk"

    assert fast == slow
    assert sha(tmp_path / "fast") == sha(tmp_path / "slow") == sha(src)
    assert data_extents(tmp_path / "fast") == data_extents(tmp_path / "slow")
    assert allocated(tmp_path / "slow") <= allocated(src) + 64 * 1024


def test_other_copy_file_range_errors_are_raised(tmp_path: Path, monkeypatch) -> None:
    src = tmp_path / "src"
    src.write_bytes(b"a" * 10000)

    def eio(*a):
        raise OSError(errno.EIO, "I/O error")

    monkeypatch.setattr(os, "copy_file_range", eio)
    with pytest.raises(OSError) as info:
        copy_file(src, tmp_path / "dst")
    assert info.value.errno == errno.EIO


def test_filesystem_without_seek_data_is_all_data(tmp_path: Path, monkeypatch) -> None:
    src, dst = tmp_path / "src", tmp_path / "dst"
    make_sparse(src, 6 * MiB, [(4 * MiB, b"z" * 4096)])
    real = os.lseek

    def lseek(fd, pos, how):
        if how in (os.SEEK_DATA, os.SEEK_HOLE):
            raise OSError(errno.EINVAL, "unsupported")
        return real(fd, pos, how)

    monkeypatch.setattr(os, "lseek", lseek)
    r = copy_file(src, dst, hash=True)
    assert r.data_bytes == r.size == 6 * MiB
    assert sha(dst) == sha(src) == r.sha256


def test_append_only_destination_is_refused(tmp_path: Path) -> None:
    src = tmp_path / "src"
    src.write_bytes(b"data")
    with Files(src, tmp_path / "dst", os.O_CREAT | os.O_APPEND) as f, pytest.raises(ValueError):
        filecopy.copy_extents(f.src, f.dst)


# -- throttle, stop, progress ----------------------------------------------------------------


def timed_copy(src: Path, dst: Path, **kw) -> float:
    t0 = time.monotonic()
    copy_file(src, dst, chunk=MiB, **kw)
    return time.monotonic() - t0


def test_throttle_limits_the_rate_and_unlimited_is_much_faster(tmp_path: Path) -> None:
    src = tmp_path / "src"
    src.write_bytes(os.urandom(8 * MiB))
    throttled = timed_copy(src, tmp_path / "slow", throttle=Throttle(16 * MiB))
    assert throttled >= 0.4
    assert sha(tmp_path / "slow") == sha(src)
    unlimited = min(timed_copy(src, tmp_path / f"fast{i}", throttle=Throttle(rate))
                    for i, rate in enumerate([None, 0, None]))
    assert unlimited < throttled / 2


def test_one_throttle_shared_by_concurrent_copies_is_a_global_rate(tmp_path: Path) -> None:
    throttle = Throttle(16 * MiB)
    for i in range(2):
        (tmp_path / f"src{i}").write_bytes(os.urandom(4 * MiB))
    errors: list[BaseException] = []

    def run(i: int) -> None:
        try:
            copy_file(tmp_path / f"src{i}", tmp_path / f"dst{i}", throttle=throttle, chunk=MiB)
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(2)]
    t0 = time.monotonic()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    elapsed = time.monotonic() - t0
    assert not errors
    assert elapsed >= 0.4          # 8 MiB together at 16 MiB/s; each alone would need 0.25 s


def test_throttle_consume_sleeps_in_the_caller() -> None:
    t = Throttle(10 * MiB)
    t0 = time.monotonic()
    t.consume(3 * MiB)
    assert time.monotonic() - t0 >= 0.2
    t0 = time.monotonic()
    Throttle(None).consume(1 << 40)
    Throttle(0).consume(1 << 40)
    assert time.monotonic() - t0 < 0.1
    with pytest.raises(ValueError):
        Throttle(-1)


def test_stop_set_from_progress_aborts_the_copy(tmp_path: Path) -> None:
    src, dst = tmp_path / "src", tmp_path / "dst"
    src.write_bytes(os.urandom(16 * MiB))
    stop = threading.Event()
    steps: list[int] = []

    def progress(n: int) -> None:
        steps.append(n)
        stop.set()

    with Files(src, dst) as f, pytest.raises(filecopy.CopyAborted):
        filecopy.copy_extents(f.src, f.dst, stop=stop, progress=progress, chunk=MiB)
    assert steps == [MiB]
    assert allocated(dst) <= 2 * MiB


def test_stop_interrupts_a_throttled_wait(tmp_path: Path) -> None:
    src, dst = tmp_path / "src", tmp_path / "dst"
    src.write_bytes(b"q" * 8 * MiB)
    stop = threading.Event()
    timer = threading.Timer(0.2, stop.set)
    timer.start()
    t0 = time.monotonic()
    try:
        with pytest.raises(filecopy.CopyAborted):
            copy_file(src, dst, throttle=Throttle(MiB), stop=stop)   # would take 8 s
    finally:
        timer.cancel()
    assert time.monotonic() - t0 < 2


def test_progress_reports_every_data_byte_in_chunk_steps(tmp_path: Path) -> None:
    src, dst = tmp_path / "src", tmp_path / "dst"
    make_sparse(src, 20 * MiB, [(0, b"a" * (3 * MiB)), (10 * MiB, b"b" * (2 * MiB + 5))])
    steps: list[int] = []
    r = copy_file(src, dst, progress=steps.append, chunk=MiB)
    assert sum(steps) == r.data_bytes
    assert max(steps) <= MiB and len(steps) >= 5


# -- page cache ---------------------------------------------------------------------------


@pytest.mark.parametrize("hash_,compare", [(False, False), (True, False), (False, True)],
                         ids=["copy_file_range", "read-write", "compare"])
def test_page_cache_stays_bounded(tmp_path: Path, hash_: bool, compare: bool) -> None:
    size = 512 * MiB
    src, dst = tmp_path / "src", tmp_path / "dst"
    block = os.urandom(MiB)
    fd = os.open(src, os.O_WRONLY | os.O_CREAT, 0o600)
    try:
        for off in range(0, size, 8 * MiB):
            os.pwrite(fd, block * 8, off)
        os.fsync(fd)                  # clean pages, still cached
    finally:
        os.close(fd)
    # Positive control: mincore does see a file that was just written.
    assert resident(src) > size // 2
    peak = 0

    def progress(n: int) -> None:
        nonlocal peak
        peak = max(peak, resident(dst))

    r = copy_file(src, dst, progress=progress, hash=hash_, compare=compare)
    assert r.data_bytes == size
    chunk = 8 * MiB
    assert peak <= 2 * chunk, f"{peak >> 20} MiB of the copy cached during the copy"
    assert resident(dst) <= chunk
    assert resident(src) <= chunk


# -- copy_ranges ------------------------------------------------------------------------


def test_copy_ranges_recopies_only_the_given_ranges(tmp_path: Path) -> None:
    src, dst = tmp_path / "src", tmp_path / "dst"
    old = os.urandom(8 * MiB)
    src.write_bytes(old)
    copy_file(src, dst)
    # Writes during the copy: new data in A, a hole punched in B, new data in C
    # (not reported dirty), and an append D.
    a, b, c = (1 * MiB, 100_000), (3 * MiB, 2 * MiB), (6 * MiB, 4096)
    new_a, new_c, tail = os.urandom(a[1]), os.urandom(c[1]), os.urandom(MiB)
    with open(src, "r+b") as f:
        f.seek(a[0])
        f.write(new_a)
        f.seek(c[0])
        f.write(new_c)
        f.seek(8 * MiB)
        f.write(tail)
    punch(src, *b)
    with Files(src, dst, 0) as f:
        n = filecopy.copy_ranges(f.src, f.dst, [b, a, (8 * MiB, MiB)])
    assert n == a[1] + b[1] + MiB  # ranges are copied as data, a hole in one as zeros
    got = dst.read_bytes()
    assert len(got) == 9 * MiB
    assert got[a[0]:a[0] + a[1]] == new_a
    assert got[b[0]:b[0] + b[1]] == bytes(b[1])
    assert got[c[0]:c[0] + c[1]] == old[c[0]:c[0] + c[1]] != new_c     # not a given range
    assert got[8 * MiB:] == tail
    expect = bytearray(src.read_bytes())
    expect[c[0]:c[0] + c[1]] = old[c[0]:c[0] + c[1]]
    assert got == bytes(expect)

    # A shrunk source: dst follows its size.
    os.truncate(src, 2 * MiB)
    with Files(src, dst, 0) as f:
        assert filecopy.copy_ranges(f.src, f.dst, []) == 0
    assert dst.read_bytes() == src.read_bytes()


# -- finish_file, xattrs, same_file ---------------------------------------------------------

CAPS = struct.pack("<IIIII", 0x02000001, 1 << 10, 0, 0, 0)   # v2, effective, cap_net_bind_service


@pytest.mark.root
def test_finish_file_preserves_mode_owner_times_and_capabilities(tmp_path: Path,
                                                                  monkeypatch) -> None:
    src, dst = tmp_path / "src", tmp_path / "dst"
    src.write_bytes(b"exe")
    os.chown(src, 1234, 5678)
    os.chmod(src, 0o4751)          # after chown, which clears set-id bits
    os.utime(src, ns=(1_000_000_123, 2_000_000_456))
    st = os.stat(src)
    assert stat.S_IMODE(st.st_mode) == 0o4751
    fd = os.open(dst, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        os.write(fd, b"exe")
        os.setxattr(fd, "security.capability", CAPS)
        synced = record_fsyncs(monkeypatch)
        treecopy.finish_file(fd, st)
        monkeypatch.undo()
    finally:
        os.close(fd)
    assert synced == {(os.stat(dst).st_dev, os.stat(dst).st_ino)}
    got = os.stat(dst)
    assert stat.S_IMODE(got.st_mode) == 0o4751
    assert (got.st_uid, got.st_gid) == (1234, 5678)
    assert (got.st_atime_ns, got.st_mtime_ns) == (1_000_000_123, 2_000_000_456)
    assert os.getxattr(dst, "security.capability") == CAPS


def test_copy_xattrs_copies_what_it_can(tmp_path: Path) -> None:
    src, dst = tmp_path / "src", tmp_path / "dst"
    src.write_bytes(b"")
    dst.write_bytes(b"")
    os.setxattr(src, "user.one", b"1")
    os.setxattr(src, "user.two", b"\x00binary\xff")
    treecopy.copy_xattrs(str(src), str(dst))
    assert os.getxattr(dst, "user.one") == b"1"
    assert os.getxattr(dst, "user.two") == b"\x00binary\xff"
    # A destination that refuses user.* (a symbolic link): skipped, no error.
    link = tmp_path / "link"
    os.symlink("dst", link)
    treecopy.copy_xattrs(str(src), str(link), follow_symlinks=False)
    assert os.listxattr(link, follow_symlinks=False) == []


def test_same_file(tmp_path: Path) -> None:
    p = tmp_path / "f"
    p.write_bytes(b"abc")
    a = os.stat(p)
    assert treecopy.same_file(a, os.stat(p))
    os.utime(p, ns=(a.st_atime_ns, a.st_mtime_ns + 1))
    assert not treecopy.same_file(a, os.stat(p))
    q = tmp_path / "g"
    q.write_bytes(b"abc")
    os.utime(q, ns=(a.st_atime_ns, a.st_mtime_ns))
    assert not treecopy.same_file(a, os.stat(q))        # another inode


# -- copy_tree ------------------------------------------------------------------------------


def describe(root: Path) -> dict[str, tuple]:
    """Everything copy_tree promises to keep, by path relative to *root*."""
    out: dict[str, tuple] = {}
    inodes: dict[int, list[str]] = {}
    paths = [root]
    for dirpath, dirnames, filenames in os.walk(root):
        paths += [Path(dirpath) / n for n in dirnames + filenames]
    for p in paths:
        rel = os.path.relpath(p, root)
        st = os.lstat(p)
        xattrs = {n: os.getxattr(p, n, follow_symlinks=False)
                  for n in os.listxattr(p, follow_symlinks=False)}
        out[rel] = (stat.S_IFMT(st.st_mode), stat.S_IMODE(st.st_mode), st.st_uid, st.st_gid,
                    st.st_size, st.st_mtime_ns, st.st_rdev, st.st_nlink,
                    os.readlink(p) if stat.S_ISLNK(st.st_mode) else None,
                    sha(p) if stat.S_ISREG(st.st_mode) else None, xattrs)
        if not stat.S_ISDIR(st.st_mode):
            inodes.setdefault(st.st_ino, []).append(rel)
    out["<links>"] = tuple(sorted(tuple(sorted(v)) for v in inodes.values() if len(v) > 1))
    return out


def build_tree(base: Path) -> Path:
    """A container rootfs with one of everything copy_tree handles."""
    t = base / "tree"
    (t / "a" / "b" / "c").mkdir(parents=True)
    (t / "sticky").mkdir()
    (t / "setgid").mkdir()
    make_sparse(t / "a" / "sparse", 64 * MiB, [(0, b"s" * 4096), (40 * MiB, os.urandom(MiB))])
    (t / "a" / "b" / "c" / "deep").write_bytes(b"deep")
    os.symlink("nowhere/at/all", t / "a" / "dangling")
    (base / "outside").write_bytes(b"outside the tree")
    os.symlink("../../outside", t / "a" / "out")
    os.symlink(str(base / "outside"), t / "abs-out")
    (t / "a" / "h1").write_bytes(b"linked")
    os.link(t / "a" / "h1", t / "a" / "b" / "h2")
    os.link(t / "a" / "h1", t / "h3")
    os.mkfifo(t / "fifo", 0o640)
    os.mknod(t / "null", stat.S_IFCHR | 0o666, os.makedev(1, 3))
    (t / "suid").write_bytes(b"#!/bin/sh\n")
    os.chown(t / "suid", 1234, 5678)
    os.chmod(t / "suid", 0o4755)
    (t / "capfile").write_bytes(b"\x7fELF")
    os.setxattr(t / "capfile", "security.capability", CAPS)
    os.setxattr(t / "a" / "h1", "user.note", b"hello")
    os.setxattr(t / "a", "user.dir", b"dir attr")
    os.setxattr(t / "fifo", "trusted.kind", b"fifo")
    os.setxattr(t / "a" / "dangling", "trusted.kind", b"link", follow_symlinks=False)
    os.chown(t / "a" / "dangling", 2345, 6789, follow_symlinks=False)
    os.chown(t / "null", 42, 43)
    os.chown(t / "a" / "b", 3456, 7890)
    os.chmod(t / "sticky", 0o1777)
    os.chmod(t / "setgid", 0o2775)
    os.chmod(t / "a" / "b" / "c", 0o500)
    with socket.socket(socket.AF_UNIX) as s:
        s.bind(str(t / "sock"))
    for i, p in enumerate([t / "a" / "dangling", t / "a" / "out", t / "abs-out"]):
        os.utime(p, ns=(5, 1_500_000_000_000_000_000 + i), follow_symlinks=False)
    for i, p in enumerate([t / "fifo", t / "null", t / "suid", t / "a" / "sparse"]):
        os.utime(p, ns=(7, 1_400_000_000_000_000_000 + i))
    # Directories last, deepest first: any later entry creation would change them.
    for i, p in enumerate([t / "a" / "b" / "c", t / "a" / "b", t / "a", t / "sticky",
                           t / "setgid", t]):
        os.utime(p, ns=(9, 1_300_000_000_000_000_000 + i))
    return t


@pytest.mark.root
def test_copy_tree_keeps_everything(tmp_path: Path, monkeypatch) -> None:
    tree = build_tree(tmp_path)
    before = describe(tree)
    outside = sha(tmp_path / "outside")
    steps: list[int] = []
    synced = record_fsyncs(monkeypatch)
    root = os.open(tmp_path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        r = treecopy.copy_tree(root, "tree", root, "copy", progress=steps.append, compare=True)
    finally:
        os.close(root)
    monkeypatch.undo()
    copy = tmp_path / "copy"
    after = describe(copy)
    assert describe(tree) == before, "the source changed"
    expected = {k: v for k, v in before.items() if k != "sock"}
    assert "sock" in before and "sock" not in after
    assert after == expected
    # The properties one by one, so a failure says which.
    assert os.stat(copy / "a" / "h1").st_ino == os.stat(copy / "a" / "b" / "h2").st_ino \
        == os.stat(copy / "h3").st_ino
    assert stat.S_ISLNK(os.lstat(copy / "a" / "out").st_mode)
    assert stat.S_ISLNK(os.lstat(copy / "abs-out").st_mode)
    assert sha(tmp_path / "outside") == outside
    assert stat.S_ISFIFO(os.lstat(copy / "fifo").st_mode)
    assert os.lstat(copy / "null").st_rdev == os.makedev(1, 3)
    assert stat.S_IMODE(os.lstat(copy / "suid").st_mode) == 0o4755
    assert os.getxattr(copy / "capfile", "security.capability") == CAPS
    assert allocated(copy / "a" / "sparse") <= allocated(tree / "a" / "sparse") + 64 * 1024
    assert os.lstat(copy / "a").st_mtime_ns == os.lstat(tree / "a").st_mtime_ns
    files = [tree / "a" / "sparse", tree / "a" / "b" / "c" / "deep", tree / "a" / "h1",
             tree / "suid", tree / "capfile"]
    assert r.size == sum(os.lstat(p).st_size for p in files)
    assert r.data_bytes == sum(steps) >= MiB + 4096
    assert r.sha256 is None
    # Every file and directory of the copy, and the directory holding it, was fsynced.
    wanted = {(st.st_dev, st.st_ino) for st in map(os.lstat, [copy, *copy.rglob("*")])
              if stat.S_ISREG(st.st_mode) or stat.S_ISDIR(st.st_mode)}
    assert len(wanted) == 11
    assert wanted <= synced
    assert (os.stat(tmp_path).st_dev, os.stat(tmp_path).st_ino) in synced


@pytest.mark.root
def test_copy_tree_refuses_a_symlink_and_an_existing_destination(tmp_path: Path) -> None:
    (tmp_path / "real").mkdir()
    (tmp_path / "real" / "f").write_bytes(b"x")
    os.symlink("real", tmp_path / "link")
    (tmp_path / "taken").mkdir()
    root = os.open(tmp_path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        with pytest.raises(NotADirectoryError):
            treecopy.copy_tree(root, "link", root, "copy")
        assert not (tmp_path / "copy").exists()
        with pytest.raises(FileExistsError):
            treecopy.copy_tree(root, "real", root, "taken")
        assert os.listdir(tmp_path / "taken") == []
        stop = threading.Event()
        stop.set()
        with pytest.raises(filecopy.CopyAborted):
            treecopy.copy_tree(root, "real", root, "stopped", stop=stop)
    finally:
        os.close(root)


# -- a real fscrypt vault ------------------------------------------------------------------


@pytest.mark.root
def test_copies_into_a_real_fscrypt_vault(tmp_path: Path, monkeypatch) -> None:
    size, pieces = sparse_layout(trailing_hole=True, size=64 * MiB)
    outside = tmp_path / "outside-src"
    make_sparse(outside, size, pieces)
    real = os.copy_file_range
    outcomes: list[str] = []

    def recording(*a):
        try:
            n = real(*a)
        except OSError as exc:
            outcomes.append(errno.errorcode[exc.errno])
            raise
        outcomes.append("ok")
        return n

    monkeypatch.setattr(os, "copy_file_range", recording)
    work = tmp_path / "dev"
    work.mkdir()
    with device_root(work, 128) as root:
        vault = root / "vault"
        # Across filesystems: the kernel refuses copy_file_range, the fallback copies.
        r = copy_file(outside, vault / "from-outside", chunk=MiB)
        assert outcomes == ["EXDEV"]
        assert sha(vault / "from-outside") == sha(outside)
        assert r.data_bytes >= sum(len(d) for _, d in pieces)
        assert allocated(vault / "from-outside") <= allocated(outside) + 64 * 1024

        # Same filesystem, novault -> vault (whatever path the kernel allows).
        inside = root / "novault" / "src"
        make_sparse(inside, size, pieces)
        outcomes.clear()
        r = copy_file(inside, vault / "from-novault", hash=True)
        assert sha(vault / "from-novault") == sha(inside) == r.sha256
        copy_file(outside, vault / "compared", compare=True)
        assert sha(vault / "compared") == sha(outside)
        assert allocated(vault / "compared") <= allocated(outside) + 64 * 1024
        outcomes.clear()
        copy_file(inside, vault / "from-novault-cfr")
        assert sha(vault / "from-novault-cfr") == sha(inside)
        assert allocated(vault / "from-novault-cfr") <= allocated(inside) + 64 * 1024
        print("copy_file_range novault -> vault:", sorted(set(outcomes)))
        assert allocated(vault / "from-novault") <= allocated(inside) + 64 * 1024

        # Dirty ranges re-copied into the vault, holes punched there too.
        with open(inside, "r+b") as f:
            f.seek(pieces[2][0])
            f.write(b"rewritten" * 1000)
        punch(inside, 0, MiB)
        with Files(inside, vault / "from-novault", 0) as f:
            filecopy.copy_ranges(f.src, f.dst, [(0, MiB), (pieces[2][0], 9000)])
        assert sha(vault / "from-novault") == sha(inside)

        # A container tree into the vault.
        (root / "novault" / "vol" / "etc").mkdir(parents=True)
        (root / "novault" / "vol" / "etc" / "conf").write_bytes(b"conf")
        os.setxattr(root / "novault" / "vol" / "etc" / "conf", "user.k", b"v")
        os.symlink("etc/conf", root / "novault" / "vol" / "link")
        src_fd = os.open(root / "novault", os.O_RDONLY | os.O_DIRECTORY)
        dst_fd = os.open(vault, os.O_RDONLY | os.O_DIRECTORY)
        try:
            treecopy.copy_tree(src_fd, "vol", dst_fd, "vol", compare=True)
        finally:
            os.close(src_fd)
            os.close(dst_fd)
        assert describe(vault / "vol") == describe(root / "novault" / "vol")


@pytest.mark.root
def test_enospc_is_raised_and_leaves_the_destination_removable(tmp_path: Path) -> None:
    work = tmp_path / "dev"
    work.mkdir()
    with device_root(work, 32) as root:
        vault = root / "vault"
        free = os.statvfs(root).f_bavail * os.statvfs(root).f_frsize
        # Across filesystems (read/write fallback) and within one (copy_file_range).
        big_outside = tmp_path / "big"
        big_outside.write_bytes(b"o" * (free + 4 * MiB))
        inside = root / "novault" / "big"
        inside.write_bytes(b"i" * (free * 6 // 10))
        for src in (big_outside, inside):
            dst = vault / "partial"
            with Files(src, dst) as f:
                with pytest.raises(OSError) as info:
                    filecopy.copy_extents(f.src, f.dst)
                assert info.value.errno == errno.ENOSPC
                assert os.fstat(f.dst).st_size <= os.fstat(f.src).st_size   # fd still usable
                os.ftruncate(f.dst, 0)
            dst.unlink()
        inside.unlink()
        os.sync()
        assert os.statvfs(root).f_bavail * os.statvfs(root).f_frsize >= free - MiB
