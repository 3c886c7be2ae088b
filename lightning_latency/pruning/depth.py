"""Depth pruning: remove whole transformer layers, keeping the name of every other layer.

Removing a layer cuts its weights *and* its fixed per-layer cost (norms, residual adds, kernel launches, Python per
module), which a narrower layer keeps: at batch 1 the fixed cost is much of the time, so width pruning alone has a
floor that depth pruning goes below. A removed layer is replaced in its ``nn.ModuleList`` by :class:`SkippedLayer`,
which hands its input hidden states on unchanged (the residual stream without that layer's updates). The list keeps
its length, so every other layer keeps its name: plans, checkpoints and logs that name layers stay valid, and a
checkpoint whose state dict has no weights for a layer is loaded by skipping that layer first
(:func:`restore_skips`, called by ``reshape_to_state_dict`` and so by resume and ``load_pruned``).

The first layer of a stack is never removed: a decoder's KV cache reads the sequence length from layer 0.
The Hugging Face config keeps ``num_hidden_layers``; the skipped layers hold no weights and no KV entries.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn


class SkippedLayer(nn.Module):
    """A removed transformer layer: returns the hidden states it is given (first argument) unchanged."""

    def __init__(self, was: str = "") -> None:
        super().__init__()
        self.was = was

    def forward(self, hidden_states: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        return hidden_states

    def extra_repr(self) -> str:
        return f"was={self.was}" if self.was else ""


def find_layers(model: nn.Module) -> dict[str, tuple[nn.ModuleList, int]]:
    """``{layer name: (its ModuleList, index)}`` for every layer holding an attention or MLP block, skipped ones
    included, in order. Only the outermost stack counts (a layer's own lists, e.g. MoE experts, are not layers)."""
    from lightning_latency.pruning.structured import find_blocks  # lazy: torch-pruning is slow to import

    attns, mlps = find_blocks(model, convert=False)
    blocks = [b.name for b in attns] + [m.name for m in mlps]
    layers: dict[str, tuple[nn.ModuleList, int]] = {}
    for name, module in model.named_modules():
        if not isinstance(module, nn.ModuleList) or any(name.startswith(f"{layer}.") for layer in layers):
            continue
        for i, child in enumerate(module):
            child_name = f"{name}.{i}" if name else str(i)
            if isinstance(child, SkippedLayer) or any(b == child_name or b.startswith(f"{child_name}.")
                                                       for b in blocks):
                layers[child_name] = (module, i)
    return layers


def layer_of(block: str, layers: dict[str, Any]) -> str | None:
    """The layer holding block ``block`` (a name from ``find_blocks``), or None."""
    found = [name for name in layers if block == name or block.startswith(f"{name}.")]
    return max(found, key=len) if found else None


def removable_layers(model: nn.Module) -> list[str]:
    """Layers that may be removed: present (not skipped yet) and not the first of their stack."""
    return [name for name, (stack, i) in find_layers(model).items()
            if i > 0 and not isinstance(stack[i], SkippedLayer)]


def skipped_layers(model: nn.Module) -> list[str]:
    return [name for name, (stack, i) in find_layers(model).items() if isinstance(stack[i], SkippedLayer)]


def skip_layer(model: nn.Module, name: str) -> bool:
    """Replace layer ``name`` by a :class:`SkippedLayer`; False if it was skipped already.

    Raises:
        ValueError: ``name`` is not a layer of ``model``, or is the first of its stack.
    """
    layers = find_layers(model)
    if name not in layers:
        raise ValueError(f"`{name}` is not a transformer layer of {type(model).__name__}; layers: "
                         f"{list(layers)[:4]}…")
    stack, i = layers[name]
    if isinstance(stack[i], SkippedLayer):
        return False
    if i == 0:
        raise ValueError(f"`{name}` is the first layer of its stack, which is never removed (a decoder's KV cache "
                         "reads the sequence length from it).")
    stack[i] = SkippedLayer(type(stack[i]).__name__)
    return True


def restore_skips(model: nn.Module, state_dict: dict[str, Any], prefix: str = "") -> bool:
    """Skip every layer of ``model`` that has weights while ``state_dict`` has none for it (a depth-pruned
    checkpoint loaded into a freshly built model). Returns True if anything changed."""
    if not any(k.startswith(prefix) for k in state_dict):
        return False
    changed = False
    for name, (stack, i) in find_layers(model).items():
        if isinstance(stack[i], SkippedLayer) or not any(True for _ in stack[i].parameters()):
            continue
        if not any(k.startswith(f"{prefix}{name}.") for k in state_dict):
            stack[i] = SkippedLayer(type(stack[i]).__name__)
            changed = True
    return changed



@torch.no_grad()
def block_importance(model: nn.Module, calibration: Any) -> dict[str, float]:
    """``{layer: 1 - mean cos(input, output)}`` of every present layer on ``calibration`` batches (dicts of model
    keyword inputs): how much each layer changes the residual stream (ShortGPT's Block Influence; Minitron ranks
    depth this way). Near 0: the layer hands its input on almost unchanged and is the cheapest to remove.

    Raises:
        ValueError: empty ``calibration``, or a model with no transformer layers.
    """
    batches = list(calibration)
    if not batches:
        raise ValueError("`calibration` is empty: pass a few batches of model inputs (e.g. 4 training batches).")
    layers = {name: stack[i] for name, (stack, i) in find_layers(model).items()
              if not isinstance(stack[i], SkippedLayer)}
    if not layers:
        raise ValueError(f"{type(model).__name__} has no transformer layers that depth pruning recognises.")
    sums = dict.fromkeys(layers, 0.0)
    counts = dict.fromkeys(layers, 0)

    def hook(name: str) -> Any:
        def record(module: nn.Module, args: tuple, kwargs: dict, output: Any) -> None:
            x = args[0] if args else kwargs["hidden_states"]
            y = output[0] if isinstance(output, (tuple, list)) else output
            cos = nn.functional.cosine_similarity(x.float().flatten(0, -2), y.float().flatten(0, -2), dim=-1)
            sums[name] += float((1 - cos).sum())
            counts[name] += cos.numel()
        return record

    from lightning_latency.pruning.calibration import forward_calibration

    forward_calibration(model, batches, [layer.register_forward_hook(hook(name), with_kwargs=True)
                                         for name, layer in layers.items()])
    return {name: sums[name] / max(counts[name], 1) for name in layers}


def prune_depth(model: nn.Module, layers: int, calibration: Any) -> list[str]:
    """Remove the ``layers`` least important layers (:func:`block_importance`; the first of a stack stays).

    Returns the removed layers' names, least important first.

    Raises:
        ValueError: ``layers`` not an int in ``[0, removable]``, or empty ``calibration``.
    """
    removable = removable_layers(model)
    if isinstance(layers, bool) or not isinstance(layers, int) or not 0 <= layers <= len(removable):
        raise ValueError(f"`layers` must be an int from 0 to {len(removable)} (every layer but the first may go), "
                         f"got {layers!r}.")
    if layers == 0:
        return []
    scores = block_importance(model, calibration)
    order = sorted(removable, key=lambda name: (scores[name], name))[:layers]
    for name in order:
        skip_layer(model, name)
    return order


__all__ = ["SkippedLayer", "block_importance", "find_layers", "layer_of", "prune_depth", "removable_layers",
           "restore_skips", "skip_layer", "skipped_layers"]
