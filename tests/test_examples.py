"""Smoke tests of the examples at tiny settings: each example's ``main(argv)`` runs in-process and must produce its
table, its JSON and (classifier) its chart, with the visible effect of each compression stage.

The real-weight examples skip ``torch.compile`` (``--no-compile``): a compile costs 15-40 s on 2 cores, and the
compiled deployment path has its own tests in ``test_quantization.py`` / ``test_latency_*.py``.
"""

from __future__ import annotations

import importlib
import json
from pathlib import Path
from types import ModuleType

import pytest
from torch import nn

from lightning_latency import LatencyMonitor, MagnitudePruning, QuantizationAwareTraining

ROOT = Path(__file__).resolve().parents[1]


def _example(name: str) -> ModuleType:
    """``examples.<name>``: the examples are a package, importable because pytest puts the repository root on the path
    (``pythonpath = ["."]`` in pyproject.toml)."""
    return importlib.import_module(f"examples.{name}")


def test_example_plumbing_ships_outside_the_package() -> None:
    import lightning_latency

    package = Path(lightning_latency.__file__).parent
    # moved to examples/_support: they import packages the wheel does not declare
    assert not [name for name in ("tasks.py", "assets.py") if (package / name).exists()]
    assert not [p for p in package.rglob("*.py") if "examples._support" in p.read_text()]
    assert importlib.import_module("examples._support.tasks").accuracy  # and importable from the repository root


def test_support_accuracy_pads_a_static_batch_and_counts_only_real_items() -> None:
    import torch

    from examples._support.tasks import EncodedDataset, accuracy, stack_inputs

    ids = torch.tensor([[0], [1], [1], [0], [1]])
    data = EncodedDataset({"input_ids": ids, "attention_mask": torch.ones_like(ids)}, torch.tensor([0, 1, 0, 0, 1]))
    seen: list[tuple[int, tuple[str, ...]]] = []

    def compiled_for_4(**inputs: torch.Tensor) -> torch.Tensor:  # a deployed form: one static batch size
        seen.append((len(inputs["input_ids"]), tuple(inputs)))
        return torch.nn.functional.one_hot(inputs["input_ids"][:, 0], 2).float()

    assert accuracy(compiled_for_4, data, 4, static=True, keys=("input_ids",)) == pytest.approx(4 / 5)
    assert seen == [(4, ("input_ids",)), (4, ("input_ids",))]  # the last item padded to 4, pads not counted
    assert accuracy(compiled_for_4, list(torch.utils.data.DataLoader(data, batch_size=2))) == pytest.approx(4 / 5)
    assert stack_inputs(data, 4, 2)["input_ids"].tolist() == [[1], [0]]  # wraps around, labels dropped


@pytest.mark.real_weights
def test_compress_classifier_quick_runs_every_stage_and_writes_table_json_chart(tmp_path: Path, capsys) -> None:
    results = _example("compress_classifier").main(["--quick", "--no-compile", "--out-dir", str(tmp_path)])
    out = capsys.readouterr().out
    names = [r["name"] for r in results["rows"]]
    assert names[0] == "teacher fp32" and names[-1].startswith("final: deployed (b1 ")
    assert "final: deployed (" in out and "| model |" in out  # text table and markdown printed
    assert "Deployment form at batch 1:" in out and "chose " in out  # which form and why
    artifact = Path(results["artifact"])
    assert artifact.exists() and artifact.parent == Path(results["log_dir"])
    assert all(line in out for line in results["load_lines"]) and len(results["load_lines"]) == 2
    rows = {r["name"]: r for r in results["rows"]}
    distilled, pruned = rows["student distilled"], rows["student +pruned"]
    qat, final = rows["student +QAT (torchao int8, eager)"], results["rows"][-1]
    assert distilled["params_m"] < 0.8 * rows["teacher fp32"]["params_m"]  # 3 of 6 layers
    assert pruned["params_m"] < distilled["params_m"]  # heads and neurons removed
    assert qat["size_mb"] < pruned["size_mb"] - 5  # int8 linears (the fp32 word embeddings, ~47 MB, stay)
    for r in results["rows"]:
        assert 0.0 <= r["accuracy"] <= 1.0 and r["p50_b1_ms"] > 0 and r["p50_b32_ms"] > 0
    log_dir = Path(results["log_dir"])
    saved = json.loads((log_dir / "results.json").read_text())
    assert [r["name"] for r in saved["rows"]] == names
    assert (log_dir / "accuracy_vs_latency.png").stat().st_size > 10_000
    assert list(log_dir.glob("events.out.tfevents.*"))  # the chart and metrics went to TensorBoard
    assert set(results["latency_monitor"]) == {"baseline", "final"}


