"""graphopt: a compiler for compressed neural networks. One IR from pruning and quantization to TVM kernels."""
from __future__ import annotations

__version__ = "0.1.0"

from graphopt.api import compile, load, load_model, load_onnx, optimize, trace  # noqa: E402,A004
from graphopt.targets.tvm.tuning import Tuning  # noqa: E402
from graphopt.errors import (ArtifactError, GraphoptError, InputMismatchError, ModelFileError,  # noqa: E402
                             PassFailedError, PassOptionError, PipelineSyntaxError, TargetError, UnsupportedOpError)
from graphopt.ir import Graph, TensorSpec  # noqa: E402

__all__ = ["trace", "load_onnx", "load_model", "optimize", "compile", "load", "Graph", "TensorSpec", "Tuning", "GraphoptError",
           "UnsupportedOpError", "ModelFileError", "PipelineSyntaxError", "PassOptionError", "InputMismatchError",
           "PassFailedError", "TargetError", "ArtifactError", "__version__"]
