"""Benchmark: what one FUSE request costs the daemon, without a kernel.

The end-to-end benchmarks (``views_bench.py``) time requests through the
kernel, whose own cost and noise hide a few per cent in the daemon. This one
calls the handlers of :class:`compatfs.operations.Operations` in-process, the
way pyfuse3 does, on a plain tree of N small files in stage observe, and
reports microseconds per request, the best of several rounds:

- ``lookup`` of every name, then ``getattr`` of every inode;
- ``open`` + ``read`` (4 KiB) + ``release`` of the first 1,000;
- ``opendir`` + ``readdir`` of the directory (a stub token that takes every
  entry), per entry;
- ``forget`` of every inode, in one request, per inode.

Run it from two worktrees to compare commits: ``cd <worktree> &&
PYTHONPATH=$PWD .venv/bin/python bench/handlers_bench.py``. Needs no root.
"""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile
import time
from typing import Any

import pyfuse3
import trio
from benchlib import commit

from compatfs.backing import Backing
from compatfs.index import Index
from compatfs.layout import Layout
from compatfs.operations import Operations
from compatfs.resolver import Resolver
from compatfs.view import View


class Ctx:
    """What the kernel tells a handler about the caller."""

    uid = os.geteuid()
    gid = os.getegid()
    pid = os.getpid()
    umask = 0o022


#: Inodes the stub readdir reply was given (each took a reference to forget).
_LISTED: list[int] = []


def _take_every_entry(token: Any, name: bytes, attrs: Any, next_id: int) -> bool:
    _LISTED.append(attrs.st_ino)
    return True


async def one_round(ops: Operations, img: int, names: list[bytes]) -> dict[str, float]:
    """Seconds per request of each kind, in one round."""
    out: dict[str, float] = {}
    start = time.perf_counter()
    inos = [(await ops.lookup(img, name, Ctx())).st_ino for name in names]
    out["lookup"] = (time.perf_counter() - start) / len(names)

    start = time.perf_counter()
    for ino in inos:
        await ops.getattr(ino, Ctx())
    out["getattr"] = (time.perf_counter() - start) / len(inos)

    start = time.perf_counter()
    for ino in inos[:1000]:
        fi = await ops.open(ino, os.O_RDONLY, Ctx())
        await ops.read(fi.fh, 0, 4096)
        await ops.release(fi.fh)
    out["open + read 4 KiB + release"] = (time.perf_counter() - start) / len(inos[:1000])

    start = time.perf_counter()
    await ops.forget([(ino, 1) for ino in inos])
    out["forget (per inode)"] = (time.perf_counter() - start) / len(inos)

    _LISTED.clear()
    start = time.perf_counter()
    fh = await ops.opendir(img, Ctx())
    await ops.readdir(fh, 0, None)
    await ops.releasedir(fh)
    out["opendir + readdir (per entry)"] = (time.perf_counter() - start) / len(names)
    await ops.forget([(ino, 1) for ino in _LISTED])   # the references readdir took
    return out


async def main_async(files: int, count: int) -> None:
    tmp = tempfile.mkdtemp(prefix="compatfs-handlers-", dir="/var/tmp")
    try:
        os.makedirs(os.path.join(tmp, "img"))
        os.makedirs(os.path.join(tmp, "downloads"))
        names = [f"f{i:06d}".encode() for i in range(files)]
        for name in names:
            with open(os.path.join(tmp, "img", name.decode()), "wb") as f:
                f.write(b"x" * 1024)
        layout = Layout(tmp)
        backing = Backing.open(layout, ("img", "downloads"), create_new=False,
                               require_encrypted=False)
        view = View(layout, backing, Index(None), Resolver(layout), "observe",
                    ("img", "downloads"))
        ops = Operations(view)
        real_reply = pyfuse3.readdir_reply
        pyfuse3.readdir_reply = _take_every_entry  # type: ignore[assignment]  # no kernel
        try:
            img = (await ops.lookup(pyfuse3.ROOT_INODE, b"img", Ctx())).st_ino
            times: dict[str, list[float]] = {}
            for _ in range(count):
                for kind, value in (await one_round(ops, img, names)).items():
                    times.setdefault(kind, []).append(value)
        finally:
            pyfuse3.readdir_reply = real_reply
            ops.close_all()
            backing.close()
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    if ops.faults:
        raise SystemExit(f"{ops.faults} requests failed unexpectedly (see the log)")
    print(f"compatfs: {commit()}; {files:,} files, best of {count} rounds\n")
    print("| request | µs per request |")
    print("|---|---|")
    for kind, values in times.items():
        print(f"| {kind} | {min(values) * 1e6:.2f} |")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--files", type=int, default=5000, help="names in the directory")
    ap.add_argument("--rounds", type=int, default=5, help="rounds; the best is reported")
    args = ap.parse_args()
    trio.run(main_async, args.files, args.rounds)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
