"""Size changes through a view while the file is copied: truncate (with and
without a handle), ``O_TRUNC`` and writes past the end reach the copy, which
after the switch holds exactly what the source holds.

The dense part runs the FUSE handlers and the migrator's real copy of one
file (bulk copy, passes, mirrored convergence, switch) without a kernel, on
plain files, against a bytearray model: many random sequences per run, the
copy slowed and chunked small so every step of it overlaps the requests.
The real-mount tests (an fscrypt vault on a loop-mounted ext4, the daemon in
stage migrate) reproduce the reported loss and run random sequences through
the kernel, then compare the vault file byte for byte after a remount.
"""

from __future__ import annotations

import errno
import functools
import os
import random
import subprocess
import time
from pathlib import Path
from types import SimpleNamespace

import pyfuse3
import pytest
import trio

from compatfs import filecopy
from compatfs.backing import Backing
from compatfs.config import Migration
from compatfs.handles import HandleTable
from compatfs.index import Index
from compatfs.layout import Layout
from compatfs.migration import DIRTY_BLOCK, Converging, DirtyLog, Item, Migrator
from compatfs.migration import livecopy as migrator_mod
from compatfs.operations import Operations
from compatfs.resolver import Resolver
from compatfs.testing import devicegen
from compatfs.view import View

from .conftest import staged
from .devices import device_under
from .mounting import mounted

KIB = 1 << 10
MIB = 1 << 20


class Ctx:
    uid = os.geteuid()
    gid = os.getegid()
    pid = os.getpid()
    umask = 0o022


def size_fields() -> SimpleNamespace:
    """The SetattrFields of a truncate (pyfuse3's own are read-only)."""
    return SimpleNamespace(update_size=True, update_mode=False, update_uid=False,
                           update_gid=False, update_atime=False, update_mtime=False,
                           update_ctime=False)


def size_attr(size: int) -> pyfuse3.EntryAttributes:
    a = pyfuse3.EntryAttributes()
    a.st_size = size
    return a


def model_write(model: bytearray, off: int, data: bytes) -> None:
    """*data* written at *off* of the file *model* stands for (a gap reads as zeros)."""
    if off > len(model):
        model.extend(bytes(off - len(model)))
    model[off:off + len(data)] = data


def model_resize(model: bytearray, size: int) -> None:
    """The file *model* stands for given *size*."""
    if size < len(model):
        del model[size:]
    else:
        model.extend(bytes(size - len(model)))


def read_all(path: Path | str) -> bytes:
    with open(path, "rb") as f:
        return f.read()


# -- the log on its own ----------------------------------------------------------------

def test_take_returns_the_lowest_size_given_and_starts_again():
    d = DirtyLog()
    d.write(b"x" * 10, 3 * DIRTY_BLOCK + 5)
    d.resize(5 * DIRTY_BLOCK)
    d.resize(DIRTY_BLOCK + 1)          # lowest: blocks wholly above it are dropped
    d.resize(9 * DIRTY_BLOCK)
    d.write(b"y", 7 * DIRTY_BLOCK)
    assert d.touched and d.pending
    assert d.take() == (DIRTY_BLOCK + 1, [(7 * DIRTY_BLOCK, DIRTY_BLOCK)])
    assert not d.pending and d.take() == (None, [])


def test_a_mirrored_resize_reaches_the_copy_and_a_refusal_is_kept(tmp_path):
    d = DirtyLog()
    fd = os.open(tmp_path / "copy", os.O_RDWR | os.O_CREAT, 0o600)
    try:
        os.pwrite(fd, b"a" * 4096, 0)
        d.mirror = fd
        d.resize(100)
        assert os.fstat(fd).st_size == 100 and d.shrunk_to is None and d.mirror_error is None
        d.resize(1 << 20)
        assert os.fstat(fd).st_size == 1 << 20
        assert os.pread(fd, 200, 0) == b"a" * 100 + bytes(100)
    finally:
        os.close(fd)
    d.resize(5)                        # a closed mirror: the error is kept, not raised
    assert isinstance(d.mirror_error, OSError) and d.mirror_error.errno == errno.EBADF


# -- the handlers and the real copy, without a kernel --------------------------------------

