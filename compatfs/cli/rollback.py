"""``compatfs rollback``: move everything back to its legacy name, so an older
EVE can boot, while no daemon serves the root."""

from __future__ import annotations

import argparse
import logging

from .common import (
    LOG_LEVELS,
    AddCommand,
    add_log_format,
    add_mount_common,
    log_format,
    say,
    setup_logging,
)
from .offline import open_offline


def register(add: AddCommand) -> None:
    p = add("rollback", cmd_rollback,
            "Move everything back into the legacy layout, so an older EVE can boot.")
    add_mount_common(p)
    p.add_argument("--log-level", default="warning", choices=LOG_LEVELS)
    add_log_format(p)


def cmd_rollback(args: argparse.Namespace) -> int:
    import trio

    from ..migration import Rollback

    setup_logging(args.log_level, log_format(args))
    device, migrator = open_offline(args)
    try:
        moved, problems = trio.run(Rollback(migrator).run)
    finally:
        device.close()
    say(f"moved {moved} objects back to their legacy names")
    for p in problems:
        say(f"not rolled back: {p}", logging.WARNING)
    return 1 if problems else 0
