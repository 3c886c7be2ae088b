"""Core QAT verbs on bare modules (no Trainer): selection, fake-quant training, convert, freeze, deploy, errors."""

from __future__ import annotations

import pytest
import torch
from helpers import VOCAB, tiny_bert, tiny_llama
from torch import nn

from lightning_latency.quantization import (
    QuantizationConfig,
    convert_qat,
    deploy,
    freeze_ranges,
    is_converted,
    prepare_qat,
    strip_qat,
    unconvert_qat,
    weight_error,
)
from lightning_latency.quantization.qat import fake_quantized_modules, is_frozen


def _inputs(batch: int = 2, seq: int = 16) -> dict[str, torch.Tensor]:
    ids = torch.randint(0, VOCAB, (batch, seq), generator=torch.Generator().manual_seed(1))
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}


def _linears(model: nn.Module) -> set[str]:
    return {n for n, m in model.named_modules() if isinstance(m, nn.Linear)}


def test_prepare_swaps_encoder_linears_and_skips_heads_and_embeddings() -> None:
    model = tiny_bert()
    names = prepare_qat(model, QuantizationConfig())
    fq = fake_quantized_modules(model)
    assert set(names) == set(fq)
    # every linear of the encoder and pooler, nothing else
    assert set(fq) == _linears(model) - {"classifier"}
    assert "classifier" not in fq and all("embeddings" not in n for n in fq)
    assert not any(isinstance(m, nn.Embedding) and m in fq.values() for m in model.modules())
    assert all(type(m).__name__ == "LayerNorm" for n, m in model.named_modules() if "LayerNorm" in n)


def test_prepare_llama_skips_lm_head_and_embeddings_unless_asked() -> None:
    model = tiny_llama()
    names = prepare_qat(model, QuantizationConfig(scheme="int8_int4", group_size=32))
    assert "lm_head" not in names and not any("embed" in n for n in names)
    assert any(n.endswith("mlp.down_proj") for n in names) and any(n.endswith("self_attn.k_proj") for n in names)
    model = tiny_llama()
    names = prepare_qat(model, QuantizationConfig(scheme="int8_weight_only", include_embeddings=True))
    assert "model.embed_tokens" in names and "lm_head" not in names


def test_exclude_and_targets_are_overridable_by_name_and_type() -> None:
    model = tiny_bert()
    names = prepare_qat(model, QuantizationConfig(targets=["*attention*"], exclude=["*output.dense"]))
    assert names and all("attention" in n and not n.endswith("output.dense") for n in names)
    model = tiny_bert()
    names = prepare_qat(model, QuantizationConfig(exclude=["BertIntermediate"]))  # class name of a parent
    assert names and not any("intermediate" in n for n in names)
    assert "classifier" in prepare_qat(tiny_bert(), QuantizationConfig(exclude=[]))


def test_patterns_are_fnmatch_on_name_or_class_or_regex() -> None:
    dense = prepare_qat(tiny_bert(), QuantizationConfig(targets=["*dense*"]))
    regex = prepare_qat(tiny_bert(), QuantizationConfig(targets=[r"re:layer\.0\..*dense$"]))
    assert dense and all("dense" in n for n in dense)
    assert regex and set(regex) < set(dense) and all(".layer.0." in n and n.endswith("dense") for n in regex)
    excluded = prepare_qat(tiny_bert(), QuantizationConfig(exclude=["re:attention", "*classifier*"]))
    assert excluded and not any("attention" in n for n in excluded)
    with pytest.raises(ValueError, match=r"`exclude` entry 're:\(' is not a valid regular expression"):
        QuantizationConfig(exclude=["re:("])


