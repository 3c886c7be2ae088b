"""Inference latency of a model on given inputs: :class:`LatencyConfig`, :class:`LatencyReport`,
:func:`measure_latency` and the interleaved :func:`compare_latency`.

Protocol (nanoGPT's ``bench.py`` style): eval mode under ``torch.inference_mode()``, warm-up runs, then timed runs
until both ``min_runs`` and ``min_time_s`` are reached, never longer than ``max_time_s``. On accelerators every timed
run is bracketed by a device synchronisation, because kernels launch asynchronously and the host clock would
otherwise time only the launches. The training flags of every submodule are restored afterwards.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import nn

from lightning_latency.latency._inputs import batch_size_of, call_model, move_to, resolve_inputs, seq_len_of, tokens_of
from lightning_latency.latency.deploy import deployed
from lightning_latency.latency.hardware import known_peaks, utilisation
from lightning_latency.latency.memory import PeakMemory, model_stats
from lightning_latency.latency.stats import DEFAULT_UNSTABLE_THRESHOLD, TimingStats, summarize


@dataclass
class LatencyConfig:
    """How to measure. Defaults suit a small model on CPU (≈0.2–5 s per measurement).

    Args:
        warmup: untimed runs first (caches, allocator, lazy init, compilation).
        min_runs: at least this many timed runs ...
        min_time_s: ... and at least this much timed wall time.
        max_time_s: budget for warm-up + timed runs (compilation excluded); stops early, flagging ``budget_exhausted``.
        max_runs: hard cap on timed runs.
        threads: ``torch.set_num_threads`` during the measurement (restored after); None keeps the current count.
        device: measure on this device (a deep copy is moved there); None measures where the model is.
        compile: measure ``torch.compile(copy)`` instead of eager.
        compile_mode: ``torch.compile`` mode (e.g. ``"max-autotune"``).
        freezing: inductor ``freezing`` for the compiled copy; None means True on CPU, False elsewhere.
        unstable_threshold: IQR / median above which the report is flagged ``unstable``.
        peak_bandwidth: peak memory bandwidth in bytes/s for MBU; None looks up known GPUs.
        peak_flops: peak FLOP/s for MFU; None looks up known GPUs (bf16 dense).
        track_memory: record peak memory (CUDA peak allocated / CPU RSS growth).
        batch_size: samples per call for throughput; None reads dim 0 of the first input tensor.
        clock: ``() -> seconds`` used for all timing; inject a fake clock in tests. None is ``time.perf_counter``.
    """

    warmup: int = 5
    min_runs: int = 20
    min_time_s: float = 0.2
    max_time_s: float = 5.0
    max_runs: int = 10_000
    threads: int | None = None
    device: str | torch.device | None = None
    compile: bool = False
    compile_mode: str | None = None
    freezing: bool | None = None
    unstable_threshold: float = DEFAULT_UNSTABLE_THRESHOLD
    peak_bandwidth: float | None = None
    peak_flops: float | None = None
    track_memory: bool = True
    batch_size: int | None = None
    clock: Callable[[], float] | None = field(default=None, repr=False, compare=False)

    def __post_init__(self) -> None:
        ints = {"warmup": (self.warmup, 0), "min_runs": (self.min_runs, 1), "max_runs": (self.max_runs, 1)}
        for name, (value, low) in ints.items():
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ValueError(f"`{name}` must be an integer >= {low}, got {value!r}. E.g. {name}={max(low, 5)}.")
        for name in ("min_time_s", "max_time_s"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0:
                raise ValueError(f"`{name}` must be a number of seconds >= 0, got {value!r}. E.g. {name}=1.0.")
        if self.max_time_s < self.min_time_s:
            raise ValueError(
                f"`max_time_s` ({self.max_time_s!r}) must be >= `min_time_s` ({self.min_time_s!r}): the budget "
                f"cannot be shorter than the minimum. Raise max_time_s or lower min_time_s."
            )
        if self.max_runs < self.min_runs:
            raise ValueError(f"`max_runs` ({self.max_runs!r}) must be >= `min_runs` ({self.min_runs!r}).")
        if self.threads is not None and (isinstance(self.threads, bool) or not isinstance(self.threads, int)
                                         or self.threads < 1):
            raise ValueError(f"`threads` must be None or an integer >= 1, got {self.threads!r}. E.g. threads=1.")
        if self.device is not None:
            try:
                torch.device(self.device)
            except (RuntimeError, TypeError) as err:
                raise ValueError(f"`device` must name a torch device, got {self.device!r}. E.g. device='cpu'.") from err
        if isinstance(self.unstable_threshold, bool) or not isinstance(self.unstable_threshold, (int, float)):
            raise TypeError(f"`unstable_threshold` must be a number, got {type(self.unstable_threshold).__name__} "
                            f"{self.unstable_threshold!r}. E.g. unstable_threshold=0.1 (10%).")
        if not 0 < self.unstable_threshold:
            raise ValueError(f"`unstable_threshold` must be > 0, got {self.unstable_threshold!r}. E.g. 0.1 (10%).")
        for name in ("peak_bandwidth", "peak_flops"):
            value = getattr(self, name)
            if value is not None and not (isinstance(value, (int, float)) and value > 0):
                raise ValueError(f"`{name}` must be None or a positive rate per second, got {value!r}. E.g. 3.35e12.")
        if self.batch_size is not None and (not isinstance(self.batch_size, int) or self.batch_size < 1):
            raise ValueError(f"`batch_size` must be None or an integer >= 1, got {self.batch_size!r}.")
        if self.clock is not None and not callable(self.clock):
            raise ValueError(f"`clock` must be a callable returning seconds, got {self.clock!r}. E.g. time.perf_counter.")

    def replace(self, **overrides: Any) -> LatencyConfig:
        """A copy with some fields changed; unknown names raise ValueError listing the valid ones."""
        names = {f.name for f in dataclasses.fields(self)}
        unknown = sorted(set(overrides) - names)
        if unknown:
            raise ValueError(f"Unknown LatencyConfig field(s) {unknown}; valid fields: {sorted(names)}.")
        return dataclasses.replace(self, **overrides)

    def to_dict(self) -> dict[str, Any]:
        """JSON-friendly settings (the clock is left out)."""
        out = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "clock"}
        out["device"] = str(out["device"]) if out["device"] is not None else None
        return out


@dataclass
class LatencyReport:
    """Result of one latency measurement. Times in milliseconds per call of the model on the inputs."""

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
    samples_per_s: float
    tokens_per_s: float | None
    batch_size: int
    seq_len: int | None = None
    tokens_per_call: int | None = None
    num_threads: int = 0
    device: str = "cpu"
    compiled: bool = False
    warmup: int = 0
    total_time_s: float = 0.0
    first_call_ms: float = 0.0
    budget_exhausted: bool = False
    peak_memory_mb: float | None = None
    model_mb: float | None = None
    num_params: int | None = None
    nonzero_params: int | None = None
    mbu: float | None = None
    mfu: float | None = None
    name: str = ""
    round_medians_ms: list[float] = field(default_factory=list)
    times_ms: list[float] = field(default_factory=list, repr=False)

    @property
    def p50_ms(self) -> float:
        return self.median_ms

    @property
    def rel_iqr(self) -> float:
        """IQR / median (the instability measure)."""
        return self.iqr_ms / self.median_ms if self.median_ms > 0 else 0.0

    def speedup_over(self, baseline: LatencyReport) -> float:
        """``baseline.median / self.median``: >1 means this one is faster."""
        return baseline.median_ms / self.median_ms if self.median_ms > 0 else float("inf")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> LatencyReport:
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in names})

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


def _training_flags(model: Any) -> list[tuple[nn.Module, bool]]:
    return [(m, m.training) for m in model.modules()] if isinstance(model, nn.Module) else []


def _restore_flags(flags: list[tuple[nn.Module, bool]]) -> None:
    # Per module, not model.train(was): a frozen teacher inside a training student must stay in eval mode.
    for m, was in flags:
        m.training = was


class _Threads:
    def __init__(self, n: int | None) -> None:
        self.n, self.old = n, torch.get_num_threads()

    def __enter__(self) -> int:
        if self.n is not None:
            torch.set_num_threads(self.n)
        return torch.get_num_threads()

    def __exit__(self, *exc: Any) -> None:
        torch.set_num_threads(self.old)


def _report_from(stats: TimingStats, **extra: Any) -> LatencyReport:
    fields = {k: getattr(stats, k) for k in ("median_ms", "mean_ms", "p90_ms", "p99_ms", "min_ms", "max_ms",
                                             "std_ms", "iqr_ms", "count", "unstable")}
    return LatencyReport(**fields, **extra)


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
    if config is not None and not isinstance(config, LatencyConfig):
        raise TypeError(f"`config` must be a LatencyConfig or None, got {type(config).__name__} {config!r}. "
                        f"Pass settings as keywords (measure_latency(model, inputs, warmup=3)) or "
                        f"config=LatencyConfig(...).")
    config = (config or LatencyConfig()).replace(**overrides) if overrides else (config or LatencyConfig())
    raw = resolve_inputs(inputs)
    flags = _training_flags(model)
    try:
        with _Threads(config.threads) as threads, deployed(model, config.device, config.compile,
                                                           config.compile_mode, config.freezing) as (run, device):
            if isinstance(run, nn.Module):
                run.eval()
            x = move_to(raw, device)
            with torch.inference_mode():
                peak = PeakMemory(device)
                with peak if config.track_memory else _null():
                    t = timed_loop([lambda: call_model(run, x)], config, device,
                                   on_run=peak.sample if config.track_memory else None)
    finally:
        _restore_flags(flags)
    stats = summarize(t.per_fn_s[0], config.unstable_threshold)
    batch = config.batch_size or batch_size_of(raw)
    tokens = tokens_of(raw)
    median_s = stats.median_ms / 1e3
    ms = model_stats(model) if isinstance(model, nn.Module) else None
    bw, flops = config.peak_bandwidth, config.peak_flops
    if bw is None or flops is None:
        known_bw, known_flops = known_peaks(device)
        bw, flops = bw or known_bw, flops or known_flops
    work_items = tokens or batch
    return _report_from(
        stats,
        samples_per_s=batch / median_s if median_s > 0 else float("inf"),
        tokens_per_s=(tokens / median_s if median_s > 0 else float("inf")) if tokens else None,
        batch_size=batch, seq_len=seq_len_of(raw), tokens_per_call=tokens, num_threads=threads, device=str(device),
        compiled=config.compile, warmup=config.warmup, total_time_s=t.total_s, first_call_ms=t.first_call_s * 1e3,
        budget_exhausted=t.budget_exhausted, peak_memory_mb=peak.peak_mb if config.track_memory else None,
        model_mb=ms.model_mb if ms else None, num_params=ms.num_params if ms else None,
        nonzero_params=ms.nonzero_params if ms else None,
        mbu=utilisation(ms.model_bytes, median_s, bw) if ms else None,
        mfu=utilisation(2.0 * ms.num_params * work_items, median_s, flops) if ms else None,
        times_ms=[s * 1e3 for s in t.per_fn_s[0]],
    )


class _null:
    def __enter__(self) -> None:
        return None

    def __exit__(self, *exc: Any) -> None:
        return None


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


__all__ = ["LatencyConfig", "LatencyReport", "compare_latency", "measure_latency", "sync", "timed_loop"]
