"""The QAT verbs on a bare ``nn.Module``: prepare (fake quantize), freeze ranges, convert, undo, measure weight error.

Built on torchao's ``QATConfig`` (the maintained successor of ``torch.ao.quantization``): preparing swaps each
targeted ``nn.Linear`` for a ``FakeQuantizedLinear`` that *shares the same weight and bias Parameters*, so optimizers
built before the swap keep training the right tensors and the state-dict keys do not change. Nothing wraps the
model's ``forward``, so Hugging Face models called with keyword inputs work unchanged.
"""

from __future__ import annotations

import copy
from typing import Any

import torch
from torch import nn

from lightning_latency.quantization.config import QuantizationConfig, Scheme
from lightning_latency.quantization.presets import _is_torchao_config, convert_config, prepare_config
from lightning_latency.quantization.targets import check_group_size, select_modules


def is_fake_quantized(module: nn.Module) -> bool:
    """True for torchao ``FakeQuantizedLinear`` / ``FakeQuantizedEmbedding``."""
    return isinstance(getattr(module, "weight_fake_quantizer", None), nn.Module)


def _is_quantized_tensor(t: Any) -> bool:
    from torchao.utils import TorchAOBaseTensor

    return isinstance(t, TorchAOBaseTensor)


def fake_quantized_modules(model: nn.Module) -> dict[str, nn.Module]:
    """Fake-quantized modules of ``model`` by name."""
    return {n: m for n, m in model.named_modules() if is_fake_quantized(m)}


def converted_modules(model: nn.Module) -> dict[str, nn.Module]:
    """Modules whose ``weight`` is a torchao quantized tensor (the result of :func:`convert_qat`)."""
    return {n: m for n, m in model.named_modules() if _is_quantized_tensor(getattr(m, "weight", None))}


def is_prepared(model: nn.Module) -> bool:
    return bool(fake_quantized_modules(model))


def is_converted(model: nn.Module) -> bool:
    return bool(converted_modules(model))


class FrozenWeightFakeQuantizer(nn.Module):
    """A weight fake quantizer on a fixed grid: what :func:`freeze_ranges` puts in place of torchao's quantizer.

    torchao's ``IntxFakeQuantizer`` recomputes the grid from the weight at every forward. This module keeps the grid
    it last computed as buffers (``scale``, ``zero_point``: saved in checkpoints, same shapes) and fake-quantizes with
    PyTorch's ``torch.fake_quantize_per_channel_affine`` (one row per group; a straight-through estimator that passes
    no gradient to clipped values) — the same values torchao computes for that grid (tested bit for bit). It keeps
    the torchao quantizer's ``config`` (torchao's convert step reads it) and ``enabled`` flag.

    Args:
        config: the torchao ``IntxFakeQuantizeConfig`` of the quantizer it replaces (per-channel or per-group).
        scale: ``(out_features, groups)`` scales; ``zero_point``: the same shape, int32.
    """

    def __init__(self, config: Any, scale: torch.Tensor, zero_point: torch.Tensor) -> None:
        super().__init__()
        bits = _BIT_WIDTH[config.dtype]
        self.config, self.enabled = config, True
        self.quant_min, self.quant_max = -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
        self.register_buffer("scale", scale)
        self.register_buffer("zero_point", zero_point)

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        if not self.enabled:
            return weight
        group = weight.shape[-1] // self.scale.shape[-1]
        rows = weight.reshape(-1, group)
        out = torch.fake_quantize_per_channel_affine(rows, self.scale.reshape(-1).float(),
                                                     self.zero_point.reshape(-1).to(torch.int32), 0,
                                                     self.quant_min, self.quant_max)
        return out.reshape_as(weight).to(weight.dtype)


_BIT_WIDTH = {getattr(torch, f"int{b}"): b for b in range(2, 9)}


def is_frozen(model: nn.Module) -> bool:
    """True when the weight fake-quantization ranges have been frozen by :func:`freeze_ranges`."""
    return any(isinstance(m.weight_fake_quantizer, FrozenWeightFakeQuantizer)
               for m in fake_quantized_modules(model).values())


def _as_config(config: Any) -> QuantizationConfig:
    """``config`` as a :class:`QuantizationConfig`: None gives the default, a scheme name or torchao config its own."""
    if config is None:
        return QuantizationConfig()
    if isinstance(config, (str, Scheme)) or _is_torchao_config(config):
        return QuantizationConfig(scheme=config)
    if not isinstance(config, QuantizationConfig):
        raise TypeError(f"`config` must be a QuantizationConfig, a scheme name such as 'int8_dynamic', a torchao "
                        f"AOBaseConfig or None, got {type(config).__name__} {config!r:.80}. E.g. "
                        f"QuantizationConfig(scheme='int8_dynamic').")
    return config


