"""The daemon's runtime files: a run dir no local user can write to or steer.

The attacks of issue 9 point 1, done for real: a non-root user (``nobody``,
through ``setpriv``) tries to plant symlinks where the root daemon writes its
metrics, its log and its FUSE mountpoint; a hostile tree planted beforehand (as
root, standing for a run dir left writable by an older version) must be refused
or not followed; a run dir others can write is refused with one line; FIFOs
where the pid or info file should be never hang a command.
"""

from __future__ import annotations

import os
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from compatfs import mounts
from compatfs.rundir import READ_LIMIT, RunDir, RunDirError
from compatfs.testing import devicegen

from .conftest import run_cli
from .mounting import mounted, teardown

pytestmark = pytest.mark.root

NOBODY = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups"]
SECRET = b"root's own data\n"


@pytest.fixture
def base():
    """A root-owned 0755 directory under /tmp that ``nobody`` can traverse (pytest's
    tmp_path is closed to it, which would hide whether the run dir itself is)."""
    path = Path(tempfile.mkdtemp(prefix="compatfs-runfiles-", dir="/tmp"))
    os.chmod(path, 0o755)
    yield path
    for entry in mounts.mount_table():
        if entry.mount_point.startswith(str(path) + "/"):
            subprocess.run(["umount", "-l", entry.mount_point], check=False, capture_output=True)
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def device(tmp_path):
    root = tmp_path / "persist"
    root.mkdir()
    devicegen.make_demo(str(root))
    config = tmp_path / "compatfs.yaml"
    config.write_text("require_encrypted_vault: false\nvault_wait_s: 0\n")
    yield root, config
    teardown(root, tmp_path / "none", ("img", "downloads"))


@pytest.fixture
def secret(base):
    """A root-owned 0600 file an attacker would like the daemon to write to."""
    path = base / "secret"
    path.write_bytes(SECRET)
    os.chmod(path, 0o600)
    return path


def as_nobody(*argv: str) -> subprocess.CompletedProcess:
    return subprocess.run([*NOBODY, *argv], capture_output=True, text=True, timeout=30)


def cli(root: Path, config: Path, run: Path, *args: str) -> subprocess.CompletedProcess:
    return run_cli(*args, "--root", str(root), "--config", str(config), "--run-dir", str(run))


def wait_for(predicate, what: str, seconds: float = 20.0) -> None:
    deadline = time.monotonic() + seconds
    while not predicate():
        assert time.monotonic() < deadline, what
        time.sleep(0.1)


def modes_below(top: Path) -> dict[str, int]:
    """The mode of *top* and of every entry below it, the private mount's content aside."""
    out = {".": os.lstat(top).st_mode}
    for entry in os.listdir(top):
        out[entry] = os.lstat(top / entry).st_mode
    return out


# -- modes --------------------------------------------------------------------------------

def test_a_foreground_daemon_makes_every_runtime_file_closed_to_others(device, base):
    """The reproduction of issue 9 point 1: the daemon's umask 0 made it all 0777."""
    root, config = device
    run = base / "run"
    with mounted(root, run, config=config) as m:
        run_dir = RunDir(str(run), str(root))
        key = Path(run_dir.dir)
        wait_for(lambda: (key / "metrics.prom").exists(), "no metrics file")
        assert stat.S_IMODE(os.lstat(run).st_mode) == 0o755
        seen = modes_below(key)
        assert {name for name in seen} >= {".", "mnt", "pid", "info.json", "metrics.prom",
                                           "last-stage"}
        for name, mode in seen.items():
            assert not mode & 0o022, (name, oct(mode))
            assert stat.S_ISDIR(mode) or stat.S_ISREG(mode), name
        assert stat.S_IMODE(seen["."]) == 0o755
        for name in ("pid", "info.json", "metrics.prom", "last-stage"):
            assert stat.S_IMODE(seen[name]) == 0o644, name
        m.kill(signal.SIGTERM)


def test_a_background_daemon_logs_to_a_file_only_root_reads(device, base):
    root, config = device
    run = base / "run" / "nested"          # missing, two levels: made 0755 each
    try:
        proc = cli(root, config, run, "mount")
        assert proc.returncode == 0, proc.stderr
        key = Path(RunDir(str(run), str(root)).dir)
        for d in (run.parent, run, key):
            assert stat.S_IMODE(os.lstat(d).st_mode) == 0o755, d
        log = os.lstat(key / "daemon.log")
        assert stat.S_ISREG(log.st_mode) and stat.S_IMODE(log.st_mode) == 0o600
    finally:
        assert cli(root, config, run, "umount").returncode == 0


