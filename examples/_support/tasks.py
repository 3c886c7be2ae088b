"""Ready-made real tasks for the examples and benchmarks: tokenized splits, a cached fine-tuned teacher, metrics.

Built on :mod:`examples._support.assets` (offline PyPI packages only). Plain PyTorch (Lightning only inside
:func:`fit`), so the benchmarks can prepare a teacher quickly and the examples can focus on the compression run
itself. Each metric exists once here: the examples and every benchmark call these.
"""

from __future__ import annotations

import copy
import json
import logging
import math
import random
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from examples._support import assets


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


def lm_blocks(ids: torch.Tensor) -> EncodedDataset:
    """``(blocks, seq)`` token ids as a causal-LM dataset: labels are the ids, every position attended."""
    return EncodedDataset({"input_ids": ids, "attention_mask": torch.ones_like(ids)}, ids.clone())


def pack_blocks(tokenizer: Any, texts: Iterable[str], seq_len: int, n_blocks: int) -> EncodedDataset:
    """``texts`` tokenized in order, EOS between them, cut into ``n_blocks`` blocks of ``seq_len`` tokens."""
    blocks: list[list[int]] = []
    buf: list[int] = []
    for text in texts:
        buf.extend(tokenizer(text)["input_ids"] + [tokenizer.eos_token_id])
        while len(buf) >= seq_len and len(blocks) < n_blocks:
            blocks.append(buf[:seq_len])
            buf = buf[seq_len:]
        if len(blocks) >= n_blocks:
            break
    return lm_blocks(torch.tensor(blocks))


def review_lm_blocks(tokenizer: Any, n_blocks: int, seq_len: int = 128) -> EncodedDataset:
    """Rotten Tomatoes review snippets, shuffled (seed 0) and packed (EOS between) into ``seq_len``-token blocks: a
    second held-out English text for a model distilled on BBC News (nothing here trains on it)."""
    texts, _ = assets.rotten_tomatoes()
    order = list(range(len(texts)))
    random.Random(0).shuffle(order)
    return pack_blocks(tokenizer, (texts[i] for i in order), seq_len, n_blocks)


def bbc_lm_splits(
    tokenizer: Any, seq_len: int = 128, n_train: int = 512, n_test: int = 64, seed: int = 0
) -> tuple[EncodedDataset, EncodedDataset]:
    """BBC News text packed into ``seq_len`` token blocks for language modelling; test articles are held out."""
    texts, _, _ = assets.bbc_news()
    order = list(range(len(texts)))
    random.Random(seed).shuffle(order)
    split = int(len(order) * 0.9)
    return (pack_blocks(tokenizer, (texts[i] for i in order[:split]), seq_len, n_train),
            pack_blocks(tokenizer, (texts[i] for i in order[split:]), seq_len, n_test))


def stack_inputs(dataset: Dataset, start: int, batch: int, keys: Sequence[str] | None = None) -> dict[str, torch.Tensor]:
    """Items ``start .. start + batch`` of ``dataset`` (wrapping around) as model keyword inputs ``(batch, seq)``.

    ``keys`` picks the inputs (default: every key but ``labels``).
    """
    items = [dataset[(start + i) % len(dataset)] for i in range(batch)]  # type: ignore[arg-type]
    names = keys if keys is not None else [k for k in items[0] if k != "labels"]
    return {k: torch.stack([it[k] for it in items]) for k in names}


@torch.inference_mode()
def accuracy(model: Any, data: Dataset | Iterable[Mapping[str, torch.Tensor]], batch_size: int = 64, *,
             static: bool = False, keys: Sequence[str] | None = None, collate_fn: Callable | None = None) -> float:
    """Classification accuracy of an HF-style model (``model(**inputs).logits`` or a logits tensor).

    Args:
        model: an ``nn.Module`` (put in eval mode for the call) or any callable, e.g. a deployed form.
        data: a dataset of dict items (batched here with ``batch_size`` / ``collate_fn``) or dict batches.
        static: the model was compiled for exactly ``batch_size``: the last batch is padded by repeating its first
            item, and the pads are not counted.
        keys: model inputs to pass (default: every key but ``labels``).
    """
    was_training = isinstance(model, nn.Module) and model.training
    if isinstance(model, nn.Module):
        model.eval()
    batches = DataLoader(data, batch_size=batch_size, collate_fn=collate_fn) if isinstance(data, Dataset) else data
    correct = total = 0
    for batch in batches:
        labels = batch["labels"]
        n = len(labels)
        inputs = {k: v for k, v in batch.items() if (k in keys if keys is not None else k != "labels")}
        if static and n < batch_size:
            inputs = {k: torch.cat([v, v[:1].expand(batch_size - n, *v.shape[1:])]) for k, v in inputs.items()}
        out = model(**inputs)
        logits = (out.logits if hasattr(out, "logits") else out)[:n]
        correct += int((logits.argmax(-1) == labels).sum())
        total += n
    if was_training:
        model.train()
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


def parse_with_quick(parser: Any, argv: Sequence[str] | None, quick: Mapping[str, Any]) -> Any:
    """``parser.parse_args(argv)``; with ``--quick``, every option in ``quick`` left at its default takes that value."""
    args = parser.parse_args(argv)
    if args.quick:
        for key, value in quick.items():
            if getattr(args, key) == parser.get_default(key):
                setattr(args, key, value)
    return args


def start_run(threads: int | None, seed: int) -> int:
    """Fix the torch thread count (default ``min(2, cores)``) and seed everything; returns the thread count."""
    import os

    from lightning_latency._compat import pl

    n = threads or min(2, os.cpu_count() or 1)
    torch.set_num_threads(n)
    pl.seed_everything(seed, verbose=False)
    return n


