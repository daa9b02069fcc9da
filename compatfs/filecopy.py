"""Where bytes of one file are moved: the only code that copies file data.

Everything here is blocking and meant to run in a worker thread. Files are
copied extent by extent (``SEEK_DATA``/``SEEK_HOLE``), so holes stay holes;
data moves with ``copy_file_range(2)`` when the kernel can do it and with
``pread``/``pwrite`` through one reusable buffer when it cannot (across
filesystems, or wherever it answers ``EXDEV``, ``EINVAL``, ``ENOSYS`` or
``EOPNOTSUPP``). After every ``chunk`` bytes of data a copy pays its
:class:`~compatfs.throttle.Throttle`, checks its stop event, reports
progress, and pushes what it wrote to disk and out of the page cache
(``fdatasync`` then ``POSIX_FADV_DONTNEED`` on both files), so copying a
20 GiB volume never floods the page cache. A copy can read every piece back
and compare it (:class:`CopyMismatch`), or hash what it moved.

The functions use ``lseek(2)`` on the source fd (moving its file offset) and
``pread``/``pwrite`` everywhere else; a destination opened with ``O_APPEND``
is refused (``pwrite`` would append). Metadata (mode, owner, xattrs, times)
and whole trees are :mod:`compatfs.treecopy`'s.
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import hashlib
import logging
import os
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass

from .throttle import Throttle

log = logging.getLogger(__name__)

DEFAULT_CHUNK = 8 << 20

#: copy_file_range errors that mean "this pair of files cannot do it": use read/write.
_NO_COPY_FILE_RANGE = frozenset({errno.EXDEV, errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP,
                                 errno.ENOTSUP})

_ZEROS = bytes(1 << 20)  # fed to the hasher for holes, one slice at a time

_FALLOC_FL_KEEP_SIZE = 0x01
_FALLOC_FL_PUNCH_HOLE = 0x02
_libc = ctypes.CDLL(None, use_errno=True)
_fallocate = getattr(_libc, "fallocate64", None) or _libc.fallocate
_fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64]
_fallocate.restype = ctypes.c_int


class CopyAborted(Exception):
    """The stop event was set while a copy was running; the destination is partial."""


class CopyMismatch(OSError):
    """Bytes read back from the destination differ from the source bytes written there."""

    def __init__(self, offset: int, length: int) -> None:
        super().__init__(errno.EIO, f"the copy reads back different from its source in "
                                    f"[{offset}, {offset + length})")



@dataclass
class CopyResult:
    """What a copy moved: logical size, data bytes (holes excluded), optional digest."""

    size: int
    data_bytes: int
    sha256: str | None = None


# -- extents --------------------------------------------------------------------------


def _extents(fd: int, start: int, end: int) -> Iterator[tuple[int, int]]:
    """(offset, length) of every data extent of *fd* in [start, end), lazily.

    A filesystem without ``SEEK_DATA`` (``EINVAL``) has one extent: all of it.
    """
    off = start
    while off < end:
        try:
            data = os.lseek(fd, off, os.SEEK_DATA)
        except OSError as exc:
            if exc.errno == errno.ENXIO:      # no data at or after off (or off past EOF)
                return
            if exc.errno == errno.EINVAL:
                log.debug("fd %d: no SEEK_DATA, copying [%d, %d) as data", fd, off, end)
                yield off, end - off
                return
            raise
        if data >= end:
            return
        try:
            hole = os.lseek(fd, data, os.SEEK_HOLE)
        except OSError as exc:
            if exc.errno != errno.ENXIO:      # ENXIO: truncated meanwhile; data to end
                raise
            hole = end
        hole = min(hole, end)
        if hole <= data:                      # cannot happen; never loop forever
            hole = end
        yield data, hole - data
        off = hole


def _punch_hole(fd: int, off: int, length: int) -> None:
    """Make [off, off+length) of *fd* read as zeros, deallocating it where possible."""
    if length <= 0:
        return
    if _fallocate(fd, _FALLOC_FL_PUNCH_HOLE | _FALLOC_FL_KEEP_SIZE, off, length) == 0:
        return
    err = ctypes.get_errno()
    if err not in (errno.EOPNOTSUPP, errno.ENOTSUP, errno.ENOSYS, errno.EINVAL):
        raise OSError(err, os.strerror(err))
    end = min(off + length, os.fstat(fd).st_size)   # past EOF already reads as zeros
    while off < end:
        off += os.pwrite(fd, memoryview(_ZEROS)[:min(len(_ZEROS), end - off)], off)


def _fadvise_dontneed(fd: int, off: int, length: int) -> None:
    """Drop the clean cached pages of [off, off+length) of *fd* (advice only)."""
    try:
        os.posix_fadvise(fd, off, length, os.POSIX_FADV_DONTNEED)
    except OSError as exc:
        log.debug("posix_fadvise(%d) failed: %s", fd, exc)


# -- the mover --------------------------------------------------------------------------


class Mover:
    """Moves data between fds in steps of `chunk` bytes; one per public call.

    Holds what must be decided once per call (copy_file_range or read/write),
    the reusable buffer, the hasher and the running totals.
    """

    def __init__(self, *, throttle: Throttle | None, stop: threading.Event | None,
                 progress: Callable[[int], None] | None, chunk: int, hash: bool,
                 compare: bool = False) -> None:
        if chunk <= 0:
            raise ValueError(f"chunk must be positive, not {chunk}")
        self.throttle = throttle
        self.stop = stop
        self.progress = progress
        self.chunk = chunk
        self.hasher = hashlib.sha256() if hash else None
        self.compare = compare
        self.use_cfr = not (hash or compare)   # both need the bytes in hand
        self.data_bytes = 0
        self._buf: memoryview | None = None
        self._back: bytearray | None = None    # what dst reads back, when comparing
        self._step = 0                # data bytes in the current step
        self._lo: int | None = None   # range touched in the current step
        self._hi = 0

    # -- per step ---------------------------------------------------------------
    def check_stop(self) -> None:
        """Raise :class:`CopyAborted` if the stop event is set."""
        if self.stop is not None and self.stop.is_set():
            raise CopyAborted("stop requested")

    def _pay(self, n: int) -> None:
        """Throttle for *n* bytes; a stop event set meanwhile ends the wait."""
        if self.throttle is None:
            return
        delay = self.throttle.reserve(n)
        if delay <= 0:
            return
        if self.stop is None:
            time.sleep(delay)
        elif self.stop.wait(delay):
            raise CopyAborted("stop requested")

    def flush(self, src_fd: int, dst_fd: int, *, synced: bool = False) -> None:
        """End the current step: data on disk, out of the page cache, progress told.

        *synced*: the caller has just fsynced dst, no need to fdatasync it again.
        """
        if self._lo is None:
            return
        lo, hi, done = self._lo, self._hi, self._step
        self._lo, self._hi, self._step = None, 0, 0
        if not synced:
            os.fdatasync(dst_fd)
        _fadvise_dontneed(dst_fd, lo, hi - lo)
        _fadvise_dontneed(src_fd, lo, hi - lo)
        if self.progress is not None and done:
            self.progress(done)

    # -- data -------------------------------------------------------------------
    def _buffer(self) -> memoryview:
        """The read/write buffer, allocated once per call and only when needed."""
        if self._buf is None:
            self._buf = memoryview(bytearray(self.chunk))
        return self._buf

    def _move(self, src_fd: int, dst_fd: int, off: int, length: int) -> int:
        """Copy [off, off+length) at the same offsets; fewer bytes only at src's EOF."""
        done = 0
        while self.use_cfr and done < length:
            try:
                n = os.copy_file_range(src_fd, dst_fd, length - done, off + done, off + done)
            except OSError as exc:
                if exc.errno not in _NO_COPY_FILE_RANGE:
                    raise
                log.debug("copy_file_range(%d -> %d): %s; reading and writing instead",
                          src_fd, dst_fd, errno.errorcode.get(exc.errno, exc.errno))
                self.use_cfr = False
                break
            if n == 0:
                return done
            done += n
        if done == length:
            return done
        buf = self._buffer()
        while done < length:
            want = min(length - done, len(buf))
            n = os.preadv(src_fd, [buf[:want]], off + done)
            if n == 0:
                return done
            written = 0
            while written < n:
                w = os.pwrite(dst_fd, buf[written:n], off + done + written)
                if w <= 0:
                    raise OSError(errno.EIO, "pwrite wrote nothing")
                written += w
            if self.compare:
                self._compare(dst_fd, buf, n, off + done)
            if self.hasher is not None:
                self.hasher.update(buf[:n])
            done += n
        return done

    def _compare(self, dst_fd: int, buf: memoryview, n: int, off: int) -> None:
        """Read [off, off+n) of dst back and compare it with buf[:n], what was written.

        The read is served by dst's page cache (the pages just written, in
        clear text on an encrypted directory too), so it costs a memory copy
        and a memcmp, not a decryption; what it checks is that dst now holds
        the source's bytes at the source's offsets.
        """
        if self._back is None:
            self._back = bytearray(self.chunk)
        back = self._back
        got = os.preadv(dst_fd, [memoryview(back)[:n]], off)
        # bytearray == buffer is one memcmp; compare slices only when short
        same = got == n and (back == buf if n == len(back) else back[:n] == buf[:n])
        if not same:
            raise CopyMismatch(off, n)

    def _data(self, src_fd: int, dst_fd: int, start: int, end: int) -> int:
        """Copy the data extent [start, end) in steps; where it ended (< end at EOF)."""
        off = start
        while off < end:
            piece = min(end - off, self.chunk - self._step)
            self.check_stop()
            self._pay(piece)
            n = self._move(src_fd, dst_fd, off, piece)
            if n:
                self._lo = off if self._lo is None else min(self._lo, off)
                self._hi = max(self._hi, off + n)
                self._step += n
                self.data_bytes += n
            off += n
            if n < piece:
                return off
            if self._step >= self.chunk:
                self.flush(src_fd, dst_fd)
        return off

    def _hole(self, dst_fd: int, start: int, end: int, punch: bool) -> None:
        """[start, end) is a hole in src: punch it in dst if asked, hash it as zeros."""
        if punch:
            _punch_hole(dst_fd, start, end - start)
        if self.hasher is None:
            return
        off, since_check = start, 0
        while off < end:
            n = min(end - off, len(_ZEROS))
            self.hasher.update(memoryview(_ZEROS)[:n])
            off += n
            since_check += n
            if since_check >= self.chunk:
                since_check = 0
                self.check_stop()

    def copy(self, src_fd: int, dst_fd: int, start: int, end: int, *, punch: bool = False,
             flush: bool = True) -> None:
        """Copy [start, end) of src into dst at the same offsets, holes kept as holes.

        With *punch*, src's holes are punched into dst (dst held old data
        there); otherwise dst is expected to hold nothing in the range. If src
        turns out shorter than *end*, the rest is treated as a hole. Without
        *flush*, the last step is left for the caller to :meth:`flush`.
        """
        pos = start
        for off, length in _extents(src_fd, start, end):
            if off > pos:
                self._hole(dst_fd, pos, off, punch)
            reached = self._data(src_fd, dst_fd, off, off + length)
            pos = reached
            if reached < off + length:
                break
        if pos < end:
            self._hole(dst_fd, pos, end, punch)
        if flush:
            self.flush(src_fd, dst_fd)

    def hexdigest(self) -> str | None:
        """The digest of everything hashed so far, or None without hashing."""
        return None if self.hasher is None else self.hasher.hexdigest()


