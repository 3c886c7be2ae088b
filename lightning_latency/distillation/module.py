"""``DistillationModule``: train a student against a frozen teacher inside a Lightning ``Trainer``.

What it takes care of, so subclasses do not have to:

* The teacher is frozen (``requires_grad_(False)``), run under ``torch.no_grad()`` and in eval mode, kept out of
  :meth:`configure_optimizers` and out of saved checkpoints; a checkpoint without ``teacher.*`` keys reloads
  (the live teacher fills them in :meth:`load_state_dict`).
* Eval mode without Lightning's warning: pytorch_lightning 2.6 no longer calls ``.train()`` at fit start; it keeps
  every module's mode and warns in ``FitLoop._warn_if_modules_in_eval_mode`` about any module found with
  ``training=False`` at train start (and its evaluation loop captures and restores modes). A teacher parked in eval
  mode therefore always triggers it. Instead the teacher's flags follow the LightningModule like any submodule,
  and :meth:`teacher_forward` switches the teacher to eval for exactly the duration of its forward (restoring each
  submodule's flag afterwards), so dropout and batch-norm statistics never act on the teacher whatever
  ``.train()`` calls Lightning or the user make.
* DDP: frozen parameters are skipped by DDP's gradient reducer, so the teacher costs no communication.
* Compression callbacks (pruning, QAT, latency) find the student through :attr:`compression_target`
  (also reachable as ``pl_module.student``).

Why ``no_grad`` and not ``inference_mode``: the teacher's outputs enter the student's loss graph, and inference
tensors cannot be saved for backward.
"""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn
from typing_extensions import override

from lightning_latency._compat import LightningModule, follow_lightning_package
from lightning_latency.distillation.losses import DistillationLoss, task_cross_entropy, token_mask

TOPK_VALUES = "teacher_topk_values"
TOPK_INDICES = "teacher_topk_indices"
_NOT_INPUTS = frozenset({"labels", TOPK_VALUES, TOPK_INDICES})
_DTYPES = {"bfloat16": torch.bfloat16, "bf16": torch.bfloat16, "float16": torch.float16, "fp16": torch.float16,
           "float32": torch.float32, "fp32": torch.float32}


@contextlib.contextmanager
def eval_mode(module: nn.Module) -> Iterator[None]:
    """Put ``module`` in eval mode for the block, then restore every submodule's own ``training`` flag."""
    modes = [(m, m.training) for m in module.modules()]
    module.eval()
    try:
        yield
    finally:
        for m, mode in modes:
            m.training = mode


def output_logits(output: Any) -> Tensor:
    """Logits from a Hugging Face ``ModelOutput`` (``.logits``), a dict, a tuple (first item) or a tensor."""
    if isinstance(output, Tensor):
        return output
    logits = getattr(output, "logits", None)
    if logits is None and isinstance(output, Mapping):
        logits = output.get("logits")
    if logits is None and isinstance(output, (tuple, list)) and output:
        logits = output[0]
    if not isinstance(logits, Tensor):
        raise TypeError(f"cannot find logits in a model output of type {type(output).__name__}. Override "
                        f"`DistillationModule.logits(output)` to return the (..., vocab) tensor.")
    return logits


def _is_causal_lm(model: nn.Module | None) -> bool:
    name = type(model).__name__
    return name.endswith("ForCausalLM") or name.endswith("LMHeadModel")


def _resolve_dtype(dtype: torch.dtype | str | None) -> torch.dtype | None:
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in _DTYPES:
        raise ValueError(f"`teacher_dtype` must be one of {sorted(_DTYPES)} or a torch.dtype, got {dtype!r}. "
                         f"Use teacher_dtype='bfloat16' to halve the teacher's memory.")
    return _DTYPES[dtype]


