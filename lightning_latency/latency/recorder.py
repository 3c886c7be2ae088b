"""``LatencyRecorder``: the per-run state of a latency monitor, and everything derived from it, without Lightning.

A *record* is one measurement as a plain JSON-ready dict — the one representation: it is what the checkpoint
stores, what the report file writes and what the table reads, and the logged metrics are derived from it (with the
baseline record) by :func:`record_metrics`::

    {"phase": "baseline" | "val_epoch_<n>" | "final", "step": int, "epoch": int,
     "forward": LatencyReport.to_dict(), "generation": GenerationReport.to_dict() | None,
     "form": "eager" | "deployed <backend>" | "eager (deploy failed)",
     # final records of compressed models also carry "deploy", "eager" (the as-is report) and "eager_form";
     # data-parallel runs add "data_parallel" (see measure_data_parallel)
    }

Example (a plain PyTorch loop)::

    rec = LatencyRecorder(LatencyConfig(max_time_s=1.0))
    rec.add(rec.measure(model, inputs, "baseline"))
    train(model)
    print(rec.add(rec.measure(model, inputs, "final", step=1000)))   # {"latency/p50_ms": ..., "latency/speedup": ...}
    print(rec.table())
"""

from __future__ import annotations

import contextlib
import json
import logging
import time
import warnings
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

from torch import nn

from lightning_latency.latency._inputs import token_ids_of
from lightning_latency.latency.config import LatencyConfig
from lightning_latency.latency.final import measure_final
from lightning_latency.latency.generation import GenerationReport, measure_generation
from lightning_latency.latency.measure import LatencyReport, measure_latency

_log = logging.getLogger(__name__)

# A fixed cost per measurement (12 forwards for a fast model, at most first call + 1 s for a slow one), so baseline +
# final stay under 2% of any fit longer than about a minute; raise min_runs / max_time_s for steadier numbers.
DEFAULT_MONITOR_CONFIG = LatencyConfig(warmup=2, min_runs=10, min_time_s=0.05, max_time_s=1.0)

# metric name -> field of the forward record
_FORWARD_KEYS = {"p50_ms": "median_ms", "p90_ms": "p90_ms", "p99_ms": "p99_ms", "mean_ms": "mean_ms",
                 "min_ms": "min_ms", "iqr_ms": "iqr_ms", "samples_per_s": "samples_per_s",
                 "tokens_per_s": "tokens_per_s", "model_mb": "model_mb", "num_params": "num_params",
                 "nonzero_params": "nonzero_params", "peak_memory_mb": "peak_memory_mb", "mbu": "mbu",
                 "mfu": "mfu", "count": "count"}
# Generation metrics get their own names: a generative model is timed both ways, and the forward pass's
# tokens/s and MBU must not be overwritten by decode's.
_GEN_KEYS = {"ttft_ms": "ttft_ms", "tpot_ms": "tpot_ms", "gen_tokens_per_s": "tokens_per_s", "decode_mbu": "mbu",
             "kv_cache_mb": "kv_cache_mb"}


def monitor_config(config: LatencyConfig | None = None, **shortcuts: Any) -> LatencyConfig:
    """``config`` (default :data:`DEFAULT_MONITOR_CONFIG`) with the non-None ``shortcuts`` (``warmup=``, …) applied.

    A ``max_time_s`` below the config's ``min_time_s`` lowers ``min_time_s`` with it (the budget wins).

    Raises:
        ValueError: ``config`` is not a LatencyConfig, or a bad shortcut value (the message names the field).
    """
    if config is not None and not isinstance(config, LatencyConfig):
        raise ValueError(f"`config` must be a LatencyConfig or None, got {type(config).__name__}. "
                         "E.g. config=LatencyConfig(max_time_s=1.0).")
    base = config or DEFAULT_MONITOR_CONFIG
    overrides = {k: v for k, v in shortcuts.items() if v is not None}
    if isinstance(overrides.get("max_time_s"), (int, float)) and 0 <= overrides["max_time_s"] < base.min_time_s:
        overrides["min_time_s"] = overrides["max_time_s"]
    return base.replace(**overrides)


