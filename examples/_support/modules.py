"""The plain LightningModule the LatencyMonitor demo and the LightningCLI example train: an HF classifier.

Nothing in it knows about lightning-latency: the callbacks find the Hugging Face model at ``.model``
(``model_attr="model"``).
"""

from __future__ import annotations

from typing import Any

import torch

from lightning_latency._compat import LightningModule


class SentimentClassifier(LightningModule):
    """A Hugging Face sequence classifier at ``.model`` trained with its own cross-entropy (``.loss``).

    Logs ``train_loss``, ``train_acc``, ``val_loss`` and ``val_acc``.

    Args:
        model: e.g. ``AutoModelForSequenceClassification``; put in train mode (``from_pretrained`` returns eval
            mode and Lightning keeps module modes as they are).
        lr: AdamW learning rate over the trainable parameters.
    """

    def __init__(self, model: Any, lr: float = 5e-5) -> None:
        super().__init__()
        self.model = model.train()
        self.lr = lr

    def _step(self, batch: dict[str, torch.Tensor], stage: str) -> torch.Tensor:
        out = self.model(**batch)
        acc = (out.logits.argmax(-1) == batch["labels"]).float().mean()
        self.log_dict({f"{stage}_loss": out.loss, f"{stage}_acc": acc}, prog_bar=True)
        return out.loss

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        return self._step(batch, "train")

    def validation_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        self._step(batch, "val")

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.AdamW([p for p in self.parameters() if p.requires_grad], lr=self.lr)


__all__ = ["SentimentClassifier"]
