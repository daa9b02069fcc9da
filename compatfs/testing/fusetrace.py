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
INSTANCE = "compatfs-requests"
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


@contextlib.contextmanager
def counting(buffer_kb: int = 65536) -> Iterator[RequestCounter]:
    """A :class:`RequestCounter` for the duration; tracefs is mounted if it is not."""
    mounted_here = False
    if not os.path.exists(os.path.join(TRACEFS, "instances")):
        subprocess.run(["mount", "-t", "tracefs", "nodev", TRACEFS], check=True)
        mounted_here = True
    base = os.path.join(TRACEFS, "instances", INSTANCE)
    try:
        if not os.path.isdir(base):
            os.mkdir(base)
        if not os.path.isdir(os.path.join(base, EVENT)):
            raise RuntimeError("this kernel has no fuse:fuse_request_send event (Linux 6.16+)")
        counter = RequestCounter(base)
        counter._write("buffer_size_kb", str(buffer_kb))
        counter._write(os.path.join(EVENT, "enable"), "1")
        counter._write("trace", "")
        yield counter
    finally:
        if os.path.isdir(base):
            with contextlib.suppress(OSError):
                with open(os.path.join(base, EVENT, "enable"), "w") as f:
                    f.write("0")
            os.rmdir(base)   # an instance is removed with rmdir, its files with it
        if mounted_here:
            subprocess.run(["umount", TRACEFS], check=False)
