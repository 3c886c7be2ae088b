"""Inference latency of a model on given inputs: :class:`LatencyReport`, :func:`measure_latency` and the
interleaved :func:`compare_latency` (settings: :class:`~lightning_latency.latency.config.LatencyConfig`).

Protocol (nanoGPT's ``bench.py`` style): eval mode under ``torch.inference_mode()``, warm-up runs, then timed runs
until both ``min_runs`` and ``min_time_s`` are reached, never longer than ``max_time_s``. On accelerators every timed
run is bracketed by a device synchronisation, because kernels launch asynchronously and the host clock would
otherwise time only the launches. The training flags of every submodule are restored afterwards.
"""

from __future__ import annotations

import contextlib
import dataclasses
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from lightning_latency.latency._inputs import batch_size_of, call_model, move_to, resolve_inputs, seq_len_of, tokens_of
from lightning_latency.latency.config import LatencyConfig
from lightning_latency.latency.hardware import utilisation
from lightning_latency.latency.memory import PeakMemory, model_stats
from lightning_latency.latency.session import measuring, resolve_config
from lightning_latency.latency.stats import TimingStats, summarize


class _Stat:
    """A read-only attribute of a report that lives in its :class:`TimingStats` (``report.median_ms`` …)."""

    def __init__(self, name: str | None = None) -> None:
        self.name = name

    def __set_name__(self, owner: type, name: str) -> None:
        self.name = self.name or name

    def __get__(self, obj: Any, owner: type | None = None) -> Any:
        return self if obj is None else getattr(obj.stats, self.name)

    def __set__(self, obj: Any, value: Any) -> None:
        raise AttributeError(f"`{self.name}` is read from the report's `stats` (a frozen TimingStats); for other "
                             f"numbers build a new report: dataclasses.replace(report, stats=...).")


_STAT_NAMES = tuple(f.name for f in dataclasses.fields(TimingStats))


@dataclass(kw_only=True)
class RunContext:
    """Where and how a measurement ran, peak memory, size and utilisation: the fields every latency report shares."""

    num_threads: int = 0
    device: str = "cpu"
    compiled: bool = False
    budget_exhausted: bool = False
    peak_memory_mb: float | None = None
    model_mb: float | None = None
    mbu: float | None = None
    mfu: float | None = None
    name: str = ""


@dataclass
class LatencyReport(RunContext):
    """Result of one latency measurement. Times in milliseconds per call of the model on the inputs.

    The timing statistics are :attr:`stats` (a :class:`TimingStats`); ``median_ms`` (alias ``p50_ms``),
    ``mean_ms``, ``p90_ms``, ``p99_ms``, ``min_ms``, ``max_ms``, ``std_ms``, ``iqr_ms``, ``count``, ``unstable``
    and ``rel_iqr`` read through to it. :meth:`to_dict` is flat (those names next to the others), as before.
    """

    stats: TimingStats
    samples_per_s: float
    tokens_per_s: float | None
    batch_size: int
    seq_len: int | None = None
    tokens_per_call: int | None = None
    warmup: int = 0
    total_time_s: float = 0.0
    first_call_ms: float = 0.0
    num_params: int | None = None
    nonzero_params: int | None = None
    round_medians_ms: list[float] = field(default_factory=list)
    times_ms: list[float] = field(default_factory=list, repr=False)

    median_ms = _Stat()
    p50_ms = _Stat("median_ms")
    mean_ms = _Stat()
    p90_ms = _Stat()
    p99_ms = _Stat()
    min_ms = _Stat()
    max_ms = _Stat()
    std_ms = _Stat()
    iqr_ms = _Stat()
    count = _Stat()
    unstable = _Stat()

    @property
    def rel_iqr(self) -> float:
        """IQR / median (the instability measure)."""
        return self.stats.rel_iqr

    def speedup_over(self, baseline: LatencyReport) -> float:
        """``baseline.median / self.median``: >1 means this one is faster."""
        return baseline.median_ms / self.median_ms if self.median_ms > 0 else float("inf")

    def to_dict(self) -> dict[str, Any]:
        """Flat and JSON-ready: the statistics' fields, then the report's own (the checkpoint / report form)."""
        own = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "stats"}
        return {**dataclasses.asdict(self.stats), **own}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> LatencyReport:
        """Inverse of :meth:`to_dict` (unknown keys ignored, so older and newer records load)."""
        names = {f.name for f in dataclasses.fields(cls)} - {"stats"}
        stats = TimingStats(**{k: data[k] for k in _STAT_NAMES})
        return cls(stats=stats, **{k: v for k, v in data.items() if k in names})

    def summary(self) -> str:
        flag = " UNSTABLE" if self.unstable else ""
        tok = f", {self.tokens_per_s:,.0f} tok/s" if self.tokens_per_s else ""
        return (
            f"{self.name + ': ' if self.name else ''}median {self.median_ms:.3f} ms (p90 {self.p90_ms:.3f}, "
            f"IQR {100 * self.rel_iqr:.1f}%{flag}, n={self.count}), {self.samples_per_s:,.1f} samples/s{tok}, "
            f"batch {self.batch_size}, {self.num_threads} threads on {self.device}"
        )


