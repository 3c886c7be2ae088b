"""The deployment form of a quantization-aware-trained model: the one that is genuinely fast on CPU.

Measured on this project's CPU (AMX-int8; numbers in docs/quantization.md): torchao int8 tensors run *slower* than
fp32 in eager mode and only ~×2 faster under ``torch.compile`` with inductor freezing, while PT2E static int8 through
the x86 inductor quantizer, compiled with freezing, runs the MiniLM encoder ×3–6 faster than fp32 eager. So the
default backend exports the QAT-trained float weights with ``torch.export``, quantizes the same layers QAT trained
(int8 per-channel symmetric weights, the grid QAT simulated) with static int8 activations calibrated on the example
inputs, and compiles the result with inductor freezing.
"""

from __future__ import annotations

import copy
import warnings
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from lightning_latency.latency.hardware import has_native_bf16, isa_flags, isa_summary
from lightning_latency.quantization.choose import Candidate, DeployReport, agreement, choose, time_candidates
from lightning_latency.quantization.config import Backend, QuantizationConfig, Scheme, convert_base_config, parse_enum
from lightning_latency.quantization.onnx import (
    OrtModel,
    _Positional,
    export_onnx,
    input_names,
    output_wrapper,
    plain_output,
    quantize_onnx_dynamic,
    require_onnxruntime,
    set_spinning,
)
from lightning_latency.quantization.qat import (
    convert_qat,
    converted_modules,
    fake_quantized_modules,
    is_prepared,
    strip_qat,
)
from lightning_latency.quantization.targets import select_modules

# torch 2.13's own oneDNN int8 lowering calls torch.tensor() on a tensor; harmless, but it prints twice on every
# (re)compile of a deployed model. Silenced for that torch module only.
warnings.filterwarnings("ignore", message="To copy construct from a tensor", category=UserWarning,
                        module=r"torch\._inductor\.mkldnn_lowerings")


_TORCH_SUFFIX, _ONNX_SUFFIX = ".pt2", ".onnx"


class DeployedModel(nn.Module):
    """A deployment form of the model: compiled and frozen torch, or an ONNX Runtime session.

    Calls run under ``torch.inference_mode`` (inductor freezing needs no-grad calls) and return the original model's output type.
    Shapes of the torch forms are static: they were exported and compiled for the shapes of ``example_inputs``;
    deploy once per serving shape (e.g. batch 1 and batch 32 at a fixed padded sequence length).

    Attributes:
        backend: the form's name (a :class:`Backend` value, e.g. ``"x86"`` or ``"ort_int8"``).
        quantized: names of the layers quantized (empty for the float forms).
        reference: the uncompiled module of the form (eager; slow), for accuracy checks without compiling.
        report: for ``backend="auto"``, the :class:`~lightning_latency.quantization.choose.DeployReport` of the
            candidates (None for a forced backend).
    """

    def __init__(self, compiled: Any, reference: Any, backend: str, quantized: list[str],
                 example_inputs: tuple[tuple, dict] | None = None, onnx_bytes: bytes | None = None) -> None:
        super().__init__()
        self.compiled = compiled
        self.reference = reference
        self.backend = backend
        self.quantized = quantized
        self.report: DeployReport | None = None
        self._example = example_inputs
        self._onnx_bytes = onnx_bytes

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        from torch._inductor import config as inductor_config

        # Always inference_mode (whatever grad mode the caller is in): one grad mode means one compiled graph, and
        # the timing loops (measure_latency) run under inference_mode too. The patch is kept on every call so that a
        # recompile also freezes; without freezing the x86 int8 graph is not faster than fp32.
        with torch.inference_mode(), inductor_config.patch(freezing=True):
            return self.compiled(*args, **kwargs)

    @property
    def is_onnx(self) -> bool:
        return self._onnx_bytes is not None

    def save(self, path: str | Path) -> Path:
        """Write the deployment artifact: an ``.onnx`` file (ONNX Runtime forms) or an AOTInductor ``.pt2`` package.

        The file is loaded by a serving process with plain ``onnxruntime`` / ``torch`` (no ``lightning_latency``, no
        training code): see :meth:`load_lines`, or :func:`load_deployed`. It takes the inputs positionally in the
        order of ``example_inputs`` (``input_ids``, ``attention_mask``) and returns one tensor (a ``ModelOutput``'s
        ``logits``). A ``.pt2`` package is compiled for the example shapes; an ``.onnx`` file takes any batch and
        sequence length. The suffix is added when ``path`` has none; the path written is returned.

        Raises:
            ValueError: ``path`` has the other form's suffix.
        """
        suffix = _ONNX_SUFFIX if self.is_onnx else _TORCH_SUFFIX
        path = Path(path)
        if path.suffix not in ("", suffix):
            raise ValueError(f"`path`={str(path)!r}: a {self.backend!r} deployment is saved as a {suffix} file. "
                             f"Pass path={str(path.with_suffix(suffix))!r}.")
        path = path.with_suffix(suffix)
        path.parent.mkdir(parents=True, exist_ok=True)
        if self.is_onnx:
            path.write_bytes(self._onnx_bytes)
            return path
        if self._example is None:
            raise ValueError("This DeployedModel was built without example inputs; rebuild it with deploy().")
        from torch._inductor import config as inductor_config

        args, kwargs = self._example
        names = input_names(args, kwargs)
        tensors = tuple(kwargs.values()) if kwargs else tuple(args)
        plain = _Positional(self.reference, names if kwargs else None)
        with torch.no_grad():
            program = torch.export.export(plain, tensors, strict=False)
            with inductor_config.patch(freezing=True):
                torch._inductor.aoti_compile_and_package(program, package_path=str(path))
        return path

    def load_lines(self, path: str | Path) -> list[str]:
        """The two lines a serving process runs to load and call the artifact written by :meth:`save`."""
        args, kwargs = self._example or ((), {})
        names = input_names(args, kwargs)
        if self.is_onnx:
            feeds = ", ".join(f"{n!r}: {n}.numpy()" for n in names)
            return [f"import onnxruntime; session = onnxruntime.InferenceSession({str(path)!r})",
                    f"output = session.run(None, {{{feeds}}})[0]"]
        return [f"import torch; model = torch._inductor.aoti_load_package({str(path)!r})",
                f"output = model({', '.join(names)})"]


