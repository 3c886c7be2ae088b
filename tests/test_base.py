"""The shared callback contract (``lightning_latency.base``), checked once per callback.

Every lightning-latency callback derives from :class:`CompressionCallback` and must: refuse a bad configuration in
``setup`` (before any optimizer step) with an error naming the callback, the argument and the value; round-trip its
state through ``state_dict``/``torch.save``; log only from global rank zero; answer the strategy question; and, where
it selects modules, read the one pattern type (fnmatch on name or class name, ``re:`` for a regex).
"""

from __future__ import annotations

import io
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch

from helpers import HFModule, trainer_kwargs
from lightning_latency import (
    CompressionCallback,
    LatencyBudgetPruning,
    LatencyMonitor,
    MagnitudePruning,
    QuantizationAwareTraining,
)
from lightning_latency._compat import MisconfigurationException, Trainer, pl
from lightning_latency.strategies import _fsdp_conflicts


def _size_ms(model: torch.nn.Module) -> float:
    """A deterministic stand-in for a latency measurement: parameters / 10k (timing is never asserted in tests)."""
    return sum(p.numel() for p in model.parameters()) / 1e4


def _budget(**kw: Any) -> LatencyBudgetPruning:
    dense = _size_ms(HFModule().model)
    return LatencyBudgetPruning(target_ms=0.97 * dense, latency_fn=_size_ms, start_step=1, every_n_steps=1, steps=2,
                                **kw)


# name -> (factory, metric prefix it logs); each runs a real 4-step fit on a tiny BERT in well under a few seconds
FACTORIES: dict[str, tuple[Callable[..., CompressionCallback], str]] = {
    "MagnitudePruning": (lambda **kw: MagnitudePruning(mode="unstructured", final_sparsity=0.5, start_step=1,
                                                       end_step=3, every_n_steps=1, **kw), "pruning/"),
    "LatencyBudgetPruning": (_budget, "budget/"),
    "QuantizationAwareTraining": (lambda **kw: QuantizationAwareTraining(start_step=1, log_every_n_steps=1, **kw),
                                  "qat/"),
    "LatencyMonitor": (lambda **kw: LatencyMonitor(min_runs=2, max_time_s=0.05, deploy_final=False,
                                                   report_file=None, **kw), "latency/"),
}
NAMES = list(FACTORIES)


class _Recorder(pl.loggers.Logger):
    """A logger with no rank-zero guard of its own: it records whatever reaches it."""

    def __init__(self) -> None:
        super().__init__()
        self.metrics: list[dict[str, float]] = []
        self.hparams: list[dict[str, Any]] = []

    @property
    def name(self) -> str:
        return "recorder"

    @property
    def version(self) -> int:
        return 0

    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        self.metrics.append(dict(metrics))

    def log_hyperparams(self, params: Any, *args: Any, **kwargs: Any) -> None:
        self.hparams.append(dict(params) if isinstance(params, dict) else {})

    def keys(self, prefix: str) -> set[str]:
        return {k for m in self.metrics for k in m if k.startswith(prefix)} | {
            k for h in self.hparams for k in h if k.startswith(prefix)}


class _RankOneStrategy(pl.strategies.SingleDeviceStrategy):
    """One process that believes it is global rank 1 of a job: what every non-zero rank of a DDP run sees."""

    @property
    def global_rank(self) -> int:
        return 1

    @global_rank.setter
    def global_rank(self, value: int) -> None:  # Lightning assigns the real rank (0); this process keeps saying 1
        pass

    @property
    def is_global_zero(self) -> bool:
        return False


def _fit(tmp_path: Path, callback: CompressionCallback, **overrides: Any) -> Trainer:
    trainer = Trainer(**trainer_kwargs(tmp_path, callbacks=[callback], **overrides))
    trainer.fit(HFModule())
    return trainer


