"""The import seam: our callbacks must be accepted by both Lightning packages' Trainers."""

from __future__ import annotations

import subprocess
import sys
import textwrap


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
    import os

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
