"""DistillationModule in real tiny Trainer runs (lightning_latency/distillation/module.py)."""

from __future__ import annotations

import math
import warnings
from pathlib import Path
from typing import Any

import pytest
import torch
from helpers import LMDataset, RankStateDump, TokenDataset, read_csv_metrics, tiny_bert, tiny_llama, trainer_kwargs
from torch import nn
from torch.utils.data import DataLoader

from lightning_latency._compat import CallbackBase, Trainer
from lightning_latency.distillation import (
    DistillationLoss,
    ForwardKLLoss,
    HiddenStateLoss,
    JSDLoss,
    LogitMSELoss,
    ReverseKLLoss,
    student_from_teacher_layers,
)
from lightning_latency.distillation.module import DistillationModule


def _bert_pair(dropout: float = 0.0) -> tuple[nn.Module, nn.Module]:
    teacher = tiny_bert(layers=2)
    teacher.config.hidden_dropout_prob = dropout
    for m in teacher.modules():
        if isinstance(m, nn.Dropout):
            m.p = dropout
    return student_from_teacher_layers(teacher, [0]), teacher


def _loader(kind: str = "bert", n: int = 16, batch_size: int = 4, seed: int = 0) -> DataLoader:
    ds = TokenDataset(n, 12, seed) if kind == "bert" else LMDataset(n, 12, seed)
    return DataLoader(ds, batch_size=batch_size, shuffle=False)


def _clone_state(m: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in m.state_dict().items()}


def test_gradients_reach_only_the_student_and_the_teacher_is_not_in_the_optimizer(tmp_path: Path) -> None:
    student, teacher = _bert_pair()
    module = DistillationModule(student, teacher, alpha=0.7, lr=1e-2)
    t0, s0 = _clone_state(teacher), _clone_state(student)
    trainer = Trainer(**trainer_kwargs(tmp_path, max_steps=3, log_every_n_steps=1))
    trainer.fit(module, _loader())
    assert all(torch.equal(t0[k], v) for k, v in teacher.state_dict().items())
    assert all(p.grad is None and not p.requires_grad for p in teacher.parameters())
    assert any(not torch.equal(s0[k], v) for k, v in student.state_dict().items())
    opt_params = {id(p) for g in trainer.optimizers[0].param_groups for p in g["params"]}
    assert opt_params == {id(p) for p in student.parameters()}
    rows = read_csv_metrics(trainer)
    logged = {k for r in rows for k, v in r.items() if v}
    assert {"train_loss", "train_kd_loss", "train_task_loss"} <= logged
    r = next(r for r in rows if r.get("train_loss"))
    total = 0.7 * float(r["train_kd_loss"]) + 0.3 * float(r["train_task_loss"])
    assert float(r["train_loss"]) == pytest.approx(total, rel=1e-4)


def test_teacher_runs_in_eval_mode_without_lightnings_eval_mode_warning(tmp_path: Path) -> None:
    student, teacher = _bert_pair(dropout=0.5)
    student.eval()  # as from_pretrained returns it: the module must put the student in train mode
    seen: list[bool] = []
    teacher.register_forward_hook(lambda mod, args, out: seen.append(any(m.training for m in mod.modules())))
    module = DistillationModule(student, teacher)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        Trainer(**trainer_kwargs(tmp_path, max_steps=2, limit_val_batches=1, val_check_interval=1)).fit(
            module, _loader(), _loader(seed=1))
    assert not [w for w in caught if "eval mode" in str(w.message)], [str(w.message) for w in caught]
    assert seen and not any(seen)  # every teacher call ran with every submodule in eval mode
    batch = next(iter(_loader()))
    a = module.teacher_forward(module.batch_to_inputs(batch)).logits
    b = module.teacher_forward(module.batch_to_inputs(batch)).logits
    torch.testing.assert_close(a, b)  # dropout 0.5 is off: deterministic
    assert not a.requires_grad