def _torchao_prepare(model: nn.Module, config: QuantizationConfig, names: set[str], embedding: bool = False) -> None:
    """Fake-quantize the modules ``names`` of ``model``; a torchao config QATConfig cannot prepare names the fix."""
    from torchao.quantization import quantize_

    kind = nn.Embedding if embedding else nn.Linear
    try:
        quantize_(model, prepare_config(config, embedding), filter_fn=lambda m, n: n in names and isinstance(m, kind))
    except (ValueError, AssertionError, NotImplementedError) as err:
        if config.preset is not None:
            raise
        raise ValueError(
            f"`scheme`={config.scheme_name} cannot be fake-quantized by torchao's QATConfig(base_config, "
            f"step='prepare') ({err}). Pass a config it infers (IntxWeightOnlyConfig, "
            f"Int8DynamicActivationIntxWeightConfig, Int4WeightOnlyConfig, Float8DynamicActivationFloat8WeightConfig, "
            f"or per-row Int8DynamicActivationInt8WeightConfig / Int8WeightOnlyConfig), or a scheme name such as "
            f"'int8_dynamic'."
        ) from err


def check_qat(model: nn.Module, config: QuantizationConfig | None = None, freeze: bool = False) -> dict[str, nn.Module]:
    """Everything :func:`prepare_qat` (and, with ``freeze``, :func:`freeze_ranges`) would refuse, found without
    changing ``model``; returns the selected modules.

    Raises:
        ValueError: nothing matched; a group size that does not divide a layer; a torchao config that
            ``QATConfig`` cannot prepare or whose ranges cannot be frozen (tried on a copy of one selected layer).
    """
    config = _as_config(config)
    selected = select_modules(model, config)
    check_group_size(selected, config)
    if config.preset is None:
        probe = nn.ModuleDict({"probe": copy.deepcopy(next(iter(selected.values())))})
        _torchao_prepare(probe, config, {"probe"})
        if freeze:
            freeze_ranges(probe)
    return selected


def prepare_qat(model: nn.Module, config: QuantizationConfig | None = None) -> list[str]:
    """Swap the targeted linears (and embeddings) of ``model`` in place for fake-quantized versions.

    Idempotent: modules that are already fake-quantized are left alone, so calling it twice (a second ``fit``)
    changes nothing. Parameters are shared with the originals (no copies): optimizers stay valid.

    Args:
        model: any ``nn.Module``; a Hugging Face model works as is.
        config: what and how to quantize; default ``QuantizationConfig()`` (int8 dynamic, default skip list).

    Returns:
        Names of the fake-quantized modules, in model order.

    Raises:
        ValueError: nothing matched ``targets``; ``group_size`` does not divide a layer; the model is already
            converted (call :func:`unconvert_qat` first).

    Example::

        prepare_qat(model, QuantizationConfig(scheme="int8_dynamic"))  # or prepare_qat(model, "int8_dynamic")
        train(model)
        convert_qat(model)
    """
    config = _as_config(config)
    if is_converted(model):
        raise ValueError(
            f"`model` is already converted to quantized weights ({len(converted_modules(model))} modules); it cannot "
            f"be prepared for training again. Call unconvert_qat(model) first (weights become their dequantized "
            f"values)."
        )
    selected = select_modules(model, config)
    check_group_size(selected, config)
    todo = {n for n, m in selected.items() if not is_fake_quantized(m)}
    if todo:
        _torchao_prepare(model, config, todo)
        if config.include_embeddings:
            _torchao_prepare(model, config, todo, embedding=True)
    return list(selected)


@torch.no_grad()
def freeze_ranges(model: nn.Module) -> list[str]:
    """Fix the weight fake-quantization scales/zero points at their current values (per module).

    Until frozen, torchao recomputes each weight's quantization grid at every forward; frozen, the last steps
    fine-tune the weights against a fixed grid (as observers are frozen in classic QAT). Each torchao weight
    quantizer is replaced by a :class:`FrozenWeightFakeQuantizer` holding that grid as buffers, so checkpoints carry
    it (``…weight_fake_quantizer.scale`` / ``.zero_point``); torchao's own quantizer objects are not edited.
    Activation ranges are per-token dynamic by design and stay dynamic.

    Returns:
        Names of the modules frozen by this call.

    Raises:
        ValueError: a weight quantizer that is not integer per-channel / per-group (e.g. a float8 torchao config).
    """
    from torchao.quantization.granularity import PerAxis, PerGroup
    from torchao.quantization.quant_primitives import ZeroPointDomain

    frozen = []
    for name, module in fake_quantized_modules(model).items():
        q = module.weight_fake_quantizer
        if isinstance(q, FrozenWeightFakeQuantizer):
            continue
        config = getattr(q, "config", None)
        if (getattr(config, "dtype", None) not in _BIT_WIDTH or config.range_learning
                or config.zero_point_domain is not ZeroPointDomain.INT
                or not isinstance(getattr(config, "granularity", None), (PerAxis, PerGroup))):
            raise ValueError(
                f"`freeze_step`: the weight fake quantizer of {name!r} ({type(q).__name__}, {config!r:.100}) is not an "
                f"integer per-channel / per-group one, whose grid freeze_ranges can fix. Pass freeze_step=None, or an "
                f"integer scheme (a preset name, IntxWeightOnlyConfig, Int8DynamicActivationIntxWeightConfig).")
        q(module.weight)  # torchao computes the grid of the current weight into its public `scale` / `zero_point`
        module.weight_fake_quantizer = FrozenWeightFakeQuantizer(config, q.scale.detach().clone(),
                                                                 q.zero_point.detach().clone())
        frozen.append(name)
    return frozen


