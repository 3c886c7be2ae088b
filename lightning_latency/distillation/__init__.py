"""Knowledge distillation: logit and intermediate losses, ``DistillationModule``, student init, offline cache.

The losses are plain ``nn.Module``s (no Lightning import); ``DistillationModule`` and ``HFDistillationModule``
are loaded lazily so ``from lightning_latency.distillation import DistillationLoss`` stays cheap.
"""

from __future__ import annotations

import importlib
from typing import Any

from lightning_latency.distillation.fsdp import DistillationWrapPolicy, distillation_auto_wrap_policy
from lightning_latency.distillation.intermediate import AttentionLoss, HiddenStateLoss, check_layer_map, even_layer_map
from lightning_latency.distillation.losses import (
    DistillationLoss,
    ForwardKLLoss,
    JSDLoss,
    LogitMSELoss,
    ReverseKLLoss,
    task_cross_entropy,
    token_mask,
    topk_forward_kl,
)
from lightning_latency.distillation.students import (
    every_other_layer,
    student_from_pruned_teacher,
    student_from_teacher_layers,
)

_LAZY = {
    "DistillationModule": "lightning_latency.distillation.module",
    "HFDistillationModule": "lightning_latency.distillation.hf",
    "TopKLogitsDataset": "lightning_latency.distillation.offline",
    "cache_teacher_topk": "lightning_latency.distillation.offline",
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'lightning_latency.distillation' has no attribute {name!r}")


__all__ = [
    "AttentionLoss", "DistillationLoss", "DistillationModule", "DistillationWrapPolicy", "ForwardKLLoss",
    "HFDistillationModule", "HiddenStateLoss", "JSDLoss", "LogitMSELoss", "ReverseKLLoss", "TopKLogitsDataset",
    "cache_teacher_topk", "check_layer_map", "distillation_auto_wrap_policy", "even_layer_map", "every_other_layer",
    "student_from_pruned_teacher", "student_from_teacher_layers", "task_cross_entropy", "token_mask",
    "topk_forward_kl",
]