def _refuse_append(fd: int) -> None:
    """Raise if *fd* is opened with O_APPEND (pwrite would ignore its offset)."""
    if fcntl.fcntl(fd, fcntl.F_GETFL) & os.O_APPEND:
        raise ValueError("destination fd is opened with O_APPEND")


# -- files ------------------------------------------------------------------------------


def copy_extents(src_fd: int, dst_fd: int, *, start: int = 0, end: int | None = None,
                 throttle: Throttle | None = None, stop: threading.Event | None = None,
                 hash: bool = False, compare: bool = False,
                 progress: Callable[[int], None] | None = None,
                 chunk: int = DEFAULT_CHUNK) -> CopyResult:
    """Copy [start, end or EOF) of src into dst at the same offsets, holes kept as holes.

    dst must be empty in that range (a new file, or one holding data only
    elsewhere). The source size is taken once, at the start; with *end* None
    dst is truncated to it at the end. *progress* gets the data bytes of each
    step; *throttle* is paid for data bytes only (holes cost no I/O). With
    *hash*, data is read and written here and ``sha256`` is the digest of the
    logical content of the range (holes as zeros), which is what dst now holds
    there. With *compare*, every piece written is read back from dst and
    compared with the source bytes (:class:`CopyMismatch` if they differ).
    Raises :class:`CopyAborted` when *stop* is set before a step and
    ``OSError`` (e.g. ``ENOSPC``) as the kernel reports it; either way dst is
    left partial and open, for the caller to remove.
    """
    if start < 0 or (end is not None and end < start):
        raise ValueError(f"bad range [{start}, {end})")
    _refuse_append(dst_fd)
    size = os.fstat(src_fd).st_size
    stop_at = size if end is None else min(end, size)
    mover = Mover(throttle=throttle, stop=stop, progress=progress, chunk=chunk, hash=hash,
                   compare=compare)
    if start < stop_at:
        mover.copy(src_fd, dst_fd, start, stop_at)
    if end is None:
        os.ftruncate(dst_fd, size)
    return CopyResult(size=max(0, stop_at - start), data_bytes=mover.data_bytes,
                      sha256=mover.hexdigest())


