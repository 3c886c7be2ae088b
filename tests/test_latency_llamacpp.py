"""The llama.cpp runner on tiny exported GGUF files: loads, logits match the PyTorch model, greedy tokens agree.

Skipped, with the reason, where neither llama-cpp-py-sync (glibc >= 2.38) nor llama-cpp-cffi's CPU extension
(glibc >= 2.34, AVX2) loads. Measured with both llama.cpp builds: F32 reference mode 3.5e-7 of the largest logit
(the `deci` file too), Q8_0/Q4_0 0.8-1.0%; with b4965 only, Q4_1 0.93% and an int4 kernel-grid QAT model
exported at Q4_1 0.97%.
The exporter itself is verified without llama.cpp in tests/test_quantization_gguf.py.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from lightning_latency.latency.llamacpp import LlamaCppConfig, llamacpp_unavailable

pytest.importorskip("gguf", reason="the gguf package writes the files")
REASON = llamacpp_unavailable()
needs_llamacpp = pytest.mark.skipif(REASON is not None, reason=str(REASON))

from lightning_latency.latency.llamacpp import (  # noqa: E402
    LlamaCppRunner,
    llamacpp_perplexity,
    measure_llamacpp,
    system_info,
)
from lightning_latency.quantization.gguf import export_gguf  # noqa: E402
from lightning_latency.quantization.weight_only_qat import prepare_gguf_qat, prepare_weight_only_qat  # noqa: E402
from test_quantization_gguf import non_uniform_llama, untied_llama  # noqa: E402

TOKENS = [3, 17, 99, 5, 64, 1, 127, 42, 8, 8, 31, 77, 2, 100, 56, 11]
# F32 weights and an fp32 KV cache: llama.cpp and PyTorch differ by fp32 summation order only (~1e-6 relative per
# op); 1e-4 of the largest logit is well above that.
F32_REL = 1e-4
# Q8_0 / Q4_0 / Q4_1 weights: llama.cpp's CPU kernels also quantize each activation row to Q8_0 (Q8_1 for Q4_1: the
# same 32-blocks, scale max|x|/127, plus the block sum) before the dot product, an error of at most 1/254 of the
# block's largest value per element. Summed in RMS over the ~6 chained matmuls of 2 layers that stays near 1% of the
# logit range (0.8-1.0% measured: Q4_0 0.86%, Q4_1 0.93%, b4965); allow 2%.
BLOCK_REL = 0.02


def _torch_logits(model, tokens):
    with torch.no_grad():
        return model(torch.tensor([tokens])).logits[0].numpy()


def _assert_llamacpp_logits_match(path, model, rel: float) -> None:
    """llama.cpp's logits of the file ``path`` equal ``model``'s to ``rel`` of the largest (fp32 KV cache)."""
    expected = _torch_logits(model, TOKENS)
    with LlamaCppRunner(path, LlamaCppConfig(n_threads=1, n_ctx=64, kv_f32=True)) as run:
        got = run.logits(TOKENS)
    assert got.shape == expected.shape
    np.testing.assert_allclose(got, expected, rtol=0, atol=rel * np.abs(expected).max())


@needs_llamacpp
def test_system_info_names_the_isa() -> None:
    assert "AVX" in system_info() or "NEON" in system_info()


@needs_llamacpp
@pytest.mark.parametrize("qtype,rel", [("F32", F32_REL), ("Q8_0", BLOCK_REL), ("Q4_0", BLOCK_REL),
                                       ("Q4_1", BLOCK_REL)])
def test_exported_gguf_logits_match_the_fake_quantized_model(qtype: str, rel: float, tmp_path) -> None:
    model = untied_llama()
    if qtype != "F32":
        prepare_gguf_qat(model, qtype)
    path = export_gguf(model, tmp_path / "m.gguf", qtype=qtype, embedding_qtype="F32")
    _assert_llamacpp_logits_match(path, model, rel)


@needs_llamacpp
def test_int4_kernel_qat_model_at_q4_1_runs_like_its_fake_quantized_model(tmp_path) -> None:
    # Its trained grid is in the file to fp16(min) (tests/test_quantization_gguf.py); measured 0.97% (b4965).
    model = untied_llama()
    prepare_weight_only_qat(model, bits=4, group_size=32)
    path = export_gguf(model, tmp_path / "k.gguf", qtype="Q4_1", embedding_qtype="F32")
    _assert_llamacpp_logits_match(path, model, BLOCK_REL)


@needs_llamacpp
def test_non_uniform_pruned_model_runs_in_llama_cpp(tmp_path) -> None:
    model = non_uniform_llama()
    path = export_gguf(model, tmp_path / "nu.gguf", qtype="F32")  # llama.cpp's `deci` architecture
    expected = _torch_logits(model, TOKENS)
    with LlamaCppRunner(path, LlamaCppConfig(n_threads=1, n_ctx=64, kv_f32=True)) as run:
        got = run.logits(TOKENS)
    np.testing.assert_allclose(got, expected, rtol=0, atol=F32_REL * np.abs(expected).max())


def test_depth_pruned_export_leaves_the_removed_layers_out(tmp_path) -> None:
    """A layer removed by depth pruning is not written: the file has one block fewer (llama.cpp decodes less)."""
    from lightning_latency.pruning.depth import skip_layer

    model = untied_llama()
    n = len(model.model.layers)
    skip_layer(model, f"model.layers.{n - 1}")
    path = export_gguf(model, tmp_path / "d.gguf", qtype="F32")
    import gguf

    fields = gguf.GGUFReader(str(path)).fields
    assert int(fields["llama.block_count"].contents()) == n - 1
    if REASON is None:  # and llama.cpp runs it like PyTorch
        with LlamaCppRunner(path, LlamaCppConfig(n_threads=1, n_ctx=64, kv_f32=True)) as run:
            got = run.logits(TOKENS)
        expected = _torch_logits(model, TOKENS)
        np.testing.assert_allclose(got, expected, rtol=0, atol=F32_REL * np.abs(expected).max())


@needs_llamacpp
def test_greedy_tokens_equal_hf_generate_for_f32(tmp_path) -> None:
    model = untied_llama()
    path = export_gguf(model, tmp_path / "m.gguf", qtype="F32")
    with torch.no_grad():
        ref = model.generate(torch.tensor([TOKENS]), max_new_tokens=12, do_sample=False)[0, len(TOKENS):].tolist()
    with LlamaCppRunner(path, LlamaCppConfig(n_threads=1, n_ctx=64, kv_f32=True)) as run:
        got, ttft, total = run.generate(TOKENS, 12)
    assert got == ref and 0 < ttft < total


@needs_llamacpp
def test_measure_and_perplexity_through_the_runtime(tmp_path) -> None:
    path = export_gguf(untied_llama(), tmp_path / "m.gguf", qtype="Q8_0")
    report = measure_llamacpp(path, TOKENS, new_tokens=4, rounds=2, config=LlamaCppConfig(n_threads=1, n_ctx=64))
    assert report.new_tokens == 4 and report.tokens_per_s > 0 and len(report.total_times_ms) == 2
    ppl = llamacpp_perplexity(path, list(range(128)), window=32)
    assert 1.0 < ppl < 1e4  # a random model: near the vocabulary size, finite


@needs_llamacpp
def test_llama_cpp_log_keeps_warnings_and_drops_info(tmp_path, capfd) -> None:
    path = export_gguf(untied_llama(), tmp_path / "m.gguf", qtype="F32")
    capfd.readouterr()
    with LlamaCppRunner(path, LlamaCppConfig(n_threads=1, n_ctx=64)):  # n_ctx below the trained 256: a warning
        pass
    err = capfd.readouterr().err
    assert "n_ctx_per_seq (64) < n_ctx_train" in err  # WARN passes
    assert "llama_model_loader" not in err and "print_info" not in err  # INFO (~100 lines a load) does not


def test_bad_inputs_name_the_argument(tmp_path) -> None:
    with pytest.raises(ValueError, match="`path` must be an existing GGUF file"):
        LlamaCppRunner(tmp_path / "missing.gguf")
    with pytest.raises(ValueError, match="`n_threads` must be an integer >= 1"):
        LlamaCppConfig(n_threads=0)
    with pytest.raises(ValueError, match="`new_tokens` must be >= 2"):
        measure_llamacpp(tmp_path / "missing.gguf", TOKENS, new_tokens=1)


@pytest.mark.skipif(REASON is None, reason="llama.cpp loads here")
def test_an_unloadable_runtime_is_an_error_that_says_why(tmp_path) -> None:
    path = export_gguf(untied_llama(), tmp_path / "m.gguf", qtype="F32")
    with pytest.raises(RuntimeError, match="llama-cpp-py-sync"):
        LlamaCppRunner(path)


def test_when_neither_binding_loads_the_reason_names_both(monkeypatch, tmp_path) -> None:
    from lightning_latency.latency import _llamacpp_lib

    def missing() -> None:
        raise ImportError("no module named 'llama_cpp_py_sync'")

    def unloadable() -> None:
        raise OSError("undefined symbol: __cxa_call_terminate")

    monkeypatch.setattr(_llamacpp_lib, "_load_py_sync", missing)
    monkeypatch.setattr(_llamacpp_lib, "_load_cffi_cpu", unloadable)
    _llamacpp_lib._load.cache_clear()
    try:
        reason = llamacpp_unavailable()
        assert reason is not None
        assert "llama-cpp-py-sync: not installed" in reason and "llama_cpp_py_sync" in reason
        assert "llama-cpp-cffi: its library does not load here: undefined symbol: __cxa_call_terminate" in reason
        with pytest.raises(RuntimeError, match="llama-cpp-py-sync.*llama-cpp-cffi"):
            LlamaCppRunner(export_gguf(untied_llama(), tmp_path / "m.gguf", qtype="F32"))
    finally:
        monkeypatch.undo()
        _llamacpp_lib._load.cache_clear()
    assert llamacpp_unavailable() == REASON  # the real loaders again


@needs_llamacpp
@pytest.mark.real_weights
def test_smollm2_f32_export_runs_in_llama_cpp_like_hf(tmp_path) -> None:
    from examples._support.assets import load_smollm2

    model, tokenizer = load_smollm2()
    text = "The BBC reported that the government"
    ids = tokenizer(text, return_tensors="pt").input_ids
    path = export_gguf(model, tmp_path / "smollm2.F32.gguf", qtype="F32", tokenizer=tokenizer)
    with torch.no_grad():
        expected = model(ids).logits[0].numpy()
        ref = model.generate(ids, max_new_tokens=8, do_sample=False)[0, ids.shape[1]:].tolist()
    with LlamaCppRunner(path, LlamaCppConfig(n_threads=1, n_ctx=64, kv_f32=True)) as run:
        assert run.tokenize(text) == ids[0].tolist()  # our tokenizer metadata, tokenized by llama.cpp
        got = run.logits(ids[0].tolist())
        tokens, _, _ = run.generate(ids[0].tolist(), 8)
    np.testing.assert_allclose(got, expected, rtol=0, atol=F32_REL * np.abs(expected).max())
    assert tokens == ref
