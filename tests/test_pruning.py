"""The pruning core without a Trainer: config validation, schedules, structured shrinking, masks, save/load."""

from __future__ import annotations

import re
from typing import Any

import pytest
import torch
import torch_pruning as tp
from torch import nn

from helpers import VOCAB, tiny_bert, tiny_gpt2, tiny_llama
from lightning_latency.pruning import (
    PruningConfig,
    PruningSchedule,
    load_pruned,
    prune_step,
    reshape_to_state_dict,
    save_pruned,
    structure,
)
from lightning_latency.pruning.targets import resolve_targets


def _ids(batch: int = 2, seq: int = 12) -> torch.Tensor:
    return torch.randint(0, VOCAB, (batch, seq), generator=torch.Generator().manual_seed(1))


def _smollm_like() -> nn.Module:
    """SmolLM2's attention layout (9 query heads sharing 3 KV heads) at toy width."""
    return tiny_llama(hidden=144, heads=9, kv_heads=3, intermediate=96)


# ----------------------------------------------------------------------------------------------- validation


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        (dict(mode="magic"), r"`mode` must be one of .*'magic'"),
        (dict(importance="random"), r"`importance` must be one of .*'random'"),
        (dict(importance=3), r"`importance` must be .*int"),
        (dict(scope="world"), r"`scope` must be one of .*'world'"),
        (dict(mode="nm", n=4, m=4), r"0 < n < m, got n=4, m=4"),
        (dict(max_layer_sparsity=0.0), r"`max_layer_sparsity` must be in \(0, 1\], got 0.0"),
        (dict(mode="structured", prune_heads=False, prune_neurons=False), r"both False"),
        (dict(targets=[3]), r"`targets` entries must be"),
        (dict(exclude=["("]), r"`exclude` entry '\(' is not a valid regular expression"),
    ],
)
def test_config_misconfiguration(kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        PruningConfig(**kwargs)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        (dict(final_sparsity=1.0), r"`final_sparsity` must be in \[0, 1\), got 1.0"),
        (dict(final_sparsity=-0.1), r"`final_sparsity` must be in \[0, 1\), got -0.1"),
        (dict(initial_sparsity=0.6, final_sparsity=0.5), r"`initial_sparsity` \(0.6\) must not exceed"),
        (dict(start=5, end=2), r"`start` \(5\) is after `end` \(2\)"),
        (dict(end=4, frequency=0), r"`frequency` must be an integer > 0, got 0"),
        (dict(end=4, curve="exp"), r"`curve` must be one of .*'exp'"),
        (dict(start=-1), r"`start` must be an integer >= 0, got -1"),
    ],
)
def test_schedule_misconfiguration(kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        PruningSchedule(**kwargs)


def test_prune_step_rejects_bad_sparsity_and_unsupported_models() -> None:
    with pytest.raises(ValueError, match=r"`sparsity` must be in \[0, 1\), got 1.5"):
        prune_step(tiny_bert(), PruningConfig(), 1.5)
    mlp = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 2))
    with pytest.raises(ValueError, match=r"mode='structured' does not support Sequential.*found no attention heads or MLP blocks"):
        prune_step(mlp, PruningConfig(mode="structured"), 0.5)
    with pytest.raises(ValueError, match=r"`targets`=\['nothing_here'\] .* matches no module"):
        prune_step(tiny_bert(), PruningConfig(targets=["nothing_here"]), 0.5)


# ----------------------------------------------------------------------------------------------- schedules


def test_cubic_and_linear_schedules_hit_their_end_points() -> None:
    cubic = PruningSchedule(0.1, 0.5, start=10, end=20, frequency=3)
    assert cubic.sparsity_at(0) == 0.0
    assert cubic.sparsity_at(10) == pytest.approx(0.1)
    assert cubic.sparsity_at(20) == cubic.sparsity_at(99) == pytest.approx(0.5)
    assert cubic.positions() == [10, 13, 16, 19, 20]
    values = [cubic.sparsity_at(p) for p in range(10, 21)]
    assert values == sorted(values)
    # cubic prunes faster early than linear (Zhu & Gupta)
    linear = PruningSchedule(0.1, 0.5, start=10, end=20, curve="linear")
    assert cubic.sparsity_at(13) > linear.sparsity_at(13) == pytest.approx(0.1 + 0.4 * 0.3)
    custom = PruningSchedule(0.0, 0.4, start=0, end=4, curve=lambda p: p**2)
    assert custom.sparsity_at(2) == pytest.approx(0.1)


