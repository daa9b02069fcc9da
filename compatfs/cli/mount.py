"""``compatfs mount``: serve the views of a root, in the background (a detached
``mount --foreground``, waited for until ready) or in this process."""

from __future__ import annotations

import argparse
import os
import sys

from ..device import DeviceError
from ..enums import SERVED_STAGES, Stage
from ..rundir import RunDir, RunDirError
from .background import sd_notify, spawn
from .common import (
    EXIT_FAILURE,
    EXIT_USAGE,
    LOG_LEVELS,
    AddCommand,
    CommandError,
    add_log_format,
    add_mount_common,
    config_and_root,
    log_format,
    run_dir,
    say,
    setup_logging,
)


def register(add: AddCommand) -> None:
    p = add("mount", cmd_mount, "Mount the legacy views over DIR/img and DIR/downloads.")
    add_mount_common(p)
    p.add_argument("--stage", choices=[s.value for s in (Stage.OFF, *SERVED_STAGES)],
                   help="rollout stage (default: from the config)")
    p.add_argument("--foreground", action="store_true", help="serve in this process, log to stderr")
    p.add_argument("--log-level", default="info", choices=LOG_LEVELS)
    add_log_format(p)
    p.add_argument("--attr-timeout", type=float, default=10.0, metavar="SECONDS",
                   help="how long the kernel may cache names and attributes (default 10)")
    p.add_argument("--ready-fd", type=int, help=argparse.SUPPRESS)


def cmd_mount(args: argparse.Namespace) -> int:
    from ..daemon import Daemon, cleanup_stale

    fmt = log_format(args)
    setup_logging(args.log_level, fmt)
    cfg, root = config_and_root(args)
    stage = Stage(args.stage or cfg.stage)
    run = run_dir(args, root)
    pid = run.live_pid()
    if pid is not None:
        raise CommandError(f"{os.path.abspath(root)} is already mounted by compatfs "
                           f"(daemon pid {pid}); 'compatfs umount --root {root}' first")
    for line in cleanup_stale(cfg, root, run, views=False):
        say(f"{line} (left by a daemon that died)")
    if not args.foreground:
        return _spawn_daemon(args, root, run, fmt)

    ready_fd = args.ready_fd

    def report(line: str) -> None:
        if ready_fd is not None:
            try:
                os.write(ready_fd, (line + "\n").encode())
            except OSError:
                pass

    daemon = Daemon(cfg, root, stage, run, attr_timeout=args.attr_timeout)
    try:
        daemon.prepare()
    except (DeviceError, RunDirError) as exc:
        report(f"error: {exc}")
        raise CommandError(str(exc), EXIT_USAGE if isinstance(exc, RunDirError)
                           else EXIT_FAILURE) from None

    def ready() -> None:
        report("ready")
        sd_notify(b"READY=1")
        if ready_fd is None:
            say(f"serving {', '.join(daemon.views)} at {daemon.layout.root} (stage {stage})")

    import trio

    try:
        trio.run(daemon.serve, ready)
    except Exception as exc:
        report(f"error: {exc}")
        raise
    return 0


def _spawn_daemon(args: argparse.Namespace, root: str, run: RunDir, fmt: str) -> int:
    """Start the daemon in the background and wait until its views answer."""
    run.make()
    argv = [sys.executable, "-m", "compatfs", "mount", "--foreground", "--root", root,
            "--log-level", args.log_level, "--log-format", fmt,
            "--attr-timeout", str(args.attr_timeout),
            "--run-dir", os.path.dirname(run.dir)]
    if args.config:
        argv += ["--config", args.config]
    if args.stage:
        argv += ["--stage", args.stage]
    pid = spawn(argv, run, run.LOG, args.timeout)
    say(f"mounted {root} (daemon pid {pid}, log {run.log_file})")
    return 0
