"""graphopt: a compiler for compressed neural networks. One IR from pruning and quantization to TVM kernels.

The compiler's names (trace, optimize, compile, ...) are imported on first use, so that a deploy process that only
loads and runs artifacts (`graphopt.load`) needs numpy and the TVM runtime, not torch, and starts in a fraction of
the time (`import graphopt` had imported torch, the passes and the frontends: 1.3 s before a load)."""
from __future__ import annotations

__version__ = "0.1.0"

from graphopt.errors import (ArtifactError, GraphoptError, InputMismatchError, ModelFileError,  # noqa: E402
                             PassFailedError, PassOptionError, PipelineSyntaxError, TargetError, UnsupportedOpError)

from graphopt.lazy import PASS_LOADERS, lazy_attributes  # noqa: E402

_LAZY = {"trace": "graphopt.api", "load_onnx": "graphopt.api", "load_model": "graphopt.api",
         "optimize": "graphopt.api", "compile": "graphopt.api", "load": "graphopt.runtime",
         "Tuning": "graphopt.targets.tvm.tuning", "Graph": "graphopt.ir", "TensorSpec": "graphopt.ir"}

__all__ = ["trace", "load_onnx", "load_model", "optimize", "compile", "load", "Graph", "TensorSpec", "Tuning", "GraphoptError",
           "UnsupportedOpError", "ModelFileError", "PipelineSyntaxError", "PassOptionError", "InputMismatchError",
           "PassFailedError", "TargetError", "ArtifactError", "__version__"]


__getattr__, __dir__ = lazy_attributes("graphopt", _LAZY, globals())


def _load_builtin_passes() -> None:
    import graphopt.passes  # noqa: F401  (importing registers them)


PASS_LOADERS.append(_load_builtin_passes)  # the pass registry loads the built-in passes on its first lookup
