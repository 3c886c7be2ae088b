"""deploy(backend="auto") against the peer runtime, on the real fine-tuned MiniLM-L6 (the demo's teacher), seq 48.

One run, per batch size (1 and 32), all forms timed interleaved in the same rounds (``compare_latency``: every
form once per round, best round's median, rounds' spread reported): torch fp32 eager, every ``deploy`` candidate
(fp32 compiled with freezing = "torch fp32 compiled", bf16 where the CPU has native bf16, PT2E int8 static and
dynamic, torchao int8 compiled, ONNX Runtime fp32, ONNX Runtime ``quantize_dynamic`` int8 = the peer), and the
form deploy chose. The timing is the one deploy itself used to choose: this benchmark passes a ``timer`` that adds
fp32 eager to the same interleaved rounds, so there is no second, different measurement.

Accuracy of each quantized form on the held-out split (post-training quantization of the fine-tuned fp32 model,
static activation ranges from 8 training batches), against fp32.

Run: ``python -m benchmarks.bench_deploy`` (~10–15 min on a quiet 2-core machine: about a dozen compiles),
``--quick`` (tiny teacher fine-tune, batch 1 only, one round: a smoke run, numbers not meaningful).
"""

from __future__ import annotations

import time
from typing import Any

from benchmarks._common import cli, row
from examples._support import tasks
from lightning_latency.latency import LatencyConfig, compare_latency
from lightning_latency.quantization import deploy

BENCH = "deploy"
PEER = "ort_int8"


def _settings(quick: bool) -> dict[str, Any]:
    if quick:
        return dict(n_train=96, teacher_steps=4, test_n=32, seq=48, batches=(1,), rounds=1, runs=3, max_time_s=0.3,
                    calib=2)
    # The demo's teacher (examples/compress_classifier.py defaults): cached after the first run of either.
    return dict(n_train=2000, teacher_steps=120, test_n=512, seq=48, batches=(1, 32), rounds=3, runs=20,
                max_time_s=3.0, calib=8)


KEYS = ("input_ids", "attention_mask")  # the deployed graphs' inputs


def _spread_text(medians: list[float]) -> str:
    if len(medians) < 2 or min(medians) <= 0:
        return "1 round: no spread"
    return f"rounds spread {100 * (max(medians) - min(medians)) / min(medians):.0f}%"


def main(quick: bool = False) -> list[dict[str, str]]:
    s = _settings(quick)
    teacher, tokenizer = tasks.minilm_sentiment_teacher(n_train=s["n_train"], steps=s["teacher_steps"],
                                                        seq_len=s["seq"], seed=0, progress=False)
    teacher.eval()
    train, test = tasks.rotten_tomatoes_splits(tokenizer, n_train=s["n_train"], n_test=s["test_n"], seq_len=s["seq"],
                                               seed=0)
    config = LatencyConfig(warmup=3, min_runs=s["runs"], min_time_s=0.2, max_time_s=s["max_time_s"],
                           track_memory=False)
    rows: list[dict[str, str]] = []
    fp32_acc = tasks.accuracy(teacher, test, 64, keys=KEYS)
    rows.append(row(BENCH, "accuracy: torch fp32", f"{100 * fp32_acc:.1f}%", "", "",
                    f"fine-tuned MiniLM-L6, {len(test)} held-out snippets, seq {s['seq']}"))
    for b in s["batches"]:
        inputs = tasks.stack_inputs(test, 0, b, KEYS)
        calibration = [tasks.stack_inputs(train, b * i, b, KEYS) for i in range(1, s["calib"] + 1)]
        seen: dict[str, Any] = {}

        def timer(models: dict[str, Any], x: Any, rounds: int) -> dict[str, list[float]]:
            # deploy's own interleaved timing, with fp32 eager added to the same rounds (the ratios' baseline)
            seen["models"] = dict(models)
            seen["reports"] = compare_latency({"fp32 eager": teacher, **models}, x, config, rounds=rounds)
            return {n: seen["reports"][n].round_medians_ms for n in models}

        t0 = time.perf_counter()
        chosen = deploy(teacher, inputs, backend="auto", calibration=calibration, rounds=s["rounds"], timer=timer)
        build_s = time.perf_counter() - t0
        reports = seen["reports"]
        eager, peer = reports["fp32 eager"], reports.get(PEER)
        label = f"b{b} s{s['seq']}"
        rows.append(row(BENCH, f"latency {label}: torch fp32 eager", f"{eager.median_ms:.2f} ms",
                        _spread_text(eager.round_medians_ms), "", "baseline"))
        names = {"fp32": "torch fp32 compiled", "ort": "ORT fp32", "ort_int8": "ORT int8 dynamic (peer)"}
        for name, report in reports.items():
            if name == "fp32 eager":
                continue
            vs_peer = f"; vs ORT int8 ×{peer.median_ms / report.median_ms:.2f}" if peer is not None else ""
            mark = " ← deploy chose" if name == chosen.backend else ""
            rows.append(row(BENCH, f"latency {label}: {names.get(name, name)}{mark}",
                            f"×{eager.median_ms / report.median_ms:.2f}",
                            _spread_text(report.round_medians_ms), "",
                            f"{report.median_ms:.2f} ms{vs_peer}"))
        target = "≥ ×1 (moonshot ×1.3 at b1)" if b == 1 else "≥ ×1"
        if peer is not None:
            best_peer = min(peer.median_ms, reports["ort"].median_ms) if "ort" in reports else peer.median_ms
            rows.append(row(BENCH, f"latency {label}: deploy chose {chosen.backend} vs fastest ORT form",
                            f"×{best_peer / reports[chosen.backend].median_ms:.2f}", "", target,
                            f"why: {chosen.report.why}; deploy (build, check, time) took {build_s:.0f} s"))
        if b == max(s["batches"]):  # accuracy of the quantized forms, at the largest compiled batch
            for name, form in seen["models"].items():
                if not form.quantized and name not in ("bf16",):
                    continue
                acc = tasks.accuracy(form, test, b, static=True, keys=KEYS)
                rows.append(row(BENCH, f"accuracy: {names.get(name, name)}", f"{100 * acc:.1f}%", "",
                                "within 0.5 pt of fp32" if name == chosen.backend else "",
                                f"{100 * (acc - fp32_acc):+.1f} pt vs fp32" +
                                ("; deploy's choice" if name == chosen.backend else "")))
        print(chosen.report.format())
    return rows


if __name__ == "__main__":
    cli(main, "deploy(backend='auto') vs ONNX Runtime on the fine-tuned MiniLM-L6: latency b1/b32, accuracy")
