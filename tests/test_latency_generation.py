from __future__ import annotations

import pytest
import torch
from helpers import tiny_llama
from helpers_latency import FakeClock
from torch import nn

from lightning_latency.latency import LatencyConfig, measure_generation
from lightning_latency.latency.sweep import sweep_generation

MS = 1e-3


class FakeGenerator(nn.Module):
    """``generate`` costs ``prefill`` for the first token and ``decode`` for each further one (on a fake clock)."""

    def __init__(self, clock: FakeClock, prefill: float, decode: float) -> None:
        super().__init__()
        self.clock, self.prefill, self.decode = clock, prefill, decode
        self.proj = nn.Linear(2, 2)
        self.calls: list[dict] = []

    def generate(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, **kw) -> torch.Tensor:
        self.calls.append(kw)
        n = kw["max_new_tokens"]
        self.clock.advance(self.prefill + (n - 1) * self.decode)
        return torch.cat([input_ids, torch.zeros(input_ids.shape[0], n, dtype=input_ids.dtype)], dim=1)


def test_ttft_tpot_from_fake_clock() -> None:
    clock = FakeClock()
    model = FakeGenerator(clock, prefill=20 * MS, decode=5 * MS)
    cfg = LatencyConfig(warmup=1, min_runs=4, min_time_s=0.0, clock=clock)
    r = measure_generation(model, None, cfg, prompt_len=16, new_tokens=9, batch_size=2)
    assert r.ttft_ms == pytest.approx(20.0)
    assert r.total_ms == pytest.approx(20.0 + 8 * 5.0)
    assert r.tpot_ms == pytest.approx(5.0)
    assert r.tokens_per_s == pytest.approx(2 * 9 / 0.060)
    assert r.decode_tokens_per_s == pytest.approx(2 / 0.005)
    assert r.count == 4 and r.prompt_len == 16 and r.batch_size == 2 and not r.unstable
    # greedy, fixed length: min_new_tokens == max_new_tokens on every call, calls alternate TTFT / full
    assert all(c["do_sample"] is False and c["min_new_tokens"] == c["max_new_tokens"] for c in model.calls)
    assert [c["max_new_tokens"] for c in model.calls[-4:]] == [1, 9, 1, 9]


def test_real_tiny_llama_exact_length_even_when_eos_is_greedy() -> None:
    model = tiny_llama().train()
    ids = torch.randint(0, 128, (1, 8))
    with torch.no_grad():
        first = int(model(input_ids=ids).logits[0, -1].argmax())
    model.generation_config.eos_token_id = first  # without min_new_tokens generation would stop after 1 token
    r = measure_generation(model, {"input_ids": ids}, prompt_len=8, new_tokens=4, warmup=1, min_runs=2,
                           min_time_s=0.0, max_time_s=3.0)
    assert r.new_tokens == 4 and r.ttft_ms > 0 and r.tokens_per_s > 0 and r.count >= 1
    assert model.training
    # K and V: 2 layers × 2 KV heads × head_dim 16 × (8 + 4/2) context × fp32
    assert r.kv_cache_mb == pytest.approx(2 * 2 * 2 * 16 * 10 * 4 / 2**20)
    r2 = measure_generation(model, {"input_ids": ids}, new_tokens=3, warmup=0, min_runs=1, min_time_s=0.0,
                            peak_bandwidth=1e10)
    assert r2.mbu is not None and r2.mbu > 0 and "TPOT" in r2.summary()


def test_sweep_generation_names_points() -> None:
    clock = FakeClock()
    model = FakeGenerator(clock, prefill=2 * MS, decode=1 * MS)
    cfg = LatencyConfig(warmup=0, min_runs=1, min_time_s=0.0, clock=clock)
    reports = sweep_generation(model, batch_sizes=[1, 2], prompt_lens=[4], new_tokens=3, config=cfg)
    assert [r.name for r in reports] == ["b1_p4", "b2_p4"]
    assert all(r.tpot_ms == pytest.approx(1.0) for r in reports)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        (dict(new_tokens=1), r"`new_tokens` must be an integer >= 2, got 1\. TPOT"),
        (dict(prompt_len=0), r"`prompt_len` must be an integer >= 1, got 0"),
        (dict(batch_size=0), r"`batch_size` must be an integer >= 1, got 0"),
        (dict(inputs=torch.randn(1, 4)), r"`inputs` for generation must be token ids"),
    ],
)
def test_generation_misconfiguration(kwargs: dict, match: str) -> None:
    clock = FakeClock()
    with pytest.raises(ValueError, match=match):
        measure_generation(FakeGenerator(clock, MS, MS), **kwargs)


def test_model_without_generate_is_refused() -> None:
    with pytest.raises(ValueError, match="`model` must have a `generate` method"):
        measure_generation(nn.Linear(2, 2))
