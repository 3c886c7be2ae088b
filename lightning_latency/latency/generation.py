"""Generative latency: time to first token (prefill), time per output token (decode) and tokens/s.

TTFT is the time of ``generate(max_new_tokens=1)`` (prefill + one sampling step); the full call generates exactly
N tokens (``min_new_tokens = max_new_tokens = N``, so an early EOS cannot shorten it), and
``TPOT = (time for N tokens − TTFT) / (N − 1)``. The two calls alternate, so machine noise hits both alike.
Greedy decoding (``do_sample=False``) keeps the work identical from run to run.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import nn

from lightning_latency.latency._inputs import batch_size_of, move_to, resolve_inputs, token_ids_of
from lightning_latency.latency.anchored import AnchoredLatency
from lightning_latency.latency.config import LatencyConfig
from lightning_latency.latency.fast_generation import decode_bytes_per_token, fast_generate
from lightning_latency.latency.hardware import utilisation
from lightning_latency.latency.measure import RunContext, timed_loop
from lightning_latency.latency.memory import PeakMemory, model_stats
from lightning_latency.latency.session import measuring, resolve_config
from lightning_latency.latency.stats import summarize


@dataclass
class GenerationReport(RunContext):
    """Result of :func:`measure_generation`. Times in milliseconds (medians unless named otherwise)."""

    ttft_ms: float
    tpot_ms: float
    tokens_per_s: float
    decode_tokens_per_s: float
    total_ms: float
    prompt_len: int
    new_tokens: int
    batch_size: int
    ttft_iqr_ms: float = 0.0
    tpot_iqr_ms: float = 0.0
    total_iqr_ms: float = 0.0
    count: int = 0
    unstable: bool = False
    fast: bool = False
    kv_cache_mb: float | None = None
    ttft_times_ms: list[float] = field(default_factory=list, repr=False)
    total_times_ms: list[float] = field(default_factory=list, repr=False)

    def speedup_over(self, baseline: GenerationReport) -> float:
        """Decode speed-up: ``baseline.tpot / self.tpot``."""
        return baseline.tpot_ms / self.tpot_ms if self.tpot_ms > 0 else float("inf")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> GenerationReport:
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in names})

    def summary(self) -> str:
        flag = " UNSTABLE" if self.unstable else ""
        return (
            f"{self.name + ': ' if self.name else ''}TTFT {self.ttft_ms:.2f} ms, TPOT {self.tpot_ms:.2f} ms, "
            f"{self.tokens_per_s:,.1f} tok/s (batch {self.batch_size}, prompt {self.prompt_len}, "
            f"{self.new_tokens} new, n={self.count}{flag}) on {self.device}"
        )


def _kv_cache_bytes(model: nn.Module, batch: int, context: float, dtype_bytes: int) -> int | None:
    """Bytes of K and V read per decode step at a given context length (Llama/GPT-2-style configs)."""
    cfg = getattr(model, "config", None)
    if cfg is None:
        return None
    get = cfg.get_text_config() if hasattr(cfg, "get_text_config") else cfg
    layers = getattr(get, "num_hidden_layers", None) or getattr(get, "n_layer", None)
    heads = getattr(get, "num_attention_heads", None) or getattr(get, "n_head", None)
    hidden = getattr(get, "hidden_size", None) or getattr(get, "n_embd", None)
    if not (layers and heads and hidden):
        return None
    kv_heads = getattr(get, "num_key_value_heads", None) or heads
    head_dim = getattr(get, "head_dim", None) or hidden // heads
    return int(2 * layers * kv_heads * head_dim * context * batch * dtype_bytes)


def _dtype_bytes(model: nn.Module) -> int:
    for p in model.parameters():
        if p.is_floating_point():
            return p.element_size()
    return 4


def _prompt(model: nn.Module, inputs: Any, prompt_len: int, batch_size: int) -> dict[str, torch.Tensor]:
    if inputs is None:
        vocab = int(getattr(getattr(model, "config", None), "vocab_size", 0) or 100)
        g = torch.Generator().manual_seed(0)
        ids = torch.randint(0, vocab, (batch_size, prompt_len), generator=g)
        return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    raw = resolve_inputs(inputs)
    ids = token_ids_of(raw)
    if ids is None:
        raise ValueError(
            f"`inputs` for generation must be token ids (batch, seq) or a dict with 'input_ids', got "
            f"{type(raw).__name__}. Pass inputs={{'input_ids': ids}} or inputs=None for random prompts."
        )
    mask = raw.get("attention_mask") if isinstance(raw, Mapping) else None
    return {"input_ids": ids, "attention_mask": mask if isinstance(mask, torch.Tensor) else torch.ones_like(ids)}


def _greedy_calls(model: nn.Module, run: Any, x: dict[str, torch.Tensor], new_tokens: int, fast: bool,
                  fast_compile: bool) -> tuple[Any, Any]:
    """``(first, full)``: greedy generation of 1 and of ``new_tokens`` tokens after prompt ``x`` by ``run`` (the
    measured form of ``model``), through ``generate`` or the fast form."""
    gen_cfg = getattr(model, "generation_config", None)
    pad = getattr(gen_cfg, "pad_token_id", None)
    pad = pad if pad is not None else getattr(gen_cfg, "eos_token_id", None)
    pad = pad[0] if isinstance(pad, (list, tuple)) else (pad if pad is not None else 0)
    common = dict(do_sample=False, use_cache=True, pad_token_id=pad)

    def first() -> Any:
        if fast:
            return fast_generate(run, x["input_ids"], 1, fast_compile, x["attention_mask"])
        return run.generate(**x, max_new_tokens=1, min_new_tokens=1, **common)

    def full() -> Any:
        if fast:
            return fast_generate(run, x["input_ids"], new_tokens, fast_compile, x["attention_mask"])
        return run.generate(**x, max_new_tokens=new_tokens, min_new_tokens=new_tokens, **common)

    return first, full


def tpot_sample_ms(model: nn.Module, prompt: Any, new_tokens: int, config: LatencyConfig | None = None,
                   fast: bool = False) -> float:
    """One TPOT reading: ``(T(new_tokens) - T(1)) / (new_tokens - 1)`` of one greedy call of each, no warm-up (what
    :func:`alternated_ratio` alternates between a candidate and its reference). ``model`` is timed in eval mode
    under ``config``'s threads/device, its own flags restored after."""
    config = (config or LatencyConfig()).replace(compile=False)
    with measuring(model, config, compile_forward_only=True) as session:
        x = move_to(_prompt(model, prompt, 1, 1), session.device)
        first, full = _greedy_calls(model, session.run, x, new_tokens, fast, True)
        with torch.inference_mode():
            start = time.perf_counter()
            first()
            mid = time.perf_counter()
            full()
            end = time.perf_counter()
    return max((end - mid) - (mid - start), 0.0) * 1e3 / (new_tokens - 1)


