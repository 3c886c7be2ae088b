"""The fast generation form (static KV cache + compiled decode step), the bandwidth probe and decode MBU."""

from __future__ import annotations

import pytest
import torch
from helpers import tiny_llama
from torch import nn

from lightning_latency.latency import measure_generation
from lightning_latency.latency.fast_generation import (
    FastGenerator,
    decode_bytes_per_token,
    fast_generate,
    measure_bandwidth,
)
from lightning_latency.quantization.weight_only import quantize_weight_only
from lightning_latency.quantization.weight_only_qat import convert_weight_only_qat, prepare_weight_only_qat


def _varied_llama() -> nn.Module:
    # The default init (std 0.02) gives near-uniform logits and a greedy run that repeats one token: a test that
    # cannot tell a wrong cache position from a right one. Wider weights make every step's argmax depend on context.
    model = tiny_llama().eval()
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.copy_(torch.randn(p.shape, generator=g) * 0.2)
    return model


def _hf_greedy(model: nn.Module, ids: torch.Tensor, n: int) -> torch.Tensor:
    with torch.no_grad():
        return model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=n,
                              min_new_tokens=n, do_sample=False, pad_token_id=0)


def test_static_cache_loop_gives_hf_greedy_tokens() -> None:
    model = _varied_llama()
    ids = torch.randint(0, 128, (2, 7), generator=torch.Generator().manual_seed(1))
    ref = _hf_greedy(model, ids, 12)
    assert len(set(ref[0, 7:].tolist())) > 3  # the continuation varies, so positions matter
    gen = FastGenerator(model, max_cache_len=19, batch_size=2, compile=False)
    assert torch.equal(gen(ids, 12), ref)
    assert torch.equal(gen(ids, 12), ref)  # the cache is reset between calls
    assert torch.equal(gen(ids[:, :5], 3), _hf_greedy(model, ids[:, :5], 3))


def test_compiled_decode_gives_hf_greedy_tokens_fp32_and_int4() -> None:
    model = _varied_llama()
    ids = torch.randint(0, 128, (1, 8), generator=torch.Generator().manual_seed(2))
    assert torch.equal(fast_generate(model, ids, 10, compile=True), _hf_greedy(model, ids, 10))
    # int4 weights through QAT: the converted model's fast greedy tokens equal HF generate's on the same model
    # (both run the packed kernel; only the loop differs)
    prepare_weight_only_qat(model, bits=4, group_size=32)
    convert_weight_only_qat(model)
    assert torch.equal(fast_generate(model, ids, 10, compile=True), _hf_greedy(model, ids, 10))


def test_int4_fast_tokens_follow_the_fake_quant_model() -> None:
    # Against the fp32 fake-quant model the int4 kernels differ only by bf16 activation rounding. Measure that
    # logit deviation on the fake-quant tokens (teacher forcing); a greedy step is decided whenever its top-2
    # margin exceeds twice the deviation, and every step up to the first undecided one must agree.
    model = _varied_llama()
    ids = torch.randint(0, 128, (1, 8), generator=torch.Generator().manual_seed(3))
    prepare_weight_only_qat(model, bits=4, group_size=32)
    fq_tokens = _hf_greedy(model, ids, 10)
    with torch.no_grad():
        fq_logits = model(input_ids=fq_tokens).logits[0, 7:-1]
        convert_weight_only_qat(model)
        int4_logits = model(input_ids=fq_tokens).logits[0, 7:-1]
    deviation = float((int4_logits - fq_logits).abs().max())
    top2 = fq_logits.topk(2, -1).values
    decided = (top2[:, 0] - top2[:, 1]) > 2 * deviation
    assert int(decided.sum()) >= 5, (decided, deviation)  # a comparison with content
    # teacher-forced: every decided step picks the fake-quant model's token
    assert torch.equal(int4_logits.argmax(-1)[decided], fq_tokens[0, 8:][decided])
    # free-running fast form: identical up to the first undecided step (after it the contexts may differ)
    prefix = int(decided.long().cumprod(0).sum())
    got = fast_generate(model, ids, 10, compile=False)
    assert prefix >= 1 and torch.equal(got[0, 8:8 + prefix], fq_tokens[0, 8:8 + prefix])


