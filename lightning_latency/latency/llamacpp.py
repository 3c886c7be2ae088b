"""Run and time a GGUF file in llama.cpp: greedy decode (TTFT, TPOT, tokens/s) and logits for perplexity.

The runtime is a prebuilt llama.cpp CPU build from PyPI with CFFI bindings, found by
:mod:`~lightning_latency.latency._llamacpp_lib`: ``llama-cpp-py-sync==0.11739`` (the ``llamacpp`` extra; llama.cpp
b11739, needs glibc >= 2.38) where it loads, else the CPU extension of ``llama-cpp-cffi==0.4.42`` (llama.cpp
b4965, glibc >= 2.34; loaded with ``RTLD_LAZY`` past the one GCC 14 libstdc++ symbol it names, which is only
called on the way to ``std::terminate``: that module's docstring says why this is safe). Both are AVX2 + FMA +
F16C builds with no AVX-512 or VNNI kernels: on an AVX-512 machine they are not llama.cpp at its best.
:func:`system_info` names the binding and the build's feature line; say it next to any timing.

It is used through llama.cpp's C API directly rather than a binding's ``Llama`` class for two reasons: py-sync's
class always creates its context with ``embeddings=True`` (extra work on every decode, unfair to llama.cpp in a
speed comparison), and it requests logits for the last prompt token only (perplexity needs every position). Greedy
decoding is an argmax over the logits in NumPy (~0.02 ms for 49k floats), the same for every file compared.
Where neither binding loads, :func:`llamacpp_unavailable` says why for both and the tests skip with that reason.

Timing follows :func:`~lightning_latency.latency.generation.measure_generation`: TTFT is the prompt's decode plus
the first token, TPOT the mean of the following N - 1 single-token steps, medians over rounds; llama_decode on the
CPU backend returns when its computation is done (it synchronises), so wall-clock around it is the work.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from lightning_latency.latency import _llamacpp_lib
from lightning_latency.latency.generation import GenerationReport
from lightning_latency.latency.stats import summarize


def llamacpp_unavailable() -> str | None:
    """None when llama.cpp loads here (through ``llama-cpp-py-sync`` or ``llama-cpp-cffi``), else the reason,
    naming both packages (for a skip or an error message)."""
    return _llamacpp_lib.unavailable()


def system_info() -> str:
    """The binding and llama.cpp's CPU feature line (``llama-cpp-cffi 0.4.42 ...: CPU : AVX2 = 1 | ...``): say it
    next to any timing."""
    api = _llamacpp_lib.load()
    return f"{api.binding}: {api.system_info().strip()}"


@dataclass(frozen=True)
class LlamaCppConfig:
    """How to run a GGUF file: CPU threads, context window (prompt + new tokens + margin), prompt batch width.

    ``kv_f32`` is a reference mode: the KV cache in fp32 instead of llama.cpp's default fp16 (which rounds K and V to
    2^-11 relative) and attention without the flash-attention kernel (which computes in fp16). Keep it off for
    timing: the defaults are what a llama.cpp user gets.
    """

    n_threads: int = 2
    n_ctx: int = 512
    n_batch: int = 512
    kv_f32: bool = False

    def __post_init__(self) -> None:
        for name in ("n_threads", "n_ctx", "n_batch"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"`{name}` must be an integer >= 1, got {value!r}. Pass e.g. {name}=2.")


class LlamaCppRunner:
    """One GGUF model and context in llama.cpp. Use as a context manager (or call :meth:`close`).

    Example::

        with LlamaCppRunner("student.Q4_0.gguf", LlamaCppConfig(n_threads=2)) as run:
            tokens = run.generate([1, 2, 3], max_new_tokens=16)
            logits = run.logits([1, 2, 3])          # (3, vocab)
    """

    def __init__(self, path: str | Path, config: LlamaCppConfig | None = None) -> None:
        if not Path(path).is_file():
            raise ValueError(f"`path` must be an existing GGUF file, got {str(path)!r}. Write one with export_gguf.")
        self.config = config or LlamaCppConfig()
        self._api = _llamacpp_lib.load()
        self._lib, self._ffi = self._api.lib, self._api.ffi
        self._lib.llama_backend_init()
        self._model = self._lib.llama_model_load_from_file(str(path).encode(), self._lib.llama_model_default_params())
        if self._model == self._ffi.NULL:
            raise RuntimeError(f"llama.cpp could not load {str(path)!r} (see its log on stderr).")
        params = self._lib.llama_context_default_params()
        params.n_ctx, params.n_batch, params.n_ubatch = self.config.n_ctx, self.config.n_batch, self.config.n_batch
        params.n_threads = params.n_threads_batch = self.config.n_threads
        params.embeddings = False
        if self.config.kv_f32:
            params.type_k = params.type_v = 0  # GGML_TYPE_F32
            # The CPU flash-attention kernel rounds Q and the softmax weights to fp16 (3e-4 relative on logits,
            # measured); the reference mode takes the plain f32 attention path.
            self._api.disable_flash_attention(params)
        self._ctx = self._lib.llama_init_from_model(self._model, params)
        if self._ctx == self._ffi.NULL:
            self._lib.llama_model_free(self._model)
            raise RuntimeError(f"llama.cpp could not create a context for {str(path)!r}.")
        self.n_vocab = int(self._lib.llama_vocab_n_tokens(self._lib.llama_model_get_vocab(self._model)))
        if self.n_vocab <= 0:  # a no-vocab file (export_gguf(tokenizer=None)): the width is in its metadata
            import gguf

            self.n_vocab = int(gguf.GGUFReader(str(path)).fields["llama.vocab_size"].contents())

    def reset(self) -> None:
        """Forget the KV cache: the next call starts at position 0."""
        self._api.clear_kv(self._ctx)

    def tokenize(self, text: str, add_special: bool = False) -> list[int]:
        """``text`` tokenized by llama.cpp from the file's own tokenizer metadata (``add_special``: BOS/EOS)."""
        vocab, data = self._lib.llama_model_get_vocab(self._model), text.encode("utf-8")
        size = len(data) + 8  # a byte-level BPE makes at most one token per byte (+ specials)
        out = self._ffi.new("llama_token[]", size)
        n = self._lib.llama_tokenize(vocab, data, len(data), out, size, add_special, False)
        if n < 0:
            raise RuntimeError(f"llama_tokenize needed {-n} tokens for {text!r}, more than the {size} allowed.")
        return [int(out[i]) for i in range(n)]

    def _decode(self, tokens: Sequence[int], start: int, all_logits: bool) -> None:
        for offset in range(0, len(tokens), self.config.n_batch):
            chunk = tokens[offset:offset + self.config.n_batch]
            batch = self._lib.llama_batch_init(len(chunk), 0, 1)
            try:
                batch.n_tokens = len(chunk)
                for i, token in enumerate(chunk):
                    batch.token[i], batch.pos[i], batch.n_seq_id[i] = int(token), start + offset + i, 1
                    batch.seq_id[i][0] = 0
                    batch.logits[i] = all_logits or offset + i == len(tokens) - 1
                code = self._lib.llama_decode(self._ctx, batch)
            finally:
                self._lib.llama_batch_free(batch)
            if code != 0:
                raise RuntimeError(f"llama_decode failed with code {code} (context {self.config.n_ctx} too small?).")

    def _row(self, i: int) -> np.ndarray:
        ptr = self._lib.llama_get_logits_ith(self._ctx, i)
        return np.frombuffer(self._ffi.buffer(ptr, 4 * self.n_vocab), dtype=np.float32).copy()

    def logits(self, tokens: Sequence[int]) -> np.ndarray:
        """Logits ``(len(tokens), vocab)`` float32 of one fresh sequence (the cache is reset first)."""
        if len(tokens) == 0 or len(tokens) > self.config.n_ctx:
            raise ValueError(f"`tokens` must hold 1..n_ctx={self.config.n_ctx} ids, got {len(tokens)}.")
        self.reset()
        rows = []
        for offset in range(0, len(tokens), self.config.n_batch):
            chunk = tokens[offset:offset + self.config.n_batch]
            self._decode(chunk, offset, all_logits=True)
            rows.extend(self._row(i) for i in range(len(chunk)))
        return np.stack(rows)

    def generate(self, prompt: Sequence[int], max_new_tokens: int,
                 clock: Callable[[], float] = time.perf_counter) -> tuple[list[int], float, float]:
        """Greedy ``max_new_tokens`` after ``prompt``: ``(new tokens, TTFT seconds, total seconds)``."""
        if len(prompt) + max_new_tokens > self.config.n_ctx:
            raise ValueError(f"`prompt` ({len(prompt)}) + `max_new_tokens` ({max_new_tokens}) exceed n_ctx="
                             f"{self.config.n_ctx}. Pass LlamaCppConfig(n_ctx=...) larger.")
        self.reset()
        t0 = clock()
        self._decode(list(prompt), 0, all_logits=False)
        out = [int(np.argmax(self._row(-1)))]
        ttft = clock() - t0
        for step in range(max_new_tokens - 1):
            self._decode([out[-1]], len(prompt) + step, all_logits=False)
            out.append(int(np.argmax(self._row(-1))))
        return out, ttft, clock() - t0

    def close(self) -> None:
        if getattr(self, "_ctx", None) is not None:
            self._lib.llama_free(self._ctx)
            self._lib.llama_model_free(self._model)
            self._ctx = None

    def __enter__(self) -> LlamaCppRunner:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def measure_llamacpp(path: str | Path, prompt: Sequence[int], new_tokens: int = 64, rounds: int = 5,
                     config: LlamaCppConfig | None = None, name: str = "") -> GenerationReport:
    """TTFT, TPOT and tokens/s of greedy decoding of ``path`` in llama.cpp, medians over ``rounds`` (1 warm-up).

    Raises:
        ValueError: ``new_tokens`` < 2 or ``rounds`` < 1; RuntimeError: llama.cpp unavailable (the reason).
    """
    if new_tokens < 2 or rounds < 1:
        raise ValueError(f"`new_tokens` must be >= 2 and `rounds` >= 1, got {new_tokens} and {rounds}.")
    config = config or LlamaCppConfig()
    with LlamaCppRunner(path, config) as run:
        run.generate(prompt, new_tokens)
        times = [run.generate(prompt, new_tokens)[1:] for _ in range(rounds)]
    ttft, total = summarize([t[0] for t in times]), summarize([t[1] for t in times])
    tpot = summarize([(b - a) / (new_tokens - 1) for a, b in times])
    tpot_s = max((total.median_ms - ttft.median_ms) / 1e3 / (new_tokens - 1), 1e-12)
    return GenerationReport(
        ttft_ms=ttft.median_ms, tpot_ms=tpot_s * 1e3, tokens_per_s=new_tokens / (total.median_ms / 1e3),
        decode_tokens_per_s=1 / tpot_s, total_ms=total.median_ms, prompt_len=len(prompt), new_tokens=new_tokens,
        batch_size=1, ttft_iqr_ms=ttft.iqr_ms, tpot_iqr_ms=tpot.iqr_ms, total_iqr_ms=total.iqr_ms,
        count=total.count, unstable=ttft.unstable or total.unstable, num_threads=config.n_threads,
        device="cpu (llama.cpp)", model_mb=Path(path).stat().st_size / 1024**2, name=name,
        ttft_times_ms=[t[0] * 1e3 for t in times], total_times_ms=[t[1] * 1e3 for t in times],
    )


