"""The ``compatfs`` command line: one function per subcommand.

Every error a user can cause ends in one line on stderr and an exit code:
2 for a bad command line or configuration, 1 for anything else that stopped
the command. No traceback reaches the caller.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from typing import Callable, Sequence

from . import __version__
from .config import Config, ConfigError, load
from .layout import LayoutError
from .plan import make_plan, render_text
from .resolver import Resolver

EXIT_USAGE = 2
EXIT_FAILURE = 1


class CommandError(Exception):
    """A failure to report in one line; ``code`` is the exit status."""

    def __init__(self, message: str, code: int = EXIT_FAILURE) -> None:
        super().__init__(message)
        self.code = code


def _config_and_root(args: argparse.Namespace) -> tuple[Config, str]:
    cfg = load(args.config)
    root = args.root or cfg.root
    if not os.path.isdir(root):
        raise CommandError(f"root {root}: not a directory", EXIT_USAGE)
    return cfg, root


def cmd_plan(args: argparse.Namespace) -> int:
    cfg, root = _config_and_root(args)
    return _print_plan(cfg, root, args.json)


def _print_plan(cfg: Config, root: str, as_json: bool) -> int:
    layout = cfg.layout(root)
    plan = make_plan(layout, Resolver(layout, cfg.overrides))
    if as_json:
        json.dump(plan.as_json(), sys.stdout, indent=1)
        sys.stdout.write("\n")
    else:
        sys.stdout.write(render_text(plan))
        for p in plan.problems:
            print(f"compatfs: warning: {p}", file=sys.stderr)
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from .devicegen import make_demo

    cfg = load(args.config)
    if args.dir:
        if os.path.exists(args.dir) and os.listdir(args.dir):
            raise CommandError(f"{args.dir}: exists and is not empty", EXIT_USAGE)
        os.makedirs(args.dir, exist_ok=True)
        make_demo(args.dir)
        print(f"demo device built in {args.dir}", file=sys.stderr)
        return _print_plan(cfg, args.dir, args.json)
    with tempfile.TemporaryDirectory(prefix="compatfs-demo-") as tmp:
        make_demo(tmp)
        print(f"demo device built in {tmp} (removed afterwards; --dir keeps one)",
              file=sys.stderr)
        return _print_plan(cfg, tmp, args.json)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="compatfs",
        description="Keep EVE-OS legacy /persist names working while the bytes move "
                    "into the new vault layout.")
    parser.add_argument("--version", action="version", version=f"compatfs {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def add(name: str, func: Callable[[argparse.Namespace], int], help_: str) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=help_, description=help_)
        p.set_defaults(func=func)
        p.add_argument("--config", metavar="FILE", help="YAML configuration (docs/configuration.md)")
        return p

    p = add("plan", cmd_plan,
            "Report every legacy object under the root: where it belongs, or why it stays. "
            "Changes nothing.")
    p.add_argument("--root", metavar="DIR", help="the /persist directory (default: from the config)")
    p.add_argument("--json", action="store_true", help="one JSON document instead of a table")

    p = add("demo", cmd_demo, "Build a demo legacy device and show its plan.")
    p.add_argument("--dir", metavar="DIR", help="build it here and keep it (must be empty)")
    p.add_argument("--json", action="store_true", help="print the plan as JSON")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except (ConfigError, LayoutError) as exc:
        print(f"compatfs: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except CommandError as exc:
        print(f"compatfs: error: {exc}", file=sys.stderr)
        return exc.code
    except OSError as exc:
        where = f"{exc.filename}: " if exc.filename else ""
        print(f"compatfs: error: {where}{exc.strerror or exc}", file=sys.stderr)
        return EXIT_FAILURE
    except KeyboardInterrupt:
        print("compatfs: interrupted", file=sys.stderr)
        return 130
    except Exception as exc:  # noqa: BLE001 - the one place that turns bugs into a line
        if os.environ.get("COMPATFS_DEBUG"):
            raise
        print(f"compatfs: internal error: {type(exc).__name__}: {exc} "
              "(set COMPATFS_DEBUG=1 for the traceback)", file=sys.stderr)
        return EXIT_FAILURE
