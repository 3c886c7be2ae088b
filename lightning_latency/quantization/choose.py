"""How ``deploy(..., backend="auto")`` chooses: output agreement with the reference, then measured speed.

Which form is fastest depends on the CPU: on an AMX/VNNI CPU PT2E int8 wins by far, on an AVX2-only one ONNX
Runtime's dynamic int8 can beat it at batch 1, and bf16 is ×4–7 *slower* than fp32 without native bf16 (see
docs/quantization.md). No fixed rule survives all CPU classes, so the candidates are timed side by side, interleaved
in rounds (a slow phase of a shared machine hits all of them alike), on the shapes they will serve.

Agreement is checked first, on the calibration batches, against the reference (the fake-quantized model QAT trained,
or the float model for post-training quantization):

* ``rel_error`` = ‖out − ref‖₂ / ‖ref‖₂ over all outputs must be ≤ ``tolerance`` (default 0.1). Int8 rounding of a
  QAT-trained encoder gives a few per cent (one int8 step is 1/127 of a channel's range per layer, the errors of the
  layers add up roughly in quadrature); a broken graph, a wrong kernel or a mis-calibrated activation range gives
  errors of the order of the outputs themselves (≈ 1).
* Rows whose reference top-2 margin exceeds twice the allowed absolute error (``tolerance`` × RMS of the reference)
  are confident: their argmax must not change. Rows closer to a tie may flip legitimately and are only counted in
  the reported ``agreement``.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

# Name of the candidate speed-ups are reported against (when it was built): the float model compiled.
RATIO_BASE = "fp32"


@dataclass
class Agreement:
    """Outputs of one candidate against the reference on the calibration batches."""

    rel_error: float
    agreement: float  # fraction of rows with the same argmax (1.0 for outputs without a class dimension)
    confident_flips: int  # rows whose reference margin exceeds twice the allowed error, yet whose argmax changed

    def ok(self, tolerance: float) -> bool:
        return self.rel_error <= tolerance and self.confident_flips == 0


def agreement(outputs: Sequence[torch.Tensor], references: Sequence[torch.Tensor], tolerance: float) -> Agreement:
    """Compare candidate ``outputs`` with ``references`` (one tensor per batch, e.g. logits ``(batch, classes)``)."""
    out = torch.cat([o.detach().float().reshape(o.shape[0], -1) for o in outputs])
    ref = torch.cat([r.detach().float().reshape(r.shape[0], -1) for r in references])
    if out.shape != ref.shape:
        return Agreement(float("inf"), 0.0, ref.shape[0])
    diff = (out - ref).norm()
    scale = ref.norm()
    rel = float(diff / scale) if scale > 0 else float(diff > 0) * float("inf")
    if not math.isfinite(float(out.abs().max())):
        rel = float("inf")
    if ref.shape[1] < 2:
        return Agreement(rel, 1.0, 0)
    same = out.argmax(1) == ref.argmax(1)
    top2 = ref.topk(2, dim=1).values
    allowed = tolerance * float(ref.pow(2).mean().sqrt())
    confident = (top2[:, 0] - top2[:, 1]) > 2 * allowed
    return Agreement(rel, float(same.float().mean()), int((confident & ~same).sum()))


@dataclass
class Candidate:
    """One row of the report: a deployment form, its timing and its agreement with the reference."""

    name: str
    p50_ms: float | None = None
    spread: float | None = None  # (max − min) / min of the per-round medians: the comparison's noise
    rel_error: float | None = None
    agreement: float | None = None
    accepted: bool = False
    note: str = ""  # why it was skipped or rejected

    def to_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


@dataclass
class DeployReport:
    """The candidates ``deploy(backend="auto")`` built, timed and checked, and which one it chose and why."""

    candidates: list[Candidate]
    chosen: str
    why: str
    shapes: str = ""
    tolerance: float = 0.1
    rounds: int = 0
    isa: str = ""
    extra: dict[str, Any] = field(default_factory=dict)

    def ratio(self, name: str) -> float | None:
        """Speed-up of candidate ``name`` over the compiled fp32 form (None when either was not timed)."""
        rows = {c.name: c for c in self.candidates}
        base, row = rows.get(RATIO_BASE), rows.get(name)
        if base is None or row is None or not base.p50_ms or not row.p50_ms:
            return None
        return base.p50_ms / row.p50_ms

    def format(self) -> str:
        """A readable table (one row per candidate) followed by the choice and its reason."""
        lines = [f"deploy: {self.shapes}; {self.isa}; {self.rounds} interleaved rounds, p50 = best round's median",
                 f"{'candidate':<13}{'p50 ms':>10}{'spread':>8}{'vs fp32':>9}{'rel err':>9}{'argmax':>8}  status"]
        for c in self.candidates:
            ratio = self.ratio(c.name)
            status = "CHOSEN" if c.name == self.chosen else ("ok" if c.accepted else "rejected")
            lines.append(
                f"{c.name:<13}{_num(c.p50_ms, '.3f'):>10}{_pct(c.spread):>8}"
                f"{(_num(ratio, '.2f') + 'x') if ratio else '-':>9}{_num(c.rel_error, '.4f'):>9}"
                f"{_pct(c.agreement):>8}  {status}{(': ' + c.note) if c.note else ''}")
        lines.append(f"chose {self.chosen!r}: {self.why}")
        return "\n".join(lines)

    def to_dict(self) -> dict[str, Any]:
        return {"candidates": [c.to_dict() for c in self.candidates], "chosen": self.chosen, "why": self.why,
                "shapes": self.shapes, "tolerance": self.tolerance, "rounds": self.rounds, "isa": self.isa}


def _num(value: float | None, fmt: str) -> str:
    return "-" if value is None or not math.isfinite(value) else format(value, fmt)


def _pct(value: float | None) -> str:
    return "-" if value is None or not math.isfinite(value) else f"{100 * value:.0f}%"


def time_candidates(models: Mapping[str, Callable[..., Any]], inputs: Any, rounds: int,
                    config: Any = None) -> dict[str, list[float]]:
    """Per candidate, the per-round p50 (ms), all candidates interleaved (:func:`compare_latency`)."""
    from lightning_latency.latency.measure import LatencyConfig, compare_latency

    config = config or LatencyConfig(warmup=3, min_runs=10, min_time_s=0.05, max_time_s=2.0, track_memory=False)
    reports = compare_latency(dict(models), inputs, config, rounds=rounds)
    return {name: list(r.round_medians_ms) for name, r in reports.items()}


def choose(candidates: list[Candidate]) -> tuple[str, str]:
    """``(name, why)`` of the fastest accepted candidate; ValueError when none was accepted."""
    accepted = sorted((c for c in candidates if c.accepted and c.p50_ms is not None), key=lambda c: c.p50_ms)
    if not accepted:
        notes = "; ".join(f"{c.name}: {c.note or 'not timed'}" for c in candidates)
        raise ValueError(f"deploy(backend='auto') found no candidate that agrees with the reference ({notes}). "
                         f"Raise `tolerance`, give more representative `calibration` batches, or force a backend.")
    best = accepted[0]
    rejected = [c.name for c in candidates if not c.accepted and c.p50_ms is not None and c.p50_ms < best.p50_ms]
    also = f" (faster but rejected for disagreeing: {', '.join(rejected)})" if rejected else ""
    if len(accepted) == 1:
        return best.name, "the only candidate whose outputs agree with the reference" + also
    runner = accepted[1]
    faster = runner.p50_ms / best.p50_ms
    why = f"fastest of {len(accepted)} agreeing candidates at these shapes, x{faster:.2f} ahead of {runner.name!r}" + also
    if best.spread is not None and faster - 1 < best.spread:
        why += f"; the margin is within the rounds' spread ({100 * best.spread:.0f}%)"
    return best.name, why


__all__ = ["Agreement", "Candidate", "DeployReport", "agreement", "choose", "time_candidates"]
