"""Benchmark: ``compatfs plan`` on a device with many legacy objects.

Builds a legacy tree of N objects (default 10,000: VM volumes of several
formats, container volumes, downloads in all three areas, stray files) with a
matching wrapped checkpoint carrying unknown fields and a latch, then runs
``compatfs plan --json`` as a separate process several times and reports
wall time and peak RSS of that process (from wait4's rusage).

    .venv/bin/python bench/plan_bench.py [--objects 10000] [--runs 5]

Targets (issue 2): under 2 s and under 100 MiB peak for 10,000 objects.
"""

from __future__ import annotations

import argparse
import os
import platform
import random
import statistics
import subprocess
import sys
import tempfile
import time

from benchlib import drop_caches

from compatfs.names import DownloadArea, ObjType
from compatfs.testing import devicegen


def build(root: str, n: int, seed: int = 1) -> dict[str, int]:
    rng = random.Random(seed)
    counts = {"vm": int(n * 0.5), "oci": int(n * 0.05), "pending": int(n * 0.1),
              "verifier": int(n * 0.05), "verified": int(n * 0.2)}
    counts["junk"] = n - sum(counts.values())
    apps = []
    formats = ["qcow2", "raw", "vhdx", "vmdk"]
    for i in range(counts["vm"] // 2):
        app = devicegen.AppDef(devicegen.random_uuid(rng), f"app{i}", [
            devicegen.DriveDef(devicegen.random_uuid(rng), devicegen.random_sha(rng),
                               rng.choice(formats), clear_text=rng.random() < 0.2)
            for _ in range(2)], purge=rng.choice([0, 0, 1, 3]))
        apps.append(app)
    pods = [devicegen.AppDef(devicegen.random_uuid(rng), f"pod{i}", [
        devicegen.DriveDef(devicegen.random_uuid(rng), devicegen.random_sha(rng), "container",
                           sha_in_image=False, content_tree=True)]) for i in range(counts["oci"])]
    devicegen.write_device_state(root, apps + pods, wrap=True, rng=rng)
    block = b"\xab" * 4096
    for app in apps:
        for d in range(2):
            devicegen.sparse_file(os.path.join(root, "img", app.legacy_name(d)), 1 << 30,
                                  {0: block})
    for pod in pods:
        path = os.path.join(root, "runx/pods/prepared", pod.legacy_name(0, container=True))
        os.makedirs(os.path.join(path, "rootfs"))
        with open(os.path.join(path, "rootfs", "f"), "wb") as f:
            f.write(block)
    for area in ("pending", "verifier"):
        for _ in range(counts[area]):
            devicegen.download_file(root, rng.choice(list(ObjType)), DownloadArea(area),
                                    devicegen.random_uuid(rng), "image.img", block)
    for _ in range(counts["verified"]):
        data = rng.randbytes(64)
        devicegen.download_file(root, rng.choice(list(ObjType)), DownloadArea.VERIFIED,
                                devicegen.sha_of(data), "image.img", data)
    for i in range(counts["junk"]):
        with open(os.path.join(root, "img", f"junk-{i}.txt"), "wb") as f:
            f.write(b"x")
    return counts


def run_once(root: str, fmt: list[str], cold: bool = False) -> tuple[float, int]:
    if cold:
        drop_caches()
    start = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-m", "compatfs", "plan", "--root", root, *fmt],
                            stdout=subprocess.DEVNULL)
    _, status, rusage = os.wait4(proc.pid, 0)
    elapsed = time.perf_counter() - start
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"compatfs plan failed with status {status}")
    return elapsed, rusage.ru_maxrss * 1024


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--objects", type=int, default=10_000)
    ap.add_argument("--runs", type=int, default=5)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="compatfs-bench-") as root:
        t0 = time.perf_counter()
        counts = build(root, args.objects)
        print(f"built {args.objects} legacy objects {counts} in {time.perf_counter() - t0:.1f} s",
              file=sys.stderr)
        print(f"machine: {platform.machine()}, {os.cpu_count()} cores, Python "
              f"{platform.python_version()}, kernel {platform.release()}")
        print("| output | runs | median wall (s) | max wall (s) | peak RSS (MiB) |")
        print("|---|---|---|---|---|")
        cases = [("--json, warm cache", ["--json"], False), ("table, warm cache", [], False)]
        if os.geteuid() == 0:
            cases.append(("--json, cold cache", ["--json"], True))
        for label, fmt, cold in cases:
            results = [run_once(root, fmt, cold) for _ in range(args.runs)]
            walls = [r[0] for r in results]
            rss = max(r[1] for r in results) / (1 << 20)
            print(f"| {label} | {args.runs} | {statistics.median(walls):.2f} | {max(walls):.2f} "
                  f"| {rss:.1f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