class Bench:
    """One legacy file, the views over it, a migrator that copies it to the
    vault volumes store, and a model of what the file must hold."""

    def __init__(self, root: Path, rng: random.Random, size: int, throttle_mib: float) -> None:
        self.rng = rng
        self.copy_s = size / (throttle_mib * MIB)    # about how long the bulk copy takes
        # write, truncate, truncate-path, otrunc, reopen, pause: size changes are rare in
        # some sequences (old bytes then survive long enough to be seen), dense in others
        self.weights = rng.choice(([8, 1, 1, 1, 1, 1], [5, 3, 1, 2, 1, 1], [20, 1, 0, 0, 1, 1]))
        (root / "img").mkdir(parents=True)
        self.model = bytearray(rng.randbytes(size))
        (root / "img" / "v.img").write_bytes(self.model)
        layout = Layout(str(root))
        self.backing = Backing.open(layout, ("img",), create_new=True, require_encrypted=False)
        view = View(layout, self.backing, Index(None), Resolver(layout), "migrate", ("img",))
        handles = HandleTable()
        self.m = Migrator(view, Migration(throttle_mib_per_s=throttle_mib, verify="copy",
                                          reserve_percent=0), handles)
        self.ops = Operations(view, handles=handles, changes=self.m.changes)
        self.item = Item("img/v.img", "vm-volume", False, "img", "v.img", "vault_volumes",
                         "v.raw", size, "copy")
        self.target = root / "vault" / "volumes" / "v.raw"
        self.handles: list[int] = []
        self.log: list[str] = []

    def check(self, when: str) -> None:
        got = read_all(self.target)
        assert len(got) == len(self.model) and got == bytes(self.model), \
            f"{when}: the copy differs from the model after {self.log}"

    def close(self) -> None:
        self.ops.close_all()
        self.backing.close()

    async def ino(self) -> int:
        img = (await self.ops.lookup(pyfuse3.ROOT_INODE, b"img", Ctx())).st_ino
        return (await self.ops.lookup(img, b"v.img", Ctx())).st_ino

    async def open(self, flags: int) -> int:
        return (await self.ops.open(await self.ino(), flags, Ctx())).fh

    async def step(self) -> None:
        """One random request (or a pause for the copy to move on)."""
        rng, limit = self.rng, max(len(self.model), self.item.bytes) + 256 * KIB
        op = rng.choices(["write", "truncate", "truncate-path", "otrunc", "reopen", "pause"],
                         weights=self.weights)[0]
        if op == "write":
            off, data = rng.randrange(limit), rng.randbytes(rng.choice((1, 512, 4096, 4096, 70000)))
            await self.ops.write(rng.choice(self.handles), off, data)
            model_write(self.model, off, data)
            self.log.append(f"write {off} {len(data)}")
        elif op in ("truncate", "truncate-path"):
            size = rng.choice((0, rng.randrange(limit), rng.randrange(64 * KIB)))
            fh = rng.choice(self.handles) if op == "truncate" else None
            await self.ops.setattr(await self.ino(), size_attr(size), size_fields(), fh, Ctx())
            model_resize(self.model, size)
            self.log.append(f"{op} {size}")
        elif op == "otrunc":
            fh = await self.open(os.O_WRONLY | os.O_TRUNC)
            model_resize(self.model, 0)
            off, data = rng.randrange(limit), rng.randbytes(rng.choice((1, 4096, 100000)))
            await self.ops.write(fh, off, data)
            model_write(self.model, off, data)
            await self.ops.release(fh)
            self.log.append(f"otrunc+write {off} {len(data)}")
        elif op == "reopen":
            await self.ops.release(self.handles.pop(0))
            self.handles.append(await self.open(os.O_RDWR))
            self.log.append("reopen")
        await trio.sleep(rng.choice((0, 0, 0, 0.0005, 0.001)))

    async def run(self, after_switch: int) -> None:
        self.handles = [await self.open(os.O_RDWR), await self.open(os.O_RDWR)]
        done = trio.Event()

        async def copy() -> None:
            try:
                await self.m.moves.copy_file(self.item)
            finally:
                done.set()

        async with trio.open_nursery() as nursery:
            nursery.start_soon(copy)
            # the first request lands anywhere in the bulk copy, not always at its start
            await trio.sleep(self.rng.uniform(0, self.copy_s))
            while not done.is_set():
                await self.step()
            if self.target.exists():        # switched: the copy, before anything else writes
                self.check("at the switch")
            for _ in range(after_switch):   # the switched handles go on
                await self.step()
        for fh in self.handles:
            await self.ops.fsync(fh, False)


def _small_steps(monkeypatch, rng: random.Random) -> None:
    """Copy in small pieces and reach passes and slices with little dirty data, so the
    requests land in every phase of the copy."""
    chunk = rng.choice((64 * KIB, 128 * KIB, 256 * KIB))
    monkeypatch.setattr(filecopy, "copy_extents",
                        functools.partial(_orig_copy_extents, chunk=chunk))
    monkeypatch.setattr(migrator_mod, "FINAL_PASS_BYTES",
                        rng.choice((0, DIRTY_BLOCK, 4 * DIRTY_BLOCK, 64 * MIB)))
    monkeypatch.setattr(migrator_mod, "MAX_PASSES", rng.choice((0, 1, 4)))
    monkeypatch.setattr(migrator_mod, "SLICE_BYTES", rng.choice((DIRTY_BLOCK, 4 * DIRTY_BLOCK)))


