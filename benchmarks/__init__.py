"""The benchmarks, run from the repository root as modules: ``python -m benchmarks.run_all [--quick]`` or
``python -m benchmarks.bench_qat``; they share :mod:`benchmarks._common` and :mod:`examples._support`."""