def test_skip_is_the_deprecated_name_of_exclude() -> None:
    from lightning_latency._deprecation import LightningLatencyDeprecationWarning

    with pytest.warns(LightningLatencyDeprecationWarning, match=r"QuantizationConfig\(`skip`=.*`exclude=\['\*pooler\*'\]`"):
        config = QuantizationConfig(skip=["*pooler*"])
    assert config.exclude == ["*pooler*"] and config.exclude_patterns == config.skip_patterns == ("*pooler*",)
    assert "bert.pooler.dense" not in prepare_qat(tiny_bert(), config)
    with pytest.raises(ValueError, match=r"pass `exclude` only; `skip` is its deprecated name"):
        QuantizationConfig(skip=["*a*"], exclude=["*b*"])


def _ao_configs() -> list:
    from torchao.quantization import Int8DynamicActivationInt8WeightConfig, IntxWeightOnlyConfig
    from torchao.quantization.granularity import PerGroup
    from torchao.quantization.quant_primitives import MappingType

    return [IntxWeightOnlyConfig(weight_dtype=torch.int4, granularity=PerGroup(32)),
            Int8DynamicActivationInt8WeightConfig(act_mapping_type=MappingType.ASYMMETRIC)]


@pytest.mark.parametrize("index", [0, 1], ids=["intx_int4_g32", "int8_dynamic_asym"])
def test_torchao_config_as_scheme_converts_to_the_fake_quant_function(index: int) -> None:
    base = _ao_configs()[index]
    config = QuantizationConfig(scheme=base)
    assert config.backend.value == "torchao" and config.scheme is base
    assert config.weight_group_size == (32 if index == 0 else None)
    model = tiny_bert().eval()
    inputs = _inputs()
    with torch.no_grad():
        float_out = model(**inputs).logits
    names = prepare_qat(model, base)  # a bare torchao config works as `config` too
    with torch.no_grad():
        fake = model(**inputs).logits
    assert len(names) == 13 and not torch.equal(fake, float_out)
    with torch.no_grad():
        convert_qat(model, config)
        real = model(**inputs).logits
    assert type(model.bert.pooler.dense.weight).__name__ == ("IntxUnpackedToInt8Tensor" if index == 0 else "Int8Tensor")
    torch.testing.assert_close(real, fake, atol=_real_vs_fake_atol(fake, float_out, int8_activations=index == 1),
                               rtol=0)


def test_torchao_config_problems_name_the_fix() -> None:
    from torchao.quantization import Int8DynamicActivationInt8WeightConfig
    from torchao.quantization.granularity import PerTensor

    from lightning_latency.quantization import check_qat

    per_tensor = Int8DynamicActivationInt8WeightConfig(granularity=PerTensor())
    model = tiny_bert()
    with pytest.raises(ValueError, match=r"`scheme`=Int8DynamicActivationInt8WeightConfig.*cannot be fake-quantized"
                                         r".*IntxWeightOnlyConfig"):
        check_qat(model, QuantizationConfig(scheme=per_tensor))
    assert not fake_quantized_modules(model)  # found on a copy of one layer
    with pytest.raises(ValueError, match=r"`backend`='x86' runs int8 per-channel weights only.*backend='torchao'"):
        QuantizationConfig(scheme=_ao_configs()[0], backend="x86")
    with pytest.raises(ValueError, match=r"`include_embeddings`=True needs a scheme name"):
        QuantizationConfig(scheme=_ao_configs()[0], include_embeddings=True)
    with pytest.warns(UserWarning, match=r"fake-quantizes per-token activations only asymmetric"):
        QuantizationConfig(scheme=Int8DynamicActivationInt8WeightConfig())
    from torchao.quantization import Int4WeightOnlyConfig

    int4_tensor_core = QuantizationConfig(scheme=Int4WeightOnlyConfig(group_size=32))  # not an Intx fake quantizer
    check_qat(model, int4_tensor_core)  # it prepares ...
    with pytest.raises(ValueError, match=r"`freeze_step`: the weight fake quantizer .* Pass freeze_step=None"):
        check_qat(model, int4_tensor_core, freeze=True)  # ... but its ranges cannot be frozen


