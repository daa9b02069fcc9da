"""Soak: sixteen agents write through the views for minutes while the daemon
migrates under injected faults, and nothing they were told was written is lost.

What the agents do is what the old agents do, concurrently: each keeps one
legacy VM volume open and writes, truncates and re-reads it while the daemon
copies it into the encrypted vault and switches it underneath them, and
downloads files into ``pending/``, moves them on to ``verifier/`` and deletes
them. Every change is applied to an in-memory model only once the view said
it was done.

The faults: the disk is filled to the last block for a few seconds at a time
(agents may get ``ENOSPC`` and retry, nothing else); the migrator raises
``EIO`` at named steps of its copies (``COMPATFS_FAULT_MODE=raise``, a few
times in each daemon); and halfway through the daemon is killed with SIGKILL
and a new one replaces its dead views (agents see ``ENOTCONN`` until then,
re-open and retry). Any other errno an agent sees fails the test.

At the end every file is compared byte for byte with the model through the
views, then again through a fresh daemon after the page cache was dropped;
the daemon's resident memory over the run must stay bounded (no growth in
the last part of the run beyond a small allowance).

The duration is ``COMPATFS_SOAK_SECONDS`` (default 180: three minutes).
"""

from __future__ import annotations

import errno
import json
import os
import random
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from compatfs.testing import devicegen
from compatfs.testing.devicegen import AppDef, DriveDef, random_sha, random_uuid

from .devices import device_root
from .mounting import mounted

pytestmark = [pytest.mark.root, pytest.mark.slow]

MIB = 1 << 20
SOAK_SECONDS = float(os.environ.get("COMPATFS_SOAK_SECONDS", "180"))
WRITERS = 16
VOLUME_BYTES = 6 * MIB
#: Errnos an agent may see and retry: the disk filled up, or the daemon died.
RETRYABLE = {errno.ENOSPC, errno.EDQUOT, errno.ENOTCONN, errno.ECONNABORTED}
#: Resident memory the daemon may gain over the last third of the run.
RSS_GROWTH_ALLOWED = 12 * MIB
RSS_LIMIT = 160 * MIB


@dataclass
class Agent:
    """One writer: its volume, its downloads, and what the views acknowledged."""

    index: int
    volume: Path
    model: bytearray
    rng: random.Random
    downloads: dict[Path, bytes] = field(default_factory=dict)
    ops: int = 0
    retries: dict[int, int] = field(default_factory=dict)
    unexpected: list[str] = field(default_factory=list)


def _retry(agent: Agent, stop: threading.Event, op) -> bool:
    """Run *op* until it succeeds; a retryable errno waits and tries again.
    Returns False when it gave up (stop set) or saw an errno no agent expects."""
    while True:
        try:
            op()
            return True
        except OSError as exc:
            if exc.errno not in RETRYABLE:
                agent.unexpected.append(f"{op.__name__}: {exc!r}")
                return False
            agent.retries[exc.errno] = agent.retries.get(exc.errno, 0) + 1
            if stop.is_set() and agent.retries[exc.errno] > 10_000:
                return False
            time.sleep(0.05)


class VolumeWriter:
    """Writes an agent's volume through one open fd, re-opened when the daemon died."""

    def __init__(self, agent: Agent) -> None:
        self.agent = agent
        self.fd = -1

    def _fd(self) -> int:
        if self.fd < 0:
            self.fd = os.open(self.agent.volume, os.O_RDWR)
        return self.fd

    def _drop(self) -> None:
        if self.fd >= 0:
            try:
                os.close(self.fd)
            except OSError:
                pass
            self.fd = -1

    def call(self, fn):
        def op():
            try:
                return fn(self._fd())
            except OSError as exc:
                if exc.errno in (errno.ENOTCONN, errno.ECONNABORTED, errno.EBADF):
                    self._drop()
                    if exc.errno == errno.EBADF:  # a handle of a dead daemon
                        raise OSError(errno.ENOTCONN, "re-open") from None
                raise
        op.__name__ = fn.__name__
        return op


def _tail(text: str, lines: int = 80) -> str:
    return "\n".join(text.splitlines()[-lines:])


