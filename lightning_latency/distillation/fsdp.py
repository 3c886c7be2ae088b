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

from collections.abc import Iterable

from torch import nn

TEACHER_ATTR = "teacher"
STUDENT_ATTR = "student"


class DistillationWrapPolicy:
    """Callable FSDP ``auto_wrap_policy``: wrap ``*.teacher``, ``*.student`` and any ``layer_classes`` instance.

    A class (not a closure) so it pickles for spawn-based launchers. The root (the ``DistillationModule``) keeps
    only what is left: the intermediate-loss projections, which are trainable.

    Args:
        layer_classes: transformer block classes to wrap individually inside student and teacher (e.g.
            ``LlamaDecoderLayer``); ``None`` wraps the two models as whole units.
    """

    def __init__(self, layer_classes: Iterable[type[nn.Module]] | None = None) -> None:
        self.layer_classes = tuple(layer_classes or ())
        self._roots: set[int] = set()

    def mark(self, module: nn.Module) -> None:
        """Register the student and teacher of a ``DistillationModule`` (done when the policy visits the root)."""
        for attr in (TEACHER_ATTR, STUDENT_ATTR):
            child = getattr(module, attr, None)
            if isinstance(child, nn.Module):
                self._roots.add(id(child))

    def __call__(self, module: nn.Module, recurse: bool, nonwrapped_numel: int = 0) -> bool:
        if recurse:
            if isinstance(getattr(module, STUDENT_ATTR, None), nn.Module):
                self._roots = set()  # the root DistillationModule: (re)register its two models
                self.mark(module)
            return True
        if id(module) in self._roots:
            return True
        return bool(self.layer_classes) and isinstance(module, self.layer_classes)


def distillation_auto_wrap_policy(layer_classes: Iterable[type[nn.Module]] | None = None) -> DistillationWrapPolicy:
    """The FSDP auto-wrap policy for a ``DistillationModule`` (see :class:`DistillationWrapPolicy`)."""
    return DistillationWrapPolicy(layer_classes)


__all__ = ["DistillationWrapPolicy", "distillation_auto_wrap_policy"]
