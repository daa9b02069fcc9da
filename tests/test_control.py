"""The control interface: the hidden .compatfs file of each view."""

from __future__ import annotations

import errno
import json
import os

import pytest

from compatfs.testing import devicegen

from .conftest import run_cli
from .mounting import mounted

pytestmark = pytest.mark.root


@pytest.fixture
def live(tmp_path):
    root = tmp_path / "persist"
    root.mkdir()
    devicegen.make_demo(str(root))
    with mounted(root, tmp_path / "run") as m:
        yield root, tmp_path / "run", m


def test_control_file_is_hidden_but_answers(live):
    root, run, _ = live
    ctl = root / "img" / ".compatfs"
    assert ".compatfs" not in os.listdir(root / "img")
    assert os.getxattr(ctl, "user.compatfs.stage") == b"observe"
    assert int(os.getxattr(ctl, "user.compatfs.pid")) > 0
    assert os.getxattr(root / "downloads" / ".compatfs", "user.compatfs.root").decode() == str(root)
    names = os.listxattr(ctl)
    assert "user.compatfs.throttle_mib_per_s" in names and "user.compatfs.cmd.pause" in names
    doc = json.loads(ctl.read_text())
    assert doc["stage"] == "observe" and doc["paused"] is False


def test_errors_follow_the_convention(live):
    root, _, _ = live
    ctl = root / "img" / ".compatfs"
    for call, args, err in [
        (os.getxattr, ("user.compatfs.nope",), errno.ENODATA),
        (os.setxattr, ("user.compatfs.stage", b"migrate"), errno.EROFS),
        (os.setxattr, ("user.compatfs.throttle_mib_per_s", b"fast"), errno.EINVAL),
        (os.setxattr, ("user.compatfs.log_level", b"loud"), errno.EINVAL),
        (os.setxattr, ("user.compatfs.cmd.explode", b""), errno.ENODATA),
    ]:
        with pytest.raises(OSError) as exc:
            call(ctl, *args)
        assert exc.value.errno == err, (call.__name__, args)
    with pytest.raises(OSError) as exc:
        os.unlink(ctl)
    assert exc.value.errno == errno.EPERM
    with pytest.raises(OSError) as exc:
        open(ctl, "w")
    assert exc.value.errno == errno.EROFS


def test_settings_and_commands_through_the_cli(live):
    root, run, m = live
    common = ("--root", str(root), "--run-dir", str(run))
    assert run_cli("ctl", *common, "set", "throttle_mib_per_s", "12.5", check=True)
    assert run_cli("ctl", *common, "get", "throttle_mib_per_s", check=True).stdout.strip() == "12.5"
    run_cli("ctl", *common, "pause", check=True)
    assert run_cli("ctl", *common, "get", "paused", check=True).stdout.strip() == "true"
    run_cli("ctl", *common, "resume", check=True)
    assert run_cli("ctl", *common, "get", "paused", check=True).stdout.strip() == "false"
    run_cli("ctl", *common, "set", "log_level", "debug", check=True)
    assert run_cli("ctl", *common, "get", "log_level", check=True).stdout.strip() == "debug"
    run_cli("ctl", *common, "reload", check=True)
    bad = run_cli("ctl", *common, "set", "stage", "migrate")
    assert bad.returncode == 1 and "read-only" in bad.stderr
    unknown = run_cli("ctl", *common, "get", "nope")
    assert unknown.returncode == 1 and "unknown key" in unknown.stderr
    assert "control: pause" in m.log_text()


