"""Metrics of a running daemon, in the Prometheus text format.

The daemon rewrites ``<run dir>/metrics.prom`` atomically every few seconds
(node_exporter's textfile collector, or any device agent, can ship it):
the target layout (an info gauge), objects per state, bytes migrated and
remaining, the copy rate, errors, and FUSE request latency percentiles.

Latency comes from :mod:`compatfs.latency`, counted by the FUSE layer; the rest
from the snapshot the daemon takes (:class:`compatfs.daemonstate.DaemonState`).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from .daemonstate import DaemonState

if TYPE_CHECKING:
    from .rundir import RunDir


def render(state: DaemonState) -> str:
    """The metrics of a daemon, from its *state*, as Prometheus text."""
    lines: list[str] = []

    def metric(name: str, kind: str, help_: str, samples: list[tuple[str, float]]) -> None:
        lines.append(f"# HELP compatfs_{name} {help_}")
        lines.append(f"# TYPE compatfs_{name} {kind}")
        for labels, value in samples:
            lines.append(f"compatfs_{name}{labels} {value:g}")

    info = f'layout="{state.layout}"'
    if state.eve_release is not None:
        info += f',eve_release="{state.eve_release}"'
    metric("info", "gauge", "The target layout the daemon places objects for (always 1).",
           [(f"{{{info}}}", 1)])
    p = state.migration
    metric("objects", "gauge", "Index records by state (placed, migrating, failed...).",
           [(f'{{state="{s}"}}', n) for s, n in sorted(state.records.items())])
    metric("migration_bytes_done", "gauge", "Bytes copied in the current migration pass.",
           [("", p["bytes_done"])])
    metric("migration_bytes_remaining", "gauge", "Bytes left in the current migration pass.",
           [("", max(0, p["bytes_total"] - p["bytes_done"]))])
    metric("migration_rate_bytes_per_second", "gauge", "Copy rate of the current pass.",
           [("", p["rate"])])
    metric("migration_failed", "gauge", "Objects that failed in the current pass.",
           [("", p["failed"])])
    metric("migration_waiting", "gauge", "Objects waiting for room on their destination.",
           [("", len(p["waiting"]))])
    metric("migration_faults_total", "counter",
           "Unexpected errors inside the migrator (the object failed alone; serving went on).",
           [("", p["faults"])])
    metric("faults_total", "counter", "Unexpected errors answered with EIO.",
           [("", state.faults)])
    hist = state.requests
    metric("fuse_requests_total", "counter", "FUSE requests served.", [("", hist.total())])
    metric("write_behind_total", "counter",
           "Ranges of sequential writes whose writeback was started early, by outcome.",
           [('{outcome="started"}', state.write_behind_started),
            ('{outcome="dropped"}', state.write_behind_dropped)])
    metric("fuse_request_seconds", "gauge", "FUSE request latency quantiles (bucket bounds).",
           [(f'{{quantile="{q}"}}', hist.percentile(q)) for q in (0.5, 0.9, 0.99)])
    return "\n".join(lines) + "\n"


def write(state: DaemonState, run: RunDir) -> None:
    """Replace the metrics file atomically (a reader never sees half of it); the
    run dir makes the temporary, exclusively and with mode 0644."""
    run.write_file(run.METRICS, render(state))
