"""Latency-budget pruning (lightning_latency/pruning/budget.py, budget_callback.py): sensitivity, plan, callback.

Latency here is an injected fake (a linear cost per head and per neuron of the current structure): no timing in tests.
"""

from __future__ import annotations

import copy
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import torch
from helpers import VOCAB, HFModule, read_csv_metrics, tiny_bert, tiny_llama, trainer_kwargs
from torch import nn

from lightning_latency._compat import MisconfigurationException, Trainer, pl
from lightning_latency.pruning.budget import (
    BudgetUnreachable,
    Move,
    apply_moves,
    greedy_moves,
    layer_sensitivity,
    plan_budget,
    prunable_units,
    unit_counts,
)
from lightning_latency.pruning.budget_callback import LatencyBudgetPruning
from lightning_latency.pruning.structured import structure

HEAD_MS, NEURON_MS, FIXED_MS = 1.0, 0.01, 2.0


def fake_latency(model: nn.Module) -> float:
    """2 ms fixed + 1 ms per query head + 0.01 ms per MLP neuron of the current structure."""
    s = structure(model)
    return FIXED_MS + sum(v.get("heads", 0) * HEAD_MS + v.get("neurons", 0) * NEURON_MS for v in s.values())


def _batches(n: int = 2, seq: int = 16) -> list[dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(0)
    out = []
    for _ in range(n):
        ids = torch.randint(0, VOCAB, (4, seq), generator=g)
        out.append({"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": torch.tensor([0, 1, 0, 1])})
    return out


def _loss(model: nn.Module, batch: Any) -> torch.Tensor:
    return model(**batch).loss


def _hand_made_bert() -> nn.Module:
    """Layer 1's attention output is zero (its heads cost nothing to remove); layer 0's heads carry the signal."""
    model = tiny_bert().eval()
    with torch.no_grad():
        model.bert.encoder.layer[1].attention.output.dense.weight.zero_()
        model.bert.encoder.layer[0].attention.self.value.weight.mul_(8.0)
        model.classifier.weight.mul_(20.0)
    return model


def test_sensitivity_orders_layers_as_the_hand_made_case_demands() -> None:
    model = _hand_made_bert()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    report = layer_sensitivity(model, _loss, _batches(), fractions=(0.5,), latency_fn=fake_latency)
    free = report.row("bert.encoder.layer.1.attention", "heads", 0.5)
    costly = report.row("bert.encoder.layer.0.attention", "heads", 0.5)
    assert abs(free.delta_loss) < 1e-5 < abs(costly.delta_loss)
    assert free.saved_ms == pytest.approx(2 * HEAD_MS) and free.removed == 2
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())  # the model itself is untouched
    assert "bert.encoder.layer.1.attention" in report.format()
    # the plan takes the free milliseconds first
    plan = plan_budget(report, report.base_ms - 2 * HEAD_MS)
    assert plan == [Move("bert.encoder.layer.1.attention", "heads", 0.5)]


def test_sensitivity_plot_is_written(tmp_path: Path) -> None:
    report = layer_sensitivity(tiny_bert(), _loss, _batches(1), fractions=(0.5,), latency_fn=fake_latency)
    path = report.plot(str(tmp_path / "sensitivity.png"))
    assert Path(path).stat().st_size > 1000


def test_plan_meets_the_predicted_budget_and_apply_reaches_it() -> None:
    model = tiny_bert()
    report = layer_sensitivity(model, _loss, _batches(1), latency_fn=fake_latency)
    target = 0.6 * report.base_ms
    plan = plan_budget(report, target)
    apply_moves(model, plan)
    assert fake_latency(model) <= target  # the fake is additive, so the prediction is exact
    assert fake_latency(model) > target - max(HEAD_MS, 0.25 * 128 * NEURON_MS) - 1e-9  # no move more than needed


def test_gqa_units_count_query_heads_per_group() -> None:
    model = tiny_llama()  # 4 heads, 2 KV heads: 2 query heads per group
    units = prunable_units(model)
    assert units[("model.layers.0.self_attn", "heads")] == 2
    apply_moves(model, [Move("model.layers.0.self_attn", "heads", 0.5)])
    assert unit_counts(model)[("model.layers.0.self_attn", "heads")] == 1
    assert model.model.layers[0].self_attn.k_proj.out_features == 2 * 16  # KV heads kept
    model(input_ids=torch.randint(0, VOCAB, (1, 8)))


