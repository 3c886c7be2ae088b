"""Which modules quantization-aware training touches: target and exclude patterns, and layer-shape checks.

Patterns are those of :mod:`lightning_latency.patterns` (fnmatch on the qualified name or the class name, ``"re:"``
for a regex), the same rule pruning uses.
"""

from __future__ import annotations

from torch import nn

from lightning_latency.patterns import matches_any
from lightning_latency.quantization.config import QuantizationConfig


def _quantizable(module: nn.Module, config: QuantizationConfig) -> bool:
    if isinstance(module, nn.Linear):
        return True
    return config.include_embeddings and isinstance(module, nn.Embedding)


def select_modules(model: nn.Module, config: QuantizationConfig) -> dict[str, nn.Module]:
    """Modules of ``model`` that ``config`` quantizes, by fully qualified name, in model order.

    A module is selected if it is an ``nn.Linear`` (or an ``nn.Embedding`` with ``include_embeddings``), matches
    ``config.targets`` (when given), and neither it nor a parent matches the exclude list.

    Raises:
        ValueError: nothing matched, naming the patterns and a few candidate names.
    """
    exclude, targets = config._exclude_patterns, config._target_patterns
    excluded_prefixes: list[str] = []
    selected: dict[str, nn.Module] = {}
    candidates: list[str] = []
    for name, module in model.named_modules():
        if name and matches_any(exclude, name, module):
            excluded_prefixes.append(name + ".")
            continue
        if any(name.startswith(p) for p in excluded_prefixes):
            continue
        if not _quantizable(module, config):
            continue
        candidates.append(name)
        if targets is not None and not matches_any(targets, name, module):
            continue
        selected[name] = module
    if not selected:
        examples = ", ".join(repr(n) for n in candidates[:4]) or "none (no nn.Linear outside the exclude list)"
        raise ValueError(
            f"Nothing to quantize: `targets`={config.targets!r} with `exclude`={list(config.exclude_patterns)!r} "
            f"matched no nn.Linear in {type(model).__name__}. Candidates: {examples}. Fix the patterns (fnmatch on "
            f"the module name or class name, e.g. targets=['*attention*', '*dense*'], or 're:<regex>') or pass "
            f"exclude=[] to stop excluding."
        )
    return selected


def check_group_size(modules: dict[str, nn.Module], config: QuantizationConfig) -> None:
    """Raise if a per-group weight grid's group size does not divide a selected layer's input size."""
    group = config.weight_group_size
    if group is None:
        return
    for name, module in modules.items():
        width = module.in_features if isinstance(module, nn.Linear) else module.embedding_dim
        if width % group:
            divisors = [g for g in (256, 128, 64, 32, 16, 8) if width % g == 0]
            hint = f"group_size={divisors[0]}" if divisors else f"exclude=[..., {name!r}]"
            raise ValueError(
                f"`group_size`={group} does not divide the input size {width} of layer {name!r} "
                f"(scheme {config.scheme_name} quantizes weights in groups along the input dimension). "
                f"Pass {hint}, or add the layer to `exclude`."
            )
