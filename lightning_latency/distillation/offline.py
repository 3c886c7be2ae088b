"""Offline distillation: run the teacher once, store its top-k logits on disk, train without it in memory.

:func:`cache_teacher_topk` walks a (non-shuffled) data loader through the teacher and writes one file per batch
with ``values`` ``(batch, [seq,] k)`` in fp16 and ``indices`` ``(batch, [seq,] k)`` in int32, plus a small
``meta.pt`` (k, count, temperature-free logits). :class:`TopKLogitsDataset` wraps the *same* dataset (same order)
and adds ``teacher_topk_values`` / ``teacher_topk_indices`` to every item; :class:`~.DistillationModule` with
``teacher=None`` then distils from them with its loss's ``kind``, ``reduction`` and ``chunk_size``
(:meth:`~.losses.DistillationLoss.topk_loss`; the teacher distribution is the softmax over its ``k`` stored
logits). ``reverse_kl`` needs the whole distribution: cache it with ``k`` = the vocabulary size (e.g. the class
count of a classifier) or it raises at the first batch.

Storage: ``tokens * k * 6`` bytes (k=64 over 1M tokens: 384 MB) instead of ``tokens * vocab * 4``.
"""

from __future__ import annotations

import bisect
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset, RandomSampler

from lightning_latency.distillation.module import TOPK_INDICES, TOPK_VALUES, output_logits


def _default_inputs(batch: Any) -> dict[str, Any]:
    if isinstance(batch, Mapping):
        return {k: v for k, v in batch.items() if k not in ("labels", TOPK_VALUES, TOPK_INDICES)}
    raise TypeError(f"cannot map a {type(batch).__name__} batch to teacher inputs; pass batch_to_inputs=...")


@torch.no_grad()
def cache_teacher_topk(
    teacher: nn.Module,
    loader: DataLoader,
    path: str | Path,
    k: int = 64,
    batch_to_inputs: Callable[[Any], dict[str, Any]] | None = None,
    device: str | torch.device | None = None,
    progress: bool = True,
    resume: bool = True,
) -> Path:
    """Store the teacher's top-``k`` logits for every item of ``loader`` (which must not shuffle).

    Resumable: shards are written atomically (a temporary file, then a rename) and ``meta.pt`` last, so an
    interrupted run leaves only whole shards and no ``meta.pt`` (which :class:`TopKLogitsDataset` refuses). Called
    again on the same folder with ``resume=True``, it keeps every shard that matches its batch (item count, and
    ``k``) and runs the teacher on the rest only: a cache over a whole training split survives a preemption.

    Args:
        teacher: any model returning logits ``(batch, classes)`` or ``(batch, seq, vocab)`` (``.logits`` or tensor).
        loader: the data, in the order :class:`TopKLogitsDataset` will later read it.
        path: output folder (created); with ``resume=False`` existing shard files are overwritten.
        k: how many logits to keep per position (capped at the vocabulary size).
        batch_to_inputs: batch -> teacher keyword inputs; default: the dict batch minus ``labels``.
        device: where to run the teacher; default: where its parameters are.
        progress: show a tqdm progress bar (stderr).
        resume: keep the matching shards of an earlier, interrupted run of the same loader (see above).

    Returns:
        The folder.
    """
    if not isinstance(k, int) or k < 1:
        raise ValueError(f"`k` must be a positive int, got {k!r}. k=64 keeps nearly all the mass of an LM's softmax.")
    if isinstance(getattr(loader, "sampler", None), RandomSampler):
        raise ValueError("`loader` shuffles (RandomSampler): the cache must follow the dataset order. "
                         "Pass DataLoader(dataset, shuffle=False); shuffle later when training from the cache.")
    from tqdm.auto import tqdm

    out = Path(path)
    out.mkdir(parents=True, exist_ok=True)
    to_inputs = batch_to_inputs or _default_inputs
    device = torch.device(device) if device is not None else next(teacher.parameters()).device
    was_training = teacher.training
    teacher.eval()
    count, kept, width, shards = 0, 0, k, 0
    (out / "meta.pt").unlink(missing_ok=True)  # a folder being (re)written is not a finished cache
    try:
        for i, batch in enumerate(tqdm(loader, desc="teacher top-k", disable=not progress)):
            shard = out / f"shard_{i:06d}.pt"
            inputs = {key: v.to(device) if isinstance(v, Tensor) else v for key, v in to_inputs(batch).items()}
            done = _matching_shard(shard, inputs, k) if resume else None
            if done is not None:
                count, kept, width, shards = count + done.shape[0], kept + 1, done.shape[-1], i + 1
                continue
            logits = output_logits(teacher(**inputs)).float()
            width = min(k, logits.shape[-1])
            values, indices = logits.topk(width, dim=-1)
            tmp = shard.with_suffix(".tmp")
            torch.save({"values": values.half().cpu(), "indices": indices.int().cpu()}, tmp)
            tmp.replace(shard)  # atomic: a crash leaves the old shard or the new one, never half a file
            count, shards = count + logits.shape[0], i + 1
    finally:
        teacher.train(was_training)
    torch.save({"k": width, "count": count, "shards": shards, "resumed_shards": kept}, out / "meta.pt")
    return out


