"""deploy(backend="auto"): candidates, agreement, choice by (injected) timing, the ONNX Runtime backend, artifacts.

Timing is injected (``timer=``): which form is fastest is the benchmarks' business (benchmarks/bench_deploy.py);
here the choice rule is checked. The artifact test loads the saved file in a fresh Python that never imports
``lightning_latency``.
"""

from __future__ import annotations

import builtins
import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from helpers import VOCAB, tiny_bert

from lightning_latency.latency.hardware import isa_flags, has_native_bf16
from lightning_latency.quantization import QuantizationConfig, auto_candidates, deploy, load_deployed, prepare_qat
from lightning_latency.quantization.choose import agreement

pytest.importorskip("onnxruntime")

AVX2_ONLY = "processor\t: 0\nflags\t\t: fpu sse sse2 ssse3 sse4_1 sse4_2 avx avx2 fma f16c\n"
AMX = ("processor\t: 0\nflags\t\t: fpu sse2 avx avx2 avx512f avx512bw avx512_vnni avx512_bf16 amx_tile amx_int8 "
       "amx_bf16\n")


def _inputs(batch: int = 2, seq: int = 16, seed: int = 1) -> dict[str, torch.Tensor]:
    ids = torch.randint(0, VOCAB, (batch, seq), generator=torch.Generator().manual_seed(seed))
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}


def _timer(order: list[str]):
    """A fake latency function: candidates in ``order`` get p50 1, 2, 3 ... ms (first = fastest); others 100 ms."""
    calls = []

    def timer(models, inputs, rounds):
        calls.append(sorted(models))
        timer.spinning.update({n: _spins(m.compiled.session) for n, m in models.items() if n.startswith("ort")})
        return {name: [float(order.index(name) + 1 if name in order else 100)] * rounds for name in models}

    timer.calls, timer.spinning = calls, {}
    return timer


def _spins(session: object) -> bool:
    """Whether an ONNX Runtime session's idle workers spin."""
    try:
        return session.get_session_options().get_session_config_entry("session.intra_op.allow_spinning") != "0"
    except RuntimeError:  # not set: ONNX Runtime's default, spinning
        return True


def test_cpu_feature_detection_reads_the_flags() -> None:
    avx2, amx = isa_flags(AVX2_ONLY), isa_flags(AMX)
    assert avx2["avx2"] and not avx2["avx512f"] and not avx2["vnni"] and not avx2["amx"] and not avx2["bf16"]
    assert amx["avx512f"] and amx["vnni"] and amx["amx"] and amx["bf16"]
    assert not has_native_bf16(AVX2_ONLY) and has_native_bf16(AMX)
    assert isa_flags("")["capability"] == torch.backends.cpu.get_cpu_capability()
    here = isa_flags()  # this machine: whatever it is, the summary flags follow from the raw ones
    assert here["bf16"] == bool(here["avx512_bf16"] or here["amx_bf16"])


def test_auto_candidates_offer_bf16_only_with_native_bf16() -> None:
    model = tiny_bert(layers=1)
    on_avx2 = [b.value for b in auto_candidates(model, QuantizationConfig(), cpuinfo=AVX2_ONLY)]
    on_amx = [b.value for b in auto_candidates(model, QuantizationConfig(), cpuinfo=AMX)]
    assert "bf16" not in on_avx2 and "bf16" in on_amx
    assert {"fp32", "x86", "x86_dynamic", "torchao", "ort", "ort_int8"} <= set(on_avx2)
    int4 = [b.value for b in auto_candidates(model, QuantizationConfig(scheme="int4_weight_only"), cpuinfo=AMX)]
    assert "x86" not in int4 and "torchao" in int4  # int8 PT2E cannot run an int4-trained grid


def test_auto_picks_the_fastest_agreeing_candidate() -> None:
    model = tiny_bert(layers=1).eval()
    prepare_qat(model)
    timer = _timer(["ort_int8", "x86", "ort"])
    fast = deploy(model, _inputs(), backend="auto", candidates=["x86", "ort", "ort_int8"], compile=False,
                  calibration=[_inputs(seed=2), _inputs(seed=3)], timer=timer)
    assert fast.backend == "ort_int8" and fast.report.chosen == "ort_int8"
    assert timer.calls == [["ort", "ort_int8", "x86"]]  # all built candidates timed together, once
    # timed side by side with idle workers blocking (spinning ones took a core from the form timed next); the
    # chosen session is reopened with ONNX Runtime's default for serving
    assert timer.spinning == {"ort": False, "ort_int8": False} and _spins(fast.compiled.session)
    rows = {c.name: c for c in fast.report.candidates}
    assert all(rows[n].accepted and rows[n].rel_error < 0.1 for n in ("x86", "ort", "ort_int8"))
    assert rows["ort_int8"].p50_ms == 1.0 and rows["x86"].p50_ms == 2.0
    text = fast.report.format()
    assert "CHOSEN" in text and "chose 'ort_int8'" in text and "x2.00 ahead of 'x86'" in text
    out = fast(**_inputs())
    assert type(out).__name__ == "SequenceClassifierOutput" and out.logits.shape == (2, 2)


