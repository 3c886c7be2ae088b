"""Multi-device behaviour of the whole plugin (lightning_latency/strategies.py and every callback under DDP/FSDP).

DDP tests run two CPU processes with gloo (``ddp_strategy(start_method="spawn")``, ~15-30 s per fit), so the
assertions are packed into few fits. FSDP tests need a GPU (Lightning refuses FSDP on CPU) and are skipped here.
"""

from __future__ import annotations

import multiprocessing
import signal
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from helpers import HFModule, LMDataset, RankStateDump, TokenDataset, tiny_bert, tiny_llama, trainer_kwargs
from torch import nn
from torch.utils.data import DataLoader

from lightning_latency import LatencyMonitor, MagnitudePruning, QuantizationAwareTraining, ddp_strategy
from lightning_latency._compat import CallbackBase, MisconfigurationException, Trainer
from lightning_latency.distillation import student_from_teacher_layers
from lightning_latency.distillation.module import DistillationModule
from lightning_latency.pruning import structure
from lightning_latency.quantization.qat import fake_quantized_modules, is_prepared

FIT_TIMEOUT_S = 180  # a DDP fit here takes 15-30 s; a hang is a failure, not a stuck CI job


@pytest.fixture
def bounded() -> Iterator[None]:
    """Fail (instead of hanging) if the block runs past FIT_TIMEOUT_S: kill the spawned ranks and raise."""

    def _expire(signum: int, frame: Any) -> None:
        for child in multiprocessing.active_children():
            child.kill()
        raise TimeoutError(f"a 2-process fit did not finish within {FIT_TIMEOUT_S} s (a rank is waiting forever)")

    previous = signal.signal(signal.SIGALRM, _expire)
    signal.alarm(FIT_TIMEOUT_S)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


def _ranks(folder: Path) -> tuple[dict[str, Any], dict[str, Any]]:
    return tuple(torch.load(folder / f"rank{r}.pt", weights_only=False) for r in (0, 1))  # type: ignore[return-value]


