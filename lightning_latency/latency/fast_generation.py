"""The fast generation form for causal LMs: a static KV cache and a compiled single-token decode step.

Hugging Face ``generate`` spends milliseconds of Python per token (logits processors, stopping criteria, a dynamic
cache that grows by concatenation, mask rebuilding) around a forward that is itself hundreds of small eager module
calls. On a CPU at batch 1 that overhead is of the order of the memory-bound work it wraps. Here the loop is a few
lines: the prompt is prefilled eagerly into a ``transformers.StaticCache`` (preallocated, updated in place with
``index_copy_``), then each new token is one call of a ``torch.compile``-d function ``(token, position) -> next
token`` whose shapes never change, so it compiles once (per cache length) and the argmax runs inside the graph.

Greedy only, and always exactly ``max_new_tokens`` tokens (an EOS does not stop it: timing needs a fixed length,
as :func:`~lightning_latency.latency.measure_generation` does for ``generate``). Prompts must be unpadded.
"""

from __future__ import annotations

import inspect
import types
import weakref
from typing import Any

import torch
from torch import nn

from lightning_latency.latency.memory import tensor_nbytes


def _cache_kwarg(model: nn.Module) -> str:
    # transformers 5.2x renamed `past_key_values` to `cache` (the old name warns until 5.40).
    params = inspect.signature(model.forward).parameters
    return "cache" if "cache" in params else "past_key_values"