class _AotiModel(nn.Module):
    def __init__(self, loaded: Any) -> None:
        super().__init__()
        self.loaded = loaded

    def forward(self, *args: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return self.loaded(*args)


def load_deployed(path: str | Path, threads: int | None = None) -> nn.Module:
    """Load an artifact written by :meth:`DeployedModel.save`: call it with the inputs positionally, get one tensor.

    Args:
        path: an ``.onnx`` file (ONNX Runtime, ``threads`` intra-op threads; None: ``torch.get_num_threads()``) or an
            AOTInductor ``.pt2`` package.

    Raises:
        ValueError: ``path`` has neither suffix, or does not exist.
    """
    path = Path(path)
    if not path.exists():
        raise ValueError(f"`path`={str(path)!r} does not exist. Pass the file DeployedModel.save() returned.")
    if path.suffix == _ONNX_SUFFIX:
        return OrtModel(path.read_bytes(), None, threads=threads)
    if path.suffix == _TORCH_SUFFIX:
        return _AotiModel(torch._inductor.aoti_load_package(str(path)))
    raise ValueError(f"`path`={str(path)!r} must end in {_ONNX_SUFFIX} or {_TORCH_SUFFIX} (what save() writes).")

def _split(inputs: Any) -> tuple[tuple[Any, ...], dict[str, Any]]:
    if isinstance(inputs, Mapping):
        return (), dict(inputs)
    if isinstance(inputs, (tuple, list)):
        return tuple(inputs), {}
    return (inputs,), {}


_CPU_ONLY = (Backend.X86, Backend.X86_DYNAMIC, Backend.BF16, Backend.ORT, Backend.ORT_INT8)


def _check_cpu(model: nn.Module, backend: Backend) -> None:
    devices = {t.device.type for t in model.parameters()}
    if backend in _CPU_ONLY and devices - {"cpu"}:
        what = "PT2E x86 inductor int8" if backend.needs_int8_scheme else "a CPU form"
        raise ValueError(
            f"`backend`={backend.value!r} ({what}) runs on CPU only, but the model's parameters are on "
            f"{sorted(devices)}. Move the model to CPU (model.cpu()) or pass backend='torchao' for GPU deployment."
        )


def _quantized_names(model: nn.Module, config: QuantizationConfig) -> list[str]:
    names = list(fake_quantized_modules(model)) + list(converted_modules(model))
    return names or list(select_modules(model, config))  # a plain model: post-training quantization of the targets


def _x86_quantize(model: nn.Module, args: tuple, kwargs: dict, names: list[str], calibration: Iterable[Any],
                  static_activations: bool) -> nn.Module:
    import torchao.quantization.pt2e.quantizer.x86_inductor_quantizer as xiq  # also registers the x86 inductor passes
    from torchao.quantization.pt2e import allow_exported_model_train_eval
    from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_pt2e

    from lightning_latency.cpu import cpu_features

    quantizer = xiq.X86InductorQuantizer()
    # Without VNNI, oneDNN's u8 x s8 kernels sum pairs of products in int16 (vpmaddubsw), which saturates for 8-bit
    # activations: measured on tiny BERT with the AVX2 path, deployed logits moved 6x the int8 quantization error
    # away from the reference. 7-bit activations (reduce_range) cannot saturate; VNNI CPUs keep the full range.
    quantizer.set_global(xiq.get_default_x86_inductor_quantization_config(
        is_dynamic=not static_activations, reduce_range=not cpu_features().vnni))
    keep = set(names)
    for name, module in model.named_modules():
        if isinstance(module, nn.Linear) and name not in keep:  # honour the skip list QAT used (heads stay float)
            quantizer.set_module_name_qconfig(name, None)
    with torch.no_grad():
        exported = torch.export.export(model, args, kwargs=kwargs, strict=False).module()
        prepared = prepare_pt2e(exported, quantizer)
        prepared(*args, **kwargs)
        for batch in calibration:  # static activation ranges come from these batches
            b_args, b_kwargs = _split(batch)
            prepared(*b_args, **b_kwargs)
        quantized = convert_pt2e(prepared)
    # Exported modules refuse .eval()/.train(); callers (and latency tools) call .eval() on whatever they get.
    return allow_exported_model_train_eval(quantized)


class _Bf16(nn.Module):
    """The float model with bf16 weights; float inputs cast in, the output cast back to fp32."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model.to(torch.bfloat16)

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        cast = lambda t: t.to(torch.bfloat16) if isinstance(t, torch.Tensor) and t.is_floating_point() else t  # noqa: E731
        out = self.model(*[cast(a) for a in args], **{k: cast(v) for k, v in kwargs.items()})
        return plain_output(out).float()


def _float_copy(model: nn.Module) -> nn.Module:
    if converted_modules(model):
        raise ValueError("this form needs the float weights, but the model was converted to torchao int8 tensors. "
                         "Pass the model before convert_qat (QuantizationAwareTraining(convert_on_fit_end=False)).")
    return strip_qat(copy.deepcopy(model).eval())


def _build(backend: Backend, model: nn.Module, args: tuple, kwargs: dict, names: list[str], config: QuantizationConfig,
           calibration: list[Any], compile: bool, wrap: Any, onnx_cache: dict[str, bytes]) -> DeployedModel:
    """One deployment form of ``model``, compiled and called once (the first call compiles)."""
    if backend in (Backend.ORT, Backend.ORT_INT8):
        if "fp32" not in onnx_cache:
            onnx_cache["fp32"] = export_onnx(_float_copy(model), args, kwargs)
        data = onnx_cache["fp32"]
        if backend is Backend.ORT_INT8:
            data = onnx_cache.setdefault("int8", quantize_onnx_dynamic(data))
        ort_model = OrtModel(data, input_names(args, kwargs), wrap)
        deployed = DeployedModel(ort_model, ort_model, backend.value, [] if backend is Backend.ORT else names,
                                 (args, kwargs), onnx_bytes=data)
    else:
        quantized_names = names
        if backend in (Backend.X86, Backend.X86_DYNAMIC):
            if not config.x86_compatible:
                raise ValueError(
                    f"`backend`={backend.value!r} deploys int8 per-channel weights, but `config.scheme`="
                    f"{config.scheme_name} trained another grid (e.g. int4). Pass backend='torchao'.")
            form = _x86_quantize(_float_copy(model), args, kwargs, names, calibration,
                                 static_activations=backend is Backend.X86)
        elif backend is Backend.TORCHAO:
            form = copy.deepcopy(model).eval()
            if is_prepared(form):
                convert_qat(form, config)
            elif not converted_modules(form):
                from torchao.quantization import quantize_

                quantize_(form, convert_base_config(config), filter_fn=lambda m, n: n in set(names))
        elif backend is Backend.FP32:
            form, quantized_names = _float_copy(model), []
        elif backend is Backend.BF16:
            form, quantized_names = _Bf16(_float_copy(model)), []
        else:  # pragma: no cover - AUTO is resolved by the caller
            raise ValueError(f"`backend`={backend.value!r} is not a single deployment form.")
        compiled = _compile(form) if compile else form
        deployed = DeployedModel(compiled, form, backend.value, quantized_names, (args, kwargs))
    # Compile now, at the first call, with freezing (constant-folds the int8 weights and prepacks them for oneDNN;
    # it needs no_grad calls, see DeployedModel.forward). In torch 2.13 `torch.compile(options={"freezing": True})`
    # fails on the x86 int8 graph (fake-tensor `onednn.qlinear_prepack`); patching the inductor config works.
    deployed(*args, **kwargs)
    return deployed


def _compile(form: nn.Module) -> Any:
    """``torch.compile`` of a call into ``form`` through a function with its own code object.

    Dynamo caches compiled graphs per code object, with a limit of 8 (torch 2.13 ``recompile_limit``); every
    candidate of the same model class (fp32, bf16, torchao) would share ``forward``'s entries and, after a few
    deploys in one process, fall back to eager silently. A fresh code object per deployed form gives each its own.
    """
    def call(*args: Any, **kwargs: Any) -> Any:
        return form(*args, **kwargs)

    call.__code__ = call.__code__.replace()  # a distinct code object (same bytecode): its own dynamo cache
    return torch.compile(call)


def auto_candidates(model: nn.Module, config: QuantizationConfig, cpuinfo: str | None = None) -> list[Backend]:
    """The forms ``backend="auto"`` tries for ``model`` on this machine (the order the report lists them in).

    bf16 only where the CPU computes it natively (elsewhere it is ×4–7 slower than fp32: no point timing it); the
    ONNX Runtime forms only where ``onnxruntime`` is installed; x86 PT2E only for int8 schemes on CPU; the float forms
    only while the float weights exist (not after ``convert_qat``).
    """
    from importlib.util import find_spec

    on_cpu = all(t.device.type == "cpu" for t in model.parameters())
    float_weights = not converted_modules(model)
    out = []
    if float_weights:
        out.append(Backend.FP32)
        if on_cpu and has_native_bf16(cpuinfo):
            out.append(Backend.BF16)
    if on_cpu and float_weights and config.x86_compatible:
        out += [Backend.X86, Backend.X86_DYNAMIC]
    out.append(Backend.TORCHAO)
    if on_cpu and float_weights and find_spec("onnxruntime") is not None and find_spec("onnx") is not None:
        out += [Backend.ORT, Backend.ORT_INT8]
    return out


def _resolve_config(config: Any) -> QuantizationConfig:
    if config is None:
        return QuantizationConfig()
    if isinstance(config, QuantizationConfig):
        return config
    if isinstance(config, (str, Scheme)):
        return QuantizationConfig(scheme=config)  # ValueError names `scheme` and its allowed values
    raise TypeError(f"`config` must be a QuantizationConfig, a scheme name (e.g. 'int8_dynamic') or None, got "
                    f"{type(config).__name__}. Pass config=QuantizationConfig(scheme='int8_dynamic').")


def _shapes(args: tuple, kwargs: dict) -> str:
    tensors = {**{f"arg{i}": a for i, a in enumerate(args)}, **kwargs}
    return ", ".join(f"{k} {tuple(v.shape)}" for k, v in tensors.items() if isinstance(v, torch.Tensor))


def deploy(
    model: nn.Module,
    example_inputs: Any,
    config: QuantizationConfig | str | None = None,
    *,
    backend: Backend | str | None = None,
    calibration: Iterable[Any] = (),
    static_activations: bool = True,
    compile: bool = True,
    candidates: Sequence[Backend | str] | None = None,
    tolerance: float = 0.1,
    rounds: int = 3,
    timer: Callable[[Mapping[str, Callable[..., Any]], Any, int], Mapping[str, Sequence[float]]] | None = None,
    cpuinfo: str | None = None,
) -> DeployedModel:
    """Build the fast inference form of ``model`` (fake-quantized, converted, or plain float for PTQ).

    ``model`` itself is never modified: a deep copy is stripped of fake quantization, quantized and compiled.
    With ``backend="auto"`` every candidate form is built, checked against the reference outputs on the
    calibration batches and timed side by side on the example shapes; the fastest agreeing one is returned, with the
    table in ``.report`` (``print(fast.report.format())``). How the choice is made: :mod:`.choose`.

    Args:
        model: a model after :func:`prepare_qat` (and training), after :func:`convert_qat`, or a plain float model
            (then the layers selected by ``config`` are post-training quantized).
        example_inputs: what the model is called with: a dict of keyword tensors (Hugging Face:
            ``{"input_ids": (batch, seq), "attention_mask": (batch, seq)}``), a tuple of positional tensors or one
            tensor. Fixes the compiled shapes, and is the first calibration batch.
        config: the :class:`QuantizationConfig` used for QAT (for ``backend`` and the targets of a plain model), or
            a scheme name such as ``"int8_dynamic"``.
        backend: overrides ``config.backend``: a :class:`Backend` value — ``"x86"`` (PT2E x86 inductor int8, static
            activations), ``"x86_dynamic"``, ``"torchao"``, ``"fp32"``, ``"bf16"``, ``"ort"``, ``"ort_int8"`` — or
            ``"auto"`` to choose by measurement.
        calibration: more batches (same form as ``example_inputs``) to calibrate the static activation ranges
            (``x86``) and, for ``"auto"``, to check each candidate's outputs; a few real batches are better than one.
        static_activations: ``x86`` only: False means ``x86_dynamic`` (kept for older calls).
        compile: compile the torch forms with inductor freezing (the deployment form); False gives the eager
            quantized module (reference numerics, slow).
        candidates: ``"auto"`` only: the forms to try; None means :func:`auto_candidates`.
        tolerance: ``"auto"`` only: the largest relative L2 error of a candidate's outputs against the reference
            (0.1: a few times int8 rounding of a trained encoder, far below a broken form's ≈1).
        rounds: ``"auto"`` only: interleaved timing rounds; each candidate's best round median is its p50.
        timer: ``"auto"`` only: ``(models, inputs, rounds) -> {name: per-round medians in ms}``; None times them
            with :func:`~lightning_latency.latency.compare_latency`. Tests inject a fake one.
        cpuinfo: ``/proc/cpuinfo`` text for the bf16 check (None reads the machine's).

    Returns:
        A :class:`DeployedModel`; call it like the original model (its output type is preserved).

    Raises:
        ValueError: ``backend`` unknown, ``x86`` with a model on a non-CPU device or an int4 scheme, a bad
            ``tolerance``/``rounds``, or ``"auto"`` found no agreeing candidate.
        TypeError: ``config`` is neither a QuantizationConfig, a scheme name nor None.
        ImportError: an ONNX Runtime backend forced without ``onnx``/``onnxruntime`` installed.

    Example::

        trainer = Trainer(callbacks=[QuantizationAwareTraining(convert_on_fit_end=False)])
        trainer.fit(module)
        fast = deploy(module.model, {"input_ids": ids, "attention_mask": mask}, backend="auto",
                      calibration=val_batches[:8])
        print(fast.report.format())
        logits = fast(input_ids=ids, attention_mask=mask).logits
        fast.save("model")  # model.pt2 or model.onnx, loadable without lightning_latency
    """
    config = _resolve_config(config)
    backend = parse_enum(Backend, backend if backend is not None else config.backend, "backend")
    if backend is Backend.X86 and not static_activations:
        backend = Backend.X86_DYNAMIC
    if isinstance(tolerance, bool) or not isinstance(tolerance, (int, float)) or not tolerance > 0:
        raise ValueError(f"`tolerance` must be a positive number (relative L2 error), got {tolerance!r}. "
                         f"E.g. tolerance=0.1.")
    if isinstance(rounds, bool) or not isinstance(rounds, int) or rounds < 1:
        raise ValueError(f"`rounds` must be an integer >= 1, got {rounds!r}. E.g. rounds=3.")
    _check_cpu(model, backend)
    if backend.needs_int8_scheme and not config.x86_compatible:
        raise ValueError(
            f"`backend`={backend.value!r} deploys int8 per-channel weights, but `config.scheme`={config.scheme_name} "
            f"trained another grid (e.g. int4). Pass backend='torchao'."
        )
    if backend in (Backend.ORT, Backend.ORT_INT8):
        require_onnxruntime()
    args, kwargs = _split(example_inputs)
    names = _quantized_names(model, config)
    calibration = list(calibration)
    flags = [(m, m.training) for m in model.modules()]
    model.eval()  # the reference runs in eval mode; each module's own flag is restored afterwards
    try:
        with torch.no_grad():
            reference_out = model(*args, **kwargs)
        if backend is not Backend.AUTO:
            return _build(backend, model, args, kwargs, names, config, calibration, compile,
                          output_wrapper(reference_out), {})
        tried = [parse_enum(Backend, c, "candidates") for c in candidates] if candidates is not None else \
            auto_candidates(model, config, cpuinfo)
        return _auto(model, args, kwargs, names, config, calibration, compile, output_wrapper(reference_out), tried,
                     tolerance, rounds, timer, cpuinfo)
    finally:
        for m, was in flags:
            m.training = was


def _auto(model: nn.Module, args: tuple, kwargs: dict, names: list[str], config: QuantizationConfig,
          calibration: list[Any], compile: bool, wrap: Any, tried: list[Backend], tolerance: float, rounds: int,
          timer: Any, cpuinfo: str | None) -> DeployedModel:
    batches = [(args, kwargs)] + [_split(b) for b in calibration]
    with torch.no_grad():
        references = [plain_output(model(*a, **k)) for a, k in batches]
    built: dict[str, DeployedModel] = {}
    rows: dict[str, Candidate] = {}
    onnx_cache: dict[str, bytes] = {}
    for backend in tried:
        row = rows[backend.value] = Candidate(backend.value)
        try:
            form = _build(backend, model, args, kwargs, names, config, calibration, compile, wrap, onnx_cache)
            outputs = [plain_output(form(*a, **k)) for a, k in batches]
        except Exception as err:  # a form this model/stack cannot take is skipped, and the report says why
            row.note = f"not built: {type(err).__name__}: {str(err).splitlines()[0][:120] if str(err) else ''}"
            continue
        check = agreement(outputs, references, tolerance)
        row.rel_error, row.agreement = check.rel_error, check.agreement
        row.accepted = check.ok(tolerance)
        if not row.accepted:
            row.note = (f"disagrees: rel error {check.rel_error:.3g} > tolerance {tolerance:g}"
                        if check.rel_error > tolerance else f"{check.confident_flips} confident argmax flip(s)")
        built[backend.value] = form
    if built:
        for form in built.values():  # timed side by side: one session's spinning workers take a core
            set_spinning(form, False)
        medians = (timer or time_candidates)(built, kwargs if kwargs else (args[0] if len(args) == 1 else args),
                                             rounds)
        for name, values in medians.items():
            values = [float(v) for v in values]
            rows[name].p50_ms = min(values)
            rows[name].spread = (max(values) - min(values)) / min(values) if len(values) > 1 and min(values) > 0 \
                else None
    chosen, why = choose(list(rows.values()))
    result = built[chosen]
    set_spinning(result, True)  # shipped alone: ONNX Runtime's default, ~6% faster than blocking workers
    result.report = DeployReport(list(rows.values()), chosen, why, shapes=_shapes(args, kwargs), tolerance=tolerance,
                                 rounds=rounds, isa=isa_summary(isa_flags(cpuinfo)))
    for name in list(built):  # free the losers' compiled graphs and sessions
        if name != chosen:
            del built[name]
    return result


__all__ = ["DeployedModel", "auto_candidates", "deploy", "load_deployed"]
