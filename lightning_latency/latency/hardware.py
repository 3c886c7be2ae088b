"""Known peak memory bandwidth and FLOP rates, and the MBU / MFU estimates built on them.

MBU (model bandwidth utilisation) = bytes that must be read per step / time per step / peak bandwidth.
MFU (model FLOP utilisation) = FLOPs per step / time per step / peak FLOP rate. Both are only estimates: the byte count
is weights (+ KV cache for decode), the FLOP count is ``2 × parameters × tokens`` (a dense transformer's matmuls).
"""

from __future__ import annotations

import torch

# Data-sheet peaks (dense, no sparsity): name fragment of `torch.cuda.get_device_name` -> (bytes/s, bf16 FLOP/s).
# Checked in this order, so more specific names come first.
KNOWN_PEAKS: dict[str, tuple[float, float]] = {
    "H200": (4.8e12, 989e12),
    "H100 PCIe": (2.0e12, 756e12),
    "H100": (3.35e12, 989e12),  # SXM, HBM3
    "A100-SXM4-80GB": (2.039e12, 312e12),
    "A100": (1.555e12, 312e12),
    "L4": (0.3e12, 121e12),
    "A10G": (0.6e12, 125e12),
}


def known_peaks(device: torch.device | str | None = None) -> tuple[float | None, float | None]:
    """``(peak_bandwidth B/s, peak_flops FLOP/s)`` for a CUDA device from :data:`KNOWN_PEAKS`; ``(None, None)`` else.

    CPUs have no entry: their peaks depend on sockets, channels and clocks, so pass them in explicitly.
    """
    device = torch.device(device) if device is not None else None
    if device is None or device.type != "cuda" or not torch.cuda.is_available():
        return None, None
    name = torch.cuda.get_device_name(device)
    for fragment, peaks in KNOWN_PEAKS.items():
        if fragment.lower() in name.lower():
            return peaks
    return None, None


def utilisation(amount: float, seconds: float, peak: float | None) -> float | None:
    """``amount / seconds / peak`` (e.g. bytes per step over time per step over peak bandwidth), or None if unknown."""
    if peak is None or peak <= 0 or seconds <= 0:
        return None
    return amount / seconds / peak


__all__ = ["KNOWN_PEAKS", "known_peaks", "utilisation"]