@pytest.mark.parametrize(
    ("make", "error", "match"),
    [
        (lambda: plan_budget(layer_sensitivity(tiny_bert(), _loss, _batches(1), latency_fn=fake_latency), 1.0),
         BudgetUnreachable, r"`target_ms`=1 cannot be reached.*Pass target_ms >= "),
        (lambda: plan_budget(layer_sensitivity(tiny_bert(), _loss, _batches(1)), 5.0),
         ValueError, r"`report` has no latency"),
        (lambda: layer_sensitivity(tiny_bert(), _loss, []), ValueError, r"`calibration` is empty"),
        (lambda: layer_sensitivity(tiny_bert(), _loss, _batches(1), fractions=(1.5,)),
         ValueError, r"`fractions` must be .* in \(0, 1\), got \[1.5\]"),
        (lambda: prunable_units(nn.Sequential(nn.Linear(4, 4))), ValueError, r"no attention heads or MLP.*Sequential"),
        (lambda: apply_moves(tiny_bert(), [Move("nope", "heads", 0.5)]), ValueError, r"`moves` names 'nope'"),
        (lambda: LatencyBudgetPruning(target_ms=0, latency_fn=fake_latency), ValueError, r"`target_ms` must be .*got 0"),
        (lambda: LatencyBudgetPruning(target_ms="5"), ValueError, r"`target_ms` must be .*got '5'"),
        (lambda: LatencyBudgetPruning(target_ms=5.0), ValueError, r"needs `example_inputs`.*or a `latency_fn"),
        (lambda: LatencyBudgetPruning(target_ms=5.0, latency_fn=fake_latency, every_n_steps=0), ValueError,
         r"`every_n_steps` must be an int >= 1, got 0"),
        (lambda: LatencyBudgetPruning(target_ms=5.0, latency_fn=fake_latency, frequency=0), ValueError,
         r"`every_n_steps` must be an int >= 1, got 0"),  # the deprecated name maps onto the new one
        (lambda: LatencyBudgetPruning(target_ms=5.0, latency_fn=fake_latency, start=1, start_step=2), ValueError,
         r"pass `start_step` only; `start` is its deprecated name"),
        (lambda: LatencyBudgetPruning(target_ms=5.0, latency_fn="fast"), ValueError, r"`latency_fn` must be callable"),
        (lambda: LatencyBudgetPruning(target_ms=5.0, deploy_backend="ort"), ValueError,
         r"`deploy_backend`='ort' times the deployment form on `example_inputs`: pass example_inputs"),
        (lambda: LatencyBudgetPruning(target_ms=5.0, example_inputs=_batches(1)[0], deploy_backend="auto"),
         ValueError, r"`deploy_backend`='auto' would build and time every deployment form"),
        (lambda: LatencyBudgetPruning(target_ms=5.0, example_inputs=_batches(1)[0], deploy_backend="tensorrt"),
         ValueError, r"`deploy_backend` must be one of .*got 'tensorrt'"),
    ],
)
def test_misconfiguration(make, error, match: str) -> None:
    with pytest.raises(error, match=match):
        make()


def _run(folder: Path, module: HFModule, callbacks: list, ckpt_path: str | None = None, **kwargs: Any) -> Trainer:
    trainer = Trainer(**trainer_kwargs(folder, callbacks=callbacks, **kwargs))
    trainer.fit(module, ckpt_path=ckpt_path)
    return trainer


def test_callback_stops_at_the_budget_and_logs(tmp_path: Path) -> None:
    module = HFModule(kind="bert")
    dense = fake_latency(module.model)
    target = 0.55 * dense
    budget = LatencyBudgetPruning(target_ms=target, latency_fn=fake_latency, start_step=2, every_n_steps=2,
                                  steps=3, calibration_batches=2)
    trainer = _run(tmp_path, module, [budget], max_steps=10)
    assert budget.measured_ms is not None and budget.measured_ms <= target
    assert fake_latency(module.model) == pytest.approx(budget.measured_ms)
    assert budget.pruner.done and 0 < len(budget.allocation) <= len(budget.pruner.plan)
    rows = read_csv_metrics(trainer)
    measured = [float(r["budget/measured_ms"]) for r in rows if r.get("budget/measured_ms")]
    assert measured and measured == sorted(measured, reverse=True) and measured[-1] <= target
    assert any(r.get("budget/target_ms") for r in rows)
    # the model still trains and runs after the last structural step
    module.model(**{k: v for k, v in _batches(1)[0].items()})


def test_callback_refuses_an_unreachable_budget_in_setup(tmp_path: Path) -> None:
    budget = LatencyBudgetPruning(target_ms=1.0, latency_fn=fake_latency, start_step=1)
    with pytest.raises(MisconfigurationException, match=r"`target_ms`=1 is below what pruning can reach.*ms\. Pass "
                                                         r"target_ms >= "):
        _run(tmp_path, HFModule(kind="bert"), [budget], max_steps=2)


def test_resume_gives_the_same_allocation(tmp_path: Path) -> None:
    def callbacks(folder: Path) -> list:
        budget = LatencyBudgetPruning(target_ms=0.5 * fake_latency(tiny_bert()), latency_fn=fake_latency,
                                      start_step=2, every_n_steps=2, steps=3, calibration_batches=2)
        return [budget, pl.callbacks.ModelCheckpoint(dirpath=folder, every_n_epochs=1, save_top_k=-1,
                                                     save_on_train_epoch_end=True)]

    full, full_callbacks = HFModule(kind="bert"), callbacks(tmp_path / "ckpt")
    _run(tmp_path / "a", full, full_callbacks, max_steps=8, enable_checkpointing=True)
    checkpoint = tmp_path / "ckpt" / "epoch=0-step=4.ckpt"  # after the first two pruning steps
    assert checkpoint.exists()
    _resume_matches(tmp_path, checkpoint, HFModule(kind="bert"), callbacks, full, full_callbacks)


