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


def shape_change_problem(kind: str, pl_module: nn.Module | None, what: str) -> str | None:
    """Why a callback that changes parameter shapes (``what`` it does) cannot run under strategy ``kind``, or None.

    FSDP: flat parameters cannot follow shape changes. Spawned launchers (``ddp_spawn``, ``ddp_fork``,
    ``ddp_notebook``): the ranks send their final weights back to the main process's full-size module, where no
    hook of ours runs, so that load fails unless the LightningModule overrides ``load_state_dict`` to reshape first.
    """
    if kind == "fsdp":
        return (f"{what} changes parameter shapes, which FSDP's flat parameters cannot follow. Prune the unsharded "
                f"model before wrapping (prune_step(model, PruningConfig(mode='structured'), sparsity) then fit under "
                f"FSDP), or run the pruning under DDP.")
    if kind != "spawn":
        return None
    from lightning_latency._compat import LightningModule

    if pl_module is not None and type(pl_module).load_state_dict is not LightningModule.load_state_dict:
        return None
    return (f"{what} under a spawned launcher (strategy='ddp_spawn', 'ddp_fork', 'ddp_notebook'): the main process "
            f"cannot take the pruned shapes back. Use strategy='ddp' (or one device), a masked mode, or override your "
            f"LightningModule's load_state_dict to call lightning_latency.pruning.reshape_to_state_dict(self, "
            f"state_dict) first.")


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


__all__ = ["rebuild_optimizers", "register_reshape_hook", "reshape_pre_hook", "shape_change_problem"]
