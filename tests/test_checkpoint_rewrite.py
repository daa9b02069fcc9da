"""A checkpoint rewritten in place while compatfs reads it (docs/eve.md section 5, E9).

Before EVE 5.18 zedagent truncates ``checkpoint/lastconfig`` and writes the
new config into the same file, so a reader can find it empty, partial or
(read across a rewrite) mixed. Nothing read that way may place anything:
:func:`compatfs.checkpoint.read_stable` uses only a settled version read
whole, and the resolver keeps its last good config meanwhile.

The loop tests run a real writer process that rewrites the file in place in
small chunks, alternating two valid configs that send the same legacy volume
to two different volume UUIDs (the serialized configs have the same length,
so a mixed read is as long as a whole one), with garbage now and then.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from compatfs import checkpoint
from compatfs.checkpoint import CheckpointChanging, CheckpointError, read_stable
from compatfs.layout import Layout
from compatfs.names import parse_vm_volume
from compatfs.resolver import Resolver
from compatfs.testing import devicegen
from compatfs.testing.devicegen import AppDef, DriveDef
from compatfs.untrusted import read_regular

from .conftest import run_cli
from .devices import device_root
from .mounting import mounted

# -- helpers ---------------------------------------------------------------------------

#: Rewrites argv[1] in place, forever, until argv[3] exists: each round picks one of
#: the files listed in argv[2] (one path a line, a weight before it), truncates the
#: target (as EVE's ioutil.WriteFile does; now and then it does not, so a reader
#: also meets a mix of two versions of the same length) and writes the bytes in
#: small chunks with tiny pauses, then holds it a random while (sometimes long
#: enough to settle). On the stop file it writes argv[4] the same way and exits.
WRITER = r"""
import os, random, sys, time
target, versions, stop, final = sys.argv[1:5]
choices = []
for line in open(versions):
    weight, path = line.split(" ", 1)
    choices += [open(path.strip(), "rb").read()] * int(weight)
rng = random.Random(int(sys.argv[5]))

def rewrite(data, truncate=True):
    fd = os.open(target, os.O_WRONLY | (os.O_TRUNC if truncate else 0))
    try:
        for i in range(0, len(data), 24):
            os.write(fd, data[i:i + 24])
            if rng.random() < 0.5:
                time.sleep(rng.choice((0, 0.0002, 0.001, 0.003)))
    finally:
        os.close(fd)

print("ready", flush=True)
rounds = 0
while not os.path.exists(stop):
    rewrite(rng.choice(choices), truncate=rng.random() < 0.7)
    rounds += 1
    time.sleep(rng.choice((0, 0, 0.001, 0.005, 0.02, 0.25)))