class DistillationModule(LightningModule):
    """Knowledge distillation: ``loss = alpha * kd + (1 - alpha) * task + intermediate_weight * intermediate``.

    Works out of the box for Hugging Face sequence classifiers (logits ``(batch, classes)``) and causal LMs
    (logits ``(batch, seq, vocab)``, causal shift and ``-100`` masking) fed dict batches with ``labels``.
    Subclass and override the documented hooks for anything else:

    * :meth:`batch_to_inputs` — batch -> keyword inputs shared by student and teacher.
    * :meth:`task_loss` — the student's own loss on the batch's labels.
    * :meth:`logits` — model output -> ``(..., vocab)`` logits.
    * :meth:`configure_optimizers` — defaults to AdamW over :meth:`trainable_parameters`.

    Args:
        student: the model being trained (``self.student``; the target of pruning / QAT / latency callbacks).
        teacher: frozen reference model (``self.teacher``), or ``None`` for offline distillation from batches
            carrying ``teacher_topk_values`` / ``teacher_topk_indices`` (see :mod:`~.offline`).
        loss: the logit loss, any :class:`~.DistillationLoss` (presets such as ``ForwardKLLoss`` included);
            default ``DistillationLoss("forward_kl", temperature=1.0)``. Its ``kind``, ``temperature``,
            ``reduction``, ``chunk_size`` and ``beta`` apply to the live and the offline (top-k) teacher alike;
            the module masks and shifts for it (a loss built with ``shift_labels=True`` turns the shift on; an
            ``ignore_index`` or ``shift_labels`` that contradicts the module's is a ``ValueError``).
        alpha: weight of the distillation term in ``[0, 1]``; the task loss gets ``1 - alpha``.
        intermediate: :class:`~.HiddenStateLoss` / :class:`~.AttentionLoss` modules (their projection weights
            are trained with the student).
        intermediate_weight: weight of the summed intermediate losses.
        teacher_dtype: cast the teacher once, e.g. ``"bfloat16"`` (logits are upcast to fp32 in the loss).
        shift_labels: causal LM shift for token-level logits; ``None`` = automatic (``*ForCausalLM`` /
            ``*LMHeadModel`` students, or a loss built with ``shift_labels=True``).
        ignore_index: label value of positions left out of every loss.
        lr, weight_decay: AdamW settings of the default optimizer.

    Logged: ``{train,val}_loss``, ``{train,val}_kd_loss``, ``{train,val}_task_loss`` and, with intermediate
    losses, ``{train,val}_intermediate_loss`` (each unweighted, so the terms are comparable across ``alpha``).

    Example::

        module = DistillationModule(student, teacher, loss=DistillationLoss(temperature=2.0), alpha=0.5)
        Trainer(max_steps=1000, callbacks=[LatencyMonitor(...)]).fit(module, train_loader, val_loader)
    """

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        module = sys.modules.get(cls.__module__)
        if module is not None and not cls.__module__.startswith("lightning_latency."):
            follow_lightning_package(DistillationModule, vars(module), f"module {cls.__module__!r}")

    def __init__(
        self,
        student: nn.Module,
        teacher: nn.Module | None = None,
        loss: DistillationLoss | None = None,
        alpha: float = 0.5,
        intermediate: Sequence[nn.Module] | nn.Module | None = None,
        intermediate_weight: float = 1.0,
        teacher_dtype: torch.dtype | str | None = None,
        shift_labels: bool | None = None,
        ignore_index: int = -100,
        lr: float = 5e-5,
        weight_decay: float = 0.0,
    ) -> None:
        _follow_caller()
        super().__init__()
        if not isinstance(student, nn.Module):
            raise ValueError(f"`student` must be an nn.Module, got {type(student).__name__} {student!r:.80}.")
        if teacher is not None and not isinstance(teacher, nn.Module):
            raise ValueError(f"`teacher` must be an nn.Module or None (offline mode), got {type(teacher).__name__}.")
        if teacher is student:
            raise ValueError("`teacher` and `student` are the same object. Pass a copy (copy.deepcopy or "
                             "student_from_teacher_layers) so the teacher stays fixed while the student trains.")
        if not (isinstance(alpha, (int, float)) and 0.0 <= alpha <= 1.0):
            raise ValueError(f"`alpha` must be in [0, 1], got {alpha!r}. alpha=1 is pure distillation, "
                             f"alpha=0 the task loss alone; 0.5 weighs them equally.")
        if not (isinstance(intermediate_weight, (int, float)) and intermediate_weight >= 0):
            raise ValueError(f"`intermediate_weight` must be >= 0, got {intermediate_weight!r}.")
        if not (isinstance(lr, (int, float)) and lr > 0):
            raise ValueError(f"`lr` must be > 0, got {lr!r}. Try lr=5e-5 for a pretrained transformer.")
        self.student = student.train()
        self.teacher = teacher
        if teacher is not None:
            dtype = _resolve_dtype(teacher_dtype)
            if dtype is not None:
                teacher.to(dtype)
            # Flags follow the LightningModule (see the module docstring); teacher_forward runs it in eval mode.
            teacher.requires_grad_(False).train()
        self.loss = loss if loss is not None else DistillationLoss()
        if not isinstance(self.loss, DistillationLoss):
            raise ValueError(f"`loss` must be a DistillationLoss (or a preset such as ForwardKLLoss), got "
                             f"{type(loss).__name__}. Use loss=DistillationLoss(kind='forward_kl', temperature=2.0).")
        if isinstance(intermediate, nn.Module):
            intermediate = [intermediate]
        self.intermediate = nn.ModuleList(intermediate or [])
        self.alpha = float(alpha)
        self.intermediate_weight = float(intermediate_weight)
        _check_loss_masking(self.loss, shift_labels, ignore_index)
        auto_shift = self.loss.shift_labels or _is_causal_lm(student)
        self.shift_labels = auto_shift if shift_labels is None else bool(shift_labels)
        self.ignore_index = ignore_index
        self.lr, self.weight_decay = float(lr), float(weight_decay)

    # ------------------------------------------------------------------ hooks meant to be overridden
    def batch_to_inputs(self, batch: Any) -> dict[str, Any]:
        """Keyword inputs for student and teacher: the dict batch minus ``labels`` and offline teacher keys."""
        if isinstance(batch, Mapping):
            return {k: v for k, v in batch.items() if k not in _NOT_INPUTS}
        raise TypeError(f"the default `batch_to_inputs` takes dict batches, got {type(batch).__name__}. Subclass "
                        f"DistillationModule and override batch_to_inputs(batch) -> dict of model keyword inputs.")

    def task_loss(self, student_output: Any, batch: Any) -> Tensor:
        """The student's own loss: cross-entropy on ``batch["labels"]`` (shifted for causal LMs, -100 masked)."""
        labels = batch.get("labels") if isinstance(batch, Mapping) else None
        if labels is None:
            raise ValueError("the default `task_loss` needs batch['labels']; pass alpha=1.0 for pure distillation "
                             "or override task_loss(student_output, batch).")
        return task_cross_entropy(self.logits(student_output), labels, self.ignore_index, self.shift_labels)

    def logits(self, output: Any) -> Tensor:
        """``(..., vocab)`` logits from a model output."""
        return output_logits(output)

    def trainable_parameters(self) -> list[nn.Parameter]:
        """Parameters that receive gradients: the student's and the intermediate projections, never the teacher's."""
        return [p for n, p in self.named_parameters() if p.requires_grad and not n.startswith("teacher.")]

    @override
    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.AdamW(self.trainable_parameters(), lr=self.lr, weight_decay=self.weight_decay)

    # ------------------------------------------------------------------ mechanics
    @property
    def ddp_find_unused_parameters(self) -> bool:
        """True when a trainable parameter can get no gradient in ``training_step``: intermediate projections
        without a live teacher (offline distillation). ``ddp_strategy`` reads it; a frozen teacher never needs it,
        because DDP ignores parameters with ``requires_grad=False``."""
        intermediate = getattr(self, "intermediate", None)
        if not isinstance(intermediate, nn.Module) or self.teacher is not None:
            return False
        return any(p.requires_grad for p in intermediate.parameters())

    @property
    def compression_target(self) -> nn.Module:
        """The module compression callbacks (pruning, QAT, latency) should act on: the student."""
        return self.student

    @override
    def forward(self, *args: Any, **kwargs: Any) -> Any:
        return self.student(*args, **kwargs)

    def teacher_forward(self, inputs: Mapping[str, Any], **extra: Any) -> Any:
        """Run the teacher on ``inputs`` frozen: no autograd graph, eval mode for the call only."""
        if self.teacher is None:
            raise RuntimeError("this DistillationModule has no teacher (offline mode).")
        with torch.no_grad(), eval_mode(self.teacher):
            return self.teacher(**inputs, **extra)

    def _extra_outputs(self) -> dict[str, bool]:
        needs = {getattr(m, "needs", None) for m in self.intermediate}
        return {f"output_{n}": True for n in ("hidden_states", "attentions") if n in needs}

    def compute_losses(self, batch: Any) -> dict[str, Tensor]:
        """All loss terms for one batch: ``loss`` (weighted total), ``kd_loss``, ``task_loss``, ``intermediate_loss``."""
        inputs = self.batch_to_inputs(batch)
        extra = self._extra_outputs()
        s_out = self.student(**inputs, **extra)
        s_logits = self.logits(s_out)
        zero = s_logits.new_zeros((), dtype=torch.float32)
        out: dict[str, Tensor] = {}
        out["task_loss"] = self.task_loss(s_out, batch) if self.alpha < 1.0 else zero
        labels = batch.get("labels") if isinstance(batch, Mapping) else None
        attn = inputs.get("attention_mask") if s_logits.dim() == 3 else None
        has_topk = isinstance(batch, Mapping) and TOPK_VALUES in batch
        if self.teacher is not None:
            t_out = self.teacher_forward(inputs, **extra)
            if self.alpha > 0:
                t_logits = self.logits(t_out)
                _check_same_classes(s_logits, t_logits, self.student, self.teacher)
                s_flat, keep = token_mask(s_logits, labels, attn, self.ignore_index, self.shift_labels)
                t_flat, _ = token_mask(t_logits, None, None, self.ignore_index, self.shift_labels)
            out["kd_loss"] = self.loss.flat_loss(s_flat, t_flat, keep) if self.alpha > 0 else zero
            if len(self.intermediate):
                out["intermediate_loss"] = self._intermediate(s_out, t_out, inputs.get("attention_mask"))
        elif has_topk:
            s_flat, keep = token_mask(s_logits, labels, attn, self.ignore_index, self.shift_labels)
            values, _ = token_mask(batch[TOPK_VALUES], None, None, self.ignore_index, self.shift_labels)
            indices, _ = token_mask(batch[TOPK_INDICES], None, None, self.ignore_index, self.shift_labels)
            out["kd_loss"] = self.loss.flat_topk_loss(s_flat, values, indices, keep) if self.alpha > 0 else zero
        elif self.alpha > 0:
            raise ValueError(f"no teacher and no `{TOPK_VALUES}` in the batch: pass a teacher, or wrap the dataset "
                             f"with TopKLogitsDataset (offline distillation), or use alpha=0.")
        else:
            out["kd_loss"] = zero
        total = self.alpha * out["kd_loss"] + (1.0 - self.alpha) * out["task_loss"]
        if "intermediate_loss" in out:
            total = total + self.intermediate_weight * out["intermediate_loss"]
        out["loss"] = total
        return out

    def _intermediate(self, s_out: Any, t_out: Any, mask: Tensor | None) -> Tensor:
        terms = []
        for m in self.intermediate:
            s_states, t_states = getattr(s_out, m.needs, None), getattr(t_out, m.needs, None)
            if s_states is None or t_states is None:
                raise ValueError(f"{type(m).__name__} needs `{m.needs}` from both models; they returned None. "
                                 f"Use Hugging Face models (called with output_{m.needs}=True) or override "
                                 f"compute_losses.")
            terms.append(m(s_states, t_states, mask))
        return torch.stack(terms).sum()

    def _log_terms(self, prefix: str, terms: dict[str, Tensor], batch_size: int | None) -> None:
        self.log_dict({f"{prefix}_{k}": v.detach() for k, v in terms.items()}, batch_size=batch_size,
                      prog_bar=False, sync_dist=prefix == "val")

    @override
    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        terms = self.compute_losses(batch)
        self._log_terms("train", terms, _batch_size(batch))
        return terms["loss"]

    @override
    def validation_step(self, batch: Any, batch_idx: int) -> None:
        self._log_terms("val", self.compute_losses(batch), _batch_size(batch))

    # ------------------------------------------------------------------ checkpoints without the teacher
    @override
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        state = checkpoint.get("state_dict")
        if state is not None:
            for key in [k for k in state if k.startswith("teacher.")]:
                del state[key]

    @override
    def load_state_dict(self, state_dict: Mapping[str, Any], strict: bool = True, assign: bool = False) -> Any:
        """Load a (teacher-less) checkpoint: missing ``teacher.*`` keys are taken from the live teacher."""
        state = {k: v for k, v in state_dict.items() if self.teacher is not None or not k.startswith("teacher.")}
        if self.teacher is not None:
            for k, v in self.teacher.state_dict().items():
                state.setdefault(f"teacher.{k}", v)
        _reshape_pruned_student(self.student, state)
        return super().load_state_dict(state, strict=strict, assign=assign)


