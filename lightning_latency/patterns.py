"""How every callback and core selects modules by name: one pattern type, the same rule everywhere.

A pattern is a string:

* ``"re:<regex>"``: a regular expression searched in the module's fully qualified name (``re.search``);
* anything else: an fnmatch pattern matched against the whole qualified name *or* the class name
  (``"*attention*"``, ``"bert.encoder.layer.0.*"``, ``"*LayerNorm*"``, an exact name).

This is torchao's convention for ``filter_fn`` strings (fnmatch by default, ``re:`` for a regex), so a pattern
written for one of our callbacks means the same in the others and in torchao configs.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from fnmatch import fnmatchcase

from torch import nn

REGEX_PREFIX = "re:"


@dataclass(frozen=True)
class ModulePattern:
    """One compiled pattern (see the module docstring). Build with :func:`compile_pattern`."""

    text: str
    regex: re.Pattern[str] | None = None

    def matches(self, name: str, module: nn.Module | None = None) -> bool:
        """True when ``name`` (a qualified module name) or the class name of ``module`` matches."""
        if self.regex is not None:
            return self.regex.search(name) is not None
        if fnmatchcase(name, self.text):
            return True
        return module is not None and fnmatchcase(type(module).__name__, self.text)


def compile_pattern(pattern: str, argument: str = "pattern") -> ModulePattern:
    """Compile one pattern, or raise a ValueError naming ``argument``, the value and the fix."""
    if not isinstance(pattern, str) or not pattern:
        raise ValueError(f"`{argument}` entries must be non-empty strings (fnmatch, or 're:<regex>'), got "
                         f"{pattern!r}. E.g. {argument}=['*attention*'] or {argument}=['re:layer\\.[0-3]\\.'].")
    if not pattern.startswith(REGEX_PREFIX):
        return ModulePattern(pattern)
    try:
        return ModulePattern(pattern, re.compile(pattern[len(REGEX_PREFIX):]))
    except re.error as err:
        raise ValueError(f"`{argument}` entry {pattern!r} is not a valid regular expression after 're:' ({err}). "
                         f"Fix the regex, or drop the 're:' prefix to use an fnmatch pattern such as '*attn*'."
                         ) from None


def compile_patterns(patterns: str | Iterable[str] | None, argument: str) -> tuple[ModulePattern, ...]:
    """Compile a pattern or a list of them (None: no patterns)."""
    if patterns is None:
        return ()
    if isinstance(patterns, str):
        patterns = [patterns]
    return tuple(compile_pattern(p, argument) for p in patterns)


def matches_any(patterns: Sequence[ModulePattern], name: str, module: nn.Module | None = None) -> bool:
    """True when one of ``patterns`` matches ``name`` / ``module``."""
    return any(p.matches(name, module) for p in patterns)


def as_regex_pattern(pattern: str) -> str:
    """``pattern`` written in the old regex-only syntax, as a pattern of this module (``"re:"`` + it)."""
    return pattern if pattern.startswith(REGEX_PREFIX) else REGEX_PREFIX + pattern


__all__ = ["REGEX_PREFIX", "ModulePattern", "as_regex_pattern", "compile_pattern", "compile_patterns", "matches_any"]