rewrite(open(final, "rb").read())
print(rounds, flush=True)
"""


class Device:
    """One legacy VM volume whose app has two configs: A and B place it in two
    different volumes; the serialized configs have the same length."""

    def __init__(self, root: Path, seed: int = 5) -> None:
        rng = random.Random(seed)
        self.root = root
        drive = DriveDef(devicegen.random_uuid(rng), devicegen.random_sha(rng), "qcow2",
                         volume_uuid=devicegen.random_uuid(rng), generation=2)
        other = DriveDef(devicegen.random_uuid(rng), devicegen.random_sha(rng), "raw")
        self.app = AppDef(devicegen.random_uuid(rng), "app", [drive, other])
        self.a = devicegen.encode_checkpoint(devicegen.build_config([self.app],
                                                                    config_hash="hash-a"))
        self.vol_a = drive.volume_uuid
        drive.volume_uuid = self.vol_b = devicegen.random_uuid(rng)
        self.b = devicegen.encode_checkpoint(devicegen.build_config([self.app],
                                                                    config_hash="hash-b"))
        assert len(self.a) == len(self.b) and self.a != self.b
        self.garbage = [bytes(rng.randrange(256) for _ in range(n))
                        for n in (len(self.a), len(self.a) // 2, 7)]
        for g in self.garbage:
            with pytest.raises(CheckpointError):
                checkpoint.decode(g)
        self.path = root / "checkpoint" / "lastconfig"
        self.legacy = self.app.legacy_name(0)
        (root / "img").mkdir(parents=True, exist_ok=True)
        (root / "img" / self.legacy).write_bytes(b"volume bytes")

    def write(self, data: bytes) -> None:
        """Replace the checkpoint whole, as EVE 5.18 and later do."""
        devicegen.write_atomic(str(self.path), data)

    def target(self, layout: Layout, volume: str) -> str:
        r = Resolver(layout)
        self.write(self.a if volume == self.vol_a else self.b)
        r.refresh()
        res = r.resolve_vm(parse_vm_volume(self.legacy))
        assert res.target is not None and volume in res.target, (res, r.problems)
        return res.target


@contextlib.contextmanager
def rewriter(dev: Device, tmp_path: Path, final: bytes, seed: int = 1) -> Iterator[None]:
    """The writer process, running while the block runs; stopped (on *final*, written
    in place) when it ends, killed if that fails or the block raises."""
    work = tmp_path / "writer"
    work.mkdir(exist_ok=True)
    versions = []
    for i, (weight, data) in enumerate([(5, dev.a), (5, dev.b)]
                                       + [(1, g) for g in dev.garbage] + [(1, b"")]):
        (work / f"v{i}").write_bytes(data)
        versions.append(f"{weight} {work / f'v{i}'}")
    (work / "versions").write_text("\n".join(versions) + "\n")
    (work / "final").write_bytes(final)
    stop = work / "stop"
    proc = subprocess.Popen([sys.executable, "-c", WRITER, str(dev.path), str(work / "versions"),
                             str(stop), str(work / "final"), str(seed)],
                            stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None and proc.stdout.readline().strip() == "ready"
        yield
        stop.touch()
        rounds = int(proc.stdout.readline() or 0)
        assert proc.wait(timeout=30) == 0
        assert rounds > 20, rounds     # it really kept rewriting
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        assert proc.stdout is not None
        proc.stdout.close()


# -- the stable read ---------------------------------------------------------------------

def test_a_settled_file_is_read_at_once(tmp_path):
    path = tmp_path / "f"
    path.write_bytes(b"x" * 1000)
    time.sleep(checkpoint.SETTLE_SECONDS + 0.02)   # ctime, which utime cannot set back
    start = time.monotonic()
    data, sig = read_stable(str(path))
    assert data == b"x" * 1000 and sig == checkpoint.signature(str(path))
    assert time.monotonic() - start < checkpoint.SETTLE_SECONDS


def test_a_file_written_moments_ago_is_used_once_it_stayed_the_same(tmp_path):
    """A prefix that parses is no proof of a whole file: the writer may be between two
    writes. Written moments ago, the file is read again after a pause; the rest
    arrives meanwhile, and the whole version is what is read."""
    resp = devicegen.build_config([AppDef(str(devicegen.random_uuid(random.Random(1))), "a",
                                          [DriveDef("1" * 32, "ab" * 32)])], config_hash="whole")
    data = resp.SerializeToString()
    # the config field alone is a prefix that parses (without the config hash)
    prefix = type(resp)(config=resp.config).SerializeToString()
    assert data.startswith(prefix) and len(prefix) < len(data)
    assert checkpoint.decode(prefix).config_hash == ""
    path = tmp_path / "lastconfig"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    os.write(fd, prefix)

    def finish() -> None:
        time.sleep(0.03)
        os.write(fd, data[len(prefix):])

    t = threading.Thread(target=finish)
    start = time.monotonic()
    t.start()
    try:
        assert checkpoint.read(str(path)).config_hash == "whole"
    finally:
        t.join()
        os.close(fd)
    assert time.monotonic() - start >= checkpoint.SETTLE_SECONDS


@pytest.mark.parametrize("change", ["size", "mtime", "content"])
def test_a_file_that_keeps_changing_is_never_returned(tmp_path, change):
    """Changed during every read (its size, only its mtime, or rewritten in place
    with the same size): the read gives up, saying why, within its budget."""
    path = tmp_path / "lastconfig"
    path.write_bytes(b"a" * 200_000)
    stop = threading.Event()

    def churn() -> None:
        i = 0
        while not stop.is_set():
            i += 1
            if change == "size":
                os.truncate(path, 200_000 + i % 2)
            elif change == "mtime":
                os.utime(path, ns=(i * 1_000_000, i * 1_000_000))
            else:
                with open(path, "r+b") as f:
                    f.write((b"a" if i % 2 else b"b") * 200_000)

    t = threading.Thread(target=churn)
    t.start()
    try:
        start = time.monotonic()
        with pytest.raises(CheckpointChanging, match="being rewritten") as err:
            read_stable(str(path), budget=0.5)
        assert time.monotonic() - start < 2
        assert str(path) in str(err.value)
    finally:
        stop.set()
        t.join()
    data, _ = read_stable(str(path))      # stopped: read whole
    assert len(data) in (200_000, 200_001) and len(set(data[:200_000])) == 1


def test_absent_passes_through_and_a_fifo_is_refused(tmp_path):
    with pytest.raises(FileNotFoundError):
        read_stable(str(tmp_path / "none"))
    os.mkfifo(tmp_path / "fifo")
    with pytest.raises(CheckpointError, match="FIFO"):
        read_stable(str(tmp_path / "fifo"))


# -- the resolver keeps the last good config ------------------------------------------------

@pytest.mark.parametrize("bad", ["empty", "partial", "garbage"])
def test_an_unusable_checkpoint_after_a_good_one_keeps_the_good_one(tmp_path, bad):
    dev = Device(tmp_path)
    layout = Layout(str(tmp_path))
    dev.write(dev.a)
    r = Resolver(layout)
    name = parse_vm_volume(dev.legacy)
    good = r.resolve_vm(name).target
    assert good is not None and dev.vol_a in good and r.problems == ()
    data = {"empty": b"", "partial": dev.b[:len(dev.b) // 2], "garbage": dev.garbage[0]}[bad]
    with open(dev.path, "r+b") as f:     # in place, as EVE before 5.18
        f.truncate(0)
        f.write(data)
    assert r.refresh() is True
    assert r.resolve_vm(name).target == good
    assert r.config.config_hash == "hash-a" and r.checkpoint_path == str(dev.path)
    assert len(r.problems) == 1, r.problems
    problem = r.problems[0]
    assert problem.startswith(f"checkpoint {dev.path} unusable (")
    assert "using the last good one" in problem and "(config hash hash-a)" in problem
    assert r.refresh() is False              # unchanged: not read again
    dev.write(dev.b)                 # a new good one is read at once
    assert r.refresh() is True
    assert dev.vol_b in (r.resolve_vm(name).target or "") and r.problems == ()
    # without a good one before it, nothing is placed
    with open(dev.path, "r+b") as f:
        f.truncate(0)
        f.write(data)
    fresh = Resolver(layout)
    res = fresh.resolve_vm(name)
    assert res.target is None and "checkpoint unusable" in (res.reason or "")


def test_a_checkpoint_being_rewritten_keeps_the_good_one_and_says_so(tmp_path):
    dev = Device(tmp_path)
    dev.write(dev.a)
    r = Resolver(Layout(str(tmp_path)))
    name = parse_vm_volume(dev.legacy)
    good = r.resolve_vm(name).target
    stop = threading.Event()

    def churn() -> None:
        while not stop.is_set():
            with open(dev.path, "r+b") as f:
                f.truncate(0)
                f.write(dev.b)

    before = checkpoint.signature(str(dev.path))
    t = threading.Thread(target=churn)
    t.start()
    try:
        while checkpoint.signature(str(dev.path)) == before:
            time.sleep(0.001)
        assert r.refresh() is True
        assert r.resolve_vm(name).target == good
        assert len(r.problems) == 1 and "being rewritten" in r.problems[0], r.problems
        assert "hash-a" in r.problems[0]
    finally:
        stop.set()
        t.join()
    assert r.refresh() is True              # its signature changed since: read again
    assert dev.vol_b in (r.resolve_vm(name).target or "") and r.problems == ()


def test_a_deleted_checkpoint_keeps_the_good_one_while_the_process_runs(tmp_path):
    """EVE never deletes lastconfig (it truncates it, or renames a new one over
    it): one that is gone is kept while this process runs; a new process has
    none (first boot: nothing placed), as before any checkpoint."""
    dev = Device(tmp_path)
    dev.write(dev.a)
    layout = Layout(str(tmp_path))
    r = Resolver(layout)
    name = parse_vm_volume(dev.legacy)
    good = r.resolve_vm(name).target
    os.unlink(dev.path)
    assert r.refresh() is True
    assert r.resolve_vm(name).target == good
    assert len(r.problems) == 1 and "is gone" in r.problems[0] and "hash-a" in r.problems[0]
    assert "first boot" in (Resolver(layout).resolve_vm(name).reason or "")


# -- a writer rewriting in place, readers in a loop ---------------------------------------

def test_resolver_in_a_loop_never_places_from_a_torn_read(tmp_path):
    dev = Device(tmp_path)
    layout = Layout(str(tmp_path))
    target_a, target_b = dev.target(layout, dev.vol_a), dev.target(layout, dev.vol_b)
    dev.write(dev.a)
    r = Resolver(layout)
    name = parse_vm_volume(dev.legacy)
    seen: dict[str, int] = {}
    kept = torn = 0
    with rewriter(dev, tmp_path, final=dev.b):
        deadline = time.monotonic() + 8
        while time.monotonic() < deadline:
            r.refresh()
            target = r.resolve_vm(name).target
            assert target in (target_a, target_b), (target, r.problems)
            seen[target] = seen.get(target, 0) + 1
            kept += any("using the last good one" in p for p in r.problems)
            try:       # what a reader without the guard would get
                naive = checkpoint.decode(read_regular(str(dev.path), 1 << 20))
                torn += naive.config_hash not in ("hash-a", "hash-b")
            except CheckpointError:
                torn += 1
    assert torn > 0, "the writer never showed a torn checkpoint: the test proves nothing"
    assert kept > 0 and set(seen) == {target_a, target_b}, (seen, kept)
    deadline = time.monotonic() + 5
    while r.resolve_vm(name).target != target_b and time.monotonic() < deadline:
        time.sleep(0.05)
        r.refresh()
    assert r.resolve_vm(name).target == target_b and r.problems == ()


def test_plan_in_a_loop_never_places_from_a_torn_read(tmp_path):
    """Each ``compatfs plan --json`` is a new process: no last good config. It
    places by a settled read (A or B) or, when the checkpoint never settles
    within the read's budget, places nothing and says why."""
    dev = Device(tmp_path)
    layout = Layout(str(tmp_path))
    rel = {layout.relpath(dev.target(layout, v)): v for v in (dev.vol_a, dev.vol_b)}
    legacy = f"img/{dev.legacy}"
    seen: dict[str | None, int] = {}
    with rewriter(dev, tmp_path, final=dev.b, seed=2):
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            out = run_cli("plan", "--root", str(tmp_path), "--json", check=True)
            doc = json.loads(out.stdout)
            obj = next(o for o in doc["objects"] if o["legacy"] == legacy)
            if obj["target"] is None:
                assert "checkpoint unusable" in obj["reason"], obj
            else:
                assert obj["target"] in rel, obj
                assert doc["config_hash"] == ("hash-a" if rel[obj["target"]] == dev.vol_a
                                              else "hash-b"), doc
            seen[obj["target"]] = seen.get(obj["target"], 0) + 1
    assert len([t for t in seen if t is not None]) >= 1, seen
    doc = json.loads(run_cli("plan", "--root", str(tmp_path), "--json", check=True).stdout)
    obj = next(o for o in doc["objects"] if o["legacy"] == legacy)
    assert rel.get(obj["target"]) == dev.vol_b and doc["problems"] == [], doc


