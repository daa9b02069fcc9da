"""The daemon as a child process, for the tests, the benchmarks and tools.

:func:`running` starts ``compatfs mount --foreground`` (pyfuse3 runs one FUSE
session per process, so a test or benchmark cannot serve the views itself),
waits under a deadline until the daemon has written its run-dir info and
every view is a compatfs mount, checking meanwhile that the process is alive,
and always tears down: SIGTERM, then SIGKILL, then lazy unmounts of whatever
is left (:func:`teardown`), also when the caller failed.
"""

from __future__ import annotations

import contextlib
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from .. import mounts
from ..layout import Layout
from ..rundir import RunDir

DEADLINE = 20.0



@dataclass
class Child:
    root: Path
    run_dir: Path
    proc: subprocess.Popen[bytes]
    log: Path
    views: tuple[str, ...]

    @property
    def pid(self) -> int:
        return self.proc.pid

    def log_text(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""

    def kill(self, sig: int = signal.SIGKILL) -> None:
        self.proc.send_signal(sig)
        self.proc.wait(timeout=DEADLINE)


def view_paths(root: Path, views: tuple[str, ...]) -> list[Path]:
    """The legacy directory each view covers (the default layout)."""
    layout = Layout(str(root))
    return [Path(layout.path(v)) for v in views]


def teardown(root: Path, run_dir: Path, views: tuple[str, ...]) -> None:
    """Unmount anything of *root* still mounted (views, then private mounts)."""
    for path in reversed(view_paths(root, views)):
        if mounts.mounted_at(str(path)) is not None:
            subprocess.run(["umount", "-l", str(path)], check=False, capture_output=True)
    for entry in mounts.mount_table():
        if entry.mount_point.startswith(str(run_dir) + "/"):
            subprocess.run(["fusermount3", "-u", "-z", entry.mount_point], check=False,
                           capture_output=True)


def _stop(proc: subprocess.Popen[bytes], deadline: float) -> None:
    if proc.poll() is not None:
        return
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout=deadline)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(timeout=deadline)


@contextlib.contextmanager
def running(root: str | Path, run_dir: str | Path, *, stage: str = "observe",
            config: str | Path | None = None, views: tuple[str, ...] = ("img", "downloads"),
            extra: tuple[str, ...] = (), deadline: float = DEADLINE,
            own_session: bool = False, python: tuple[str, ...] = ()) -> Iterator[Child]:
    """The views of *root* served by a daemon subprocess for the duration.

    *python* are options for the interpreter before ``-m compatfs`` (a
    benchmark's ``-m cProfile -o FILE``, for one).

    *own_session* puts the daemon in a session of its own, so a Ctrl-C at a
    terminal reaches only the caller, whose tear-down then stops it.
    """
    root, run_dir = Path(root), Path(run_dir)
    run_dir.mkdir(mode=0o755, parents=True, exist_ok=True)
    log = run_dir / f"daemon-{time.monotonic_ns()}.log"
    argv = [sys.executable, *python, "-m", "compatfs", "mount", "--foreground", "--root", str(root),
            "--run-dir", str(run_dir), "--stage", stage, *extra]
    if config is not None:
        argv += ["--config", str(config)]
    with open(log, "xb") as logf:   # exclusive: never through a name planted there
        proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=logf, stderr=logf,
                                start_new_session=own_session)
    child = Child(root, run_dir, proc, log, views)
    try:
        until = time.monotonic() + deadline
        targets = [str(p) for p in view_paths(root, views)]
        run = RunDir(str(run_dir), str(root))
        while True:
            info = run.info()
            if info is not None and info.get("pid") == proc.pid \
                    and all(mounts.is_compatfs(t) for t in targets):
                break
            if proc.poll() is not None:
                raise RuntimeError(f"compatfs daemon exited with {proc.returncode}:\n"
                                   f"{child.log_text()}")
            if time.monotonic() > until:
                raise RuntimeError(f"views not mounted within {deadline:g} s:\n"
                                   f"{child.log_text()}")
            time.sleep(0.05)
        yield child
    finally:
        _stop(proc, deadline)
        teardown(root, run_dir, views)
