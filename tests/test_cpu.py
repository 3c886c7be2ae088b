"""ISA detection (lightning_latency/cpu.py): matches /proc/cpuinfo and torch, and honours oneDNN's ISA cap."""

from __future__ import annotations

import pytest
import torch

from lightning_latency import cpu


@pytest.fixture(autouse=True)
def _fresh_cache():
    cpu.cpu_features.cache_clear()
    yield
    cpu.cpu_features.cache_clear()


def test_features_match_cpuinfo_and_torch(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("ONEDNN_MAX_CPU_ISA", raising=False)
    features = cpu.cpu_features()
    flags = cpu._proc_flags()
    assert features.capability == torch.backends.cpu.get_cpu_capability()
    assert features.vnni == bool(flags & {"avx512_vnni", "avx_vnni"})
    if features.bf16 or features.amx:
        assert features.avx512
    assert features.capability in features.label


def test_onednn_cap_to_avx2_disables_vnni_and_bf16(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", "AVX2")
    features = cpu.cpu_features()
    assert not features.vnni and not features.bf16 and not features.amx


def test_no_flags_means_no_fast_paths(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(cpu, "_proc_flags", lambda: set())
    features = cpu.cpu_features()
    assert (features.vnni, features.bf16, features.amx) == (False, False, False)
    assert "no avx512/vnni/amx/bf16" in features.label or features.avx512
