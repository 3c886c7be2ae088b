"""LLM decode on CPU in the PyTorch deployment form: SmolLM2-135M, fp32 HF ``generate`` vs the fast form at low bit.

One run, side by side (batch 1, prompt 64, 64 new tokens, greedy, 2 threads):

* **fp32 HF generate** — the baseline a user gets today;
* the **fast generation form** (``fast_generate``: static KV cache + one compiled single-token step) on fp32,
  bf16, int8 weight-only (``_weight_int8pack_mm``) and int4 weight-only group 32 and 64
  (``_weight_int4pack_mm_for_cpu``, bf16 activations) weights, all from :func:`quantize_weight_only`
  (``lm_head`` quantized too: it is a fifth of the bytes per token). Group 128 cannot run on SmolLM2: 576, the
  input width of every attention and up/gate projection, is not a multiple of 128 (the row says so);
* with ``--student``, trained students (each pruned from the teacher, then distilled on BBC training blocks):
  10% of every layer's query heads and MLP neurons by **activation** vs **Taylor** importance, same KD steps
  (magnitude scored before recovery only); and 4 whole layers removed by block importance
  (``BENCH_LLM_STUDENT_LAYERS``), then two branches of the same KD steps from the pruned student: fp32 (then int4
  PTQ) and int4 g32 weight-only **QAT+KD** from the first step (the combined best, the example's recipe), plus perplexities before recovery; and through **llama.cpp**: the
  shipped Q4_1 GGUF (the peer), our Q4_1 export of the teacher (sanity: the same format) and the combined student
  exported at Q4_1 from its trained int4 grid (``export_gguf`` writes it from the fake-quantized weights).

Rows are measured in interleaved rounds (every variant once per round, ``--rounds`` rounds); each reports the median
over rounds of its TPOT and TTFT, the spread (max − min) / median across rounds, decode tokens/s, size, MBU against
the bandwidth measured here by a 256 MB copy (``measure_bandwidth``), and perplexity on held-out BBC articles plus
Rotten Tomatoes review text (no step trains on either).

**The Q4_1 caveat.** The shipped SmolLM2 weights were dequantized from a Q4_1 GGUF (4 bit, group 32, with a
minimum): int4 group-32 PTQ of the *teacher* is nearly lossless by construction (our grid differs only by bf16
rounding of the scale) and proves nothing about int4 on a model trained in float. Judge int4 on the ``--student`` rows.

Run: ``python -m benchmarks.bench_llm`` (teacher rows; compiles 5 decode steps, ~10 min on a quiet 2-core machine),
``--student`` (adds the student and llama.cpp rows; 78 min in all on 2 AVX2 cores), ``--quick`` (tiny random Llama with the real tokenizer and text;
smoke run, numbers not meaningful).
"""

from __future__ import annotations

import argparse
import copy
import os
import statistics
import time
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader, Subset

from benchmarks._common import machine_line, row, setup, table
from examples._support import assets, tasks
from lightning_latency.latency import LatencyConfig, measure_generation, model_stats
from lightning_latency.latency.fast_generation import fast_generate, measure_bandwidth
from lightning_latency.quantization.weight_only import quantize_weight_only
from lightning_latency.quantization.weight_only_qat import convert_weight_only_qat, prepare_weight_only_qat

BENCH = "llm"


def _settings(quick: bool) -> dict[str, Any]:
    if quick:
        return dict(prompt=16, new=8, rounds=1, runs=2, ppl_blocks=4, seq=64, kd_steps=2,
                    width_steps=2, width=0.25, layers=1, train_blocks=16, batch=2)
    return dict(prompt=64, new=64, rounds=3, runs=3, ppl_blocks=64, seq=128, kd_steps=160,
                width_steps=30, width=0.1, layers=int(os.environ.get("BENCH_LLM_STUDENT_LAYERS", "4")),
                train_blocks=2400, batch=4)


def isa_line() -> str:
    """Torch's CPU capability and the ISA flags that decide which kernels are fast (AVX2 / AVX-512 / VNNI / AMX)."""
    flags: set[str] = set()
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("flags"):
                    flags = set(line.split(":", 1)[1].split())
                    break
    except OSError:
        pass
    wanted = [f for f in ("avx2", "avx512f", "avx512_vnni", "avx512_bf16", "amx_bf16", "amx_int8") if f in flags]
    return f"torch CPU capability {torch.backends.cpu.get_cpu_capability()}; ISA {' '.join(wanted) or 'unknown'}"


