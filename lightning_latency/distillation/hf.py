"""``HFDistillationModule``: a :class:`~.DistillationModule` built from paths, for LightningCLI / YAML configs.

A YAML file cannot hold an ``nn.Module``, so this subclass takes what a user can write down: the teacher's
Hugging Face folder, and either the layers to keep for the student or the student's own folder. Every argument is
a plain value, saved as hyper-parameters, so ``HFDistillationModule.load_from_checkpoint(path)`` rebuilds both
models (the teacher from ``teacher_path``, since checkpoints never contain it) and loads the trained student.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Literal

from lightning_latency.distillation.losses import DistillationLoss
from lightning_latency.distillation.module import DistillationModule
from lightning_latency.distillation.students import student_from_teacher_layers


def _local_folder(name: str, path: object) -> str:
    """``path`` as a string if it is an existing local model folder; never a hub id (the project contacts no hub)."""
    if not isinstance(path, (str, os.PathLike)):
        raise TypeError(f"`{name}` must be a local folder path (str or os.PathLike), got {type(path).__name__} "
                        f"{path!r}. Pass the folder written by save_pretrained.")
    folder = Path(path)
    if not folder.is_dir():
        raise ValueError(f"`{name}`={str(path)!r} is not an existing local folder (looked in {folder.resolve()}). "
                         f"Pass the folder written by save_pretrained; hub ids are not downloaded.")
    if not (folder / "config.json").exists():
        raise ValueError(f"`{name}`={str(path)!r} has no config.json: it is not a Hugging Face model folder. "
                         f"Pass the folder written by save_pretrained.")
    return str(folder)


def _load_hf(name: str, path: object, task: str, num_labels: int):
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    folder = _local_folder(name, path)
    if task == "causal_lm":
        return AutoModelForCausalLM.from_pretrained(folder, local_files_only=True)
    return AutoModelForSequenceClassification.from_pretrained(folder, num_labels=num_labels, local_files_only=True)


class HFDistillationModule(DistillationModule):
    """Distil a Hugging Face teacher (a local folder) into a layer-dropped copy or a given student folder.

    Args:
        teacher_path: folder of the (fine-tuned) teacher, loadable with ``from_pretrained``.
        task: ``"sequence_classification"`` or ``"causal_lm"`` (picks the Auto class).
        student_layers: teacher layer indices the student keeps (default: every other layer); ignored when
            ``student_path`` is given.
        student_path: folder of a separately built student with the same vocabulary.
        num_labels: classes of a sequence-classification teacher/student.
        kind, temperature, scale_by_t2, beta, chunk_size: the :class:`~.DistillationLoss` settings.
        alpha, teacher_dtype, lr, weight_decay: as in :class:`~.DistillationModule`.

    Example (``callbacks/distillation.yaml``)::

        model:
          class_path: lightning_latency.distillation.HFDistillationModule
          init_args: {teacher_path: runs/teacher, student_layers: [0, 2, 4], temperature: 2.0, alpha: 0.5}
    """

    def __init__(
        self,
        teacher_path: str,
        task: Literal["sequence_classification", "causal_lm"] = "sequence_classification",
        student_layers: list[int] | None = None,
        student_path: str | None = None,
        num_labels: int = 2,
        kind: Literal["forward_kl", "reverse_kl", "jsd", "mse"] = "forward_kl",
        temperature: float = 1.0,
        scale_by_t2: bool = True,
        beta: float = 0.5,
        chunk_size: int | None = None,
        alpha: float = 0.5,
        teacher_dtype: str | None = None,
        lr: float = 5e-5,
        weight_decay: float = 0.0,
    ) -> None:
        if task not in ("sequence_classification", "causal_lm"):
            raise ValueError(f"`task` must be 'sequence_classification' or 'causal_lm', got {task!r}.")
        teacher = _load_hf("teacher_path", teacher_path, task, num_labels)
        if student_path is not None:
            student = _load_hf("student_path", student_path, task, num_labels)
        else:
            student = student_from_teacher_layers(teacher, student_layers)
        loss = DistillationLoss(kind, temperature=temperature, scale_by_t2=scale_by_t2, beta=beta, chunk_size=chunk_size)
        super().__init__(student, teacher, loss=loss, alpha=alpha, teacher_dtype=teacher_dtype, lr=lr,
                         weight_decay=weight_decay)
        self.save_hyperparameters()


__all__ = ["HFDistillationModule"]
