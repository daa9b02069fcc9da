"""Counting the FUSE requests the kernel sends to one mount, by opcode.

Linux 6.16 and later trace every request the kernel queues for a FUSE daemon
(the ``fuse:fuse_request_send`` event, with the connection's device number
and the opcode). :class:`RequestCounter` enables that event in a tracing
instance of its own (so it disturbs no other tracer), and
:meth:`RequestCounter.counts` reads and clears what was traced: a ``Counter``
of opcode names for the connections asked about. Needs root and tracefs.
"""

from __future__ import annotations

import contextlib
import os
import re
import subprocess
from collections import Counter
from collections.abc import Iterator

TRACEFS = "/sys/kernel/tracing"
INSTANCE = "compatfs-requests"   # plus the pid: several counters may run at once
EVENT = "events/fuse/fuse_request_send"
_LINE = re.compile(r"connection (\d+) req \d+ opcode \d+ \((\w+)\)")


def connection_of(path: str) -> int:
    """The FUSE connection serving *path*, numbered as the kernel traces it
    (its superblock's device number in the kernel's own encoding)."""
    dev = os.stat(path).st_dev
    return (os.major(dev) << 20) | os.minor(dev)


class RequestCounter:
    """The requests queued for some FUSE connections since the last :meth:`counts`."""

    def __init__(self, base: str) -> None:
        self.base = base

    def _write(self, rel: str, text: str) -> None:
        with open(os.path.join(self.base, rel), "w") as f:
            f.write(text)

    def counts(self, connections: set[int]) -> dict[int, Counter[str]]:
        """Per connection, how many requests of each opcode (``LOOKUP``, ``READ``...)."""
        out: dict[int, Counter[str]] = {c: Counter() for c in connections}
        with open(os.path.join(self.base, "trace")) as f:
            for line in f:
                m = _LINE.search(line)
                if m and int(m.group(1)) in out:
                    out[int(m.group(1))][m.group(2).removeprefix("FUSE_")] += 1
        self._write("trace", "")   # opened for writing with O_TRUNC: clears the buffer
        return out

    def lost(self) -> int:
        """Events dropped because the buffer was full (then the counts are low)."""
        total = 0
        for cpu in os.listdir(os.path.join(self.base, "per_cpu")):
            with open(os.path.join(self.base, "per_cpu", cpu, "stats")) as f:
                for line in f:
                    if line.startswith("overrun:"):
                        total += int(line.split()[1])
        return total


def unavailable() -> str | None:
    """Why requests cannot be counted here, or None when they can (needs root and tracefs)."""
    if os.geteuid() != 0:
        return "counting FUSE requests needs root (tracefs)"
    if not os.path.isdir("/sys/kernel/tracing"):
        return "this kernel has no tracefs"
    with contextlib.suppress(OSError):
        if os.path.isdir(os.path.join(TRACEFS, "instances")):
            return None if os.path.isdir(os.path.join(TRACEFS, EVENT)) else _NO_EVENT
        with _tracefs():
            return None if os.path.isdir(os.path.join(TRACEFS, EVENT)) else _NO_EVENT
    return "tracefs cannot be mounted"


_NO_EVENT = "this kernel has no fuse:fuse_request_send trace event (Linux 6.16 and later have it)"


@contextlib.contextmanager
def _tracefs() -> Iterator[None]:
    """tracefs mounted at its usual place for the duration, if it is not already;
    unmounted after only if this mounted it and no other counter still uses it."""
    if os.path.isdir(os.path.join(TRACEFS, "instances")):
        yield
        return
    subprocess.run(["mount", "-t", "tracefs", "nodev", TRACEFS], check=True,
                   capture_output=True)
    try:
        yield
    finally:
        others = [n for n in os.listdir(os.path.join(TRACEFS, "instances"))
                  if n.startswith(INSTANCE)]
        if not others:
            subprocess.run(["umount", TRACEFS], check=False, capture_output=True)


@contextlib.contextmanager
def counting(buffer_kb: int = 65536) -> Iterator[RequestCounter]:
    """A :class:`RequestCounter` for the duration, in a tracing instance of its own."""
    with _tracefs():
        base = os.path.join(TRACEFS, "instances", f"{INSTANCE}-{os.getpid()}")
        if not os.path.isdir(base):
            os.mkdir(base)
        try:
            if not os.path.isdir(os.path.join(base, EVENT)):
                raise RuntimeError(_NO_EVENT)
            counter = RequestCounter(base)
            counter._write("buffer_size_kb", str(buffer_kb))
            counter._write(os.path.join(EVENT, "enable"), "1")
            counter._write("trace", "")
            yield counter
        finally:
            with contextlib.suppress(OSError):
                with open(os.path.join(base, EVENT, "enable"), "w") as f:
                    f.write("0")
            os.rmdir(base)   # an instance is removed with rmdir, its files with it
