from __future__ import annotations

import pytest
import torch
from helpers import tiny_bert
from helpers_latency import FakeClock
from torch import nn

from lightning_latency.latency import LatencyConfig
from lightning_latency.latency.breakdown import module_breakdown

MS = 1e-3


class Tick(nn.Module):
    def __init__(self, clock: FakeClock, seconds: float) -> None:
        super().__init__()
        self.clock, self.seconds = clock, seconds
        self.proj = nn.Linear(4, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.clock.advance(self.seconds)
        return self.proj(x)


class Block(nn.Module):
    def __init__(self, clock: FakeClock) -> None:
        super().__init__()
        self.self_attn, self.mlp = Tick(clock, 3 * MS), Tick(clock, 2 * MS)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.mlp(self.self_attn(x))


class FakeLM(nn.Module):
    def __init__(self, clock: FakeClock) -> None:
        super().__init__()
        self.layers = nn.ModuleList([Block(clock), Block(clock)])
        self.lm_head = Tick(clock, 5 * MS)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            x = layer(x)
        return self.lm_head(x)


def test_pattern_breakdown_from_fake_clock() -> None:
    clock = FakeClock()
    model = FakeLM(clock).train()
    cfg = LatencyConfig(warmup=1, min_runs=3, min_time_s=0.0, clock=clock)
    rep = module_breakdown(model, torch.randn(2, 4), cfg)
    rows = {r.name: r for r in rep.rows}
    assert rows["attention"].ms_per_forward == pytest.approx(6.0) and rows["attention"].calls_per_forward == 2
    assert rows["mlp"].ms_per_forward == pytest.approx(4.0)
    assert rows["head"].ms_per_forward == pytest.approx(5.0)
    assert rep.total_ms == pytest.approx(15.0) and rep.runs == 3
    assert [r.name for r in rep.top(2)] == ["attention", "head"]
    assert rows["attention"].share == pytest.approx(0.4)
    assert "attention" in rep.table()
    assert model.training
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in model.modules())  # hooks removed


def test_type_and_name_grouping() -> None:
    clock = FakeClock()
    cfg = LatencyConfig(warmup=0, min_runs=1, min_time_s=0.0, clock=clock)
    by_type = {r.name: r for r in module_breakdown(FakeLM(clock), torch.randn(1, 4), cfg, group_by="type").rows}
    assert by_type["Tick"].ms_per_forward == pytest.approx(15.0) and by_type["Tick"].calls_per_forward == 5
    assert by_type["Block"].ms_per_forward == pytest.approx(10.0)  # inclusive of its children
    rows = module_breakdown(FakeLM(clock), torch.randn(1, 4), cfg, group_by="name", depth=2).rows
    by_name = {r.name: r.ms_per_forward for r in rows}
    assert by_name == pytest.approx({"layers.0": 5.0, "layers.1": 5.0, "lm_head": 5.0, "lm_head.proj": 0.0})  # a ModuleList is never called
    with pytest.raises(ValueError, match="`group_by` must be 'type', 'name' or 'pattern', got 'layer'"):
        module_breakdown(FakeLM(clock), torch.randn(1, 4), cfg, group_by="layer")


def test_real_tiny_bert_finds_attention_and_mlp() -> None:
    ids = torch.randint(0, 128, (2, 16))
    rep = module_breakdown(tiny_bert(), {"input_ids": ids}, warmup=1, min_runs=2, min_time_s=0.0)
    names = {r.name for r in rep.rows}
    assert {"attention", "mlp", "embeddings", "head"} <= names
    assert sum(r.share for r in rep.rows) <= 1.0 + 1e-6  # pattern groups never overlap