@pytest.mark.parametrize("name", NAMES)
def test_every_callback_is_on_the_contract(name: str) -> None:
    callback = FACTORIES[name][0]()
    assert isinstance(callback, CompressionCallback)
    answer = callback.strategy_problem("fsdp")
    assert answer is None or (isinstance(answer, str) and "fsdp" in answer.lower())
    assert _fsdp_conflicts(type("T", (), {"callbacks": [callback]})()) == ([answer] if answer else [])


@pytest.mark.parametrize("name", NAMES)
def test_a_bad_target_is_refused_in_setup_before_any_step(name: str, tmp_path: Path) -> None:
    trainer = Trainer(**trainer_kwargs(tmp_path, callbacks=[FACTORIES[name][0](model_attr="no_such_module")]))
    with pytest.raises(MisconfigurationException, match="no_such_module") as info:
        trainer.fit(HFModule())
    assert trainer.global_step == 0
    assert str(info.value).startswith(f"{name}: ") and "model_attr" in str(info.value)


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and a.shape == b.shape and bool(torch.equal(a, b))
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return isinstance(b, (list, tuple)) and len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    return a == b


@pytest.mark.parametrize("name", NAMES)
def test_state_survives_a_checkpoint_round_trip(name: str, tmp_path: Path) -> None:
    factory, _ = FACTORIES[name]
    callback = factory()
    _fit(tmp_path, callback)
    state = callback.state_dict()
    assert not _same(state, factory().state_dict()), "the fit left no trace in the state: the test would be vacuous"
    buffer = io.BytesIO()
    torch.save(state, buffer)
    buffer.seek(0)
    fresh = factory()
    fresh.load_state_dict(torch.load(buffer, weights_only=False))
    assert _same(fresh.state_dict(), state)
    assert fresh.state_key == callback.state_key


@pytest.mark.parametrize("name", NAMES)
def test_logs_from_global_rank_zero_only(name: str, tmp_path: Path) -> None:
    factory, prefix = FACTORIES[name]
    zero, one = _Recorder(), _Recorder()
    _fit(tmp_path / "zero", factory(), logger=zero)
    assert zero.keys(prefix), f"{name} logged nothing under {prefix!r} on rank 0: the check below would be vacuous"
    _fit(tmp_path / "one", factory(), logger=one, strategy=_RankOneStrategy(device=torch.device("cpu")))
    assert not one.keys(prefix)


def _changed_by_pruning(module: HFModule) -> set[str]:
    return {n for n, m in module.model.named_modules()
            if isinstance(m, torch.nn.Linear) and float((m.weight == 0).float().mean()) > 0.25}


def _changed_by_qat(module: HFModule) -> set[str]:
    from lightning_latency.quantization.qat import converted_modules

    return set(converted_modules(module.model))


SELECTING = {
    "MagnitudePruning": (lambda targets: MagnitudePruning(mode="unstructured", final_sparsity=0.5, start_step=1,
                                                          targets=targets), _changed_by_pruning),
    "QuantizationAwareTraining": (lambda targets: QuantizationAwareTraining(start_step=0, targets=targets),
                                  _changed_by_qat),
}


@pytest.mark.parametrize("name", list(SELECTING))
def test_one_pattern_type_selects_modules(name: str, tmp_path: Path) -> None:
    make, changed = SELECTING[name]
    chosen = {}
    for i, targets in enumerate((["*attention.output.dense"], [r"re:attention\.output\.dense$"])):
        module = HFModule()
        trainer = Trainer(**trainer_kwargs(tmp_path / str(i), callbacks=[make(targets)], max_steps=2))
        trainer.fit(module)
        chosen[i] = changed(module)
    assert chosen[0] == chosen[1] == {"bert.encoder.layer.0.attention.output.dense",
                                      "bert.encoder.layer.1.attention.output.dense"}
    with pytest.raises(MisconfigurationException, match="targets"):
        Trainer(**trainer_kwargs(tmp_path / "none", callbacks=[make(["*no_such_layer*"])])).fit(HFModule())
