"""``LatencyMonitor``: when to measure; a :class:`~lightning_latency.latency.recorder.LatencyRecorder` measures and
keeps the state. Only global rank 0 measures and logs; the other ranks wait at a barrier, so all ranks leave each
measurement together and every decision depends only on counters all ranks share.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable
from pathlib import Path
from typing import Any

from typing_extensions import override

from lightning_latency._compat import LightningModule, MisconfigurationException, Trainer
from lightning_latency.base import CompressionCallback, StrategyKind
from lightning_latency.latency._inputs import batch_to_model_inputs, example_inputs, first_batch
from lightning_latency.latency.config import LatencyConfig
from lightning_latency.latency.data_parallel import measure_data_parallel
from lightning_latency.latency.final import final_backend, parse_deploy_final
from lightning_latency.latency.measure import measure_latency
from lightning_latency.latency.recorder import DEFAULT_MONITOR_CONFIG, LatencyRecorder, RecorderField
from lightning_latency.latency.recorder import check_monitor_arguments, monitor_config, summary_table


class LatencyMonitor(CompressionCallback):
    """Measure the inference latency of the model being trained, and log how it changes.

    Measures a baseline before the first optimizer step, optionally every ``every_n_val_epochs`` validation epochs,
    and at fit end; logs ``latency/*`` metrics, prints a baseline vs final table and writes ``latency_report.json``
    into the log dir. Models with ``generate`` also get TTFT, TPOT and tokens/s. The state (``records``,
    ``baseline_done`` …) is :attr:`recorder`'s, a :class:`LatencyRecorder`, and goes into the checkpoint.

    Args:
        inputs: example inputs (tensor, tuple, dict of tensors, or a callable building them); None takes the first
            validation batch (or the first training batch if there is no validation) through :meth:`batch_to_inputs`.
        batch_to_inputs: ``batch -> inputs`` (or override the method); default: dict batches without ``labels``,
            element 0 of tuples.
        model_attr: attribute (dotted path allowed) to measure, e.g. ``"model"``; None: ``compression_target`` when
            defined (a ``DistillationModule``'s student), else the LightningModule itself.
        config: measurement settings; None: a budgeted default (about first call + ≤1 s per measurement).
        every_n_val_epochs: also measure after every N-th validation epoch; 0 disables.
        generation: measure ``generate`` (TTFT/TPOT); None does so when the module has ``generate``.
        prompt_len, new_tokens: generation shape: prompt length (cut from the inputs' ``input_ids``), new tokens (>=2).
        measure_final, report_file: measure at fit end; the JSON file name in the log dir (None: no file).
        warmup, min_runs, max_time_s, threads, device, compile: shortcuts overriding the same fields of ``config``.
        data_parallel: multi-process runs: every rank also times its replica at the same moment; rank 0 logs the
            summed samples/s (``latency/dp_*``; throughput, not one request's latency).
        deploy_final: the final form when a callback ``compresses`` or the model is quantized: None (default)
            :func:`~lightning_latency.quantization.deploy`'s default (the ``deploy_config()`` backend, e.g. x86 int8
            compiled; compiled fp32 for pruning alone), ``"auto"``, a backend name, or False (the model as is). The
            copy is timed on the baseline's inputs (``form`` ``"deployed <backend>"``); the as-is figure stays as
            ``eager`` (``latency/eager_p50_ms``; an ``(eager)``/``(compiled)`` row described by ``eager_form``).

    Example::

        trainer = Trainer(callbacks=[LatencyMonitor(model_attr="model", every_n_val_epochs=1)])
        trainer.fit(module)
    """

    # the recorder's: per-run state, settings, and what is derived from the records
    baseline_done = RecorderField()
    val_epochs = RecorderField()
    records = RecorderField()
    overhead_s = RecorderField()
    baseline = RecorderField()  # the baseline record, on rank 0
    metrics = RecorderField()  # record -> latency/* metrics, speed-ups against the baseline
    reports = RecorderField()  # () -> phase -> LatencyReport ("<phase>/generation": GenerationReport)
    config = RecorderField()
    generation = RecorderField()
    prompt_len = RecorderField()
    new_tokens = RecorderField()

    def __init__(self, inputs: Any = None, batch_to_inputs: Callable[[Any], Any] | None = None,
                 model_attr: str | None = None, config: LatencyConfig | None = None, every_n_val_epochs: int = 0,
                 generation: bool | None = None, prompt_len: int = 32, new_tokens: int = 8, measure_final: bool = True,
                 report_file: str | None = "latency_report.json", warmup: int | None = None,
                 min_runs: int | None = None, max_time_s: float | None = None, threads: int | None = None,
                 device: str | None = None, compile: bool | None = None, data_parallel: bool = False,
                 deploy_final: bool | str | None = None) -> None:
        super().__init__(model_attr)
        check_monitor_arguments(batch_to_inputs, every_n_val_epochs, report_file, data_parallel)
        self.deploy_final = parse_deploy_final(deploy_final)
        config = monitor_config(config, warmup=warmup, min_runs=min_runs, max_time_s=max_time_s, threads=threads,
                                device=device, compile=compile)
        self.core = self.recorder = LatencyRecorder(config, generation, prompt_len, new_tokens, info=self.info, warn=self.warn)
        self.inputs, self._batch_to_inputs = inputs, batch_to_inputs
        self.every_n_val_epochs, self.measure_final = every_n_val_epochs, measure_final
        self.report_file, self.data_parallel = report_file, data_parallel
        self._resolved: Any = None

    @property
    @override
    def state_key(self) -> str:
        return self._generate_state_key(model_attr=self.model_attr, every_n_val_epochs=self.every_n_val_epochs)

    def batch_to_inputs(self, batch: Any) -> Any:
        """Map a dataloader batch to model inputs; override in a subclass or pass ``batch_to_inputs=``."""
        return (self._batch_to_inputs or batch_to_model_inputs)(batch)

    @override
    def strategy_problem(self, kind: StrategyKind, pl_module: Any = None) -> str | None:
        # A sharded forward all-gathers its weights on every rank: rank 0 timing it alone would wait forever for
        # the others, and ranks timing it together would each run a different number of calls.
        return None if kind != "fsdp" else (
            "cannot time an FSDP-sharded model inside fit. Measure the trained model unsharded after fit (save a "
            "full checkpoint, load it into one process, call measure_latency), or train the run you want to "
            "monitor under DDP (lightning_latency.ddp_strategy).")

    @override
    def validate(self, trainer: Trainer, pl_module: LightningModule, target: Any, stage: str) -> None:
        if self.generation and not callable(getattr(target, "generate", None)):
            raise ValueError(f"`generation=True` but {type(target).__name__} has no `generate` method. Pass "
                             "generation=None (auto) or False, or point model_attr at the generative model.")

    # ------------------------------------------------------------------ hooks
    @override
    def on_fit_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if not self.baseline_done and self.inputs is not None:
            self._measure_phase(trainer, pl_module, "baseline", batch=None)

    @override
    def on_validation_batch_start(self, trainer: Trainer, pl_module: LightningModule, batch: Any, batch_idx: int,
                                  dataloader_idx: int = 0) -> None:
        if not self.baseline_done:  # first validation batch (sanity check) comes before any optimizer step
            self._measure_phase(trainer, pl_module, "baseline", batch=batch)

    @override
    def on_train_batch_start(self, trainer: Trainer, pl_module: LightningModule, batch: Any, batch_idx: int) -> None:
        if not self.baseline_done:
            val = first_batch(getattr(trainer, "val_dataloaders", None))
            self._measure_phase(trainer, pl_module, "baseline", batch=val if val is not None else batch)

    @override
    def on_validation_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        phase = None if trainer.sanity_checking else self.recorder.validation_epoch_done(self.every_n_val_epochs)
        if phase is not None:
            self._measure_phase(trainer, pl_module, phase, batch=None)

    @override
    def on_fit_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if self.measure_final:
            self._measure_phase(trainer, pl_module, "final", batch=None, final=True)
        folder = Path(trainer.log_dir or trainer.default_root_dir)  # on every rank: log_dir broadcasts
        if trainer.is_global_zero:
            for logger in trainer.loggers:
                logger.save()  # on_fit_end runs after the loop's last flush
            self.recorder.finish(folder / self.report_file if self.report_file else None, model_attr=self.model_attr)
        trainer.strategy.barrier("LatencyMonitor.on_fit_end")

    # ------------------------------------------------------------------ helpers
    def _resolve_inputs(self, trainer: Trainer, batch: Any) -> Any:
        if self._resolved is None:  # once: every measurement times the same inputs
            loaders = (first_batch(getattr(trainer, name, None)) for name in ("val_dataloaders", "train_dataloader"))
            self._resolved = example_inputs(self.inputs, itertools.chain([batch], loaders), self.batch_to_inputs)
            if self._resolved is None:
                raise MisconfigurationException("LatencyMonitor found no batch to build inputs from. Pass "
                                                "`inputs=` (e.g. inputs={'input_ids': ids}).")
        return self._resolved

    def _measure_phase(self, trainer: Trainer, pl_module: LightningModule, phase: str, batch: Any,
                       final: bool = False) -> None:
        rec, module = self.recorder, self.target(pl_module)
        if phase == "baseline":
            rec.baseline_done = True  # on every rank, before the barrier: decisions stay identical across ranks
        record = None
        if trainer.is_global_zero:
            with rec.timing():
                try:
                    backend, deploy_config = (final_backend(module, trainer.callbacks, self.deploy_final) if final
                                              else (None, None))
                    record = rec.measure(module, self._resolve_inputs(trainer, batch), phase, trainer.global_step,
                                         trainer.current_epoch, backend, deploy_config)
                except MisconfigurationException:
                    raise
                except Exception as err:  # a monitor must not kill a fit: report and carry on
                    self.warn(f"the {phase} measurement failed ({type(err).__name__}: {err}).")
        trainer.strategy.barrier(f"LatencyMonitor.{phase}")
        if self.data_parallel:
            with rec.timing():  # collective: every rank; each times rank 0's inputs= or its own first batch
                dp = measure_data_parallel(
                    lambda: measure_latency(module, self._resolve_inputs(trainer, batch), rec.config),
                    int(trainer.world_size), lambda t: trainer.strategy.all_gather(t.to(trainer.strategy.root_device)),
                    self.warn)
            if record is not None and dp is not None:
                record["data_parallel"] = dp
        if trainer.is_global_zero and record is not None:
            self.log_metrics(trainer, rec.add(record))


__all__ = ["DEFAULT_MONITOR_CONFIG", "LatencyMonitor", "summary_table"]
