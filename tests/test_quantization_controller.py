"""``QATController`` without Lightning: a plain training loop on a bare ``nn.Module``, checkpoints, state round trip."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from torch import nn

from lightning_latency.quantization import RESERVED_KEY, Phase, QATController, QuantizationConfig
from lightning_latency.quantization.qat import converted_modules, is_converted, is_frozen, is_prepared

CONFIG = QuantizationConfig(scheme="int8_dynamic", exclude=[])


class CountingNet(nn.Sequential):
    """Counts whole-model scans (``named_modules`` on the root), the cost ``sync`` must not pay per batch."""

    scans = 0

    def named_modules(self, *args: Any, **kwargs: Any) -> Any:
        CountingNet.scans += 1
        return super().named_modules(*args, **kwargs)


def _net(seed: int = 0) -> CountingNet:
    torch.manual_seed(seed)
    return CountingNet(nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 8))


def _train(model: nn.Module, qat: QATController, steps: range) -> list[Phase]:
    opt = torch.optim.SGD(model.parameters(), lr=0.05)  # built before prepare: parameters are shared, stays valid
    gen = torch.Generator().manual_seed(1)
    phases = []
    for step in steps:
        qat.sync(model, step)
        phases.append(qat.phase)
        loss = model(torch.randn(4, 32, generator=gen)).square().mean()
        loss.backward()
        opt.step()
        opt.zero_grad()
    return phases


def test_plain_loop_follows_the_schedule_and_sync_does_not_scan_the_model() -> None:
    model, qat = _net(), QATController(CONFIG, start_step=2, freeze_step=4)
    phases = _train(model, qat, range(6))
    assert phases == [Phase.FLOAT] * 2 + [Phase.PREPARED] * 2 + [Phase.FROZEN] * 2
    assert qat.prepared_at_step == 2 and qat.frozen_at_step == 4 and qat.quantized == ["0", "2"]
    assert is_frozen(model)
    scans = CountingNet.scans
    assert scans > 0  # preparing and freezing did walk the model (the counter works)
    for step in range(6, 200):
        assert qat.sync(model, step) == []
    assert CountingNet.scans == scans  # nothing changed: no walk over the modules


def test_start_epoch_and_wanted_are_pure_schedule() -> None:
    qat = QATController(CONFIG, start_epoch=1, freeze_step=10)
    assert [qat.wanted(s, e) for s, e in [(0, 0), (5, 1), (12, 0), (12, 2)]] == [
        Phase.FLOAT, Phase.PREPARED, Phase.FLOAT, Phase.FROZEN]


def _roundtrip(model: nn.Module, qat: QATController, fresh: nn.Module, strict: bool = True) -> QATController:
    state = model.state_dict()
    qat.save_into(state)
    loaded = QATController(CONFIG)
    loaded.register_load_hooks(fresh)
    fresh.load_state_dict(state, strict=strict)
    return loaded


def test_frozen_checkpoint_loads_strictly_into_a_fresh_float_model() -> None:
    model, qat = _net(), QATController(CONFIG, start_step=0, freeze_step=1)
    _train(model, qat, range(3))
    state = model.state_dict()
    qat.save_into(state)
    assert state[RESERVED_KEY]["phase"] == "frozen" and state[RESERVED_KEY]["packed"] == {}
    fresh = _net(seed=1)
    loaded = _roundtrip(model, qat, fresh)
    assert loaded.phase is Phase.FROZEN and is_frozen(fresh)
    x = torch.randn(3, 32)
    torch.testing.assert_close(fresh(x), model(x), atol=0, rtol=0)  # same weights, same frozen grid


def test_converted_checkpoint_restores_bit_identical_int8_weights() -> None:
    model, qat = _net(), QATController(CONFIG)
    _train(model, qat, range(2))
    qat.convert(model)
    fresh = _net(seed=1)
    loaded = _roundtrip(model, qat, fresh)
    assert loaded.phase is Phase.CONVERTED and set(converted_modules(fresh)) == {"0", "2"}
    for name in ("0", "2"):
        torch.testing.assert_close(fresh.get_submodule(name).weight.qdata, model.get_submodule(name).weight.qdata,
                                   atol=0, rtol=0)
    x = torch.randn(3, 32)
    torch.testing.assert_close(fresh(x), model(x), atol=0, rtol=0)


def test_a_plain_model_loads_a_qat_state_dict_with_strict_false_only() -> None:
    model, qat = _net(), QATController(CONFIG)
    _train(model, qat, range(2))
    qat.convert(model)
    state = model.state_dict()
    qat.save_into(state)
    with pytest.raises(RuntimeError, match=RESERVED_KEY):
        _net(seed=1).load_state_dict(state)
    plain = _net(seed=1)
    result = plain.load_state_dict(state, strict=False)
    assert result.unexpected_keys == [RESERVED_KEY] and not is_converted(plain)
    # the float weights are the dequantized int8 values
    torch.testing.assert_close(plain[0].weight, model[0].weight.dequantize(), atol=0, rtol=0)


def test_older_state_dicts_without_the_entry_still_load_frozen() -> None:
    model, qat = _net(), QATController(CONFIG, freeze_step=1)
    _train(model, qat, range(2))
    fresh, loaded = _net(seed=1), QATController(CONFIG)
    loaded.register_load_hooks(fresh)
    fresh.load_state_dict(model.state_dict())  # no reserved entry: the frozen scale buffers say "frozen"
    assert loaded.phase is Phase.FROZEN and is_frozen(fresh)


def test_state_dict_round_trip_and_restore_on_the_next_sync() -> None:
    model, qat = _net(), QATController(CONFIG, start_step=1, freeze_step=2)
    _train(model, qat, range(4))
    other = QATController(CONFIG, start_step=1, freeze_step=2)
    other.load_state_dict(qat.state_dict())
    assert other.state_dict() == qat.state_dict()
    fresh = _net(seed=1)  # weights loaded elsewhere without the hooks: the next sync brings the model to the phase
    assert other.sync(fresh, 0) == [Phase.FROZEN] and is_frozen(fresh) and is_prepared(fresh)
    other.load_state_dict({})  # an empty (old) state reads as float
    assert other.phase is Phase.FLOAT and other.quantized == []


@pytest.mark.parametrize(("kwargs", "match"), [
    ({"start_step": -1}, r"`start_step` must be an int >= 0, got -1"),
    ({"start_step": 2, "start_epoch": 1}, r"Give one of `start_step` \(2\) and `start_epoch` \(1\)"),
    ({"start_step": 3, "freeze_step": 3}, r"`freeze_step`=3 must be after `start_step`=3"),
    ({"config": 42}, r"`config` must be a QuantizationConfig"),
])
def test_controller_misconfiguration(kwargs: dict[str, Any], match: str) -> None:
    with pytest.raises((ValueError, TypeError), match=match):
        QATController(**kwargs)
