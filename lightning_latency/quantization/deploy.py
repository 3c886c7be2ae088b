"""The deployment form of a quantization-aware-trained model: the one that is genuinely fast on CPU.

Measured on this project's CPU (AMX-int8; numbers in docs/quantization.md): torchao int8 tensors run *slower* than
fp32 in eager mode and only ~×2 faster under ``torch.compile`` with inductor freezing, while PT2E static int8 through
the x86 inductor quantizer, compiled with freezing, runs the MiniLM encoder ×3–6 faster than fp32 eager. So the
default backend exports the QAT-trained float weights with ``torch.export``, quantizes the same layers QAT trained
(int8 per-channel symmetric weights, the grid QAT simulated) with static int8 activations calibrated on the example
inputs, and compiles the result with inductor freezing.
"""

from __future__ import annotations

import copy
import warnings
from collections.abc import Iterable, Mapping
from typing import Any

import torch
from torch import nn

from lightning_latency.quantization.config import Backend, QuantizationConfig, convert_base_config, parse_enum
from lightning_latency.quantization.qat import (
    convert_qat,
    converted_modules,
    fake_quantized_modules,
    is_prepared,
    strip_qat,
)
from lightning_latency.quantization.targets import select_modules

# torch 2.13's own oneDNN int8 lowering calls torch.tensor() on a tensor; harmless, but it prints twice on every
# (re)compile of a deployed model. Silenced for that torch module only.
warnings.filterwarnings("ignore", message="To copy construct from a tensor", category=UserWarning,
                        module=r"torch\._inductor\.mkldnn_lowerings")


class DeployedModel(nn.Module):
    """A compiled, frozen inference model; calls run under ``torch.no_grad`` (inductor freezing needs it).

    Shapes are static: the model was exported and compiled for the shapes of ``example_inputs``; deploy once per
    serving shape (e.g. batch 1 and batch 32 at a fixed padded sequence length).
    """

    def __init__(self, compiled: Any, reference: nn.Module, backend: str, quantized: list[str]) -> None:
        super().__init__()
        self.compiled = compiled
        self.reference = reference  # the uncompiled quantized module (eager), for accuracy checks without compiling
        self.backend = backend
        self.quantized = quantized

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        from torch._inductor import config as inductor_config

        # The patch is kept on every call so that a recompile (e.g. first call under inference_mode instead of
        # no_grad) also freezes; without freezing the x86 int8 graph is not faster than fp32.
        with torch.no_grad(), inductor_config.patch(freezing=True):
            return self.compiled(*args, **kwargs)


def _split(inputs: Any) -> tuple[tuple[Any, ...], dict[str, Any]]:
    if isinstance(inputs, Mapping):
        return (), dict(inputs)
    if isinstance(inputs, (tuple, list)):
        return tuple(inputs), {}
    return (inputs,), {}


def _check_cpu(model: nn.Module, backend: Backend) -> None:
    devices = {t.device.type for t in model.parameters()}
    if backend is Backend.X86 and devices - {"cpu"}:
        raise ValueError(
            f"`backend`='x86' (PT2E x86 inductor int8) runs on CPU only, but the model's parameters are on "
            f"{sorted(devices)}. Move the model to CPU (model.cpu()) or pass backend='torchao' for GPU deployment."
        )


def _quantized_names(model: nn.Module, config: QuantizationConfig) -> list[str]:
    names = list(fake_quantized_modules(model)) + list(converted_modules(model))
    return names or list(select_modules(model, config))  # a plain model: post-training quantization of the targets


def _x86_quantize(model: nn.Module, args: tuple, kwargs: dict, names: list[str], calibration: Iterable[Any],
                  static_activations: bool) -> nn.Module:
    import torchao.quantization.pt2e.quantizer.x86_inductor_quantizer as xiq  # also registers the x86 inductor passes
    from torchao.quantization.pt2e import allow_exported_model_train_eval
    from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_pt2e

    from lightning_latency.cpu import cpu_features

    quantizer = xiq.X86InductorQuantizer()
    # Without VNNI, oneDNN's u8 x s8 kernels sum pairs of products in int16 (vpmaddubsw), which saturates for 8-bit
    # activations: measured on tiny BERT with the AVX2 path, deployed logits moved 6x the int8 quantization error
    # away from the reference. 7-bit activations (reduce_range) cannot saturate; VNNI CPUs keep the full range.
    quantizer.set_global(xiq.get_default_x86_inductor_quantization_config(
        is_dynamic=not static_activations, reduce_range=not cpu_features().vnni))
    keep = set(names)
    for name, module in model.named_modules():
        if isinstance(module, nn.Linear) and name not in keep:  # honour the skip list QAT used (heads stay float)
            quantizer.set_module_name_qconfig(name, None)
    with torch.no_grad():
        exported = torch.export.export(model, args, kwargs=kwargs, strict=False).module()
        prepared = prepare_pt2e(exported, quantizer)
        prepared(*args, **kwargs)
        for batch in calibration:  # static activation ranges come from these batches
            b_args, b_kwargs = _split(batch)
            prepared(*b_args, **b_kwargs)
        quantized = convert_pt2e(prepared)
    # Exported modules refuse .eval()/.train(); callers (and latency tools) call .eval() on whatever they get.
    return allow_exported_model_train_eval(quantized)


