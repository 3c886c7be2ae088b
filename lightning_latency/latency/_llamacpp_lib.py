"""Load llama.cpp's C API from whichever prebuilt binding works here, behind one small adapter.

Two PyPI wheels ship llama.cpp for CPU with CFFI bindings; they differ in the llama.cpp version they carry:

* ``llama-cpp-py-sync==0.11739`` (llama.cpp of late 2026, ABI mode over its own ``libllama.so``): tried first. Its
  Linux wheel links glibc 2.38, so it does not load on Debian 12 / Ubuntu 22.04 (glibc 2.36 / 2.35).
* ``llama-cpp-cffi==0.4.42`` (llama.cpp build b4965, commit b3298fa4, March 2025; an API-mode CFFI extension per
  backend): its CPU extension ``llama/_llama_cpp_cpu*.so`` (AVX2/FMA/F16C build) needs glibc 2.34 and one
  libstdc++ symbol older GCCs lack, ``__cxa_call_terminate`` (GCC 14). It is loaded with ``RTLD_LAZY``, so that
  function is bound on first call instead of at load. That is safe: GCC emits calls to it only on the path where an
  exception leaves a ``noexcept`` function, i.e. on the way to ``std::terminate``; there the unresolved symbol makes
  the dynamic linker end the process instead, the same outcome. Every other symbol resolves at load on glibc 2.36
  / GCC 12 (checked against the system libraries' exports; the one other name libstdc++ 12 lacks,
  ``std::ios_base_library_init()`` of GCC 13, is a marker ``<iostream>`` emits with no relocation using it, and
  the library uses no standard stream). ``LD_BIND_NOW=1`` defeats this: then it does not load. The file is loaded
  directly, without running ``llama/__init__.py`` (which pulls in transformers, Jinja and its CUDA/Vulkan loader).
  The wheel's declared dependencies (transformers<5, huggingface-hub<0.29, protobuf<6, ...) belong to that
  ``__init__``, not to the extension, so it is installed with ``--no-deps``.

:class:`LlamaCppLib` is the adapter over the API differences between the two llama.cpp versions (KV-cache clear,
the flash-attention switch); everything else the runner calls has the same name and signature in both.
"""

from __future__ import annotations

import functools
import importlib.metadata
import importlib.util
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

_GGML_LOG_LEVEL_WARN, _GGML_LOG_LEVEL_CONT = 3, 5  # enum ggml_log_level: NONE 0, DEBUG 1, INFO 2, WARN, ERROR 4, CONT


@dataclass(frozen=True)
class LlamaCppLib:
    """llama.cpp's C API (``lib``, ``ffi``) from one binding, with the calls that differ between its versions.

    ``binding`` names the package and its version (say it next to any timing, with :meth:`system_info`).
    """

    lib: Any
    ffi: Any
    binding: str

    def system_info(self) -> str:
        return self.ffi.string(self.lib.llama_print_system_info()).decode("utf-8")

    def clear_kv(self, ctx: Any) -> None:
        """Forget every sequence in ``ctx``'s KV cache (``llama_memory_clear`` since mid 2025, before that
        ``llama_kv_self_clear``)."""
        if hasattr(self.lib, "llama_memory_clear"):
            self.lib.llama_memory_clear(self.lib.llama_get_memory(ctx), True)
        else:
            self.lib.llama_kv_self_clear(ctx)

    def disable_flash_attention(self, params: Any) -> None:
        """Plain attention in ``params`` (a ``llama_context_params``): ``flash_attn_type`` (an enum, default
        auto) in newer llama.cpp, the ``flash_attn`` bool in older."""
        if hasattr(params, "flash_attn_type"):
            params.flash_attn_type = 0  # LLAMA_FLASH_ATTN_TYPE_DISABLED
        else:
            params.flash_attn = False


def load() -> LlamaCppLib:
    """The first binding that loads (py-sync, then cffi's CPU module), cached.

    Raises:
        RuntimeError: neither loads; the message names both packages and why each failed.
    """
    result = _load()
    if isinstance(result, str):
        raise RuntimeError(result)
    return result


