"""The copy rate limit shared by every copy the migration runs.

Copies of volumes are throttled so the migration never starves the agents
using the views of disk bandwidth; one :class:`Throttle` is shared by every
copy of a migration and its rate can be changed while copies are running
(through the control file). Kept apart from the copy code because it is a
policy the migration owns and the copies only pay into.
"""

from __future__ import annotations

import threading
import time


class Throttle:
    """A token bucket: every copy sharing one Throttle together moves at most its rate."""

    #: Idle time credited to the bucket, in seconds (its capacity); it starts empty.
    BURST = 0.05

    def __init__(self, bytes_per_second: float | None) -> None:
        if bytes_per_second is not None and bytes_per_second < 0:
            raise ValueError(f"negative rate {bytes_per_second}")
        self.rate = float(bytes_per_second) if bytes_per_second else None
        self._lock = threading.Lock()
        self._paid_until = time.monotonic()

    def set_rate(self, bytes_per_second: float | None) -> None:
        """Change the rate (None or 0: unlimited); copies under way follow at their next step."""
        with self._lock:
            self.rate = float(bytes_per_second) if bytes_per_second else None
            self._paid_until = time.monotonic()

    def reserve(self, n: int) -> float:
        """Take *n* tokens now; the seconds the caller must wait before using them."""
        if self.rate is None or n <= 0:
            return 0.0
        with self._lock:
            now = time.monotonic()
            self._paid_until = max(self._paid_until, now - self.BURST) + n / self.rate
            return self._paid_until - now

    def consume(self, n: int) -> None:
        """Block the calling thread until *n* bytes fit in the rate (thread-safe)."""
        delay = self.reserve(n)
        if delay > 0:
            time.sleep(delay)