# ----------------------------------------------------------------------------------------------- structured


@pytest.mark.parametrize("builder", [tiny_bert, tiny_llama, tiny_gpt2, _smollm_like])
def test_structured_pruning_shrinks_layers_and_model_still_runs(builder) -> None:
    model = builder().eval()
    before = structure(model)
    n_params = sum(p.numel() for p in model.parameters())
    result = prune_step(model, PruningConfig(mode="structured"), 0.5)
    after = structure(model)
    assert sum(p.numel() for p in model.parameters()) < n_params
    for name, shape in after.items():
        if "heads" in shape:
            assert shape["heads"] < before[name]["heads"]
            assert shape["head_dim"] == before[name]["head_dim"]
            assert shape["heads"] % shape["kv_heads"] == 0  # GQA groups stay consistent
        if "neurons" in shape:
            assert shape["neurons"] == before[name]["neurons"] // 2
    assert result.sparsity == pytest.approx(0.5, abs=0.1)
    ids = _ids()
    with torch.no_grad():
        out = model(input_ids=ids)
    assert torch.isfinite(out.logits).all()
    if builder is not tiny_bert:
        generated = model.generate(ids[:1], attention_mask=torch.ones_like(ids[:1]), max_new_tokens=4,
                                   do_sample=False)  # exercises the KV cache with fewer heads
        assert generated.shape == (1, ids.shape[1] + 4)


def test_gpt2_structured_pruning_really_prunes_conv1d_and_fused_qkv() -> None:
    model = tiny_gpt2().eval()
    prune_step(model, PruningConfig(mode="structured"), 0.5)
    block = model.transformer.h[0]
    assert isinstance(block.attn.c_attn, nn.Linear) and block.attn.c_attn.out_features == 3 * 2 * 16
    assert block.attn.c_proj.in_features == 32 and block.attn.num_heads == 2
    assert block.mlp.c_fc.out_features == 128 and block.mlp.c_proj.in_features == 128


def test_structured_gqa_keeps_kv_heads_and_drops_equally_per_group() -> None:
    model = _smollm_like().eval()
    prune_step(model, PruningConfig(mode="structured", prune_neurons=False), 0.34)  # 3 -> 2 q heads per KV group
    attn = model.model.layers[0].self_attn
    assert attn.q_proj.out_features == 6 * 16 and attn.k_proj.out_features == 3 * 16
    assert attn.num_key_value_groups == 2 and model.config.num_attention_heads == 6
    assert model.config.num_key_value_heads == 3 and model.config.head_dim == 16


def test_iterative_structured_steps_land_exactly_on_the_target() -> None:
    """torch-pruning 1.6.1 collapses to 0 heads when iterating; we count from the original heads instead."""
    model = tiny_bert(heads=8, hidden=64).eval()
    heads = []
    for s in (0.1, 0.25, 0.4, 0.5, 0.5, 0.75, 0.875):
        prune_step(model, PruningConfig(mode="structured"), s)
        heads.append(structure(model)["bert.encoder.layer.0.attention"]["heads"])
    assert heads == [7, 6, 5, 4, 4, 2, 1]
    prune_step(model, PruningConfig(mode="structured"), 0.99)  # caps: never empties a layer
    assert structure(model)["bert.encoder.layer.0.attention"]["heads"] == 1
    assert structure(model)["bert.encoder.layer.0"]["neurons"] >= 1


def test_structured_removes_the_lowest_magnitude_heads() -> None:
    model = tiny_bert().eval()
    attn = model.bert.encoder.layer[0].attention
    with torch.no_grad():
        for lin in (attn.self.query, attn.self.key, attn.self.value):
            lin.weight[16:32] *= 1e-3  # head 1 is nearly zero
        attn.output.dense.weight[:, 16:32] *= 1e-3
        kept_row = attn.self.query.weight[32:48].clone()  # head 2 survives, first of its kind after removal
    prune_step(model, PruningConfig(mode="structured", prune_neurons=False), 0.25)
    assert attn.self.num_attention_heads == 3
    torch.testing.assert_close(attn.self.query.weight[16:32], kept_row)


def test_structured_exclude_leaves_named_blocks_whole() -> None:
    model = tiny_llama().eval()
    prune_step(model, PruningConfig(mode="structured", exclude=["*layers.0.*"]), 0.5)
    shapes = structure(model)
    assert shapes["model.layers.0.self_attn"]["heads"] == 4 and shapes["model.layers.0.mlp"]["neurons"] == 128
    assert shapes["model.layers.1.self_attn"]["heads"] == 2 and shapes["model.layers.1.mlp"]["neurons"] == 64
    with pytest.raises(ValueError, match="scores torch-pruning groups, which only structured mode builds"):
        prune_step(model, PruningConfig(importance=tp.importance.GroupMagnitudeImportance()), 0.5)


