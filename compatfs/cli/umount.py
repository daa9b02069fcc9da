"""``compatfs umount``: stop the daemon of a root and unmount what it (or a
daemon that died) left."""

from __future__ import annotations

import argparse
import os
import signal
import sys
import time

from .common import AddCommand, CommandError, add_mount_common, config_and_root, run_dir


def register(add: AddCommand) -> None:
    p = add("umount", cmd_umount, "Unmount the views of DIR and stop its daemon.")
    add_mount_common(p)


def cmd_umount(args: argparse.Namespace) -> int:
    from ..daemon import cleanup_stale

    cfg, root = config_and_root(args)
    run = run_dir(args, root)
    pid = run.live_pid()
    if pid is not None:
        os.kill(pid, signal.SIGTERM)
        deadline = time.monotonic() + args.timeout
        while time.monotonic() < deadline and run.live_pid() == pid \
                and os.path.exists(f"/proc/{pid}"):
            time.sleep(0.05)
        if os.path.exists(f"/proc/{pid}") and run.live_pid() == pid:
            raise CommandError(f"daemon pid {pid} did not stop within {args.timeout:.0f} s")
    done = cleanup_stale(cfg, root, run)
    for line in done:
        print(f"compatfs: {line} (left by a daemon that died)", file=sys.stderr)
    if pid is None and not done:
        print(f"compatfs: {os.path.abspath(root)} was not mounted", file=sys.stderr)
    return 0
