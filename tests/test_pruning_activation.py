"""Activation importance: units the data never drives go first, whatever their weights."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from helpers import VOCAB, HFModule, tiny_bert, tiny_llama, trainer_kwargs

from lightning_latency import MagnitudePruning
from lightning_latency._compat import MisconfigurationException, Trainer
from lightning_latency.pruning import PruningConfig, prune_step, structure
from lightning_latency.pruning.activation import ActivationImportance

DEAD = [3, 17, 40, 41, 90, 100, 101, 127]  # MLP neurons of every layer that no input can drive


def _batches(n: int = 2) -> list[dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(0)
    return [{"input_ids": (ids := torch.randint(0, VOCAB, (4, 12), generator=g)), "labels": ids} for _ in range(n)]


def _llama_with_dead_neurons() -> torch.nn.Module:
    """Large weights everywhere on the dead neurons' down_proj columns (magnitude keeps them), zero inputs."""
    model = tiny_llama().eval()
    with torch.no_grad():
        for layer in model.model.layers:
            layer.mlp.up_proj.weight[DEAD] = 0.0  # SwiGLU: act(gate) * up = 0 on these channels
            layer.mlp.down_proj.weight[:, DEAD] *= 50.0
    return model


def test_dead_neurons_go_first_where_weight_magnitude_keeps_them() -> None:
    kept_by = {}
    for name in ("l2", "activation"):
        model = _llama_with_dead_neurons()
        imp = ActivationImportance(model, _batches()) if name == "activation" else "l2"
        prune_step(model, PruningConfig(mode="structured", importance=imp, prune_heads=False), 8 / 128)
        kept_by[name] = [layer.mlp.down_proj.weight for layer in model.model.layers]
    reference = _llama_with_dead_neurons()
    for layer, kept in zip(reference.model.layers, kept_by["activation"]):
        alive = [i for i in range(128) if i not in DEAD]
        torch.testing.assert_close(kept, layer.mlp.down_proj.weight[:, alive])  # exactly the dead ones removed
    assert kept_by["l2"][0].shape == (64, 120)
    assert not torch.equal(kept_by["l2"][0], kept_by["activation"][0])  # magnitude kept (some of) them


def test_a_head_whose_values_are_zero_goes_first() -> None:
    model = tiny_bert().eval()  # 4 heads of 16 dims per layer
    with torch.no_grad():
        for layer in model.bert.encoder.layer:
            layer.attention.self.value.weight[32:48] = 0.0  # head 2 outputs zeros
            layer.attention.self.value.bias[32:48] = 0.0
    values = [layer.attention.self.value.weight.clone() for layer in model.bert.encoder.layer]
    batches = [{"input_ids": b["input_ids"], "attention_mask": torch.ones_like(b["input_ids"])} for b in _batches()]
    prune_step(model, PruningConfig(mode="structured", importance=ActivationImportance(model, batches),
                                    prune_neurons=False), 0.25)
    for layer, before in zip(model.bert.encoder.layer, values):
        torch.testing.assert_close(layer.attention.self.value.weight, torch.cat([before[:32], before[48:]]))


def test_statistics_from_before_a_structural_step_are_refused() -> None:
    model = _llama_with_dead_neurons()
    imp = ActivationImportance(model, _batches())
    config = PruningConfig(mode="structured", importance=imp, prune_heads=False)
    prune_step(model, config, 8 / 128)
    with pytest.raises(ValueError, match=r"recorded on a 128-wide layer that is now 120 wide.*Record it again"):
        prune_step(model, config, 16 / 128)
    with pytest.raises(ValueError, match=r"`calibration` is empty"):
        ActivationImportance(model, [])


def test_student_from_pruned_teacher_with_activation_importance() -> None:
    from lightning_latency.distillation import student_from_pruned_teacher

    teacher = _llama_with_dead_neurons()
    student = student_from_pruned_teacher(teacher, 8 / 128, importance="activation", calibration=_batches(),
                                          prune_heads=False)
    alive = [i for i in range(128) if i not in DEAD]
    torch.testing.assert_close(student.model.layers[0].mlp.down_proj.weight,
                               teacher.model.layers[0].mlp.down_proj.weight[:, alive])
    assert student.eval().generate(_batches(1)[0]["input_ids"][:1, :5], max_new_tokens=3).shape == (1, 8)
    with pytest.raises(ValueError, match=r"`importance`='activation' scores the model on data, but no `calibration`"):
        student_from_pruned_teacher(teacher, 0.25, importance="activation")


def test_the_callback_and_masked_modes_refuse_activation_early(tmp_path: Path) -> None:
    callback = MagnitudePruning(mode="structured", importance="activation", final_sparsity=0.25, start_step=1,
                                end_step=2, every_n_steps=1)
    with pytest.raises(MisconfigurationException, match=r"importance='activation' ranks on statistics recorded once"):
        Trainer(**trainer_kwargs(tmp_path, max_steps=2, callbacks=[callback])).fit(HFModule(kind="llama"))
    with pytest.raises(ValueError, match=r"scores whole heads and neurons \(structured mode\)"):
        prune_step(tiny_llama(), PruningConfig(mode="unstructured", importance="activation"), 0.5)
    with pytest.raises(ValueError, match=r"needs statistics recorded on calibration data"):
        prune_step(tiny_llama(), PruningConfig(mode="structured", importance="activation"), 0.25)
    assert structure(tiny_llama())  # the model types above are supported ones: the refusals are about importance