def sync(device: torch.device) -> None:
    """Wait for queued kernels: accelerators run asynchronously, so the host clock needs this on both sides."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elif device.type == "xpu" and hasattr(torch, "xpu"):
        torch.xpu.synchronize(device)
    elif device.type == "mps" and hasattr(torch, "mps"):
        torch.mps.synchronize()


@dataclass
class _Timings:
    per_fn_s: list[list[float]]
    total_s: float
    first_call_s: float
    budget_exhausted: bool


def timed_loop(fns: list[Callable[[], Any]], config: LatencyConfig, device: torch.device,
               on_run: Callable[[], None] | None = None) -> _Timings:
    """Run ``fns`` interleaved (one of each per round): warm-up, then timed rounds under the config's stop rules.

    The first warm-up round is timed apart (``first_call_s``) and left out of the budget, as it may compile.
    """
    clock = config.clock or time.perf_counter
    first = 0.0
    if config.warmup > 0:
        sync(device)
        t0 = clock()
        for fn in fns:
            fn()
        sync(device)
        first = clock() - t0
    start = clock()
    for _ in range(max(0, config.warmup - 1)):
        if clock() - start >= config.max_time_s:
            break
        for fn in fns:
            fn()
    sync(device)
    times: list[list[float]] = [[] for _ in fns]
    count, exhausted = 0, False
    while True:
        for i, fn in enumerate(fns):
            a = clock()
            fn()
            sync(device)
            times[i].append(clock() - a)
        count += 1
        if on_run is not None:
            on_run()
        elapsed = clock() - start
        timed = sum(sum(t) for t in times)
        if count >= config.min_runs and timed >= config.min_time_s:
            break
        if count >= config.max_runs:
            break
        if elapsed >= config.max_time_s:
            exhausted = True
            break
    return _Timings(times, clock() - start, first, exhausted)


def measure_latency(model: nn.Module | Callable[..., Any], inputs: Any, config: LatencyConfig | None = None,
                    **overrides: Any) -> LatencyReport:
    """Measure inference latency of ``model(inputs)`` in eval mode under ``torch.inference_mode()``.

    Args:
        model: the module to measure (its training flags are restored afterwards), or any callable.
        inputs: a tensor (e.g. token ids ``(batch, seq)``), a tuple of positional inputs, a dict of keyword inputs
            (e.g. ``{"input_ids": (batch, seq), "attention_mask": (batch, seq)}``), or a callable building one.
        config: measurement settings; None uses :class:`LatencyConfig` defaults.
        **overrides: fields of :class:`LatencyConfig` to change for this call, e.g. ``max_time_s=1.0``.

    Returns:
        A :class:`LatencyReport` (median/mean/p90/p99/min/IQR in ms, count, throughput, size, peak memory, MBU/MFU).

    Raises:
        ValueError: bad config values or inputs of an unsupported form.

    Example::

        report = measure_latency(model, {"input_ids": ids, "attention_mask": mask}, threads=2)
        print(report.summary())
    """
    config = resolve_config(config, overrides)
    raw = resolve_inputs(inputs)
    with measuring(model, config) as session:
        x = move_to(raw, session.device)
        with torch.inference_mode():
            peak = PeakMemory(session.device)
            with peak if config.track_memory else contextlib.nullcontext():
                t = timed_loop([lambda: call_model(session.run, x)], config, session.device,
                               on_run=peak.sample if config.track_memory else None)
    stats = summarize(t.per_fn_s[0], config.unstable_threshold)
    batch = config.batch_size or batch_size_of(raw)
    tokens = tokens_of(raw)
    median_s = stats.median_ms / 1e3
    ms = model_stats(model) if isinstance(model, nn.Module) else None
    work_items = tokens or batch
    return LatencyReport(
        stats,
        samples_per_s=batch / median_s if median_s > 0 else float("inf"),
        tokens_per_s=(tokens / median_s if median_s > 0 else float("inf")) if tokens else None,
        batch_size=batch, seq_len=seq_len_of(raw), tokens_per_call=tokens, num_threads=session.threads,
        device=str(session.device), compiled=config.compile, warmup=config.warmup, total_time_s=t.total_s,
        first_call_ms=t.first_call_s * 1e3, budget_exhausted=t.budget_exhausted,
        peak_memory_mb=peak.peak_mb if config.track_memory else None,
        model_mb=ms.model_mb if ms else None, num_params=ms.num_params if ms else None,
        nonzero_params=ms.nonzero_params if ms else None,
        mbu=utilisation(ms.model_bytes, median_s, session.peak_bandwidth) if ms else None,
        mfu=utilisation(2.0 * ms.num_params * work_items, median_s, session.peak_flops) if ms else None,
        times_ms=[s * 1e3 for s in t.per_fn_s[0]],
    )


def compare_latency(models: Mapping[str, nn.Module | Callable[..., Any]], inputs: Any,
                    config: LatencyConfig | None = None, rounds: int = 3) -> dict[str, LatencyReport]:
    """Measure several models interleaved: each round measures every model in turn, so slow phases of a noisy
    machine hit all of them alike. Per model, the round with the best median is reported; every round's median is
    kept in ``round_medians_ms`` (their spread is the comparison's noise).

    Args:
        models: name -> model, e.g. ``{"fp32": model, "pruned": pruned}``; the first is the usual baseline.
        inputs: as for :func:`measure_latency`, shared by all models.
        config: measurement settings for every model and round.
        rounds: how many interleaved rounds (>= 1).

    Example::

        reports = compare_latency({"eager": model, "pruned": pruned}, inputs, rounds=3)
        print(reports["pruned"].speedup_over(reports["eager"]))
    """
    if isinstance(rounds, bool) or not isinstance(rounds, int) or rounds < 1:
        raise ValueError(f"`rounds` must be an integer >= 1, got {rounds!r}. E.g. rounds=3.")
    if not isinstance(models, Mapping) or not models:
        raise ValueError(f"`models` must be a non-empty dict of name -> model, got {models!r}. "
                         "E.g. models={'baseline': model, 'pruned': pruned}.")
    raw = resolve_inputs(inputs)  # build callable inputs once so every model sees the same tensors
    best: dict[str, LatencyReport] = {}
    medians: dict[str, list[float]] = {name: [] for name in models}
    for _ in range(rounds):
        for name, model in models.items():
            report = measure_latency(model, raw, config)
            medians[name].append(report.median_ms)
            if name not in best or report.median_ms < best[name].median_ms:
                best[name] = report
    for name, report in best.items():
        report.name = str(name)
        report.round_medians_ms = medians[name]
    return best


__all__ = ["LatencyConfig", "LatencyReport", "RunContext", "compare_latency", "measure_latency", "sync", "timed_loop"]
