"""Offline distillation from cached teacher top-k logits (lightning_latency/distillation/offline.py)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from helpers import LMDataset, TokenDataset, read_csv_metrics, tiny_bert, tiny_llama, trainer_kwargs
from torch.utils.data import DataLoader, default_collate

from lightning_latency._compat import Trainer
from lightning_latency.distillation import DistillationLoss, student_from_teacher_layers
from lightning_latency.distillation.module import DistillationModule
from lightning_latency.distillation.offline import TopKLogitsDataset, cache_teacher_topk


def test_full_vocabulary_cache_gives_the_online_loss_and_trains_without_a_teacher(tmp_path: Path) -> None:
    teacher = tiny_bert(layers=2)
    student = student_from_teacher_layers(teacher, [0])
    ds = TokenDataset(12, 10, 0)
    cache_teacher_topk(teacher, DataLoader(ds, batch_size=5), tmp_path / "cache", k=2, progress=False)
    cached = TopKLogitsDataset(ds, tmp_path / "cache")
    batch = default_collate([cached[i] for i in range(6, 12)])  # crosses a shard boundary
    online = DistillationModule(student, teacher, loss=DistillationLoss(temperature=2.0))
    offline = DistillationModule(student, None, loss=DistillationLoss(temperature=2.0))
    torch.testing.assert_close(offline.compute_losses(batch)["kd_loss"], online.compute_losses(batch)["kd_loss"],
                               rtol=2e-3, atol=1e-5)  # fp16 storage of the teacher logits
    trainer = Trainer(**trainer_kwargs(tmp_path, max_steps=2, log_every_n_steps=1))
    trainer.fit(offline, DataLoader(cached, batch_size=4, shuffle=True))
    assert any(r.get("train_kd_loss") for r in read_csv_metrics(trainer))


def test_top_k_cache_for_a_causal_lm_is_a_divergence_that_vanishes_for_the_teacher(tmp_path: Path) -> None:
    teacher = tiny_llama(layers=2)
    ds = LMDataset(6, 12, 0)
    cache_teacher_topk(teacher, DataLoader(ds, batch_size=4), tmp_path, k=16, progress=False)
    cached = TopKLogitsDataset(ds, tmp_path)
    assert cached[0]["teacher_topk_values"].shape == (12, 16)
    batch = default_collate([cached[i] for i in range(6)])
    # a student equal to the teacher: close to zero (only the mass outside the top-16 remains)
    near = DistillationModule(student_from_teacher_layers(teacher, [0, 1]), None, alpha=1.0)
    far = DistillationModule(student_from_teacher_layers(teacher, [0]), None, alpha=1.0)
    assert near.shift_labels
    kd_near, kd_far = near.compute_losses(batch)["kd_loss"], far.compute_losses(batch)["kd_loss"]
    assert 0 <= kd_near < kd_far


def test_cache_misuse_is_a_clear_error(tmp_path: Path) -> None:
    teacher, ds = tiny_bert(layers=1), TokenDataset(8, 6, 0)
    with pytest.raises(ValueError, match="`loader` shuffles"):
        cache_teacher_topk(teacher, DataLoader(ds, batch_size=4, shuffle=True), tmp_path, progress=False)
    with pytest.raises(ValueError, match="`k` must be a positive int, got 0"):
        cache_teacher_topk(teacher, DataLoader(ds, batch_size=4), tmp_path, k=0)
    with pytest.raises(ValueError, match="holds no teacher cache"):
        TopKLogitsDataset(ds, tmp_path / "missing")
    cache_teacher_topk(teacher, DataLoader(ds, batch_size=4), tmp_path, progress=False)
    with pytest.raises(ValueError, match="has 8 items but the dataset has 5"):
        TopKLogitsDataset(TokenDataset(5, 6, 0), tmp_path)
    with pytest.raises(ValueError, match="no teacher and no `teacher_topk_values`"):
        DistillationModule(tiny_bert(layers=1), None).compute_losses({"input_ids": ds.ids[:2], "labels": ds.labels[:2]})
