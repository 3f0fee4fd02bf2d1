"""Is there a CUDA GPU here that TVM can run on? (Answered without starting anything heavy; no GPU is a valid
answer, never an error.)"""
from __future__ import annotations

from pathlib import Path


def cuda_runtime_loaded() -> bool:
    """Load TVM's CUDA runtime module if it is not loaded yet (a runtime-only TVM does not autoload it); False when
    this machine has no CUDA driver for it."""
    import tvm
    if tvm.get_global_func("ffi.Module.load_from_bytes.cuda", allow_missing=True) is not None:
        return True
    try:
        from tvm_ffi.libinfo import load_lib_ctypes

        from tvm.base import _LOADED_LIBS
        runtime_dir = Path(_LOADED_LIBS["tvm_runtime"]._name).resolve().parent
        _LOADED_LIBS["tvm_runtime_cuda"] = load_lib_ctypes(package="tvm", target_name="tvm_runtime_cuda",
                                                           extra_lib_paths=[runtime_dir], mode="RTLD_LOCAL")
    except (OSError, RuntimeError, KeyError, ImportError):
        return False
    return tvm.get_global_func("ffi.Module.load_from_bytes.cuda", allow_missing=True) is not None


def cuda_available() -> bool:
    """Whether a CUDA GPU can run artifacts here (driver, TVM's CUDA runtime and a device)."""
    import tvm
    try:
        return cuda_runtime_loaded() and bool(tvm.cuda(0).exist)
    except Exception:  # noqa: BLE001 - no driver reads as no GPU
        return False
