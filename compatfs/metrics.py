"""Metrics of a running daemon, in the Prometheus text format.

The daemon rewrites ``<run dir>/metrics.prom`` atomically every few seconds
(node_exporter's textfile collector, or any device agent, can ship it):
the target layout (an info gauge), objects per state, bytes migrated and
remaining, the copy rate, errors, and FUSE request latency percentiles.

Latency is kept in a histogram of power-of-two microsecond buckets: two
clock reads and one list increment per request, nothing else on the hot path.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from .rules import release_text

if TYPE_CHECKING:
    from .daemon import Daemon
    from .mounts import RunDir

#: Bucket i counts requests that took less than 2**i microseconds (the last: the rest).
BUCKETS = 24


class LatencyHistogram:
    __slots__ = ("counts",)

    def __init__(self) -> None:
        self.counts = [0] * BUCKETS

    def add(self, nanoseconds: int) -> None:
        self.counts[min((nanoseconds >> 10).bit_length(), BUCKETS - 1)] += 1

    def total(self) -> int:
        return sum(self.counts)

    def percentile(self, q: float) -> float:
        """The upper bound, in seconds, of the bucket holding the *q* quantile."""
        total = self.total()
        if total == 0:
            return 0.0
        rank = q * total
        seen = 0
        for i, n in enumerate(self.counts):
            seen += n
            if seen >= rank:
                return (1 << i) * 1024 / 1e9
        return (1 << (BUCKETS - 1)) * 1024 / 1e9


def render(daemon: "Daemon") -> str:
    """The metrics of *daemon* as Prometheus text."""
    lines: list[str] = []

    def metric(name: str, kind: str, help_: str, samples: list[tuple[str, float]]) -> None:
        lines.append(f"# HELP compatfs_{name} {help_}")
        lines.append(f"# TYPE compatfs_{name} {kind}")
        for labels, value in samples:
            lines.append(f"compatfs_{name}{labels} {value:g}")

    rules = daemon.layout.rules
    info = f'layout="{rules.layout}"'
    if rules.release is not None:
        info += f',eve_release="{release_text(rules.release)}"'
    metric("info", "gauge", "The target layout the daemon places objects for (always 1).",
           [(f"{{{info}}}", 1)])
    states: dict[str, int] = {}
    for rec in daemon.index.records.values():
        states[rec.state] = states.get(rec.state, 0) + 1
    p = daemon.migrator.progress
    metric("objects", "gauge", "Index records by state (placed, migrating, failed...).",
           [(f'{{state="{s}"}}', n) for s, n in sorted(states.items())])
    metric("migration_bytes_done", "gauge", "Bytes copied in the current migration pass.",
           [("", p.bytes_done)])
    metric("migration_bytes_remaining", "gauge", "Bytes left in the current migration pass.",
           [("", max(0, p.bytes_total - p.bytes_done))])
    metric("migration_rate_bytes_per_second", "gauge", "Copy rate of the current pass.",
           [("", p.rate())])
    metric("migration_failed", "gauge", "Objects that failed in the current pass.",
           [("", p.failed)])
    metric("migration_waiting", "gauge", "Objects waiting for room on their destination.",
           [("", len(p.waiting))])
    metric("migration_faults_total", "counter",
           "Unexpected errors inside the migrator (the object failed alone; serving went on).",
           [("", p.faults)])
    metric("faults_total", "counter", "Unexpected errors answered with EIO.",
           [("", daemon.ops.faults)])
    hist = daemon.ops.latency
    metric("fuse_requests_total", "counter", "FUSE requests served.", [("", hist.total())])
    wb = daemon.ops.write_behind
    metric("write_behind_total", "counter",
           "Ranges of sequential writes whose writeback was started early, by outcome.",
           [('{outcome="started"}', wb.started), ('{outcome="dropped"}', wb.dropped)])
    metric("fuse_request_seconds", "gauge", "FUSE request latency quantiles (bucket bounds).",
           [(f'{{quantile="{q}"}}', hist.percentile(q)) for q in (0.5, 0.9, 0.99)])
    return "\n".join(lines) + "\n"


def write(daemon: "Daemon", run: "RunDir") -> None:
    """Replace the metrics file atomically (a reader never sees half of it); the
    run dir makes the temporary, exclusively and with mode 0644."""
    run.write_file(run.METRICS, render(daemon))
