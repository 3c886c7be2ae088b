"""Tiny random-weight models and Lightning modules shared by the tests (fast on 2 CPU cores)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from lightning_latency._compat import CallbackBase, LightningModule

VOCAB = 128


def tiny_bert(num_labels: int = 2, layers: int = 2, hidden: int = 64, heads: int = 4, intermediate: int = 128) -> nn.Module:
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(0)
    cfg = BertConfig(
        vocab_size=VOCAB, hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
        intermediate_size=intermediate, max_position_embeddings=128, num_labels=num_labels,
        hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
    )
    return BertForSequenceClassification(cfg)


def tiny_llama(layers: int = 2, hidden: int = 64, heads: int = 4, kv_heads: int = 2, intermediate: int = 128) -> nn.Module:
    """A Llama with grouped-query attention (``heads`` query heads sharing ``kv_heads`` key/value heads)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=VOCAB, hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
        num_key_value_heads=kv_heads, intermediate_size=intermediate, max_position_embeddings=256,
        tie_word_embeddings=True,
    )
    return LlamaForCausalLM(cfg)


def tiny_gpt2(layers: int = 2, hidden: int = 64, heads: int = 4) -> nn.Module:
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    cfg = GPT2Config(
        vocab_size=VOCAB, n_embd=hidden, n_layer=layers, n_head=heads, n_positions=256,
        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
    )
    return GPT2LMHeadModel(cfg)


class TokenDataset(Dataset):
    """Random token ids with a learnable label (label = first token is even) for classification or LM."""

    def __init__(self, n: int = 32, seq: int = 16, seed: int = 0, vocab: int = VOCAB) -> None:
        g = torch.Generator().manual_seed(seed)
        self.ids = torch.randint(0, vocab, (n, seq), generator=g)
        self.labels = (self.ids[:, 0] % 2 == 0).long()

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.ids[i], "attention_mask": torch.ones_like(self.ids[i]), "labels": self.labels[i]}


class LMDataset(TokenDataset):
    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.ids[i], "attention_mask": torch.ones_like(self.ids[i]), "labels": self.ids[i]}


class HFModule(LightningModule):
    """Wraps a Hugging Face model whose forward takes keyword inputs and returns ``.loss`` when given labels."""

    def __init__(self, model: nn.Module | None = None, kind: str = "bert", lr: float = 1e-3, n: int = 32,
                 batch_size: int = 8, seq: int = 16) -> None:
        super().__init__()
        builders = {"bert": tiny_bert, "llama": tiny_llama, "gpt2": tiny_gpt2}
        self.model = model if model is not None else builders[kind]()
        self.kind, self.lr, self.n, self.batch_size, self.seq = kind, lr, n, batch_size, seq

    def forward(self, **inputs: Any) -> Any:
        return self.model(**inputs)

    def _dataset(self, seed: int) -> Dataset:
        cls = TokenDataset if self.kind == "bert" else LMDataset
        return cls(self.n, self.seq, seed)

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        loss = self.model(**batch).loss
        self.log("train_loss", loss)
        return loss

    def validation_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        self.log("val_loss", self.model(**batch).loss)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.AdamW(self.parameters(), lr=self.lr)

    def train_dataloader(self) -> DataLoader:
        return DataLoader(self._dataset(0), batch_size=self.batch_size, shuffle=False)

    def val_dataloader(self) -> DataLoader:
        return DataLoader(self._dataset(1), batch_size=self.batch_size)


class RankStateDump(CallbackBase):
    """At fit end, each rank saves ``fn(pl_module)`` to ``folder/rank{R}.pt`` so a DDP test can compare ranks."""

    def __init__(self, folder: str | Path, fn: Any = None) -> None:
        self.folder = Path(folder)
        self.fn = fn

    def on_fit_end(self, trainer: Any, pl_module: Any) -> None:
        state = self.fn(pl_module) if self.fn else {k: v.detach().cpu().clone() for k, v in pl_module.state_dict().items()}
        torch.save(state, self.folder / f"rank{trainer.global_rank}.pt")


def trainer_kwargs(tmp_path: Path, **overrides: Any) -> dict[str, Any]:
    """Defaults for a tiny, quiet CPU Trainer that logs to CSV in ``tmp_path``."""
    from lightning_latency._compat import pl

    kwargs: dict[str, Any] = dict(
        accelerator="cpu", devices=1, max_steps=4, logger=pl.loggers.CSVLogger(tmp_path, name="logs"),
        enable_progress_bar=False, enable_model_summary=False, enable_checkpointing=False,
        default_root_dir=tmp_path, num_sanity_val_steps=0, deterministic=False,
    )
    kwargs.update(overrides)
    return kwargs


def read_csv_metrics(trainer: Any) -> list[dict[str, str]]:
    import csv

    trainer.logger.save()
    path = Path(trainer.logger.log_dir) / "metrics.csv"
    with path.open() as fh:
        return list(csv.DictReader(fh))
