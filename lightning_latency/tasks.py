"""Ready-made real tasks for the examples and benchmarks: tokenized splits, a cached fine-tuned teacher, metrics.

Built on :mod:`lightning_latency.assets` (offline PyPI packages only). Plain PyTorch, no Lightning, so the
benchmarks can prepare a teacher quickly and the examples can focus on the compression run itself.
"""

from __future__ import annotations

import copy
import json
import math
import random
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from lightning_latency import assets


class EncodedDataset(Dataset):
    """Pre-tokenized examples as dicts of tensors (``input_ids``, ``attention_mask``, ``labels``)."""

    def __init__(self, encodings: dict[str, torch.Tensor], labels: torch.Tensor) -> None:
        self.encodings = encodings
        self.labels = labels

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        item = {k: v[i] for k, v in self.encodings.items()}
        item["labels"] = self.labels[i]
        return item


def _check_counts(name: str, value: int, available: int) -> None:
    if value <= 0 or value > available:
        raise ValueError(f"`{name}` must be in [1, {available}], got {value}. Pass a smaller {name}.")


def rotten_tomatoes_splits(
    tokenizer: Any, n_train: int = 2000, n_test: int = 1000, seq_len: int = 64, seed: int = 0
) -> tuple[EncodedDataset, EncodedDataset]:
    """A shuffled, disjoint train / held-out split of the Rotten Tomatoes snippets, tokenized to ``seq_len``."""
    texts, labels = assets.rotten_tomatoes()
    _check_counts("n_train + n_test", n_train + n_test, len(texts))
    order = list(range(len(texts)))
    random.Random(seed).shuffle(order)

    def encode(idx: Sequence[int]) -> EncodedDataset:
        enc = tokenizer([texts[i] for i in idx], padding="max_length", truncation=True, max_length=seq_len,
                        return_tensors="pt")
        keep = {k: enc[k] for k in ("input_ids", "attention_mask", "token_type_ids") if k in enc}
        return EncodedDataset(keep, torch.tensor([labels[i] for i in idx]))

    return encode(order[:n_train]), encode(order[n_train:n_train + n_test])


def bbc_lm_splits(
    tokenizer: Any, seq_len: int = 128, n_train: int = 512, n_test: int = 64, seed: int = 0
) -> tuple[EncodedDataset, EncodedDataset]:
    """BBC News text packed into ``seq_len`` token blocks for language modelling; test articles are held out."""
    texts, _, _ = assets.bbc_news()
    order = list(range(len(texts)))
    random.Random(seed).shuffle(order)
    split = int(len(order) * 0.9)

    def pack(article_ids: Sequence[int], n_blocks: int) -> EncodedDataset:
        blocks: list[list[int]] = []
        buf: list[int] = []
        for i in article_ids:
            buf.extend(tokenizer(texts[i])["input_ids"] + [tokenizer.eos_token_id])
            while len(buf) >= seq_len and len(blocks) < n_blocks:
                blocks.append(buf[:seq_len])
                buf = buf[seq_len:]
            if len(blocks) >= n_blocks:
                break
        ids = torch.tensor(blocks)
        return EncodedDataset({"input_ids": ids, "attention_mask": torch.ones_like(ids)}, ids.clone())

    return pack(order[:split], n_train), pack(order[split:], n_test)


@torch.inference_mode()
def accuracy(model: nn.Module, dataset: Dataset, batch_size: int = 64) -> float:
    """Classification accuracy of an HF-style model (``model(**inputs).logits``) on ``dataset``."""
    was_training = model.training
    model.eval()
    correct = total = 0
    for batch in DataLoader(dataset, batch_size=batch_size):
        labels = batch.pop("labels")
        out = model(**batch)
        logits = out.logits if hasattr(out, "logits") else out
        correct += int((logits.argmax(-1) == labels).sum())
        total += len(labels)
    model.train(was_training)
    return correct / max(total, 1)


