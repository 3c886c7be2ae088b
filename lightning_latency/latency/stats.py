"""Summary statistics of repeated timings: robust centre, spread, and an instability flag.

Pure Python on purpose: the statistics are checked against hand-computed values with an injected fake clock,
and must not depend on the device the timings came from.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

# IQR / median above this marks a measurement as unstable (CPU timings on shared machines flip by ×10).
DEFAULT_UNSTABLE_THRESHOLD = 0.10
MIN_RUNS_FOR_SPREAD = 3


def quantile(sorted_values: Sequence[float], q: float) -> float:
    """Linear-interpolation quantile of already sorted values (numpy's default, ``method="linear"``).

    Args:
        sorted_values: values in ascending order, at least one.
        q: quantile in [0, 1].

    Raises:
        ValueError: empty input or ``q`` outside [0, 1].
    """
    if not sorted_values:
        raise ValueError("`sorted_values` is empty: at least one timing is needed for a quantile.")
    if not 0.0 <= q <= 1.0:
        raise ValueError(f"`q` must be in [0, 1], got {q!r}. For the 90th percentile pass q=0.9.")
    pos = (len(sorted_values) - 1) * q
    lo = math.floor(pos)
    hi = min(lo + 1, len(sorted_values) - 1)
    frac = pos - lo
    return sorted_values[lo] + (sorted_values[hi] - sorted_values[lo]) * frac


@dataclass(frozen=True)
class TimingStats:
    """Statistics of one series of timings, in milliseconds."""

    median_ms: float
    mean_ms: float
    p90_ms: float
    p99_ms: float
    min_ms: float
    max_ms: float
    std_ms: float
    iqr_ms: float
    count: int
    unstable: bool

    @property
    def rel_iqr(self) -> float:
        """IQR / median: the spread relative to the centre (0 for a perfectly steady series)."""
        return self.iqr_ms / self.median_ms if self.median_ms > 0 else 0.0


def summarize(times_s: Sequence[float], unstable_threshold: float = DEFAULT_UNSTABLE_THRESHOLD) -> TimingStats:
    """Summarise per-run durations (seconds) into :class:`TimingStats` (milliseconds).

    Args:
        times_s: durations of the timed runs in seconds, at least one.
        unstable_threshold: a series with IQR / median above this is flagged ``unstable`` (so is one of fewer than
            3 runs, whose spread is unknown).

    Raises:
        ValueError: no timings.
    """
    if len(times_s) == 0:
        raise ValueError("`times_s` is empty: run the model at least once (raise `max_time_s` or `min_runs`).")
    ms = sorted(float(t) * 1e3 for t in times_s)
    n = len(ms)
    mean = sum(ms) / n
    std = math.sqrt(sum((x - mean) ** 2 for x in ms) / (n - 1)) if n > 1 else 0.0
    median = quantile(ms, 0.5)
    iqr = quantile(ms, 0.75) - quantile(ms, 0.25)
    # Fewer than 3 runs say nothing about the spread (IQR of one run is 0): call that unstable too.
    unstable = bool(n < MIN_RUNS_FOR_SPREAD or (median > 0 and iqr / median > unstable_threshold))
    return TimingStats(
        median_ms=median, mean_ms=mean, p90_ms=quantile(ms, 0.9), p99_ms=quantile(ms, 0.99), min_ms=ms[0],
        max_ms=ms[-1], std_ms=std, iqr_ms=iqr, count=n, unstable=unstable,
    )


__all__ = ["DEFAULT_UNSTABLE_THRESHOLD", "MIN_RUNS_FOR_SPREAD", "TimingStats", "quantile", "summarize"]
