"""``MagnitudePruning``: runs a :class:`~lightning_latency.pruning.pruner.Pruner` inside ``Trainer.fit``."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn
from typing_extensions import override

from lightning_latency._compat import LightningModule, Trainer
from lightning_latency.base import CompressionCallback, StrategyKind
from lightning_latency.pruning.config import PruningConfig
from lightning_latency.pruning.optim import rebuild_optimizers, shape_change_problem
from lightning_latency.pruning.pruner import Pruner
from lightning_latency.pruning.schedule import PruningSchedule, schedule_from_arguments
from lightning_latency.strategies import full_params, is_fsdp


class MagnitudePruning(CompressionCallback):
    """Prune a model gradually while it trains, so that it ends smaller and (structured mode) faster.

    Sparsity rises from ``initial_sparsity`` at ``start_step`` to ``final_sparsity`` at ``end_step`` every
    ``every_n_steps`` optimizer steps (or ``start_epoch``/``end_epoch``/``every_n_epochs``) along a cubic (Zhu &
    Gupta) or linear curve; training continues between steps so the model recovers.

    * ``mode="structured"`` removes whole attention heads and MLP neurons (BERT-, Llama- incl. GQA, GPT-2 family):
      layers shrink, so the model gets faster; after each step ``configure_optimizers`` runs again (Adam moments
      restart; learning rate and scheduler position are kept) and DDP re-wraps the model.
    * ``mode="unstructured"`` / ``"nm"`` zero weights (N:M: ``n`` of every ``m``) through masks re-applied after
      every optimizer step and baked in at fit end (``make_permanent``); not faster on CPU.

    Checkpoints keep the schedule position and the masks or pruned shapes (a fresh model is reshaped on resume).

    Args:
        mode: ``"structured"``, ``"unstructured"`` or ``"nm"``.
        final_sparsity: sparsity in [0, 1) reached at the end (structured: fraction of heads and of MLP neurons
            removed per layer; ``"nm"`` ignores it: the pattern fixes sparsity at ``1 - n/m``).
        initial_sparsity: sparsity applied at the first pruning step.
        start_step, end_step, every_n_steps: first and last optimizer step that prunes, and steps between pruning
            steps (defaults 0, ``start_step`` i.e. one shot, 1).
        start_epoch, end_epoch, every_n_epochs: the same in epochs (an epoch schedule; do not mix with the step ones).
        schedule: ``"cubic"``, ``"linear"`` or a callable ``progress (0..1) -> fraction``.
        importance, targets, exclude, scope, n, m, prune_heads, prune_neurons, max_layer_sparsity: see
            :class:`~lightning_latency.pruning.PruningConfig` (patterns: fnmatch, or ``"re:<regex>"``).
        make_permanent: at the end of ``fit``, drop the masks (zeros stay baked into the weights).
        rewind_to: lottery-ticket rewinding (masked modes): snapshot all weights at this optimizer step (0 = before
            training) and, after each pruning step, reset the surviving weights to the snapshot.
        log_per_layer: also log heads/neurons left in every layer (structured).
        model_attr: attribute (dotted path allowed) of the LightningModule to prune; None prunes
            ``pl_module.compression_target`` when defined (a ``DistillationModule``: the student), else the module.
        start, end, frequency, interval: deprecated names of the schedule arguments above.

    Logged at every pruning step and at fit end: :meth:`PruningResult.metrics` (``pruning/sparsity``, ``/target``,
    ``/params``, ``/nonzero``; structured: ``pruning/heads/<block>``, ``pruning/neurons/<block>``).

    Example::

        trainer = Trainer(max_steps=1000, callbacks=[
            MagnitudePruning(mode="structured", final_sparsity=0.5, start_step=100, end_step=600, every_n_steps=100)])
    """

    compresses = True

    def __init__(
        self, mode: str = "unstructured", final_sparsity: float = 0.5, initial_sparsity: float = 0.0,
        start_step: int | None = None, end_step: int | None = None, every_n_steps: int | None = None,
        start_epoch: int | None = None, end_epoch: int | None = None, every_n_epochs: int | None = None,
        schedule: str | Callable[[float], float] = "cubic", importance: str | Any = "l2",
        targets: Sequence[str | type[nn.Module]] | None = None, exclude: Sequence[str] = (), scope: str = "local",
        n: int = 2, m: int = 4, prune_heads: bool = True, prune_neurons: bool = True, max_layer_sparsity: float = 0.95,
        make_permanent: bool = True, rewind_to: int | None = None, log_per_layer: bool = True,
        model_attr: str | None = None, start: int | None = None, end: int | None = None,
        frequency: int | None = None, interval: str | None = None,
    ) -> None:
        super().__init__(model_attr)
        config = PruningConfig(mode=mode, importance=importance, targets=targets, exclude=tuple(exclude), scope=scope,
                               n=n, m=m, prune_heads=prune_heads, prune_neurons=prune_neurons,
                               max_layer_sparsity=max_layer_sparsity)
        positions = dict(start_step=start_step, end_step=end_step, every_n_steps=every_n_steps,
                         start_epoch=start_epoch, end_epoch=end_epoch, every_n_epochs=every_n_epochs)
        plan, self.interval = schedule_from_arguments(self.name, initial_sparsity, final_sparsity, schedule, positions,
                                                      start, end, frequency, interval)
        self.pruner = Pruner(config, plan, rewind_to, make_permanent)
        self.core = self.pruner  # checkpoints hold its state_dict (see CompressionCallback.core)
        self.log_per_layer = log_per_layer
        self._warned = False

    @property
    def config(self) -> PruningConfig:
        return self.pruner.config

    @property
    def schedule(self) -> PruningSchedule:
        return self.pruner.schedule

    @property
    def sparsity(self) -> float:  # scheduled sparsity of the last pruning step
        return self.pruner.sparsity

    @property
    def masks(self) -> dict[str, torch.Tensor]:
        return self.pruner.masks

    @property
    @override
    def state_key(self) -> str:
        s = self.schedule
        extra = {"model_attr": self.model_attr} if self.model_attr else {}  # keys of older checkpoints unchanged
        return self._generate_state_key(mode=self.config.mode.value, final_sparsity=s.final_sparsity,
                                        start=s.start, end=s.end, **extra)

    # ----------------------------------------------------------------------------------------------- contract
    @override
    def validate(self, trainer: Trainer, pl_module: LightningModule, target: nn.Module, stage: str) -> None:
        self.pruner.check(target)
        for handle in self.pruner.register_hooks(target):  # Lightning restores the model before the callbacks
            self.add_hook(handle)
        if self.config.importance == "activation":
            raise ValueError("importance='activation' ranks on statistics recorded once, which an iterative schedule "
                             "invalidates at its first structural step. Pass importance='taylor' here, or prune once "
                             "with student_from_pruned_teacher(teacher, sparsity, importance='activation', "
                             "calibration=batches) and fine-tune.")
        if self.config.importance == "taylor" and self.schedule.start == 0:
            raise ValueError(f"importance='taylor' needs gradients, which do not exist yet at the first pruning "
                             f"position 0 ({self.interval} 0, before any backward). Pass start_{self.interval}=1 or "
                             f"importance='l2'.")
        max_steps = getattr(trainer, "max_steps", -1)
        if self.interval == "step" and isinstance(max_steps, int) and 0 <= max_steps < self.schedule.end:
            self.warn(f"`end_step`={self.schedule.end} is after Trainer(max_steps={max_steps}): the schedule never "
                      f"reaches final_sparsity={self.schedule.final_sparsity}. Pass end_step <= {max_steps}.")

    @override
    def strategy_problem(self, kind: StrategyKind, pl_module: nn.Module | None = None) -> str | None:
        if not self.pruner.changes_shapes:
            return None
        return shape_change_problem(kind, pl_module, "structured pruning (mode='structured')")

    # ----------------------------------------------------------------------------------------------- hooks
    @override
    def on_fit_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if not self.pruner.changes_shapes and not self._warned:
            self._warned = True
            self.warn(f"mode={self.config.mode.value!r} zeroes weights but keeps dense shapes: dense CPU kernels run "
                      f"exactly as fast (measured x1.0). Use mode='structured' to make the model faster.")
        self.pruner.restore(self.target(pl_module))

    @override
    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self.pruner.maybe_snapshot(self.target(pl_module), trainer.global_step)
        with full_params(trainer):  # FSDP: act on gathered weights, write back to the shards
            self.pruner.reapply_masks(self.target(pl_module), cached=False)
        if self.interval == "step":
            self._maybe_prune(trainer, pl_module, trainer.global_step)

    @override
    def on_train_epoch_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if self.interval == "epoch":
            self._maybe_prune(trainer, pl_module, trainer.current_epoch)

    @override
    def on_train_batch_end(self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        with full_params(trainer):  # after the optimizer step: pruned weights moved, put them back to zero
            self.pruner.reapply_masks(self.target(pl_module), cached=not is_fsdp(trainer))
        self.pruner.maybe_snapshot(self.target(pl_module), trainer.global_step)
        if self.interval == "step":
            self._maybe_prune(trainer, pl_module, trainer.global_step)

    @override
    def on_fit_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        result = self.pruner.finish(self.target(pl_module), gather=lambda: full_params(trainer))
        self.log_metrics(trainer, result.metrics(self.pruner.sparsity, self.log_per_layer))
        self.info(f"sparsity {result.sparsity:.3f}, params {result.params:,}, non-zero {result.nonzero:,}")

    # ----------------------------------------------------------------------------------------------- helpers
    def _maybe_prune(self, trainer: Trainer, pl_module: LightningModule, position: int) -> None:
        broadcast = (lambda obj: trainer.strategy.broadcast(obj, src=0)) if trainer.world_size > 1 else None
        result = self.pruner.maybe_prune(self.target(pl_module), position, broadcast,
                                         gather=lambda: full_params(trainer))
        if result is None:
            return
        if self.pruner.changes_shapes:
            rebuild_optimizers(trainer, pl_module)
        if result.unshrunk:
            self.warn(f"step {position}: these targeted blocks did not shrink as scheduled: {result.unshrunk}.")
        self.log_metrics(trainer, result.metrics(self.pruner.sparsity, self.log_per_layer))


__all__ = ["MagnitudePruning"]
