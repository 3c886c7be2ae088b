"""Pruning configuration: what to prune, how finely, and how importance is scored (validated on construction)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from enum import Enum
from typing import Any

from torch import nn

from lightning_latency.pruning.targets import NamePattern, compile_entries


class PruningMode(str, Enum):
    """Granularity of pruning.

    * ``structured``: physically removes whole attention heads and MLP neurons, so layers shrink and latency drops.
    * ``unstructured``: per-weight masks (zeros); a dense kernel does the same work, so no speed-up on CPU.
    * ``nm``: N:M semi-structured masks (e.g. 2:4); only sparse tensor-core kernels can exploit them.
    """

    STRUCTURED = "structured"
    UNSTRUCTURED = "unstructured"
    NM = "nm"


_IMPORTANCE_NAMES = ("l1", "l2", "taylor", "activation")
_SCOPES = ("local", "global")

#: Module-name patterns (``lightning_latency.patterns``) never pruned by default: embeddings, norms, output heads.
DEFAULT_EXCLUDE: tuple[str, ...] = (
    r"re:(^|\.)(embeddings?|embed_tokens|wte|wpe|word_embeddings|position_embeddings|token_type_embeddings)(\.|$)",
    r"re:(^|\.)(lm_head|classifier|score|pooler|qa_outputs|cls)(\.|$)",
    r"re:norm|ln_",
)


@dataclass
class PruningConfig:
    """What one pruning step does.

    Args:
        mode: ``"structured"`` (remove heads/neurons), ``"unstructured"`` (per-weight masks) or ``"nm"`` (N:M masks).
        importance: how weights are scored. ``"l2"``/``"l1"``: magnitude of the weight (or of the group of weights
            forming a head/neuron); ``"taylor"``: ``|w * grad|`` (needs gradients, i.e. call after ``backward``);
            ``"activation"``: mean ``|activation|`` on calibration data (structured, one-shot:
            ``student_from_pruned_teacher(..., calibration=...)``, or pass an ``ActivationImportance`` object).
            For structured mode any torch-pruning importance object (``tp.importance.GroupTaylorImportance()``,
            ``GroupHessianImportance()`` …) is accepted as is. For masked modes a callable
            ``fn(name, weight) -> scores`` (same shape as ``weight``) is accepted.
        targets: module-name patterns or ``nn.Module`` types to prune (masked modes). A pattern is fnmatch on the
            qualified name or the class name (``"*mlp*"``, ``"*.intermediate.dense"``), or ``"re:<regex>"`` for a
            regex search (see :mod:`lightning_latency.patterns`); every entry must match a module. ``None``: every
            linear layer of the model except :data:`DEFAULT_EXCLUDE` (embeddings, norms, ``lm_head``, classifiers).
        exclude: extra patterns never pruned (added to the defaults); in structured mode, attention / MLP block
            names to leave whole (e.g. ``["*layers.0.*"]``). Old regex-only strings keep working for one release
            with a deprecation warning (see :mod:`lightning_latency.pruning.targets`).
        scope: masked modes: ``"local"`` (same sparsity in every layer) or ``"global"`` (one magnitude threshold).
        n, m: the N:M pattern for ``mode="nm"``: keep ``n`` of every ``m`` consecutive input weights.
        prune_heads, prune_neurons: structured mode: shrink attention heads and/or MLP width.
        max_layer_sparsity: no layer is pruned beyond this fraction (structured: at least one head and one
            neuron always stay), so no layer is emptied.
    """

    mode: PruningMode | str = PruningMode.UNSTRUCTURED
    importance: str | Any = "l2"
    targets: Sequence[str | type[nn.Module]] | None = None
    exclude: Sequence[str] = field(default_factory=tuple)
    scope: str = "local"
    n: int = 2
    m: int = 4
    prune_heads: bool = True
    prune_neurons: bool = True
    max_layer_sparsity: float = 0.95
    target_patterns: list[NamePattern | type[nn.Module]] = field(init=False, repr=False, compare=False)
    exclude_patterns: list[NamePattern] = field(init=False, repr=False, compare=False)
    default_exclude_patterns: list[NamePattern] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        try:
            self.mode = PruningMode(str(getattr(self.mode, "value", self.mode)).lower())
        except ValueError:
            raise ValueError(
                f"`mode` must be one of {[m.value for m in PruningMode]}, got {self.mode!r}. "
                f"Use mode='structured' for a faster model, 'unstructured' or 'nm' for masks."
            ) from None
        if isinstance(self.importance, str):
            if self.importance.lower() not in _IMPORTANCE_NAMES:
                raise ValueError(
                    f"`importance` must be one of {list(_IMPORTANCE_NAMES)}, a torch-pruning importance object or a "
                    f"callable, got {self.importance!r}. Use importance='l2' for weight magnitude."
                )
            self.importance = self.importance.lower()
        elif not callable(self.importance):
            raise ValueError(
                f"`importance` must be 'l1', 'l2', 'taylor', a torch-pruning importance object or a callable, "
                f"got {type(self.importance).__name__}."
            )
        if self.scope not in _SCOPES:
            raise ValueError(f"`scope` must be one of {list(_SCOPES)}, got {self.scope!r}. Use scope='local'.")
        if not (isinstance(self.n, int) and isinstance(self.m, int) and 0 < self.n < self.m):
            raise ValueError(
                f"`n` and `m` must be integers with 0 < n < m, got n={self.n!r}, m={self.m!r}. For 2:4 pass n=2, m=4."
            )
        if not 0.0 < self.max_layer_sparsity <= 1.0:
            raise ValueError(
                f"`max_layer_sparsity` must be in (0, 1], got {self.max_layer_sparsity!r}. The default 0.95 keeps "
                f"at least 5% of every layer."
            )
        if self.mode is PruningMode.STRUCTURED and not (self.prune_heads or self.prune_neurons):
            raise ValueError(
                "`prune_heads` and `prune_neurons` are both False: structured pruning would remove nothing. "
                "Set at least one to True."
            )
        if isinstance(self.targets, (str, type)):
            self.targets = [self.targets]
        self.target_patterns = compile_entries(self.targets or (), "targets")
        if isinstance(self.exclude, str):
            self.exclude = [self.exclude]
        if any(isinstance(p, type) for p in self.exclude):
            raise ValueError(f"`exclude` entries must be module-name patterns (fnmatch, or 're:<regex>'), got "
                             f"{list(self.exclude)!r}. E.g. exclude=['*layers.0.*'].")
        self.exclude_patterns = compile_entries(self.exclude, "exclude")  # type: ignore[assignment]
        self.default_exclude_patterns = compile_entries(DEFAULT_EXCLUDE, "DEFAULT_EXCLUDE")  # type: ignore[assignment]

    @property
    def is_masked(self) -> bool:
        return self.mode is not PruningMode.STRUCTURED


def check_sparsity(value: Any, name: str = "sparsity") -> float:
    """Return ``value`` as a float in [0, 1) or raise a ValueError naming ``name``."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= float(value) < 1.0:
        raise ValueError(
            f"`{name}` must be in [0, 1), got {value!r}. For 50% sparsity pass {name}=0.5."
        )
    return float(value)