_orig_copy_extents = filecopy.copy_extents

SEQUENCES = int(os.environ.get("COMPATFS_TRUNCATE_SEQUENCES", "40"))


@pytest.mark.parametrize("n", range(SEQUENCES))
async def test_random_size_changes_and_writes_during_the_copy_reach_it(tmp_path, monkeypatch, n):
    seed = int(os.environ.get("COMPATFS_TRUNCATE_SEED", "9000")) + n
    rng = random.Random(seed)
    _small_steps(monkeypatch, rng)
    bench = Bench(tmp_path, rng, rng.choice((300 * KIB, 1 * MIB, 2 * MIB + 1234)),
                  throttle_mib=rng.choice((4, 8, 16)))
    try:
        await bench.run(after_switch=rng.randrange(0, 20))
        assert bench.m.index.get("img/v.img").state == "new", seed
        bench.check(f"seed {seed}, at the end")
        assert not (tmp_path / "img" / "v.img").exists()
    finally:
        bench.close()


async def test_the_reported_sequence_truncate_to_zero_grow_write_at_the_end(tmp_path, monkeypatch):
    """truncate -s0, truncate -s<size>, 4 KiB written at the end, while the bulk copy
    is part way: nothing of the old bytes may survive in the copy."""
    monkeypatch.setattr(filecopy, "copy_extents",
                        functools.partial(_orig_copy_extents, chunk=256 * KIB))
    size = 4 * MIB
    bench = Bench(tmp_path, random.Random(1), size, throttle_mib=4)
    try:
        ino = await bench.ino()
        fh = await bench.open(os.O_RDWR)
        tail = b"t" * 4096

        async def agent() -> None:
            tmp = staged(tmp_path, "vault_volumes", "v.raw")
            while not tmp.exists() or os.stat(tmp).st_blocks == 0:
                await trio.sleep(0.005)
            await bench.ops.setattr(ino, size_attr(0), size_fields(), None, Ctx())
            await bench.ops.setattr(ino, size_attr(size), size_fields(), None, Ctx())
            await bench.ops.write(fh, size - len(tail), tail)

        with trio.fail_after(60):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(agent)
                await bench.m.moves.copy_file(bench.item)
        assert read_all(bench.target) == bytes(size - len(tail)) + tail
    finally:
        bench.close()


async def test_a_file_removed_and_made_again_during_the_copy_is_not_overwritten(tmp_path):
    bench = Bench(tmp_path, random.Random(2), 2 * MIB, throttle_mib=4)
    try:
        img = (await bench.ops.lookup(pyfuse3.ROOT_INODE, b"img", Ctx())).st_ino

        async def agent() -> None:
            await trio.sleep(0.1)
            await bench.ops.unlink(img, b"v.img", Ctx())
            fi, _ = await bench.ops.create(img, b"v.img", 0o644, os.O_RDWR, Ctx())
            await bench.ops.write(fi.fh, 0, b"new file")
            await bench.ops.release(fi.fh)

        with pytest.raises(ExceptionGroup) as raised:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(agent)
                await bench.m.moves.copy_file(bench.item)
        assert raised.group_contains(Converging)
        bench.m.steps.settle(bench.item)
        fh = await bench.open(os.O_RDONLY)
        assert await bench.ops.read(fh, 0, 100) == b"new file"
        assert not (staged(tmp_path, "vault_volumes", "v.raw")).exists()
    finally:
        bench.close()


async def test_a_file_renamed_during_the_copy_is_not_switched_under_its_old_name(tmp_path):
    bench = Bench(tmp_path, random.Random(5), 2 * MIB, throttle_mib=4)
    try:
        img = (await bench.ops.lookup(pyfuse3.ROOT_INODE, b"img", Ctx())).st_ino
        await bench.ops.lookup(img, b"v.img", Ctx())

        async def agent() -> None:
            await trio.sleep(0.1)
            await bench.ops.rename(img, b"v.img", img, b"w.img", 0, Ctx())

        with pytest.raises(ExceptionGroup) as raised:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(agent)
                await bench.m.moves.copy_file(bench.item)
        assert raised.group_contains(Converging)
        bench.m.steps.settle(bench.item)
        assert not bench.target.exists()
        assert bench.m.index.get("img/v.img") is None
        ino = (await bench.ops.lookup(img, b"w.img", Ctx())).st_ino
        fh = (await bench.ops.open(ino, os.O_RDONLY, Ctx())).fh
        assert await bench.ops.read(fh, 0, 3 * MIB) == bytes(bench.model)
    finally:
        bench.close()