def _check_loss_masking(loss: DistillationLoss, shift_labels: bool | None, ignore_index: int) -> None:
    """The module masks for its loss: a loss configured otherwise would be silently overruled, so refuse it."""
    if shift_labels is False and loss.shift_labels:
        raise ValueError("`shift_labels`=False contradicts the loss's shift_labels=True. The module applies the causal "
                         "shift for its loss: pass shift_labels=True (or leave it None) or build the loss without it.")
    if loss.ignore_index != ignore_index:
        raise ValueError(f"`ignore_index`={ignore_index} differs from the loss's ignore_index={loss.ignore_index}. The "
                         f"module masks for its loss: pass ignore_index={loss.ignore_index} to DistillationModule.")


def _check_same_classes(s_logits: Tensor, t_logits: Tensor, student: nn.Module, teacher: nn.Module) -> None:
    """A logit loss needs one vocabulary / label set: say so at the first batch, naming both models and the fix."""
    n_s, n_t = s_logits.shape[-1], t_logits.shape[-1]
    if n_s == n_t:
        return
    what = "classes" if s_logits.dim() == 2 else "vocabulary entries"
    raise ValueError(
        f"`student` ({type(student).__name__}) returns {n_s} {what} per position but `teacher` "
        f"({type(teacher).__name__}) returns {n_t}: a logit distillation loss compares the two distributions "
        f"entry by entry, so both need the same vocabulary / label set. Build the student from the teacher "
        f"(student_from_teacher_layers / student_from_pruned_teacher), or with num_labels={n_t} (classifiers) or the "
        f"teacher's tokenizer and vocab_size={n_t} (LMs); or distil hidden states only: alpha=0 with "
        f"intermediate=[HiddenStateLoss(...)]."
    )