def test_structured_importance_is_pluggable_with_torch_pruning_taylor() -> None:
    model = tiny_bert()
    loss = model(input_ids=_ids(), labels=torch.tensor([0, 1])).loss
    loss.backward()
    prune_step(model, PruningConfig(mode="structured", importance=tp.importance.GroupTaylorImportance()), 0.5)
    assert structure(model)["bert.encoder.layer.0.attention"]["heads"] == 2
    model.zero_grad(set_to_none=True)
    with pytest.raises(RuntimeError, match="needs gradients"):
        prune_step(model, PruningConfig(mode="structured", importance="taylor"), 0.75)


@pytest.mark.parametrize("builder", [tiny_bert, tiny_llama, tiny_gpt2])
def test_save_load_pruned_round_trip_is_exact(builder, tmp_path) -> None:
    model = builder().eval()
    prune_step(model, PruningConfig(mode="structured"), 0.5)
    save_pruned(model, tmp_path / "pruned")
    loaded = load_pruned(tmp_path / "pruned")
    assert type(loaded) is type(model) and structure(loaded) == structure(model)
    ids = _ids()
    with torch.no_grad():
        torch.testing.assert_close(loaded(input_ids=ids).logits, model(input_ids=ids).logits, rtol=0, atol=0)
    with pytest.raises(ValueError, match="must be a Hugging Face PreTrainedModel"):
        save_pruned(nn.Linear(2, 2), tmp_path / "x")


def test_save_pruned_of_a_model_pruned_inside_a_wrapper(tmp_path) -> None:
    """The callback prunes the LightningModule; users then save the inner HF model: originals must follow it."""
    model = tiny_bert().eval()
    wrapper = nn.ModuleDict({"model": model})
    prune_step(wrapper, PruningConfig(mode="structured"), 0.5)
    save_pruned(model, tmp_path / "inner")
    loaded = load_pruned(tmp_path / "inner")
    assert loaded.bert.encoder.layer[0].attention.self.attention_head_size == 16
    ids = _ids()
    with torch.no_grad():
        torch.testing.assert_close(loaded(input_ids=ids).logits, model(input_ids=ids).logits, rtol=0, atol=0)


def test_reshape_to_state_dict_makes_a_fresh_model_load_a_pruned_one() -> None:
    pruned = tiny_llama()
    prune_step(pruned, PruningConfig(mode="structured"), 0.5)
    fresh = tiny_llama()
    with pytest.raises(RuntimeError, match="size mismatch"):
        fresh.load_state_dict(pruned.state_dict())
    assert reshape_to_state_dict(fresh, pruned.state_dict())
    fresh.load_state_dict(pruned.state_dict())
    assert structure(fresh) == structure(pruned)


# ----------------------------------------------------------------------------------------------- masks


def test_default_targets_skip_embeddings_norms_and_heads() -> None:
    names = [n for n, _ in resolve_targets(tiny_bert(), PruningConfig())]
    assert names and all(".encoder." in n for n in names)
    assert not any(k in n for n in names for k in ("embeddings", "LayerNorm", "classifier", "pooler"))
    gpt2_names = [n for n, _ in resolve_targets(tiny_gpt2(), PruningConfig())]
    assert "lm_head" not in gpt2_names and any(n.endswith("c_attn") for n in gpt2_names)
    only_mlp = [n for n, _ in resolve_targets(tiny_llama(), PruningConfig(targets=["*.mlp.*"]))]
    assert only_mlp and all(".mlp." in n for n in only_mlp)


@pytest.mark.parametrize("scope", ["local", "global"])
def test_unstructured_masks_reach_sparsity_and_are_nested(scope: str) -> None:
    model = tiny_bert()
    first = prune_step(model, PruningConfig(scope=scope), 0.3)
    second = prune_step(model, PruningConfig(scope=scope), 0.6, masks=first.masks)
    assert first.sparsity == pytest.approx(0.3, abs=1e-3) and second.sparsity == pytest.approx(0.6, abs=1e-3)
    for name, mask in second.masks.items():
        assert not (mask & ~first.masks[name]).any()  # once pruned, always pruned
        weight = dict(model.named_modules())[name].weight
        assert (weight[~mask] == 0).all()
        if scope == "local":
            assert 1 - mask.float().mean().item() == pytest.approx(0.6, abs=0.01)


