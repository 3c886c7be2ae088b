"""What this CPU can do fast: the ISA facts that change which deployment form wins and how it must be configured.

Machines of the same kind differ (seen: AVX-512 + VNNI + AMX; AVX-512 + VNNI + bf16; AVX2 only), so code that picks a
kernel path asks here instead of assuming one CPU. ``ONEDNN_MAX_CPU_ISA`` (oneDNN's own cap, used to emulate an older
CPU) is honoured: capped at AVX2 or below, oneDNN runs no VNNI or bf16 kernels even where the silicon has them.
"""

from __future__ import annotations

import functools
import os
from dataclasses import dataclass

# oneDNN ISA caps (ONEDNN_MAX_CPU_ISA values) that exclude VNNI / native bf16 kernels.
_NO_VNNI_CAPS = {"SSE41", "AVX", "AVX2"}
_NO_BF16_CAPS = _NO_VNNI_CAPS | {"AVX2_VNNI", "AVX512_CORE", "AVX512_CORE_VNNI"}


@dataclass(frozen=True)
class CpuFeatures:
    """ISA facts for the current process. ``capability`` is ``torch.backends.cpu.get_cpu_capability()``."""

    capability: str
    avx512: bool
    vnni: bool
    bf16: bool
    amx: bool

    @property
    def label(self) -> str:
        """One line for benchmark tables: e.g. ``AVX512 (avx512, vnni, bf16)`` or ``AVX2 (no avx512/vnni/amx/bf16)``."""
        have = [name for name in ("avx512", "vnni", "bf16", "amx") if getattr(self, name)]
        return f"{self.capability} ({', '.join(have)})" if have else f"{self.capability} (no avx512/vnni/amx/bf16)"


def parse_flags(cpuinfo: str) -> set[str]:
    """The ISA flags of the first processor in the text of ``/proc/cpuinfo``."""
    for line in cpuinfo.splitlines():
        if line.startswith("flags"):
            return set(line.split(":", 1)[1].split())
    return set()


def _proc_flags() -> set[str]:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as fh:
            return parse_flags(fh.read())
    except OSError:
        return set()


@functools.cache
def cpu_features() -> CpuFeatures:
    """Detect the CPU's features once per process (cheap; reads /proc/cpuinfo and torch's dispatch level)."""
    import torch

    capability = torch.backends.cpu.get_cpu_capability()
    flags = _proc_flags()
    cap = os.environ.get("ONEDNN_MAX_CPU_ISA", "").upper()
    aten_avx512 = capability.startswith("AVX512")
    vnni = bool(flags & {"avx512_vnni", "avx_vnni"}) and cap not in _NO_VNNI_CAPS
    bf16 = bool(flags & {"avx512_bf16", "amx_bf16"}) and cap not in _NO_BF16_CAPS and aten_avx512
    amx = bool(flags & {"amx_int8", "amx_bf16"}) and cap in ("", "ALL", "AVX512_CORE_AMX", "AVX512_CORE_AMX_FP16")
    return CpuFeatures(capability=capability, avx512=aten_avx512, vnni=vnni, bf16=bf16, amx=amx and aten_avx512)


__all__ = ["CpuFeatures", "cpu_features", "parse_flags"]
