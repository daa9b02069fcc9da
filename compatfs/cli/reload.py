"""``compatfs reload``: apply the config again. A changed stage remounts, rolls
back or stops; the same stage has the running daemon re-read the checkpoint."""

from __future__ import annotations

import argparse
import sys

from ..enums import Stage
from .common import AddCommand, add_log_format, add_mount_common, config_and_root, run_dir
from .ctl import cmd_ctl
from .mount import cmd_mount
from .rollback import cmd_rollback
from .umount import cmd_umount


def register(add: AddCommand) -> None:
    p = add("reload", cmd_reload,
            "Apply the config again: a changed stage remounts, rolls back or stops; "
            "otherwise the daemon re-reads the checkpoint.")
    add_mount_common(p)
    add_log_format(p)


def cmd_reload(args: argparse.Namespace) -> int:
    """Apply a changed config: a new stage remounts (or rolls back, or stops)."""
    cfg, root = config_and_root(args)
    run = run_dir(args, root)
    info = run.info() if run.live_pid() is not None else None
    running = info["stage"] if info else Stage.OFF
    wanted = cfg.stage
    if info is not None and running == wanted:
        return cmd_ctl(argparse.Namespace(**{**vars(args), "action": "reload", "args": []}))
    print(f"compatfs: stage: {running} -> {wanted}", file=sys.stderr)
    if info is not None:
        cmd_umount(args)
    if wanted == Stage.OFF:
        return 0
    if wanted == Stage.ROLLBACK:
        return cmd_rollback(argparse.Namespace(**{**vars(args), "log_level": "warning"}))
    return cmd_mount(argparse.Namespace(**{**vars(args), "stage": None, "foreground": False,
                                           "log_level": "info", "attr_timeout": 10.0,
                                           "ready_fd": None}))
