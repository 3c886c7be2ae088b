"""Quantization-aware training on torchao, usable with or without Lightning, and its fast CPU deployment form.

* :class:`QuantizationConfig` / :class:`Scheme` — what to fake-quantize and how (``config.py``).
* :func:`prepare_qat`, :func:`freeze_ranges`, :func:`convert_qat`, :func:`weight_error` — the verbs (``qat.py``).
* :func:`deploy` — the fast inference form, chosen by measurement with ``backend="auto"`` (``deploy.py``,
  ``choose.py``, the ONNX Runtime backend in ``onnx.py``); :func:`load_deployed` loads its saved artifact.
* :class:`~lightning_latency.quantization.callback.QuantizationAwareTraining` — the Lightning callback.
"""

from __future__ import annotations

from typing import Any

from lightning_latency.quantization.config import DEFAULT_SKIP, Backend, QuantizationConfig, Scheme
from lightning_latency.quantization.qat import (
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
    "DEFAULT_SKIP",
    "Backend",
    "DeployReport",
    "DeployedModel",
    "QuantizationAwareTraining",
    "QuantizationConfig",
    "Scheme",
    "auto_candidates",
    "convert_qat",
    "deploy",
    "freeze_ranges",
    "is_converted",
    "is_prepared",
    "load_deployed",
    "prepare_qat",
    "select_modules",
    "strip_qat",
    "unconvert_qat",
    "weight_error",
]
