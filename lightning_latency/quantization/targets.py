"""Which modules quantization-aware training touches: target patterns, the skip list and layer-shape checks."""

from __future__ import annotations

from fnmatch import fnmatchcase

from torch import nn

from lightning_latency.quantization.config import QuantizationConfig


def _matches(name: str, module: nn.Module, patterns: tuple[str, ...] | list[str]) -> bool:
    cls = type(module).__name__
    return any(fnmatchcase(name, p) or fnmatchcase(cls, p) for p in patterns)


def _quantizable(module: nn.Module, config: QuantizationConfig) -> bool:
    if isinstance(module, nn.Linear):
        return True
    return config.include_embeddings and isinstance(module, nn.Embedding)


def select_modules(model: nn.Module, config: QuantizationConfig) -> dict[str, nn.Module]:
    """Modules of ``model`` that ``config`` quantizes, by fully qualified name, in model order.

    A module is selected if it is an ``nn.Linear`` (or an ``nn.Embedding`` with ``include_embeddings``), matches
    ``config.targets`` (when given), and neither it nor a parent matches the skip list.

    Raises:
        ValueError: nothing matched, naming the patterns and a few candidate names.
    """
    skip = config.skip_patterns
    skipped_prefixes: list[str] = []
    selected: dict[str, nn.Module] = {}
    candidates: list[str] = []
    for name, module in model.named_modules():
        if name and _matches(name, module, skip):
            skipped_prefixes.append(name + ".")
            continue
        if any(name.startswith(p) for p in skipped_prefixes):
            continue
        if not _quantizable(module, config):
            continue
        candidates.append(name)
        if config.targets is not None and not _matches(name, module, list(config.targets)):
            continue
        selected[name] = module
    if not selected:
        examples = ", ".join(repr(n) for n in candidates[:4]) or "none (no nn.Linear outside the skip list)"
        raise ValueError(
            f"Nothing to quantize: `targets`={list(config.targets) if config.targets is not None else None!r} with "
            f"`skip`={list(skip)!r} matched no nn.Linear in {type(model).__name__}. Candidates: {examples}. "
            f"Fix the patterns (fnmatch on the module name or class name, e.g. targets=['*attention*', '*dense*']) "
            f"or pass skip=[] to stop skipping."
        )
    return selected


def check_group_size(modules: dict[str, nn.Module], config: QuantizationConfig) -> None:
    """Raise if an int4 per-group scheme's ``group_size`` does not divide a selected layer's input size."""
    if not config.scheme.uses_groups:
        return
    for name, module in modules.items():
        width = module.in_features if isinstance(module, nn.Linear) else module.embedding_dim
        if width % config.group_size:
            divisors = [g for g in (256, 128, 64, 32, 16, 8) if width % g == 0]
            hint = f"group_size={divisors[0]}" if divisors else f"skip=[..., {name!r}]"
            raise ValueError(
                f"`group_size`={config.group_size} does not divide the input size {width} of layer {name!r} "
                f"(scheme {config.scheme.value!r} quantizes weights in groups along the input dimension). "
                f"Pass {hint}, or add the layer to `skip`."
            )
