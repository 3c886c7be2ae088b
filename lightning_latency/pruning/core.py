"""The pruning verb: one step of pruning on any ``nn.Module``, no Trainer needed."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from lightning_latency.pruning.config import PruningConfig, PruningMode, check_sparsity
from lightning_latency.pruning.masks import apply_masks, check_importance, check_nm, compute_masks, mask_sparsity
from lightning_latency.pruning.structured import (
    blocks_or_raise,
    original_structure,
    prune_structured,
    structure,
    unshrunk_blocks,
)
from lightning_latency.pruning.targets import resolve_targets


@dataclass
class PruningResult:
    """What a pruning step did: what the callback logs, as is.

    Attributes:
        sparsity: achieved sparsity: fraction of targeted weights zeroed (masked modes) or of the original
            heads + neurons removed (structured).
        masks: ``{module name: bool tensor shaped like its weight}`` (``True`` = kept); empty for structured mode.
            Re-apply with :func:`apply_masks` after every optimizer step.
        structure: ``{block name: {"heads", "kv_heads", "head_dim"} / {"neurons"}}`` after the step (structured).
        params, nonzero: parameters of the model, and those that are not zero, after the step.
        unshrunk: structured: targeted blocks still larger than the step asked for (``"<block> heads 4 > 2"``);
            empty when every shrink took.
    """

    sparsity: float
    masks: dict[str, torch.Tensor] = field(default_factory=dict)
    structure: dict[str, dict[str, int]] = field(default_factory=dict)
    params: int = 0
    nonzero: int = 0
    unshrunk: list[str] = field(default_factory=list)

    def metrics(self, scheduled: float | None = None, per_layer: bool = True) -> dict[str, float]:
        """``pruning/sparsity``, ``pruning/params``, ``pruning/nonzero``, ``pruning/target`` (``scheduled``) and, with
        ``per_layer``, ``pruning/heads/<block>`` / ``pruning/neurons/<block>`` (structured)."""
        out = {"pruning/sparsity": float(self.sparsity), "pruning/params": float(self.params),
               "pruning/nonzero": float(self.nonzero)}
        if scheduled is not None:
            out["pruning/target"] = float(scheduled)
        for name, shape in self.structure.items() if per_layer else ():
            out.update({f"pruning/{key}/{name}": float(shape[key]) for key in ("heads", "neurons") if key in shape})
        return out


class _Masked:
    """Unstructured / N:M: zero weights through masks held outside the model; shapes never change."""

    changes_shapes = False

    def check(self, model: nn.Module, config: PruningConfig) -> None:
        resolve_targets(model, config)
        check_importance(config)
        check_nm(model, config)

    def step(self, model: nn.Module, config: PruningConfig, sparsity: float,
             masks: dict[str, torch.Tensor] | None) -> PruningResult:
        new_masks = compute_masks(model, config, sparsity, masks)
        apply_masks(model, new_masks)
        return PruningResult(mask_sparsity(new_masks), masks=new_masks)

    def measure(self, model: nn.Module, config: PruningConfig) -> PruningResult:
        weights = [mod.weight for _, mod in resolve_targets(model, config)]
        zeros = sum(int((w == 0).sum()) for w in weights)
        return PruningResult(zeros / max(sum(w.numel() for w in weights), 1))

    def original(self, model: nn.Module) -> dict[str, dict[str, int]]:
        return {}


class _Structured:
    """Remove heads and MLP neurons: layers shrink, so a load into a fresh model must reshape it first."""

    changes_shapes = True

    def check(self, model: nn.Module, config: PruningConfig) -> None:
        blocks_or_raise(model, config)  # converts GPT-2 Conv1D to Linear before optimizers exist
        original_structure(model)

    def step(self, model: nn.Module, config: PruningConfig, sparsity: float,
             masks: dict[str, torch.Tensor] | None) -> PruningResult:
        shapes = prune_structured(model, config, sparsity)
        return PruningResult(structured_sparsity(shapes, original_structure(model)), structure=shapes,
                             unshrunk=unshrunk_blocks(model, config, sparsity))

    def measure(self, model: nn.Module, config: PruningConfig) -> PruningResult:
        shapes = structure(model)
        return PruningResult(structured_sparsity(shapes, original_structure(model)), structure=shapes)

    def original(self, model: nn.Module) -> dict[str, dict[str, int]]:
        return original_structure(model)


_MODES: dict[PruningMode, _Masked | _Structured] = {
    PruningMode.STRUCTURED: _Structured(), PruningMode.UNSTRUCTURED: _Masked(), PruningMode.NM: _Masked()}


def mode_of(config: PruningConfig) -> _Masked | _Structured:
    """The strategy object that carries out ``config.mode`` (the one place the mode is dispatched on)."""
    return _MODES[config.mode]


def counted(result: PruningResult, model: nn.Module) -> PruningResult:
    """``result`` with the model's parameter counts filled in."""
    result.params, result.nonzero = model_counts(model)
    return result


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
    return counted(mode_of(config).step(model, config, sparsity, masks), model)


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


__all__ = ["PruningResult", "apply_masks", "counted", "mode_of", "model_counts", "prune_step", "structure",
           "structured_sparsity"]
