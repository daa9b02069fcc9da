"""``compatfs status``: every legacy object, where its bytes are now, its state.

Built from the plan (which scans the legacy names; through the views when
they are mounted, so placed objects are seen under their legacy names) and
the index (which says which legacy names live in the new layout). Works the
same with the daemon running or not: it only reads.

It reports what the next ``mount`` would refuse: the index is opened with the
same checks (:func:`compatfs.index.open_index`), and one that is refused is
reported with the reason, not ignored. Views left by a daemon that died
(``ENOTCONN``) are reported as dead, and the legacy directories under them
are read through a clone of the root's mount without them, so the report
still shows every object on disk.
"""

from __future__ import annotations

import os
import stat
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

from . import mounts
from .backing import store_path
from .beneath import RESOLVE_BENEATH, RESOLVE_NO_SYMLINKS, openat2
from .device import index_of
from .enums import ALL_VIEWS, MIGRATING_STATES, State, StoreKey, ViewName
from .index import IndexRefused
from .indexformat import Record
from .layout import Layout
from .names import shown
from .plan import Plan, human, make_plan
from .resolver import Resolver
from .scan import tree_bytes


class Reported(StrEnum):
    """The state ``status`` reports of an object: its index state, summed up."""

    LEGACY = "legacy"
    NEW = "new"
    MIGRATING = "migrating"
    FAILED = "failed"
    UNRESOLVED = "unresolved"


#: index state -> the state status reports
_REPORTED: dict[str, Reported] = {
    State.LEGACY: Reported.LEGACY, State.NEW: Reported.NEW, State.SWITCHED: Reported.NEW,
    State.UNRESOLVED: Reported.UNRESOLVED,
    State.RENAMING: Reported.MIGRATING, State.COPYING: Reported.MIGRATING,
    State.COPIED: Reported.MIGRATING, State.ROLLING_BACK: Reported.MIGRATING,
    State.FAILED: Reported.FAILED, State.QUARANTINED: Reported.FAILED}


@dataclass
class ObjectStatus:
    kind: str
    legacy: str        # relative to the root
    location: str      # relative to the root: where the bytes are now
    target: str | None
    state: str
    reason: str | None
    bytes: int


def view_path(layout: Layout, legacy_rel: str) -> str | None:
    """The index key of the legacy object at *legacy_rel* (see Migrator.cas_vpath);
    None for a path under no view."""
    if legacy_rel == layout.rel("containerd"):
        return f"{StoreKey.ROOT}/{legacy_rel}"
    for key in ALL_VIEWS:
        base = layout.rel(key)
        if legacy_rel == base or legacy_rel.startswith(base + "/"):
            return key + legacy_rel[len(base):]
    return None


def _legacy_rel(layout: Layout, vpath: str) -> str:
    top, _, rest = vpath.partition("/")
    if top == StoreKey.ROOT:
        return rest
    return os.path.join(layout.rel(top), rest) if rest else layout.rel(top)


@dataclass
class IndexReport:
    """What status found of the index: ``sound``, ``none`` (never made: nothing
    was placed) or ``refused`` (``problem`` says why and what to do)."""

    state: str
    problem: str | None = None
    records: dict[str, Record] = field(default_factory=dict)

    def as_json(self, layout: Layout) -> dict[str, Any]:
        return {"path": os.path.join(layout.rel("state"), "index.db"), "state": self.state,
                "records": len(self.records), "problem": self.problem}


def read_index(layout: Layout) -> IndexReport:
    """The index, read-only and proven sound as ``mount`` would prove it."""
    try:
        index = index_of(layout, create=False, read_only=True)
    except IndexRefused as exc:
        return IndexReport("refused", str(exc))
    except OSError as exc:
        return IndexReport("refused", f"{layout.path('state')}: cannot read the index: "
                                      f"{exc.strerror or exc}")
    if index is None:
        return IndexReport("none")
    try:
        return IndexReport("sound", records=dict(index.records))
    finally:
        index.close()


