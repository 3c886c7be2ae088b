"""Run calibration batches through a model with recording hooks attached: eval mode, no gradients, hooks removed
and the mode restored afterwards (used by activation importance and block importance)."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

import torch
from torch import nn


def forward_calibration(model: nn.Module, batches: Iterable[Any], handles: Sequence[Any]) -> None:
    """``model(**batch)`` (``labels`` dropped) for every batch, then every hook in ``handles`` removed."""
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            for batch in batches:
                model(**{k: v for k, v in batch.items() if k != "labels"})
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)


__all__ = ["forward_calibration"]