def test_global_scope_respects_the_per_layer_cap() -> None:
    model = tiny_bert()
    with torch.no_grad():
        model.bert.encoder.layer[0].intermediate.dense.weight.mul_(1e-4)  # would be emptied by a global threshold
    result = prune_step(model, PruningConfig(scope="global", max_layer_sparsity=0.8), 0.5)
    mask = result.masks["bert.encoder.layer.0.intermediate.dense"]
    assert 1 - mask.float().mean().item() <= 0.8 + 1e-6


@pytest.mark.parametrize("builder", [tiny_bert, tiny_gpt2])
def test_nm_masks_keep_n_of_every_m_inputs(builder) -> None:
    model = builder()
    result = prune_step(model, PruningConfig(mode="nm", n=2, m=4), 0.5)
    assert result.sparsity == pytest.approx(0.5)
    for name, mod in resolve_targets(model, PruningConfig(mode="nm")):
        weight = mod.weight if isinstance(mod, nn.Linear) else mod.weight.t()  # GPT-2 Conv1D is (in, out)
        nonzero_per_group = (weight != 0).reshape(weight.shape[0], -1, 4).sum(-1)
        assert (nonzero_per_group <= 2).all(), name


# ----------------------------------------------------------------------------------------------- real weights


@pytest.mark.real_weights
def test_real_smollm2_gqa_structured_prune_generates_and_round_trips(tmp_path) -> None:
    """SmolLM2-135M (9 query heads / 3 KV heads): a one-shot student for distillation, as the distillation area uses."""
    from examples._support import assets

    model, tokenizer = assets.load_smollm2()
    prune_step(model, PruningConfig(mode="structured"), 1 / 3)  # 9 -> 6 query heads, MLP 1536 -> 1024
    attn = model.model.layers[0].self_attn
    assert (attn.q_proj.out_features, attn.k_proj.out_features, attn.num_key_value_groups) == (6 * 64, 3 * 64, 2)
    assert model.model.layers[0].mlp.up_proj.out_features == 1024
    enc = tokenizer("The capital of France is", return_tensors="pt")
    out = model.generate(**enc, max_new_tokens=6, do_sample=False)
    assert out.shape[1] == enc["input_ids"].shape[1] + 6
    save_pruned(model, tmp_path / "student")
    loaded = load_pruned(tmp_path / "student")
    with torch.no_grad():
        torch.testing.assert_close(loaded(**enc).logits, model(**enc).logits, rtol=0, atol=0)


def _olmo2() -> torch.nn.Module:
    import transformers

    return transformers.Olmo2ForCausalLM(transformers.Olmo2Config(
        vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, bos_token_id=0, eos_token_id=1, pad_token_id=2))


def _deberta_v2() -> torch.nn.Module:
    import transformers

    return transformers.DebertaV2ForSequenceClassification(transformers.DebertaV2Config(
        vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4))


def _vit() -> torch.nn.Module:
    import transformers

    return transformers.ViTForImageClassification(transformers.ViTConfig(
        image_size=16, patch_size=8, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4))


@pytest.mark.parametrize(("build", "match"), [
    (_olmo2, r"Olmo2ForCausalLM \(model_type='olmo2'\).*q_norm\.weight.*k_norm\.weight"),
    (_deberta_v2, r"model_type='deberta-v2'.*0 attention blocks.*DebertaV2Attention"),
    (_vit, r"model_type='vit'.*0 MLP blocks.*ViTMLP"),
])
def test_structured_refuses_unsupported_architectures_before_changing_weights(build: Any, match: str) -> None:
    from lightning_latency.pruning.config import PruningConfig
    from lightning_latency.pruning.structured import prune_structured

    torch.manual_seed(0)
    model = build()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match=match):
        prune_structured(model, PruningConfig(mode="structured"), 0.5)
    after = model.state_dict()
    assert set(after) == set(before)
    for key, value in before.items():
        assert torch.equal(after[key], value), key  # nothing shrunk, nothing converted


def _saved(tmp_path: Any) -> Any:
    model = tiny_bert().eval()
    prune_step(model, PruningConfig(mode="structured"), 0.5)
    return save_pruned(model, tmp_path / "pruned")


def _set_class(folder: Any, name: Any) -> None:
    import json

    meta_file = folder / "lightning_latency_pruned.json"
    meta = json.loads(meta_file.read_text())
    meta["class"] = name
    meta_file.write_text(json.dumps(meta))


