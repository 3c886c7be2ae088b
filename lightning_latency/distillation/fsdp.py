"""FSDP auto-wrap policy that keeps the frozen teacher and the trainable student in separate FSDP units.

FSDP flattens every parameter of a unit into one ``FlatParameter``; with ``use_orig_params=False`` a unit may not
mix ``requires_grad=True`` and ``False`` parameters, and even with ``use_orig_params=True`` a mixed unit keeps
gradient/optimizer bookkeeping for frozen weights. Wrapping the teacher and the student (and, inside each, the
transformer blocks) as their own units avoids both. GPU only: Lightning refuses FSDP on CPU.

Example::

    policy = DistillationWrapPolicy(layer_classes={LlamaDecoderLayer})
    Trainer(accelerator="gpu", strategy=FSDPStrategy(auto_wrap_policy=policy)).fit(DistillationModule(s, t))
"""

from __future__ import annotations

from lightning_latency.strategies import DistillationWrapPolicy, distillation_auto_wrap_policy

__all__ = ["DistillationWrapPolicy", "distillation_auto_wrap_policy"]
