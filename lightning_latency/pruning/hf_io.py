"""Save and reload a structurally pruned Hugging Face model exactly.

``from_pretrained`` cannot express "heads of the original head size, but fewer of them" (it derives
``head_dim = hidden / heads``), so we save the config of the *unpruned* architecture, every pruned shape and the
state dict; loading builds the original architecture, shrinks each layer to the saved shapes, then loads the weights.
"""

from __future__ import annotations

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


_REGISTERED: dict[str, type] = {}


def _dotted(cls: type) -> str:
    return f"{cls.__module__}.{cls.__qualname__}"


def register_loadable(cls: type) -> type:
    """Allow :func:`load_pruned` to rebuild models of ``cls`` (a model class outside ``transformers``).

    ``load_pruned`` never imports a name read from the folder: it builds only ``transformers`` model classes and
    the classes registered here. Usable as a class decorator; returns ``cls``.

    Raises:
        TypeError: if ``cls`` is not an ``nn.Module`` subclass.
    """
    if not (isinstance(cls, type) and issubclass(cls, nn.Module)):
        raise TypeError(f"`cls` must be an nn.Module subclass, got {cls!r}. Pass the model class itself, "
                        f"e.g. register_loadable(MyPretrainedModel).")
    _REGISTERED[_dotted(cls)] = cls
    return cls


def _allowed_class(name: Any, meta_file: Path) -> type:
    """The model class named ``name`` if it is a transformers model class or a registered one; never imports it."""
    if not isinstance(name, str) or not name:
        raise ValueError(f"{meta_file}: field 'class' must be a dotted class name, got {name!r}. "
                         f"The folder is damaged: save the model again with save_pruned.")
    if name in _REGISTERED:
        return _REGISTERED[name]
    module_name, _, cls_name = name.rpartition(".")
    if module_name.split(".")[0] == "transformers" and cls_name.isidentifier():
        import transformers

        # transformers' own lazy name table resolves it: only transformers' modules can be imported this way
        try:
            cls = getattr(transformers, cls_name)
        except (AttributeError, ImportError, RuntimeError):
            cls = None
        if isinstance(cls, type) and issubclass(cls, transformers.PreTrainedModel) and _dotted(cls) == name:
            return cls
    raise ValueError(
        f"{meta_file}: field 'class' names {name!r}, which is neither a transformers model class nor registered "
        f"with register_loadable. load_pruned builds only those; for your own class call "
        f"lightning_latency.pruning.register_loadable(YourModelClass) before loading."
    )


def _read_meta(meta_file: Path) -> dict[str, Any]:
    try:
        meta = json.loads(meta_file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(f"{meta_file} is not valid JSON ({err}). The folder is damaged: save the model again "
                         f"with save_pruned.") from err
    if not isinstance(meta, dict):
        raise ValueError(f"{meta_file} must hold a JSON object, got {type(meta).__name__}. Save again with save_pruned.")
    for key in ("class", "original_structure"):
        if key not in meta:
            raise ValueError(f"{meta_file} lacks the field {key!r}. The folder is damaged or was not written by "
                             f"save_pruned: save the model again with save_pruned.")
    return meta


def load_pruned(folder: str | Path) -> nn.Module:
    """Rebuild the model saved by :func:`save_pruned`: same class, same shapes, same weights, outputs identical.

    Only ``transformers`` model classes and classes registered with :func:`register_loadable` are built; the
    weights are read with ``torch.load(weights_only=True)``. Nothing in the folder can run code.

    Raises:
        FileNotFoundError: if ``folder`` was not written by :func:`save_pruned` (or its weights file is missing).
        ValueError: a damaged folder (bad JSON, missing fields, unreadable weights) or a class not allowed; the
            message names the file and the problem.
    """
    from transformers import AutoConfig

    folder = Path(folder)
    meta_file, weights_file = folder / _META, folder / _WEIGHTS
    if not meta_file.exists():
        raise FileNotFoundError(
            f"{folder} has no {_META}: it was not written by save_pruned. Use from_pretrained for unpruned models."
        )
    meta = _read_meta(meta_file)
    cls = _allowed_class(meta["class"], meta_file)
    if not weights_file.exists():
        raise FileNotFoundError(f"{weights_file} is missing: the folder is incomplete. Save again with save_pruned.")
    try:
        config = AutoConfig.from_pretrained(folder, local_files_only=True)
    except (OSError, ValueError, KeyError) as err:
        raise ValueError(f"{folder / 'config.json'}: cannot read the model config ({err}). Save again with "
                         f"save_pruned.") from err
    try:
        state = torch.load(weights_file, map_location="cpu", weights_only=True)
    except Exception as err:  # UnpicklingError, EOFError, RuntimeError from a truncated zip...
        raise ValueError(f"{weights_file} cannot be read as a tensor state dict with weights_only=True "
                         f"({type(err).__name__}). load_pruned never unpickles code; save again with "
                         f"save_pruned.") from err
    if not isinstance(state, dict):
        raise ValueError(f"{weights_file} must hold a state dict, got {type(state).__name__}.")
    model = cls(config)
    set_original_structure(model, meta["original_structure"])
    reshape_to_state_dict(model, state)
    model.load_state_dict(state, strict=True)
    update_hf_config(model)
    model.to(getattr(torch, str(meta.get("dtype", "float32"))))
    model.eval()
    return model
