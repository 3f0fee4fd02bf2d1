"""Quantization: calibrators, quantize (Q/DQ), qat (fake-quant training, LSQ) and fold-qdq (integer ops)."""
from graphopt.passes.quant import fold_qdq, qat, quantize  # noqa: F401