def test_checkpoint_has_no_teacher_and_reloads(tmp_path: Path) -> None:
    student, teacher = _bert_pair()
    module = DistillationModule(student, teacher, lr=1e-2)
    trainer = Trainer(**trainer_kwargs(tmp_path, max_steps=2))
    trainer.fit(module, _loader())
    path = tmp_path / "kd.ckpt"
    trainer.save_checkpoint(path)
    state = torch.load(path, weights_only=False)["state_dict"]
    assert state and not [k for k in state if k.startswith("teacher.")]
    assert any(k.startswith("student.") for k in state)
    fresh_student, fresh_teacher = _bert_pair()
    reloaded = DistillationModule.load_from_checkpoint(path, student=fresh_student, teacher=fresh_teacher)
    for k, v in student.state_dict().items():
        torch.testing.assert_close(fresh_student.state_dict()[k], v)
    assert reloaded.teacher is fresh_teacher
    # strict plain-PyTorch loading works too
    other = DistillationModule(*_bert_pair())
    other.load_state_dict(state)


def test_resume_from_a_mid_run_checkpoint_matches_an_uninterrupted_run(tmp_path: Path) -> None:
    # Checkpoint at an epoch boundary: a plain DataLoader restarts its epoch on resume, so mid-epoch resumes
    # replay batches (Lightning 2.6 behaviour, unrelated to distillation).
    straight = DistillationModule(*_bert_pair(), lr=1e-2)
    Trainer(**trainer_kwargs(tmp_path / "a", max_steps=-1, max_epochs=2)).fit(straight, _loader(n=8))

    first = DistillationModule(*_bert_pair(), lr=1e-2)
    trainer = Trainer(**trainer_kwargs(tmp_path / "b", max_steps=-1, max_epochs=1))
    trainer.fit(first, _loader(n=8))
    ckpt = tmp_path / "mid.ckpt"
    trainer.save_checkpoint(ckpt)
    resumed = DistillationModule(*_bert_pair(), lr=1e-2)
    Trainer(**trainer_kwargs(tmp_path / "c", max_steps=-1, max_epochs=2)).fit(resumed, _loader(n=8), ckpt_path=ckpt)
    assert resumed.trainer.global_step == straight.trainer.global_step == 4
    for k, v in straight.student.state_dict().items():
        torch.testing.assert_close(resumed.student.state_dict()[k], v, rtol=1e-5, atol=1e-6)


class TupleBatchDistillation(DistillationModule):
    """A subclass for ``(ids, labels)`` tuple batches and a plain-tensor student interface."""

    def batch_to_inputs(self, batch: Any) -> dict[str, Any]:
        ids, _ = batch
        return {"input_ids": ids}

    def task_loss(self, student_output: Any, batch: Any) -> torch.Tensor:
        return nn.functional.cross_entropy(self.logits(student_output), batch[1], label_smoothing=0.1)


class _TupleData(torch.utils.data.Dataset):
    def __init__(self) -> None:
        self.base = TokenDataset(16, 12, 0)

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        item = self.base[i]
        return item["input_ids"], item["labels"]


def test_subclass_changes_batch_mapping_and_task_loss(tmp_path: Path) -> None:
    student, teacher = _bert_pair()
    with pytest.raises(TypeError, match="override batch_to_inputs"):
        DistillationModule(student, teacher).batch_to_inputs((torch.zeros(1), torch.zeros(1)))
    module = TupleBatchDistillation(student, teacher, lr=1e-2)
    trainer = Trainer(**trainer_kwargs(tmp_path, max_steps=3, log_every_n_steps=1))
    trainer.fit(module, DataLoader(_TupleData(), batch_size=4))
    losses = [float(r["train_task_loss"]) for r in read_csv_metrics(trainer) if r.get("train_task_loss")]
    assert losses and all(torch.isfinite(torch.tensor(losses)))


