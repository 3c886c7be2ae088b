"""What a structural pruning step needs from the training loop: new optimizers (and DDP wrapper) over the new
parameters, and a fresh model reshaped before a pruned checkpoint's weights load. Shared by the pruning callbacks."""

from __future__ import annotations

from typing import Any

from torch import nn

from lightning_latency.pruning.structured import reshape_to_state_dict


def reshape_pre_hook(module: nn.Module, state_dict: dict[str, Any], prefix: str, *args: Any) -> None:
    """``load_state_dict`` pre-hook: shrink heads/neurons of a fresh model to the checkpoint's shapes first.

    Lightning restores the model before the callbacks' state, so this is how a resumed fit gets the pruned
    shapes. A hook on a submodule receives its own key prefix, so it works for ``model_attr`` targets too.
    """
    reshape_to_state_dict(module, state_dict, prefix)


def register_reshape_hook(model: nn.Module) -> Any:
    """Register :func:`reshape_pre_hook` on ``model``; returns the handle (``handle.remove()`` to undo)."""
    return model.register_load_state_dict_pre_hook(reshape_pre_hook)


def rebuild_optimizers(trainer: Any, pl_module: Any) -> None:
    """Re-create optimizers and LR schedulers over the new (smaller) parameters after a structural step.

    The old optimizer holds references to parameters that no longer exist. We call ``configure_optimizers`` again
    through the strategy, then carry over each group's current learning rate and each scheduler's position;
    optimizer moments (e.g. Adam's) restart from zero. Under DDP the model is wrapped again
    (``strategy.configure_ddp``), because the reducer's buckets were built for the old parameters.
    """
    strategy = trainer.strategy
    if not strategy.optimizers:
        return
    lrs = [[g.get("lr") for g in opt.param_groups] for opt in strategy.optimizers]
    schedulers = [cfg.scheduler.state_dict() for cfg in strategy.lr_scheduler_configs]
    wrapped = strategy.model is not None and strategy.model is not pl_module
    if wrapped and hasattr(strategy, "configure_ddp"):
        strategy.model = pl_module
        strategy.configure_ddp()
    strategy.setup_optimizers(trainer)
    for opt, group_lrs in zip(strategy.optimizers, lrs):
        for group, lr in zip(opt.param_groups, group_lrs):
            if lr is not None:
                group["lr"] = lr
    for cfg, state in zip(strategy.lr_scheduler_configs, schedulers):
        cfg.scheduler.load_state_dict(state)


__all__ = ["rebuild_optimizers", "register_reshape_hook", "reshape_pre_hook"]
