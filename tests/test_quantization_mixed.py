"""Mixed precision by sensitivity: measure each linear alone at low precision, plan under a budget, apply."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from helpers import VOCAB, tiny_llama
from torch import nn

from lightning_latency.latency.memory import tensor_nbytes
from lightning_latency.quantization import (
    PrecisionPlan,
    PrecisionReport,
    PrecisionRow,
    plan_precision,
    precision_sensitivity,
    quantize_mixed,
)
from lightning_latency.quantization.weight_only import Int4WeightOnlyLinear, Int8WeightOnlyLinear

MB = 1024**2
OUTLIER = "model.layers.1.mlp.down_proj"


def _loss(model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    return model(**batch).loss


def _never(model: nn.Module, batch: Any) -> torch.Tensor:
    raise AssertionError("validation must fail before any loss is measured")


def _batches(n: int = 2, seq: int = 16) -> list[dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(1)
    ids = [torch.randint(0, VOCAB, (2, seq), generator=g) for _ in range(n)]
    return [{"input_ids": x, "labels": x} for x in ids]


def _outlier_llama() -> nn.Module:
    """A tiny Llama whose layer-1 down_proj has a huge weight on a dead input in every int4 group of 32 inputs.

    The up_proj rows feeding inputs 0, 32, 64, 96 of that down_proj are zero, so those inputs are always 0 and the
    huge weights cost nothing in float; but each sets its group's (max − min), so int4's step (range / 15) is far
    coarser than the other 31 weights of the group: they round to one or two levels, and this linear alone loses
    most of its output at int4 (the other linears keep ~90%). Outlier weights on rarely active channels are the
    pattern the hand-written "keep down_proj" rules were guarding against.
    """
    model = tiny_llama()
    with torch.no_grad():
        model.model.layers[1].mlp.up_proj.weight[::32] = 0
        weight = model.get_submodule(OUTLIER).weight
        weight.mul_(5)
        weight[:, ::32] = 5.0
    return model


def _kl_batches(model: nn.Module, n: int = 2) -> list[dict[str, torch.Tensor]]:
    """Calibration batches carrying the float model's logits ``(batch, seq, vocab)``, for :func:`_kl`."""
    with torch.no_grad():
        return [{"input_ids": b["input_ids"], "reference": model(input_ids=b["input_ids"]).logits.float()}
                for b in _batches(n)]


