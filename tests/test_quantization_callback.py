"""``QuantizationAwareTraining`` in real tiny Trainer runs: schedule, logging, checkpoints, fit twice, pruning, DDP."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from helpers import HFModule, RankStateDump, read_csv_metrics, trainer_kwargs
from torch.utils.data import DataLoader

from lightning_latency._compat import CallbackBase, Trainer
from lightning_latency.quantization.callback import QuantizationAwareTraining
from lightning_latency.quantization.controller import RESERVED_KEY
from lightning_latency.quantization.qat import (
    converted_modules,
    fake_quantized_modules,
    is_converted,
    is_frozen,
    is_prepared,
    weight_qparams,
)

RECIPE = Path(__file__).resolve().parents[1] / "callbacks" / "qat.yaml"


class QATModule(HFModule):
    """HFModule with a test loop (module level, so ddp_spawn can pickle it)."""

    def test_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        self.log("test_loss", self.model(**batch).loss)

    def test_dataloader(self) -> DataLoader:
        return DataLoader(self._dataset(1), batch_size=self.batch_size)


class PhaseProbe(CallbackBase):
    """Records (prepared, frozen) at each training batch, after the QAT callback's own hook ran."""

    def __init__(self) -> None:
        self.phases: list[tuple[bool, bool]] = []
        self.zero_checks: list[bool] = []

    def on_train_batch_start(self, trainer: Any, pl_module: Any, batch: Any, batch_idx: int) -> None:
        self.phases.append((is_prepared(pl_module), is_frozen(pl_module)))
        # pruned (zero) weights must stay exactly zero after fake quantization
        for module in fake_quantized_modules(pl_module).values():
            zeros = module.weight == 0
            if zeros.any():
                self.zero_checks.append(bool((module.weight_fake_quantizer(module.weight)[zeros] == 0).all()))


def _qparams_and_buffers(pl_module: Any) -> dict[str, torch.Tensor]:
    state = {f"qparams/{k}": v for k, v in weight_qparams(pl_module).items()}
    state.update({k: v.detach().clone() for k, v in pl_module.state_dict().items()})
    return state


def _fit(tmp_path: Path, module: Any, callbacks: list[Any], **overrides: Any) -> Any:
    trainer = Trainer(callbacks=callbacks, **trainer_kwargs(tmp_path, **overrides))
    trainer.fit(module)
    return trainer


def test_fit_fake_quantizes_logs_and_converts(tmp_path: Path) -> None:
    module, probe = QATModule(), PhaseProbe()
    trainer = _fit(tmp_path, module, [QuantizationAwareTraining(log_every_n_steps=1), probe], log_every_n_steps=1)
    assert all(prepared for prepared, _ in probe.phases)  # fake-quantized for every step (start_step=0)
    assert is_converted(module) and not fake_quantized_modules(module)
    converted = converted_modules(module)
    assert len(converted) == 13 and "model.classifier" not in converted
    assert type(module.model.bert.encoder.layer[0].output.dense.weight).__name__ == "Int8Tensor"
    rows = read_csv_metrics(trainer)
    errors = [float(r["qat/weight_rel_error"]) for r in rows if r.get("qat/weight_rel_error")]
    assert errors and all(0 < e < 0.02 for e in errors)
    assert any(r.get("qat/converted") == "1.0" for r in rows)
    hparams = (Path(trainer.logger.log_dir) / "hparams.yaml").read_text()
    assert "qat/scheme: int8_dynamic" in hparams and "model.bert.encoder.layer.0.attention.self.query" in hparams


def test_start_and_freeze_follow_the_schedule(tmp_path: Path) -> None:
    module, probe = QATModule(), PhaseProbe()
    qat = QuantizationAwareTraining(start_step=2, freeze_step=3, convert_on_fit_end=False)
    _fit(tmp_path, module, [qat, probe], max_steps=5)
    assert probe.phases == [(False, False), (False, False), (True, False), (True, True), (True, True)]
    assert qat.state_dict()["phase"] == "frozen" and qat.prepared_at_step == 2 and qat.frozen_at_step == 3
    assert is_prepared(module) and not is_converted(module)


def test_start_epoch(tmp_path: Path) -> None:
    module, probe = QATModule(n=16), PhaseProbe()  # 2 batches per epoch
    _fit(tmp_path, module, [QuantizationAwareTraining(start_epoch=1, convert_on_fit_end=False), probe], max_steps=4)
    assert [prepared for prepared, _ in probe.phases] == [False, False, True, True]


