"""Model size by real storage, parameter counts, and peak memory during inference.

Sizes count what a deployed model really stores: a torchao quantized tensor subclass (``AffineQuantizedTensor``,
int8/int4 layouts) counts its packed integer data plus scales and zero points, a sparse tensor counts its indices and
values, and a weight shared by two modules (tied embeddings) counts once.
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import nn

_MB = 1024**2


def _inner_tensors(t: torch.Tensor) -> list[torch.Tensor] | None:
    """Tensors a wrapper subclass is built from (``__tensor_flatten__`` protocol used by torchao), else None."""
    flatten = getattr(type(t), "__tensor_flatten__", None)
    if flatten is None or type(t) in (torch.Tensor, nn.Parameter):
        return None
    try:
        names, _ = t.__tensor_flatten__()
    except Exception:  # a subclass without a usable flatten: fall back to the logical size
        return None
    inner = [getattr(t, name) for name in names]
    return [x for x in inner if isinstance(x, torch.Tensor)]


def tensor_nbytes(t: torch.Tensor) -> int:
    """Bytes a tensor really stores: packed data for quantized subclasses, indices + values for sparse tensors."""
    inner = _inner_tensors(t)
    if inner is not None:
        return sum(tensor_nbytes(x) for x in inner)
    if t.is_sparse:
        t = t.coalesce() if not t.is_coalesced() else t
        return tensor_nbytes(t.indices()) + tensor_nbytes(t.values())
    if t.layout in (torch.sparse_csr, torch.sparse_bsr):
        return tensor_nbytes(t.crow_indices()) + tensor_nbytes(t.col_indices()) + tensor_nbytes(t.values())
    if t.layout in (torch.sparse_csc, torch.sparse_bsc):
        return tensor_nbytes(t.ccol_indices()) + tensor_nbytes(t.row_indices()) + tensor_nbytes(t.values())
    return t.numel() * t.element_size()


def _count_nonzero(t: torch.Tensor) -> int:
    if _inner_tensors(t) is not None:
        dequantize = getattr(t, "dequantize", None)
        if callable(dequantize):
            try:
                return int(torch.count_nonzero(dequantize()).item())
            except Exception:  # some layouts cannot dequantize on this device; count the logical size instead
                pass
        return t.numel()
    if t.layout != torch.strided:
        values = t.coalesce().values() if t.is_sparse else t.values()
        return int(torch.count_nonzero(values).item())
    if t.device.type == "meta":
        return t.numel()
    return int(torch.count_nonzero(t.detach()).item())


def _unique(tensors: list[torch.Tensor]) -> list[torch.Tensor]:
    """Drop repeats of the same tensor (tied weights): by identity, then by storage pointer for plain tensors."""
    seen_ids: set[int] = set()
    seen_ptrs: set[tuple[str, int, int, tuple[int, ...]]] = set()
    out = []
    for t in tensors:
        if id(t) in seen_ids:
            continue
        seen_ids.add(id(t))
        if t.layout == torch.strided and _inner_tensors(t) is None and t.device.type != "meta":
            key = (str(t.device), t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape))
            if key in seen_ptrs:
                continue
            seen_ptrs.add(key)
        out.append(t)
    return out


@dataclass(frozen=True)
class ModelStats:
    """Size and parameter counts of a model.

    Attributes:
        param_bytes: bytes of unique parameters by real storage.
        buffer_bytes: bytes of unique buffers (e.g. BatchNorm statistics, position ids).
        num_params: parameter elements (logical shape for quantized tensors).
        nonzero_params: parameter elements that are not zero (pruning shows up here).
    """

    param_bytes: int
    buffer_bytes: int
    num_params: int
    nonzero_params: int

    @property
    def model_bytes(self) -> int:
        return self.param_bytes + self.buffer_bytes

    @property
    def model_mb(self) -> float:
        return self.model_bytes / _MB

    @property
    def sparsity(self) -> float:
        return 1.0 - self.nonzero_params / self.num_params if self.num_params else 0.0

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "model_bytes": self.model_bytes, "model_mb": self.model_mb, "sparsity": self.sparsity}


def model_stats(model: nn.Module) -> ModelStats:
    """Bytes of parameters and buffers by real storage, parameter count and non-zero parameter count.

    Example::

        stats = model_stats(model)
        print(f"{stats.model_mb:.1f} MB, {stats.nonzero_params:,} non-zero of {stats.num_params:,}")
    """
    if not isinstance(model, nn.Module):
        raise ValueError(f"`model` must be a torch.nn.Module, got {type(model).__name__}. Pass the module itself.")
    params = _unique([p for _, p in model.named_parameters(remove_duplicate=False)])
    buffers = _unique([b for _, b in model.named_buffers(remove_duplicate=False) if b is not None])
    with torch.no_grad():
        return ModelStats(
            param_bytes=sum(tensor_nbytes(p) for p in params),
            buffer_bytes=sum(tensor_nbytes(b) for b in buffers),
            num_params=sum(p.numel() for p in params),
            nonzero_params=sum(_count_nonzero(p) for p in params),
        )


def _rss_bytes() -> int:
    """Resident set size of this process (Linux ``/proc``; 0 where unavailable)."""
    try:
        with open("/proc/self/statm") as fh:
            return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return 0


def _reset_peak_rss() -> bool:
    """Reset the kernel's peak-RSS counter (VmHWM) of this process; False where Linux does not allow it."""
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
        return True
    except OSError:
        return False


def _peak_rss_bytes() -> int:
    """Peak resident set size (VmHWM) since the last reset; 0 where unavailable."""
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return 0


class PeakMemory:
    """Peak extra memory while a block runs: CUDA peak allocated on GPU, RSS growth on CPU.

    On Linux the kernel's peak-RSS counter (VmHWM) is reset on entry, so the CPU result includes memory allocated and
    freed inside one forward. Elsewhere the RSS is sampled at every :meth:`sample` call (after each timed run), which
    misses such transient allocations. Either way it is *process* RSS growth: memory the allocator already holds from
    earlier work is reused without growing the RSS, so a warm process can report less than a fresh one.
    """

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.peak_bytes = 0
        self._base = 0
        self._hwm = False

    def __enter__(self) -> PeakMemory:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self._base = torch.cuda.memory_allocated(self.device)
        else:
            self._base = _rss_bytes()
            self._hwm = _reset_peak_rss()
        return self

    def sample(self) -> None:
        if self.device.type != "cuda":
            current = _peak_rss_bytes() if self._hwm else _rss_bytes()
            self.peak_bytes = max(self.peak_bytes, current - self._base)

    def __exit__(self, *exc: Any) -> None:
        if self.device.type == "cuda":
            self.peak_bytes = max(0, torch.cuda.max_memory_allocated(self.device) - self._base)
        else:
            self.sample()

    @property
    def peak_mb(self) -> float:
        return self.peak_bytes / _MB


__all__ = ["ModelStats", "PeakMemory", "model_stats", "tensor_nbytes"]
