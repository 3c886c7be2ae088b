"""GGUF's own block grids (Q8_0, Q4_0) in PyTorch, bit for bit, so QAT can train toward the file llama.cpp runs.

Both formats cut each row into blocks of 32 values with one fp16 scale per block. The arithmetic below copies the
reference quantizer (``ggml-quants.c``, mirrored by the ``gguf`` package's ``gguf.quants``) operation by operation in
fp32, because any reordering changes a rounding somewhere on real data:

* Q8_0: ``d = max|x| / 127``, ``q = roundf(x * (1/d))`` (half away from zero), stored ``fp16(d)``;
  value ``q * fp16(d)``.
* Q4_0: ``m`` = the value of largest magnitude (sign kept, first one on ties), ``d = m / -8``,
  ``q = clamp(trunc(x * (1/d) + 8.5), 0, 15)``, stored ``fp16(d)``; value ``(q - 8) * fp16(d)``.

The scale is quantized with fp32 ``d`` and dequantized with ``fp16(d)``, as llama.cpp does; the returned weight is the
dequantized one, i.e. what llama.cpp multiplies by. Only torch is imported here (no ``gguf`` needed to train);
the straight-through fake quantization for QAT is :func:`~.weight_only_qat.gguf_fake_quantize`.
"""

from __future__ import annotations

import torch

GGUF_BLOCK = 32
GGUF_GRIDS: tuple[str, ...] = ("Q8_0", "Q4_0")


def check_gguf_grid(qtype: str, in_features: int | None = None, name: str = "weight") -> None:
    """Raise ``ValueError`` unless ``qtype`` is a GGUF grid and rows of ``in_features`` split into 32-blocks."""
    if qtype not in GGUF_GRIDS:
        raise ValueError(f"`qtype` must be one of {list(GGUF_GRIDS)}, got {qtype!r}. Pass qtype='Q4_0' or 'Q8_0'.")
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


@torch.no_grad()
def gguf_grid(weight: torch.Tensor, qtype: str) -> tuple[torch.Tensor, torch.Tensor]:
    """The integers and fp16 scales GGUF stores for ``weight`` ``(out, in)``.

    Returns:
        ``(q, d)``: ``q`` int8 ``(out, in // 32, 32)`` (Q4_0: the stored nibble minus 8, in ``[-8, 7]``), ``d`` fp16
        ``(out, in // 32, 1)``.
    """
    check_gguf_grid(qtype, weight.shape[-1])
    blocks = weight.detach().float().reshape(*weight.shape[:-1], -1, GGUF_BLOCK)
    if qtype == "Q8_0":
        d = blocks.abs().amax(dim=-1, keepdim=True) / 127
        inv = torch.where(d == 0, torch.zeros_like(d), 1 / d)
        q = _roundf(blocks * inv)
    else:
        imax = blocks.abs().argmax(dim=-1, keepdim=True)
        d = torch.gather(blocks, -1, imax) / -8
        inv = torch.where(d == 0, torch.zeros_like(d), 1 / d)
        q = torch.trunc(blocks * inv + 8.5).clamp(0, 15) - 8
    return q.to(torch.int8), d.to(torch.float16)


def gguf_dequantize(q: torch.Tensor, d: torch.Tensor) -> torch.Tensor:
    """``(out, in)`` fp32 weight from :func:`gguf_grid`'s ``(q, d)``: what llama.cpp computes with."""
    w = q.float() * d.float()
    return w.reshape(*w.shape[:-2], -1)


__all__ = ["GGUF_BLOCK", "GGUF_GRIDS", "check_gguf_grid", "gguf_dequantize", "gguf_grid"]
