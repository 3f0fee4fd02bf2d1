"""Quantization: calibrators and the quantize pass (Q/DQ)."""
from graphopt.passes.quant import quantize  # noqa: F401
