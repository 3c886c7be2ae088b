"""``QATController``: all per-run state of quantization-aware training and the verbs that advance it; no Lightning.

* **One phase** (:class:`Phase`: float → prepared → frozen → converted), moved forward by :meth:`QATController.sync`
  from the schedule (``start_step`` or ``start_epoch``, then ``freeze_step``). ``sync`` touches the model only when
  the phase changes, so calling it on every batch costs a few comparisons, never a walk over the modules.
* **Checkpoints without private trainer state**: :meth:`~QATController.save_into` writes one reserved entry next to
  the weights, ``<prefix>_lightning_latency_qat`` = ``{"phase", "packed", "config"}`` (``packed``: the plain inner
  tensors of converted weights, see ``checkpoint.py``). The load pre-hook from
  :meth:`~QATController.register_load_hooks` pops that entry (so a strict load does not report it) and brings a
  freshly built model into the checkpoint's form before its weights are copied. A plain model without the hooks
  loads such a state dict with ``strict=False`` (the entry, and frozen-range buffers, are then ignored).

Example (a plain PyTorch loop)::

    qat = QATController(QuantizationConfig(scheme="int8_dynamic"), start_step=100, freeze_step=900)
    for step, batch in enumerate(loader):
        qat.sync(model, step)              # prepares at step 100, freezes at 900; parameters stay the same objects
        loss = model(**batch).loss; loss.backward(); optimizer.step(); optimizer.zero_grad()
    qat.convert(model)
    state = model.state_dict(); qat.save_into(state); torch.save(state, "qat.pt")
    # elsewhere: fresh = build(); QATController(same_config).register_load_hooks(fresh); fresh.load_state_dict(...)
"""

from __future__ import annotations

from enum import Enum
from typing import Any

from torch import nn

from lightning_latency.quantization.checkpoint import pack_quantized_state, unpack_quantized_state
from lightning_latency.quantization.config import QuantizationConfig
from lightning_latency.quantization.qat import (
    _as_config,
    check_qat,
    convert_qat,
    converted_modules,
    fake_quantized_modules,
    freeze_ranges,
    is_converted,
    is_frozen,
    is_prepared,
    prepare_qat,
    strip_qat,
    unconvert_qat,
    weight_error,
)

#: The state-dict entry (after the target's prefix) that carries what a load needs: phase, packed tensors, config.
RESERVED_KEY = "_lightning_latency_qat"
_FROZEN_SCALE = "weight_fake_quantizer.scale"


class Phase(str, Enum):
    """Where a model is in quantization-aware training (it only moves forward, except for a second ``fit``)."""

    @property
    def in_qat(self) -> bool:
        """Fake-quantized and training (prepared or frozen)."""
        return self in (Phase.PREPARED, Phase.FROZEN)

    FLOAT = "float"
    PREPARED = "prepared"
    FROZEN = "frozen"
    CONVERTED = "converted"


def phase_of(model: nn.Module) -> Phase:
    """The phase ``model`` is in, read from its modules (walks them: call it once, not per batch)."""
    if is_converted(model):
        return Phase.CONVERTED
    if is_frozen(model):
        return Phase.FROZEN
    return Phase.PREPARED if is_prepared(model) else Phase.FLOAT


def _non_negative_int(name: str, value: Any, fix: str) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(f"`{name}` must be an int >= 0, got {value!r}. {fix}")


def _parse_phase(value: Any) -> Phase:
    try:
        return Phase(value)
    except ValueError:
        return Phase.FLOAT


