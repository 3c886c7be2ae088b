"""Per-position divergences between a student and a teacher, in fp32: the math under :class:`~.DistillationLoss`.

* :func:`per_token_loss` — against full teacher logits ``(tokens, vocab)``.
* :func:`per_token_topk_loss` — against a teacher known by its top-k logits (offline distillation); every kind
  equals :func:`per_token_loss` when ``k == vocab`` (see :mod:`~.losses` for each kind on a partial support).
* ``_ChunkedSum`` — the masked sum of either, chunk by chunk, for large vocabularies.

No reduction, no temperature factor, no masking policy here: :class:`~.losses.DistillationLoss` adds those.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from enum import Enum

import torch
import torch.nn.functional as F
from torch import Tensor


class LossKind(str, Enum):
    """The divergences :class:`~.losses.DistillationLoss` offers (its ``kind`` argument takes these strings)."""

    FORWARD_KL = "forward_kl"
    REVERSE_KL = "reverse_kl"
    JSD = "jsd"
    MSE = "mse"


_KINDS = tuple(k.value for k in LossKind)


def _log_mixture(log_pt: Tensor, log_ps: Tensor, beta: float) -> Tensor:
    """``log(beta * p_t + (1 - beta) * p_s)`` in log space, for stability."""
    return torch.logsumexp(torch.stack([log_pt + math.log(beta), log_ps + math.log(1.0 - beta)]), dim=0)


def _kl(log_p: Tensor, log_q: Tensor) -> Tensor:
    return (log_p.exp() * (log_p - log_q)).sum(-1)


def _effective_kind(kind: str, beta: float) -> str:
    """JSD's two ends are *defined* as the plain divergences (GKD / TRL)."""
    if kind == LossKind.JSD and beta == 0.0:
        return LossKind.FORWARD_KL.value
    if kind == LossKind.JSD and beta == 1.0:
        return LossKind.REVERSE_KL.value
    return str(kind.value if isinstance(kind, LossKind) else kind)


def per_token_loss(
    student_logits: Tensor, teacher_logits: Tensor, kind: str = "forward_kl", temperature: float = 1.0, beta: float = 0.5
) -> Tensor:
    """Unreduced divergence per position: ``(..., vocab) x 2 -> (...)`` in fp32 (no temperature scaling factor)."""
    s = student_logits.float() / temperature
    t = teacher_logits.float() / temperature
    kind = _effective_kind(kind, beta)
    if kind == LossKind.MSE:
        return (s - t).pow(2).mean(-1)
    log_ps = F.log_softmax(s, dim=-1)
    log_pt = F.log_softmax(t, dim=-1)
    if kind == LossKind.FORWARD_KL:
        return _kl(log_pt, log_ps)
    if kind == LossKind.REVERSE_KL:
        return _kl(log_ps, log_pt)
    if kind == LossKind.JSD:
        log_m = _log_mixture(log_pt, log_ps, beta)
        return beta * _kl(log_pt, log_m) + (1.0 - beta) * _kl(log_ps, log_m)
    raise ValueError(f"`kind` must be one of {_KINDS}, got {kind!r}.")


def _check_topk_kind(kind: str, beta: float, k: int, vocab: int) -> str:
    """The effective kind, if it can be computed from ``k`` of ``vocab`` teacher logits; else a ``ValueError``."""
    kind = _effective_kind(kind, beta)
    if kind == LossKind.REVERSE_KL and k < vocab:
        what = "'reverse_kl'" if beta != 1.0 else "'jsd' with beta=1 (reverse KL)"
        raise ValueError(
            f"`kind`={what} cannot be computed from the teacher's top-{k} logits (vocabulary {vocab}): the "
            f"teacher's probability outside its k stored ids is unknown (zero), so KL(student || teacher) is "
            f"infinite. Use kind='forward_kl' or kind='jsd' with beta < 1 offline, cache the teacher with "
            f"k={vocab} (the whole vocabulary), or pass a live teacher."
        )
    return kind