def quiet_lightning() -> None:
    """Silence what Lightning prints on every fit that says nothing about this run: its info banners ("GPU
    available", the litlogger tip) and the warning that ``DistillationModule``'s ``validation_step`` has no
    ``val_dataloader`` (the examples validate outside the fit). Warnings and errors still show."""
    import warnings

    for name in ("pytorch_lightning", "lightning.pytorch", "lightning"):
        logging.getLogger(name).setLevel(logging.WARNING)
    warnings.filterwarnings("ignore", message=r"You defined a `validation_step` but have no `val_dataloader`")


def fit(module: Any, loader: DataLoader | None = None, steps: int = 1, seed: int | None = None,
        callbacks: Sequence[Any] = ()) -> Any:
    """One quiet CPU ``Trainer.fit`` of ``steps`` optimizer steps (no logger, checkpoints or progress bar)."""
    from lightning_latency._compat import Trainer, pl

    quiet_lightning()
    if seed is not None:
        pl.seed_everything(seed, workers=True, verbose=False)
    trainer = Trainer(accelerator="cpu", devices=1, max_steps=steps, logger=False, enable_checkpointing=False,
                      enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
                      callbacks=list(callbacks))
    trainer.fit(module, loader)
    return trainer


def cached_weights(model: nn.Module, name: str, settings: Mapping[str, Any],
                   train: Callable[[nn.Module], Any]) -> tuple[nn.Module, bool]:
    """``model`` with the weights cached under :func:`assets.cache_dir` ``/ name``, or trained by ``train(model)``
    and cached there (with ``settings.json``); returns ``(model in eval mode, whether it came from the cache)``.

    ``name`` must change whenever ``settings`` do (build it from them).
    """
    folder = assets.cache_dir() / name
    weights = folder / "model.pt"
    if weights.exists():
        model.load_state_dict(torch.load(weights, map_location="cpu", weights_only=True))
        return model.eval(), True
    train(model)
    folder.mkdir(parents=True, exist_ok=True)
    tmp = folder / "model.pt.tmp"
    torch.save(model.state_dict(), tmp)
    tmp.rename(weights)  # atomic: an interrupted run never leaves a half-written model
    (folder / "settings.json").write_text(json.dumps(dict(settings), sort_keys=True))
    return model.eval(), False


def minilm_sentiment_teacher(
    n_train: int = 2000, steps: int = 150, seq_len: int = 64, lr: float = 5e-5, seed: int = 0, progress: bool = True
) -> tuple[nn.Module, Any]:
    """MiniLM-L6 fine-tuned on Rotten Tomatoes, cached under :func:`assets.cache_dir` keyed by its settings.

    Returns ``(model, tokenizer)``; the model is in eval mode. The held-out split of
    :func:`rotten_tomatoes_splits` with the same ``n_train``/``seed`` is never trained on.
    """
    model, tokenizer = assets.load_minilm(num_labels=2)

    def train(m: nn.Module) -> None:
        data, _ = rotten_tomatoes_splits(tokenizer, n_train=n_train, n_test=1000, seq_len=seq_len, seed=seed)
        finetune(m, data, steps=steps, lr=lr, seed=seed, progress=progress, desc="fine-tune MiniLM teacher")

    settings = dict(n_train=n_train, steps=steps, seq_len=seq_len, lr=lr, seed=seed)
    model, _ = cached_weights(model, f"minilm-rt-n{n_train}-s{steps}-l{seq_len}-lr{lr:g}-seed{seed}", settings, train)
    return model, tokenizer


def frozen_copy(model: nn.Module) -> nn.Module:
    """A deep copy in eval mode with gradients off (a teacher, or a snapshot to evaluate later)."""
    clone = copy.deepcopy(model).eval()
    clone.requires_grad_(False)
    return clone


def distil_lm(student: nn.Module, teacher: nn.Module, train: Dataset, steps: int, batch: int, lr: float,
              seed: int = 0, callbacks: Sequence[Any] = ()) -> nn.Module:
    """KD (forward KL at T=1 + LM loss, alpha 0.5) of ``student`` from a frozen copy of ``teacher`` in one quiet
    Lightning fit over shuffled ``train`` (seeded order); returns the student in eval mode."""
    from lightning_latency import DistillationLoss, DistillationModule

    module = DistillationModule(student.train(), frozen_copy(teacher), loss=DistillationLoss(temperature=1.0),
                                alpha=0.5, lr=lr)
    loader = DataLoader(train, batch_size=batch, shuffle=True, generator=torch.Generator().manual_seed(seed))
    fit(module, loader, steps, callbacks=callbacks)
    return module.student.eval()

def untie_lm_head(model: nn.Module) -> None:
    """Give a causal LM's ``lm_head`` its own trainable copy of the tied embedding (which may stay frozen): the
    deployed low-bit ``lm_head`` is a separate tensor anyway (``quantize_weight_only`` keeps the embedding fp32), so
    training it toward its grid costs nothing at decode time."""
    model.lm_head.weight = nn.Parameter(model.lm_head.weight.detach().clone())
    model.config.tie_word_embeddings = False


__all__ = [
    "EncodedDataset",
    "accuracy",
    "bbc_lm_splits",
    "cached_weights",
    "distil_lm",
    "finetune",
    "fit",
    "frozen_copy",
    "lm_blocks",
    "minilm_sentiment_teacher",
    "pack_blocks",
    "parse_with_quick",
    "perplexity",
    "quiet_lightning",
    "review_lm_blocks",
    "rotten_tomatoes_splits",
    "stack_inputs",
    "start_run",
    "untie_lm_head",
]
