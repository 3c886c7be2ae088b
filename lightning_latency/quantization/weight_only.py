"""Weight-only int4 / int8 linears that run on PyTorch's packed CPU kernels, and the verb that swaps them in.

Decoding one token at batch 1 is a chain of matrix-vector products: memory-bandwidth-bound, so the lever is fewer bytes
of weight read per token through a kernel that never materialises a float copy of the matrix. PyTorch ships two such
kernels for CPU, and these modules call them directly (no tensor subclass, no compile needed):

* ``torch.ops.aten._weight_int4pack_mm_for_cpu``: 4-bit weights packed two per byte, one (scale, zero) pair per group
  of ``group_size`` input elements, **bf16 activations** (with fp32 activations the same kernel ran ×25 slower here).
  Measured on a 2-thread AVX-512 CPU at SmolLM2 shapes with the weights streamed from memory (60 distinct
  1536×576 matrices): ×3.9 over fp32 ``F.linear``; ×4.7–4.9 on an AVX2 CPU.
* ``torch.ops.aten._weight_int8pack_mm``: int8 weights, one scale per output channel, bf16 activations: ×2.3 here
  (×2.8 on AVX2). With fp32 activations it is ×0.1–0.4: slower than fp32.

The grids are defined here once (:func:`int4_grid`, :func:`int8_grid`) and shared with weight-only QAT
(``weight_only_qat.py``), so a QAT-trained model converts to these modules bit for bit on the weights:

* int4: **asymmetric with a minimum per group**, as GGUF's Q4_1: ``scale = (max − min) / 15``, ``q ∈ [0, 15]``,
  ``w ≈ q · scale + min``. The kernel stores ``zero = min + 8 · scale`` and computes ``(q − 8) · scale + zero``;
  scale and zero are rounded to bf16 (the kernel's storage) *before* ``q`` is chosen, so the grid the weights
  are rounded to is exactly the one the kernel applies.
* int8: symmetric per output channel, ``scale = max |w| / 127`` rounded to bf16, ``q ∈ [−128, 127]``.

Kernel constraints (torch 2.13, checked up front with errors that say what to pass): int4 needs
``group_size ∈ {32, 64, 128, 256}`` dividing ``in_features`` and ``out_features`` divisible by 16; int8 needs
``in_features`` divisible by 16 (other widths crash the process in the kernel rather than raise).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from lightning_latency._deprecation import renamed
from lightning_latency.patterns import compile_patterns, matches_any

INT4_GROUP_SIZES = (32, 64, 128, 256)

# Unlike QAT's DEFAULT_SKIP, `lm_head` is quantized by default: at SmolLM2's size the 49,152 × 576 output projection
# is a fifth of the bytes read per token. Embeddings are a gather (one row per token), not worth packing.
WEIGHT_ONLY_DEFAULT_SKIP: tuple[str, ...] = ("*Embedding*", "*embed*", "*LayerNorm*", "*RMSNorm*", "*score",
                                             "*classifier*")


# ---------------------------------------------------------------------------------------------------- the grids
def int4_grid(weight: torch.Tensor, group_size: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Asymmetric 4-bit group-wise grid of a ``(out, in)`` weight: ``(q, scale, zero)``.

    Returns:
        ``q`` int32 ``(out, in)`` in ``[0, 15]``; ``scale`` and ``zero`` bf16 ``(out, in // group_size)``, with
        the dequantized weight ``(q − 8) · scale + zero`` (see :func:`int4_dequantize`).
    """
    out_f, in_f = weight.shape
    w = weight.detach().float().reshape(out_f, in_f // group_size, group_size)
    lo, hi = w.amin(-1), w.amax(-1)
    scale = ((hi - lo) / 15).clamp_min(torch.finfo(torch.bfloat16).tiny).to(torch.bfloat16)
    zero = (lo + 8 * scale.float()).to(torch.bfloat16)
    s, z = scale.float().unsqueeze(-1), zero.float().unsqueeze(-1)
    q = torch.clamp(torch.round((w - (z - 8 * s)) / s), 0, 15).to(torch.int32)
    return q.reshape(out_f, in_f), scale, zero


def int4_dequantize(q: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, group_size: int) -> torch.Tensor:
    """fp32 weight ``(out, in)`` of an :func:`int4_grid` triple."""
    out_f, in_f = q.shape
    qg = q.reshape(out_f, in_f // group_size, group_size).float()
    return ((qg - 8) * scale.float().unsqueeze(-1) + zero.float().unsqueeze(-1)).reshape(out_f, in_f)


def int8_grid(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric per-output-channel 8-bit grid of a ``(out, in)`` weight: ``(q int8 (out, in), scale bf16 (out,))``."""
    w = weight.detach().float()
    scale = (w.abs().amax(-1) / 127).clamp_min(torch.finfo(torch.bfloat16).tiny).to(torch.bfloat16)
    q = torch.clamp(torch.round(w / scale.float().unsqueeze(-1)), -128, 127).to(torch.int8)
    return q, scale


def int8_dequantize(q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """fp32 weight ``(out, in)`` of an :func:`int8_grid` pair."""
    return q.float() * scale.float().unsqueeze(-1)


def check_kernel_shape(name: str, module: nn.Linear, bits: int, group_size: int,
                       all_widths: Sequence[int] = ()) -> None:
    """Raise a ValueError naming the layer, the bad value and a value that works if the packed kernel cannot run it."""
    in_f, out_f = module.in_features, module.out_features
    if bits == 8:
        if in_f % 16:
            raise ValueError(
                f"Layer {name!r} has in_features={in_f}; the packed int8 CPU kernel needs a multiple of 16. "
                f"Add {name!r} to `exclude`."
            )
        return
    if in_f % group_size:
        widths = list(all_widths) or [in_f]
        valid = [g for g in INT4_GROUP_SIZES if all(w % g == 0 for w in widths)]
        hint = f"group_size={valid[-1]}" if valid else f"exclude=[..., {name!r}]"
        raise ValueError(
            f"`group_size`={group_size} does not divide in_features={in_f} of layer {name!r} (int4 weights are "
            f"quantized in groups along the input dimension). Pass {hint}, or add the layer to `exclude`."
        )
    if out_f % 16:
        raise ValueError(
            f"Layer {name!r} has out_features={out_f}; the packed int4 CPU kernel needs a multiple of 16. "
            f"Add {name!r} to `exclude`, or pass bits=8."
        )


def check_bits_and_group(bits: Any, group_size: Any) -> None:
    if bits not in (4, 8) or isinstance(bits, bool):
        raise ValueError(f"`bits` must be 4 or 8, got {bits!r}. Pass bits=4 for the int4 group-wise kernel.")
    if bits == 4 and group_size not in INT4_GROUP_SIZES:
        raise ValueError(
            f"`group_size` must be one of {INT4_GROUP_SIZES} (what the packed int4 CPU kernel supports), got "
            f"{group_size!r}. Pass group_size=32 (finest, most accurate) or 64."
        )


# ---------------------------------------------------------------------------------------------------- the modules
class _WeightOnlyLinear(nn.Module):
    in_features: int
    out_features: int

    def _finish(self, y: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        y = y.reshape(*x.shape[:-1], self.out_features).to(x.dtype)
        return y + self.bias.to(x.dtype) if self.bias is not None else y

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}"


class Int4WeightOnlyLinear(_WeightOnlyLinear):
    """``nn.Linear`` replacement with 4-bit group-wise weights (:func:`int4_grid`) on the packed CPU kernel.

    The input ``(..., in_features)`` is cast to bf16 for the kernel and the output cast back to the input's dtype;
    the bias stays in its own dtype. Stores 0.5 byte per weight plus 4 bytes of (scale, zero) per group.

    Args:
        q, scale, zero: an :func:`int4_grid` triple.
        group_size: the grid's group size.
        bias: ``(out_features,)`` or None.
    """

    def __init__(self, q: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, group_size: int,
                 bias: torch.Tensor | None = None) -> None:
        super().__init__()
        self.out_features, self.in_features = q.shape
        self.group_size = group_size
        self.register_buffer("weight_packed", torch.ops.aten._convert_weight_to_int4pack_for_cpu(q.contiguous(), 1))
        # The kernel's layout: (in // group, out, 2) with [..., 0] the scale and [..., 1] the zero.
        self.register_buffer("scales_and_zeros", torch.stack([scale, zero], -1).transpose(0, 1).contiguous())
        self.bias = nn.Parameter(bias.detach().clone(), requires_grad=False) if bias is not None else None

    @classmethod
    def from_linear(cls, linear: nn.Linear, group_size: int = 32) -> Int4WeightOnlyLinear:
        q, scale, zero = int4_grid(linear.weight, group_size)
        return cls(q, scale, zero, group_size, linear.bias)

    @torch.no_grad()
    def dequantize(self) -> torch.Tensor:
        """The weight ``(out, in)`` as the kernel applies it, read back through the kernel (bf16-rounded, in fp32).

        The CPU packing layout is private to ATen, so the weight is recovered by multiplying the identity.
        """
        eye = torch.eye(self.in_features, dtype=torch.bfloat16)
        return torch.ops.aten._weight_int4pack_mm_for_cpu(eye, self.weight_packed, self.group_size,
                                                          self.scales_and_zeros).T.float()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x2 = x.reshape(-1, self.in_features).to(torch.bfloat16)
        # `.to`: a later `model.float()` / `model.half()` casts floating buffers; the kernel needs bf16 (a no-op here)
        y = torch.ops.aten._weight_int4pack_mm_for_cpu(x2, self.weight_packed, self.group_size,
                                                       self.scales_and_zeros.to(torch.bfloat16))
        return self._finish(y, x)

    def extra_repr(self) -> str:
        return super().extra_repr() + f", group_size={self.group_size}"


class Int8WeightOnlyLinear(_WeightOnlyLinear):
    """``nn.Linear`` replacement with int8 per-channel weights (:func:`int8_grid`) on ``_weight_int8pack_mm``.

    Input cast to bf16 (the kernel's fast path), output cast back to the input's dtype. 1 byte per weight.
    """

    def __init__(self, q: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None = None) -> None:
        super().__init__()
        self.out_features, self.in_features = q.shape
        self.register_buffer("weight_int8", q.contiguous())
        self.register_buffer("scale", scale.to(torch.bfloat16).contiguous())
        self.bias = nn.Parameter(bias.detach().clone(), requires_grad=False) if bias is not None else None

    @classmethod
    def from_linear(cls, linear: nn.Linear) -> Int8WeightOnlyLinear:
        q, scale = int8_grid(linear.weight)
        return cls(q, scale, linear.bias)

    def dequantize(self) -> torch.Tensor:
        """The fp32 weight ``(out, in)`` the kernel multiplies by."""
        return int8_dequantize(self.weight_int8, self.scale)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x2 = x.reshape(-1, self.in_features).to(torch.bfloat16)
        return self._finish(torch.ops.aten._weight_int8pack_mm(x2, self.weight_int8, self.scale.to(torch.bfloat16)), x)


def is_weight_only(module: nn.Module) -> bool:
    return isinstance(module, _WeightOnlyLinear)


# ---------------------------------------------------------------------------------------------------- the verb
def select_linears(model: nn.Module, targets: Sequence[str] | None, exclude: Sequence[str] | None,
                   kind: type[nn.Module] = nn.Linear) -> dict[str, nn.Module]:
    """``kind`` modules of ``model`` matching ``targets`` (None: all) and neither they nor a parent matching
    ``exclude``. Patterns are :mod:`lightning_latency.patterns` (fnmatch on the qualified name or the class name,
    ``"re:<regex>"``), as everywhere.

    Raises:
        ValueError: a pattern that is not one; nothing selected.
    """
    excluded = compile_patterns(WEIGHT_ONLY_DEFAULT_SKIP if exclude is None else exclude, "exclude")
    wanted = None if targets is None else compile_patterns(targets, "targets")
    skipped: list[str] = []
    out: dict[str, nn.Module] = {}
    for name, module in model.named_modules():
        if name and matches_any(excluded, name, module):
            skipped.append(name + ".")
            continue
        if any(name.startswith(p) for p in skipped) or type(module) is not kind:
            continue
        if wanted is None or matches_any(wanted, name, module):
            out[name] = module
    if not out:
        raise ValueError(
            f"Nothing to quantize: `targets`={targets!r} with `exclude`={[p.text for p in excluded]!r} matched no "
            f"{kind.__name__} in {type(model).__name__}. Fix the patterns or pass exclude=[]."
        )
    return out


def _replace(model: nn.Module, name: str, new: nn.Module) -> nn.Module:
    if not name:
        return new
    model.set_submodule(name, new)
    return model


def quantize_weight_only(model: nn.Module, bits: int | Any = 4, group_size: int = 32,
                         targets: Sequence[str] | None = None, exclude: Sequence[str] | None = None,
                         skip: Sequence[str] | None = None) -> list[str]:
    """Replace the selected ``nn.Linear`` layers of ``model`` in place with packed weight-only int4 / int8 linears.

    Args:
        model: any module (a Hugging Face causal LM works as is); a bare ``nn.Linear`` cannot replace itself, wrap
            it in ``nn.Sequential``.
        bits: 4 (:class:`Int4WeightOnlyLinear`, group-wise asymmetric) or 8 (:class:`Int8WeightOnlyLinear`,
            per-channel symmetric). A torchao ``AOBaseConfig`` is also accepted and applied with torchao's
            ``quantize_`` to the same selection (its own kernels then decide the speed).
        group_size: int4 group size, one of 32, 64, 128, 256, dividing every selected layer's ``in_features``.
        targets: fnmatch patterns (name or class name) to quantize; None: every ``nn.Linear``.
        exclude: patterns never quantized; None: :data:`WEIGHT_ONLY_DEFAULT_SKIP` (embeddings, norms,
            classifier heads; ``lm_head`` *is* quantized). ``skip``: its deprecated name.

    Returns:
        Names of the replaced layers, in model order.

    Raises:
        ValueError: bad ``bits``/``group_size``, nothing selected, a layer the kernel cannot run (the message names
            the layer, the value and what to pass instead). Nothing is changed when it raises.

    Example::

        model, tok = load_smollm2()
        quantize_weight_only(model, bits=4, group_size=32)
        tokens = fast_generate(model, tok("Hello", return_tensors="pt").input_ids, max_new_tokens=32)
    """
    exclude = renamed("quantize_weight_only", "skip", skip, "exclude", exclude, None)
    selected = select_linears(model, targets, exclude)
    if not isinstance(bits, int):
        from torchao.core.config import AOBaseConfig
        from torchao.quantization import quantize_

        if not isinstance(bits, AOBaseConfig):
            raise ValueError(f"`bits` must be 4, 8 or a torchao AOBaseConfig, got {type(bits).__name__}. "
                             f"Pass bits=4.")
        quantize_(model, bits, filter_fn=lambda m, n: n in selected)
        return list(selected)
    check_bits_and_group(bits, group_size)
    widths = [m.in_features for m in selected.values()]
    for name, module in selected.items():
        check_kernel_shape(name, module, bits, group_size, widths)
    for name, module in selected.items():
        new = (Int4WeightOnlyLinear.from_linear(module, group_size) if bits == 4
               else Int8WeightOnlyLinear.from_linear(module))
        _replace(model, name, new)
    return list(selected)


__all__ = [
    "INT4_GROUP_SIZES",
    "Int4WeightOnlyLinear",
    "Int8WeightOnlyLinear",
    "WEIGHT_ONLY_DEFAULT_SKIP",
    "int4_dequantize",
    "int4_grid",
    "int8_dequantize",
    "int8_grid",
    "is_weight_only",
    "quantize_weight_only",
]
