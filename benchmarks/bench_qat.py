"""QAT on the real MiniLM-L6 fine-tuned on Rotten Tomatoes: accuracy of fp32 / PTQ / QAT, speed of the deployment form.

One run, side by side:
* fine-tune pretrained all-MiniLM-L6-v2 (fresh 2-label head) in fp32, and separately with int8 QAT from the same
  start (same data, steps, AdamW lr 1e-4), at seq 64; the QAT training step is timed against the fp32 step;
* accuracy on the same held-out split: fp32, post-training quantization of the fp32 model (no QAT) and QAT, both
  in the x86 int8 deployment form (PT2E, static activations calibrated on 4 training batches), plus the fake-quant
  QAT model itself;
* latency at seq 128, batch 1 and 32: fp32 eager vs bf16 autocast vs QAT→int8 deployment form (PT2E x86, compiled
  with inductor freezing), measured interleaved with :func:`lightning_latency.latency.compare_latency`.

Run: ``python -m benchmarks.bench_qat`` (~5 min on a quiet 2-core machine), ``--quick`` (smoke run, numbers not
meaningful), ``--full`` (600 training steps and a 2048-example held-out split).
"""

from __future__ import annotations

import copy
import functools
import random
import statistics
import sys
import time
from typing import Any

import torch
from torch import nn

from benchmarks._common import cli, row
from examples._support import tasks
from examples._support.assets import load_minilm, rotten_tomatoes
from lightning_latency.quantization import QuantizationConfig, deploy, prepare_qat, weight_error

BENCH = "qat"