def measure_generation(model: nn.Module, inputs: Any = None, config: LatencyConfig | None = None,
                       prompt_len: int = 64, new_tokens: int = 32, batch_size: int = 1, fast: bool = False,
                       fast_compile: bool = True, **overrides: Any) -> GenerationReport:
    """Measure TTFT, TPOT and tokens/s of ``model.generate`` (or the fast generation form) with greedy decoding.

    Args:
        model: a model with a Hugging Face style ``generate(input_ids=..., max_new_tokens=...)``.
        inputs: prompt token ids ``(batch, prompt_len)`` or a dict with ``input_ids`` (and ``attention_mask``);
            None builds random prompts of ``batch_size × prompt_len`` from the model's vocabulary.
        config: timing settings (warm-up, min runs/time, budget, device, compile, peaks, clock).
        prompt_len: prompt length when ``inputs`` is None.
        new_tokens: output tokens per call, N >= 2 (TPOT needs at least two).
        batch_size: prompts per call when ``inputs`` is None.
        fast: time :func:`~lightning_latency.latency.fast_generation.fast_generate` (static KV cache, one
            compiled single-token step) instead of ``generate``; unpadded prompts only. ``config.compile`` then
            stays off for the model itself: the fast form compiles its own decode step (``fast_compile``).
        fast_compile: compile the fast form's decode step (warm-up pays the compile).
        **overrides: fields of :class:`LatencyConfig` for this call.

    Raises:
        ValueError: a model without ``generate``, N < 2, bad prompt sizes or inputs.

    Example::

        report = measure_generation(model, prompt_len=64, new_tokens=32, max_time_s=20)
        print(report.ttft_ms, report.tpot_ms, report.tokens_per_s)
    """
    config = resolve_config(config, overrides)
    if fast and getattr(model, "config", None) is None:
        raise ValueError(f"`fast=True` needs a Hugging Face causal LM with a `config`, got {type(model).__name__}. "
                         f"Pass fast=False to time model.generate.")
    if fast:
        config = config.replace(compile=False)
    if not callable(getattr(model, "generate", None)) and not fast:
        raise ValueError(f"`model` must have a `generate` method for generation latency, got {type(model).__name__}."
                         " Use measure_latency for encoders.")
    for name, value, low in (("new_tokens", new_tokens, 2), ("prompt_len", prompt_len, 1), ("batch_size", batch_size, 1)):
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            raise ValueError(f"`{name}` must be an integer >= {low}, got {value!r}."
                             + (" TPOT = (T(N) - TTFT) / (N - 1) needs N >= 2." if name == "new_tokens" else ""))
    prompt = _prompt(model, inputs, prompt_len, batch_size)
    batch, plen = batch_size_of(prompt), int(prompt["input_ids"].shape[-1])
    with measuring(model, config, compile_forward_only=True) as session:
        dev = session.device
        first, full = _greedy_calls(model, session.run, move_to(prompt, dev), new_tokens, fast, fast_compile)
        with torch.inference_mode():
            out = full()
            got = int(out.shape[-1]) - plen
            if got != new_tokens:
                raise RuntimeError(f"generate produced {got} new tokens instead of {new_tokens}; "
                                   "cannot time a fixed output length with this model.")
            peak = PeakMemory(dev)
            with peak:
                t = timed_loop([first, full], config, dev, on_run=peak.sample)
    ttft, total = summarize(t.per_fn_s[0], config.unstable_threshold), summarize(t.per_fn_s[1], config.unstable_threshold)
    pairs = [(b - a) / (new_tokens - 1) for a, b in zip(t.per_fn_s[0], t.per_fn_s[1])]
    tpot_stats = summarize(pairs, config.unstable_threshold)
    tpot_s = max((total.median_ms - ttft.median_ms) / 1e3 / (new_tokens - 1), 1e-12)
    ms = model_stats(model)
    kv = _kv_cache_bytes(model, batch, plen + new_tokens / 2, _dtype_bytes(model))
    bw, flops = session.peak_bandwidth, session.peak_flops
    return GenerationReport(
        ttft_ms=ttft.median_ms, tpot_ms=tpot_s * 1e3, tokens_per_s=batch * new_tokens / (total.median_ms / 1e3),
        decode_tokens_per_s=batch / tpot_s, total_ms=total.median_ms, prompt_len=plen, new_tokens=new_tokens,
        batch_size=batch, ttft_iqr_ms=ttft.iqr_ms, tpot_iqr_ms=tpot_stats.iqr_ms, total_iqr_ms=total.iqr_ms,
        count=total.count, unstable=ttft.unstable or total.unstable, num_threads=session.threads, device=str(dev),
        compiled=config.compile or (fast and fast_compile), fast=fast, budget_exhausted=t.budget_exhausted,
        peak_memory_mb=peak.peak_mb,
        model_mb=ms.model_mb, kv_cache_mb=kv / 1024**2 if kv is not None else None,
        mbu=utilisation(decode_bytes_per_token(model) + (kv or 0), tpot_s, bw),
        mfu=utilisation(2.0 * ms.num_params * batch * plen, ttft.median_ms / 1e3, flops),
        ttft_times_ms=[s * 1e3 for s in t.per_fn_s[0]], total_times_ms=[s * 1e3 for s in t.per_fn_s[1]],
    )


