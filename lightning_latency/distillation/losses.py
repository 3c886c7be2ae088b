"""Logit distillation losses: one ``nn.Module``, :class:`DistillationLoss`, usable without Lightning.

``DistillationLoss(kind=...)`` is the one loss class; ``kind`` picks the divergence. :class:`ForwardKLLoss`,
:class:`ReverseKLLoss`, :class:`JSDLoss` and :class:`LogitMSELoss` are presets: subclasses that only fix ``kind``,
so each *is* a ``DistillationLoss`` (``DistillationModule`` and ``isinstance`` checks accept them alike).

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

**Offline teachers** (:meth:`DistillationLoss.topk_loss`): the teacher is known only by its ``k`` largest logits
per position (``cache_teacher_topk``). Its distribution is the softmax over those ``k`` logits, zero elsewhere;
the student keeps its full-vocabulary distribution. Each kind on that support, all exact when ``k == vocab``:

* ``forward_kl``: ``sum_S p_t (log p_t - log p_s)`` — the student's mass outside the support is penalised too.
* ``jsd`` with ``0 < beta < 1``: the support terms plus the student's outside mass ``q`` contributing
  ``(1 - beta) * q * -log(1 - beta)`` (there the mixture is ``(1 - beta) * p_s``): finite and exact.
* ``mse``: over the ``k`` stored logits only (the others are unknown).
* ``reverse_kl`` (and ``jsd`` with ``beta=1``, which *is* reverse KL) needs ``p_t`` wherever the student puts mass:
  with ``k < vocab`` the divergence is infinite, so it raises a ``ValueError`` naming ``kind`` (cache with
  ``k`` = the vocabulary size, or use ``forward_kl`` / ``jsd`` offline).

``chunk_size`` computes the loss over token chunks inside a custom autograd function that writes the gradient
per chunk, so the ``(tokens, vocab)`` fp32 softmax intermediates exist for one chunk at a time; the peak is the
gradient buffer (one tensor the size of the student logits) plus one chunk. It applies to both paths.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lightning_latency.distillation.divergences import (
    _KINDS,
    LossKind,
    _ChunkedSum,
    _check_topk_kind,
    per_token_loss,
    per_token_topk_loss,
    topk_forward_kl,
)


def _check_positive(name: str, value: float, example: str) -> None:
    if not (isinstance(value, (int, float)) and math.isfinite(value) and value > 0):
        raise ValueError(f"`{name}` must be a finite number > 0, got {value!r}. {example}")


def _check_vocab(student_logits: Tensor, teacher_logits: Tensor) -> None:
    if student_logits.shape[-1] != teacher_logits.shape[-1]:
        raise ValueError(
            f"student and teacher logits must share the last (vocabulary) dimension for a logit loss, got "
            f"student {tuple(student_logits.shape)} and teacher {tuple(teacher_logits.shape)}. Use the teacher's "
            f"tokenizer/vocabulary (or label count) for the student (or a student initialised from the teacher), "
            f"or match hidden states instead (HiddenStateLoss)."
        )
    _check_leading(student_logits, teacher_logits)


def _check_leading(student_logits: Tensor, teacher: Tensor) -> None:
    if student_logits.shape[:-1] != teacher.shape[:-1]:
        raise ValueError(
            f"student and teacher logits must have the same leading (batch, seq) shape, got "
            f"{tuple(student_logits.shape)} and {tuple(teacher.shape)}. Feed both models the same inputs."
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
    for name, value in (("labels", labels), ("mask", mask)):
        if value is not None and tuple(value.shape) != tuple(logits.shape[:-1]):
            raise ValueError(
                f"`{name}` must have the logits' leading shape {tuple(logits.shape[:-1])} (logits "
                f"{tuple(logits.shape)}: one entry per scored position), got {tuple(value.shape)}. Pass the batch's "
                f"own {name} (for a causal LM the same (batch, seq) ids the model takes, with shift_labels=True)."
            )
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


def reduce_loss(
    summed: Tensor, kept: Tensor, reduction: str, num_items_in_batch: int | Tensor | None
) -> Tensor:
    """``sum`` -> as is; ``mean`` -> divide by ``num_items_in_batch`` or the kept count (``0/0`` -> ``0``)."""
    if reduction == "sum":
        return summed
    denom = num_items_in_batch if num_items_in_batch is not None else kept
    denom = torch.as_tensor(denom, dtype=summed.dtype, device=summed.device)
    return summed / denom.clamp_min(1.0)


class DistillationLoss(nn.Module):
    """The logit distillation loss: ``kind`` picks the divergence; live teacher logits or cached top-k logits.

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

    ``DistillationModule`` masks and shifts with its *own* ``shift_labels`` / ``ignore_index`` (they follow the
    student) and calls :meth:`flat_loss` / :meth:`flat_topk_loss`; the loss's ``kind``, ``temperature``,
    ``scale_by_t2``, ``reduction``, ``chunk_size`` and ``beta`` apply on both the live and the offline path.

    Raises:
        ValueError: an argument out of range (named in the message).

    Example::

        loss_fn = DistillationLoss("forward_kl", temperature=2.0, shift_labels=True, chunk_size=1024)
        loss = loss_fn(student(**batch).logits, teacher(**batch).logits, labels=batch["labels"])
        Trainer(max_steps=100).fit(DistillationModule(student, teacher, loss=loss_fn), loader)
    """

    def __init__(self, kind: Literal["forward_kl", "reverse_kl", "jsd", "mse"] = "forward_kl",
                 temperature: float = 1.0, scale_by_t2: bool = True, ignore_index: int = -100,
                 shift_labels: bool = False, reduction: Literal["mean", "sum"] = "mean",
                 chunk_size: int | None = None, beta: float = 0.5) -> None:
        super().__init__()
        kind = kind.value if isinstance(kind, LossKind) else kind
        if kind not in _KINDS:
            raise ValueError(f"`kind` must be one of {_KINDS}, got {kind!r}. Use kind='forward_kl' for classic KD.")
        _check_positive("temperature", temperature, "Use temperature=1.0 for the plain softmax, 2.0 for softer targets.")
        if reduction not in ("mean", "sum"):
            raise ValueError(f"`reduction` must be 'mean' or 'sum', got {reduction!r}. Use 'sum' with your own normaliser.")
        if chunk_size is not None and (isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size <= 0):
            raise ValueError(f"`chunk_size` must be a positive int or None, got {chunk_size!r}. Try chunk_size=1024 tokens.")
        if not (isinstance(beta, (int, float)) and 0.0 <= beta <= 1.0):
            raise ValueError(f"`beta` must be in [0, 1], got {beta!r}. beta=0 is forward KL, beta=1 reverse KL, 0.5 symmetric JSD.")
        self.kind: str = kind
        self.temperature = float(temperature)
        self.scale_by_t2 = scale_by_t2
        self.ignore_index = ignore_index
        self.shift_labels = shift_labels
        self.reduction = reduction
        self.chunk_size = chunk_size
        self.beta = float(beta)

    @property
    def scale(self) -> float:
        """``T**2`` for the divergences when ``scale_by_t2``, else 1 (never for ``mse``)."""
        return self.temperature**2 if self.scale_by_t2 and self.kind != LossKind.MSE else 1.0

    def forward(self, student_logits: Tensor, teacher_logits: Tensor, labels: Tensor | None = None,
                mask: Tensor | None = None, num_items_in_batch: int | Tensor | None = None) -> Tensor:
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

    def topk_loss(self, student_logits: Tensor, topk_values: Tensor, topk_indices: Tensor,
                  labels: Tensor | None = None, mask: Tensor | None = None,
                  num_items_in_batch: int | Tensor | None = None) -> Tensor:
        """The same loss against a teacher stored as its top-k logits (offline distillation).

        Args:
            student_logits: ``(batch, classes)`` or ``(batch, seq, vocab)``.
            topk_values: ``(batch, [seq,] k)`` teacher logits (e.g. ``teacher_topk_values`` of a
                ``TopKLogitsDataset`` batch).
            topk_indices: ``(batch, [seq,] k)`` their vocabulary ids.
            labels, mask, num_items_in_batch: as in :meth:`forward`.

        Raises:
            ValueError: ``kind="reverse_kl"`` with ``k < vocab``; shapes that do not fit the student.
        """
        s, keep = token_mask(student_logits, labels, mask, self.ignore_index, self.shift_labels)
        values, _ = token_mask(topk_values, None, None, self.ignore_index, self.shift_labels)
        indices, _ = token_mask(topk_indices, None, None, self.ignore_index, self.shift_labels)
        return self.flat_topk_loss(s, values, indices, keep, num_items_in_batch)

    def flat_loss(self, student: Tensor, teacher: Tensor, keep: Tensor,
                  num_items_in_batch: int | Tensor | None = None) -> Tensor:
        """The loss on already flattened ``(tokens, vocab)`` logits and a ``(tokens,)`` bool keep-mask (no shift)."""
        _check_vocab(student, teacher)
        fn = functools.partial(per_token_loss, kind=self.kind, temperature=self.temperature, beta=self.beta)
        return self._reduced(fn, student, keep, num_items_in_batch, teacher.detach())

    def flat_topk_loss(self, student: Tensor, topk_values: Tensor, topk_indices: Tensor, keep: Tensor,
                       num_items_in_batch: int | Tensor | None = None) -> Tensor:
        """:meth:`topk_loss` on flattened ``(tokens, vocab)`` student logits and ``(tokens, k)`` teacher top-k."""
        _check_leading(student, topk_values)
        k, vocab = topk_values.shape[-1], student.shape[-1]
        top_id = int(topk_indices.max()) if topk_indices.numel() else -1  # one host sync per call: a clear error
        if topk_indices.shape != topk_values.shape or k > vocab or top_id >= vocab:
            raise ValueError(
                f"the cached teacher top-k (values {tuple(topk_values.shape)}, indices {tuple(topk_indices.shape)}, "
                f"ids up to {top_id}) does not fit the student's vocabulary of {vocab}. Build the cache with the "
                f"teacher this student distils from (same tokenizer / label count), or rebuild it with "
                f"cache_teacher_topk."
            )
        _check_topk_kind(self.kind, self.beta, k, vocab)  # before any work
        fn = functools.partial(per_token_topk_loss, kind=self.kind, temperature=self.temperature, beta=self.beta)
        return self._reduced(fn, student, keep, num_items_in_batch, topk_values.detach(), topk_indices)

    def _reduced(self, per_token: Callable[..., Tensor], student: Tensor, keep: Tensor,
                 num_items_in_batch: int | Tensor | None, *teacher: Tensor) -> Tensor:
        if self.chunk_size is None:
            summed = (per_token(student, *teacher) * keep).sum()
        else:
            summed = _ChunkedSum.apply(student, keep, per_token, self.chunk_size, *teacher)
        return self.scale * reduce_loss(summed, keep.sum(), self.reduction, num_items_in_batch)

    def extra_repr(self) -> str:
        return (f"kind={self.kind!r}, temperature={self.temperature}, scale_by_t2={self.scale_by_t2}, "
                f"shift_labels={self.shift_labels}, reduction={self.reduction!r}, chunk_size={self.chunk_size}"
                + (f", beta={self.beta}" if self.kind == LossKind.JSD else ""))


class ForwardKLLoss(DistillationLoss):
    """Preset ``DistillationLoss(kind="forward_kl")``: ``KL(p_teacher || p_student)`` at temperature ``T``.

    Mean-seeking: the student spreads mass over everything the teacher finds plausible (Hinton et al., 2015).
    Other arguments as in :class:`DistillationLoss`.
    """

    def __init__(self, temperature: float = 1.0, **kwargs: Any) -> None:
        super().__init__(LossKind.FORWARD_KL, temperature, **kwargs)


class ReverseKLLoss(DistillationLoss):
    """Preset ``DistillationLoss(kind="reverse_kl")``: ``KL(p_student || p_teacher)``, mode-seeking (MiniLLM).

    Needs the teacher's whole distribution: offline, only from a cache with ``k`` = the vocabulary size.
    """

    def __init__(self, temperature: float = 1.0, **kwargs: Any) -> None:
        super().__init__(LossKind.REVERSE_KL, temperature, **kwargs)


class JSDLoss(DistillationLoss):
    """Preset ``DistillationLoss(kind="jsd")``: generalized Jensen–Shannon divergence with skew ``beta`` (GKD).

    ``beta * KL(p_t || m) + (1 - beta) * KL(p_s || m)`` with ``m = beta * p_t + (1 - beta) * p_s``. The two ends
    are *defined* as the plain divergences, as in GKD / TRL: ``beta=0`` is forward KL, ``beta=1`` reverse KL (the
    formula itself tends to 0 there, so the family is not continuous at the ends).
    """

    def __init__(self, temperature: float = 1.0, **kwargs: Any) -> None:
        super().__init__(LossKind.JSD, temperature, **kwargs)


class LogitMSELoss(DistillationLoss):
    """Preset ``DistillationLoss(kind="mse")``: squared error of (temperature-divided) logits, averaged over the
    vocabulary (offline: over the ``k`` stored logits); no T² factor."""

    def __init__(self, temperature: float = 1.0, **kwargs: Any) -> None:
        super().__init__(LossKind.MSE, temperature, **kwargs)


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
    "per_token_loss", "per_token_topk_loss", "reduce_loss", "task_cross_entropy", "token_mask", "topk_forward_kl",
]
