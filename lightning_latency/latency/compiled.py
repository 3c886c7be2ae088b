"""The compiled / moved form a measurement runs in: a chosen device and/or ``torch.compile`` — always on a deep copy.

(Not :func:`lightning_latency.quantization.deploy`, which builds an int8 deployment; this only moves and compiles.)

The model being trained is never moved, compiled or frozen: :func:`deployed` deep-copies it first whenever the
measurement needs anything other than the model as it is.
"""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn

# Inductor settings of the last compile we did. Changing inductor config (e.g. `freezing`) after a compile in the same
# process silently reuses the old graph (torch 2.13), so we reset dynamo whenever these change.
_last_compile_settings: tuple[Any, ...] | None = None


def module_device(model: Any) -> torch.device:
    """Device of the first parameter (or buffer) of ``model``; CPU for parameter-free callables."""
    if isinstance(model, nn.Module):
        for t in model.parameters():
            return t.device
        for t in model.buffers():
            return t.device
    return torch.device("cpu")


def _deepcopy_detached(model: nn.Module) -> nn.Module:
    """Deep copy without dragging the Trainer along: a LightningModule holds ``_trainer`` (and Fabric ``_fabric``)."""
    saved = {name: model.__dict__[name] for name in ("_trainer", "_fabric") if model.__dict__.get(name) is not None}
    for name in saved:
        model.__dict__[name] = None
    try:
        return copy.deepcopy(model)
    finally:
        model.__dict__.update(saved)


@contextlib.contextmanager
def deployed(
    model: Any,
    device: torch.device | str | None = None,
    compile: bool = False,
    compile_mode: str | None = None,
    freezing: bool | None = None,
    compile_forward_only: bool = False,
) -> Iterator[tuple[Any, torch.device]]:
    """Yield ``(model to run, device)`` in the requested deployment form.

    Args:
        model: the module (or plain callable) to measure.
        device: run on this device (deep copy moved there); None keeps the model's own device.
        compile: wrap the copy in ``torch.compile`` (inductor).
        compile_mode: ``torch.compile`` mode, e.g. ``"max-autotune"``; None for the default.
        freezing: inductor ``freezing`` (constant-folds weights; the CPU deployment form). None means True on CPU.
        compile_forward_only: compile ``copy.forward`` and yield the copy itself, so methods such as ``generate``
            keep working and call the compiled forward.

    The inductor config patch stays active for the whole block because compilation happens lazily, at the first
    call inside the block (the warm-up).
    """
    global _last_compile_settings
    own_device = module_device(model)
    target = torch.device(device) if device is not None else own_device
    if target.type == "cuda" and target.index is None and torch.cuda.is_available():
        target = torch.device("cuda", torch.cuda.current_device())
    needs_copy = compile or (isinstance(model, nn.Module) and target != own_device)
    if not needs_copy:
        yield model, target
        return
    if not isinstance(model, nn.Module):
        raise ValueError(
            f"`device`/`compile` need an nn.Module to copy, got {type(model).__name__}. "
            "Pass the module, or measure the callable as it is (device=None, compile=False)."
        )
    work = _deepcopy_detached(model).to(target).eval()
    if not compile:
        yield work, target
        return
    freeze = (target.type == "cpu") if freezing is None else bool(freezing)
    settings = (compile_mode, freeze)
    if _last_compile_settings is not None and settings != _last_compile_settings:
        torch._dynamo.reset()
    _last_compile_settings = settings
    import torch._inductor.config as inductor_config

    if compile_forward_only:
        work.forward = torch.compile(work.forward, mode=compile_mode)
        compiled = work
    else:
        compiled = torch.compile(work, mode=compile_mode)
    with inductor_config.patch(freezing=freeze):
        yield compiled, target


__all__ = ["deployed", "module_device"]
