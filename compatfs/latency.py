"""FUSE request latency, counted on the hot path at the cost of two clock reads.

A histogram of power-of-two microsecond buckets: one list increment per
request, nothing else; percentiles are computed only when someone reads them.
"""

from __future__ import annotations

#: Bucket i counts requests that took less than 2**i microseconds (the last: the rest).
BUCKETS = 24


class LatencyHistogram:
    __slots__ = ("counts",)

    def __init__(self, counts: list[int] | None = None) -> None:
        self.counts = list(counts) if counts is not None else [0] * BUCKETS

    def add(self, nanoseconds: int) -> None:
        self.counts[min((nanoseconds >> 10).bit_length(), BUCKETS - 1)] += 1

    def copy(self) -> LatencyHistogram:
        return LatencyHistogram(self.counts)

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
