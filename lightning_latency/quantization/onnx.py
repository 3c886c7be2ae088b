"""The ONNX Runtime backend: the model exported to ONNX, run by ONNX Runtime in fp32 or with its dynamic int8.

ONNX Runtime is the runtime a CPU user would otherwise pick, so :func:`~lightning_latency.quantization.deploy`
times it next to the torch forms and ships it when it is the fastest form that agrees with the reference. The
export uses the TorchScript-based exporter (``dynamo=False``): in torch 2.13 it exports Hugging Face BERT-style
encoders with keyword inputs directly, and its graph is what ONNX Runtime's ``quantize_dynamic`` expects.
``onnx`` and ``onnxruntime`` are an optional extra (``pip install lightning-latency[onnx]``), imported lazily.

The ONNX graph returns one plain tensor: a Hugging Face ``ModelOutput``'s ``logits`` (or the model's tensor output),
so a serving process needs neither ``transformers`` nor this package; :class:`OrtModel` wraps it back into the
original output type in-process.
"""

from __future__ import annotations

import io
import logging
import os
import tempfile
import warnings
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from torch import nn

INSTALL_HINT = "pip install lightning-latency[onnx]  (or: pip install onnx onnxruntime)"


def require_onnxruntime() -> Any:
    """Import and return ``onnxruntime``, or raise an ImportError that says how to install the extra."""
    try:
        import onnx  # noqa: F401  (the exporter needs it)
        import onnxruntime
    except ImportError as err:
        raise ImportError(
            f"The ONNX Runtime backend (`backend`='ort' / 'ort_int8') needs the `onnx` and `onnxruntime` packages, "
            f"which are not installed ({err}). Install them with: {INSTALL_HINT}"
        ) from err
    return onnxruntime


def plain_output(out: Any) -> torch.Tensor:
    """The one tensor a deployment artifact returns: ``out.logits`` of a ``ModelOutput``, or ``out`` itself."""
    if isinstance(out, torch.Tensor):
        return out
    logits = getattr(out, "logits", None)
    if isinstance(logits, torch.Tensor):
        return logits
    if isinstance(out, Mapping):
        out = list(out.values())
    if isinstance(out, (tuple, list)) and out and isinstance(out[0], torch.Tensor):
        return out[0]
    raise TypeError(
        f"Cannot deploy a model whose output is {type(out).__name__}: the deployment forms return one tensor "
        f"(a tensor output, a ModelOutput's `.logits`, or the first tensor of a tuple/dict)."
    )


def output_wrapper(reference_output: Any) -> Callable[[torch.Tensor], Any]:
    """A function turning the plain tensor back into the reference's output type (e.g. a ``ModelOutput``)."""
    if isinstance(reference_output, torch.Tensor):
        return lambda t: t
    if isinstance(getattr(reference_output, "logits", None), torch.Tensor):
        cls = type(reference_output)
        return lambda t: cls(logits=t)
    return lambda t: t


class _Positional(nn.Module):
    """Keyword (or positional) inputs in a fixed order -> one plain tensor; the form both exporters trace."""

    def __init__(self, model: nn.Module, names: Sequence[str] | None) -> None:
        super().__init__()
        self.model = model
        self.names = list(names) if names else None

    def forward(self, *tensors: torch.Tensor) -> torch.Tensor:
        out = self.model(**dict(zip(self.names, tensors))) if self.names else self.model(*tensors)
        return plain_output(out)


def input_names(args: tuple, kwargs: dict) -> list[str]:
    return list(kwargs) if kwargs else [f"input_{i}" for i in range(len(args))]


def export_onnx(model: nn.Module, args: tuple, kwargs: dict, opset: int = 17) -> bytes:
    """Export ``model`` called as ``model(*args, **kwargs)`` to ONNX bytes (one output, ``"output"``).

    Batch (dim 0) is dynamic for every input; dim 1 too for integer inputs (token ids, masks: the sequence).
    """
    require_onnxruntime()
    names = input_names(args, kwargs)
    tensors = tuple(kwargs.values()) if kwargs else tuple(args)
    dynamic: dict[str, dict[int, str]] = {}
    for name, t in zip(names, tensors):
        axes = {0: "batch"}
        if t.dim() >= 2 and not t.is_floating_point():
            axes[1] = "seq"
        dynamic[name] = axes
    dynamic["output"] = {0: "batch"}
    buf = io.BytesIO()
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the TorchScript tracer's warnings about HF's shape checks: harmless here
        torch.onnx.export(_Positional(model, names if kwargs else None).eval(), tensors, buf, input_names=names,
                          output_names=["output"], dynamic_axes=dynamic, opset_version=opset, dynamo=False)
    return buf.getvalue()


def ort_needs_reduce_range() -> bool:
    """Whether ONNX Runtime's u8s8 int8 kernels here sum pairs of products in int16 (no VNNI: AVX2's and plain
    AVX-512's ``vpmaddubsw``) and so saturate with full 8-bit weights. Measured on a 1-layer BERT on an AVX2-only
    CPU: 17% relative error with 8-bit weights, 2% with 7-bit ones (``reduce_range``); VNNI sums in int32."""
    from lightning_latency.cpu import _proc_flags

    return not (_proc_flags() & {"avx512_vnni", "avx_vnni", "amx_int8"})


