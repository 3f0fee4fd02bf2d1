"""The legacy (TorchScript) ONNX exporter, quietly: the ONNX import tests write their fixtures with it (it writes
plain Conv / Gemm nodes, which ORT's quantizers then rewrite), without its deprecation warning and stdout chatter."""
from __future__ import annotations

import contextlib
import io
import warnings

import torch


def export_legacy(model: torch.nn.Module, args: tuple, path, **kwargs) -> None:
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore")
        torch.onnx.export(model, args, str(path), dynamo=False, **kwargs)