def test_prepare_is_idempotent_and_shares_parameters() -> None:
    model = tiny_bert()
    weight = model.bert.encoder.layer[0].intermediate.dense.weight
    first = prepare_qat(model)
    quantizer = model.bert.encoder.layer[0].intermediate.dense.weight_fake_quantizer
    assert prepare_qat(model) == first
    layer = model.bert.encoder.layer[0].intermediate.dense
    assert layer.weight is weight and layer.weight_fake_quantizer is quantizer


def test_fake_quant_training_runs_backward_and_changes_outputs() -> None:
    ref, model = tiny_bert(), tiny_bert()
    prepare_qat(model)
    inputs = _inputs()
    out = model(**inputs, labels=torch.tensor([0, 1]))
    assert not torch.equal(out.logits, ref(**inputs).logits)  # quantization error is visible to training
    out.loss.backward()
    grads = [m.weight.grad for m in fake_quantized_modules(model).values()]
    assert all(g is not None and g.abs().sum() > 0 for g in grads)  # straight-through estimator passes gradients
    errors = weight_error(model)
    assert len(errors) == len(grads) and all(0 < e < 0.02 for e in errors.values())  # int8: ~0.6% relative


def _real_vs_fake_atol(fake: torch.Tensor, float_out: torch.Tensor, int8_activations: bool) -> float:
    """Tolerance for converted (real int kernels) vs fake-quant outputs, from the kernel path and the quantization error.

    The converted kernels compute the same quantized values; the rest is float rounding (int accumulation vs fp32
    matmul of dequantized values): at most 1e-3 on logits of size ~0.1. Without VNNI, oneDNN sums u8 x s8 pairs of
    int8 *activations* in int16 with saturation, so that path may differ by a few int8 quantization errors (the fake
    model's distance from float; measured up to 3.7x): bounded by 6x. A wrong scale fails both bounds by far.
    """
    from lightning_latency.cpu import cpu_features

    if not int8_activations or cpu_features().vnni:
        return 1e-3
    return max(1e-3, 6.0 * (fake - float_out).abs().max().item())


@pytest.mark.parametrize("scheme", ["int8_dynamic", "int8_int4", "int8_weight_only", "int4_weight_only"])
def test_converted_output_matches_fake_quant(scheme: str) -> None:
    config = QuantizationConfig(scheme=scheme, group_size=32, backend="torchao")
    model = tiny_bert().eval()
    inputs = _inputs()
    with torch.no_grad():
        float_out = model(**inputs).logits
    prepare_qat(model, config)
    with torch.no_grad():
        fake = model(**inputs).logits
        names = convert_qat(model, config)
        real = model(**inputs).logits
    assert is_converted(model) and not fake_quantized_modules(model) and len(names) == 13
    atol = _real_vs_fake_atol(fake, float_out, int8_activations=scheme.startswith("int8_") and "weight" not in scheme)
    torch.testing.assert_close(real, fake, atol=atol, rtol=0)


def test_embedding_qat_converts() -> None:
    config = QuantizationConfig(scheme="int8_weight_only", include_embeddings=True)
    model = tiny_llama().eval()
    prepare_qat(model, config)
    ids = _inputs()["input_ids"]
    with torch.no_grad():
        fake = model(input_ids=ids).logits
        convert_qat(model, config)
        real = model(input_ids=ids).logits
    assert type(model.model.embed_tokens.weight).__name__ == "IntxUnpackedToInt8Tensor"
    torch.testing.assert_close(real, fake, atol=1e-3, rtol=0)