# -- through the kernel, on a real fscrypt vault ---------------------------------------------

@pytest.fixture
def device(tmp_path):
    with device_under(tmp_path, size_mb=256) as root:
        yield root


def legacy_volume(root: Path, rng: random.Random, size: int) -> tuple[Path, Path, bytearray]:
    """A VM volume of *size* random bytes in img/: (its legacy name, where its copy
    goes in the vault, the model of its content)."""
    app = devicegen.AppDef(devicegen.random_uuid(rng), "vm", [
        devicegen.DriveDef(devicegen.random_uuid(rng), devicegen.random_sha(rng), "raw")])
    devicegen.write_device_state(str(root), [app])
    legacy = root / "img" / app.legacy_name(0)
    legacy.parent.mkdir(exist_ok=True)
    model = bytearray(rng.randbytes(size))
    legacy.write_bytes(model)
    return legacy, root / "vault/volumes" / f"{app.drives[0].volume_uuid}#0.raw", model


def temporary_of(target: Path) -> Path | None:
    """The copy under way to *target* (its temporary name), if any."""
    tmp = staged(target.parent.parent.parent, "vault_volumes", target.name)
    return tmp if tmp.exists() else None


def wait_for(cond, what: str, m, timeout: float = 90.0) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError(f"{what} within {timeout:g} s:\n{m.log_text()}")
        time.sleep(0.05)


def drop_caches() -> None:
    os.sync()
    Path("/proc/sys/vm/drop_caches").write_text("3\n")


def check_after_remount(root: Path, tmp_path: Path, legacy: Path, target: Path,
                        model: bytearray, what: str) -> None:
    """The vault file, read with every cache dropped, then through a fresh daemon's
    view, is the model byte for byte; the legacy original is gone."""
    drop_caches()
    got = read_all(target)
    assert len(got) == len(model), f"{what}: size {len(got)}, model {len(model)}"
    if got != bytes(model):
        first = next(i for i, (a, b) in enumerate(zip(got, model, strict=True)) if a != b)
        differing = sum(a != b for a, b in zip(got, model, strict=True))
        raise AssertionError(f"{what}: the vault copy differs from the model from byte "
                             f"{first} ({differing} bytes)")
    assert not legacy.exists() and temporary_of(target) is None
    with mounted(root, tmp_path / "run2", stage="migrate"):
        assert read_all(legacy) == bytes(model), what


CONFIG = "migration:\n  throttle_mib_per_s: {rate}\n  rescan_s: 1\n  retry_backoff_s: 1\n"


@pytest.mark.root
@pytest.mark.parametrize("how", ["truncate", "o_trunc"])
def test_reported_truncate_during_a_vault_copy_keeps_no_old_bytes(device, tmp_path, how):
    """The report: a 32 MiB volume copied at 2 MiB/s into the vault; through the view
    truncate -s0, truncate -s32M and 4 KiB written at the end (or an O_TRUNC open and
    the write); after the switch and a remount the vault copy reads zeros, not the
    8 MiB of old data the bulk copy had moved."""
    root = device
    size = 32 * MIB
    legacy, target, model = legacy_volume(root, random.Random(3), size)
    config = tmp_path / "c.yaml"
    config.write_text(CONFIG.format(rate=2))
    tail = random.Random(4).randbytes(4096)
    with mounted(root, tmp_path / "run", stage="migrate", config=config) as m:
        def copying() -> bool:
            tmp = temporary_of(target)
            return tmp is not None and tmp.stat().st_blocks > 0
        wait_for(copying, "the copy did not start", m)
        if how == "truncate":
            subprocess.run(["truncate", "-s0", str(legacy)], check=True)
            subprocess.run(["truncate", f"-s{size}", str(legacy)], check=True)
            fd = os.open(legacy, os.O_WRONLY)
        else:
            fd = os.open(legacy, os.O_WRONLY | os.O_TRUNC)
        try:
            os.pwrite(fd, tail, size - len(tail))
        finally:
            os.close(fd)
        model[:] = bytes(size - len(tail)) + tail
        wait_for(lambda: target.exists() and temporary_of(target) is None,
                 "the file did not migrate", m)
        assert read_all(legacy) == bytes(model)
    check_after_remount(root, tmp_path, legacy, target, model, how)


