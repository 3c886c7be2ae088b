"""Weight-only int4 / int8 linears on the packed CPU kernels, and the verb that swaps them in."""

from __future__ import annotations

import pytest
import torch
from helpers import tiny_llama
from torch import nn

from lightning_latency.quantization.weight_only import (
    Int4WeightOnlyLinear,
    Int8WeightOnlyLinear,
    int4_dequantize,
    int4_grid,
    int8_dequantize,
    int8_grid,
    quantize_weight_only,
)

# bf16 keeps 8 significant bits: relative rounding 2^-9 per value. The kernels take bf16 activations (x is rounded,
# so the reference uses the same rounded x), may hold the dequantized weights in bf16 (2^-9 of each |w|), accumulate
# in fp32 and round the output to bf16 (2^-9 of |y| <= sum |x||w|). Bound: 2 * 2^-9 * (|x| @ |W|^T), times 2 slack.
BF16_REL = 2.0**-9


def _bound(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    return 4 * BF16_REL * (x.abs() @ w.abs().T) + 1e-6


def _check_close(y: torch.Tensor, x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None = None) -> None:
    xb = x.to(torch.bfloat16).float()
    ref = xb @ w.T + (bias if bias is not None else 0)
    err = (y.float() - ref).abs()
    bound = _bound(xb, w)
    assert bool((err <= bound).all()), f"max error {float(err.max()):.3g} exceeds bound {float(bound.min()):.3g}"


@pytest.mark.parametrize("group_size", [32, 64, 128])
def test_int4_linear_matches_dequantized_reference(group_size: int) -> None:
    torch.manual_seed(0)
    lin = nn.Linear(256, 48)
    m = Int4WeightOnlyLinear.from_linear(lin, group_size)
    x = torch.randn(2, 5, 256)
    q, s, z = int4_grid(lin.weight, group_size)
    w = int4_dequantize(q, s, z, group_size)
    y = m(x)
    assert y.shape == (2, 5, 48) and y.dtype == torch.float32
    _check_close(y.reshape(10, 48), x.reshape(10, 256), w, lin.bias.detach())
    # the grid itself: asymmetric with a minimum per group, error at most half a step (+ bf16 rounding of s, z)
    step = s.float().repeat_interleave(group_size, 1)
    assert int(q.min()) >= 0 and int(q.max()) <= 15
    assert bool(((w - lin.weight).abs() <= 0.5 * step + 8 * BF16_REL * lin.weight.abs().amax()).all())


def test_int4_grid_keeps_a_q4_1_grid_exactly() -> None:
    # A weight that already sits on a min + q*scale grid (bf16-representable scale and zero) is reproduced exactly.
    torch.manual_seed(0)
    q = torch.randint(0, 16, (32, 64))
    q[:, ::32] = 0
    q[:, 1::32] = 15  # every group spans the full range, so the grid's min/max are the original ones
    s = torch.rand(32, 2).add(0.5).to(torch.bfloat16)
    z = torch.randn(32, 2).to(torch.bfloat16)
    w = int4_dequantize(q, s, z, 32)
    q2, s2, z2 = int4_grid(w, 32)
    assert torch.equal(q2, q) and torch.equal(s2, s) and torch.equal(z2, z)


def test_int8_linear_matches_dequantized_reference() -> None:
    torch.manual_seed(0)
    lin = nn.Linear(64, 24, bias=False)
    m = Int8WeightOnlyLinear.from_linear(lin)
    x = torch.randn(3, 64)
    q, s = int8_grid(lin.weight)
    assert torch.equal(m.dequantize(), int8_dequantize(q, s))
    _check_close(m(x), x, m.dequantize())
    assert m.weight_int8.dtype == torch.int8 and m.weight_int8.shape == (24, 64)


@pytest.mark.parametrize("bits", [4, 8])
def test_quantize_weight_only_on_tiny_llama(bits: int) -> None:
    model = tiny_llama().eval()
    ids = torch.randint(0, 128, (1, 12))
    with torch.no_grad():
        before = model(input_ids=ids).logits
    names = quantize_weight_only(model, bits=bits, group_size=32)
    kind = Int4WeightOnlyLinear if bits == 4 else Int8WeightOnlyLinear
    assert "lm_head" in names and "model.layers.0.mlp.down_proj" in names
    assert all(isinstance(model.get_submodule(n), kind) for n in names)
    assert not any(type(m) is nn.Linear for m in model.modules())
    with torch.no_grad():
        after = model(input_ids=ids).logits
        out = model.generate(input_ids=ids, max_new_tokens=4, do_sample=False)
    assert out.shape == (1, 16)
    # quantization changes the logits a little, not the model: most of the variance survives
    rel = float((after - before).norm() / before.norm())
    assert rel < (0.5 if bits == 4 else 0.1), rel


def test_skip_and_targets() -> None:
    model = tiny_llama()
    names = quantize_weight_only(model, bits=8, targets=["*mlp*"])
    assert names and all(".mlp." in n for n in names)
    assert type(model.lm_head) is nn.Linear


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        (dict(bits=3), r"`bits` must be 4 or 8, got 3"),
        (dict(bits=4, group_size=16), r"`group_size` must be one of \(32, 64, 128, 256\).*got 16"),
        (dict(bits=4, group_size=128), r"`group_size`=128 does not divide in_features=64 of layer "
                                       r"'model.layers.0.self_attn.q_proj'.*Pass group_size=64"),
        (dict(targets=["*nothing*"]), r"Nothing to quantize"),
        (dict(bits="int4"), r"`bits` must be 4, 8 or a torchao AOBaseConfig, got str"),
    ],
)
def test_errors(kwargs: dict, match: str) -> None:
    model = tiny_llama()
    with pytest.raises(ValueError, match=match):
        quantize_weight_only(model, **kwargs)
    assert all(type(m) is nn.Linear for m in model.modules() if isinstance(m, nn.Linear))  # nothing half-done


