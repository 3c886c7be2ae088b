"""The examples, run from the repository root as modules: ``python -m examples.compress_classifier``.

A package (not a folder of loose scripts) so that the examples, ``benchmarks/`` and ``tests/`` share the plumbing in
:mod:`examples._support` without editing ``sys.path``; none of it ships in the ``lightning-latency`` wheel.
"""
