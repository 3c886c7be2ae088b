"""Which modules a masked pruning step touches: linear layers of the model minus embeddings, norms and heads."""

from __future__ import annotations

import re

from torch import nn

from lightning_latency.pruning.config import DEFAULT_EXCLUDE, PruningConfig


def _is_linear(module: nn.Module) -> bool:
    # transformers' GPT-2 `Conv1D` is a linear layer with a transposed weight.
    return isinstance(module, nn.Linear) or type(module).__name__ == "Conv1D"


def input_dim(module: nn.Module) -> int:
    """The weight dimension that indexes input features (1 for ``nn.Linear``, 0 for GPT-2's ``Conv1D``)."""
    return 0 if type(module).__name__ == "Conv1D" else 1


def _matches(name: str, module: nn.Module, entry: str | type[nn.Module]) -> bool:
    if isinstance(entry, type):
        return isinstance(module, entry)
    return name == entry or re.search(entry, name) is not None


def resolve_targets(model: nn.Module, config: PruningConfig) -> list[tuple[str, nn.Module]]:
    """Return ``[(name, module)]`` of the modules whose ``weight`` a masked step prunes.

    Raises:
        ValueError: if nothing matches, naming the patterns and a few module names that exist.
    """
    exclude = [re.compile(p) for p in (*DEFAULT_EXCLUDE, *config.exclude)]
    found: list[tuple[str, nn.Module]] = []
    for name, module in model.named_modules():
        if not name or getattr(module, "weight", None) is None or not isinstance(module.weight, nn.Parameter):
            continue
        if config.targets is None:
            if not _is_linear(module) or any(p.search(name) for p in exclude):
                continue
        else:
            if not any(_matches(name, module, t) for t in config.targets):
                continue
            if any(re.compile(p).search(name) for p in config.exclude):
                continue
        found.append((name, module))
    if not found:
        sample = [n for n, m in model.named_modules() if _is_linear(m)][:5]
        raise ValueError(
            f"`targets`={list(config.targets) if config.targets is not None else None} (exclude="
            f"{list(config.exclude)}) matches no module with a weight in {type(model).__name__}. "
            f"Linear layers present include {sample}; pass their names or a regex such as targets=[r'\\.mlp\\.']."
        )
    return found
