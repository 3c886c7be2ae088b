"""Logit distillation losses against hand-computed references (lightning_latency/distillation/losses.py)."""

from __future__ import annotations

import math

import pytest
import torch
from torch.profiler import ProfilerActivity, profile

from lightning_latency.distillation.losses import (DistillationLoss, ForwardKLLoss, JSDLoss, LogitMSELoss,
                                                  ReverseKLLoss, task_cross_entropy, topk_forward_kl)

# student logits [0, 0] -> p_s = [1/2, 1/2]; teacher logits [ln 3, 0] -> p_t = [3/4, 1/4]
S = torch.tensor([[0.0, 0.0]])
T_ = torch.tensor([[math.log(3.0), 0.0]])


def _kl(p: list[float], q: list[float]) -> float:
    return sum(a * math.log(a / b) for a, b in zip(p, q))


def test_forward_kl_matches_hand_computed_value_and_is_zero_for_equal_logits() -> None:
    got = DistillationLoss("forward_kl")(S, T_)
    torch.testing.assert_close(got, torch.tensor(_kl([0.75, 0.25], [0.5, 0.5])), rtol=1e-6, atol=1e-7)
    # a true KL, not the cross-entropy against the teacher (which would be the teacher entropy here)
    assert DistillationLoss()(T_, T_).item() == pytest.approx(0.0, abs=1e-7)


def test_temperature_and_t2_scaling() -> None:
    temp = 2.0
    pt = [math.sqrt(3) / (math.sqrt(3) + 1), 1 / (math.sqrt(3) + 1)]  # softmax([ln3/2, 0])
    ref = _kl(pt, [0.5, 0.5])
    unscaled = ForwardKLLoss(temperature=temp, scale_by_t2=False)(S, T_)
    scaled = ForwardKLLoss(temperature=temp)(S, T_)  # default: scale_by_t2=True
    torch.testing.assert_close(unscaled, torch.tensor(ref), rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(scaled, torch.tensor(ref * temp**2), rtol=1e-6, atol=1e-7)
    # gradient of T^2 * KL wrt student logits is T * (p_s - p_t): same order as the hard-label gradient
    s = S.clone().requires_grad_()
    ForwardKLLoss(temperature=temp)(s, T_).backward()
    expected = temp * (torch.tensor([[0.5, 0.5]]) - torch.tensor([pt]))
    torch.testing.assert_close(s.grad, expected, rtol=1e-5, atol=1e-7)


def test_reverse_kl_jsd_and_mse_references() -> None:
    pt, ps = [0.75, 0.25], [0.5, 0.5]
    torch.testing.assert_close(ReverseKLLoss()(S, T_), torch.tensor(_kl(ps, pt)), rtol=1e-6, atol=1e-7)
    m = [0.5 * a + 0.5 * b for a, b in zip(pt, ps)]
    jsd = 0.5 * _kl(pt, m) + 0.5 * _kl(ps, m)
    torch.testing.assert_close(JSDLoss(beta=0.5)(S, T_), torch.tensor(jsd), rtol=1e-6, atol=1e-7)
    m3 = [0.3 * a + 0.7 * b for a, b in zip(pt, ps)]
    torch.testing.assert_close(JSDLoss(beta=0.3)(S, T_), torch.tensor(0.3 * _kl(pt, m3) + 0.7 * _kl(ps, m3)))
    # the documented ends of the family
    torch.testing.assert_close(JSDLoss(beta=0.0)(S, T_), torch.tensor(_kl(pt, ps)))
    torch.testing.assert_close(JSDLoss(beta=1.0)(S, T_), torch.tensor(_kl(ps, pt)))
    torch.testing.assert_close(DistillationLoss("mse")(S, T_), torch.tensor(math.log(3.0) ** 2 / 2))


def test_token_masking_causal_shift_and_kept_token_normalisation() -> None:
    torch.manual_seed(0)
    s, t = torch.randn(2, 4, 7), torch.randn(2, 4, 7)
    labels = torch.tensor([[5, -100, 3, 2], [1, 4, -100, -100]])
    # shift: logits[:, i] are scored against labels[:, i + 1]; kept: (0,1) (0,2) (1,0)
    kept = [(0, 1), (0, 2), (1, 0)]
    per = [DistillationLoss()(s[b, i][None], t[b, i][None]) for b, i in kept]
    ref = torch.stack(per).mean()
    torch.testing.assert_close(DistillationLoss(shift_labels=True)(s, t, labels), ref)
    # an attention mask combines with the labels
    mask = torch.ones(2, 4, dtype=torch.long)
    mask[0, 3] = 0  # drops (0, 2) after the shift
    ref2 = torch.stack([per[0], per[2]]).mean()
    torch.testing.assert_close(DistillationLoss(shift_labels=True)(s, t, labels, mask=mask), ref2)


@pytest.mark.parametrize("chunk_size", [None, 2])
def test_all_masked_gives_zero_loss_and_zero_grad(chunk_size: int | None) -> None:
    s = torch.randn(2, 3, 5, requires_grad=True)
    labels = torch.full((2, 3), -100)
    loss = DistillationLoss(shift_labels=True, chunk_size=chunk_size)(s, torch.randn(2, 3, 5), labels)
    loss.backward()
    assert loss.item() == 0.0 and torch.isfinite(s.grad).all() and s.grad.abs().sum() == 0
    ce = task_cross_entropy(s, labels, shift_labels=True)
    assert ce.item() == 0.0


def test_num_items_in_batch_makes_accumulated_micro_batches_equal_the_full_batch() -> None:
    torch.manual_seed(1)
    s, t = torch.randn(4, 6, 9), torch.randn(4, 6, 9)
    labels = torch.randint(0, 9, (4, 6))
    labels[0, 1:] = -100  # micro-batch 1 keeps far fewer tokens than micro-batch 2
    loss_fn = DistillationLoss(shift_labels=True)
    full = loss_fn(s, t, labels)
    n = int((labels[:, 1:] != -100).sum())
    parts = [loss_fn(s[i:i + 2], t[i:i + 2], labels[i:i + 2], num_items_in_batch=n) for i in (0, 2)]
    torch.testing.assert_close(sum(parts), full)
    naive = sum(loss_fn(s[i:i + 2], t[i:i + 2], labels[i:i + 2]) for i in (0, 2)) / 2
    assert not torch.allclose(naive, full)  # the per-micro-batch mean is biased: the option matters


@pytest.mark.parametrize("kind", ["forward_kl", "reverse_kl", "jsd", "mse"])
def test_chunked_equals_unchunked_values_and_gradients(kind: str) -> None:
    torch.manual_seed(2)
    s = torch.randn(3, 11, 50, requires_grad=True)
    t = torch.randn(3, 11, 50)
    labels = torch.randint(0, 50, (3, 11))
    labels[1, 4:] = -100
    ref_fn = DistillationLoss(kind, temperature=1.7, shift_labels=True)
    chunk_fn = DistillationLoss(kind, temperature=1.7, shift_labels=True, chunk_size=4)
    ref = ref_fn(s, t, labels)
    (g_ref,) = torch.autograd.grad(ref, s)
    got = chunk_fn(s, t, labels)
    (g_got,) = torch.autograd.grad(got * 3.0, s)  # a non-unit upstream gradient flows through
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(g_got, 3.0 * g_ref, rtol=1e-5, atol=1e-7)


def test_bf16_logits_are_reduced_in_fp32() -> None:
    s, t = torch.randn(4, 30).bfloat16(), torch.randn(4, 30).bfloat16()
    got = DistillationLoss()(s, t)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, DistillationLoss()(s.float(), t.float()))


