"""Library noise we can avoid, silenced narrowly at our boundary (only the exact messages, nothing else).

torchao 0.18 logs, when it is first imported on a CPU-only machine, that it cannot load its CUDA kernels
("Failed to load .../torchao/_C_mxfp8...so"), and torch 2.13's pytree warns that torchao registers Enum classes the
deprecated way ("... is an Enum subclass and is now natively supported by torch.compile ..."). Neither concerns a
CPU run. A filter on exactly those two loggers drops exactly those messages; every other record (errors included)
passes.

Lightning's own ``utilities/_pytree.py`` builds torch's ``LeafSpec``, which torch 2.13 deprecates with a
``FutureWarning`` printed at every fit's first batch; nothing a user can change. One warnings filter drops that
message, and only where Lightning's module raises it (the same deprecation from anyone else's code still shows).
"""

from __future__ import annotations

import logging
import warnings

_NOISE: dict[str, tuple[str, ...]] = {
    "torchao": ("Failed to load", "torchao/_C"),
    "torch.utils._pytree": ("is an Enum subclass and is now natively supported by torch.compile",),
}


_LIGHTNING_PYTREE = r"(pytorch_lightning|lightning\.pytorch)\.utilities\._pytree"
_LEAFSPEC = r"`isinstance\(treespec, LeafSpec\)` is deprecated"


class _DropNoise(logging.Filter):
    def __init__(self, fragments: tuple[str, ...]) -> None:
        super().__init__()
        self.fragments = fragments

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno >= logging.ERROR:
            return True
        message = record.getMessage()
        return not all(fragment in message for fragment in self.fragments)


def silence_import_noise() -> None:
    """Install the filters (idempotent). Called when our quantization or deployment code is imported."""
    for name, fragments in _NOISE.items():
        logger = logging.getLogger(name)
        if not any(isinstance(f, _DropNoise) for f in logger.filters):
            logger.addFilter(_DropNoise(fragments))
    # a filter equal to one already there moves to the front instead of being added twice
    warnings.filterwarnings("ignore", message=_LEAFSPEC, category=FutureWarning, module=_LIGHTNING_PYTREE)


__all__ = ["silence_import_noise"]
