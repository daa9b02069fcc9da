"""Benchmark: the legacy views against native access and fuse-overlayfs.

Builds one device under a work dir in /var/tmp (the real disk, not tmpfs): a
checkpoint with one app whose two drives are raw volumes, 5,000 small (1 KiB)
files with non-volume names in the legacy ``img/`` store, then mounts
compatfs in stage ``redirect`` (a config with ``require_encrypted_vault:
false`` allows the plain vault directory) and writes the big test file
through the legacy name of drive 0, so compatfs places its bytes in
``vault/volumes/<volumeUUID>#0.raw``. Every measurement then reads the SAME
bytes three ways, in this order:

- native: ``vault/volumes/<volumeUUID>#0.raw`` directly; for the metadata test
  a bind mount of ``img/`` made before compatfs mounts over it (a bind made
  earlier is not covered by the later mount);
- view: the legacy name through compatfs (``img/<sha>-<appUUID>.raw``);
- overlay: fuse-overlayfs, the reference FUSE peer, with ``vault/volumes``
  (or the bind of ``img/``) as its lower dir and an empty upper dir.

Measurements (1 MiB unbuffered reads and writes):

1. cached sequential read of the big file: one full read to warm, then a
   second full read on the same open file, timed;
2. first read: ``sync`` and ``echo 3 > /proc/sys/vm/drop_caches`` before each
   path's full read;
3. write of 512 MiB plus ``fsync`` to a new file (the view: drive 1's legacy
   name, which the checkpoint maps to ``vault/volumes``; native: a new file in
   ``vault/volumes``; overlay: a new file in the overlay mount), removed after;
4. metadata: 3 rounds of ``os.listdir`` + ``os.stat`` of the 5,000 names and
   open/read/close of 1,000 of them; total time;
5. random 4 KiB ``pread`` at 20,000 aligned offsets (same offsets for every
   path) of the big file after a warming full read, the fastest of 5 passes;
6. daemon memory: a second root with 100,000 legacy names in ``img/`` (half
   with the volume grammar of apps the checkpoint does not know, half stray
   names), mounted, listed and stat'ed through the view, then VmHWM and
   VmRSS of the daemon from ``/proc/<pid>/status``; fuse-overlayfs serving the
   same directory is measured the same way for reference.

The whole set runs twice (``--quick``: once, with a 256 MiB big file and
128 MiB writes); each cell shows the better run, each ratio compares the best
cells (throughput: path / native, higher is better; time: path / native,
lower is better). Needs root, ``/dev/fuse``, ``fuse-overlayfs`` and
``fusermount3``. Everything it mounts is unmounted and its work dir removed,
also on Ctrl-C.

    .venv/bin/python bench/views_bench.py [--quick] [--keep-going]

Targets (the views issue), as ratios to native in the same run: cached read
>= 0.4x, first read >= 0.07x, write+fsync >= 0.9x, metadata <= 10x native
time, random 4 KiB reads reported, daemon RSS <= 80 MiB with 100,000 names.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import os
import pathlib
import platform
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

from benchlib import commit, drop_caches, log, run

from compatfs import mounts
from compatfs.testing import daemonproc, devicegen

MiB = 1 << 20
CHUNK = MiB
DEADLINE = 30.0
PATHS = ("native", "view", "overlay")
SMALL_FILES = 5_000
SMALL_READS = 1_000
META_ROUNDS = 3
RANDOM_READS = 20_000
RANDOM_PASSES = 5
RSS_NAMES = 100_000
CONFIG = "require_encrypted_vault: false\n"


def wait_until(what: str, ready: Callable[[], bool],
               alive: Callable[[], bool] = lambda: True) -> None:
    deadline = time.monotonic() + DEADLINE
    while not ready():
        if not alive():
            raise RuntimeError(f"{what}: the process exited")
        if time.monotonic() > deadline:
            raise RuntimeError(f"{what}: not ready within {DEADLINE:.0f} s")
        time.sleep(0.05)


def proc_memory(pid: int) -> tuple[float, float]:
    """(VmHWM, VmRSS) of *pid* in MiB."""
    fields = {}
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            key, _, value = line.partition(":")
            if key in ("VmHWM", "VmRSS"):
                fields[key] = int(value.split()[0]) / 1024
    return fields["VmHWM"], fields["VmRSS"]


# -- mounts, each torn down by its context manager ------------------------------------

@contextlib.contextmanager
def bind_mount(source: str, target: str) -> Iterator[str]:
    os.makedirs(target, exist_ok=True)
    run(["mount", "--bind", source, target])
    try:
        # private, so the compatfs mount over *source* made later never propagates here
        run(["mount", "--make-private", target])
        yield target
    finally:
        if run(["umount", target], check=False).returncode != 0:
            run(["umount", "-l", target], check=False)


@contextlib.contextmanager
def compatfs_mounted(root: str, run_dir: str, config: str) -> Iterator[daemonproc.Child]:
    """``compatfs mount --foreground`` in stage redirect, until the views answer."""
    # own session: a Ctrl-C reaches only this script, whose finally unmounts
    with daemonproc.running(root, run_dir, stage="redirect", config=config,
                            deadline=DEADLINE, own_session=True) as child:
        yield child


@contextlib.contextmanager
def overlay_mounted(lower: str, base: str) -> Iterator[subprocess.Popen]:
    """fuse-overlayfs (foreground, so its pid is known) over *lower* at ``base/mnt``."""
    upper, work, mnt = (os.path.join(base, d) for d in ("upper", "work", "mnt"))
    for d in (upper, work, mnt):
        os.makedirs(d, exist_ok=True)
    log_path = os.path.join(base, "overlay.log")
    with open(log_path, "wb") as logf:
        proc = subprocess.Popen(["fuse-overlayfs", "-f", "-o",
                                 f"lowerdir={lower},upperdir={upper},workdir={work}", mnt],
                                stdin=subprocess.DEVNULL, stdout=logf, stderr=logf,
                                start_new_session=True)
    try:
        def ready() -> bool:
            e = mounts.mounted_at(mnt)
            return e is not None and e.fstype.startswith("fuse")

        wait_until("fuse-overlayfs", ready, lambda: proc.poll() is None)
        yield proc
    finally:
        if mounts.mounted_at(mnt) is not None:
            if run(["fusermount3", "-u", mnt], check=False).returncode != 0:
                run(["fusermount3", "-u", "-z", mnt], check=False)
        if proc.poll() is None:
            try:
                proc.wait(timeout=DEADLINE)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=DEADLINE)


# -- the device -----------------------------------------------------------------------

@dataclass
class Device:
    root: str
    app: devicegen.AppDef
    big_size: int

    @property
    def big_native(self) -> str:
        return os.path.join(self.root, "vault", "volumes",
                            self.app.drives[0].volume_uuid + "#0.raw")

    @property
    def big_view(self) -> str:
        return os.path.join(self.root, "img", self.app.legacy_name(0))

    @property
    def write_view(self) -> str:
        return os.path.join(self.root, "img", self.app.legacy_name(1))

    @property
    def write_placed(self) -> str:
        return os.path.join(self.root, "vault", "volumes",
                            self.app.drives[1].volume_uuid + "#0.raw")


def pattern(rng: random.Random) -> bytes:
    """16 MiB of random bytes; chunks are slices of it at varying offsets."""
    return rng.randbytes(16 * MiB)


def chunk_at(data: bytes, i: int) -> memoryview:
    off = (i * 7 * 4096) % (len(data) - CHUNK)
    return memoryview(data)[off:off + CHUNK]


def work_root(stack: contextlib.ExitStack, bench: str, plain: bool, size_mb: int) -> str:
    """Where the device is built: a plain directory under *bench*, or (the
    default, as on a device) the root of an ext4 image of *size_mb* on a loop
    device with an fscrypt vault, unmounted when *stack* closes."""
    if plain:
        return os.path.join(bench, "root")
    from compatfs.testing import devicefs

    image_dir = os.path.join(bench, "device")
    os.mkdir(image_dir)
    root = str(stack.enter_context(devicefs.device_root(pathlib.Path(image_dir),
                                                        size_mb=size_mb)))
    log(f"device image with an fscrypt vault mounted at {root}")
    return root


def build_device(root: str, rng: random.Random, big_size: int) -> Device:
    app = devicegen.AppDef(devicegen.random_uuid(rng), "bench", [
        devicegen.DriveDef(devicegen.random_uuid(rng), devicegen.random_sha(rng), "raw",
                           volume_uuid=devicegen.random_uuid(rng)) for _ in range(2)])
    devicegen.write_device_state(root, [app])
    img = os.path.join(root, "img")
    os.makedirs(img)
    os.makedirs(os.path.join(root, "downloads"))
    os.makedirs(os.path.join(root, "vault"), exist_ok=True)
    block = rng.randbytes(1024)
    for i in range(SMALL_FILES):
        with open(os.path.join(img, f"small-{i:05d}.dat"), "wb") as f:
            f.write(block)
    return Device(root, app, big_size)


def build_names_root(root: str, rng: random.Random) -> None:
    """*RSS_NAMES* empty files in img/: half volume-grammar names of unknown apps, half strays."""
    app = devicegen.AppDef(devicegen.random_uuid(rng), "known", [
        devicegen.DriveDef(devicegen.random_uuid(rng), devicegen.random_sha(rng), "raw")])
    devicegen.write_device_state(root, [app])
    img = os.path.join(root, "img")
    os.makedirs(img)
    os.makedirs(os.path.join(root, "downloads"))
    os.makedirs(os.path.join(root, "vault"))
    for i in range(RSS_NAMES):
        if i % 2:
            name = f"{rng.randbytes(32).hex()}-{devicegen.random_uuid(rng)}.qcow2"
        else:
            name = f"stray-{i:06d}.log"
        os.close(os.open(os.path.join(img, name), os.O_WRONLY | os.O_CREAT, 0o644))


def write_file(path: str, size: int, data: bytes, excl: bool = True) -> float:
    """Create *path*, write *size* bytes in 1 MiB writes, fsync; seconds taken."""
    flags = os.O_WRONLY | os.O_CREAT | (os.O_EXCL if excl else os.O_TRUNC)
    start = time.perf_counter()
    fd = os.open(path, flags, 0o600)
    try:
        for i in range(size // CHUNK):
            view = chunk_at(data, i)
            done = 0
            while done < CHUNK:
                done += os.write(fd, view[done:])
        os.fsync(fd)
    finally:
        os.close(fd)
    return time.perf_counter() - start


# -- the measurements -----------------------------------------------------------------

def read_all(f, buf: bytearray) -> int:
    total = 0
    while True:
        n = f.readinto(buf)
        if not n:
            return total
        total += n


def cached_read(path: str, size: int) -> float:
    buf = bytearray(CHUNK)
    with open(path, "rb", buffering=0) as f:
        read_all(f, buf)
        f.seek(0)
        start = time.perf_counter()
        n = read_all(f, buf)
        elapsed = time.perf_counter() - start
    assert n == size, (path, n, size)
    return size / MiB / elapsed


def first_read(path: str, size: int) -> float:
    drop_caches()
    buf = bytearray(CHUNK)
    start = time.perf_counter()
    with open(path, "rb", buffering=0) as f:
        n = read_all(f, buf)
    elapsed = time.perf_counter() - start
    assert n == size, (path, n, size)
    return size / MiB / elapsed


def random_reads(path: str, size: int, seed: int) -> float:
    """Reads per second of the fastest of RANDOM_PASSES timed passes over the same
    offsets, on one open file warmed by a full read (a pass takes a few
    milliseconds, so a single one measures whatever else ran at that moment)."""
    rng = random.Random(seed)
    offsets = [rng.randrange(size // 4096) * 4096 for _ in range(RANDOM_READS)]
    buf = bytearray(CHUNK)
    best = float("inf")
    with open(path, "rb", buffering=0) as f:
        read_all(f, buf)
        fd = f.fileno()
        pread = os.pread
        for _ in range(RANDOM_PASSES):
            start = time.perf_counter()
            for off in offsets:
                pread(fd, 4096, off)
            best = min(best, time.perf_counter() - start)
    return RANDOM_READS / best


def metadata(directory: str, names: list[str]) -> float:
    some = names[::len(names) // SMALL_READS][:SMALL_READS]
    start = time.perf_counter()
    for _ in range(META_ROUNDS):
        listed = os.listdir(directory)
        for n in names:
            os.stat(os.path.join(directory, n))
        for n in some:
            fd = os.open(os.path.join(directory, n), os.O_RDONLY)
            os.read(fd, 4096)
            os.close(fd)
    elapsed = time.perf_counter() - start
    assert len(listed) >= len(names), (directory, len(listed))
    return elapsed


@dataclass
class Results:
    cells: dict[tuple[str, str], list[float]] = field(default_factory=dict)

    def add(self, test: str, path: str, value: float) -> None:
        self.cells.setdefault((test, path), []).append(value)

    def best(self, test: str, path: str, higher: bool) -> float | None:
        vals = self.cells.get((test, path))
        if not vals:
            return None
        return max(vals) if higher else min(vals)


@dataclass(frozen=True)
class Test:
    key: str
    label: str
    unit: str
    higher: bool              # higher is better (throughput) or lower (time, memory)
    target: str
    check: Callable[[float | None, float | None], bool | None]  # (view, view/native) -> met


def _fmt(v: float | None, unit: str) -> str:
    if v is None:
        return "—"
    if unit == "s":
        return f"{v:.3f}"
    if unit == "MiB":
        return f"{v:.1f}"
    return f"{v:,.0f}"


def machine() -> str:
    work_fs = run(["findmnt", "-n", "-o", "FSTYPE,SOURCE", "-T", "/var/tmp"],
                  check=False).stdout.split()
    with open("/proc/meminfo") as f:
        mem = int(f.readline().split()[1]) / (1 << 20)
    return (f"machine: {platform.machine()}, {os.cpu_count()} cores, {mem:.0f} GiB, Python "
            f"{platform.python_version()}, kernel {platform.release()}, work dir /var/tmp on "
            f"{' '.join(work_fs) or '?'}, "
            f"fuse-overlayfs {overlay_version()}\n"
            f"compatfs: {commit()}\n"
            f"date: {datetime.datetime.now().astimezone().isoformat(timespec='seconds')}")


def overlay_version() -> str:
    out = run(["fuse-overlayfs", "--version"], check=False).stdout.split()
    return out[out.index("version") + 1] if "version" in out else "?"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true",
                    help="one run, 256 MiB big file, 128 MiB writes")
    ap.add_argument("--plain", action="store_true",
                    help="a plain directory tree on the work dir's filesystem instead of a "
                         "device image whose vault/ is encrypted with fscrypt (the default, "
                         "as on a device)")
    args = ap.parse_args()
    if os.geteuid() != 0:
        print("views_bench: needs root (mounts, drop_caches)", file=sys.stderr)
        return 2
    for tool in ("fuse-overlayfs", "fusermount3", "mount", "umount", "findmnt"):
        if shutil.which(tool) is None:
            print(f"views_bench: {tool} is missing", file=sys.stderr)
            return 2
    big = (256 if args.quick else 1024) * MiB
    write_size = (128 if args.quick else 512) * MiB
    runs = 1 if args.quick else 2

    # SIGTERM takes the same way out as Ctrl-C: through every finally below
    def on_term(signum, frame):
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, on_term)
    print(machine())
    print(f"big file {big // MiB} MiB, writes {write_size // MiB} MiB, {runs} run(s), "
          f"better run per cell", flush=True)

    bench = tempfile.mkdtemp(prefix="compatfs-views-", dir="/var/tmp")
    results = Results()
    interrupted = False
    try:
        with contextlib.ExitStack() as stack:
            rng = random.Random(20261126)
            data = pattern(rng)
            root = work_root(stack, bench, args.plain, size_mb=6144)
            t0 = time.perf_counter()
            dev = build_device(root, rng, big)
            config = os.path.join(bench, "compatfs.yaml")
            with open(config, "w") as f:
                f.write(CONFIG)
            native_img = stack.enter_context(bind_mount(os.path.join(root, "img"),
                                                        os.path.join(bench, "native_img")))
            daemon = stack.enter_context(compatfs_mounted(root, os.path.join(bench, "run"), config))
            write_file(dev.big_view, big, data)
            if not os.path.isfile(dev.big_native) or os.path.getsize(dev.big_native) != big:
                raise RuntimeError(f"the big file did not land at {dev.big_native}")
            if os.path.exists(os.path.join(native_img, dev.app.legacy_name(0))):
                raise RuntimeError("the big file landed in the legacy store")
            vol_dir = os.path.dirname(dev.big_native)
            # the overlay's upper dirs sit where its writes would land natively:
            # on the device (in the vault) unless the tree is plain
            ovl_base = bench if args.plain else os.path.join(root, "vault")
            stack.enter_context(overlay_mounted(vol_dir, os.path.join(ovl_base, "ovl_vol")))
            stack.enter_context(overlay_mounted(native_img, os.path.join(ovl_base, "ovl_img")))
            ovl_vol = os.path.join(ovl_base, "ovl_vol", "mnt")
            ovl_img = os.path.join(ovl_base, "ovl_img", "mnt")
            log(f"device built, big file written through the view, all mounted "
                f"({time.perf_counter() - t0:.1f} s)")

            big_file = {"native": dev.big_native, "view": dev.big_view,
                        "overlay": os.path.join(ovl_vol, os.path.basename(dev.big_native))}
            new_file = {"native": os.path.join(vol_dir, "native-write#0.raw"),
                        "view": dev.write_view,
                        "overlay": os.path.join(ovl_vol, "overlay-write#0.raw")}
            img_dir = {"native": native_img, "view": os.path.join(root, "img"), "overlay": ovl_img}
            names = sorted(n for n in os.listdir(native_img) if n.startswith("small-"))
            assert len(names) == SMALL_FILES

            for r in range(runs):
                for p in PATHS:
                    v = cached_read(big_file[p], big)
                    results.add("cached", p, v)
                    log(f"run {r + 1} cached read {p}: {v:,.0f} MiB/s")
                for p in PATHS:
                    v = first_read(big_file[p], big)
                    results.add("first", p, v)
                    log(f"run {r + 1} first read {p}: {v:,.0f} MiB/s")
                for p in PATHS:
                    os.sync()
                    secs = write_file(new_file[p], write_size, data)
                    if p == "view" and not os.path.isfile(dev.write_placed):
                        raise RuntimeError(f"the view's write did not land at {dev.write_placed}")
                    os.unlink(new_file[p])
                    results.add("write", p, write_size / MiB / secs)
                    log(f"run {r + 1} write+fsync {p}: {write_size / MiB / secs:,.0f} MiB/s")
                for p in PATHS:
                    v = metadata(img_dir[p], names)
                    results.add("meta", p, v)
                    log(f"run {r + 1} metadata {p}: {v:.3f} s")
                for p in PATHS:
                    v = random_reads(big_file[p], big, seed=r)
                    results.add("random", p, v)
                    log(f"run {r + 1} random 4 KiB {p}: {v:,.0f} ops/s")
            hwm, rss = proc_memory(daemon.pid)
            log(f"bench daemon after the runs: VmHWM {hwm:.1f} MiB, VmRSS {rss:.1f} MiB")

        # daemon memory with 100,000 legacy names, on a root of its own
        root2 = os.path.join(bench, "names")
        t0 = time.perf_counter()
        build_names_root(root2, random.Random(7))
        log(f"{RSS_NAMES:,} legacy names built ({time.perf_counter() - t0:.1f} s)")
        img2 = os.path.join(root2, "img")
        for r in range(runs):
            with compatfs_mounted(root2, os.path.join(bench, "run2"), config) as d2:
                start = time.perf_counter()
                listed = os.listdir(img2)
                for n in listed:
                    os.stat(os.path.join(img2, n))
                secs = time.perf_counter() - start
                assert len(listed) >= RSS_NAMES, len(listed)
                hwm, rss = proc_memory(d2.pid)
            results.add("hwm", "view", hwm)
            results.add("rss", "view", rss)
            log(f"run {r + 1} compatfs with {len(listed):,} names: VmHWM {hwm:.1f} MiB, "
                f"VmRSS {rss:.1f} MiB (listdir+stat {secs:.1f} s)")
            with overlay_mounted(img2, os.path.join(bench, "ovl_names")) as ov:
                mnt = os.path.join(bench, "ovl_names", "mnt")
                listed = os.listdir(mnt)
                for n in listed:
                    os.stat(os.path.join(mnt, n))
                hwm, rss = proc_memory(ov.pid)
            results.add("hwm", "overlay", hwm)
            results.add("rss", "overlay", rss)
            log(f"run {r + 1} fuse-overlayfs with {len(listed):,} names: VmHWM {hwm:.1f} MiB, "
                f"VmRSS {rss:.1f} MiB")
    except KeyboardInterrupt:
        interrupted = True
    finally:
        signal.signal(signal.SIGINT, signal.SIG_IGN)   # the clean-up runs to its end
        left = [e.mount_point for e in mounts.mount_table()
                if e.mount_point.startswith(bench + "/")]
        for mp in reversed(left):
            run(["umount", "-l", mp], check=False)
        left = [e.mount_point for e in mounts.mount_table()
                if e.mount_point.startswith(bench + "/")]
        if left:
            print(f"views_bench: still mounted, {bench} kept: {', '.join(left)}", file=sys.stderr)
        else:
            shutil.rmtree(bench, ignore_errors=True)
        signal.signal(signal.SIGINT, signal.default_int_handler)
    if interrupted:
        print("views_bench: interrupted; what it mounted is unmounted", file=sys.stderr)
        return 130

    def ratio_at_least(limit: float):
        return lambda v, ratio: None if ratio is None else ratio >= limit

    tests = [
        Test("cached", f"cached sequential read, {big // MiB} MiB", "MiB/s", True, ">= 0.4x",
             ratio_at_least(0.4)),
        Test("first", f"first read (caches dropped), {big // MiB} MiB", "MiB/s", True, ">= 0.07x",
             ratio_at_least(0.07)),
        Test("write", f"write {write_size // MiB} MiB + fsync", "MiB/s", True, ">= 0.9x",
             ratio_at_least(0.9)),
        Test("meta", f"metadata: {META_ROUNDS}x (listdir + stat {SMALL_FILES:,}, "
             f"read {SMALL_READS:,})", "s", False, "<= 10x time",
             lambda v, ratio: None if ratio is None else ratio <= 10),
        Test("random", f"random 4 KiB preads, cached ({RANDOM_READS:,})", "ops/s", True,
             "reported", lambda v, ratio: None),
        Test("hwm", f"daemon VmHWM, {RSS_NAMES:,} names listed", "MiB", False, "<= 80 MiB",
             lambda v, ratio: None if v is None else v <= 80),
        Test("rss", f"daemon VmRSS, {RSS_NAMES:,} names listed", "MiB", False, "<= 80 MiB",
             lambda v, ratio: None if v is None else v <= 80),
    ]
    print()
    print("| measurement | unit | native | compatfs view | view / native | fuse-overlayfs "
          "| overlay / native | target (view) | met |")
    print("|---|---|---|---|---|---|---|---|---|")
    for t in tests:
        vals = {p: results.best(t.key, p, t.higher) for p in PATHS}
        nat = vals["native"]
        ratios = {p: (vals[p] / nat if nat and vals[p] is not None else None) for p in PATHS}
        met = t.check(vals["view"], ratios["view"])
        def r(x: float | None) -> str:
            return "—" if x is None else f"{x:.2f}x"

        print(f"| {t.label} | {t.unit} | {_fmt(nat, t.unit)} | {_fmt(vals['view'], t.unit)} "
              f"| {r(ratios['view'])} | {_fmt(vals['overlay'], t.unit)} | {r(ratios['overlay'])} "
              f"| {t.target} | {'—' if met is None else ('yes' if met else '**no**')} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
