"""Running the compatfs daemon for real in tests.

:func:`mounted` starts ``compatfs mount --foreground`` as a subprocess (pyfuse3
runs one FUSE session per process), waits under a deadline until every view
is a compatfs mount while checking the process is still alive, and always
tears down: SIGTERM, then SIGKILL, then lazy unmounts of whatever is left,
also when the test failed.
"""

from __future__ import annotations

import contextlib
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

from compatfs import mounts

DEADLINE = 20.0


@dataclass
class Mounted:
    root: Path
    run_dir: Path
    proc: subprocess.Popen
    log: Path
    views: tuple[str, ...]

    def log_text(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""

    def kill(self, sig: int = signal.SIGKILL) -> None:
        self.proc.send_signal(sig)
        self.proc.wait(timeout=DEADLINE)


def view_paths(root: Path, views: tuple[str, ...]) -> list[Path]:
    rel = {"img": "img", "downloads": "downloads", "prepared": "runx/pods/prepared"}
    return [root / rel[v] for v in views]


def teardown(root: Path, run_dir: Path, views: tuple[str, ...]) -> None:
    """Unmount anything of *root* still mounted (views, then private mounts)."""
    for path in reversed(view_paths(root, views)):
        if mounts.mounted_at(str(path)) is not None:
            subprocess.run(["umount", "-l", str(path)], check=False, capture_output=True)
    for entry in mounts.mount_table():
        if entry.mount_point.startswith(str(run_dir) + "/"):
            subprocess.run(["fusermount3", "-u", "-z", entry.mount_point], check=False,
                           capture_output=True)


@contextlib.contextmanager
def mounted(root: Path, run_dir: Path, *, stage: str = "observe", config: Path | None = None,
            views: tuple[str, ...] = ("img", "downloads"), extra: tuple[str, ...] = ()) -> Iterator[Mounted]:
    """The views of *root* served by a daemon subprocess for the duration."""
    run_dir.mkdir(parents=True, exist_ok=True)
    log = run_dir / f"daemon-{time.monotonic_ns()}.log"
    argv = [sys.executable, "-m", "compatfs", "mount", "--foreground", "--root", str(root),
            "--run-dir", str(run_dir), "--stage", stage, *extra]
    if config is not None:
        argv += ["--config", str(config)]
    with open(log, "wb") as logf:
        proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=logf, stderr=logf)
    m = Mounted(root, run_dir, proc, log, views)
    try:
        deadline = time.monotonic() + DEADLINE
        targets = view_paths(root, views)
        run = mounts.RunDir(str(run_dir), str(root))

        def ready() -> bool:
            info = run.info()
            return (info is not None and info.get("pid") == proc.pid
                    and all(mounts.is_compatfs(str(t)) for t in targets))

        while not ready():
            if proc.poll() is not None:
                raise RuntimeError(f"compatfs daemon exited with {proc.returncode}:\n{m.log_text()}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"views not mounted within {DEADLINE} s:\n{m.log_text()}")
            time.sleep(0.05)
        yield m
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=DEADLINE)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=DEADLINE)
        teardown(root, run_dir, views)


def assert_clean_exit(m: Mounted) -> None:
    """The daemon stopped by itself with status 0 and logged no traceback."""
    assert m.proc.poll() == 0, m.log_text()
    assert "Traceback" not in m.log_text(), m.log_text()
