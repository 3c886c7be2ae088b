"""Strategy helpers (lightning_latency/strategies.py): configuration, validation, the FSDP pre-wrap checks.

Real multi-process fits with these strategies are in tests/test_multidevice.py.
"""

from __future__ import annotations

from datetime import timedelta
from types import SimpleNamespace

import pytest
from helpers import HFModule, tiny_bert

from lightning_latency import MagnitudePruning, QuantizationAwareTraining, ddp_strategy, fsdp_strategy
from lightning_latency._compat import pl
from lightning_latency.distillation import HiddenStateLoss, student_from_teacher_layers
from lightning_latency.distillation.fsdp import DistillationWrapPolicy
from lightning_latency.distillation.module import DistillationModule
from lightning_latency.strategies import _fsdp_conflicts, _needs_find_unused, full_params, is_fsdp


def test_ddp_strategy_is_a_lightning_ddp_strategy_with_our_settings() -> None:
    strategy = ddp_strategy(start_method="spawn", timeout_s=120, gradient_as_bucket_view=True)
    assert isinstance(strategy, pl.strategies.DDPStrategy)
    assert strategy._start_method == "spawn" and strategy._timeout == timedelta(seconds=120)
    assert strategy._ddp_kwargs["gradient_as_bucket_view"] is True
    assert "find_unused_parameters" not in strategy._ddp_kwargs  # decided per module when DDP wraps it
    assert ddp_strategy(find_unused_parameters=True)._ddp_kwargs["find_unused_parameters"] is True
    assert ddp_strategy(process_group_backend="gloo")._process_group_backend == "gloo"


def test_find_unused_parameters_only_for_projections_without_a_teacher() -> None:
    teacher = tiny_bert(layers=2)
    student = student_from_teacher_layers(teacher, [0])
    assert not _needs_find_unused(HFModule())
    assert not _needs_find_unused(DistillationModule(student, teacher))  # a frozen teacher never needs it
    online = DistillationModule(student, teacher, intermediate=HiddenStateLoss(32, 64, [(1, 2)]))
    assert not _needs_find_unused(online)  # projections get gradients every step
    offline = DistillationModule(student, None, intermediate=HiddenStateLoss(32, 64, [(1, 2)]))
    assert _needs_find_unused(offline)  # the projections are never used without a teacher


def test_fsdp_strategy_wraps_teacher_and_student_separately() -> None:
    strategy = fsdp_strategy(timeout_s=60)
    assert isinstance(strategy, pl.strategies.FSDPStrategy)
    assert isinstance(strategy.kwargs["auto_wrap_policy"], DistillationWrapPolicy)
    assert strategy.kwargs["use_orig_params"] is True
    assert is_fsdp(SimpleNamespace(strategy=strategy)) and not is_fsdp(SimpleNamespace(strategy=ddp_strategy()))


def test_fsdp_prewrap_check_names_the_fix() -> None:
    trainer = SimpleNamespace(callbacks=[MagnitudePruning(mode="structured"), QuantizationAwareTraining(start_step=3)])
    problems = _fsdp_conflicts(trainer)
    assert len(problems) == 2
    assert "Prune the unsharded model before wrapping" in problems[0] and "start_step=0" in problems[1]
    ok = SimpleNamespace(callbacks=[MagnitudePruning(mode="unstructured"), QuantizationAwareTraining(start_step=0)])
    assert _fsdp_conflicts(ok) == []


def test_full_params_is_a_no_op_outside_fsdp() -> None:
    with full_params(SimpleNamespace(strategy=ddp_strategy())):
        pass


@pytest.mark.parametrize(
    ("fn", "kwargs", "match"),
    [
        (ddp_strategy, dict(start_method="thread"), r"`start_method` must be one of .*'thread'"),
        (ddp_strategy, dict(process_group_backend="ucc"), r"`process_group_backend` must be one of .*'ucc'"),
        (ddp_strategy, dict(find_unused_parameters="auto"), r"`find_unused_parameters` must be None"),
        (ddp_strategy, dict(timeout_s=0), r"`timeout_s` must be a number of seconds > 0 or None .*got 0"),
        (fsdp_strategy, dict(sharding_strategy="ZERO3"), r"`sharding_strategy` must be one of .*'ZERO3'"),
        (fsdp_strategy, dict(layer_classes=["LlamaDecoderLayer"]), r"`layer_classes` must hold nn.Module subclasses"),
    ],
)
def test_misconfiguration(fn: object, kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        fn(**kwargs)  # type: ignore[operator]


def test_cli_recipe_configures_the_ddp_strategy() -> None:
    import importlib
    from pathlib import Path

    from lightning_latency import LatencyMonitor
    from lightning_latency.strategies import CompressionDDPStrategy

    recipe = Path(__file__).resolve().parents[1] / "callbacks" / "ddp.yaml"
    cli = importlib.import_module(f"{pl.__name__}.cli").LightningCLI(
        HFModule, run=False, save_config_callback=None,
        args=["--config", str(recipe), "--trainer.logger=false", "--trainer.enable_progress_bar=false"])
    strategy = cli.trainer.strategy
    assert isinstance(strategy, CompressionDDPStrategy) and strategy._start_method == "popen"
    assert strategy._auto_find_unused and cli.trainer.num_devices == 2
    mons = [c for c in cli.trainer.callbacks if isinstance(c, LatencyMonitor)]
    assert len(mons) == 1 and mons[0].data_parallel and mons[0].config.max_time_s == 1.0


def test_callbacks_refuse_what_cannot_work_on_sharded_weights_under_any_fsdp_strategy() -> None:
    from lightning_latency._compat import MisconfigurationException

    fsdp = SimpleNamespace(strategy=pl.strategies.FSDPStrategy())  # a plain Lightning FSDP strategy, not ours
    with pytest.raises(MisconfigurationException, match="Prune the unsharded model before wrapping"):
        MagnitudePruning(mode="structured").setup(fsdp, HFModule(), "fit")
    MagnitudePruning(mode="unstructured").setup(fsdp, HFModule(), "fit")  # masked pruning is fine
    with pytest.raises(MisconfigurationException, match=r"start_step=0 \(prepared in `setup`"):
        QuantizationAwareTraining(start_step=3).setup(fsdp, HFModule(), "fit")
    with pytest.raises(MisconfigurationException, match="cannot time an FSDP-sharded model"):
        from lightning_latency import LatencyMonitor

        LatencyMonitor().setup(fsdp, HFModule(), "fit")