def agent_loop(agent: Agent, stop: threading.Event, root: Path) -> None:
    rng = agent.rng
    vol = VolumeWriter(agent)
    pending = root / "downloads/appImg.obj/pending"
    verifier = root / "downloads/appImg.obj/verifier"
    try:
        while not stop.is_set() and not agent.unexpected:
            agent.ops += 1
            r = rng.random()
            if r < 0.55:
                size = len(agent.model)
                off = rng.randrange(0, max(size, 1))
                data = rng.randbytes(rng.choice((512, 4096, 65536, 200_000)))

                def pwrite(fd, off=off, data=data):
                    view = memoryview(data)
                    done = 0
                    while done < len(data):
                        done += os.pwrite(fd, view[done:], off + done)
                if _retry(agent, stop, vol.call(pwrite)):
                    end = off + len(data)
                    if end > len(agent.model):
                        agent.model.extend(bytes(end - len(agent.model)))
                    agent.model[off:end] = data
            elif r < 0.62:
                # shrink, then grow again (as `truncate -s0; truncate -s SIZE` does): the
                # bytes in between must read as zeros, also in the copy being made
                for new_size in (rng.randrange(0, len(agent.model) + 1),
                                 rng.randrange(VOLUME_BYTES // 2, VOLUME_BYTES * 3 // 2)):
                    def ftruncate(fd, new_size=new_size):
                        os.ftruncate(fd, new_size)
                    if not _retry(agent, stop, vol.call(ftruncate)):
                        break
                    if new_size < len(agent.model):
                        del agent.model[new_size:]
                    else:
                        agent.model.extend(bytes(new_size - len(agent.model)))
            elif r < 0.72:
                off = rng.randrange(0, max(len(agent.model), 1))
                length = rng.choice((4096, 65536, MIB))
                got: list[bytes] = []

                def pread(fd, off=off, length=length, got=got):
                    got.append(os.pread(fd, length, off))
                if _retry(agent, stop, vol.call(pread)):
                    want = bytes(agent.model[off:off + length])
                    if got[-1] != want:
                        agent.unexpected.append(f"read of {agent.volume.name} at {off} "
                                                f"differs from what was written")
            elif r < 0.74:
                vol._drop()     # close and re-open, as QEMU does on a restart
            elif r < 0.86 and len(agent.downloads) < 6:
                uuid = random_uuid(rng)
                path = pending / uuid / f"image-{agent.index}-{agent.ops}.img"
                data = rng.randbytes(rng.choice((1000, 70_000, 300_000)))

                def download(path=path, data=data):
                    path.parent.mkdir(parents=True, exist_ok=True)
                    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
                    try:
                        os.write(fd, data)
                        os.fsync(fd)
                    finally:
                        os.close(fd)
                if _retry(agent, stop, download):
                    agent.downloads[path] = data
            elif r < 0.94 and agent.downloads:
                src = rng.choice(sorted(agent.downloads))
                if src.parent.parent != pending:
                    continue
                dst = verifier / src.parent.name / src.name

                def to_verifier(src=src, dst=dst):
                    if not os.path.lexists(src) and os.path.lexists(dst):
                        return          # done before the daemon died
                    dst.parent.mkdir(parents=True, exist_ok=True)
                    os.rename(src, dst)
                if _retry(agent, stop, to_verifier):
                    agent.downloads[dst] = agent.downloads.pop(src)
            elif agent.downloads:
                victim = rng.choice(sorted(agent.downloads))

                def remove(victim=victim):
                    try:
                        os.unlink(victim)
                    except FileNotFoundError:
                        pass            # done before the daemon died
                if _retry(agent, stop, remove):
                    del agent.downloads[victim]
            time.sleep(rng.uniform(0.005, 0.04))   # agents pause; copies can converge
    except Exception as exc:  # noqa: BLE001 - reported by the test
        agent.unexpected.append(f"agent crashed: {exc!r}")
    finally:
        vol._drop()


def fill_disk(root: Path, stop: threading.Event, log: list[str]) -> None:
    """Fill the filesystem for 3 s of every 15, then free it again."""
    balloon = root / "balloon"
    while not stop.wait(12):
        vfs = os.statvfs(root)
        free = vfs.f_bavail * vfs.f_frsize
        try:
            fd = os.open(balloon, os.O_WRONLY | os.O_CREAT, 0o600)
            try:
                os.posix_fallocate(fd, 0, max(free, 4096))
            except OSError:
                pass            # it filled anyway
            finally:
                os.close(fd)
            log.append(f"filled {free // MIB} MiB")
            stop.wait(3)
        finally:
            balloon.unlink(missing_ok=True)


def rss_of(pid: int) -> int | None:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def soak_device(root: Path, rng: random.Random) -> list[Path]:
    """Legacy volumes for every agent, one app each, written with random bytes."""
    apps = [AppDef(random_uuid(rng), f"app{i}", [
        DriveDef(random_uuid(rng), random_sha(rng), "raw", volume_uuid=random_uuid(rng))])
        for i in range(WRITERS)]
    devicegen.write_device_state(str(root), apps)
    volumes = []
    for app in apps:
        path = root / "img" / app.legacy_name(0)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(rng.randbytes(VOLUME_BYTES))
        volumes.append(path)
    return volumes


def cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "compatfs", *args], capture_output=True,
                          text=True, timeout=60)


