"""``LatencyBudgetPruning``: runs a :class:`~lightning_latency.pruning.budget_pruner.BudgetPruner` inside
``Trainer.fit`` until the measured latency meets a target in milliseconds."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from torch import nn
from typing_extensions import override

from lightning_latency._compat import LightningModule, Trainer
from lightning_latency._deprecation import renamed
from lightning_latency.base import CompressionCallback, StrategyKind
from lightning_latency.latency.final import DeployedLatency, deployed_latency_fn
from lightning_latency.pruning.budget import LatencyFn, LossFn, Move, SensitivityReport
from lightning_latency.pruning.budget_pruner import BudgetPruner
from lightning_latency.pruning.optim import rebuild_optimizers, register_reshape_hook, shape_change_problem


def _from_rank_zero(trainer: Trainer) -> Any:  # rank 0's value on every rank: one plan, measurement, choice
    return (lambda obj: trainer.strategy.broadcast(obj, src=0)) if trainer.world_size > 1 else None


def _p50_latency_fn(example_inputs: Any) -> LatencyFn:
    from lightning_latency.latency.measure import measure_latency

    return lambda model: measure_latency(model, example_inputs, max_time_s=2.0).p50_ms


class LatencyBudgetPruning(CompressionCallback):
    """Remove heads, MLP neurons (and layers), cheapest loss per saved ms first, until ``latency_fn`` meets a target.

    At step ``start_step`` it measures :func:`~lightning_latency.pruning.layer_sensitivity` on the first
    ``calibration_batches`` training batches and plans the removals (:func:`plan_budget`). It then carries the plan
    out over ``steps`` pruning steps ``every_n_steps`` apart, one removal at a time, measuring after each, and stops
    as soon as the measured latency is at most ``target_ms``; the rest of the fit recovers accuracy.

    Args:
        target_ms: the latency to reach, in ms, as ``latency_fn`` measures it (e.g. p50 at batch 1).
        target_tokens_per_s: instead of ``target_ms``, a decode speed for causal LMs: the target is a TPOT of
            ``1000 / target_tokens_per_s`` ms, timed by ``latency_fn`` (default with ``example_inputs`` = a prompt:
            :func:`~lightning_latency.latency.decode_latency_fn`, greedy ``generate`` at batch 1).
        example_inputs: the inputs the default ``latency_fn`` times (``measure_latency`` p50, eager). Pass
            ``deploy_backend`` to time the deployment form instead, or your own ``latency_fn``.
        latency_fn: ``latency_fn(model) -> ms``; called on deep copies during the sensitivity pass.
        loss_fn: ``loss_fn(model, batch) -> scalar`` for sensitivity; default ``model(**batch).loss`` (Hugging Face).
        start_step: global step of the sensitivity pass and the first pruning step.
        every_n_steps: steps between pruning steps.
        steps: number of pruning steps the plan is spread over.
        calibration_batches: training batches kept for the sensitivity pass.
        fractions: removal fractions tried per unit.
        max_fraction: the most of any layer's heads or neurons that may be removed.
        model_attr: prune ``getattr(pl_module, model_attr)`` instead of ``compression_target``/the module.
        deploy_backend: with ``example_inputs``, time every candidate in that deployment form
            (:func:`~lightning_latency.latency.deployed_latency_fn`: ``"ort_int8"``, ``"ort"``, ``"x86"``, ...): the
            budget is then met by the model as it ships. Forms that build in seconds (the ONNX Runtime ones) suit
            the sensitivity pass, which deploys one copy per unit and fraction. Every measurement is timed side
            by side with the deployed model the fit started from and given on the scale of that model's p50 at
            setup (:class:`~lightning_latency.latency.final.DeployedLatency`), so machine drift during the fit does
            not move the budget.
        depth: also remove whole layers (all but the first of each stack), priced by the same loss per saved ms:
            at batch 1 a layer's fixed cost is much of its time, and only depth removes it.
        start, frequency: deprecated names of ``start_step``, ``every_n_steps``.

    Raises:
        ValueError: a bad argument (constructor).
        MisconfigurationException: in ``setup``: a model with nothing to prune, or a target below the floor (every
            allowed removal applied), with the reachable latency in the message.

    Example::

        trainer = Trainer(max_steps=600, callbacks=[LatencyBudgetPruning(target_ms=8.0, example_inputs=batch1,
                                                                         start_step=100, every_n_steps=50, steps=4)])
    """

    compresses = True

    def __init__(
        self,
        target_ms: float | None = None,
        example_inputs: Any = None,
        latency_fn: LatencyFn | None = None,
        loss_fn: LossFn | None = None,
        start_step: int = 0,
        every_n_steps: int = 10,
        steps: int = 4,
        calibration_batches: int = 4,
        fractions: Sequence[float] = (0.25, 0.5, 0.75),
        max_fraction: float = 0.75,
        model_attr: str | None = None,
        deploy_backend: str | None = None,
        depth: bool = False,
        target_tokens_per_s: float | None = None,
        start: int | None = None,
        frequency: int | None = None,
    ) -> None:
        super().__init__(model_attr)
        start_step = renamed(self.name, "start", start, "start_step", start_step, 0)
        every_n_steps = renamed(self.name, "frequency", frequency, "every_n_steps", every_n_steps, 10)
        if target_tokens_per_s is not None:
            if target_ms is not None:
                raise ValueError(f"pass `target_ms` or `target_tokens_per_s`, not both (got {target_ms!r} and "
                                 f"{target_tokens_per_s!r}).")
            if isinstance(target_tokens_per_s, bool) or not isinstance(target_tokens_per_s, (int, float)) or \
                    target_tokens_per_s <= 0:
                raise ValueError(f"`target_tokens_per_s` must be a positive number, got {target_tokens_per_s!r}. "
                                 "E.g. target_tokens_per_s=40.0 for decoding at 40 tokens/s or faster.")
            if deploy_backend is not None:
                raise ValueError("`deploy_backend` times one forward of an encoder; a tokens/s budget times decoding. "
                                 "Pass latency_fn=decode_latency_fn(prompt) (or example_inputs=prompt) instead.")
            target_ms = 1000.0 / float(target_tokens_per_s)
            if latency_fn is None and example_inputs is not None:
                from lightning_latency.latency.generation import decode_latency_fn

                latency_fn = decode_latency_fn(example_inputs)
        if isinstance(target_ms, bool) or not isinstance(target_ms, (int, float)) or target_ms <= 0:
            raise ValueError(f"`target_ms` must be a positive number of milliseconds, got {target_ms!r}. "
                             "E.g. target_ms=8.0 for p50 at most 8 ms.")
        if deploy_backend is not None:
            if latency_fn is not None or example_inputs is None:
                raise ValueError(f"`deploy_backend`={deploy_backend!r} times the deployment form on `example_inputs`: "
                                 "pass example_inputs with it, and no latency_fn (a latency_fn decides the timing).")
            latency_fn = deployed_latency_fn(example_inputs, deploy_backend)
        if latency_fn is None and example_inputs is None:
            raise ValueError("LatencyBudgetPruning needs `example_inputs` (timed with measure_latency) or a "
                             "`latency_fn(model) -> ms`; got neither.")
        if latency_fn is not None and not callable(latency_fn):
            raise ValueError(f"`latency_fn` must be callable as latency_fn(model) -> ms, got {latency_fn!r}.")
        if not isinstance(depth, bool):
            raise ValueError(f"`depth` must be True or False, got {depth!r}.")
        for name, value, low in (("start_step", start_step, 0), ("every_n_steps", every_n_steps, 1),
                                 ("steps", steps, 1), ("calibration_batches", calibration_batches, 1)):
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ValueError(f"`{name}` must be an int >= {low}, got {value!r}.")
        self.pruner = BudgetPruner(target_ms, latency_fn or _p50_latency_fn(example_inputs), loss_fn, start_step,
                                   every_n_steps, steps, calibration_batches, fractions, max_fraction, depth)
        self.core = self.pruner  # checkpoints hold its state_dict (see CompressionCallback.core)
        self.tokens_per_s = target_tokens_per_s is not None

    @property
    @override
    def state_key(self) -> str:
        return self._generate_state_key(target_ms=self.pruner.target_ms, start=self.pruner.start_step)

    @property
    def target_ms(self) -> float:
        return self.pruner.target_ms

    @property
    def measured_ms(self) -> float | None:
        """The last measured latency (None before the first pruning step)."""
        return self.pruner.measured_ms

    @property
    def allocation(self) -> list[Move]:
        """The removals applied so far, in order."""
        return self.pruner.allocation

    @property
    def history(self) -> list[tuple[int, float]]:
        """``(global step, measured ms)`` after every pruning step."""
        return self.pruner.history


    @property
    def report(self) -> SensitivityReport | None:
        """The sensitivity pass (None before ``start_step``, and after a resume)."""
        return self.pruner.report

    # ----------------------------------------------------------------------------------------------- contract
    @override
    def validate(self, trainer: Trainer, pl_module: LightningModule, target: nn.Module, stage: str) -> None:
        fn = self.pruner.latency_fn
        if stage == "fit" and isinstance(fn, DeployedLatency) and fn.anchor_ms is None:
            fn.anchor(target)  # the model the fit starts from (dense, also on a resume: weights load later)
        self.pruner.check(target, measure_floor=stage == "fit", broadcast=_from_rank_zero(trainer))
        self.add_hook(register_reshape_hook(target))  # Lightning restores the model before the callbacks

    @override
    def strategy_problem(self, kind: StrategyKind, pl_module: nn.Module | None = None) -> str | None:
        return shape_change_problem(kind, pl_module, "latency-budget pruning")

    # ----------------------------------------------------------------------------------------------- hooks
    @override
    def on_fit_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self.pruner.restore(self.target(pl_module))

    @override
    def on_train_batch_end(self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        self.pruner.collect(batch)
        model = self.target(pl_module)
        measured = self.pruner.maybe_prune(model, trainer.global_step, _from_rank_zero(trainer), self.info, self.warn)
        if measured is not None:
            rebuild_optimizers(trainer, pl_module)
            metrics = self.pruner.metrics(model, measured)
            if self.tokens_per_s:  # the budget was given as decode speed: log it as such too
                metrics.update({"budget/target_tokens_per_s": 1000.0 / self.pruner.target_ms,
                                "budget/measured_tokens_per_s": 1000.0 / measured})
            self.log_metrics(trainer, metrics)


__all__ = ["LatencyBudgetPruning"]