def quantize_onnx_dynamic(onnx_bytes: bytes, reduce_range: bool | None = None) -> bytes:
    """ONNX Runtime's ``quantize_dynamic`` (int8 weights, dynamic uint8 activations).

    ``reduce_range``: quantize weights to 7 bits so the int16 pair sums of CPUs without VNNI cannot saturate; None
    decides by this CPU (:func:`ort_needs_reduce_range`). A graph quantized with it runs correctly on every CPU."""
    require_onnxruntime()
    if reduce_range is None:
        reduce_range = ort_needs_reduce_range()
    from onnxruntime.quantization import QuantType, quantize_dynamic

    with tempfile.TemporaryDirectory() as tmp:  # quantize_dynamic reads and writes files
        src, dst = os.path.join(tmp, "fp32.onnx"), os.path.join(tmp, "int8.onnx")
        with open(src, "wb") as fh:
            fh.write(onnx_bytes)
        # onnxruntime 1.32 logs a "consider pre-processing" advice through the root logger on every call.
        root = logging.getLogger()
        level = root.level
        root.setLevel(logging.ERROR)
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                quantize_dynamic(src, dst, weight_type=QuantType.QInt8, reduce_range=reduce_range)
        finally:
            root.setLevel(level)
        with open(dst, "rb") as fh:
            return fh.read()


def ort_session(onnx_bytes_or_path: bytes | str, threads: int | None = None, spinning: bool = True) -> Any:
    """An ONNX Runtime CPU session with ``threads`` intra-op threads (None: ``torch.get_num_threads()``).

    ``spinning=False`` makes its idle worker threads block instead of spinning: a little slower alone (~6% on a
    2-core AVX2 machine) but it no longer takes a core from other sessions timed in the same process (see
    :meth:`OrtModel.reopen`).
    """
    ort = require_onnxruntime()
    options = ort.SessionOptions()
    options.intra_op_num_threads = int(threads or torch.get_num_threads())
    options.inter_op_num_threads = 1
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    if not spinning:
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return ort.InferenceSession(onnx_bytes_or_path, options, providers=["CPUExecutionProvider"])


class OrtModel(nn.Module):
    """An ONNX Runtime session behind the original model's call signature and output type.

    Args:
        onnx_bytes: the serialized ONNX model (one output).
        names: the graph's input names, in order (keyword names of the original call, or ``input_<i>``); None
            reads them from the graph.
        wrap: turns the output tensor into the original output type (see :func:`output_wrapper`).
        threads: intra-op threads; None uses ``torch.get_num_threads()`` (the torch forms' budget).
    """

    def __init__(self, onnx_bytes: bytes, names: Sequence[str] | None = None, wrap: Callable[[torch.Tensor], Any] | None = None,
                 threads: int | None = None) -> None:
        super().__init__()
        self.onnx_bytes, self.threads, self.spinning = onnx_bytes, threads, True
        self.session = ort_session(onnx_bytes, threads)
        self.names = list(names) if names is not None else [i.name for i in self.session.get_inputs()]
        self.wrap = wrap or (lambda t: t)

    def reopen(self, spinning: bool | None = None) -> None:
        """Replace the session with a fresh one on the same graph. Sessions of one graph differ in speed (seen:
        ±15% between sessions on a 2-core machine, ~3% within one), so a fair timing spans several.

        ``spinning`` (None: as before) sets whether idle worker threads spin. Turn it off for sessions timed side by
        side in one process: with it on, on a 2-core AVX2 machine, a session timed right after another read
        bimodally (4.0 or ~8 ms for one graph; the interquartile range of candidate/reference ratios 0.18-0.25, with
        it off 0.03-0.07). A server running one session keeps the default.
        """
        if spinning is not None:
            self.spinning = bool(spinning)
        self.session = ort_session(self.onnx_bytes, self.threads, self.spinning)

    def forward(self, *args: torch.Tensor, **kwargs: torch.Tensor) -> Any:
        feeds = dict(zip(self.names, args))
        feeds.update(kwargs)
        missing = [n for n in self.names if n not in feeds]
        if missing:
            raise ValueError(f"The ONNX model needs inputs {self.names}; missing {missing}.")
        arrays = {n: feeds[n].detach().cpu().contiguous().numpy() for n in self.names}
        (out,) = self.session.run(["output"], arrays)
        return self.wrap(torch.from_numpy(out))


def set_spinning(form: Any, spinning: bool) -> None:
    """Reopen the ONNX Runtime session behind a deployment ``form`` (its ``compiled`` :class:`OrtModel`) with idle
    workers spinning or blocking; other forms are left as they are. Forms timed one after another in one process
    need blocking workers: on a 2-core AVX2 EPYC a spinning session's idle workers took a core from the form timed
    next (one graph read 4.0 or ~8 ms by draw; IQR of paired ratios 0.18-0.25 spinning, 0.02-0.07 blocking)."""
    session = getattr(form, "compiled", None)
    if callable(getattr(session, "reopen", None)) and getattr(session, "spinning", not spinning) != spinning:
        session.reopen(spinning=spinning)


__all__ = ["INSTALL_HINT", "OrtModel", "export_onnx", "ort_needs_reduce_range", "ort_session", "plain_output",
           "set_spinning",
           "quantize_onnx_dynamic", "require_onnxruntime"]
