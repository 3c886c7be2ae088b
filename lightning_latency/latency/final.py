"""The final measurement of a compressed model: time the form that ships, keep the trained form's figure beside it.

After pruning or QAT the model as trained still carries masks or fake quantization (slower than fp32), so the
number worth reporting at the end is the deployment form :func:`lightning_latency.quantization.deploy` builds. It
is built on a deep copy (the trained model is never touched), timed on the same inputs with the same settings,
and the trained form's own figure stays in the record as ``eager`` (labelled by ``eager_form``). Usable without
Lightning: the callbacks are only asked what they did (``compresses``, ``deploy_config()``; see
:class:`lightning_latency.base.CompressionCallback`).
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Callable, Iterable
from typing import Any

from torch import nn

from lightning_latency.latency.anchored import AnchoredLatency
from lightning_latency.latency.compiled import _deepcopy_detached
from lightning_latency.latency.config import LatencyConfig
from lightning_latency.latency._inputs import call_model
from lightning_latency.latency.measure import LatencyReport, measure_latency

_log = logging.getLogger(__name__)


def parse_deploy_final(value: Any) -> str | None | bool:
    """Check ``deploy_final``: None (or True) the default deployment form, ``"auto"``, a backend name, or False.

    Returns None, False or the backend's canonical name.

    Raises:
        ValueError: any other value (the message lists the allowed ones).
    """
    if value is True or value is None:
        return None
    if value is False:
        return False
    if not isinstance(value, str):
        raise ValueError(f"`deploy_final` must be None (the default deployment form), 'auto', a backend name or "
                         f"False, got {value!r}. E.g. deploy_final='auto'.")
    from lightning_latency.quantization.config import Backend, parse_enum

    return parse_enum(Backend, value, "deploy_final").value


def _quantized(module: nn.Module) -> bool:
    from lightning_latency.quantization.qat import is_converted, is_prepared

    return is_prepared(module) or is_converted(module)


def final_backend(module: nn.Module, callbacks: Iterable[Any], deploy_final: str | None | bool = None
                  ) -> tuple[str | None, Any]:
    """Which form the final measurement times, and the quantization config the deployment must use.

    Args:
        module: the measured module at fit end.
        callbacks: the run's callbacks; those with ``compresses = True`` changed the model, and the first
            ``deploy_config()`` that is not None is what a deployment must use (QAT's targets and scheme).
        deploy_final: as :func:`parse_deploy_final` returns it.

    Returns:
        ``(backend, config)``: backend None times the model as it is (nothing compressed it, or
        ``deploy_final=False``); else the requested backend, ``"fp32"`` (compiled float) for a model that was
        compressed but not quantized, or the config's backend (``"x86"`` without one).
    """
    if deploy_final is False:
        return None, None
    compressors = [cb for cb in callbacks if getattr(cb, "compresses", False)]
    configs = [cb.deploy_config() for cb in compressors if callable(getattr(cb, "deploy_config", None))]
    config = next((c for c in configs if c is not None), None)
    # A callback's config says the model was quantized (QAT returns None until it has prepared the model); the
    # model's own state too: a quantized model is deployed even when no callback says it compressed it.
    quantized = _quantized(module) or config is not None
    if not (quantized or compressors):
        return None, None
    if deploy_final is not None:
        return str(deploy_final), config
    if not quantized:
        return "fp32", config
    backend = getattr(getattr(config, "backend", None), "value", None)
    return str(backend or "x86"), config


def deployed_copy(module: nn.Module, inputs: Any, backend: str, config: Any = None,
                  info: Callable[[str], None] = _log.info) -> tuple[Any, dict[str, Any]]:
    """The ``backend`` deployment form of a deep copy of ``module`` for these input shapes, and what it is.

    A torchao-converted copy goes back to its float weights (on the int8 grid) first unless ``backend`` is
    ``"torchao"``, so any backend can deploy it.
    """
    from lightning_latency.quantization import deploy
    from lightning_latency.quantization.qat import is_converted, unconvert_qat

    work = _deepcopy_detached(module)
    if is_converted(work) and backend != "torchao":
        unconvert_qat(work)
    fast = deploy(work, inputs, config, backend=backend)
    about: dict[str, Any] = {"backend": fast.backend, "requested": backend}
    if fast.report is not None:
        about["report"] = fast.report.to_dict()
        about["why"] = fast.report.why
        info(f"deployed form for the final measurement\n{fast.report.format()}")
    return fast, about


class DeployedLatency(AnchoredLatency):
    """``latency_fn(model) -> p50 ms`` of the ``backend`` deployment form of ``model``; see :func:`deployed_latency_fn`.

    Anchored (after :meth:`anchor`), each call times the candidate's deployment form beside the reference's in
    ``rounds`` rounds: single calls alternated (``alternate``, the default: a ratio sd of 0.003 where blocks of
    ``c r r c`` gave 0.069 on a shared 2-core machine) or blocks
    (:class:`~lightning_latency.latency.anchored.AnchoredLatency`): a value on the
    scale of the reference's p50 at anchoring, from which machine drift (other work, clocks, caches: ~10% between
    minutes on a shared 2-core machine) cancels.

    Each round times a fresh ONNX Runtime session of the candidate's graph (:meth:`OrtModel.reopen`): sessions of
    one graph differ in speed by up to ±15% on a 2-core machine (measured: ~3% spread within a session), so one
    session is one draw and the median over rounds is the figure a server would see. Unanchored calls return the
    median over ``rounds`` sessions' p50 the same way. The sessions' idle workers block instead of spinning
    (:meth:`OrtModel.reopen`): spinning ones took a core from the session timed next, so readings were bimodal.
    """

    def __init__(self, example_inputs: Any, backend: str, config: Any, settings: LatencyConfig, rounds: int,
                 alternate: bool = True) -> None:
        super().__init__(rounds)
        self.example_inputs, self.backend, self.config = example_inputs, backend, config
        self.settings = settings.replace(compile=False)
        self.alternate = bool(alternate)

    def _pair(self, form: Any) -> tuple[Callable[[], Any], Callable[[], Any], int] | None:
        if not self.alternate:
            return None
        inputs, reference = self.example_inputs, self._reference
        return (lambda: call_model(form, inputs)), (lambda: call_model(reference, inputs)), \
            max(2 * self.settings.min_runs, 20)

    def _build(self, model: nn.Module) -> Any:
        fast = deployed_copy(model, self.example_inputs, self.backend, self.config, info=lambda _msg: None)[0]
        from lightning_latency.quantization.onnx import set_spinning

        set_spinning(fast, False)  # timed beside other sessions: spinning workers would take a core
        return fast

    def _reference_form(self, model: nn.Module) -> Any:
        return self._build(model)  # deployed_copy works on a deep copy already

    def _time(self, fast: Any) -> float:
        return measure_latency(fast, self.example_inputs, self.settings).p50_ms

    def _renew(self, fast: Any) -> None:
        session = getattr(fast, "compiled", None)  # an OrtModel for the ONNX Runtime forms
        if callable(getattr(session, "reopen", None)):
            session.reopen()


def deployed_latency_fn(example_inputs: Any, backend: str = "ort_int8", config: Any = None,
                        latency: LatencyConfig | None = None, reference: nn.Module | None = None,
                        rounds: int = 3, alternate: bool = True) -> DeployedLatency:
    """``latency_fn(model) -> p50 ms`` of the ``backend`` deployment form of ``model`` on ``example_inputs``.

    For :class:`~lightning_latency.pruning.budget_callback.LatencyBudgetPruning` (``deploy_backend=``) and
    :func:`~lightning_latency.pruning.budget.layer_sensitivity`: every candidate is deployed (on a deep copy, as
    :func:`deployed_copy` does) and timed, so a latency budget is met by the form that ships, not by the eager
    model it was trained as. Pick a form that builds in seconds (``"ort"``, ``"ort_int8"``): the sensitivity pass
    deploys one copy per unit and fraction. ``"auto"`` is refused for that reason; run ``deploy(backend="auto")``
    once on the dense model to see which form wins on this machine.

    With ``reference`` (typically the dense model; ``LatencyBudgetPruning`` anchors on the model it starts from),
    every call is timed side by side with the reference's deployment form (``rounds`` rounds, each of single calls
    of candidate and reference alternated, ``alternate=True``, :func:`~lightning_latency.latency.anchored.
    alternated_ratio`; ``alternate=False``: blocks of candidate, reference, reference, candidate) and returned on
    the scale of the reference's first p50 (:class:`DeployedLatency`): a budget of 40% of dense then means 40% of
    the dense model *as measured next to the candidate*, not of a figure taken minutes earlier on a machine whose
    speed has moved since.

    Raises:
        ValueError: ``backend`` is not a :class:`~lightning_latency.quantization.config.Backend` name, or
            ``"auto"``; ``rounds`` not a positive integer.
    """
    from lightning_latency.quantization.config import Backend, parse_enum

    if backend == "auto":
        raise ValueError("`deploy_backend`='auto' would build and time every deployment form for each candidate. "
                         "Pass the form you ship, e.g. deploy_backend='ort_int8' (deploy(model, inputs, "
                         "backend='auto') once on the dense model says which form is fastest here).")
    name = parse_enum(Backend, backend, "deploy_backend").value
    fn = DeployedLatency(example_inputs, name, config, latency or LatencyConfig(warmup=2, min_runs=15, max_time_s=1.5),
                         rounds, alternate)
    if reference is not None:
        fn.anchor(reference)
    return fn


def trained_form(module: nn.Module, config: LatencyConfig) -> str:
    """What the ``eager`` figure of a final record timed: the model as it is, converted or not, compiled or not."""
    from lightning_latency.quantization.qat import is_converted

    converted = is_converted(module)
    return ("as trained" + (", converted (torchao int8)" if converted else "")
            + (", torch.compile" if config.compile else ", eager"))


def measure_final(module: nn.Module, inputs: Any, config: LatencyConfig, backend: str, deploy_config: Any = None,
                  info: Callable[[str], None] = _log.info,
                  warn: Callable[[str], None] = warnings.warn) -> tuple[LatencyReport, dict[str, Any]]:
    """Time ``module`` as it is and its ``backend`` deployment form; returns ``(shipped report, form fields)``.

    The form fields go into the record: ``form`` (``"deployed x86"``), ``deploy`` (backend, report), ``eager``
    (the as-is report's dict) and ``eager_form``. When the deployment cannot be built, ``warn`` says why and the
    as-is report is returned with ``form = "eager (deploy failed)"``: the number is still worth having.
    """
    eager = measure_latency(module, inputs, config)
    can_generate = getattr(module, "can_generate", None)
    if isinstance(inputs, dict) and callable(can_generate) and can_generate():
        inputs = {**inputs, "use_cache": False}  # a KV cache object in the output cannot be exported
    try:
        fast, about = deployed_copy(module, inputs, backend, deploy_config, info)
    except Exception as err:  # the as-is number is still worth reporting; say why it is not deployed
        warn(f"could not build the {backend!r} deployment form for the final measurement "
             f"({type(err).__name__}: {str(err)[:200]}); the final row times the model as it is (eager). "
             "Pass deploy_final=False to skip the attempt.")
        return eager, {"form": "eager (deploy failed)"}
    forward = measure_latency(fast, inputs, config.replace(compile=False))  # deploy already compiled it
    return forward, {"form": f"deployed {about['backend']}", "deploy": about, "eager": eager.to_dict(),
                     "eager_form": trained_form(module, config)}


__all__ = ["deployed_copy", "deployed_latency_fn", "final_backend", "measure_final", "parse_deploy_final",
           "trained_form"]