def _kl(model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """KL(float model || model) per token. A random model's LM loss sits at chance (ln 128), where rounding moves
    it either way by noise; the KL to the float outputs is >= 0 and grows with the error (fp32 log-softmax)."""
    log_q = model(input_ids=batch["input_ids"]).logits.float().log_softmax(-1)
    log_p = batch["reference"].log_softmax(-1)
    return (log_p.exp() * (log_p - log_q)).sum(-1).mean()


def _own_bytes(module: nn.Module) -> int:
    return sum(tensor_nbytes(t) for t in [*module.parameters(recurse=False), *module.buffers(recurse=False)])


@pytest.fixture(scope="module")
def report() -> PrecisionReport:
    model = _outlier_llama()
    return precision_sensitivity(model, _kl, _kl_batches(model), bits=4, group_size=32, fallback=8)


def test_outlier_linear_ranks_first_and_is_the_first_kept(report: PrecisionReport) -> None:
    names = [r.name for r in report.rows]
    assert len(names) == 2 * 7 + 1 and "lm_head" in names  # q k v o gate up down per layer, and the lm_head
    ranked = report.ranked()
    assert ranked[0].name == OUTLIER
    # by a wide margin, not by rounding: the next linear loses less than a fifth as much, per MB too
    assert ranked[0].delta_loss > 5 * ranked[1].delta_loss > 0
    by_price = sorted(report.rows, key=lambda r: -r.loss_per_mb)
    assert by_price[0].name == OUTLIER and by_price[0].loss_per_mb > 5 * by_price[1].loss_per_mb
    assert report.format().splitlines()[2].startswith(OUTLIER)
    # the budget for exactly one more int8 linear: the outlier takes it
    plan = plan_precision(report, budget_mb=report.min_mb + report.row(OUTLIER).extra_bytes / MB)
    assert plan.kept == (OUTLIER,) and plan.bits[OUTLIER] == 8
    assert {b for n, b in plan.bits.items() if n != OUTLIER} == {4}
    # by loss: the outlier goes first too
    plan = plan_precision(report, max_loss_increase=report.row(OUTLIER).delta_loss * 0.5)
    assert plan.kept[0] == OUTLIER


def test_swap_restore_leaves_the_model_bit_identical() -> None:
    model = _outlier_llama().train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    modules = {n: id(m) for n, m in model.named_modules()}
    precision_sensitivity(model, _loss, _batches(1), bits=4)
    assert model.training  # train / eval mode restored
    assert {n: id(m) for n, m in model.named_modules()} == modules  # the same objects, in the same order
    after = model.state_dict()
    assert list(after) == list(before) and all(torch.equal(after[k], before[k]) for k in before)
    assert model.lm_head.weight is model.model.embed_tokens.weight  # still tied

    calls = {"n": 0}

    def fails_on_the_fourth(m: nn.Module, batch: Any) -> torch.Tensor:
        calls["n"] += 1
        if calls["n"] == 4:  # base loss, then linears 1 and 2 fine; linear 3 is swapped in when it fails
            raise RuntimeError("boom")
        return _loss(m, batch)

    with pytest.raises(RuntimeError, match="boom"):
        precision_sensitivity(model, fails_on_the_fourth, _batches(1), bits=4)
    assert {n: id(m) for n, m in model.named_modules()} == modules
    assert not any(isinstance(m, (Int4WeightOnlyLinear, Int8WeightOnlyLinear)) for m in model.modules())
    assert model.training


@pytest.mark.parametrize("fallback", [8, 32])
def test_plan_respects_the_budget_in_real_storage(fallback: int) -> None:
    model = _outlier_llama()
    report = precision_sensitivity(model, _kl, _kl_batches(model), bits=4, fallback=fallback)
    budget = report.min_mb + 0.4 * (report.max_mb - report.min_mb)
    plan = plan_precision(report, budget_mb=budget)
    assert 0 < len(plan.kept) < len(report.rows)
    assert plan.size_mb <= budget
    # greedy to the end: no linear left at int4 (with a loss to save) would still fit
    left = budget * MB - plan.size_mb * MB
    assert not [r for r in report.rows if plan.bits[r.name] == 4 and r.delta_loss > 0 and r.extra_bytes <= left]
    # the predicted loss increase is what the int4 linears measured
    assert plan.loss_increase == pytest.approx(sum(r.delta_loss for r in report.rows if plan.bits[r.name] == 4))

    applied = quantize_mixed(model, plan)
    assert applied == plan.bits
    kinds = {4: Int4WeightOnlyLinear, 8: Int8WeightOnlyLinear, 32: nn.Linear}
    assert all(type(model.get_submodule(n)) is kinds[b] for n, b in applied.items())
    # the plan's size is the real packed storage of the applied model's linears, byte for byte
    assert sum(_own_bytes(model.get_submodule(n)) for n in applied) == round(plan.size_mb * MB)


def test_budget_ends_select_nothing_and_everything(report: PrecisionReport) -> None:
    assert plan_precision(report, budget_mb=report.min_mb).kept == ()
    full = plan_precision(report, budget_mb=report.max_mb)
    assert set(full.kept) == {r.name for r in report.rows if r.delta_loss > 0}


def test_max_loss_increase_stops_as_soon_as_it_is_met(report: PrecisionReport) -> None:
    total = sum(r.delta_loss for r in report.rows)
    target = 0.1 * total
    plan = plan_precision(report, max_loss_increase=target)
    assert plan.loss_increase <= target < plan.loss_increase + report.row(plan.kept[-1]).delta_loss
    assert plan_precision(report, max_loss_increase=total).kept == ()  # already met: everything at int4


def test_ties_are_broken_by_name() -> None:
    rows = [PrecisionRow(n, 1.1, 0.1, 100, 200) for n in ("b", "c", "a")]
    report = PrecisionReport(base_loss=1.0, bits=4, group_size=32, fallback=8, rows=rows)
    assert plan_precision(report, max_loss_increase=0.0).kept == ("a", "b", "c")
    assert plan_precision(report, budget_mb=(300 + 150) / MB).kept == ("a",)  # room for one move of 100 bytes
    assert plan_precision(report, budget_mb=(300 + 200) / MB).kept == ("a", "b")
    assert [r.name for r in report.ranked()] == ["a", "b", "c"]


def test_quantize_mixed_output_generates(report: PrecisionReport) -> None:
    model = _outlier_llama().eval()
    plan = plan_precision(report, budget_mb=(report.min_mb + report.max_mb) / 2)
    quantize_mixed(model, plan)
    ids = torch.randint(0, VOCAB, (1, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        out = model.generate(input_ids=ids, max_new_tokens=4, do_sample=False)
    assert out.shape == (1, 16)
    assert not any(type(m) is nn.Linear for m in model.modules())  # fallback 8: every linear packed


@pytest.mark.parametrize("bits", [4, 8])
def test_plain_module_with_bias_and_float_fallback(bits: int) -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 32))
    x = torch.randn(8, 64)
    y = model(x).detach()
    report = precision_sensitivity(model, lambda m, b: ((m(b) - y) ** 2).mean(), [x], bits=bits, fallback=16)
    assert all(r.delta_loss > 0 for r in report.rows)  # the float model is the reference: any rounding costs
    # float 16: 2 bytes a weight, the fp32 bias as it is
    assert report.row("2").fallback_bytes == 32 * 64 * 2 + 32 * 4
    plan = plan_precision(report, budget_mb=report.max_mb)
    assert quantize_mixed(model, plan) == {"0": 16, "2": 16}
    assert all(type(m) is nn.Linear for m in (model[0], model[2]))  # 16: left float


def test_format_and_plot(report: PrecisionReport, tmp_path: Any) -> None:
    lines = report.format(top=3).splitlines()
    assert len(lines) == 2 + 3 and "int4 g32" in lines[1] and "int8" in lines[1]
    pytest.importorskip("matplotlib")
    path = report.plot(str(tmp_path / "precision.png"))
    with open(path, "rb") as fh:
        assert fh.read(8) == b"\x89PNG\r\n\x1a\n"


@pytest.mark.parametrize(("kwargs", "match"), [
    ({"calibration": []}, "`calibration` is empty"),
    ({"bits": 3}, "`bits` must be 4 or 8, got 3"),
    ({"group_size": 48}, "`group_size` must be one of"),
    ({"fallback": 4}, r"`fallback` must be one of \(8, 16, 32\) and above `bits`=4, got 4"),
    ({"fallback": 12}, "`fallback` must be one of .* got 12"),
    ({"bits": 8, "fallback": 8}, "above `bits`=8, got 8"),
    ({"targets": ["nothing*"]}, "Nothing to quantize: `targets`=\\['nothing\\*'\\]"),
])
def test_sensitivity_errors(kwargs: dict[str, Any], match: str) -> None:
    args = {"calibration": _batches(1), **kwargs}
    with pytest.raises(ValueError, match=match):
        precision_sensitivity(tiny_llama(), _never, **args)


def test_plan_errors(report: PrecisionReport) -> None:
    with pytest.raises(ValueError, match="exactly one of `budget_mb`.*got budget_mb=None, max_loss_increase=None"):
        plan_precision(report)
    with pytest.raises(ValueError, match="exactly one of `budget_mb`"):
        plan_precision(report, budget_mb=1.0, max_loss_increase=0.1)
    with pytest.raises(ValueError, match=r"`budget_mb`=0.001 is below .*reachable: .* \(all int4 g32\) to .* MB"):
        plan_precision(report, budget_mb=0.001)
    with pytest.raises(ValueError, match=r"`budget_mb`=100 is above .* Pass budget_mb <= "):
        plan_precision(report, budget_mb=100)
    with pytest.raises(ValueError, match="`max_loss_increase` must be a finite number >= 0, got -1"):
        plan_precision(report, max_loss_increase=-1)


def test_quantize_mixed_errors(report: PrecisionReport) -> None:
    model = tiny_llama()
    bad = PrecisionPlan({"nope": 4}, 32, 0.0, 0.0, ())
    with pytest.raises(ValueError, match="`plan` names 'nope', which is not an nn.Linear"):
        quantize_mixed(model, bad)
    plan = plan_precision(report, budget_mb=report.min_mb)
    quantize_mixed(model, plan)
    with pytest.raises(ValueError, match="found Int4WeightOnlyLinear"):  # applied twice
        quantize_mixed(model, plan)


def test_exported_at_the_top_level() -> None:
    import lightning_latency

    assert lightning_latency.precision_sensitivity is precision_sensitivity
    assert lightning_latency.quantize_mixed is quantize_mixed


def test_kernel_shape_and_bare_linear_errors() -> None:
    with pytest.raises(ValueError, match="`group_size`=32 does not divide in_features=40 of layer '0'"):
        precision_sensitivity(nn.Sequential(nn.Linear(40, 32)), _never, [torch.randn(2, 40)])
    with pytest.raises(ValueError, match="`model` is itself an nn.Linear.*nn.Sequential"):
        precision_sensitivity(nn.Linear(64, 32), _never, [torch.randn(2, 64)])
