"""HFDistillationModule and the LightningCLI recipe (lightning_latency/distillation/hf.py, callbacks/distillation.yaml)."""

from __future__ import annotations

import importlib
from pathlib import Path

import torch
from helpers import TokenDataset, tiny_bert, trainer_kwargs
from torch.utils.data import DataLoader

from lightning_latency._compat import Trainer, pl
from lightning_latency.distillation.hf import HFDistillationModule
from lightning_latency.distillation.module import DistillationModule

RECIPE = Path(__file__).resolve().parents[1] / "callbacks" / "distillation.yaml"


def _teacher_folder(tmp_path: Path) -> str:
    teacher = tiny_bert(layers=6)
    folder = tmp_path / "teacher"
    teacher.save_pretrained(folder)
    return str(folder)


def test_cli_recipe_builds_the_module_and_a_latency_monitor_on_the_student(tmp_path: Path) -> None:
    from lightning_latency import LatencyMonitor

    cli_cls = importlib.import_module(f"{pl.__name__}.cli").LightningCLI
    cli = cli_cls(DistillationModule, subclass_mode_model=True, run=False, save_config_callback=None,
                  args=["--config", str(RECIPE), f"--model.init_args.teacher_path={_teacher_folder(tmp_path)}",
                        "--trainer.logger=false", "--trainer.enable_progress_bar=false"])
    model = cli.model
    assert isinstance(model, HFDistillationModule)
    assert len(model.student.bert.encoder.layer) == 3 and len(model.teacher.bert.encoder.layer) == 6
    assert model.loss.temperature == 2.0 and model.loss.scale_by_t2 and model.alpha == 0.5
    mons = [c for c in cli.trainer.callbacks if isinstance(c, LatencyMonitor)]
    assert len(mons) == 1 and mons[0].model_attr == "student"


def test_hf_module_checkpoint_reloads_from_hyperparameters(tmp_path: Path) -> None:
    module = HFDistillationModule(_teacher_folder(tmp_path), student_layers=[1, 3], temperature=2.0, lr=1e-2)
    trainer = Trainer(**trainer_kwargs(tmp_path, max_steps=2))
    trainer.fit(module, DataLoader(TokenDataset(8, 10, 0), batch_size=4))
    trainer.save_checkpoint(tmp_path / "kd.ckpt")
    reloaded = HFDistillationModule.load_from_checkpoint(tmp_path / "kd.ckpt")
    for k, v in module.student.state_dict().items():
        torch.testing.assert_close(reloaded.student.state_dict()[k], v)
    for k, v in module.teacher.state_dict().items():
        torch.testing.assert_close(reloaded.teacher.state_dict()[k], v)