def _resume_matches(tmp_path: Path, checkpoint: Path, resumed: HFModule, callbacks: Any, full: HFModule,
                    full_callbacks: list) -> None:
    """Resume a fresh module from ``checkpoint``: the same allocation, structure and weights as the full run."""
    resumed_callbacks = callbacks(tmp_path / "ckpt_b")
    _run(tmp_path / "b", resumed, resumed_callbacks, ckpt_path=str(checkpoint), max_steps=8,
         enable_checkpointing=True)
    assert resumed_callbacks[0].allocation == full_callbacks[0].allocation
    assert structure(resumed) == structure(full)
    for key, value in full.state_dict().items():
        torch.testing.assert_close(resumed.state_dict()[key], value, rtol=1e-5, atol=1e-6, msg=key)


def test_old_argument_names_still_work_with_a_deprecation_warning() -> None:
    from lightning_latency import LightningLatencyDeprecationWarning

    new = LatencyBudgetPruning(target_ms=5.0, latency_fn=fake_latency, start_step=3, every_n_steps=4)
    with pytest.warns(LightningLatencyDeprecationWarning, match=r"pass `start_step=3` instead"):
        old = LatencyBudgetPruning(target_ms=5.0, latency_fn=fake_latency, start=3, frequency=4)
    assert (old.pruner.start_step, old.pruner.every_n_steps) == (3, 4)
    assert old.state_key == new.state_key  # checkpoints written with the old names keep their callback state


def test_core_prunes_to_the_budget_in_a_plain_loop() -> None:
    """BudgetPruner without Lightning: a bare model, a hand-written loop, the state round trip."""
    from lightning_latency.pruning.budget_pruner import BudgetPruner

    model = tiny_bert()
    target = 0.55 * fake_latency(model)
    pruner = BudgetPruner(target, fake_latency, _loss, start_step=1, every_n_steps=1, steps=2, calibration_batches=1)
    pruner.check(model)
    measured = []
    for step, batch in enumerate(_batches(4), start=1):
        pruner.collect(batch)
        ms = pruner.maybe_prune(model, step)
        if ms is not None:
            measured.append(ms)
    assert pruner.done and measured[-1] <= target and fake_latency(model) == pytest.approx(measured[-1])
    again = BudgetPruner(target, fake_latency, _loss)
    again.load_state_dict(pruner.state_dict())
    assert again.allocation == pruner.allocation and again.measured_ms == pruner.measured_ms


def test_when_savings_are_smaller_than_predicted_the_pruner_goes_on_until_the_measurement_meets_the_target() -> None:
    """A latency whose savings shrink as the model shrinks (convex in the structure): each removal measured alone on
    the dense model saves more than it does after others, so the plan reaches the target by prediction only."""
    from lightning_latency.pruning.budget import greedy_moves
    from lightning_latency.pruning.budget_pruner import BudgetPruner

    def convex(model: nn.Module) -> float:
        return fake_latency(model) ** 2 / 50.0

    model = tiny_bert()
    floor = tiny_bert()
    apply_moves(floor, [Move(b, k, 0.75) for b, k in prunable_units(floor)])
    dense, lowest = convex(model), convex(floor)
    target = lowest + 0.2 * (dense - lowest)
    pruner = BudgetPruner(target, convex, _loss, start_step=1, every_n_steps=1, steps=2, calibration_batches=1,
                          landing_tolerance=None)  # the plan's order, continued: what this test checks
    pruner.check(model)
    for step, batch in enumerate(_batches(4), start=1):
        pruner.collect(batch)
        pruner.maybe_prune(model, step)
    planned = plan_budget(pruner.report, target)
    assert pruner.done and pruner.measured_ms <= target and convex(model) == pytest.approx(pruner.measured_ms)
    assert len(pruner.allocation) > len(planned), "the prediction alone already met the target: nothing tested"
    assert pruner.allocation == greedy_moves(pruner.report)[: len(pruner.allocation)]  # the same order, continued
    again = BudgetPruner(target, convex, _loss)
    again.load_state_dict(pruner.state_dict())
    assert again.reserve == pruner.reserve and again.allocation == pruner.allocation


def test_greedy_order_ends_with_every_unit_at_its_largest_fraction() -> None:
    """Levels whose single saving measured as nothing (noise) are still in the order, last, so a pruner that keeps
    going reaches the floor the setup check measured."""
    from lightning_latency.pruning.budget import greedy_moves

    def flat_then_fake(model: nn.Module) -> float:  # layer 0's head removals save nothing when measured alone
        s = structure(model)
        layer0 = s.get("bert.encoder.layer.0.attention", {}).get("heads", 0)
        return fake_latency(model) + HEAD_MS * (4 - layer0)

    model = tiny_bert().eval()
    report = layer_sensitivity(model, _loss, _batches(1), (0.25, 0.5, 0.75), flat_then_fake, 0.75)
    order = greedy_moves(report)
    assert len(order) == len(report.rows)  # nothing left out
    last = {}
    for m in order:
        last[(m.block, m.kind)] = m.fraction
    assert set(last.values()) == {0.75}
    with pytest.raises(BudgetUnreachable):  # the prediction alone cannot count the silent levels
        plan_budget(report, 0.01)