class ModelWriter:
    """Random requests through the view on one file, mirrored in a bytearray."""

    def __init__(self, path: Path, model: bytearray, rng: random.Random) -> None:
        self.path, self.model, self.rng = path, model, rng
        self.size0 = len(model)
        self.fd = os.open(path, os.O_RDWR)
        self.ops: list[str] = []

    def step(self) -> None:
        rng, limit = self.rng, max(len(self.model), self.size0) + MIB
        op = rng.choices(["write", "ftruncate", "truncate", "otrunc"], weights=[30, 1, 1, 1])[0]
        if op == "write":
            off, data = rng.randrange(limit), rng.randbytes(rng.choice((512, 4096, 65536)))
            os.pwrite(self.fd, data, off)
            model_write(self.model, off, data)
        elif op in ("ftruncate", "truncate"):
            # shrinks and growths both: old bytes above a shrink show once it grows again
            size = rng.choice((0, rng.randrange(MIB), rng.randrange(limit), self.size0))
            (os.ftruncate(self.fd, size) if op == "ftruncate" else os.truncate(self.path, size))
            model_resize(self.model, size)
        else:
            fd = os.open(self.path, os.O_WRONLY | os.O_TRUNC)
            model_resize(self.model, 0)
            off, data = rng.randrange(limit), rng.randbytes(4096)
            os.pwrite(fd, data, off)
            os.close(fd)
            model_write(self.model, off, data)
        self.ops.append(op)
        if rng.random() < 0.05:
            os.fsync(self.fd)


@pytest.mark.root
@pytest.mark.parametrize("seed", [int(os.environ.get("COMPATFS_TRUNCATE_SEED", "9000")) + i
                                  for i in range(2)])
def test_random_writes_and_size_changes_through_the_view_during_migration(device, tmp_path, seed):
    """Random pwrite, ftruncate, truncate and O_TRUNC+write through the view while the
    file is copied into the vault, switched, and written on; compared with the model
    after the switch, and after a remount with every cache dropped."""
    root = device
    rng = random.Random(seed)
    legacy, target, model = legacy_volume(root, rng, 24 * MIB)
    config = tmp_path / "c.yaml"
    config.write_text(CONFIG.format(rate=4))
    with mounted(root, tmp_path / "run", stage="migrate", config=config) as m:
        def copying() -> bool:
            tmp = temporary_of(target)
            return tmp is not None and tmp.stat().st_blocks > 0
        wait_for(copying, "the copy did not start", m)
        time.sleep(rng.uniform(0, 2))       # land anywhere in the rest of the bulk copy
        w = ModelWriter(legacy, model, rng)
        try:
            deadline = time.monotonic() + 90
            while not target.exists() and time.monotonic() < deadline:
                w.step()
                # a few hundred requests: they leave most of the file as it was, so
                # stale bytes in the copy have room to show
                time.sleep(rng.choice((0.002, 0.01, 0.02)))
            assert target.exists(), f"seed {seed}: not migrated in 90 s\n{m.log_text()}"
            # the view serves the copy now: what it holds before anything writes to it
            assert read_all(legacy) == bytes(model), f"seed {seed}: the copy after {w.ops}"
            for _ in range(50):             # on the switched handle and new opens
                w.step()
        finally:
            os.close(w.fd)
        assert read_all(legacy) == bytes(model), f"seed {seed}: the view after {w.ops}"
    check_after_remount(root, tmp_path, legacy, target, model, f"seed {seed} after {w.ops}")


@pytest.mark.root
def test_fallocate_through_a_view_is_refused_and_changes_nothing(tmp_path):
    """The views offer no fallocate (pyfuse3 has none): the kernel answers EOPNOTSUPP,
    so no size or hole can change behind the dirty log (docs/migration.md). Should
    the views ever offer it, it must mark what it changes, and this test says so."""
    root = tmp_path / "root"
    (root / "img").mkdir(parents=True)
    data = random.Random(6).randbytes(100000)
    (root / "img" / "f.img").write_bytes(data)
    config = tmp_path / "c.yaml"
    config.write_text("require_encrypted_vault: false\nvault_wait_s: 0\n")
    with mounted(root, tmp_path / "run", stage="observe", config=config):
        path = root / "img" / "f.img"
        for args in (["-l", "1M"], ["-p", "-o", "0", "-l", "8192"],
                     ["-z", "-o", "0", "-l", "8192"]):
            proc = subprocess.run(["fallocate", *args, str(path)], capture_output=True, text=True)
            # EOPNOTSUPP ("Operation not supported"; util-linux words -p its own way)
            assert proc.returncode != 0 and "supported" in proc.stderr, (args, proc)
        assert read_all(path) == data