@pytest.mark.parametrize("umask", [0, 0o077])
def test_the_callers_umask_plays_no_part(base, umask):
    old = os.umask(umask)
    try:
        run = RunDir(str(base / "run"), "/persist")
        run.make()
        run.write_file(run.METRICS, "x\n")
        os.close(run.open_log())
        run.close()
    finally:
        os.umask(old)
    key = Path(run.dir)
    assert stat.S_IMODE(os.lstat(base / "run").st_mode) == 0o755
    assert stat.S_IMODE(os.lstat(key).st_mode) == 0o755
    assert stat.S_IMODE(os.lstat(key / "mnt").st_mode) == 0o700
    assert stat.S_IMODE(os.lstat(key / "metrics.prom").st_mode) == 0o644
    assert stat.S_IMODE(os.lstat(key / "daemon.log").st_mode) == 0o600
    assert sorted(os.listdir(key)) == ["daemon.log", "metrics.prom", "mnt"]   # no temporary left


def test_a_log_left_readable_by_others_is_closed_again(base):
    run = RunDir(str(base / "run"), "/persist")
    run.make()
    log = Path(run.dir) / "daemon.log"
    log.write_bytes(b"old lines\n")
    os.chmod(log, 0o644)
    os.close(run.open_log())
    assert stat.S_IMODE(os.lstat(log).st_mode) == 0o600
    assert log.read_bytes() == b"old lines\n"
    run.close()


# -- the three attacks, by a user who is not root ------------------------------------------

def test_nobody_cannot_plant_anything_in_a_running_daemons_run_dir(device, base):
    root, config = device
    run = base / "run"
    with mounted(root, run, config=config):
        key = Path(RunDir(str(run), str(root)).dir)
        wait_for(lambda: (key / "metrics.prom").exists(), "no metrics file")
        before = sorted(os.listdir(key))
        attempts = [
            ("ln", "-s", "/etc/shadow", str(key / "metrics.prom.tmp")),
            ("ln", "-s", "/etc/shadow", str(key / "daemon.log")),
            ("mv", str(key / "mnt"), str(key / "old-mnt")),
            ("ln", "-s", "/tmp", str(key / "mnt2")),
            ("rm", "-f", str(key / "pid")),
            ("ln", "-s", "/etc/shadow", str(run / "0000000000000000")),
            ("mkdir", str(run / "attacker")),
        ]
        for argv in attempts:
            proc = as_nobody(*argv)
            assert proc.returncode != 0, argv
            assert "ermission denied" in proc.stderr or "not permitted" in proc.stderr, proc.stderr
        assert sorted(os.listdir(key)) == before
        assert as_nobody("cat", str(key / "metrics.prom")).returncode == 0   # monitoring reads it
        # the private mount's root is root's alone: the views are reached through their binds
        listing = as_nobody("ls", str(key / "mnt"))
        assert listing.returncode != 0 and "ermission denied" in listing.stderr, listing.stderr
        assert os.stat(key / "mnt").st_mode & 0o777 == 0o700


# -- a hostile tree planted beforehand -------------------------------------------------------

def test_planted_symlinks_at_every_runtime_file_are_replaced_never_followed(device, base,
                                                                              secret):
    root, config = device
    run = base / "run"
    key = Path(RunDir(str(run), str(root)).dir)
    key.mkdir(parents=True, mode=0o755)
    for name in ("metrics.prom.tmp", "metrics.prom", "pid", "pid.tmp", "info.json",
                 "info.json.tmp", "last-stage", "last-stage.tmp"):
        (key / name).symlink_to(secret)
    with mounted(root, run, config=config) as m:
        metrics = key / "metrics.prom"
        wait_for(lambda: metrics.is_file() and not metrics.is_symlink(), "metrics never written")
        for name in ("metrics.prom", "pid", "info.json", "last-stage"):
            assert not (key / name).is_symlink(), name
        assert RunDir(str(run), str(root)).live_pid() == m.pid
        m.kill(signal.SIGTERM)
    assert secret.read_bytes() == SECRET
    assert stat.S_IMODE(os.lstat(secret).st_mode) == 0o600