def test_metrics_file_in_prometheus_text_format(live):
    import time

    from compatfs.rundir import RunDir

    root, run, _ = live
    os.listdir(root / "img")
    metrics = RunDir(str(run), str(root)).metrics_file
    deadline = time.monotonic() + 15
    text = ""
    while time.monotonic() < deadline:
        if os.path.exists(metrics):
            with open(metrics) as f:
                text = f.read()
            if ("compatfs_fuse_requests_total" in text
                    and "compatfs_fuse_requests_total 0" not in text):
                break
        time.sleep(0.5)
    for name in ("objects", "migration_bytes_remaining", "migration_rate_bytes_per_second",
                 "faults_total", "fuse_requests_total", "fuse_request_seconds"):
        assert f"# TYPE compatfs_{name} " in text, name
    samples = [line for line in text.splitlines() if line and not line.startswith("#")]
    for line in samples:
        name, value = line.rsplit(" ", 1)
        float(value)
        assert name.startswith("compatfs_")
    assert 'compatfs_fuse_request_seconds{quantile="0.99"}' in text
    assert '\ncompatfs_info{layout="eve",eve_release="17.3"} 1\n' in text   # the default layout
    requests = next(float(v) for n, v in (s.rsplit(" ", 1) for s in samples)
                    if n == "compatfs_fuse_requests_total")
    assert requests > 0


def test_settings_are_checked_as_the_config_file_checks_them(live):
    """One registry of ranges: what the YAML refuses, ctl set refuses (EINVAL)."""
    root, run, _ = live
    ctl = root / "img" / ".compatfs"
    key = "user.compatfs.throttle_mib_per_s"
    os.setxattr(ctl, key, b"7.5")
    for bad in (b"nan", b".nan", b"inf", b".inf", b"-.inf", b"1.0e+400", b"-1", b"100001",
                b"99999999999999999999999", b"[1]", b"", b"\xff"):
        with pytest.raises(OSError) as exc:
            os.setxattr(ctl, key, bad)
        assert exc.value.errno == errno.EINVAL, bad
    assert os.getxattr(ctl, key) == b"7.5"
    common = ("--root", str(root), "--run-dir", str(run))
    proc = run_cli("ctl", *common, "set", "throttle_mib_per_s", "nan")
    assert proc.returncode == 1 and "bad value" in proc.stderr
    run_cli("ctl", *common, "set", "throttle_mib_per_s", "100000", check=True)
    got = run_cli("ctl", *common, "get", "throttle_mib_per_s", check=True).stdout.strip()
    assert got == "100000.0"


def test_a_stuck_daemon_never_hangs_ctl_status_or_a_new_mount(live):
    """A daemon that is alive but answers nothing (here: stopped) keeps the kernel
    waiting on every request; the commands wait a bounded time and say so."""
    import signal
    import time

    root, run, m = live
    os.kill(m.pid, signal.SIGSTOP)
    try:
        start = time.monotonic()
        proc = run_cli("ctl", "--root", str(root), "--run-dir", str(run), "--timeout", "2",
                       "get", "stage")
        assert proc.returncode == 1 and "did not answer within 2 s" in proc.stderr, proc.stderr
        proc = run_cli("status", "--root", str(root), "--run-dir", str(run), "--json")
        assert proc.returncode == 3, proc.stderr
        doc = json.loads(proc.stdout)
        assert set(doc["views"].values()) == {"not answering"}, doc["views"]
        assert doc["objects"], "the objects are read from under the views"
        assert "not answering" in proc.stderr
        proc = run_cli("mount", "--root", str(root), "--run-dir", str(run) + "-2",
                       "--foreground")
        assert proc.returncode != 0 and "does not answer" in proc.stderr, proc.stderr
        assert time.monotonic() - start < 60
    finally:
        os.kill(m.pid, signal.SIGCONT)
    assert os.getxattr(root / "img" / ".compatfs", "user.compatfs.stage") == b"observe"


@pytest.mark.parametrize("layout,release,labels", [
    ("eve", "7.10", '{layout="eve",eve_release="7.10"}'),
    ("design-note", None, '{layout="design-note"}')])
def test_metrics_name_the_target_layout(layout, release, labels):
    """compatfs_info carries the layout (and, for eve, the release) as labels."""
    from compatfs import metrics
    from compatfs.daemonstate import DaemonState
    from compatfs.migration import Progress

    state = DaemonState(root="/persist", stage="migrate", layout=layout, eve_release=release,
                        paused=False, records={}, migration=Progress().as_json(), faults=0,
                        problems=(), throttle_mib_per_s=0.0)
    text = metrics.render(state)
    assert f"\ncompatfs_info{labels} 1\n" in text
    assert "# TYPE compatfs_info gauge" in text
