"""Latency timed side by side with a reference model, on the reference's scale: machine drift cancels.

A 2-core shared machine moves 10-30% between minutes, so a budget run that compares a pruned candidate measured
now with a dense figure taken twenty minutes ago compares two machines. :class:`AnchoredLatency` times the
candidate ``c`` and the reference ``r`` in rounds of ``c r r c`` and returns ``anchor_ms × median over rounds of
√(c₁c₂ / r₁r₂)``: the candidate's latency as the machine would have shown it when the reference was first timed.
Drift steady over a round cancels exactly (the symmetric order puts both at the same mean time). Subclasses say
what a model's timed form is (:meth:`_build`), how one timing is taken (:meth:`_time`) and how a form gets a fresh
runtime session between rounds (:meth:`_renew`).
"""

from __future__ import annotations

import math
import statistics
from typing import Any

from torch import nn


def check_rounds(rounds: Any) -> int:
    """``rounds`` as a positive int, else a ValueError naming it."""
    if isinstance(rounds, bool) or not isinstance(rounds, int) or rounds < 1:
        raise ValueError(f"`rounds` must be a positive integer (side-by-side timing rounds per call), got "
                         f"{rounds!r}. E.g. rounds=3.")
    return rounds


class AnchoredLatency:
    """``latency_fn(model) -> ms``, anchored on a reference after :meth:`anchor` (plain timings before).

    Unanchored, a call returns the median over ``rounds`` timings (each of a renewed form).
    """

    def __init__(self, rounds: int) -> None:
        self.rounds = check_rounds(rounds)
        self.anchor_ms: float | None = None
        self._reference: Any = None

    def _build(self, model: nn.Module) -> Any:
        """The form that is timed (the model itself by default; a deployment form, a copy, …)."""
        return model

    def _reference_form(self, model: nn.Module) -> Any:
        """The reference's form, independent of later changes to ``model`` (a deep copy by default)."""
        from lightning_latency.latency.compiled import _deepcopy_detached

        return self._build(_deepcopy_detached(model))

    def _time(self, form: Any) -> float:
        raise NotImplementedError

    def _renew(self, form: Any) -> None:
        """Between rounds: a fresh runtime session where the form has one (nothing by default)."""

    def anchor(self, reference: nn.Module) -> float:
        """Time every later call beside ``reference`` (as it is now); returns its latency (median of three), the
        scale later values are given in."""
        self._reference = self._reference_form(reference)
        self.anchor_ms = statistics.median(self._time(self._reference) for _ in range(3))
        return self.anchor_ms

    @property
    def anchored(self) -> bool:
        return self._reference is not None and self.anchor_ms is not None

    def _ratio(self, form: Any) -> float:
        c1, r1, r2, c2 = self._time(form), self._time(self._reference), self._time(self._reference), self._time(form)
        return math.sqrt(c1 * c2 / (r1 * r2))

    def __call__(self, model: nn.Module) -> float:
        form = self._build(model)
        values = []
        for i in range(self.rounds):
            if i:
                self._renew(form)
            values.append(self._ratio(form) if self.anchored else self._time(form))
        return (self.anchor_ms if self.anchored else 1.0) * statistics.median(values)


__all__ = ["AnchoredLatency", "check_rounds"]
