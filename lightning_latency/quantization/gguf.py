"""Write a Hugging Face Llama-family causal LM as a GGUF file for llama.cpp.

What llama.cpp's ``llama`` architecture expects, and why the code below does what it does:

* Tensor names ``token_embd``, ``blk.{i}.attn_{norm,q,k,v,output}``, ``blk.{i}.ffn_{norm,gate,up,down}``,
  ``output_norm``, ``output``; a tied model has no ``output`` (llama.cpp then multiplies by ``token_embd``).
* Hugging Face's Llama applies RoPE to the two *halves* of each head (``rotate_half``); llama.cpp's "normal" RoPE
  rotates *adjacent pairs*. The rows of ``q_proj`` (per query head) and ``k_proj`` (per KV head, GQA) are therefore
  permuted head by head so that row pair ``(j, j + head_dim/2)`` becomes ``(2j, 2j + 1)``. Only rows move, and GGUF
  blocks run along a row, so the permutation commutes with block quantization.
* Q8_0 / Q4_0 / Q4_1 are written with ``gguf.quants.quantize``, the reference quantizer. A layer prepared with
  :func:`~.weight_only_qat.prepare_gguf_qat` is written on *its* grid from its latent weight, which gives exactly
  the weight its last training forward used (:mod:`.gguf_grid` is bit for bit the same arithmetic).
* A layer trained on the packed-kernel int4 grid (:func:`~.weight_only_qat.prepare_weight_only_qat`, ``bits=4``,
  ``group_size=32``) exported at ``qtype="Q4_1"`` is written from its *fake-quantized* weight: that grid is
  ``q * s + lo`` per group of 32 with a bf16 step ``s``, which Q4_1 re-quantizes to the same ``q`` with
  ``d = fp16(s) = s`` and ``fp16(lo)``, so the file holds the trained grid up to the fp16 rounding of each group's
  minimum, at most half an fp16 ulp of it (measured on a tiny Llama after 3 QAT steps: 71% of the values exact, the
  rest within 4.4e-3 of a Q4 step). Other types and group sizes write its latent weight (up to half a step away).
* Norm weights and 1-D tensors are F32, as llama.cpp requires.
* Per-layer head / KV-head / FFN counts (non-uniform structured pruning) are written as llama.cpp's ``deci``
  architecture (its Llama variant for NAS-pruned Nemotron models) with per-layer arrays: llama.cpp b11739's
  ``llama`` graph reads the arrays but shapes every layer's tensors by layer 0 ("tensor 'blk.1.ffn_gate.weight' has
  wrong shape"), whereas ``deci`` builds each layer from its own counts (logits checked against PyTorch to 5e-7).
  Uniform models stay ``llama``, the architecture every GGUF consumer knows.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from lightning_latency.quantization.gguf_grid import GGUF_BLOCK, GGUF_GRIDS, check_gguf_grid
from lightning_latency.quantization.weight_only_qat import WeightOnlyFakeQuantLinear

GGUF_QTYPES: tuple[str, ...] = ("F32", "F16", *GGUF_GRIDS)
_FILE_TYPE = {"F32": 0, "F16": 1, "Q4_0": 2, "Q4_1": 3, "Q8_0": 7}  # llama_ftype (gguf.LlamaFileType)
_TOKEN_NORMAL, _TOKEN_CONTROL, _TOKEN_UNUSED = 1, 3, 5
_LAYER_LINEARS = (("self_attn.q_proj", "attn_q"), ("self_attn.k_proj", "attn_k"), ("self_attn.v_proj", "attn_v"),
                  ("self_attn.o_proj", "attn_output"), ("mlp.gate_proj", "ffn_gate"), ("mlp.up_proj", "ffn_up"),
                  ("mlp.down_proj", "ffn_down"))


def _check_qtype(arg: str, value: Any) -> str:
    if value not in GGUF_QTYPES:
        raise ValueError(f"`{arg}` must be one of {list(GGUF_QTYPES)}, got {value!r}. "
                         f"Pass {arg}='Q8_0', 'Q4_0' or 'Q4_1'.")
    return value


def _check_model(model: nn.Module) -> tuple[Any, nn.Module]:
    config = getattr(model, "config", None)
    inner = getattr(model, "model", None)
    if getattr(config, "model_type", None) != "llama" or inner is None or not hasattr(inner, "layers"):
        raise ValueError(
            f"`model` must be a Hugging Face Llama-family causal LM (config.model_type 'llama', e.g. "
            f"LlamaForCausalLM / SmolLM2), got {type(model).__name__} with model_type "
            f"{getattr(config, 'model_type', None)!r}. Other architectures have no GGUF writer here."
        )
    rope = getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None) or {}
    if rope.get("rope_type", rope.get("type", "default")) != "default":
        raise ValueError(
            f"`model` uses RoPE scaling {rope.get('rope_type', rope.get('type'))!r}; export_gguf writes only plain "
            f"RoPE. Export a model with rope_type 'default'."
        )
    if getattr(config, "attention_bias", False) or getattr(config, "mlp_bias", False):
        raise ValueError("`model` has attention/MLP biases (attention_bias/mlp_bias=True); export_gguf writes "
                         "bias-free Llama blocks only.")
    return config, inner


def _head_dim(config: Any) -> int:
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads


def _kept_layers(inner: nn.Module) -> list[nn.Module]:
    """The decoder layers to write: depth pruning's removed layers (``SkippedLayer``) are left out of the file."""
    from lightning_latency.pruning.depth import SkippedLayer

    return [layer for layer in inner.layers if not isinstance(layer, SkippedLayer)]


