"""Save and reload a structurally pruned Hugging Face model exactly.

``from_pretrained`` cannot express "heads of the original head size, but fewer of them" (it derives
``head_dim = hidden / heads``), so we save the config of the *unpruned* architecture, every pruned shape and the
state dict; loading builds the original architecture, shrinks each layer to the saved shapes, then loads the weights.
"""

from __future__ import annotations

import importlib
import json
from pathlib import Path
from typing import Any

import torch
from torch import nn

from lightning_latency.pruning.structured import (
    original_structure,
    reshape_to_state_dict,
    set_original_structure,
    structure,
    update_hf_config,
)

_META = "lightning_latency_pruned.json"
_WEIGHTS = "pruned_state_dict.pt"


def _largest(shapes: dict[str, dict[str, int]], key: str) -> int | None:
    values = [v[key] for v in shapes.values() if key in v]
    return max(values) if values else None


def save_pruned(model: nn.Module, folder: str | Path) -> Path:
    """Write ``model`` (a Hugging Face ``PreTrainedModel``, pruned or not) to ``folder`` for :func:`load_pruned`.

    Raises:
        ValueError: if ``model`` has no Hugging Face ``config``.
    """
    config = getattr(model, "config", None)
    if config is None or not hasattr(config, "save_pretrained"):
        raise ValueError(
            f"`model` must be a Hugging Face PreTrainedModel (with .config), got {type(model).__name__}. "
            f"Pass the HF model inside your LightningModule, e.g. save_pruned(module.model, folder)."
        )
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    original = original_structure(model)
    # the config written is the UNPRUNED architecture: HF can build it, and load_pruned shrinks it
    values = config.to_dict()
    heads, kv, neurons = (_largest(original, k) for k in ("heads", "kv_heads", "neurons"))
    if heads is not None:
        values["n_head" if values.get("model_type") == "gpt2" else "num_attention_heads"] = heads
        if "num_key_value_heads" in values:
            values["num_key_value_heads"] = kv
    if neurons is not None:
        values["n_inner" if values.get("model_type") == "gpt2" else "intermediate_size"] = neurons
    base = config.__class__.from_dict(values)
    base.save_pretrained(folder)
    meta: dict[str, Any] = {
        "class": f"{type(model).__module__}.{type(model).__qualname__}",
        "dtype": str(next(model.parameters()).dtype).removeprefix("torch."),
        "structure": structure(model),
        "original_structure": original,
    }
    (folder / _META).write_text(json.dumps(meta, indent=2))
    torch.save({k: v.detach().cpu() for k, v in model.state_dict().items()}, folder / _WEIGHTS)
    return folder


def load_pruned(folder: str | Path) -> nn.Module:
    """Rebuild the model saved by :func:`save_pruned`: same class, same shapes, same weights, outputs identical.

    Raises:
        FileNotFoundError: if ``folder`` was not written by :func:`save_pruned`.
    """
    from transformers import AutoConfig

    folder = Path(folder)
    if not (folder / _META).exists():
        raise FileNotFoundError(
            f"{folder} has no {_META}: it was not written by save_pruned. Use from_pretrained for unpruned models."
        )
    meta = json.loads((folder / _META).read_text())
    module_name, _, cls_name = meta["class"].rpartition(".")
    cls = getattr(importlib.import_module(module_name), cls_name)
    config = AutoConfig.from_pretrained(folder)
    model = cls(config)
    state = torch.load(folder / _WEIGHTS, map_location="cpu", weights_only=True)
    set_original_structure(model, meta["original_structure"])
    reshape_to_state_dict(model, state)
    model.load_state_dict(state, strict=True)
    update_hf_config(model)
    model.to(getattr(torch, meta.get("dtype", "float32")))
    model.eval()
    return model
