"""``MagnitudePruning``: schedules :func:`prune_step` inside ``Trainer.fit`` and keeps the result across checkpoints."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn
from typing_extensions import override

from lightning_latency._compat import (
    CallbackBase,
    LightningModule,
    MisconfigurationException,
    rank_zero_info,
    rank_zero_warn,
)
from lightning_latency._target import check_model_attr, resolve_target
from lightning_latency.pruning.config import PruningConfig, PruningMode
from lightning_latency.pruning.core import model_counts, prune_step, structured_sparsity
from lightning_latency.pruning.masks import MaskApplier, apply_masks, mask_sparsity
from lightning_latency.pruning.schedule import PruningSchedule
from lightning_latency.pruning.structured import (
    blocks_or_raise,
    original_structure,
    reshape_to_state_dict,
    set_original_structure,
    structure,
)
from lightning_latency.pruning.targets import resolve_targets
from lightning_latency.strategies import fsdp_problem, full_params, is_fsdp

_INTERVALS = ("step", "epoch")


class MagnitudePruning(CallbackBase):
    """Prune a model gradually while it trains, so that it ends smaller and (structured mode) faster.

    Sparsity rises from ``initial_sparsity`` at ``start`` to ``final_sparsity`` at ``end`` (optimizer steps, or
    epochs with ``interval="epoch"``) every ``frequency`` positions along a cubic (Zhu & Gupta) or linear curve;
    training continues between steps so the model recovers.

    * ``mode="structured"`` removes whole attention heads and MLP neurons (BERT-, Llama- incl. GQA, GPT-2-family
      Hugging Face models): the layers shrink, so the model gets faster. Shrinking parameters invalidates the
      optimizer, so after every structural step the callback rebuilds it by calling your ``configure_optimizers``
      again (``trainer.strategy.setup_optimizers``; Adam moments restart, learning rate and LR-scheduler position
      are carried over) and, under DDP, re-wraps the model.
    * ``mode="unstructured"`` / ``"nm"`` zero individual weights (N:M: ``n`` of every ``m``); masks are re-applied
      after every optimizer step so pruned weights stay zero, and baked in at the end of ``fit``
      (``make_permanent``). Masks do not make dense kernels faster on CPU.

    Checkpoints keep the schedule position and the masks (or the pruned shapes): resuming into a freshly built
    model reshapes it from the checkpoint's ``state_dict`` before the weights load.

    Args:
        mode: ``"structured"``, ``"unstructured"`` or ``"nm"``.
        final_sparsity: sparsity in [0, 1) reached at ``end`` (structured: fraction of heads and of MLP neurons
            removed per layer; ``"nm"`` ignores it: the pattern fixes sparsity at ``1 - n/m``).
        initial_sparsity: sparsity applied at ``start``.
        start, end: first and last pruning position; ``end=None`` means ``end=start`` (one shot).
        frequency: positions between pruning steps.
        schedule: ``"cubic"``, ``"linear"`` or a callable ``progress (0..1) -> fraction``.
        interval: ``"step"`` (optimizer steps) or ``"epoch"``.
        importance, targets, exclude, scope, n, m, prune_heads, prune_neurons, max_layer_sparsity: see
            :class:`~lightning_latency.pruning.PruningConfig`.
        make_permanent: at the end of ``fit``, drop the masks (zeros stay baked into the weights).
        rewind_to: lottery-ticket rewinding (masked modes): snapshot all weights at this optimizer step (0 = before
            training) and, after each pruning step, reset the surviving weights to the snapshot.
        log_per_layer: also log heads/neurons left in every layer (structured).
        model_attr: attribute (dotted path allowed) of the LightningModule to prune, e.g. ``"model"``; None prunes
            ``pl_module.compression_target`` when defined (a ``DistillationModule``: the student, never the
            teacher), else the LightningModule itself. Mask names and shapes are relative to that module.

    Logged (to ``trainer.loggers``, at every pruning step): ``pruning/sparsity`` (achieved), ``pruning/target``
    (scheduled), ``pruning/params``, ``pruning/nonzero``, and in structured mode ``pruning/heads/<block>`` and
    ``pruning/neurons/<block>``.

    Example::

        trainer = Trainer(max_steps=1000, callbacks=[
            MagnitudePruning(mode="structured", final_sparsity=0.5, start=100, end=600, frequency=100)])
    """

    def __init__(
        self,
        mode: str = "unstructured",
        final_sparsity: float = 0.5,
        initial_sparsity: float = 0.0,
        start: int = 0,
        end: int | None = None,
        frequency: int = 1,
        schedule: str | Callable[[float], float] = "cubic",
        interval: str = "step",
        importance: str | Any = "l2",
        targets: Sequence[str] | None = None,
        exclude: Sequence[str] = (),
        scope: str = "local",
        n: int = 2,
        m: int = 4,
        prune_heads: bool = True,
        prune_neurons: bool = True,
        max_layer_sparsity: float = 0.95,
        make_permanent: bool = True,
        rewind_to: int | None = None,
        log_per_layer: bool = True,
        model_attr: str | None = None,
    ) -> None:
        self.config = PruningConfig(mode=mode, importance=importance, targets=targets, exclude=tuple(exclude),
                                    scope=scope, n=n, m=m, prune_heads=prune_heads, prune_neurons=prune_neurons,
                                    max_layer_sparsity=max_layer_sparsity)
        if not callable(schedule) and schedule not in ("cubic", "linear"):
            # PruningSchedule calls it `curve`; name the argument the user passed here
            raise ValueError(f"`schedule` must be 'cubic', 'linear' or a callable progress -> fraction, got "
                             f"{schedule!r}. Use schedule='cubic'.")
        self.schedule = PruningSchedule(initial_sparsity, final_sparsity, start, start if end is None else end,
                                        frequency, schedule)
        if interval not in _INTERVALS:
            raise ValueError(f"`interval` must be one of {list(_INTERVALS)}, got {interval!r}. Use interval='step'.")
        if rewind_to is not None:
            if not self.config.is_masked:
                raise ValueError(
                    f"`rewind_to`={rewind_to!r} needs a masked mode: structured pruning changes shapes, so weights "
                    f"cannot be rewound. Pass rewind_to=None or mode='unstructured'."
                )
            if isinstance(rewind_to, bool) or not isinstance(rewind_to, int) or not 0 <= rewind_to <= start:
                raise ValueError(
                    f"`rewind_to` must be an optimizer step in [0, start={start}], got {rewind_to!r}. "
                    f"Use rewind_to=0 to rewind to the initial weights."
                )
        self.interval = interval
        self.make_permanent = make_permanent
        self.rewind_to = rewind_to
        self.log_per_layer = log_per_layer
        self.model_attr = check_model_attr(model_attr)
        self._position = -1  # last position at which a pruning step ran
        self._sparsity = 0.0
        self._masks: dict[str, torch.Tensor] = {}
        self._structure: dict[str, dict[str, int]] = {}
        self._original: dict[str, dict[str, int]] = {}
        self._rewind_state: dict[str, torch.Tensor] | None = None
        self._hook: Any = None
        self._applier: MaskApplier | None = None
        self._warned = False

    @property
    @override
    def state_key(self) -> str:
        s = self.schedule
        extra = {"model_attr": self.model_attr} if self.model_attr else {}  # keys of older checkpoints unchanged
        return self._generate_state_key(mode=self.config.mode.value, final_sparsity=s.final_sparsity,
                                        start=s.start, end=s.end, **extra)

    @property
    def sparsity(self) -> float:
        """Scheduled sparsity of the last pruning step."""
        return self._sparsity

    @property
    def masks(self) -> dict[str, torch.Tensor]:
        return self._masks

    # ----------------------------------------------------------------------------------------------- hooks

    @override
    def setup(self, trainer: Any, pl_module: Any, stage: str) -> None:
        self._check_strategy(trainer, pl_module)
        model = self._model(pl_module)
        try:
            if self.config.mode is PruningMode.STRUCTURED:
                blocks_or_raise(model, self.config)  # converts GPT-2 Conv1D to Linear before optimizers exist
                original_structure(model)
                if self._hook is None:
                    # Lightning restores the model before callbacks: reshape from the checkpoint's shapes first.
                    # A hook on a submodule receives its own key prefix, so this works for model_attr targets too.
                    self._hook = model.register_load_state_dict_pre_hook(_reshape_pre_hook)
            else:
                resolve_targets(model, self.config)
        except ValueError as err:
            raise MisconfigurationException(str(err)) from err

    def strategy_problem(self, kind: str, pl_module: Any = None) -> str | None:
        if self.config.mode is not PruningMode.STRUCTURED:
            return None
        if kind == "fsdp":
            return ("MagnitudePruning(mode='structured') changes parameter shapes, which FSDP's flat parameters "
                    "cannot follow. Prune the unsharded model before wrapping (prune_step(model, PruningConfig(mode="
                    "'structured'), sparsity) then fit under FSDP), or run the structured schedule under DDP.")
        return None

    def _check_strategy(self, trainer: Any, pl_module: Any = None) -> None:
        if self.config.mode is not PruningMode.STRUCTURED:
            return
        if is_fsdp(trainer):
            raise MisconfigurationException(fsdp_problem(self))
        if getattr(trainer.strategy, "_start_method", None) != "spawn":
            return
        # ddp_spawn copies the final weights back into the main process's (full-size) module, where no hook of ours
        # runs: that load fails on the shrunken shapes unless the module reshapes itself first.
        if pl_module is not None and type(pl_module).load_state_dict is not LightningModule.load_state_dict:
            return
        raise MisconfigurationException(
            "MagnitudePruning(mode='structured') with strategy='ddp_spawn': the main process cannot take the pruned "
            "shapes back. use strategy='ddp' (or one device), a masked mode, or override your LightningModule's "
            "load_state_dict to call lightning_latency.pruning.reshape_to_state_dict(self, state_dict) first."
        )

    @override
    def on_fit_start(self, trainer: Any, pl_module: Any) -> None:
        if self.config.is_masked and not self._warned:
            self._warned = True
            rank_zero_warn(
                f"MagnitudePruning(mode={self.config.mode.value!r}) zeroes weights but keeps dense shapes: dense "
                f"CPU kernels run exactly as fast (measured x1.0). Use mode='structured' to make the model faster."
            )
        if self._original and self.config.mode is PruningMode.STRUCTURED:
            set_original_structure(self._model(pl_module), self._original)

    @override
    def on_train_start(self, trainer: Any, pl_module: Any) -> None:
        if self.rewind_to == trainer.global_step and self._rewind_state is None:
            self._snapshot(self._model(pl_module))
        if self._masks:
            with full_params(trainer):  # FSDP: act on gathered weights, write back to the shards
                apply_masks(self._model(pl_module), self._masks)
        if self.interval == "step":
            self._maybe_prune(trainer, pl_module, trainer.global_step)

    @override
    def on_train_epoch_start(self, trainer: Any, pl_module: Any) -> None:
        if self.interval == "epoch":
            self._maybe_prune(trainer, pl_module, trainer.current_epoch)

    @override
    def on_train_batch_end(self, trainer: Any, pl_module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
        if self._masks and is_fsdp(trainer):  # gathered tensors are new each time: no cached applier
            with full_params(trainer):
                apply_masks(self._model(pl_module), self._masks)
        elif self._masks:  # after the optimizer step: pruned weights moved, put them back to zero
            if self._applier is None:
                self._applier = MaskApplier(self._model(pl_module), self._masks)
            self._applier()
        if self.rewind_to == trainer.global_step and self._rewind_state is None:
            self._snapshot(self._model(pl_module))
        if self.interval == "step":
            self._maybe_prune(trainer, pl_module, trainer.global_step)

    @override
    def on_fit_end(self, trainer: Any, pl_module: Any) -> None:
        model = self._model(pl_module)
        if self._masks:
            with full_params(trainer):
                apply_masks(model, self._masks)
            if self.make_permanent:
                self._masks, self._applier = {}, None
        self._log(trainer, model, final=True)

    @override
    def teardown(self, trainer: Any, pl_module: Any, stage: str) -> None:
        if self._hook is not None:
            self._hook.remove()
            self._hook = None

    @override
    def state_dict(self) -> dict[str, Any]:
        state: dict[str, Any] = {
            "position": self._position,
            "sparsity": self._sparsity,
            "masks": {k: v.cpu() for k, v in self._masks.items()},
            "structure": self._structure,
            "original": self._original,
        }
        if self._rewind_state is not None:
            state["rewind_state"] = self._rewind_state
        return state

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._position = state_dict.get("position", -1)
        self._sparsity = state_dict.get("sparsity", 0.0)
        self._masks = dict(state_dict.get("masks", {}))
        self._applier = None
        self._structure = dict(state_dict.get("structure", {}))
        self._original = dict(state_dict.get("original", {}))
        self._rewind_state = state_dict.get("rewind_state")

    # ----------------------------------------------------------------------------------------------- helpers

    def _model(self, pl_module: nn.Module) -> nn.Module:
        """The module this callback prunes (``model_attr``, else ``compression_target``, else ``pl_module``)."""
        return resolve_target(pl_module, self.model_attr)

    def _maybe_prune(self, trainer: Any, pl_module: Any, position: int) -> None:
        if position <= self._position or not self.schedule.is_pruning_position(position):
            return
        model = self._model(pl_module)
        self._position = position
        self._sparsity = self.schedule.sparsity_at(position)
        if self.config.mode is PruningMode.STRUCTURED:
            result = prune_step(model, self.config, self._sparsity)
            self._structure, self._original = result.structure, original_structure(model)
            _rebuild_optimizers(trainer, pl_module)
        else:
            with full_params(trainer):  # FSDP: masks are computed and applied on the gathered full weights
                result = prune_step(model, self.config, self._sparsity, masks=self._masks)
                # identical on every rank even if a kernel were non-deterministic: rank 0's masks win
                self._masks = (trainer.strategy.broadcast(result.masks, src=0) if trainer.world_size > 1
                               else result.masks)
                self._applier = None
                if self._rewind_state is not None:
                    model.load_state_dict(self._rewind_state, strict=False)
                apply_masks(model, self._masks)
        self._log(trainer, model)

    @torch.no_grad()
    def _snapshot(self, pl_module: nn.Module) -> None:
        self._rewind_state = {k: v.detach().clone().cpu() for k, v in pl_module.state_dict().items()}

    def _log(self, trainer: Any, pl_module: nn.Module, final: bool = False) -> None:
        if trainer.global_rank != 0 or not trainer.loggers:
            return
        params, nonzero = model_counts(pl_module)
        metrics: dict[str, float] = {"pruning/target": self._sparsity, "pruning/params": float(params),
                                     "pruning/nonzero": float(nonzero)}
        if self.config.mode is PruningMode.STRUCTURED:
            shapes = structure(pl_module)
            metrics["pruning/sparsity"] = structured_sparsity(shapes, original_structure(pl_module))
            if self.log_per_layer:
                for name, s in shapes.items():
                    for key in ("heads", "neurons"):
                        if key in s:
                            metrics[f"pruning/{key}/{name}"] = float(s[key])
        else:
            targets = resolve_targets(pl_module, self.config)
            total = sum(mod.weight.numel() for _, mod in targets)
            zeros = sum(int((mod.weight == 0).sum()) for _, mod in targets)
            metrics["pruning/sparsity"] = zeros / max(total, 1) if final or not self._masks else mask_sparsity(
                self._masks)
        for logger in trainer.loggers:
            logger.log_metrics(metrics, step=trainer.global_step)
        if final:
            rank_zero_info(f"MagnitudePruning: sparsity {metrics['pruning/sparsity']:.3f}, params {params:,}, "
                           f"non-zero {nonzero:,}")


def _reshape_pre_hook(module: nn.Module, state_dict: dict[str, Any], prefix: str, *args: Any) -> None:
    """``load_state_dict`` pre-hook: shrink heads/neurons of a fresh model to the checkpoint's shapes first."""
    reshape_to_state_dict(module, state_dict, prefix)


