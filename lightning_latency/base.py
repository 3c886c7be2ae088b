"""``CompressionCallback``: the one contract every lightning-latency callback obeys.

A callback here is thin: its per-run state lives in a core object (a pruner, a QAT controller, a latency recorder)
that works without Lightning; the callback maps Lightning hooks to the core's calls. What all of them share lives
in this base, once:

* **the state** (:attr:`core`): ``state_dict``/``load_state_dict`` are the core object's own;
* **the target** (:meth:`target`): ``model_attr`` if given, else ``pl_module.compression_target``, else the module;
* **validation in** ``setup``: the strategy check (:meth:`strategy_problem`) and :meth:`validate`; a ``ValueError``
  raised there becomes a ``MisconfigurationException`` that names the callback, so a bad pattern or argument stops
  the run before its first step, never hours later;
* **hooks on the model** (:meth:`add_hook`): load-state-dict pre-hooks that reshape or retype a fresh model before
  a checkpoint's weights load (the documented way; no private trainer state), removed in ``teardown`` and never
  pickled (spawn-based launchers pickle callbacks);
* **logging from global rank zero only** (:meth:`log_metrics`, :meth:`log_hyperparams`, :meth:`info`, :meth:`warn`);
* **the strategy contract**: a strategy asks each callback :meth:`strategy_problem` before it wraps the model
  (``strategies.py`` never imports a callback);
* **what it did to the model**: :attr:`compresses` and :meth:`deploy_config`, which ``LatencyMonitor`` reads to
  time the deployment form (callbacks never import each other).

See docs/architecture.md for the layers and a new callback in under 100 lines.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, ClassVar, Literal

from torch import nn
from typing_extensions import override

from lightning_latency._compat import (
    CallbackBase,
    LightningModule,
    MisconfigurationException,
    Trainer,
    rank_zero_info,
    rank_zero_warn,
)
from lightning_latency._target import check_model_attr, resolve_target
from lightning_latency.strategies import strategy_kind

StrategyKind = Literal["fsdp", "spawn"]


class CompressionCallback(CallbackBase):
    """Base of the lightning-latency callbacks (see the module docstring for the contract).

    Subclasses call ``super().__init__(model_attr)``, override :meth:`validate` and :meth:`strategy_problem` where
    they have something to check, call ``super().setup(...)`` first when they override ``setup``, and keep their
    per-run state in a core object assigned to :attr:`core` (its ``state_dict`` is then the callback's).

    Args:
        model_attr: attribute (dotted path allowed) of the LightningModule to act on, e.g. ``"model"``; None acts on
            ``pl_module.compression_target`` when defined (a ``DistillationModule``: the student), else the module.
    """

    #: The core object that holds this callback's per-run state (a pruner, a QAT controller, a latency recorder);
    #: ``state_dict``/``load_state_dict`` are its own, so a checkpoint holds exactly what the core needs to resume.
    core: Any = None

    #: True for callbacks that change the model's weights or structure (pruning, QAT): ``LatencyMonitor`` then
    #: times the deployment form at fit end rather than the eager training form.
    compresses: ClassVar[bool] = False

    def __init__(self, model_attr: str | None = None) -> None:
        self.model_attr = check_model_attr(model_attr)
        self._handles: list[Any] = []

    @property
    def name(self) -> str:
        return type(self).__name__

    def target(self, pl_module: nn.Module) -> nn.Module:
        """The module this callback acts on (see ``model_attr``)."""
        return resolve_target(pl_module, self.model_attr)

    # ------------------------------------------------------------------ what subclasses override
    def validate(self, trainer: Trainer, pl_module: LightningModule, target: nn.Module, stage: str) -> None:
        """Check everything that needs the model or the Trainer; raise ``ValueError`` (naming argument, value, fix)."""

    def strategy_problem(self, kind: StrategyKind, pl_module: nn.Module | None = None) -> str | None:
        """Why this callback cannot run under ``kind`` (``"fsdp"``: sharded weights; ``"spawn"``: weights return
        to the main process through a file), with the fix; None when it can."""
        return None

    def deploy_config(self) -> Any | None:
        """The quantization config a deployment must use to run what this callback trained (QAT), else None."""
        return None

    # ------------------------------------------------------------------ Lightning hooks
    @override
    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        self.remove_hooks()
        kind = strategy_kind(trainer)
        problem = self.strategy_problem(kind, pl_module) if kind is not None else None
        if problem:
            raise MisconfigurationException(f"{self.name}: {problem}")
        try:
            self.validate(trainer, pl_module, self.target(pl_module), stage)
        except (ValueError, MisconfigurationException) as err:
            message = str(err) if str(err).startswith(f"{self.name}:") else f"{self.name}: {err}"
            raise MisconfigurationException(message) from err

    @override
    def teardown(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        self.remove_hooks()

    @override
    def state_dict(self) -> dict[str, Any]:
        return self.core.state_dict() if self.core is not None else super().state_dict()

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if self.core is not None:
            self.core.load_state_dict(state_dict)
        else:
            super().load_state_dict(state_dict)

    # ------------------------------------------------------------------ hooks on the model
    def add_hook(self, handle: Any) -> None:
        """Keep a hook handle (``register_load_state_dict_pre_hook`` …) to remove it in ``teardown``."""
        self._handles.append(handle)

    def remove_hooks(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []

    def __getstate__(self) -> dict[str, Any]:
        # hook handles hold weak references into one process's modules: they neither pickle nor mean anything
        # in another process (ddp_spawn pickles callbacks); setup registers them again there.
        state = self.__dict__.copy()
        state["_handles"] = []
        return state

    # ------------------------------------------------------------------ logging (global rank zero only)
    def log_metrics(self, trainer: Trainer, metrics: Mapping[str, float]) -> None:
        if not metrics or not trainer.is_global_zero:
            return
        for logger in trainer.loggers:
            logger.log_metrics(dict(metrics), step=trainer.global_step)

    def log_hyperparams(self, trainer: Trainer, params: Mapping[str, Any]) -> None:
        if not trainer.is_global_zero:
            return
        for logger in trainer.loggers:
            logger.log_hyperparams(dict(params))

    def info(self, message: str) -> None:
        rank_zero_info(f"{self.name}: {message}")

    def warn(self, message: str) -> None:
        rank_zero_warn(f"{self.name}: {message}")


__all__ = ["CompressionCallback", "StrategyKind"]
