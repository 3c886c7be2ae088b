"""MagnitudePruning inside real tiny Trainer runs: schedule, masks, structural steps, resume, DDP, CLI recipes."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest
import torch
import torch_pruning as tp
from torch import nn
from torch.utils.data import DataLoader

from helpers import HFModule, RankStateDump, TokenDataset, read_csv_metrics, trainer_kwargs
from lightning_latency._compat import CallbackBase, LightningModule, MisconfigurationException, Trainer, pl
from lightning_latency.pruning import reshape_to_state_dict, structure
from lightning_latency.pruning.callback import MagnitudePruning
from lightning_latency.pruning.targets import resolve_targets

ROOT = Path(__file__).resolve().parents[1]


def _fit(tmp_path: Path, module: Any, callbacks: list, ckpt_path: str | None = None, **overrides: Any) -> Any:
    trainer = Trainer(**trainer_kwargs(tmp_path, callbacks=callbacks, **overrides))
    trainer.fit(module, ckpt_path=ckpt_path)
    return trainer


def _zero_fraction(module: nn.Module, names: list[str]) -> float:
    mods = dict(module.named_modules())
    total = sum(mods[n].weight.numel() for n in names)
    return sum(int((mods[n].weight == 0).sum()) for n in names) / total


# ----------------------------------------------------------------------------------------------- validation


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        (dict(mode="fast"), r"`mode` must be one of .*'fast'"),
        (dict(final_sparsity=1.5), r"`final_sparsity` must be in \[0, 1\), got 1.5. For 50% sparsity pass"),
        (dict(start_step=10, end_step=5), r"`start_step` \(10\) is after `end_step` \(5\)"),
        (dict(start_epoch=3, end_epoch=1), r"`start_epoch` \(3\) is after `end_epoch` \(1\)"),
        (dict(end_step=4, every_n_steps=0), r"`every_n_steps` must be an integer >= 1, got 0"),
        (dict(end_step=4, every_n_steps=-2), r"`every_n_steps` must be an integer >= 1, got -2"),
        (dict(every_n_epochs=0), r"`every_n_epochs` must be an integer >= 1, got 0"),
        (dict(start_step=-1), r"`start_step` must be an integer >= 0, got -1"),
        (dict(start_step=1, end_epoch=2), r"`start_step` and `end_epoch` both given.*not both"),
        (dict(interval="batch"), r"`interval` must be one of \['step', 'epoch'\], got 'batch'"),
        (dict(interval="step", start_epoch=1), r"`interval='step'` and `start_epoch` both given"),
        (dict(start=1, start_step=2), r"pass `start_step` only; `start` is its deprecated name"),
        (dict(schedule="exp"), r"`schedule` must be 'cubic', 'linear' or a callable.*'exp'"),
        (dict(mode="structured", rewind_to=0), r"`rewind_to`=0 needs a masked mode"),
        (dict(start_step=2, end_step=4, rewind_to=3), r"`rewind_to` must be an optimizer step in \[0, start_step=2\], got 3"),
        (dict(importance="hessian"), r"`importance` must be one of .*'hessian'"),
        (dict(targets=[r"re:("]), r"`targets` entry 're:\(' is not a valid regular expression"),
    ],
)
def test_callback_misconfiguration(kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        MagnitudePruning(**kwargs)


class _PlainMLP(LightningModule):
    """Not a transformer: structured pruning has nothing it knows how to shrink."""

    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Embedding(128, 8), nn.Flatten(), nn.Linear(8 * 16, 2))

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        return nn.functional.cross_entropy(self.net(batch["input_ids"]), batch["labels"])

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.1)

    def train_dataloader(self) -> DataLoader:
        return DataLoader(TokenDataset(16), batch_size=8)


@pytest.mark.parametrize(
    ("module", "callback", "match"),
    [
        (_PlainMLP, MagnitudePruning(mode="structured"), r"mode='structured' does not support _PlainMLP.*found no attention heads"),
        (HFModule, MagnitudePruning(targets=["no_such_layer"]), r"`targets`=\['no_such_layer'\] .*matches no module"),
        (HFModule, MagnitudePruning(targets=["*dense*", "*nope*"]), r"'\*nope\*' matches no module with a weight"),
        # found in setup, not at the first pruning step (which may be hours later)
        (HFModule, MagnitudePruning(mode="nm", n=2, m=3, start_step=50), r"N:M pruning needs the input size of .*m=3"),
        (HFModule, MagnitudePruning(importance=tp.importance.GroupMagnitudeImportance(), start_step=50),
         r"scores torch-pruning groups, which only structured mode builds"),
        (HFModule, MagnitudePruning(importance="taylor"), r"importance='taylor' needs gradients.*start_step=1"),
        (HFModule, MagnitudePruning(importance="taylor", start_epoch=0), r"needs gradients.*start_epoch=1"),
    ],
)
def test_setup_rejects_models_it_cannot_prune(tmp_path: Path, module: type, callback: Any, match: str) -> None:
    with pytest.raises(MisconfigurationException, match=match):
        _fit(tmp_path, module(), [callback], max_steps=1)


# ----------------------------------------------------------------------------------------------- masked modes


def test_unstructured_schedule_reaches_target_and_is_logged(tmp_path: Path) -> None:
    module = HFModule(kind="bert")
    callback = MagnitudePruning(final_sparsity=0.5, start_step=1, end_step=5, every_n_steps=2, schedule="linear")
    with pytest.warns(UserWarning, match="dense CPU kernels run exactly as fast"):
        trainer = _fit(tmp_path, module, [callback], max_steps=8)
    rows = read_csv_metrics(trainer)
    logged = {int(r["step"]): float(r["pruning/target"]) for r in rows if r.get("pruning/target")}
    assert logged[1] == 0.0 and logged[3] == pytest.approx(0.25) and logged[5] == pytest.approx(0.5)
    assert all(float(r["pruning/nonzero"]) <= float(r["pruning/params"]) for r in rows if r.get("pruning/params"))
    names = [n for n, _ in resolve_targets(module, callback.config)]
    assert _zero_fraction(module, names) == pytest.approx(0.5, abs=1e-3)
    assert callback.masks == {}  # make_permanent: masks dropped, zeros baked in


def test_setup_warns_when_the_schedule_ends_after_max_steps(tmp_path: Path) -> None:
    with pytest.warns(UserWarning, match=r"`end_step`=10 is after Trainer\(max_steps=2\): the schedule never reaches"):
        _fit(tmp_path, HFModule(kind="bert"), [MagnitudePruning(start_step=1, end_step=10)], max_steps=2)


class _MaskProbe(CallbackBase):
    """Before every batch (i.e. after the previous optimizer step): count non-zeros where the mask is False."""

    def __init__(self, pruning: MagnitudePruning) -> None:
        self.pruning, self.leaks, self.checked, self.snapshots = pruning, 0, 0, []

    def on_train_batch_start(self, trainer: Any, pl_module: Any, batch: Any, batch_idx: int) -> None:
        mods = dict(pl_module.named_modules())
        for name, mask in self.pruning.masks.items():
            self.leaks += int((mods[name].weight[~mask] != 0).sum())
            self.checked += 1
        self.snapshots.append(pl_module.model.bert.encoder.layer[0].intermediate.dense.weight.detach().clone())


@pytest.mark.parametrize("mode", ["unstructured", "nm"])
def test_pruned_weights_stay_zero_after_optimizer_steps(tmp_path: Path, mode: str) -> None:
    pruning = MagnitudePruning(mode=mode, final_sparsity=0.5, start_step=1, end_step=1, make_permanent=False)
    probe = _MaskProbe(pruning)
    _fit(tmp_path, HFModule(kind="bert", lr=1e-2), [pruning, probe], max_steps=6)
    assert probe.checked > 0 and probe.leaks == 0
    assert not torch.equal(probe.snapshots[2], probe.snapshots[-1])  # surviving weights kept training


def test_lottery_ticket_rewinding_resets_survivors_to_initial_weights(tmp_path: Path) -> None:
    module = HFModule(kind="bert", lr=1e-2)
    initial = module.model.bert.encoder.layer[0].intermediate.dense.weight.detach().clone()
    pruning = MagnitudePruning(final_sparsity=0.5, start_step=3, end_step=3, rewind_to=0, make_permanent=False)
    _fit(tmp_path, module, [pruning], max_steps=3)  # fit ends right after the pruning step
    weight = module.model.bert.encoder.layer[0].intermediate.dense.weight.detach()
    mask = pruning.masks["model.bert.encoder.layer.0.intermediate.dense"]
    torch.testing.assert_close(weight[mask], initial[mask], rtol=0, atol=0)
    assert (weight[~mask] == 0).all()


def test_epoch_interval(tmp_path: Path) -> None:
    pruning = MagnitudePruning(final_sparsity=0.6, start_epoch=0, end_epoch=2, schedule="linear")
    trainer = _fit(tmp_path, HFModule(kind="bert", n=16), [pruning], max_epochs=3, max_steps=-1)
    targets = [float(r["pruning/target"]) for r in read_csv_metrics(trainer) if r.get("pruning/target")]
    assert targets[:3] == pytest.approx([0.0, 0.3, 0.6]) and pruning.sparsity == pytest.approx(0.6)


# ----------------------------------------------------------------------------------------------- structured


@pytest.mark.parametrize(("kind", "importance"), [("bert", "taylor"), ("llama", "l2"), ("gpt2", "l1")])
def test_structured_fit_shrinks_model_and_rebuilds_optimizer(tmp_path: Path, kind: str, importance: str) -> None:
    module = HFModule(kind=kind)
    before = structure(module)
    pruning = MagnitudePruning(mode="structured", final_sparsity=0.5, start_step=2, end_step=6,
                               every_n_steps=2, importance=importance)  # taylor: gradients still exist at on_train_batch_end
    trainer = _fit(tmp_path, module, [pruning], max_steps=8)
    after = structure(module)
    for name, shape in after.items():
        for key in ("heads", "neurons"):
            if key in shape:
                assert shape[key] == before[name][key] // 2, (name, key)
    optimizer_params = {id(p) for g in trainer.optimizers[0].param_groups for p in g["params"]}
    assert optimizer_params == {id(p) for p in module.parameters()}  # no stale, full-size parameters
    assert all(s for s in trainer.optimizers[0].state.values())  # the new optimizer did take steps
    rows = read_csv_metrics(trainer)
    head_keys = [k for k in rows[0] if k.startswith("pruning/heads/")]
    assert head_keys and min(float(r[head_keys[0]]) for r in rows if r.get(head_keys[0])) == 2
    assert torch.isfinite(trainer.callback_metrics["train_loss"])


@pytest.mark.parametrize("strategy", ["ddp_spawn", "ddp_fork"])
def test_structured_under_a_spawned_launcher_is_refused_in_setup(tmp_path: Path, strategy: str) -> None:
    """Real Trainers (nothing is launched before fit): spawn and fork send weights back through the main process."""
    def trainer(name: str) -> Any:
        return Trainer(accelerator="cpu", devices=2, strategy=name, logger=False, enable_progress_bar=False,
                       default_root_dir=tmp_path)

    pruning = MagnitudePruning(mode="structured", final_sparsity=0.5)
    with pytest.raises(MisconfigurationException, match=r"MagnitudePruning: .*spawned launcher.*Use strategy='ddp'"):
        pruning.setup(trainer(strategy), HFModule(), "fit")
    pruning.setup(trainer(strategy), _ReshapingHFModule(), "fit")  # reshapes itself before loading: allowed
    pruning.setup(trainer("ddp"), HFModule(), "fit")  # popen: every rank keeps its own pruned module
    MagnitudePruning(mode="unstructured").setup(trainer(strategy), HFModule(), "fit")  # masks keep the shapes
    assert pruning.strategy_problem("spawn", None) and not pruning.strategy_problem("spawn", _ReshapingHFModule())


def test_old_schedule_names_still_work_with_a_deprecation_warning(tmp_path: Path) -> None:
    from lightning_latency import LightningLatencyDeprecationWarning

    new = MagnitudePruning(final_sparsity=0.5, start_step=1, end_step=3, every_n_steps=2)
    with pytest.warns(LightningLatencyDeprecationWarning, match=r"pass `start_step=1` instead"):
        old = MagnitudePruning(final_sparsity=0.5, start=1, end=3, frequency=2)
    assert old.schedule == new.schedule and old.interval == new.interval == "step"
    assert old.state_key == new.state_key  # old checkpoints keep their callback state
    with pytest.warns(LightningLatencyDeprecationWarning, match=r"`interval`=\.\.\.\) is deprecated"):
        by_epoch = MagnitudePruning(start=0, end=2, frequency=1, interval="epoch")
    assert by_epoch.interval == "epoch" and by_epoch.schedule == MagnitudePruning(start_epoch=0, end_epoch=2).schedule
    # a checkpoint written with the old names resumes into a callback built with the new ones
    module = HFModule(kind="bert")
    with pytest.warns(LightningLatencyDeprecationWarning):
        _fit(tmp_path, module, [MagnitudePruning(final_sparsity=0.5, start=1, end=1, make_permanent=False)],
             max_steps=2)
    assert _zero_fraction(module, [n for n, _ in resolve_targets(module, new.config)]) == pytest.approx(0.5, abs=1e-3)


def test_glob_patterns_select_what_to_prune_and_old_regexes_still_work(tmp_path: Path) -> None:
    from lightning_latency import LightningLatencyDeprecationWarning

    module, old_regex = HFModule(kind="bert"), r"\.intermediate\.dense"
    pruning = MagnitudePruning(final_sparsity=0.5, start_step=1, targets=["*intermediate.dense"],
                               exclude=["*layer.1.*"])  # "not a valid regular expression" before patterns.py
    _fit(tmp_path, module, [pruning], max_steps=2)
    assert _zero_fraction(module, ["model.bert.encoder.layer.0.intermediate.dense"]) == pytest.approx(0.5, abs=1e-3)
    assert _zero_fraction(module, ["model.bert.encoder.layer.1.intermediate.dense"]) == 0.0
    with pytest.warns(LightningLatencyDeprecationWarning, match=re.escape(f"Pass {'re:' + old_regex!r} instead")):
        old = MagnitudePruning(targets=[old_regex])
    assert [n for n, _ in resolve_targets(HFModule(kind="bert"), old.config)] == [
        "model.bert.encoder.layer.0.intermediate.dense", "model.bert.encoder.layer.1.intermediate.dense"]


# ----------------------------------------------------------------------------------------------- resume


@pytest.mark.parametrize(("kind", "mode"), [("bert", "unstructured"), ("llama", "structured"),
                                            ("gpt2", "structured")])
def test_resume_mid_schedule_gives_the_same_result(tmp_path: Path, kind: str, mode: str) -> None:
    def callbacks(folder: Path) -> list:
        return [MagnitudePruning(mode=mode, final_sparsity=0.5, start_step=2, end_step=6, every_n_steps=2,
                                 make_permanent=False),
                pl.callbacks.ModelCheckpoint(dirpath=folder, every_n_epochs=1, save_top_k=-1,
                                             save_on_train_epoch_end=True)]

    full, full_callbacks = HFModule(kind=kind), callbacks(tmp_path / "ckpt")
    _fit(tmp_path / "a", full, full_callbacks, max_steps=8, enable_checkpointing=True)
    checkpoint = tmp_path / "ckpt" / "epoch=0-step=4.ckpt"  # after the step-4 pruning, before the step-6 one
    assert checkpoint.exists()

    resumed, resumed_callbacks = HFModule(kind=kind), callbacks(tmp_path / "ckpt_b")  # fresh, full-size layers
    _fit(tmp_path / "b", resumed, resumed_callbacks, ckpt_path=str(checkpoint), max_steps=8,
         enable_checkpointing=True)
    assert structure(resumed) == structure(full)
    expected, got = full.state_dict(), resumed.state_dict()
    assert expected.keys() == got.keys()
    for key in expected:
        torch.testing.assert_close(got[key], expected[key], rtol=1e-5, atol=1e-6, msg=key)
    full_masks, resumed_masks = full_callbacks[0].masks, resumed_callbacks[0].masks
    assert full_masks.keys() == resumed_masks.keys() and (mode == "structured") == (not full_masks)
    for key in full_masks:
        assert torch.equal(full_masks[key].cpu(), resumed_masks[key].cpu()), key


# ----------------------------------------------------------------------------------------------- DDP


def _zero_patterns(pl_module: Any) -> dict[str, torch.Tensor]:
    state = pl_module.state_dict()
    patterns = {f"zeros:{k}": (v == 0).clone() for k, v in state.items() if k.endswith("weight")}
    return patterns | {k: v.detach().clone() for k, v in state.items()}


@pytest.mark.ddp
def test_ddp_ranks_end_with_identical_masks(tmp_path: Path) -> None:
    pruning = MagnitudePruning(final_sparsity=0.5, start_step=1, end_step=3, every_n_steps=1)
    dump = RankStateDump(tmp_path, fn=_zero_patterns)
    trainer = Trainer(**trainer_kwargs(tmp_path, strategy="ddp_spawn", devices=2, max_steps=4, logger=False,
                                       callbacks=[pruning, dump]))
    trainer.fit(HFModule(kind="bert"))
    rank0 = torch.load(tmp_path / "rank0.pt", weights_only=True)
    rank1 = torch.load(tmp_path / "rank1.pt", weights_only=True)
    assert rank0.keys() == rank1.keys()
    for key in rank0:
        assert torch.equal(rank0[key], rank1[key]), key
    zero = rank0["zeros:model.bert.encoder.layer.0.intermediate.dense.weight"].float().mean().item()
    assert zero == pytest.approx(0.5, abs=1e-3)


class _ReshapingHFModule(HFModule):
    """The documented user-side fix for ddp_spawn: shrink to the incoming shapes before loading (main process)."""

    def load_state_dict(self, state_dict: Any, *args: Any, **kwargs: Any) -> Any:
        reshape_to_state_dict(self, state_dict)
        return super().load_state_dict(state_dict, *args, **kwargs)


def _shapes_and_weights(pl_module: Any) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in pl_module.state_dict().items()}


@pytest.mark.ddp
def test_ddp_structured_ranks_end_with_identical_shapes_and_weights(tmp_path: Path) -> None:
    """After each structural step the DDP wrapper and optimizer are rebuilt: gradients stay in sync across ranks
    (each rank sees different data, so unsynced ranks would diverge)."""
    pruning = MagnitudePruning(mode="structured", final_sparsity=0.5, start_step=1, end_step=3, every_n_steps=2)
    dump = RankStateDump(tmp_path, fn=_shapes_and_weights)
    module = _ReshapingHFModule(kind="llama")
    trainer = Trainer(**trainer_kwargs(tmp_path, strategy="ddp_spawn", devices=2, max_steps=5, logger=False,
                                       callbacks=[pruning, dump]))
    trainer.fit(module)
    rank0 = torch.load(tmp_path / "rank0.pt", weights_only=True)
    rank1 = torch.load(tmp_path / "rank1.pt", weights_only=True)
    assert rank0.keys() == rank1.keys()
    for key in rank0:
        torch.testing.assert_close(rank0[key], rank1[key], rtol=0, atol=0, msg=key)
    assert rank0["model.model.layers.0.mlp.up_proj.weight"].shape[0] == 64
    assert structure(module)["model.model.layers.0.mlp"]["neurons"] == 64  # main process took the pruned shapes


# ----------------------------------------------------------------------------------------------- CLI recipes


@pytest.mark.parametrize(("recipe", "mode"), [("pruning.yaml", "unstructured"), ("pruning_structured.yaml",
                                                                                   "structured")])
def test_cli_recipe_configures_the_callback(recipe: str, mode: str) -> None:
    import warnings

    from lightning_latency import LightningLatencyDeprecationWarning

    cli_module = pytest.importorskip(f"{pl.__name__}.cli")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        cli = cli_module.LightningCLI(
            HFModule, run=False, save_config_callback=None,
            args=["--config", str(ROOT / "callbacks" / recipe), "--trainer.logger=false",
                  "--trainer.enable_progress_bar=false"],
        )
    assert not [w for w in caught if issubclass(w.category, LightningLatencyDeprecationWarning)]  # new names only
    found = [c for c in cli.trainer.callbacks if isinstance(c, MagnitudePruning)]
    assert len(found) == 1 and found[0].config.mode.value == mode
    assert 0 < found[0].schedule.final_sparsity < 1 and found[0].schedule.end > found[0].schedule.start
