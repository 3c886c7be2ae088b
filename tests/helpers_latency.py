"""Fake clock and scripted models for the latency tests: statistics are checked without sleeps or real timings."""

from __future__ import annotations

import itertools
from collections.abc import Iterable

import torch
from torch import nn


class FakeClock:
    """A clock that only moves when a scripted model runs (``advance``)."""

    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


class ScriptedModel(nn.Module):
    """Each forward advances ``clock`` by the next of ``durations`` (seconds), cycling; records calls."""

    def __init__(self, clock: FakeClock, durations: Iterable[float], name: str = "m", log: list | None = None) -> None:
        super().__init__()
        self.clock = clock
        self.durations = itertools.cycle(list(durations))
        self.name = name
        self.log = log if log is not None else []
        self.weight = nn.Parameter(torch.ones(4))
        self.seen_training: list[bool] = []
        self.seen_grad: list[bool] = []

    def forward(self, x: torch.Tensor, *rest: torch.Tensor, **kwargs: torch.Tensor) -> torch.Tensor:
        self.clock.advance(next(self.durations))
        self.log.append(self.name)
        self.seen_training.append(self.training)
        self.seen_grad.append(torch.is_grad_enabled())
        return x.float().sum() * self.weight.sum()