def check_monitor_arguments(batch_to_inputs: Any, every_n_val_epochs: Any, report_file: Any,
                            data_parallel: Any) -> None:
    """The checks of a monitor's own arguments (the recorder checks the rest).

    Raises:
        ValueError: naming the argument, the value and a fix.
    """
    if batch_to_inputs is not None and not callable(batch_to_inputs):
        raise ValueError(f"`batch_to_inputs` must be a callable batch -> inputs, got {batch_to_inputs!r}. "
                         "E.g. batch_to_inputs=lambda b: b['input_ids'].")
    if data_parallel not in (True, False):
        raise ValueError(f"`data_parallel` must be True or False, got {data_parallel!r}. Pass data_parallel=True "
                         "to also measure every rank's replica at once and log the summed throughput.")
    if isinstance(every_n_val_epochs, bool) or not isinstance(every_n_val_epochs, int) or every_n_val_epochs < 0:
        raise ValueError(f"`every_n_val_epochs` must be an integer >= 0, got {every_n_val_epochs!r}. "
                         "E.g. every_n_val_epochs=1 (0 disables).")
    if report_file is not None and (not isinstance(report_file, str) or not report_file or "/" in report_file):
        raise ValueError(f"`report_file` must be a plain file name or None, got {report_file!r}. "
                         "E.g. report_file='latency_report.json'.")


def record_metrics(record: Mapping[str, Any], baseline: Mapping[str, Any] | None = None) -> dict[str, float]:
    """The ``latency/*`` metrics of one record; speed-ups are against ``baseline`` (a record, or None)."""
    fwd, gen = record["forward"], record.get("generation")
    out = {f"latency/{key}": float(fwd[attr]) for key, attr in _FORWARD_KEYS.items() if fwd.get(attr) is not None}
    out["latency/unstable"] = float(bool(fwd.get("unstable")))
    dp = record.get("data_parallel")
    if dp:
        out["latency/dp_samples_per_s"] = float(dp["sum_samples_per_s"])
        out["latency/dp_world_size"] = float(dp["world_size"])
        out["latency/dp_p50_ms_max"] = float(dp["max_median_ms"])
    base = baseline["forward"]["median_ms"] if baseline is not None else None
    if base is not None and fwd["median_ms"] > 0:
        out["latency/speedup"] = base / fwd["median_ms"]
    eager = record.get("eager")
    if eager:
        out["latency/eager_p50_ms"] = float(eager["median_ms"])
        if base is not None and eager["median_ms"] > 0:
            out["latency/eager_speedup"] = base / eager["median_ms"]
    if gen:
        out.update({f"latency/{key}": float(gen[attr]) for key, attr in _GEN_KEYS.items() if gen.get(attr) is not None})
        base_gen = baseline.get("generation") if baseline is not None else None
        if base_gen and gen["tpot_ms"] > 0:
            out["latency/decode_speedup"] = base_gen["tpot_ms"] / gen["tpot_ms"]
    return out


