"""``compatfs status``: the report of :mod:`compatfs.status`, asking the
running daemon (through its control file) what only it knows: its stage, its
migration's progress, its problems."""

from __future__ import annotations

import argparse
import json
import sys

from ..device import locate
from ..enums import Stage, views_for
from .common import AddCommand, add_mount_common, config_and_root
from .ctl import ask_daemon


def register(add: AddCommand) -> None:
    p = add("status", cmd_status,
            "Every legacy object: where its bytes are now and its state.")
    add_mount_common(p)
    p.add_argument("--json", action="store_true", help="one JSON document instead of a table")


def cmd_status(args: argparse.Namespace) -> int:
    """The report, always; its exit status says whether something needs the
    operator (compatfs/status.py: dead views 3, a refused index 4)."""
    from ..status import as_json, collect, exit_status, render_text, view_states

    cfg, root = config_and_root(args)
    site = locate(cfg, root)
    layout = site.layout
    views = view_states(layout, views_for(cfg.mount_prepared))
    serving = "serving" in views.values()
    stage = ask_daemon(layout, "stage") if serving else None
    migration = ask_daemon(layout, "migration") if stage == Stage.MIGRATE else None
    # the legacy directories are read from under views that cannot answer
    dead = [v for v, state in views.items() if state in ("dead", "not answering")]
    plan, objects, index = collect(layout, site.resolver, True, dead)
    if stage is not None:   # the daemon's own (its checkpoint in use may be the last good one)
        said = ask_daemon(layout, "problems")
        plan.problems += [f"daemon: {p}" for p in (json.loads(said) if said else [])
                          if p not in plan.problems]
    doc = as_json(stage or cfg.stage, stage is not None, plan, objects,
                  json.loads(migration) if migration else None, index, views)
    if args.json:
        json.dump(doc, sys.stdout, indent=1)
        sys.stdout.write("\n")
    else:
        sys.stdout.write(render_text(doc))
    code = exit_status(doc)
    if index.problem:
        print(f"compatfs: error: index refused: {index.problem}", file=sys.stderr)
    gone = [v for v, state in views.items() if state == "dead"]
    stuck = [v for v, state in views.items() if state == "not answering"]
    if gone:
        print(f"compatfs: warning: views dead: {', '.join(gone)}; 'compatfs mount' replaces "
              "them", file=sys.stderr)
    if stuck:
        print(f"compatfs: warning: views not answering: {', '.join(stuck)}; their daemon is "
              "alive but stuck (stopped or blocked): see its log, then kill it and "
              "'compatfs mount' replaces them", file=sys.stderr)
    return code
