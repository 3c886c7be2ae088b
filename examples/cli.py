"""LightningCLI entry point for the ``callbacks/*.yaml`` recipes: fine-tune MiniLM-L6 on Rotten Tomatoes snippets
while the recipes' callbacks measure latency, prune and quantize.

The model (``SentimentClassifier``, the Hugging Face model at ``.model``, which the recipes' ``model_attr: model``
points at) and the data (``RottenTomatoes``) are plain Lightning classes; everything lightning-latency does comes
from the YAML recipes. Examples (run from the repository root)::

    # latency before/after, logged as latency/* and latency_report.json in the log dir
    python -m examples.cli fit --config callbacks/latency.yaml --trainer.max_steps=100
    # latency + structured pruning + int8 QAT in one run (the combined recipe)
    python -m examples.cli fit --config callbacks/combined.yaml
    # a recipe plus your own settings; a later --config replaces earlier `trainer.callbacks` lists, so combine
    # recipes with combined.yaml or append single callbacks on the command line:
    python -m examples.cli fit --config callbacks/pruning_structured.yaml \
        --trainer.callbacks+=lightning_latency.LatencyMonitor --trainer.callbacks.model_attr=model
    # see every option
    python -m examples.cli fit --help

``--model.pretrained=false`` swaps in a tiny random BERT of the same tokenizer (seconds instead of minutes; the
tests use it). ``--data.train_size``/``--data.seq_len``/``--data.batch_size`` size the data.
"""

from __future__ import annotations

import importlib
from collections.abc import Sequence
from typing import Any

from torch.utils.data import DataLoader

from examples._support import assets, modules, tasks
from lightning_latency._compat import BACKEND, pl


class SentimentClassifier(modules.SentimentClassifier):
    """MiniLM-L6 (pretrained, fresh 2-label head) or a tiny random BERT, trained with cross-entropy.

    Args:
        pretrained: load the real all-MiniLM-L6-v2 weights; False builds a tiny random BERT (for smoke runs).
        lr: AdamW learning rate.
    """

    def __init__(self, pretrained: bool = True, lr: float = 5e-5) -> None:
        if pretrained:
            model, _ = assets.load_minilm(num_labels=2)
        else:
            from transformers import BertConfig, BertForSequenceClassification

            model = BertForSequenceClassification(BertConfig(
                vocab_size=30522, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128,
                max_position_embeddings=512, num_labels=2))
        super().__init__(model, lr)
        self.save_hyperparameters()


class RottenTomatoes(pl.LightningDataModule):
    """Rotten Tomatoes review snippets (offline), tokenized with the MiniLM tokenizer.

    Args:
        train_size: training snippets.
        val_size: held-out snippets for validation.
        seq_len: tokens per snippet (padded/truncated).
        batch_size: batch size of both loaders.
    """

    def __init__(self, train_size: int = 2000, val_size: int = 256, seq_len: int = 64, batch_size: int = 32) -> None:
        super().__init__()
        self.train_size, self.val_size, self.seq_len, self.batch_size = train_size, val_size, seq_len, batch_size
        self.train: Any = None
        self.val: Any = None

    def setup(self, stage: str) -> None:
        if self.train is None:
            from transformers import AutoTokenizer

            tokenizer = AutoTokenizer.from_pretrained(assets.minilm_path())
            self.train, self.val = tasks.rotten_tomatoes_splits(tokenizer, n_train=self.train_size,
                                                                n_test=self.val_size, seq_len=self.seq_len)

    def train_dataloader(self) -> DataLoader:
        return DataLoader(self.train, batch_size=self.batch_size, shuffle=True)

    def val_dataloader(self) -> DataLoader:
        return DataLoader(self.val, batch_size=self.batch_size)


def main(argv: Sequence[str] | None = None, run: bool = True) -> Any:
    """Build the LightningCLI (``argv`` like ``["fit", "--config", "callbacks/latency.yaml"]``; None reads sys.argv)."""
    LightningCLI = importlib.import_module(f"{BACKEND}.cli").LightningCLI  # the package our modules derive from

    return LightningCLI(SentimentClassifier, RottenTomatoes, args=argv, run=run, save_config_callback=None,
                        trainer_defaults={"accelerator": "cpu", "devices": 1})


if __name__ == "__main__":
    main()