def _step(model: nn.Module, cache: Any, cache_kw: str, ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    out = model(input_ids=ids, cache_position=positions, use_cache=True, **{cache_kw: cache})
    return out.logits[:, -1].argmax(-1, keepdim=True)


class FastGenerator:
    """Greedy decoding with a static KV cache and (optionally) a compiled decode step, reusable across calls.

    Args:
        model: a Hugging Face causal LM (``config``, ``forward(input_ids, cache_position, …)``) in eval mode.
        max_cache_len: prompt length + new tokens the cache holds; a longer request raises.
        batch_size: prompts per call.
        compile: ``torch.compile`` the single-token step (first call compiles: seconds to a minute on CPU).
        compile_mode: ``torch.compile`` mode, e.g. ``"max-autotune-no-cudagraphs"``; None for the default.

    Raises:
        ValueError: a model without a ``config``, non-positive sizes.

    Example::

        gen = FastGenerator(model, max_cache_len=128, compile=True)
        out = gen(input_ids, max_new_tokens=64)      # (batch, prompt + 64)
    """

    def __init__(self, model: nn.Module, max_cache_len: int, batch_size: int = 1, compile: bool = True,
                 compile_mode: str | None = None) -> None:
        from transformers import StaticCache

        if getattr(model, "config", None) is None:
            raise ValueError(f"`model` must be a Hugging Face causal LM with a `config`, got {type(model).__name__}. "
                             f"Use measure_generation(model) (plain generate) for other models.")
        for name, value in (("max_cache_len", max_cache_len), ("batch_size", batch_size)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"`{name}` must be an integer >= 1, got {value!r}.")
        self._model: Any = model
        self.max_cache_len, self.batch_size = max_cache_len, batch_size
        self.compiled = bool(compile)
        self._kw = _cache_kwarg(model)
        self.cache = StaticCache(config=model.config, max_cache_len=max_cache_len)
        # A fresh code object per generator: dynamo keeps its compiled graphs (and its recompile limit, 8) per code
        # object, so generators for more than 8 models sharing `_step` would silently fall back to eager.
        step = types.FunctionType(_step.__code__.replace(), _step.__globals__, f"_step_{id(self):x}")
        self._step = torch.compile(step, mode=compile_mode, dynamic=False) if compile else _step

    @property
    def model(self) -> nn.Module:
        return self._model() if isinstance(self._model, weakref.ref) else self._model

    def _forward(self, ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        return _step(self.model, self.cache, self._kw, ids, positions)

    @torch.inference_mode()
    def __call__(self, input_ids: torch.Tensor, max_new_tokens: int,
                 attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Greedy continuation: ``(batch, prompt)`` token ids → ``(batch, prompt + max_new_tokens)``.

        Raises:
            ValueError: wrong batch size, too long for the cache, a padded ``attention_mask``.
        """
        if input_ids.dim() != 2 or input_ids.shape[0] != self.batch_size:
            raise ValueError(f"`input_ids` must be (batch={self.batch_size}, prompt), got {tuple(input_ids.shape)}. "
                             f"Build a FastGenerator with batch_size={input_ids.shape[0]}.")
        if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 1:
            raise ValueError(f"`max_new_tokens` must be an integer >= 1, got {max_new_tokens!r}.")
        plen = int(input_ids.shape[1])
        if plen + max_new_tokens > self.max_cache_len:
            raise ValueError(f"prompt {plen} + `max_new_tokens` {max_new_tokens} exceeds `max_cache_len`="
                             f"{self.max_cache_len}. Build the FastGenerator with "
                             f"max_cache_len>={plen + max_new_tokens}.")
        if attention_mask is not None and not bool(attention_mask.all()):
            raise ValueError("`attention_mask` has padding; the fast generation form takes unpadded prompts only. "
                             "Generate each prompt on its own (batch_size=1) or use model.generate.")
        self.cache.reset()
        out = torch.empty(self.batch_size, plen + max_new_tokens, dtype=input_ids.dtype, device=input_ids.device)
        out[:, :plen] = input_ids
        token = self._forward(input_ids, torch.arange(plen, device=input_ids.device))
        out[:, plen:plen + 1] = token
        for i in range(1, max_new_tokens):
            position = torch.tensor([plen + i - 1], device=input_ids.device)
            token = self._step(self.model, self.cache, self._kw, token, position)
            out[:, plen + i:plen + i + 1] = token
        return out


_GENERATORS: weakref.WeakKeyDictionary[nn.Module, dict[tuple[int, int, bool], FastGenerator]] = (
    weakref.WeakKeyDictionary())


def fast_generate(model: nn.Module, input_ids: torch.Tensor, max_new_tokens: int, compile: bool = True,
                  attention_mask: torch.Tensor | None = None) -> torch.Tensor:
    """Greedy generation in the fast form (static cache, compiled decode step); returns ``(batch, prompt + new)``.

    The :class:`FastGenerator` (and its compiled step) is kept per model, batch size and length, so repeated calls
    of the same shape compile once. Same tokens as ``model.generate(do_sample=False, min_new_tokens=max_new_tokens)``
    up to floating-point ties.

    Args:
        model: a Hugging Face causal LM in eval mode.
        input_ids: ``(batch, prompt)`` token ids, unpadded.
        max_new_tokens: tokens to add (exactly; EOS does not stop).
        compile: compile the decode step.
        attention_mask: optional ``(batch, prompt)``; must be all ones.

    Example::

        out = fast_generate(model, tok("The BBC", return_tensors="pt").input_ids, max_new_tokens=32)
    """
    key = (int(input_ids.shape[0]), int(input_ids.shape[1]) + int(max_new_tokens), bool(compile))
    per_model = _GENERATORS.setdefault(model, {})
    gen = per_model.get(key)
    if gen is None:
        gen = per_model[key] = FastGenerator(model, key[1], key[0], compile=compile)
        # The cache must not keep the model alive: a value that refers to its weak key never lets the entry go.
        gen._model = weakref.ref(model)
    return gen(input_ids, max_new_tokens, attention_mask)


def decode_bytes_per_token(model: nn.Module) -> int:
    """Bytes of weights one decode step reads: every parameter and buffer by real storage, except embedding tables.

    An embedding lookup reads one row per token, so an ``nn.Embedding`` weight is not counted unless another
    module uses the same tensor (tied ``lm_head`` still in float). Packed int4 / int8 buffers count at their size.
    """
    embedding_only: set[int] = set()
    used_elsewhere: set[int] = set()
    for module in model.modules():
        own = list(module.parameters(recurse=False)) + [b for b in module.buffers(recurse=False) if b is not None]
        target = embedding_only if isinstance(module, nn.Embedding) else used_elsewhere
        target.update(id(t) for t in own)
    seen: set[int] = set()
    total = 0
    for t in [*model.parameters(), *(b for b in model.buffers() if b is not None)]:
        if id(t) in seen or (id(t) in embedding_only and id(t) not in used_elsewhere):
            continue
        seen.add(id(t))
        total += tensor_nbytes(t)
    return total


def _copy_once(src: torch.Tensor, dst: torch.Tensor) -> None:
    dst.copy_(src)


def measure_bandwidth(size_mb: int = 256, repeats: int = 5, device: torch.device | str = "cpu",
                      clock: Any = None) -> float:
    """Memory bandwidth in bytes/s from a large tensor copy (STREAM "copy": read + write), the best of ``repeats``.

    The MBU denominator measured on the machine itself: decode at batch 1 cannot read weights faster than this.
    ``size_mb`` must be far above the last-level cache (default 256 MB) or the number measures the cache.

    Raises:
        ValueError: non-positive sizes.
    """
    import time

    for name, value in (("size_mb", size_mb), ("repeats", repeats)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"`{name}` must be an integer >= 1, got {value!r}. Pass e.g. {name}=256.")
    clock = clock or time.perf_counter
    device = torch.device(device)
    n = size_mb * 2**20 // 4
    src = torch.ones(n, dtype=torch.float32, device=device)
    dst = torch.empty_like(src)
    _copy_once(src, dst)  # first touch: page faults are not bandwidth
    best = float("inf")
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize(device)  # time the copy, not the launch
        start = clock()
        _copy_once(src, dst)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        best = min(best, clock() - start)
    return 2 * n * 4 / max(best, 1e-12)


__all__ = ["FastGenerator", "decode_bytes_per_token", "fast_generate", "measure_bandwidth"]
