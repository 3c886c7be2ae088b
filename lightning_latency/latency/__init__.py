"""Latency measurement: a core usable without Lightning, and the :class:`LatencyMonitor` callback on top.

* :func:`measure_latency` / :func:`compare_latency` — forward latency (median, p90, p99, IQR …) and throughput.
* :func:`measure_generation` — TTFT / TPOT / tokens/s of ``generate`` (or of :func:`fast_generate`, the static-cache
  compiled-decode form); :func:`measure_bandwidth` — the MBU denominator, measured.
* :func:`model_stats` — size by real storage, parameter and non-zero parameter counts.
* :func:`sweep_latency` — batch-size × sequence-length grids; :func:`module_breakdown` — which submodules take the time.
* :class:`LatencyRecorder` — a monitor's state and records (baseline, periodic, final; the deployed form of a
  compressed model), its metrics, table and JSON report, for any training loop.

``LatencyMonitor`` (:mod:`lightning_latency.latency.callback`, imported lazily: it pulls in Lightning) is the thin
callback on the recorder. Set-up shared by the measurers: :mod:`~lightning_latency.latency.session`.
"""

from __future__ import annotations

from typing import Any

from lightning_latency.latency.breakdown import BreakdownReport, module_breakdown
from lightning_latency.latency.fast_generation import (
    FastGenerator,
    decode_bytes_per_token,
    fast_generate,
    measure_bandwidth,
)
from lightning_latency.latency.generation import GenerationReport, decode_latency_fn, measure_generation
from lightning_latency.latency.hardware import KNOWN_PEAKS, has_native_bf16, isa_flags, isa_summary, known_peaks
from lightning_latency.latency.config import LatencyConfig
from lightning_latency.latency.final import deployed_latency_fn
from lightning_latency.latency.measure import LatencyReport, compare_latency, measure_latency
from lightning_latency.latency.memory import ModelStats, model_stats, tensor_nbytes
from lightning_latency.latency.recorder import LatencyRecorder
from lightning_latency.latency.stats import TimingStats, summarize
from lightning_latency.latency.sweep import sweep_generation, sweep_latency, sweep_table

__all__ = [
    "KNOWN_PEAKS",
    "BreakdownReport",
    "FastGenerator",
    "GenerationReport",
    "LatencyConfig",
    "LatencyMonitor",
    "LatencyRecorder",
    "LatencyReport",
    "ModelStats",
    "TimingStats",
    "compare_latency",
    "decode_bytes_per_token",
    "decode_latency_fn",
    "deployed_latency_fn",
    "fast_generate",
    "isa_flags",
    "has_native_bf16",
    "isa_summary",
    "known_peaks",
    "measure_bandwidth",
    "measure_generation",
    "measure_latency",
    "model_stats",
    "module_breakdown",
    "summarize",
    "sweep_generation",
    "sweep_latency",
    "sweep_table",
    "tensor_nbytes",
]


def __getattr__(name: str) -> Any:
    if name == "LatencyMonitor":  # lazy: the callback imports Lightning (~7 s), the core does not
        from lightning_latency.latency.callback import LatencyMonitor

        return LatencyMonitor
    raise AttributeError(f"module 'lightning_latency.latency' has no attribute {name!r}")
