"""Weight-only QAT on the deployment grid: prepare -> Trainer fit -> convert gives the trained weights bit for bit."""

from __future__ import annotations

import pytest
import torch
from helpers import HFModule, tiny_llama, trainer_kwargs
from torch import nn

from lightning_latency._compat import Trainer
from lightning_latency.quantization.weight_only import (
    Int4WeightOnlyLinear,
    Int8WeightOnlyLinear,
    int4_dequantize,
    int4_grid,
)
from lightning_latency.quantization.weight_only_qat import (
    WeightOnlyFakeQuantLinear,
    convert_weight_only_qat,
    fake_quantize_weight,
    prepare_weight_only_qat,
    strip_weight_only_qat,
)

# See tests/test_quantization_weight_only.py: bf16 activations and output, fp32 accumulation.
BF16_REL = 2.0**-9


def test_fake_quant_is_the_grid_with_a_straight_through_gradient() -> None:
    torch.manual_seed(0)
    w = torch.randn(16, 64, requires_grad=True)
    fq = fake_quantize_weight(w, bits=4, group_size=32)
    assert torch.equal(fq.detach(), int4_dequantize(*int4_grid(w, 32), 32))
    fq.sum().backward()
    assert torch.equal(w.grad, torch.ones_like(w))  # straight-through: d fq / d w = 1


def test_prepare_shares_parameters_and_is_idempotent() -> None:
    model = tiny_llama()
    weight = model.model.layers[0].mlp.up_proj.weight
    names = prepare_weight_only_qat(model, bits=4, group_size=32)
    layer = model.model.layers[0].mlp.up_proj
    assert isinstance(layer, WeightOnlyFakeQuantLinear) and layer.weight is weight
    assert "lm_head" in names and prepare_weight_only_qat(model, bits=4, group_size=32) == names
    assert set(model.state_dict()) == set(tiny_llama().state_dict())
    strip_weight_only_qat(model)
    assert type(model.model.layers[0].mlp.up_proj) is nn.Linear


@pytest.mark.parametrize("bits", [4, 8])
def test_prepare_fit_convert_matches_fake_quant(tmp_path, bits: int) -> None:
    module = HFModule(kind="llama", lr=1e-2)
    model = module.model
    prepare_weight_only_qat(model, bits=bits, group_size=32)
    before = model.model.layers[0].self_attn.q_proj.weight.detach().clone()
    Trainer(**trainer_kwargs(tmp_path, max_steps=3)).fit(module)
    model.eval()
    trained = model.model.layers[0].self_attn.q_proj.weight.detach()
    assert not torch.equal(trained, before)  # training moved the master weights

    fake = {n: m for n, m in model.named_modules() if isinstance(m, WeightOnlyFakeQuantLinear)}
    fq_weights = {n: fake_quantize_weight(m.weight, bits, 32).detach().clone() for n, m in fake.items()}
    ids = torch.randint(0, 128, (2, 10))
    torch.manual_seed(1)
    xs = {n: torch.randn(3, m.in_features) for n, m in fake.items()}
    with torch.no_grad():
        fq_out = {n: m(xs[n]) for n, m in fake.items()}
        fq_logits = model(input_ids=ids).logits
    names = convert_weight_only_qat(model)
    assert set(names) == set(fake)
    kind = Int4WeightOnlyLinear if bits == 4 else Int8WeightOnlyLinear
    with torch.no_grad():
        for n in names:
            m = model.get_submodule(n)
            assert isinstance(m, kind)
            w = fq_weights[n]
            if bits == 8:
                assert torch.equal(m.dequantize(), w)  # bit for bit: the int8 grid the last training step used
            else:
                # read back through the kernel, so rounded to bf16: within one bf16 step of the fp32 grid value
                assert bool(((m.dequantize() - w).abs() <= 2 * BF16_REL * w.abs()).all())
            # layer outputs: bf16 activations vs the fake-quant fp32 forward, bound derived from bf16 rounding
            xb = xs[n].to(torch.bfloat16).float()
            bound = 4 * BF16_REL * (xb.abs() @ w.abs().T) + 4 * BF16_REL * (xs[n] - xb).abs() @ w.abs().T + 1e-6
            assert bool(((m(xs[n]) - fq_out[n]).abs() <= bound).all()), n
        logits = model(input_ids=ids).logits
    # whole model: the same function up to bf16 activation rounding (a few 2^-9 relative per layer, ~10 layers)
    assert float((logits - fq_logits).norm() / fq_logits.norm()) < 0.05


def test_convert_without_prepare_names_the_fix() -> None:
    with pytest.raises(ValueError, match=r"no weight-only fake-quantized layers.*prepare_weight_only_qat"):
        convert_weight_only_qat(tiny_llama())


def test_prepare_group_size_error_names_layer_and_fix() -> None:
    with pytest.raises(ValueError, match=r"`group_size`=256 does not divide in_features=64 of layer "
                                         r"'model.layers.0.self_attn.q_proj'.*Pass group_size=64"):
        prepare_weight_only_qat(tiny_llama(), bits=4, group_size=256)
