"""The one set-up every measurer shares: settings, threads, training flags, the form to run, peaks."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from lightning_latency.latency import LatencyConfig, measure_generation, module_breakdown
from lightning_latency.latency.session import measuring, resolve_config


def test_measuring_restores_threads_and_every_training_flag_even_on_error() -> None:
    model = nn.Sequential(nn.Linear(4, 4), nn.Dropout())
    model[1].eval()  # a submodule deliberately in eval mode (a frozen teacher) must stay so
    threads = torch.get_num_threads()
    with pytest.raises(RuntimeError, match="boom"):
        with measuring(model, LatencyConfig(threads=1, peak_bandwidth=1e9)) as session:
            assert session.run is model and not model.training and session.threads == 1
            assert session.peak_bandwidth == 1e9 and session.peak_flops is None  # CPU: no known peak
            raise RuntimeError("boom")
    assert torch.get_num_threads() == threads and model.training and not model[1].training


def test_measuring_transform_false_runs_the_model_itself() -> None:
    model = nn.Linear(4, 4)
    with measuring(model, LatencyConfig(device="meta"), transform=False) as session:
        assert session.run is model and session.device == torch.device("cpu")
    with measuring(model, LatencyConfig(device="meta")) as session:
        assert session.run is not model and session.device == torch.device("meta")  # a moved deep copy


def test_every_measurer_checks_the_config_the_same_way() -> None:
    assert resolve_config(None, {"warmup": 1}).warmup == 1
    with pytest.raises(TypeError, match="`config` must be a LatencyConfig or None, got dict"):
        resolve_config({"warmup": 1}, {})  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="Unknown LatencyConfig field"):
        module_breakdown(nn.Linear(4, 4), torch.randn(2, 4), warmups=1)
    with pytest.raises(TypeError, match="`config` must be a LatencyConfig"):
        measure_generation(nn.Linear(4, 4), config={"warmup": 1})  # type: ignore[arg-type]