def test_kernel_shape_errors() -> None:
    with pytest.raises(ValueError, match=r"out_features=20; the packed int4 CPU kernel needs a multiple of 16"):
        quantize_weight_only(nn.Sequential(nn.Linear(64, 20)), bits=4)
    with pytest.raises(ValueError, match=r"in_features=40; the packed int8 CPU kernel needs a multiple of 16"):
        quantize_weight_only(nn.Sequential(nn.Linear(40, 16)), bits=8)


def test_accepts_torchao_config() -> None:
    from torchao.quantization import Int8WeightOnlyConfig

    model = tiny_llama()
    names = quantize_weight_only(model, Int8WeightOnlyConfig(), exclude=["*lm_head*", "*embed*", "*norm*"])
    assert names and "lm_head" not in names
    from torchao.utils import TorchAOBaseTensor

    assert isinstance(model.get_submodule(names[0]).weight, TorchAOBaseTensor)


@pytest.mark.parametrize("bits", [4, 8])
def test_state_dict_round_trip_and_dtype_casts(bits: int) -> None:
    source, target = tiny_llama().eval(), tiny_llama().eval()
    with torch.no_grad():
        for p in target.parameters():
            p.add_(0.1)  # different weights before loading
    quantize_weight_only(source, bits=bits)
    quantize_weight_only(target, bits=bits)
    target.load_state_dict(source.state_dict())
    ids = torch.randint(0, 128, (1, 6))
    with torch.no_grad():
        ref = source(input_ids=ids).logits
        assert torch.equal(target(input_ids=ids).logits, ref)
        # casting the model afterwards (buffers included) must not break the kernels' bf16 scales
        target.double().float()
        assert torch.equal(target(input_ids=ids).logits, ref)


def test_exclude_is_the_pattern_argument_and_skip_its_deprecated_name() -> None:
    from lightning_latency._deprecation import LightningLatencyDeprecationWarning

    model = nn.Sequential(nn.Linear(64, 64), nn.Linear(64, 64))
    assert quantize_weight_only(model, bits=8, exclude=["re:^0$"]) == ["1"]  # the one pattern type: 're:' works
    old = nn.Sequential(nn.Linear(64, 64), nn.Linear(64, 64))
    with pytest.warns(LightningLatencyDeprecationWarning, match="`skip`.*exclude="):
        assert quantize_weight_only(old, bits=8, skip=["0"]) == ["1"]
