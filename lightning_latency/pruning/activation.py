"""Activation-based importance for structured pruning: how much each head and MLP neuron actually carries.

Weight magnitude says little about an LLM's units (removing 25% of SmolLM2-135M's heads and neurons by weight norm
sends held-out perplexity to ~1e6). What the best published methods use instead (Minitron) is the activation: for
each MLP neuron, the mean ``|x|`` of its channel at the input of the down projection; for each attention head, the
same summed over the head's channels at the input of the output projection, over a few hundred calibration
sequences. A unit the data never drives is cheap to remove, whatever its weights look like.

:class:`ActivationImportance` records those statistics once (forward pre-hooks on every output projection of
:func:`~lightning_latency.pruning.structured.find_blocks`) and then scores like a torch-pruning importance, so it is
accepted wherever one is (``PruningConfig(importance=...)``). It is one-shot: after a structural step the channels
are renumbered, and scoring a layer whose width changed is an error that says to record again.
``importance="activation"`` in :func:`~lightning_latency.distillation.student_from_pruned_teacher` does that for
you on its ``calibration`` batches.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from torch import nn


class ActivationImportance:
    """Mean ``|activation|`` per input channel of every attention / MLP output projection of ``model``.

    Args:
        model: a supported transformer (the structured-pruning families); run in eval mode, no gradients.
        calibration: batches of model keyword inputs (``labels`` are ignored).

    Raises:
        ValueError: empty ``calibration`` or a model without attention / MLP blocks.
    """

    def __init__(self, model: nn.Module, calibration: Iterable[Any]) -> None:
        from lightning_latency.pruning.calibration import forward_calibration
        from lightning_latency.pruning.structured import find_blocks

        batches = list(calibration)
        if not batches:
            raise ValueError("`calibration` is empty: activation importance needs a few batches of model inputs "
                             "(e.g. 8 training batches).")
        attns, mlps = find_blocks(model, convert=False)
        layers = [a.o for a in attns] + [m.out for m in mlps]
        if not layers:
            raise ValueError(f"{type(model).__name__} has no attention or MLP blocks to score.")
        sums: dict[int, torch.Tensor] = {}
        counts: dict[int, int] = {}

        def record(module: nn.Module, args: tuple) -> None:
            x = args[0].detach().float().flatten(0, -2).abs()
            sums[id(module)] = sums.get(id(module), 0) + x.sum(0)
            counts[id(module)] = counts.get(id(module), 0) + x.shape[0]

        forward_calibration(model, batches, [layer.register_forward_pre_hook(record) for layer in layers])
        self.stats = {key: (sums[key] / counts[key]).cpu() for key in sums}
        self.widths = {key: len(value) for key, value in self.stats.items()}

    def __call__(self, group: Any) -> torch.Tensor:
        import torch_pruning as tp

        for dep, idxs in group:
            layer = dep.target.module
            if dep.handler is not tp.prune_linear_in_channels or id(layer) not in self.stats:
                continue
            if layer.in_features != self.widths[id(layer)]:
                raise ValueError(
                    f"ActivationImportance was recorded on a {self.widths[id(layer)]}-wide layer that is now "
                    f"{layer.in_features} wide: its channels were renumbered by a structural step. Record it again "
                    "(ActivationImportance(model, batches)) before the next step."
                )
            return self.stats[id(layer)][list(idxs)].clone()
        raise ValueError("ActivationImportance has no statistics for this group: it was recorded on another model "
                         "(e.g. before a deepcopy). Record it on the model being pruned.")


__all__ = ["ActivationImportance"]