def test_freeze_ranges_fixes_the_weight_grid_and_is_saved() -> None:
    model = tiny_bert()
    prepare_qat(model)
    layer = model.bert.encoder.layer[0].intermediate.dense
    x = torch.randn(2, layer.in_features)
    dynamic = layer(x)
    frozen = freeze_ranges(model)
    assert frozen and is_frozen(model) and freeze_ranges(model) == []
    assert type(layer.weight_fake_quantizer).__name__ == "FrozenWeightFakeQuantizer"
    torch.testing.assert_close(layer(x), dynamic, atol=0, rtol=0)  # the grid torchao computed, bit for bit
    scale = layer.weight_fake_quantizer.scale.clone()
    with torch.no_grad():
        layer.weight.mul_(3.0)
    layer(torch.randn(2, layer.in_features))
    torch.testing.assert_close(layer.weight_fake_quantizer.scale, scale)  # not recomputed from the bigger weight
    assert "bert.encoder.layer.0.intermediate.dense.weight_fake_quantizer.scale" in model.state_dict()


def test_unconvert_and_strip_give_float_models_with_the_same_function() -> None:
    model = tiny_bert().eval()
    inputs = _inputs()
    with torch.no_grad():
        float_out = model(**inputs).logits
    prepare_qat(model)
    with torch.no_grad():
        fake = model(**inputs).logits
    convert_qat(model)
    with torch.no_grad():
        real = model(**inputs).logits
        unconvert_qat(model)
        assert not is_converted(model) and model.classifier.weight.dtype == torch.float32
        # unconverted = dequantized weights in float: the fake-quant function, compared with the int8 kernels
        atol = _real_vs_fake_atol(fake, float_out, int8_activations=True)
        torch.testing.assert_close(model(**inputs).logits, real, atol=atol, rtol=0)
    prepare_qat(model)
    strip_qat(model)
    assert not fake_quantized_modules(model) and type(model.bert.pooler.dense) is nn.Linear


def test_deploy_x86_matches_fake_quant_and_leaves_model_alone() -> None:
    model = tiny_bert().eval()
    prepare_qat(model)
    inputs = _inputs()
    with torch.no_grad():
        fake = model(**inputs).logits
    deployed = deploy(model, inputs, calibration=[_inputs(2, 16)], compile=False).eval()  # .eval() must not raise
    assert deployed.backend == "x86" and "classifier" not in deployed.quantized
    # static per-tensor int8 activations instead of dynamic per-token: a looser tolerance than convert_qat
    torch.testing.assert_close(deployed(**inputs).logits, fake, atol=5e-3, rtol=0)
    assert fake_quantized_modules(model)  # the training model is untouched


def test_deploy_compiled_with_freezing_runs() -> None:
    model = tiny_bert(layers=1).eval()
    inputs = _inputs(1, 16)
    with torch.no_grad():
        float_logits = model(**inputs).logits
    prepare_qat(model)
    deployed = deploy(model, inputs)
    with torch.no_grad():
        ref = deployed.reference(**inputs).logits
    # The compiled kernels compute on the reference's own integer grid, so they may differ from it only by float
    # accumulation order: far below the int8 quantization error itself (the reference's distance from float). A
    # kernel that saturates (oneDNN u8 x s8 without VNNI and 8-bit activations: 6x that error) fails here.
    quant_error = (ref - float_logits).abs().max().item()
    assert quant_error > 0  # the reference really is quantized
    torch.testing.assert_close(deployed(**inputs).logits, ref, atol=0.25 * quant_error, rtol=0)


def test_x86_activations_use_7_bits_without_vnni(monkeypatch: pytest.MonkeyPatch) -> None:
    import lightning_latency.cpu as cpu

    def quant_max_of(features: cpu.CpuFeatures) -> set[int]:
        monkeypatch.setattr(cpu, "cpu_features", lambda: features)
        deployed = deploy(tiny_bert(layers=1).eval(), _inputs(1, 8), compile=False)
        return {int(node.args[4]) for node in deployed.reference.graph.nodes
                if "quantize_per_tensor" in str(node.target) and "dequantize" not in str(node.target)}

    base = cpu.cpu_features()
    no_vnni = cpu.CpuFeatures(capability="AVX2", avx512=False, vnni=False, bf16=False, amx=False)
    vnni = cpu.CpuFeatures(capability="AVX512", avx512=True, vnni=True, bf16=False, amx=False)
    assert quant_max_of(no_vnni) == {127}  # cannot saturate oneDNN's int16 pair sums
    assert quant_max_of(vnni) == {255}
    assert base.capability == torch.backends.cpu.get_cpu_capability()


