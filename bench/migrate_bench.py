"""Benchmark: the migration engine on a device image with a real fscrypt vault.

Every part runs on a fresh device from :func:`compatfs.testing.devicefs.device_root`
(a sparse ext4 image in /var/tmp, on the real disk, attached to a loop device,
``vault/`` encrypted with fscrypt). The loop device is switched to direct I/O
(``losetup --direct-io=on``) so that, as on a real disk, there is no second
page cache of the image file underneath the filesystem (``--buffered-loop``
keeps the default buffered loop). Caches are dropped (``sync; echo 3 >
/proc/sys/vm/drop_caches``) before every timed run. Legacy files are built once
per device in ``bench-stash/`` (outside every layout location) and copied
(``cp -a --sparse=always``, untimed) into their legacy places before each run,
so every run reads the same bytes from a fresh file. (Not hard links: compatfs
does not move a file that has more than one name.)

1. Throughput: a mix of 2 sparse raw disks (2 GiB apparent, 256 MiB of data
   each), 2 qcow2 files (``qemu-img create -f qcow2``, then ``qemu-io -c
   'write -P 0x5a 0 128M'``), 20 verified downloads of 4 MiB (their sha
   directory is their real sha256) and 4 pending downloads of 16 MiB. Timed,
   each including a final ``sync``: ``cp -r --sparse=always img downloads
   vault/bench-cp/`` (the reference, removed after), ``compatfs migrate
   --root R --now`` with ``migration: {throttle_mib_per_s: 0}`` (verify on,
   the default: every piece compared as it is written) and the same with
   ``verify: false`` and ``verify: readback`` (the whole copy re-read from
   disk). The ratio is cp time /
   compatfs time (1.0 = as fast as cp). Two rounds (the second in reverse
   order), the better time per cell.
2. Foreground reads during migration: a 1 GiB volume already migrated (its
   legacy name resolves to ``vault/volumes``) and 3 GiB of other legacy
   volumes still to migrate. ``compatfs mount --stage migrate`` with the
   default configuration (throttle 16 MiB/s, verify on, concurrency 2); the
   1 GiB file is read once natively and once through its legacy name (warm),
   then read in full (open, 1 MiB reads, close) through its legacy name over
   and over while the migration runs, then again once it has finished (idle),
   and for reference while ``cp --sparse=always`` + ``sync`` copy the same data.
   Ratio: MiB/s over all reads (bytes read / time spent reading) during / idle;
   the medians per read are reported too.
3. Page cache: 2 x 2 GiB of real data migrated by ``compatfs migrate --now``
   (throttle 0; verify on, then verify off), and for reference ``cp
   --sparse=always`` of the same files; ``Cached:`` and ``Dirty:`` of
   /proc/meminfo are sampled every 0.1 s after a drop_caches, together with
   the resident pages (``mincore``) of the files copied (sources, copies and
   compatfs' index), which no other process on the machine can inflate; a
   control window (60 s, this script idle) shows what the rest of the machine
   adds to ``Cached:`` meanwhile. The target is judged on both.

Needs root, loop devices, /dev/fuse, ``qemu-img``/``qemu-io``. Everything it
mounts, attaches and writes is removed, also on Ctrl-C and SIGTERM.

    .venv/bin/python bench/migrate_bench.py [--quick] [--buffered-loop]

Targets (the migration issue): compatfs at least 0.9x the speed of cp
(cp time / compatfs time >= 0.9); cached reads during migration at least 0.7x
of idle; page cache growth while migrating 4 GiB at most 256 MiB.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import datetime
import mmap
import os
import pathlib
import platform
import random
import resource
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

from benchlib import commit, drop_caches, log, run

from compatfs import mounts
from compatfs.backing import NEW_STORES, own_location
from compatfs.layout import Layout
from compatfs.migration import tmp_leaf
from compatfs.names import DownloadArea, ObjType
from compatfs.stores import STAGING_DIR
from compatfs.testing import daemonproc, devicefs, devicegen

MiB = 1 << 20
GiB = 1 << 30
CHUNK = MiB
DEADLINE = 30.0
SAMPLE_S = 0.1
STASH = "bench-stash"
INDEX_FILES = ("index.db", "index.db-wal", "index.db-shm")
#: The target layout the configs name (``--layout``); None: the commit's default.
LAYOUT: str | None = None

UNLIMITED = "migration:\n  throttle_mib_per_s: 0\n"
UNLIMITED_NOVERIFY = "migration:\n  throttle_mib_per_s: 0\n  verify: false\n"
UNLIMITED_READBACK = "migration:\n  throttle_mib_per_s: 0\n  verify: readback\n"


def meminfo() -> dict[str, int]:
    """/proc/meminfo in bytes."""
    out = {}
    with open("/proc/meminfo") as f:
        for line in f:
            key, _, value = line.partition(":")
            parts = value.split()
            if parts:
                out[key] = int(parts[0]) * 1024
    return out


# -- children: each in its own session (Ctrl-C reaches only this script), killed
# -- by its pid if this script is interrupted while it runs

#: (user, system) CPU seconds of the last child run_child waited for
LAST_CPU = (0.0, 0.0)


def run_child(argv: list[str], timeout: float | None = None) -> tuple[int, float, str]:
    """Run *argv* to its end; (exit status, seconds, stderr+stdout)."""
    global LAST_CPU
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        out, _ = proc.communicate(timeout=timeout)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    LAST_CPU = (after.ru_utime - before.ru_utime, after.ru_stime - before.ru_stime)
    return proc.returncode, time.perf_counter() - start, out


def compatfs_argv(*args: str) -> list[str]:
    return [sys.executable, "-m", "compatfs", *args]


# -- resident pages of one file -------------------------------------------------------

_libc = ctypes.CDLL(None, use_errno=True)
_libc.mmap.restype = ctypes.c_void_p
_libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int,
                       ctypes.c_int, ctypes.c_long]
_libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
_libc.mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_char_p]
_PAGE = os.sysconf("SC_PAGE_SIZE")
_MAP_FAILED = ctypes.c_void_p(-1).value


def resident(path: str) -> int:
    """Bytes of *path* in the page cache (mincore of a mapping never touched), 0 if absent."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW)
    except (FileNotFoundError, NotADirectoryError):
        return 0
    try:
        size = os.fstat(fd).st_size
        if size == 0:
            return 0
        addr = _libc.mmap(None, size, mmap.PROT_READ, mmap.MAP_SHARED, fd, 0)
        if addr in (None, _MAP_FAILED):
            raise OSError(ctypes.get_errno(), f"mmap {path}")
        try:
            vec = ctypes.create_string_buffer((size + _PAGE - 1) // _PAGE)
            if _libc.mincore(addr, size, vec) != 0:
                raise OSError(ctypes.get_errno(), f"mincore {path}")
            return vec.raw.count(1) * _PAGE
        finally:
            _libc.munmap(addr, size)
    finally:
        os.close(fd)


class Sampler:
    """Cached:/Dirty: every SAMPLE_S, and the resident bytes of some files as often as
    a second thread can (mincore of GiB-sized files takes a while)."""

    def __init__(self, files: Callable[[], list[str]], image: str | None) -> None:
        self.files = files
        self.image = image
        self.stop = threading.Event()
        base = meminfo()
        self.cached0 = base["Cached"]
        self.image0 = resident(image) if image else 0
        self.max_cached = self.max_dirty = self.max_files = self.image_growth = 0
        self.samples = self.file_samples = 0
        self.errors: list[BaseException] = []
        self.threads = [threading.Thread(target=self._loop, args=(self._mem, SAMPLE_S),
                                         daemon=True),
                        threading.Thread(target=self._loop, args=(self._files, SAMPLE_S),
                                         daemon=True)]

    def _mem(self) -> None:
        m = meminfo()
        self.max_cached = max(self.max_cached, m["Cached"] - self.cached0)
        self.max_dirty = max(self.max_dirty, m["Dirty"])
        self.samples += 1

    def _files(self) -> None:
        self.max_files = max(self.max_files, sum(resident(p) for p in self.files()))
        self.file_samples += 1

    def _loop(self, fn: Callable[[], None], every: float) -> None:
        try:
            while not self.stop.is_set():
                fn()
                self.stop.wait(every)
            fn()
        except BaseException as exc:  # noqa: BLE001 - reported by the caller
            self.errors.append(exc)

    def start(self) -> None:
        for t in self.threads:
            t.start()

    def finish(self) -> None:
        self.stop.set()
        for t in self.threads:
            t.join()
        if self.image:
            self.image_growth = resident(self.image) - self.image0


@contextlib.contextmanager
def sampling(files: Callable[[], list[str]], image: str | None) -> Iterator[Sampler]:
    s = Sampler(files, image)
    s.start()
    try:
        yield s
    finally:
        s.finish()
    if s.errors:
        raise s.errors[0]


def background_drift(seconds: float) -> int:
    """Max growth of Cached: over *seconds* after a drop_caches, this script idle: what the
    rest of the machine adds meanwhile."""
    drop_caches()
    base = meminfo()["Cached"]
    top = 0
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        top = max(top, meminfo()["Cached"] - base)
        time.sleep(SAMPLE_S)
    return top


# -- devices ---------------------------------------------------------------------------

@dataclass
class Device:
    root: str
    image: str
    loop: str


@contextlib.contextmanager
def device(bench: str, name: str, size_mb: int, direct_io: bool) -> Iterator[Device]:
    """A fresh device_root in bench/name, its loop device in direct I/O unless asked not."""
    work = os.path.join(bench, name)
    os.mkdir(work)
    try:
        with devicefs.device_root(pathlib.Path(work), size_mb=size_mb) as root:
            image = os.path.join(work, devicefs.IMAGE_NAME)
            loop = run(["findmnt", "-n", "-o", "SOURCE", str(root)]).stdout.strip()
            if direct_io:
                run(["losetup", "--direct-io=on", loop])
            yield Device(str(root), image, loop)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def pattern(rng: random.Random) -> bytes:
    """16 MiB of random bytes; 1 MiB chunks are slices of it at varying offsets."""
    return rng.randbytes(16 * MiB)


def write_data(path: str, size: int, extents: list[tuple[int, int]], data: bytes) -> None:
    """*path* of apparent *size* whose only data are the (offset, length) *extents*."""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    try:
        os.ftruncate(fd, size)
        i = 0
        for off, length in extents:
            for pos in range(off, off + length, CHUNK):
                o = (i * 7 * 4096) % (len(data) - CHUNK)
                n = min(CHUNK, off + length - pos)
                os.pwrite(fd, memoryview(data)[o:o + n], pos)
                i += 1
    finally:
        os.close(fd)


def spread(size: int, data: int, pieces: int) -> list[tuple[int, int]]:
    """*pieces* equal extents totalling *data* bytes, spread evenly over *size*."""
    step, length = size // pieces, data // pieces
    return [(i * step, length) for i in range(pieces)]


@dataclass
class Tree:
    """Legacy files built in the stash; rel paths are relative to the root."""

    root: str
    files: list[str] = field(default_factory=list)   # rel paths of legacy files
    targets: list[str] = field(default_factory=list)  # rel paths where compatfs puts them

    def stash(self, rel: str) -> str:
        return os.path.join(self.root, STASH, rel)

    @property
    def data_bytes(self) -> int:
        return sum(os.stat(self.stash(r)).st_blocks * 512 for r in self.files)

    @property
    def apparent_bytes(self) -> int:
        return sum(os.stat(self.stash(r)).st_size for r in self.files)

    def place(self) -> None:
        """Put a copy of every legacy file in its legacy place (sparse, with its
        mode and times): one name each, as on a device."""
        for rel in self.files:
            dst = os.path.join(self.root, rel)
            os.makedirs(os.path.dirname(dst), exist_ok=True)
            run(["cp", "-a", "--sparse=always", self.stash(rel), dst])

    def reset(self) -> None:
        """Nothing migrated or copied any more: legacy dirs and the new layout emptied."""
        for rel in ("img", "downloads", "vault/volumes", "vault/downloader", "vault/verifier",
                    "vault/compatfs", "vault/bench-cp", "novault/volumes", "clear/volumes"):
            shutil.rmtree(os.path.join(self.root, rel), ignore_errors=True)

    def check_migrated(self) -> None:
        """Every legacy file is gone and its target is there, as big as its source."""
        for rel, target in zip(self.files, self.targets, strict=True):
            if os.path.exists(os.path.join(self.root, rel)):
                raise RuntimeError(f"{rel}: still in its legacy place after migrating")
            want = os.stat(self.stash(rel))
            try:
                st = os.stat(os.path.join(self.root, target))
            except FileNotFoundError:
                raise RuntimeError(f"{rel}: not migrated to {target}") from None
            if st.st_size != want.st_size:
                raise RuntimeError(f"{target}: {st.st_size} bytes, its source {want.st_size}")


def qcow2_filled(path: str, virtual: str, fill: str) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    run(["qemu-img", "create", "-q", "-f", "qcow2", path, virtual])
    run(["qemu-io", "-f", "qcow2", "-c", f"write -P 0x5a 0 {fill}", path])


def vol_target(d: devicegen.DriveDef) -> str:
    return f"vault/volumes/{d.volume_uuid}#{d.generation}.{d.fmt}"


def build_mix(root: str, rng: random.Random, data: bytes, quick: bool) -> Tree:
    """Raw disks, qcow2 images, verified and pending downloads, in the stash."""
    raw_size, raw_data = (256 * MiB, 32 * MiB) if quick else (2 * GiB, 256 * MiB)
    q_virtual, q_fill = ("256M", "16M") if quick else ("2G", "128M")
    n_verified, verified_size = (10, MiB) if quick else (20, 4 * MiB)
    n_pending, pending_size = (2, 4 * MiB) if quick else (4, 16 * MiB)
    if LAYOUT == "eve":
        n_pending = 0     # EVE's layout moves no download in progress: cp would copy more
    u = lambda: devicegen.random_uuid(rng)  # noqa: E731
    raw = devicegen.AppDef(u(), "raw", [devicegen.DriveDef(u(), devicegen.random_sha(rng), "raw")
                                        for _ in range(2)])
    qcow = devicegen.AppDef(u(), "qcow", [devicegen.DriveDef(u(), devicegen.random_sha(rng),
                                                             "qcow2") for _ in range(2)])
    devicegen.write_device_state(root, [raw, qcow])
    tree = Tree(root)
    for i in range(2):
        rel = f"img/{raw.legacy_name(i)}"
        write_data(tree.stash(rel), raw_size, spread(raw_size, raw_data, 16), data)
        tree.files.append(rel)
        tree.targets.append(vol_target(raw.drives[i]))
    for i in range(2):
        rel = f"img/{qcow.legacy_name(i)}"
        qcow2_filled(tree.stash(rel), q_virtual, q_fill)
        tree.files.append(rel)
        tree.targets.append(vol_target(qcow.drives[i]))
    for _ in range(n_verified):
        blob = rng.randbytes(verified_size)
        sha = devicegen.sha_of(blob)
        rel = (f"downloads/{ObjType.APP_IMG.value}/{DownloadArea.VERIFIED.value}/"
               f"{sha.upper()}/image.img")
        write_data(tree.stash(rel), len(blob), [], b"")
        with open(tree.stash(rel), "r+b") as f:
            f.write(blob)
        tree.files.append(rel)
        tree.targets.append(f"vault/verifier/verified/{sha}")
    for _ in range(n_pending):
        image_id = u()
        rel = f"downloads/{ObjType.APP_IMG.value}/{DownloadArea.PENDING.value}/{image_id}/image.img"
        write_data(tree.stash(rel), pending_size, [(0, pending_size)], data)
        tree.files.append(rel)
        tree.targets.append(f"vault/downloader/pending/{image_id}/image.img")
    os.sync()
    return tree


def build_volumes(root: str, rng: random.Random, data: bytes, name: str, count: int,
                  size: int, others: list[devicegen.AppDef] = ()) -> tuple[Tree, devicegen.AppDef]:
    """One app with *count* raw drives of *size* bytes of data each, in the stash."""
    app = devicegen.AppDef(devicegen.random_uuid(rng), name, [
        devicegen.DriveDef(devicegen.random_uuid(rng), devicegen.random_sha(rng), "raw")
        for _ in range(count)])
    devicegen.write_device_state(root, [*others, app])
    tree = Tree(root)
    for i in range(count):
        rel = f"img/{app.legacy_name(i)}"
        write_data(tree.stash(rel), size, [(0, size)], data)
        tree.files.append(rel)
        tree.targets.append(vol_target(app.drives[i]))
    os.sync()
    return tree, app


#: Lines put before every configuration the benchmark writes (``--layout``): empty
#: for a commit that predates the ``layout`` key.
CONFIG_HEAD = ""


def write_config(path: str, text: str) -> str:
    with open(path, "w") as f:
        f.write(CONFIG_HEAD + text)
    return path


def migrate_now(root: str, run_dir: str, config: str | None) -> tuple[float, str]:
    """``compatfs migrate --now`` then ``sync``; (seconds, its output). Raises on failure."""
    argv = compatfs_argv("migrate", "--root", root, "--now", "--run-dir", run_dir)
    if config:
        argv += ["--config", config]
    start = time.perf_counter()
    rc, _, out = run_child(argv)
    os.sync()
    secs = time.perf_counter() - start
    if rc != 0:
        raise RuntimeError(f"compatfs migrate --now exited {rc}:\n{out}")
    return secs, out.strip().splitlines()[-1] if out.strip() else ""


def cp_into_vault(tree: Tree, sources: list[str]) -> float:
    """``cp -r --sparse=always`` of *sources* (rel dirs) into vault/bench-cp, then ``sync``."""
    dest = os.path.join(tree.root, "vault", "bench-cp")
    os.mkdir(dest)
    start = time.perf_counter()
    rc, _, out = run_child(["cp", "-r", "--sparse=always",
                            *[os.path.join(tree.root, s) for s in sources], dest + "/"])
    os.sync()
    secs = time.perf_counter() - start
    if rc != 0:
        raise RuntimeError(f"cp exited {rc}: {out.strip()}")
    return secs


# -- the daemon for part 2 ------------------------------------------------------------

@contextlib.contextmanager
def compatfs_mounted(root: str, run_dir: str, stage: str,
                     config: str | None = None) -> Iterator[subprocess.Popen]:
    """``compatfs mount --foreground`` in *stage*, until the views answer; stopped after."""
    with daemonproc.running(root, run_dir, stage=stage, config=config, deadline=DEADLINE,
                            own_session=True) as child:
        yield child.proc


def full_read(path: str, buf: bytearray) -> tuple[int, float]:
    """Open, read all of *path* in CHUNK reads, close; (bytes, seconds)."""
    start = time.perf_counter()
    total = 0
    with open(path, "rb", buffering=0) as f:
        while True:
            n = f.readinto(buf)
            if not n:
                break
            total += n
    return total, time.perf_counter() - start


# -- the three parts --------------------------------------------------------------------

@dataclass
class Results:
    rows: list[tuple[str, ...]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def row(self, *cells: str) -> None:
        self.rows.append(cells)


def mib(n: float) -> str:
    return f"{n / MiB:,.0f}"


def met(ok: bool | None) -> str:
    return "—" if ok is None else ("yes" if ok else "**no**")


def part_throughput(bench: str, args, res: Results, rng: random.Random, data: bytes) -> None:
    size_mb = 4096 if args.quick else 16384   # the stash, the legacy copies and the new ones
    rounds = 1 if args.quick else 2
    with device(bench, "dev-throughput", size_mb, not args.buffered_loop) as dev:
        root = dev.root
        t0 = time.perf_counter()
        tree = build_mix(root, rng, data, args.quick)
        n, data_bytes, apparent = len(tree.files), tree.data_bytes, tree.apparent_bytes
        log(f"throughput: {n} legacy objects, {mib(data_bytes)} MiB of data "
            f"({mib(apparent)} MiB apparent) built in {time.perf_counter() - t0:.1f} s")
        cfg_v = write_config(os.path.join(bench, "unlimited.yaml"), UNLIMITED)
        cfg_nv = write_config(os.path.join(bench, "unlimited-noverify.yaml"), UNLIMITED_NOVERIFY)
        cfg_rb = write_config(os.path.join(bench, "unlimited-readback.yaml"), UNLIMITED_READBACK)
        configs = {"verify": (cfg_v, "verify on (default)"),
                   "noverify": (cfg_nv, "verify: false"),
                   "readback": (cfg_rb, "verify: readback")}
        times: dict[str, list[float]] = {"cp": [], "verify": [], "noverify": [], "readback": []}
        cpu: dict[str, list[tuple[float, float]]] = {k: [] for k in times}

        def one(kind: str, r: int) -> None:
            tree.reset()
            tree.place()
            run_dir = os.path.join(bench, f"run-tp-{kind}-{r}")
            drop_caches()
            if kind == "cp":
                secs = cp_into_vault(tree, ["img", "downloads"])
                copied = sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in
                             os.walk(os.path.join(root, "vault", "bench-cp")) for f in fs)
                if copied != apparent:
                    raise RuntimeError(f"cp copied {copied} bytes, expected {apparent}")
                what = "cp --sparse=always + sync"
            else:
                cfg, desc = configs[kind]
                secs, last = migrate_now(root, run_dir, cfg)
                if f"migrated {n} of {n} objects" not in last:
                    raise RuntimeError(f"compatfs migrate --now: {last}")
                tree.check_migrated()
                what = f"compatfs migrate --now, throttle 0, {desc}"
            times[kind].append(secs)
            cpu[kind].append(LAST_CPU)
            log(f"throughput round {r + 1}: {what}: {secs:.2f} s "
                f"({data_bytes / MiB / secs:,.1f} MiB/s of data; process CPU user "
                f"{LAST_CPU[0]:.2f} s, system {LAST_CPU[1]:.2f} s)")
            shutil.rmtree(run_dir, ignore_errors=True)

        for r in range(rounds):
            order = ["cp", "verify", "noverify", "readback"]
            for kind in (order if r % 2 == 0 else order[::-1]):
                one(kind, r)
        tree.reset()
    cp = min(times["cp"])
    label = (f"migrate the mix ({n} objects: 2 sparse raw, 2 qcow2, verified and pending "
             f"downloads; {mib(data_bytes)} MiB of data, {mib(apparent)} MiB apparent)")
    for kind, (_, desc) in configs.items():
        c = min(times[kind])
        ratio = cp / c
        res.row(f"{label}: cp --sparse=always vs compatfs migrate --now, throttle 0, {desc}",
                "s", f"{cp:.2f}", f"{c:.2f}", f"{ratio:.2f}x", ">= 0.9x",
                met(ratio >= 0.9) if kind == "verify" else "—")
        res.row(f"  the same as data throughput, {desc}", "MiB/s",
                f"{data_bytes / MiB / cp:,.1f}", f"{data_bytes / MiB / c:,.1f}", f"{ratio:.2f}x",
                "", "")
    res.notes.append(f"throughput: each cell the best of {rounds} round(s); all times (s): "
                     + "; ".join(f"{k} " + ", ".join(f"{t:.2f}" for t in v)
                                 for k, v in times.items())
                     + "; CPU of the cp / compatfs process, user + system (s): "
                     + "; ".join(f"{k} " + ", ".join(f"{u:.1f} + {y:.1f}" for u, y in v)
                                 for k, v in cpu.items())
                     + " (encryption at writeback and decryption of reads run in kernel "
                       "workers and are not counted)")


def part_reads(bench: str, args, res: Results, rng: random.Random, data: bytes) -> None:
    size_mb = 4096 if args.quick else 12288
    read_size = (256 if args.quick else 1024) * MiB
    bulk_count, bulk_size = (2, 256 * MiB) if args.quick else (6, 512 * MiB)
    with device(bench, "dev-reads", size_mb, not args.buffered_loop) as dev:
        root = dev.root
        t0 = time.perf_counter()
        reader_tree, reader = build_volumes(root, rng, data, "reader", 1, read_size)
        reader_tree.place()
        secs, last = migrate_now(root, os.path.join(bench, "run-reads-pre"),
                                 write_config(os.path.join(bench, "pre.yaml"), UNLIMITED_NOVERIFY))
        reader_tree.check_migrated()
        os.unlink(reader_tree.stash(reader_tree.files[0]))
        bulk, _ = build_volumes(root, rng, data, "bulk", bulk_count, bulk_size, [reader])
        bulk.place()
        legacy_read = os.path.join(root, reader_tree.files[0])
        native_read = os.path.join(root, reader_tree.targets[0])
        log(f"reads: {read_size // MiB} MiB volume migrated ({secs:.1f} s), "
            f"{bulk_count} x {bulk_size // MiB} MiB still legacy "
            f"(built in {time.perf_counter() - t0:.1f} s)")
        drop_caches()
        buf = bytearray(CHUNK)
        n, secs = full_read(native_read, buf)
        assert n == read_size, n
        log(f"reads: native warm-up read {n / MiB / secs:,.0f} MiB/s")
        targets = [os.path.join(root, t) for t in bulk.targets]
        during: list[float] = []
        idle: list[float] = []
        during_cp: list[float] = []
        idle_before: list[float] = []
        # idle before: the same view in stage redirect (nothing migrates), a drift check
        with compatfs_mounted(root, os.path.join(bench, "run-reads-idle"), "redirect"):
            full_read(legacy_read, buf)
            for _ in range(10 if args.quick else 20):
                n, secs = full_read(legacy_read, buf)
                assert n == read_size, n
                idle_before.append(n / MiB / secs)
        log(f"reads: idle before (stage redirect): median "
            f"{statistics.median(idle_before):,.0f} MiB/s")
        with compatfs_mounted(root, os.path.join(bench, "run-reads"), "migrate") as daemon:
            start = time.perf_counter()
            n, secs = full_read(legacy_read, buf)  # through the view: fills its page cache
            assert n == read_size, n
            log(f"reads: view warm-up read {n / MiB / secs:,.0f} MiB/s")

            def migrated() -> bool:
                return all(os.path.exists(t) for t in targets)

            if migrated():
                raise RuntimeError("the migration finished before any read was timed")
            while True:
                n, secs = full_read(legacy_read, buf)
                assert n == read_size, n
                if migrated():
                    break
                during.append(n / MiB / secs)
                if daemon.poll() is not None:
                    raise RuntimeError("the daemon exited during the migration")
                if time.perf_counter() - start > 3600:
                    raise RuntimeError("the migration did not finish within an hour")
            took = time.perf_counter() - start
            time.sleep(2.0)   # the last removal and index commits
            for _ in range(max(10, min(len(during), 40))):
                n, secs = full_read(legacy_read, buf)
                assert n == read_size, n
                idle.append(n / MiB / secs)
            # reference: the same reads while cp + sync copy the same data into the vault
            dest = os.path.join(root, "vault", "bench-cp")
            os.mkdir(dest)
            cp_start = time.perf_counter()
            cp = subprocess.Popen(["sh", "-c", 'cp --sparse=always "$@" && sync', "sh",
                                   *[bulk.stash(r) for r in bulk.files], dest + "/"],
                                  stdin=subprocess.DEVNULL, start_new_session=True)
            try:
                while True:
                    n, secs = full_read(legacy_read, buf)
                    assert n == read_size, n
                    if cp.poll() is not None:
                        break
                    during_cp.append(n / MiB / secs)
            finally:
                if cp.poll() is None:
                    cp.kill()
                cp.wait()
            cp_took = time.perf_counter() - cp_start
            if cp.returncode != 0:
                raise RuntimeError(f"cp + sync exited {cp.returncode}")
        bulk.check_migrated()
        rate = bulk_count * bulk_size / MiB / took
        log(f"reads: {len(during)} reads during migration (median "
            f"{statistics.median(during):,.0f} MiB/s), migration {took:.1f} s "
            f"({rate:.1f} MiB/s), {len(idle)} idle (median {statistics.median(idle):,.0f} MiB/s), "
            f"{len(during_cp)} during cp + sync ({cp_took:.1f} s, median "
            f"{statistics.median(during_cp) if during_cp else 0:,.0f} MiB/s)")
    def overall(rates: list[float]) -> float:
        """MiB/s over all the reads: bytes read / time spent reading (each read the same size)."""
        return len(rates) / sum(1 / r for r in rates)

    d, i = overall(during), overall(idle)
    ratio = d / i
    res.row(f"cached sequential read of a {read_size // MiB} MiB volume through its legacy name "
            f"(open, 1 MiB reads, close), bytes read / time reading: idle vs while "
            f"{bulk_count * bulk_size // MiB} MiB migrate at the default throttle (stage "
            f"migrate); {len(idle)} reads idle, {len(during)} during",
            "MiB/s", f"{i:,.0f}", f"{d:,.0f}", f"{ratio:.2f}x", ">= 0.7x", met(ratio >= 0.7))
    dm, im = statistics.median(during), statistics.median(idle)
    res.row("  the same, median of the reads", "MiB/s", f"{im:,.0f}", f"{dm:,.0f}",
            f"{dm / im:.2f}x", "reported", "—")
    if during_cp:
        dc = overall(during_cp)
        res.row(f"  reference: the same reads while cp --sparse=always + sync copy the same "
                f"{bulk_count * bulk_size // MiB} MiB into the vault, unthrottled "
                f"({cp_took:.0f} s); "
                f"{len(during_cp)} reads", "MiB/s", f"{i:,.0f}", f"{dc:,.0f}",
                f"{dc / i:.2f}x", "reported", "—")
    res.notes.append(f"reads: during migration min {min(during):,.0f} / max {max(during):,.0f} "
                     f"MiB/s, idle (after) min {min(idle):,.0f} / max {max(idle):,.0f} MiB/s; "
                     f"idle before (the same view in stage redirect, {len(idle_before)} reads) "
                     f"median {statistics.median(idle_before):,.0f} MiB/s; the "
                     f"migration ran {took:.1f} s, {rate:.1f} MiB/s of data")


def part_cache(bench: str, args, res: Results, rng: random.Random, data: bytes) -> None:
    size_mb = 4096 if args.quick else 16384   # the stash, the legacy copies and the new ones
    each = (256 if args.quick else 2048) * MiB
    with device(bench, "dev-cache", size_mb, not args.buffered_loop) as dev:
        root = dev.root
        t0 = time.perf_counter()
        tree, _ = build_volumes(root, rng, data, "cache", 2, each)
        total = 2 * each
        log(f"page cache: 2 x {each // MiB} MiB of data built in {time.perf_counter() - t0:.1f} s")
        cfg_v = write_config(os.path.join(bench, "cache.yaml"), UNLIMITED)
        cfg_nv = write_config(os.path.join(bench, "cache-noverify.yaml"), UNLIMITED_NOVERIFY)
        image = dev.image

        def files_compatfs() -> list[str]:
            out = [tree.stash(r) for r in tree.files]
            for t in tree.targets:   # the copy, and its temporary while it is made
                head, name = os.path.split(t)
                key = next(k for k in NEW_STORES if Layout(root).rel(k) == head)
                out += [os.path.join(root, t),
                        os.path.join(Layout(root).path(own_location(key)), STAGING_DIR, key,
                                     tmp_leaf(name))]
            state = os.path.join(root, "vault", "compatfs")
            return out + [os.path.join(state, n) for n in INDEX_FILES]

        cp_dir = os.path.join(root, "vault", "bench-cp", "img")

        def files_cp() -> list[str]:
            return [tree.stash(r) for r in tree.files] + \
                [os.path.join(cp_dir, os.path.basename(r)) for r in tree.files]

        drift_s = 10.0 if args.quick else 60.0
        drift = background_drift(drift_s)
        log(f"page cache: Cached: grew by up to {mib(drift)} MiB in {drift_s:.0f} s with this "
            f"script idle (the rest of the machine)")
        seen: dict[str, tuple[float, Sampler]] = {}
        for kind in ("verify", "noverify", "cp"):
            tree.reset()
            tree.place()
            run_dir = os.path.join(bench, f"run-cache-{kind}")
            drop_caches()
            with sampling(files_cp if kind == "cp" else files_compatfs, image) as s:
                if kind == "cp":
                    secs = cp_into_vault(tree, ["img"])
                else:
                    secs, last = migrate_now(root, run_dir, cfg_v if kind == "verify" else cfg_nv)
                    if "migrated 2 of 2 objects" not in last:
                        raise RuntimeError(f"compatfs migrate --now: {last}")
            if kind != "cp":
                tree.check_migrated()
            shutil.rmtree(run_dir, ignore_errors=True)
            log(f"page cache, {kind}: {secs:.1f} s, {s.samples} samples, Cached +"
                f"{mib(s.max_cached)} MiB, Dirty max {mib(s.max_dirty)} MiB, files resident max "
                f"{mib(s.max_files)} MiB ({s.file_samples} samples), image file resident "
                f"+{mib(s.image_growth)} MiB")
            seen[kind] = (secs, s)
        tree.reset()
    cp_secs, cp = seen["cp"]
    for kind, desc in (("verify", "verify on (default)"), ("noverify", "verify: false")):
        secs, c = seen[kind]
        what = (f"migrating {total // MiB} MiB (2 x {each // MiB} MiB of data), cp --sparse=always "
                f"+ sync ({cp_secs:.0f} s) vs compatfs migrate --now, throttle 0, {desc} "
                f"({secs:.0f} s)")
        res.row(f"page cache held by the copy: max resident pages (mincore) of the sources, "
                f"the copies and the index, {what}", "MiB", mib(cp.max_files),
                mib(c.max_files), "", "<= 256 MiB", met(c.max_files <= 256 * MiB))
        res.row(f"  max growth of Cached: (whole machine, after drop_caches), {desc}", "MiB",
                mib(cp.max_cached), mib(c.max_cached), "", "<= 256 MiB",
                met(c.max_cached <= 256 * MiB) + " (see control)")
        res.row(f"  max Dirty:, {desc}", "MiB", mib(cp.max_dirty), mib(c.max_dirty), "",
                "reported", "—")
    res.notes.append(f"page cache: Cached: and Dirty: sampled every {SAMPLE_S} s; control: "
                     f"with this script idle for {drift_s:.0f} s after a drop_caches, Cached: "
                     f"grew by up to {mib(drift)} MiB (other processes on the machine); the "
                     f"image file's own resident pages grew by "
                     + ", ".join(f"{mib(s.image_growth)} MiB ({k})" for k, (_, s) in seen.items())
                     + f"; the interpreter and the modules compatfs imports are "
                       f"{mib(code_bytes())} MiB of files (read once, whatever the data size)")


def code_bytes() -> int:
    """Bytes of the files a ``compatfs migrate`` process loads: modules and mapped libraries."""
    probe = ("import sys, os\n"
             "sys.argv = ['compatfs', 'migrate', '--help']\n"
             "from compatfs import cli, daemon, migration, filecopy, treecopy, operations  # noqa\n"
             "import trio, pyfuse3, yaml, sqlite3, hashlib  # noqa\n"
             "files = {getattr(m, '__file__', None) for m in list(sys.modules.values())}\n"
             "files |= {l.split()[-1] for l in open('/proc/self/maps') if '/' in l}\n"
             "print(sum(os.path.getsize(f) for f in files if f and os.path.isfile(f)))\n")
    proc = run([sys.executable, "-c", probe], check=False)
    try:
        return int(proc.stdout.strip().splitlines()[-1])
    except (ValueError, IndexError):
        return 0


def machine(direct_io: bool) -> str:
    work_fs = run(["findmnt", "-n", "-o", "FSTYPE,SOURCE", "-T", "/var/tmp"],
                  check=False).stdout.split()
    mem = meminfo()["MemTotal"] / GiB
    cipher = "?"
    with contextlib.suppress(OSError), open("/proc/crypto") as f:
        best = -1
        name = driver = None
        for line in f:
            key, _, value = (s.strip() for s in line.partition(":"))
            if key == "name":
                name = value
            elif key == "driver":
                driver = value
            elif key == "priority" and name == "xts(aes)" and int(value) > best:
                best, cipher = int(value), driver
    cp_version = run(["cp", "--version"], check=False).stdout.splitlines()[:1]
    qemu = run(["qemu-img", "--version"], check=False).stdout.splitlines()[:1]
    return (f"machine: {platform.machine()}, {os.cpu_count()} cores, {mem:.0f} GiB, "
            f"{platform.platform()}, kernel {platform.release()}, Python "
            f"{platform.python_version()}, work dir /var/tmp on {' '.join(work_fs) or '?'}, "
            f"device images: ext4 on a loop device "
            f"({'direct I/O' if direct_io else 'buffered'}), fscrypt xts(aes) driver {cipher}, "
            f"{' '.join(cp_version)}, {' '.join(qemu)}\n"
            f"compatfs: {commit()}\n"
            f"date: {datetime.datetime.now().astimezone().isoformat(timespec='seconds')}")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="small sizes, one round: a smoke run")
    ap.add_argument("--buffered-loop", action="store_true",
                    help="keep the loop devices buffered (the image file is then cached by "
                         "the host as well, counted in Cached:)")
    ap.add_argument("--layout", choices=("eve", "design-note"),
                    help="target layout written into every config (default: none written, "
                         "for commits before the layout key; eve uses eve_release 11.7, whose "
                         "verified names the mix's random shas can take)")
    ap.add_argument("--only", choices=("throughput", "reads", "cache"), action="append",
                    help="run only this part (repeatable)")
    args = ap.parse_args()
    global CONFIG_HEAD, LAYOUT
    if args.layout == "eve":
        CONFIG_HEAD, LAYOUT = 'layout: eve\neve_release: "11.7"\n', "eve"
    elif args.layout:
        CONFIG_HEAD, LAYOUT = f"layout: {args.layout}\n", args.layout
    if os.geteuid() != 0:
        print("migrate_bench: needs root (loop devices, mounts, drop_caches)", file=sys.stderr)
        return 2
    for tool in ("qemu-img", "qemu-io", "losetup", "mkfs.ext4", "findmnt", "fusermount3", "cp"):
        if shutil.which(tool) is None:
            print(f"migrate_bench: {tool} is missing", file=sys.stderr)
            return 2

    def on_term(signum, frame):
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, on_term)
    header = machine(not args.buffered_loop)
    print(header, flush=True)
    parts = args.only or ["throughput", "reads", "cache"]
    bench = tempfile.mkdtemp(prefix="compatfs-migrate-", dir="/var/tmp")
    res = Results()
    interrupted = False
    rng = random.Random(20261126)
    data = pattern(rng)
    try:
        if "throughput" in parts:
            part_throughput(bench, args, res, rng, data)
        if "reads" in parts:
            part_reads(bench, args, res, rng, data)
        if "cache" in parts:
            part_cache(bench, args, res, rng, data)
    except KeyboardInterrupt:
        interrupted = True
    finally:
        signal.signal(signal.SIGINT, signal.SIG_IGN)   # the clean-up runs to its end
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        left = [e.mount_point for e in mounts.mount_table()
                if e.mount_point.startswith(bench + "/")]
        for mp in reversed(left):
            run(["umount", "-l", mp], check=False)
        for line in run(["losetup", "--noheadings", "-O", "NAME,BACK-FILE", "--list"],
                        check=False).stdout.splitlines():
            parts_ = line.split(None, 1)
            if len(parts_) == 2 and parts_[1].strip().startswith(bench + "/"):
                run(["losetup", "--detach", parts_[0]], check=False)
        left = [e.mount_point for e in mounts.mount_table()
                if e.mount_point.startswith(bench + "/")]
        if left:
            print(f"migrate_bench: still mounted, {bench} kept: {', '.join(left)}", file=sys.stderr)
        else:
            shutil.rmtree(bench, ignore_errors=True)
        signal.signal(signal.SIGINT, signal.default_int_handler)
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
    if interrupted:
        print("migrate_bench: interrupted; what it mounted is unmounted and removed",
              file=sys.stderr)
        return 130
    print()
    print(header.replace("\n", "  \n"))
    print()
    print("| measurement | unit | reference | compatfs | ratio | target | met |")
    print("|---|---|---|---|---|---|---|")
    for r in res.rows:
        print("| " + " | ".join(r) + " |")
    print()
    for note in res.notes:
        print(f"- {note}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