def test_llm_with_keyword_inputs_int8_int4(tmp_path: Path) -> None:
    module = QATModule(kind="llama")
    _fit(tmp_path, module, [QuantizationAwareTraining(scheme="int8_int4", group_size=32)], max_steps=3)
    layer = module.model.model.layers[0]
    assert type(layer.mlp.down_proj.weight).__name__ == "IntxUnpackedToInt8Tensor"
    assert not is_converted(module.model.lm_head) and type(module.model.model.embed_tokens.weight) is torch.nn.Parameter
    batch = module.train_dataloader().dataset[0]
    with torch.no_grad():
        out = module(input_ids=batch["input_ids"][None], attention_mask=batch["attention_mask"][None])
    assert torch.isfinite(out.logits).all()


def test_resume_mid_qat_into_a_fresh_model(tmp_path: Path) -> None:
    # 2 batches per epoch: stop at an epoch boundary so the data order of the resumed run matches.
    def qat() -> QuantizationAwareTraining:
        return QuantizationAwareTraining(freeze_step=1, convert_on_fit_end=False)

    straight = QATModule(n=16)
    _fit(tmp_path / "a", straight, [qat()], max_steps=4)

    first = QATModule(n=16)
    trainer = _fit(tmp_path / "b", first, [qat()], max_steps=2)
    ckpt = tmp_path / "mid_qat.ckpt"
    trainer.save_checkpoint(ckpt)
    saved = torch.load(ckpt, weights_only=True)  # plain data only: loadable without trusting the file
    assert any(k.endswith("weight_fake_quantizer.scale") for k in saved["state_dict"])  # frozen ranges are saved
    assert saved["state_dict"][RESERVED_KEY]["phase"] == "frozen"  # what the load needs, beside the weights

    fresh, resumed_cb = QATModule(n=16), qat()  # plain float model, new callback
    resumed = Trainer(callbacks=[resumed_cb], **trainer_kwargs(tmp_path / "c", max_steps=4))
    resumed.fit(fresh, ckpt_path=ckpt)
    assert resumed.global_step == 4 and is_frozen(fresh) and resumed_cb.frozen_at_step == 1
    expected = straight.state_dict()
    got = fresh.state_dict()
    assert set(got) == set(expected)
    for key, value in expected.items():
        torch.testing.assert_close(got[key], value, atol=1e-5, rtol=1e-5, msg=key)


_KILLED_RUN = """
import os, signal, sys
import torch
from helpers import HFModule, trainer_kwargs
from lightning_latency._compat import CallbackBase, Trainer
from lightning_latency.quantization.callback import QuantizationAwareTraining

class SaveThenDie(CallbackBase):
    def on_train_epoch_end(self, trainer, pl_module):
        if trainer.global_step == 4:  # frozen phase (start_step=1, freeze_step=2), at an epoch boundary
            trainer.save_checkpoint(sys.argv[1])
            os.kill(os.getpid(), signal.SIGKILL)

torch.manual_seed(0)
qat = QuantizationAwareTraining(start_step=1, freeze_step=2, convert_on_fit_end=False)
Trainer(callbacks=[qat, SaveThenDie()], **trainer_kwargs(sys.argv[2], max_steps=6)).fit(HFModule(n=16))
"""


