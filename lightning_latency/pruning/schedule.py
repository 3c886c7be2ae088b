"""Sparsity schedules as data: the sparsity at a position is a pure function of (position, schedule)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from lightning_latency.pruning.config import check_sparsity

_CURVES = ("cubic", "linear")


@dataclass
class PruningSchedule:
    """Sparsity rising from ``initial_sparsity`` at ``start`` to ``final_sparsity`` at ``end``.

    Pruning happens at ``start``, then every ``frequency`` positions, and always at ``end`` (positions are optimizer
    steps, or completed epochs when the callback runs per epoch).

    Args:
        initial_sparsity: sparsity applied at ``start``.
        final_sparsity: sparsity reached at ``end`` and kept afterwards.
        start: first position at which pruning happens.
        end: position at which ``final_sparsity`` is reached; ``start == end`` is one-shot pruning.
        frequency: positions between two pruning steps.
        curve: ``"cubic"`` (Zhu & Gupta 2017: prunes fast early, gently near the end), ``"linear"``, or a callable
            ``fn(progress) -> fraction`` mapping progress in [0, 1] to the fraction of the way from initial to final.
    """

    initial_sparsity: float = 0.0
    final_sparsity: float = 0.5
    start: int = 0
    end: int = 0
    frequency: int = 1
    curve: str | Callable[[float], float] = "cubic"

    def __post_init__(self) -> None:
        check_sparsity(self.initial_sparsity, "initial_sparsity")
        check_sparsity(self.final_sparsity, "final_sparsity")
        if self.initial_sparsity > self.final_sparsity:
            raise ValueError(
                f"`initial_sparsity` ({self.initial_sparsity}) must not exceed `final_sparsity` "
                f"({self.final_sparsity}). Pass initial_sparsity=0.0 to start from the dense model."
            )
        for name in ("start", "end"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ValueError(f"`{name}` must be an integer >= 0, got {value!r}.")
        if self.start > self.end:
            raise ValueError(
                f"`start` ({self.start}) is after `end` ({self.end}). Pass start <= end, e.g. start=0, end={self.start}."
            )
        if isinstance(self.frequency, bool) or not isinstance(self.frequency, int) or self.frequency <= 0:
            raise ValueError(f"`frequency` must be an integer > 0, got {self.frequency!r}. Use frequency=1 to prune at "
                             f"every position between start and end.")
        if isinstance(self.curve, str):
            if self.curve not in _CURVES:
                raise ValueError(
                    f"`curve` must be one of {list(_CURVES)} or a callable progress -> fraction, got {self.curve!r}."
                )
        elif not callable(self.curve):
            raise ValueError(f"`curve` must be 'cubic', 'linear' or a callable, got {type(self.curve).__name__}.")

    def sparsity_at(self, position: int) -> float:
        """Scheduled sparsity at ``position`` (0 before ``start``)."""
        if position < self.start:
            return 0.0
        if position >= self.end:
            return self.final_sparsity
        progress = (position - self.start) / (self.end - self.start)
        if self.curve == "cubic":
            fraction = 1.0 - (1.0 - progress) ** 3
        elif self.curve == "linear":
            fraction = progress
        else:
            fraction = float(self.curve(progress))  # type: ignore[operator]
        fraction = min(max(fraction, 0.0), 1.0)
        return self.initial_sparsity + (self.final_sparsity - self.initial_sparsity) * fraction

    def is_pruning_position(self, position: int) -> bool:
        """True where a pruning step is due: ``start``, every ``frequency`` after it, and ``end``."""
        if position < self.start or position > self.end:
            return False
        return position == self.end or (position - self.start) % self.frequency == 0

    def positions(self) -> list[int]:
        """Every position at which pruning happens, in order."""
        return [p for p in range(self.start, self.end + 1) if self.is_pruning_position(p)]
