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


# /proc/cpuinfo flags that decide which CPU kernels are fast: int8 dot products (VNNI), matrix tiles (AMX) and
# native bf16 arithmetic. Without native bf16, bf16 autocast emulates it and runs ×4–7 slower than fp32.
_ISA_FLAGS = ("avx2", "avx512f", "avx512_vnni", "avx_vnni", "avx512_bf16", "amx_tile", "amx_int8", "amx_bf16")


def isa_flags(cpuinfo: str | None = None) -> dict[str, object]:
    """The CPU's kernel-relevant ISA: ``{"capability": "AVX2" | "AVX512" | ..., "<flag>": bool, ...}``.

    Args:
        cpuinfo: text of ``/proc/cpuinfo`` (read from the machine when None; tests pass a fixture). Non-Linux
            machines, or an unreadable file, give every flag False.

    ``capability`` is ``torch.backends.cpu.get_cpu_capability()``: the ISA torch's own kernels were dispatched to.
    ``vnni`` / ``bf16`` / ``amx`` summarise the flags (either the AVX-512 or the AVX form counts).
    """
    from lightning_latency.cpu import _proc_flags, parse_flags  # the one /proc/cpuinfo parser

    flags = _proc_flags() if cpuinfo is None else parse_flags(cpuinfo)
    out: dict[str, object] = {"capability": torch.backends.cpu.get_cpu_capability()}
    out.update({flag: flag in flags for flag in _ISA_FLAGS})
    out["vnni"] = bool(out["avx512_vnni"] or out["avx_vnni"])
    out["bf16"] = bool(out["avx512_bf16"] or out["amx_bf16"])
    out["amx"] = bool(out["amx_int8"] or out["amx_bf16"])
    return out


def has_native_bf16(cpuinfo: str | None = None) -> bool:
    """True when the CPU computes bf16 natively (AVX512-BF16 or AMX-BF16), i.e. when bf16 can beat fp32."""
    return bool(isa_flags(cpuinfo)["bf16"])


def isa_summary(features: dict[str, object] | None = None) -> str:
    """One line for benchmark headers, e.g. ``"capability AVX512; avx512 yes, vnni yes, amx yes, bf16 yes"``."""
    f = features or isa_flags()
    yes = {True: "yes", False: "no"}
    return (f"capability {f['capability']}; avx512 {yes[bool(f['avx512f'])]}, vnni {yes[bool(f['vnni'])]}, "
            f"amx {yes[bool(f['amx'])]}, bf16 {yes[bool(f['bf16'])]}")


__all__ = ["KNOWN_PEAKS", "isa_flags", "has_native_bf16", "isa_summary", "known_peaks", "utilisation"]