@pytest.mark.parametrize("name", ["os.system", "subprocess.Popen", "evil_marker_module.Model",
                                  "transformers.utils.import_utils.os.system", "builtins.eval"])
def test_load_pruned_refuses_a_class_outside_the_allow_list_without_running_it(tmp_path: Any, monkeypatch: Any,
                                                                              name: str) -> None:
    folder = _saved(tmp_path)
    marker = tmp_path / "MARKER"
    (tmp_path / "evil_marker_module.py").write_text(
        f"open({str(marker)!r}, 'w').write('ran')\nclass Model:\n    def __init__(self, config):\n"
        f"        open({str(marker)!r}, 'w').write('ran')\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    _set_class(folder, name)
    with pytest.raises(ValueError, match=rf"lightning_latency_pruned\.json: field 'class' names '{name}'.*register_loadable"):
        load_pruned(folder)
    assert not marker.exists()


def test_register_loadable_allows_an_own_class(tmp_path: Any) -> None:
    from lightning_latency.pruning import register_loadable

    base = type(tiny_bert())

    @register_loadable
    class MyBert(base):  # type: ignore[misc, valid-type]
        pass

    model = MyBert(tiny_bert().config).eval()
    prune_step(model, PruningConfig(mode="structured"), 0.5)
    save_pruned(model, tmp_path / "mine")
    assert type(load_pruned(tmp_path / "mine")) is MyBert
    with pytest.raises(TypeError, match="`cls` must be an nn.Module subclass, got 'os.system'"):
        register_loadable("os.system")  # type: ignore[arg-type]


def test_load_pruned_names_the_file_and_the_problem_of_a_damaged_folder(tmp_path: Any) -> None:
    folder = _saved(tmp_path)
    meta_file = folder / "lightning_latency_pruned.json"
    good = meta_file.read_text()
    meta_file.write_text("{}")
    with pytest.raises(ValueError, match=r"lightning_latency_pruned\.json lacks the field 'class'"):
        load_pruned(folder)
    meta_file.write_text("{not json")
    with pytest.raises(ValueError, match=r"lightning_latency_pruned\.json is not valid JSON"):
        load_pruned(folder)
    meta_file.write_text(good)
    _set_class(folder, 42)
    with pytest.raises(ValueError, match=r"field 'class' must be a dotted class name, got 42"):
        load_pruned(folder)
    meta_file.write_text(good)
    torch.save({"x": _Evil()}, folder / "pruned_state_dict.pt")  # a pickle that would run code
    with pytest.raises(ValueError, match=r"pruned_state_dict\.pt cannot be read .* weights_only=True"):
        load_pruned(folder)
    (folder / "pruned_state_dict.pt").unlink()
    with pytest.raises(FileNotFoundError, match=r"pruned_state_dict\.pt is missing"):
        load_pruned(folder)


class _Evil:
    def __reduce__(self) -> Any:
        return (print, ("pickle ran",))


# ----------------------------------------------------------------------------------------------- Pruner (no Lightning)


def test_pruner_runs_a_schedule_in_a_plain_loop_and_resumes_from_its_state() -> None:
    """The core on a bare nn.Module: masks stay after optimizer steps; a resumed pruner continues identically."""
    from lightning_latency.pruning.pruner import Pruner

    def run(pruner: Pruner, model: nn.Module, steps: range) -> list[float]:
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        achieved = []
        for step in steps:
            model(input_ids=_ids(), labels=torch.tensor([0, 1])).loss.backward()
            opt.step()
            opt.zero_grad()
            pruner.reapply_masks(model)
            result = pruner.maybe_prune(model, step)
            if result is not None:
                achieved.append(result.sparsity)
                assert result.metrics(pruner.sparsity)["pruning/target"] == pruner.sparsity
        return achieved

    config, schedule = PruningConfig(targets=["*dense*"]), PruningSchedule(0.0, 0.6, start=1, end=5, frequency=2)
    model, pruner = tiny_bert(), Pruner(config, schedule, make_permanent=False)
    pruner.check(model)
    assert run(pruner, model, range(1, 4)) == pytest.approx([0.0, schedule.sparsity_at(3)], abs=1e-3)
    state = {k: v for k, v in pruner.state_dict().items()}
    resumed_model = tiny_bert()
    resumed_model.load_state_dict(model.state_dict())
    resumed = Pruner(config, schedule, make_permanent=False)
    resumed.load_state_dict(state)
    torch.manual_seed(0)
    run(pruner, model, range(4, 7))
    torch.manual_seed(0)
    run(resumed, resumed_model, range(4, 7))
    for key, value in model.state_dict().items():
        torch.testing.assert_close(resumed_model.state_dict()[key], value, rtol=0, atol=0, msg=key)
    final = pruner.finish(model)
    assert final.sparsity == pytest.approx(0.6, abs=1e-3) and final.params > final.nonzero
    assert all(n.endswith("dense") for n in pruner.masks)


def test_pruner_structured_reshapes_a_fresh_model_through_its_load_pre_hook() -> None:
    from lightning_latency.pruning.pruner import Pruner

    pruner = Pruner(PruningConfig(mode="structured"), PruningSchedule(0.0, 0.5, start=0, end=0))
    model = tiny_llama()
    pruner.check(model)
    result = pruner.maybe_prune(model, 0)
    assert pruner.changes_shapes and result is not None and result.sparsity == pytest.approx(0.5)
    assert result.metrics()["pruning/heads/model.layers.0.self_attn"] == 2.0
    assert pruner.maybe_prune(model, 0) is None  # not due twice
    fresh = tiny_llama()
    handles = pruner.register_hooks(fresh)
    fresh.load_state_dict(model.state_dict())
    assert structure(fresh) == structure(model)
    for handle in handles:
        handle.remove()
    with pytest.raises(ValueError, match="needs a masked mode"):
        Pruner(PruningConfig(mode="structured"), PruningSchedule(), rewind_to=0)


def test_patterns_are_fnmatch_with_re_prefix_and_old_regexes_still_work() -> None:
    from lightning_latency import LightningLatencyDeprecationWarning

    def names(**kwargs: Any) -> list[str]:
        return [n for n, _ in resolve_targets(tiny_bert(), PruningConfig(**kwargs))]

    dense = names(targets=["*dense*"])  # raised "not a valid regular expression" before patterns.py
    assert dense and all("dense" in n for n in dense)
    assert names(targets=["re:layer\\.0\\..*dense"]) == [n for n in dense if ".layer.0." in n]
    assert names(targets=["Linear"]) == names(targets=[nn.Linear])  # fnmatch on the class name too
    assert names(targets=[nn.Linear], exclude=["*attention*"]) == [n for n in names(targets=[nn.Linear])
                                                                   if "attention" not in n]
    with pytest.warns(LightningLatencyDeprecationWarning, match=re.escape("Pass 're:(query|key)$' instead")):
        assert [n.rsplit(".", 1)[1] for n in names(targets=["(query|key)$"])] == ["query", "key"] * 2
    with pytest.warns(LightningLatencyDeprecationWarning, match=re.escape("Pass 're:intermediate' instead")):
        assert names(targets=["intermediate"]) == [n for n in dense if "intermediate" in n]  # plain: regex fallback
    assert names(targets=["bert.encoder.layer.0.output.dense"]) == ["bert.encoder.layer.0.output.dense"]  # exact
    with pytest.raises(ValueError, match=r"'\*nope\*' matches no module with a weight"):
        names(targets=["*dense*", "*nope*"])
    model = tiny_llama().eval()  # structured: an old plain exclude string still names blocks (regex fallback)
    with pytest.warns(LightningLatencyDeprecationWarning, match=re.escape("Pass 're:layers.0.' instead")):
        prune_step(model, PruningConfig(mode="structured", exclude=["layers.0."]), 0.5)
    assert structure(model)["model.layers.0.mlp"]["neurons"] == 128 and structure(model)["model.layers.1.mlp"][
        "neurons"] == 64
    with pytest.raises(ValueError, match=r"`targets` entry 're:\(' is not a valid regular expression after 're:'"):
        PruningConfig(targets=["re:("])


def test_a_structured_shrink_that_does_not_take_is_reported(monkeypatch: Any) -> None:
    from lightning_latency.pruning import structured

    model = tiny_bert().eval()
    result = prune_step(model, PruningConfig(mode="structured"), 0.5)
    assert result.unshrunk == []
    monkeypatch.setattr(structured, "shrink_mlp", lambda m, keep: None)  # an MLP the pruner fails to shrink
    result = prune_step(model, PruningConfig(mode="structured", exclude=["*layer.1*"]), 0.75)
    assert result.unshrunk == ["bert.encoder.layer.0 neurons 64 > 32"]  # layer 1 excluded: not expected to shrink
