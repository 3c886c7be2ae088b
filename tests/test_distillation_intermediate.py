"""Hidden-state and attention matching (lightning_latency/distillation/intermediate.py)."""

from __future__ import annotations

import math

import pytest
import torch

from lightning_latency.distillation import AttentionLoss, HiddenStateLoss, even_layer_map


def test_even_layer_map_spreads_student_layers_over_the_teacher() -> None:
    assert even_layer_map(3, 6) == [(1, 2), (2, 4), (3, 6)]
    assert even_layer_map(2, 30, include_embeddings=True) == [(0, 0), (1, 15), (2, 30)]


def test_hidden_state_mse_and_cosine_against_hand_values_with_padding_mask() -> None:
    s = [torch.tensor([[[1.0, 0.0], [5.0, 5.0]]])]  # (batch 1, seq 2, dim 2); position 1 is padding
    t = [torch.tensor([[[0.0, 1.0], [9.0, 9.0]]])]
    mask = torch.tensor([[1, 0]])
    mse = HiddenStateLoss(2, 2, [(0, 0)], kind="mse")(s, t, mask)
    assert mse.item() == pytest.approx(1.0)  # ((1-0)^2 + (0-1)^2) / 2
    cos = HiddenStateLoss(2, 2, [(0, 0)], kind="cosine")(s, t, mask)
    assert cos.item() == pytest.approx(1.0)  # orthogonal: 1 - 0
    assert HiddenStateLoss(2, 2, [(0, 0)])(s, s).item() == 0.0


def test_projection_is_learned_when_widths_differ() -> None:
    loss = HiddenStateLoss(student_dim=4, teacher_dim=6, layer_map=[(1, 2)])
    s = [torch.randn(2, 3, 4, requires_grad=True) for _ in range(2)]
    t = [torch.randn(2, 3, 6) for _ in range(3)]
    loss(s, t).backward()
    assert loss.projections[0].weight.grad is not None and s[1].grad is not None and s[0].grad is None


def test_attention_kl_is_zero_for_equal_maps_and_matches_a_hand_value() -> None:
    a = torch.tensor([0.5, 0.5]).expand(1, 2, 2, 2).contiguous()  # (batch, heads, q, k)
    b = torch.tensor([0.75, 0.25]).expand(1, 2, 2, 2).contiguous()
    loss = AttentionLoss([(0, 0)])
    assert loss([a], [a]).item() == pytest.approx(0.0, abs=1e-7)
    assert loss([a], [b]).item() == pytest.approx(0.75 * math.log(1.5) + 0.25 * math.log(0.5))
    # different head counts: head-averaged maps are compared
    assert loss([a[:, :1]], [b]).item() == pytest.approx(0.75 * math.log(1.5) + 0.25 * math.log(0.5))


def test_attention_transfer_on_real_hf_attentions() -> None:
    from helpers import tiny_bert

    teacher = tiny_bert(layers=2).eval()
    teacher.config._attn_implementation = "eager"
    ids = torch.randint(0, 128, (2, 7))
    out = teacher(input_ids=ids, output_attentions=True)
    assert AttentionLoss([(0, 0), (1, 1)])(out.attentions, out.attentions).item() == pytest.approx(0.0, abs=1e-6)
    assert AttentionLoss([(0, 1)])(out.attentions, out.attentions).item() > 0


@pytest.mark.parametrize(
    ("build", "match"),
    [
        (lambda: HiddenStateLoss(4, 4, [(0, 5)])([torch.zeros(1, 2, 4)] * 3, [torch.zeros(1, 2, 4)] * 3),
         r"`layer_map` pair \(0, 5\) is out of range: the student returns 3 hidden states and the teacher 3"),
        (lambda: HiddenStateLoss(4, 4, []), "`layer_map` must name at least one"),
        (lambda: HiddenStateLoss(4, 4, [(0, 0)], kind="l1"), "`kind` must be 'mse' or 'cosine', got 'l1'"),
        (lambda: AttentionLoss([(0, 0)])([None], [None]), "output_attentions=True"),
        (lambda: even_layer_map(0, 6), "`num_student` must be a positive int"),
    ],
)
def test_bad_layer_maps_are_clear_errors(build, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        build()