def per_token_topk_loss(
    student_logits: Tensor, topk_values: Tensor, topk_indices: Tensor, kind: str = "forward_kl",
    temperature: float = 1.0, beta: float = 0.5,
) -> Tensor:
    """Unreduced divergence per position against a teacher stored as its top-k logits, in fp32.

    The teacher distribution is the softmax over its ``k`` stored logits, zero elsewhere (see the module
    docstring for each kind on that support). Equal to :func:`per_token_loss` when ``k == vocab``.

    Args:
        student_logits: ``(tokens, vocab)``.
        topk_values: ``(tokens, k)`` teacher logits.
        topk_indices: ``(tokens, k)`` vocabulary ids (int).

    Returns:
        ``(tokens,)``.

    Raises:
        ValueError: ``kind="reverse_kl"`` (or ``jsd`` with ``beta=1``) with ``k < vocab``.
    """
    kind = _check_topk_kind(kind, beta, topk_values.shape[-1], student_logits.shape[-1])
    idx = topk_indices.long()
    s = student_logits.float() / temperature
    t = topk_values.float() / temperature
    if kind == LossKind.MSE:
        return (s.gather(-1, idx) - t).pow(2).mean(-1)
    log_ps = F.log_softmax(s, dim=-1).gather(-1, idx)
    log_pt = F.log_softmax(t, dim=-1)
    if kind == LossKind.FORWARD_KL:
        return _kl(log_pt, log_ps)
    if kind == LossKind.REVERSE_KL:  # k == vocab: the support is everything
        return _kl(log_ps, log_pt)
    if kind == LossKind.JSD:
        log_m = _log_mixture(log_pt, log_ps, beta)
        # outside the support the mixture is (1 - beta) * p_s: each unit of student mass there adds -log(1 - beta)
        outside = (1.0 - log_ps.exp().sum(-1)).clamp_min(0.0)
        kl_s = _kl(log_ps, log_m) - outside * math.log(1.0 - beta)
        return beta * _kl(log_pt, log_m) + (1.0 - beta) * kl_s
    raise ValueError(f"`kind` must be one of {_KINDS}, got {kind!r}.")


class _ChunkedSum(torch.autograd.Function):
    """Sum of masked per-token losses, computed chunk by chunk; gradient written per chunk in forward.

    ``per_token(student_chunk, *teacher_chunks) -> (chunk,)``; ``teacher`` are the tensors sliced alongside the
    student (full teacher logits, or top-k values and indices).
    """

    @staticmethod
    def forward(ctx, student: Tensor, keep: Tensor, per_token: Callable[..., Tensor],  # type: ignore[override]
                chunk_size: int, *teacher: Tensor) -> Tensor:
        need_grad = ctx.needs_input_grad[0]
        grad = torch.zeros_like(student) if need_grad else None
        total = torch.zeros((), dtype=torch.float32, device=student.device)
        for start in range(0, student.shape[0], chunk_size):
            sl = slice(start, start + chunk_size)
            k = keep[sl]
            if not bool(k.any()):
                continue
            with torch.enable_grad():
                s = student[sl].detach().requires_grad_(need_grad)
                loss = (per_token(s, *(x[sl] for x in teacher)) * k).sum()
                if need_grad:
                    (g,) = torch.autograd.grad(loss, s)
                    grad[sl] = g  # type: ignore[index]
            total += loss.detach()
        # Kept on ctx (not save_for_backward) so backward can scale it in place: a second logits-sized tensor
        # would double the peak this function exists to cut. The price: no second backward (retain_graph).
        ctx.grad = grad
        ctx.n_teacher = len(teacher)
        return total

    @staticmethod
    def backward(ctx, grad_out: Tensor):  # type: ignore[override]
        grad, ctx.grad = ctx.grad, None
        if grad is None:
            raise RuntimeError("the chunked distillation loss supports one backward pass per forward "
                               "(retain_graph=True / double backward is not supported); use chunk_size=None.")
        return (grad.mul_(grad_out.to(grad.dtype)), None, None, None, *([None] * ctx.n_teacher))


def topk_forward_kl(
    student_logits: Tensor,
    topk_values: Tensor,
    topk_indices: Tensor,
    temperature: float = 1.0,
    keep: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """Summed forward KL against a teacher stored as its top-k logits (offline distillation).

    ``DistillationLoss().flat_topk_loss`` is the configurable form (any ``kind``, ``reduction``, ``chunk_size``);
    this returns the raw sum and count for your own normaliser.

    Args:
        student_logits: ``(tokens, vocab)``.
        topk_values: ``(tokens, k)`` teacher logits.
        topk_indices: ``(tokens, k)`` vocabulary ids (int).
        keep: ``(tokens,)`` bool mask.

    Returns:
        ``(summed loss, kept count)``.
    """
    per = per_token_topk_loss(student_logits, topk_values, topk_indices, LossKind.FORWARD_KL.value, temperature)
    keep = torch.ones_like(per, dtype=torch.bool) if keep is None else keep
    return (per * keep).sum(), keep.sum()


__all__ = ["LossKind", "per_token_loss", "per_token_topk_loss", "topk_forward_kl"]