@torch.inference_mode()
def perplexity(model: nn.Module, dataset: Dataset, batch_size: int = 8) -> float:
    """Token-level perplexity of a causal LM on ``dataset`` (mean NLL over all predicted tokens)."""
    was_training = model.training
    model.eval()
    nll = 0.0
    count = 0
    for batch in DataLoader(dataset, batch_size=batch_size):
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        shift_logits = logits[:, :-1].float()
        shift_labels = batch["labels"][:, 1:]
        nll += float(nn.functional.cross_entropy(shift_logits.reshape(-1, shift_logits.size(-1)),
                                                 shift_labels.reshape(-1), reduction="sum"))
        count += shift_labels.numel()
    model.train(was_training)
    return math.exp(nll / max(count, 1))


def finetune(model: nn.Module, dataset: Dataset, steps: int, lr: float = 5e-5, batch_size: int = 32,
             seed: int = 0, progress: bool = True, desc: str = "fine-tune") -> nn.Module:
    """A plain AdamW loop (with linear warm-up/decay) over ``dataset`` for ``steps`` steps; returns ``model``."""
    from tqdm.auto import tqdm

    torch.manual_seed(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01)
    warmup = max(1, steps // 10)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min((s + 1) / warmup, max(0.0, (steps - s) / max(1, steps - warmup)))
    )
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=True, generator=torch.Generator().manual_seed(seed))
    model.train()
    step = 0
    bar = tqdm(total=steps, desc=desc, disable=not progress, leave=False)
    while step < steps:
        for batch in loader:
            loss = model(**batch).loss
            loss.backward()
            opt.step()
            sched.step()
            opt.zero_grad(set_to_none=True)
            step += 1
            bar.update(1)
            bar.set_postfix(loss=f"{loss.item():.3f}")
            if step >= steps:
                break
    bar.close()
    return model.eval()


def minilm_sentiment_teacher(
    n_train: int = 2000, steps: int = 150, seq_len: int = 64, lr: float = 5e-5, seed: int = 0, progress: bool = True
) -> tuple[nn.Module, Any]:
    """MiniLM-L6 fine-tuned on Rotten Tomatoes, cached under :func:`assets.cache_dir` keyed by its settings.

    Returns ``(model, tokenizer)``; the model is in eval mode. The held-out split of
    :func:`rotten_tomatoes_splits` with the same ``n_train``/``seed`` is never trained on.
    """
    key = f"minilm-rt-n{n_train}-s{steps}-l{seq_len}-lr{lr:g}-seed{seed}"
    folder = assets.cache_dir() / key
    model, tokenizer = assets.load_minilm(num_labels=2)
    weights = folder / "model.pt"
    if weights.exists():
        model.load_state_dict(torch.load(weights, map_location="cpu", weights_only=True))
        return model.eval(), tokenizer
    train, _ = rotten_tomatoes_splits(tokenizer, n_train=n_train, n_test=1000, seq_len=seq_len, seed=seed)
    finetune(model, train, steps=steps, lr=lr, seed=seed, progress=progress, desc="fine-tune MiniLM teacher")
    folder.mkdir(parents=True, exist_ok=True)
    tmp = folder / "model.pt.tmp"
    torch.save(model.state_dict(), tmp)
    tmp.rename(weights)  # atomic: an interrupted run never leaves a half-written teacher
    (folder / "settings.json").write_text(json.dumps(dict(n_train=n_train, steps=steps, seq_len=seq_len, lr=lr, seed=seed)))
    return model.eval(), tokenizer


def frozen_copy(model: nn.Module) -> nn.Module:
    """A deep copy in eval mode with gradients off (a teacher, or a snapshot to evaluate later)."""
    clone = copy.deepcopy(model).eval()
    clone.requires_grad_(False)
    return clone


__all__ = [
    "EncodedDataset",
    "accuracy",
    "bbc_lm_splits",
    "finetune",
    "frozen_copy",
    "minilm_sentiment_teacher",
    "perplexity",
    "rotten_tomatoes_splits",
]