def summary_table(records: list[dict[str, Any]]) -> str:
    """A small text table of the records (baseline first), with speed-ups against the baseline."""
    base = records[0]["forward"]["median_ms"]
    lines = [f"{'phase':<14}{'step':>6}{'p50 ms':>10}{'p90 ms':>10}{'IQR%':>7}{'samples/s':>11}{'MB':>8}"
             f"{'speedup':>9}{'TPOT ms':>9}  form"]
    for r in records:
        f, g = r["forward"], r.get("generation")
        iqr = 100 * f["iqr_ms"] / f["median_ms"] if f["median_ms"] else 0.0
        tpot = f"{g['tpot_ms']:>9.2f}" if g else f"{'-':>9}"
        lines.append(f"{r['phase']:<14}{r['step']:>6}{f['median_ms']:>10.3f}{f['p90_ms']:>10.3f}{iqr:>6.1f}"
                     f"{'!' if f['unstable'] else ' '}{f['samples_per_s']:>11.1f}{(f.get('model_mb') or 0):>8.1f}"
                     f"{base / f['median_ms']:>8.2f}x{tpot}  {r.get('form', 'eager')}")
        e = r.get("eager")
        if e:
            label = "  (compiled)" if e.get("compiled") else "  (eager)"
            lines.append(f"{label:<14}{r['step']:>6}{e['median_ms']:>10.3f}{e['p90_ms']:>10.3f}{'':>7}"
                         f"{e['samples_per_s']:>11.1f}{'':>8}{base / e['median_ms']:>8.2f}x"
                         f"{'-':>9}  {r.get('eager_form', 'eager, as trained')} (not what ships)")
    b = records[0]["forward"]
    head = (f"batch {b['batch_size']}, seq {b.get('seq_len')}, {b['num_threads']} threads on "
            f"{b['device']} ('!' = unstable, IQR/median > threshold)")
    return "\n".join([head, *lines])


