"""``compatfs plan``: every legacy object under the root, where it belongs or
why it stays. Changes nothing."""

from __future__ import annotations

import argparse
import json
import sys

from ..config import Config
from ..device import locate
from ..plan import make_plan, render_text
from .common import AddCommand, config_and_root


def register(add: AddCommand) -> None:
    p = add("plan", cmd_plan,
            "Report every legacy object under the root: where it belongs, or why it stays. "
            "Changes nothing.")
    p.add_argument("--root", metavar="DIR",
                   help="the /persist directory (default: from the config)")
    p.add_argument("--json", action="store_true", help="one JSON document instead of a table")


def cmd_plan(args: argparse.Namespace) -> int:
    cfg, root = config_and_root(args)
    return print_plan(cfg, root, args.json)


def print_plan(cfg: Config, root: str, as_json: bool) -> int:
    """The plan of *root* on stdout (its problems as warnings on stderr); exit status 0."""
    site = locate(cfg, root)
    plan = make_plan(site.layout, site.resolver)
    if as_json:
        json.dump(plan.as_json(), sys.stdout, indent=1)
        sys.stdout.write("\n")
    else:
        sys.stdout.write(render_text(plan))
        for p in plan.problems:
            print(f"compatfs: warning: {p}", file=sys.stderr)
    return 0
