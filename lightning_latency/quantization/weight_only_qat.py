"""Weight-only QAT toward the packed CPU kernels: fake-quantize on exactly the grid :mod:`weight_only` deploys.

torchao's ``IntxFakeQuantizeConfig`` simulates a *symmetric* int4 grid with fp32 scales, while the fast CPU kernel
(``_weight_int4pack_mm_for_cpu``) applies an asymmetric grid with bf16 (scale, zero) pairs: a model trained against
the former does not convert bit for bit to the latter. Here the forward uses :func:`~.weight_only.int4_grid` /
:func:`~.weight_only.int8_grid` themselves (asymmetric with a minimum per group, like GGUF's Q4_1; int8 symmetric per
channel), recomputed from the current weight at every step, with a straight-through estimator (the gradient of the
rounding is taken as identity, so the fp32 master weights keep training). :func:`convert_weight_only_qat` then runs
the same grid function on the final weights: the deployed integers, scales and zeros are those the last training
forward used.

The same mechanism trains toward llama.cpp's formats: :func:`prepare_gguf_qat` fake-quantizes on GGUF's Q8_0 / Q4_0 /
Q4_1 block grids (:mod:`.gguf_grid`, bit for bit the reference quantizer), and :func:`~.gguf.export_gguf` writes the
weights those layers used in their last forward into the file.

Prepared linears share their ``weight``/``bias`` Parameters with the originals (optimizers built before stay valid)
and keep their state-dict keys, so a checkpoint of a prepared model loads into a float one and vice versa.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F

from lightning_latency._deprecation import renamed
from lightning_latency.quantization.gguf_grid import check_gguf_grid, gguf_dequantize, gguf_grid
from lightning_latency.quantization.weight_only import (
    Int4WeightOnlyLinear,
    Int8WeightOnlyLinear,
    _replace,
    check_bits_and_group,
    check_kernel_shape,
    int4_dequantize,
    int4_grid,
    int8_dequantize,
    int8_grid,
    select_linears,
)


class _StraightThrough(torch.autograd.Function):
    """Forward: the grid values exactly (``w + (fq - w).detach()`` is off by fp32 rounding); backward: identity."""

    @staticmethod
    def forward(ctx: Any, weight: torch.Tensor, fq: torch.Tensor) -> torch.Tensor:
        return fq

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        return grad, None


def fake_quantize_weight(weight: torch.Tensor, bits: int = 4, group_size: int = 32) -> torch.Tensor:
    """The dequantized weight ``(out, in)`` on the deployment grid, with a straight-through gradient to ``weight``."""
    if bits == 4:
        fq = int4_dequantize(*int4_grid(weight, group_size), group_size)
    else:
        fq = int8_dequantize(*int8_grid(weight))
    return _StraightThrough.apply(weight, fq.to(weight.dtype))


def gguf_fake_quantize(weight: torch.Tensor, qtype: str = "Q4_0") -> torch.Tensor:
    """``weight`` ``(out, in)`` on GGUF's ``qtype`` block grid (``"Q8_0"``/``"Q4_0"``/``"Q4_1"``), straight-through
    gradient.

    Equals, bit for bit, what llama.cpp dequantizes from the ``qtype`` tensor :func:`~.gguf.export_gguf` writes.

    Raises:
        ValueError: unknown ``qtype``, or ``in`` not a multiple of 32.
    """
    return _StraightThrough.apply(weight, gguf_dequantize(*gguf_grid(weight, qtype)).to(weight.dtype))


class WeightOnlyFakeQuantLinear(nn.Linear):
    """An ``nn.Linear`` whose forward uses :func:`fake_quantize_weight` of its (shared) weight.

    Build with :meth:`from_linear`; it shares the original's Parameters. ``enabled=False`` runs the float weight.
    """

    bits: int
    group_size: int
    enabled: bool
    gguf: str | None  # a GGUF grid ("Q8_0"/"Q4_0"/"Q4_1") instead of the packed-kernel grid; exported, not converted

    @classmethod
    def from_linear(cls, linear: nn.Linear, bits: int = 4, group_size: int = 32,
                    gguf: str | None = None) -> WeightOnlyFakeQuantLinear:
        new = cls.__new__(cls)
        nn.Module.__init__(new)
        new.in_features, new.out_features = linear.in_features, linear.out_features
        new.weight, new.bias = linear.weight, linear.bias
        new.bits, new.group_size, new.enabled, new.gguf = bits, group_size, True, gguf
        return new

    def fake_weight(self) -> torch.Tensor:
        """The weight this layer's forward multiplies by (the float weight when disabled)."""
        if not self.enabled:
            return self.weight
        if getattr(self, "gguf", None):
            return gguf_fake_quantize(self.weight, self.gguf)
        return fake_quantize_weight(self.weight, self.bits, self.group_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.fake_weight(), self.bias)

    def to_linear(self) -> nn.Linear:
        """A plain ``nn.Linear`` sharing this module's Parameters."""
        lin = nn.Linear.__new__(nn.Linear)
        nn.Module.__init__(lin)
        lin.in_features, lin.out_features = self.in_features, self.out_features
        lin.weight, lin.bias = self.weight, self.bias
        return lin

    def extra_repr(self) -> str:
        if getattr(self, "gguf", None):
            return super().extra_repr() + f", gguf={self.gguf}"
        group = f", group_size={self.group_size}" if self.bits == 4 else ""
        return super().extra_repr() + f", bits={self.bits}{group}"