def test_auto_rejects_a_faster_candidate_that_disagrees() -> None:
    model = tiny_bert(layers=1).eval()  # a float model: the reference is fp32, ORT fp32 matches it to ~1e-7
    # Tolerance far below int8 rounding (≈1e-2 relative) and far above fp32 reordering (≈1e-7): int8 must fail.
    fast = deploy(model, _inputs(), backend="auto", candidates=["ort", "ort_int8"], tolerance=1e-4,
                  timer=_timer(["ort_int8", "ort"]))
    rows = {c.name: c for c in fast.report.candidates}
    assert fast.backend == "ort"
    assert not rows["ort_int8"].accepted and "disagrees" in rows["ort_int8"].note
    assert "faster but rejected for disagreeing: ort_int8" in fast.report.why


def test_agreement_flags_a_broken_output() -> None:
    ref = torch.tensor([[2.0, -2.0], [0.01, 0.0], [-1.0, 1.0]])
    close = agreement([ref + 0.01], [ref], tolerance=0.1)
    assert close.ok(0.1) and close.agreement == 1.0
    broken = agreement([-ref], [ref], tolerance=0.1)  # sign flip: rel error 2, the confident rows flip
    assert not broken.ok(0.1) and broken.rel_error == pytest.approx(2.0) and broken.confident_flips == 2
    # a near-tie row may flip without rejection: allowed error 0.1 × RMS(ref) ≈ 0.13 > its margin 0.01
    tie = agreement([torch.tensor([[2.0, -2.0], [0.0, 0.01], [-1.0, 1.0]])], [ref], tolerance=0.1)
    assert tie.ok(0.1) and tie.confident_flips == 0 and tie.agreement == pytest.approx(2 / 3)


def test_ort_backends_match_the_reference_and_keep_the_output_type() -> None:
    model = tiny_bert(layers=1).eval()
    inputs = _inputs()
    with torch.no_grad():
        ref = model(**inputs).logits
    fp32 = deploy(model, inputs, "int8_dynamic", backend="ort")  # a scheme string is accepted for `config`
    int8 = deploy(model, inputs, backend="ort_int8")
    scale = float(ref.pow(2).mean().sqrt())
    # fp32 ONNX Runtime vs fp32 torch: the same math, only summation order differs (≈1e-6 relative)
    torch.testing.assert_close(fp32(**inputs).logits, ref, atol=1e-4 * scale, rtol=0)
    # dynamic int8: one int8 step is 1/127 (weights) and 1/255 (activations) of a tensor's range per layer; a
    # 1-layer encoder plus pooler stays within a few steps of the outputs' scale
    assert agreement([int8(**inputs).logits], [ref], 0.1).rel_error < 0.1
    assert fp32.backend == "ort" and int8.backend == "ort_int8" and int8.quantized
    other = _inputs(batch=3, seq=8)  # the ONNX graph has dynamic batch and sequence axes
    assert fp32(**other).logits.shape == (3, 2)
    before, out = int8.compiled.session, int8(**inputs).logits
    int8.compiled.reopen()  # a fresh session on the same graph (timing spans several: sessions differ in speed)
    assert int8.compiled.session is not before
    torch.testing.assert_close(int8(**inputs).logits, out, atol=0, rtol=0)

    assert _spins(int8.compiled.session)  # a server's default
    int8.compiled.reopen(spinning=False)  # for timing beside other sessions: idle workers block
    assert not _spins(int8.compiled.session)
    int8.compiled.reopen()  # the choice is kept by later reopens
    assert not _spins(int8.compiled.session)
    torch.testing.assert_close(int8(**inputs).logits, out, atol=0, rtol=0)


def test_config_of_the_wrong_type_names_the_argument() -> None:
    with pytest.raises(TypeError, match=r"`config` must be a QuantizationConfig, a scheme name.*got int"):
        deploy(tiny_bert(layers=1), _inputs(), 3)
    with pytest.raises(ValueError, match=r"`scheme` must be one of .*got 'int3'"):
        deploy(tiny_bert(layers=1), _inputs(), "int3")
    with pytest.raises(ValueError, match=r"`tolerance` must be a positive number"):
        deploy(tiny_bert(layers=1), _inputs(), backend="auto", tolerance=0)


