"""Quantization-aware training on torchao, usable with or without Lightning, and its fast CPU deployment form.

* :class:`QuantizationConfig` — what to fake-quantize and how (``config.py``); ``scheme`` is a :class:`Scheme`
  preset (one table, ``presets.py``) or a torchao ``AOBaseConfig``.
* :func:`prepare_qat`, :func:`freeze_ranges`, :func:`convert_qat`, :func:`weight_error` — the verbs (``qat.py``).
* :class:`QATController` — one run's state (:class:`Phase`, steps, checkpoint entry) on top of the verbs, without
  Lightning (``controller.py``).
* :func:`deploy` — the fast inference form, chosen by measurement with ``backend="auto"`` (``deploy.py``,
  ``choose.py``, the ONNX Runtime backend in ``onnx.py``); :func:`load_deployed` loads its saved artifact.
* :class:`~lightning_latency.quantization.callback.QuantizationAwareTraining` — the Lightning callback.
* GGUF for llama.cpp: :func:`~.gguf.export_gguf` (``gguf.py``), QAT on GGUF's own Q8_0/Q4_0/Q4_1 grids
  (:func:`~.weight_only_qat.prepare_gguf_qat`, the grids in ``gguf_grid.py``).
* Mixed precision by sensitivity: :func:`precision_sensitivity`, :func:`plan_precision`, :func:`quantize_mixed`
  (``mixed.py``): which linears keep a higher precision under a size budget, measured instead of hand-written.
"""

from __future__ import annotations

from typing import Any

from lightning_latency.quantization.config import DEFAULT_EXCLUDE, DEFAULT_SKIP, Backend, QuantizationConfig, Scheme
from lightning_latency.quantization.controller import RESERVED_KEY, Phase, QATController
from lightning_latency.quantization.mixed import (
    PrecisionPlan,
    PrecisionReport,
    PrecisionRow,
    plan_precision,
    precision_sensitivity,
    quantize_mixed,
)
from lightning_latency.quantization.presets import PRESETS, Preset
from lightning_latency.quantization.qat import (
    check_qat,
    convert_qat,
    freeze_ranges,
    is_converted,
    is_prepared,
    prepare_qat,
    strip_qat,
    unconvert_qat,
    weight_error,
)
from lightning_latency.quantization.targets import select_modules

# Imported eagerly (it imports only torch at module level) so that `quantization.deploy` is the function, not the
# submodule of the same name.
from lightning_latency.quantization.choose import DeployReport  # noqa: E402
from lightning_latency.quantization.deploy import DeployedModel, auto_candidates, deploy, load_deployed  # noqa: E402


def __getattr__(name: str) -> Any:
    # The callback pulls in Lightning (seconds): import it on first use only.
    if name == "QuantizationAwareTraining":
        from lightning_latency.quantization.callback import QuantizationAwareTraining

        return QuantizationAwareTraining
    raise AttributeError(f"module 'lightning_latency.quantization' has no attribute {name!r}")


__all__ = [
    "DEFAULT_EXCLUDE",
    "DEFAULT_SKIP",
    "PRESETS",
    "RESERVED_KEY",
    "Backend",
    "DeployReport",
    "DeployedModel",
    "Phase",
    "PrecisionPlan",
    "PrecisionReport",
    "PrecisionRow",
    "Preset",
    "QATController",
    "QuantizationAwareTraining",
    "QuantizationConfig",
    "Scheme",
    "auto_candidates",
    "check_qat",
    "convert_qat",
    "deploy",
    "freeze_ranges",
    "is_converted",
    "is_prepared",
    "load_deployed",
    "plan_precision",
    "precision_sensitivity",
    "prepare_qat",
    "quantize_mixed",
    "select_modules",
    "strip_qat",
    "unconvert_qat",
    "weight_error",
]