def _peak_bytes(fn) -> int:
    """Peak of live CPU bytes allocated inside ``fn``: every allocation (+) and free (-) the profiler saw, in order."""
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events = [e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"]
    cur = peak = 0
    for ev in sorted(events, key=lambda e: e.start_ns()):
        cur += ev.nbytes()
        peak = max(peak, cur)
    return peak


def test_chunked_loss_peak_memory_is_a_fraction_of_the_naive_loss() -> None:
    torch.manual_seed(3)
    tokens, vocab = 256, 8192  # one (tokens, vocab) fp32 tensor = 8 MiB
    s = torch.randn(tokens, vocab, requires_grad=True)
    t = torch.randn(tokens, vocab)
    one = tokens * vocab * 4

    def run(chunk: int | None) -> None:
        DistillationLoss(temperature=2.0, chunk_size=chunk)(s, t).backward()

    naive = _peak_bytes(lambda: run(None))
    s.grad = None  # freed outside the profiled window
    chunked = _peak_bytes(lambda: run(16))
    assert naive >= 4 * one  # several full fp32 softmax-sized tensors live at once (7x measured)
    # the gradient buffer (one logits-sized tensor) plus one chunk's intermediates (1.5x measured)
    assert chunked < 2 * one and chunked < naive / 3, (naive / one, chunked / one)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"temperature": 0.0}, "`temperature` must be a finite number > 0, got 0.0"),
        ({"temperature": -1.0}, "`temperature`"),
        ({"kind": "kl"}, "`kind` must be one of"),
        ({"beta": 1.5}, "`beta` must be in \\[0, 1\\], got 1.5"),
        ({"chunk_size": 0}, "`chunk_size` must be a positive int"),
        ({"reduction": "none"}, "`reduction` must be 'mean' or 'sum'"),
    ],
)
def test_bad_arguments_raise_naming_the_argument(kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        DistillationLoss(**kwargs)


def test_vocabulary_mismatch_is_a_clear_error() -> None:
    with pytest.raises(ValueError, match=r"last \(vocabulary\) dimension.*student \(2, 3, 10\) and teacher \(2, 3, 12\)"):
        DistillationLoss()(torch.randn(2, 3, 10), torch.randn(2, 3, 12))


# ---------------------------------------------------------------------------------------------- one API: presets
PRESETS = [(ForwardKLLoss, "forward_kl"), (ReverseKLLoss, "reverse_kl"), (JSDLoss, "jsd"), (LogitMSELoss, "mse")]


@pytest.mark.parametrize(("preset", "kind"), PRESETS)
def test_presets_are_distillation_losses_with_a_fixed_kind(preset: type, kind: str) -> None:
    torch.manual_seed(4)
    s, t = torch.randn(3, 5, 11), torch.randn(3, 5, 11)
    loss = preset(2.0, shift_labels=True, chunk_size=4)  # temperature stays the first positional argument
    assert isinstance(loss, DistillationLoss) and loss.kind == kind and loss.temperature == 2.0
    assert f"kind='{kind}'" in repr(loss)
    ref = DistillationLoss(kind, temperature=2.0, shift_labels=True)
    torch.testing.assert_close(loss(s, t), ref(s, t), rtol=1e-5, atol=1e-6)  # chunked vs unchunked: fp32 sums
    with pytest.raises(TypeError, match="kind"):
        preset(kind="mse")


# ---------------------------------------------------------------------------------------------- top-k (offline)
def _topk(t: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    return t.topk(k, dim=-1)


@pytest.mark.parametrize("chunk_size", [None, 3])
@pytest.mark.parametrize("kind", ["forward_kl", "reverse_kl", "jsd", "mse"])
def test_topk_loss_with_k_equal_to_the_vocabulary_is_the_full_logit_loss(kind: str, chunk_size: int | None) -> None:
    torch.manual_seed(5)
    s = torch.randn(2, 6, 13, requires_grad=True)
    t = torch.randn(2, 6, 13)
    labels = torch.randint(0, 13, (2, 6))
    labels[0, 3:] = -100
    loss_fn = DistillationLoss(kind, temperature=1.5, shift_labels=True, chunk_size=chunk_size, beta=0.3)
    ref = loss_fn(s, t, labels)
    (g_ref,) = torch.autograd.grad(ref, s)
    values, indices = _topk(t, 13)  # every id, in another order than the vocabulary's
    got = loss_fn.topk_loss(s, values, indices, labels)
    (g_got,) = torch.autograd.grad(got, s)
    # Same fp32 math on permuted ids: only summation order differs (a few ulp of values ~1); JSD adds the student's
    # mass outside the support, 1 - sum(p_s) ~ 1e-7 here, times -log(0.7).
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(g_got, g_ref, rtol=1e-5, atol=1e-6)


def _dense_teacher(values: torch.Tensor, indices: torch.Tensor, vocab: int) -> torch.Tensor:
    """The teacher distribution a top-k cache stands for: softmax over the k stored logits, zero elsewhere (fp64)."""
    p = torch.zeros(*values.shape[:-1], vocab, dtype=torch.float64)
    return p.scatter(-1, indices, values.double().softmax(-1))


def _xlogy_kl(p: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    return (torch.special.xlogy(p, p) - torch.special.xlogy(p, q)).sum(-1)


def test_topk_forward_kl_and_jsd_below_the_vocabulary_match_a_dense_reference() -> None:
    torch.manual_seed(6)
    s, t = torch.randn(5, 9), torch.randn(5, 9)
    values, indices = _topk(t, 3)
    pt, ps = _dense_teacher(values, indices, 9), s.double().softmax(-1)
    fwd = DistillationLoss("forward_kl", reduction="sum").flat_topk_loss(s, values, indices, torch.ones(5, dtype=torch.bool))
    torch.testing.assert_close(fwd, _xlogy_kl(pt, ps).sum().float(), rtol=1e-5, atol=1e-6)
    summed, kept = topk_forward_kl(s, values, indices)  # the function form gives the same sum
    torch.testing.assert_close(summed, fwd)
    assert int(kept) == 5
    beta = 0.3
    m = beta * pt + (1 - beta) * ps
    ref = (beta * _xlogy_kl(pt, m) + (1 - beta) * _xlogy_kl(ps, m)).mean().float()
    got = DistillationLoss("jsd", beta=beta).topk_loss(s, values, indices)
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-6)  # fp32 vs fp64 reference of values ~0.1


@pytest.mark.parametrize("loss", [DistillationLoss("reverse_kl"), ReverseKLLoss(), JSDLoss(beta=1.0)])
def test_topk_reverse_kl_below_the_vocabulary_is_a_clear_error(loss: DistillationLoss) -> None:
    values, indices = _topk(torch.randn(4, 10), 3)
    with pytest.raises(ValueError, match=r"`kind`=.*reverse.*top-3 logits \(vocabulary 10\).*k=10"):
        loss.topk_loss(torch.randn(4, 10), values, indices)


def test_topk_reduction_and_ids_outside_the_student_vocabulary() -> None:
    torch.manual_seed(7)
    s, t = torch.randn(6, 8), torch.randn(6, 8)
    values, indices = _topk(t, 4)
    mean = DistillationLoss(temperature=2.0).topk_loss(s, values, indices)
    total = DistillationLoss(temperature=2.0, reduction="sum").topk_loss(s, values, indices)
    torch.testing.assert_close(total, 6 * mean)  # reduction is honoured offline too
    with pytest.raises(ValueError, match=r"ids up to 7\) does not fit the student's vocabulary of 5"):
        DistillationLoss().topk_loss(torch.randn(6, 5), values, indices)
