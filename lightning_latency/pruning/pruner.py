"""``Pruner``: all per-run state of a gradual pruning schedule, usable from a plain PyTorch loop or a callback.

A :class:`PruningSchedule` says *what* sparsity is due *when*; :func:`prune_step` does one step. The pruner adds the
state a run needs between steps and across restarts: the position of the last step, the scheduled sparsity, the
masks (masked modes) or the original and current structure (structured), the lottery-ticket snapshot, and a fast
mask applier. Everything that differs between modes lives in the mode's strategy object
(:func:`~lightning_latency.pruning.core.mode_of`), so nothing here branches on the mode.

Example (no Lightning)::

    pruner = Pruner(PruningConfig(mode="unstructured"), PruningSchedule(0.0, 0.5, start=10, end=50, frequency=10))
    pruner.check(model)
    for step, batch in enumerate(loader, start=1):
        loss = model(**batch).loss; loss.backward(); opt.step(); opt.zero_grad()
        pruner.reapply_masks(model)           # pruned weights stay zero after the update
        pruner.maybe_prune(model, step)       # a PruningResult when a step was due, else None
    pruner.finish(model)                      # masks baked in
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from typing import Any, ContextManager

import torch
from torch import nn

from lightning_latency.pruning.config import PruningConfig
from lightning_latency.pruning.core import PruningResult, counted, mode_of
from lightning_latency.pruning.masks import MaskApplier, apply_masks
from lightning_latency.pruning.optim import register_reshape_hook, reshape_pre_hook
from lightning_latency.pruning.schedule import PruningSchedule
from lightning_latency.pruning.structured import set_original_structure

Broadcast = Callable[[Any], Any]


class Pruner:
    """Carries a :class:`PruningSchedule` out on a model, step by step, with resumable state.

    Args:
        config: what and how to prune (:class:`PruningConfig`).
        schedule: when and how much (:class:`PruningSchedule`); positions are whatever the caller counts
            (optimizer steps, epochs).
        rewind_to: lottery-ticket rewinding (masked modes): the optimizer step whose weights :meth:`maybe_snapshot`
            keeps; after each pruning step the surviving weights are reset to them. None: no rewinding.
        make_permanent: :meth:`finish` drops the masks (the zeros stay in the weights).

    Raises:
        ValueError: ``rewind_to`` with structured mode, or outside ``[0, schedule.start]``.
    """

    load_pre_hook = staticmethod(reshape_pre_hook)  # reshape a fresh model to a structurally pruned state_dict

    def __init__(self, config: PruningConfig, schedule: PruningSchedule, rewind_to: int | None = None,
                 make_permanent: bool = True) -> None:
        self.config, self.schedule, self.make_permanent = config, schedule, make_permanent
        self.mode = mode_of(config)
        if rewind_to is not None:
            if self.changes_shapes:
                raise ValueError(f"`rewind_to`={rewind_to!r} needs a masked mode: structured pruning changes shapes, "
                                 f"so weights cannot be rewound. Pass rewind_to=None or mode='unstructured'.")
            if isinstance(rewind_to, bool) or not isinstance(rewind_to, int) or not 0 <= rewind_to <= schedule.start:
                raise ValueError(f"`rewind_to` must be an optimizer step in [0, start_step={schedule.start}], got "
                                 f"{rewind_to!r}. Use rewind_to=0 to rewind to the initial weights.")
        self.rewind_to = rewind_to
        self.position = -1  # last position at which a pruning step ran
        self.sparsity = 0.0  # scheduled sparsity of that step
        self.masks: dict[str, torch.Tensor] = {}
        self.structure: dict[str, dict[str, int]] = {}
        self.original: dict[str, dict[str, int]] = {}
        self.rewind_state: dict[str, torch.Tensor] | None = None
        self._applier: MaskApplier | None = None

    @property
    def changes_shapes(self) -> bool:
        """True in structured mode: parameters are replaced, so optimizers must be rebuilt after a step."""
        return self.mode.changes_shapes

    def check(self, model: nn.Module) -> None:
        """Raise ValueError now (patterns matching nothing, an unsupported model), before any weight changes."""
        self.mode.check(model, self.config)

    def register_hooks(self, model: nn.Module) -> list[Any]:
        """Hooks ``model`` needs to load this run's checkpoints (structured: the reshape pre-hook); their handles."""
        return [register_reshape_hook(model)] if self.changes_shapes else []

    def restore(self, model: nn.Module) -> None:
        """After a resume: declare the recorded pre-pruning structure on ``model`` (whose shapes the load shrank)."""
        if self.original:
            set_original_structure(model, self.original)

    @torch.no_grad()
    def maybe_snapshot(self, model: nn.Module, step: int) -> None:
        """Keep the weights for rewinding when ``step`` is ``rewind_to`` (once)."""
        if self.rewind_to == step and self.rewind_state is None:
            self.rewind_state = {k: v.detach().clone().cpu() for k, v in model.state_dict().items()}

    def reapply_masks(self, model: nn.Module, cached: bool = True) -> None:
        """Zero the pruned weights again (after an optimizer step). ``cached=False`` when the weight tensors are new
        on every call (FSDP's gathered parameters)."""
        if not self.masks:
            return
        if not cached:
            apply_masks(model, self.masks)
            return
        if self._applier is None:
            self._applier = MaskApplier(model, self.masks)
        self._applier()

    def is_due(self, position: int) -> bool:
        return position > self.position and self.schedule.is_pruning_position(position)

    def maybe_prune(self, model: nn.Module, position: int, broadcast: Broadcast | None = None,
                    gather: Callable[[], ContextManager[Any]] = contextlib.nullcontext) -> PruningResult | None:
        """Prune ``model`` if a step is due at ``position``; the step's :class:`PruningResult` (what to log), else None.

        Args:
            broadcast: ``obj -> obj`` from rank 0 (several processes): every rank keeps rank 0's masks.
            gather: a context in which ``model`` holds its full weights (FSDP's ``summon_full_params``).
        """
        if not self.is_due(position):
            return None
        self.position, self.sparsity = position, self.schedule.sparsity_at(position)
        with gather():
            result = self.mode.step(model, self.config, self.sparsity, self.masks)
            if result.masks and broadcast is not None:  # identical on every rank even if a kernel were not
                result.masks = broadcast(result.masks)
            self.masks, self._applier = result.masks, None
            self.structure, self.original = result.structure, self.mode.original(model)
            if self.rewind_state is not None:
                model.load_state_dict(self.rewind_state, strict=False)
            if self.rewind_state is not None or broadcast is not None:
                apply_masks(model, self.masks)
            return counted(result, model)

    def finish(self, model: nn.Module, gather: Callable[[], ContextManager[Any]] = contextlib.nullcontext
               ) -> PruningResult:
        """End of the run: masks applied a last time (dropped with ``make_permanent``); the model's state now."""
        with gather():
            if self.masks:
                apply_masks(model, self.masks)
                if self.make_permanent:
                    self.masks, self._applier = {}, None
            result = self.mode.measure(model, self.config)
            result.masks = self.masks
            return counted(result, model)

    def state_dict(self) -> dict[str, Any]:
        state: dict[str, Any] = {"position": self.position, "sparsity": self.sparsity,
                                 "masks": {k: v.cpu() for k, v in self.masks.items()}, "structure": self.structure,
                                 "original": self.original}
        if self.rewind_state is not None:
            state["rewind_state"] = self.rewind_state
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore :meth:`state_dict` (keys read with defaults: checkpoints of older releases load)."""
        self.position = state_dict.get("position", -1)
        self.sparsity = state_dict.get("sparsity", 0.0)
        self.masks = dict(state_dict.get("masks", {}))
        self._applier = None
        self.structure = dict(state_dict.get("structure", {}))
        self.original = dict(state_dict.get("original", {}))
        self.rewind_state = state_dict.get("rewind_state")


__all__ = ["Pruner"]
