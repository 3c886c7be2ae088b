"""``LatencyMonitor``: measure inference latency at fit start (baseline), every N validation epochs, and at fit end.

The callback only decides *when* to measure and *what to log*; :func:`measure_latency` and
:func:`measure_generation` do the measuring. Only global rank 0 measures and logs; the other ranks wait at a barrier,
so all ranks leave each measurement together and every decision depends only on counters all ranks share.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn
from typing_extensions import override

from lightning_latency._compat import CallbackBase, MisconfigurationException, rank_zero_info, rank_zero_warn
from lightning_latency._target import check_model_attr, resolve_target
from lightning_latency.latency._inputs import token_ids_of
from lightning_latency.latency.generation import GenerationReport, measure_generation
from lightning_latency.latency.measure import LatencyConfig, LatencyReport, measure_latency
from lightning_latency.strategies import is_fsdp

# A fixed cost per measurement (12 forwards for a fast model, at most first call + 1 s for a slow one), so baseline +
# final stay under 2% of any fit longer than about a minute; raise min_runs / max_time_s for steadier numbers.
DEFAULT_MONITOR_CONFIG = LatencyConfig(warmup=2, min_runs=10, min_time_s=0.05, max_time_s=1.0)

_FORWARD_KEYS = {"p50_ms": "median_ms", "p90_ms": "p90_ms", "p99_ms": "p99_ms", "mean_ms": "mean_ms",
                 "min_ms": "min_ms", "iqr_ms": "iqr_ms", "samples_per_s": "samples_per_s",
                 "tokens_per_s": "tokens_per_s", "model_mb": "model_mb", "num_params": "num_params",
                 "nonzero_params": "nonzero_params", "peak_memory_mb": "peak_memory_mb", "mbu": "mbu",
                 "mfu": "mfu", "count": "count"}
# Generation metrics get their own names: a generative model is timed both ways, and the forward pass's
# tokens/s and MBU must not be overwritten by decode's.
_GEN_KEYS = {"ttft_ms": "ttft_ms", "tpot_ms": "tpot_ms", "gen_tokens_per_s": "tokens_per_s", "decode_mbu": "mbu",
             "kv_cache_mb": "kv_cache_mb"}


def _default_batch_to_inputs(batch: Any) -> Any:
    if isinstance(batch, Mapping):
        return {k: v for k, v in batch.items() if k not in ("labels", "label")}
    if isinstance(batch, (tuple, list)):
        return batch[0]
    return batch


def _first_batch(loaders: Any) -> Any:
    if loaders is None:
        return None
    if isinstance(loaders, (list, tuple)):
        loaders = loaders[0] if loaders else None
    elif isinstance(loaders, Mapping):
        loaders = next(iter(loaders.values()), None)
    if loaders is None:
        return None
    try:
        return next(iter(loaders))
    except (StopIteration, TypeError):
        return None


def _detach_cpu(obj: Any) -> Any:
    if isinstance(obj, torch.Tensor):
        return obj.detach().cpu()
    if isinstance(obj, Mapping):
        return {k: _detach_cpu(v) for k, v in obj.items()}
    if isinstance(obj, (tuple, list)):
        return type(obj)(_detach_cpu(v) for v in obj)
    return obj


class LatencyMonitor(CallbackBase):
    """Measure the inference latency of the model being trained, and log how it changes.

    Measures a baseline before the first optimizer step, optionally every ``every_n_val_epochs`` validation epochs,
    and a final measurement at fit end; logs ``latency/*`` metrics through the Trainer's loggers, prints a baseline
    vs final table and writes ``latency_report.json`` into the run's log dir. Models with ``generate`` also get TTFT,
    TPOT and tokens/s.

    Args:
        inputs: example inputs (tensor, tuple, dict of tensors, or a callable building them); None takes the first
            validation batch (or the first training batch if there is no validation) through :meth:`batch_to_inputs`.
        batch_to_inputs: ``batch -> inputs``; default drops ``labels`` from dict batches and takes element 0 of tuples.
            Subclasses may override the method of the same name instead.
        model_attr: attribute (dotted path allowed) of the LightningModule to measure, e.g. ``"model"`` or
            ``"student"``; None measures ``pl_module.compression_target`` when the module defines it (a
            ``DistillationModule``: the student), else the LightningModule itself.
        config: measurement settings; None uses a budgeted default (about first call + ≤1 s per measurement).
        every_n_val_epochs: also measure after every N-th validation epoch; 0 disables.
        generation: measure ``generate`` (TTFT/TPOT); None does so when the module has ``generate``.
        prompt_len: prompt length for generation (prompts are cut from the inputs' ``input_ids`` when given).
        new_tokens: output tokens per generation call (>= 2).
        measure_final: measure at fit end.
        report_file: JSON file name in the log dir; None writes no file.
        warmup, min_runs, max_time_s, threads, device, compile: shortcuts overriding the same fields of ``config``
            (handy in YAML recipes).
        deploy_final: what the final measurement times once QAT or pruning ran: None (default) the deployment form
            :func:`~lightning_latency.quantization.deploy` builds by default (the QAT config's backend, e.g. PT2E
            x86 int8 compiled; the float model compiled for pruning alone), ``"auto"`` the form deploy chooses by
            measurement, a backend name to force one, or False for the model as it is (eager). The deployed form is
            built on a copy, timed on the baseline's inputs with the same settings, and recorded as phase
            ``"final"`` with its ``form`` (``"deployed x86"``); the eager figure stays in the record as ``eager``
            (logged as ``latency/eager_p50_ms``, shown as an ``(eager)`` row).
        data_parallel: under a multi-process strategy, after each single-device measurement every rank also
            times its own replica at the same moment; the per-rank samples/s are gathered and rank 0 logs their
            sum as ``latency/dp_samples_per_s`` (with ``latency/dp_world_size`` and the slowest rank's
            ``latency/dp_p50_ms_max``). This is data-parallel *throughput*, not the latency of one request; on
            CPU the ranks share cores, so it can be below one rank's throughput times the number of ranks.

    Example::

        trainer = Trainer(callbacks=[LatencyMonitor(model_attr="model", every_n_val_epochs=1)])
        trainer.fit(module)
    """

    def __init__(
        self,
        inputs: Any = None,
        batch_to_inputs: Callable[[Any], Any] | None = None,
        model_attr: str | None = None,
        config: LatencyConfig | None = None,
        every_n_val_epochs: int = 0,
        generation: bool | None = None,
        prompt_len: int = 32,
        new_tokens: int = 8,
        measure_final: bool = True,
        report_file: str | None = "latency_report.json",
        warmup: int | None = None,
        min_runs: int | None = None,
        max_time_s: float | None = None,
        threads: int | None = None,
        device: str | None = None,
        compile: bool | None = None,
        data_parallel: bool = False,
        deploy_final: bool | str | None = None,
    ) -> None:
        if config is not None and not isinstance(config, LatencyConfig):
            raise ValueError(f"`config` must be a LatencyConfig or None, got {type(config).__name__}. "
                             "E.g. config=LatencyConfig(max_time_s=1.0).")
        if batch_to_inputs is not None and not callable(batch_to_inputs):
            raise ValueError(f"`batch_to_inputs` must be a callable batch -> inputs, got {batch_to_inputs!r}. "
                             "E.g. batch_to_inputs=lambda b: b['input_ids'].")
        check_model_attr(model_attr)
        if data_parallel not in (True, False):
            raise ValueError(f"`data_parallel` must be True or False, got {data_parallel!r}. Pass data_parallel=True "
                             "to also measure every rank's replica at once and log the summed throughput.")
        for name, value, low in (("every_n_val_epochs", every_n_val_epochs, 0), ("prompt_len", prompt_len, 1),
                                 ("new_tokens", new_tokens, 2)):
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ValueError(f"`{name}` must be an integer >= {low}, got {value!r}. E.g. {name}={max(low, 1)}"
                                 + (" (0 disables)." if name == "every_n_val_epochs" else "."))
        if generation not in (None, True, False):
            raise ValueError(f"`generation` must be None (auto), True or False, got {generation!r}.")
        if report_file is not None and (not isinstance(report_file, str) or not report_file or "/" in report_file):
            raise ValueError(f"`report_file` must be a plain file name or None, got {report_file!r}. "
                             "E.g. report_file='latency_report.json'.")
        if deploy_final is True:
            deploy_final = None
        if deploy_final is not None and deploy_final is not False and not isinstance(deploy_final, str):
            raise ValueError(f"`deploy_final` must be None (the default deployment form), 'auto', a backend name or "
                             f"False, got {deploy_final!r}. E.g. deploy_final='auto'.")
        if isinstance(deploy_final, str):
            from lightning_latency.quantization.config import Backend, parse_enum

            deploy_final = parse_enum(Backend, deploy_final, "deploy_final").value
        self.deploy_final = deploy_final
        self._deploy_config: Any = None
        overrides = {k: v for k, v in dict(warmup=warmup, min_runs=min_runs, max_time_s=max_time_s, threads=threads,
                                           device=device, compile=compile).items() if v is not None}
        base = config or DEFAULT_MONITOR_CONFIG
        if isinstance(overrides.get("max_time_s"), (int, float)) and 0 <= overrides["max_time_s"] < base.min_time_s:
            overrides["min_time_s"] = overrides["max_time_s"]
        self.config = base.replace(**overrides)  # validates (ValueError names the field)
        self.inputs = inputs
        self._batch_to_inputs = batch_to_inputs
        self.model_attr = model_attr
        self.every_n_val_epochs = every_n_val_epochs
        self.generation = generation
        self.prompt_len, self.new_tokens = prompt_len, new_tokens
        self.measure_final = measure_final
        self.report_file = report_file
        self.data_parallel = data_parallel
        self._resolved: Any = None  # inputs actually used (CPU copy), kept so every measurement sees the same ones
        # state that survives checkpoints (identical on all ranks except the reports, which only rank 0 has)
        self.baseline_done = False
        self.val_epochs = 0
        self.records: list[dict[str, Any]] = []
        self.overhead_s = 0.0

    # ------------------------------------------------------------------ hooks
    @property
    @override
    def state_key(self) -> str:
        return self._generate_state_key(model_attr=self.model_attr, every_n_val_epochs=self.every_n_val_epochs)

    def batch_to_inputs(self, batch: Any) -> Any:
        """Map a dataloader batch to model inputs; override in a subclass or pass ``batch_to_inputs=``."""
        fn = self._batch_to_inputs or _default_batch_to_inputs
        return fn(batch)

    @override
    def setup(self, trainer: Any, pl_module: Any, stage: str) -> None:
        self._target(pl_module)  # fail early on a wrong model_attr
        if is_fsdp(trainer):
            # A sharded module's forward all-gathers its weights on every rank: rank 0 timing it alone would wait
            # forever for the others, and ranks timing it together would each run a different number of calls.
            raise MisconfigurationException(
                "LatencyMonitor cannot time an FSDP-sharded model inside fit. Measure the trained model unsharded "
                "after fit (save a full checkpoint, load it into one process, call measure_latency), or train the "
                "run you want to monitor under DDP (lightning_latency.ddp_strategy).")

    @override
    def on_fit_start(self, trainer: Any, pl_module: Any) -> None:
        if not self.baseline_done and self.inputs is not None:
            self._measure_phase(trainer, pl_module, "baseline", batch=None)

    @override
    def on_validation_batch_start(self, trainer: Any, pl_module: Any, batch: Any, batch_idx: int,
                                  dataloader_idx: int = 0) -> None:
        if not self.baseline_done:  # first validation batch (sanity check) comes before any optimizer step
            self._measure_phase(trainer, pl_module, "baseline", batch=batch)

    @override
    def on_train_batch_start(self, trainer: Any, pl_module: Any, batch: Any, batch_idx: int) -> None:
        if not self.baseline_done:
            val = _first_batch(getattr(trainer, "val_dataloaders", None))
            self._measure_phase(trainer, pl_module, "baseline", batch=val if val is not None else batch)

    @override
    def on_validation_epoch_end(self, trainer: Any, pl_module: Any) -> None:
        if trainer.sanity_checking or self.every_n_val_epochs == 0:
            return
        self.val_epochs += 1
        if self.val_epochs % self.every_n_val_epochs == 0:
            self._measure_phase(trainer, pl_module, f"val_epoch_{self.val_epochs}", batch=None)

    @override
    def on_fit_end(self, trainer: Any, pl_module: Any) -> None:
        if self.measure_final:
            self._measure_phase(trainer, pl_module, "final", batch=None,
                                deploy_backend=self._deploy_backend(trainer, pl_module))
        folder = Path(trainer.log_dir or trainer.default_root_dir)  # on every rank: log_dir broadcasts
        if trainer.is_global_zero:
            self._finish(trainer, folder)
        trainer.strategy.barrier("LatencyMonitor.on_fit_end")

    @override
    def state_dict(self) -> dict[str, Any]:
        return {"baseline_done": self.baseline_done, "val_epochs": self.val_epochs, "records": self.records,
                "overhead_s": self.overhead_s}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.baseline_done = bool(state_dict.get("baseline_done", False))
        self.val_epochs = int(state_dict.get("val_epochs", 0))
        self.records = list(state_dict.get("records", []))
        self.overhead_s = float(state_dict.get("overhead_s", 0.0))

    # ------------------------------------------------------------------ helpers
    @property
    def baseline(self) -> dict[str, Any] | None:
        """The baseline record (``{"phase", "step", "forward", "generation"}``), on rank 0."""
        return next((r for r in self.records if r["phase"] == "baseline"), None)

    def _target(self, pl_module: Any) -> nn.Module:
        return resolve_target(pl_module, self.model_attr)

    def _resolve_inputs(self, trainer: Any, batch: Any) -> Any:
        if self._resolved is not None:
            return self._resolved
        if self.inputs is not None:
            raw = self.inputs() if callable(self.inputs) and not isinstance(self.inputs, torch.Tensor) else self.inputs
        else:
            if batch is None:
                batch = _first_batch(getattr(trainer, "val_dataloaders", None))
            if batch is None:
                batch = _first_batch(getattr(trainer, "train_dataloader", None))
            if batch is None:
                raise MisconfigurationException("LatencyMonitor found no batch to build inputs from. Pass "
                                                "`inputs=` (e.g. inputs={'input_ids': ids}).")
            raw = self.batch_to_inputs(batch)
        self._resolved = _detach_cpu(raw)
        return self._resolved

    def _deploy_backend(self, trainer: Any, pl_module: Any) -> str | None:
        """The backend the final measurement deploys to, or None to time the model as it is."""
        if self.deploy_final is False or is_fsdp(trainer):
            return None
        from lightning_latency.pruning.callback import MagnitudePruning
        from lightning_latency.quantization.callback import QuantizationAwareTraining
        from lightning_latency.quantization.qat import is_converted, is_prepared

        module = self._target(pl_module)
        quantized = is_prepared(module) or is_converted(module)
        pruned = any(isinstance(cb, MagnitudePruning) for cb in trainer.callbacks)
        if not (quantized or pruned):
            return None
        qat = next((cb for cb in trainer.callbacks if isinstance(cb, QuantizationAwareTraining)), None)
        self._deploy_config = qat.config if qat is not None else None  # the targets and scheme QAT trained
        if self.deploy_final is not None:
            return str(self.deploy_final)
        if not quantized:
            return "fp32"
        return qat.config.backend.value if qat is not None else "x86"

    def _deployed_form(self, module: nn.Module, inputs: Any, backend: str) -> tuple[Any, dict[str, Any]]:
        """A deployment form of a copy of ``module`` for the baseline's input shapes, and what it is."""
        from lightning_latency.latency.compiled import _deepcopy_detached
        from lightning_latency.quantization import deploy
        from lightning_latency.quantization.qat import is_converted, unconvert_qat

        work = _deepcopy_detached(module)
        if is_converted(work) and backend != "torchao":  # back to the float weights (on the int8 grid) to re-deploy
            unconvert_qat(work)
        fast = deploy(work, inputs, self._deploy_config, backend=backend)
        info: dict[str, Any] = {"backend": fast.backend, "requested": backend}
        if fast.report is not None:
            info["report"] = fast.report.to_dict()
            info["why"] = fast.report.why
            rank_zero_info(f"LatencyMonitor: deployed form for the final measurement\n{fast.report.format()}")
        return fast, info

    def _measure_phase(self, trainer: Any, pl_module: Any, phase: str, batch: Any,
                       deploy_backend: str | None = None) -> None:
        if phase == "baseline":
            self.baseline_done = True  # on every rank, before the barrier: decisions stay identical across ranks
        record = None
        if trainer.is_global_zero:
            start = time.perf_counter()
            try:
                record = self._measure(trainer, pl_module, phase, batch, deploy_backend)
            except MisconfigurationException:
                raise
            except Exception as err:  # a monitor must not kill a fit: report and carry on
                rank_zero_warn(f"LatencyMonitor: the {phase} measurement failed ({type(err).__name__}: {err}).")
                record = None
            self.overhead_s += time.perf_counter() - start
        trainer.strategy.barrier(f"LatencyMonitor.{phase}")
        if self.data_parallel:
            start = time.perf_counter()
            dp = self._measure_data_parallel(trainer, pl_module, batch)
            self.overhead_s += time.perf_counter() - start
            if trainer.is_global_zero and record is not None and dp is not None:
                record["data_parallel"] = dp
        if trainer.is_global_zero and record is not None:
            self.records.append(record)
            self._log(trainer, record)

    def _measure_data_parallel(self, trainer: Any, pl_module: Any, batch: Any) -> dict[str, Any] | None:
        """Every rank times its own replica at the same time; returns the gathered numbers (on every rank).

        Collective on all ranks: a rank whose measurement fails contributes NaN instead of raising, so no rank is
        left waiting in ``all_gather``; rank 0 warns and the phase gets no data-parallel numbers. Each rank times
        the same inputs as rank 0 when they were given (``inputs=``), else its own first batch (same shapes).
        """
        local = torch.tensor([float("nan"), float("nan")], dtype=torch.float64)
        try:
            inputs = self._resolve_inputs(trainer, batch)
            report = measure_latency(self._target(pl_module), inputs, self.config)
            local = torch.tensor([report.samples_per_s, report.median_ms], dtype=torch.float64)
        except Exception:  # reported by rank 0 below; this rank must still reach the gather
            pass
        world = int(trainer.world_size)
        # all_gather needs every rank with the same shape and device; gloo and nccl both accept this one.
        gathered = trainer.strategy.all_gather(local.to(trainer.strategy.root_device)) if world > 1 else local
        gathered = gathered.reshape(world, 2).cpu()
        failed = [r for r in range(world) if bool(torch.isnan(gathered[r]).any())]
        if failed:
            rank_zero_warn(f"LatencyMonitor: the data-parallel measurement failed on rank(s) {failed}; "
                           "no latency/dp_* metrics for this phase.")
            return None
        return {"world_size": world, "samples_per_s": [float(v) for v in gathered[:, 0]],
                "median_ms": [float(v) for v in gathered[:, 1]],
                "sum_samples_per_s": float(gathered[:, 0].sum()), "max_median_ms": float(gathered[:, 1].max())}

    def _measure(self, trainer: Any, pl_module: Any, phase: str, batch: Any,
                 deploy_backend: str | None = None) -> dict[str, Any]:
        module = self._target(pl_module)
        inputs = self._resolve_inputs(trainer, batch)
        form: dict[str, Any] = {"form": "eager"}
        if deploy_backend is not None:
            # The number a user sees at fit end is the form that ships; the eager figure (fake quantization or
            # masks still in the graph: slower than fp32) stays in the record, labelled.
            eager = measure_latency(module, inputs, self.config)
            can_generate = getattr(module, "can_generate", None)
            if isinstance(inputs, dict) and callable(can_generate) and can_generate():
                inputs = {**inputs, "use_cache": False}  # a KV cache object in the output cannot be exported
            try:
                fast, info = self._deployed_form(module, inputs, deploy_backend)
            except Exception as err:  # the eager number is still worth reporting; say why it is not deployed
                rank_zero_warn(f"LatencyMonitor: could not build the {deploy_backend!r} deployment form for the final "
                               f"measurement ({type(err).__name__}: {str(err)[:200]}); the final row times the model "
                               "as it is (eager). Pass deploy_final=False to skip the attempt.")
                forward, form = eager, {"form": "eager (deploy failed)"}
            else:
                forward = measure_latency(fast, inputs, self.config.replace(compile=False))  # already compiled
                form = {"form": f"deployed {info['backend']}", "deploy": info, "eager": eager.to_dict()}
        else:
            forward = measure_latency(module, inputs, self.config)
        record: dict[str, Any] = {"phase": phase, "step": int(trainer.global_step), "epoch": int(trainer.current_epoch),
                                  "forward": forward.to_dict(), "generation": None, **form}
        want_gen = self.generation if self.generation is not None else callable(getattr(module, "generate", None))
        if want_gen:
            ids = token_ids_of(inputs)
            prompt = {"input_ids": ids[:1, : self.prompt_len]} if ids is not None else None
            gen = measure_generation(module, prompt, self.config, prompt_len=self.prompt_len,
                                     new_tokens=self.new_tokens)
            record["generation"] = gen.to_dict()
        return record

    def metrics(self, record: dict[str, Any]) -> dict[str, float]:
        """The ``latency/*`` metrics of one record (speed-ups against the baseline record)."""
        out: dict[str, float] = {}
        fwd, gen = record["forward"], record.get("generation")
        for key, attr in _FORWARD_KEYS.items():
            if fwd.get(attr) is not None:
                out[f"latency/{key}"] = float(fwd[attr])
        out["latency/unstable"] = float(bool(fwd.get("unstable")))
        dp = record.get("data_parallel")
        if dp:
            out["latency/dp_samples_per_s"] = float(dp["sum_samples_per_s"])
            out["latency/dp_world_size"] = float(dp["world_size"])
            out["latency/dp_p50_ms_max"] = float(dp["max_median_ms"])
        base = self.baseline
        if base is not None and fwd["median_ms"] > 0:
            out["latency/speedup"] = base["forward"]["median_ms"] / fwd["median_ms"]
        eager = record.get("eager")
        if eager:
            out["latency/eager_p50_ms"] = float(eager["median_ms"])
            if base is not None and eager["median_ms"] > 0:
                out["latency/eager_speedup"] = base["forward"]["median_ms"] / eager["median_ms"]
        if gen:
            for key, attr in _GEN_KEYS.items():
                if gen.get(attr) is not None:
                    out[f"latency/{key}"] = float(gen[attr])
            if base is not None and base.get("generation") and gen["tpot_ms"] > 0:
                out["latency/decode_speedup"] = base["generation"]["tpot_ms"] / gen["tpot_ms"]
        return out

    def _log(self, trainer: Any, record: dict[str, Any]) -> None:
        metrics = self.metrics(record)
        for logger in trainer.loggers:
            logger.log_metrics(metrics, step=trainer.global_step)

    def _finish(self, trainer: Any, folder: Path) -> None:
        for logger in trainer.loggers:
            logger.save()  # on_fit_end runs after the loop's last flush
        if not self.records:
            return
        rank_zero_info(summary_table(self.records))
        if self.report_file:
            folder.mkdir(parents=True, exist_ok=True)
            report = {"config": self.config.to_dict(), "model_attr": self.model_attr, "overhead_s": self.overhead_s,
                      "records": [{**r, "metrics": self.metrics(r)} for r in self.records]}
            (folder / self.report_file).write_text(json.dumps(report, indent=2, default=str))

    def reports(self) -> dict[str, LatencyReport | GenerationReport]:
        """Phase -> report objects (``"<phase>"`` forward, ``"<phase>/generation"``), rebuilt from the records."""
        out: dict[str, LatencyReport | GenerationReport] = {}
        for r in self.records:
            out[r["phase"]] = LatencyReport.from_dict(r["forward"])
            if r.get("generation"):
                out[r["phase"] + "/generation"] = GenerationReport.from_dict(r["generation"])
        return out


def summary_table(records: list[dict[str, Any]]) -> str:
    """A small text table of the records (baseline first), with speed-ups against the baseline."""
    base = records[0]
    lines = [f"{'phase':<14}{'step':>6}{'p50 ms':>10}{'p90 ms':>10}{'IQR%':>7}{'samples/s':>11}{'MB':>8}"
             f"{'speedup':>9}{'TPOT ms':>9}  form"]
    for r in records:
        f, g = r["forward"], r.get("generation")
        iqr = 100 * f["iqr_ms"] / f["median_ms"] if f["median_ms"] else 0.0
        tpot = f"{g['tpot_ms']:>9.2f}" if g else f"{'-':>9}"
        lines.append(f"{r['phase']:<14}{r['step']:>6}{f['median_ms']:>10.3f}{f['p90_ms']:>10.3f}{iqr:>6.1f}"
                     f"{'!' if f['unstable'] else ' '}{f['samples_per_s']:>11.1f}{(f.get('model_mb') or 0):>8.1f}"
                     f"{base['forward']['median_ms'] / f['median_ms']:>8.2f}x{tpot}  {r.get('form', 'eager')}")
        e = r.get("eager")
        if e:
            lines.append(f"{'  (eager)':<14}{r['step']:>6}{e['median_ms']:>10.3f}{e['p90_ms']:>10.3f}{'':>7}"
                         f"{e['samples_per_s']:>11.1f}{'':>8}{base['forward']['median_ms'] / e['median_ms']:>8.2f}x"
                         f"{'-':>9}  eager, as trained (not what ships)")
    b = base["forward"]
    head = (f"LatencyMonitor: batch {b['batch_size']}, seq {b.get('seq_len')}, {b['num_threads']} threads on "
            f"{b['device']} ('!' = unstable, IQR/median > threshold)")
    return "\n".join([head, *lines])


__all__ = ["DEFAULT_MONITOR_CONFIG", "LatencyMonitor", "summary_table"]
