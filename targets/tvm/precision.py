"""Floating dtypes on the CPU target: float16 / bfloat16 graphs compute in float32 (`graphopt.ir.precision`; a
half graph reached TVM with float16 biases next to float32 conv outputs and failed to import); float64 is refused by
name (computing it in float32 would silently drop the precision it was written for)."""
from __future__ import annotations

import torch

from graphopt.errors import TargetError
from graphopt.ir.graph import Graph
from graphopt.ir.precision import widen_half


def float32_compute(graph: Graph) -> Graph:
    """`graph`, widened to float32 compute where it is half precision; float64 inputs or parameters: a TargetError
    naming them."""
    for s in graph.inputs:
        if s.dtype == "float64":
            raise TargetError(f"input '{s.name}' is float64: graphopt's CPU target compiles float32 (float16 and "
                              "bfloat16 models compute in float32); cast the model and inputs with .float() before "
                              "tracing, or compile with --target onnx")
    for name, t in list(graph.gm.named_parameters()) + list(graph.gm.named_buffers()):
        if t.dtype == torch.float64:
            raise TargetError(f"parameter '{name}' is float64: graphopt's CPU target compiles float32; cast the model "
                              "with .float() before tracing, or compile with --target onnx")
    return widen_half(graph)
