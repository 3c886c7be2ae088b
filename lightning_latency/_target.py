"""Which module a compression callback acts on: the one rule shared by pruning, QAT and latency.

* ``model_attr`` given (dotted path allowed, e.g. ``"model"`` or ``"student.bert"``): that attribute.
* otherwise, if the LightningModule defines ``compression_target`` (``DistillationModule`` does: the student),
  that module — so with distillation the teacher is never pruned, quantized or timed without any extra argument;
* otherwise the LightningModule itself.
"""

from __future__ import annotations

from typing import Any

from torch import nn

from lightning_latency._compat import MisconfigurationException

COMPRESSION_TARGET = "compression_target"


def check_model_attr(model_attr: Any) -> str | None:
    """Validate a callback's ``model_attr`` argument (``__init__``); returns it unchanged.

    Raises:
        ValueError: not None and not a non-empty attribute name.
    """
    if model_attr is not None and (not isinstance(model_attr, str)
                                   or not all(part.isidentifier() for part in model_attr.split("."))):
        raise ValueError(f"`model_attr` must be None or an attribute name such as 'model' or 'student', "
                         f"got {model_attr!r}. Pass None to act on `compression_target` (if defined) or the "
                         f"LightningModule itself.")
    return model_attr


def resolve_target(pl_module: nn.Module, attr: str | None = None) -> nn.Module:
    """The module a compression callback should act on (see the module docstring for the rule).

    Args:
        pl_module: the LightningModule (or any ``nn.Module``).
        attr: ``model_attr`` of the callback; None for the automatic choice.

    Raises:
        MisconfigurationException: ``attr`` does not name an ``nn.Module`` attribute, or ``compression_target``
            is not an ``nn.Module``.
    """
    if attr is None:
        target = getattr(pl_module, COMPRESSION_TARGET, None)
        if target is None:
            return pl_module
        if not isinstance(target, nn.Module):
            raise MisconfigurationException(
                f"{type(pl_module).__name__}.{COMPRESSION_TARGET} is a {type(target).__name__}, not an nn.Module. "
                f"Return the submodule to compress (e.g. the student), or pass model_attr= to the callback.")
        return target
    module: Any = pl_module
    for part in attr.split("."):
        if not hasattr(module, part):
            raise MisconfigurationException(
                f"`model_attr={attr!r}`: {type(module).__name__} has no attribute {part!r}. Pass the name of the "
                f"submodule to act on (e.g. 'model' or 'student'), or None for `compression_target` / the "
                f"LightningModule itself.")
        module = getattr(module, part)
    if not isinstance(module, nn.Module):
        raise MisconfigurationException(f"`model_attr={attr!r}` is a {type(module).__name__}, not an nn.Module. "
                                        "Point it at the module to act on.")
    return module


def target_prefix(pl_module: nn.Module, target: nn.Module) -> str:
    """State-dict key prefix of ``target`` inside ``pl_module`` (``""`` for the module itself, else ``"name."``)."""
    if target is pl_module:
        return ""
    for name, module in pl_module.named_modules():
        if module is target:
            return name + "."
    raise MisconfigurationException(f"the compression target {type(target).__name__} is not a submodule of "
                                    f"{type(pl_module).__name__}; return one of its submodules.")


__all__ = ["check_model_attr", "resolve_target", "target_prefix"]
