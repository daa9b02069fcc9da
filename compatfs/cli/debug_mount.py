"""``compatfs debug-mount``: a read-only inspection view of a root at a
mountpoint of one's choice (:mod:`compatfs.debugview`), in the background or
in this process; ``--unmount`` ends it."""

from __future__ import annotations

import argparse
import os
import sys

from ..mounts import fuse_unmount, mounted_at
from .background import spawn
from .common import (
    EXIT_USAGE,
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
    p = add("debug-mount", cmd_debug_mount,
            "Mount a read-only inspection view of DIR at MOUNTPOINT (beside the live views).")
    add_mount_common(p)
    p.add_argument("mountpoint", metavar="MOUNTPOINT")
    p.add_argument("--foreground", action="store_true", help="serve in this process")
    p.add_argument("--unmount", action="store_true", help="unmount MOUNTPOINT instead")
    add_log_format(p)
    p.add_argument("--ready-fd", type=int, help=argparse.SUPPRESS)


def cmd_debug_mount(args: argparse.Namespace) -> int:
    if args.unmount:
        if mounted_at(args.mountpoint) is None:
            raise CommandError(f"{args.mountpoint} is not mounted")
        fuse_unmount(args.mountpoint)
        return 0
    fmt = log_format(args)
    setup_logging("info", fmt)
    cfg, root = config_and_root(args)
    if not os.path.isdir(args.mountpoint):
        raise CommandError(f"{args.mountpoint}: not a directory", EXIT_USAGE)
    if mounted_at(args.mountpoint) is not None:
        raise CommandError(f"{args.mountpoint} is already a mount point")
    if not args.foreground:
        run = run_dir(args, root)
        run.make()
        argv = [sys.executable, "-m", "compatfs", "debug-mount", "--foreground", "--root", root,
                "--log-format", fmt, args.mountpoint]
        if args.config:
            argv += ["--config", args.config]
        pid = spawn(argv, run, run.DEBUG_LOG, args.timeout)
        say(f"read-only view of {root} at {args.mountpoint} (pid {pid}); "
            f"'compatfs debug-mount --unmount {args.mountpoint}' ends it")
        return 0
    import trio

    from ..debugview import Inspector
    from ..index import IndexRefused

    try:
        inspector = Inspector(cfg, root, args.mountpoint)
    except IndexRefused as exc:
        raise CommandError(f"index refused: {exc}") from None

    def ready() -> None:
        if args.ready_fd is not None:
            os.write(args.ready_fd, b"ready\n")

    trio.run(inspector.serve, ready)
    return 0
