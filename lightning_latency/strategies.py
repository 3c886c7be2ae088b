"""Lightning strategies configured for compression and distillation workloads: ``ddp_strategy``, ``fsdp_strategy``.

The plugin needs nothing special to run on several devices or nodes (``Trainer(devices=..., num_nodes=...)`` under
torchrun or SLURM is Lightning's business); these helpers only pick the settings that avoid the known pitfalls:

* DDP: the process-group backend follows the device (gloo on CPU, nccl on GPU); frozen teacher parameters are
  skipped by DDP's reducer (no gradient traffic for the teacher); ``find_unused_parameters`` is switched on only
  when the module has trainable parameters that can get no gradient (a ``DistillationModule`` with intermediate
  projections but no live teacher, i.e. offline distillation), because it costs an extra graph traversal per step.
* FSDP (GPU only; Lightning refuses FSDP on CPU): teacher and student are wrapped as separate units by
  :class:`DistillationWrapPolicy`, so frozen and trainable weights never share
  a flat parameter; ``use_orig_params=True`` so ``configure_optimizers`` can name the student's parameters. The
  strategy asks every callback, before wrapping, whether it can act on sharded weights (see :func:`fsdp_strategy`).

This module sits below the callbacks and the distillation module: it never imports them. It asks instead, through
two duck-typed questions: ``callback.strategy_problem(kind)`` and ``module.ddp_find_unused_parameters``.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator
from datetime import timedelta
from typing import Any, Literal

from torch import nn

from lightning_latency._compat import MisconfigurationException, lightning_classes, pl

_START_METHODS = ("popen", "spawn", "fork", "forkserver")
_BACKENDS = (None, "gloo", "nccl", "mpi")
_SHARDING = ("FULL_SHARD", "SHARD_GRAD_OP", "NO_SHARD", "HYBRID_SHARD")


def _timeout(timeout_s: float | None) -> timedelta | None:
    if timeout_s is None:
        return None
    if isinstance(timeout_s, bool) or not isinstance(timeout_s, (int, float)) or timeout_s <= 0:
        raise ValueError(f"`timeout_s` must be a number of seconds > 0 or None (Lightning's default, 30 min), got "
                         f"{timeout_s!r}. E.g. timeout_s=600.")
    return timedelta(seconds=float(timeout_s))


def _needs_find_unused(module: nn.Module) -> bool:
    """What the module says about ``find_unused_parameters`` (``ddp_find_unused_parameters``); False if silent.

    A ``DistillationModule`` says True when a trainable parameter can get no gradient in ``training_step`` (offline
    distillation with intermediate projections).
    """
    return bool(getattr(module, "ddp_find_unused_parameters", False))


class CompressionDDPStrategy(pl.strategies.DDPStrategy):
    """``DDPStrategy`` that decides ``find_unused_parameters`` from the LightningModule when it is left ``None``.

    A module-level class (not a closure) so ``ddp_spawn``-style launchers can pickle it.
    """

    def __init__(self, *args: Any, find_unused_parameters: bool | None = None, **kwargs: Any) -> None:
        if find_unused_parameters is not None:
            kwargs["find_unused_parameters"] = find_unused_parameters
        super().__init__(*args, **kwargs)
        self._auto_find_unused = find_unused_parameters is None

    def configure_ddp(self) -> None:
        # Runs again after a structured pruning step re-wraps the model, so the choice follows the current module.
        if self._auto_find_unused and self.lightning_module is not None:
            self._ddp_kwargs["find_unused_parameters"] = _needs_find_unused(self.lightning_module)
        super().configure_ddp()


def ddp_strategy(
    start_method: Literal["popen", "spawn", "fork", "forkserver"] = "popen",
    process_group_backend: str | None = None,
    find_unused_parameters: bool | None = None,
    timeout_s: float | None = None,
    **kwargs: Any,
) -> CompressionDDPStrategy:
    """A DDP strategy for training with compression callbacks and/or a ``DistillationModule``.

    Args:
        start_method: ``"popen"`` (Lightning's ``strategy="ddp"``: re-launches the script; use it for scripts and
            torchrun/SLURM), ``"spawn"`` (``"ddp_spawn"``: works from notebooks and pytest, but weights come back to
            the main process through a file, see docs/multi_device.md), ``"fork"``, ``"forkserver"``.
        process_group_backend: None picks gloo on CPU and nccl on CUDA (Lightning's rule); or force one.
        find_unused_parameters: None decides per module: True only when a trainable parameter can get no
            gradient (a ``DistillationModule`` with intermediate projections and no teacher); frozen teacher
            parameters never need it because DDP ignores parameters with ``requires_grad=False``.
        timeout_s: process-group timeout: how long a rank waits in a collective for a peer that died or hangs
            before raising (None: Lightning's default, 30 minutes). Keep it longer than ``prepare_data`` on rank 0.
        **kwargs: passed to ``DDPStrategy`` (and from there to ``DistributedDataParallel``, e.g.
            ``gradient_as_bucket_view=True``).

    Raises:
        ValueError: unknown ``start_method`` or ``process_group_backend``, bad ``timeout_s``.

    Example::

        trainer = Trainer(accelerator="cpu", devices=2, strategy=ddp_strategy(start_method="spawn"),
                          callbacks=[MagnitudePruning(final_sparsity=0.5), LatencyMonitor(data_parallel=True)])
        trainer.fit(DistillationModule(student, teacher))
    """
    if start_method not in _START_METHODS:
        raise ValueError(f"`start_method` must be one of {list(_START_METHODS)}, got {start_method!r}. Use "
                         f"start_method='popen' for scripts (strategy='ddp') or 'spawn' for notebooks and tests.")
    if process_group_backend not in _BACKENDS:
        raise ValueError(f"`process_group_backend` must be one of {list(_BACKENDS)}, got {process_group_backend!r}. "
                         f"Pass None to use gloo on CPU and nccl on GPU.")
    if find_unused_parameters not in (None, True, False):
        raise ValueError(f"`find_unused_parameters` must be None (decide from the module), True or False, got "
                         f"{find_unused_parameters!r}.")
    timeout = _timeout(timeout_s)
    if timeout is not None:
        kwargs["timeout"] = timeout
    return CompressionDDPStrategy(start_method=start_method, process_group_backend=process_group_backend,
                                  find_unused_parameters=find_unused_parameters, **kwargs)


def fsdp_problem(callback: Any) -> str | None:
    """Why ``callback`` cannot act on FSDP-sharded weights, with the fix; None when it can (the callback says)."""
    ask = getattr(callback, "strategy_problem", None)
    return ask("fsdp") if callable(ask) else None


def _fsdp_conflicts(trainer: Any) -> list[str]:
    """What ``trainer``'s callbacks say they cannot do on FSDP-sharded weights, with their fix."""
    return [p for p in (fsdp_problem(cb) for cb in getattr(trainer, "callbacks", [])) if p]


class CompressionFSDPStrategy(pl.strategies.FSDPStrategy):
    """``FSDPStrategy`` that refuses, before wrapping, compression callbacks that cannot work on sharded weights."""

    def setup(self, trainer: Any) -> None:
        problems = _fsdp_conflicts(trainer)
        if problems:
            raise MisconfigurationException("fsdp_strategy: " + " ".join(problems))
        super().setup(trainer)


def fsdp_strategy(
    layer_classes: Iterable[type[nn.Module]] | None = None,
    sharding_strategy: str = "FULL_SHARD",
    state_dict_type: Literal["full", "sharded"] = "full",
    timeout_s: float | None = None,
    **kwargs: Any,
) -> CompressionFSDPStrategy:
    """An FSDP strategy (GPU only) that wraps teacher and student as separate units.

    Compression under FSDP (checked before wrapping):

    * masked pruning (``"unstructured"``/``"nm"``) works: masks are computed and re-applied on the gathered
      full weights (``summon_full_params(writeback=True)``), see :func:`full_params`;
    * structured pruning is refused: shapes cannot change inside flat parameters. Prune the unsharded model
      first (``prune_step`` before ``Trainer.fit``) or run the pruning schedule under DDP, then fine-tune under FSDP;
    * QAT must be prepared before wrapping: ``QuantizationAwareTraining(start_step=0)`` (prepares in ``setup``).

    Args:
        layer_classes: transformer block classes to shard individually inside each model (e.g.
            ``{LlamaDecoderLayer}``); None wraps student and teacher as whole units.
        sharding_strategy: ``"FULL_SHARD"``, ``"SHARD_GRAD_OP"``, ``"NO_SHARD"`` or ``"HYBRID_SHARD"``.
        state_dict_type: ``"full"`` (a normal checkpoint, gathered on rank 0) or ``"sharded"``.
        timeout_s: process-group timeout in seconds (None: Lightning's default, 30 minutes).
        **kwargs: passed to ``FSDPStrategy`` (e.g. ``mixed_precision``, ``cpu_offload``,
            ``activation_checkpointing_policy``). ``use_orig_params`` defaults to True.

    Raises:
        ValueError: unknown ``sharding_strategy``, bad ``timeout_s``, or a non-class in ``layer_classes``.

    Example::

        from transformers.models.llama.modeling_llama import LlamaDecoderLayer
        trainer = Trainer(accelerator="gpu", devices=8, strategy=fsdp_strategy({LlamaDecoderLayer}),
                          callbacks=[QuantizationAwareTraining(start_step=0)])
        trainer.fit(DistillationModule(student, teacher))
    """
    if sharding_strategy not in _SHARDING:
        raise ValueError(f"`sharding_strategy` must be one of {list(_SHARDING)}, got {sharding_strategy!r}. "
                         f"Use 'FULL_SHARD' to shard parameters, gradients and optimizer state.")
    classes = tuple(layer_classes or ())
    bad = [c for c in classes if not (isinstance(c, type) and issubclass(c, nn.Module))]
    if bad:
        raise ValueError(f"`layer_classes` must hold nn.Module subclasses (e.g. {{LlamaDecoderLayer}}), got {bad!r}.")
    timeout = _timeout(timeout_s)
    if timeout is not None:
        kwargs["timeout"] = timeout
    kwargs.setdefault("use_orig_params", True)
    return CompressionFSDPStrategy(auto_wrap_policy=distillation_auto_wrap_policy(classes),
                                   sharding_strategy=sharding_strategy, state_dict_type=state_dict_type, **kwargs)


def is_fsdp(trainer: Any) -> bool:
    """True when ``trainer`` runs an FSDP strategy (weights are sharded between hooks)."""
    classes = lightning_classes("strategies", "FSDPStrategy")
    return isinstance(getattr(trainer, "strategy", None), classes)


def is_spawned(trainer: Any) -> bool:
    """True when the ranks run in child processes whose weights come back to the main process through a file
    (``ddp_spawn``, ``ddp_fork``, ``ddp_notebook``: Lightning's multiprocessing launcher)."""
    launcher = getattr(getattr(trainer, "strategy", None), "launcher", None)
    classes = lightning_classes("strategies.launchers.multiprocessing", "_MultiProcessingLauncher")
    return launcher is not None and isinstance(launcher, classes)


def strategy_kind(trainer: Any) -> Literal["fsdp", "spawn"] | None:
    """The strategy property a compression callback may have to refuse: sharded weights or a spawned launch."""
    if is_fsdp(trainer):
        return "fsdp"
    return "spawn" if is_spawned(trainer) else None


@contextlib.contextmanager
def full_params(trainer: Any) -> Iterator[None]:
    """Inside the block the module holds its full (gathered) weights; in-place edits are written back to the shards.

    A no-op outside FSDP. Under FSDP every rank gathers every unit (collective: call it on all ranks), which costs
    one all-gather of the model per call.
    """
    if not is_fsdp(trainer) or trainer.strategy.model is None:
        yield
        return
    from torch.distributed.fsdp import FullyShardedDataParallel

    with FullyShardedDataParallel.summon_full_params(trainer.strategy.model, writeback=True, recurse=True):
        yield


# ------------------------------------------------------------------ FSDP wrap policy for teacher + student
# FSDP flattens every parameter of a unit into one FlatParameter; with use_orig_params=False a unit may not mix
# trainable and frozen parameters, and even with use_orig_params=True a mixed unit keeps gradient/optimizer
# bookkeeping for frozen weights. Wrapping teacher and student (and their blocks) as their own units avoids both.
TEACHER_ATTR = "teacher"
STUDENT_ATTR = "student"


class DistillationWrapPolicy:
    """Callable FSDP ``auto_wrap_policy``: wrap ``*.teacher``, ``*.student`` and any ``layer_classes`` instance.

    A class (not a closure) so it pickles for spawn-based launchers. The root (the ``DistillationModule``) keeps
    only what is left: the intermediate-loss projections, which are trainable.

    Args:
        layer_classes: transformer block classes to wrap individually inside student and teacher (e.g.
            ``LlamaDecoderLayer``); ``None`` wraps the two models as whole units.
    """

    def __init__(self, layer_classes: Iterable[type[nn.Module]] | None = None) -> None:
        self.layer_classes = tuple(layer_classes or ())
        self._roots: set[int] = set()

    def mark(self, module: nn.Module) -> None:
        """Register the student and teacher of a ``DistillationModule`` (done when the policy visits the root)."""
        for attr in (TEACHER_ATTR, STUDENT_ATTR):
            child = getattr(module, attr, None)
            if isinstance(child, nn.Module):
                self._roots.add(id(child))

    def __call__(self, module: nn.Module, recurse: bool, nonwrapped_numel: int = 0) -> bool:
        if recurse:
            if isinstance(getattr(module, STUDENT_ATTR, None), nn.Module):
                self._roots = set()  # the root DistillationModule: (re)register its two models
                self.mark(module)
            return True
        if id(module) in self._roots:
            return True
        return bool(self.layer_classes) and isinstance(module, self.layer_classes)


def distillation_auto_wrap_policy(layer_classes: Iterable[type[nn.Module]] | None = None) -> DistillationWrapPolicy:
    """The FSDP auto-wrap policy for a ``DistillationModule`` (see :class:`DistillationWrapPolicy`)."""
    return DistillationWrapPolicy(layer_classes)


__all__ = ["CompressionDDPStrategy", "CompressionFSDPStrategy", "DistillationWrapPolicy", "ddp_strategy",
           "distillation_auto_wrap_policy", "fsdp_problem", "fsdp_strategy", "full_params", "is_fsdp", "is_spawned",
           "strategy_kind"]
