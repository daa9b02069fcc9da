"""``compatfs status``: every legacy object, where its bytes are now, its state.

Built from the plan (which scans the legacy names; through the views when
they are mounted, so placed objects are seen under their legacy names) and
the index (which says which legacy names live in the new layout). Works the
same with the daemon running or not: it only reads.
"""

from __future__ import annotations

import os
import stat
from dataclasses import dataclass
from typing import Any

from .backing import ROOT_STORE, store_path
from .index import DB_NAME, Index, IndexError_
from .layout import Layout
from .plan import Plan, human, make_plan
from .resolver import Resolver
from .scan import tree_bytes

STATES = ("legacy", "new", "migrating", "failed", "unresolved")

#: index state -> the state status reports
_REPORTED = {"legacy": "legacy", "new": "new", "switched": "new", "unresolved": "unresolved",
             "renaming": "migrating", "copying": "migrating", "copied": "migrating",
             "rolling-back": "migrating",
             "failed": "failed", "quarantined": "failed"}

_VIEW_KEYS = ("img", "downloads", "prepared")


@dataclass
class ObjectStatus:
    kind: str
    legacy: str        # relative to the root
    location: str      # relative to the root: where the bytes are now
    target: str | None
    state: str
    reason: str | None
    bytes: int


def _view_path(layout: Layout, legacy_rel: str) -> str | None:
    """The index key of the legacy object at *legacy_rel* (see Migrator.cas_vpath)."""
    if legacy_rel == layout.rel("containerd"):
        return f"{ROOT_STORE}/{legacy_rel}"
    for key in _VIEW_KEYS:
        base = layout.rel(key)
        if legacy_rel == base or legacy_rel.startswith(base + "/"):
            return key + legacy_rel[len(base):]
    return None


def _legacy_rel(layout: Layout, vpath: str) -> str:
    top, _, rest = vpath.partition("/")
    if top == ROOT_STORE:
        return rest
    return os.path.join(layout.rel(top), rest) if rest else layout.rel(top)


def read_index(layout: Layout) -> Index | None:
    path = os.path.join(layout.path("state"), DB_NAME)
    if not os.path.exists(path):
        return None
    try:
        return Index(path, read_only=True)
    except IndexError_:
        return None


def collect(layout: Layout, resolver: Resolver, include_prepared: bool) -> tuple[Plan, list[ObjectStatus]]:
    plan = make_plan(layout, resolver, include_prepared)
    index = read_index(layout)
    records = dict(index.records) if index is not None else {}
    if index is not None:
        index.close()
    out = []
    seen = set()
    for e in plan.entries:
        legacy = layout.relpath(e.obj.path)
        vpath = _view_path(layout, legacy)
        rec = records.get(vpath) if vpath else None
        target = layout.relpath(e.target) if e.target else None
        if rec is not None:
            seen.add(vpath)
            location = os.path.relpath(os.path.join(store_path(layout, rec.store), rec.rel), layout.root)
            state = _REPORTED.get(rec.state, "new")
            reason = rec.reason if rec.reason else (None if state == "new" else e.reason)
            if rec.state in ("copying", "copied", "renaming") and rec.target_store:
                target = os.path.relpath(os.path.join(store_path(layout, rec.target_store),
                                                      rec.target_rel or ""), layout.root)
            out.append(ObjectStatus(e.obj.kind, legacy, location, target or location, state,
                                    reason, e.obj.bytes))
        else:
            state = "legacy" if e.target is not None else "unresolved"
            out.append(ObjectStatus(e.obj.kind, legacy, legacy, target, state, e.reason,
                                    e.obj.bytes))
    for vpath, rec in records.items():
        if vpath in seen:
            continue
        location = os.path.join(store_path(layout, rec.store), rec.rel)
        try:
            st = os.lstat(location)
            size = st.st_blocks * 512
            if stat.S_ISDIR(st.st_mode):     # a container volume, the CAS store
                size += tree_bytes(location)
        except OSError:
            size = 0
        state = _REPORTED.get(rec.state, "new")
        out.append(ObjectStatus(rec.kind, _legacy_rel(layout, vpath),
                                os.path.relpath(location, layout.root),
                                os.path.relpath(location, layout.root) if state == "new" else None,
                                state, rec.reason, size))
    out.sort(key=lambda o: o.legacy)
    return plan, out


def as_json(stage: str, mounted: bool, plan: Plan, objects: list[ObjectStatus],
            progress: dict | None = None) -> dict[str, Any]:
    totals: dict[str, Any] = {s: {"objects": 0, "bytes": 0} for s in STATES}
    for o in objects:
        totals[o.state]["objects"] += 1
        totals[o.state]["bytes"] += o.bytes
    return {
        "root": plan.layout.root,
        "stage": stage,
        "mounted": mounted,
        "problems": plan.problems,
        "objects": [dict(o.__dict__, progress=(progress or {}).get("current", {}).get(
            _view_path(plan.layout, o.legacy) or "")) for o in objects],
        "migration": progress,
        "totals": {"objects": len(objects), "bytes": sum(o.bytes for o in objects),
                   "by_state": totals},
    }


def render_text(doc: dict[str, Any]) -> str:
    lines = [f"compatfs status for {doc['root']}: stage {doc['stage']}, "
             f"{'mounted' if doc['mounted'] else 'not mounted'}"]
    for p in doc["problems"]:
        lines.append(f"problem: {p}")
    lines.append("")
    for o in doc["objects"]:
        prog = o.get("progress")
        pct = f" {100 * prog['done'] / prog['total']:.0f} %" if prog and prog["total"] else ""
        lines.append(f"{o['state']:<10} {o['kind']:<10} {o['legacy']}  [{human(o['bytes'])}]{pct}")
        if o["location"] != o["legacy"]:
            lines.append(f"{'':<21} at {o['location']}")
        elif o["target"]:
            lines.append(f"{'':<21} belongs at {o['target']}")
        if o["reason"]:
            lines.append(f"{'':<21} {o['reason']}")
    lines.append("")
    mig = doc.get("migration")
    if mig:
        lines.append(f"migrating: {mig['objects_done']}/{mig['objects_total']} objects, "
                     f"{human(mig['bytes_done'])}/{human(mig['bytes_total'])}, "
                     f"{human(int(mig['rate']))}/s")
    by_state = doc["totals"]["by_state"]
    lines.append(", ".join(f"{s}: {v['objects']} ({human(v['bytes'])})"
                           for s, v in by_state.items()))
    return "\n".join(lines) + "\n"
