"""``compatfs rollback``: move everything back to its legacy name, so an older
EVE can boot, while no daemon serves the root."""

from __future__ import annotations

import argparse
import sys

from .common import LOG_LEVELS, AddCommand, add_mount_common, setup_logging
from .offline import open_offline


def register(add: AddCommand) -> None:
    p = add("rollback", cmd_rollback,
            "Move everything back into the legacy layout, so an older EVE can boot.")
    add_mount_common(p)
    p.add_argument("--log-level", default="warning", choices=LOG_LEVELS)


def cmd_rollback(args: argparse.Namespace) -> int:
    import trio

    from ..migration import Rollback

    setup_logging(args.log_level)
    device, migrator = open_offline(args)
    try:
        moved, problems = trio.run(Rollback(migrator).run)
    finally:
        device.close()
    print(f"compatfs: moved {moved} objects back to their legacy names", file=sys.stderr)
    for p in problems:
        print(f"compatfs: not rolled back: {p}", file=sys.stderr)
    return 1 if problems else 0