def _reshape_pruned_student(student: nn.Module, state: Mapping[str, Any]) -> None:
    """Shrink the student's heads/MLP widths to a structurally pruned state dict's shapes before loading it.

    ``ddp_spawn`` returns the workers' pruned weights into the main process's full-size module, where no
    ``MagnitudePruning`` hook runs; without this the final load fails on size mismatches. No-op when shapes match.
    """
    own = student.state_dict()
    if all(getattr(state.get(f"student.{k}", v), "shape", None) == getattr(v, "shape", None) for k, v in own.items()):
        return
    from lightning_latency.pruning import reshape_to_state_dict  # only for pruned states: imports torch-pruning

    reshape_to_state_dict(student, dict(state), "student.")


def _batch_size(batch: Any) -> int | None:
    if isinstance(batch, Mapping):
        for v in batch.values():
            if isinstance(v, Tensor) and v.dim() > 0:
                return int(v.shape[0])
    return None


def _follow_caller() -> None:
    """Follow the Lightning package of the first caller outside this package (a direct ``HFDistillationModule(...)``)."""
    frame = sys._getframe(1)
    while frame is not None and str(frame.f_globals.get("__name__", "")).startswith("lightning_latency."):
        frame = frame.f_back
    if frame is not None:
        follow_lightning_package(DistillationModule, frame.f_globals, f"module {frame.f_globals.get('__name__')!r}")


__all__ = ["DistillationModule", "TOPK_INDICES", "TOPK_VALUES", "eval_mode", "output_logits"]