def _assert_same(a: Any, b: Any, where: str = "") -> None:
    """Bit-identical nested state (tensors compared with torch.equal, dtype and shape included)."""
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.dtype == b.dtype and a.shape == b.shape, where
        assert torch.equal(a, b), f"ranks differ at {where}"
    elif isinstance(a, dict):
        assert a.keys() == b.keys(), where
        for k in a:
            _assert_same(a[k], b[k], f"{where}/{k}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            _assert_same(x, y, f"{where}[{i}]")
    else:
        assert a == b, f"ranks differ at {where}: {a!r} != {b!r}"


def _csv_rows(folder: Path) -> list[dict[str, str]]:
    """Metrics rank 0 wrote (read from disk: the main process's logger never saw them under spawn)."""
    import csv

    rows: list[dict[str, str]] = []
    for path in sorted(folder.glob("logs/*/metrics.csv")):
        with path.open() as fh:
            rows += list(csv.DictReader(fh))
    return rows


def _callbacks_of(trainer: Any, cls: type) -> Any:
    return next(cb for cb in trainer.callbacks if isinstance(cb, cls))


class _Dump:
    """``RankStateDump`` function: everything that must match across ranks, plus what only rank 0 should have."""

    def __call__(self, pl_module: Any) -> dict[str, Any]:
        trainer = pl_module.trainer
        pruning = _callbacks_of(trainer, MagnitudePruning)
        qat = next((cb for cb in trainer.callbacks if isinstance(cb, QuantizationAwareTraining)), None)
        mon = _callbacks_of(trainer, LatencyMonitor)
        target = getattr(pl_module, "compression_target", pl_module)
        state = {
            "weights": {k: v.detach().clone() for k, v in pl_module.state_dict().items()},
            "masks": {k: v.clone() for k, v in pruning.masks.items()},
            "pruning_state": {k: v for k, v in pruning.state_dict().items() if k != "masks"},
            "structure": structure(target) if pruning.config.mode.value == "structured" else {},
            "qat_state": qat.state_dict() if qat is not None else None,
            "fake_quantized": sorted(fake_quantized_modules(target)) if qat is not None else [],
        }
        only_rank0 = {"latency_records": len(mon.records)}
        return {"shared": state, "rank": only_rank0}


# ---------------------------------------------------------------------------------------------------------- DDP


@pytest.mark.ddp
def test_ddp_all_together_distillation_pruning_qat_latency(tmp_path: Path, bounded: None) -> None:
    """DistillationModule + unstructured MagnitudePruning + QAT + LatencyMonitor(data_parallel) in one DDP fit."""
    teacher = tiny_bert(layers=2)
    module = DistillationModule(student_from_teacher_layers(teacher, [0]), teacher, lr=1e-2)
    t0 = {k: v.clone() for k, v in teacher.state_dict().items()}
    ids = TokenDataset(4, 12, 5).ids
    callbacks = [
        MagnitudePruning(mode="unstructured", final_sparsity=0.5, start_step=1, end_step=3, make_permanent=False,
                         log_per_layer=False),
        QuantizationAwareTraining(scheme="int8_dynamic", start_step=2, log_every_n_steps=1),
        LatencyMonitor(inputs={"input_ids": ids, "attention_mask": torch.ones_like(ids)}, data_parallel=True,
                       warmup=1, min_runs=2, max_time_s=0.1, report_file=None, generation=False),
        RankStateDump(tmp_path, _Dump()),
    ]
    trainer = Trainer(**trainer_kwargs(tmp_path, strategy=ddp_strategy(start_method="spawn"), devices=2,
                                       max_steps=4, log_every_n_steps=1, callbacks=callbacks))
    # different data per rank (DistributedSampler): only synchronised gradients keep the ranks identical
    trainer.fit(module, DataLoader(TokenDataset(32, 12, 0), batch_size=4))
    r0, r1 = _ranks(tmp_path)
    _assert_same(r0["shared"], r1["shared"])
    shared = r0["shared"]
    # pruning acted on the student (mask names relative to it), decisions identical (compared above)
    assert shared["masks"] and not any(k.startswith("teacher") for k in shared["masks"])
    kept = sum(int(m.sum()) for m in shared["masks"].values()) / sum(m.numel() for m in shared["masks"].values())
    assert kept == pytest.approx(0.5, abs=0.02)
    # QAT prepared the student only, on both ranks, at the same step
    assert shared["qat_state"]["phase"] == "prepared" and shared["qat_state"]["prepared_at_step"] == 2
    assert shared["fake_quantized"] and all(not n.startswith("teacher") for n in shared["fake_quantized"])
    # the teacher is untouched on both ranks
    for k, v in t0.items():
        assert torch.equal(shared["weights"][f"teacher.{k}"], v), k
    # only rank 0 measured; the data-parallel numbers of both ranks reached rank 0's logger
    assert r0["rank"]["latency_records"] == 2 and r1["rank"]["latency_records"] == 0
    rows = _csv_rows(tmp_path)
    dp = [r for r in rows if r.get("latency/dp_samples_per_s")]
    assert len(dp) == 2 and all(float(r["latency/dp_world_size"]) == 2 for r in dp)
    assert all(float(r["latency/dp_samples_per_s"]) > 0 for r in dp)
    assert any(r.get("pruning/sparsity") for r in rows) and any(r.get("qat/weight_rel_error") for r in rows)


@pytest.mark.ddp
def test_ddp_structured_pruning_then_qat_on_a_gqa_llama_student(tmp_path: Path, bounded: None) -> None:
    """Structured pruning of a DistillationModule's GQA Llama student (optimizer and DDP wrapper rebuilt), then QAT:
    shapes, weights and QAT state identical on both ranks; the spawn main process gets the pruned student back."""
    teacher = tiny_llama(layers=2)
    module = DistillationModule(student_from_teacher_layers(teacher, [0, 1]), teacher, lr=1e-2)
    callbacks = [
        MagnitudePruning(mode="structured", final_sparsity=0.5, start_step=1, end_step=2, every_n_steps=1,
                         log_per_layer=False),
        QuantizationAwareTraining(scheme="int8_dynamic", start_step=3, convert_on_fit_end=False, log_every_n_steps=0),
        LatencyMonitor(warmup=1, min_runs=2, max_time_s=0.1, report_file=None, generation=False),
        RankStateDump(tmp_path, _Dump()),
    ]
    trainer = Trainer(**trainer_kwargs(tmp_path, strategy=ddp_strategy(start_method="spawn"), devices=2,
                                       max_steps=5, logger=False, callbacks=callbacks))
    trainer.fit(module, DataLoader(LMDataset(32, 12, 0), batch_size=4))
    r0, r1 = _ranks(tmp_path)
    _assert_same(r0["shared"], r1["shared"])
    shapes = r0["shared"]["structure"]
    assert shapes and all(s.get("heads", 2) == 2 and s.get("neurons", 64) == 64 for s in shapes.values())
    assert r0["shared"]["qat_state"]["prepared_at_step"] == 3 and r0["shared"]["fake_quantized"]
    assert r0["rank"]["latency_records"] == 2 and r1["rank"]["latency_records"] == 0
    assert structure(module.student) == shapes  # the main process got the pruned student back
    assert structure(module.teacher) != shapes  # and the teacher kept its heads and neurons


def _rank_skewed_latency(model: nn.Module) -> float:
    """A latency that rank 1 measures 30% higher than rank 0 (as two busy processes would): one plan must win."""
    import torch.distributed as dist

    from test_pruning_budget import fake_latency_depth

    skew = 1.3 if dist.is_available() and dist.is_initialized() and dist.get_rank() == 1 else 1.0
    return skew * fake_latency_depth(model)


class _BudgetDump:
    def __call__(self, pl_module: Any) -> dict[str, Any]:
        from lightning_latency import LatencyBudgetPruning
        from lightning_latency.pruning.depth import skipped_layers

        budget = _callbacks_of(pl_module.trainer, LatencyBudgetPruning)
        state = budget.state_dict()
        return {"weights": {k: v.detach().clone() for k, v in pl_module.state_dict().items()},
                "structure": structure(pl_module.student), "skipped": skipped_layers(pl_module.student),
                "plan": state["plan"], "reserve": state["reserve"], "applied": state["applied"],
                "history": state["history"], "last_ms": state["last_ms"]}


@pytest.mark.ddp
def test_ddp_budget_pruning_with_depth_and_landing_ends_identical_on_both_ranks(tmp_path: Path, bounded: None) -> None:
    """Rank 1 measures everything 30% slower; rank 0's measurements decide the plan, every landing trial and every
    stop, so both ranks end with the same layers removed, the same widths and the same weights."""
    from lightning_latency import LatencyBudgetPruning

    teacher = tiny_llama(layers=3)
    module = DistillationModule(student_from_teacher_layers(teacher, [0, 1, 2]), teacher, lr=1e-2)
    budget = LatencyBudgetPruning(target_ms=0.6 * _rank_skewed_latency(module.student),
                                  latency_fn=_rank_skewed_latency, start_step=1, every_n_steps=1, steps=2,
                                  calibration_batches=1, depth=True)
    trainer = Trainer(**trainer_kwargs(tmp_path, strategy=ddp_strategy(start_method="spawn"), devices=2,
                                       max_steps=4, logger=False, callbacks=[budget, RankStateDump(tmp_path,
                                                                                                   _BudgetDump())]))
    trainer.fit(module, DataLoader(LMDataset(32, 12, 0), batch_size=4))
    r0, r1 = _ranks(tmp_path)
    _assert_same(r0, r1)
    assert r0["applied"] > 0 and r0["history"][-1][1] <= budget.target_ms  # rank 0's numbers, on both ranks
    assert structure(module.student) == r0["structure"]  # the spawn main process got the pruned student back


class _FailsOnRank1(HFModule):
    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        if self.global_rank == 1 and batch_idx == 1:
            raise RuntimeError("boom on rank 1")
        return super().training_step(batch, batch_idx)


@pytest.mark.ddp
def test_an_error_on_one_rank_fails_the_fit_instead_of_hanging(tmp_path: Path, bounded: None) -> None:
    # rank 0 is inside a collective (DDP's gradient all-reduce / the monitor's barrier) when rank 1 dies
    mon = LatencyMonitor(warmup=1, min_runs=2, max_time_s=0.05, report_file=None, generation=False,
                         data_parallel=True)
    trainer = Trainer(**trainer_kwargs(tmp_path, strategy=ddp_strategy(start_method="spawn"), devices=2,
                                       max_steps=4, logger=False, callbacks=[mon]))
    with pytest.raises(Exception, match="boom on rank 1"):
        trainer.fit(_FailsOnRank1(kind="bert"))


_POPEN_SCRIPT = """
from pathlib import Path
from helpers import HFModule, trainer_kwargs
from lightning_latency import ddp_strategy
from lightning_latency._compat import Trainer


class FailsOnRank1(HFModule):
    def training_step(self, batch, batch_idx):
        if self.global_rank == 1 and batch_idx == 1:
            raise RuntimeError("boom on rank 1")
        return super().training_step(batch, batch_idx)


if __name__ == "__main__":
    Trainer(**trainer_kwargs(Path("."), strategy=ddp_strategy(), devices=2, max_steps=4, logger=False)).fit(
        FailsOnRank1(kind="bert"))
"""


@pytest.mark.ddp
def test_popen_ddp_error_on_rank_1_also_ends_rank_0(tmp_path: Path) -> None:
    """strategy='ddp' re-launches the script: rank 0 is the launching process and is not killed when rank 1 dies;
    it must fail on its own (gloo sees the closed connection) instead of waiting for the 30-minute timeout."""
    import os
    import subprocess
    import sys

    root = Path(__file__).resolve().parents[1]
    script = tmp_path / "fit_fails_on_rank1.py"
    script.write_text(_POPEN_SCRIPT)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(root), str(root / "tests")])}
    done = subprocess.run([sys.executable, str(script)], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=FIT_TIMEOUT_S)  # raises TimeoutExpired (the test fails) if rank 0 hangs
    assert done.returncode != 0
    assert "boom on rank 1" in done.stdout + done.stderr