class LatencyRecorder:
    """Measures phases of a run and keeps their records; all the state a latency monitor has, without Lightning.

    Args:
        config: measurement settings; None uses :data:`DEFAULT_MONITOR_CONFIG` (about first call + ≤1 s).
        generation: also time ``generate`` (TTFT/TPOT); None does so when the module has ``generate``.
        prompt_len: prompt length for generation (cut from the inputs' ``input_ids``, batch 1).
        new_tokens: output tokens per generation call (>= 2).
        info, warn: where messages go (the monitor passes its rank-zero ``info`` / ``warn``).

    Raises:
        ValueError: a bad ``config``, ``generation``, ``prompt_len`` or ``new_tokens``.
    """

    def __init__(self, config: LatencyConfig | None = None, generation: bool | None = None, prompt_len: int = 32,
                 new_tokens: int = 8, info: Callable[[str], None] = _log.info,
                 warn: Callable[[str], None] = warnings.warn) -> None:
        config = monitor_config(config)
        for name, value, low in (("prompt_len", prompt_len, 1), ("new_tokens", new_tokens, 2)):
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ValueError(f"`{name}` must be an integer >= {low}, got {value!r}. E.g. {name}={max(low, 8)}.")
        if generation not in (None, True, False):
            raise ValueError(f"`generation` must be None (auto), True or False, got {generation!r}.")
        self.config = config
        self.generation, self.prompt_len, self.new_tokens = generation, prompt_len, new_tokens
        self.info, self.warn = info, warn
        # the state that survives checkpoints (the same on all ranks, except the records: rank 0 measures)
        self.baseline_done = False
        self.val_epochs = 0
        self.records: list[dict[str, Any]] = []
        self.overhead_s = 0.0

    # ------------------------------------------------------------------ state
    def state_dict(self) -> dict[str, Any]:
        return {"baseline_done": self.baseline_done, "val_epochs": self.val_epochs, "records": self.records,
                "overhead_s": self.overhead_s}

    def load_state_dict(self, state_dict: Mapping[str, Any]) -> None:
        # .get with defaults: checkpoints from before a key existed still load
        self.baseline_done = bool(state_dict.get("baseline_done", False))
        self.val_epochs = int(state_dict.get("val_epochs", 0))
        self.records = list(state_dict.get("records", []))
        self.overhead_s = float(state_dict.get("overhead_s", 0.0))

    @property
    def baseline(self) -> dict[str, Any] | None:
        """The baseline record, if measured (on the rank that measures)."""
        return next((r for r in self.records if r["phase"] == "baseline"), None)

    def validation_epoch_done(self, every_n: int) -> str | None:
        """Count a validation epoch; the phase name (``"val_epoch_<n>"``) when one is due, else None."""
        if every_n == 0:
            return None
        self.val_epochs += 1
        return f"val_epoch_{self.val_epochs}" if self.val_epochs % every_n == 0 else None

    @contextlib.contextmanager
    def timing(self) -> Iterator[None]:
        """Add the block's wall time to ``overhead_s`` (what the measurements cost the run)."""
        start = time.perf_counter()
        try:
            yield
        finally:
            self.overhead_s += time.perf_counter() - start

    # ------------------------------------------------------------------ measuring
    def measure(self, module: nn.Module, inputs: Any, phase: str, step: int = 0, epoch: int = 0,
                deploy_backend: str | None = None, deploy_config: Any = None) -> dict[str, Any]:
        """Time ``module`` on ``inputs`` (and its ``generate``) and return the record; :meth:`add` keeps it.

        With ``deploy_backend`` the record times that deployment form of a copy (see :func:`measure_final`).
        """
        form: dict[str, Any] = {"form": "eager"}
        if deploy_backend is not None:
            forward, form = measure_final(module, inputs, self.config, deploy_backend, deploy_config,
                                          self.info, self.warn)
        else:
            forward = measure_latency(module, inputs, self.config)
        record: dict[str, Any] = {"phase": phase, "step": int(step), "epoch": int(epoch), "forward": forward.to_dict(),
                                  "generation": None, **form}
        if self.generation if self.generation is not None else callable(getattr(module, "generate", None)):
            ids = token_ids_of(inputs)
            prompt = {"input_ids": ids[:1, : self.prompt_len]} if ids is not None else None
            record["generation"] = measure_generation(module, prompt, self.config, prompt_len=self.prompt_len,
                                                      new_tokens=self.new_tokens).to_dict()
        return record

    def add(self, record: dict[str, Any]) -> dict[str, float]:
        """Keep a record; returns its metrics (speed-ups against the baseline)."""
        self.records.append(record)
        return self.metrics(record)

    # ------------------------------------------------------------------ derived from the records
    def metrics(self, record: Mapping[str, Any]) -> dict[str, float]:
        """The ``latency/*`` metrics of one record (speed-ups against the baseline record)."""
        return record_metrics(record, self.baseline)

    def table(self) -> str:
        """The records as a text table (baseline first); empty without records."""
        return summary_table(self.records) if self.records else ""

    def report(self, **context: Any) -> dict[str, Any]:
        """The JSON report: the settings, ``context`` (e.g. ``model_attr``), the cost, every record with metrics."""
        return {"config": self.config.to_dict(), **context, "overhead_s": self.overhead_s,
                "records": [{**r, "metrics": self.metrics(r)} for r in self.records]}

    def write_report(self, path: str | Path, **context: Any) -> Path:
        """Write :meth:`report` as JSON to ``path`` (parent folders created); returns the path."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(self.report(**context), indent=2, default=str))
        return path

    def finish(self, report_path: str | Path | None = None, **context: Any) -> None:
        """At the end of a run: the table through ``info`` and, with ``report_path``, the JSON report; nothing
        without records."""
        if self.records:
            self.info(self.table())
            if report_path is not None:
                self.write_report(report_path, **context)

    def reports(self) -> dict[str, LatencyReport | GenerationReport]:
        """Phase -> report objects (``"<phase>"`` forward, ``"<phase>/generation"``), a typed view of the records."""
        out: dict[str, LatencyReport | GenerationReport] = {}
        for r in self.records:
            out[r["phase"]] = LatencyReport.from_dict(r["forward"])
            if r.get("generation"):
                out[r["phase"] + "/generation"] = GenerationReport.from_dict(r["generation"])
        return out


class RecorderField:
    """An attribute of a callback that is its ``recorder``'s (``monitor.records`` is ``monitor.recorder.records``)."""

    def __set_name__(self, owner: type, name: str) -> None:
        self.name = name

    def __get__(self, obj: Any, owner: type | None = None) -> Any:
        return self if obj is None else getattr(obj.recorder, self.name)

    def __set__(self, obj: Any, value: Any) -> None:
        setattr(obj.recorder, self.name, value)


__all__ = ["DEFAULT_MONITOR_CONFIG", "LatencyRecorder", "RecorderField", "check_monitor_arguments", "monitor_config",
           "record_metrics", "summary_table"]
