from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
from helpers import HFModule, RankStateDump, read_csv_metrics, trainer_kwargs

from lightning_latency._compat import MisconfigurationException, Trainer, pl
from lightning_latency.base import CompressionCallback
from lightning_latency.latency import LatencyConfig
from lightning_latency.latency.callback import LatencyMonitor
from lightning_latency.latency.final import final_backend

RECIPE = Path(__file__).resolve().parents[1] / "callbacks" / "latency.yaml"
FAST = dict(warmup=1, min_runs=3, max_time_s=0.5, threads=1)


def _monitor(**kw: Any) -> LatencyMonitor:
    return LatencyMonitor(**{**FAST, **kw})


def _latency_rows(trainer: Any) -> list[dict[str, str]]:
    return [r for r in read_csv_metrics(trainer) if r.get("latency/p50_ms")]


def test_metrics_reach_csv_logger_baseline_and_final(tmp_path: Path) -> None:
    mon = _monitor(model_attr="model")
    trainer = Trainer(callbacks=[mon], **trainer_kwargs(tmp_path, max_steps=4, limit_val_batches=1))
    trainer.fit(HFModule(kind="bert"))
    assert [r["phase"] for r in mon.records] == ["baseline", "final"]
    assert mon.records[0]["step"] == 0 and mon.records[1]["step"] == 4
    rows = _latency_rows(trainer)
    assert [int(r["step"]) for r in rows] == [0, 4]
    for r in rows:
        assert float(r["latency/p50_ms"]) > 0 and float(r["latency/samples_per_s"]) > 0
        assert float(r["latency/p90_ms"]) >= float(r["latency/p50_ms"])
        assert float(r["latency/model_mb"]) > 0 and float(r["latency/nonzero_params"]) > 0
        assert r["latency/speedup"] and r["latency/iqr_ms"] and r["latency/tokens_per_s"]
    assert float(rows[0]["latency/speedup"]) == pytest.approx(1.0)
    # inputs came from the validation batch (batch_size 8, seq 16), labels dropped
    assert mon.records[0]["forward"]["batch_size"] == 8 and mon.records[0]["forward"]["seq_len"] == 16
    report = json.loads((Path(trainer.log_dir) / "latency_report.json").read_text())
    assert [r["phase"] for r in report["records"]] == ["baseline", "final"]
    assert "latency/p50_ms" in report["records"][1]["metrics"] and report["overhead_s"] > 0


def test_generative_model_gets_ttft_tpot(tmp_path: Path) -> None:
    mon = _monitor(model_attr="model", prompt_len=8, new_tokens=3, every_n_val_epochs=1)
    trainer = Trainer(callbacks=[mon], **trainer_kwargs(tmp_path, max_steps=4, limit_val_batches=1))
    trainer.fit(HFModule(kind="llama"))
    assert [r["phase"] for r in mon.records] == ["baseline", "val_epoch_1", "final"]
    rows = _latency_rows(trainer)
    for r in rows:
        assert float(r["latency/ttft_ms"]) > 0 and float(r["latency/tpot_ms"]) > 0
        assert float(r["latency/gen_tokens_per_s"]) > 0 and r["latency/decode_speedup"]
        assert float(r["latency/tokens_per_s"]) > 0  # the forward pass keeps its own tokens/s
    gen = mon.reports()["final/generation"]
    assert gen.new_tokens == 3 and gen.prompt_len == 8


def test_resume_does_not_remeasure_baseline(tmp_path: Path) -> None:
    ckpt_cb = pl.callbacks.ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True)
    first = _monitor(model_attr="model", measure_final=False)
    t1 = Trainer(callbacks=[first, ckpt_cb], **trainer_kwargs(tmp_path / "a", max_steps=4, limit_val_batches=1,
                                                              enable_checkpointing=True))
    t1.fit(HFModule())
    assert [r["phase"] for r in first.records] == ["baseline"]
    second = _monitor(model_attr="model")
    t2 = Trainer(callbacks=[second], **trainer_kwargs(tmp_path / "b", max_steps=8, limit_val_batches=1))
    t2.fit(HFModule(), ckpt_path=str(tmp_path / "ckpt" / "last.ckpt"))
    assert [(r["phase"], r["step"]) for r in second.records] == [("baseline", 0), ("final", 8)]
    assert second.records[0] == first.records[0]  # restored, not re-measured
    rows = _latency_rows(t2)
    assert [int(r["step"]) for r in rows] == [8]  # only the final measurement ran in the resumed fit
    assert rows[0]["latency/speedup"]  # against the restored baseline


