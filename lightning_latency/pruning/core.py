"""The pruning verb: one step of pruning on any ``nn.Module``, no Trainer needed."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from lightning_latency.pruning.config import PruningConfig, PruningMode, check_sparsity
from lightning_latency.pruning.masks import apply_masks, compute_masks, mask_sparsity
from lightning_latency.pruning.structured import original_structure, prune_structured, structure


@dataclass
class PruningResult:
    """What a pruning step did.

    Attributes:
        sparsity: achieved sparsity: fraction of targeted weights zeroed (masked modes) or of the original
            heads + neurons removed (structured).
        masks: ``{module name: bool tensor shaped like its weight}`` (``True`` = kept); empty for structured mode.
            Re-apply with :func:`apply_masks` after every optimizer step.
        structure: ``{block name: {"heads", "kv_heads", "head_dim"} / {"neurons"}}`` after the step (structured).
    """

    sparsity: float
    masks: dict[str, torch.Tensor] = field(default_factory=dict)
    structure: dict[str, dict[str, int]] = field(default_factory=dict)


def prune_step(model: nn.Module, config: PruningConfig, sparsity: float,
               masks: dict[str, torch.Tensor] | None = None) -> PruningResult:
    """Prune ``model`` in place to ``sparsity`` (a fraction of the ORIGINAL model, not of what is left).

    Args:
        model: any ``nn.Module`` (structured mode: a Hugging Face BERT-, Llama- or GPT-2-family model, or a module
            containing one, e.g. a LightningModule).
        config: what and how to prune (:class:`PruningConfig`).
        sparsity: target sparsity in [0, 1). Calling again with a higher value prunes further; steps are nested.
        masks: masks returned by the previous step (masked modes), so pruned weights stay pruned.

    Returns:
        A :class:`PruningResult`.

    Raises:
        ValueError: bad ``sparsity``, targets matching nothing, or (structured) a model with no supported blocks.

    Example::

        model = AutoModel.from_pretrained(path)
        prune_step(model, PruningConfig(mode="structured"), 0.5)  # half the heads and MLP neurons, one shot
    """
    sparsity = check_sparsity(sparsity)
    if not isinstance(config, PruningConfig):
        raise ValueError(f"`config` must be a PruningConfig, got {type(config).__name__}.")
    if config.mode is PruningMode.STRUCTURED:
        shapes = prune_structured(model, config, sparsity)
        return PruningResult(structured_sparsity(shapes, original_structure(model)), structure=shapes)
    new_masks = compute_masks(model, config, sparsity, masks)
    apply_masks(model, new_masks)
    return PruningResult(mask_sparsity(new_masks), masks=new_masks)


def structured_sparsity(shapes: dict[str, dict[str, int]], original: dict[str, dict[str, int]]) -> float:
    """Fraction of the original heads + neurons that were removed."""
    before = after = 0
    for name, now in shapes.items():
        orig = original.get(name, now)
        for key in ("heads", "neurons"):
            if key in now:
                before += orig.get(key, now[key])
                after += now[key]
    return 0.0 if before == 0 else 1.0 - after / before


def model_counts(model: nn.Module) -> tuple[int, int]:
    """``(parameters, non-zero parameters)`` of ``model``."""
    total = nonzero = 0
    for p in model.parameters():
        total += p.numel()
        nonzero += int(torch.count_nonzero(p.detach()))
    return total, nonzero


__all__ = ["PruningResult", "apply_masks", "model_counts", "prune_step", "structure", "structured_sparsity"]