def deploy(
    model: nn.Module,
    example_inputs: Any,
    config: QuantizationConfig | None = None,
    *,
    backend: Backend | str | None = None,
    calibration: Iterable[Any] = (),
    static_activations: bool = True,
    compile: bool = True,
) -> DeployedModel:
    """Build the fast inference form of ``model`` (fake-quantized, converted, or plain float for PTQ).

    ``model`` itself is never modified: a deep copy is stripped of fake quantization, quantized and compiled.

    Args:
        model: a model after :func:`prepare_qat` (and training), after :func:`convert_qat`, or a plain float model
            (then the layers selected by ``config`` are post-training quantized).
        example_inputs: what the model is called with: a dict of keyword tensors (Hugging Face:
            ``{"input_ids": (batch, seq), "attention_mask": (batch, seq)}``), a tuple of positional tensors or one
            tensor. Fixes the compiled shapes, and is the first calibration batch.
        config: the :class:`QuantizationConfig` used for QAT (for ``backend`` and the targets of a plain model).
        backend: overrides ``config.backend``: ``"x86"`` (PT2E x86 inductor int8, CPU) or ``"torchao"``.
        calibration: more batches (same form as ``example_inputs``) to calibrate the static activation ranges
            (``x86`` with ``static_activations``); a few real batches give better ranges than one.
        static_activations: ``x86`` only: static per-tensor int8 activations (fastest) or dynamic ones.
        compile: compile with inductor freezing (the deployment form); False returns the eager quantized module
            (reference numerics, slow).

    Returns:
        A :class:`DeployedModel`; call it like the original model (its output type is preserved).

    Raises:
        ValueError: ``backend`` unknown, or ``x86`` with a model on a non-CPU device.

    Example::

        trainer = Trainer(callbacks=[QuantizationAwareTraining(convert_on_fit_end=False)])
        trainer.fit(module)
        fast = deploy(module.model, {"input_ids": ids, "attention_mask": mask}, calibration=val_batches[:8])
        logits = fast(input_ids=ids, attention_mask=mask).logits
    """
    config = config or QuantizationConfig()
    backend = parse_enum(Backend, backend if backend is not None else config.backend, "backend")
    _check_cpu(model, backend)
    if backend is Backend.X86 and config.scheme.uses_groups:
        raise ValueError(
            f"`backend`='x86' deploys int8 per-channel weights, but `config.scheme`={config.scheme.value!r} trained an "
            f"int4 grid. Pass backend='torchao'."
        )
    args, kwargs = _split(example_inputs)
    names = _quantized_names(model, config)
    work = copy.deepcopy(model).eval()
    if backend is Backend.X86:
        quantized = _x86_quantize(strip_qat(work), args, kwargs, names, calibration, static_activations)
    else:
        if is_prepared(work):
            convert_qat(work, config)
        elif not converted_modules(work):
            from torchao.quantization import quantize_

            quantize_(work, convert_base_config(config), filter_fn=lambda m, n: n in set(names))
        quantized = work
    compiled = torch.compile(quantized) if compile else quantized
    deployed = DeployedModel(compiled, quantized, backend.value, names)
    # Compile now, at the first call, with freezing (constant-folds the int8 weights and prepacks them for oneDNN;
    # it needs no_grad calls, see DeployedModel.forward). In torch 2.13 `torch.compile(options={"freezing": True})`
    # fails on the x86 int8 graph (fake-tensor `onednn.qlinear_prepack`); patching the inductor config works.
    deployed(*args, **kwargs)
    return deployed


__all__ = ["DeployedModel", "deploy"]
