"""``compatfs demo``: build a demo legacy device and show its plan (and, as
root with /dev/fuse, a tour of its mounted views)."""

from __future__ import annotations

import argparse
import os
import sys
import tempfile

from ..config import Config, load
from .common import EXIT_USAGE, AddCommand, CommandError
from .plan import print_plan


def register(add: AddCommand) -> None:
    p = add("demo", cmd_demo, "Build a demo legacy device and show its plan.")
    p.add_argument("--dir", metavar="DIR",
                   help="build a plain tree here, keep it, and show its plan (must be empty)")
    p.add_argument("--plan-only", action="store_true", help="show the plan, mount nothing")
    p.add_argument("--json", action="store_true", help="print the plan as JSON")


def cmd_demo(args: argparse.Namespace) -> int:
    from ..demo import can_mount, tour
    from ..testing.devicegen import make_demo

    cfg = load(args.config)
    if not args.dir and not args.plan_only and not args.json:
        if can_mount():
            return tour()
        print("compatfs: not root or no /dev/fuse: showing the plan only "
              "(run as root to see the mounted views)", file=sys.stderr)
    if args.dir:
        if os.path.exists(args.dir) and os.listdir(args.dir):
            raise CommandError(f"{args.dir}: exists and is not empty", EXIT_USAGE)
        os.makedirs(args.dir, exist_ok=True)
        make_demo(args.dir)
        print(f"demo device built in {args.dir}", file=sys.stderr)
        return _demo_plans(cfg, args.dir, args.json)
    with tempfile.TemporaryDirectory(prefix="compatfs-demo-") as tmp:
        make_demo(tmp)
        print(f"demo device built in {tmp} (removed afterwards; --dir keeps one)",
              file=sys.stderr)
        return _demo_plans(cfg, tmp, args.json)


def _demo_plans(cfg: Config, root: str, as_json: bool) -> int:
    """The demo's plan; as text, followed by what the design note's layout does
    differently from eve (of the configured release)."""
    from ..demo import layouts_compared
    from ..rules import release_text

    status = print_plan(cfg, root, as_json)
    if not as_json:
        release = release_text(cfg.rules.release) if cfg.rules.release else None
        sys.stdout.write("\n" + layouts_compared(root, release))
    return status
