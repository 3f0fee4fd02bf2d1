"""Quantization: calibrators and the quantize pass (Q/DQ)."""
from graphopt.passes.quant import fold_qdq, quantize  # noqa: F401
