"""What to quantize and how: the :class:`QuantizationConfig` dataclass, the :class:`Backend` enum, their validation.

``scheme`` is one of our preset names (a row of ``presets.PRESETS``) or any torchao ``AOBaseConfig`` (e.g.
``IntxWeightOnlyConfig(weight_dtype=torch.int4, granularity=PerGroup(32))``). Everything here is plain data; torchao
is imported lazily by the functions that build its configs, so building a :class:`QuantizationConfig` is cheap.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import InitVar, dataclass, field
from enum import Enum
from typing import TYPE_CHECKING, Any

from lightning_latency._deprecation import renamed
from lightning_latency.patterns import ModulePattern, compile_patterns
from lightning_latency.quantization.presets import (
    PRESETS,
    Preset,
    Scheme,
    _is_torchao_config,
    _torchao_gap,
    _torchao_group_size,
    convert_base_config,
    convert_config,
    prepare_config,
)

if TYPE_CHECKING:
    from torchao.core.config import AOBaseConfig


class Backend(str, Enum):
    """How the converted model is run (see :func:`~lightning_latency.quantization.deploy`).

    * ``x86``: PT2E export + x86 inductor quantizer (static int8 activations, int8 per-channel weights) compiled with
      inductor freezing. CPU only; int8 per-channel schemes only. The fast CPU path.
    * ``torchao``: torchao quantized tensors (``QATConfig(step="convert")``) under ``torch.compile`` with freezing.
      Any scheme, CPU or CUDA.
    * ``x86_dynamic``: as ``x86`` with dynamic (per-call) int8 activation ranges.
    * ``fp32``: the float model (fake quantization stripped) compiled with inductor freezing.
    * ``bf16``: the float model cast to bf16, compiled with freezing; fast only on CPUs with native bf16.
    * ``ort``: ONNX Runtime, fp32 (``pip install lightning-latency[onnx]``).
    * ``ort_int8``: ONNX Runtime after its ``quantize_dynamic`` (int8 weights, dynamic int8 activations).
    * ``auto``: build the candidates, time them side by side on the example shapes, ship the fastest whose outputs
      agree with the reference (see :func:`~lightning_latency.quantization.deploy`).
    """

    X86 = "x86"
    TORCHAO = "torchao"
    X86_DYNAMIC = "x86_dynamic"
    FP32 = "fp32"
    BF16 = "bf16"
    ORT = "ort"
    ORT_INT8 = "ort_int8"
    AUTO = "auto"

    @property
    def needs_int8_scheme(self) -> bool:
        return self in (Backend.X86, Backend.X86_DYNAMIC)


# Patterns of lightning_latency.patterns: fnmatch on the qualified name or the class name, "re:" for a regex.
DEFAULT_EXCLUDE: tuple[str, ...] = (
    "*Embedding*",  # token / position embeddings (class name)
    "*embed*",  # e.g. `embed_tokens`, `word_embeddings`, `wte`-style names
    "*lm_head*",
    "*classifier*",  # sequence/token classification heads (BERT `classifier`, RoBERTa `classifier.dense`)
    "*score",  # Llama/GPT-style sequence classification head
    "*qa_outputs*",
    "*LayerNorm*",
    "*RMSNorm*",
)
DEFAULT_SKIP = DEFAULT_EXCLUDE  # deprecated name, kept one release
_EMBEDDING_EXCLUDES = ("*Embedding*", "*embed*")


def _allowed(enum: type[Enum]) -> str:
    return ", ".join(repr(e.value) for e in enum)


def parse_enum(enum: type[Enum], value: Any, argument: str) -> Any:
    """Turn ``value`` (enum member or string) into a member of ``enum`` or raise a ValueError naming ``argument``."""
    if isinstance(value, enum):
        return value
    try:
        return enum(str(value).lower())
    except ValueError:
        raise ValueError(
            f"`{argument}` must be one of {_allowed(enum)}, got {value!r}. "
            f"For the CPU encoder default pass {argument}={list(enum)[0].value!r}."
        ) from None


def _parse_scheme(value: Any) -> Scheme:
    try:
        return parse_enum(Scheme, value, "scheme")
    except ValueError:
        raise ValueError(
            f"`scheme` must be one of {_allowed(Scheme)} or a torchao AOBaseConfig (e.g. IntxWeightOnlyConfig("
            f"weight_dtype=torch.int4, granularity=PerGroup(32))), got {value!r:.80}. For the CPU encoder default "
            f"pass scheme='int8_dynamic'."
        ) from None


def _check_patterns(value: Any, argument: str) -> tuple[list[str] | None, tuple[ModulePattern, ...]]:
    if isinstance(value, str):
        value = [value]
    if value is not None and (not isinstance(value, (list, tuple)) or not all(isinstance(p, str) for p in value)):
        raise ValueError(f"`{argument}` must be a list of patterns (fnmatch on the module name or class name, or "
                         f"'re:<regex>'), got {value!r}. Pass e.g. {argument}=['*classifier*'].")
    return (None if value is None else list(value)), compile_patterns(value, argument)


@dataclass
class QuantizationConfig:
    """What quantization-aware training fake-quantizes, and what it converts to.

    Args:
        scheme: a :class:`Scheme` or its string value (``"int8_dynamic"``, ``"int8_int4"``, ``"int8_weight_only"``,
            ``"int4_weight_only"``), or a torchao ``AOBaseConfig`` (e.g. ``IntxWeightOnlyConfig(weight_dtype=
            torch.int4, granularity=PerGroup(32))``): fake-quantized through ``QATConfig(base, step="prepare")``
            and converted through ``QATConfig(base, step="convert")``.
        group_size: group size of the int4 per-group presets; must divide every targeted layer's ``in_features``.
            Ignored by the per-channel presets and by torchao configs (they carry their own granularity).
        targets: patterns (:mod:`lightning_latency.patterns`: fnmatch on the qualified name or class name,
            ``"re:<regex>"``); a module is a candidate if one matches. None: every ``nn.Linear`` (plus
            ``nn.Embedding`` with ``include_embeddings``).
        exclude: patterns never quantized (a matching parent excludes its children). None means
            :data:`DEFAULT_EXCLUDE` (embeddings, ``lm_head``, classifier heads, layer norms); ``[]`` quantizes
            every target.
        include_embeddings: also fake-quantize ``nn.Embedding`` weights (weight only; presets only) and drop the
            embedding entries from the default exclude list.
        backend: deployment backend, a :class:`Backend` or its string value; None picks ``"x86"`` for the int8
            per-channel presets and ``"torchao"`` otherwise.
        skip: deprecated name of ``exclude``.

    Raises:
        ValueError: unknown scheme or backend, a non-positive group size, a grid the x86 backend cannot run,
            patterns that are not strings or not valid regular expressions.

    Example::

        cfg = QuantizationConfig(scheme="int8_dynamic", exclude=["*classifier*", "re:pooler"])
        prepare_qat(model, cfg)
    """

    scheme: Scheme | str | AOBaseConfig = Scheme.INT8_DYNAMIC
    group_size: int = 32
    targets: Sequence[str] | None = None
    exclude: Sequence[str] | None = None
    include_embeddings: bool = False
    backend: Backend | str | None = None
    skip: InitVar[Sequence[str] | None] = None
    _resolved_exclude: tuple[str, ...] = field(default=(), init=False, repr=False)
    _target_patterns: tuple[ModulePattern, ...] | None = field(default=None, init=False, repr=False, compare=False)
    _exclude_patterns: tuple[ModulePattern, ...] = field(default=(), init=False, repr=False, compare=False)

    def __post_init__(self, skip: Sequence[str] | None) -> None:
        self.exclude = renamed("QuantizationConfig", "skip", skip, "exclude", self.exclude, None)
        if not _is_torchao_config(self.scheme):
            self.scheme = _parse_scheme(self.scheme)
        elif self.include_embeddings:
            raise ValueError(f"`include_embeddings`=True needs a scheme name (e.g. scheme='int8_weight_only'), got the "
                             f"torchao config {self.scheme_name}. Pass include_embeddings=False, or a scheme name.")
        if self.backend is None:
            self.backend = Backend.X86 if self.preset is not None and self.x86_compatible else Backend.TORCHAO
        self.backend = parse_enum(Backend, self.backend, "backend")
        if isinstance(self.group_size, bool) or not isinstance(self.group_size, int) or self.group_size <= 0:
            raise ValueError(
                f"`group_size` must be a positive int that divides the layers' in_features, got {self.group_size!r}. "
                f"Pass group_size=32 (or 64, 128)."
            )
        self.targets, targets = _check_patterns(self.targets, "targets")
        self._target_patterns = None if self.targets is None else targets
        self.exclude, _ = _check_patterns(self.exclude, "exclude")
        if self.backend.needs_int8_scheme and not self.x86_compatible:
            grid = "an int4 per-group grid" if self.uses_groups else "a grid other than int8 per-channel"
            raise ValueError(
                f"`backend`={self.backend.value!r} runs int8 per-channel weights only, but `scheme`={self.scheme_name} "
                f"trains {grid}. Pass backend='torchao', or scheme='int8_dynamic' for the x86 path."
            )
        exclude = tuple(DEFAULT_EXCLUDE if self.exclude is None else self.exclude)
        if self.include_embeddings and self.exclude is None:
            exclude = tuple(p for p in exclude if p not in _EMBEDDING_EXCLUDES)
        self._resolved_exclude = exclude
        self._exclude_patterns = compile_patterns(exclude, "exclude")
        self._warn_activation_grid()

    def _warn_activation_grid(self) -> None:
        import warnings

        if self.preset is not None or _torchao_gap(self.scheme) is not PRESETS[Scheme.INT8_DYNAMIC]:
            return
        from torchao.quantization.quant_primitives import MappingType

        if self.scheme.act_mapping_type is not MappingType.ASYMMETRIC:
            warnings.warn(
                f"`scheme`={self.scheme_name}: torchao 0.18 fake-quantizes per-token activations only asymmetric, so "
                f"training simulates asymmetric int8 activations and convert rounds them symmetric (a slightly "
                f"different grid). Pass Int8DynamicActivationInt8WeightConfig(act_mapping_type=MappingType.ASYMMETRIC) "
                f"to train on the exact grid.", UserWarning, stacklevel=4)

    # ------------------------------------------------------------------ what the scheme means
    @property
    def preset(self) -> Preset | None:
        """The :data:`PRESETS` row of a scheme name; None for a torchao config."""
        return self.scheme.preset if isinstance(self.scheme, Scheme) else None

    @property
    def scheme_name(self) -> str:
        """The preset name, or the torchao config's repr (for logs and ``state_key``)."""
        return self.scheme.value if isinstance(self.scheme, Scheme) else repr(self.scheme)

    @property
    def weight_group_size(self) -> int | None:
        """Group size of a per-group weight grid (every targeted ``in_features`` must be a multiple); else None."""
        if self.preset is not None:
            return self.group_size if self.preset.uses_groups else None
        return _torchao_group_size(self.scheme)

    @property
    def uses_groups(self) -> bool:
        return self.weight_group_size is not None

    @property
    def x86_compatible(self) -> bool:
        """True when the trained grid is int8 per-channel weights, which the x86 PT2E backends deploy."""
        return not self.uses_groups if self.preset is not None else _torchao_gap(self.scheme) is not None

    @property
    def exclude_patterns(self) -> tuple[str, ...]:
        """The exclude list actually applied (defaults resolved)."""
        return self._resolved_exclude

    @property
    def skip_patterns(self) -> tuple[str, ...]:
        """Deprecated alias of :attr:`exclude_patterns`."""
        return self._resolved_exclude

    def to_dict(self) -> dict[str, Any]:
        """Plain values, for logging hyperparameters and for ``state_dict``."""
        return {
            "scheme": self.scheme_name,
            "group_size": self.group_size,
            "targets": list(self.targets) if self.targets is not None else None,
            "exclude": list(self.exclude_patterns),
            "include_embeddings": self.include_embeddings,
            "backend": self.backend.value,
        }


__all__ = ["DEFAULT_EXCLUDE", "DEFAULT_SKIP", "PRESETS", "Backend", "Preset", "QuantizationConfig", "Scheme",
           "convert_base_config", "convert_config", "parse_enum", "prepare_config"]
