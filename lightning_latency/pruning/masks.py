"""Masked pruning: unstructured (global or per layer) and N:M semi-structured masks on linear weights.

Masks are boolean tensors (``True`` = keep) held outside the model, so the model's ``state_dict`` keeps its plain
keys (zeros are baked into the weights) and a Lightning checkpoint of the model loads into a fresh model as is.
A dense kernel multiplies zeros as fast as any other number: masks make a model smaller when compressed, not
faster on CPU.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from lightning_latency.pruning.config import PruningConfig, PruningMode
from lightning_latency.pruning.targets import input_dim, resolve_targets


def _scores(name: str, weight: torch.Tensor, config: PruningConfig) -> torch.Tensor:
    if config.importance in ("l1", "l2"):
        return weight.detach().abs().float()
    if config.importance == "taylor":
        if weight.grad is None:
            raise RuntimeError(
                f"importance='taylor' needs gradients on `{name}.weight`: call loss.backward() before prune_step."
            )
        return (weight.detach() * weight.grad.detach()).abs().float()
    check_importance(config)
    scores = config.importance(name, weight)
    if not isinstance(scores, torch.Tensor) or scores.shape != weight.shape:
        raise ValueError(
            f"`importance` callable must return a tensor shaped like the weight {tuple(weight.shape)} for `{name}`, "
            f"got {getattr(scores, 'shape', type(scores).__name__)}."
        )
    return scores.detach().float()


def check_importance(config: PruningConfig) -> None:
    """Raise ValueError for an importance masked modes cannot use (a torch-pruning group importance)."""
    from lightning_latency.pruning.activation import ActivationImportance

    if config.importance == "activation" or isinstance(config.importance, ActivationImportance):
        raise ValueError(f"`importance`='activation' scores whole heads and neurons (structured mode); for "
                         f"mode={config.mode.value!r} pass 'l1', 'l2', 'taylor' or a callable (name, weight) -> scores.")
    if type(config.importance).__module__.startswith("torch_pruning"):
        raise ValueError(
            f"`importance`={type(config.importance).__name__}() scores torch-pruning groups, which only structured "
            f"mode builds. For mode={config.mode.value!r} pass 'l1', 'l2', 'taylor' or a callable (name, weight) -> "
            f"scores."
        )


def check_nm(model: nn.Module, config: PruningConfig) -> None:
    """Raise ValueError, naming the layer, when an N:M target's input size is not a multiple of ``m``."""
    if config.mode is not PruningMode.NM:
        return
    for name, module in resolve_targets(model, config):
        _nm_rows(name, module, module.weight, config.m)


def _nm_rows(name: str, module: nn.Module, scores: torch.Tensor, m: int) -> torch.Tensor:
    rows = scores.transpose(0, 1) if input_dim(module) == 0 else scores  # (out, in)
    if rows.dim() != 2 or rows.shape[1] % m:
        raise ValueError(
            f"N:M pruning needs the input size of `{name}` {tuple(module.weight.shape)} to be divisible by m={m}; "
            f"exclude it with exclude=[{name!r}] or pick another m."
        )
    return rows


def _keep_topk(scores: torch.Tensor, n_keep: int) -> torch.Tensor:
    """Mask keeping exactly the ``n_keep`` highest scores; ties at the threshold go to the lowest indices, so every
    rank and every run picks the same weights. ``kthvalue`` is several times faster than a full sort here."""
    flat = scores.flatten()
    n_prune = flat.numel() - n_keep
    if n_prune <= 0:
        return torch.ones_like(scores, dtype=torch.bool)
    if n_keep <= 0:
        return torch.zeros_like(scores, dtype=torch.bool)
    threshold = flat.kthvalue(n_prune).values
    mask = flat > threshold
    missing = n_keep - int(mask.sum())
    if missing > 0:
        mask[(flat == threshold).nonzero().flatten()[:missing]] = True
    return mask.view_as(scores)