@pytest.mark.parametrize(
    ("make", "match"),
    [
        (lambda: QuantizationConfig(scheme="int3"), r"`scheme` must be one of .*'int8_dynamic'.*got 'int3'"),
        (lambda: QuantizationConfig(backend="tpu"), r"`backend` must be one of .*'x86'.*got 'tpu'"),
        (lambda: QuantizationConfig(group_size=0), r"`group_size` must be a positive int.*got 0"),
        (lambda: QuantizationConfig(scheme="int4_weight_only", backend="x86"),
         r"`backend`='x86'.*int4.*backend='torchao'"),
        (lambda: QuantizationConfig(exclude=[nn.Linear]), r"`exclude` must be a list of patterns"),
        (lambda: prepare_qat(tiny_bert(), QuantizationConfig(targets=["*nothing*"])),
         r"Nothing to quantize: `targets`=\['\*nothing\*'\].*Candidates: 'bert.encoder"),
        (lambda: prepare_qat(tiny_bert(), QuantizationConfig(scheme="int8_int4", group_size=48, backend="torchao")),
         r"`group_size`=48 does not divide the input size 64 of layer 'bert.encoder.layer.0.attention.self.query'"
         r".*Pass group_size=64"),
        (lambda: convert_qat(tiny_bert()), r"no fake-quantized modules to convert.*prepare_qat"),
        (lambda: deploy(tiny_bert().to("meta"), _inputs()),
         r"`backend`='x86'.*CPU only.*\['meta'\].*backend='torchao'"),
    ],
)
def test_misconfiguration(make, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        make()


def test_prepare_on_converted_model_names_the_fix() -> None:
    model = tiny_bert()
    prepare_qat(model)
    convert_qat(model)
    with pytest.raises(ValueError, match=r"already converted.*unconvert_qat"):
        prepare_qat(model)


@pytest.mark.real_weights
def test_real_minilm_prepare_convert_keeps_predictions() -> None:
    from examples._support.assets import load_minilm

    torch.manual_seed(0)  # the classification head is freshly initialised
    model, tokenizer = load_minilm(num_labels=2)
    model.eval()
    enc = tokenizer(["a gripping, funny film", "dull and far too long"], padding="max_length", max_length=32,
                    return_tensors="pt")
    inputs = {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]}
    with torch.no_grad():
        ref = model(**inputs).logits
        names = prepare_qat(model)
        fake = model(**inputs).logits
        convert_qat(model)
        real = model(**inputs).logits
    assert len(names) == 6 * 6 + 1 and "classifier" not in names  # 6 linears per layer + pooler
    # Real int8 kernels and fake quantization round on the same grid but in a different order, so a few activations
    # land one step apart, and those flips propagate through 6 layers: bounded by the int8 quantization error on this
    # input. Without VNNI, oneDNN sums u8 x s8 pairs in int16 with saturation (measured: 3.7x that error with the AVX2
    # path), so that kernel path gets a wider bound. A wrong scale or a missing convert gives errors of the logits'
    # own size (10-50x the quantization error) and fails either bound.
    from lightning_latency.cpu import cpu_features

    quant_error = (fake - ref).abs().max().item()
    factor = 1.5 if cpu_features().vnni else 6.0
    torch.testing.assert_close(real, fake, atol=factor * quant_error, rtol=0)
    torch.testing.assert_close(fake, ref, atol=0.05, rtol=0)  # int8 error on real weights is small
