"""The ``compatfs`` command line: one module per command, registered here.

Each command module has ``register(add)``, which adds its parser, and a
``cmd_*`` function, which runs it; :mod:`.common` holds what several share.
Every error a user can cause ends in one line on stderr and an exit code:
2 for a bad command line or configuration, 1 for anything else that stopped
the command. No traceback reaches the caller.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Sequence

from .. import __version__
from ..config import ConfigError
from ..layout import LayoutError
from ..rundir import RunDirError
from . import (
    ctl,
    debug_mount,
    demo,
    migrate,
    mount,
    plan,
    reload,
    rollback,
    status,
    umount,
)
from .common import EXIT_FAILURE, EXIT_USAGE, Command, CommandError, say

#: The commands, in the order ``compatfs --help`` lists them.
COMMANDS = (plan, mount, umount, status, migrate, rollback, reload, debug_mount, ctl, demo)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="compatfs",
        description="Keep EVE-OS legacy /persist names working while the bytes move "
                    "into the new vault layout.")
    parser.add_argument("--version", action="version", version=f"compatfs {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def add(name: str, func: Command, help_: str) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=help_, description=help_)
        p.set_defaults(func=func)
        p.add_argument("--config", metavar="FILE",
                       help="YAML configuration (docs/configuration.md)")
        return p

    for command in COMMANDS:
        command.register(add)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    # legacy names are bytes: reports print each as it is on disk, whatever the
    # locale's encoding (messages and logs on stderr keep Python's backslash
    # escapes, so a log line is always valid text)
    if hasattr(sys.stdout, "reconfigure"):
        sys.stdout.reconfigure(errors="surrogateescape")
    parser = build_parser()
    args = parser.parse_args(argv)
    func: Command = args.func
    try:
        return func(args)
    except (ConfigError, LayoutError, RunDirError) as exc:
        say(f"error: {exc}", logging.ERROR)
        return EXIT_USAGE
    except CommandError as exc:
        say(f"error: {exc}", logging.ERROR)
        return exc.code
    except OSError as exc:
        where = f"{exc.filename}: " if exc.filename else ""
        say(f"error: {where}{exc.strerror or exc}", logging.ERROR)
        return EXIT_FAILURE
    except KeyboardInterrupt:
        say("interrupted", logging.WARNING)
        return 130
    except Exception as exc:
        if os.environ.get("COMPATFS_DEBUG"):
            raise
        say(f"internal error: {type(exc).__name__}: {exc} "
            "(set COMPATFS_DEBUG=1 for the traceback)", logging.CRITICAL)
        return EXIT_FAILURE
