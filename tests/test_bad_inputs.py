"""Bad inputs across the public API: each gets the documented exception, naming the argument and the bad value."""

from __future__ import annotations

import re
from typing import Any, Callable

import pytest
import torch
from torch import nn

import lightning_latency as L
from lightning_latency.distillation.intermediate import HiddenStateLoss


def _lin() -> nn.Module:
    return nn.Sequential(nn.Linear(8, 8))


def _x() -> torch.Tensor:
    return torch.randn(1, 8)


# (id, call, exception type, the argument's name, the bad value as it must appear in the message)
CASES: list[tuple[str, Callable[[], Any], type[Exception], str, str]] = [
    # MagnitudePruning
    ("mp-mode", lambda: L.MagnitudePruning(mode="dense"), ValueError, "mode", "'dense'"),
    ("mp-final-high", lambda: L.MagnitudePruning(final_sparsity=1.5), ValueError, "final_sparsity", "1.5"),
    ("mp-final-neg", lambda: L.MagnitudePruning(final_sparsity=-0.1), ValueError, "final_sparsity", "-0.1"),
    ("mp-initial", lambda: L.MagnitudePruning(initial_sparsity=2.0), ValueError, "initial_sparsity", "2.0"),
    ("mp-start", lambda: L.MagnitudePruning(start_step=-1), ValueError, "start_step", "-1"),
    ("mp-every", lambda: L.MagnitudePruning(every_n_steps=0), ValueError, "every_n_steps", "0"),
    ("mp-every-epochs", lambda: L.MagnitudePruning(every_n_epochs=0), ValueError, "every_n_epochs", "0"),
    ("mp-mixed", lambda: L.MagnitudePruning(start_step=2, end_epoch=1), ValueError, "end_epoch", "start_step"),
    ("mp-schedule", lambda: L.MagnitudePruning(schedule="exp"), ValueError, "schedule", "'exp'"),
    ("mp-interval", lambda: L.MagnitudePruning(interval="batch"), ValueError, "interval", "'batch'"),
    ("mp-scope", lambda: L.MagnitudePruning(scope="world"), ValueError, "scope", "'world'"),
    ("mp-n", lambda: L.MagnitudePruning(mode="nm", n=5, m=4), ValueError, "n", "5"),
    ("mp-max-layer", lambda: L.MagnitudePruning(max_layer_sparsity=1.5), ValueError, "max_layer_sparsity", "1.5"),
    ("mp-importance", lambda: L.MagnitudePruning(importance="random_walk"), ValueError, "importance", "'random_walk'"),
    ("mp-rewind", lambda: L.MagnitudePruning(rewind_to=-3), ValueError, "rewind_to", "-3"),
    ("mp-end-before-start", lambda: L.MagnitudePruning(start_step=10, end_step=5), ValueError, "end_step", "5"),
    ("mp-old-start", lambda: L.MagnitudePruning(start=-1), ValueError, "start_step", "-1"),
    ("mp-targets-regex", lambda: L.MagnitudePruning(targets=["re:(x"]), ValueError, "targets", "re:(x"),
    ("mp-model-attr", lambda: L.MagnitudePruning(model_attr="1bad"), ValueError, "model_attr", "'1bad'"),
    # PruningConfig / PruningSchedule / prune_step
    ("pc-mode", lambda: L.PruningConfig(mode="dense"), ValueError, "mode", "'dense'"),
    ("pc-scope", lambda: L.PruningConfig(scope="world"), ValueError, "scope", "'world'"),
    ("pc-nm", lambda: L.PruningConfig(mode="nm", n=0, m=4), ValueError, "n", "0"),
    ("pc-max-layer", lambda: L.PruningConfig(max_layer_sparsity=0.0), ValueError, "max_layer_sparsity", "0.0"),
    ("ps-final", lambda: L.PruningSchedule(final_sparsity=1.0), ValueError, "final_sparsity", "1.0"),
    ("ps-frequency", lambda: L.PruningSchedule(frequency=0), ValueError, "frequency", "0"),
    ("ps-curve", lambda: L.PruningSchedule(curve="exp"), ValueError, "curve", "'exp'"),
    ("ps-start", lambda: L.PruningSchedule(start=-2), ValueError, "start", "-2"),
    ("step-sparsity", lambda: L.prune_step(_lin(), L.PruningConfig(), 1.5), ValueError, "sparsity", "1.5"),
    ("step-sparsity-neg", lambda: L.prune_step(_lin(), L.PruningConfig(), -0.5), ValueError, "sparsity", "-0.5"),
    ("step-config", lambda: L.prune_step(_lin(), "structured", 0.5), ValueError, "config", "str"),
    ("step-targets", lambda: L.prune_step(_lin(), L.PruningConfig(targets=["nothing*"]), 0.5), ValueError,
     "targets", "nothing*"),
    # QuantizationAwareTraining / QuantizationConfig / prepare_qat
    ("qat-scheme", lambda: L.QuantizationAwareTraining(scheme="int3"), ValueError, "scheme", "'int3'"),
    ("qat-backend", lambda: L.QuantizationAwareTraining(backend="tpu"), ValueError, "backend", "'tpu'"),
    ("qat-group", lambda: L.QuantizationAwareTraining(scheme="int8_int4", group_size=0), ValueError,
     "group_size", "0"),
    ("qat-start", lambda: L.QuantizationAwareTraining(start_step=-1), ValueError, "start_step", "-1"),
    ("qat-start-float", lambda: L.QuantizationAwareTraining(start_step=1.5), ValueError, "start_step", "1.5"),
    ("qat-start-bool", lambda: L.QuantizationAwareTraining(start_step=True), ValueError, "start_step", "True"),
    ("qat-epoch", lambda: L.QuantizationAwareTraining(start_epoch=-1), ValueError, "start_epoch", "-1"),
    ("qat-both", lambda: L.QuantizationAwareTraining(start_step=3, start_epoch=1), ValueError, "start_step", "3"),
    ("qat-freeze", lambda: L.QuantizationAwareTraining(start_step=5, freeze_step=5), ValueError, "freeze_step", "5"),
    ("qat-log", lambda: L.QuantizationAwareTraining(log_every_n_steps=-1), ValueError, "log_every_n_steps", "-1"),
    ("qat-model-attr", lambda: L.QuantizationAwareTraining(model_attr="a..b"), ValueError, "model_attr", "'a..b'"),
    ("qat-exclude-regex", lambda: L.QuantizationAwareTraining(exclude=["re:("]), ValueError, "exclude", "'re:('"),
    ("qat-targets-type", lambda: L.QuantizationAwareTraining(targets=[nn.Linear]), ValueError, "targets", "Linear"),
    ("qat-skip-and-exclude", lambda: L.QuantizationAwareTraining(skip=["*a*"], exclude=["*b*"]), ValueError,
     "exclude", "['*b*']"),
    ("qc-scheme-object", lambda: L.QuantizationConfig(scheme=object()), ValueError, "scheme", "object"),
    ("qc-scheme", lambda: L.QuantizationConfig(scheme="fp4"), ValueError, "scheme", "'fp4'"),
    ("qc-backend", lambda: L.QuantizationConfig(backend="npu"), ValueError, "backend", "'npu'"),
    ("qc-group", lambda: L.QuantizationConfig(scheme="int4_weight_only", group_size=-8), ValueError,
     "group_size", "-8"),
    ("prepare-config-str", lambda: L.prepare_qat(_lin(), "int3"), ValueError, "scheme", "'int3'"),
    ("prepare-config-type", lambda: L.prepare_qat(_lin(), 42), TypeError, "config", "42"),
    ("prepare-targets", lambda: L.prepare_qat(_lin(), L.QuantizationConfig(targets=["nothing*"])), ValueError,
     "targets", "nothing*"),
    ("prepare-group", lambda: L.prepare_qat(nn.Sequential(nn.Linear(24, 8)),
                                            L.QuantizationConfig(scheme="int4_weight_only", group_size=32)),
     ValueError, "group_size", "32"),
    # LatencyConfig / measure_latency / LatencyMonitor
    ("lc-warmup", lambda: L.LatencyConfig(warmup=-1), ValueError, "warmup", "-1"),
    ("lc-min-runs", lambda: L.LatencyConfig(min_runs=0), ValueError, "min_runs", "0"),
    ("lc-min-time", lambda: L.LatencyConfig(min_time_s=-1.0), ValueError, "min_time_s", "-1.0"),
    ("lc-max-time", lambda: L.LatencyConfig(max_time_s=0.0), ValueError, "max_time_s", "0.0"),
    ("lc-threads", lambda: L.LatencyConfig(threads=0), ValueError, "threads", "0"),
    ("lc-unstable", lambda: L.LatencyConfig(unstable_threshold=-0.1), ValueError, "unstable_threshold", "-0.1"),
    ("lc-unstable-str", lambda: L.LatencyConfig(unstable_threshold="0.1"), TypeError, "unstable_threshold", "'0.1'"),
    ("lc-device", lambda: L.LatencyConfig(device="tpu:0"), ValueError, "device", "'tpu:0'"),
    ("lc-batch", lambda: L.LatencyConfig(batch_size=0), ValueError, "batch_size", "0"),
    ("ml-config-str", lambda: L.measure_latency(_lin(), _x(), config="fast"), TypeError, "config", "'fast'"),
    ("ml-override", lambda: L.measure_latency(_lin(), _x(), warmups=3), ValueError, "warmups", "warmups"),
    ("ml-config-dict", lambda: L.measure_latency(_lin(), _x(), config={}), TypeError, "config", "{}"),
    ("dl-labels-shape", lambda: L.DistillationLoss()(torch.randn(4, 10), torch.randn(4, 10),
                                                    labels=torch.zeros(3, dtype=torch.long)), ValueError, "labels",
     "(3,)"),
    ("dl-mask-shape", lambda: L.DistillationLoss()(torch.randn(2, 5, 10), torch.randn(2, 5, 10),
                                                  mask=torch.ones(2, 4)), ValueError, "mask", "(2, 4)"),
    ("ml-empty-inputs", lambda: L.measure_latency(_lin(), {}), ValueError, "inputs", "empty dict"),
    ("ml-empty-tuple", lambda: L.measure_latency(_lin(), ()), ValueError, "inputs", "empty tuple"),
    ("ml-device-index", lambda: L.measure_latency(_lin(), _x(), device="cuda:7"), ValueError, "device",
     "'cuda:7'"),
    ("lm-device-index", lambda: L.LatencyMonitor(device="cuda:7"), ValueError, "device", "'cuda:7'"),
    ("lm-every", lambda: L.LatencyMonitor(every_n_val_epochs=-1), ValueError, "every_n_val_epochs", "-1"),
    ("lm-prompt", lambda: L.LatencyMonitor(prompt_len=0), ValueError, "prompt_len", "0"),
    ("lm-new-tokens", lambda: L.LatencyMonitor(new_tokens=0), ValueError, "new_tokens", "0"),
    ("lm-model-attr", lambda: L.LatencyMonitor(model_attr="x-y"), ValueError, "model_attr", "'x-y'"),
    # DistillationLoss / DistillationModule / HiddenStateLoss
    ("dl-kind", lambda: L.DistillationLoss("kl"), ValueError, "kind", "'kl'"),
    ("dl-temp", lambda: L.DistillationLoss(temperature=0.0), ValueError, "temperature", "0.0"),
    ("dl-temp-neg", lambda: L.DistillationLoss(temperature=-2.0), ValueError, "temperature", "-2.0"),
    ("dl-beta", lambda: L.DistillationLoss("jsd", beta=1.5), ValueError, "beta", "1.5"),
    ("dl-reduction", lambda: L.DistillationLoss(reduction="none"), ValueError, "reduction", "'none'"),
    ("dl-chunk", lambda: L.DistillationLoss(chunk_size=0), ValueError, "chunk_size", "0"),
    ("dm-alpha", lambda: L.DistillationModule(_lin(), _lin(), alpha=1.5), ValueError, "alpha", "1.5"),
    ("dm-alpha-neg", lambda: L.DistillationModule(_lin(), _lin(), alpha=-0.5), ValueError, "alpha", "-0.5"),
    ("dm-dtype", lambda: L.DistillationModule(_lin(), _lin(), teacher_dtype="float12"), ValueError,
     "teacher_dtype", "'float12'"),
    ("dm-lr", lambda: L.DistillationModule(_lin(), _lin(), lr=-1.0), ValueError, "lr", "-1.0"),
    ("dm-student", lambda: L.DistillationModule("bert"), ValueError, "student", "'bert'"),
    ("dm-inter-weight", lambda: L.DistillationModule(_lin(), _lin(), intermediate_weight=-1.0), ValueError,
     "intermediate_weight", "-1.0"),
    ("hs-kind", lambda: HiddenStateLoss(8, 8, [[0, 0]], kind="l1"), ValueError, "kind", "'l1'"),
    ("hs-dim", lambda: HiddenStateLoss(0, 8, [[0, 0]]), ValueError, "student_dim", "0"),
    ("hs-map", lambda: HiddenStateLoss(8, 8, [[0, 1, 2]]), ValueError, "layer_map", "[0, 1, 2]"),
    ("hs-teacher-dim", lambda: HiddenStateLoss(8, -4, [[0, 0]]), ValueError, "teacher_dim", "-4"),
    # save/load
    ("save-pruned", lambda: L.save_pruned(nn.Linear(2, 2), "/tmp/unused"), ValueError, "model", "Linear"),
    ("load-pruned", lambda: L.load_pruned("/nonexistent/pruned"), FileNotFoundError, "nonexistent", "pruned"),
]


@pytest.mark.parametrize(("call", "exc", "arg", "value"), [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_bad_input_is_refused_naming_the_argument_and_the_value(call: Callable[[], Any], exc: type[Exception],
                                                                arg: str, value: str) -> None:
    with pytest.raises(exc) as info:
        call()
    message = str(info.value)
    assert re.search(rf"\b{re.escape(arg)}\b", message), f"argument {arg!r} not named in: {message}"
    assert value in message, f"value {value!r} not named in: {message}"


def test_the_table_is_large_enough() -> None:
    assert len(CASES) >= 60
