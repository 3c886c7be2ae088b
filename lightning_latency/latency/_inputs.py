"""Model inputs: the accepted forms, how a model is called with them, and what they say about batch and tokens."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from typing import Any

import torch

Inputs = Any  # Tensor | tuple | list | Mapping[str, Tensor] | Callable[[], those]


def resolve_inputs(inputs: Inputs) -> Any:
    """Build callable inputs once; check the form. Returns a tensor, tuple/list or mapping."""
    if callable(inputs) and not isinstance(inputs, torch.Tensor):
        inputs = inputs()
    if isinstance(inputs, (tuple, list, Mapping)) and len(inputs) == 0:
        raise ValueError(f"`inputs` is an empty {type(inputs).__name__}: the model would be called with no input. "
                         f"Pass the example batch, e.g. inputs={{'input_ids': ids}} or inputs=torch.randn(1, 16).")
    if isinstance(inputs, (torch.Tensor, tuple, list, Mapping)):
        return inputs
    raise ValueError(
        f"`inputs` must be a tensor, a tuple/list of positional inputs, a dict of keyword inputs, or a callable "
        f"returning one of those, got {type(inputs).__name__}. E.g. inputs={{'input_ids': ids}}."
    )


def call_model(model: Callable[..., Any], inputs: Any) -> Any:
    """Tensor -> ``model(x)``, tuple/list -> ``model(*x)``, mapping -> ``model(**x)``."""
    if isinstance(inputs, Mapping):
        return model(**inputs)
    if isinstance(inputs, (tuple, list)):
        return model(*inputs)
    return model(inputs)


def move_to(obj: Any, device: torch.device) -> Any:
    """Recursively move tensors to ``device`` (non-blocking off CPU), keeping the container types."""
    if isinstance(obj, torch.Tensor):
        return obj.to(device, non_blocking=True) if obj.device != device else obj
    if isinstance(obj, Mapping):
        return {k: move_to(v, device) for k, v in obj.items()}
    if isinstance(obj, tuple):
        return tuple(move_to(v, device) for v in obj)
    if isinstance(obj, list):
        return [move_to(v, device) for v in obj]
    return obj


def _tensors(obj: Any) -> list[torch.Tensor]:
    if isinstance(obj, torch.Tensor):
        return [obj]
    if isinstance(obj, Mapping):
        return [t for v in obj.values() for t in _tensors(v)]
    if isinstance(obj, (tuple, list)):
        return [t for v in obj for t in _tensors(v)]
    return []


def batch_size_of(inputs: Any) -> int:
    """Size of dim 0 of the first tensor (1 for scalars or no tensors)."""
    for t in _tensors(inputs):
        return int(t.shape[0]) if t.dim() > 0 else 1
    return 1


def token_ids_of(inputs: Any) -> torch.Tensor | None:
    """The token-id tensor ``(batch, seq)``: ``input_ids`` of a mapping, else a 2-D integer tensor first in line."""
    if isinstance(inputs, Mapping):
        ids = inputs.get("input_ids")
        return ids if isinstance(ids, torch.Tensor) else None
    first = inputs[0] if isinstance(inputs, (tuple, list)) and inputs else inputs
    if isinstance(first, torch.Tensor) and first.dim() == 2 and not first.is_floating_point() and not first.is_complex():
        return first
    return None


def tokens_of(inputs: Any) -> int | None:
    """Tokens processed per call: the attention mask's sum when given (padding excluded), else the ids' numel."""
    ids = token_ids_of(inputs)
    if ids is None:
        return None
    mask = inputs.get("attention_mask") if isinstance(inputs, Mapping) else None
    if isinstance(mask, torch.Tensor) and mask.shape == ids.shape:
        return int(mask.sum().item())
    return int(ids.numel())


def seq_len_of(inputs: Any) -> int | None:
    ids = token_ids_of(inputs)
    return int(ids.shape[-1]) if ids is not None else None


#: Batch keys that are targets, not model inputs.
LABEL_KEYS = frozenset({"labels", "label"})


def drop_labels(batch: Any, extra: frozenset[str] | set[str] = frozenset()) -> Any:
    """A dict batch without its label keys (and ``extra`` keys); other batches unchanged."""
    if isinstance(batch, Mapping):
        drop = LABEL_KEYS | set(extra)
        return {k: v for k, v in batch.items() if k not in drop}
    return batch


def detach_cpu(obj: Any, clone: bool = False) -> Any:
    """Tensors of a nested batch detached and on CPU (cloned with ``clone``: safe to keep across steps)."""
    if isinstance(obj, torch.Tensor):
        out = obj.detach().cpu()
        return out.clone() if clone and out.data_ptr() == obj.data_ptr() else out
    if isinstance(obj, Mapping):
        return {k: detach_cpu(v, clone) for k, v in obj.items()}
    if isinstance(obj, (tuple, list)):
        return type(obj)(detach_cpu(v, clone) for v in obj)
    return obj


def batch_to_model_inputs(batch: Any) -> Any:
    """The default ``batch -> inputs`` of a monitor: a dict batch without labels, element 0 of a tuple batch."""
    if isinstance(batch, (tuple, list)):
        return batch[0]
    return drop_labels(batch)


def first_batch(loaders: Any) -> Any:
    """The first batch of a dataloader (or of the first of a list / dict of them); None when there is none."""
    if loaders is None:
        return None
    if isinstance(loaders, (list, tuple)):
        loaders = loaders[0] if loaders else None
    elif isinstance(loaders, Mapping):
        loaders = next(iter(loaders.values()), None)
    if loaders is None:
        return None
    try:
        return next(iter(loaders))
    except (StopIteration, TypeError):
        return None


def example_inputs(inputs: Inputs | None, batches: Iterable[Any], batch_to_inputs: Callable[[Any], Any]) -> Any:
    """The inputs a monitor times, as detached CPU copies (safe to keep across steps): ``inputs`` (built when
    callable), else ``batch_to_inputs`` of the first batch in ``batches`` that is not None (read lazily, in order);
    None when there is neither."""
    raw = inputs() if callable(inputs) and not isinstance(inputs, torch.Tensor) else inputs
    if raw is None:
        batch = next((b for b in batches if b is not None), None)
        if batch is None:
            return None
        raw = batch_to_inputs(batch)
    return detach_cpu(raw)