def unstructured_masks(
    model: nn.Module, config: PruningConfig, sparsity: float, previous: dict[str, torch.Tensor] | None = None
) -> dict[str, torch.Tensor]:
    """Masks with ``sparsity`` of the targeted weights zeroed (exact count per layer, or one global threshold).

    Weights masked before stay masked (their score is forced to the minimum), so iterative masks are nested.
    """
    targets = resolve_targets(model, config)
    previous = previous or {}
    scores: dict[str, torch.Tensor] = {}
    for name, module in targets:
        s = _scores(name, module.weight, config)
        if name in previous:
            s = torch.where(previous[name].to(s.device), s, torch.full_like(s, -1.0))
        scores[name] = s
    cap = config.max_layer_sparsity
    masks: dict[str, torch.Tensor] = {}
    if config.scope == "global":
        flat = torch.cat([s.flatten() for s in scores.values()])
        n_prune = round(sparsity * flat.numel())
        keep_global = _keep_topk(flat, flat.numel() - n_prune)
        offset = 0
        for name, s in scores.items():
            m = keep_global[offset: offset + s.numel()].view_as(s)
            offset += s.numel()
            min_keep = math.ceil(s.numel() * (1.0 - cap) - 1e-9)
            masks[name] = m if int(m.sum()) >= min_keep else _keep_topk(s, min_keep)
    else:
        layer_sparsity = min(sparsity, cap)
        for name, s in scores.items():
            masks[name] = _keep_topk(s, s.numel() - round(layer_sparsity * s.numel()))
    return masks


def nm_masks(model: nn.Module, config: PruningConfig) -> dict[str, torch.Tensor]:
    """Keep the ``n`` largest of every ``m`` consecutive input weights of each output row (e.g. 2:4)."""
    n, m = config.n, config.m
    masks: dict[str, torch.Tensor] = {}
    for name, module in resolve_targets(model, config):
        s = _scores(name, module.weight, config)
        dim = input_dim(module)
        rows = _nm_rows(name, module, s, m)
        groups = rows.reshape(-1, m)
        idx = groups.topk(n, dim=1).indices
        keep = torch.zeros_like(groups, dtype=torch.bool).scatter_(1, idx, True).view_as(rows)
        masks[name] = keep.transpose(0, 1).contiguous() if dim == 0 else keep
    return masks


def compute_masks(model: nn.Module, config: PruningConfig, sparsity: float,
                  previous: dict[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
    if config.mode is PruningMode.NM:
        return nm_masks(model, config)
    return unstructured_masks(model, config, sparsity, previous)


@torch.no_grad()
def apply_masks(model: nn.Module, masks: dict[str, torch.Tensor]) -> None:
    """Zero every masked weight in place (call after each optimizer step so pruned weights stay zero)."""
    modules = dict(model.named_modules())
    for name, mask in masks.items():
        weight = modules[name].weight
        if mask.device != weight.device:
            mask = mask.to(weight.device)
            masks[name] = mask
        weight.mul_(mask)


class MaskApplier:
    """Re-applies fixed masks fast: one fused ``torch._foreach_mul_`` over all masked weights.

    Keeps a copy of each mask in its weight's dtype (memory: one extra copy of the masked weights) because a
    per-layer ``weight.mul_(bool_mask)`` re-casts the mask on every call and was ~3x slower on CPU (torch 2.13).
    Build a new one whenever the masks or the parameters change.
    """

    def __init__(self, model: nn.Module, masks: dict[str, torch.Tensor]) -> None:
        modules = dict(model.named_modules())
        self.weights = [modules[name].weight for name in masks]
        self.factors = [m.to(device=w.device, dtype=w.dtype) for m, w in zip(masks.values(), self.weights)]

    @torch.no_grad()
    def __call__(self) -> None:
        if self.weights:
            torch._foreach_mul_([w.data for w in self.weights], self.factors)


def mask_sparsity(masks: dict[str, torch.Tensor]) -> float:
    total = sum(m.numel() for m in masks.values())
    return 0.0 if total == 0 else 1.0 - sum(int(m.sum()) for m in masks.values()) / total