def _tiny_llama(vocab: int) -> nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(vocab_size=vocab, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                        num_key_value_heads=2, intermediate_size=128, max_position_embeddings=512,
                                        tie_word_embeddings=True)).eval()


def _variants(base: nn.Module, prefix: str = "") -> dict[str, tuple[nn.Module, bool]]:
    """name -> (model, fast form?) for the teacher-style rows."""
    out: dict[str, tuple[nn.Module, bool]] = {f"{prefix}fp32 HF generate": (base, False),
                                              f"{prefix}fp32 fast": (base, True)}
    out[f"{prefix}bf16 fast"] = (copy.deepcopy(base).to(torch.bfloat16).eval(), True)
    for name, bits, group in (("int8 weight-only", 8, 32), ("int4 weight-only g32", 4, 32)):
        m = copy.deepcopy(base).eval()
        quantize_weight_only(m, bits=bits, group_size=group)
        out[f"{prefix}{name} fast"] = (m, True)
    # lm_head is the tied embedding, which the GGUF did not store on the Q4_1 grid (int4 g32 error 9% vs 0.4% for
    # the blocks): int8 for it alone costs ~1/5 more bytes per token.
    m = copy.deepcopy(base).eval()
    quantize_weight_only(m, bits=8, targets=["lm_head"])
    quantize_weight_only(m, bits=4, group_size=32, exclude=["*lm_head*", "*embed*", "*norm*"])
    out[f"{prefix}int4 g32 + int8 lm_head fast"] = (m, True)
    return out


def _calibration(train: Any, batch: int) -> list[dict[str, Any]]:
    return [{"input_ids": b["input_ids"], "labels": b["input_ids"]}
            for b in DataLoader(Subset(train, range(min(len(train), 4 * batch))), batch_size=batch)]


class _Students:
    """The trained students, each pruned from the teacher and distilled on BBC training blocks (``tasks.distil_lm``:
    KD at T=1 + LM loss), plus what each measured before recovery.

    * width, activation vs Taylor: ``width`` of every layer's query heads and MLP neurons by each importance, the same
      KD steps (magnitude, ``l2``, is scored before recovery only: it wrecks the model);
    * depth: ``layers`` whole layers removed by block importance, the lm_head untied, then two branches of the same
      ``kd_steps`` of KD from the pruned student: fp32 (then int4 PTQ) and int4 g32 weight-only QAT from the first
      step (then converted: the combined best, ``examples/compress_llm.py``'s recipe), so PTQ and QAT see the same
      steps.
    """

    def __init__(self, teacher: nn.Module, train: Any, bbc_test: Any, s: dict[str, Any]) -> None:
        from lightning_latency.distillation import student_from_pruned_teacher

        self.variants: dict[str, tuple[nn.Module, bool]] = {}
        self.before: dict[str, float] = {}
        self.qat_prepared: nn.Module | None = None
        cal, pct, k = _calibration(train, s["batch"]), f"{100 * s['width']:.0f}%", s["layers"]
        for importance in ("activation", "taylor", "l2"):
            student = student_from_pruned_teacher(teacher, s["width"], importance=importance, calibration=cal)
            self.before[f"-{pct} width ({importance})"] = tasks.perplexity(student, bbc_test)
            if importance == "l2":
                continue
            student.model.embed_tokens.requires_grad_(False)  # tied with lm_head
            student = tasks.distil_lm(student, teacher, train, s["width_steps"], s["batch"], 3e-4, seed=0)
            self.variants[f"student -{pct} width ({importance}) + {s['width_steps']} KD, fp32 fast"] = (student, True)
        depth = student_from_pruned_teacher(teacher, 0.0, layers_removed=k, calibration=cal)
        self.before[f"-{k} layers (block importance)"] = tasks.perplexity(depth, bbc_test)
        depth.model.embed_tokens.requires_grad_(False)
        tasks.untie_lm_head(depth)  # the lm_head trains toward its own grid; the embedding stays frozen
        qat = copy.deepcopy(depth)
        steps = s["kd_steps"]
        fp32 = tasks.distil_lm(depth, teacher, train, steps, s["batch"], 3e-4, seed=0)
        prepare_weight_only_qat(qat, bits=4, group_size=32)  # every Linear incl. the untied lm_head, from step 0
        qat = tasks.distil_lm(qat, teacher, train, steps, s["batch"], 3e-4, seed=0)
        self.qat_prepared = copy.deepcopy(qat)  # for the GGUF export: the fake-quant grid the last step trained on
        convert_weight_only_qat(qat)
        ptq = copy.deepcopy(fp32)
        quantize_weight_only(ptq, bits=4, group_size=32)
        name = f"student -{k} layers + {steps} KD"
        self.variants.update({f"{name}, fp32 fast": (fp32, True), f"{name}, int4 g32 PTQ fast": (ptq, True),
                              f"{name}, int4 g32 QAT+KD fast (combined)": (qat, True)})


