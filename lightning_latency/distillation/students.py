"""Student initialisation from the teacher: keep a subset of layers, or prune a copy structurally.

* :func:`student_from_teacher_layers` — DistilBERT-style: a deep copy of the teacher with only the chosen
  transformer layers (default every other one: ``[0, 2, 4]`` of 6). Works for BERT-family encoders and
  Llama-family decoders (any Hugging Face model whose layer stack is a ``ModuleList`` of
  ``config.num_hidden_layers`` blocks); embeddings, heads and the config are kept consistent.
* :func:`student_from_pruned_teacher` — a copy pruned by ``lightning_latency.pruning`` in structured mode
  (heads / FFN neurons removed), so "prune, then distil to recover" is::

      student = student_from_pruned_teacher(teacher, sparsity=0.25, importance="taylor", calibration=batches[:4])
      Trainer(max_steps=500).fit(DistillationModule(student, teacher, alpha=0.9), loader)
"""

from __future__ import annotations

import copy
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from torch import nn


def find_layer_stack(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """``(dotted name, ModuleList)`` of the transformer blocks: the ``ModuleList`` with ``num_hidden_layers`` items."""
    n = getattr(getattr(model, "config", None), "num_hidden_layers", None)
    candidates = [(name, m) for name, m in model.named_modules() if isinstance(m, nn.ModuleList) and len(m) > 0]
    for name, m in candidates:
        if n is not None and len(m) == n:
            return name, m
    if n is None and candidates:
        return max(candidates, key=lambda c: len(c[1]))
    raise ValueError(f"cannot find the transformer layer stack of {type(model).__name__} (no ModuleList with "
                     f"config.num_hidden_layers={n} blocks). Build the student yourself and pass it to "
                     f"DistillationModule(student=...).")


def every_other_layer(num_layers: int, step: int = 2) -> list[int]:
    """``[0, step, 2*step, ...]`` — DistilBERT keeps every other layer of BERT."""
    return list(range(0, num_layers, step))


def student_from_teacher_layers(teacher: nn.Module, layers: Sequence[int] | None = None) -> nn.Module:
    """A copy of ``teacher`` keeping only the transformer ``layers`` (indices into the teacher's stack).

    Args:
        teacher: a Hugging Face BERT-/Llama-family model (e.g. ``BertForSequenceClassification``,
            ``LlamaForCausalLM``). It is not modified.
        layers: increasing teacher layer indices to keep; default every other layer starting at 0.

    Returns:
        The student in train mode, with ``config.num_hidden_layers`` (and per-layer config lists such as
        ``layer_types``) updated and decoder ``layer_idx`` renumbered so the KV cache works.

    Raises:
        ValueError: when ``layers`` is empty, not increasing, or names a layer the teacher does not have.
    """
    _, stack = find_layer_stack(teacher)
    n = len(stack)
    keep = every_other_layer(n) if layers is None else [int(i) for i in layers]
    if not keep or any(not (0 <= i < n) for i in keep) or sorted(set(keep)) != keep:
        raise ValueError(f"`layers` must be distinct increasing indices in [0, {n - 1}] (the teacher has {n} layers), "
                         f"got {list(layers) if layers is not None else None}. For every other layer pass "
                         f"layers={every_other_layer(n)}.")
    student = copy.deepcopy(teacher)
    name, s_stack = find_layer_stack(student)
    kept = nn.ModuleList([s_stack[i] for i in keep])
    for new_idx, block in enumerate(kept):
        for m in block.modules():
            if hasattr(m, "layer_idx"):
                m.layer_idx = new_idx  # decoder KV caches index layers by position
    parent = student.get_submodule(name.rsplit(".", 1)[0]) if "." in name else student
    setattr(parent, name.rsplit(".", 1)[-1], kept)
    config = getattr(student, "config", None)
    if config is not None:
        config.num_hidden_layers = len(keep)
        for attr in ("layer_types",):
            values = getattr(config, attr, None)
            if isinstance(values, list) and len(values) == n:
                setattr(config, attr, [values[i] for i in keep])
    return student.requires_grad_(True).train()


def student_from_pruned_teacher(
    teacher: nn.Module, sparsity: float = 0.5, *, calibration: Iterable[Any] | None = None, layers_removed: int = 0,
    **config_kwargs: Any
) -> nn.Module:
    """A structurally pruned copy of ``teacher`` (attention heads and MLP neurons removed) to distil into.

    Calls ``lightning_latency.pruning.prune_step(copy, PruningConfig(mode="structured", **config_kwargs),
    sparsity)``; the import happens here so the distillation package does not depend on the pruning package.

    For LLMs prefer a gradient-based importance: weight magnitude alone ranks SmolLM2-135M's heads and neurons so
    badly that removing 25% of them sends held-out perplexity from 40 to ~9e5, while ``importance="taylor"``
    (``|w·grad|`` summed over each head / neuron) scored on 4 batches of 4×96 tokens gives ~300 (benchmarks/
    bench_distillation.py). Pass those batches as ``calibration``.

    Args:
        teacher: a Hugging Face BERT-, Llama- or GPT-2-family model; not modified.
        sparsity: fraction of heads and neurons to remove, in ``(0, 1)``.
        calibration: batches (dicts of model keyword inputs that include ``labels``, so the model returns a
            ``loss``) run forward and backward through the copy in eval mode before pruning, so that a
            gradient-based importance (``importance="taylor"`` or a torch-pruning Taylor/Hessian object) has
            gradients to score. The gradients are cleared afterwards.
        layers_removed: first remove this many whole layers, the ones that change the residual stream least on
            ``calibration`` (:func:`~lightning_latency.pruning.depth.block_importance`; the first layer stays):
            fewer bytes *and* less per-token overhead, which a narrower layer keeps.
        **config_kwargs: further ``PruningConfig`` fields (``prune_heads``, ``prune_neurons``, ``importance`` ...).

    Returns:
        The pruned copy, trainable and in train mode.

    Raises:
        ValueError: ``sparsity`` outside ``(0, 1)``; ``importance="taylor"`` without ``calibration``; a calibration
            batch that is not a dict or gives no loss; an empty ``calibration``.
    """
    if isinstance(sparsity, bool) or not (isinstance(sparsity, (int, float)) and 0.0 <= sparsity < 1.0) or \
            (sparsity == 0 and not layers_removed):
        raise ValueError(f"`sparsity` must be in (0, 1) (or 0 with layers_removed > 0), got {sparsity!r}. For half "
                         f"the heads/neurons pass 0.5.")
    from lightning_latency.pruning import PruningConfig, prune_step
    from lightning_latency.pruning.depth import prune_depth

    config = PruningConfig(mode="structured", **config_kwargs)
    if calibration is None and (config.importance in ("taylor", "activation") or layers_removed):
        what = (f"`importance`={config.importance!r} scores the model" if config.importance in ("taylor", "activation")
                else f"`layers_removed`={layers_removed} ranks layers")
        raise ValueError(f"{what} on data, but no `calibration` batches were given. Pass calibration=[{{'input_ids': "
                         f"..., 'labels': ...}}, ...] (a few training batches).")
    student = copy.deepcopy(teacher).requires_grad_(True)
    if layers_removed:
        calibration = list(calibration)
        prune_depth(student, layers_removed, calibration)
    if sparsity > 0:
        if config.importance == "activation":
            from lightning_latency.pruning.activation import ActivationImportance

            config.importance = ActivationImportance(student, calibration)
        elif calibration is not None:
            _accumulate_gradients(student, calibration)
        prune_step(student, config, sparsity)
    student.zero_grad(set_to_none=True)
    return student.train()


def _accumulate_gradients(model: nn.Module, calibration: Iterable[Any]) -> None:
    """Sum the gradients of ``model(**batch).loss`` over the batches (eval mode: no dropout in the scores)."""
    model.zero_grad(set_to_none=True)
    model.eval()
    count = 0
    for batch in calibration:
        if not isinstance(batch, Mapping):
            raise ValueError(f"`calibration` batches must be dicts of model keyword inputs, got {type(batch).__name__}.")
        loss = getattr(model(**batch), "loss", None)
        if loss is None:
            raise ValueError(f"a `calibration` batch gave no loss (keys {sorted(batch)}): include 'labels' "
                             f"(for a causal LM, labels=input_ids).")
        loss.backward()
        count += 1
    if count == 0:
        raise ValueError("`calibration` is empty: pass at least one batch (4 batches of a few sequences is enough).")


__all__ = ["every_other_layer", "find_layer_stack", "student_from_pruned_teacher", "student_from_teacher_layers"]
