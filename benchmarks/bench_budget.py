"""Compress to a latency budget on the real fine-tuned MiniLM-L6: budget allocation vs uniform structured pruning.

    python -m benchmarks.bench_budget [--quick]

Budget = 40% of the dense model's p50 at batch 1, seq 48 (eager fp32, 2 threads), measured on this machine at the
start of the run. Per paired seed:
  * budget: ``LatencyBudgetPruning`` (sensitivity on 4 training batches, plan, prune at steps 10/20/30 measuring
    after every removal, then recover) for ``STEPS`` steps of fine-tuning;
  * uniform: ``MagnitudePruning(mode="structured")`` at the one sparsity whose measured latency is closest to what
    the budget run achieved (bisection on pruned copies), same steps, same data order.
Reported: achieved p50 vs the budget (re-measured at the end, best of 3 medians), held-out accuracy of both arms on
1,000 snippets, and the paired gain with its standard error.
"""

from __future__ import annotations

import copy
import os
import statistics
from typing import Any

import torch

from benchmarks._common import cli, row

BENCH = "budget"
SEQ = 48


class _Classifier:
    """A tiny LightningModule factory (built lazily: importing Lightning is slow)."""

    @staticmethod
    def build(model: torch.nn.Module, train: Any, seed: int, batch_size: int, lr: float) -> Any:
        from torch.utils.data import DataLoader

        from lightning_latency._compat import LightningModule

        class Module(LightningModule):
            def __init__(self) -> None:
                super().__init__()
                self.model = model

            def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
                return self.model(**batch).loss

            def configure_optimizers(self) -> Any:
                return torch.optim.AdamW(self.parameters(), lr=lr)

            def train_dataloader(self) -> DataLoader:
                return DataLoader(train, batch_size=batch_size, shuffle=True,
                                  generator=torch.Generator().manual_seed(seed))

        return Module()


def _latency_fn(inputs: dict[str, torch.Tensor], quick: bool) -> Any:
    from lightning_latency.latency import measure_latency

    def p50(model: torch.nn.Module) -> float:
        return measure_latency(model, inputs, warmup=2, min_runs=8 if quick else 15,
                               max_time_s=0.5 if quick else 1.5).p50_ms

    return p50


def _settled(fn: Any, model: torch.nn.Module, rounds: int = 3) -> float:
    return min(fn(model) for _ in range(rounds))  # best median: the least disturbed by other processes


def _uniform_sparsity(teacher: torch.nn.Module, target_ms: float, fn: Any, iterations: int) -> float:
    from lightning_latency.pruning import PruningConfig, prune_step

    low, high = 0.0, 0.9
    for _ in range(iterations):
        mid = (low + high) / 2
        work = copy.deepcopy(teacher)
        prune_step(work, PruningConfig(mode="structured", max_layer_sparsity=0.9), mid)
        if _settled(fn, work, 2) > target_ms:
            low = mid
        else:
            high = mid
    return high


def main(quick: bool = False) -> list[dict[str, str]]:
    from examples._support import tasks
    from lightning_latency.pruning.budget_callback import LatencyBudgetPruning
    from lightning_latency.pruning.callback import MagnitudePruning

    seeds = [0] if quick else [0, 1, 2]
    steps = 40 if quick else 200
    teacher, tokenizer = tasks.minilm_sentiment_teacher(steps=20 if quick else 120, seq_len=SEQ, progress=False)
    train, test = tasks.rotten_tomatoes_splits(tokenizer, n_train=2000, n_test=200 if quick else 1000, seq_len=SEQ)
    one = test[0]
    inputs = {k: one[k].unsqueeze(0) for k in ("input_ids", "attention_mask")}
    fn = _latency_fn(inputs, quick)
    dense_ms = _settled(fn, teacher)
    # The budget is 40% of the dense p50; where eager pruning alone cannot reach that (the floor check says
    # so) a run can ask for another fraction: BENCH_BUDGET_FRACTION=0.5 (the table names the fraction used).
    fraction = float(os.environ.get("BENCH_BUDGET_FRACTION", "0.4"))
    target = fraction * dense_ms
    dense_acc = tasks.accuracy(teacher, test)
    budget_ms, budget_acc, uniform_ms, uniform_acc, sparsities = [], [], [], [], []
    history: list[str] = []
    removals: list[int] = []
    for seed in seeds:
        torch.manual_seed(seed)
        student = copy.deepcopy(teacher).train()
        callback = LatencyBudgetPruning(target_ms=target, latency_fn=fn, start_step=10, every_n_steps=10, steps=3,
                                        calibration_batches=4, fractions=(0.25, 0.5, 0.75, 0.9), max_fraction=0.9,
                                        model_attr="model")
        tasks.fit(_Classifier.build(student, train, seed, 16, 5e-5), None, steps, callbacks=[callback])
        budget_ms.append(_settled(fn, student.eval()))
        history.append(" → ".join(f"{ms:.1f}" for _, ms in callback.history))
        removals.append(len(callback.allocation))
        budget_acc.append(tasks.accuracy(student, test))

        sparsity = _uniform_sparsity(teacher, budget_ms[-1], fn, 3 if quick else 6)
        sparsities.append(sparsity)
        torch.manual_seed(seed)
        uniform = copy.deepcopy(teacher).train()
        pruning = MagnitudePruning(mode="structured", final_sparsity=sparsity, start_step=10, end_step=30,
                                   every_n_steps=10, max_layer_sparsity=0.9, model_attr="model")
        tasks.fit(_Classifier.build(uniform, train, seed, 16, 5e-5), None, steps, callbacks=[pruning])
        uniform_ms.append(_settled(fn, uniform.eval()))
        uniform_acc.append(tasks.accuracy(uniform, test))

    gains = [100 * (b - u) for b, u in zip(budget_acc, uniform_acc)]
    sem = statistics.stdev(gains) / len(gains) ** 0.5 if len(gains) > 1 else float("nan")
    over = [100 * (ms / target - 1) for ms in budget_ms]
    rows = [
        row(BENCH, "dense p50, batch 1, seq 48 (eager fp32)", f"{dense_ms:.2f} ms", note=f"accuracy {100 * dense_acc:.1f}%"),
        row(BENCH, f"budget ({fraction:.0%} of dense)", f"{target:.2f} ms"),
        row(BENCH, "achieved p50 vs budget", " / ".join(f"{o:+.1f}%" for o in over), target="within ±5%",
            note=f"per seed; {' / '.join(f'{ms:.2f}' for ms in budget_ms)} ms"),
        row(BENCH, "measured in the fit, per pruning step", " / ".join(history) + " ms",
            note="removals " + " / ".join(map(str, removals))),
        row(BENCH, "uniform p50 (sparsity tuned to the same latency)", " / ".join(f"{ms:.2f}" for ms in uniform_ms) +
            " ms", note="sparsity " + " / ".join(f"{s:.2f}" for s in sparsities)),
        row(BENCH, "accuracy, budget allocation", " / ".join(f"{100 * a:.1f}%" for a in budget_acc)),
        row(BENCH, "accuracy, uniform", " / ".join(f"{100 * a:.1f}%" for a in uniform_acc)),
        row(BENCH, "gain budget − uniform", f"{statistics.mean(gains):+.2f} pt", spread=f"± {sem:.2f} (std error)",
            target="wins on most seeds", note=f"wins {sum(g > 0 for g in gains)}/{len(gains)} seeds; {steps} steps"),
    ]
    return rows


if __name__ == "__main__":
    cli(main, __doc__.splitlines()[0])
