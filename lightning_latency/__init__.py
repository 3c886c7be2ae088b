"""lightning-latency: make transformer and LLM inference faster from inside a PyTorch Lightning training loop.

Public names are imported lazily, so ``import lightning_latency`` is cheap and the cores
(``measure_latency``, ``prune_step``, ``prepare_qat`` …) can be used without importing Lightning.
"""

from __future__ import annotations

import importlib
import warnings
from typing import Any

from lightning_latency._deprecation import LightningLatencyDeprecationWarning
from lightning_latency._quiet import silence_import_noise

# Python hides DeprecationWarning outside __main__; a renamed argument in a user's script must be seen once.
warnings.simplefilter("default", LightningLatencyDeprecationWarning)
silence_import_noise()  # torchao's CUDA-kernel and pytree messages at its first import, on CPU (see _quiet.py)

__version__ = "0.1.0"

# public name -> module that defines it
_EXPORTS: dict[str, str] = {
    # latency measurement (core + callback)
    "LatencyConfig": "lightning_latency.latency",
    "LatencyReport": "lightning_latency.latency",
    "GenerationReport": "lightning_latency.latency",
    "measure_latency": "lightning_latency.latency",
    "measure_generation": "lightning_latency.latency",
    "compare_latency": "lightning_latency.latency",
    "model_stats": "lightning_latency.latency",
    "sweep_latency": "lightning_latency.latency",
    "sweep_generation": "lightning_latency.latency",
    "sweep_table": "lightning_latency.latency",
    "module_breakdown": "lightning_latency.latency",
    "BreakdownReport": "lightning_latency.latency",
    "ModelStats": "lightning_latency.latency",
    "TimingStats": "lightning_latency.latency",
    "tensor_nbytes": "lightning_latency.latency",
    "KNOWN_PEAKS": "lightning_latency.latency",
    "known_peaks": "lightning_latency.latency",
    "LatencyMonitor": "lightning_latency.latency.callback",
    "LatencyRecorder": "lightning_latency.latency",
    # pruning
    "PruningConfig": "lightning_latency.pruning",
    "prune_step": "lightning_latency.pruning",
    "layer_sensitivity": "lightning_latency.pruning",
    "plan_budget": "lightning_latency.pruning",
    "save_pruned": "lightning_latency.pruning",
    "load_pruned": "lightning_latency.pruning",
    "register_loadable": "lightning_latency.pruning",
    "PruningMode": "lightning_latency.pruning",
    "PruningSchedule": "lightning_latency.pruning",
    "PruningResult": "lightning_latency.pruning",
    "Pruner": "lightning_latency.pruning",
    "BudgetPruner": "lightning_latency.pruning",
    "apply_masks": "lightning_latency.pruning",
    "reshape_to_state_dict": "lightning_latency.pruning",
    "model_counts": "lightning_latency.pruning",
    "structured_sparsity": "lightning_latency.pruning",
    "MagnitudePruning": "lightning_latency.pruning.callback",
    "LatencyBudgetPruning": "lightning_latency.pruning.budget_callback",
    # quantization-aware training
    "QuantizationConfig": "lightning_latency.quantization",
    "prepare_qat": "lightning_latency.quantization",
    "convert_qat": "lightning_latency.quantization",
    "deploy": "lightning_latency.quantization",
    "DeployedModel": "lightning_latency.quantization",
    "DeployReport": "lightning_latency.quantization",
    "load_deployed": "lightning_latency.quantization",
    "Scheme": "lightning_latency.quantization",
    "QATController": "lightning_latency.quantization",
    "Phase": "lightning_latency.quantization",
    "Backend": "lightning_latency.quantization",
    "freeze_ranges": "lightning_latency.quantization",
    "weight_error": "lightning_latency.quantization",
    "unconvert_qat": "lightning_latency.quantization",
    "strip_qat": "lightning_latency.quantization",
    "is_prepared": "lightning_latency.quantization",
    "is_converted": "lightning_latency.quantization",
    "QuantizationAwareTraining": "lightning_latency.quantization.callback",
    # distillation
    "DistillationLoss": "lightning_latency.distillation",
    "HFDistillationModule": "lightning_latency.distillation.hf",
    "student_from_teacher_layers": "lightning_latency.distillation.students",
    "student_from_pruned_teacher": "lightning_latency.distillation.students",
    "every_other_layer": "lightning_latency.distillation.students",
    "cache_teacher_topk": "lightning_latency.distillation.offline",
    "TopKLogitsDataset": "lightning_latency.distillation.offline",
    "HiddenStateLoss": "lightning_latency.distillation.intermediate",
    "AttentionLoss": "lightning_latency.distillation.intermediate",
    "even_layer_map": "lightning_latency.distillation.intermediate",
    "ForwardKLLoss": "lightning_latency.distillation.losses",
    "ReverseKLLoss": "lightning_latency.distillation.losses",
    "JSDLoss": "lightning_latency.distillation.losses",
    "LogitMSELoss": "lightning_latency.distillation.losses",
    "distillation_auto_wrap_policy": "lightning_latency.distillation.fsdp",
    "DistillationWrapPolicy": "lightning_latency.distillation.fsdp",
    "DistillationModule": "lightning_latency.distillation.module",
    # multi-device
    "ddp_strategy": "lightning_latency.strategies",
    "fsdp_strategy": "lightning_latency.strategies",
    "CompressionDDPStrategy": "lightning_latency.strategies",
    "CompressionFSDPStrategy": "lightning_latency.strategies",
    "fsdp_problem": "lightning_latency.strategies",
    "full_params": "lightning_latency.strategies",
    "is_fsdp": "lightning_latency.strategies",
    "resolve_target": "lightning_latency._target",
    "is_spawned": "lightning_latency.strategies",
    # the shared callback contract and the module-selection pattern type
    "CompressionCallback": "lightning_latency.base",
    "ModulePattern": "lightning_latency.patterns",
    "compile_patterns": "lightning_latency.patterns",
    "LightningLatencyDeprecationWarning": "lightning_latency._deprecation",
    # LLM decode: weight-only low-bit linears on packed CPU kernels, their QAT, the fast generation loop
    "quantize_weight_only": "lightning_latency.quantization.weight_only",
    "Int4WeightOnlyLinear": "lightning_latency.quantization.weight_only",
    "Int8WeightOnlyLinear": "lightning_latency.quantization.weight_only",
    "prepare_weight_only_qat": "lightning_latency.quantization.weight_only_qat",
    "convert_weight_only_qat": "lightning_latency.quantization.weight_only_qat",
    "precision_sensitivity": "lightning_latency.quantization.mixed",
    "plan_precision": "lightning_latency.quantization.mixed",
    "quantize_mixed": "lightning_latency.quantization.mixed",
    "PrecisionReport": "lightning_latency.quantization.mixed",
    "PrecisionPlan": "lightning_latency.quantization.mixed",
    "fast_generate": "lightning_latency.latency.fast_generation",
    "FastGenerator": "lightning_latency.latency.fast_generation",
    "measure_bandwidth": "lightning_latency.latency.fast_generation",
    # GGUF export, QAT on GGUF's own block grids, and the llama.cpp runtime
    "export_gguf": "lightning_latency.quantization.gguf",
    "prepare_gguf_qat": "lightning_latency.quantization.weight_only_qat",
    "gguf_fake_quantize": "lightning_latency.quantization.weight_only_qat",
    "LlamaCppConfig": "lightning_latency.latency.llamacpp",
    "LlamaCppRunner": "lightning_latency.latency.llamacpp",
    "measure_llamacpp": "lightning_latency.latency.llamacpp",
    "llamacpp_perplexity": "lightning_latency.latency.llamacpp",
}

__all__ = sorted(_EXPORTS) + ["__version__"]


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'lightning_latency' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return __all__
