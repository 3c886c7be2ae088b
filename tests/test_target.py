"""Which module the compression callbacks act on (lightning_latency/_target.py), with a DistillationModule."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from helpers import HFModule, TokenDataset, tiny_bert, trainer_kwargs
from torch import nn
from torch.utils.data import DataLoader

from lightning_latency import LatencyMonitor, MagnitudePruning, QuantizationAwareTraining
from lightning_latency._compat import MisconfigurationException, Trainer
from lightning_latency._target import check_model_attr, resolve_target, target_prefix
from lightning_latency.distillation import student_from_teacher_layers
from lightning_latency.distillation.module import DistillationModule
from lightning_latency.quantization.qat import is_prepared


def _distill() -> DistillationModule:
    teacher = tiny_bert(layers=2)
    return DistillationModule(student_from_teacher_layers(teacher, [0]), teacher, lr=1e-2)


def _loader() -> DataLoader:
    return DataLoader(TokenDataset(16, 12, 0), batch_size=4)


def _state(m: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in m.state_dict().items()}


def test_resolve_target_rule() -> None:
    plain = HFModule(kind="bert")
    assert resolve_target(plain) is plain
    assert resolve_target(plain, "model") is plain.model
    assert resolve_target(plain, "model.bert") is plain.model.bert
    distill = _distill()
    assert resolve_target(distill) is distill.student  # compression_target
    assert resolve_target(distill, "teacher") is distill.teacher  # an explicit attribute wins
    assert target_prefix(distill, distill.student) == "student." and target_prefix(plain, plain) == ""
    with pytest.raises(MisconfigurationException, match=r"`model_attr='student'`: HFModule has no attribute"):
        resolve_target(plain, "student")
    with pytest.raises(MisconfigurationException, match="not an nn.Module"):
        resolve_target(plain, "lr")


@pytest.mark.parametrize("bad", ["", "  ", 3])
def test_model_attr_validated_by_every_callback(bad: object) -> None:
    with pytest.raises(ValueError, match="`model_attr` must be None or an attribute name"):
        check_model_attr(bad)
    for cls in (LatencyMonitor, MagnitudePruning, QuantizationAwareTraining):
        with pytest.raises(ValueError, match="`model_attr` must be None or an attribute name"):
            cls(model_attr=bad)


def test_pruning_and_qat_act_on_the_student_only_without_extra_arguments(tmp_path: Path) -> None:
    module = _distill()
    t0 = _state(module.teacher)
    pruning = MagnitudePruning(mode="unstructured", final_sparsity=0.5, start_step=0, end_step=2,
                               log_per_layer=False)
    qat = QuantizationAwareTraining(scheme="int8_dynamic", convert_on_fit_end=False, log_every_n_steps=0)
    mon = LatencyMonitor(warmup=1, min_runs=2, max_time_s=0.1, report_file=None, generation=False)
    trainer = Trainer(**trainer_kwargs(tmp_path, max_steps=3, callbacks=[pruning, qat, mon]))
    trainer.fit(module, _loader())
    # the teacher: same modules, same values, nothing fake-quantized
    assert not is_prepared(module.teacher)
    assert all(type(m) is nn.Linear for m in module.teacher.modules() if isinstance(m, nn.Linear))
    assert all(torch.equal(t0[k], v) for k, v in module.teacher.state_dict().items())
    # the student: pruned and fake-quantized; names are relative to the student
    assert is_prepared(module.student) and qat.quantized and not any(n.startswith("student.") for n in qat.quantized)
    linears = [m.weight for n, m in module.student.named_modules() if n.startswith("bert.encoder") and
               hasattr(m, "weight") and m.weight.dim() == 2]
    zeros = sum(int((w == 0).sum()) for w in linears) / sum(w.numel() for w in linears)
    assert zeros > 0.3
    # the monitor timed the student
    assert {r["forward"]["num_params"] for r in mon.records} == {sum(p.numel() for p in module.student.parameters())}


def test_structured_pruning_of_the_student_resumes_from_a_checkpoint(tmp_path: Path) -> None:
    module = _distill()
    n_teacher = sum(p.numel() for p in module.teacher.parameters())
    pruning = MagnitudePruning(mode="structured", final_sparsity=0.5, start_step=1, end_step=1,
                               log_per_layer=False)
    trainer = Trainer(**trainer_kwargs(tmp_path, max_steps=2, callbacks=[pruning]))
    trainer.fit(module, _loader())
    heads = module.student.bert.encoder.layer[0].attention.self.num_attention_heads
    assert heads == 2 and module.teacher.bert.encoder.layer[0].attention.self.num_attention_heads == 4
    assert sum(p.numel() for p in module.teacher.parameters()) == n_teacher
    ckpt = tmp_path / "pruned.ckpt"
    trainer.save_checkpoint(ckpt)
    fresh = _distill()
    again = MagnitudePruning(mode="structured", final_sparsity=0.5, start_step=1, end_step=1,
                               log_per_layer=False)
    Trainer(**trainer_kwargs(tmp_path, max_steps=3, callbacks=[again])).fit(fresh, _loader(), ckpt_path=ckpt)
    assert fresh.student.bert.encoder.layer[0].attention.self.num_attention_heads == 2