def test_daemon_in_stage_migrate_places_by_a_whole_config_and_status_says_which(tmp_path):
    """The daemon starts while the checkpoint is being rewritten: the volume moves
    to A's place or B's, nowhere else. Then, with B settled and read, the
    checkpoint is torn in place: the daemon keeps B, and ``compatfs status``
    says so (the daemon's problem beside its own reading)."""
    work = tmp_path / "dev"
    work.mkdir()
    with device_root(work, size_mb=128) as root:
        dev = Device(root)
        dev.write(dev.a)
        layout = Layout(str(root))
        targets = {dev.target(layout, v) for v in (dev.vol_a, dev.vol_b)}
        volumes = root / "vault" / "volumes"
        config = tmp_path / "c.yaml"
        config.write_text("migration:\n  rescan_s: 1\n  retry_backoff_s: 0\n")
        run = tmp_path / "run"
        with rewriter(dev, tmp_path, final=dev.b, seed=3):
            with mounted(root, run, stage="migrate", config=config) as m:
                deadline = time.monotonic() + 30
                while not (volumes.is_dir() and os.listdir(volumes)) \
                        and time.monotonic() < deadline:
                    time.sleep(0.1)
                time.sleep(3)                # more passes while it is rewritten
                placed = {str(p) for p in volumes.iterdir()} if volumes.is_dir() else set()
                assert len(placed) == 1 and placed <= targets, (placed, m.log_text())
                assert "Traceback" not in m.log_text(), m.log_text()
        # the writer stopped on B; a daemon started now reads it settled
        with mounted(root, run, stage="migrate", config=config) as m:
            deadline = time.monotonic() + 10
            status = json.loads(run_cli("status", "--root", str(root), "--run-dir", str(run),
                                        "--json").stdout)
            assert status["problems"] == [], status["problems"]
            with open(dev.path, "r+b") as f:      # torn in place, and it stays so
                f.truncate(0)
                f.write(dev.b[:len(dev.b) // 3])
            while time.monotonic() < deadline:
                doc = json.loads(run_cli("status", "--root", str(root), "--run-dir", str(run),
                                         "--json").stdout)
                if any(p.startswith("daemon: ") for p in doc["problems"]):
                    break
                time.sleep(0.5)
            mine = [p for p in doc["problems"] if p.startswith("daemon: ")]
            assert len(mine) == 1, (doc["problems"], m.log_text())
            assert mine[0].startswith(f"daemon: checkpoint {dev.path} unusable (")
            assert "using the last good one" in mine[0] and "hash-b" in mine[0]
            text = run_cli("status", "--root", str(root), "--run-dir", str(run)).stdout
            assert f"problem: daemon: checkpoint {dev.path} unusable (" in text, text
            # its own reading: no good one, said as such
            assert any(p.startswith(f"checkpoint unusable: {dev.path}") for p in doc["problems"])
