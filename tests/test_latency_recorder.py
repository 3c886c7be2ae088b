"""LatencyRecorder and the monitor's other cores, without Lightning: state, metrics, table, report, final form."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import torch
from torch import nn

from lightning_latency.latency import LatencyConfig, LatencyReport, TimingStats, measure_latency
from lightning_latency.latency.data_parallel import measure_data_parallel
from lightning_latency.latency.final import final_backend, parse_deploy_final, trained_form
from lightning_latency.latency.recorder import LatencyRecorder, monitor_config, record_metrics, summary_table

FAST = LatencyConfig(warmup=1, min_runs=3, min_time_s=0.0, max_time_s=0.5, threads=1)


def _forward(median_ms: float, **extra: Any) -> dict[str, Any]:
    stats = TimingStats(median_ms=median_ms, mean_ms=median_ms, p90_ms=median_ms * 1.5, p99_ms=median_ms * 2,
                        min_ms=median_ms / 2, max_ms=median_ms * 3, std_ms=0.1, iqr_ms=median_ms / 10, count=5,
                        unstable=False)
    return LatencyReport(stats, samples_per_s=8000 / median_ms, tokens_per_s=None, batch_size=8, **extra).to_dict()


def _record(phase: str, median_ms: float, **extra: Any) -> dict[str, Any]:
    return {"phase": phase, "step": 0, "epoch": 0, "forward": _forward(median_ms), "generation": None,
            "form": "eager", **extra}


def test_recorder_measures_and_round_trips_its_state_without_lightning(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model, x = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 4)), torch.randn(8, 16)
    rec = LatencyRecorder(FAST, generation=False)
    with rec.timing():
        base = rec.add(rec.measure(model, x, "baseline"))
        final = rec.add(rec.measure(model, x, "final", step=7, epoch=1))
    assert base["latency/speedup"] == pytest.approx(1.0) and base["latency/p50_ms"] > 0
    assert final["latency/speedup"] == pytest.approx(rec.records[0]["forward"]["median_ms"]
                                                     / rec.records[1]["forward"]["median_ms"])
    assert rec.records[1]["step"] == 7 and rec.records[1]["form"] == "eager" and rec.overhead_s > 0
    assert model.training  # the measured model's mode is restored

    fresh = LatencyRecorder(FAST)
    fresh.load_state_dict(json.loads(json.dumps(rec.state_dict())))  # survives a JSON (or checkpoint) trip
    assert fresh.records == rec.records and fresh.overhead_s == rec.overhead_s
    assert fresh.metrics(fresh.records[1]) == final  # metrics derive from the records alone
    assert set(rec.state_dict()) == {"baseline_done", "val_epochs", "records", "overhead_s"}  # the old keys
    fresh.load_state_dict({})  # a checkpoint from before the monitor existed
    assert fresh.records == [] and not fresh.baseline_done and fresh.baseline is None

    reports = rec.reports()
    assert isinstance(reports["final"], LatencyReport) and reports["final"].to_dict() == rec.records[1]["forward"]
    path = rec.write_report(tmp_path / "sub" / "report.json", model_attr="m")
    report = json.loads(path.read_text())
    assert report["model_attr"] == "m" and report["config"]["warmup"] == 1
    assert [r["metrics"]["latency/speedup"] for r in report["records"]] == pytest.approx([1.0, final["latency/speedup"]])
    assert "baseline" in rec.table() and "final" in rec.table()


def test_record_metrics_from_records_alone() -> None:
    base = _record("baseline", 10.0)
    gen = {"ttft_ms": 3.0, "tpot_ms": 2.0, "tokens_per_s": 50.0, "mbu": None, "kv_cache_mb": 0.5}
    base["generation"] = dict(gen, tpot_ms=4.0)
    final = _record("final", 4.0, eager=_forward(20.0), generation=gen,
                    data_parallel={"world_size": 2, "sum_samples_per_s": 3000.0, "max_median_ms": 5.0})
    m = record_metrics(final, base)
    assert m["latency/speedup"] == pytest.approx(2.5) and m["latency/eager_p50_ms"] == pytest.approx(20.0)
    assert m["latency/eager_speedup"] == pytest.approx(0.5) and m["latency/decode_speedup"] == pytest.approx(2.0)
    assert m["latency/dp_samples_per_s"] == 3000.0 and m["latency/dp_world_size"] == 2.0
    assert m["latency/gen_tokens_per_s"] == 50.0 and "latency/decode_mbu" not in m  # None is not logged
    assert m["latency/p90_ms"] == pytest.approx(6.0) and m["latency/unstable"] == 0.0
    assert "latency/speedup" not in record_metrics(final, None)  # no baseline, no speed-up


def test_table_labels_the_as_is_row_by_what_it_timed() -> None:
    compiled = _forward(1.4, compiled=True)
    table = summary_table([_record("baseline", 2.0),
                           _record("final", 2.0, form="deployed x86", eager=compiled,
                                   eager_form="as trained, converted (torchao int8), torch.compile")])
    row = next(line for line in table.splitlines() if "not what ships" in line)
    assert row.startswith("  (compiled)") and "converted (torchao int8), torch.compile" in row
    eager_row = summary_table([_record("baseline", 2.0), _record("final", 2.0, eager=_forward(3.0))]).splitlines()[-1]
    assert eager_row.startswith("  (eager)") and "eager, as trained" in eager_row  # records from older runs


def test_trained_form_says_compiled_and_converted() -> None:
    assert trained_form(nn.Linear(2, 2), FAST) == "as trained, eager"
    assert trained_form(nn.Linear(2, 2), FAST.replace(compile=True)) == "as trained, torch.compile"


def test_validation_epoch_counter() -> None:
    rec = LatencyRecorder()
    assert [rec.validation_epoch_done(2) for _ in range(4)] == [None, "val_epoch_2", None, "val_epoch_4"]
    assert rec.validation_epoch_done(0) is None and rec.val_epochs == 4


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        (dict(config={"warmup": 1}), r"`config` must be a LatencyConfig or None, got dict"),
        (dict(new_tokens=1), r"`new_tokens` must be an integer >= 2, got 1"),
        (dict(prompt_len=0), r"`prompt_len` must be an integer >= 1, got 0"),
        (dict(generation="yes"), r"`generation` must be None \(auto\), True or False, got 'yes'"),
    ],
)
def test_recorder_misconfiguration(kwargs: dict[str, Any], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        LatencyRecorder(**kwargs)


def test_monitor_config_shortcuts() -> None:
    cfg = monitor_config(LatencyConfig(warmup=7, min_time_s=0.2, max_time_s=1.0), max_time_s=0.05, threads=None)
    assert cfg.warmup == 7 and cfg.max_time_s == 0.05 and cfg.min_time_s == 0.05 and cfg.threads is None


def test_data_parallel_gathers_and_reports_failed_ranks() -> None:
    rep = measure_latency(nn.Linear(4, 4), torch.randn(2, 4), FAST)
    one = measure_data_parallel(lambda: rep, 1)
    assert one is not None and one["sum_samples_per_s"] == pytest.approx(rep.samples_per_s)
    two = measure_data_parallel(lambda: rep, 2, lambda t: torch.stack([t, 2 * t]))
    assert two is not None and two["sum_samples_per_s"] == pytest.approx(3 * rep.samples_per_s)
    assert two["max_median_ms"] == pytest.approx(2 * rep.median_ms)
    messages: list[str] = []
    nan = torch.tensor([float("nan"), float("nan")], dtype=torch.float64)
    assert measure_data_parallel(lambda: rep, 2, lambda t: torch.stack([t, nan]), messages.append) is None
    assert "rank(s) [1]" in messages[0]
    with pytest.raises(ValueError, match="`all_gather` is required"):
        measure_data_parallel(lambda: rep, 2)


class _Compressor:
    """Stands in for any CompressionCallback: only ``compresses`` and ``deploy_config()`` are read."""

    def __init__(self, compresses: bool, config: Any = None) -> None:
        self.compresses, self._config = compresses, config

    def deploy_config(self) -> Any:
        return self._config


def test_final_backend_asks_the_callbacks_not_their_types() -> None:
    model = nn.Linear(4, 4)
    assert final_backend(model, [object(), _Compressor(False)]) == (None, None)  # nothing compressed: as it is
    assert final_backend(model, [_Compressor(True)]) == ("fp32", None)  # pruning alone: compiled float
    assert final_backend(model, [_Compressor(True)], False) == (None, None)
    assert final_backend(model, [_Compressor(True)], "ort") == ("ort", None)
    cfg = SimpleNamespace(backend=SimpleNamespace(value="x86_dynamic"))
    assert final_backend(model, [_Compressor(True), _Compressor(True, cfg)]) == ("x86_dynamic", cfg)


def test_final_backend_falls_back_on_the_models_own_state() -> None:
    pytest.importorskip("torchao")
    from lightning_latency.quantization import prepare_qat

    model = nn.Sequential(nn.Linear(32, 32))
    prepare_qat(model, "int8_dynamic")
    assert final_backend(model, []) == ("x86", None)  # quantized, though no callback says so


@pytest.mark.parametrize(("value", "expected"), [(None, None), (True, None), (False, False), ("ORT_INT8", "ort_int8")])
def test_parse_deploy_final(value: Any, expected: Any) -> None:
    assert parse_deploy_final(value) == expected


def test_latency_report_composes_timing_stats() -> None:
    data = _forward(5.0, name="x")
    report = LatencyReport.from_dict(data)
    assert isinstance(report.stats, TimingStats) and report.median_ms == report.p50_ms == 5.0
    assert report.rel_iqr == pytest.approx(0.1) and report.count == 5 and report.name == "x"
    assert report.to_dict() == data and "stats" not in data  # flat, as records and reports have always been
    with pytest.raises(AttributeError):
        report.median_ms = 1.0  # read through to the (frozen) statistics


def test_only_torchaos_cpu_import_noise_is_dropped(caplog: pytest.LogCaptureFixture) -> None:
    import logging

    import lightning_latency  # noqa: F401  (installs the filters)

    with caplog.at_level(logging.WARNING):
        logging.getLogger("torchao").warning("Failed to load /x/torchao/_C_mxfp8.so: Could not load this library")
        logging.getLogger("torch.utils._pytree").warning(
            "<enum 'KernelPreference'> is an Enum subclass and is now natively supported by torch.compile as an opaque")
        logging.getLogger("torchao").warning("Failed to load the config")  # not the kernel message: kept
        logging.getLogger("torchao").error("Failed to load /x/torchao/_C_mxfp8.so")  # errors always pass
        logging.getLogger("other").warning("kept")
    assert [r.getMessage() for r in caplog.records] == [
        "Failed to load the config", "Failed to load /x/torchao/_C_mxfp8.so", "kept"]


def test_lightnings_own_leafspec_deprecation_is_dropped_and_only_there() -> None:
    """Lightning's utilities/_pytree.py builds torch's deprecated LeafSpec at every fit: dropped. The same
    deprecation raised by any other module still shows."""
    import warnings

    from lightning_latency._quiet import silence_import_noise

    message = "`isinstance(treespec, LeafSpec)` is deprecated, use `isinstance(treespec, TreeSpec)` instead."
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        silence_import_noise()  # in front of "always", as at import time it is in front of the defaults
        silence_import_noise()  # idempotent: one filter
        for module in ("pytorch_lightning.utilities._pytree", "lightning.pytorch.utilities._pytree", "user_code"):
            warnings.warn_explicit(message, FutureWarning, "x.py", 21, module=module, registry={})
        warnings.warn_explicit("another FutureWarning", FutureWarning, "x.py", 22,
                               module="pytorch_lightning.utilities._pytree", registry={})
        filters = sum(f[1] is not None and "LeafSpec" in f[1].pattern for f in warnings.filters)
    assert [(str(w.message), w.lineno) for w in seen] == [(message, 21), ("another FutureWarning", 22)]
    assert filters == 1
