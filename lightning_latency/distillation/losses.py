"""Logit distillation losses: plain ``nn.Module``s, usable without Lightning.

Every loss works on logits of shape ``(..., vocab)`` (``(batch, classes)`` for classification,
``(batch, seq, vocab)`` for language models), computes softmax / log-softmax in fp32 whatever the input dtype,
and reduces over *kept* positions only:

* ``labels`` (same leading shape as the logits) with ``ignore_index`` entries, or an explicit boolean ``mask``,
  select the positions that count; ``shift_labels=True`` applies the causal shift (logits at ``t`` are scored
  against the label at ``t + 1``) so the same ``labels`` a Hugging Face causal LM takes can be passed unchanged.
* ``reduction="mean"`` divides the summed per-token loss by the number of kept tokens in *this* call;
  ``num_items_in_batch`` replaces that count by one you computed over all micro-batches of an accumulated
  optimizer step, so ``sum over micro-batches == the loss of the whole batch`` (the Hugging Face convention).
* A call where every position is masked returns ``0.0`` (with a gradient of zeros), never NaN.

The Kullback–Leibler values are true divergences (``sum p_t (log p_t - log p_s)``): zero when the
distributions match, not the cross-entropy against the teacher (which differs by the teacher's entropy).

``chunk_size`` computes the loss over token chunks inside a custom autograd function that writes the gradient
per chunk, so the ``(tokens, vocab)`` fp32 softmax intermediates exist for one chunk at a time; the peak is the
gradient buffer (one tensor the size of the student logits) plus one chunk.
"""

from __future__ import annotations

import math
from enum import Enum
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class LossKind(str, Enum):
    FORWARD_KL = "forward_kl"
    REVERSE_KL = "reverse_kl"
    JSD = "jsd"
    MSE = "mse"


_KINDS = tuple(k.value for k in LossKind)


def _check_positive(name: str, value: float, example: str) -> None:
    if not (isinstance(value, (int, float)) and math.isfinite(value) and value > 0):
        raise ValueError(f"`{name}` must be a finite number > 0, got {value!r}. {example}")


def _check_vocab(student_logits: Tensor, teacher_logits: Tensor) -> None:
    if student_logits.shape[-1] != teacher_logits.shape[-1]:
        raise ValueError(
            f"student and teacher logits must share the last (vocabulary) dimension for a logit loss, got "
            f"student {tuple(student_logits.shape)} and teacher {tuple(teacher_logits.shape)}. Use the teacher's "
            f"tokenizer/vocabulary for the student (or a student initialised from the teacher), or match hidden "
            f"states instead (HiddenStateLoss)."
        )
    if student_logits.shape[:-1] != teacher_logits.shape[:-1]:
        raise ValueError(
            f"student and teacher logits must have the same leading (batch, seq) shape, got "
            f"{tuple(student_logits.shape)} and {tuple(teacher_logits.shape)}. Feed both models the same inputs."
        )


def token_mask(
    logits: Tensor,
    labels: Tensor | None = None,
    mask: Tensor | None = None,
    ignore_index: int = -100,
    shift_labels: bool = False,
) -> tuple[Tensor, Tensor]:
    """Flatten logits to ``(tokens, vocab)`` and return them with a boolean keep-mask of shape ``(tokens,)``.

    Args:
        logits: ``(..., vocab)``; with ``shift_labels`` ``(batch, seq, vocab)``.
        labels: ``(...)`` class / token ids; positions equal to ``ignore_index`` are dropped.
        mask: ``(...)`` bool or 0/1; ``False``/0 positions are dropped (e.g. an attention mask for padding).
        shift_labels: causal LM shift: keep ``logits[:, :-1]`` and score them against ``labels[:, 1:]`` / ``mask[:, 1:]``.
    """
    if shift_labels:
        if logits.dim() != 3:
            raise ValueError(
                f"`shift_labels=True` needs logits of shape (batch, seq, vocab), got {tuple(logits.shape)}. "
                f"Pass shift_labels=False for classification logits."
            )
        logits = logits[:, :-1]
        labels = labels[:, 1:] if labels is not None else None
        mask = mask[:, 1:] if mask is not None else None
    keep = torch.ones(logits.shape[:-1], dtype=torch.bool, device=logits.device)
    if labels is not None:
        keep = keep & (labels != ignore_index)
    if mask is not None:
        keep = keep & mask.bool()
    return logits.reshape(-1, logits.shape[-1]), keep.reshape(-1)


