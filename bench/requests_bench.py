"""Where the time of the views' metadata goes: FUSE requests per step, and the daemon's profile.

Builds the same device as ``views_bench.py`` (5,000 small files in the legacy
``img/``, a 64 MiB volume written through its legacy name), mounts compatfs
(stage ``redirect``) and fuse-overlayfs over the same directory, and runs
the metadata benchmark one step at a time: three rounds of ``listdir``, a
``stat`` of every name, and open + read 4 KiB + close of 1,000 of them; then
20,000 random cached 4 KiB ``pread``s of the volume. For each step and each
path it reports the wall time, the FUSE requests the kernel sent, by opcode
(the ``fuse:fuse_request_send`` trace event, Linux 6.16+: see
``compatfs/testing/fusetrace.py``), and the CPU time the daemon spent (user + system, from
``/proc/<pid>/stat``).

``--profile FILE`` runs the compatfs daemon under cProfile (slower: use it
for where the time goes, not for the timings) and prints its top functions;
``--plain`` uses a plain directory tree instead of a device image with an
fscrypt vault. Needs root, ``/dev/fuse``, ``fuse-overlayfs`` and tracefs.

    .venv/bin/python bench/requests_bench.py [--plain] [--profile FILE]
"""

from __future__ import annotations

import argparse
import contextlib
import os
import pstats
import random
import shutil
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable, Iterator

import views_bench
from benchlib import commit, log, run

from compatfs import mounts
from compatfs.testing import daemonproc, fusetrace

MiB = 1 << 20
VOLUME = 64 * MiB
PATHS = ("native", "view", "overlay")


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of *pid* so far."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


@contextlib.contextmanager
def compatfs_mounted(root: str, run_dir: str, config: str,
                     profile: str | None) -> Iterator[daemonproc.Child]:
    # (passed only when asked, so the script also runs against older commits)
    python = {"python": ("-m", "cProfile", "-o", profile)} if profile else {}
    with daemonproc.running(root, run_dir, stage="redirect", config=config,
                            deadline=views_bench.DEADLINE, own_session=True,
                            **python) as child:
        yield child