def _snap_frozen_weights(model: nn.Module) -> None:
    """Write the frozen-grid fake-quantized values into frozen weights, so converting keeps the frozen clipping."""
    with torch.no_grad():
        for module in fake_quantized_modules(model).values():
            q = module.weight_fake_quantizer
            if isinstance(q, FrozenWeightFakeQuantizer):
                module.weight.copy_(q(module.weight))


def convert_qat(model: nn.Module, config: QuantizationConfig | None = None) -> list[str]:
    """Replace every fake-quantized module of ``model`` in place by a plain module with real quantized weights.

    Uses torchao ``QATConfig(base_config, step="convert")``; weights become torchao quantized tensors (e.g.
    ``Int8Tensor``) that load into a model converted the same way. For the fast CPU form, pass the result (or the
    still fake-quantized model) to :func:`~lightning_latency.quantization.deploy`.

    Returns:
        Names of the converted modules.

    Raises:
        ValueError: the model has no fake-quantized modules (call :func:`prepare_qat` first).
    """
    from torchao.quantization import quantize_

    config = _as_config(config)
    modules = fake_quantized_modules(model)
    if not modules:
        raise ValueError(
            f"`model` ({type(model).__name__}) has no fake-quantized modules to convert. "
            f"Call prepare_qat(model, config) (and train) before convert_qat."
        )
    _snap_frozen_weights(model)
    linears = {n for n, m in modules.items() if isinstance(m, nn.Linear)}
    embeddings = set(modules) - linears
    quantize_(model, convert_config(config), filter_fn=lambda m, n: n in linears)
    if embeddings:
        quantize_(model, convert_config(config, embedding=True), filter_fn=lambda m, n: n in embeddings)
    return sorted(modules, key=list(dict(model.named_modules())).index)


def unconvert_qat(model: nn.Module) -> list[str]:
    """Turn converted quantized weights back into float Parameters (their dequantized values), in place.

    Used to train a converted model again (a second ``fit``): the model computes the same function, but the
    float precision below the quantization grid that the fp32 master weights had is gone.
    """
    names = []
    for name, module in converted_modules(model).items():
        module.weight = nn.Parameter(module.weight.dequantize().detach().clone(), requires_grad=True)
        names.append(name)
    return names


def strip_qat(model: nn.Module) -> nn.Module:
    """Plain float modules in place of fake-quantized or converted ones (same weights); returns ``model``."""
    unconvert_qat(model)
    for name, module in list(fake_quantized_modules(model).items()):
        if name:  # a bare fake-quantized layer passed as `model` cannot replace itself
            model.set_submodule(name, module.to_linear() if isinstance(module, nn.Linear) else module.to_embedding())
    return model


@torch.no_grad()
def weight_error(model: nn.Module) -> dict[str, float]:
    """Relative quantization error of each fake-quantized weight: ``‖Q(W) − W‖_F / ‖W‖_F``.

    Computed with each module's own fake quantizer (frozen grid if frozen), so it is exactly the weight error the
    training forward sees. Empty when the model is not prepared.
    """
    errors: dict[str, float] = {}
    for name, module in fake_quantized_modules(model).items():
        w = module.weight.detach()
        q = module.weight_fake_quantizer
        enabled, q.enabled = q.enabled, True
        try:
            fq = q(w)
        finally:
            q.enabled = enabled
        errors[name] = float((fq - w).float().norm() / w.float().norm().clamp_min(1e-12))
    return errors


def weight_qparams(model: nn.Module) -> dict[str, torch.Tensor]:
    """Current weight quantization scales per fake-quantized module (what DDP ranks must agree on)."""
    out = {}
    with torch.no_grad():
        for name, module in fake_quantized_modules(model).items():
            q = module.weight_fake_quantizer
            q(module.weight)
            out[name] = q.scale.detach().clone()
    return out


__all__ = [
    "FrozenWeightFakeQuantizer",
    "Scheme",
    "check_qat",
    "convert_qat",
    "converted_modules",
    "fake_quantized_modules",
    "freeze_ranges",
    "is_converted",
    "is_frozen",
    "is_prepared",
    "prepare_qat",
    "strip_qat",
    "unconvert_qat",
    "weight_error",
    "weight_qparams",
]