def test_deployed_latency_fn_times_the_deployment_form_and_leaves_the_model_alone() -> None:
    pytest.importorskip("onnxruntime")
    from lightning_latency.latency import deployed_latency_fn
    from lightning_latency.latency.config import LatencyConfig

    model = tiny_bert().train()
    inputs = {k: v[:1] for k, v in _batches(1)[0].items() if k != "labels"}
    before = {k: v.clone() for k, v in model.state_dict().items()}
    ms = deployed_latency_fn(inputs, "ort", latency=LatencyConfig(warmup=1, min_runs=3, max_time_s=0.5))(model)
    assert ms > 0 and model.training
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_deploy_backend_deploys_every_candidate_of_the_sensitivity_pass(tmp_path: Path, monkeypatch) -> None:
    """The budget is met by the form that ships: every latency the pruner sees comes from a deployed copy."""
    import lightning_latency.latency.final as final

    deployed: list[dict[str, Any]] = []

    clock = _FakeClock(monkeypatch)

    def ms(form: Any) -> float:  # a deployed form's latency: the fake latency of the structure it came from
        return FIXED_MS + sum(v.get("heads", 0) * HEAD_MS + v.get("neurons", 0) * NEURON_MS
                              for v in form.structure.values())

    def fake_deployed_copy(model: nn.Module, inputs: Any, backend: str, config: Any = None, info: Any = None):
        deployed.append({"backend": backend, "structure": structure(model)})
        form = clock.form(lambda: ms(form))
        form.structure = deployed[-1]["structure"]
        return form, {"backend": backend}

    monkeypatch.setattr(final, "deployed_copy", fake_deployed_copy)
    monkeypatch.setattr(final, "measure_latency", lambda fast, inputs, config=None: SimpleNamespace(p50_ms=ms(fast)))
    module = HFModule(kind="bert")
    dense, dense_structure = fake_latency(module.model), structure(module)
    inputs = {k: v[:1] for k, v in _batches(1)[0].items() if k != "labels"}
    budget = LatencyBudgetPruning(target_ms=0.55 * dense, example_inputs=inputs, deploy_backend="ort_int8",
                                  start_step=2, every_n_steps=2, steps=3, calibration_batches=2)
    _run(tmp_path, module, [budget], max_steps=8)
    units = len(prunable_units(tiny_bert())) * len(budget.pruner.fractions)
    assert {d["backend"] for d in deployed} == {"ort_int8"}
    assert deployed[0]["structure"] == dense_structure  # the anchor: the dense model the fit starts from
    assert len(deployed) >= 1 + units + len(budget.history)  # anchor, every sensitivity candidate, every step
    assert budget.pruner.latency_fn.anchor_ms == pytest.approx(dense)
    assert budget.measured_ms is not None and budget.measured_ms <= 0.55 * dense


class _FakeClock:
    """Stands in for ``time.perf_counter`` in :mod:`lightning_latency.latency.anchored`: it moves only when a fake
    form is called, by that form's latency (ms) times ``slow(call index)``."""

    def __init__(self, monkeypatch: Any, slow: Any = None) -> None:
        import lightning_latency.latency.anchored as anchored

        self.now, self.calls, self.slow = 0.0, 0, slow or (lambda i: 1.0)
        monkeypatch.setattr(anchored, "time", SimpleNamespace(perf_counter=lambda: self.now))

    def form(self, ms: Any) -> Any:
        clock = self

        class Form:
            def __call__(self, *_args: Any, **_inputs: Any) -> None:
                clock.now += ms() * clock.slow(clock.calls)
                clock.calls += 1

            call = __call__

        return Form()


def test_alternated_calls_cancel_a_burst_that_blocks_do_not(monkeypatch) -> None:
    """Other work makes the machine 30% slower for 12 calls in a row. Timed in blocks (c r r c), the burst lands in
    one block and skews the ratio; alternated call by call, it hits both forms alike and the ratio stays true."""
    from lightning_latency.latency.anchored import alternated_ratio

    for start in (0, 7, 20, 33):
        clock = _FakeClock(monkeypatch, slow=lambda i, s=start: 1.3 if s <= i < s + 12 else 1.0)
        half, dense = clock.form(lambda: 5.0), clock.form(lambda: 10.0)
        assert alternated_ratio(half.call, dense.call, pairs=30) == pytest.approx(0.5, rel=0.01), start
    blocks = []
    for start in (0, 7, 20, 33):  # the same bursts, blocks of 10 calls each: c r r c
        slow = [1.3 if start <= i < start + 12 else 1.0 for i in range(40)]
        c1, r1, r2, c2 = (sum(ms * s for s in slow[10 * k:10 * k + 10]) for k, ms in enumerate((5, 10, 10, 5)))
        blocks.append((c1 * c2 / (r1 * r2)) ** 0.5)
    assert max(abs(b / 0.5 - 1) for b in blocks) > 0.05, blocks


