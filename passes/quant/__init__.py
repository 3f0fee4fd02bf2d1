"""Quantization: calibrators, quantize (Q/DQ), qat (fake-quant training, LSQ), mixed-precision and fold-qdq (integer ops)."""
from graphopt.passes.quant import fold_qdq, mixed_precision, qat, quantize  # noqa: F401
