"""What to quantize and how: the :class:`QuantizationConfig` dataclass, the :class:`Scheme` enum and their validation.

Everything here is plain data; torchao is imported lazily by the functions that build its configs, so building
and validating a :class:`QuantizationConfig` is cheap.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from enum import Enum
from typing import Any


class Scheme(str, Enum):
    """Quantization scheme: what the fake quantizers simulate during training and what ``convert`` produces.

    * ``int8_dynamic``: int8 dynamic per-token (asymmetric) activations + int8 per-channel symmetric weights.
      The CPU / encoder default; deploys through the x86 PT2E path (:func:`~lightning_latency.quantization.deploy`).
    * ``int8_int4``: int8 dynamic per-token activations + int4 per-group symmetric weights (LLM default).
    * ``int8_weight_only``: int8 per-channel symmetric weights, activations stay in floating point.
    * ``int4_weight_only``: int4 per-group symmetric weights, activations stay in floating point.
    """

    INT8_DYNAMIC = "int8_dynamic"
    INT8_INT4 = "int8_int4"
    INT8_WEIGHT_ONLY = "int8_weight_only"
    INT4_WEIGHT_ONLY = "int4_weight_only"

    @property
    def uses_groups(self) -> bool:
        return self in (Scheme.INT8_INT4, Scheme.INT4_WEIGHT_ONLY)

    @property
    def quantizes_activations(self) -> bool:
        return self in (Scheme.INT8_DYNAMIC, Scheme.INT8_INT4)


class Backend(str, Enum):
    """How the converted model is run (see :func:`~lightning_latency.quantization.deploy`).

    * ``x86``: PT2E export + x86 inductor quantizer (static int8 activations, int8 per-channel weights) compiled with
      inductor freezing. CPU only; int8 schemes only. The fast CPU path.
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


# Names are matched with fnmatch against both the module's fully qualified name and its class name.
DEFAULT_SKIP: tuple[str, ...] = (
    "*Embedding*",  # token / position embeddings (class name)
    "*embed*",  # e.g. `embed_tokens`, `word_embeddings`, `wte`-style names
    "*lm_head*",
    "*classifier*",  # sequence/token classification heads (BERT `classifier`, RoBERTa `classifier.dense`)
    "*score",  # Llama/GPT-style sequence classification head
    "*qa_outputs*",
    "*LayerNorm*",
    "*RMSNorm*",
)
_EMBEDDING_SKIPS = ("*Embedding*", "*embed*")


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


