"""The import seam: our callbacks must be accepted by both Lightning packages' Trainers."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest
import torch


def test_callback_base_accepted_by_both_trainers() -> None:
    import lightning.pytorch as L
    import pytorch_lightning as pl

    from lightning_latency._compat import CallbackBase

    class Probe(CallbackBase):
        pass

    assert isinstance(Probe(), pl.Callback)
    assert isinstance(Probe(), L.Callback)


def test_backend_follows_lightning_pytorch_when_imported_first() -> None:
    code = textwrap.dedent(
        """
        import lightning.pytorch
        from lightning_latency import _compat
        assert _compat.BACKEND == "lightning.pytorch", _compat.BACKEND
        assert issubclass(_compat.LightningModule, lightning.pytorch.LightningModule)
        """
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)


def test_backend_env_override_is_validated() -> None:
    code = "from lightning_latency import _compat"

    env = dict(os.environ, LIGHTNING_LATENCY_BACKEND="tensorflow")
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0
    assert "LIGHTNING_LATENCY_BACKEND" in proc.stderr and "tensorflow" in proc.stderr


def test_package_import_is_lazy() -> None:
    code = "import sys, lightning_latency; assert 'pytorch_lightning' not in sys.modules; assert 'torch' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)


def test_every_public_name_resolves() -> None:
    import lightning_latency

    missing = [name for name in lightning_latency.__all__ if not hasattr(lightning_latency, name)]
    assert not missing, f"__all__ promises names that do not exist: {missing}"


def test_distillation_module_follows_lightning_pytorch_imported_after_us() -> None:
    """Issue 14 item 8: `lightning_latency` first, `lightning.pytorch` second, both installed: its Trainer fits it."""
    code = textwrap.dedent(
        """
        import torch
        from torch import nn
        from lightning_latency import DistillationModule, HFDistillationModule
        import lightning.pytorch as L

        class Net(nn.Module):
            def __init__(self):
                super().__init__()
                self.l = nn.Linear(4, 3)

            def forward(self, x):
                return self.l(x)

        class Student(DistillationModule):
            pass

        assert issubclass(Student, L.LightningModule) and issubclass(HFDistillationModule, L.LightningModule)
        rows = [{"x": torch.randn(4), "labels": torch.tensor(i % 3)} for i in range(8)]
        loader = torch.utils.data.DataLoader(rows, batch_size=4)
        module = Student(Net(), Net(), alpha=0.5)
        before = module.student.l.weight.detach().clone()
        trainer = L.Trainer(max_steps=2, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                            enable_model_summary=False)
        trainer.fit(module, loader)
        assert trainer.global_step == 2 and not torch.equal(before, module.student.l.weight)
        print("fitted", sorted(trainer.callback_metrics))
        """
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "fitted" in proc.stdout and "train_kd_loss" in proc.stdout


def test_direct_construction_follows_the_callers_package() -> None:
    """No subclass of the user's: building the module directly also follows the caller's Lightning package."""
    code = textwrap.dedent(
        """
        from torch import nn
        from lightning_latency import DistillationModule
        import lightning.pytorch as L
        module = DistillationModule(nn.Linear(4, 3), nn.Linear(4, 3))
        assert isinstance(module, L.LightningModule), type(module).__mro__
        """
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]


def test_follow_lightning_package_rebases_once_and_refuses_a_second_package() -> None:
    import lightning.pytorch as L
    import pytorch_lightning as pl

    from lightning_latency._compat import follow_lightning_package, lightning_packages_in

    assert lightning_packages_in({"L": L, "T": L.Trainer}) == {"lightning.pytorch"}
    assert lightning_packages_in({"pl": pl, "os": os}) == {"pytorch_lightning"}
    assert lightning_packages_in({"x": 1, "nn": torch.nn}) == set()

    class Root(pl.LightningModule):
        pass

    class Child(Root):
        pass

    follow_lightning_package(Root, {"pl": pl, "L": L}, "module 'both'")  # both packages: nothing to follow
    assert issubclass(Child, pl.LightningModule) and not issubclass(Child, L.LightningModule)
    follow_lightning_package(Root, {"Trainer": L.Trainer}, "module 'user_a'")
    assert issubclass(Child, L.LightningModule) and not issubclass(Child, pl.LightningModule)
    follow_lightning_package(Root, {"L": L}, "module 'user_b'")  # the same package again: fine
    with pytest.raises(TypeError, match=r"module 'user_c' uses `pytorch_lightning`, but module 'user_a' uses "
                                        r"`lightning.pytorch`.*one import style"):
        follow_lightning_package(Root, {"pl": pl}, "module 'user_c'")