def _llamacpp_rows(teacher: nn.Module, students: _Students, tokenizer: Any, bbc_test: Any, reviews: Any,
                   s: dict[str, Any]) -> list[dict[str, str]]:
    """The second deployment form: the shipped Q4_1 GGUF (the peer, run by llama.cpp) beside our teacher's Q4_1
    export (sanity: same format, same speed) and the combined student exported at Q4_1 from its int4 QAT grid."""
    import tempfile
    from pathlib import Path

    from benchmarks.bench_llamacpp import build_line, runtime_rows
    from lightning_latency.latency.llamacpp import llamacpp_unavailable
    from lightning_latency.quantization.gguf import export_gguf

    reason = llamacpp_unavailable()
    if reason is not None or students.qat_prepared is None:
        return [row(BENCH, "llama.cpp rows", "skipped", note=(reason or "no student").splitlines()[0][:160])]
    tmp = Path(tempfile.mkdtemp(prefix="bench_llm_"))
    files = {"llama.cpp: shipped Q4_1 (peer)": assets.smollm2_gguf(),
             "llama.cpp: ours teacher Q4_1": export_gguf(teacher, tmp / "teacher.Q4_1.gguf",
                                                         qtype="Q4_1", tokenizer=tokenizer, embedding_qtype="Q8_0"),
             f"llama.cpp: ours student Q4_1 (-{s['layers']} layers, KD + int4 QAT)": export_gguf(
                 students.qat_prepared, tmp / "student.Q4_1.gguf", qtype="Q4_1", tokenizer=tokenizer,
                 embedding_qtype="Q8_0")}
    held_out = bbc_test.encodings["input_ids"].flatten().tolist()
    rows = [row(BENCH, "llama.cpp build", "", note=build_line())]
    return rows + runtime_rows(files, next(iter(files)), held_out[: s["prompt"]], held_out, s, bench=BENCH,
                               reviews=reviews.encodings["input_ids"].flatten().tolist())


def _spread(values: list[float]) -> float:
    med = statistics.median(values)
    return (max(values) - min(values)) / med if med > 0 and len(values) > 1 else 0.0


