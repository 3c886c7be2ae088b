"""Which submodules take the time: forward pre/post hooks with timing, aggregated by type, name or pattern.

Each hook pair brackets one submodule call; on accelerators both hooks synchronise (otherwise the host clock would
time kernel launches, not kernels), which slows the model down, so compare shares, not absolute totals, with
:func:`measure_latency` figures. Times are inclusive: a ``BertLayer`` row contains its attention and MLP.
"""

from __future__ import annotations

import re
import time
from collections import defaultdict
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

import torch
from torch import nn

from lightning_latency.latency._inputs import call_model, move_to, resolve_inputs
from lightning_latency.latency.config import LatencyConfig
from lightning_latency.latency.measure import sync
from lightning_latency.latency.session import measuring, resolve_config

# Name patterns (re.search on the qualified module name) for the usual transformer parts of BERT, Llama and GPT-2.
DEFAULT_PATTERNS: dict[str, str] = {
    "embeddings": r"(^|\.)(embeddings|embed_tokens|wte|wpe)$",
    "attention": r"(^|\.)(self_attn|attention|attn)$",
    "mlp": r"(^|\.)(mlp|intermediate|feed_forward)$|(^|\.)layer\.\d+\.output$",
    "norm": r"(^|\.)(norm|ln_f|final_layer_norm)$",
    "head": r"(^|\.)(lm_head|classifier|pooler|score)$",
}


@dataclass
class BreakdownRow:
    name: str
    ms_per_forward: float
    calls_per_forward: float
    share: float


@dataclass
class BreakdownReport:
    """Rows sorted by time, slowest first. ``total_ms`` is one whole forward with the hooks attached."""

    rows: list[BreakdownRow]
    total_ms: float
    runs: int
    group_by: str
    rows_overlap: bool = field(default=False)

    def top(self, k: int = 10) -> list[BreakdownRow]:
        return self.rows[:k]

    def table(self, k: int = 10) -> str:
        lines = [f"{'module':<32}{'ms/fwd':>10}{'calls':>7}{'share':>8}"]
        for r in self.top(k):
            lines.append(f"{r.name[:32]:<32}{r.ms_per_forward:>10.3f}{r.calls_per_forward:>7.0f}{100 * r.share:>7.1f}%")
        lines.append(f"{'(whole forward)':<32}{self.total_ms:>10.3f}")
        return "\n".join(lines)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _select(model: nn.Module, group_by: str, patterns: Mapping[str, str], depth: int) -> dict[str, list[nn.Module]]:
    groups: dict[str, list[nn.Module]] = defaultdict(list)
    named = [(n, m) for n, m in model.named_modules() if n]
    if group_by == "type":
        for _, m in named:
            groups[type(m).__name__].append(m)
    elif group_by == "name":
        for n, m in named:
            if n.count(".") < depth:
                groups[n].append(m)
    else:
        compiled = {g: re.compile(p) for g, p in patterns.items()}
        for group, rx in compiled.items():
            taken: list[str] = []
            for n, m in named:
                if rx.search(n) and not any(n.startswith(t + ".") for t in taken):  # outermost match only
                    taken.append(n)
                    groups[group].append(m)
    return groups


def module_breakdown(model: nn.Module, inputs: Any, config: LatencyConfig | None = None,
                     group_by: Literal["type", "name", "pattern"] = "pattern",
                     patterns: Mapping[str, str] | None = None, depth: int = 3, **overrides: Any) -> BreakdownReport:
    """Time each submodule (group) per forward pass, in eval mode under ``torch.inference_mode()``.

    Args:
        model: the module to profile (hooks are removed and training flags restored afterwards).
        inputs: as for :func:`measure_latency`.
        config: ``warmup`` untimed passes, then ``min_runs`` passes (stopping early at ``max_time_s``); ``clock``.
        group_by: ``"pattern"`` (attention / mlp / embeddings / norm / head by name, outermost match), ``"type"``
            (module class name, inclusive and overlapping) or ``"name"`` (qualified names up to ``depth`` dots).
        patterns: group -> regex for ``group_by="pattern"``; default :data:`DEFAULT_PATTERNS`.
        depth: name depth for ``group_by="name"``.

    Example::

        print(module_breakdown(model, inputs).table(k=5))
    """
    if group_by not in ("type", "name", "pattern"):
        raise ValueError(f"`group_by` must be 'type', 'name' or 'pattern', got {group_by!r}. E.g. group_by='type'.")
    if not isinstance(model, nn.Module):
        raise ValueError(f"`model` must be an nn.Module (hooks need one), got {type(model).__name__}.")
    config = resolve_config(config, overrides)
    clock = config.clock or time.perf_counter
    groups = _select(model, group_by, patterns or DEFAULT_PATTERNS, depth)
    totals: dict[str, float] = defaultdict(float)
    calls: dict[str, int] = defaultdict(int)
    starts: dict[int, list[float]] = defaultdict(list)

    def pre(group: str):
        def hook(mod: nn.Module, args: Any) -> None:
            sync(device)
            starts[id(mod)].append(clock())
        return hook

    def post(group: str):
        def hook(mod: nn.Module, args: Any, out: Any) -> None:
            sync(device)
            totals[group] += clock() - starts[id(mod)].pop()
            calls[group] += 1
        return hook

    handles = []
    # transform=False: the hooks sit on this model's submodules, so the model itself must run (no copy, no compile).
    with measuring(model, config, transform=False) as session:
        device = session.device
        x = move_to(resolve_inputs(inputs), device)
        try:
            for group, mods in groups.items():
                for m in mods:
                    handles.append(m.register_forward_pre_hook(pre(group)))
                    handles.append(m.register_forward_hook(post(group)))
            with torch.inference_mode():
                for _ in range(config.warmup):
                    call_model(model, x)
                totals.clear()
                calls.clear()
                runs, whole, start = 0, 0.0, clock()
                while runs < config.min_runs and (runs == 0 or clock() - start < config.max_time_s):
                    sync(device)
                    a = clock()
                    call_model(model, x)
                    sync(device)
                    whole += clock() - a
                    runs += 1
        finally:
            for h in handles:
                h.remove()
    total_ms = whole * 1e3 / runs
    rows = [BreakdownRow(g, totals[g] * 1e3 / runs, calls[g] / runs, (totals[g] * 1e3 / runs) / total_ms if total_ms else 0.0)
            for g in totals]
    rows.sort(key=lambda r: r.ms_per_forward, reverse=True)
    return BreakdownReport(rows=rows, total_ms=total_ms, runs=runs, group_by=group_by,
                           rows_overlap=group_by != "pattern")


__all__ = ["DEFAULT_PATTERNS", "BreakdownReport", "BreakdownRow", "module_breakdown"]
