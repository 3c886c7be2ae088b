"""``LatencyBudgetPruning``: prune inside ``Trainer.fit`` until the measured latency meets a target in milliseconds."""

from __future__ import annotations

import copy
from collections.abc import Sequence
from typing import Any

from torch import nn
from typing_extensions import override

from lightning_latency._compat import CallbackBase, MisconfigurationException, rank_zero_info, rank_zero_warn
from lightning_latency._target import check_model_attr, resolve_target
from lightning_latency.pruning.budget import (
    BudgetUnreachable,
    LatencyFn,
    LossFn,
    Move,
    SensitivityReport,
    _check_fractions,
    apply_moves,
    layer_sensitivity,
    plan_budget,
    prunable_units,
    unit_counts,
)
from lightning_latency.pruning.callback import _rebuild_optimizers, _reshape_pre_hook
from lightning_latency.pruning.structured import original_structure, set_original_structure


def _hf_loss(model: nn.Module, batch: Any) -> Any:
    return model(**batch).loss


def _p50_latency_fn(example_inputs: Any) -> LatencyFn:
    from lightning_latency.latency.measure import measure_latency

    return lambda model: measure_latency(model, example_inputs, max_time_s=2.0).p50_ms


class LatencyBudgetPruning(CallbackBase):
    """Remove heads and MLP neurons, cheapest loss per saved millisecond first, until ``latency_fn`` meets a target.

    At step ``start`` it measures :func:`~lightning_latency.pruning.layer_sensitivity` on the first
    ``calibration_batches`` training batches and plans the removals (:func:`plan_budget`). It then carries the plan
    out over ``steps`` pruning steps ``frequency`` steps apart, one removal at a time, measuring after each, and stops
    as soon as the measured latency is at most ``target_ms``; the rest of the fit recovers accuracy.

    Args:
        target_ms: the latency to reach, in ms, as ``latency_fn`` measures it (e.g. p50 at batch 1).
        example_inputs: the inputs the default ``latency_fn`` times (``measure_latency`` p50, eager). Pass
            ``latency_fn`` instead to time the deployment form (e.g. ``deploy`` + ``measure_latency``).
        latency_fn: ``latency_fn(model) -> ms``; called on deep copies during the sensitivity pass.
        loss_fn: ``loss_fn(model, batch) -> scalar`` for sensitivity; default ``model(**batch).loss`` (Hugging Face).
        start: global step of the sensitivity pass and the first pruning step.
        frequency: steps between pruning steps.
        steps: number of pruning steps the plan is spread over.
        calibration_batches: training batches kept for the sensitivity pass.
        fractions: removal fractions tried per unit.
        max_fraction: the most of any layer's heads or neurons that may be removed.
        model_attr: prune ``getattr(pl_module, model_attr)`` instead of ``compression_target``/the module.

    Raises:
        ValueError: a bad argument (constructor).
        MisconfigurationException: in ``setup``: a model with nothing to prune, or a target below the floor (every
            allowed removal applied), with the reachable latency in the message.

    Example::

        trainer = Trainer(max_steps=600, callbacks=[LatencyBudgetPruning(target_ms=8.0, example_inputs=batch1,
                                                                         start=100, frequency=50, steps=4)])
    """

    def __init__(
        self,
        target_ms: float,
        example_inputs: Any = None,
        latency_fn: LatencyFn | None = None,
        loss_fn: LossFn | None = None,
        start: int = 0,
        frequency: int = 10,
        steps: int = 4,
        calibration_batches: int = 4,
        fractions: Sequence[float] = (0.25, 0.5, 0.75),
        max_fraction: float = 0.75,
        model_attr: str | None = None,
    ) -> None:
        if isinstance(target_ms, bool) or not isinstance(target_ms, (int, float)) or target_ms <= 0:
            raise ValueError(f"`target_ms` must be a positive number of milliseconds, got {target_ms!r}. "
                             "E.g. target_ms=8.0 for p50 at most 8 ms.")
        if latency_fn is None and example_inputs is None:
            raise ValueError("LatencyBudgetPruning needs `example_inputs` (timed with measure_latency) or a "
                             "`latency_fn(model) -> ms`; got neither.")
        if latency_fn is not None and not callable(latency_fn):
            raise ValueError(f"`latency_fn` must be callable as latency_fn(model) -> ms, got {latency_fn!r}.")
        for name, value, low in (("start", start, 0), ("frequency", frequency, 1), ("steps", steps, 1),
                                 ("calibration_batches", calibration_batches, 1)):
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ValueError(f"`{name}` must be an int >= {low}, got {value!r}.")
        self.fractions = _check_fractions(fractions, max_fraction)
        self.target_ms = float(target_ms)
        self.latency_fn = latency_fn or _p50_latency_fn(example_inputs)
        self.loss_fn = loss_fn or _hf_loss
        self.start, self.frequency, self.steps = start, frequency, steps
        self.calibration_batches = calibration_batches
        self.max_fraction = max_fraction
        self.model_attr = check_model_attr(model_attr)
        self._calibration: list[Any] = []
        self._plan: list[Move] = []
        self._applied = 0
        self._done = False
        self._history: list[tuple[int, float]] = []
        self._original: dict[str, Any] = {}
        self._hook: Any = None
        self.report: SensitivityReport | None = None

    @property
    @override
    def state_key(self) -> str:
        return self._generate_state_key(target_ms=self.target_ms, start=self.start)

    @property
    def measured_ms(self) -> float | None:
        """The last measured latency (None before the first pruning step)."""
        return self._history[-1][1] if self._history else None

    @property
    def allocation(self) -> list[Move]:
        """The removals applied so far, in order."""
        return self._plan[: self._applied]

    @override
    def setup(self, trainer: Any, pl_module: Any, stage: str) -> None:
        model = self._model(pl_module)
        try:
            units = prunable_units(model)
        except ValueError as err:
            raise MisconfigurationException(str(err)) from err
        original_structure(model)
        if self._hook is None:
            self._hook = model.register_load_state_dict_pre_hook(_reshape_pre_hook)
        if self._plan or stage != "fit":
            return  # resumed: the floor was checked on the first run
        floor_model = copy.deepcopy(model)
        apply_moves(floor_model, [Move(b, k, self.max_fraction) for b, k in units])
        floor = min(float(self.latency_fn(floor_model)) for _ in range(3))  # optimistic: refuse only the impossible
        if floor > self.target_ms:
            raise MisconfigurationException(
                f"`target_ms`={self.target_ms:g} is below what pruning can reach: with `max_fraction`="
                f"{self.max_fraction:g} of every layer's heads and neurons removed the model measures {floor:.3f} "
                f"ms. Pass target_ms >= {floor:.3f}, raise max_fraction, or quantize as well."
            )

    @override
    def on_fit_start(self, trainer: Any, pl_module: Any) -> None:
        if self._original:
            set_original_structure(self._model(pl_module), self._original)

    @override
    def on_train_batch_end(self, trainer: Any, pl_module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
        if len(self._calibration) < self.calibration_batches and not self._plan:
            self._calibration.append(_detached(batch))
        step = trainer.global_step
        if self._done or step < self.start or (step - self.start) % self.frequency:
            return
        index = (step - self.start) // self.frequency
        if index >= self.steps and self._applied >= len(self._plan):
            return
        if not self._plan:
            self._make_plan(trainer, pl_module)
        self._prune(trainer, pl_module, index)

    @override
    def teardown(self, trainer: Any, pl_module: Any, stage: str) -> None:
        if self._hook is not None:
            self._hook.remove()
            self._hook = None

    @override
    def state_dict(self) -> dict[str, Any]:
        return {"plan": [(m.block, m.kind, m.fraction) for m in self._plan], "applied": self._applied,
                "done": self._done, "history": list(self._history), "original": self._original}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._plan = [Move(b, k, f) for b, k, f in state_dict.get("plan", [])]
        self._applied = state_dict.get("applied", 0)
        self._done = state_dict.get("done", False)
        self._history = [tuple(h) for h in state_dict.get("history", [])]
        self._original = dict(state_dict.get("original", {}))

    # ----------------------------------------------------------------------------------------------- helpers

    def _model(self, pl_module: nn.Module) -> nn.Module:
        return resolve_target(pl_module, self.model_attr)

    def _make_plan(self, trainer: Any, pl_module: Any) -> None:
        model = self._model(pl_module)
        self.report = layer_sensitivity(model, self.loss_fn, self._calibration or [], self.fractions,
                                        self.latency_fn, self.max_fraction)
        try:
            plan = plan_budget(self.report, self.target_ms)
        except BudgetUnreachable as err:  # prediction says no; the measurement may still get there
            rank_zero_warn(f"LatencyBudgetPruning: {err} Applying every allowed removal.")
            plan = _every_level(self.report)
        rows = [(m.block, m.kind, m.fraction) for m in plan]
        if trainer.world_size > 1:  # one plan for all ranks: rank 0's measurements decide
            rows = trainer.strategy.broadcast(rows, src=0)
        self._plan = [Move(*r) for r in rows]
        self._calibration = []
        rank_zero_info(f"LatencyBudgetPruning: target {self.target_ms:g} ms, dense {self.report.base_ms:.3f} ms; "
                       f"{len(self._plan)} removals planned\n{self.report.format()}")

    def _prune(self, trainer: Any, pl_module: Any, index: int) -> None:
        model = self._model(pl_module)
        remaining = len(self._plan) - self._applied
        chunk = remaining if index >= self.steps - 1 else -(-remaining // (self.steps - index))
        measured = None
        for _ in range(chunk):
            apply_moves(model, [self._plan[self._applied]])
            self._applied += 1
            measured = self._measure(model)
            if trainer.world_size > 1:
                measured = float(trainer.strategy.broadcast(measured, src=0))
            if measured <= self.target_ms:
                self._done = True
                break
        if measured is None:
            return
        self._original = original_structure(model)
        self._history.append((trainer.global_step, measured))
        _rebuild_optimizers(trainer, pl_module)
        self._log(trainer, model, measured)
        if not self._done and self._applied >= len(self._plan):
            rank_zero_warn(f"LatencyBudgetPruning: every planned removal applied and the model measures "
                           f"{measured:.3f} ms, above `target_ms`={self.target_ms:g}. Savings were smaller than "
                           "the sensitivity pass predicted; quantize as well or raise max_fraction.")
            self._done = True

    def _measure(self, model: nn.Module) -> float:
        """One measurement; one under the target is confirmed by the median of three, so one lucky run on a busy
        machine does not stop the pruning early."""
        first = float(self.latency_fn(model))
        if first > self.target_ms:
            return first
        return sorted([first, float(self.latency_fn(model)), float(self.latency_fn(model))])[1]

    def _log(self, trainer: Any, model: nn.Module, measured: float) -> None:
        if trainer.global_rank != 0 or not trainer.loggers:
            return
        metrics = {"budget/target_ms": self.target_ms, "budget/measured_ms": measured,
                   "budget/removals": float(self._applied)}
        for (block, kind), kept in unit_counts(model).items():
            metrics[f"budget/{block}/{kind}"] = float(kept)
        for logger in trainer.loggers:
            logger.log_metrics(metrics, step=trainer.global_step)


def _every_level(report: SensitivityReport) -> list[Move]:
    return [Move(r.block, r.kind, r.fraction) for r in sorted(report.rows, key=lambda r: (r.fraction, r.block))]


def _detached(batch: Any) -> Any:
    if hasattr(batch, "detach"):
        return batch.detach().clone()
    if isinstance(batch, dict):
        return {k: _detached(v) for k, v in batch.items()}
    if isinstance(batch, (list, tuple)):
        return type(batch)(_detached(v) for v in batch)
    return batch


__all__ = ["LatencyBudgetPruning"]