def test_data_parallel_on_one_device_logs_world_size_one_and_validates(tmp_path: Path) -> None:
    mon = LatencyMonitor(model_attr="model", data_parallel=True, warmup=1, min_runs=2, max_time_s=0.05,
                         report_file=None, generation=False)
    trainer = Trainer(**trainer_kwargs(tmp_path, max_steps=2, limit_val_batches=1, callbacks=[mon]))
    trainer.fit(HFModule(kind="bert"))
    rows = [r for r in _csv_rows(tmp_path) if r.get("latency/dp_samples_per_s")]
    assert len(rows) == 2 and all(float(r["latency/dp_world_size"]) == 1 for r in rows)
    assert all(r["data_parallel"]["world_size"] == 1 for r in mon.records)
    with pytest.raises(ValueError, match=r"`data_parallel` must be True or False, got 'yes'"):
        LatencyMonitor(data_parallel="yes")


# ---------------------------------------------------------------------------------------------------------- FSDP


def _gpu_distill() -> DistillationModule:
    teacher = tiny_llama(layers=2)
    return DistillationModule(student_from_teacher_layers(teacher, [1]), teacher, lr=1e-2)


class _FSDPProbe(CallbackBase):
    """At train end (model still wrapped, on the GPU): gather the full weights and record what the test checks."""

    def __init__(self, teacher_before: dict[str, torch.Tensor]) -> None:
        self.teacher_before = teacher_before
        self.result: dict[str, Any] = {}

    def on_train_end(self, trainer: Any, pl_module: Any) -> None:
        from torch.distributed.fsdp import FullyShardedDataParallel

        with FullyShardedDataParallel.summon_full_params(trainer.strategy.model):
            teacher = {n.replace("_fsdp_wrapped_module.", ""): p.detach().cpu().clone()
                       for n, p in pl_module.teacher.named_parameters()}
            linears = [m.weight.detach() for n, m in pl_module.student.named_modules()
                       if isinstance(m, nn.Linear) and ".layers." in n]
            self.result = {
                "student_prepared": is_prepared(pl_module.student),
                "teacher_prepared": is_prepared(pl_module.teacher),
                "teacher_same": all(torch.equal(v, self.teacher_before[k]) for k, v in teacher.items()
                                    if k in self.teacher_before),
                "teacher_compared": sum(k in self.teacher_before for k in teacher),
                "zeros": sum(int((w == 0).sum()) for w in linears) / sum(w.numel() for w in linears),
            }