class QATController:
    """Holds one QAT run's state (phase, quantized names, steps, config) and moves a model through the phases.

    Args:
        config: what and how to quantize (a :class:`QuantizationConfig`, a scheme name or a torchao config).
        start_step: global step at which fake quantization starts.
        start_epoch: alternatively, the epoch at which it starts (give one of ``start_step``/``start_epoch``).
        freeze_step: step at which the weight quantization ranges are frozen; None: never.

    Raises:
        ValueError: negative or conflicting steps, ``freeze_step`` not after ``start_step``.
    """

    def __init__(self, config: QuantizationConfig | Any = None, start_step: int = 0, start_epoch: int | None = None,
                 freeze_step: int | None = None) -> None:
        self.config = _as_config(config)
        _non_negative_int("start_step", start_step, "Pass start_step=0 to fake-quantize from the first step.")
        if start_epoch is not None:
            _non_negative_int("start_epoch", start_epoch, "Pass start_epoch=None to start by step instead.")
            if start_step:
                raise ValueError(f"Give one of `start_step` ({start_step}) and `start_epoch` ({start_epoch}), not "
                                 f"both. Pass start_step=0 to start at epoch {start_epoch}.")
        if freeze_step is not None:
            _non_negative_int("freeze_step", freeze_step, "Pass freeze_step=None to keep ranges dynamic.")
            if freeze_step <= start_step:
                raise ValueError(
                    f"`freeze_step`={freeze_step} must be after `start_step`={start_step}: ranges can only be frozen "
                    f"once fake quantization has started. Pass freeze_step > {start_step} or freeze_step=None.")
        self.start_step, self.start_epoch, self.freeze_step = start_step, start_epoch, freeze_step
        self.phase = Phase.FLOAT
        self.quantized: list[str] = []
        self.prepared_at_step: int | None = None
        self.frozen_at_step: int | None = None
        self._check_form = False  # after load_state_dict: make the model match the restored phase at the next sync
        self._load_policy = (True, False)  # (training, convert_loaded), see register_load_hooks
        self._convert_after_load = False

    # ------------------------------------------------------------------ schedule
    def wanted(self, step: int, epoch: int = 0) -> Phase:
        """The phase the schedule asks for at ``step`` / ``epoch`` (never ``CONVERTED``: converting is a decision)."""
        started = epoch >= self.start_epoch if self.start_epoch is not None else step >= self.start_step
        if not started:
            return Phase.FLOAT
        return Phase.FROZEN if self.freeze_step is not None and step >= self.freeze_step else Phase.PREPARED

    def sync(self, model: nn.Module, step: int, epoch: int = 0) -> list[Phase]:
        """Advance ``model`` to the phase the schedule asks for; returns the phases entered (usually none)."""
        entered = self._restore(model) if self._check_form else []
        if self.phase is Phase.CONVERTED:
            return entered
        want = self.wanted(step, epoch)
        if self.phase is Phase.FLOAT and want is not Phase.FLOAT:
            self.prepare(model, step)
            entered.append(Phase.PREPARED)
        if self.phase is Phase.PREPARED and want is Phase.FROZEN:
            self.freeze(model, step)
            entered.append(Phase.FROZEN)
        return entered

    # ------------------------------------------------------------------ verbs
    def check(self, model: nn.Module) -> None:
        """Raise now what preparing (and freezing) a float ``model`` would raise later: targets matching nothing, …"""
        if phase_of(model) is Phase.FLOAT:
            check_qat(model, self.config, freeze=self.freeze_step is not None)

    def attach(self, model: nn.Module) -> Phase:
        """Read ``model``'s phase (a new model, or one changed outside this controller); returns it."""
        self.phase = phase_of(model)
        if self.phase is Phase.FLOAT:
            self.quantized, self.prepared_at_step, self.frozen_at_step = [], None, None
        elif not self.quantized:
            found = converted_modules(model) if self.phase is Phase.CONVERTED else fake_quantized_modules(model)
            self.quantized = list(found)
        return self.phase

    def prepare(self, model: nn.Module, step: int = 0) -> list[str]:
        self.quantized = prepare_qat(model, self.config)
        if self.prepared_at_step is None:  # kept on a resume and on a second fit
            self.prepared_at_step = step
        self.phase = Phase.PREPARED
        return self.quantized

    def freeze(self, model: nn.Module, step: int = 0) -> list[str]:
        names = freeze_ranges(model)
        if self.frozen_at_step is None:
            self.frozen_at_step = step
        self.phase = Phase.FROZEN
        return names

    def convert(self, model: nn.Module) -> list[str]:
        """Real quantized weights now (prepares a float ``model`` first)."""
        if not is_prepared(model):
            self.quantized = prepare_qat(model, self.config)
        names = convert_qat(model, self.config)
        self.phase = Phase.CONVERTED
        return names

    def retrain(self, model: nn.Module) -> list[str]:
        """A converted ``model`` back to fake quantization over its dequantized weights (a second ``fit``)."""
        if self.phase is not Phase.CONVERTED:
            return []
        names = unconvert_qat(model)
        self.quantized = prepare_qat(model, self.config)
        self.phase = Phase.PREPARED
        return names

    def error_metrics(self, model: nn.Module) -> dict[str, float]:
        """``qat/weight_rel_error`` (mean ‖Q(W) − W‖/‖W‖), its max and the module count; empty when not in QAT."""
        errors = list(weight_error(model).values()) if self.phase.in_qat else []
        if not errors:
            return {}
        return {"qat/weight_rel_error": sum(errors) / len(errors), "qat/weight_rel_error_max": max(errors),
                "qat/num_quantized_modules": float(len(errors))}

    def _bring(self, model: nn.Module, target: Phase) -> Phase:
        """Put ``model`` in ``target``'s form (a fresh model before a checkpoint loads); returns its form before."""
        before = phase_of(model)
        if target is Phase.FLOAT or target is before:
            self.phase = before
            return before
        if before is Phase.CONVERTED:  # a QAT checkpoint into a converted model: its float form first
            unconvert_qat(model)
            strip_qat(model)
        if not is_prepared(model):
            self.quantized = prepare_qat(model, self.config)
        if target is Phase.FROZEN:
            freeze_ranges(model)  # creates the scale buffers; the checkpoint's values are copied into them next
        elif target is Phase.CONVERTED:
            convert_qat(model, self.config)
        self.phase = target
        return before

    def _restore(self, model: nn.Module) -> list[Phase]:
        self._check_form = False
        want = self.phase
        before = self._bring(model, want)
        return [want] if want is not before and want is not Phase.FLOAT else []

    # ------------------------------------------------------------------ checkpoints
    def save_into(self, state_dict: dict[str, Any], prefix: str = "") -> None:
        """Write the reserved entry ``prefix + RESERVED_KEY`` into a model ``state_dict`` (packs converted weights)."""
        if self.phase is Phase.FLOAT:
            return
        state_dict[prefix + RESERVED_KEY] = {"phase": self.phase.value, "packed": pack_quantized_state(state_dict,
                                             prefix), "config": self.config.to_dict()}

    def register_load_hooks(self, module: nn.Module, training: bool = True, convert_loaded: bool = False) -> list[Any]:
        """Load-state-dict pre/post hooks on ``module`` (the quantized target); returns their handles.

        Args:
            training: the load resumes training; False (evaluation): a checkpoint written during QAT (prepared or
                frozen) is converted after it loads when ``convert_loaded`` is True or ``module`` was converted
                before, so it is evaluated as the quantized model a fit would have left (Lightning #12896).
        """
        self._load_policy = (training, convert_loaded)
        return [module.register_load_state_dict_pre_hook(self._before_load),
                module.register_load_state_dict_post_hook(self._after_load)]

    def _before_load(self, module: nn.Module, state_dict: dict[str, Any], prefix: str, *args: Any) -> None:
        entry = state_dict.pop(prefix + RESERVED_KEY, None)
        if isinstance(entry, dict):
            target, packed = _parse_phase(entry.get("phase")), entry.get("packed") or {}
        else:  # written before the reserved entry: frozen-range buffers are the one sign of QAT in the weights
            frozen = any(k.startswith(prefix) and k.endswith(_FROZEN_SCALE) for k in state_dict)
            target, packed = (Phase.FROZEN if frozen else Phase.FLOAT), {}
        before = self._bring(module, target)
        if target is Phase.CONVERTED and packed:
            unpack_quantized_state(module, state_dict, packed, prefix)
        training, convert_loaded = self._load_policy
        self._convert_after_load = target.in_qat and not training and (convert_loaded or before is Phase.CONVERTED)

    def _after_load(self, module: nn.Module, incompatible_keys: Any) -> None:
        if self._convert_after_load:
            self.convert(module)
        self._convert_after_load = False

    # ------------------------------------------------------------------ state
    def state_dict(self) -> dict[str, Any]:
        return {"phase": self.phase.value, "quantized": list(self.quantized), "prepared_at_step": self.prepared_at_step,
                "frozen_at_step": self.frozen_at_step, "config": self.config.to_dict()}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.phase = _parse_phase(state_dict.get("phase", "float"))
        self.quantized = list(state_dict.get("quantized", []))
        self.prepared_at_step = state_dict.get("prepared_at_step")
        self.frozen_at_step = state_dict.get("frozen_at_step")
        self._check_form = True


__all__ = ["Phase", "QATController", "RESERVED_KEY", "phase_of"]