def test_anchored_deployed_latency_cancels_machine_drift(monkeypatch) -> None:
    """The machine slows 5% per timing (as a busy 2-core machine does over minutes): unanchored, the dense model
    reads slower each call; anchored (timed beside the reference in candidate, reference, reference, candidate
    order), every call gives the true ratio x the anchor."""
    import lightning_latency.latency.final as final

    clock = {"drift": 1.0}

    def fake_measure(fast: Any, inputs: Any, config: Any = None) -> SimpleNamespace:
        clock["drift"] *= 1.05
        return SimpleNamespace(p50_ms=fast.true_ms * clock["drift"])

    monkeypatch.setattr(final, "deployed_copy", lambda model, *a, **k: (SimpleNamespace(true_ms=model.true_ms), {}))
    monkeypatch.setattr(final, "measure_latency", fake_measure)
    dense, half = SimpleNamespace(true_ms=10.0), SimpleNamespace(true_ms=5.0)
    plain = final.deployed_latency_fn({}, "ort")
    assert plain(dense) < plain(dense) < plain(dense)  # drift shows as a slower model
    anchored = final.deployed_latency_fn({}, "ort", reference=dense, rounds=2, alternate=False)  # blocks, c r r c
    anchor = anchored.anchor_ms
    for _ in range(4):
        assert anchored(half) == pytest.approx(anchor * 0.5)
        assert anchored(dense) == pytest.approx(anchor)
    with pytest.raises(ValueError, match=r"`rounds` must be a positive integer .* got 0"):
        final.deployed_latency_fn({}, "ort", rounds=0)


def test_each_timing_round_uses_a_fresh_runtime_session(monkeypatch) -> None:
    """Sessions of one ONNX graph differ in speed (±15% seen on a 2-core machine): each round of a call times a
    fresh one, and the call returns the median, so one slow session does not decide a pruning step."""
    import lightning_latency.latency.final as final

    class Session:
        def __init__(self, true_ms: float) -> None:
            self.true_ms, self.opened, self.spinning = true_ms, 0, True

        @property
        def slow(self) -> bool:
            return self.opened <= 1  # the first session timed (reopened once, at build, without spinning) is slow

        def reopen(self, spinning: bool | None = None) -> None:
            self.opened += 1
            self.spinning = self.spinning if spinning is None else spinning

    built: list[SimpleNamespace] = []

    def fake_copy(model: Any, *args: Any, **kwargs: Any) -> tuple[SimpleNamespace, dict]:
        built.append(SimpleNamespace(compiled=Session(model.true_ms)))
        return built[-1], {}

    def fake_measure(fast: Any, inputs: Any, config: Any = None) -> SimpleNamespace:
        session = fast.compiled
        return SimpleNamespace(p50_ms=session.true_ms * (1.5 if session.slow and session.true_ms < 10 else 1.0))

    monkeypatch.setattr(final, "deployed_copy", fake_copy)
    monkeypatch.setattr(final, "measure_latency", fake_measure)
    dense, half = SimpleNamespace(true_ms=10.0), SimpleNamespace(true_ms=5.0)
    fn = final.deployed_latency_fn({}, "ort_int8", reference=dense, rounds=3, alternate=False)
    assert fn(half) == pytest.approx(0.5 * fn.anchor_ms)  # median of 1.5x, 1x, 1x
    assert built[-1].compiled.opened == 3  # one at build (spinning off), then rounds - 1 fresh sessions
    # timed side by side in one process, no session's idle workers spin (they took a core from the next one)
    assert all(not form.compiled.spinning for form in built)
    assert final.deployed_latency_fn({}, "ort_int8", rounds=3)(half) == pytest.approx(5.0)  # unanchored: same rule
    one = final.deployed_latency_fn({}, "ort_int8", reference=dense, rounds=1, alternate=False)
    assert one(half) == pytest.approx(0.75 * one.anchor_ms)  # one round is one draw: the slow session shows


LAYER_MS = 3.0


def fake_latency_depth(model: nn.Module) -> float:
    """``fake_latency`` + 3 ms of fixed cost per layer still present (norms, residuals, launches)."""
    from lightning_latency.pruning.depth import find_layers, skipped_layers

    return fake_latency(model) + LAYER_MS * (len(find_layers(model)) - len(skipped_layers(model)))


def _identity_layer_bert() -> nn.Module:
    """3 layers; layer 2 is the identity on the residual stream (zero attention and MLP outputs, no norms)."""
    model = tiny_bert(layers=3).eval()
    layer = model.bert.encoder.layer[2]
    with torch.no_grad():
        for lin in (layer.attention.output.dense, layer.output.dense):
            lin.weight.zero_()
            lin.bias.zero_()
    layer.attention.output.LayerNorm = nn.Identity()
    layer.output.LayerNorm = nn.Identity()
    return model


