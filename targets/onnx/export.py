"""ONNX export of a Graph (for ONNX Runtime pipelines), written atomically."""
from __future__ import annotations

import io
import logging
import warnings
from pathlib import Path

from graphopt.errors import TargetError
from graphopt.ir.files import atomic_file
from graphopt.ir.graph import Graph

log = logging.getLogger(__name__)


def export_onnx(graph: Graph, path: str | Path, opset: int = 18) -> Path:
    """Write `graph` as an ONNX model (torch's dynamo exporter over the re-exported program)."""
    import onnx
    import torch

    from graphopt.ir.sparse_ops import densify
    from graphopt.ir.quant_ops import unfold_integer_ops
    # ONNX has no block-sparse op: sparse layers go out dense (exact zeros); integer ops go out in QDQ form
    ep = unfold_integer_ops(densify(graph)).to_exported_program()
    try:
        with warnings.catch_warnings(), _quiet():
            warnings.simplefilter("ignore")
            from graphopt.targets.onnx.qdq import translation_table
            prog = torch.onnx.export(ep, (), dynamo=True, opset_version=opset, verbose=False,
                                     custom_translation_table=translation_table(),
                                     input_names=[s.name for s in graph.inputs],
                                     output_names=[s.name for s in graph.outputs], optimize=True)
    except Exception as e:
        raise TargetError(f"ONNX export failed: {type(e).__name__}: {str(e).splitlines()[0]}") from None
    model = prog.model_proto
    from graphopt.targets.onnx.qdq import fold_pads_into_convs, fold_weight_transposes, quantize_biases
    fold_weight_transposes(model)  # (the forms ONNX Runtime fuses into integer kernels; see each)
    quantize_biases(model)
    fold_pads_into_convs(model)
    onnx.checker.check_model(model)
    with atomic_file(path) as tmp:
        onnx.save(model, str(tmp))
    return Path(path)


class _quiet:
    """Silence the exporter's progress prints on stdout and, on stderr, its registry's warnings (torchvision ops it
    skips, which a graph never uses) and onnxscript's constant folder's (a node it could not evaluate stays as it
    is: "Evaluation failed: cannot reshape array of size 1 into shape (1,128)" on a sparsified MiniLM's mask)."""

    LOGGERS = ("torch.onnx", "onnxscript")

    def __enter__(self):
        import contextlib
        self._logs = [logging.getLogger(name) for name in self.LOGGERS]
        self._levels = [log_.level for log_ in self._logs]
        for log_ in self._logs:
            log_.setLevel(logging.ERROR)
        self._ctx = contextlib.redirect_stdout(io.StringIO())
        return self._ctx.__enter__()

    def __exit__(self, *exc):
        for log_, level in zip(self._logs, self._levels):
            log_.setLevel(level)
        return self._ctx.__exit__(*exc)
