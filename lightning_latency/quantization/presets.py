"""Our scheme names as presets: ONE table from a :class:`Scheme` to the torchao configs it stands for.

A preset is data (:class:`Preset`): the fake-quantization configs training simulates and the post-training configs
``convert`` applies, each built from ``group_size`` on demand (torchao is imported lazily). A torchao
``AOBaseConfig`` passed as ``scheme`` needs no row: torchao's ``QATConfig(base, step="prepare")`` infers its fake
quantizers, except for the two int8 per-channel configs torchao 0.18 cannot infer, which map to our rows
(:func:`_torchao_gap`). :func:`prepare_config` / :func:`convert_config` are the one dispatch for both.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from enum import Enum
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from lightning_latency.quantization.config import QuantizationConfig


class Scheme(str, Enum):
    """Preset quantization schemes (rows of :data:`PRESETS`).

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
    def preset(self) -> Preset:
        return PRESETS[self]

    @property
    def uses_groups(self) -> bool:
        return self.preset.uses_groups

    @property
    def quantizes_activations(self) -> bool:
        return self.preset.activation is not None


# --------------------------------------------------------------------- torchao config builders (lazy imports)
def _int8_per_token() -> Any:
    import torch
    from torchao.quantization.qat import IntxFakeQuantizeConfig

    # torchao 0.18 implements per-token activation fake quantization only asymmetric ("Symmetric per token is not
    # supported yet"), so the int8 activation presets convert with an asymmetric activation mapping to match.
    return IntxFakeQuantizeConfig(torch.int8, "per_token", is_symmetric=False)


def _int8_per_channel(group_size: int) -> Any:
    import torch
    from torchao.quantization.qat import IntxFakeQuantizeConfig

    return IntxFakeQuantizeConfig(torch.int8, "per_channel", is_symmetric=True)


def _int4_per_group(group_size: int) -> Any:
    import torch
    from torchao.quantization.qat import IntxFakeQuantizeConfig

    return IntxFakeQuantizeConfig(torch.int4, group_size=group_size, is_symmetric=True)


def _convert_int8_dynamic(group_size: int) -> Any:
    from torchao.quantization import Int8DynamicActivationInt8WeightConfig
    from torchao.quantization.quant_primitives import MappingType

    # set_inductor_config=False: torchao would otherwise change global inductor settings as a side effect.
    return Int8DynamicActivationInt8WeightConfig(act_mapping_type=MappingType.ASYMMETRIC, set_inductor_config=False)


def _convert_int8_weight_only(group_size: int) -> Any:
    from torchao.quantization import Int8WeightOnlyConfig

    return Int8WeightOnlyConfig(set_inductor_config=False)


def _convert_int8_int4(group_size: int) -> Any:
    import torch
    from torchao.quantization import Int8DynamicActivationIntxWeightConfig
    from torchao.quantization.granularity import PerGroup

    return Int8DynamicActivationIntxWeightConfig(weight_dtype=torch.int4, weight_granularity=PerGroup(group_size))


def _convert_int4_weight_only(group_size: int) -> Any:
    import torch
    from torchao.quantization import IntxWeightOnlyConfig
    from torchao.quantization.granularity import PerGroup

    return IntxWeightOnlyConfig(weight_dtype=torch.int4, granularity=PerGroup(group_size))


def _convert_int8_embedding(group_size: int) -> Any:
    import torch
    from torchao.quantization import IntxWeightOnlyConfig
    from torchao.quantization.granularity import PerAxis

    return IntxWeightOnlyConfig(weight_dtype=torch.int8, granularity=PerAxis(0))


@dataclass(frozen=True)
class Preset:
    """One scheme name: the torchao configs it stands for, each built from ``group_size`` on demand.

    Attributes:
        weight: fake-quantization config of the weights (linears and embeddings).
        activation: fake-quantization config of the linears' input activations; None: weight only.
        convert: the post-training config ``QATConfig(convert, step="convert")`` applies to the linears.
        convert_embedding: the same for embeddings (weight only).
        uses_groups: weights are quantized in groups of ``group_size`` along the input dimension.
    """

    weight: Callable[[int], Any]
    activation: Callable[[], Any] | None
    convert: Callable[[int], Any]
    convert_embedding: Callable[[int], Any]
    uses_groups: bool


