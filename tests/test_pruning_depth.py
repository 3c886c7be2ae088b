"""Depth pruning: whole layers removed, every other layer keeping its name, through save/load and resume."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from helpers import VOCAB, tiny_bert, tiny_gpt2, tiny_llama

from lightning_latency.pruning import load_pruned, save_pruned
from lightning_latency.pruning.depth import (
    SkippedLayer,
    find_layers,
    removable_layers,
    restore_skips,
    skip_layer,
    skipped_layers,
)
from lightning_latency.pruning.structured import reshape_to_state_dict, structure


def _ids(seq: int = 12) -> torch.Tensor:
    return torch.randint(0, VOCAB, (2, seq), generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("build", [lambda: tiny_bert(layers=3), lambda: tiny_llama(layers=3),
                                   lambda: tiny_gpt2(layers=3)], ids=["bert", "llama", "gpt2"])
def test_skip_layer_removes_its_weights_keeps_other_names_and_runs(build) -> None:
    model = build().eval()
    layers = list(find_layers(model))
    assert len(layers) == 3 and removable_layers(model) == layers[1:]
    params = sum(p.numel() for p in model.parameters())
    blocks_before = set(structure(model))
    assert skip_layer(model, layers[1]) and not skip_layer(model, layers[1])  # the second call: already skipped
    assert skipped_layers(model) == [layers[1]] and list(find_layers(model)) == layers
    assert sum(p.numel() for p in model.parameters()) < params
    kept = {b for b in blocks_before if not (b == layers[1] or b.startswith(layers[1] + "."))}
    assert set(structure(model)) == kept  # the other layers' blocks keep their names
    with torch.no_grad():
        out = model(input_ids=_ids()).logits
    assert out.shape[0] == 2 and torch.isfinite(out).all()


def test_skipped_layer_is_the_identity_on_the_residual_stream() -> None:
    """A layer whose updates are zero changes nothing when skipped: the outputs are identical."""
    model = tiny_bert(layers=3).eval()
    with torch.no_grad():
        model.bert.encoder.layer[2].attention.output.dense.weight.zero_()
        model.bert.encoder.layer[2].attention.output.dense.bias.zero_()
    model.bert.encoder.layer[2].attention.output.LayerNorm = torch.nn.Identity()
    model.bert.encoder.layer[2].output = _ZeroUpdate()
    ids = _ids()
    with torch.no_grad():
        before = model(input_ids=ids).logits
        skip_layer(model, "bert.encoder.layer.2")
        after = model(input_ids=ids).logits
    torch.testing.assert_close(after, before)


class _ZeroUpdate(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.dense = torch.nn.Linear(128, 64)

    def forward(self, hidden_states: torch.Tensor, input_tensor: torch.Tensor) -> torch.Tensor:
        return input_tensor


def test_the_first_layer_and_unknown_names_are_refused() -> None:
    model = tiny_llama(layers=2)
    with pytest.raises(ValueError, match=r"`model.layers.0` is the first layer of its stack"):
        skip_layer(model, "model.layers.0")
    with pytest.raises(ValueError, match=r"`model.layers.9` is not a transformer layer of LlamaForCausalLM"):
        skip_layer(model, "model.layers.9")


def test_depth_pruned_llama_generates_and_round_trips_save_load(tmp_path: Path) -> None:
    model = tiny_llama(layers=3).eval()
    skip_layer(model, "model.layers.1")
    prompt = _ids(8)[:1]
    with torch.no_grad():
        tokens = model.generate(prompt, max_new_tokens=6, do_sample=False)
        logits = model(input_ids=prompt).logits
    assert tokens.shape == (1, 14)
    loaded = load_pruned(save_pruned(model, tmp_path / "pruned")).eval()
    assert skipped_layers(loaded) == ["model.layers.1"]
    with torch.no_grad():
        torch.testing.assert_close(loaded(input_ids=prompt).logits, logits)
        assert torch.equal(loaded.generate(prompt, max_new_tokens=6, do_sample=False), tokens)


def test_a_depth_pruned_state_dict_loads_into_a_fresh_model() -> None:
    pruned = tiny_bert(layers=3)
    skip_layer(pruned, "bert.encoder.layer.1")
    state = pruned.state_dict()
    fresh = tiny_bert(layers=3)
    assert not restore_skips(fresh, {})  # nothing to compare against: nothing changes
    assert reshape_to_state_dict(fresh, state)
    fresh.load_state_dict(state, strict=True)
    assert isinstance(fresh.bert.encoder.layer[1], SkippedLayer)


def _llama_with_a_passive_layer() -> torch.nn.Module:
    """3 layers; layer 1 writes nothing into the residual stream (zero o_proj and down_proj)."""
    model = tiny_llama(layers=3).eval()
    with torch.no_grad():
        model.model.layers[1].self_attn.o_proj.weight.zero_()
        model.model.layers[1].mlp.down_proj.weight.zero_()
    return model


def _calibration(n: int = 2) -> list[dict[str, torch.Tensor]]:
    return [{"input_ids": _ids(), "labels": _ids()} for _ in range(n)]


def test_block_importance_finds_the_layer_that_changes_nothing_and_prune_depth_removes_it() -> None:
    from lightning_latency.pruning.depth import block_importance, prune_depth

    model = _llama_with_a_passive_layer()
    scores = block_importance(model, _calibration())
    assert set(scores) == {"model.layers.0", "model.layers.1", "model.layers.2"}
    assert scores["model.layers.1"] < 1e-6 < min(scores["model.layers.0"], scores["model.layers.2"])
    with torch.no_grad():
        before = model(input_ids=_ids()).logits
    assert prune_depth(model, 1, _calibration()) == ["model.layers.1"]
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=_ids()).logits, before)  # it did nothing, so nothing changes
    with pytest.raises(ValueError, match=r"`layers` must be an int from 0 to 1 .*got 5"):
        prune_depth(model, 5, _calibration())
    with pytest.raises(ValueError, match=r"`calibration` is empty"):
        block_importance(model, [])


def test_student_from_pruned_teacher_removes_layers_then_width() -> None:
    from lightning_latency.distillation import student_from_pruned_teacher

    teacher = _llama_with_a_passive_layer()
    student = student_from_pruned_teacher(teacher, 0.5, layers_removed=1, calibration=_calibration(),
                                          importance="taylor")
    assert skipped_layers(student) == ["model.layers.1"] and not skipped_layers(teacher)
    assert all(v.get("neurons", 64) == 64 for v in structure(student).values())  # 128 -> 64 neurons
    depth_only = student_from_pruned_teacher(teacher, 0.0, layers_removed=2, calibration=_calibration())
    assert len(skipped_layers(depth_only)) == 2 and structure(depth_only) == {
        k: v for k, v in structure(teacher).items() if k.startswith("model.layers.0")}
    with pytest.raises(ValueError, match=r"`layers_removed`=1 ranks layers on data, but no `calibration`"):
        student_from_pruned_teacher(teacher, 0.0, layers_removed=1)
    with pytest.raises(ValueError, match=r"`sparsity` must be in \(0, 1\) \(or 0 with layers_removed > 0\), got 0"):
        student_from_pruned_teacher(teacher, 0.0)
    tokens = student.eval().generate(_ids(6)[:1], max_new_tokens=4, do_sample=False)
    assert tokens.shape == (1, 10)
