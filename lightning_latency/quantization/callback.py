"""``QuantizationAwareTraining``: the Lightning callback that decides *when* to prepare, freeze and convert.

The work is done by the core in ``qat.py``; this file holds the schedule, the checkpoint plumbing and the logging.
Lightning 1.x's QAT callback was removed because it wrapped ``forward`` (broke keyword inputs, #7926/#15862), could
not load a converted checkpoint for ``test`` (#12896) and could not ``fit`` twice (#7427). Here:

* nothing wraps ``forward``: linears are swapped for torchao fake-quantized linears sharing the same Parameters;
* a load-state-dict pre-hook on the LightningModule (registered in ``setup``, which Lightning runs *before* it
  restores model weights) brings a freshly built model into the checkpoint's form — frozen fake-quant buffers or
  converted quantized weights — before the weights are copied;
* a second ``fit`` on a converted model dequantizes it and trains again (with a warning).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from typing_extensions import override

from lightning_latency._compat import CallbackBase, MisconfigurationException, rank_zero_info, rank_zero_warn
from lightning_latency._target import check_model_attr, resolve_target
from lightning_latency.quantization.config import QuantizationConfig
from lightning_latency.quantization.checkpoint import CHECKPOINT_KEY, pack_quantized_state, unpack_quantized_state
from lightning_latency.quantization.qat import (
    _is_quantized_tensor,
    convert_qat,
    freeze_ranges,
    is_converted,
    is_frozen,
    is_prepared,
    prepare_qat,
    strip_qat,
    unconvert_qat,
    weight_error,
)
from lightning_latency.quantization.targets import check_group_size, select_modules
from lightning_latency.strategies import fsdp_problem, is_fsdp

_PHASES = ("float", "prepared", "frozen", "converted")


def _non_negative_int(name: str, value: Any, fix: str) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(f"`{name}` must be an int >= 0, got {value!r}. {fix}")


def _spawned(trainer: Any) -> bool:
    """True when the trainer runs in worker processes whose weights come back to the parent via a checkpoint file."""
    return type(getattr(trainer.strategy, "launcher", None)).__name__ == "_MultiProcessingLauncher"


class QuantizationAwareTraining(CallbackBase):
    """Quantization-aware training with torchao: fake-quantize from a given step, optionally freeze ranges, convert.

    Args:
        scheme: ``"int8_dynamic"`` (int8 per-token activations + int8 per-channel weights; CPU/encoder default),
            ``"int8_int4"`` (int8 activations + int4 per-group weights; LLM default), ``"int8_weight_only"``,
            ``"int4_weight_only"``.
        group_size: group size of the int4 schemes; must divide each targeted layer's ``in_features``.
        targets: fnmatch patterns on module names or class names to quantize; None: every ``nn.Linear``.
        skip: fnmatch patterns never quantized; None: embeddings, ``lm_head``, classifier heads, layer norms.
        include_embeddings: also fake-quantize embedding weights (weight only).
        backend: deployment backend recorded for :func:`~lightning_latency.quantization.deploy`: ``"x86"`` or
            ``"torchao"``; None: ``"x86"`` for int8 schemes, ``"torchao"`` for int4 ones.
        start_step: global step at which fake quantization starts (e.g. after a pruning schedule ends).
        start_epoch: alternatively, the epoch at which it starts (give one of ``start_step``/``start_epoch``).
        freeze_step: global step at which the weight quantization ranges are frozen; None: never.
        convert_on_fit_end: convert to real quantized weights at the end of ``fit``; otherwise call
            :meth:`convert` (or :func:`~lightning_latency.quantization.deploy`) yourself.
        log_every_n_steps: log the mean relative weight quantization error every this many steps (0: only at
            the start and the end of QAT).
        model_attr: attribute (dotted path allowed) of the LightningModule to quantize, e.g. ``"model"``; None
            quantizes ``pl_module.compression_target`` when defined (a ``DistillationModule``: the student, never
            the teacher), else the LightningModule itself. Module names in ``targets``/``skip`` are relative to it.

    Logged: hyperparameters ``qat/scheme``, ``qat/modules`` (names); metrics ``qat/num_quantized_modules``,
    ``qat/weight_rel_error`` (mean over modules of ‖Q(W) − W‖/‖W‖), ``qat/weight_rel_error_max``,
    ``qat/frozen``,
    ``qat/converted``.

    Raises:
        ValueError: unknown scheme/backend, bad group size, negative or conflicting steps, ``freeze_step`` not after
            ``start_step``.

    Example::

        trainer = Trainer(callbacks=[QuantizationAwareTraining(scheme="int8_dynamic", start_step=100)])
        trainer.fit(module)              # module's linears now hold int8 weights
        trainer.save_checkpoint("qat.ckpt")
        Trainer(callbacks=[QuantizationAwareTraining()]).test(fresh_module, ckpt_path="qat.ckpt")
    """

    def __init__(
        self,
        scheme: str = "int8_dynamic",
        group_size: int = 32,
        targets: list[str] | None = None,
        skip: list[str] | None = None,
        include_embeddings: bool = False,
        backend: str | None = None,
        start_step: int = 0,
        start_epoch: int | None = None,
        freeze_step: int | None = None,
        convert_on_fit_end: bool = True,
        log_every_n_steps: int = 50,
        model_attr: str | None = None,
    ) -> None:
        self.config = QuantizationConfig(scheme=scheme, group_size=group_size, targets=targets, skip=skip,
                                         include_embeddings=include_embeddings, backend=backend)
        _non_negative_int("start_step", start_step, "Pass start_step=0 to fake-quantize from the first step.")
        if start_epoch is not None:
            _non_negative_int("start_epoch", start_epoch, "Pass start_epoch=None to start by step instead.")
            if start_step:
                raise ValueError(
                    f"Give one of `start_step` ({start_step}) and `start_epoch` ({start_epoch}), not both. "
                    f"Pass start_step=0 to start at epoch {start_epoch}."
                )
        if freeze_step is not None:
            _non_negative_int("freeze_step", freeze_step, "Pass freeze_step=None to keep ranges dynamic.")
            if freeze_step <= start_step:
                raise ValueError(
                    f"`freeze_step`={freeze_step} must be after `start_step`={start_step}: ranges can only be frozen "
                    f"once fake quantization has started. Pass freeze_step > {start_step} or freeze_step=None."
                )
        _non_negative_int("log_every_n_steps", log_every_n_steps, "Pass log_every_n_steps=0 to log only at the ends.")
        self.start_step, self.start_epoch, self.freeze_step = start_step, start_epoch, freeze_step
        self.convert_on_fit_end = bool(convert_on_fit_end)
        self.log_every_n_steps = log_every_n_steps
        self.model_attr = check_model_attr(model_attr)
        self.quantized: list[str] = []
        self.prepared_at_step: int | None = None
        self.frozen_at_step: int | None = None
        self.converted = False
        self._restored_phase = "float"
        self._hook_handle: Any = None
        self._post_hook_handle: Any = None
        self._convert_after_load = False
        self._stage: str | None = None
        self._trainer: Any = None

    @property
    @override
    def state_key(self) -> str:
        extra = {"model_attr": self.model_attr} if self.model_attr else {}  # keys of older checkpoints unchanged
        return self._generate_state_key(scheme=self.config.scheme.value, targets=self.config.targets,
                                        start_step=self.start_step, start_epoch=self.start_epoch, **extra)

    def _model(self, pl_module: nn.Module) -> nn.Module:
        """The module this callback quantizes (``model_attr``, else ``compression_target``, else ``pl_module``)."""
        return resolve_target(pl_module, self.model_attr)

    def strategy_problem(self, kind: str, pl_module: Any = None) -> str | None:
        if kind == "fsdp" and (self.start_step or self.start_epoch):  # start 0: prepared in setup, before wrapping
            return (f"QuantizationAwareTraining(start_step={self.start_step}, start_epoch={self.start_epoch}) "
                    f"would swap modules inside already-wrapped FSDP units. Under FSDP, QAT must be prepared before "
                    f"wrapping: pass start_step=0 (prepared in `setup`, before the strategy wraps the model).")
        return None

    def __getstate__(self) -> dict[str, Any]:  # ddp_spawn pickles callbacks; hook handles do not pickle
        state = self.__dict__.copy()
        state["_hook_handle"] = state["_post_hook_handle"] = state["_trainer"] = None
        return state

    # ------------------------------------------------------------------ schedule
    def _due(self, trainer: Any) -> bool:
        if self._restored_phase in ("prepared", "frozen"):
            return True
        if self.start_epoch is not None:
            return trainer.current_epoch >= self.start_epoch
        return trainer.global_step >= self.start_step

    def _sync_phase(self, trainer: Any, pl_module: Any) -> None:
        """Bring the model to the phase the schedule asks for at the current step (idempotent)."""
        if is_converted(pl_module) or not self._due(trainer):
            return
        if not is_prepared(pl_module):
            self.quantized = prepare_qat(pl_module, self.config)
            # On a resume Lightning calls `on_fit_start` before it restores `global_step`: keep the restored step.
            resumed = self._restored_phase in ("prepared", "frozen") and self.prepared_at_step is not None
            if not resumed:
                self.prepared_at_step = trainer.global_step
            rank_zero_info(f"QuantizationAwareTraining: fake-quantizing {len(self.quantized)} modules "
                           f"({self.config.scheme.value}) from step {self.prepared_at_step}"
                           f"{' (resumed)' if resumed else ''}.")
            self._log_hparams(trainer)
            self._log_error(trainer, pl_module)
        want_frozen = self._restored_phase == "frozen" or (
            self.freeze_step is not None and trainer.global_step >= self.freeze_step)
        if want_frozen and not is_frozen(pl_module):
            freeze_ranges(pl_module)
            if self._restored_phase != "frozen" or self.frozen_at_step is None:
                self.frozen_at_step = trainer.global_step
            self._log(trainer, {"qat/frozen": 1.0})

    # ------------------------------------------------------------------ logging
    def _log(self, trainer: Any, metrics: dict[str, float]) -> None:
        if not trainer.is_global_zero:
            return
        for logger in trainer.loggers:
            logger.log_metrics(metrics, step=trainer.global_step)

    def _log_hparams(self, trainer: Any) -> None:
        if not trainer.is_global_zero:
            return
        params = {f"qat/{k}": v for k, v in self.config.to_dict().items()}
        params["qat/modules"] = ",".join(self.quantized)
        for logger in trainer.loggers:
            logger.log_hyperparams(params)

    def _error_metrics(self, pl_module: nn.Module) -> dict[str, float]:
        errors = list(weight_error(pl_module).values())
        if not errors:
            return {}
        return {"qat/weight_rel_error": sum(errors) / len(errors), "qat/weight_rel_error_max": max(errors),
                "qat/num_quantized_modules": float(len(errors))}

    def _log_error(self, trainer: Any, pl_module: nn.Module) -> None:
        if trainer.is_global_zero:
            self._log(trainer, self._error_metrics(pl_module))

    # ------------------------------------------------------------------ checkpoint plumbing
    @override
    def on_save_checkpoint(self, trainer: Any, pl_module: Any, checkpoint: dict[str, Any]) -> None:
        packed = pack_quantized_state(checkpoint.get("state_dict", {}))
        if packed:
            checkpoint[CHECKPOINT_KEY] = packed

    def _before_weights_load(self, module: nn.Module, state_dict: dict[str, Any], prefix: str, *args: Any) -> None:
        """Load-state-dict pre-hook on the LightningModule: reshape a fresh model into the checkpoint's form."""
        # Lightning has read the whole checkpoint before it loads the weights; our packed int8 data sits beside them.
        loaded = getattr(getattr(self._trainer, "_checkpoint_connector", None), "_loaded_checkpoint", None) or {}
        packed = loaded.get(CHECKPOINT_KEY) or {}
        keys = [k for k in state_dict if k.startswith(prefix)]
        converted = bool(packed) or any(_is_quantized_tensor(state_dict[k]) for k in keys)
        frozen = any(k.endswith("weight_fake_quantizer.scale") for k in keys)
        saved = (loaded.get("callbacks") or {}).get(self.state_key) or {}
        in_qat = frozen or saved.get("phase") in ("prepared", "frozen")
        if converted:
            if not is_converted(module):
                if not is_prepared(module):
                    self.quantized = prepare_qat(module, self.config)
                convert_qat(module, self.config)
                self.converted = True
            if packed:
                unpack_quantized_state(module, state_dict, packed, prefix)
            return
        if not in_qat:
            return
        # A checkpoint written during QAT (every ModelCheckpoint file: they are saved before the fit-end conversion)
        # holds fake-quant float weights. Bring the module to that form; outside `fit`, convert again after the load
        # so `test(ckpt_path=...)` measures the quantized model, as the fit would have left it (Lightning #12896).
        was_converted = is_converted(module)
        if was_converted:
            unconvert_qat(module)
            strip_qat(module)
        if not is_prepared(module):
            # Lightning restores the weights before the callback state, so a fresh model is still float here.
            self.quantized = prepare_qat(module, self.config)
        if frozen and not is_frozen(module):
            freeze_ranges(module)  # creates the scale buffers; the checkpoint's values are copied into them next
        self._convert_after_load = self._stage != "fit" and (was_converted or self.convert_on_fit_end)

    def _after_weights_load(self, module: nn.Module, incompatible_keys: Any) -> None:
        """Load-state-dict post-hook: convert a QAT checkpoint loaded outside ``fit`` (see ``_before_weights_load``)."""
        if self._convert_after_load and is_prepared(module):
            convert_qat(module, self.config)
            self.converted = True
        self._convert_after_load = False

    @override
    def setup(self, trainer: Any, pl_module: Any, stage: str) -> None:
        # Lightning calls `setup` before restoring a checkpoint's weights, so the hook sees them first.
        problem = fsdp_problem(self) if stage == "fit" and is_fsdp(trainer) else None
        if problem:
            raise MisconfigurationException(problem)
        self.teardown(trainer, pl_module, stage)
        self._trainer = trainer
        model = self._model(pl_module)
        # On a submodule target the hook receives that submodule and its key prefix (e.g. "student.").
        self._stage = stage
        self._hook_handle = model.register_load_state_dict_pre_hook(self._before_weights_load)
        self._post_hook_handle = model.register_load_state_dict_post_hook(self._after_weights_load)
        if stage == "fit" and is_converted(model):
            names = unconvert_qat(model)
            rank_zero_warn(
                f"QuantizationAwareTraining: the model was already converted ({len(names)} quantized modules); fitting "
                f"again trains their dequantized values with fake quantization and converts again at the end. "
                f"Pass convert_on_fit_end=False to keep the float master weights between fits."
            )
            self.converted = False
            self._restored_phase = "prepared"
        if stage == "fit" and not is_converted(model) and not is_prepared(model):
            # Found now, not at `start_step` (possibly hours later): targets that match nothing, a bad group size.
            try:
                check_group_size(select_modules(model, self.config), self.config)
            except ValueError as err:
                raise MisconfigurationException(f"QuantizationAwareTraining: {err}") from err
        if stage == "fit":
            # Before the optimizer is built and before DDP wraps the model (both happen after `setup`).
            self._sync_phase(trainer, model)

    @override
    def teardown(self, trainer: Any, pl_module: Any, stage: str) -> None:
        for handle in (self._hook_handle, self._post_hook_handle):
            if handle is not None:
                handle.remove()
        self._hook_handle = self._post_hook_handle = None
        self._trainer = None

    # ------------------------------------------------------------------ training hooks
    @override
    def on_fit_start(self, trainer: Any, pl_module: Any) -> None:
        # after a resume: global_step and our state are restored by now
        self._sync_phase(trainer, self._model(pl_module))

    @override
    def on_train_epoch_start(self, trainer: Any, pl_module: Any) -> None:
        self._sync_phase(trainer, self._model(pl_module))

    @override
    def on_train_batch_start(self, trainer: Any, pl_module: Any, batch: Any, batch_idx: int) -> None:
        self._sync_phase(trainer, self._model(pl_module))

    @override
    def on_train_batch_end(self, trainer: Any, pl_module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
        n = self.log_every_n_steps
        model = self._model(pl_module)
        if n and is_prepared(model) and trainer.global_step % n == 0:
            for key, value in self._error_metrics(model).items():
                pl_module.log(key, value, on_step=True, on_epoch=False, rank_zero_only=True)

    @override
    def on_fit_end(self, trainer: Any, pl_module: Any) -> None:
        model = self._model(pl_module)
        if not is_prepared(model):
            if not is_converted(model):
                rank_zero_warn(
                    f"QuantizationAwareTraining: fit ended at step {trainer.global_step} before QAT started "
                    f"(start_step={self.start_step}, start_epoch={self.start_epoch}); the model stays float."
                )
            return
        self._log_error(trainer, model)
        if not self.convert_on_fit_end:
            return
        if _spawned(trainer):
            rank_zero_warn(
                "QuantizationAwareTraining: not converting at fit end under a spawn-based strategy (ddp_spawn): "
                "Lightning returns the weights to the main process through torch.load with a callable map_location, "
                "which cannot carry torchao int8 tensors. The main process gets the QAT-trained float weights: call "
                "`callback.convert(model)` there (or deploy(model, ...)), or use strategy='ddp' to convert in place."
            )
            return
        self.convert(pl_module, trainer)

    def convert(self, pl_module: nn.Module, trainer: Any = None) -> list[str]:
        """Convert ``pl_module``'s target (see ``model_attr``) to real quantized weights now; prepares it if float."""
        pl_module = self._model(pl_module)
        if not is_prepared(pl_module):
            self.quantized = prepare_qat(pl_module, self.config)
        names = convert_qat(pl_module, self.config)
        self.converted = True
        if trainer is not None:
            self._log(trainer, {"qat/converted": 1.0})
        return names

    # ------------------------------------------------------------------ state
    def _phase(self) -> str:
        if self.converted:
            return "converted"
        if self.frozen_at_step is not None:
            return "frozen"
        return "prepared" if self.prepared_at_step is not None else "float"

    @override
    def state_dict(self) -> dict[str, Any]:
        return {"phase": self._phase(), "quantized": list(self.quantized), "prepared_at_step": self.prepared_at_step,
                "frozen_at_step": self.frozen_at_step, "config": self.config.to_dict()}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        phase = state_dict.get("phase", "float")
        self._restored_phase = phase if phase in _PHASES else "float"
        self.quantized = list(state_dict.get("quantized", []))
        self.prepared_at_step = state_dict.get("prepared_at_step")
        self.frozen_at_step = state_dict.get("frozen_at_step")
        self.converted = phase == "converted"


__all__ = ["QuantizationAwareTraining"]
