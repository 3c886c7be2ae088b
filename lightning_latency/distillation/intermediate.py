"""Intermediate-layer matching: hidden states (MSE / cosine, learned projection) and attention maps.

Hugging Face models return ``hidden_states`` as a tuple of ``num_layers + 1`` tensors ``(batch, seq, hidden)``
(index 0 is the embedding output) when called with ``output_hidden_states=True``, and ``attentions`` as a tuple of
``num_layers`` tensors ``(batch, heads, seq, seq)`` with ``output_attentions=True`` (needs
``attn_implementation="eager"``: the SDPA kernels do not return the attention matrix). A layer map is a list of
``(student_index, teacher_index)`` pairs into those tuples, given explicitly or spread evenly.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def even_layer_map(num_student: int, num_teacher: int, include_embeddings: bool = False) -> list[tuple[int, int]]:
    """Map student layer ``i`` (1-based, as in ``hidden_states``) to teacher layer ``round(i * T / S)``.

    For 3 student and 6 teacher layers: ``[(1, 2), (2, 4), (3, 6)]`` — each student layer matches the teacher
    layer at the same relative depth, the last to the last. ``include_embeddings`` prepends ``(0, 0)``.
    """
    for name, value in (("num_student", num_student), ("num_teacher", num_teacher)):
        if not isinstance(value, int) or value < 1:
            raise ValueError(f"`{name}` must be a positive int (number of layers), got {value!r}.")
    pairs = [(i, round(i * num_teacher / num_student)) for i in range(1, num_student + 1)]
    return ([(0, 0)] if include_embeddings else []) + pairs


def check_layer_map(layer_map: Sequence[Sequence[int]], num_student: int, num_teacher: int, what: str) -> list[tuple[int, int]]:
    """Validate ``(student, teacher)`` index pairs against the lengths of the ``what`` tuples; return them."""
    pairs = [tuple(int(x) for x in pair) for pair in layer_map]
    for pair in pairs:
        if len(pair) != 2:
            raise ValueError(f"`layer_map` entries must be (student_index, teacher_index) pairs, got {pair!r}.")
        s, t = pair
        if not (-num_student <= s < num_student) or not (-num_teacher <= t < num_teacher):
            raise ValueError(
                f"`layer_map` pair {pair} is out of range: the student returns {num_student} {what} and the teacher "
                f"{num_teacher} (indices 0..n-1; index 0 of hidden_states is the embeddings). Use "
                f"even_layer_map({max(num_student - 1, 1)}, {max(num_teacher - 1, 1)}) or fix the pair."
            )
    return pairs  # type: ignore[return-value]


def _masked_mean(per_token: Tensor, mask: Tensor | None) -> Tensor:
    """Mean of ``(batch, seq)`` values over kept positions; ``0`` when nothing is kept."""
    if mask is None:
        return per_token.mean()
    keep = mask.to(per_token.dtype)
    return (per_token * keep).sum() / keep.sum().clamp_min(1.0)


class HiddenStateLoss(nn.Module):
    """Match chosen student hidden states to teacher hidden states, averaged over the mapped pairs.

    Args:
        student_dim: student hidden size.
        teacher_dim: teacher hidden size; when different, a learned ``nn.Linear(student_dim, teacher_dim)`` per
            pair projects the student (its parameters are trainable and belong in the optimizer).
        layer_map: ``(student_index, teacher_index)`` pairs into ``hidden_states``.
        kind: ``"mse"`` (mean over the hidden dim) or ``"cosine"`` (``1 - cos``).

    Shapes: ``forward(student_hidden, teacher_hidden, mask)`` takes two sequences of ``(batch, seq, dim)``
    tensors and an optional ``(batch, seq)`` keep-mask (e.g. the attention mask); padding is excluded.
    """

    needs = "hidden_states"

    def __init__(self, student_dim: int, teacher_dim: int, layer_map: Sequence[Sequence[int]],
                 kind: Literal["mse", "cosine"] = "mse") -> None:
        super().__init__()
        if kind not in ("mse", "cosine"):
            raise ValueError(f"`kind` must be 'mse' or 'cosine', got {kind!r}.")
        for name, dim in (("student_dim", student_dim), ("teacher_dim", teacher_dim)):
            if isinstance(dim, bool) or not isinstance(dim, int) or dim < 1:
                raise ValueError(f"`{name}` must be an int >= 1 (the hidden size), got {dim!r}. "
                                 f"E.g. {name}=model.config.hidden_size.")
        for pair in layer_map or ():
            if isinstance(pair, (str, bytes)) or len(pair) != 2:
                raise ValueError(f"`layer_map` entries must be (student_layer, teacher_layer) pairs, got "
                                 f"{list(pair) if not isinstance(pair, (str, bytes)) else pair!r}. "
                                 f"Use even_layer_map(num_student_layers, num_teacher_layers).")
        if not layer_map:
            raise ValueError("`layer_map` must name at least one (student, teacher) pair, got an empty map. "
                             "Use even_layer_map(num_student_layers, num_teacher_layers).")
        self.layer_map = [tuple(int(x) for x in p) for p in layer_map]
        self.kind = kind
        self.projections = nn.ModuleList(
            nn.Linear(student_dim, teacher_dim) if student_dim != teacher_dim else nn.Identity() for _ in self.layer_map
        )

    def forward(self, student_hidden: Sequence[Tensor], teacher_hidden: Sequence[Tensor],
                mask: Tensor | None = None) -> Tensor:
        pairs = check_layer_map(self.layer_map, len(student_hidden), len(teacher_hidden), "hidden states")
        losses = []
        for proj, (s_idx, t_idx) in zip(self.projections, pairs):
            s = proj(student_hidden[s_idx]).float()
            t = teacher_hidden[t_idx].detach().float()
            if s.shape != t.shape:
                raise ValueError(f"hidden states of pair {(s_idx, t_idx)} differ in shape after projection: "
                                 f"{tuple(s.shape)} vs {tuple(t.shape)}. Check student_dim/teacher_dim.")
            per = (s - t).pow(2).mean(-1) if self.kind == "mse" else 1.0 - F.cosine_similarity(s, t, dim=-1)
            losses.append(_masked_mean(per, mask))
        return torch.stack(losses).mean()


class AttentionLoss(nn.Module):
    """Attention-map transfer: KL between teacher and student attention rows (MiniLM / TinyBERT style).

    Each attention row ``(batch, heads, q, :)`` is a distribution over keys; the loss is the mean over kept
    query positions and mapped layers of ``KL(a_teacher || a_student)``. When head counts differ, the head-averaged
    maps are compared.

    Args:
        layer_map: ``(student_index, teacher_index)`` pairs into ``attentions`` (0-based transformer layers).
    """

    needs = "attentions"

    def __init__(self, layer_map: Sequence[Sequence[int]]) -> None:
        super().__init__()
        if not layer_map:
            raise ValueError("`layer_map` must name at least one (student, teacher) pair, got an empty map.")
        self.layer_map = [tuple(int(x) for x in p) for p in layer_map]

    def forward(self, student_attn: Sequence[Tensor], teacher_attn: Sequence[Tensor],
                mask: Tensor | None = None) -> Tensor:
        if not student_attn or not teacher_attn or student_attn[0] is None:
            raise ValueError("attention maps are missing: call the models with output_attentions=True and "
                             "attn_implementation='eager' (SDPA/flash kernels do not return them).")
        pairs = check_layer_map(self.layer_map, len(student_attn), len(teacher_attn), "attention maps")
        losses = []
        eps = torch.finfo(torch.float32).tiny
        for s_idx, t_idx in pairs:
            s, t = student_attn[s_idx].float(), teacher_attn[t_idx].detach().float()
            if s.shape[1] != t.shape[1]:
                s, t = s.mean(1, keepdim=True), t.mean(1, keepdim=True)
            per = (t * (t.clamp_min(eps).log() - s.clamp_min(eps).log())).sum(-1).mean(1)  # (batch, q)
            losses.append(_masked_mean(per, mask))
        return torch.stack(losses).mean()


__all__ = ["AttentionLoss", "HiddenStateLoss", "check_layer_map", "even_layer_map"]
