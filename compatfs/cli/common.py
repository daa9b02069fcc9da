"""What several ``compatfs`` commands share: exit codes, the one-line error,
the configuration and root of a command line, the run dir, logging, and the
options of every command that works on a mounted root.

Every error a user can cause ends in one line on stderr and an exit code:
:data:`EXIT_USAGE` for a bad command line or configuration, :data:`EXIT_FAILURE`
for anything else that stopped the command (:func:`compatfs.cli.main`).
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Callable

from .. import logformat
from ..config import Config, load
from ..rundir import DEFAULT_RUN_DIR, RunDir

EXIT_USAGE = 2
EXIT_FAILURE = 1

#: What a command does with its parsed command line: its exit status.
Command = Callable[[argparse.Namespace], int]
#: Adds a command's parser: (name, function, help) -> its parser.
AddCommand = Callable[[str, Command, str], argparse.ArgumentParser]

LOG_LEVELS = ("debug", "info", "warning", "error")


class CommandError(Exception):
    """A failure to report in one line; ``code`` is the exit status."""

    def __init__(self, message: str, code: int = EXIT_FAILURE) -> None:
        super().__init__(message)
        self.code = code


def config_and_root(args: argparse.Namespace) -> tuple[Config, str]:
    """The configuration of the command line and the root it names (or the config's)."""
    cfg = load(args.config)
    root: str = args.root or cfg.root
    if not os.path.isdir(root):
        raise CommandError(f"root {root}: not a directory", EXIT_USAGE)
    return cfg, root


def run_dir(args: argparse.Namespace, root: str) -> RunDir:
    """Where the daemons of *root* keep pid, log and private mountpoint."""
    return RunDir(args.run_dir or os.environ.get("COMPATFS_RUN_DIR") or DEFAULT_RUN_DIR, root)


def add_log_format(p: argparse.ArgumentParser) -> None:
    """``--log-format``, for every command that logs."""
    p.add_argument("--log-format", choices=logformat.FORMATS,
                   help=f"text, or one JSON object per line as EVE's agents write "
                        f"(default ${logformat.ENV}, else text)")


def log_format(args: argparse.Namespace) -> str:
    """The log format of the command line: its option, else $COMPATFS_LOG_FORMAT,
    else text; a command started in the background is given it explicitly."""
    try:
        return logformat.chosen(getattr(args, "log_format", None))
    except ValueError as exc:
        raise CommandError(str(exc), EXIT_USAGE) from None


#: The lines a command reports whatever the log level (``compatfs: serving ...``),
#: in JSON lines when the log is (:func:`say`).
_report = logging.getLogger("compatfs.report")
_report.setLevel(logging.INFO)
#: The handler :func:`setup_logging` installed last.
_handler: logging.Handler | None = None


def setup_logging(level: str, fmt: str = "text") -> None:
    """Log to stderr in the format *fmt* (:mod:`compatfs.logformat`): a daemon
    started in the background has its stderr on the log its parent opened in the
    run dir (:meth:`RunDir.open_log`), a supervised one on the supervisor's
    output; no path is ever opened for logging."""
    global _handler
    _handler = logging.StreamHandler(sys.stderr)
    _handler.setFormatter(logformat.formatter(fmt))
    logging.basicConfig(level=getattr(logging, level.upper()), handlers=[_handler], force=True)


def say(text: str, level: int = logging.INFO) -> None:
    """Report *text* on stderr: ``compatfs: TEXT``, or a JSON line of *level* when
    the log is JSON (then stderr holds nothing else), whatever the log level."""
    if _handler is not None and isinstance(_handler.formatter, logformat.JSONFormatter) \
            and _handler in logging.getLogger().handlers:
        _report.log(level, "%s", text, stacklevel=2)
    else:
        print(f"compatfs: {text}", file=sys.stderr)


def add_mount_common(p: argparse.ArgumentParser) -> None:
    """The options of every command that works on a root a daemon may serve."""
    p.add_argument("--root", metavar="DIR",
                   help="the /persist directory (default: from the config)")
    p.add_argument("--run-dir", metavar="DIR",
                   help="where daemons keep pid, log and private mountpoint "
                        "(default $COMPATFS_RUN_DIR or /run/compatfs)")
    p.add_argument("--timeout", type=float, default=30.0, metavar="SECONDS",
                   help="how long to wait for the daemon (default 30)")
