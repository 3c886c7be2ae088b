from __future__ import annotations

import pytest
import torch
from helpers import tiny_bert
from helpers_latency import FakeClock, ScriptedModel

from lightning_latency.latency import LatencyConfig
from lightning_latency.latency.sweep import random_token_inputs, sweep_latency, sweep_table


def test_sweep_grid_uses_each_shape() -> None:
    clock = FakeClock()
    model = ScriptedModel(clock, [1e-3])
    shapes = []

    def build(b: int, s: int) -> torch.Tensor:
        shapes.append((b, s))
        return torch.zeros(b, s, dtype=torch.long)

    cfg = LatencyConfig(warmup=0, min_runs=2, min_time_s=0.0, clock=clock)
    reports = sweep_latency(model, [1, 4], [8, 16], inputs_fn=build, config=cfg)
    assert shapes == [(1, 8), (1, 16), (4, 8), (4, 16)]
    assert [r.name for r in reports] == ["b1_s8", "b1_s16", "b4_s8", "b4_s16"]
    assert reports[3].tokens_per_s == pytest.approx(64 / 1e-3) and reports[3].samples_per_s == pytest.approx(4 / 1e-3)
    assert "b4_s16" in sweep_table(reports)


def test_sweep_default_inputs_on_tiny_bert() -> None:
    model = tiny_bert()
    x = random_token_inputs(model, 2, 8)
    assert x["input_ids"].shape == (2, 8) and int(x["input_ids"].max()) < model.config.vocab_size
    reports = sweep_latency(model, [1], [8], warmup=0, min_runs=1, min_time_s=0.0)
    assert reports[0].seq_len == 8 and reports[0].batch_size == 1


@pytest.mark.parametrize(("kwargs", "match"), [(dict(batch_sizes=[]), "`batch_sizes` must be a non-empty list"),
                                               (dict(seq_lens=[0]), r"`seq_lens` must be .* got \[0\]")])
def test_sweep_misconfiguration(kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        sweep_latency(tiny_bert(), **kwargs)
