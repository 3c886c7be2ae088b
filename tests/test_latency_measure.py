from __future__ import annotations

import pytest
import torch
from helpers import tiny_bert
from helpers_latency import FakeClock, ScriptedModel
from torch import nn

from lightning_latency.latency import LatencyConfig, compare_latency, measure_latency

MS = 1e-3


def _cfg(clock: FakeClock, **kw) -> LatencyConfig:
    base = dict(warmup=2, min_runs=10, min_time_s=0.0, max_time_s=100.0, clock=clock, track_memory=False)
    base.update(kw)
    return LatencyConfig(**base)


def test_statistics_from_fake_clock_exclude_warmup() -> None:
    clock = FakeClock()
    # two warm-up calls of 100 ms, then 1..10 ms: the warm-ups must not leak into the statistics
    model = ScriptedModel(clock, [0.1, 0.1] + [k * MS for k in range(1, 11)])
    ids = torch.zeros(4, 16, dtype=torch.long)
    r = measure_latency(model, ids, _cfg(clock))
    assert r.count == 10
    assert r.median_ms == pytest.approx(5.5) and r.mean_ms == pytest.approx(5.5)
    assert r.p90_ms == pytest.approx(9.1) and r.min_ms == pytest.approx(1.0)
    assert r.iqr_ms == pytest.approx(4.5) and r.unstable
    assert r.first_call_ms == pytest.approx(100.0)
    assert r.batch_size == 4 and r.seq_len == 16 and r.tokens_per_call == 64
    assert r.samples_per_s == pytest.approx(4 / 5.5e-3)
    assert r.tokens_per_s == pytest.approx(64 / 5.5e-3)
    assert r.times_ms == pytest.approx([float(k) for k in range(1, 11)])


def test_stops_at_min_runs_and_min_time() -> None:
    clock = FakeClock()
    model = ScriptedModel(clock, [10 * MS])
    # min_time dominates: 0.25 s of timed runs at 10 ms each -> 25 runs
    r = measure_latency(model, torch.ones(1, 3), _cfg(clock, warmup=0, min_runs=5, min_time_s=0.25))
    assert r.count == 25 and not r.budget_exhausted and not r.unstable
    # min_runs dominates
    r = measure_latency(model, torch.ones(1, 3), _cfg(clock, warmup=0, min_runs=7, min_time_s=0.01))
    assert r.count == 7


def test_time_budget_bounds_the_measurement() -> None:
    clock = FakeClock()
    model = ScriptedModel(clock, [10 * MS])
    r = measure_latency(model, torch.ones(1, 3), _cfg(clock, warmup=1, min_runs=1000, max_runs=1000, max_time_s=0.05))
    assert r.budget_exhausted and r.count == 5
    assert r.total_time_s == pytest.approx(0.05)


def test_eval_inference_mode_and_training_flags_restored() -> None:
    clock = FakeClock()
    model = ScriptedModel(clock, [MS])
    model.frozen = nn.Linear(2, 2).eval()  # e.g. a frozen teacher inside a training model
    model.train()
    model.frozen.eval()
    measure_latency(model, torch.ones(2, 2), _cfg(clock, warmup=1, min_runs=3))
    assert all(t is False for t in model.seen_training) and not any(model.seen_grad)
    assert model.training and not model.frozen.training


def test_input_forms_tensor_tuple_dict_callable() -> None:
    clock = FakeClock()
    model = ScriptedModel(clock, [MS])
    x = torch.zeros(3, 5, dtype=torch.long)
    for inputs in (x, (x, x), [x], {"x": x, "attention_mask": torch.ones(3, 5)}, lambda: {"x": x}):
        r = measure_latency(model, inputs, _cfg(clock, warmup=0, min_runs=2))
        assert r.count == 2 and r.batch_size == 3
    masked = {"input_ids": x, "attention_mask": torch.tensor([[1] * 5, [1] * 3 + [0] * 2, [1] * 5])}
    r = measure_latency(lambda input_ids, attention_mask: input_ids, masked, _cfg(clock, warmup=0, min_runs=2))
    assert r.tokens_per_call == 13  # padding excluded
    with pytest.raises(ValueError, match="inputs"):
        measure_latency(model, 3.0, _cfg(clock))


def test_threads_fixed_and_reported_then_restored() -> None:
    clock = FakeClock()
    before = torch.get_num_threads()
    r = measure_latency(ScriptedModel(clock, [MS]), torch.ones(1, 1), _cfg(clock, threads=1, min_runs=2))
    assert r.num_threads == 1 and torch.get_num_threads() == before


