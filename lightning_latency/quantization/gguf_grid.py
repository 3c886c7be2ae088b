"""GGUF's own block grids (Q8_0, Q4_0, Q4_1) in PyTorch, bit for bit, so QAT can train toward the file llama.cpp runs.

All three cut each row into blocks of 32 values with one fp16 scale per block (Q4_1 also an fp16 minimum). The
arithmetic below copies the reference quantizer (``ggml-quants.c``, mirrored by the ``gguf`` package's
``gguf.quants``) operation by operation in fp32, because any reordering changes a rounding somewhere on real data:

* Q8_0: ``d = max|x| / 127``, ``q = roundf(x * (1/d))`` (half away from zero), stored ``fp16(d)``;
  value ``q * fp16(d)``.
* Q4_0: ``m`` = the value of largest magnitude (sign kept, first one on ties), ``d = m / -8``,
  ``q = clamp(trunc(x * (1/d) + 8.5), 0, 15)``, stored ``fp16(d)``; value ``(q - 8) * fp16(d)``.
* Q4_1 (the format SmolLM2 is shipped in): ``m = min(x)``, ``d = (max(x) - m) / 15``,
  ``q = clamp(trunc((x - m) * (1/d) + 0.5), 0, 15)``, stored ``fp16(d)``, ``fp16(m)``; value
  ``q * fp16(d) + fp16(m)`` (the product rounded to fp32 before the sum, as ``gguf.quants`` computes it).

``1/d`` is 0 where ``d`` is 0 (a constant block). The scale is quantized with fp32 ``d`` and dequantized with
``fp16(d)``, as llama.cpp does; the returned weight is the dequantized one, i.e. what llama.cpp multiplies by.
Only torch is imported here (no ``gguf`` needed to train); the straight-through fake quantization for QAT is
:func:`~.weight_only_qat.gguf_fake_quantize`.
"""

from __future__ import annotations

import torch

GGUF_BLOCK = 32
GGUF_GRIDS: tuple[str, ...] = ("Q8_0", "Q4_0", "Q4_1")


def check_gguf_grid(qtype: str, in_features: int | None = None, name: str = "weight") -> None:
    """Raise ``ValueError`` unless ``qtype`` is a GGUF grid and rows of ``in_features`` split into 32-blocks."""
    if qtype not in GGUF_GRIDS:
        raise ValueError(f"`qtype` must be one of {list(GGUF_GRIDS)}, got {qtype!r}. "
                         "Pass qtype='Q4_0', 'Q4_1' or 'Q8_0'.")
    if in_features is not None and in_features % GGUF_BLOCK:
        raise ValueError(
            f"`{name}` has rows of {in_features} values, not a multiple of GGUF's block of {GGUF_BLOCK}, so it has "
            f"no {qtype} form. Skip it (skip=[...]) or keep its width a multiple of {GGUF_BLOCK} when pruning."
        )


def _roundf(v: torch.Tensor) -> torch.Tensor:
    # gguf.quants.np_roundf: half away from zero, written as floor(a) + floor(2 * frac) like the reference.
    a = v.abs()
    floored = torch.floor(a)
    return torch.sign(v) * (floored + torch.floor(2 * (a - floored)))


def _inverse(d: torch.Tensor) -> torch.Tensor:
    return torch.where(d == 0, torch.zeros_like(d), 1 / d)


def _q8_0(blocks: torch.Tensor) -> tuple[torch.Tensor, ...]:
    d = blocks.abs().amax(dim=-1, keepdim=True) / 127
    return _roundf(blocks * _inverse(d)), d


def _q4_0(blocks: torch.Tensor) -> tuple[torch.Tensor, ...]:
    imax = blocks.abs().argmax(dim=-1, keepdim=True)
    d = torch.gather(blocks, -1, imax) / -8
    return torch.trunc(blocks * _inverse(d) + 8.5).clamp(0, 15) - 8, d


def _q4_1(blocks: torch.Tensor) -> tuple[torch.Tensor, ...]:
    lo = blocks.amin(dim=-1, keepdim=True)
    d = (blocks.amax(dim=-1, keepdim=True) - lo) / 15
    return torch.trunc((blocks - lo) * _inverse(d) + 0.5).clamp(0, 15), d, lo


_QUANTIZERS = {"Q8_0": _q8_0, "Q4_0": _q4_0, "Q4_1": _q4_1}


@torch.no_grad()
def gguf_grid(weight: torch.Tensor, qtype: str) -> tuple[torch.Tensor, ...]:
    """The integers and fp16 scales (and Q4_1's fp16 minima) GGUF stores for ``weight`` ``(out, in)``.

    Returns:
        ``(q, d)`` for Q8_0 / Q4_0, ``(q, d, m)`` for Q4_1: ``q`` int8 ``(out, in // 32, 32)`` (Q4_0: the stored
        nibble minus 8, in ``[-8, 7]``; Q4_1: the stored nibble, in ``[0, 15]``), ``d`` and ``m`` fp16
        ``(out, in // 32, 1)``. :func:`gguf_dequantize` takes the tuple back.
    """
    check_gguf_grid(qtype, weight.shape[-1])
    blocks = weight.detach().float().reshape(*weight.shape[:-1], -1, GGUF_BLOCK)
    q, *scales = _QUANTIZERS[qtype](blocks)
    return (q.to(torch.int8), *(s.to(torch.float16) for s in scales))


def gguf_dequantize(q: torch.Tensor, d: torch.Tensor, m: torch.Tensor | None = None) -> torch.Tensor:
    """``(out, in)`` fp32 weight from :func:`gguf_grid`'s ``(q, d)`` or ``(q, d, m)``: what llama.cpp computes with."""
    w = q.float() * d.float()
    if m is not None:
        w = w + m.float()  # after the product is rounded, as gguf.quants' ``(d * qs) + m``
    return w.reshape(*w.shape[:-2], -1)


__all__ = ["GGUF_BLOCK", "GGUF_GRIDS", "check_gguf_grid", "gguf_dequantize", "gguf_grid"]