def test_explicit_inputs_callable_and_batch_hook(tmp_path: Path) -> None:
    ids = torch.randint(0, 128, (3, 12))
    mon = _monitor(model_attr="model", inputs=lambda: {"input_ids": ids}, generation=False)
    Trainer(callbacks=[mon], **trainer_kwargs(tmp_path / "a", max_steps=1, limit_val_batches=0)).fit(HFModule())
    assert mon.records[0]["forward"]["batch_size"] == 3 and mon.records[0]["forward"]["seq_len"] == 12

    class FirstTwo(LatencyMonitor):
        def batch_to_inputs(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
            return {"input_ids": batch["input_ids"][:2]}

    sub = FirstTwo(model_attr="model", **FAST)
    Trainer(callbacks=[sub], **trainer_kwargs(tmp_path / "b", max_steps=1, limit_val_batches=0)).fit(HFModule())
    assert sub.records[0]["forward"]["batch_size"] == 2  # from the train batch: no validation here


def test_measures_lightning_module_itself_by_default(tmp_path: Path) -> None:
    mon = _monitor()
    Trainer(callbacks=[mon], **trainer_kwargs(tmp_path, max_steps=2, limit_val_batches=1)).fit(HFModule())
    assert len(mon.records) == 2 and mon.records[0]["forward"]["num_params"] > 0


def test_state_dict_round_trip_and_state_key() -> None:
    mon = _monitor(model_attr="student", every_n_val_epochs=2)
    mon.baseline_done, mon.val_epochs, mon.records = True, 4, [{"phase": "baseline"}]
    fresh = _monitor(model_attr="student", every_n_val_epochs=2)
    fresh.load_state_dict(mon.state_dict())
    assert fresh.baseline_done and fresh.val_epochs == 4 and fresh.records == [{"phase": "baseline"}]
    fresh.load_state_dict({})  # an old checkpoint without our keys
    assert not fresh.baseline_done and fresh.records == []
    assert mon.state_key != _monitor(model_attr="model").state_key and "student" in mon.state_key


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        (dict(every_n_val_epochs=-1), r"`every_n_val_epochs` must be an integer >= 0, got -1"),
        (dict(new_tokens=1), r"`new_tokens` must be an integer >= 2, got 1"),
        (dict(prompt_len=0), r"`prompt_len` must be an integer >= 1, got 0"),
        (dict(model_attr=""), r"`model_attr` must be None or an attribute name"),
        (dict(generation="yes"), r"`generation` must be None \(auto\), True or False, got 'yes'"),
        (dict(batch_to_inputs=3), r"`batch_to_inputs` must be a callable"),
        (dict(config={"warmup": 1}), r"`config` must be a LatencyConfig or None, got dict"),
        (dict(report_file="a/b.json"), r"`report_file` must be a plain file name or None"),
        (dict(max_time_s=-1.0), r"`max_time_s` must be a number of seconds >= 0, got -1.0"),
        (dict(threads=0), r"`threads` must be None or an integer >= 1, got 0"),
    ],
)
def test_monitor_misconfiguration(kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        LatencyMonitor(**kwargs)


def test_wrong_model_attr_fails_at_setup(tmp_path: Path) -> None:
    trainer = Trainer(callbacks=[_monitor(model_attr="student")], **trainer_kwargs(tmp_path))
    with pytest.raises(MisconfigurationException, match=r"`model_attr='student'`: HFModule has no attribute 'student'"):
        trainer.fit(HFModule())


def test_config_object_and_shortcuts_combine() -> None:
    mon = LatencyMonitor(config=LatencyConfig(warmup=7, min_runs=4), max_time_s=0.05)
    assert mon.config.warmup == 7 and mon.config.max_time_s == 0.05 and mon.config.min_time_s <= 0.05


def test_works_in_lightning_pytorch_trainer(tmp_path: Path) -> None:
    import lightning.pytorch as L

    from helpers import tiny_bert

    class LModule(L.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.model = tiny_bert()

        def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
            return self.model(**batch).loss

        def configure_optimizers(self) -> torch.optim.Optimizer:
            return torch.optim.SGD(self.parameters(), lr=0.01)

        def train_dataloader(self) -> Any:
            from helpers import TokenDataset

            return torch.utils.data.DataLoader(TokenDataset(8, 16), batch_size=4)

    mon = _monitor(model_attr="model")
    trainer = L.Trainer(callbacks=[mon], accelerator="cpu", max_steps=2, logger=L.loggers.CSVLogger(tmp_path),
                        enable_progress_bar=False, enable_model_summary=False, enable_checkpointing=False)
    trainer.fit(LModule())
    assert [r["phase"] for r in mon.records] == ["baseline", "final"]
    assert (Path(trainer.log_dir) / "latency_report.json").exists()


def test_cli_recipe_loads() -> None:
    import importlib

    cli = importlib.import_module(f"{pl.__name__}.cli").LightningCLI(HFModule, run=False, save_config_callback=None,
                                                                     args=["--config", str(RECIPE),
                                                                           "--trainer.logger=false",
                                                                           "--trainer.enable_progress_bar=false"])
    mons = [c for c in cli.trainer.callbacks if isinstance(c, LatencyMonitor)]
    assert len(mons) == 1
    mon = mons[0]
    assert mon.model_attr == "model" and mon.every_n_val_epochs == 2 and mon.new_tokens == 8
    assert mon.config.max_time_s == 2.0 and mon.config.min_runs == 10 and mon.config.warmup == 3


def _monitor_state(pl_module: Any) -> dict[str, Any]:
    mon = next(c for c in pl_module.trainer.callbacks if isinstance(c, LatencyMonitor))
    return {"phases": [r["phase"] for r in mon.records], "baseline_done": mon.baseline_done,
            "step": pl_module.trainer.global_step}


@pytest.mark.ddp
def test_ddp_only_rank_zero_measures_and_ranks_stay_in_step(tmp_path: Path) -> None:
    mon = _monitor(model_attr="model")
    trainer = Trainer(callbacks=[mon, RankStateDump(tmp_path, fn=_monitor_state)],
                      **trainer_kwargs(tmp_path, strategy="ddp_spawn", devices=2, max_steps=3, limit_val_batches=1))
    trainer.fit(HFModule())
    r0, r1 = torch.load(tmp_path / "rank0.pt"), torch.load(tmp_path / "rank1.pt")
    assert r0["phases"] == ["baseline", "final"] and r1["phases"] == []
    assert r0["baseline_done"] and r1["baseline_done"] and r0["step"] == r1["step"] == 3


def test_final_measurement_times_the_deployed_form_after_qat(tmp_path: Path) -> None:
    pytest.importorskip("onnxruntime")
    from lightning_latency.quantization.callback import QuantizationAwareTraining

    # QAT listed first: at fit end it converts to torchao int8 before the monitor measures; the monitor deploys a
    # copy from the converted weights anyway. ort_int8 keeps the test fast (no inductor compile).
    qat = QuantizationAwareTraining(scheme="int8_dynamic", start_step=0, log_every_n_steps=0)
    mon = _monitor(model_attr="model", deploy_final="ort_int8")
    trainer = Trainer(callbacks=[qat, mon], **trainer_kwargs(tmp_path, max_steps=3, limit_val_batches=1))
    module = HFModule(kind="bert")
    trainer.fit(module)
    final = mon.records[-1]
    assert [r["phase"] for r in mon.records] == ["baseline", "final"]
    assert final["form"] == "deployed ort_int8" and final["deploy"]["backend"] == "ort_int8"
    assert final["eager"]["median_ms"] > 0 and final["forward"]["batch_size"] == mon.records[0]["forward"]["batch_size"]
    assert final["eager_form"] == "as trained, converted (torchao int8), eager"  # QAT converted it first
    assert final["forward"]["seq_len"] == mon.records[0]["forward"]["seq_len"]  # same shapes as the baseline
    metrics = mon.metrics(final)
    assert metrics["latency/eager_p50_ms"] == pytest.approx(final["eager"]["median_ms"])
    report = json.loads((Path(trainer.log_dir) / "latency_report.json").read_text())
    assert report["records"][-1]["form"] == "deployed ort_int8"
    # without an explicit choice the monitor deploys with the QAT config's backend; no QAT, no pruning: eager
    assert final_backend(module.model, trainer.callbacks, None)[0] == "x86"
    plain = _monitor(model_attr="model")
    plain_trainer = Trainer(callbacks=[plain], **trainer_kwargs(tmp_path / "plain", max_steps=1, limit_val_batches=1))
    plain_trainer.fit(HFModule(kind="bert"))
    assert plain.records[-1]["form"] == "eager" and "eager" not in plain.records[-1]


@pytest.mark.parametrize("value", [3, "tpu"])
def test_deploy_final_misconfiguration(value: Any) -> None:
    with pytest.raises(ValueError, match="`deploy_final`"):
        LatencyMonitor(deploy_final=value)


class _FakeCompressor(CompressionCallback):
    """Any compression callback: the monitor knows it only by ``compresses`` and ``deploy_config()``."""

    compresses = True

    def __init__(self, config: Any = None) -> None:
        super().__init__("model")
        self.config = config

    def deploy_config(self) -> Any:
        return self.config


def test_a_compressing_callback_makes_the_final_row_the_deployed_form(tmp_path: Path) -> None:
    pytest.importorskip("onnxruntime")
    from lightning_latency.quantization import QuantizationConfig

    # the callback's deploy_config() picks the backend (ort_int8: an ONNX export, no inductor compile: fast)
    mon = _monitor(model_attr="model")
    trainer = Trainer(callbacks=[_FakeCompressor(QuantizationConfig(backend="ort_int8")), mon],
                      **trainer_kwargs(tmp_path, max_steps=2, limit_val_batches=1))
    trainer.fit(HFModule(kind="bert"))
    final = mon.records[-1]
    assert final["form"] == "deployed ort_int8" and final["eager"]["median_ms"] > 0
    assert final["eager_form"] == "as trained, eager"
    rows = _latency_rows(trainer)
    assert float(rows[-1]["latency/eager_p50_ms"]) == pytest.approx(final["eager"]["median_ms"])
    # compresses=False (the base's default): the model is timed as it is
    plain = _monitor(model_attr="model")
    Trainer(callbacks=[CompressionCallback(), plain],
            **trainer_kwargs(tmp_path / "plain", max_steps=1, limit_val_batches=1)).fit(HFModule(kind="bert"))
    assert plain.records[-1]["form"] == "eager" and "eager" not in plain.records[-1]


def test_the_monitor_imports_no_other_callback() -> None:
    import ast

    import lightning_latency.latency as latency

    imported = set()
    for path in Path(latency.__file__).parent.glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module:
                imported.add(node.module)
            elif isinstance(node, ast.Import):
                imported.update(alias.name for alias in node.names)
    ours = {m for m in imported if m.startswith("lightning_latency.") and not m.startswith("lightning_latency.latency")}
    assert ours and not {m for m in ours if "callback" in m or m.startswith("lightning_latency.distillation")}, ours


def test_generation_true_without_generate_fails_at_setup(tmp_path: Path) -> None:
    trainer = Trainer(callbacks=[_monitor(model_attr="model", generation=True)], **trainer_kwargs(tmp_path))
    with pytest.raises(MisconfigurationException, match=r"LatencyMonitor: `generation=True` but .* no `generate`"):
        trainer.fit(HFModule(kind="bert"))
