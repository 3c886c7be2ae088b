from __future__ import annotations

import numpy as np
import pytest

from lightning_latency.latency.stats import quantile, summarize


@pytest.mark.parametrize("q", [0.0, 0.1, 0.25, 0.5, 0.75, 0.9, 0.99, 1.0])
def test_quantile_matches_numpy_linear(q: float) -> None:
    values = sorted(np.random.default_rng(0).exponential(size=37).tolist())
    assert quantile(values, q) == pytest.approx(float(np.quantile(values, q)), rel=1e-12)


def test_summarize_hand_computed() -> None:
    times_s = [0.001 * k for k in (5, 1, 4, 2, 3, 10, 6, 8, 7, 9)]  # 1..10 ms, shuffled
    s = summarize(times_s)
    assert s.count == 10
    assert s.median_ms == pytest.approx(5.5)
    assert s.mean_ms == pytest.approx(5.5)
    assert s.min_ms == pytest.approx(1.0) and s.max_ms == pytest.approx(10.0)
    assert s.p90_ms == pytest.approx(9.1)  # (10-1)*0.9 = 8.1 -> 9 + 0.1*(10-9)
    assert s.p99_ms == pytest.approx(9.91)
    assert s.iqr_ms == pytest.approx(7.75 - 3.25)
    assert s.std_ms == pytest.approx(float(np.std(np.arange(1, 11), ddof=1)))
    assert s.unstable  # IQR/median = 0.82


def test_unstable_flag_threshold() -> None:
    steady = summarize([0.010, 0.0101, 0.0099, 0.010, 0.0102])
    assert not steady.unstable and steady.rel_iqr < 0.1
    noisy = summarize([0.010, 0.010, 0.013, 0.010, 0.013])
    assert noisy.unstable  # IQR 3 ms over median 10 ms
    assert not summarize([0.010, 0.010, 0.013, 0.010, 0.013], unstable_threshold=0.5).unstable


def test_single_timing_and_errors() -> None:
    s = summarize([0.002])
    assert s.median_ms == s.p99_ms == s.min_ms == pytest.approx(2.0) and s.iqr_ms == 0 and s.std_ms == 0
    assert s.unstable  # one run: spread unknown
    assert summarize([0.002, 0.002]).unstable and not summarize([0.002] * 3).unstable
    with pytest.raises(ValueError, match="times_s"):
        summarize([])
    with pytest.raises(ValueError, match="q"):
        quantile([1.0], 1.5)