def weight_only_fake_quantized(model: nn.Module) -> dict[str, WeightOnlyFakeQuantLinear]:
    """The :class:`WeightOnlyFakeQuantLinear` modules of ``model`` by name."""
    return {n: m for n, m in model.named_modules() if isinstance(m, WeightOnlyFakeQuantLinear)}


def prepare_weight_only_qat(model: nn.Module, bits: int = 4, group_size: int = 32,
                            targets: Sequence[str] | None = None, exclude: Sequence[str] | None = None,
                            skip: Sequence[str] | None = None) -> list[str]:
    """Swap the selected linears of ``model`` in place for fake-quantized ones on the deployment grid.

    Idempotent (already prepared layers are kept). Same selection and checks as
    :func:`~.weight_only.quantize_weight_only`, so whatever prepares also converts.

    Args:
        model: any module, e.g. a Hugging Face causal LM or a ``DistillationModule``'s student.
        bits: 4 (group-wise asymmetric) or 8 (per-channel symmetric).
        group_size: int4 group size (32, 64, 128, 256) dividing every selected ``in_features``.
        targets: fnmatch patterns to quantize; None: every ``nn.Linear``.
        exclude: patterns never quantized (fnmatch, ``"re:"``); None: embeddings, norms, classifier heads
            (``lm_head`` included). ``skip``: its deprecated name.

    Returns:
        Names of all fake-quantized layers.

    Raises:
        ValueError: as :func:`~.weight_only.quantize_weight_only`.

    Example::

        prepare_weight_only_qat(model, bits=4, group_size=32)
        Trainer(max_steps=200).fit(DistillationModule(student=model, teacher=teacher))
        convert_weight_only_qat(model)       # packed int4: same weights the last step trained
    """
    check_bits_and_group(bits, group_size)
    try:
        exclude = renamed("prepare_weight_only_qat", "skip", skip, "exclude", exclude, None)
        todo = select_linears(model, targets, exclude)
    except ValueError:
        if weight_only_fake_quantized(model):
            return list(weight_only_fake_quantized(model))  # a second call: everything selected is prepared
        raise
    widths = [m.in_features for m in todo.values()]
    for name, module in todo.items():
        check_kernel_shape(name, module, bits, group_size, widths)
    for name, module in todo.items():
        _replace(model, name, WeightOnlyFakeQuantLinear.from_linear(module, bits, group_size))
    return list(weight_only_fake_quantized(model))


