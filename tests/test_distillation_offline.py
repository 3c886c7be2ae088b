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


def _cached_lm(tmp_path: Path, k: int) -> tuple[torch.nn.Module, TopKLogitsDataset]:
    teacher = tiny_llama(layers=2)
    ds = LMDataset(8, 10, 0)
    cache_teacher_topk(teacher, DataLoader(ds, batch_size=4), tmp_path / f"cache{k}", k=k, progress=False)
    return teacher, TopKLogitsDataset(ds, tmp_path / f"cache{k}")


@pytest.mark.parametrize(("kind", "beta"), [("forward_kl", 0.5), ("jsd", 0.5), ("mse", 0.5), ("jsd", 0.0)])
def test_offline_training_honours_every_kind_that_top_k_logits_support(tmp_path: Path, kind: str, beta: float) -> None:
    teacher, cached = _cached_lm(tmp_path, k=8)
    student = student_from_teacher_layers(teacher, [0])
    s0 = {n: p.detach().clone() for n, p in student.named_parameters()}
    loss = DistillationLoss(kind, temperature=2.0, beta=beta, chunk_size=7)
    module = DistillationModule(student, None, loss=loss, alpha=1.0, lr=1e-2)
    batch = default_collate([cached[i] for i in range(4)])
    values, indices = batch["teacher_topk_values"][:, :-1], batch["teacher_topk_indices"][:, :-1]  # causal shift
    logits = student(input_ids=batch["input_ids"]).logits[:, :-1]
    expected = DistillationLoss(kind, temperature=2.0, beta=beta).topk_loss(logits, values, indices)
    torch.testing.assert_close(module.compute_losses(batch)["kd_loss"], expected, rtol=1e-5, atol=1e-6)
    trainer = Trainer(**trainer_kwargs(tmp_path, max_steps=2, log_every_n_steps=1))
    trainer.fit(module, DataLoader(cached, batch_size=4))
    assert any(r.get("train_kd_loss") for r in read_csv_metrics(trainer))
    assert any(not torch.equal(s0[n], p) for n, p in student.named_parameters())


def test_offline_reduction_sum_is_honoured(tmp_path: Path) -> None:
    teacher, cached = _cached_lm(tmp_path, k=8)
    student = student_from_teacher_layers(teacher, [0])
    batch = default_collate([cached[i] for i in range(4)])
    mean = DistillationModule(student, None, alpha=1.0).compute_losses(batch)["kd_loss"]
    total = DistillationModule(student, None, loss=DistillationLoss(reduction="sum"), alpha=1.0).compute_losses(batch)
    torch.testing.assert_close(total["kd_loss"], mean * 4 * 9)  # 4 sequences x 9 shifted positions, none masked


def test_offline_reverse_kl_from_a_partial_cache_fails_at_the_first_batch(tmp_path: Path) -> None:
    teacher, cached = _cached_lm(tmp_path, k=8)
    module = DistillationModule(student_from_teacher_layers(teacher, [0]), None,
                                loss=DistillationLoss("reverse_kl"), alpha=1.0)
    trainer = Trainer(**trainer_kwargs(tmp_path, max_steps=2))
    with pytest.raises(ValueError, match=r"`kind`='reverse_kl' cannot be computed from the teacher's top-8 logits "
                                         r"\(vocabulary 128\)"):
        trainer.fit(module, DataLoader(cached, batch_size=4))
    assert trainer.global_step == 0


@pytest.mark.parametrize("kind", ["forward_kl", "reverse_kl", "jsd", "mse"])
def test_offline_with_the_whole_vocabulary_equals_the_live_teacher(tmp_path: Path, kind: str) -> None:
    teacher = tiny_bert(layers=2)
    student = student_from_teacher_layers(teacher, [0])
    ds = TokenDataset(8, 10, 0)
    batch = default_collate([ds[i] for i in range(8)])
    with torch.no_grad():  # fp32 top-k of all (2) classes, bypassing the cache's fp16 storage
        values, indices = teacher(input_ids=batch["input_ids"]).logits.topk(2, dim=-1)
    loss = DistillationLoss(kind, temperature=2.0, beta=0.3)
    online = DistillationModule(student, teacher, loss=loss).compute_losses(batch)["kd_loss"]
    offline = DistillationModule(student, None, loss=loss).compute_losses(
        {**batch, "teacher_topk_values": values, "teacher_topk_indices": indices})["kd_loss"]
    torch.testing.assert_close(offline, online, rtol=1e-5, atol=1e-6)  # same fp32 math, ids permuted
    # and reverse KL trains from a full-vocabulary cache
    cache_teacher_topk(teacher, DataLoader(ds, batch_size=4), tmp_path / "full", k=2, progress=False)
    trainer = Trainer(**trainer_kwargs(tmp_path, max_steps=1))
    trainer.fit(DistillationModule(student, None, loss=loss), DataLoader(TopKLogitsDataset(ds, tmp_path / "full"), batch_size=4))
    assert trainer.global_step == 1


def test_an_interrupted_cache_resumes_where_it_stopped_and_equals_an_uninterrupted_one(tmp_path: Path) -> None:
    """A preempted caching run leaves whole shards and no meta.pt; the rerun keeps them and runs the teacher on the
    rest only; the result is the cache an uninterrupted run writes."""
    teacher, ds = tiny_llama(layers=1), LMDataset(10, 8, 0)
    calls = {"n": 0}

    def counting(module: torch.nn.Module, args: tuple, kwargs: dict) -> None:
        calls["n"] += 1

    class Preempted(Exception):
        pass

    def preempted_after(n: int):
        for i, batch in enumerate(DataLoader(ds, batch_size=3)):
            if i == n:
                raise Preempted
            yield batch

    cache_teacher_topk(teacher, DataLoader(ds, batch_size=3), tmp_path / "full", k=8, progress=False)
    with pytest.raises(Preempted):
        cache_teacher_topk(teacher, preempted_after(2), tmp_path / "part", k=8, progress=False)
    assert sorted(p.name for p in (tmp_path / "part").iterdir()) == ["shard_000000.pt", "shard_000001.pt"]
    with pytest.raises(ValueError, match=r"meta.pt missing"):
        TopKLogitsDataset(ds, tmp_path / "part")
    handle = teacher.register_forward_pre_hook(counting, with_kwargs=True)
    cache_teacher_topk(teacher, DataLoader(ds, batch_size=3), tmp_path / "part", k=8, progress=False)
    handle.remove()
    assert calls["n"] == 2  # 4 batches of which 2 were already cached
    assert torch.load(tmp_path / "part" / "meta.pt", weights_only=True)["resumed_shards"] == 2
    full, part = TopKLogitsDataset(ds, tmp_path / "full"), TopKLogitsDataset(ds, tmp_path / "part")
    for i in range(len(ds)):
        assert torch.equal(full[i]["teacher_topk_values"], part[i]["teacher_topk_values"])
        assert torch.equal(full[i]["teacher_topk_indices"], part[i]["teacher_topk_indices"])
    # another k or another batch size is recomputed, not mixed in
    cache_teacher_topk(teacher, DataLoader(ds, batch_size=5), tmp_path / "part", k=8, progress=False)
    assert torch.load(tmp_path / "part" / "meta.pt", weights_only=True)["resumed_shards"] == 0