def test_causal_lm_defaults_shift_and_mask_padding(tmp_path: Path) -> None:
    teacher = tiny_llama(layers=2)
    student = student_from_teacher_layers(teacher, [1])
    module = DistillationModule(student, teacher, loss=DistillationLoss(temperature=2.0, chunk_size=8), lr=1e-2)
    assert module.shift_labels  # LlamaForCausalLM detected
    batch = next(iter(_loader("llama")))
    batch["labels"][:, 8:] = -100  # padding
    batch["attention_mask"][:, 8:] = 0
    out = module.compute_losses(batch)
    ref = DistillationLoss(temperature=2.0, shift_labels=True)(
        student(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits,
        teacher(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits, batch["labels"])
    torch.testing.assert_close(out["kd_loss"], ref, rtol=1e-5, atol=1e-6)
    ref_task = student(**batch).loss  # Hugging Face's own shifted, -100-masked cross-entropy
    torch.testing.assert_close(out["task_loss"], ref_task, rtol=1e-5, atol=1e-6)
    batch["labels"][:] = -100
    assert module.compute_losses(batch)["loss"].item() == 0.0  # all masked: zero, not NaN
    Trainer(**trainer_kwargs(tmp_path, max_steps=2)).fit(module, _loader("llama"))


def test_hidden_state_matching_with_projection_trains_the_projection(tmp_path: Path) -> None:
    teacher = tiny_bert(layers=2, hidden=64)
    student = tiny_bert(layers=1, hidden=32, heads=2, intermediate=64)
    hidden = HiddenStateLoss(student_dim=32, teacher_dim=64, layer_map=[(1, 2)], kind="cosine")
    module = DistillationModule(student, teacher, intermediate=hidden, intermediate_weight=0.5, lr=1e-2)
    w0 = hidden.projections[0].weight.detach().clone()
    trainer = Trainer(**trainer_kwargs(tmp_path, max_steps=2, log_every_n_steps=1))
    trainer.fit(module, _loader())
    opt_params = {id(p) for g in trainer.optimizers[0].param_groups for p in g["params"]}
    assert id(hidden.projections[0].weight) in opt_params
    assert not torch.equal(w0, hidden.projections[0].weight)
    assert any(r.get("train_intermediate_loss") for r in read_csv_metrics(trainer))


def test_bf16_teacher_and_pure_distillation_without_labels() -> None:
    student, teacher = _bert_pair()
    module = DistillationModule(student, teacher, alpha=1.0, teacher_dtype="bfloat16")
    assert all(p.dtype == torch.bfloat16 for p in module.teacher.parameters())
    batch = next(iter(_loader()))
    batch.pop("labels")
    out = module.compute_losses(batch)
    assert torch.isfinite(out["loss"]) and out["loss"].dtype == torch.float32 and out["loss"] > 0
    assert module.compression_target is module.student is student


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"alpha": 1.5}, r"`alpha` must be in \[0, 1\], got 1.5"),
        ({"alpha": -0.1}, r"`alpha` must be in \[0, 1\], got -0.1"),
        ({"lr": 0.0}, "`lr` must be > 0, got 0.0"),
        ({"teacher_dtype": "int8"}, "`teacher_dtype` must be one of"),
        ({"intermediate_weight": -1.0}, "`intermediate_weight` must be >= 0"),
        ({"loss": nn.MSELoss()}, "`loss` must be a DistillationLoss"),
        ({"loss": DistillationLoss(shift_labels=True), "shift_labels": False}, "`shift_labels`=False contradicts"),
        ({"loss": DistillationLoss(ignore_index=0)}, r"`ignore_index`=-100 differs from the loss's ignore_index=0"),
    ],
)
def test_misconfiguration(kwargs: dict, match: str) -> None:
    student, teacher = _bert_pair()
    with pytest.raises(ValueError, match=match):
        DistillationModule(student, teacher, **kwargs)


