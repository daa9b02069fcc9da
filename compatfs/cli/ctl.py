"""``compatfs ctl``: read settings and status of a running daemon, or send it a
command, through the extended attributes of its control file
(:mod:`compatfs.control`), never waiting longer than ``--timeout`` on it."""

from __future__ import annotations

import argparse
import errno
import os
from collections.abc import Callable
from typing import TypeVar

from .. import mounts
from ..enums import ViewName
from ..layout import Layout
from .common import (
    EXIT_USAGE,
    AddCommand,
    CommandError,
    add_mount_common,
    config_and_root,
)

T = TypeVar("T")


def register(add: AddCommand) -> None:
    p = add("ctl", cmd_ctl, "Read settings and status of a running daemon, or send it a "
                            "command (see docs/control.md).")
    add_mount_common(p)
    p.add_argument("action", help="keys, get KEY, set KEY VALUE, pause, resume, reload, "
                                  "migrate-now NAME")
    p.add_argument("args", nargs="*")


def control_file(layout: Layout) -> str:
    """The path of the control file of the daemon serving *layout*'s views."""
    # imported here: pyfuse3 is loaded only by the commands that talk to a daemon
    from ..control import CONTROL_NAME

    return os.path.join(layout.path(ViewName.IMG), CONTROL_NAME)


def ask_daemon(layout: Layout, key: str) -> str | None:
    """A key of the running daemon's control interface, or None when none answers."""
    from ..control import PREFIX

    path = control_file(layout)
    try:
        return mounts.within(mounts.ANSWER_SECONDS,
                             lambda: os.getxattr(path, PREFIX + key)).decode()
    except (OSError, TimeoutError):
        return None


def cmd_ctl(args: argparse.Namespace) -> int:
    from ..control import CMD_PREFIX, COMMANDS, PREFIX

    cfg, root = config_and_root(args)
    path = control_file(cfg.layout(root))
    action: str = args.action

    def answer(call: Callable[[], T]) -> T:
        """The daemon's answer, waited for at most --timeout: a daemon that is
        alive but stuck would otherwise keep the kernel (and us) waiting."""
        try:
            return mounts.within(args.timeout, call)
        except TimeoutError:
            raise CommandError(f"ctl {action}: the daemon did not answer within "
                               f"{args.timeout:g} s (alive but stuck: see its log; kill it, "
                               "and 'compatfs mount' replaces its views)") from None

    try:
        if action == "keys":
            for name in answer(lambda: os.listxattr(path)):
                print(name[len(PREFIX):])
        elif action == "get":
            key = args.args[0]
            print(answer(lambda: os.getxattr(path, PREFIX + key)).decode())
        elif action == "set":
            if len(args.args) != 2:
                raise CommandError("ctl set KEY VALUE", EXIT_USAGE)
            key, value = args.args
            answer(lambda: os.setxattr(path, PREFIX + key, value.encode()))
        elif action in COMMANDS:
            text = " ".join(args.args)
            answer(lambda: os.setxattr(path, CMD_PREFIX + action, text.encode()))
        else:
            raise CommandError(f"unknown ctl action {action!r}", EXIT_USAGE)
    except IndexError:
        raise CommandError(f"ctl {action} needs an argument", EXIT_USAGE) from None
    except OSError as exc:
        why = {errno.ENODATA: "unknown key or command", errno.EROFS: "read-only",
               errno.EINVAL: "bad value", errno.ENOENT: "not mounted (no control file)",
               errno.ENOTCONN: "the daemon is gone (its mounts are dead)",
               errno.EACCES: "permission denied (the control file is root's)"}.get(
                   exc.errno or 0, exc.strerror or str(exc))
        raise CommandError(f"ctl {action}: {why}") from None
    return 0