def ctl(root: Path, run: Path, *args: str) -> None:
    proc = cli("ctl", "--root", str(root), "--run-dir", str(run), *args)
    assert proc.returncode == 0, proc.stderr


def volume_states(root: Path, run: Path, volumes: list[Path]) -> dict[str, str | None]:
    proc = cli("status", "--root", str(root), "--run-dir", str(run), "--json")
    assert proc.returncode == 0, proc.stderr
    states = {o["legacy"]: o["state"] for o in json.loads(proc.stdout)["objects"]}
    return {f"img/{v.name}": states.get(f"img/{v.name}") for v in volumes}


def moved_count(root: Path, run: Path, volumes: list[Path]) -> int:
    return sum(s == "new" for s in volume_states(root, run, volumes).values())


def wait_all_new(root: Path, run: Path, volumes: list[Path], deadline: float) -> int:
    """Wait until every volume is served from its new copy; returns how many are."""
    until = time.monotonic() + deadline
    while True:
        states = volume_states(root, run, volumes)
        done = sum(s == "new" for s in states.values())
        if done == len(volumes):
            return done
        assert time.monotonic() < until, states
        time.sleep(0.5)


def check_all(agents: list[Agent], when: str) -> None:
    bad = []
    for a in agents:
        got = a.volume.read_bytes()
        if got != bytes(a.model):
            first = next((i for i, (x, y) in enumerate(zip(got, a.model, strict=False)) if x != y),
                         min(len(got), len(a.model)))
            bad.append(f"{a.volume.name}: {len(got)} bytes, model {len(a.model)}, "
                       f"first difference at {first}")
        for path, data in a.downloads.items():
            if not path.exists() or path.read_bytes() != data:
                bad.append(f"{path}: lost or changed")
    assert bad == [], f"{when}: {len(bad)} mismatches: {bad[:10]}"


#: Faults raised inside the migrator, for each daemon in turn: (point, times).
RAISED = (("bulk-copied", 4), ("copied", 3))