def test_missing_onnxruntime_names_the_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    real_import = builtins.__import__

    def no_ort(name, *args, **kwargs):
        if name.split(".")[0] in ("onnxruntime", "onnx"):
            raise ImportError(f"No module named {name!r}")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_ort)
    with pytest.raises(ImportError, match=r"pip install lightning-latency\[onnx\]"):
        deploy(tiny_bert(layers=1), _inputs(), backend="ort")


_SERVE = textwrap.dedent("""
    import json, sys
    import numpy as np
    path, inputs_file, out_file = sys.argv[1:4]
    data = np.load(inputs_file)
    ids, mask = data["input_ids"], data["attention_mask"]
    if path.endswith(".onnx"):
        import onnxruntime
        session = onnxruntime.InferenceSession(path, providers=["CPUExecutionProvider"])
        out = session.run(None, {"input_ids": ids, "attention_mask": mask})[0]
    else:
        import torch
        model = torch._inductor.aoti_load_package(path)
        with torch.no_grad():
            out = model(torch.from_numpy(ids), torch.from_numpy(mask)).numpy()
    assert "lightning_latency" not in sys.modules and "transformers" not in sys.modules
    np.save(out_file, out)
""")


@pytest.mark.parametrize("backend", ["ort_int8", "x86"])
def test_saved_artifact_loads_in_a_fresh_process_without_lightning_latency(tmp_path: Path, backend: str) -> None:
    import numpy as np

    model = tiny_bert(layers=1).eval()
    prepare_qat(model)
    inputs = _inputs()
    fast = deploy(model, inputs, backend=backend, calibration=[_inputs(seed=2)])
    path = fast.save(tmp_path / "model")
    assert path.suffix == (".onnx" if backend == "ort_int8" else ".pt2") and path.exists()
    with torch.no_grad():
        here = fast(**inputs).logits
    np.savez(tmp_path / "inputs.npz", **{k: v.numpy() for k, v in inputs.items()})
    script = tmp_path / "serve.py"
    script.write_text(_SERVE)
    subprocess.run([sys.executable, str(script), str(path), str(tmp_path / "inputs.npz"), str(tmp_path / "out.npy")],
                   check=True, cwd=tmp_path, env={"PATH": "/usr/bin:/bin", "HOME": str(tmp_path)}, timeout=300)
    there = torch.from_numpy(np.load(tmp_path / "out.npy"))
    # Same graph and kernels; only thread count and summation order may differ. For int8 a requantized activation
    # landing on the other side of a rounding boundary moves the output by about one int8 step (1/127 of the
    # range): 2% of the outputs' RMS allows a couple of such flips and nothing like a wrong model (≈100%).
    scale = float(here.pow(2).mean().sqrt())
    torch.testing.assert_close(there, here, atol=0.02 * scale, rtol=0)
    loaded = load_deployed(path)  # the same file through our loader: positional inputs, one tensor out
    torch.testing.assert_close(loaded(inputs["input_ids"], inputs["attention_mask"]), here, atol=0.02 * scale, rtol=0)
    assert json.dumps(fast.load_lines(path))  # the two lines the example prints


def test_ort_int8_uses_7_bit_weights_exactly_where_the_cpu_has_no_vnni(monkeypatch) -> None:
    """Without VNNI, ONNX Runtime's u8s8 kernels sum products in int16 and saturate on full 8-bit weights (17%
    relative error on this 1-layer BERT on an AVX2-only CPU); reduce_range's 7-bit weights agree on every CPU."""
    import lightning_latency.cpu as cpu
    from lightning_latency.quantization.onnx import (
        export_onnx,
        ort_needs_reduce_range,
        ort_session,
        quantize_onnx_dynamic,
    )

    monkeypatch.setattr(cpu, "_proc_flags", lambda: {"avx2", "fma"})
    assert ort_needs_reduce_range()
    monkeypatch.setattr(cpu, "_proc_flags", lambda: {"avx2", "avx512f", "avx512_vnni"})
    assert not ort_needs_reduce_range()
    model = tiny_bert(layers=1).eval()
    inputs = _inputs()
    with torch.no_grad():
        ref = model(**inputs).logits
    data = export_onnx(model, (), inputs)
    reduced, full = quantize_onnx_dynamic(data, reduce_range=True), quantize_onnx_dynamic(data, reduce_range=False)
    assert reduced != full
    session = ort_session(reduced)
    out = session.run(["output"], {i.name: inputs[i.name].numpy() for i in session.get_inputs()})[0]
    assert agreement([torch.from_numpy(out)], [ref], 0.1).rel_error < 0.1