def test_fast_generator_errors() -> None:
    model = tiny_llama().eval()
    gen = FastGenerator(model, max_cache_len=10, compile=False)
    ids = torch.zeros(1, 8, dtype=torch.long)
    with pytest.raises(ValueError, match=r"prompt 8 \+ `max_new_tokens` 4 exceeds `max_cache_len`=10"):
        gen(ids, 4)
    with pytest.raises(ValueError, match=r"`input_ids` must be \(batch=1, prompt\), got \(2, 8\)"):
        gen(torch.zeros(2, 8, dtype=torch.long), 1)
    with pytest.raises(ValueError, match=r"`attention_mask` has padding"):
        gen(ids, 1, attention_mask=torch.tensor([[0] + [1] * 7]))
    with pytest.raises(ValueError, match=r"`model` must be a Hugging Face causal LM"):
        FastGenerator(nn.Linear(2, 2), 4)


def test_decode_bytes_count_packed_weights_and_skip_embedding_rows() -> None:
    model = tiny_llama()
    fp32 = decode_bytes_per_token(model)  # tied lm_head: the table is read by the head, so it counts
    params = sum(p.numel() for p in model.parameters()) * 4
    assert fp32 == params + sum(b.numel() * b.element_size() for b in model.buffers())
    quantize_weight_only(model, bits=4, group_size=32)
    int4 = decode_bytes_per_token(model)
    linear_elems = sum(m.in_features * m.out_features for m in model.modules() if hasattr(m, "weight_packed"))
    norms = sum(p.numel() * 4 for n, p in model.named_parameters() if "norm" in n)
    # 0.5 byte per weight + 2 bf16 (scale, zero) per group of 32; the now untied embedding table is not read
    expected = linear_elems // 2 + linear_elems // 32 * 4 + norms
    buffers_other = sum(b.numel() * b.element_size() for n, b in model.named_buffers()
                        if "weight_packed" not in n and "scales_and_zeros" not in n)
    assert int4 == expected + buffers_other
    assert int4 < fp32 / 4


def test_measure_bandwidth_with_scripted_clock_and_errors() -> None:
    calls = iter([0.0, 0.5, 1.0, 1.25, 2.0, 2.5])  # copies of 0.5 s, 0.25 s, 0.5 s: the best is 0.25 s
    bw = measure_bandwidth(size_mb=1, repeats=3, clock=lambda: next(calls))
    assert bw == pytest.approx(2 * 2**20 / 0.25)  # read + write of 1 MiB in 0.25 s
    with pytest.raises(ValueError, match=r"`size_mb` must be an integer >= 1, got 0"):
        measure_bandwidth(size_mb=0)
    assert measure_bandwidth(size_mb=8, repeats=2) > 0


def test_measure_generation_fast_form_reports_mbu() -> None:
    model = tiny_llama().eval()
    ids = torch.randint(0, 128, (1, 8))
    r = measure_generation(model, {"input_ids": ids}, new_tokens=4, warmup=1, min_runs=2, min_time_s=0.0,
                           max_time_s=5.0, fast=True, fast_compile=False, peak_bandwidth=1e10)
    assert r.fast and r.new_tokens == 4 and r.tpot_ms > 0 and r.mbu is not None and r.mbu > 0
    with pytest.raises(ValueError, match=r"`fast=True` needs a Hugging Face causal LM"):
        measure_generation(nn.Linear(2, 2), fast=True)


def test_fast_generate_cache_does_not_keep_models_alive() -> None:
    import gc
    import weakref

    model = tiny_llama().eval()
    fast_generate(model, torch.zeros(1, 4, dtype=torch.long), 2, compile=False)
    ref = weakref.ref(model)
    del model
    gc.collect()
    assert ref() is None
