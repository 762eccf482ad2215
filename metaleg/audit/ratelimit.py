"""The audit log's rate bound (``AUDIT_LOG_RATE``) and once-per-burst reports.

Lines beyond the bound are dropped and counted, never queued: a flood of new
connections costs the decoding of its events and a counter, and the log stays
readable. :class:`Bursts` says when a recurring loss (lines over the bound,
events the kernel dropped) is worth a log line: once when it starts, once with
its total when it has stopped.
"""

from __future__ import annotations


class TokenBucket:
    """Up to ``rate`` lines per second on average, and bursts of up to ``rate`` lines
    (one second's worth) after a quiet time."""

    def __init__(self, rate: float, now: float) -> None:
        if rate <= 0:
            raise ValueError("the rate must be positive")
        self.rate = rate
        self.capacity = float(rate)
        self._tokens = self.capacity
        self._updated = now

    def take(self, now: float) -> bool:
        """Whether one more line may be written at ``now`` (monotonic seconds)."""
        if now > self._updated:
            self._tokens = min(self.capacity, self._tokens + (now - self._updated) * self.rate)
            self._updated = now
        if self._tokens >= 1.0:
            self._tokens -= 1.0
            return True
        return False


class Bursts:
    """Counts a recurring loss and says when to log it: at the start of a burst, and with the
    burst's total once nothing was added for ``quiet`` seconds."""

    def __init__(self, quiet: float = 10.0) -> None:
        self.quiet = quiet
        self.total = 0
        """Everything added, over every burst."""
        self._burst = 0
        self._last = 0.0

    @property
    def ongoing(self) -> bool:
        return self._burst > 0

    def add(self, count: int, now: float) -> bool:
        """Add ``count`` (> 0) at ``now``; True when this starts a burst (log it)."""
        if count <= 0:
            return False
        starts = self._burst == 0
        self._burst += count
        self.total += count
        self._last = now
        return starts

    def ended(self, now: float) -> int | None:
        """The total of the current burst once it has been quiet for ``quiet`` seconds (it is
        then over); None while it goes on or when there is none."""
        if self._burst and now - self._last >= self.quiet:
            total, self._burst = self._burst, 0
            return total
        return None
