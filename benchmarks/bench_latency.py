"""LatencyMonitor benchmarks: is ``measure_latency`` accurate, and is the monitor cheap?

1. Accuracy: the real pretrained MiniLM-L6 encoder (batch 1, seq 128) timed by ``measure_latency`` and by
   ``torch.utils.benchmark.Timer.blocked_autorange`` in the same process, interleaved round by round; the ratio of
   the two medians should be within 5% of 1.
2. Overhead: the same short fit (a small BERT, fixed steps) with and without ``LatencyMonitor`` at default settings,
   interleaved repeats; the median wall-time ratio should be ≤ 1.02. The monitor's self-timed cost is reported too
   (less noisy than a difference of two noisy wall times).

Run: ``python -m benchmarks.bench_latency [--quick]``.
"""

from __future__ import annotations

import statistics
import time
from typing import Any

import torch
from benchmarks._common import cli, row, setup


def _spread(values: list[float]) -> str:
    if len(values) < 2:
        return f"n={len(values)}"
    med = statistics.median(values)
    return f"min..max {min(values):.3f}..{max(values):.3f} (±{100 * (max(values) - min(values)) / 2 / med:.1f}%), n={len(values)}"


def accuracy(quick: bool) -> list[dict[str, str]]:
    from torch.utils.benchmark import Timer

    from examples._support.assets import load_minilm
    from lightning_latency.latency import LatencyConfig, measure_latency

    model, tok = load_minilm()
    model.eval()
    texts = ["a gripping, funny and surprisingly tender film about growing up."] * 1
    inputs = dict(tok(texts, padding="max_length", max_length=128, truncation=True, return_tensors="pt"))
    rounds = 1 if quick else 3
    cfg = LatencyConfig(warmup=3 if quick else 5, min_runs=10 if quick else 30, min_time_s=0.3 if quick else 2.0,
                        max_time_s=5.0 if quick else 20.0)
    ours, theirs, ratios, unstable = [], [], [], 0
    for _ in range(rounds):
        report = measure_latency(model, inputs, cfg)
        unstable += report.unstable
        timer = Timer(stmt="model(**inputs)", globals={"model": model, "inputs": inputs},
                      num_threads=torch.get_num_threads())
        with torch.inference_mode():  # grad mode is thread-local and Timer runs in this thread
            m = timer.blocked_autorange(min_run_time=cfg.min_time_s)
        ours.append(report.median_ms)
        theirs.append(m.median * 1e3)
        ratios.append(report.median_ms / (m.median * 1e3))
    ratio = statistics.median(ratios)
    note = "real MiniLM-L6, batch 1, seq 128, fp32 eager, interleaved rounds"
    return [
        row("latency/accuracy", "measure_latency median (ms)", f"{statistics.median(ours):.2f}", _spread(ours),
            note=f"{note}; {unstable} unstable round(s)"),
        row("latency/accuracy", "Timer.blocked_autorange median (ms)", f"{statistics.median(theirs):.2f}",
            _spread(theirs), note=note),
        row("latency/accuracy", "median ratio ours/Timer", f"×{ratio:.3f}", _spread(ratios), "within 5% of ×1.00",
            note="per-round ratio, median over rounds"),
    ]


def _small_bert() -> Any:
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=8000, hidden_size=256, num_hidden_layers=4, num_attention_heads=4,
                     intermediate_size=1024, max_position_embeddings=128, num_labels=2)
    return BertForSequenceClassification(cfg)


def _fit_seconds(steps: int, with_monitor: bool, root: str) -> tuple[float, float]:
    from torch.utils.data import DataLoader, TensorDataset

    from lightning_latency._compat import LightningModule, Trainer
    from lightning_latency.latency.callback import LatencyMonitor

    class Module(LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.model = _small_bert()

        def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
            ids, labels = batch
            return self.model(input_ids=ids, labels=labels).loss

        def validation_step(self, batch: Any, batch_idx: int) -> None:
            ids, labels = batch
            self.log("val_loss", self.model(input_ids=ids, labels=labels).loss)

        def configure_optimizers(self) -> torch.optim.Optimizer:
            return torch.optim.AdamW(self.parameters(), lr=1e-4)

    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 8000, (16 * steps, 64), generator=g)
    data = TensorDataset(ids, (ids[:, 0] % 2).long())
    callbacks = [LatencyMonitor(model_attr="model", report_file=None)] if with_monitor else []
    trainer = Trainer(accelerator="cpu", devices=1, max_steps=steps, logger=False, enable_progress_bar=False,
                      enable_model_summary=False, enable_checkpointing=False, callbacks=callbacks,
                      default_root_dir=root, num_sanity_val_steps=0, limit_val_batches=2, val_check_interval=None)
    start = time.perf_counter()
    trainer.fit(Module(), DataLoader(data, batch_size=16), DataLoader(data, batch_size=16))
    wall = time.perf_counter() - start
    return wall, callbacks[0].overhead_s if with_monitor else 0.0


def overhead(quick: bool) -> list[dict[str, str]]:
    import logging
    import tempfile

    import lightning_latency._compat  # noqa: F401  (Lightning sets its logger levels on import: quiet them after)

    for name in ("pytorch_lightning", "lightning.pytorch", "lightning_latency"):
        logging.getLogger(name).setLevel(logging.ERROR)
    steps, repeats = (15, 1) if quick else (300, 2)
    ratios, self_shares, walls = [], [], []
    with tempfile.TemporaryDirectory() as root:
        _fit_seconds(3, False, root)  # first fit pays one-off imports and allocator warm-up
        for i in range(repeats):
            order = (False, True) if i % 2 == 0 else (True, False)  # alternate which goes first
            res = {flag: _fit_seconds(steps, flag, root) for flag in order}
            ratios.append(res[True][0] / res[False][0])
            self_shares.append(res[True][1] / res[False][0])
            walls.append(res[False][0])
    note = f"small BERT (4×256, 5.4M params) fit, {steps} steps of batch 16×64, default LatencyMonitor"
    return [
        row("latency/overhead", "fit wall time without monitor (s)", f"{statistics.median(walls):.1f}",
            _spread(walls), note=note),
        row("latency/overhead", "fit wall ratio with/without monitor", f"×{statistics.median(ratios):.3f}",
            _spread(ratios), "≤ ×1.02", note="interleaved repeats, median ratio"),
        row("latency/overhead", "monitor self-time / fit time", f"{100 * statistics.median(self_shares):.2f}%",
            _spread([100 * s for s in self_shares]), "≤ 2%", note="baseline + final measurement, timed inside"),
    ]


def main(quick: bool = False) -> list[dict[str, str]]:
    return accuracy(quick) + overhead(quick)


if __name__ == "__main__":
    setup()
    cli(main, "measure_latency vs torch.utils.benchmark, and LatencyMonitor overhead on a short fit")