@pytest.mark.gpu
def test_fsdp_distillation_with_masked_pruning_and_qat(tmp_path: Path) -> None:
    """FSDP on one GPU: teacher/student separate units, masks re-applied on sharded weights, QAT prepared before
    wrapping; the teacher is unchanged and the student ends sparse and fake-quantized."""
    from transformers.models.llama.modeling_llama import LlamaDecoderLayer

    from lightning_latency import fsdp_strategy

    module = _gpu_distill()
    probe = _FSDPProbe({k: v.detach().clone() for k, v in module.teacher.named_parameters()})
    pruning = MagnitudePruning(mode="unstructured", final_sparsity=0.5, start_step=1, end_step=2, log_per_layer=False)
    qat = QuantizationAwareTraining(scheme="int8_dynamic", start_step=0, convert_on_fit_end=False,
                                    log_every_n_steps=0)
    trainer = Trainer(**trainer_kwargs(tmp_path, accelerator="gpu", devices=1, max_steps=3,
                                       strategy=fsdp_strategy({LlamaDecoderLayer}), callbacks=[pruning, qat, probe]))
    trainer.fit(module, DataLoader(LMDataset(8, 12, 0), batch_size=4))
    r = probe.result
    assert r["student_prepared"] and not r["teacher_prepared"]
    assert r["teacher_compared"] > 0 and r["teacher_same"]
    assert r["zeros"] > 0.4


@pytest.mark.gpu
def test_fsdp_refuses_structured_pruning_late_qat_and_latency_before_wrapping(tmp_path: Path) -> None:
    from lightning_latency import fsdp_strategy

    for cb, match in ((MagnitudePruning(mode="structured", final_sparsity=0.5), "Prune the unsharded model"),
                      (QuantizationAwareTraining(start_step=5), "prepared before wrapping"),
                      (LatencyMonitor(), "cannot time an FSDP-sharded model")):
        trainer = Trainer(**trainer_kwargs(tmp_path, accelerator="gpu", devices=1, max_steps=1,
                                           strategy=fsdp_strategy(), callbacks=[cb]))
        with pytest.raises(MisconfigurationException, match=match):
            trainer.fit(_gpu_distill(), DataLoader(LMDataset(8, 12, 0), batch_size=4))