def test_depth_sensitivity_prices_whole_layers_and_takes_the_free_one_first() -> None:
    model = _identity_layer_bert()
    report = layer_sensitivity(model, _loss, _batches(2), fractions=(0.5,), latency_fn=fake_latency_depth,
                               depth=True)
    blocks = [r for r in report.rows if r.kind == "block"]
    assert [r.block for r in blocks] == ["bert.encoder.layer.1", "bert.encoder.layer.2"]  # never the first layer
    free = report.row("bert.encoder.layer.2", "block", 1.0)
    assert abs(free.delta_loss) < 0.05 * abs(report.row("bert.encoder.layer.1", "block", 1.0).delta_loss) + 1e-3
    # removing a layer saves its fixed cost plus all its heads and neurons
    assert free.saved_ms == pytest.approx(LAYER_MS + 4 * HEAD_MS + 128 * NEURON_MS)
    assert report.layers["bert.encoder.layer.2.attention"] == "bert.encoder.layer.2"
    order = greedy_moves(report)
    assert order[0] == Move("bert.encoder.layer.2", "block", 1.0)
    # its heads and neurons retire with it: they come only at the very end, as alternatives for landing
    inside = [i for i, m in enumerate(order) if m.kind != "block" and m.block.startswith("bert.encoder.layer.2")]
    others = [i for i, m in enumerate(order) if not m.block.startswith("bert.encoder.layer.2")]
    assert inside and min(inside) > max(others)
    work = copy.deepcopy(model)
    apply_moves(work, order)
    assert fake_latency_depth(work) < fake_latency(model)  # below the width-only floor's fixed part


def test_budget_callback_with_depth_reaches_a_target_below_the_width_only_floor(tmp_path: Path) -> None:
    module = HFModule(model=tiny_bert(layers=3))
    dense = fake_latency_depth(module.model)
    width_floor = copy.deepcopy(module.model)
    apply_moves(width_floor, [Move(b, k, 0.75) for b, k in prunable_units(width_floor)])
    target = 0.8 * fake_latency_depth(width_floor)
    with pytest.raises(MisconfigurationException, match=r"below what pruning can reach.*pass depth=True"):
        _run(tmp_path / "w", HFModule(model=tiny_bert(layers=3)),
             [LatencyBudgetPruning(target_ms=target, latency_fn=fake_latency_depth, start_step=1)], max_steps=2)
    budget = LatencyBudgetPruning(target_ms=target, latency_fn=fake_latency_depth, start_step=2, every_n_steps=2,
                                  steps=3, calibration_batches=2, depth=True)
    trainer = _run(tmp_path / "d", module, [budget], max_steps=10)
    assert budget.measured_ms is not None and budget.measured_ms <= target < dense
    assert any(m.kind == "block" for m in budget.allocation)
    rows = read_csv_metrics(trainer)
    assert any(float(r.get("budget/layers_removed") or 0) >= 1 for r in rows)
    module.model(**_batches(1)[0])  # still runs after the last structural step


def test_resume_with_depth_gives_the_same_allocation_and_weights(tmp_path: Path) -> None:
    def only_layers_0_and_1_matter(model: nn.Module, batch: Any) -> torch.Tensor:
        """A loss that rises with every head / neuron gone from layers 0 and 1; layer 2 is free to remove."""
        kept = sum(v.get("heads", 0) + v.get("neurons", 0) / 32 for name, v in structure(model).items()
                   if ".layer.2" not in name)
        return torch.tensor(100.0 - kept)

    def callbacks(folder: Path) -> list:
        budget = LatencyBudgetPruning(target_ms=0.3 * fake_latency_depth(tiny_bert(layers=3)),
                                      latency_fn=fake_latency_depth, loss_fn=only_layers_0_and_1_matter,
                                      start_step=2, every_n_steps=2, steps=3, calibration_batches=2, depth=True)
        return [budget, pl.callbacks.ModelCheckpoint(dirpath=folder, every_n_epochs=1, save_top_k=-1,
                                                     save_on_train_epoch_end=True)]

    full, full_callbacks = HFModule(model=tiny_bert(layers=3)), callbacks(tmp_path / "ckpt")
    _run(tmp_path / "a", full, full_callbacks, max_steps=8, enable_checkpointing=True)
    # layer 2 costs nothing, and removing it whole saves the most: it goes first, so the checkpoint below (after
    # two pruning steps) holds no weights for it
    assert full_callbacks[0].allocation[0] == Move("model.bert.encoder.layer.2", "block", 1.0)
    checkpoint = tmp_path / "ckpt" / "epoch=0-step=4.ckpt"
    saved = torch.load(checkpoint, map_location="cpu", weights_only=False)["state_dict"]
    assert saved and not any(k.startswith("model.bert.encoder.layer.2.") for k in saved)
    _resume_matches(tmp_path, checkpoint, HFModule(model=tiny_bert(layers=3)), callbacks, full, full_callbacks)


