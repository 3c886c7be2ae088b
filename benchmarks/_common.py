"""Shared plumbing for the benchmarks: environment facts, threads, and the one markdown table format.

Every ``benchmarks/bench_*.py`` defines ``main(quick: bool = False) -> list[dict]`` returning rows with keys
``benchmark``, ``metric``, ``value`` (a string, e.g. "×2.13"), ``spread`` (e.g. "IQR/median 4%"), ``target`` and ``note``,
and is runnable on its own (``python -m benchmarks.bench_x [--quick]``). ``run_all.py`` runs them all in one process.
"""

from __future__ import annotations

import argparse
import os
import platform
from collections.abc import Callable

import torch

COLUMNS = ("benchmark", "metric", "value", "spread", "target", "note")


def setup(threads: int | None = None) -> int:
    """Fix the thread count (reported with every table) and go offline."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    n = threads or int(os.environ.get("BENCH_THREADS", "0")) or min(2, os.cpu_count() or 1)
    torch.set_num_threads(n)
    return n


def machine_line() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    from lightning_latency.cpu import cpu_features

    return (
        f"{cpu}; CPU class {cpu_features().label}; {os.cpu_count()} cores; torch {torch.__version__}; "
        f"threads {torch.get_num_threads()}; python {platform.python_version()}"
    )


def row(benchmark: str, metric: str, value: str, spread: str = "", target: str = "", note: str = "") -> dict[str, str]:
    return dict(benchmark=benchmark, metric=metric, value=value, spread=spread, target=target, note=note)


def table(rows: list[dict[str, str]]) -> str:
    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    for r in rows:
        lines.append("| " + " | ".join(str(r.get(c, "")).replace("|", "/") for c in COLUMNS) + " |")
    return "\n".join(lines)


def cli(main: Callable[..., list[dict[str, str]]], description: str) -> None:
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--quick", action="store_true", help="tiny settings, for a smoke run (numbers not meaningful)")
    args = parser.parse_args()
    setup()
    rows = main(quick=args.quick)
    print(f"\nMachine: {machine_line()}\n")
    print(table(rows))
