from __future__ import annotations

import warnings

import pytest
import torch
from helpers import tiny_llama
from torch import nn

from lightning_latency.latency import model_stats, tensor_nbytes
from lightning_latency.latency.memory import PeakMemory


def test_dense_sizes_and_counts() -> None:
    m = nn.Sequential(nn.Linear(10, 20), nn.BatchNorm1d(20))
    s = model_stats(m)
    n = 10 * 20 + 20 + 20 + 20
    assert s.num_params == n and s.nonzero_params == n - 20  # BatchNorm bias starts at 0
    assert s.param_bytes == 4 * n
    assert s.buffer_bytes == 4 * 20 * 2 + 8  # running mean/var + int64 num_batches_tracked
    assert s.model_mb == pytest.approx(s.model_bytes / 2**20)


def test_tied_embeddings_count_once() -> None:
    m = tiny_llama()  # tie_word_embeddings=True: lm_head.weight is embed_tokens.weight
    assert m.lm_head.weight is m.model.embed_tokens.weight
    s = model_stats(m)
    assert s.num_params == sum(p.numel() for p in m.parameters())  # parameters() also de-duplicates


def test_pruned_zeros_show_in_nonzero_count() -> None:
    m = nn.Linear(100, 100, bias=False)
    with torch.no_grad():
        m.weight[:, :50] = 0
    s = model_stats(m)
    assert s.num_params == 10_000 and s.nonzero_params == 5_000 and s.sparsity == pytest.approx(0.5)


def test_sparse_tensors_count_real_storage() -> None:
    dense = torch.zeros(100, 100)
    dense[torch.arange(100), torch.arange(100)] = 1.0
    coo = dense.to_sparse()
    assert tensor_nbytes(coo) == 100 * 2 * 8 + 100 * 4  # int64 (row, col) indices + fp32 values
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        csr = dense.to_sparse_csr()
    assert tensor_nbytes(csr) == 101 * 8 + 100 * 8 + 100 * 4
    assert tensor_nbytes(dense) == 40_000


def test_torchao_int8_weights_count_packed_storage() -> None:
    torchao_q = pytest.importorskip("torchao.quantization")
    m = nn.Sequential(nn.Linear(256, 256, bias=False))
    fp32 = model_stats(m)
    torchao_q.quantize_(m, torchao_q.Int8WeightOnlyConfig())
    assert type(m[0].weight) is not nn.Parameter  # a tensor subclass now
    q = model_stats(m)
    assert q.num_params == fp32.num_params  # logical shape unchanged
    assert 256 * 256 <= q.param_bytes < fp32.param_bytes / 3  # int8 data + per-channel scales
    assert 0 < q.nonzero_params <= q.num_params


def test_peak_memory_cpu_sees_allocations() -> None:
    # A fresh process: in a long pytest run the allocator may already hold freed memory, which a new tensor reuses
    # without growing the RSS (process RSS growth is what PeakMemory reports on CPU).
    import subprocess
    import sys
    import textwrap

    code = textwrap.dedent(
        """
        import torch
        from lightning_latency.latency.memory import PeakMemory
        with PeakMemory(torch.device("cpu")) as peak:
            big = torch.ones(64, 1024, 1024)  # 256 MB, touched
            del big  # freed before any sample: only the kernel's peak-RSS counter still sees it (Linux)
        print(peak.peak_mb)
        """
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True)
    peak_mb = float(out.stdout.strip().splitlines()[-1])
    assert 200 < peak_mb < 400, peak_mb


def test_bad_model_argument() -> None:
    with pytest.raises(ValueError, match="`model` must be a torch.nn.Module"):
        model_stats("bert")