def _layer_counts(inner: nn.Module, head_dim: int) -> list[tuple[int, int, int]]:
    """(query heads, KV heads, FFN width) of every layer, read from the weight shapes (pruning changes them)."""
    counts = []
    for i, layer in enumerate(_kept_layers(inner)):
        attn, mlp = layer.self_attn, layer.mlp
        c = (attn.q_proj.out_features // head_dim, attn.k_proj.out_features // head_dim, mlp.gate_proj.out_features)
        if min(c) < 1 or c[0] % c[1]:
            raise ValueError(
                f"`model` layer {i} has (query heads, KV heads, FFN width) {c}: export_gguf needs at least one of "
                f"each and query heads a multiple of KV heads. Drop an emptied block instead (depth pruning)."
            )
        counts.append(c)
    return counts


def permute_for_rope(weight: np.ndarray, n_heads: int) -> np.ndarray:
    """Rows of a q/k projection ``(n_heads * head_dim, in)`` from HF's half-split RoPE to llama.cpp's pairs."""
    out = weight.shape[0]
    return weight.reshape(n_heads, 2, out // n_heads // 2, *weight.shape[1:]).swapaxes(1, 2).reshape(weight.shape)


def unpermute_for_rope(weight: np.ndarray, n_heads: int) -> np.ndarray:
    """Inverse of :func:`permute_for_rope` (llama.cpp rows back to Hugging Face's)."""
    out = weight.shape[0]
    return weight.reshape(n_heads, out // n_heads // 2, 2, *weight.shape[1:]).swapaxes(1, 2).reshape(weight.shape)


def _on_int4_kernel_grid(module: nn.Module) -> bool:
    """An enabled packed-kernel int4 QAT layer whose groups are Q4_1's blocks (32 wide, min + step each)."""
    return (isinstance(module, WeightOnlyFakeQuantLinear) and module.enabled and not getattr(module, "gguf", None)
            and module.bits == 4 and module.group_size == GGUF_BLOCK)


def _weight_and_grid(module: nn.Module, default: str) -> tuple[np.ndarray, str]:
    """The weight to write for a linear and its GGUF type: its own GGUF grid (latent weight, re-gridded exactly),
    or ``default``; at Q4_1 a group-32 int4 kernel-grid layer gives its fake-quantized weight (its trained grid)."""
    grid = getattr(module, "gguf", None) if getattr(module, "enabled", True) else None
    trained = default == "Q4_1" and _on_int4_kernel_grid(module)
    weight = module.fake_weight() if trained else module.weight
    return weight.detach().float().cpu().numpy(), grid or default


def _add(writer: Any, name: str, data: np.ndarray, qtype: str) -> None:
    import gguf

    if data.ndim == 1:
        writer.add_tensor(name, np.ascontiguousarray(data, dtype=np.float32))
        return
    if qtype in GGUF_GRIDS:
        check_gguf_grid(qtype, data.shape[-1], name)
    kind = gguf.GGMLQuantizationType[qtype]
    q = gguf.quants.quantize(np.ascontiguousarray(data, dtype=np.float32), kind)
    writer.add_tensor(name, q, raw_dtype=kind)


def _tokenizer_json(tokenizer: Any) -> dict[str, Any]:
    if isinstance(tokenizer, (str, Path)):
        return json.loads(Path(tokenizer).read_text(encoding="utf-8"))
    backend = getattr(tokenizer, "backend_tokenizer", None) or getattr(tokenizer, "_tokenizer", None)
    if backend is None or not hasattr(backend, "to_str"):
        raise ValueError(
            f"`tokenizer` must be a Hugging Face fast tokenizer or a tokenizer.json path, got "
            f"{type(tokenizer).__name__}. Pass AutoTokenizer.from_pretrained(...) (fast) or None."
        )
    return json.loads(backend.to_str())


def _add_tokenizer(writer: Any, tokenizer: Any, n_vocab: int, pre: str) -> None:
    if tokenizer is None:
        # llama.cpp's no-vocab mode: the model runs on token ids (tests, custom tokenizers); vocab_size gives n_vocab.
        writer.add_tokenizer_model("none")
        return
    spec = _tokenizer_json(tokenizer)
    model = spec.get("model", {})
    if model.get("type") != "BPE":
        raise ValueError(
            f"`tokenizer` is a {model.get('type')!r} tokenizer; export_gguf writes byte-level BPE (GPT-2 style, "
            f"SmolLM2's) only. Pass tokenizer=None to export without one."
        )
    vocab: dict[str, int] = dict(model["vocab"])
    special = {t["content"] for t in spec.get("added_tokens", []) if t.get("special")}
    for t in spec.get("added_tokens", []):
        vocab[t["content"]] = t["id"]
    if max(vocab.values()) >= n_vocab:
        raise ValueError(f"`tokenizer` has token ids up to {max(vocab.values())} but the model's vocabulary is "
                         f"{n_vocab}. Pass the tokenizer the model was trained with.")
    tokens = [f"[PAD{i}]" for i in range(n_vocab)]
    types = [_TOKEN_UNUSED] * n_vocab
    for text, i in vocab.items():
        tokens[i], types[i] = text, _TOKEN_CONTROL if text in special else _TOKEN_NORMAL
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(pre)
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    writer.add_token_merges(merges)
    for key in ("bos", "eos", "unk", "pad"):
        token = getattr(tokenizer, f"{key}_token", None) if not isinstance(tokenizer, (str, Path)) else None
        if token is not None and token in vocab:
            getattr(writer, {"bos": "add_bos_token_id", "eos": "add_eos_token_id", "unk": "add_unk_token_id",
                             "pad": "add_pad_token_id"}[key])(vocab[token])
    writer.add_add_bos_token(False)  # SmolLM2 / GPT-2 style: no BOS prepended (as the shipped GGUF says)
    template = getattr(tokenizer, "chat_template", None)
    if isinstance(template, str):
        writer.add_chat_template(template)


@torch.no_grad()
def export_gguf(model: nn.Module, path: str | Path, qtype: str = "Q8_0", tokenizer: Any = None,
                embedding_qtype: str | None = None, tokenizer_pre: str = "smollm", name: str | None = None) -> Path:
    """Write ``model`` (a Hugging Face Llama-family causal LM) as a GGUF file llama.cpp loads.

    Args:
        model: e.g. ``LlamaForCausalLM`` (SmolLM2, a pruned/distilled student): GQA and tied embeddings handled;
            per-layer head / FFN counts (read from the weight shapes) make the file llama.cpp's ``deci`` architecture.
        path: the ``.gguf`` file to write (parents created).
        qtype: ``"Q8_0"``, ``"Q4_0"``, ``"Q4_1"``, ``"F16"`` or ``"F32"`` for the block linears (and an untied
            ``lm_head``). A layer prepared with :func:`~.weight_only_qat.prepare_gguf_qat` is written on its own
            trained grid. At ``"Q4_1"``, a layer prepared with ``prepare_weight_only_qat(bits=4, group_size=32)`` is
            written from its fake-quantized weight, so the file holds its trained int4 grid (to the fp16 rounding
            of each group's minimum, a few thousandths of a Q4 step: close, not bit for bit).
        tokenizer: the model's Hugging Face fast tokenizer (byte-level BPE) or a ``tokenizer.json`` path; None writes
            llama.cpp's no-vocab mode (the file then runs on token ids only).
        embedding_qtype: type of ``token_embd`` (the output projection too when tied); None: ``qtype``. For a tied
            model whose ``lm_head`` was GGUF-fake-quantized, that grid is used so the output matches training.
        tokenizer_pre: llama.cpp's pre-tokenizer name (``"smollm"`` for SmolLM2, ``"gpt-2"``, ``"llama-bpe"``...).
        name: ``general.name``; None: the config's ``_name_or_path``.

    Returns:
        ``path``.

    Raises:
        ValueError: unknown ``qtype``/``embedding_qtype``, a model that is not Llama-family, a layer with no heads
            or no FFN left (named), a row width not a multiple of 32 for a block type (the tensor named).

    Example::

        prepare_gguf_qat(student, "Q4_0")
        Trainer(max_steps=200).fit(DistillationModule(student=student, teacher=teacher))
        export_gguf(student, "student.Q4_0.gguf", qtype="Q4_0", tokenizer=tokenizer)
    """
    import gguf

    _check_qtype("qtype", qtype)
    if embedding_qtype is not None:
        _check_qtype("embedding_qtype", embedding_qtype)
    config, inner = _check_model(model)
    head_dim = _head_dim(config)
    counts = _layer_counts(inner, head_dim)
    uniform = all(c == counts[0] for c in counts)
    arch = "llama" if uniform else "deci"
    n_head, n_kv, n_ff = ([c[k] for c in counts] if not uniform else counts[0][k] for k in range(3))
    embed = inner.embed_tokens.weight
    lm_head = model.get_output_embeddings()
    tied = lm_head is None or lm_head.weight is embed or lm_head.weight.data_ptr() == embed.data_ptr()
    emb_type = embedding_qtype or ((getattr(lm_head, "gguf", None) if tied and lm_head is not None else None) or qtype)
    n_vocab, hidden = embed.shape

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    writer = gguf.GGUFWriter(str(path), arch)
    writer.add_name(name or getattr(config, "_name_or_path", "") or "lightning-latency export")
    writer.add_context_length(int(getattr(config, "max_position_embeddings", 2048)))
    writer.add_embedding_length(hidden)
    writer.add_block_count(len(_kept_layers(inner)))
    writer.add_feed_forward_length(n_ff)
    writer.add_head_count(n_head)
    writer.add_head_count_kv(n_kv)
    rope = getattr(config, "rope_parameters", None) or {}
    writer.add_rope_freq_base(float(rope.get("rope_theta", getattr(config, "rope_theta", 10000.0))))
    writer.add_layer_norm_rms_eps(float(config.rms_norm_eps))
    writer.add_rope_dimension_count(head_dim)
    if any(head_dim * c[0] != hidden for c in counts):
        writer.add_key_length(head_dim)
        writer.add_value_length(head_dim)
    writer.add_vocab_size(n_vocab)
    writer.add_file_type(_FILE_TYPE[qtype])
    _add_tokenizer(writer, tokenizer, n_vocab, tokenizer_pre)

    _add(writer, "token_embd.weight", embed.detach().float().cpu().numpy(), emb_type)
    for i, layer in enumerate(_kept_layers(inner)):  # removed layers are absent: the file has fewer blocks
        _add(writer, f"blk.{i}.attn_norm.weight", layer.input_layernorm.weight.float().cpu().numpy(), "F32")
        _add(writer, f"blk.{i}.ffn_norm.weight", layer.post_attention_layernorm.weight.float().cpu().numpy(), "F32")
        for hf_name, gguf_name in _LAYER_LINEARS:
            weight, grid = _weight_and_grid(layer.get_submodule(hf_name), qtype)
            if gguf_name in ("attn_q", "attn_k"):
                weight = permute_for_rope(weight, counts[i][0] if gguf_name == "attn_q" else counts[i][1])
            _add(writer, f"blk.{i}.{gguf_name}.weight", weight, grid)
    _add(writer, "output_norm.weight", inner.norm.weight.float().cpu().numpy(), "F32")
    if not tied:
        weight, grid = _weight_and_grid(lm_head, qtype)
        _add(writer, "output.weight", weight, grid)

    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def read_gguf_weights(path: str | Path) -> dict[str, np.ndarray]:
    """Every tensor of a GGUF file dequantized to fp32, in PyTorch's ``(out, in)`` orientation, by GGUF name."""
    import gguf

    reader = gguf.GGUFReader(str(path))
    out = {}
    for t in reader.tensors:
        data = gguf.quants.dequantize(t.data, t.tensor_type)
        out[t.name] = np.asarray(data, dtype=np.float32).reshape(tuple(reversed([int(s) for s in t.shape])))
    return out


__all__ = ["GGUF_QTYPES", "export_gguf", "permute_for_rope", "read_gguf_weights", "unpermute_for_rope"]