def test_sixteen_agents_under_faults_lose_nothing_and_memory_stays_bounded(tmp_path, monkeypatch):
    run = tmp_path / "run"
    work = tmp_path / "dev"
    work.mkdir()
    rng = random.Random(int(os.environ.get("COMPATFS_SOAK_SEED", "1")))
    cfg = tmp_path / "c.yaml"
    cfg.write_text("migration: {throttle_mib_per_s: 3, rescan_s: 1, retry_backoff_s: 1, "
                   "concurrency: 2}\n")
    with device_root(work, size_mb=768) as root:
        volumes = soak_device(root, rng)
        agents = [Agent(i, v, bytearray(v.read_bytes()), random.Random(rng.random()))
                  for i, v in enumerate(volumes)]
        stop = threading.Event()
        fills: list[str] = []
        rss: list[tuple[float, int]] = []
        monkeypatch.setenv("COMPATFS_FAULT_MODE", "raise")
        monkeypatch.setenv("COMPATFS_FAULT", RAISED[0][0])
        monkeypatch.setenv("COMPATFS_FAULT_TIMES", str(RAISED[0][1]))
        with mounted(root, run, stage="migrate", config=cfg) as first:
            threads = [threading.Thread(target=agent_loop, args=(a, stop, root), daemon=True)
                       for a in agents]
            threads.append(threading.Thread(target=fill_disk, args=(root, stop, fills),
                                            daemon=True))
            for t in threads:
                t.start()
            start = time.monotonic()
            pid = first.pid
            try:
                while time.monotonic() - start < SOAK_SECONDS / 2:
                    if (r := rss_of(pid)) is not None:
                        rss.append((time.monotonic() - start, r))
                    time.sleep(1)
                first_log = first.log_text()
                injected = first_log.count("injected fault at ")
                first.kill(signal.SIGKILL)      # the views stay, dead, until replaced
                monkeypatch.setenv("COMPATFS_FAULT", RAISED[1][0])
                monkeypatch.setenv("COMPATFS_FAULT_TIMES", str(RAISED[1][1]))
                with mounted(root, run, stage="migrate", config=cfg) as second:
                    pid = second.pid
                    rss_start = time.monotonic() - start
                    while time.monotonic() - start < SOAK_SECONDS:
                        if any(a.unexpected for a in agents):
                            break
                        if (r := rss_of(pid)) is not None:
                            rss.append((time.monotonic() - start, r))
                        time.sleep(1)
                    pivoted = moved_count(root, run, [a.volume for a in agents])
                    stop.set()
                    for t in threads:
                        t.join(timeout=60)
                    assert not any(t.is_alive() for t in threads), "an agent hung"
                    problems = [p for a in agents for p in a.unexpected]
                    if problems:   # with what both daemons logged, to find out why
                        pytest.fail(f"{problems[:10]}\n-- the first daemon's log, last lines:\n"
                                    f"{_tail(first_log)}\n-- the second daemon's:\n"
                                    f"{_tail(second.log_text())}", pytrace=False)
                    ops = sum(a.ops for a in agents)
                    assert ops > WRITERS * 100, ops
                    check_all(agents, "through the views")
                    # then let every volume finish moving, so the last check reads the copies
                    ctl(root, run, "set", "throttle_mib_per_s", "0")
                    wait_all_new(root, run, [a.volume for a in agents], deadline=120)
                    check_all(agents, "through the views once every volume moved")
                    log = second.log_text()
                    injected += log.count("injected fault at ")
                    second.proc.send_signal(signal.SIGTERM)
                    assert second.proc.wait(timeout=30) == 0, log
            finally:
                stop.set()
        for name in ("COMPATFS_FAULT", "COMPATFS_FAULT_MODE", "COMPATFS_FAULT_TIMES"):
            monkeypatch.delenv(name)
        subprocess.run(["sync"], check=False)
        Path("/proc/sys/vm/drop_caches").write_text("3\n")
        with mounted(root, run, stage="redirect", config=cfg):
            check_all(agents, "after a remount with caches dropped")

    assert fills, "the disk was never filled"
    assert injected >= 2, "the migrator's injected faults never fired"
    later = [r for t, r in rss if t >= rss_start + (SOAK_SECONDS - rss_start) / 3]
    early = [r for t, r in rss if rss_start <= t < rss_start + (SOAK_SECONDS - rss_start) / 3]
    assert max(r for _, r in rss) <= RSS_LIMIT, max(r for _, r in rss)
    if early and later:
        assert max(later) - max(early) <= RSS_GROWTH_ALLOWED, (max(early), max(later))
    print(f"soak: {sum(a.ops for a in agents)} operations by {WRITERS} agents in "
          f"{SOAK_SECONDS:g} s, retries {sum(sum(a.retries.values()) for a in agents)}, "
          f"disk filled {len(fills)} times, {injected} faults raised in the migrator, "
          f"{pivoted} volumes switched under the agents, "
          f"daemon RSS max {max(r for _, r in rss) / MIB:.1f} MiB")