def test_landing_brings_the_last_removals_into_the_upper_half_of_the_window() -> None:
    """The greedy order starts with big moves (whole layers); near the target a smaller later move that fits is
    brought forward, so the model lands close to the budget instead of far below it. It aims at the middle of the
    5% window, not its floor, so a later reading a few percent lower still lands within 5% (aiming at the floor,
    targets of 45% and 85% of dense landed 4.0% and 2.7% under)."""
    from lightning_latency.pruning.budget_pruner import BudgetPruner

    def concave(model: nn.Module) -> float:
        """Savings grow as the model shrinks: measured on the dense model, every saving is underestimated."""
        return 6.0 * fake_latency_depth(model) ** 0.5

    def run(latency: Any, target: float, tolerance: float | None) -> float:
        model = _identity_layer_bert()
        pruner = BudgetPruner(target, latency, _loss, start_step=1, every_n_steps=1, steps=1,
                              calibration_batches=1, depth=True, landing_tolerance=tolerance)
        pruner.collect(_batches(1)[0])
        pruner.maybe_prune(model, 1)
        assert pruner.done and latency(model) == pytest.approx(pruner.measured_ms)
        return pruner.measured_ms / target - 1

    for latency, fractions in ((fake_latency_depth, (0.45, 0.55, 0.65, 0.75, 0.85)), (concave, (0.7, 0.8, 0.9))):
        dense = latency(_identity_layer_bert())  # concave: below ~65% only a whole layer is left to take
        landed = {f: run(latency, f * dense, 0.05) for f in fractions}
        plain = {f: run(latency, f * dense, None) for f in landed}
        assert all(-0.025 <= v <= 0 for v in landed.values()), (latency.__name__, landed)
        assert any(v < -0.05 for v in plain.values()), plain  # without landing some target is overshot


def test_landing_takes_the_least_undershoot_when_no_move_fits_the_window() -> None:
    """With a window too narrow for any move (0.1%), landing still picks, among the moves tried, the one that goes
    least far below the target, instead of the next planned move (seen before this rule: 38-53% under)."""
    from lightning_latency.pruning.budget_pruner import BudgetPruner

    dense = fake_latency_depth(_identity_layer_bert())
    for fraction in (0.45, 0.5, 0.7, 0.8, 0.9):
        model = _identity_layer_bert()
        pruner = BudgetPruner(fraction * dense, fake_latency_depth, _loss, start_step=1, every_n_steps=1, steps=1,
                              calibration_batches=1, depth=True, landing_tolerance=0.001)
        pruner.collect(_batches(1)[0])
        pruner.maybe_prune(model, 1)
        assert pruner.done and -0.05 <= pruner.measured_ms / (fraction * dense) - 1 <= 0, fraction


def test_a_reading_near_the_target_is_confirmed_so_one_unlucky_run_does_not_cost_a_removal() -> None:
    """Every third reading comes out 8% high (an unlucky run on a busy machine). Readings near the target (at most
    1.1x it) are the median of three, for the removals and for the landing trials alike, so the model lands 0-5%
    under the target by its true latency. Judged on single readings above the target, a model already in the window
    read unlucky looked unfinished and one more removal took it 5-12% under (every fraction here)."""
    from lightning_latency.pruning.budget_pruner import BudgetPruner

    calls = [0]

    def unlucky(model: nn.Module) -> float:
        calls[0] += 1
        return fake_latency_depth(model) * (1.08 if calls[0] % 3 == 2 else 1.0)

    dense = fake_latency_depth(_identity_layer_bert())
    for fraction in (0.45, 0.55, 0.65, 0.75, 0.85):
        calls[0] = 0
        model = _identity_layer_bert()
        pruner = BudgetPruner(fraction * dense, unlucky, _loss, start_step=1, every_n_steps=1, steps=1,
                              calibration_batches=1, depth=True, landing_tolerance=0.05)
        pruner.collect(_batches(1)[0])
        pruner.maybe_prune(model, 1)
        assert pruner.done and -0.05 <= fake_latency_depth(model) / (fraction * dense) - 1 <= 0, fraction


def test_a_decode_tokens_per_s_budget_on_a_causal_lm(tmp_path: Path) -> None:
    """target_tokens_per_s: the target is a TPOT of 1000 / tokens/s; logged in both units; the model still generates."""
    module = HFModule(kind="llama")
    tpot = fake_latency_depth  # stands in for decode_latency_fn: ms per token of the current structure
    dense_tps = 1000.0 / tpot(module.model)
    target = 1.6 * dense_tps
    budget = LatencyBudgetPruning(target_tokens_per_s=target, latency_fn=tpot, start_step=2, every_n_steps=2,
                                  steps=3, calibration_batches=2, depth=True)
    trainer = _run(tmp_path, module, [budget], max_steps=10)
    assert budget.target_ms == pytest.approx(1000.0 / target)
    assert 1000.0 / budget.measured_ms >= target
    rows = read_csv_metrics(trainer)
    speeds = [float(r["budget/measured_tokens_per_s"]) for r in rows if r.get("budget/measured_tokens_per_s")]
    assert speeds and speeds[-1] >= target and any(r.get("budget/target_tokens_per_s") for r in rows)
    out = module.model.eval().generate(_batches(1)[0]["input_ids"][:1, :6], max_new_tokens=4, do_sample=False)
    assert out.shape == (1, 10)