@pytest.mark.real_weights
def test_compress_llm_quick_prints_decode_table_and_samples(tmp_path: Path, capsys, recwarn) -> None:
    results = _example("compress_llm").main(["--quick", "--out-dir", str(tmp_path)])
    captured = capsys.readouterr()
    out = captured.out
    assert "TPOT ms" in out and "ppl reviews" in out and "Greedy continuations" in out
    assert "Epoch 0/-" not in out + captured.err and "litlogger" not in out + captured.err  # no Lightning noise
    assert not [w for w in recwarn if "val_dataloader" in str(w.message)]
    teacher, teacher_int4, final = results["rows"]
    assert final["params_m"] < teacher_int4["params_m"]  # layers removed (same format)
    assert final["size_mb"] < teacher_int4["size_mb"] < 0.7 * teacher["size_mb"]  # int4 linears (fp32 embeddings)
    assert "QAT+KD" in final["name"]
    for r in results["rows"]:
        assert r["ttft_ms"] > 0 and r["tpot_ms"] > 0 and r["perplexity"] > 1 and r["mbu"] is None  # no peak given
        assert r["perplexity_reviews"] > 1 and r["perplexity_reviews"] != r["perplexity"]  # a second held-out text
    assert all(isinstance(s, str) for s in results["samples"]["teacher fp32"])
    assert (Path(results["log_dir"]) / "results.json").exists()


@pytest.mark.real_weights
def test_compress_llm_int8_mb_keeps_the_measured_most_sensitive_linears_int8(tmp_path: Path, capsys) -> None:
    results = _example("compress_llm").main(["--quick", "--no-qat", "--int8-mb", "0.6", "--samples", "0",
                                             "--out-dir", str(tmp_path)])
    kept = results["int8_linears"]
    teacher, teacher_int4, final = results["rows"]
    assert kept and f"+ {len(kept)} int8 linears" in final["name"]
    assert "Kept int8 by measured sensitivity" in capsys.readouterr().out
    with pytest.raises(SystemExit):  # QAT trained the int4 grid, not the float weights the sensitivity reads
        _example("compress_llm").parse_args(["--int8-mb", "2"])
    assert "--int8-mb needs --quant int4_wo --no-qat" in capsys.readouterr().err


def test_add_to_existing_prunes_a_plain_user_module(tmp_path: Path, capsys) -> None:
    result = _example("add_to_existing").main(["--quick", "--out-dir", str(tmp_path)])
    assert result["params_after"] < result["params_before"]
    assert result["heads"] == 4 and result["intermediate"] == 512  # half of 8 heads, half of 1024 neurons
    assert (Path(result["log_dir"]) / "latency_report.json").exists()
    assert "params" in capsys.readouterr().out


def test_combined_recipe_configures_pruning_then_qat_then_latency(tmp_path: Path) -> None:
    from helpers import HFModule

    from lightning_latency._compat import BACKEND

    cli = importlib.import_module(f"{BACKEND}.cli").LightningCLI(
        HFModule, run=False, save_config_callback=None,
        args=["--config", str(ROOT / "callbacks" / "combined.yaml"), "--trainer.logger=false",
              f"--trainer.default_root_dir={tmp_path}"])
    ours = [c for c in cli.trainer.callbacks if isinstance(c, (MagnitudePruning, QuantizationAwareTraining,
                                                                LatencyMonitor))]
    assert [type(c) for c in ours] == [MagnitudePruning, QuantizationAwareTraining, LatencyMonitor]
    pruning, qat, monitor = ours
    assert pruning.config.mode.value == "structured" and pruning.schedule.end == 300
    assert qat.start_step > pruning.schedule.end  # QAT starts after pruning ends
    assert monitor.model_attr == "model"
    assert cli.trainer.max_steps == 600


def test_cli_example_fits_with_the_latency_recipe(tmp_path: Path) -> None:
    cli = _example("cli").main([
        "fit", "--config", str(ROOT / "callbacks" / "latency.yaml"), "--model.pretrained=false",
        "--data.train_size=32", "--data.val_size=16", "--data.seq_len=16", "--data.batch_size=8",
        "--trainer.max_steps=3", "--trainer.limit_val_batches=1", "--trainer.enable_progress_bar=false",
        f"--trainer.default_root_dir={tmp_path}",
    ])
    monitor = next(c for c in cli.trainer.callbacks if isinstance(c, LatencyMonitor))
    assert [r["phase"] for r in monitor.records][0] == "baseline" and monitor.records[-1]["phase"] == "final"
    assert isinstance(cli.model.model, nn.Module)
    assert (Path(cli.trainer.log_dir) / "latency_report.json").exists()
