"""The one import seam between lightning-latency and Lightning.

Users import Lightning either as ``pytorch_lightning`` (the standalone package, our primary target) or as
``lightning.pytorch`` (the unified package). The two ship *different* class objects for ``Callback`` and
``LightningModule``, and a ``Trainer`` from one package rejects callbacks and modules built on the other.

* Callbacks: ``CallbackBase`` derives from the ``Callback`` class of *every* installed package, so one
  ``LatencyMonitor`` instance is accepted by ``pytorch_lightning.Trainer`` and ``lightning.pytorch.Trainer``
  alike. Both base classes are the same code (hooks that do nothing), so the MRO is harmless.
* Everything else (``LightningModule``, ``Trainer``, rank-zero helpers) comes from the *selected* package:
  ``pytorch_lightning`` unless ``LIGHTNING_LATENCY_BACKEND=lightning`` is set, or ``lightning.pytorch`` was
  imported before us and ``pytorch_lightning`` was not. ``DistillationModule`` then follows the package of the user
  module that subclasses or builds it (:func:`follow_lightning_package`), so the import order does not matter.

No other module of this package imports ``pytorch_lightning`` or ``lightning`` directly.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
import sys
from types import ModuleType
from collections.abc import Mapping
from typing import Any

_PL = "pytorch_lightning"
_L = "lightning.pytorch"
_ENV = "LIGHTNING_LATENCY_BACKEND"


def _available(name: str) -> bool:
    try:
        return importlib.util.find_spec(name.split(".")[0]) is not None
    except (ImportError, ValueError):
        return False


def _select_backend() -> str:
    choice = os.environ.get(_ENV, "").strip().lower()
    if choice:
        if choice in ("pytorch_lightning", "pl"):
            return _PL
        if choice in ("lightning", "lightning.pytorch", "l"):
            return _L
        raise ValueError(
            f"`{_ENV}` must be 'pytorch_lightning' or 'lightning', got {choice!r}. "
            f"Unset it to pick `pytorch_lightning` automatically."
        )
    if _L in sys.modules and _PL not in sys.modules:
        return _L
    if _available(_PL):
        return _PL
    if _available("lightning"):
        return _L
    raise ImportError(
        "lightning-latency needs PyTorch Lightning: `pip install pytorch-lightning` (or `pip install lightning`)."
    )


BACKEND: str = _select_backend()
pl: ModuleType = importlib.import_module(BACKEND)

LightningModule = pl.LightningModule
Trainer = pl.Trainer
LightningDataModule = pl.LightningDataModule

_rank_zero = importlib.import_module(f"{BACKEND}.utilities.rank_zero")
rank_zero_info = _rank_zero.rank_zero_info
rank_zero_warn = _rank_zero.rank_zero_warn
rank_zero_only = _rank_zero.rank_zero_only
MisconfigurationException = importlib.import_module(f"{BACKEND}.utilities.exceptions").MisconfigurationException


def _callback_bases() -> tuple[type, ...]:
    bases: list[type] = [pl.Callback]
    other = _L if BACKEND == _PL else _PL
    # Only pull in the second package if it is installed; importing it costs a few seconds.
    if _available(other):
        try:
            bases.append(importlib.import_module(other).Callback)
        except Exception:  # a broken second install must not break the first
            pass
    return tuple(bases)


CallbackBase: type = type("CallbackBase", _callback_bases(), {"__module__": __name__})
CallbackBase.__doc__ = "``Callback`` of every installed Lightning package, so both Trainers accept our callbacks."


def lightning_classes(module: str, name: str) -> tuple[type, ...]:
    """Class ``name`` of ``<package>.<module>`` for every Lightning package imported in this process.

    A Trainer of either package may hold our callbacks, so ``isinstance`` checks must accept both classes.
    """
    found = []
    for package in (BACKEND, _L if BACKEND == _PL else _PL):
        if package != BACKEND and package not in sys.modules:
            continue  # not imported: no object of it can exist
        try:
            cls = getattr(importlib.import_module(f"{package}.{module}"), name)
        except (ImportError, AttributeError):
            continue
        found.append(cls)
    return tuple(found)



def lightning_packages_in(namespace: Mapping[str, Any]) -> set[str]:
    """The Lightning packages (``pytorch_lightning`` / ``lightning.pytorch``) whose objects ``namespace`` holds.

    ``namespace`` is a module's globals: ``import lightning as L``, ``from lightning.pytorch import Trainer`` and
    ``import pytorch_lightning as pl`` all count; Fabric, ``lightning_utilities`` and this package do not.
    """
    found = set()
    for value in list(namespace.values()):
        name = value.__name__ if isinstance(value, ModuleType) else getattr(value, "__module__", None)
        if not isinstance(name, str):
            continue
        if name == _PL or name.startswith(_PL + "."):
            found.add(_PL)
        elif name in ("lightning", _L) or name.startswith(_L + "."):
            found.add(_L)
    return found


_followed: dict[type, tuple[str, str]] = {}  # root class -> (package it now derives from, the module that decided)


def follow_lightning_package(root: type, namespace: Mapping[str, Any], where: str) -> None:
    """Make ``root`` (a ``LightningModule`` subclass of ours) derive from the package the user's code uses.

    ``DistillationModule`` has to be a ``LightningModule`` of one package, and a ``Trainer`` of the other package
    rejects it. The package chosen at our import (:func:`_select_backend`) can be the wrong one: with both
    installed and ``lightning_latency`` imported first, it is ``pytorch_lightning``. When a user's module
    (``namespace``, named ``where``) holds objects of exactly one package, ``root`` is re-based onto that package's
    ``LightningModule`` (its subclasses follow), so the import order does not matter. Two user modules that use
    different packages in one process cannot both be served: that is a ``TypeError`` saying what to change.
    """
    used = lightning_packages_in(namespace)
    if len(used) != 1:
        return  # no Lightning objects there, or both packages: nothing to follow
    (package,) = used
    current = _L if any(b.__module__.startswith(_L) for b in root.__mro__[1:]) else _PL
    decided = _followed.get(root)
    if decided is not None and decided[0] != package:
        raise TypeError(
            f"{where} uses `{package}`, but {decided[1]} uses `{decided[0]}`, and {root.__name__} can be a "
            f"LightningModule of only one of them in one process (their Trainers reject each other's modules). Use "
            f"one import style everywhere, e.g. `import lightning.pytorch as pl` or `import pytorch_lightning as pl`."
        )
    _followed.setdefault(root, (package, where))
    if package == current:
        return
    old = importlib.import_module(current).LightningModule
    new = importlib.import_module(package).LightningModule
    root.__bases__ = tuple(new if base is old else base for base in root.__bases__)


__all__ = [
    "BACKEND",
    "CallbackBase",
    "LightningDataModule",
    "LightningModule",
    "MisconfigurationException",
    "Trainer",
    "follow_lightning_package",
    "lightning_classes",
    "lightning_packages_in",
    "pl",
    "rank_zero_info",
    "rank_zero_only",
    "rank_zero_warn",
]