def _matching_shard(shard: Path, inputs: Mapping[str, Any], k: int) -> Tensor | None:
    """The stored values of ``shard`` when it is a whole shard of this batch (same items, same positions, k),
    else None (missing, damaged, or from another loader: it is recomputed)."""
    if not shard.exists():
        return None
    try:
        values = torch.load(shard, weights_only=True)["values"]
    except Exception:  # a damaged file is recomputed, not trusted
        return None
    first = next((v for v in inputs.values() if isinstance(v, Tensor) and v.dim() > 0), None)
    if first is None or values.shape[0] != first.shape[0] or values.shape[-1] > k:
        return None
    if values.dim() == 3 and first.dim() >= 2 and values.shape[1] != first.shape[1]:
        return None
    return values


class TopKLogitsDataset(Dataset):
    """``dataset`` items (dicts) extended with the cached teacher top-k logits of the same index.

    Args:
        dataset: the dataset that :func:`cache_teacher_topk` read (same order and length).
        path: the cache folder.

    Raises:
        ValueError: when the cache was built from a dataset of another length.
    """

    def __init__(self, dataset: Dataset, path: str | Path) -> None:
        self.dataset = dataset
        self.path = Path(path)
        meta_file = self.path / "meta.pt"
        if not meta_file.exists():
            raise ValueError(f"`path` {str(self.path)!r} holds no teacher cache (meta.pt missing). "
                             f"Run cache_teacher_topk(teacher, loader, path) first.")
        meta = torch.load(meta_file, weights_only=True)
        if meta["count"] != len(dataset):  # type: ignore[arg-type]
            raise ValueError(f"the cache in {str(self.path)!r} has {meta['count']} items but the dataset has "
                             f"{len(dataset)}; rebuild it with cache_teacher_topk on this dataset.")  # type: ignore[arg-type]
        self.k = int(meta["k"])
        # Shards are small (k values per position): load them all once, index them in memory.
        shards = [torch.load(self.path / f"shard_{i:06d}.pt", weights_only=True) for i in range(int(meta["shards"]))]
        self._values = [s["values"] for s in shards]
        self._indices = [s["indices"] for s in shards]
        self._starts = [0]
        for v in self._values[:-1]:
            self._starts.append(self._starts[-1] + v.shape[0])

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]

    def __getitem__(self, i: int) -> dict[str, Any]:
        item = self.dataset[i]
        if not isinstance(item, Mapping):
            raise TypeError(f"TopKLogitsDataset needs dict items, got {type(item).__name__}.")
        shard = bisect.bisect_right(self._starts, i) - 1
        j = i - self._starts[shard]
        return {**item, TOPK_VALUES: self._values[shard][j], TOPK_INDICES: self._indices[shard][j]}


__all__ = ["TopKLogitsDataset", "cache_teacher_topk"]
