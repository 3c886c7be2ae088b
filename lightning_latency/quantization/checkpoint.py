"""Converted weights in checkpoints that Lightning (and a plain ``torch.load``) can load.

Lightning loads checkpoints with ``torch.load(map_location=<callable>)``, and torch 2.13 refuses a callable
``map_location`` for wrapper tensor subclasses such as torchao's ``Int8Tensor`` ("Callable map_location not supported
with _rebuild_wrapper_subclass"). So a converted weight is saved as two plain parts: its dequantized float value in
the state dict (a model without QAT still loads it, as an fp32 model with the quantized weights) and its exact inner
tensors (int8 data, scales, …), which :class:`~lightning_latency.quantization.controller.QATController` keeps in its
reserved state-dict entry. Loading converts the fresh model the same way and copies the inner tensors back, so the
restored model is bit-identical to the saved one.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from lightning_latency.quantization.qat import _is_quantized_tensor


def pack_quantized_state(state_dict: dict[str, Any], prefix: str = "") -> dict[str, dict[str, torch.Tensor]]:
    """Replace the torchao quantized tensors under ``prefix`` in ``state_dict`` (in place) by float values.

    Returns their inner tensors, keyed by the state-dict key without ``prefix``.
    """
    packed: dict[str, dict[str, torch.Tensor]] = {}
    for key, value in list(state_dict.items()):
        if not key.startswith(prefix) or not _is_quantized_tensor(value):
            continue
        names, _ = value.__tensor_flatten__()
        packed[key[len(prefix):]] = {n: getattr(value, n).detach().clone() for n in names
                                     if getattr(value, n, None) is not None}
        state_dict[key] = value.dequantize().detach()
    return packed


@torch.no_grad()
def unpack_quantized_state(model: nn.Module, state_dict: dict[str, Any], packed: dict[str, dict[str, torch.Tensor]],
                           prefix: str = "") -> None:
    """Copy packed inner tensors (keys relative to ``prefix``) into ``model``'s converted weights; point
    ``state_dict[prefix + key]`` at those weights.

    ``model`` must already be converted with the same scheme (its quantized weights give the tensor layout).
    """
    for key, inner in packed.items():
        module_name, _, param = key.rpartition(".")
        weight = getattr(model.get_submodule(module_name), param)
        if not _is_quantized_tensor(weight):
            raise ValueError(
                f"Checkpoint entry {prefix + key!r} holds a quantized weight but the model's {module_name!r} is not "
                f"converted. Load it with the same QuantizationAwareTraining(scheme=...) callback (or a QATController "
                f"with the same QuantizationConfig) so the layer is converted before the weights load."
            )
        for name, tensor in inner.items():
            getattr(weight, name).copy_(tensor)
        state_dict[prefix + key] = weight  # the load then copies the weight onto itself


__all__ = ["pack_quantized_state", "unpack_quantized_state"]
