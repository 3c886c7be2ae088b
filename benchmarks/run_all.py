"""Run every benchmark side by side in one process and print one markdown table of ratios.

    make bench                                  # all benchmarks, default sizes (the README's numbers)
    python -m benchmarks.run_all --quick        # smoke run, numbers not meaningful
    python -m benchmarks.run_all --only pruning qat

The table (with the machine line) is also written to ``benchmarks/results.md``.
"""

from __future__ import annotations

import argparse
import importlib
import sys
import time
import traceback
from pathlib import Path

from benchmarks._common import machine_line, row, setup, table

HERE = Path(__file__).resolve().parent
ORDER = ["latency", "pruning", "qat", "deploy", "distillation", "llm"]


def discover() -> list[str]:
    found = sorted(p.stem.removeprefix("bench_") for p in HERE.glob("bench_*.py"))
    return [n for n in ORDER if n in found] + [n for n in found if n not in ORDER]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="tiny settings: checks the scripts run, numbers are noise")
    parser.add_argument("--only", nargs="*", default=None, help=f"subset of: {' '.join(discover())}")
    parser.add_argument("--out", default=str(HERE / "results.md"), help="where to write the table ('' to skip)")
    args = parser.parse_args()
    threads = setup()
    names = args.only or discover()
    unknown = sorted(set(names) - set(discover()))
    if unknown:
        parser.error(f"--only got unknown benchmark(s) {unknown}; choose from {discover()}")
    rows: list[dict[str, str]] = []
    failed = []
    durations: list[str] = []
    began = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    for name in names:
        start = time.perf_counter()
        print(f"== bench_{name} ...", file=sys.stderr, flush=True)
        try:
            module = importlib.import_module(f"benchmarks.bench_{name}")
            rows.extend(module.main(quick=args.quick))
        except Exception as exc:  # one broken benchmark must not hide the others' numbers
            traceback.print_exc()
            failed.append(name)
            rows.append(row(name, "FAILED", type(exc).__name__, note=str(exc)[:120]))
        durations.append(f"{name} {time.perf_counter() - start:.0f} s")
        print(f"== bench_{name} done in {time.perf_counter() - start:.0f}s", file=sys.stderr, flush=True)
    header = f"Machine: {machine_line()} (threads fixed at {threads}){' — QUICK RUN, numbers not meaningful' if args.quick else ''}"
    command = "python -m benchmarks.run_all" + (" --quick" if args.quick else "") + (f" --only {' '.join(names)}" if args.only else "")
    text = f"{header}\n\nCommand: `{command}`, started {began}; durations: {', '.join(durations)}.\n\n{table(rows)}\n"
    print("\n" + text)
    if args.out:
        Path(args.out).write_text(text)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
