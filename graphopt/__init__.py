"""graphopt: a compiler for compressed neural networks. One IR from pruning and quantization to TVM kernels.

The compiler's names (trace, optimize, compile, ...) are imported on first use, so that a deploy process that only
loads and runs artifacts (`graphopt.load`) needs numpy and the TVM runtime, not torch, and starts in a fraction of
the time (`import graphopt` had imported torch, the passes and the frontends: 1.3 s before a load)."""
from __future__ import annotations

__version__ = "0.1.0"

from graphopt.errors import (ArtifactError, GraphoptError, InputMismatchError, ModelFileError,  # noqa: E402
                             PassFailedError, PassOptionError, PipelineSyntaxError, TargetError, UnsupportedOpError)

_LAZY = {"trace": "graphopt.api", "load_onnx": "graphopt.api", "load_model": "graphopt.api",
         "optimize": "graphopt.api", "compile": "graphopt.api", "load": "graphopt.runtime",
         "Tuning": "graphopt.targets.tvm.tuning", "Graph": "graphopt.ir", "TensorSpec": "graphopt.ir"}

__all__ = ["trace", "load_onnx", "load_model", "optimize", "compile", "load", "Graph", "TensorSpec", "Tuning", "GraphoptError",
           "UnsupportedOpError", "ModelFileError", "PipelineSyntaxError", "PassOptionError", "InputMismatchError",
           "PassFailedError", "TargetError", "ArtifactError", "__version__"]


def __getattr__(name: str):
    if name not in _LAZY:
        raise AttributeError(f"module 'graphopt' has no attribute '{name}'")
    import importlib
    value = getattr(importlib.import_module(_LAZY[name]), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))