def llamacpp_quantize(src: str | Path, dst: str | Path, qtype: str = "Q4_0", n_threads: int = 2) -> Path:
    """llama.cpp's own quantizer (``llama-quantize``'s ``llama_model_quantize``): ``src`` GGUF to ``qtype`` at ``dst``.

    The reference point for our exports: llama.cpp's choices (e.g. which tensors it keeps at higher precision).
    """
    ftypes = {"F16": 1, "Q4_0": 2, "Q4_1": 3, "Q8_0": 7}  # llama_ftype
    if qtype not in ftypes:
        raise ValueError(f"`qtype` must be one of {list(ftypes)}, got {qtype!r}.")
    api = _llamacpp_lib.load()
    lib, ffi = api.lib, api.ffi
    params = ffi.new("llama_model_quantize_params *", lib.llama_model_quantize_default_params())
    params.nthread, params.ftype, params.allow_requantize = n_threads, ftypes[qtype], True
    if lib.llama_model_quantize(str(src).encode(), str(dst).encode(), params) != 0:
        raise RuntimeError(f"llama.cpp could not quantize {str(src)!r} to {qtype}.")
    return Path(dst)


def llamacpp_perplexity(path: str | Path, token_ids: Sequence[int], window: int = 256,
                        config: LlamaCppConfig | None = None) -> float:
    """Perplexity of ``token_ids`` under the GGUF model in llama.cpp, over non-overlapping ``window``-token windows.

    Each window is a fresh sequence; its first token is context only. Log-softmax in float64.
    """
    if window < 2 or len(token_ids) < window:
        raise ValueError(f"`window` must be >= 2 and <= len(token_ids)={len(token_ids)}, got {window}.")
    config = config or LlamaCppConfig(n_ctx=max(window, 512), n_batch=max(window, 512))
    nll, count = 0.0, 0
    with LlamaCppRunner(path, config) as run:
        for start in range(0, len(token_ids) - window + 1, window):
            ids = list(token_ids[start:start + window])
            logits = run.logits(ids).astype(np.float64)[:-1]
            logz = logits.max(-1) + np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1))
            nll += float((logz - logits[np.arange(window - 1), ids[1:]]).sum())
            count += window - 1
    return float(np.exp(nll / count))


__all__ = ["LlamaCppConfig", "LlamaCppRunner", "llamacpp_perplexity", "llamacpp_quantize", "llamacpp_unavailable",
           "measure_llamacpp", "system_info"]