def main(quick: bool = False, student: bool = False, rounds: int | None = None) -> list[dict[str, str]]:
    s = _settings(quick)
    if rounds:
        s["rounds"] = rounds
    teacher, tokenizer = assets.load_smollm2()
    if quick:
        teacher = _tiny_llama(len(tokenizer))
    train, bbc_test = tasks.bbc_lm_splits(tokenizer, seq_len=s["seq"], n_train=s["train_blocks"] if student else 1,
                                          n_test=s["ppl_blocks"])
    reviews = tasks.review_lm_blocks(tokenizer, s["ppl_blocks"], s["seq"])
    variants = _variants(teacher)
    students = _Students(teacher, train, bbc_test, s) if student else None
    if students is not None:
        variants.update(students.variants)

    bandwidth_mb = 16 if quick else 256
    bandwidth = measure_bandwidth(size_mb=bandwidth_mb)
    prompt = {"input_ids": bbc_test[0]["input_ids"][None, : s["prompt"]]}
    cfg = LatencyConfig(warmup=1, min_runs=s["runs"], min_time_s=0.0, max_time_s=60.0, peak_bandwidth=bandwidth)
    compile_s: dict[str, float] = {}
    with torch.inference_mode():
        for name, (m, fast) in variants.items():  # compile outside the timed rounds (once per model and length)
            start = time.perf_counter()
            if fast:
                fast_generate(m, prompt["input_ids"], s["new"])
                fast_generate(m, prompt["input_ids"], 1)
            compile_s[name] = time.perf_counter() - start
    per_round: dict[str, list[Any]] = {name: [] for name in variants}
    for _ in range(s["rounds"]):  # interleaved: every variant once per round, so machine noise hits all alike
        for name, (m, fast) in variants.items():
            per_round[name].append(measure_generation(m, prompt, cfg, new_tokens=s["new"], fast=fast))

    base_name = "fp32 HF generate"
    tpot = {n: statistics.median(r.tpot_ms for r in reps) for n, reps in per_round.items()}
    rows = []
    ppl_base = None
    for name, (m, fast) in variants.items():
        reps = per_round[name]
        ttft = statistics.median(r.ttft_ms for r in reps)
        mbu = statistics.median(r.mbu for r in reps if r.mbu is not None) if reps[0].mbu is not None else None
        ppl_bbc, ppl_rt = tasks.perplexity(m, bbc_test), tasks.perplexity(m, reviews)
        if name == base_name:
            ppl_base = (ppl_bbc, ppl_rt)
        rise = f"ppl BBC {ppl_bbc:.1f} ({100 * (ppl_bbc / ppl_base[0] - 1):+.1f}%), RT {ppl_rt:.1f} " \
               f"({100 * (ppl_rt / ppl_base[1] - 1):+.1f}%)" if ppl_base else ""
        mbu_text = f"{100 * mbu:.0f}%" if mbu is not None else "n/a"
        note = (f"{1e3 / tpot[name]:.1f} tok/s decode; TTFT {ttft:.0f} ms; TPOT {tpot[name]:.1f} ms; "
                f"{model_stats(m).model_mb:.0f} MB; MBU {mbu_text}; {rise}"
                + (f"; compile {compile_s[name]:.0f} s" if fast else ""))
        target = "≥ ×2.5, ppl ≤ +10%" if "int4" in name or "int8" in name else ""
        rows.append(row(BENCH, f"decode speed-up: {name}", f"×{tpot[base_name] / tpot[name]:.2f}",
                        f"TPOT spread {100 * _spread([r.tpot_ms for r in reps]):.0f}% over {len(reps)} rounds",
                        target, note))
    rows.append(row(BENCH, "int4 weight-only g128", "n/a", "", "",
                    "SmolLM2's 576-wide inputs are not a multiple of 128: the kernel needs group | in_features"))
    rows.append(row(BENCH, f"memory bandwidth ({bandwidth_mb} MB copy)", f"{bandwidth / 1e9:.1f} GB/s", "", "",
                    f"MBU denominator; {isa_line()}; batch 1, prompt {s['prompt']}, {s['new']} new tokens, greedy"))
    if students is None:
        rows.append(row(BENCH, "student rows", "skipped", "", "", "pass --student (Q4_1 caveat: int4 on the teacher "
                                                                    "proves nothing)"))
        return rows
    base = ppl_base[0] if ppl_base else float("nan")
    for what, ppl in students.before.items():
        rows.append(row(BENCH, f"before recovery: {what}", f"ppl BBC {ppl:.1f}", note=f"×{ppl / base:.2f} the "
                                                                                      "teacher's; no KD yet"))
    rows += _llamacpp_rows(teacher, students, tokenizer, bbc_test, reviews, s)
    return rows


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="tiny random Llama: smoke run, numbers not meaningful")
    parser.add_argument("--student", action="store_true", help="add the pruned+KD student and its int4 PTQ/QAT rows")
    parser.add_argument("--rounds", type=int, default=None, help="interleaved timing rounds (default 3)")
    args = parser.parse_args()
    setup()
    result = main(quick=args.quick, student=args.student, rounds=args.rounds)
    print(f"\nMachine: {machine_line()}; {isa_line()}\n")
    print(table(result))
