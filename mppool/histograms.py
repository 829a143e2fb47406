"""The buckets of the pools' published histograms, and percentiles from them.

Every bucket is Prometheus's ``le`` (less than or equal): count ``i`` holds the
values ``v`` with ``BOUNDS[i-1] < v <= BOUNDS[i]``, and one more count past the
last bound holds the rest (``+Inf``). `index` finds a value's count with one C
call (``bisect_left``), which is what the pools' return path pays per use when
publishing is on.

The bounds, in seconds, and why:

- `WAIT_BOUNDS`: 0 first, so that the checkouts served at once by the fast
  path (the common case, never timed) sit apart from those that waited at
  all; then 0.1 ms (a checkout that took the slow path but found a
  connection), 1, 5, 10, 50, 100, 500 ms, 1, 5, 10 and 30 s (psycopg_pool's
  default ``timeout``).
- `USE_BOUNDS`: 1, 5, 10, 50, 100, 500 ms, 1, 5, 10, 60 s: a request's
  transaction is usually well under a second; a minute and more is a batch job
  or a leak.
- `CREATE_BOUNDS`: 5, 10, 25, 50, 100, 250, 500 ms, 1, 2.5, 5, 10 s: a local
  connection takes a few ms, TLS to another host tens, a struggling server
  seconds; 10 s is beyond the background attempts' bound.
"""

from __future__ import annotations

from bisect import bisect_left
from collections.abc import Sequence

__all__ = ["CREATE_BOUNDS", "USE_BOUNDS", "WAIT_BOUNDS", "empty", "index", "quantile"]

WAIT_BOUNDS = (0.0, 0.0001, 0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1.0, 5.0, 10.0, 30.0)
USE_BOUNDS = (0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1.0, 5.0, 10.0, 60.0)
CREATE_BOUNDS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)

index = bisect_left
"""``index(BOUNDS, value)``: the count `value` goes in (``le`` semantics)."""


def empty(bounds: Sequence[float]) -> list[int]:
    """Zeroed counts for `bounds` (one more than the bounds, for ``+Inf``)."""
    return [0] * (len(bounds) + 1)


def quantile(bounds: Sequence[float], counts: Sequence[int], q: float) -> float | None:
    """The `q` quantile (0 < q <= 1) of the values counted, None if there are none.

    Interpolated linearly within the bucket it falls in, as Prometheus's
    ``histogram_quantile`` does; in the ``+Inf`` bucket, the last bound.
    """
    total = sum(counts)
    if total <= 0:
        return None
    rank = q * total
    seen = 0
    for i, count in enumerate(counts):
        if count and seen + count >= rank:
            if i >= len(bounds):
                return float(bounds[-1])
            low = bounds[i - 1] if i else 0.0
            high = bounds[i]
            return low + (high - low) * (rank - seen) / count
        seen += count
    return float(bounds[-1])
