"""Logit distillation losses against hand-computed references (lightning_latency/distillation/losses.py)."""

from __future__ import annotations

import math

import pytest
import torch
from torch.profiler import ProfilerActivity, profile

from lightning_latency.distillation import DistillationLoss, ForwardKLLoss, JSDLoss, ReverseKLLoss, task_cross_entropy

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