@dataclass
class QuantizationConfig:
    """What quantization-aware training fake-quantizes, and what it converts to.

    Args:
        scheme: a :class:`Scheme` or its string value (``"int8_dynamic"``, ``"int8_int4"``, ``"int8_weight_only"``,
            ``"int4_weight_only"``).
        group_size: group size of the int4 per-group weight schemes; must divide every targeted layer's
            ``in_features``. Ignored by the per-channel int8 schemes.
        targets: fnmatch patterns; a module is a candidate if its fully qualified name or class name matches one.
            None means every ``nn.Linear`` (plus ``nn.Embedding`` with ``include_embeddings``).
        skip: fnmatch patterns (name or class name) never quantized. None means :data:`DEFAULT_SKIP`
            (embeddings, ``lm_head``, classifier heads, layer norms); ``[]`` quantizes every target.
        include_embeddings: also fake-quantize ``nn.Embedding`` weights (weight only) and drop the embedding entries
            from the default skip list.
        backend: deployment backend, a :class:`Backend` or its string value (``"x86"`` or ``"torchao"``); None
            picks ``"x86"`` for the int8 schemes and ``"torchao"`` for the int4 ones.

    Raises:
        ValueError: unknown scheme or backend, a non-positive group size, an int4 scheme with the x86 backend.

    Example::

        cfg = QuantizationConfig(scheme="int8_dynamic", skip=["*classifier*", "*pooler*"])
        prepare_qat(model, cfg)
    """

    scheme: Scheme | str = Scheme.INT8_DYNAMIC
    group_size: int = 32
    targets: Sequence[str] | None = None
    skip: Sequence[str] | None = None
    include_embeddings: bool = False
    backend: Backend | str | None = None
    _resolved_skip: tuple[str, ...] = field(default=(), init=False, repr=False)

    def __post_init__(self) -> None:
        self.scheme = parse_enum(Scheme, self.scheme, "scheme")
        if self.backend is None:
            self.backend = Backend.TORCHAO if self.scheme.uses_groups else Backend.X86
        self.backend = parse_enum(Backend, self.backend, "backend")
        if isinstance(self.group_size, bool) or not isinstance(self.group_size, int) or self.group_size <= 0:
            raise ValueError(
                f"`group_size` must be a positive int that divides the layers' in_features, got {self.group_size!r}. "
                f"Pass group_size=32 (or 64, 128)."
            )
        for name in ("targets", "skip"):
            value = getattr(self, name)
            if isinstance(value, str):
                setattr(self, name, [value])
            elif value is not None and not all(isinstance(p, str) for p in value):
                raise ValueError(
                    f"`{name}` must be a list of fnmatch patterns (strings), got {value!r}. "
                    f"Pass e.g. {name}=['*classifier*']."
                )
        if self.backend.needs_int8_scheme and self.scheme.uses_groups:
            raise ValueError(
                f"`backend`={self.backend.value!r} runs int8 per-channel weights only, but `scheme`={self.scheme.value!r} trains an "
                f"int4 per-group grid. Pass backend='torchao' for int4 schemes, or scheme='int8_dynamic' for the x86 "
                f"path."
            )
        skip = tuple(DEFAULT_SKIP if self.skip is None else self.skip)
        if self.include_embeddings and self.skip is None:
            skip = tuple(p for p in skip if p not in _EMBEDDING_SKIPS)
        self._resolved_skip = skip

    @property
    def skip_patterns(self) -> tuple[str, ...]:
        """The skip list actually applied (defaults resolved)."""
        return self._resolved_skip

    def to_dict(self) -> dict[str, Any]:
        """Plain values, for logging hyperparameters and for ``state_dict``."""
        return {
            "scheme": self.scheme.value,
            "group_size": self.group_size,
            "targets": list(self.targets) if self.targets is not None else None,
            "skip": list(self.skip_patterns),
            "include_embeddings": self.include_embeddings,
            "backend": self.backend.value,
        }


def fake_quantize_configs(config: QuantizationConfig, embedding: bool = False) -> tuple[Any, Any]:
    """The torchao ``(activation_config, weight_config)`` pair simulated during training for ``config.scheme``.

    Embeddings get weight fake quantization only (torchao has no activation fake quantization for them).
    """
    import torch
    from torchao.quantization.qat import IntxFakeQuantizeConfig

    scheme = config.scheme
    # torchao 0.18 implements per-token activation fake quantization only asymmetric ("Symmetric per token is not
    # supported yet"), so the int8 activation schemes convert with an asymmetric activation mapping to match.
    act = IntxFakeQuantizeConfig(torch.int8, "per_token", is_symmetric=False) if scheme.quantizes_activations else None
    if scheme.uses_groups:
        weight = IntxFakeQuantizeConfig(torch.int4, group_size=config.group_size, is_symmetric=True)
    else:
        weight = IntxFakeQuantizeConfig(torch.int8, "per_channel", is_symmetric=True)
    return (None if embedding else act), weight


def convert_base_config(config: QuantizationConfig) -> Any:
    """The torchao post-training config applied by ``QATConfig(base, step="convert")`` for ``config.scheme``."""
    import torch
    from torchao.quantization import (
        Int8DynamicActivationInt8WeightConfig,
        Int8DynamicActivationIntxWeightConfig,
        Int8WeightOnlyConfig,
        IntxWeightOnlyConfig,
    )
    from torchao.quantization.granularity import PerGroup
    from torchao.quantization.quant_primitives import MappingType

    scheme = config.scheme
    # set_inductor_config=False: torchao would otherwise change global inductor settings as a side effect.
    if scheme is Scheme.INT8_DYNAMIC:
        return Int8DynamicActivationInt8WeightConfig(act_mapping_type=MappingType.ASYMMETRIC, set_inductor_config=False)
    if scheme is Scheme.INT8_WEIGHT_ONLY:
        return Int8WeightOnlyConfig(set_inductor_config=False)
    if scheme is Scheme.INT8_INT4:
        return Int8DynamicActivationIntxWeightConfig(weight_dtype=torch.int4,
                                                     weight_granularity=PerGroup(config.group_size))
    return IntxWeightOnlyConfig(weight_dtype=torch.int4, granularity=PerGroup(config.group_size))
