"""FSDP auto-wrap policy keeping teacher and student in separate units (lightning_latency/distillation/fsdp.py)."""

from __future__ import annotations

import pickle
from pathlib import Path

import pytest
import torch
from helpers import LMDataset, tiny_llama, trainer_kwargs
from torch import nn
from torch.distributed.fsdp.wrap import _recursive_wrap
from torch.utils.data import DataLoader
from transformers.models.llama.modeling_llama import LlamaDecoderLayer

from lightning_latency.distillation import HiddenStateLoss, distillation_auto_wrap_policy, student_from_teacher_layers
from lightning_latency.distillation.module import DistillationModule


class _Unit(nn.Module):
    """Stands in for an FSDP unit: records what the policy wraps."""

    def __init__(self, module: nn.Module, **_: object) -> None:
        super().__init__()
        self.inner = module


def _own_params(unit: nn.Module) -> list[nn.Parameter]:
    """Parameters a unit would flatten: its own, minus those of nested units."""
    nested = {id(p) for m in unit.inner.modules() if isinstance(m, _Unit) for p in m.parameters()}
    return [p for p in unit.inner.parameters() if id(p) not in nested]


def _module() -> DistillationModule:
    teacher = tiny_llama(layers=2)
    student = student_from_teacher_layers(teacher, [1])
    return DistillationModule(student, teacher, intermediate=HiddenStateLoss(64, 64, [(1, 2)]))


def test_policy_wraps_teacher_student_and_blocks_without_mixing_frozen_and_trainable() -> None:
    module = _module()
    policy = distillation_auto_wrap_policy({LlamaDecoderLayer})
    pickle.dumps(policy)  # usable with spawn launchers
    _recursive_wrap(module, auto_wrap_policy=policy, wrapper_cls=_Unit, ignored_modules=set(), ignored_params=set(),
                    only_wrap_children=True)
    assert isinstance(module.teacher, _Unit) and isinstance(module.student, _Unit)
    units = [m for m in module.modules() if isinstance(m, _Unit)]
    assert sum(isinstance(u.inner, LlamaDecoderLayer) for u in units) == 3  # 2 teacher + 1 student blocks
    for unit in units:
        flags = {p.requires_grad for p in _own_params(unit)}
        assert len(flags) <= 1, f"a unit mixes frozen and trainable parameters: {type(unit.inner).__name__}"
    # without block classes: exactly the two models
    module2 = _module()
    _recursive_wrap(module2, auto_wrap_policy=distillation_auto_wrap_policy(), wrapper_cls=_Unit,
                    ignored_modules=set(), ignored_params=set(), only_wrap_children=True)
    assert sum(isinstance(m, _Unit) for m in module2.modules()) == 2


@pytest.mark.gpu
def test_fsdp_fit_on_gpu_keeps_the_teacher_frozen(tmp_path: Path) -> None:
    from lightning_latency._compat import Trainer, pl

    module = _module()
    t0 = {k: v.clone() for k, v in module.teacher.state_dict().items()}
    strategy = pl.strategies.FSDPStrategy(auto_wrap_policy=distillation_auto_wrap_policy({LlamaDecoderLayer}),
                                          use_orig_params=False)
    trainer = Trainer(**trainer_kwargs(tmp_path, accelerator="gpu", devices=1, strategy=strategy, max_steps=2))
    trainer.fit(module, DataLoader(LMDataset(8, 12, 0), batch_size=4))
    assert torch.isfinite(torch.tensor(trainer.callback_metrics.get("train_loss", 0.0)))
    with torch.no_grad():
        for k, v in module.teacher.state_dict().items():
            if k in t0 and v.shape == t0[k].shape:
                torch.testing.assert_close(v.cpu(), t0[k].cpu())
