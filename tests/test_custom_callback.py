"""The under-100-lines callback of docs/architecture.md really works on the shared contract."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from helpers import HFModule, trainer_kwargs

from examples.custom_callback import OneShotStructuredPruning
from lightning_latency._compat import MisconfigurationException, Trainer
from lightning_latency.pruning import structure


def _heads(module: HFModule) -> list[int]:
    return [s["heads"] for s in structure(module.model).values() if "heads" in s]


def test_prunes_once_before_training_and_resumes_from_its_checkpoint(tmp_path: Path) -> None:
    module = HFModule()
    assert _heads(module) == [4, 4]
    callback = OneShotStructuredPruning(0.5, model_attr="model")
    trainer = Trainer(**trainer_kwargs(tmp_path, callbacks=[callback], max_steps=3))
    trainer.fit(module)
    assert _heads(module) == [2, 2] and trainer.global_step == 3
    ckpt = tmp_path / "one_shot.ckpt"
    trainer.save_checkpoint(ckpt)

    fresh, again = HFModule(), OneShotStructuredPruning(0.5, model_attr="model")
    resumed = Trainer(**trainer_kwargs(tmp_path / "resume", callbacks=[again], max_steps=5))
    resumed.fit(fresh, ckpt_path=str(ckpt))  # the pre-hook shrinks the fresh model before the weights load
    assert _heads(fresh) == [2, 2] and resumed.global_step == 5
    assert again.state_dict() == callback.state_dict()
    x = {"input_ids": torch.randint(0, 100, (1, 8))}
    assert fresh.model(**x).logits.shape == (1, 2)


def test_the_contract_refuses_a_bad_target_and_a_bad_argument(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="`importance` must be 'l1' or 'l2'.*'taylor'"):
        OneShotStructuredPruning(importance="taylor")
    trainer = Trainer(**trainer_kwargs(tmp_path, callbacks=[OneShotStructuredPruning(model_attr="encoder")]))
    with pytest.raises(MisconfigurationException, match="OneShotStructuredPruning.*model_attr='encoder'"):
        trainer.fit(HFModule())
    assert trainer.global_step == 0
