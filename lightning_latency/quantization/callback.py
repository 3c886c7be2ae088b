"""``QuantizationAwareTraining``: the thin Lightning callback over :class:`~.controller.QATController`.

The controller holds the run's state and does the work; this file maps Lightning hooks to it and logs. Unlike
Lightning 1.x's removed QAT callback nothing wraps ``forward`` (#7926), a converted checkpoint loads for ``test``
(#12896: the load pre-hook registered in ``setup`` shapes a fresh model first), ``fit`` runs twice (#7427).
"""

from __future__ import annotations

from typing import Any

from torch import nn
from typing_extensions import override

from lightning_latency._compat import LightningModule, Trainer
from lightning_latency._deprecation import renamed
from lightning_latency._target import target_prefix
from lightning_latency.base import CompressionCallback, StrategyKind
from lightning_latency.quantization.config import QuantizationConfig
from lightning_latency.quantization.controller import Phase, QATController, _non_negative_int
from lightning_latency.strategies import is_spawned


class QuantizationAwareTraining(CompressionCallback):
    """Quantization-aware training with torchao: fake-quantize from a given step, optionally freeze ranges, convert.

    Args:
        scheme: a preset — ``"int8_dynamic"`` (int8 per-token activations + int8 per-channel weights; CPU default),
            ``"int8_int4"`` (int4 per-group weights; LLM default), ``"int8_weight_only"``, ``"int4_weight_only"`` —
            or a torchao ``AOBaseConfig`` (e.g. ``IntxWeightOnlyConfig(...)``), run through torchao's ``QATConfig``.
        group_size: group size of the int4 presets; must divide each targeted layer's ``in_features``.
        targets: patterns (fnmatch on module or class names, ``"re:<regex>"``) to quantize; None: every linear.
        exclude: patterns never quantized; None: embeddings, ``lm_head``, classifier heads, layer norms.
        include_embeddings: also fake-quantize embedding weights (weight only; presets only).
        backend: deployment backend recorded for :func:`~lightning_latency.quantization.deploy`; None: ``"x86"``
            for the int8 per-channel presets, ``"torchao"`` otherwise.
        start_step: global step at which fake quantization starts (e.g. after a pruning schedule ends).
        start_epoch: alternatively, the epoch at which it starts (give one of ``start_step``/``start_epoch``).
        freeze_step: global step at which the weight quantization ranges are frozen; None: never.
        convert_on_fit_end: convert to real quantized weights at the end of ``fit``; otherwise call
            :meth:`convert` (or :func:`~lightning_latency.quantization.deploy`) yourself.
        log_every_n_steps: log the mean relative weight error every this many steps (0: only at QAT start/end).
        model_attr: attribute (dotted path) of the LightningModule to quantize; None: ``pl_module.compression_target``
            when defined (a ``DistillationModule``'s student), else the module. Names in patterns are relative to it.
        skip: deprecated name of ``exclude``.

    Logged: hyperparameters ``qat/<config field>``, ``qat/modules``; metrics ``qat/num_quantized_modules``,
    ``qat/weight_rel_error`` (mean ‖Q(W) − W‖/‖W‖), ``qat/weight_rel_error_max``, ``qat/frozen``, ``qat/converted``.

    Raises:
        ValueError: unknown scheme/backend, bad group size or patterns, negative or conflicting steps; in ``setup``
            (as MisconfigurationException): targets matching nothing, a group size not dividing a layer, a torchao
            config ``QATConfig`` cannot prepare.

    Example::

        trainer = Trainer(callbacks=[QuantizationAwareTraining(scheme="int8_dynamic", start_step=100)])
        trainer.fit(module)              # module's linears now hold int8 weights; then trainer.save_checkpoint(...)
        Trainer(callbacks=[QuantizationAwareTraining()]).test(fresh_module, ckpt_path="qat.ckpt")
    """

    compresses = True

    def __init__(self, scheme: Any = "int8_dynamic", group_size: int = 32, targets: list[str] | None = None,
                 exclude: list[str] | None = None, include_embeddings: bool = False, backend: str | None = None,
                 start_step: int = 0, start_epoch: int | None = None, freeze_step: int | None = None,
                 convert_on_fit_end: bool = True, log_every_n_steps: int = 50, model_attr: str | None = None,
                 skip: list[str] | None = None) -> None:
        super().__init__(model_attr)
        exclude = renamed("QuantizationAwareTraining", "skip", skip, "exclude", exclude, None)
        config = QuantizationConfig(scheme=scheme, group_size=group_size, targets=targets, exclude=exclude,
                                    include_embeddings=include_embeddings, backend=backend)
        self.core = self.controller = QATController(config, start_step, start_epoch, freeze_step)
        _non_negative_int("log_every_n_steps", log_every_n_steps, "Pass log_every_n_steps=0 to log only at the ends.")
        self.convert_on_fit_end = bool(convert_on_fit_end)
        self.log_every_n_steps = log_every_n_steps

    config = property(lambda self: self.controller.config)
    start_step = property(lambda self: self.controller.start_step)
    start_epoch = property(lambda self: self.controller.start_epoch)
    freeze_step = property(lambda self: self.controller.freeze_step)
    quantized = property(lambda self: self.controller.quantized)
    prepared_at_step = property(lambda self: self.controller.prepared_at_step)
    frozen_at_step = property(lambda self: self.controller.frozen_at_step)
    converted = property(lambda self: self.controller.phase is Phase.CONVERTED)

    @property
    @override
    def state_key(self) -> str:
        extra = {"model_attr": self.model_attr} if self.model_attr else {}  # keys of older checkpoints unchanged
        return self._generate_state_key(scheme=self.config.scheme_name, targets=self.config.targets,
                                        start_step=self.start_step, start_epoch=self.start_epoch, **extra)

    @override
    def strategy_problem(self, kind: StrategyKind, pl_module: nn.Module | None = None) -> str | None:
        if kind == "fsdp" and (self.start_step or self.start_epoch):  # start 0: prepared in setup, before wrapping
            return (f"QuantizationAwareTraining(start_step={self.start_step}, start_epoch={self.start_epoch}) "
                    f"would swap modules inside already-wrapped FSDP units. Under FSDP, QAT must be prepared before "
                    f"wrapping: pass start_step=0 (prepared in `setup`, before the strategy wraps the model).")
        return None

    @override
    def validate(self, trainer: Trainer, pl_module: LightningModule, target: nn.Module, stage: str) -> None:
        if stage == "fit":  # found now, not at `start_step` (possibly hours later)
            self.controller.check(target)

    @override
    def deploy_config(self) -> QuantizationConfig | None:
        # None while the model is still float (the start step never came): it is deployed as a float model then
        return None if self.controller.phase is Phase.FLOAT else self.config

    # ------------------------------------------------------------------ hooks
    @override
    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        super().setup(trainer, pl_module, stage)
        target, fit = self.target(pl_module), stage == "fit"
        self.controller.attach(target)
        # Lightning calls `setup` before restoring a checkpoint's weights, so the pre-hook sees them first.
        for handle in self.controller.register_load_hooks(target, training=fit, convert_loaded=self.convert_on_fit_end):
            self.add_hook(handle)
        if fit and (names := self.controller.retrain(target)):
            self.warn(f"the model was already converted ({len(names)} quantized modules); fitting again trains their "
                      f"dequantized values with fake quantization and converts again at the end. Pass "
                      f"convert_on_fit_end=False to keep the float master weights between fits.")
        if fit:
            self._sync(trainer, target)  # before the optimizer is built and DDP wraps the model (both after setup)

    def _sync(self, trainer: Trainer, target: nn.Module, resumed: bool = False) -> None:
        entered = self.controller.sync(target, trainer.global_step, trainer.current_epoch)
        if Phase.PREPARED in entered or resumed:
            c = self.controller
            self.info(f"fake-quantizing {len(c.quantized)} modules ({c.config.scheme_name}) from step "
                      f"{c.prepared_at_step}{' (resumed)' if resumed else ''}.")
            self.log_hyperparams(trainer, {**{f"qat/{k}": v for k, v in c.config.to_dict().items()},
                                           "qat/modules": ",".join(c.quantized)})
            self.log_metrics(trainer, c.error_metrics(target))
        if Phase.FROZEN in entered:
            self.log_metrics(trainer, {"qat/frozen": 1.0})

    @override
    def on_fit_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        # on a resume our state is restored by now (global_step not yet): the phase came from the checkpoint
        resumed = trainer.ckpt_path is not None and self.controller.phase.in_qat
        self._sync(trainer, self.target(pl_module), resumed=resumed)

    @override
    def on_train_epoch_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._sync(trainer, self.target(pl_module))

    @override
    def on_train_batch_start(self, trainer: Trainer, pl_module: LightningModule, batch: Any, batch_idx: int) -> None:
        self._sync(trainer, self.target(pl_module))

    @override
    def on_train_batch_end(self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        n = self.log_every_n_steps
        if n and self.controller.phase.in_qat and trainer.global_step % n == 0:
            self.log_metrics(trainer, self.controller.error_metrics(self.target(pl_module)))

    @override
    def on_fit_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        phase = self.controller.phase
        if not phase.in_qat:
            if phase is Phase.FLOAT:
                self.warn(f"fit ended at step {trainer.global_step} before QAT started (start_step="
                          f"{self.start_step}, start_epoch={self.start_epoch}); the model stays float.")
            return
        self.log_metrics(trainer, self.controller.error_metrics(self.target(pl_module)))
        if not self.convert_on_fit_end:
            return
        if is_spawned(trainer):
            self.warn("not converting at fit end under a spawn-based strategy (ddp_spawn): Lightning returns the "
                      "weights to the main process through torch.load with a callable map_location, which cannot carry "
                      "torchao int8 tensors. The main process gets the QAT-trained float weights: call "
                      "`callback.convert(model)` there (or deploy(model, ...)), or use strategy='ddp'.")
            return
        self.convert(pl_module, trainer)

    def convert(self, pl_module: nn.Module, trainer: Trainer | None = None) -> list[str]:
        """Convert ``pl_module``'s target (see ``model_attr``) to real quantized weights now; prepares it if float."""
        names = self.controller.convert(self.target(pl_module))
        if trainer is not None:
            self.log_metrics(trainer, {"qat/converted": 1.0})
        return names

    @override
    def on_save_checkpoint(self, trainer: Trainer, pl_module: LightningModule, checkpoint: dict[str, Any]) -> None:
        self.controller.save_into(checkpoint["state_dict"], target_prefix(pl_module, self.target(pl_module)))


__all__ = ["QuantizationAwareTraining"]
