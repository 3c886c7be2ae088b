"""Pruning that makes transformers faster (structured) or sparser (masks), usable with or without Lightning.

Core: :class:`PruningConfig` + :func:`prune_step`; :class:`Pruner` runs a :class:`PruningSchedule` with resumable
state (what ``MagnitudePruning`` runs on); :func:`save_pruned` / :func:`load_pruned` round-trip a
structurally pruned Hugging Face model; :class:`~lightning_latency.pruning.callback.MagnitudePruning` schedules it
inside ``Trainer.fit``. :func:`layer_sensitivity` + :func:`plan_budget` allocate removals to a latency target;
:class:`~lightning_latency.pruning.budget_callback.LatencyBudgetPruning` does it inside ``Trainer.fit``.
"""

from lightning_latency.pruning.activation import ActivationImportance
from lightning_latency.pruning.budget import (
    BudgetUnreachable,
    Move,
    SensitivityReport,
    apply_moves,
    layer_sensitivity,
    plan_budget,
)
from lightning_latency.pruning.config import PruningConfig, PruningMode
from lightning_latency.pruning.depth import SkippedLayer, block_importance, prune_depth, skip_layer
from lightning_latency.pruning.core import PruningResult, model_counts, prune_step, structured_sparsity
from lightning_latency.pruning.hf_io import load_pruned, register_loadable, save_pruned
from lightning_latency.pruning.budget_pruner import BudgetPruner
from lightning_latency.pruning.masks import apply_masks
from lightning_latency.pruning.pruner import Pruner
from lightning_latency.pruning.schedule import PruningSchedule
from lightning_latency.pruning.structured import reshape_to_state_dict, structure

__all__ = [
    "ActivationImportance",
    "BudgetPruner",
    "SkippedLayer",
    "block_importance",
    "prune_depth",
    "skip_layer",
    "BudgetUnreachable",
    "Move",
    "SensitivityReport",
    "apply_moves",
    "layer_sensitivity",
    "plan_budget",
    "Pruner",
    "PruningConfig",
    "PruningMode",
    "PruningResult",
    "PruningSchedule",
    "apply_masks",
    "load_pruned",
    "model_counts",
    "prune_step",
    "reshape_to_state_dict",
    "register_loadable",
    "save_pruned",
    "structure",
    "structured_sparsity",
]