class DecodeLatency(AnchoredLatency):
    """``latency_fn(model) -> TPOT ms`` of greedy decoding; see :func:`decode_latency_fn`."""

    self_timed = True  # the alternated calls return their TPOT: a call's wall time would include the prefill

    def __init__(self, prompt: Any, new_tokens: int, settings: LatencyConfig, fast: bool, rounds: int,
                 alternate: bool = True) -> None:
        super().__init__(rounds)
        self.prompt, self.new_tokens, self.settings, self.fast = prompt, new_tokens, settings, fast
        self.alternate = bool(alternate)

    def _time(self, model: nn.Module) -> float:
        return measure_generation(model, self.prompt, self.settings, new_tokens=self.new_tokens, fast=self.fast).tpot_ms

    def _pair(self, form: Any) -> tuple[Callable[[], Any], Callable[[], Any], int] | None:
        if not self.alternate:
            return None
        reference, args = self._reference, (self.prompt, self.new_tokens, self.settings, self.fast)
        return (lambda: tpot_sample_ms(form, *args)), (lambda: tpot_sample_ms(reference, *args)), \
            max(2 * self.settings.min_runs, 6)


def decode_latency_fn(prompt: Any, new_tokens: int = 16, config: LatencyConfig | None = None,
                      fast: bool = False, reference: nn.Module | None = None, rounds: int = 1,
                      alternate: bool = True) -> DecodeLatency:
    """``latency_fn(model) -> TPOT ms`` of greedy decoding after ``prompt`` (batch 1 for a tokens/s budget).

    Decode tokens/s is ``1000 / TPOT``: pass this to
    :class:`~lightning_latency.pruning.budget_callback.LatencyBudgetPruning` with ``target_tokens_per_s`` (or to
    :func:`~lightning_latency.pruning.budget.layer_sensitivity`). ``fast`` times the static-cache compiled form
    (a compile per call: too slow for a sensitivity pass over many candidates; the eager ``generate`` ranks them).

    With ``reference`` (the dense model; a frozen deep copy is kept), every call is timed beside it and given on the
    scale of the reference's TPOT (:class:`~lightning_latency.latency.anchored.AnchoredLatency`): drift of the
    machine over a long fit cancels. ``alternate`` (default) alternates single TPOT readings of candidate and
    reference (:func:`tpot_sample_ms`, ``max(2 * min_runs, 6)`` pairs a round, the order flipped every pair), so a
    burst of other work seconds long hits both alike; ``alternate=False`` times them in blocks of ``min_runs``
    runs, candidate, reference, reference, candidate. Without ``reference`` each call is the median of ``rounds``
    timings.

    Raises:
        ValueError: ``rounds`` not a positive integer.
    """
    fn = DecodeLatency(prompt, new_tokens, config or LatencyConfig(warmup=1, min_runs=3, max_time_s=4.0), fast,
                       rounds, alternate)
    if reference is not None:
        fn.anchor(reference)
    return fn


__all__ = ["DecodeLatency", "GenerationReport", "decode_latency_fn", "measure_generation", "tpot_sample_ms"]