def _rebuild_optimizers(trainer: Any, pl_module: Any) -> None:
    """Re-create optimizers and LR schedulers over the new (smaller) parameters after a structural step.

    The old optimizer holds references to parameters that no longer exist. We call ``configure_optimizers`` again
    through the strategy, then carry over each group's current learning rate and each scheduler's position;
    optimizer moments (e.g. Adam's) restart from zero. Under DDP the model is wrapped again, because the
    reducer's buckets were built for the old parameters.
    """
    strategy = trainer.strategy
    if not strategy.optimizers:
        return
    lrs = [[g.get("lr") for g in opt.param_groups] for opt in strategy.optimizers]
    schedulers = [cfg.scheduler.state_dict() for cfg in strategy.lr_scheduler_configs]
    wrapped = strategy.model is not None and strategy.model is not pl_module
    if wrapped and hasattr(strategy, "configure_ddp"):
        strategy.model = pl_module
        strategy.configure_ddp()
    strategy.setup_optimizers(trainer)
    for opt, group_lrs in zip(strategy.optimizers, lrs):
        for group, lr in zip(opt.param_groups, group_lrs):
            if lr is not None:
                group["lr"] = lr
    for cfg, state in zip(strategy.lr_scheduler_configs, schedulers):
        cfg.scheduler.load_state_dict(state)
