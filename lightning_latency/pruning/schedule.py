"""Sparsity schedules as data: the sparsity at a position is a pure function of (position, schedule)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from lightning_latency._deprecation import deprecated, renamed
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


_STEP_ARGS = ("start_step", "end_step", "every_n_steps")
_EPOCH_ARGS = ("start_epoch", "end_epoch", "every_n_epochs")
_INTERVALS = ("step", "epoch")


def schedule_from_arguments(owner: str, initial_sparsity: float, final_sparsity: float,
                            curve: str | Callable[[float], float], positions: dict[str, int | None],
                            start: int | None = None, end: int | None = None, frequency: int | None = None,
                            interval: str | None = None) -> tuple[PruningSchedule, str]:
    """The schedule and its interval (``"step"``/``"epoch"``) from a callback's arguments.

    ``positions`` holds ``start_step``, ``end_step``, ``every_n_steps``, ``start_epoch``, ``end_epoch``,
    ``every_n_epochs`` (None: not given); epoch ones make an epoch schedule, and mixing the two kinds is an error.
    The deprecated ``start``/``end``/``frequency``/``interval`` map onto them with a warning. Errors name the
    argument the user passed (``curve`` is the callback's ``schedule``).
    """
    if not callable(curve) and curve not in _CURVES:
        raise ValueError(f"`schedule` must be 'cubic', 'linear' or a callable progress -> fraction, got {curve!r}. "
                         f"Use schedule='cubic'.")
    if interval is not None:
        if interval not in _INTERVALS:
            raise ValueError(f"`interval` must be one of {list(_INTERVALS)}, got {interval!r}. Use interval='step'.")
        deprecated(f"{owner}(`interval`=...) is deprecated and will be removed in the next release: pass "
                   f"start_epoch/end_epoch/every_n_epochs for an epoch schedule, start_step/end_step/every_n_steps "
                   f"for a step one.")
    steps = [n for n in _STEP_ARGS if positions.get(n) is not None]
    epochs = [n for n in _EPOCH_ARGS if positions.get(n) is not None]
    by_epoch = interval == "epoch" if interval is not None else bool(epochs)
    wrong = (steps if by_epoch else epochs) if interval is not None else (steps if epochs else [])
    if wrong or (steps and epochs):
        first, second = (steps or [f"interval={interval!r}"])[0], (epochs or [f"interval={interval!r}"])[0]
        raise ValueError(f"{owner}: `{first}` and `{second}` both given: a schedule counts optimizer steps or "
                         f"epochs, not both. Pass only {'/'.join(_STEP_ARGS)} or only {'/'.join(_EPOCH_ARGS)}.")
    names, unit = (_EPOCH_ARGS, "epoch") if by_epoch else (_STEP_ARGS, "step")
    values = [renamed(owner, old, old_value, new, positions.get(new), None)
              for old, old_value, new in zip(("start", "end", "frequency"), (start, end, frequency), names)]
    first = 0 if values[0] is None else values[0]
    last = first if values[1] is None else values[1]
    every = 1 if values[2] is None else values[2]
    for name, value, low in zip(names, (first, last, every), (0, 0, 1)):
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            hint = f" Use {name}=1 to prune at every {unit} between start and end." if low else ""
            raise ValueError(f"`{name}` must be an integer >= {low}, got {value!r}.{hint}")
    if first > last:
        raise ValueError(f"`{names[0]}` ({first}) is after `{names[1]}` ({last}). Pass {names[0]} <= {names[1]}, "
                         f"e.g. {names[0]}=0, {names[1]}={first}.")
    return PruningSchedule(initial_sparsity, final_sparsity, first, last, every, curve), unit
