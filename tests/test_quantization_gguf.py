"""GGUF export and QAT on GGUF's own grids: the exported file is the trained model, bit for bit on the weights.

llama.cpp itself is not needed here: the file is read back with the ``gguf`` package's reader, dequantized, and run
through a small NumPy forward that follows llama.cpp's conventions (adjacent-pair RoPE on the permuted q/k rows,
GQA by ``head // (n_head / n_kv)``, no ``output`` tensor when tied). Runtime checks through llama.cpp are in
tests/test_latency_llamacpp.py.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from helpers import tiny_gpt2, tiny_llama

gguf = pytest.importorskip("gguf", reason="the gguf package (pip install gguf) writes and reads GGUF files")

from lightning_latency.quantization.gguf import (  # noqa: E402
    export_gguf,
    permute_for_rope,
    read_gguf_weights,
    unpermute_for_rope,
)
from lightning_latency.quantization.gguf_grid import gguf_dequantize, gguf_grid  # noqa: E402
from lightning_latency.quantization.weight_only_qat import (  # noqa: E402
    WeightOnlyFakeQuantLinear,
    convert_weight_only_qat,
    gguf_fake_quantize,
    prepare_gguf_qat,
)

# Our NumPy forward in float64 vs the PyTorch model in float32 on identical weights: only fp32 rounding differs,
# ~1e-7 relative per op, grown over 2 layers of width <=128 and 16 positions; 1e-4 on O(1) logits is far above it.
SAME_WEIGHTS_ATOL = 1e-4
LINEARS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
           "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")
GGUF_NAMES = ("attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate", "ffn_up", "ffn_down")


def untied_llama(**kw):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=128, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, intermediate_size=96, max_position_embeddings=256,
                      tie_word_embeddings=False, rope_theta=10000.0, **kw)
    return LlamaForCausalLM(cfg).eval()


def _block_data(rows: int = 64) -> np.ndarray:
    rng = np.random.default_rng(0)
    x = rng.standard_normal((rows, 64)).astype(np.float32)
    x[0, :32] = 0.0                       # an all-zero block: d = 0
    x[1, :32] = 0.5                       # ties for the largest magnitude; Q4_1: a constant block, d = 0
    x[2, :32] = np.linspace(-1, 1, 32)    # +-max of equal magnitude, first one wins
    x[3] *= 1e-6                          # tiny scales
    x[4, :32] = -x[4, :32].__abs__()     # all negative
    x[5] = 3.0 + x[5] * 1e-6              # Q4_1: a range far below the minimum's magnitude (fp16(d) subnormal)
    x[6, :32] = np.repeat(np.arange(16, dtype=np.float32), 2) + np.tile([0.0, 0.5], 16)  # Q4_1: exact .5 ties
    x[7] *= 1e4                           # large magnitudes (still inside fp16's range)
    x[8] *= 1e-9                          # tiny enough that fp16(d) flushes to zero
    return x


BLOCK_BYTES = {"Q8_0": 34, "Q4_0": 18, "Q4_1": 20}  # fp16 d (+ fp16 m for Q4_1), then 32 integers


@pytest.mark.parametrize("qtype", ["Q8_0", "Q4_0", "Q4_1"])
def test_torch_grid_is_ggufs_quantizer_bit_for_bit(qtype: str) -> None:
    x = _block_data()
    kind = gguf.GGMLQuantizationType[qtype]
    reference = gguf.quants.dequantize(gguf.quants.quantize(x, kind), kind)
    grid = gguf_grid(torch.from_numpy(x), qtype)
    assert len(grid) == (3 if qtype == "Q4_1" else 2)
    assert torch.equal(gguf_dequantize(*grid), torch.from_numpy(reference))
    # The stored bytes too: fp16 scale first (Q4_1: then the fp16 minimum), then the integers (nibbles, low first).
    raw = gguf.quants.quantize(x, kind).reshape(-1, kind_size := gguf.GGML_QUANT_SIZES[kind][1])
    assert kind_size == BLOCK_BYTES[qtype]
    for i, stored in enumerate(grid[1:]):
        assert np.array_equal(raw[:, 2 * i:2 * i + 2].view(np.float16).ravel(), stored.numpy().ravel())


def test_q4_1_grid_on_random_weights_and_its_stored_nibbles() -> None:
    x = torch.randn(96, 256, generator=torch.Generator().manual_seed(3)) * 0.02
    kind = gguf.GGMLQuantizationType.Q4_1
    raw = gguf.quants.quantize(x.numpy(), kind)
    q, d, m = gguf_grid(x, "Q4_1")
    assert torch.equal(gguf_dequantize(q, d, m), torch.from_numpy(gguf.quants.dequantize(raw, kind)))
    nibbles = raw.reshape(-1, 20)[:, 4:]
    stored = np.concatenate([nibbles & 0x0F, nibbles >> 4], axis=-1)  # low nibbles are values 0-15 of a block
    assert np.array_equal(stored, q.reshape(-1, 32).numpy()) and int(q.min()) == 0 and int(q.max()) == 15


@pytest.mark.parametrize("qtype", ["Q4_0", "Q4_1"])
def test_fake_quantize_has_a_straight_through_gradient(qtype: str) -> None:
    w = torch.randn(8, 64, requires_grad=True)
    fq = gguf_fake_quantize(w, qtype)
    assert torch.equal(fq.detach(), gguf_dequantize(*gguf_grid(w, qtype)))
    fq.sum().backward()
    assert torch.equal(w.grad, torch.ones_like(w))


def test_rope_permutation_round_trips() -> None:
    w = np.arange(8 * 16 * 3, dtype=np.float32).reshape(8 * 16, 3)
    assert np.array_equal(unpermute_for_rope(permute_for_rope(w, 8), 8), w)
    # HF rows j and j + head_dim/2 of head 0 become llama.cpp rows 2j and 2j + 1.
    p = permute_for_rope(w, 8)
    assert np.array_equal(p[0], w[0]) and np.array_equal(p[1], w[8]) and np.array_equal(p[2], w[1])


def _fields(path) -> dict:
    reader = gguf.GGUFReader(str(path))
    return {k: f.contents() for k, f in reader.fields.items() if not k.startswith("GGUF.")}


def _rms(x: np.ndarray, w: np.ndarray, eps: float) -> np.ndarray:
    return x / np.sqrt((x * x).mean(-1, keepdims=True) + eps) * w


def _rope_pairs(x: np.ndarray, base: float) -> np.ndarray:
    """llama.cpp's "normal" RoPE: rotate adjacent pairs (2j, 2j+1) of each head by pos * base^(-2j/d)."""
    t, _, d = x.shape
    theta = np.arange(t)[:, None] * base ** (-np.arange(0, d, 2) / d)[None, :]
    cos, sin = np.cos(theta)[:, None, :], np.sin(theta)[:, None, :]
    even, odd = x[..., 0::2], x[..., 1::2]
    out = np.empty_like(x)
    out[..., 0::2], out[..., 1::2] = even * cos - odd * sin, even * sin + odd * cos
    return out


