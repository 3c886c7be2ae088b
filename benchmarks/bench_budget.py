"""Compress to a latency budget on the real fine-tuned MiniLM-L6: budget allocation vs uniform structured pruning.

    python -m benchmarks.bench_budget [--quick]

The deployment form is chosen by measurement at the start of the run: the dense model is deployed as ONNX Runtime
int8 and fp32 (forms that build in ~2 s, so every candidate of the sensitivity pass can be deployed) and timed
beside eager fp32, batch 1, seq 48, 2 threads, interleaved rounds; the fastest is "the deployed form"
(``BENCH_BUDGET_FORM`` forces one). Budget = 40% of the dense model's deployed p50 (``BENCH_BUDGET_FRACTION``).
Every latency below, in the fit and after it, is the p50 of that deployed form, timed side by side with the dense
deployed form (``deployed_latency_fn(reference=dense, rounds=5)``: rounds of candidate, dense, dense, candidate,
each round on a fresh ONNX Runtime session of the candidate, median over rounds) and given on the scale of the dense
p50 taken when the budget was set, so the machine's drift over the run and the session-to-session spread (up to
±15% on 2 cores) cancel. Per paired seed:
  * budget: ``LatencyBudgetPruning(depth=True)`` (sensitivity of every layer's heads, MLP neurons and the whole
    layer on 4 training batches, each candidate deployed and timed; plan; prune at steps 10/20/30 measuring after
    every removal; then recover) for ``STEPS`` steps of fine-tuning;
  * uniform: ``MagnitudePruning(mode="structured")`` at the one sparsity whose deployed latency is closest to what
    the budget run achieved (bisection on pruned copies), same steps, same data order.
Reported: achieved p50 vs the budget (re-measured at the end, median of 3 medians), held-out accuracy of both arms'
deployed forms on 1,000 snippets, and the paired gain with its standard error. The sensitivity chart of the first
seed is written to ``docs/budget_sensitivity.png``.
"""

from __future__ import annotations

import copy
import os
import statistics
from pathlib import Path
from typing import Any

import torch

from benchmarks._common import cli, row

BENCH = "budget"
SEQ = 48
ROUNDS = 5  # timing rounds per latency call, each on a fresh ONNX Runtime session (sessions differ by up to ±15%)
_PLOT = Path(__file__).resolve().parent.parent / "docs" / "budget_sensitivity.png"


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


def _settings(quick: bool) -> Any:
    from lightning_latency.latency import LatencyConfig

    # 0.1 s of runs per timing is plenty within one session (~3% spread); the spread is between sessions, which
    # ROUNDS fresh sessions per call take care of
    return LatencyConfig(warmup=2, min_runs=8 if quick else 15, min_time_s=0.1, max_time_s=0.5 if quick else 1.0)


def _forms(inputs: dict[str, torch.Tensor], quick: bool) -> dict[str, Any]:
    """``{form: latency_fn}``: eager fp32 and the two ONNX Runtime deployment forms, same timing settings."""
    from lightning_latency.latency import deployed_latency_fn, measure_latency

    settings = _settings(quick)
    forms: dict[str, Any] = {"eager": lambda model: measure_latency(model, inputs, settings).p50_ms}
    for backend in ("ort_int8", "ort"):
        forms[backend] = deployed_latency_fn(inputs, backend, latency=settings)
    return forms


def _deployed(model: torch.nn.Module, inputs: dict[str, torch.Tensor], form: str) -> Any:
    if form == "eager":
        return model.eval()
    from lightning_latency.quantization import deploy

    return deploy(model.eval(), inputs, backend=form)