def sha256_of(fd: int, *, throttle: Throttle | None = None,
              stop: threading.Event | None = None, chunk: int = DEFAULT_CHUNK) -> str:
    """SHA-256 of the logical content of *fd* (holes count as zeros), reading only
    its data extents: holes are hashed from a zero buffer, never read. Every
    *chunk* read pays the throttle, honours *stop* and is dropped from the page
    cache, so reading a copy back costs what its data costs and no more."""
    size = os.fstat(fd).st_size
    mover = Mover(throttle=throttle, stop=stop, progress=None, chunk=chunk, hash=True)
    hasher = mover.hasher
    assert hasher is not None
    buf = mover._buffer()
    pos = 0
    for off, length in _extents(fd, 0, size):
        if off > pos:
            mover._hole(fd, pos, off, punch=False)
        end = off + length
        while off < end:
            mover.check_stop()
            want = min(end - off, len(buf))
            mover._pay(want)
            n = os.preadv(fd, [buf[:want]], off)
            if n == 0:
                break
            hasher.update(buf[:n])
            _fadvise_dontneed(fd, off, n)
            off += n
        pos = off
    if pos < size:
        mover._hole(fd, pos, size, punch=False)
    return hasher.hexdigest()


def _merged(ranges: Iterable[tuple[int, int]]) -> list[tuple[int, int]]:
    """The (start, end) union of (offset, length) *ranges*, sorted."""
    spans = []
    for off, length in ranges:
        if off < 0 or length < 0:
            raise ValueError(f"bad range ({off}, {length})")
        if length:
            spans.append((off, off + length))
    spans.sort()
    merged: list[tuple[int, int]] = []
    for a, b in spans:
        if merged and a <= merged[-1][1]:
            merged[-1] = (merged[-1][0], max(merged[-1][1], b))
        else:
            merged.append((a, b))
    return merged


def copy_ranges(src_fd: int, dst_fd: int, ranges: Iterable[tuple[int, int]]) -> int:
    """Re-copy the (offset, length) *ranges* of src over dst, then give dst src's size.

    The ranges are what was written since a copy began, so they are copied
    as data without probing for holes (a guest's writes leave thousands of
    small ranges; one lseek pair per range would cost more than the copy).
    Parts of dst outside the ranges are untouched. Returns the data bytes
    copied.
    """
    _refuse_append(dst_fd)
    size = os.fstat(src_fd).st_size
    mover = Mover(throttle=None, stop=None, progress=None, chunk=DEFAULT_CHUNK, hash=False)
    for a, b in _merged(ranges):
        b = min(b, size)
        if a < b:
            mover._data(src_fd, dst_fd, a, b)
    mover.flush(src_fd, dst_fd)
    os.ftruncate(dst_fd, size)
    return mover.data_bytes
