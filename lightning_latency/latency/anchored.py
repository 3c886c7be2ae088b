"""Latency timed side by side with a reference model, on the reference's scale: machine drift cancels.

A 2-core shared machine moves 10-30% between minutes, so a budget run that compares a pruned candidate measured
now with a dense figure taken twenty minutes ago compares two machines. :class:`AnchoredLatency` times the
candidate ``c`` and the reference ``r`` in rounds of ``c r r c`` and returns ``anchor_ms × median over rounds of
√(c₁c₂ / r₁r₂)``: the candidate's latency as the machine would have shown it when the reference was first timed.
Drift steady over a round cancels exactly (the symmetric order puts both at the same mean time). Bursts shorter
than a block do not: a subclass that can make single calls (:meth:`_pair`) is timed call by call, alternated
(:func:`alternated_ratio`), instead. Subclasses say what a model's timed form is (:meth:`_build`), how one timing
is taken (:meth:`_time`), how a form gets a fresh runtime session between rounds (:meth:`_renew`) and, optionally,
how to call it once (:meth:`_pair`).
"""

from __future__ import annotations

import math
import statistics
import time
from collections.abc import Callable
from typing import Any

from torch import nn


def alternated_ratio(candidate: Callable[[], Any], reference: Callable[[], Any], pairs: int, warmup: int = 2,
                     clock: Callable[[], float] | None = None, self_timed: bool = False) -> float:
    """``median(candidate call times) / median(reference call times)`` over ``pairs`` pairs of single calls, the
    order flipped every pair (c r, r c, c r, ...), after ``warmup`` calls of each.

    Alternating call by call puts the two within milliseconds of each other, so bursts from other work on the machine
    hit both alike. Measured (two sessions of one MiniLM ORT int8 graph, true ratio 1.0, AVX2 EPYC, 2 cores, 12
    repeats): blocks of 40 calls in c r r c order gave ratios 0.987-1.246 (sd 0.069); 80 alternated pairs gave
    0.998-1.010 (sd 0.003). A single long-lived session's p50 moved 15-32% between blocks seconds apart, so the
    noise is the machine's, not the sessions'.

    ``self_timed``: each call returns its own reading (e.g. a TPOT), used instead of its wall time.
    """
    clock = clock or time.perf_counter
    for _ in range(warmup):
        candidate()
        reference()
    times: tuple[list[float], list[float]] = ([], [])
    for i in range(pairs):
        for which in ((0, 1) if i % 2 == 0 else (1, 0)):
            start = clock()
            value = (candidate if which == 0 else reference)()
            times[which].append(float(value) if self_timed else clock() - start)
    return statistics.median(times[0]) / statistics.median(times[1])


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

    self_timed = False  # True where the alternated calls of :meth:`_pair` return their own readings

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

    def _pair(self, form: Any) -> tuple[Callable[[], Any], Callable[[], Any], int] | None:
        """``(one call of form, one call of the reference, pairs)`` to time them alternately call by call
        (:func:`alternated_ratio`); None (the default) times them in blocks, ``c r r c``."""
        return None

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
        pair = self._pair(form)
        if pair is not None:
            return alternated_ratio(*pair, self_timed=self.self_timed)
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


__all__ = ["AnchoredLatency", "alternated_ratio", "check_rounds"]