def test_a_planted_log_symlink_is_refused_and_its_target_untouched(device, base, secret):
    root, config = device
    run = base / "run"
    key = Path(RunDir(str(run), str(root)).dir)
    key.mkdir(parents=True, mode=0o755)
    (key / "daemon.log").symlink_to(secret)
    proc = cli(root, config, run, "mount")
    assert proc.returncode == 2, proc.stderr
    assert f"{key}/daemon.log: not a regular file" in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1
    assert mounts.mounted_at(str(root / "img")) is None
    assert secret.read_bytes() == SECRET
    look = base / "look"
    look.mkdir()
    (key / "debug-mount.log").symlink_to(secret)
    proc = cli(root, config, run, "debug-mount", str(look))
    assert proc.returncode == 2 and "debug-mount.log: not a regular file" in proc.stderr
    assert mounts.mounted_at(str(look)) is None
    assert secret.read_bytes() == SECRET


@pytest.mark.parametrize("foreground", [False, True])
def test_a_planted_mountpoint_symlink_is_refused(device, base, foreground):
    root, config = device
    run = base / "run"
    key = Path(RunDir(str(run), str(root)).dir)
    key.mkdir(parents=True, mode=0o755)
    chosen = base / "chosen"
    chosen.mkdir()
    (key / "mnt").symlink_to(chosen)
    proc = cli(root, config, run, "mount", *(["--foreground"] if foreground else []))
    assert proc.returncode == 2, proc.stderr
    assert f"run dir {key}/mnt: a symbolic link" in proc.stderr
    assert mounts.mounted_at(str(chosen)) is None
    assert mounts.mounted_at(str(root / "img")) is None


def test_a_mountpoint_that_is_not_roots_is_refused(base):
    run = RunDir(str(base / "run"), "/persist")
    os.makedirs(os.path.join(run.dir, "mnt"), mode=0o755)
    os.chown(run.mountpoint, 65534, 65534)
    with pytest.raises(RunDirError, match="mnt: owned by uid 65534"):
        run.make()
    run.close()


# -- run dirs others could write ------------------------------------------------------------

def _nobodys(path: Path) -> None:
    os.chown(path, 65534, 65534)


def _world_writable(path: Path) -> None:
    os.chmod(path, 0o777)


def _sticky_world_writable(path: Path) -> None:
    os.chmod(path, 0o1777)


@pytest.mark.parametrize("spoil, which, why", [
    (_nobodys, "run", "owned by uid 65534"),
    (_world_writable, "run", "mode 0777 lets group or others write"),
    (_sticky_world_writable, "run", "mode 1777 lets group or others write"),
    (_world_writable, "key", "mode 0777 lets group or others write"),
    (_nobodys, "key", "owned by uid 65534"),
    (_world_writable, "parent", "writable by others (and not sticky) or not root's"),
    (_nobodys, "parent", "writable by others (and not sticky) or not root's"),
])
def test_a_run_dir_others_can_write_is_refused(device, base, spoil, which, why):
    root, config = device
    run = base / "parent" / "run"
    key = Path(RunDir(str(run), str(root)).dir)
    key.mkdir(parents=True, mode=0o755)
    target = {"run": run, "key": key, "parent": run.parent}[which]
    spoil(target)
    for command in (["mount"], ["mount", "--foreground"], ["umount"], ["reload"]):
        proc = cli(root, config, run, *command)
        assert proc.returncode == 2, (command, proc.stderr)
        lines = proc.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("compatfs: error: "), lines
        assert str(target) in lines[0] and why in lines[0], lines[0]
    assert mounts.mounted_at(str(root / "img")) is None
    assert sorted(os.listdir(key)) == []     # nothing was written into it


@pytest.mark.parametrize("as_what", ["symlink", "file"])
def test_a_run_dir_that_is_not_a_real_directory_is_refused(device, base, as_what):
    root, config = device
    run = base / "run"
    elsewhere = base / "elsewhere"
    elsewhere.mkdir(mode=0o755)
    if as_what == "symlink":
        run.symlink_to(elsewhere)
    else:
        run.write_text("")
    proc = cli(root, config, run, "mount")
    assert proc.returncode == 2
    assert f"run dir {run}: {'a symbolic link' if as_what == 'symlink' else 'not a directory'}" \
        in proc.stderr
    assert os.listdir(elsewhere) == []


