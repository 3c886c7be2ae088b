"""The set-up every measurer shares, once: settings, thread count, training flags, the form to run, known peaks.

:func:`measure_latency`, :func:`measure_generation` and :func:`module_breakdown` all open :func:`measuring` and
time inside it; leaving it (normally or by an exception) restores the thread count and every submodule's training
flag, and drops the compiled / moved copy.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from lightning_latency.latency.compiled import deployed, module_device
from lightning_latency.latency.config import LatencyConfig
from lightning_latency.latency.hardware import known_peaks


def resolve_config(config: LatencyConfig | None, overrides: Mapping[str, Any]) -> LatencyConfig:
    """``config`` (default :class:`LatencyConfig`) with the call's keyword ``overrides`` applied.

    Raises:
        TypeError: ``config`` is not a LatencyConfig (a dict, a string …).
        ValueError: an unknown field name or a bad value in ``overrides``.
    """
    if config is not None and not isinstance(config, LatencyConfig):
        raise TypeError(f"`config` must be a LatencyConfig or None, got {type(config).__name__} {config!r}. "
                        f"Pass settings as keywords (measure_latency(model, inputs, warmup=3)) or "
                        f"config=LatencyConfig(...).")
    config = config or LatencyConfig()
    return config.replace(**overrides) if overrides else config


@dataclass(frozen=True)
class Session:
    """What a measurer runs inside :func:`measuring`.

    Attributes:
        run: the model to call (the model itself, or its compiled / moved deep copy), in eval mode.
        device: where it runs (inputs go there; synchronisation happens there).
        threads: the thread count in force.
        peak_bandwidth, peak_flops: the config's peaks, else the known ones of ``device`` (None when unknown).
    """

    run: Any
    device: torch.device
    threads: int
    peak_bandwidth: float | None
    peak_flops: float | None


@contextlib.contextmanager
def measuring(model: Any, config: LatencyConfig, compile_forward_only: bool = False,
              transform: bool = True) -> Iterator[Session]:
    """Set up one measurement of ``model`` under ``config``; restore everything on exit.

    Args:
        model: the module (or plain callable) to measure.
        config: the settings (``threads``, ``device``, ``compile``, ``compile_mode``, ``freezing``, peaks).
        compile_forward_only: compile ``forward`` only, so ``generate`` keeps working (see :func:`deployed`).
        transform: False runs ``model`` itself where it is, ignoring ``device`` / ``compile`` (forward hooks on
            its submodules must see the calls).
    """
    # Per module, not model.train(was): a frozen teacher inside a training student must stay in eval mode.
    flags = [(m, m.training) for m in model.modules()] if isinstance(model, nn.Module) else []
    old_threads = torch.get_num_threads()
    try:
        with contextlib.ExitStack() as stack:
            if config.threads is not None:
                torch.set_num_threads(config.threads)
            if transform:
                run, device = stack.enter_context(deployed(model, config.device, config.compile, config.compile_mode,
                                                           config.freezing, compile_forward_only))
            else:
                run, device = model, module_device(model)
            if isinstance(run, nn.Module):
                run.eval()
            bandwidth, flops = config.peak_bandwidth, config.peak_flops
            if bandwidth is None or flops is None:
                known_bandwidth, known_flops = known_peaks(device)
                bandwidth, flops = bandwidth or known_bandwidth, flops or known_flops
            yield Session(run, device, torch.get_num_threads(), bandwidth, flops)
    finally:
        torch.set_num_threads(old_threads)
        for module, was in flags:
            module.training = was


__all__ = ["Session", "measuring", "resolve_config"]