def unavailable() -> str | None:
    """None when a binding loads, else why neither does."""
    result = _load()
    return result if isinstance(result, str) else None


@functools.cache
def _load() -> LlamaCppLib | str:
    reasons = []
    for loader in (_load_py_sync, _load_cffi_cpu):
        try:
            found = loader()
        except ImportError as exc:
            reasons.append(f"not installed ({exc})")
        except (OSError, RuntimeError) as exc:
            reasons.append(f"its library does not load here: {exc}")
        else:
            _quiet_log(found)
            return found
    return (f"llama.cpp is unavailable: llama-cpp-py-sync: {reasons[0]}; llama-cpp-cffi: {reasons[1]}. "
            "Install one: pip install 'lightning-latency[llamacpp]' (py-sync needs glibc >= 2.38), or "
            "pip install --no-deps llama-cpp-cffi==0.4.42 (glibc >= 2.34, x86-64 with AVX2).")


def _load_py_sync() -> LlamaCppLib:
    from llama_cpp_py_sync._cffi_bindings import get_ffi, get_lib

    lib = get_lib()
    return LlamaCppLib(lib, get_ffi(), f"llama-cpp-py-sync {importlib.metadata.version('llama-cpp-py-sync')}")


def _load_cffi_cpu() -> LlamaCppLib:
    spec = importlib.util.find_spec("llama")  # locates the package without running its __init__
    if spec is None or not spec.submodule_search_locations:
        raise ImportError("no module named 'llama'")
    version = importlib.metadata.version("llama-cpp-cffi")
    files = sorted(Path(next(iter(spec.submodule_search_locations))).glob("_llama_cpp_cpu.*.so"))
    if not files:
        raise ImportError(f"llama-cpp-cffi {version} has no CPU extension (_llama_cpp_cpu*.so) for this platform")
    # The module's init function is PyInit__llama_cpp_cpu: the name's last part must stay _llama_cpp_cpu.
    ext = importlib.util.spec_from_file_location("llama._llama_cpp_cpu", files[0])
    flags = sys.getdlopenflags()
    sys.setdlopenflags(os.RTLD_LAZY | os.RTLD_LOCAL)  # why lazy is safe: the module docstring
    try:
        module = importlib.util.module_from_spec(ext)
        ext.loader.exec_module(module)
    except ImportError as exc:  # installed, but the dynamic linker refused it (a missing symbol or glibc version)
        raise RuntimeError(str(exc)) from exc
    finally:
        sys.setdlopenflags(flags)
    return LlamaCppLib(module.lib, module.ffi, f"llama-cpp-cffi {version} (CPU extension)")


_LOG_CALLBACKS: list[Any] = []  # the C side keeps only a pointer: the callback must outlive every llama.cpp call


def _quiet_log(found: LlamaCppLib) -> None:
    """llama.cpp logs every model load and context creation (~100 lines) at INFO to stderr: keep warnings and
    errors only."""
    ffi = found.ffi
    keeping = [False]  # GGML_LOG_LEVEL_CONT continues the previous message: same decision

    def keep_warnings(level: int, text: Any, _user: Any) -> None:
        if level != _GGML_LOG_LEVEL_CONT:
            keeping[0] = level >= _GGML_LOG_LEVEL_WARN
        if keeping[0] and text != ffi.NULL:
            sys.stderr.write(ffi.string(text).decode("utf-8", "replace"))

    # The parameter's own type: `ggml_log_callback` is spelled differently in the two bindings' declarations.
    try:
        callback = ffi.callback(ffi.typeof(found.lib.llama_log_set).args[0], keep_warnings)
    except MemoryError:  # cffi's closures need write+execute memory; a hardened kernel refuses: keep the full log
        return
    _LOG_CALLBACKS.append(callback)
    found.lib.llama_log_set(callback, ffi.NULL)
