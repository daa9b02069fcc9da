"""The migration plan: every legacy object, where it belongs or why it stays.

:func:`make_plan` scans the legacy locations, resolves each object, settles
conflicts (two legacy objects for one target: the newest wins, as volumemgr
did), applies the converter's downgrade rule (a destination newer than the
legacy object wins) and totals the bytes per destination against the free
space there. It only reads; it never changes anything on disk.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

from . import inuse
from .enums import Kind, StoreKey
from .fscrypt import path_is_encrypted
from .layout import Layout
from .names import shown
from .resolver import Resolution, Resolver
from .scan import Bases, LegacyObject, scan


class Action(StrEnum):
    """What the plan does with a legacy object."""

    COPY = "copy"            # copied to its target
    RENAME = "rename"        # renamed to its target (same file system, no encryption boundary)
    SET_ASIDE = "set-aside"  # the destination exists and wins: the legacy copy is set aside
    KEEP = "keep"            # stays at its legacy name (see the entry's reason)


#: The actions that place a legacy object at its target.
MOVES = (Action.COPY, Action.RENAME)


def destinations(layout: Layout) -> tuple[str, ...]:
    """Destination locations of *layout*'s target, in report order (the locations of
    downloads in progress only where the target moves them)."""
    transient = (StoreKey.DOWNLOADER, StoreKey.VERIFIER) if layout.rules.move_transient else ()
    return (StoreKey.VAULT_VOLUMES, layout.rules.clear_volumes, *transient, StoreKey.VERIFIED,
            StoreKey.CAS)


@dataclass
class PlanEntry:
    obj: LegacyObject
    target: str | None
    reason: str | None
    location: str | None
    action: Action
    #: it stays because the target layout's rules keep it in the legacy store
    #: (not because nothing maps it yet)
    by_rule: bool = False

    def as_json(self, layout: Layout) -> dict[str, Any]:
        return {
            "kind": self.obj.kind,
            "legacy": layout.relpath(self.obj.path),
            "target": layout.relpath(self.target) if self.target else None,
            "reason": self.reason,
            "by_rule": self.by_rule,
            "bytes": self.obj.bytes,
            "action": self.action,
        }


@dataclass
class Destination:
    location: str
    path: str
    objects: int = 0
    bytes: int = 0        # allocated bytes of the objects headed here
    copy_bytes: int = 0   # of those, bytes that need a copy (not a rename)
    free: int = 0
    device: int = -1
    fits: bool = True


@dataclass
class Plan:
    layout: Layout
    entries: list[PlanEntry]
    destinations: dict[str, Destination]
    checkpoint: str | None
    config_hash: str
    problems: list[str] = field(default_factory=list)

    def totals(self) -> dict[str, Any]:
        by_kind = {k.value: {"objects": 0, "bytes": 0} for k in Kind}
        resolved = 0
        for e in self.entries:
            by_kind[e.obj.kind]["objects"] += 1
            by_kind[e.obj.kind]["bytes"] += e.obj.bytes
            resolved += e.action in MOVES
        return {
            "objects": len(self.entries),
            "to_move": resolved,
            "staying": len(self.entries) - resolved,
            "bytes": sum(e.obj.bytes for e in self.entries),
            "bytes_to_move": sum(d.bytes for d in self.destinations.values()),
            "by_kind": by_kind,
            "destinations": {
                loc: {"path": self.layout.relpath(d.path), "objects": d.objects,
                      "bytes": d.bytes, "copy_bytes": d.copy_bytes, "free": d.free,
                      "fits": d.fits}
                for loc, d in self.destinations.items()
            },
        }

    def as_json(self) -> dict[str, Any]:
        return {
            "root": self.layout.root,
            "layout": self.layout.rules.name,
            "checkpoint": self.layout.relpath(self.checkpoint) if self.checkpoint else None,
            "config_hash": self.config_hash,
            "problems": self.problems,
            "objects": [e.as_json(self.layout) for e in self.entries],
            "totals": self.totals(),
        }


def _resolve(resolver: Resolver, obj: LegacyObject) -> Resolution:
    if obj.reason is not None:
        return Resolution(None, obj.reason)
    if obj.kind == Kind.VM_VOLUME:
        assert obj.volume is not None
        return resolver.resolve_vm(obj.volume)
    if obj.kind == Kind.OCI_VOLUME:
        assert obj.volume is not None
        return resolver.resolve_container(obj.volume)
    if obj.download is not None:
        return resolver.resolve_download(*obj.download)
    return resolver.resolve_containerd()


def _existing_ancestor(path: str) -> str:
    while not os.path.lexists(path):
        parent = os.path.dirname(path)
        if parent == path:
            break
        path = parent
    return path


def _filesystem(path: str) -> tuple[int, int]:
    """(device, free bytes for an unprivileged writer) of the filesystem *path* is on."""
    where = _existing_ancestor(path)
    st = os.stat(where)
    vfs = os.statvfs(where)
    return st.st_dev, vfs.f_bavail * vfs.f_frsize


def _encrypted(path: str) -> bool:
    """Whether the directory *path* has an fscrypt policy (False when it cannot be read)."""
    try:
        return path_is_encrypted(path)
    except OSError:
        return False


def _existing_destination(e: PlanEntry, st: os.stat_result, layout: Layout) -> None:
    """*e*'s target exists (*st*): decide which copy wins. Neither is ever destroyed.

    Layout eve keeps the destination whether it is older or newer (EVE's
    converter never replaces it): the legacy copy is set aside. The design
    note keeps the newer: a newer (or as new) destination the same way, an
    older one is set aside before the legacy copy is placed."""
    if layout.rules.destination_always_wins:
        e.action = Action.SET_ASIDE
        age = "newer" if st.st_mtime_ns > e.obj.mtime_ns else "older"
        e.reason = (f"the destination exists ({age} than the legacy copy) and is kept, as "
                    "EVE's converter keeps it; the legacy copy is set aside, never deleted")
    elif st.st_mtime_ns >= e.obj.mtime_ns:
        e.action = Action.SET_ASIDE
        e.reason = ("the destination exists and is newer (downgrade then upgrade): it is "
                    "kept and the legacy copy is set aside")
    else:
        e.reason = ("the destination exists and is older: it is set aside and the legacy "
                    "copy placed")


def _settle_conflicts(entries: list[PlanEntry], layout: Layout) -> None:
    """Where several objects resolve to one target, the newest keeps it."""
    by_target: dict[str, list[PlanEntry]] = {}
    for e in entries:
        if e.target is not None:
            by_target.setdefault(e.target, []).append(e)
    for target, claimants in by_target.items():
        if len(claimants) < 2:
            continue
        winner = max(claimants, key=lambda e: (e.obj.mtime_ns, e.obj.path))
        for e in claimants:
            if e is not winner:
                e.reason = (f"{layout.relpath(winner.obj.path)} resolves to the same "
                            f"{layout.relpath(target)} and is newer")
                e.target, e.location, e.action = None, None, Action.KEEP


def _note_busy(entries: list[PlanEntry], layout: Layout) -> None:
    """The containerd tree, which no view covers, moves only while nothing is
    mounted inside it and no process holds it (:func:`compatfs.inuse.busy`; the
    migrator checks again just before the move): say so when it waits."""
    containerd = layout.path("containerd")
    for e in entries:
        if e.obj.path != containerd or e.target is None:
            continue
        why = inuse.busy(e.obj.path)
        if why:
            e.reason = f"waits: {why}" if e.reason is None else f"{e.reason}; waits: {why}"


def make_plan(layout: Layout, resolver: Resolver, include_prepared: bool = True,
              bases: Bases | None = None, refresh: bool = True) -> Plan:
    """Scan and resolve everything under *layout*; reads only.

    *bases* reads legacy locations from elsewhere than their layout paths
    (the daemon passes its directory fds, as the views cover the paths).
    Without *refresh* the resolver is used as it is (the caller refreshes it
    in its own thread).
    """
    if refresh:
        resolver.refresh()
    entries = []
    for obj in scan(layout, include_prepared, bases):
        res = _resolve(resolver, obj)
        action = Action.KEEP if res.target is None else Action.COPY
        entries.append(PlanEntry(obj, res.target, res.reason, res.location, action,
                                 res.by_rule))
    _settle_conflicts(entries, layout)

    vault = layout.path("vault")
    dests = {loc: Destination(loc, layout.path(loc)) for loc in destinations(layout)}
    encrypted: dict[str, bool] = {}
    for d in dests.values():
        d.device, d.free = _filesystem(d.path)
        encrypted[d.location] = _encrypted(_existing_ancestor(d.path))
    sources: dict[str, tuple[int, bool]] = {}
    for e in entries:
        if e.target is None or e.location is None:
            continue
        try:
            st = os.lstat(e.target)
        except (FileNotFoundError, NotADirectoryError):
            st = None
        if st is not None:
            _existing_destination(e, st, layout)
            if e.action == Action.SET_ASIDE:
                continue
        d = dests[e.location]
        parent = os.path.dirname(e.obj.path)
        if parent not in sources:
            sources[parent] = (os.lstat(parent).st_dev, _encrypted(parent))
        device, source_encrypted = sources[parent]
        inside_vault = os.path.commonpath([vault, d.path]) == vault
        # a rename(2) out of an fscrypt directory keeps the contents encrypted under
        # its key: a move from an encrypted img/ is a decrypting copy (E8)
        plain = not (source_encrypted or encrypted[d.location] or inside_vault)
        e.action = Action.RENAME if device == d.device and plain else Action.COPY
        d.objects += 1
        d.bytes += e.obj.bytes
        if e.action == Action.COPY:
            d.copy_bytes += e.obj.bytes
    need_per_fs: dict[int, int] = {}
    for d in dests.values():
        need_per_fs[d.device] = need_per_fs.get(d.device, 0) + d.copy_bytes
    for d in dests.values():
        d.fits = need_per_fs[d.device] <= d.free
    _note_busy(entries, layout)
    snap = resolver.snapshot
    return Plan(layout, entries, dests, snap.checkpoint_path, snap.config.config_hash,
                list(snap.problems))


# -- rendering ----------------------------------------------------------------

def human(n: int) -> str:
    """Bytes as a short human figure (binary units)."""
    value = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if value < 1024 or unit == "TiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    raise AssertionError("unreachable")


def render_text(plan: Plan) -> str:
    """The plan as a person reads it: objects, then totals per destination."""
    def rel(path: str) -> str:
        return shown(plan.layout.relpath(path))

    lines = [(f"compatfs plan for {shown(plan.layout.root)}, target layout "
              f"{plan.layout.rules.name}"),
             f"checkpoint: {rel(plan.checkpoint) if plan.checkpoint else 'none'}"
             + (f" (config hash {plan.config_hash})" if plan.config_hash else "")]
    for p in plan.problems:
        lines.append(f"problem: {shown(p)}")
    lines.append("")
    width = max(len(k) for k in Kind)
    for e in plan.entries:
        lines.append(f"{e.obj.kind:<{width}}  {rel(e.obj.path)}  [{human(e.obj.bytes)}]")
        if e.action in MOVES:
            lines.append(f"{'':<{width}}  -> {rel(e.target or '')} ({e.action})")
            if e.reason:
                lines.append(f"{'':<{width}}     {shown(e.reason)}")
        elif e.action == Action.SET_ASIDE:
            lines.append(f"{'':<{width}}  set aside: {shown(e.reason or '')}")
        else:
            lines.append(f"{'':<{width}}  stays: {shown(e.reason or '')}")
    if not plan.entries:
        lines.append("no legacy objects found")
    t = plan.totals()
    lines += ["",
              (f"{t['objects']} objects, {t['to_move']} to move "
               f"({human(t['bytes_to_move'])}), {t['staying']} staying"), "",
              (f"{'destination':<26} {'objects':>7} {'to move':>11} {'to copy':>11} "
               f"{'free':>11}  fits")]
    for d in plan.destinations.values():
        lines.append(f"{rel(d.path):<26} {d.objects:>7} {human(d.bytes):>11} "
                     f"{human(d.copy_bytes):>11} {human(d.free):>11}  "
                     f"{'yes' if d.fits else 'NO'}")
    return "\n".join(lines) + "\n"