class BF16Autocast(nn.Module):
    """The bf16 baseline users would pick on this CPU (AMX-bf16): the fp32 model run under autocast."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, **inputs: Any) -> Any:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            return self.model(**inputs)


def _settings(quick: bool, full: bool) -> dict[str, Any]:
    if quick:
        return dict(steps=8, batch=16, seq=64, eval_n=128, eval_batch=64, batches=(1,), rounds=1, runs=5)
    if full:
        return dict(steps=600, batch=16, seq=64, eval_n=2048, eval_batch=64, batches=(1, 32), rounds=3, runs=20)
    # ~5 min on a quiet 2-core machine: two fine-tunes of 100 steps dominate (≈0.5 s per fp32 step).
    return dict(steps=100, batch=16, seq=64, eval_n=1024, eval_batch=64, batches=(1, 32), rounds=3, runs=8)


def _data(tokenizer: Any, s: dict[str, Any]) -> tuple[list[dict], list[dict], list[str]]:
    texts, labels = rotten_tomatoes()
    order = list(range(len(texts)))
    random.Random(0).shuffle(order)
    held, train = order[: s["eval_n"]], order[s["eval_n"]:]

    def batches(idx: list[int], size: int) -> list[dict[str, torch.Tensor]]:
        out = []
        for i in range(0, len(idx) - size + 1, size):  # full batches only: deployed graphs have static shapes
            chunk = idx[i: i + size]
            enc = tokenizer([texts[j] for j in chunk], padding="max_length", truncation=True, max_length=s["seq"],
                            return_tensors="pt")
            out.append({"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"],
                        "labels": torch.tensor([labels[j] for j in chunk])})
        return out

    train_batches = batches(train[: s["steps"] * s["batch"]], s["batch"])
    return train_batches, batches(held, s["eval_batch"]), [texts[j] for j in train[:64]]


def _inputs(batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}


def _train(model: nn.Module, batches: list[dict], lr: float = 1e-4) -> list[float]:
    """Plain AdamW fine-tune; returns per-step wall times (s)."""
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=lr)
    times = []
    for batch in batches:
        t0 = time.perf_counter()
        loss = model(**batch).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - t0)
    return times


def _step_ratio(fp32: nn.Module, qat: nn.Module, batch: dict, rounds: int = 3, steps: int = 4) -> tuple[float, float]:
    """QAT/fp32 training-step time, forward+backward, measured alternately (noise hits both alike)."""
    ratios = []
    for _ in range(rounds):
        medians = []
        for model in (fp32, qat):
            model.train()
            times = []
            for i in range(steps + 1):
                t0 = time.perf_counter()
                model(**batch).loss.backward()
                model.zero_grad(set_to_none=True)
                if i:  # the first step of each burst is a warm-up
                    times.append(time.perf_counter() - t0)
            medians.append(statistics.median(times))
        ratios.append(medians[1] / medians[0])
    best = min(ratios)
    return best, (max(ratios) - best) / best


def _latency_inputs(tokenizer: Any, texts: list[str], batch: int, seq: int = 128) -> dict[str, torch.Tensor]:
    enc = tokenizer((texts * batch)[:batch], padding="max_length", truncation=True, max_length=seq,
                    return_tensors="pt")
    return {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]}


def main(quick: bool = False, full: bool = False) -> list[dict[str, str]]:
    from lightning_latency.latency import LatencyConfig, compare_latency

    s = _settings(quick, full)
    torch.manual_seed(0)
    base, tokenizer = load_minilm(num_labels=2)
    train_batches, held_out, calib_texts = _data(tokenizer, s)
    config = QuantizationConfig(scheme="int8_dynamic")  # default skip list: embeddings, classifier head, norms

    fp32 = copy.deepcopy(base)
    torch.manual_seed(0)
    fp32_times = _train(fp32, train_batches)
    qat = copy.deepcopy(base)
    prepare_qat(qat, config)
    torch.manual_seed(0)
    qat_times = _train(qat, train_batches)
    ratio, ratio_spread = _step_ratio(fp32, qat, train_batches[0])
    skip = min(3, len(fp32_times) - 1)  # first steps warm up the allocator
    loop_ratio = statistics.median(qat_times[skip:]) / statistics.median(fp32_times[skip:])
    errors = list(weight_error(qat).values())

    per = s["eval_batch"] // s["batch"]  # calibration batches must have the deployed (static) shape
    groups = [train_batches[i: i + per] for i in range(0, min(len(train_batches), 4 * per) - per + 1, per)]
    calib = [{k: torch.cat([g[k] for g in group]) for k in ("input_ids", "attention_mask")} for group in groups]
    example = _inputs(held_out[0])
    acc = {
        "fp32": tasks.accuracy(fp32, held_out),
        "PTQ int8 (x86, no QAT)": tasks.accuracy(deploy(fp32, example, config, calibration=calib, compile=False), held_out),
        "QAT fake-quant": tasks.accuracy(qat, held_out),
        "QAT int8 (x86 deploy)": tasks.accuracy(deploy(qat, example, config, calibration=calib, compile=False), held_out),
    }

    rows = []
    n_eval = len(held_out) * s["eval_batch"]
    note = f"MiniLM-L6 fine-tuned {len(train_batches)} steps ×{s['batch']} at seq {s['seq']}; {n_eval} held-out"
    for name, value in acc.items():
        target = "" if name == "fp32" else "within 1 pt of fp32" if name.startswith("QAT int8") else ""
        rows.append(row(BENCH, f"accuracy: {name}", f"{100 * value:.1f}%", "", target,
                        f"{100 * (value - acc['fp32']):+.1f} pt vs fp32; {note}"))
    rows.append(row(BENCH, "train step QAT / fp32 (fwd+bwd)", f"×{ratio:.2f}",
                    f"rounds spread {100 * ratio_spread:.0f}%", "≤ ×1.6",
                    f"whole optimizer steps during fine-tuning: ×{loop_ratio:.2f}; batch {s['batch']} seq {s['seq']}"))
    rows.append(row(BENCH, "weight rel. quant error (mean)", f"{100 * statistics.mean(errors):.2f}%", "", "",
                    f"‖Q(W)−W‖/‖W‖ over {len(errors)} int8 per-channel linears"))

    lat_config = LatencyConfig(warmup=2, min_runs=s["runs"], min_time_s=0.2, max_time_s=3.0 if not quick else 1.0)
    for b in s["batches"]:
        inputs = _latency_inputs(tokenizer, calib_texts, b)
        calib_b = [_latency_inputs(tokenizer, calib_texts[i * b % 64:] + calib_texts, b) for i in range(1, 4)]
        t0 = time.perf_counter()
        int8 = deploy(qat, inputs, config, calibration=calib_b)
        compile_s = time.perf_counter() - t0
        fp32.eval()
        models = {"fp32 eager": fp32, "bf16 autocast": BF16Autocast(fp32), "QAT int8 x86 compiled+frozen": int8}
        reports = compare_latency(models, inputs, lat_config, rounds=s["rounds"])
        ref = reports["fp32 eager"]
        rows.append(row(BENCH, f"latency b{b} s128: fp32 eager", f"{ref.median_ms:.1f} ms",
                        f"IQR/median {100 * ref.rel_iqr:.0f}%", "", "baseline"))
        for name in ("bf16 autocast", "QAT int8 x86 compiled+frozen"):
            r = reports[name]
            target = "≥ ×3 (b1)" if name.startswith("QAT") and b == 1 else ""
            rows.append(row(BENCH, f"latency b{b} s128: {name} vs fp32 eager", f"×{r.speedup_over(ref):.2f}",
                            f"IQR/median {100 * r.rel_iqr:.0f}%", target,
                            f"{r.median_ms:.1f} ms; rounds {', '.join(f'{m:.1f}' for m in r.round_medians_ms)} ms"))
        r8, rb = reports["QAT int8 x86 compiled+frozen"], reports["bf16 autocast"]
        rows.append(row(BENCH, f"latency b{b} s128: int8 deploy vs bf16 autocast", f"×{r8.speedup_over(rb):.2f}", "",
                        "> ×1", f"deploy (export+calibrate+compile) took {compile_s:.0f} s"))
    return rows


if __name__ == "__main__":
    _full = "--full" in sys.argv  # _common.cli only knows --quick
    if _full:
        sys.argv.remove("--full")
    cli(functools.partial(main, full=_full),
        "QAT on MiniLM-L6 / Rotten Tomatoes: accuracy fp32 vs PTQ vs QAT, int8 deployment latency vs fp32/bf16")
