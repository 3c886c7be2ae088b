"""A decode tokens/s budget on the real SmolLM2-135M: budget allocation vs uniform structured pruning.

    python -m benchmarks.bench_budget_llm [--quick]

Decode speed = 1000 / TPOT of greedy Hugging Face ``generate`` at batch 1 (prompt 32 held-out BBC tokens, 16 new
tokens, 2 threads, eager fp32), measured at the start on the dense model: the budget is ``BENCH_LLM_SPEEDUP``
(default 1.3) times its tokens/s. Both arms are then distilled from the dense teacher (forward KL + LM loss, the
same data order and steps) on BBC News training blocks:

* budget: ``LatencyBudgetPruning(target_tokens_per_s=..., depth=True)`` inside the KD fit: the sensitivity pass
  (LM loss on 2 training batches; decode TPOT of every candidate: each layer's heads at 50%, its MLP neurons at 50%,
  the whole layer) at step 5, the removals at steps 5 and 10 measured after each, then recovery;
* uniform: the same width fraction in every layer (Taylor importance on 4 training batches, the documented choice
  for SmolLM2), the fraction bisected on pruned copies to match the decode speed the budget run reached.

Every TPOT (sensitivity candidates, in-fit steps, re-measurements) is timed side by side with the dense teacher
(``decode_latency_fn(reference=teacher)``: single TPOT readings of candidate and dense alternated) on the scale of
the dense TPOT taken at the start, so the machine's drift over the ~50 min run and its bursts cancel.

Reported: decode tokens/s of both arms against the budget (re-measured after the fit, median of 3), held-out BBC
perplexity (articles no step trained on) of the teacher and both arms, and what the budget removed.
"""

from __future__ import annotations

import copy
import os
import statistics
from typing import Any

import torch
from torch.utils.data import DataLoader, Subset

from benchmarks._common import cli, row
from examples._support import assets, tasks

BENCH = "budget-llm"


def _settings(quick: bool) -> dict[str, Any]:
    if quick:
        return dict(seq=64, train_blocks=64, ppl_blocks=8, steps=12, batch=2, prompt=16, new=8, bisect=2)
    return dict(seq=128, train_blocks=512, ppl_blocks=48, steps=60, batch=4, prompt=32, new=16, bisect=5)


def _tiny_llama(vocab: int) -> torch.nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(vocab_size=vocab, hidden_size=64, num_hidden_layers=4, num_attention_heads=4,
                                        num_key_value_heads=2, intermediate_size=128, tie_word_embeddings=True))


def _uniform(teacher: torch.nn.Module, calibration: list[Any], fraction: float) -> torch.nn.Module:
    from lightning_latency.distillation import student_from_pruned_teacher

    return student_from_pruned_teacher(teacher, fraction, importance="taylor", calibration=calibration)


def main(quick: bool = False) -> list[dict[str, str]]:
    from lightning_latency.latency import LatencyConfig, decode_latency_fn
    from lightning_latency.pruning.budget_callback import LatencyBudgetPruning

    s = _settings(quick)
    teacher, tokenizer = assets.load_smollm2()
    if quick:
        teacher = _tiny_llama(len(tokenizer))
    teacher.eval()
    train, test = tasks.bbc_lm_splits(tokenizer, seq_len=s["seq"], n_train=s["train_blocks"], n_test=s["ppl_blocks"])
    prompt = test[0]["input_ids"][None, : s["prompt"]]
    # every TPOT below is timed beside the dense teacher (single readings alternated) on its scale
    tpot = decode_latency_fn(prompt, new_tokens=s["new"], reference=teacher,
                             config=LatencyConfig(warmup=1, min_runs=3, max_time_s=2.0 if quick else 6.0))

    def settled(model: torch.nn.Module) -> float:
        return statistics.median(tpot(model) for _ in range(3))

    dense_ms = tpot.anchor_ms
    speedup = float(os.environ.get("BENCH_LLM_SPEEDUP", "1.3"))
    target_tps = speedup * 1000.0 / dense_ms
    teacher_ppl = tasks.perplexity(teacher, test)

    budget = LatencyBudgetPruning(target_tokens_per_s=target_tps, latency_fn=tpot, start_step=5, every_n_steps=5,
                                  steps=2, calibration_batches=2, fractions=(0.5,), max_fraction=0.5, depth=True)
    student = tasks.distil_lm(copy.deepcopy(teacher), teacher, train, s["steps"], s["batch"], 2e-4,
                              callbacks=[budget])
    budget_ms = settled(student)
    budget_ppl = tasks.perplexity(student, test)
    moves = budget.allocation
    layers = sorted(int(m.block.rsplit(".", 1)[-1]) for m in moves if m.kind == "block")
    widths = sum(m.kind != "block" for m in moves)

    calibration = [{"input_ids": b["input_ids"], "labels": b["labels"]}
                   for b in DataLoader(Subset(train, range(4 * s["batch"])), batch_size=s["batch"])]
    low, high = 0.02, 0.6
    for _ in range(s["bisect"]):  # the width fraction whose decode speed matches the budget run's
        mid = (low + high) / 2
        if settled(_uniform(teacher, calibration, mid)) > budget_ms:
            low = mid
        else:
            high = mid
    uniform = tasks.distil_lm(_uniform(teacher, calibration, high), teacher, train, s["steps"], s["batch"], 2e-4)
    uniform_ms = settled(uniform)
    uniform_ppl = tasks.perplexity(uniform, test)

    def tps(ms: float) -> str:
        return f"{1000.0 / ms:.1f} tok/s"

    return [
        row(BENCH, "dense decode (HF generate, batch 1, eager fp32)", tps(dense_ms),
            note=f"TPOT {dense_ms:.1f} ms; held-out BBC perplexity {teacher_ppl:.1f}"),
        row(BENCH, f"budget (×{speedup:g} the dense tokens/s)", f"{target_tps:.1f} tok/s",
            note=f"TPOT {1000.0 / target_tps:.1f} ms"),
        row(BENCH, "budget allocation: decode after the fit", tps(budget_ms), target="≥ budget",
            note=f"{100 * (1000.0 / budget_ms / target_tps - 1):+.1f}% vs budget; in the fit "
                 + " → ".join(f"{1000.0 / ms:.1f}" for _, ms in budget.history)
                 + f" tok/s; removed layers {layers or 'none'} + {widths} width moves"),
        row(BENCH, "uniform width pruning: decode after the fit", tps(uniform_ms),
            note=f"fraction {high:.3f} (Taylor), tuned to the budget run's speed"),
        row(BENCH, "perplexity, budget allocation", f"{budget_ppl:.1f}",
            note=f"×{budget_ppl / teacher_ppl:.2f} the teacher's; {s['steps']} KD steps"),
        row(BENCH, "perplexity, uniform", f"{uniform_ppl:.1f}", note=f"×{uniform_ppl / teacher_ppl:.2f} the teacher's"),
        row(BENCH, "perplexity: budget vs uniform", f"×{uniform_ppl / budget_ppl:.2f} lower" if budget_ppl < uniform_ppl
            else f"×{budget_ppl / uniform_ppl:.2f} higher", target="lower", note="one seed"),
    ]


if __name__ == "__main__":
    cli(main, __doc__.splitlines()[0])