def per_token_loss(
    student_logits: Tensor, teacher_logits: Tensor, kind: str = "forward_kl", temperature: float = 1.0, beta: float = 0.5
) -> Tensor:
    """Unreduced divergence per position: ``(..., vocab) x 2 -> (...)`` in fp32 (no temperature scaling factor)."""
    s = student_logits.float() / temperature
    t = teacher_logits.float() / temperature
    if kind == LossKind.MSE:
        return (s - t).pow(2).mean(-1)
    log_ps = F.log_softmax(s, dim=-1)
    log_pt = F.log_softmax(t, dim=-1)
    if kind == LossKind.FORWARD_KL or (kind == LossKind.JSD and beta == 0.0):
        return (log_pt.exp() * (log_pt - log_ps)).sum(-1)
    if kind == LossKind.REVERSE_KL or (kind == LossKind.JSD and beta == 1.0):
        return (log_ps.exp() * (log_ps - log_pt)).sum(-1)
    if kind == LossKind.JSD:
        # mixture m = beta * p_t + (1 - beta) * p_s, in log space for stability
        log_m = torch.logsumexp(torch.stack([log_pt + math.log(beta), log_ps + math.log(1.0 - beta)]), dim=0)
        kl_t = (log_pt.exp() * (log_pt - log_m)).sum(-1)
        kl_s = (log_ps.exp() * (log_ps - log_m)).sum(-1)
        return beta * kl_t + (1.0 - beta) * kl_s
    raise ValueError(f"`kind` must be one of {_KINDS}, got {kind!r}.")


class _ChunkedSum(torch.autograd.Function):
    """Sum of masked per-token losses, computed chunk by chunk; gradient written per chunk in forward."""

    @staticmethod
    def forward(ctx, student: Tensor, teacher: Tensor, keep: Tensor, kind: str, temperature: float,  # type: ignore[override]
                beta: float, chunk_size: int) -> Tensor:
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
                loss = (per_token_loss(s, teacher[sl], kind, temperature, beta) * k).sum()
                if need_grad:
                    (g,) = torch.autograd.grad(loss, s)
                    grad[sl] = g  # type: ignore[index]
            total += loss.detach()
        # Kept on ctx (not save_for_backward) so backward can scale it in place: a second logits-sized tensor
        # would double the peak this function exists to cut. The price: no second backward (retain_graph).
        ctx.grad = grad
        return total

    @staticmethod
    def backward(ctx, grad_out: Tensor):  # type: ignore[override]
        grad, ctx.grad = ctx.grad, None
        if grad is None:
            raise RuntimeError("the chunked distillation loss supports one backward pass per forward "
                               "(retain_graph=True / double backward is not supported); use chunk_size=None.")
        return grad.mul_(grad_out.to(grad.dtype)), None, None, None, None, None, None


def reduce_loss(
    summed: Tensor, kept: Tensor, reduction: str, num_items_in_batch: int | Tensor | None
) -> Tensor:
    """``sum`` -> as is; ``mean`` -> divide by ``num_items_in_batch`` or the kept count (``0/0`` -> ``0``)."""
    if reduction == "sum":
        return summed
    denom = num_items_in_batch if num_items_in_batch is not None else kept
    denom = torch.as_tensor(denom, dtype=summed.dtype, device=summed.device)
    return summed / denom.clamp_min(1.0)