def test_sigkilled_in_the_frozen_phase_with_start_step_resumes_exactly(tmp_path: Path) -> None:
    import os
    import signal
    import subprocess
    import sys

    def qat() -> QuantizationAwareTraining:
        return QuantizationAwareTraining(start_step=1, freeze_step=2, convert_on_fit_end=False)

    torch.manual_seed(0)
    straight, straight_cb = HFModule(n=16), qat()
    _fit(tmp_path / "a", straight, [straight_cb], max_steps=6)

    ckpt = tmp_path / "killed.ckpt"
    tests = Path(__file__).resolve().parent
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tests.parent), str(tests)])}
    done = subprocess.run([sys.executable, "-c", _KILLED_RUN, str(ckpt), str(tmp_path / "b")], env=env,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == -signal.SIGKILL, done.stderr[-3000:]
    assert ckpt.exists()

    torch.manual_seed(0)
    fresh, resumed_cb = HFModule(n=16), qat()  # plain float model, new callback
    resumed = Trainer(callbacks=[resumed_cb], **trainer_kwargs(tmp_path / "c", max_steps=6))
    resumed.fit(fresh, ckpt_path=ckpt)
    assert resumed.global_step == 6 and is_frozen(fresh)
    assert resumed_cb.state_dict() == straight_cb.state_dict()
    assert resumed_cb.prepared_at_step == 1 and resumed_cb.frozen_at_step == 2
    expected, got = straight.state_dict(), fresh.state_dict()
    assert set(got) == set(expected)
    for key, value in expected.items():
        torch.testing.assert_close(got[key], value, atol=0, rtol=0, msg=key)  # same ops, same order: bitwise


def test_test_ckpt_path_after_conversion(tmp_path: Path) -> None:
    module = QATModule()
    trainer = _fit(tmp_path, module, [QuantizationAwareTraining()], max_steps=3)
    ckpt = tmp_path / "converted.ckpt"
    trainer.save_checkpoint(ckpt)
    expected = trainer.test(module, verbose=False)[0]["test_loss"]
    saved = torch.load(ckpt, weights_only=True)
    entry = saved["state_dict"][RESERVED_KEY]  # the module itself is the target: no prefix
    assert entry["phase"] == "converted" and len(entry["packed"]) == 13 and "lightning_latency_qat" not in saved

    fresh = QATModule()  # float weights, not prepared
    tester = Trainer(callbacks=[QuantizationAwareTraining()], **trainer_kwargs(tmp_path / "t"))
    got = tester.test(fresh, ckpt_path=ckpt, verbose=False)[0]["test_loss"]
    assert is_converted(fresh)
    assert got == pytest.approx(expected, abs=1e-6)


def test_checkpoint_entry_of_a_submodule_target_sits_under_its_prefix(tmp_path: Path) -> None:
    module = QATModule()
    trainer = _fit(tmp_path, module, [QuantizationAwareTraining(model_attr="model", freeze_step=1)], max_steps=2)
    ckpt = tmp_path / "sub.ckpt"
    trainer.save_checkpoint(ckpt)
    state = torch.load(ckpt, weights_only=True)["state_dict"]
    assert state[f"model.{RESERVED_KEY}"]["phase"] == "converted" and RESERVED_KEY not in state
    expected = trainer.test(module, verbose=False)[0]["test_loss"]
    fresh = QATModule()
    tester = Trainer(callbacks=[QuantizationAwareTraining(model_attr="model")], **trainer_kwargs(tmp_path / "t"))
    assert tester.test(fresh, ckpt_path=ckpt, verbose=False)[0]["test_loss"] == pytest.approx(expected, abs=1e-6)
    assert is_converted(fresh.model)


def test_test_ckpt_path_last_after_a_qat_fit(tmp_path: Path) -> None:
    from lightning_latency._compat import pl

    module = QATModule()
    checkpoint = pl.callbacks.ModelCheckpoint(dirpath=tmp_path / "ckpts", save_last=True)
    trainer = _fit(tmp_path, module, [QuantizationAwareTraining(freeze_step=2), checkpoint], max_steps=4,
                   enable_checkpointing=True)
    assert is_converted(module)
    expected = trainer.test(module, verbose=False)[0]["test_loss"]  # the converted model, as fit left it
    # "last" was written before the fit-end conversion: fake-quant float weights with frozen ranges
    got = trainer.test(module, ckpt_path="last", verbose=False)[0]["test_loss"]
    assert is_converted(module)
    assert got == pytest.approx(expected, abs=1e-6)

    # the same file on a fresh float module is tested as the quantized model, not silently in fp32
    fresh = QATModule()
    tester = Trainer(callbacks=[QuantizationAwareTraining(freeze_step=2)], **trainer_kwargs(tmp_path / "t"))
    fresh_loss = tester.test(fresh, ckpt_path=checkpoint.last_model_path, verbose=False)[0]["test_loss"]
    assert is_converted(fresh)
    assert fresh_loss == pytest.approx(expected, abs=1e-6)


def test_fit_twice(tmp_path: Path) -> None:
    module, qat = QATModule(), QuantizationAwareTraining()
    _fit(tmp_path / "1", module, [qat], max_steps=2)
    first = module.model.bert.encoder.layer[0].output.dense.weight.dequantize().clone()
    with pytest.warns(UserWarning, match="already converted"):
        _fit(tmp_path / "2", module, [qat], max_steps=2)
    second = module.model.bert.encoder.layer[0].output.dense.weight
    assert is_converted(module) and not torch.equal(second.dequantize(), first)  # it trained again

    keep = QATModule()
    qat = QuantizationAwareTraining(convert_on_fit_end=False)
    _fit(tmp_path / "3", keep, [qat], max_steps=2)
    quantizer = keep.model.bert.pooler.dense.weight_fake_quantizer
    _fit(tmp_path / "4", keep, [qat], max_steps=2)
    assert keep.model.bert.pooler.dense.weight_fake_quantizer is quantizer  # continued, not re-prepared


def test_fit_with_a_torchao_config_converts_to_the_fake_quant_function(tmp_path: Path) -> None:
    from torchao.quantization import IntxWeightOnlyConfig
    from torchao.quantization.granularity import PerGroup

    base = IntxWeightOnlyConfig(weight_dtype=torch.int4, granularity=PerGroup(32))
    module, qat = QATModule(), QuantizationAwareTraining(scheme=base, convert_on_fit_end=False, log_every_n_steps=1)
    trainer = _fit(tmp_path, module, [qat], max_steps=3, log_every_n_steps=1)
    assert qat.deploy_config() is qat.config and qat.config.scheme is base and qat.config.backend.value == "torchao"
    assert len(qat.quantized) == 13 and is_prepared(module)
    rows = read_csv_metrics(trainer)
    errors = [float(r["qat/weight_rel_error"]) for r in rows if r.get("qat/weight_rel_error")]
    assert errors and all(0.02 < e < 0.3 for e in errors)  # int4 g32: ~10x the int8 error
    batch = {k: v[:4] for k, v in next(iter(module.train_dataloader())).items() if k != "labels"}
    module.eval()
    with torch.no_grad():
        fake = module.model(**batch).logits
        qat.convert(module)
        real = module.model(**batch).logits
    assert type(module.model.bert.pooler.dense.weight).__name__ == "IntxUnpackedToInt8Tensor"
    # Weight only: the int4 kernel multiplies by the same dequantized weights the fake quantizer produced, so the
    # outputs differ only by float accumulation order (logits ~0.1: < 1e-3), far below one int4 step (~1e-2 here).
    torch.testing.assert_close(real, fake, atol=1e-3, rtol=0)


def test_skip_is_the_deprecated_name_of_exclude(tmp_path: Path) -> None:
    from lightning_latency._deprecation import LightningLatencyDeprecationWarning

    with pytest.warns(LightningLatencyDeprecationWarning, match=r"QuantizationAwareTraining\(`skip`=.*`exclude="):
        qat = QuantizationAwareTraining(skip=["*pooler*", "*classifier*"], convert_on_fit_end=False)
    module = QATModule()
    _fit(tmp_path, module, [qat], max_steps=1)
    assert qat.config.exclude == ["*pooler*", "*classifier*"] and "model.bert.pooler.dense" not in qat.quantized
    assert len(qat.quantized) == 12 and not is_prepared(module.model.bert.pooler)


def test_composes_with_magnitude_pruning_and_keeps_zeros(tmp_path: Path) -> None:
    from lightning_latency.pruning.callback import MagnitudePruning

    module, probe = QATModule(), PhaseProbe()
    # Pruning first in the list: its end-of-fit mask re-application must run before QAT converts.
    pruning = MagnitudePruning(mode="unstructured", final_sparsity=0.5, start_step=0, end_step=1, every_n_steps=1,
                               make_permanent=True)
    _fit(tmp_path, module, [pruning, QuantizationAwareTraining(start_step=2), probe], max_steps=5)
    assert probe.zero_checks and all(probe.zero_checks)  # zeros survive fake quantization during QAT
    converted = converted_modules(module)
    pruned = [n for n in converted if (converted[n].weight.dequantize() == 0).float().mean() >= 0.45]
    assert len(pruned) >= 10  # pruned layers are still ~50% zero after conversion to int8


def test_cli_recipe_configures_the_callback(tmp_path: Path) -> None:
    import importlib

    from lightning_latency._compat import BACKEND

    cli = importlib.import_module(f"{BACKEND}.cli").LightningCLI(QATModule, run=False, save_config_callback=None,
                              args=["--config", str(RECIPE), f"--trainer.default_root_dir={tmp_path}",
                                    "--trainer.logger=false", "--trainer.enable_progress_bar=false"])
    callbacks = [c for c in cli.trainer.callbacks if isinstance(c, QuantizationAwareTraining)]
    assert len(callbacks) == 1
    qat = callbacks[0]
    assert qat.config.scheme.value == "int8_dynamic" and qat.freeze_step == 250 and qat.convert_on_fit_end
    assert "*classifier*" in qat.config.exclude_patterns and cli.trainer.max_steps == 300


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"scheme": "fp6"}, r"`scheme` must be one of .*got 'fp6'"),
        ({"start_step": 5, "freeze_step": 3}, r"`freeze_step`=3 must be after `start_step`=5.*freeze_step > 5"),
        ({"start_step": -1}, r"`start_step` must be an int >= 0, got -1"),
        ({"start_step": 2, "start_epoch": 1}, r"Give one of `start_step` \(2\) and `start_epoch` \(1\)"),
        ({"group_size": -8}, r"`group_size` must be a positive int.*got -8"),
        ({"scheme": "int8_int4", "backend": "x86"}, r"`backend`='x86'.*backend='torchao'"),
        ({"backend": "cuda"}, r"`backend` must be one of 'x86', 'torchao', .*got 'cuda'"),
        ({"log_every_n_steps": 1.5}, r"`log_every_n_steps` must be an int >= 0"),
    ],
)
def test_callback_misconfiguration(kwargs: dict[str, Any], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        QuantizationAwareTraining(**kwargs)


def test_nothing_matched_fails_at_fit_start_with_the_fix(tmp_path: Path) -> None:
    from lightning_latency._compat import MisconfigurationException

    with pytest.raises(MisconfigurationException, match=r"Nothing to quantize.*Fix the patterns"):
        _fit(tmp_path, QATModule(), [QuantizationAwareTraining(targets=["*conv*"])])


class _StepCounter(CallbackBase):
    def __init__(self) -> None:
        self.steps = 0

    def on_train_batch_start(self, trainer: Any, pl_module: Any, batch: Any, batch_idx: int) -> None:
        self.steps += 1


@pytest.mark.parametrize(("kwargs", "match"), [
    (dict(targets=["*conv*"], start_step=1000), r"QuantizationAwareTraining: Nothing to quantize.*\*conv\*"),
    (dict(scheme="int8_int4", group_size=48, start_step=1000), r"QuantizationAwareTraining: .*group_size.*48"),
    (dict(targets=["re:nothing\\.here"], start_step=1000), r"QuantizationAwareTraining: Nothing to quantize.*re:"),
    (dict(scheme="per_tensor_int8", start_step=1000), r"QuantizationAwareTraining: `scheme`=.*cannot be fake-quant"),
])
def test_qat_problems_are_found_in_setup_not_at_start_step(tmp_path: Path, kwargs: dict[str, Any], match: str) -> None:
    from lightning_latency._compat import MisconfigurationException

    if kwargs.get("scheme") == "per_tensor_int8":  # a torchao config that QATConfig cannot prepare
        from torchao.quantization import Int8DynamicActivationInt8WeightConfig
        from torchao.quantization.granularity import PerTensor

        kwargs = {**kwargs, "scheme": Int8DynamicActivationInt8WeightConfig(granularity=PerTensor())}
    module, counter = QATModule(), _StepCounter()
    before = {k: v.clone() for k, v in module.state_dict().items()}
    with pytest.raises(MisconfigurationException, match=match):
        _fit(tmp_path, module, [QuantizationAwareTraining(**kwargs), counter], max_steps=2)
    assert counter.steps == 0 and not is_prepared(module)
    assert all(torch.equal(v, before[k]) for k, v in module.state_dict().items())


@pytest.mark.ddp
def test_ddp_ranks_share_ranges_and_weights(tmp_path: Path) -> None:
    dump = RankStateDump(tmp_path, fn=_qparams_and_buffers)
    qat = QuantizationAwareTraining(freeze_step=2)
    trainer = Trainer(callbacks=[dump, qat], **trainer_kwargs(tmp_path, strategy="ddp_spawn", devices=2,
                                                               max_steps=3))
    module = QATModule()
    trainer.fit(module)  # the workers warn that they do not convert (their warnings stay in the workers)
    # The main process gets the QAT-trained float weights back and converts them on request.
    assert not is_converted(module) and len(qat.convert(module)) == 13 and is_converted(module)
    rank0 = torch.load(tmp_path / "rank0.pt", weights_only=False)
    rank1 = torch.load(tmp_path / "rank1.pt", weights_only=False)
    assert set(rank0) == set(rank1)
    assert any(k.startswith("qparams/") for k in rank0)
    assert any(k.endswith("weight_fake_quantizer.scale") for k in rank0)
    for key in rank0:
        torch.testing.assert_close(rank0[key], rank1[key], atol=0, rtol=0, msg=key)


def test_deploy_config_only_once_the_model_is_quantized(tmp_path: Path) -> None:
    # LatencyMonitor deploys the final form with this config: a QAT run whose start never came left a float model
    late = QuantizationAwareTraining(start_step=100, convert_on_fit_end=False)
    Trainer(callbacks=[late], **trainer_kwargs(tmp_path / "late", max_steps=2)).fit(HFModule())
    assert late.compresses and late.deploy_config() is None
    early = QuantizationAwareTraining(start_step=0)
    Trainer(callbacks=[early], **trainer_kwargs(tmp_path / "early", max_steps=2)).fit(HFModule())
    assert early.deploy_config() is early.config