def prepare_gguf_qat(model: nn.Module, qtype: str = "Q4_0", targets: Sequence[str] | None = None,
                     exclude: Sequence[str] | None = None, skip: Sequence[str] | None = None) -> list[str]:
    """Swap the selected linears of ``model`` in place for ones fake-quantized on GGUF's ``qtype`` block grid.

    Train as usual, then :func:`~.gguf.export_gguf` (same ``qtype``) writes exactly the weights the last forward
    used. Idempotent; same selection as :func:`prepare_weight_only_qat` (``lm_head`` included: for a tied model
    llama.cpp's output projection is the token embedding, which export writes at its own ``embedding_qtype``).

    Args:
        model: a Hugging Face Llama-family causal LM (or any module).
        qtype: ``"Q8_0"``, ``"Q4_0"`` or ``"Q4_1"`` (asymmetric: a minimum per block, SmolLM2's shipped format).
        targets: fnmatch patterns to fake-quantize; None: every ``nn.Linear``.
        exclude: patterns never fake-quantized (fnmatch, ``"re:"``); None: embeddings, norms, classifier heads.
            ``skip``: its deprecated name.

    Returns:
        Names of all fake-quantized layers.

    Raises:
        ValueError: unknown ``qtype``, or a selected layer's ``in_features`` not a multiple of 32 (named).

    Example::

        prepare_gguf_qat(model, "Q4_0")
        Trainer(max_steps=200).fit(DistillationModule(student=model, teacher=teacher))
        export_gguf(model, "student.Q4_0.gguf", qtype="Q4_0", tokenizer=tokenizer)
    """
    check_gguf_grid(qtype)
    try:
        exclude = renamed("prepare_gguf_qat", "skip", skip, "exclude", exclude, None)
        todo = select_linears(model, targets, exclude)
    except ValueError:
        if weight_only_fake_quantized(model):
            return list(weight_only_fake_quantized(model))
        raise
    for name, module in todo.items():
        check_gguf_grid(qtype, module.in_features, name)
    for name, module in todo.items():
        _replace(model, name, WeightOnlyFakeQuantLinear.from_linear(module, gguf=qtype))
    return list(weight_only_fake_quantized(model))


@torch.no_grad()
def convert_weight_only_qat(model: nn.Module) -> list[str]:
    """Replace every fake-quantized layer of ``model`` in place by its packed int4 / int8 linear.

    Raises:
        ValueError: the model has no fake-quantized layers (call :func:`prepare_weight_only_qat` first).
    """
    modules = weight_only_fake_quantized(model)
    if not modules:
        raise ValueError(
            f"`model` ({type(model).__name__}) has no weight-only fake-quantized layers to convert. Call "
            f"prepare_weight_only_qat(model, ...) (and train) first, or quantize_weight_only(model) for PTQ."
        )
    gguf_layers = [n for n, m in modules.items() if getattr(m, "gguf", None)]
    if gguf_layers:
        raise ValueError(
            f"`model` layers {gguf_layers[:3]} are fake-quantized on a GGUF grid, which has no packed PyTorch form. "
            f"Write them with export_gguf(model, path, qtype=...) for llama.cpp, or prepare with "
            f"prepare_weight_only_qat(model, bits=4) for the PyTorch kernels."
        )
    for name, m in modules.items():
        new = (Int4WeightOnlyLinear.from_linear(m, m.group_size) if m.bits == 4
               else Int8WeightOnlyLinear.from_linear(m))
        _replace(model, name, new)
    return list(modules)


def strip_weight_only_qat(model: nn.Module) -> nn.Module:
    """Plain ``nn.Linear`` layers back in place of fake-quantized ones (same Parameters); returns ``model``."""
    for name, m in weight_only_fake_quantized(model).items():
        if name:
            model.set_submodule(name, m.to_linear())
    return model


__all__ = [
    "WeightOnlyFakeQuantLinear",
    "convert_weight_only_qat",
    "fake_quantize_weight",
    "gguf_fake_quantize",
    "prepare_gguf_qat",
    "prepare_weight_only_qat",
    "strip_weight_only_qat",
    "weight_only_fake_quantized",
]
