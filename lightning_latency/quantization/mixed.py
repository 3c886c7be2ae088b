"""Mixed precision by sensitivity: which linears stay in higher precision when the rest go to int4 (or int8).

Hand-written rules ("keep ``down_proj`` in fp32", "int4 everywhere but an int8 ``lm_head``") encode one model's
measurements. Here the measurement is made on the model at hand, in the spirit of pruning's budget planner
(:mod:`lightning_latency.pruning.budget`):

* :func:`precision_sensitivity` quantizes each selected ``nn.Linear`` **alone** to ``bits`` and records the loss
  increase, with the bytes that linear takes at ``bits`` and at ``fallback`` (by real packed storage);
* :func:`plan_precision` starts from every linear at ``bits`` and moves linears back to ``fallback``, the largest
  loss increase per extra MB first, under a size budget or until the predicted loss increase is small enough;
* :func:`quantize_mixed` applies the plan with the packed CPU kernels of :mod:`.weight_only`.

Why the live model and not deep copies: SmolLM2-135M has 211 linears, and a deep copy of the whole model per linear
costs more than the forward passes that measure it. Each linear is swapped for its quantized replacement, the loss is
measured, and the *same* ``nn.Linear`` object is set back (also when ``loss_fn`` raises). The original is never
written to (``from_linear`` reads its weight and clones its bias), so the model comes back bit for bit, with its tied
weights still tied.

The planner treats loss increases as additive across linears (first order, as the pruning budget does) and the
fallback's own error as zero: int8 per-channel weight-only is far finer than int4 group-wise, but measure the planned
model to confirm. A tied ``lm_head`` is priced at its own weight's bytes, although its float form shares storage with
the embedding.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from lightning_latency.latency.memory import tensor_nbytes
from lightning_latency.quantization.weight_only import (
    Int4WeightOnlyLinear,
    Int8WeightOnlyLinear,
    check_bits_and_group,
    check_kernel_shape,
    quantize_weight_only,
    select_linears,
)

LossFn = Callable[[nn.Module, Any], torch.Tensor]
FALLBACKS = (8, 16, 32)
_MB = 1024**2  # the unit of model_stats().model_mb


def _label(bits: int, group_size: int) -> str:
    return {4: f"int4 g{group_size}", 8: "int8", 16: "16-bit float", 32: "fp32"}[bits]


def _own_bytes(module: nn.Module) -> int:
    tensors = [*module.parameters(recurse=False), *module.buffers(recurse=False)]
    return sum(tensor_nbytes(t) for t in tensors)


def _packed(linear: nn.Linear, bits: int, group_size: int) -> nn.Module:
    if bits == 4:
        return Int4WeightOnlyLinear.from_linear(linear, group_size)
    return Int8WeightOnlyLinear.from_linear(linear)


def _bytes_at(linear: nn.Linear, bits: int, group_size: int) -> int:
    """Bytes ``linear`` stores at ``bits``: the packed module's real storage for 4 / 8, ``bits / 8`` per weight (and
    the bias as it is) for a float 16 / 32."""
    if bits in (4, 8):
        return _own_bytes(_packed(linear, bits, group_size))
    bias = tensor_nbytes(linear.bias) if linear.bias is not None else 0
    return linear.weight.numel() * bits // 8 + bias


@dataclass(frozen=True)
class PrecisionRow:
    """One linear: its loss with only it quantized to ``bits``, and its bytes at ``bits`` and at ``fallback``."""

    name: str
    loss: float
    delta_loss: float
    bits_bytes: int
    fallback_bytes: int

    @property
    def extra_bytes(self) -> int:
        """What keeping this linear at ``fallback`` costs over ``bits``."""
        return self.fallback_bytes - self.bits_bytes

    @property
    def loss_per_mb(self) -> float:
        """Loss increase avoided per extra MB spent keeping it at ``fallback`` (the planner's order)."""
        return self.delta_loss / (self.extra_bytes / _MB) if self.extra_bytes > 0 else math.inf


@dataclass
class PrecisionReport:
    """:func:`precision_sensitivity`'s result: ``rows`` in model order; ``.format()``, ``.plot(path)``."""

    base_loss: float
    bits: int
    group_size: int
    fallback: int
    rows: list[PrecisionRow] = field(default_factory=list)

    def row(self, name: str) -> PrecisionRow:
        for r in self.rows:
            if r.name == name:
                return r
        raise KeyError(f"no precision row for {name!r}; linears: {[r.name for r in self.rows][:6]}…")

    def ranked(self) -> list[PrecisionRow]:
        """Rows, the largest loss increase first (ties by name)."""
        return sorted(self.rows, key=lambda r: (-r.delta_loss, r.name))

    @property
    def min_mb(self) -> float:
        """Size of the selected linears with every one at ``bits``."""
        return sum(r.bits_bytes for r in self.rows) / _MB

    @property
    def max_mb(self) -> float:
        """Size of the selected linears with every one at ``fallback``."""
        return sum(r.fallback_bytes for r in self.rows) / _MB

    def format(self, top: int | None = None) -> str:
        """A table, the most sensitive linear first (``top``: only that many rows)."""
        low, high = _label(self.bits, self.group_size), _label(self.fallback, self.group_size)
        lines = [f"base loss {self.base_loss:.4f}; {len(self.rows)} linears: all {low} {self.min_mb:.3f} MB, "
                 f"all {high} {self.max_mb:.3f} MB",
                 f"{'linear':<44} {'Δloss':>10} {low + ' MB':>12} {high + ' MB':>12} {'Δloss/MB':>10}"]
        for r in self.ranked()[:top]:
            lines.append(f"{r.name:<44} {r.delta_loss:+10.5f} {r.bits_bytes / _MB:12.4f} "
                         f"{r.fallback_bytes / _MB:12.4f} {r.loss_per_mb:+10.4f}")
        return "\n".join(lines)

    def plot(self, path: str) -> str:
        """Save the loss increase of each linear, in model order and coloured by its last name part (``q_proj``,
        ``down_proj``, …), as a PNG (matplotlib) and return the path."""
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        kinds = list(dict.fromkeys(r.name.rsplit(".", 1)[-1] for r in self.rows))
        colours = {k: plt.get_cmap("tab10")(i % 10) for i, k in enumerate(kinds)}
        fig, ax = plt.subplots(figsize=(max(6.0, len(self.rows) * 0.05), 4))
        for kind in kinds:
            xs = [i for i, r in enumerate(self.rows) if r.name.rsplit(".", 1)[-1] == kind]
            ax.bar(xs, [self.rows[i].delta_loss for i in xs], color=colours[kind], label=kind, width=0.9)
        ax.set_xlabel("linear (model order)")
        ax.set_ylabel(f"loss increase, alone at {_label(self.bits, self.group_size)}")
        ax.legend(fontsize=7, ncol=4)
        fig.tight_layout()
        fig.savefig(path, dpi=120)
        plt.close(fig)
        return path


def _check_fallback(bits: int, fallback: Any) -> None:
    if fallback not in FALLBACKS or isinstance(fallback, bool) or fallback <= bits:
        raise ValueError(
            f"`fallback` must be one of {FALLBACKS} and above `bits`={bits}, got {fallback!r}. Pass fallback=8 "
            "(int8 weight-only) or fallback=16 / 32 to keep the sensitive linears in float."
        )


def _mean_loss(model: nn.Module, loss_fn: LossFn, calibration: Sequence[Any]) -> float:
    return sum(float(loss_fn(model, batch)) for batch in calibration) / len(calibration)


@torch.no_grad()
def precision_sensitivity(
    model: nn.Module,
    loss_fn: LossFn,
    calibration: Sequence[Any],
    bits: int = 4,
    group_size: int = 32,
    targets: Sequence[str] | None = None,
    exclude: Sequence[str] | None = None,
    fallback: int = 8,
) -> PrecisionReport:
    """Loss of ``model`` with each selected ``nn.Linear`` alone quantized to ``bits``, and its bytes at ``bits`` and
    at ``fallback``.

    Each linear is swapped for its packed replacement on the live model and the very same module set back after
    (see the module docstring): the model comes back bit for bit, in its original train / eval mode.

    Args:
        model: any module whose linears :func:`~.weight_only.quantize_weight_only` can take (a Hugging Face causal
            LM works as is).
        loss_fn: ``loss_fn(model, batch) -> scalar tensor`` (e.g. ``lambda m, b: m(**b).loss``, ``b`` holding
            ``input_ids`` ``(batch, seq)`` and ``labels``).
        calibration: a few batches (2–8 rank the linears).
        bits: 4 (int4 group-wise) or 8 (int8 per-channel), what most linears will get.
        group_size: int4 group size (32, 64, 128 or 256).
        targets, exclude: which linears take part, as in :func:`~.weight_only.quantize_weight_only` (None:
            every ``nn.Linear`` but embeddings, norms and classifier heads; ``lm_head`` takes part).
        fallback: the precision a sensitive linear keeps: 8 (int8 weight-only), or 16 / 32 (left float, counted
            at 2 / 4 bytes per weight). Must be above ``bits``.

    Returns:
        A :class:`PrecisionReport` (``.format()`` for a table, ``.plot(path)`` for a chart), for
        :func:`plan_precision`.

    Raises:
        ValueError: empty calibration, bad ``bits`` / ``group_size`` / ``fallback``, nothing selected, a linear the
            packed kernel cannot run (checked before anything is measured).

    Example::

        report = precision_sensitivity(model, lambda m, b: m(**b).loss, val_batches[:2], bits=4)
        print(report.format(top=10))
        quantize_mixed(model, plan_precision(report, budget_mb=60))
    """
    calibration = list(calibration)
    if not calibration:
        raise ValueError("`calibration` is empty: pass a few batches (e.g. 2 from the validation loader).")
    check_bits_and_group(bits, group_size)
    _check_fallback(bits, fallback)
    selected = select_linears(model, targets, exclude)
    if "" in selected:
        raise ValueError("`model` is itself an nn.Linear, which cannot be swapped out of itself: wrap it in "
                         "nn.Sequential(model).")
    widths = [m.in_features for m in selected.values()]
    for name, linear in selected.items():
        check_kernel_shape(name, linear, bits, group_size, widths)
        if fallback == 8:
            check_kernel_shape(name, linear, 8, group_size, widths)
    was_training = model.training
    model.eval()
    try:
        report = PrecisionReport(_mean_loss(model, loss_fn, calibration), bits, group_size, fallback)
        for name, linear in selected.items():
            packed = _packed(linear, bits, group_size)
            model.set_submodule(name, packed)
            try:
                loss = _mean_loss(model, loss_fn, calibration)
            finally:
                model.set_submodule(name, linear)
            report.rows.append(PrecisionRow(name, loss, loss - report.base_loss, _own_bytes(packed),
                                            _bytes_at(linear, fallback, group_size)))
        return report
    finally:
        model.train(was_training)


@dataclass(frozen=True)
class PrecisionPlan:
    """Which linear gets which precision (:func:`plan_precision`'s result, for :func:`quantize_mixed`).

    Attributes:
        bits: ``{linear: 4 | 8 | 16 | 32}`` in model order.
        group_size: the int4 group size the report measured.
        size_mb: the selected linears' size under this plan (real packed storage).
        loss_increase: predicted loss increase, the summed ``delta_loss`` of the linears left at the low precision.
        kept: linears moved to the fallback, in the order the planner took them.
    """

    bits: dict[str, int]
    group_size: int
    size_mb: float
    loss_increase: float
    kept: tuple[str, ...]


def _check_plan_arguments(report: PrecisionReport, budget_mb: Any, max_loss_increase: Any) -> None:
    if (budget_mb is None) == (max_loss_increase is None):
        raise ValueError(
            f"Pass exactly one of `budget_mb` (a size for the selected linears, in MB) or `max_loss_increase` (the "
            f"predicted loss increase to stay under), got budget_mb={budget_mb!r}, "
            f"max_loss_increase={max_loss_increase!r}. E.g. budget_mb={report.min_mb * 1.1:.3f}."
        )
    reachable = f"reachable: {report.min_mb:.4f} (all {_label(report.bits, report.group_size)}) to " \
                f"{report.max_mb:.4f} MB (all {_label(report.fallback, report.group_size)})"
    if budget_mb is not None:
        if not isinstance(budget_mb, (int, float)) or isinstance(budget_mb, bool) or not math.isfinite(budget_mb):
            raise ValueError(f"`budget_mb` must be a number of MB, got {budget_mb!r} ({reachable}).")
        if budget_mb * _MB < report.min_mb * _MB * (1 - 1e-12):
            raise ValueError(f"`budget_mb`={budget_mb:g} is below the size with every selected linear at "
                             f"{_label(report.bits, report.group_size)} ({reachable}). Pass budget_mb >= "
                             f"{report.min_mb:.4f}, " + ("bits=4, " if report.bits == 8 else "")
                             + "or select fewer linears (`targets` / `exclude`), or prune first.")
        if budget_mb * _MB > report.max_mb * _MB * (1 + 1e-12):
            raise ValueError(f"`budget_mb`={budget_mb:g} is above the size with every selected linear at "
                             f"{_label(report.fallback, report.group_size)} ({reachable}), so nothing needs the low "
                             f"precision. Pass budget_mb <= {report.max_mb:.4f}, or a higher `fallback`.")
    elif (not isinstance(max_loss_increase, (int, float)) or isinstance(max_loss_increase, bool)
          or not max_loss_increase >= 0 or not math.isfinite(max_loss_increase)):
        raise ValueError(f"`max_loss_increase` must be a finite number >= 0, got {max_loss_increase!r}. Pass e.g. "
                         "max_loss_increase=0.05 (any value >= 0 is reachable: all at the fallback predicts 0).")


def plan_precision(report: PrecisionReport, budget_mb: float | None = None,
                   max_loss_increase: float | None = None) -> PrecisionPlan:
    """Every linear at ``report.bits``, then linears moved back to ``report.fallback``, the largest loss increase per
    extra MB first (ties by name), under one of two stopping rules.

    Args:
        report: from :func:`precision_sensitivity`.
        budget_mb: the selected linears may take at most this many MB (real packed storage). A linear that no
            longer fits is passed over for the next one that does, so no linear left at ``bits`` could still be
            moved within the budget. Linears whose measured loss increase is not positive stay at ``bits``.
        max_loss_increase: move linears until the summed loss increase of those left at ``bits`` is at most this.

    Raises:
        ValueError: neither or both of ``budget_mb`` and ``max_loss_increase``; a budget outside what is reachable
            (the message gives the range); a negative ``max_loss_increase``.

    Example::

        plan = plan_precision(report, budget_mb=report.min_mb * 1.1)   # 10% above all-int4
        quantize_mixed(model, plan)
    """
    _check_plan_arguments(report, budget_mb, max_loss_increase)
    order = sorted((r for r in report.rows if r.delta_loss > 0), key=lambda r: (-r.loss_per_mb, r.name))
    size = sum(r.bits_bytes for r in report.rows)
    remaining = sum(r.delta_loss for r in report.rows)
    # budget_mb * MB is a float; the slack forgives its rounding (a budget written as min_mb + extra / MB)
    limit = budget_mb * _MB * (1 + 1e-12) if budget_mb is not None else math.inf
    kept: list[str] = []
    for r in order:
        if max_loss_increase is not None:
            if remaining <= max_loss_increase:
                break
        elif size + r.extra_bytes > limit:
            continue
        kept.append(r.name)
        size += r.extra_bytes
        remaining -= r.delta_loss
    moved = set(kept)
    bits = {r.name: report.fallback if r.name in moved else report.bits for r in report.rows}
    return PrecisionPlan(bits, report.group_size, size / _MB, remaining, tuple(kept))


def quantize_mixed(model: nn.Module, plan: PrecisionPlan) -> dict[str, int]:
    """Apply ``plan`` in place: its int4 / int8 linears become packed weight-only linears (16 / 32: left as they are).

    Args:
        model: the model the plan's report was measured on (or one of the same architecture).
        plan: from :func:`plan_precision`.

    Returns:
        ``{linear: bits}`` as applied, in model order.

    Raises:
        ValueError: a linear of the plan that is missing from ``model`` or no longer an ``nn.Linear``, or that the
            packed kernel cannot run. Nothing is changed when it raises.

    Example::

        applied = quantize_mixed(model, plan_precision(report, budget_mb=60))
        tokens = fast_generate(model, ids, max_new_tokens=32)
    """
    groups: dict[int, list[str]] = {4: [], 8: []}
    for name, bits in plan.bits.items():
        try:
            linear = model.get_submodule(name)
        except AttributeError:
            linear = None
        if type(linear) is not nn.Linear:
            raise ValueError(f"`plan` names {name!r}, which is not an nn.Linear of {type(model).__name__} (found "
                             f"{type(linear).__name__}). Plan on a report measured on this model, before quantizing.")
        if bits in groups:
            check_kernel_shape(name, linear, bits, plan.group_size)
            groups[bits].append(name)
    for bits, names in groups.items():
        if names:  # exact names as anchored regexes, so no fnmatch wildcard in a name can select more
            patterns = ["re:^" + re.escape(n) + "$" for n in names]
            quantize_weight_only(model, bits, plan.group_size, targets=patterns, exclude=[])
    return dict(plan.bits)


__all__ = [
    "FALLBACKS",
    "PrecisionPlan",
    "PrecisionReport",
    "PrecisionRow",
    "plan_precision",
    "precision_sensitivity",
    "quantize_mixed",
]
