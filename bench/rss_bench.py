"""Benchmark: the daemon's memory, with no names served and with N legacy names.

Builds a root with N empty files in ``img/`` (``views_bench.build_names_root``:
half volume-grammar names of apps the checkpoint does not know, half stray
names) in a work dir under /var/tmp, then:

1. mounts compatfs (stage ``redirect``) and reads VmRSS of the daemon before
   any request reaches it: the baseline (interpreter, imports, view state);
2. lists ``img/`` and stats every name through the view, then reads VmHWM
   and VmRSS of the daemon (the kernel still holds every inode);
3. mounts fuse-overlayfs on the same ``img/`` and does the same, for reference.

Each figure is the best of ``--runs`` (default 2) mounts. Needs root,
``/dev/fuse``, ``fuse-overlayfs`` and ``fusermount3``; everything mounted is
unmounted and the work dir removed, also on failure.

    PYTHONPATH=$PWD .venv/bin/python bench/rss_bench.py [--names N] [--runs R]
        [--python -X importtime] [--no-overlay]

``--python`` passes interpreter options to the daemon (its stderr, with what
they print, is kept in the run dir and shown with ``--show-log``).
"""

from __future__ import annotations

import argparse
import os
import random
import shutil
import sys
import tempfile
import time

import views_bench
from benchlib import commit, log
from views_bench import CONFIG, build_names_root, overlay_mounted, proc_memory

from compatfs.testing import daemonproc


def list_and_stat(directory: str) -> int:
    listed = os.listdir(directory)
    for n in listed:
        os.stat(os.path.join(directory, n))
    return len(listed)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--names", type=int, default=100_000)
    ap.add_argument("--runs", type=int, default=2)
    ap.add_argument("--no-overlay", action="store_true", help="skip fuse-overlayfs")
    ap.add_argument("--python", nargs=argparse.REMAINDER, default=[],
                    help="interpreter options for the daemon (last on the line)")
    ap.add_argument("--show-log", action="store_true", help="print the daemon's stderr")
    args = ap.parse_args()
    if os.geteuid() != 0:
        print("rss_bench: needs root", file=sys.stderr)
        return 2
    views_bench.RSS_NAMES = args.names
    base = tempfile.mkdtemp(prefix="compatfs-rss-", dir="/var/tmp")
    rows: dict[str, list[float]] = {}
    try:
        root = os.path.join(base, "root")
        config = os.path.join(base, "config.yaml")
        with open(config, "w") as f:
            f.write(CONFIG)
        t0 = time.perf_counter()
        build_names_root(root, random.Random(7))
        log(f"{args.names:,} names built ({time.perf_counter() - t0:.1f} s)")
        img = os.path.join(root, "img")
        # interpreter options only when asked, so the script also measures older commits
        python = {"python": tuple(args.python)} if args.python else {}
        for r in range(args.runs):
            with daemonproc.running(root, os.path.join(base, f"run{r}"), stage="redirect",
                                    config=config, deadline=views_bench.DEADLINE,
                                    own_session=True, **python) as child:
                time.sleep(0.5)   # let the daemon settle after its mounts
                _, base_rss = proc_memory(child.pid)
                t0 = time.perf_counter()
                n = list_and_stat(img)
                secs = time.perf_counter() - t0
                hwm, rss = proc_memory(child.pid)
                if args.show_log and r == 0:
                    print(child.log_text(), file=sys.stderr)
            rows.setdefault("baseline VmRSS", []).append(base_rss)
            rows.setdefault("listed VmHWM", []).append(hwm)
            rows.setdefault("listed VmRSS", []).append(rss)
            rows.setdefault("per name (B)", []).append((rss - base_rss) * 2**20 / max(n, 1))
            log(f"run {r + 1} compatfs: baseline {base_rss:.1f} MiB; {n:,} names listed+stat'ed "
                f"in {secs:.1f} s: VmHWM {hwm:.1f} MiB, VmRSS {rss:.1f} MiB")
            if args.no_overlay:
                continue
            ovl = os.path.join(base, f"ovl{r}")
            with overlay_mounted(img, ovl) as ov:
                n = list_and_stat(os.path.join(ovl, "mnt"))
                hwm, rss = proc_memory(ov.pid)
            rows.setdefault("overlay VmHWM", []).append(hwm)
            rows.setdefault("overlay VmRSS", []).append(rss)
            log(f"run {r + 1} fuse-overlayfs: {n:,} names: VmHWM {hwm:.1f} MiB, "
                f"VmRSS {rss:.1f} MiB")
    finally:
        shutil.rmtree(base, ignore_errors=True)
    print(f"\ncommit {commit()}, {args.names:,} names, best of {args.runs} "
          f"(MiB unless noted)")
    for key, values in rows.items():
        print(f"  {key:<16} {min(values):8.1f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