def test_same_object_and_vocabulary_mismatch_are_clear_errors() -> None:
    student, teacher = _bert_pair()
    with pytest.raises(ValueError, match="the same object"):
        DistillationModule(teacher, teacher)
    module = DistillationModule(tiny_bert(num_labels=3), teacher)
    with pytest.raises(ValueError, match="vocabulary"):
        module.compute_losses(next(iter(_loader())))


class _RecordReducedParams(CallbackBase):
    """Records, while DDP wraps the module, which parameters DDP's gradient reducer all-reduces."""

    def on_train_start(self, trainer: Any, pl_module: Any) -> None:
        params = trainer.strategy.model._build_params_for_reducer()[0]
        teacher_ids = {id(p) for p in pl_module.teacher.parameters()}
        pl_module.reduced = (len(params), sum(id(p) in teacher_ids for p in params))


def _ddp_dump(module: DistillationModule) -> dict[str, Any]:
    return {
        "student": {k: v.detach().clone() for k, v in module.student.state_dict().items()},
        "teacher": {k: v.detach().clone() for k, v in module.teacher.state_dict().items()},
        "reduced": module.reduced,
    }


@pytest.mark.ddp
def test_ddp_spawn_two_processes_sync_the_student_and_skip_the_teacher(tmp_path: Path) -> None:
    student, teacher = _bert_pair()
    t0, s0 = _clone_state(teacher), _clone_state(student)
    module = DistillationModule(student, teacher, lr=1e-2)
    trainer = Trainer(**trainer_kwargs(tmp_path, max_steps=2, strategy="ddp_spawn", devices=2,
                                       callbacks=[_RecordReducedParams(), RankStateDump(tmp_path, _ddp_dump)]))
    trainer.fit(module, _loader(n=16))
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in (0, 1))
    assert r0["reduced"] == r1["reduced"] == (len(list(student.parameters())), 0)  # no teacher parameter synced
    for k in r0["student"]:
        torch.testing.assert_close(r0["student"][k], r1["student"][k])
    for k, v in t0.items():
        assert torch.equal(r0["teacher"][k], v) and torch.equal(r1["teacher"][k], v)
    assert any(not torch.equal(r0["student"][k], v) for k, v in s0.items())  # the student did train


def test_latency_monitor_measures_the_student_not_the_teacher(tmp_path: Path) -> None:
    from lightning_latency import LatencyMonitor

    student, teacher = _bert_pair()
    mon = LatencyMonitor(model_attr="student", warmup=1, min_runs=2, max_time_s=0.2, report_file=None,
                         generation=False)
    trainer = Trainer(**trainer_kwargs(tmp_path, max_steps=2, callbacks=[mon], limit_val_batches=1))
    trainer.fit(DistillationModule(student, teacher), _loader(), _loader(seed=1))
    assert mon.records
    assert {r["forward"]["num_params"] for r in mon.records} == {sum(p.numel() for p in student.parameters())}


def test_magnitude_pruning_in_the_same_trainer_prunes_only_the_student(tmp_path: Path) -> None:
    from lightning_latency import MagnitudePruning

    student, teacher = _bert_pair()
    t0 = _clone_state(teacher)
    pruning = MagnitudePruning(mode="unstructured", final_sparsity=0.5, start_step=0, end_step=2, every_n_steps=1,
                               exclude=[r"^teacher\."], log_per_layer=False)
    Trainer(**trainer_kwargs(tmp_path, max_steps=3, callbacks=[pruning])).fit(DistillationModule(student, teacher),
                                                                             _loader())
    linears = [m.weight for m in student.modules() if isinstance(m, nn.Linear)]
    zeros = sum(int((w == 0).sum()) for w in linears) / sum(w.numel() for w in linears)
    assert zeros > 0.3  # the student was pruned
    assert all(torch.equal(t0[k], v) for k, v in teacher.state_dict().items())  # the teacher was not


