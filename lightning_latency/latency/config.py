"""How to measure: :class:`LatencyConfig`, shared by every measurer (forward, generation, breakdown, sweeps)."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from lightning_latency.latency.stats import DEFAULT_UNSTABLE_THRESHOLD


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
            _check_device(self.device)
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




def _check_device(device: Any) -> None:
    """Raise a ValueError naming ``device`` when it is not a device this process can use."""
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as err:
        raise ValueError(f"`device` must name a torch device, got {device!r}. E.g. device='cpu'.") from err
    if dev.type != "cuda":
        return
    if not torch.cuda.is_available():
        raise ValueError(f"`device`={device!r}, but this PyTorch build or machine has no CUDA device. Pass "
                         f"device='cpu' (or None to measure where the model is).")
    count = torch.cuda.device_count()
    if dev.index is not None and dev.index >= count:
        raise ValueError(f"`device`={device!r}, but this machine has {count} CUDA device(s) (cuda:0 to "
                         f"cuda:{count - 1}). Pass one of those.")


__all__ = ["LatencyConfig"]