class _LogitLoss(nn.Module):
    kind: str = LossKind.FORWARD_KL.value

    def __init__(
        self,
        temperature: float = 1.0,
        scale_by_t2: bool = True,
        ignore_index: int = -100,
        shift_labels: bool = False,
        reduction: Literal["mean", "sum"] = "mean",
        chunk_size: int | None = None,
        beta: float = 0.5,
    ) -> None:
        super().__init__()
        _check_positive("temperature", temperature, "Use temperature=1.0 for the plain softmax, 2.0 for softer targets.")
        if reduction not in ("mean", "sum"):
            raise ValueError(f"`reduction` must be 'mean' or 'sum', got {reduction!r}. Use 'sum' with your own normaliser.")
        if chunk_size is not None and (not isinstance(chunk_size, int) or chunk_size <= 0):
            raise ValueError(f"`chunk_size` must be a positive int or None, got {chunk_size!r}. Try chunk_size=1024 tokens.")
        if not (isinstance(beta, (int, float)) and 0.0 <= beta <= 1.0):
            raise ValueError(f"`beta` must be in [0, 1], got {beta!r}. beta=0 is forward KL, beta=1 reverse KL, 0.5 symmetric JSD.")
        self.temperature = float(temperature)
        self.scale_by_t2 = scale_by_t2
        self.ignore_index = ignore_index
        self.shift_labels = shift_labels
        self.reduction = reduction
        self.chunk_size = chunk_size
        self.beta = float(beta)

    @property
    def scale(self) -> float:
        return self.temperature**2 if self.scale_by_t2 and self.kind != LossKind.MSE else 1.0

    def forward(
        self,
        student_logits: Tensor,
        teacher_logits: Tensor,
        labels: Tensor | None = None,
        mask: Tensor | None = None,
        num_items_in_batch: int | Tensor | None = None,
    ) -> Tensor:
        """Distillation loss between ``student_logits`` and ``teacher_logits``, both ``(..., vocab)``.

        Args:
            student_logits: ``(batch, classes)`` or ``(batch, seq, vocab)``; receives the gradient.
            teacher_logits: same shape; treated as a constant (detached).
            labels: ``(batch,)`` / ``(batch, seq)`` ids; ``ignore_index`` positions are dropped.
            mask: ``(batch,)`` / ``(batch, seq)`` keep-mask, e.g. the attention mask.
            num_items_in_batch: normaliser for ``reduction="mean"`` (kept tokens across all accumulated
                micro-batches); default: the kept tokens in this call.

        Returns:
            A scalar fp32 tensor (``0.0`` when every position is masked).
        """
        _check_vocab(student_logits, teacher_logits)
        s, keep = token_mask(student_logits, labels, mask, self.ignore_index, self.shift_labels)
        t, _ = token_mask(teacher_logits, None, None, self.ignore_index, self.shift_labels)
        return self.flat_loss(s, t, keep, num_items_in_batch)

    def flat_loss(self, student: Tensor, teacher: Tensor, keep: Tensor,
                  num_items_in_batch: int | Tensor | None = None) -> Tensor:
        """The loss on already flattened ``(tokens, vocab)`` logits and a ``(tokens,)`` bool keep-mask (no shift)."""
        _check_vocab(student, teacher)
        teacher = teacher.detach()
        if self.chunk_size is None:
            summed = (per_token_loss(student, teacher, self.kind, self.temperature, self.beta) * keep).sum()
        else:
            summed = _ChunkedSum.apply(student, teacher, keep, self.kind, self.temperature, self.beta, self.chunk_size)
        return self.scale * reduce_loss(summed, keep.sum(), self.reduction, num_items_in_batch)

    def extra_repr(self) -> str:
        return (f"temperature={self.temperature}, scale_by_t2={self.scale_by_t2}, shift_labels={self.shift_labels}, "
                f"reduction={self.reduction!r}, chunk_size={self.chunk_size}")


class ForwardKLLoss(_LogitLoss):
    """``KL(p_teacher || p_student)`` at temperature ``T``, times ``T**2`` when ``scale_by_t2`` (the default).

    Mean-seeking: the student spreads mass over everything the teacher finds plausible (Hinton et al., 2015).
    """

    kind = LossKind.FORWARD_KL.value


class ReverseKLLoss(_LogitLoss):
    """``KL(p_student || p_teacher)``: mode-seeking; the student commits to the teacher's main modes (MiniLLM)."""

    kind = LossKind.REVERSE_KL.value


class JSDLoss(_LogitLoss):
    """Generalized Jensen–Shannon divergence with skew ``beta`` (GKD, Agarwal et al. 2024).

    ``beta * KL(p_t || m) + (1 - beta) * KL(p_s || m)`` with ``m = beta * p_t + (1 - beta) * p_s``. The two ends
    are *defined* as the plain divergences, as in GKD / TRL: ``beta=0`` is forward KL, ``beta=1`` reverse KL (the
    formula itself tends to 0 there, so the family is not continuous at the ends).
    """

    kind = LossKind.JSD.value


class LogitMSELoss(_LogitLoss):
    """Mean squared error between (temperature-divided) logits, averaged over the vocabulary; no T² factor."""

    kind = LossKind.MSE.value


_BY_KIND: dict[str, type[_LogitLoss]] = {
    "forward_kl": ForwardKLLoss, "reverse_kl": ReverseKLLoss, "jsd": JSDLoss, "mse": LogitMSELoss,
}


