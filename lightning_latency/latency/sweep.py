"""Latency over a grid of batch sizes and sequence lengths (forward) or prompt lengths (generation)."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn

from lightning_latency.latency.generation import GenerationReport, measure_generation
from lightning_latency.latency.measure import LatencyConfig, LatencyReport, measure_latency


def random_token_inputs(model: nn.Module, batch_size: int, seq_len: int, seed: int = 0) -> dict[str, torch.Tensor]:
    """``{"input_ids": (batch, seq), "attention_mask": (batch, seq)}`` of random ids from the model's vocabulary."""
    vocab = int(getattr(getattr(model, "config", None), "vocab_size", 0) or 100)
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (batch_size, seq_len), generator=g)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}


def _check_sizes(name: str, values: Sequence[int]) -> list[int]:
    values = list(values)
    if not values or any(isinstance(v, bool) or not isinstance(v, int) or v < 1 for v in values):
        raise ValueError(f"`{name}` must be a non-empty list of integers >= 1, got {values!r}. E.g. {name}=[1, 8].")
    return values


def sweep_latency(model: nn.Module, batch_sizes: Sequence[int] = (1,), seq_lens: Sequence[int] = (128,),
                  inputs_fn: Callable[[int, int], Any] | None = None, config: LatencyConfig | None = None,
                  **overrides: Any) -> list[LatencyReport]:
    """:func:`measure_latency` for every (batch size, sequence length) pair; reports are named ``"b{B}_s{S}"``.

    Args:
        model: the module to measure.
        batch_sizes: batch sizes to try.
        seq_lens: sequence lengths to try.
        inputs_fn: ``(batch, seq) -> inputs``; None builds random token ids (``input_ids`` + ``attention_mask``).
        config: measurement settings for every point; ``**overrides`` change fields for this sweep.

    Example::

        for r in sweep_latency(model, batch_sizes=[1, 8], seq_lens=[64, 128], max_time_s=1):
            print(r.name, r.median_ms, r.tokens_per_s)
    """
    batches, seqs = _check_sizes("batch_sizes", batch_sizes), _check_sizes("seq_lens", seq_lens)
    build = inputs_fn or (lambda b, s: random_token_inputs(model, b, s))
    reports = []
    for b in batches:
        for s in seqs:
            report = measure_latency(model, build(b, s), config, **overrides)
            report.name = f"b{b}_s{s}"
            reports.append(report)
    return reports


def sweep_generation(model: nn.Module, batch_sizes: Sequence[int] = (1,), prompt_lens: Sequence[int] = (64,),
                     new_tokens: int = 32, config: LatencyConfig | None = None,
                     **overrides: Any) -> list[GenerationReport]:
    """:func:`measure_generation` for every (batch size, prompt length) pair; reports named ``"b{B}_p{P}"``."""
    batches, prompts = _check_sizes("batch_sizes", batch_sizes), _check_sizes("prompt_lens", prompt_lens)
    reports = []
    for b in batches:
        for p in prompts:
            report = measure_generation(model, None, config, prompt_len=p, new_tokens=new_tokens, batch_size=b,
                                        **overrides)
            report.name = f"b{b}_p{p}"
            reports.append(report)
    return reports


def sweep_table(reports: Sequence[LatencyReport]) -> str:
    """A text table of a forward sweep: name, median, p90, IQR %, samples/s, tokens/s."""
    lines = [f"{'point':<14}{'p50 ms':>10}{'p90 ms':>10}{'IQR%':>7}{'samples/s':>12}{'tokens/s':>12}"]
    for r in reports:
        tok = f"{r.tokens_per_s:>12.0f}" if r.tokens_per_s else f"{'-':>12}"
        lines.append(f"{r.name:<14}{r.median_ms:>10.3f}{r.p90_ms:>10.3f}{100 * r.rel_iqr:>7.1f}"
                     f"{r.samples_per_s:>12.1f}{tok}")
    return "\n".join(lines)


__all__ = ["random_token_inputs", "sweep_generation", "sweep_latency", "sweep_table"]
