"""Compress to a latency budget: per-layer sensitivity, then removals allocated by loss cost per millisecond saved.

A uniform sparsity treats every layer alike, but layers differ both in how much the loss suffers when they shrink
and in how much time they cost. :func:`layer_sensitivity` measures both for each prunable unit (one block's
attention heads, one block's MLP neurons) at a few removal fractions, on a deep copy each time. :func:`plan_budget`
then orders the removals greedily by ``Δloss / Δms`` (the cheapest milliseconds first) until the predicted latency
meets the target, and refuses with the reachable floor when it cannot. :func:`apply_moves` carries a plan out on the
real model. Latency is whatever ``latency_fn(model) -> ms`` returns: in a fit, the deployment form measured on the
target shapes (:class:`~lightning_latency.pruning.budget_callback.LatencyBudgetPruning`); in tests, a fake.

Savings are treated as additive across units (true to first order for a sequential stack; the callback measures
the real model after every step and stops on the measurement, not on the prediction).
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from torch import nn

from lightning_latency.pruning.config import PruningConfig
from lightning_latency.pruning.depth import SkippedLayer, find_layers, layer_of, removable_layers, skip_layer
from lightning_latency.pruning.structured import (
    _head_scores,
    _importance,
    _lowest,
    _neuron_scores,
    find_blocks,
    original_structure,
    shrink_attention,
    shrink_mlp,
    update_hf_config,
)

Kind = Literal["heads", "neurons", "block"]
LossFn = Callable[[nn.Module, Any], torch.Tensor]
LatencyFn = Callable[[nn.Module], float]


@dataclass(frozen=True)
class Move:
    """Shrink ``kind`` of block ``block`` so that ``fraction`` of its ORIGINAL units are removed.

    ``kind="block"`` removes the whole layer ``block`` (depth pruning, :mod:`.depth`); its ``fraction`` is 1.
    """

    block: str
    kind: Kind
    fraction: float


@dataclass
class SensitivityRow:
    block: str
    kind: Kind
    fraction: float
    removed: int  # units removed (heads, or query heads per KV group for GQA; neurons)
    loss: float
    delta_loss: float
    latency_ms: float | None
    saved_ms: float | None


@dataclass
class SensitivityReport:
    """What removing each unit costs in loss and saves in time (``layer_sensitivity``'s result)."""

    base_loss: float
    base_ms: float | None
    rows: list[SensitivityRow] = field(default_factory=list)
    layers: dict[str, str] = field(default_factory=dict)  # heads / neurons block -> its layer (with depth rows)

    def row(self, block: str, kind: Kind, fraction: float) -> SensitivityRow:
        for r in self.rows:
            if (r.block, r.kind) == (block, kind) and math.isclose(r.fraction, fraction):
                return r
        raise KeyError(f"no sensitivity row for {block!r} {kind} at fraction {fraction}")

    def units(self) -> list[tuple[str, Kind]]:
        return list(dict.fromkeys((r.block, r.kind) for r in self.rows))

    def format(self) -> str:
        lines = [f"base loss {self.base_loss:.4f}" + (f", base {self.base_ms:.2f} ms" if self.base_ms else ""),
                 f"{'block':<40} {'kind':<8} {'removed':>8} {'Δloss':>9} {'saved ms':>9}"]
        for r in self.rows:
            saved = f"{r.saved_ms:9.3f}" if r.saved_ms is not None else f"{'–':>9}"
            lines.append(f"{r.block:<40} {r.kind:<8} {r.fraction:7.0%} {r.delta_loss:+9.4f} {saved}")
        return "\n".join(lines)

    def plot(self, path: str) -> str:
        """Save the sensitivity as a PNG (matplotlib) and return the path.

        Left: loss increase per unit against the fraction removed. Right (when latency was measured): every
        candidate's loss increase against the milliseconds it saves, by kind; the cheap milliseconds (what the
        budget plan takes first) sit at the bottom right.
        """
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        timed = self.base_ms is not None and any(r.saved_ms is not None for r in self.rows)
        fig, axes = plt.subplots(1, 2 if timed else 1, figsize=(12 if timed else 8, 4.5), squeeze=False)
        ax = axes[0][0]
        for block, kind in self.units():
            rows = [r for r in self.rows if (r.block, r.kind) == (block, kind)]
            ax.plot([r.fraction for r in rows], [r.delta_loss for r in rows], marker="o", label=f"{block} {kind}")
        ax.set_xlabel("fraction removed (1 = the whole layer)")
        ax.set_ylabel("loss increase")
        ax.legend(fontsize=5, ncol=2)
        if timed:
            ax = axes[0][1]
            for kind, marker in (("heads", "o"), ("neurons", "s"), ("block", "^")):
                rows = [r for r in self.rows if r.kind == kind and r.saved_ms is not None]
                if rows:
                    ax.scatter([r.saved_ms for r in rows], [r.delta_loss for r in rows], marker=marker, label=kind)
            ax.axvline(0.0, color="grey", linewidth=0.5)
            ax.set_xlabel(f"ms saved (dense {self.base_ms:.2f} ms)")
            ax.set_ylabel("loss increase")
            ax.legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(path, dpi=120)
        plt.close(fig)
        return path


def _blocks(model: nn.Module) -> tuple[dict[str, Any], dict[str, Any]]:
    attns, mlps = find_blocks(model, convert=False)
    return {a.name: a for a in attns}, {m.name: m for m in mlps}


def prunable_units(model: nn.Module, depth: bool = False) -> dict[tuple[str, Kind], int]:
    """``{(block, kind): original count}`` of every unit budget pruning can shrink (GQA: query heads per group).

    ``depth``: every removable layer too, as ``(layer, "block"): 1`` (all but the first of each stack).
    """
    original = original_structure(model)
    attns, mlps = _blocks(model)
    if not attns and not mlps:
        raise ValueError(
            f"budget pruning found no attention heads or MLP blocks it can shrink in {type(model).__name__}. "
            "Supported: BERT-family encoders, Llama-family decoders (incl. GQA) and GPT-2 (see docs/pruning.md)."
        )
    units: dict[tuple[str, Kind], int] = {}
    for name, a in attns.items():
        o = original.get(name, {"heads": a.num_heads, "kv_heads": a.num_kv_heads})
        units[(name, "heads")] = o["heads"] if o["kv_heads"] == o["heads"] else o["heads"] // o["kv_heads"]
    for name, m in mlps.items():
        units[(name, "neurons")] = original.get(name, {}).get("neurons", m.num_neurons)
    if depth:
        units.update({(name, "block"): 1 for name in removable_layers(model)})
    return units


def unit_counts(model: nn.Module) -> dict[tuple[str, Kind], int]:
    """``{(block, kind): units now}`` (GQA attention: query heads per KV group), to log an allocation."""
    original = original_structure(model)
    attns, mlps = _blocks(model)
    counts: dict[tuple[str, Kind], int] = {}
    for n, a in attns.items():
        o = original.get(n, {"heads": a.num_heads, "kv_heads": a.num_kv_heads})
        counts[(n, "heads")] = a.num_heads if o["kv_heads"] == o["heads"] else a.num_heads // a.num_kv_heads
    counts.update({(n, "neurons"): m.num_neurons for n, m in mlps.items()})
    return counts


def _keep(original: int, fraction: float) -> int:
    return max(1, original - math.floor(fraction * original + 0.5))


@torch.no_grad()
def apply_moves(model: nn.Module, moves: Iterable[Move], importance: str = "l2") -> dict[tuple[str, Kind], int]:
    """Shrink each move's unit to its fraction of the ORIGINAL count (never grows a unit back); a ``"block"``
    move removes its layer (:func:`~lightning_latency.pruning.depth.skip_layer`), after which moves on that layer's
    heads or neurons do nothing.

    Units are ranked by ``importance`` (``"l1"``/``"l2"`` weight norms, as in :class:`PruningConfig`). Returns
    ``{(block, kind): units kept}`` for the units touched.
    """
    imp = _importance(PruningConfig(mode="structured", importance=importance))
    units = prunable_units(model, depth=True)
    original = original_structure(model)
    attns, mlps = _blocks(model)
    layers = find_layers(model)
    removed = {name for name, (stack, i) in layers.items() if isinstance(stack[i], SkippedLayer)}
    kept: dict[tuple[str, Kind], int] = {}
    for move in moves:
        key = (move.block, move.kind)
        if move.kind == "block" and move.block in layers and layers[move.block][1] > 0:
            skip_layer(model, move.block)  # False (nothing to do) when it went earlier
            removed.add(move.block)
            kept[key] = 0
            continue
        if layer_of(move.block, layers) in removed:
            kept[key] = 0  # its layer went earlier in this call
            continue
        if key not in units:
            raise ValueError(f"`moves` names {move.block!r} {move.kind}, which is not a prunable unit of "
                             f"{type(model).__name__}. Units: {sorted(units)[:6]}…")
        keep = _keep(units[key], move.fraction)
        if move.kind == "heads":
            a = attns[move.block]
            n, kv = a.num_heads, a.num_kv_heads
            o = original.get(move.block, {"heads": n, "kv_heads": kv})
            gqa = o["kv_heads"] != o["heads"]  # a GQA layer left with 1 query head per group still is one
            if not gqa and n > keep:
                drop = _lowest(_head_scores(a, imp, with_kv=True), n - keep)
                survivors = [h for h in range(n) if h not in drop]
                shrink_attention(a, survivors, survivors)
            elif gqa and n // kv > keep:
                rep, scores, survivors = n // kv, _head_scores(a, imp, with_kv=False), []
                for g in range(kv):
                    members = list(range(g * rep, (g + 1) * rep))
                    drop = _lowest(scores[members], rep - keep)
                    survivors += [h for j, h in enumerate(members) if j not in drop]
                shrink_attention(a, survivors, list(range(kv)))
            kept[key] = attns[move.block].num_heads // (1 if gqa is False else kv)
        else:
            m = mlps[move.block]
            if m.num_neurons > keep:
                drop = _lowest(_neuron_scores(m, imp), m.num_neurons - keep)
                shrink_mlp(m, [i for i in range(m.num_neurons) if i not in drop])
            kept[key] = m.num_neurons
    update_hf_config(model)
    return kept


def _mean_loss(model: nn.Module, loss_fn: LossFn, calibration: Sequence[Any]) -> float:
    values = [float(loss_fn(model, batch)) for batch in calibration]
    return sum(values) / len(values)


def check_fractions(fractions: Sequence[float], max_fraction: float) -> list[float]:
    values = sorted(set(float(f) for f in fractions))
    if not values or any(not 0 < f < 1 for f in values):
        raise ValueError(f"`fractions` must be non-empty values in (0, 1), got {list(fractions)!r}. "
                         "For example fractions=(0.25, 0.5, 0.75).")
    if not 0 < max_fraction < 1:
        raise ValueError(f"`max_fraction` must be in (0, 1), got {max_fraction!r}. Pass e.g. max_fraction=0.75.")
    return [f for f in values if f <= max_fraction + 1e-9] or [values[0]]


@torch.no_grad()
def layer_sensitivity(
    model: nn.Module,
    loss_fn: LossFn,
    calibration: Sequence[Any],
    fractions: Sequence[float] = (0.25, 0.5, 0.75),
    latency_fn: LatencyFn | None = None,
    max_fraction: float = 0.75,
    importance: str = "l2",
    depth: bool = False,
) -> SensitivityReport:
    """Loss and latency of ``model`` with each unit alone shrunk by each fraction (on deep copies).

    Args:
        model: a supported transformer (BERT-like, Llama-like incl. GQA, GPT-2); never modified.
        loss_fn: ``loss_fn(model, batch) -> scalar tensor`` (e.g. ``lambda m, b: m(**b).loss``), or the KL to the
            unpruned model's outputs.
        calibration: a few batches (4–8 are enough to rank layers).
        fractions: removal fractions to try per unit, in (0, 1); those above ``max_fraction`` are dropped.
        latency_fn: ``latency_fn(model) -> ms`` measured on the deployment form; None reports loss only.
        max_fraction: the most of any unit that may be removed.
        importance: which units go first inside a layer: ``"l1"`` or ``"l2"`` weight norm.
        depth: also remove each layer whole (one row per layer, ``kind="block"``, fraction 1; the first layer of
            a stack stays): at batch 1 a layer's fixed cost is often most of its time, which only depth removes.

    Returns:
        A :class:`SensitivityReport` (``.format()`` for a table, ``.plot(path)`` for a chart).

    Raises:
        ValueError: empty calibration, bad fractions, or a model with no prunable units.

    Example::

        report = layer_sensitivity(model, lambda m, b: m(**b).loss, val_batches[:4], latency_fn=my_p50_ms)
        print(report.format())
    """
    calibration = list(calibration)
    if not calibration:
        raise ValueError("`calibration` is empty: pass a few batches (e.g. 4 from the validation loader).")
    fractions = check_fractions(fractions, max_fraction)
    was_training = model.training
    model.eval()
    try:
        units = prunable_units(model, depth)
        base_loss = _mean_loss(model, loss_fn, calibration)
        base_ms = float(latency_fn(model)) if latency_fn is not None else None
        report = SensitivityReport(base_loss=base_loss, base_ms=base_ms)
        if depth:
            layers = find_layers(model)
            report.layers = {b: layer for b, k in units if k != "block" and (layer := layer_of(b, layers))}
        for (block, kind), count in units.items():
            for f in ([1.0] if kind == "block" else fractions):
                work = copy.deepcopy(model)
                apply_moves(work, [Move(block, kind, f)], importance)
                loss = _mean_loss(work, loss_fn, calibration)
                ms = float(latency_fn(work)) if latency_fn is not None else None
                report.rows.append(SensitivityRow(
                    block=block, kind=kind, fraction=f, removed=count - _keep(count, f), loss=loss,
                    delta_loss=loss - base_loss, latency_ms=ms,
                    saved_ms=(base_ms - ms) if ms is not None and base_ms is not None else None))
        return report
    finally:
        model.train(was_training)


class BudgetUnreachable(ValueError):
    """The latency target cannot be met within the allowed removals; the message says what is reachable."""


def _greedy(report: SensitivityReport) -> Iterator[tuple[Move, float, float]]:
    """Every allowed move, cheapest loss per saved millisecond first, with the latency predicted after it and the
    milliseconds it is predicted to save.

    Each unit moves up its fractions one level at a time; a move's price is the extra loss divided by the extra
    time it saves (moves that save nothing are never taken). Ties go to the bigger saving, then by block name, so
    every rank and every resume gets the same order. A layer's ``"block"`` move (depth rows) is priced net of what
    its heads and neurons already took, and retires them.
    """
    levels = {u: [r for r in report.rows if (r.block, r.kind) == u] for u in report.units()}
    for rows in levels.values():
        rows.sort(key=lambda r: r.fraction)
    position = {u: -1 for u in levels}
    taken: dict[str, tuple[float, float]] = {}  # layer -> (ms saved, loss added) by its heads / neurons moves
    retired: set[str] = set()  # layers removed whole
    predicted = report.base_ms or 0.0

    def open_levels(u: tuple[str, str]) -> bool:
        layer = u[0] if u[1] == "block" else report.layers.get(u[0])
        return layer not in retired

    while True:
        best: tuple[float, float, str, str, SensitivityRow] | None = None
        for u, rows in levels.items():
            i = position[u] + 1
            if i >= len(rows) or not open_levels(u):
                continue
            prev_loss = rows[i - 1].delta_loss if i > 0 else 0.0
            prev_saved = rows[i - 1].saved_ms if i > 0 else 0.0
            if u[1] == "block":
                prev_saved, prev_loss = taken.get(u[0], (0.0, 0.0))
            gain = (rows[i].saved_ms or 0.0) - (prev_saved or 0.0)
            if gain <= 0:
                continue
            price = max(rows[i].delta_loss - prev_loss, 0.0) / gain
            candidate = (price, -gain, u[0], u[1], rows[i])  # equal price: the bigger saving first
            if best is None or candidate[:4] < best[:4]:
                best = candidate
        if best is None:
            # Levels whose measured saving was not positive (noise, or a unit too small to show alone) come last,
            # lowest fraction first: the prediction says nothing of them, but together they still shrink the model
            # (all of them: every unit at its largest fraction, the floor the callback checks in setup).
            rest = [r for u, rows in levels.items() if open_levels(u) for r in rows[position[u] + 1:]]
            for r in sorted(rest, key=lambda r: (r.fraction, r.delta_loss, r.block, r.kind)):
                yield Move(r.block, r.kind, r.fraction), predicted, 0.0  # type: ignore[arg-type]
            # Last, the heads / neurons of layers planned for removal whole: alternatives for landing on a target
            # (a smaller move instead of the whole layer); after that layer is gone they do nothing.
            for u, rows in levels.items():
                if open_levels(u):
                    continue
                for i in range(position[u] + 1, len(rows)):
                    saved = (rows[i].saved_ms or 0.0) - ((rows[i - 1].saved_ms or 0.0) if i > 0 else 0.0)
                    yield Move(u[0], u[1], rows[i].fraction), predicted, max(saved, 0.0)  # type: ignore[arg-type]
            return
        _, minus_gain, block, kind, row = best
        position[(block, kind)] += 1
        predicted += minus_gain
        if kind == "block":
            retired.add(block)
        elif (layer := report.layers.get(block)) is not None:
            saved, loss = taken.get(layer, (0.0, 0.0))
            previous = levels[(block, kind)][position[(block, kind)] - 1] if position[(block, kind)] > 0 else None
            taken[layer] = (saved - minus_gain, loss + row.delta_loss - (previous.delta_loss if previous else 0.0))
        yield Move(block, kind, row.fraction), predicted, -minus_gain  # type: ignore[arg-type]


def greedy_savings(report: SensitivityReport) -> list[tuple[Move, float]]:
    """:func:`greedy_moves` with the milliseconds each move is predicted to save (0 for the unmeasured tail)."""
    return [(move, saved) for move, _, saved in _greedy(report)]


def greedy_moves(report: SensitivityReport) -> list[Move]:
    """Every allowed removal in the order :func:`plan_budget` takes them (it takes a prefix of this list), then the
    levels whose measured saving was not positive, lowest fraction first: applied in full, the list reaches every
    unit at its largest fraction. With depth rows, the heads and neurons of layers removed whole come last (no-ops
    once their layer is gone; the budget pruner uses them to land on a target instead of removing the layer)."""
    return [move for move, _, _ in _greedy(report)]


def plan_budget(report: SensitivityReport, target_ms: float) -> list[Move]:
    """Removals, cheapest loss per millisecond first, until the predicted latency is at most ``target_ms``.

    Each unit moves up its fractions one level at a time; a move's price is the extra loss divided by the extra
    time it saves (moves that save nothing are never taken). Ties go to the bigger saving, then by block name, so
    every rank and every resume plans the same.

    Raises:
        ValueError: ``report`` has no latency (``latency_fn`` was None) or ``target_ms`` is not positive.
        BudgetUnreachable: even every allowed removal leaves the prediction above ``target_ms``.
    """
    if report.base_ms is None:
        raise ValueError("`report` has no latency: run layer_sensitivity(..., latency_fn=...) to plan a budget.")
    if not (isinstance(target_ms, (int, float)) and target_ms > 0):
        raise ValueError(f"`target_ms` must be a positive number of milliseconds, got {target_ms!r}.")
    predicted, plan = report.base_ms, []
    moves = _greedy(report)
    while predicted > target_ms * (1 + 1e-9):  # predicted is a sum of differences: allow float rounding
        step = next(moves, None)
        if step is None:
            raise BudgetUnreachable(
                f"`target_ms`={target_ms:g} cannot be reached: with every allowed removal the predicted latency is "
                f"{predicted:.3f} ms (dense {report.base_ms:.3f} ms). Pass target_ms >= {predicted:.3f}, raise "
                "`max_fraction`, or quantize as well."
            )
        move, predicted, _ = step
        plan.append(move)
    return plan


__all__ = [
    "BudgetUnreachable",
    "Move",
    "SensitivityReport",
    "SensitivityRow",
    "apply_moves",
    "greedy_moves",
    "greedy_savings",
    "layer_sensitivity",
    "plan_budget",
    "prunable_units",
    "unit_counts",
]