class DistillationLoss(_LogitLoss):
    """One configurable logits loss: ``kind`` picks the divergence, the rest as in :class:`ForwardKLLoss`.

    Args:
        kind: ``"forward_kl"`` (default), ``"reverse_kl"``, ``"jsd"`` (with ``beta``) or ``"mse"``.
        temperature: softmax temperature ``T > 0`` applied to both logits.
        scale_by_t2: multiply KL/JSD by ``T**2`` (default ``True``) so gradient magnitudes do not shrink as
            ``1/T**2`` when ``T`` grows; this keeps ``alpha`` meaningful when mixing with the task loss (Hinton et
            al.; DistilBERT does the same). TextBrewer and torchtune leave it off; pass ``False`` to match them.
        ignore_index: label value of dropped positions.
        shift_labels: causal LM shift of ``labels``/``mask`` (see :func:`token_mask`).
        reduction: ``"mean"`` over kept tokens (or ``num_items_in_batch``) or ``"sum"``.
        chunk_size: tokens per chunk for large vocabularies (memory ≈ one chunk of fp32 softmax); ``None`` = off.
        beta: JSD skew in ``[0, 1]``.

    Example::

        loss_fn = DistillationLoss("forward_kl", temperature=2.0, shift_labels=True, chunk_size=1024)
        loss = loss_fn(student(**batch).logits, teacher(**batch).logits, labels=batch["labels"])
    """

    def __init__(self, kind: str = "forward_kl", temperature: float = 1.0, scale_by_t2: bool = True,
                 ignore_index: int = -100, shift_labels: bool = False, reduction: Literal["mean", "sum"] = "mean",
                 chunk_size: int | None = None, beta: float = 0.5) -> None:
        kind = kind.value if isinstance(kind, LossKind) else kind
        if kind not in _BY_KIND:
            raise ValueError(f"`kind` must be one of {_KINDS}, got {kind!r}. Use kind='forward_kl' for classic KD.")
        super().__init__(temperature, scale_by_t2, ignore_index, shift_labels, reduction, chunk_size, beta)
        self.kind = kind

    def extra_repr(self) -> str:
        return f"kind={self.kind!r}, " + super().extra_repr()


def topk_forward_kl(
    student_logits: Tensor,
    topk_values: Tensor,
    topk_indices: Tensor,
    temperature: float = 1.0,
    keep: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """Summed forward KL against a teacher stored as its top-k logits (offline distillation).

    The teacher distribution is the softmax over its ``k`` stored logits (renormalised on that support); the
    student's full-vocabulary log-probabilities are gathered at the same ids, so mass the student puts outside
    the support is penalised too. Zero iff the student puts exactly the renormalised teacher mass on the support.

    Args:
        student_logits: ``(tokens, vocab)``.
        topk_values: ``(tokens, k)`` teacher logits.
        topk_indices: ``(tokens, k)`` vocabulary ids (int).
        keep: ``(tokens,)`` bool mask.

    Returns:
        ``(summed loss, kept count)``.
    """
    log_ps = F.log_softmax(student_logits.float() / temperature, dim=-1).gather(-1, topk_indices.long())
    log_pt = F.log_softmax(topk_values.float() / temperature, dim=-1)
    per = (log_pt.exp() * (log_pt - log_ps)).sum(-1)
    keep = torch.ones_like(per, dtype=torch.bool) if keep is None else keep
    return (per * keep).sum(), keep.sum()


def task_cross_entropy(
    logits: Tensor, labels: Tensor, ignore_index: int = -100, shift_labels: bool = False,
    num_items_in_batch: int | Tensor | None = None,
) -> Tensor:
    """Cross-entropy of the student on hard labels with the same masking / normalisation as the KD losses."""
    flat, keep = token_mask(logits, labels, None, ignore_index, shift_labels)
    target = (labels[:, 1:] if shift_labels else labels).reshape(-1)
    summed = F.cross_entropy(flat.float(), target.masked_fill(~keep, 0), reduction="none").mul(keep).sum()
    return reduce_loss(summed, keep.sum(), "mean", num_items_in_batch)


__all__ = [
    "DistillationLoss", "ForwardKLLoss", "JSDLoss", "LogitMSELoss", "LossKind", "ReverseKLLoss",
    "per_token_loss", "reduce_loss", "task_cross_entropy", "token_mask", "topk_forward_kl",
]