def test_decode_latency_fn_times_greedy_decoding() -> None:
    from lightning_latency.latency import LatencyConfig, decode_latency_fn

    model = tiny_llama().train()
    prompt = _batches(1)[0]["input_ids"][:1, :8]
    ms = decode_latency_fn(prompt, new_tokens=4, config=LatencyConfig(warmup=1, min_runs=2, max_time_s=1.0))(model)
    assert ms > 0 and model.training  # measured in eval mode, the module's own flag restored


def test_anchored_decode_latency_keeps_a_frozen_reference_and_cancels_drift(monkeypatch) -> None:
    """decode_latency_fn(reference=dense, alternate=False): the reference is copied (pruning the dense model later does not move the
    scale), and a machine slowing 5% per timing gives every call the true TPOT ratio x the anchor."""
    import lightning_latency.latency.generation as generation
    from lightning_latency.latency import decode_latency_fn
    from lightning_latency.pruning.depth import find_layers, skipped_layers

    clock = {"drift": 1.0}

    def fake_generation(model: Any, prompt: Any, config: Any = None, **kwargs: Any) -> SimpleNamespace:
        clock["drift"] *= 1.05
        kept = len(find_layers(model)) - len(skipped_layers(model))
        return SimpleNamespace(tpot_ms=10.0 * kept * clock["drift"])

    monkeypatch.setattr(generation, "measure_generation", fake_generation)
    dense = tiny_llama()
    fn = decode_latency_fn(torch.zeros(1, 4, dtype=torch.long), reference=dense, rounds=2, alternate=False)
    anchor = fn.anchor_ms
    pruned = copy.deepcopy(dense)
    apply_moves(pruned, [Move("model.layers.1", "block", 1.0)])  # one of two layers gone: half the TPOT
    for _ in range(3):
        assert fn(pruned) == pytest.approx(anchor / 2)
    apply_moves(dense, [Move("model.layers.1", "block", 1.0)])  # the caller's dense model changes ...
    assert fn(pruned) == pytest.approx(anchor / 2)  # ... the reference it was anchored on does not
    with pytest.raises(ValueError, match=r"`rounds` must be a positive integer .* got 0"):
        decode_latency_fn(torch.zeros(1, 4, dtype=torch.long), rounds=0)


def test_tpot_sample_is_one_greedy_reading_in_eval_mode() -> None:
    from lightning_latency.latency.generation import tpot_sample_ms

    model = tiny_llama().train()
    ms = tpot_sample_ms(model, _batches(1)[0]["input_ids"][:1, :8], new_tokens=4)
    assert ms >= 0.0 and model.training


def test_alternated_decode_latency_cancels_a_burst_and_keeps_its_reference(monkeypatch) -> None:
    """decode_latency_fn(reference=dense) alternates single TPOT readings: a burst making the machine 30% slower
    for 3 readings in a row (seconds, on a real model) leaves the ratio true wherever it falls; the reference is a
    frozen copy."""
    import lightning_latency.latency.generation as generation
    from lightning_latency.latency import LatencyConfig, decode_latency_fn
    from lightning_latency.pruning.depth import find_layers, skipped_layers

    calls = {"n": 0, "burst": -100}

    def fake_sample(model: Any, *_args: Any) -> float:
        calls["n"] += 1
        slow = 1.3 if calls["burst"] <= calls["n"] < calls["burst"] + 3 else 1.0
        return 10.0 * (len(find_layers(model)) - len(skipped_layers(model))) * slow

    monkeypatch.setattr(generation, "tpot_sample_ms", fake_sample)
    monkeypatch.setattr(generation, "measure_generation", lambda model, *a, **k: SimpleNamespace(
        tpot_ms=fake_sample(model)))
    dense = tiny_llama()
    fn = decode_latency_fn(torch.zeros(1, 4, dtype=torch.long), reference=dense,
                           config=LatencyConfig(warmup=1, min_runs=3))
    assert fn.anchor_ms == pytest.approx(20.0)
    pruned = copy.deepcopy(dense)
    apply_moves(pruned, [Move("model.layers.1", "block", 1.0)])  # one of two layers gone: half the TPOT
    for burst in (3, 6, 8, 11, 14):
        calls["n"], calls["burst"] = 0, burst
        assert fn(pruned) == pytest.approx(10.0, rel=0.01)
    apply_moves(dense, [Move("model.layers.1", "block", 1.0)])
    calls["burst"] = -100
    assert fn(pruned) == pytest.approx(10.0)  # the caller's dense model changed; the reference did not


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        (dict(target_ms=5.0, target_tokens_per_s=40.0, latency_fn=fake_latency), r"pass `target_ms` or "
                                                                                 r"`target_tokens_per_s`, not both"),
        (dict(target_tokens_per_s=0, latency_fn=fake_latency), r"`target_tokens_per_s` must be a positive number, "
                                                               r"got 0"),
        (dict(target_tokens_per_s=40.0, example_inputs={"input_ids": torch.ones(1, 4, dtype=torch.long)},
              deploy_backend="ort"), r"a tokens/s budget times decoding. Pass latency_fn=decode_latency_fn"),
        (dict(latency_fn=fake_latency), r"`target_ms` must be a positive number of milliseconds, got None"),
    ],
)
def test_tokens_per_s_arguments_are_checked(kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        LatencyBudgetPruning(**kwargs)
