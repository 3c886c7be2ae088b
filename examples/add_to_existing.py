"""Add lightning-latency to a LightningModule you already have: three lines, no change to your module.

``SentimentModule`` below is an ordinary user module (its own ``training_step``, ``validation_step`` and
``configure_optimizers``) around a small Hugging Face BERT. The only lightning-latency code is marked ``# <-- 1/2/3``:
an import and two callbacks in the ``Trainer``:

* ``LatencyMonitor(model_attr="model")`` times ``module.model`` before the first step and at fit end (printed as a
  table, logged as ``latency/*``, written to ``latency_report.json`` in the log dir);
* ``MagnitudePruning(mode="structured", ...)`` removes half of the attention heads and MLP neurons while training
  goes on, so the model that comes out of ``fit`` is smaller and faster.

The model is a tiny randomly initialised BERT (4 layers, width 256) trained on a synthetic task so that this runs in
well under a minute on 2 CPU cores; the same three lines work on a pretrained model (see compress_classifier.py).

    python -m examples.add_to_existing           # ~30-60 s (from the repository root)
    python -m examples.add_to_existing --quick   # a few seconds of training
"""

from __future__ import annotations

import argparse
import os
import tempfile
from collections.abc import Sequence
from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset

import pytorch_lightning as pl
from lightning_latency import LatencyMonitor, MagnitudePruning  # <-- 1


class KeywordTask(Dataset):
    """Random token sequences ``(seq,)``; the label says whether token 7 occurs (an easy task a tiny BERT learns)."""

    def __init__(self, n: int, seq_len: int = 64, vocab: int = 1000, seed: int = 0) -> None:
        g = torch.Generator().manual_seed(seed)
        self.ids = torch.randint(8, vocab, (n, seq_len), generator=g)
        flip = torch.rand(n, generator=g) < 0.5
        pos = torch.randint(0, seq_len, (n,), generator=g)
        self.ids[flip, pos[flip]] = 7
        self.labels = flip.long()

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.ids[i], "attention_mask": torch.ones_like(self.ids[i]), "labels": self.labels[i]}


class SentimentModule(pl.LightningModule):
    """An existing user module: nothing in it knows about lightning-latency."""

    def __init__(self, lr: float = 3e-4) -> None:
        super().__init__()
        from transformers import BertConfig, BertForSequenceClassification

        config = BertConfig(vocab_size=1000, hidden_size=256, num_hidden_layers=4, num_attention_heads=8,
                            intermediate_size=1024, max_position_embeddings=128, num_labels=2)
        self.model = BertForSequenceClassification(config)
        self.lr = lr

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        loss = self.model(**batch).loss
        self.log("train_loss", loss, prog_bar=True)
        return loss

    def validation_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        out = self.model(**batch)
        self.log("val_acc", (out.logits.argmax(-1) == batch["labels"]).float().mean(), prog_bar=True)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.AdamW(self.parameters(), lr=self.lr)


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(description="Add LatencyMonitor + MagnitudePruning to an existing LightningModule.")
    p.add_argument("--steps", type=int, default=120)
    p.add_argument("--quick", action="store_true", help="12 training steps")
    p.add_argument("--out-dir", default=None, help="log folder (default: a temporary folder)")
    args = p.parse_args(argv)
    steps = 12 if args.quick else args.steps
    torch.set_num_threads(min(2, os.cpu_count() or 1))
    pl.seed_everything(0, verbose=False)

    module = SentimentModule()
    train = DataLoader(KeywordTask(32 * steps, seed=0), batch_size=32, shuffle=True)
    val = DataLoader(KeywordTask(64, seed=1), batch_size=32)
    trainer = pl.Trainer(
        max_steps=steps, accelerator="cpu", devices=1, enable_checkpointing=False, enable_model_summary=False,
        default_root_dir=args.out_dir or tempfile.mkdtemp(prefix="add_to_existing_"), log_every_n_steps=5,
        callbacks=[
            LatencyMonitor(model_attr="model"),  # <-- 2
            MagnitudePruning(mode="structured", final_sparsity=0.5, start_step=steps // 4, end_step=steps // 2,  # <-- 3
                             every_n_steps=max(1, steps // 8)),
        ],
    )
    trainer.fit(module, train, val)

    monitor = next(c for c in trainer.callbacks if isinstance(c, LatencyMonitor))
    base, final = monitor.records[0]["forward"], monitor.records[-1]["forward"]
    result = dict(steps=steps, val_acc=float(trainer.callback_metrics.get("val_acc", float("nan"))),
                  params_before=base["num_params"], params_after=final["num_params"],
                  p50_before_ms=base["median_ms"], p50_after_ms=final["median_ms"],
                  speedup=base["median_ms"] / final["median_ms"], heads=module.model.config.num_attention_heads,
                  intermediate=module.model.config.intermediate_size, log_dir=trainer.log_dir)
    print(f"\nparams {result['params_before']:,} -> {result['params_after']:,}; heads per layer 8 -> {result['heads']}, "
          f"MLP width 1024 -> {result['intermediate']}; p50 latency (batch 32 x 64 tokens) "
          f"{result['p50_before_ms']:.2f} -> {result['p50_after_ms']:.2f} ms (x{result['speedup']:.2f}, one busy-machine "
          f"measurement each: see compare_latency for side-by-side numbers); val acc {result['val_acc']:.3f}")
    print(f"logs and latency_report.json: {result['log_dir']}")
    return result


if __name__ == "__main__":
    main()
