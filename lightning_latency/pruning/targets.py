"""Which modules a pruning step touches: module-name patterns (the one pattern type), targets and exclusions.

Patterns are :mod:`lightning_latency.patterns` patterns (fnmatch on the qualified name or class name; ``"re:"``
for a regex search), as in every callback. Older releases read every string as a regex; those strings keep
working for one release with a ``LightningLatencyDeprecationWarning``:

* a string with regex metacharacters (``\\ ^ $ ( ) | + {``) and no glob characters (``* ? [``) is read as the
  old regex (write ``"re:<it>"``);
* a plain string (neither kind) that matches no module as fnmatch but does as a regex search (``"norm"``,
  ``"layers.0."``) falls back to the regex.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from torch import nn

from lightning_latency._deprecation import deprecated
from lightning_latency.patterns import REGEX_PREFIX, ModulePattern, compile_pattern

_GLOB = frozenset("*?[")
_REGEX_META = frozenset("\\^$()|+{")


@dataclass(frozen=True)
class NamePattern:
    """One ``targets`` / ``exclude`` string: how it matches now, and (plain strings) its old regex reading."""

    text: str
    pattern: ModulePattern
    legacy: ModulePattern | None = None  # plain string: the old regex search, used when fnmatch finds nothing

    def matches(self, name: str, module: nn.Module | None = None) -> bool:
        return self.pattern.matches(name, module)


def _regex(text: str, argument: str) -> ModulePattern:
    try:
        return ModulePattern(REGEX_PREFIX + text, re.compile(text))
    except re.error as err:
        raise ValueError(f"`{argument}` entry {text!r} is not a valid regular expression ({err}). Write a regex as "
                         f"'re:<regex>', or an fnmatch pattern such as '*dense*'.") from None


def _deprecated_regex(text: str, argument: str) -> None:
    deprecated(f"`{argument}` entry {text!r} is read as a regular expression, the old syntax; patterns are now "
               f"fnmatch (or 're:' for a regex). Pass {REGEX_PREFIX + text!r} instead.")


def compile_name_pattern(text: str, argument: str) -> NamePattern:
    """Compile one pattern string, reading old regex-only strings as documented in the module docstring."""
    if not isinstance(text, str) or not text:
        compile_pattern(text, argument)  # raises the shared message
    if text.startswith(REGEX_PREFIX) or _GLOB & set(text):
        return NamePattern(text, compile_pattern(text, argument))
    if _REGEX_META & set(text):
        pattern = _regex(text, argument)
        _deprecated_regex(text, argument)
        return NamePattern(text, pattern)
    return NamePattern(text, ModulePattern(text), _regex(text, argument))


def compile_entries(entries: Iterable[str | type[nn.Module]], argument: str) -> list[NamePattern | type[nn.Module]]:
    """``targets`` entries: pattern strings or ``nn.Module`` types."""
    out: list[NamePattern | type[nn.Module]] = []
    for entry in entries:
        if isinstance(entry, type) and issubclass(entry, nn.Module):
            out.append(entry)
        elif isinstance(entry, str):
            out.append(compile_name_pattern(entry, argument))
        else:
            raise ValueError(f"`{argument}` entries must be module-name patterns (fnmatch, or 're:<regex>') or "
                             f"nn.Module types, got {entry!r}. E.g. {argument}=['*mlp*'] or {argument}=[nn.Linear].")
    return out


def effective(model: nn.Module, entries: Sequence[NamePattern | type[nn.Module]],
              argument: str) -> list[NamePattern | type[nn.Module]]:
    """``entries`` as they match on ``model``: a plain string that matches nothing there as fnmatch but does as
    the old regex search falls back to the regex (with the deprecation warning)."""
    if not any(isinstance(e, NamePattern) and e.legacy is not None for e in entries):
        return list(entries)
    modules = list(model.named_modules())
    out: list[NamePattern | type[nn.Module]] = []
    for e in entries:
        if isinstance(e, NamePattern) and e.legacy is not None and not any(e.matches(n, m) for n, m in modules) \
                and any(e.legacy.matches(n) for n, _ in modules):
            _deprecated_regex(e.text, argument)
            e = NamePattern(e.text, e.legacy)
        out.append(e)
    return out


def entry_matches(entry: NamePattern | type[nn.Module], name: str, module: nn.Module) -> bool:
    if isinstance(entry, type):
        return isinstance(module, entry)
    return entry.matches(name, module)


def _is_linear(module: nn.Module) -> bool:
    # transformers' GPT-2 `Conv1D` is a linear layer with a transposed weight.
    return isinstance(module, nn.Linear) or type(module).__name__ == "Conv1D"


def input_dim(module: nn.Module) -> int:
    """The weight dimension that indexes input features (1 for ``nn.Linear``, 0 for GPT-2's ``Conv1D``)."""
    return 0 if type(module).__name__ == "Conv1D" else 1


def _has_weight(module: nn.Module) -> bool:
    return isinstance(getattr(module, "weight", None), nn.Parameter)


def resolve_targets(model: nn.Module, config: "PruningConfig") -> list[tuple[str, nn.Module]]:  # noqa: F821
    """Return ``[(name, module)]`` of the modules whose ``weight`` a masked step prunes.

    Raises:
        ValueError: a ``targets`` entry that matches no module with a weight, or nothing left to prune, naming the
            patterns and a few module names that exist.
    """
    exclude = effective(model, config.exclude_patterns, "exclude")
    targets = None if config.targets is None else effective(model, config.target_patterns, "targets")
    found: list[tuple[str, nn.Module]] = []
    hit: set[int] = set()
    for name, module in model.named_modules():
        if not name or not _has_weight(module):
            continue
        if targets is None:
            if not _is_linear(module) or any(entry_matches(p, name, module) for p in config.default_exclude_patterns):
                continue
        else:
            matched = [i for i, t in enumerate(targets) if entry_matches(t, name, module)]
            if not matched:
                continue
            hit.update(matched)
        if any(entry_matches(p, name, module) for p in exclude):
            continue
        found.append((name, module))
    missing = [] if targets is None else [config.targets[i] for i in range(len(targets)) if i not in hit]
    if missing or not found:
        sample = [n for n, m in model.named_modules() if _is_linear(m)][:5]
        what = ("" if not missing else f"{missing[0]!r} " if len(missing) == 1 else f"each of {missing} ") + "matches"
        raise ValueError(
            f"`targets`={list(config.targets) if config.targets is not None else None} (exclude="
            f"{list(config.exclude)}): {what} no module with a weight in {type(model).__name__}. Linear layers "
            f"present include {sample}; pass patterns that match them (fnmatch on the name or class name, e.g. "
            f"targets=['*mlp*'], or 're:<regex>')."
        )
    return found

