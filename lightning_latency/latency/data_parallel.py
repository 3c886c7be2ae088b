"""Data-parallel throughput: every rank times its own replica at the same moment, and the numbers are gathered.

This is aggregate *throughput* (the sum of the ranks' samples/s), not the latency of one request; on CPU the ranks
share cores, so it can be below one rank's throughput times the number of ranks. Usable without Lightning: pass
any ``all_gather`` that stacks one tensor per rank (``torch.distributed`` or a strategy's).
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from typing import Any

import torch

from lightning_latency.latency.measure import LatencyReport


def measure_data_parallel(measure: Callable[[], LatencyReport], world_size: int,
                          all_gather: Callable[[torch.Tensor], torch.Tensor] | None = None,
                          warn: Callable[[str], None] = warnings.warn) -> dict[str, Any] | None:
    """Run ``measure`` on this rank, gather ``(samples/s, median ms)`` of every rank; the same result on all ranks.

    Collective: call it on every rank at the same point. A rank whose measurement fails contributes NaN instead of
    raising, so no rank is left waiting in ``all_gather``; then ``warn`` names the failed ranks and the result is
    None.

    Args:
        measure: times this rank's replica, e.g. ``lambda: measure_latency(model, inputs, config)``.
        world_size: number of ranks (1: no gather).
        all_gather: ``(2,) float64 tensor -> (world_size, 2)`` (any leading shape that reshapes to it), on the
            device the backend needs; required when ``world_size > 1``.
        warn: where the failure message goes.

    Returns:
        ``{"world_size", "samples_per_s": [per rank], "median_ms": [per rank], "sum_samples_per_s",
        "max_median_ms"}``, or None when a rank failed.
    """
    if world_size > 1 and all_gather is None:
        raise ValueError(f"`all_gather` is required for world_size={world_size}; pass the strategy's all_gather.")
    local = torch.tensor([float("nan"), float("nan")], dtype=torch.float64)
    try:
        report = measure()
        local = torch.tensor([report.samples_per_s, report.median_ms], dtype=torch.float64)
    except Exception:  # reported below, from the gathered NaN; this rank must still reach the gather
        pass
    gathered = all_gather(local) if world_size > 1 and all_gather is not None else local
    gathered = gathered.reshape(world_size, 2).cpu()
    failed = [r for r in range(world_size) if bool(torch.isnan(gathered[r]).any())]
    if failed:
        warn(f"the data-parallel measurement failed on rank(s) {failed}; no latency/dp_* metrics for this phase.")
        return None
    return {"world_size": world_size, "samples_per_s": [float(v) for v in gathered[:, 0]],
            "median_ms": [float(v) for v in gathered[:, 1]],
            "sum_samples_per_s": float(gathered[:, 0].sum()), "max_median_ms": float(gathered[:, 1].max())}


__all__ = ["measure_data_parallel"]
