"""Starting a ``--foreground`` command detached and waiting until it is ready
(``mount`` and ``debug-mount`` in the background), and telling systemd how a
daemon is doing."""

from __future__ import annotations

import os
import select
import socket
import subprocess
import time

from ..rundir import RunDir
from .common import CommandError


def spawn(argv: list[str], run: RunDir, log_name: str, timeout: float) -> int:
    """Run *argv* (a --foreground command) detached, logging to *log_name* in the
    run dir, and wait for it to report ready on the fd passed with --ready-fd;
    its pid."""
    log_file = os.path.join(run.dir, log_name)
    log = run.open_log(log_name)
    r, w = os.pipe()
    argv = [*argv, "--ready-fd", str(w)]
    try:
        proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=log, stderr=log,
                                pass_fds=(w,), start_new_session=True)
    finally:
        os.close(log)
    os.close(w)
    deadline = time.monotonic() + timeout
    line = b""
    with os.fdopen(r, "rb") as pipe:
        while time.monotonic() < deadline:
            ready, _, _ = select.select([pipe], [], [], 0.2)
            if ready:
                line = pipe.readline().strip()
                break
            if proc.poll() is not None:
                break
    if line == b"ready":
        return proc.pid
    if line.startswith(b"error: "):
        proc.wait(timeout=10)
        raise CommandError(line[7:].decode(errors="replace"))
    if proc.poll() is None:
        proc.terminate()
        raise CommandError(f"the daemon did not report ready within {timeout:.0f} s; "
                           f"see {log_file}")
    raise CommandError(f"the daemon exited with status {proc.returncode}; see {log_file}")


def sd_notify(message: bytes) -> None:
    """Tell systemd (Type=notify) how the daemon is doing, when it runs under it."""
    address = os.environ.get("NOTIFY_SOCKET")
    if not address:
        return
    if address.startswith("@"):
        address = "\0" + address[1:]
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
            sock.connect(address)
            sock.sendall(message)
    except OSError:
        pass