def view_states(layout: Layout, views: tuple[ViewName, ...] = ALL_VIEWS) -> dict[str, str]:
    """Each view: ``serving``, ``dead`` (a daemon that died left it: ENOTCONN),
    ``not answering`` (its daemon is alive but stuck: stopped, or blocked) or
    ``not mounted``. Never waits more than a few seconds on a view."""
    out: dict[str, str] = {}
    for view in views:
        path = layout.path(view)
        entry = mounts.mounted_at(path)
        if entry is None or entry.fstype != mounts.FSTYPE:
            out[view] = "not mounted"
        else:
            out[view] = mounts.view_state(path)
    return out


class DeadViewBases:
    """The legacy directories under dead views, each opened through one clone
    of the root's mount without submounts (the dead views are not in it)."""

    def __init__(self, layout: Layout, dead: list[str]) -> None:
        self.fds: dict[str, int] = {}
        self.problem: str | None = None
        if not dead:
            return
        try:
            root = os.open(layout.root, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
            try:
                clone = mounts.clone_without_submounts(root)
            finally:
                os.close(root)
        except OSError as exc:
            self.problem = (f"the legacy directories under the dead views cannot be read "
                            f"({exc.strerror}; run status as root): only placed objects "
                            "are listed for them")
            return
        try:
            for view in dead:
                try:
                    self.fds[view] = openat2(clone, layout.rel(view),
                                             os.O_RDONLY | os.O_DIRECTORY,
                                             resolve=RESOLVE_BENEATH | RESOLVE_NO_SYMLINKS)
                except OSError:
                    pass      # nothing under it: nothing legacy to list
        finally:
            os.close(clone)

    @property
    def bases(self) -> dict[str, str]:
        return {view: f"/proc/self/fd/{fd}" for view, fd in self.fds.items()}

    def legacy_rel(self, layout: Layout, path: str) -> str:
        """*path* (maybe below a base) relative to the root, as the layout names it."""
        for view, base in self.bases.items():
            if path == base or path.startswith(base + "/"):
                return layout.rel(view) + path[len(base):]
        return layout.relpath(path)

    def close(self) -> None:
        for fd in self.fds.values():
            os.close(fd)
        self.fds.clear()


def collect(layout: Layout, resolver: Resolver, include_prepared: bool,
            dead: list[str] | None = None) -> tuple[Plan, list[ObjectStatus], IndexReport]:
    """The plan, every object's status and the index's state. The legacy
    directories of the views in *dead* are read from under their dead mounts."""
    under = DeadViewBases(layout, dead or [])
    try:
        plan = make_plan(layout, resolver, include_prepared, bases=under.bases or None)
        legacies = [under.legacy_rel(layout, e.obj.path) for e in plan.entries]
    finally:
        under.close()
    if under.problem:
        plan.problems.append(under.problem)
    report = read_index(layout)
    records = report.records
    out = []
    seen = set()
    for e, legacy in zip(plan.entries, legacies, strict=True):
        vpath = view_path(layout, legacy)
        rec = records.get(vpath) if vpath else None
        target = layout.relpath(e.target) if e.target else None
        if rec is not None:
            seen.add(vpath)
            location = os.path.relpath(os.path.join(store_path(layout, rec.store), rec.rel),
                                       layout.root)
            state = _REPORTED.get(rec.state, Reported.NEW)
            reason = rec.reason if rec.reason else (None if state == Reported.NEW else e.reason)
            if rec.state in MIGRATING_STATES and rec.target_store:
                target = os.path.relpath(os.path.join(store_path(layout, rec.target_store),
                                                      rec.target_rel or ""), layout.root)
            out.append(ObjectStatus(e.obj.kind, legacy, location, target or location, state,
                                    reason, e.obj.bytes))
        else:
            # the legacy store is where it belongs when the rules keep it there
            state = Reported.LEGACY if e.target is not None or e.by_rule \
                else Reported.UNRESOLVED
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
        state = _REPORTED.get(rec.state, Reported.NEW)
        out.append(ObjectStatus(rec.kind, _legacy_rel(layout, vpath),
                                os.path.relpath(location, layout.root),
                                os.path.relpath(location, layout.root)
                                if state == Reported.NEW else None,
                                state, rec.reason, size))
    out.sort(key=lambda o: o.legacy)
    return plan, out, report


#: Exit statuses of ``compatfs status`` (docs/operations.md): the report was
#: made in every case; these say whether something needs the operator.
EXIT_OK = 0
EXIT_VIEWS_DEAD = 3       # a daemon died and left its views: a new mount replaces them
EXIT_INDEX_REFUSED = 4    # mount would refuse the index


def exit_status(doc: dict[str, Any]) -> int:
    if doc["index"]["state"] == "refused":
        return EXIT_INDEX_REFUSED
    if {"dead", "not answering"} & set(doc["views"].values()):
        return EXIT_VIEWS_DEAD
    return EXIT_OK


def as_json(stage: str, mounted: bool, plan: Plan, objects: list[ObjectStatus],
            progress: dict[str, Any] | None = None, index: IndexReport | None = None,
            views: dict[str, str] | None = None) -> dict[str, Any]:
    totals: dict[str, Any] = {s.value: {"objects": 0, "bytes": 0} for s in Reported}
    for o in objects:
        totals[o.state]["objects"] += 1
        totals[o.state]["bytes"] += o.bytes
    index = index or IndexReport("none")
    return {
        "root": plan.layout.root,
        "layout": plan.layout.rules.name,
        "stage": stage,
        "mounted": mounted,
        "views": views or {},
        "index": index.as_json(plan.layout),
        "problems": plan.problems,
        "objects": [dict(o.__dict__, progress=(progress or {}).get("current", {}).get(
            view_path(plan.layout, o.legacy) or "")) for o in objects],
        "migration": progress,
        "totals": {"objects": len(objects), "bytes": sum(o.bytes for o in objects),
                   "by_state": totals},
    }


def render_text(doc: dict[str, Any]) -> str:
    lines = [(f"compatfs status for {shown(doc['root'])}: stage {doc['stage']}, "
              f"{'mounted' if doc['mounted'] else 'not mounted'}, target layout {doc['layout']}")]
    dead = [v for v, state in doc.get("views", {}).items() if state == "dead"]
    if dead:
        lines.append(f"views dead: {', '.join(dead)} (the daemon serving them died; agents get "
                     "ENOTCONN until 'compatfs mount' replaces them; objects below are read "
                     "from disk)")
    stuck = [v for v, state in doc.get("views", {}).items() if state == "not answering"]
    if stuck:
        lines.append(f"views not answering: {', '.join(stuck)} (the daemon serving them is "
                     "alive but stuck, and agents wait on it; objects below are read from "
                     "disk)")
    index = doc.get("index") or {}
    if index.get("state") == "refused":
        lines.append(f"index refused: {shown(index['problem'])}")
        lines.append("mount would refuse to start; objects placed in the new layout are "
                     "not listed")
    for p in doc["problems"]:
        lines.append(f"problem: {shown(p)}")
    lines.append("")
    for o in doc["objects"]:
        prog = o.get("progress")
        pct = f" {100 * prog['done'] / prog['total']:.0f} %" if prog and prog["total"] else ""
        lines.append(f"{o['state']:<10} {o['kind']:<10} {shown(o['legacy'])}  "
                     f"[{human(o['bytes'])}]{pct}")
        if o["location"] != o["legacy"]:
            lines.append(f"{'':<21} at {shown(o['location'])}")
        elif o["target"]:
            lines.append(f"{'':<21} belongs at {shown(o['target'])}")
        if o["reason"]:
            lines.append(f"{'':<21} {shown(o['reason'])}")
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