def steps(directory: str, names: list[str], volume: str) -> list[tuple[str, Callable[[], None]]]:
    some = names[::len(names) // views_bench.SMALL_READS][:views_bench.SMALL_READS]

    def listdir() -> None:
        assert len(os.listdir(directory)) >= len(names)

    def stat_all() -> None:
        for n in names:
            os.stat(os.path.join(directory, n))

    def open_read_close() -> None:
        for n in some:
            fd = os.open(os.path.join(directory, n), os.O_RDONLY)
            os.read(fd, 4096)
            os.close(fd)

    def random_reads() -> None:
        views_bench.random_reads(volume, VOLUME, seed=1)

    out: list[tuple[str, Callable[[], None]]] = []
    for r in range(views_bench.META_ROUNDS):
        out += [(f"round {r + 1}: listdir", listdir),
                (f"round {r + 1}: stat {len(names):,}", stat_all),
                (f"round {r + 1}: open+read+close {len(some):,}", open_read_close)]
    out.append((f"random 4 KiB preads ({views_bench.RANDOM_READS:,}), cached", random_reads))
    return out


def table(rows: list[tuple[str, str, float, float, Counter[str]]]) -> str:
    lines = ["| step | path | wall ms | daemon CPU ms | requests | by opcode |",
             "|---|---|---|---|---|---|"]
    for step, path, wall, cpu, ops in rows:
        by = ", ".join(f"{op} {n:,}" for op, n in ops.most_common()) or "—"
        cpu_s = "—" if path == "native" else f"{cpu * 1000:.0f}"
        req = "—" if path == "native" else f"{sum(ops.values()):,}"
        lines.append(f"| {step} | {path} | {wall * 1000:.1f} | {cpu_s} | {req} | {by} |")
    return "\n".join(lines)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--plain", action="store_true", help="a plain tree, not a device image")
    ap.add_argument("--profile", metavar="FILE", help="run the compatfs daemon under cProfile")
    args = ap.parse_args()
    if os.geteuid() != 0:
        print("requests_bench: needs root (mounts, tracefs)", file=sys.stderr)
        return 2
    profile = os.path.abspath(args.profile) if args.profile else None
    print(f"{views_bench.machine()}\ncommit {commit()}, "
          f"{'plain tree' if args.plain else 'device image with an fscrypt vault'}"
          f"{', daemon under cProfile' if profile else ''}", flush=True)
    bench = tempfile.mkdtemp(prefix="compatfs-requests-", dir="/var/tmp")
    rows: list[tuple[str, str, float, float, Counter[str]]] = []
    try:
        with contextlib.ExitStack() as stack:
            rng = random.Random(20261201)
            root = views_bench.work_root(stack, bench, args.plain, size_mb=1024)
            dev = views_bench.build_device(root, rng, VOLUME)
            config = os.path.join(bench, "compatfs.yaml")
            with open(config, "w") as f:
                f.write(views_bench.CONFIG)
            native_img = stack.enter_context(views_bench.bind_mount(
                os.path.join(root, "img"), os.path.join(bench, "native_img")))
            daemon = stack.enter_context(compatfs_mounted(root, os.path.join(bench, "run"),
                                                          config, profile))
            views_bench.write_file(dev.big_view, VOLUME, views_bench.pattern(rng))
            vol_dir = os.path.dirname(dev.big_native)
            ovl_base = bench if args.plain else os.path.join(root, "vault")
            ovl_vol_proc = stack.enter_context(views_bench.overlay_mounted(
                vol_dir, os.path.join(ovl_base, "ovl_vol")))
            ovl_img_proc = stack.enter_context(views_bench.overlay_mounted(
                native_img, os.path.join(ovl_base, "ovl_img")))
            ovl_vol = os.path.join(ovl_base, "ovl_vol", "mnt")
            ovl_img = os.path.join(ovl_base, "ovl_img", "mnt")
            img = {"native": native_img, "view": os.path.join(root, "img"), "overlay": ovl_img}
            volume = {"native": dev.big_native, "view": dev.big_view,
                      "overlay": os.path.join(ovl_vol, os.path.basename(dev.big_native))}
            pids = {"native": None, "view": daemon.pid, "overlay": ovl_img_proc.pid}
            names = sorted(n for n in os.listdir(native_img) if n.startswith("small-"))
            with fusetrace.counting() as tracer:
                for p in PATHS:
                    conns = ({fusetrace.connection_of(img[p]), fusetrace.connection_of(volume[p])}
                             if p != "native" else set())
                    for step, fn in steps(img[p], names, volume[p]):
                        if step.startswith("random") and p == "overlay":
                            pid = ovl_vol_proc.pid
                        else:
                            pid = pids[p]
                        tracer.counts(conns)
                        cpu0 = cpu_seconds(pid) if pid else 0.0
                        t0 = time.perf_counter()
                        fn()
                        wall = time.perf_counter() - t0
                        cpu = (cpu_seconds(pid) - cpu0) if pid else 0.0
                        ops = sum(tracer.counts(conns).values(), Counter())
                        rows.append((step, p, wall, cpu, ops))
                        log(f"{p} {step}: {wall * 1000:.1f} ms, {sum(ops.values()):,} requests")
                if tracer.lost():
                    print(f"requests_bench: {tracer.lost()} trace events lost; counts are low",
                          file=sys.stderr)
    finally:
        left = [e.mount_point for e in mounts.mount_table()
                if e.mount_point.startswith(bench + "/")]
        for mp in reversed(left):
            run(["umount", "-l", mp], check=False)
        shutil.rmtree(bench, ignore_errors=True)
    rows.sort(key=lambda r: (r[0][-1:] == ")", r[0], PATHS.index(r[1])))
    print(table(rows))
    if profile:
        print()
        pstats.Stats(profile).strip_dirs().sort_stats("tottime").print_stats(30)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