#: The one dispatch table from scheme names to torchao configs.
PRESETS: dict[Scheme, Preset] = {
    Scheme.INT8_DYNAMIC: Preset(_int8_per_channel, _int8_per_token, _convert_int8_dynamic, _convert_int8_embedding,
                                uses_groups=False),
    Scheme.INT8_INT4: Preset(_int4_per_group, _int8_per_token, _convert_int8_int4, _convert_int4_weight_only,
                             uses_groups=True),
    Scheme.INT8_WEIGHT_ONLY: Preset(_int8_per_channel, None, _convert_int8_weight_only, _convert_int8_embedding,
                                    uses_groups=False),
    Scheme.INT4_WEIGHT_ONLY: Preset(_int4_per_group, None, _convert_int4_weight_only, _convert_int4_weight_only,
                                    uses_groups=True),
}


def _is_torchao_config(value: Any) -> bool:
    if value is None or isinstance(value, (str, Enum)):
        return False
    from torchao.core.config import AOBaseConfig

    return isinstance(value, AOBaseConfig)


def _torchao_gap(base: Any) -> Preset | None:
    """The preset whose fake quantizers simulate ``base`` where torchao 0.18's ``QATConfig`` cannot infer them.

    torchao 0.18 infers fake quantizers for its intx / int4 / float8 configs but raises "Unexpected base config"
    for its two int8 per-channel configs; those are the grids of our ``int8_dynamic`` / ``int8_weight_only``.
    """
    from torchao.quantization import Int8DynamicActivationInt8WeightConfig, Int8WeightOnlyConfig
    from torchao.quantization.granularity import PerAxis, PerRow

    if not isinstance(getattr(base, "granularity", None), (PerRow, PerAxis)):
        return None
    if isinstance(base, Int8DynamicActivationInt8WeightConfig):
        return PRESETS[Scheme.INT8_DYNAMIC]
    if isinstance(base, Int8WeightOnlyConfig) and base.group_size is None:
        return PRESETS[Scheme.INT8_WEIGHT_ONLY]
    return None


def _torchao_group_size(base: Any) -> int | None:
    """The group size of a torchao config's per-group weight grid (None: not per-group)."""
    from torchao.quantization.granularity import PerGroup

    for attr in ("granularity", "weight_granularity"):
        if isinstance(getattr(base, attr, None), PerGroup):
            return int(getattr(base, attr).group_size)
    size = getattr(base, "group_size", None)
    return size if isinstance(size, int) and not isinstance(size, bool) else None


def convert_base_config(config: QuantizationConfig) -> Any:
    """The torchao post-training config of ``config``'s linears: the one given, or the preset's."""
    return config.preset.convert(config.group_size) if config.preset is not None else config.scheme


def prepare_config(config: QuantizationConfig, embedding: bool = False) -> Any:
    """The torchao ``QATConfig(step="prepare")`` that fake-quantizes ``config``'s linears (or embeddings)."""
    from torchao.quantization.qat import QATConfig

    preset = config.preset or _torchao_gap(config.scheme)
    if preset is None:  # torchao infers the fake quantizers from its own config
        return QATConfig(config.scheme, step="prepare")
    # embeddings get weight fake quantization only (torchao has no activation fake quantization for them)
    act = None if embedding or preset.activation is None else preset.activation()
    return QATConfig(activation_config=act, weight_config=preset.weight(config.group_size), step="prepare")


def convert_config(config: QuantizationConfig, embedding: bool = False) -> Any:
    """The torchao ``QATConfig(step="convert")`` that turns ``config``'s fake-quantized modules into quantized ones."""
    from torchao.quantization.qat import QATConfig

    base = config.preset.convert_embedding(config.group_size) if embedding else convert_base_config(config)
    return QATConfig(base, step="convert")


__all__ = ["PRESETS", "Preset", "Scheme", "convert_base_config", "convert_config", "prepare_config"]