def gguf_reference_logits(path, tokens: list[int]) -> np.ndarray:
    """Logits ``(seq, vocab)`` of the GGUF file's model, computed the way llama.cpp's llama graph does."""
    f, w = _fields(path), {k: v.astype(np.float64) for k, v in read_gguf_weights(path).items()}
    a = f["general.architecture"]
    eps, base = f[f"{a}.attention.layer_norm_rms_epsilon"], f[f"{a}.rope.freq_base"]
    d, n_layer = f[f"{a}.rope.dimension_count"], f[f"{a}.block_count"]
    per_layer = lambda key: f[key] if isinstance(f[key], list) else [f[key]] * n_layer  # noqa: E731
    q_heads, kv_heads = per_layer(f"{a}.attention.head_count"), per_layer(f"{a}.attention.head_count_kv")
    x = w["token_embd.weight"][tokens]
    t = len(tokens)
    mask = np.triu(np.full((t, t), -np.inf), 1)
    for i in range(n_layer):
        n_head, n_kv = q_heads[i], kv_heads[i]
        b = lambda n: w[f"blk.{i}.{n}.weight"]  # noqa: E731
        h = _rms(x, b("attn_norm"), eps)
        q = _rope_pairs((h @ b("attn_q").T).reshape(t, n_head, d), base)
        k = _rope_pairs((h @ b("attn_k").T).reshape(t, n_kv, d), base)
        v = (h @ b("attn_v").T).reshape(t, n_kv, d)
        group = n_head // n_kv
        heads = []
        for hh in range(n_head):
            s = q[:, hh] @ k[:, hh // group].T / np.sqrt(d) + mask
            p = np.exp(s - s.max(-1, keepdims=True))
            heads.append((p / p.sum(-1, keepdims=True)) @ v[:, hh // group])
        x = x + np.concatenate(heads, -1) @ b("attn_output").T
        h = _rms(x, b("ffn_norm"), eps)
        g = h @ b("ffn_gate").T
        x = x + ((g / (1 + np.exp(-g))) * (h @ b("ffn_up").T)) @ b("ffn_down").T
    x = _rms(x, w["output_norm.weight"], eps)
    return x @ w.get("output.weight", w["token_embd.weight"]).T


def _torch_logits(model, tokens: list[int]) -> np.ndarray:
    with torch.no_grad():
        return model(torch.tensor([tokens])).logits[0].double().numpy()


TOKENS = [3, 17, 99, 5, 64, 1, 127, 42, 8, 8, 31, 77, 2, 100, 56, 11]


def _train(model, steps: int = 3) -> None:
    """A few SGD steps: they move the latent weights off the grid, so export must re-grid them the same way."""
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    for _ in range(steps):
        loss = model(torch.tensor([TOKENS]), labels=torch.tensor([TOKENS])).loss
        opt.zero_grad()
        loss.backward()
        opt.step()


def _exported_linears(model, path):
    """``(hf module, read-back weight in HF row order)`` for every block linear of the file ``path``."""
    weights = read_gguf_weights(path)
    for i, layer in enumerate(model.model.layers):
        for hf, name in zip(LINEARS, GGUF_NAMES):
            got = weights[f"blk.{i}.{name}.weight"]
            if name in ("attn_q", "attn_k"):
                got = unpermute_for_rope(got, 4 if name == "attn_q" else 2)
            yield f"{i}.{name}", layer.get_submodule(hf), got


@pytest.mark.parametrize("qtype", ["F32", "Q8_0", "Q4_0", "Q4_1"])
def test_qat_model_exports_bit_for_bit_and_runs_the_same(qtype: str, tmp_path) -> None:
    model = untied_llama()
    if qtype != "F32":
        names = prepare_gguf_qat(model, qtype)
        assert "lm_head" in names and "model.layers.1.mlp.down_proj" in names
        _train(model)
    # The token embedding is a lookup QAT does not fake-quantize: written at F32 it is the trained model exactly.
    path = export_gguf(model, tmp_path / f"m.{qtype}.gguf", qtype=qtype, embedding_qtype="F32")
    weights = read_gguf_weights(path)
    fields = _fields(path)
    assert fields["general.architecture"] == "llama" and fields["llama.attention.head_count_kv"] == 2
    for name, module, got in _exported_linears(model, path):
        expected = (module.fake_weight() if isinstance(module, WeightOnlyFakeQuantLinear) else module.weight)
        assert np.array_equal(got, expected.detach().numpy()), (qtype, name)
    lm = model.lm_head
    expected = lm.fake_weight() if isinstance(lm, WeightOnlyFakeQuantLinear) else lm.weight
    assert np.array_equal(weights["output.weight"], expected.detach().numpy())
    np.testing.assert_allclose(gguf_reference_logits(path, TOKENS), _torch_logits(model, TOKENS),
                               atol=SAME_WEIGHTS_ATOL, rtol=0)


def test_int4_kernel_qat_model_exports_its_trained_grid_at_q4_1(tmp_path) -> None:
    # The packed-kernel int4 grid (group 32) is q * s + lo per group with a bf16 step s: Q4_1 re-quantizes it to
    # the same q with fp16(d) == s (bf16 fits in fp16 here), but stores fp16(lo), rounded by up to half an fp16 ulp,
    # i.e. 2^-11 |lo| <= 2^-11 max|group|. Twice that leaves room for the fp32 arithmetic of both grids.
    from lightning_latency.quantization.weight_only import int4_grid
    from lightning_latency.quantization.weight_only_qat import prepare_weight_only_qat

    model = untied_llama()
    prepare_weight_only_qat(model, bits=4, group_size=32)
    _train(model)
    path = export_gguf(model, tmp_path / "k.Q4_1.gguf", qtype="Q4_1", embedding_qtype="F32")
    assert _fields(path)["general.file_type"] == 3  # MOSTLY_Q4_1
    exact = total = 0
    worst_step = latent_step = 0.0
    for name, module, got in _exported_linears(model, path):
        fq = module.fake_weight().detach().numpy().reshape(got.shape[0], -1, 32)
        err = np.abs(got.reshape(fq.shape) - fq)
        assert (err <= 2.0 ** -10 * np.abs(fq).max(-1, keepdims=True)).all(), name
        step = int4_grid(module.weight, 32)[1].float().numpy()[..., None]
        worst_step = max(worst_step, float((err / step).max()))
        latent = module.weight.detach().numpy().reshape(fq.shape)
        latent_step = max(latent_step, float((np.abs(latent - fq) / step).max()))
        exact, total = exact + int((err == 0).sum()), total + err.size
    # Measured: 4.3e-3 of a Q4 step at worst, 71% of the values exact; the latent weight (what Q4_0 and the other
    # types write) is up to half a step (0.4998) off the trained grid.
    assert worst_step < 0.01 and latent_step > 0.4 and exact / total > 0.5, (worst_step, latent_step, exact / total)


def test_tied_gqa_model_has_no_output_tensor_and_matches(tmp_path) -> None:
    model = tiny_llama(kv_heads=1).eval()  # tied, 4 query heads sharing one KV head
    path = export_gguf(model, tmp_path / "tied.gguf", qtype="F32")
    weights = read_gguf_weights(path)
    assert "output.weight" not in weights
    assert weights["blk.0.attn_k.weight"].shape == (16, 64)
    np.testing.assert_allclose(gguf_reference_logits(path, TOKENS), _torch_logits(model, TOKENS),
                               atol=SAME_WEIGHTS_ATOL, rtol=0)


def test_ptq_export_equals_the_fake_quantized_model(tmp_path) -> None:
    # Without QAT, a Q8_0 export is the fake-quantized model: the file holds gguf_fake_quantize of each weight.
    model = untied_llama()
    path = export_gguf(model, tmp_path / "ptq.gguf", qtype="Q8_0", embedding_qtype="F32")
    prepare_gguf_qat(model, "Q8_0")
    np.testing.assert_allclose(gguf_reference_logits(path, TOKENS), _torch_logits(model, TOKENS),
                               atol=SAME_WEIGHTS_ATOL, rtol=0)
    assert _fields(path)["general.file_type"] == 7  # MOSTLY_Q8_0


@pytest.mark.parametrize("qtype", ["Q4_0", "Q4_1"])
def test_embedding_defaults_to_qtype(qtype: str, tmp_path) -> None:
    model = untied_llama()
    reader = gguf.GGUFReader(str(export_gguf(model, tmp_path / "e.gguf", qtype=qtype)))
    types = {t.name: t.tensor_type.name for t in reader.tensors}
    assert types["token_embd.weight"] == qtype and types["blk.0.attn_norm.weight"] == "F32"
    assert types["blk.1.ffn_down.weight"] == qtype and types["output.weight"] == qtype


def test_q4_1_embedding_reads_back_as_its_grid(tmp_path) -> None:
    model = untied_llama()
    path = export_gguf(model, tmp_path / "e.gguf", qtype="Q8_0", embedding_qtype="Q4_1")
    embed = model.model.embed_tokens.weight
    got = torch.from_numpy(read_gguf_weights(path)["token_embd.weight"])
    assert torch.equal(got, gguf_fake_quantize(embed, "Q4_1"))
    assert _fields(path)["general.file_type"] == 7  # the file type follows `qtype`, the linears' type


def test_f16_export_is_the_fp16_cast(tmp_path) -> None:
    model = untied_llama()
    weights = read_gguf_weights(export_gguf(model, tmp_path / "h.gguf", qtype="F16"))
    w = model.model.layers[0].mlp.up_proj.weight.detach()
    assert np.array_equal(weights["blk.0.ffn_up.weight"], w.half().float().numpy())
    assert weights["blk.0.attn_norm.weight"].dtype == np.float32


def test_no_tokenizer_writes_llama_cpp_no_vocab_mode(tmp_path) -> None:
    fields = _fields(export_gguf(untied_llama(), tmp_path / "n.gguf", qtype="F32"))
    assert fields["tokenizer.ggml.model"] == "none" and fields["llama.vocab_size"] == 128


def test_bad_inputs_name_the_argument(tmp_path) -> None:
    model = untied_llama()
    with pytest.raises(ValueError, match="`qtype` must be one of"):
        export_gguf(model, tmp_path / "x.gguf", qtype="Q5_K")
    with pytest.raises(ValueError, match="`embedding_qtype` must be one of"):
        export_gguf(model, tmp_path / "x.gguf", embedding_qtype="int4")
    with pytest.raises(ValueError, match="`model` must be a Hugging Face Llama-family"):
        export_gguf(tiny_gpt2(), tmp_path / "x.gguf")
    with pytest.raises(ValueError, match=r"`qtype` must be one of \['Q8_0', 'Q4_0', 'Q4_1'\], got 'Q4_K'"):
        prepare_gguf_qat(model, "Q4_K")
    with pytest.raises(ValueError, match="`tokenizer` must be a Hugging Face fast tokenizer"):
        export_gguf(model, tmp_path / "x.gguf", tokenizer=object())


def non_uniform_llama():
    """Layer 1 pruned harder than layer 0: 2 of 4 query heads, 1 of 2 KV heads, 32 of 96 MLP neurons."""
    from torch import nn

    model = untied_llama()
    attn, mlp = model.model.layers[1].self_attn, model.model.layers[1].mlp
    attn.q_proj, attn.k_proj = nn.Linear(64, 32, bias=False), nn.Linear(64, 16, bias=False)
    attn.v_proj, attn.o_proj = nn.Linear(64, 16, bias=False), nn.Linear(32, 64, bias=False)
    attn.num_key_value_groups = 2
    mlp.gate_proj, mlp.up_proj, mlp.down_proj = (nn.Linear(64, 32, bias=False), nn.Linear(64, 32, bias=False),
                                                 nn.Linear(32, 64, bias=False))
    return model.eval()


def test_non_uniform_layers_are_written_as_deci_with_per_layer_counts(tmp_path) -> None:
    model = non_uniform_llama()
    path = export_gguf(model, tmp_path / "nu.gguf", qtype="F32")
    fields = _fields(path)
    assert fields["general.architecture"] == "deci"
    assert fields["deci.attention.head_count"] == [4, 2] and fields["deci.attention.head_count_kv"] == [2, 1]
    assert fields["deci.feed_forward_length"] == [96, 32]
    np.testing.assert_allclose(gguf_reference_logits(path, TOKENS), _torch_logits(model, TOKENS),
                               atol=SAME_WEIGHTS_ATOL, rtol=0)
    assert _fields(export_gguf(untied_llama(), tmp_path / "u.gguf", qtype="F32"))["general.architecture"] == "llama"


def test_a_layer_llama_cpp_cannot_shape_is_refused_naming_it(tmp_path) -> None:
    from torch import nn

    model = untied_llama()
    model.model.layers[1].self_attn.q_proj = nn.Linear(64, 48, bias=False)  # 3 query heads over 2 KV heads
    with pytest.raises(ValueError, match=r"layer 1 has .*\(3, 2, 96\).*multiple of KV heads"):
        export_gguf(model, tmp_path / "x.gguf")


def test_rows_not_a_multiple_of_32_are_refused_naming_the_tensor(tmp_path) -> None:
    model = untied_llama(head_dim=16)
    model.model.layers[0].mlp.down_proj = torch.nn.Linear(80, 64, bias=False)
    model.model.layers[0].mlp.gate_proj = torch.nn.Linear(64, 80, bias=False)
    model.model.layers[0].mlp.up_proj = torch.nn.Linear(64, 80, bias=False)
    for layer in model.model.layers[1:]:
        layer.mlp.down_proj, layer.mlp.gate_proj, layer.mlp.up_proj = (
            model.model.layers[0].mlp.down_proj, model.model.layers[0].mlp.gate_proj,
            model.model.layers[0].mlp.up_proj)
    with pytest.raises(ValueError, match=r"`blk.0.ffn_down.weight` has rows of 80 values"):
        export_gguf(model, tmp_path / "x.gguf", qtype="Q4_0")
    with pytest.raises(ValueError, match=r"`model.layers.0.mlp.down_proj` has rows of 80"):
        prepare_gguf_qat(model, "Q4_0")


def test_gguf_grid_layers_are_exported_not_converted() -> None:
    model = untied_llama()
    prepare_gguf_qat(model, "Q8_0")
    with pytest.raises(ValueError, match="export_gguf"):
        convert_weight_only_qat(model)


@pytest.mark.real_weights
def test_smollm2_tokenizer_and_metadata_match_the_shipped_gguf(tmp_path) -> None:
    from examples._support.assets import load_smollm2, smollm2_gguf

    model, tokenizer = load_smollm2()
    path = export_gguf(model, tmp_path / "smollm2.Q8_0.gguf", qtype="Q8_0", tokenizer=tokenizer)
    ours, shipped = _fields(path), _fields(smollm2_gguf())
    for key in ("tokenizer.ggml.model", "tokenizer.ggml.pre", "tokenizer.ggml.tokens", "tokenizer.ggml.token_type",
                "tokenizer.ggml.merges", "tokenizer.ggml.bos_token_id", "tokenizer.ggml.eos_token_id",
                "llama.block_count", "llama.embedding_length", "llama.feed_forward_length",
                "llama.attention.head_count", "llama.attention.head_count_kv", "llama.rope.dimension_count",
                "llama.rope.freq_base", "llama.vocab_size"):
        assert ours[key] == shipped[key], key
    # The shipped token embedding is Q8_0: re-quantizing its dequantized values to Q8_0 gives them back.
    ref = read_gguf_weights(smollm2_gguf())["token_embd.weight"]
    np.testing.assert_allclose(read_gguf_weights(path)["token_embd.weight"], ref, rtol=0, atol=1e-6)