def test_a_root_owned_symlink_above_the_run_dir_is_followed(base):
    (base / "real").mkdir(mode=0o755)
    (base / "alias").symlink_to(base / "real")      # /var/run -> /run
    run = RunDir(str(base / "alias" / "run"), "/persist")
    run.make()
    assert os.path.isdir(base / "real" / "run" / os.path.basename(run.dir) / "mnt")
    run.close()


def test_a_symlink_above_the_run_dir_that_is_not_roots_is_refused(base):
    (base / "real").mkdir(mode=0o755)
    (base / "alias").symlink_to(base / "real")
    os.chown(base / "alias", 65534, 65534, follow_symlinks=False)
    with pytest.raises(RunDirError, match="alias: a symbolic link"):
        RunDir(str(base / "alias" / "run"), "/persist").make()
    assert os.listdir(base / "real") == []


# -- reading runtime files ------------------------------------------------------------------

def test_fifos_and_oversized_runtime_files_never_hang_a_command(device, base):
    root, config = device
    run = base / "run"
    key = Path(RunDir(str(run), str(root)).dir)
    key.mkdir(parents=True, mode=0o755)
    os.mkfifo(key / "pid")
    os.mkfifo(key / "info.json")
    os.mkfifo(key / "last-stage")
    for command in (["umount"], ["reload"]):
        proc = subprocess.run(["timeout", "20", sys.executable, "-m", "compatfs", *command,
                               "--root", str(root), "--config", str(config),
                               "--run-dir", str(run)], capture_output=True, text=True)
        assert proc.returncode != 124, f"{command} hung on a FIFO"
        if command == ["umount"]:
            assert proc.returncode == 0 and "was not mounted" in proc.stderr, proc.stderr
        else:   # reload mounts: a FIFO as last-stage does not hang the daemon either
            assert proc.returncode == 0, proc.stderr
            assert cli(root, config, run, "umount").returncode == 0
    assert not (key / "pid").exists()      # the daemon replaced the FIFO; umount removed it
    run_dir = RunDir(str(run), str(root))
    (key / "pid").write_bytes(b"1" * (READ_LIMIT + 10))
    assert run_dir.live_pid() is None
    (key / "pid").unlink()
    (key / "pid").symlink_to("/proc/self/stat")
    assert run_dir.live_pid() is None


@pytest.mark.parametrize("make", [os.mkfifo, os.mkdir])
def test_a_log_that_is_not_a_regular_file_is_refused(base, make):
    run = RunDir(str(base / "run"), "/persist")
    run.make()
    make(os.path.join(run.dir, "daemon.log"))
    with pytest.raises(RunDirError, match="daemon.log: not a regular file"):
        run.open_log()
    run.close()


def test_migrate_now_refuses_an_unsafe_run_dir(device, base):
    """A pid file others could forge (or remove) must not decide whether a daemon
    serves the device while migrate --now moves its files."""
    root, config = device
    run = base / "run"
    run.mkdir(mode=0o755)
    os.chmod(run, 0o777)
    proc = cli(root, config, run, "migrate", "--now")
    assert proc.returncode == 2 and f"run dir {run}: mode 0777" in proc.stderr, proc.stderr


def test_files_agents_create_through_the_views_keep_the_agents_mode(device, base):
    """The daemon's umask stays 0 for the views (only the agent's own umask
    applies), while its own files have explicit modes."""
    root, config = device
    with mounted(root, base / "run", config=config):
        for umask, want in ((0, 0o666), (0o022, 0o644), (0o077, 0o600)):
            name = root / "img" / f"agent-{umask:03o}.txt"
            old = os.umask(umask)
            try:
                os.close(os.open(name, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
                os.mkdir(f"{name}.d", 0o777)
            finally:
                os.umask(old)
            assert stat.S_IMODE(os.stat(name).st_mode) == want, oct(umask)
            assert stat.S_IMODE(os.stat(f"{name}.d").st_mode) == 0o777 & ~umask, oct(umask)
    assert stat.S_IMODE(os.stat(root / "img" / "agent-000.txt").st_mode) == 0o666  # backing