def _settled(fn: Any, model: torch.nn.Module, rounds: int = 3) -> float:
    return statistics.median(fn(model) for _ in range(rounds))  # the median of medians: no luck either way


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
    keys = ("input_ids", "attention_mask")
    forms = _forms(inputs, quick)
    dense = {name: [] for name in forms}
    for _ in range(3):  # interleaved rounds
        for name, fn in forms.items():
            dense[name].append(fn(teacher))
    dense_p50 = {name: min(v) for name, v in dense.items()}
    form = os.environ.get("BENCH_BUDGET_FORM") or min(dense_p50, key=dense_p50.get)
    fn, dense_ms = forms[form], dense_p50[form]
    if form != "eager":  # every later figure timed beside the dense deployed form, on its scale: drift cancels
        from lightning_latency.latency import deployed_latency_fn

        fn = deployed_latency_fn(inputs, form, latency=_settings(quick), reference=teacher,
                                 rounds=3 if quick else ROUNDS)
        dense_ms = fn.anchor_ms
    fraction = float(os.environ.get("BENCH_BUDGET_FRACTION", "0.4"))
    target = fraction * dense_ms
    dense_acc = tasks.accuracy(_deployed(teacher, inputs, form), test, 1, static=True, keys=keys)
    budget_ms, budget_acc, uniform_ms, uniform_acc, sparsities = [], [], [], [], []
    history: list[str] = []
    allocations: list[str] = []
    for seed in seeds:
        torch.manual_seed(seed)
        student = copy.deepcopy(teacher).train()
        callback = LatencyBudgetPruning(target_ms=target, latency_fn=fn, start_step=10, every_n_steps=10, steps=3,
                                        calibration_batches=4, fractions=(0.25, 0.5, 0.75, 0.9), max_fraction=0.9,
                                        model_attr="model", depth=True)
        tasks.fit(_Classifier.build(student, train, seed, 16, 5e-5), None, steps, callbacks=[callback])
        budget_ms.append(_settled(fn, student.eval()))
        history.append(" → ".join(f"{ms:.2f}" for _, ms in callback.history))
        moves = callback.allocation
        layers = sorted(m.block.rsplit(".", 1)[-1] for m in moves if m.kind == "block")
        allocations.append(f"{len(moves)} removals, layers removed {','.join(layers) or 'none'}")
        budget_acc.append(tasks.accuracy(_deployed(student, inputs, form), test, 1, static=True, keys=keys))
        if seed == seeds[0] and callback.report is not None and not quick:
            callback.report.plot(str(_PLOT))

        sparsity = _uniform_sparsity(teacher, budget_ms[-1], fn, 3 if quick else 6)
        sparsities.append(sparsity)
        torch.manual_seed(seed)
        uniform = copy.deepcopy(teacher).train()
        pruning = MagnitudePruning(mode="structured", final_sparsity=sparsity, start_step=10, end_step=30,
                                   every_n_steps=10, max_layer_sparsity=0.9, model_attr="model")
        tasks.fit(_Classifier.build(uniform, train, seed, 16, 5e-5), None, steps, callbacks=[pruning])
        uniform_ms.append(_settled(fn, uniform.eval()))
        uniform_acc.append(tasks.accuracy(_deployed(uniform, inputs, form), test, 1, static=True, keys=keys))

    gains = [100 * (b - u) for b, u in zip(budget_acc, uniform_acc)]
    sem = statistics.stdev(gains) / len(gains) ** 0.5 if len(gains) > 1 else float("nan")
    over = [100 * (ms / target - 1) for ms in budget_ms]
    dense_note = "; ".join(f"{name} {ms:.2f}" for name, ms in dense_p50.items())
    rows = [
        row(BENCH, f"dense p50, batch 1, seq {SEQ}, deployed form: {form}", f"{dense_ms:.2f} ms",
            note=f"all forms (best of 3 interleaved): {dense_note} ms; deployed accuracy {100 * dense_acc:.1f}%"),
        row(BENCH, f"budget ({fraction:.0%} of dense, {form})", f"{target:.2f} ms"),
        row(BENCH, "achieved p50 vs budget", " / ".join(f"{o:+.1f}%" for o in over), target="within ±5%",
            note=f"per seed; {' / '.join(f'{ms:.2f}' for ms in budget_ms)} ms (re-measured after the fit)"),
        row(BENCH, "measured in the fit, per pruning step", " / ".join(history) + " ms",
            note=" / ".join(allocations)),
        row(BENCH, "uniform p50 (sparsity tuned to the same latency)", " / ".join(f"{ms:.2f}" for ms in uniform_ms) +
            " ms", note="sparsity " + " / ".join(f"{s:.2f}" for s in sparsities)),
        row(BENCH, "accuracy, budget allocation (deployed)", " / ".join(f"{100 * a:.1f}%" for a in budget_acc)),
        row(BENCH, "accuracy, uniform (deployed)", " / ".join(f"{100 * a:.1f}%" for a in uniform_acc)),
        row(BENCH, "gain budget − uniform", f"{statistics.mean(gains):+.2f} pt", spread=f"± {sem:.2f} (std error)",
            target="wins on most seeds", note=f"wins {sum(g > 0 for g in gains)}/{len(gains)} seeds; {steps} steps"),
    ]
    return rows


if __name__ == "__main__":
    cli(main, __doc__.splitlines()[0])