@pytest.mark.parametrize("preset", [ForwardKLLoss, ReverseKLLoss, JSDLoss, LogitMSELoss])
def test_every_loss_preset_trains_in_a_distillation_module(tmp_path: Path, preset: type) -> None:
    student, teacher = _bert_pair()
    s0 = _clone_state(student)
    loss = preset(temperature=2.0)
    module = DistillationModule(student, teacher, loss=loss, alpha=1.0, lr=1e-2)
    assert module.loss is loss
    trainer = Trainer(**trainer_kwargs(tmp_path, max_steps=2, log_every_n_steps=1))
    trainer.fit(module, _loader())
    kd = [float(r["train_kd_loss"]) for r in read_csv_metrics(trainer) if r.get("train_kd_loss")]
    assert kd and all(math.isfinite(v) and v > -1e-6 for v in kd)  # divergences: >= 0 up to fp32 rounding
    assert any(not torch.equal(s0[k], v) for k, v in student.state_dict().items())
    batch = next(iter(_loader()))
    with torch.no_grad():  # the logged term is the preset's own value on the batch
        expected = loss(student(input_ids=batch["input_ids"]).logits, teacher(input_ids=batch["input_ids"]).logits)
        torch.testing.assert_close(module.compute_losses(batch)["kd_loss"], expected, rtol=1e-5, atol=1e-6)


def test_a_label_count_mismatch_fails_at_the_first_batch_naming_both_models_and_the_fix(tmp_path: Path) -> None:
    _, teacher = _bert_pair()
    module = DistillationModule(tiny_bert(num_labels=3, layers=1), teacher)
    trainer = Trainer(**trainer_kwargs(tmp_path, max_steps=2))
    with pytest.raises(ValueError, match=r"`student` \(BertForSequenceClassification\) returns 3 classes per position "
                                         r"but `teacher` \(BertForSequenceClassification\) returns 2.*num_labels=2"):
        trainer.fit(module, _loader())
    assert trainer.global_step == 0


def test_a_vocabulary_mismatch_of_causal_lms_names_vocab_size(tmp_path: Path) -> None:
    from transformers import LlamaConfig, LlamaForCausalLM

    teacher = tiny_llama(layers=1)
    student = LlamaForCausalLM(LlamaConfig(vocab_size=200, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                                           num_key_value_heads=1, intermediate_size=64))
    module = DistillationModule(student, teacher)
    batch = next(iter(_loader("llama")))
    with pytest.raises(ValueError, match=r"returns 200 vocabulary entries.*returns 128.*vocab_size=128"):
        module.compute_losses(batch)
    # the fix the message offers works: hidden states only (a learned projection maps width 32 to 64)
    hidden_only = DistillationModule(student, teacher, alpha=0.0, intermediate=[HiddenStateLoss(32, 64, [(1, 1)])])
    assert hidden_only.compute_losses(batch)["intermediate_loss"] > 0


def test_an_out_of_range_layer_map_fails_at_the_first_batch(tmp_path: Path) -> None:
    student, teacher = _bert_pair()  # student: 1 layer -> 2 hidden states; teacher: 2 layers -> 3
    module = DistillationModule(student, teacher, intermediate=[HiddenStateLoss(64, 64, [(2, 2)])])
    trainer = Trainer(**trainer_kwargs(tmp_path, max_steps=2))
    with pytest.raises(ValueError, match=r"`layer_map` pair \(2, 2\) is out of range: the student returns 2 hidden "
                                         r"states and the teacher 3.*even_layer_map\(1, 2\)"):
        trainer.fit(module, _loader())
    assert trainer.global_step == 0


def test_a_loss_built_with_shift_labels_turns_the_modules_shift_on() -> None:
    teacher = tiny_llama(layers=2)
    module = DistillationModule(nn.Sequential(teacher), teacher=tiny_llama(layers=1),
                                loss=DistillationLoss(shift_labels=True))
    assert module.shift_labels  # a student the auto rule does not recognise, shifted because its loss says so