def test_overrides_and_config_validation() -> None:
    clock = FakeClock()
    r = measure_latency(ScriptedModel(clock, [MS]), torch.ones(1, 1), _cfg(clock), min_runs=3, warmup=0)
    assert r.count == 3
    with pytest.raises(ValueError, match="Unknown LatencyConfig field.*min_run"):
        measure_latency(ScriptedModel(clock, [MS]), torch.ones(1, 1), min_run=3)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        (dict(warmup=-1), r"`warmup` must be an integer >= 0, got -1"),
        (dict(min_runs=0), r"`min_runs` must be an integer >= 1, got 0"),
        (dict(min_time_s=-0.1), r"`min_time_s` must be a number of seconds >= 0, got -0.1"),
        (dict(min_time_s=2.0, max_time_s=1.0), r"`max_time_s` \(1.0\) must be >= `min_time_s` \(2.0\)"),
        (dict(min_runs=10, max_runs=5), r"`max_runs` \(5\) must be >= `min_runs` \(10\)"),
        (dict(threads=0), r"`threads` must be None or an integer >= 1, got 0"),
        (dict(device="gpu0"), r"`device` must name a torch device, got 'gpu0'"),
        (dict(unstable_threshold=0), r"`unstable_threshold` must be > 0"),
        (dict(peak_bandwidth=-1.0), r"`peak_bandwidth` must be None or a positive rate"),
        (dict(batch_size=0), r"`batch_size` must be None or an integer >= 1, got 0"),
        (dict(clock=5), r"`clock` must be a callable"),
    ],
)
def test_config_misconfiguration(kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        LatencyConfig(**kwargs)


def test_compare_interleaves_and_keeps_best_round() -> None:
    clock, log = FakeClock(), []
    # model a: round medians 5, 3, 4 ms; model b: 2 ms always
    a = ScriptedModel(clock, [5 * MS] * 3 + [3 * MS] * 3 + [4 * MS] * 3, name="a", log=log)
    b = ScriptedModel(clock, [2 * MS], name="b", log=log)
    cfg = _cfg(clock, warmup=0, min_runs=3)
    reports = compare_latency({"a": a, "b": b}, torch.ones(2, 2), cfg, rounds=3)
    assert log == ["a"] * 3 + ["b"] * 3 + ["a"] * 3 + ["b"] * 3 + ["a"] * 3 + ["b"] * 3
    assert reports["a"].median_ms == pytest.approx(3.0)
    assert reports["a"].round_medians_ms == pytest.approx([5.0, 3.0, 4.0])
    assert reports["a"].name == "a"
    assert reports["a"].speedup_over(reports["b"]) == pytest.approx(2 / 3)
    with pytest.raises(ValueError, match="`rounds` must be an integer >= 1, got 0"):
        compare_latency({"a": a}, torch.ones(1), cfg, rounds=0)
    with pytest.raises(ValueError, match="`models` must be a non-empty dict"):
        compare_latency({}, torch.ones(1), cfg)


def test_real_tiny_bert_report_fields_and_model_untouched() -> None:
    model = tiny_bert().train()
    ids = torch.randint(0, 128, (2, 16))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    r = measure_latency(model, {"input_ids": ids, "attention_mask": torch.ones_like(ids)},
                        warmup=1, min_runs=3, min_time_s=0.0, max_time_s=2.0, device="cpu")
    assert r.count >= 1 and r.median_ms > 0 and r.min_ms <= r.median_ms <= r.p90_ms <= r.p99_ms
    assert r.num_params == sum(p.numel() for p in model.parameters())
    assert r.model_mb > 0 and r.peak_memory_mb is not None and r.peak_memory_mb >= 0
    assert r.mbu is None and r.mfu is None  # CPU: no known peaks unless passed
    assert model.training
    for k, v in model.state_dict().items():
        torch.testing.assert_close(v, before[k], rtol=0, atol=0)
    r2 = measure_latency(model, {"input_ids": ids}, warmup=0, min_runs=2, min_time_s=0.0, peak_bandwidth=1e10,
                         peak_flops=1e11)
    assert 0 < r2.mbu and 0 < r2.mfu
    assert r2.to_dict()["median_ms"] == r2.median_ms and "median" in r2.summary()


def test_compiled_deployment_form_runs_on_a_copy() -> None:
    torch._dynamo.reset()
    model = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 2)).train()
    r = measure_latency(model, torch.randn(4, 8), warmup=1, min_runs=2, min_time_s=0.0, compile=True)
    assert r.compiled and r.count >= 1 and r.first_call_ms > 0
    assert type(model) is nn.Sequential and model.training and not hasattr(model, "_orig_mod")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_measurement_on_a_copy_syncs_and_tracks_peak() -> None:
    model = tiny_bert()  # stays on CPU: the measurement runs on a CUDA deep copy
    ids = torch.randint(0, 128, (4, 32))
    r = measure_latency(model, {"input_ids": ids}, device="cuda", warmup=2, min_runs=5, min_time_s=0.0)
    assert r.device.startswith("cuda") and r.count >= 5 and r.peak_memory_mb is not None and r.peak_memory_mb > 0
    assert next(model.parameters()).device.type == "cpu"
