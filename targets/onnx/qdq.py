"""ONNX translations of graphopt's Q/DQ ops: standard QuantizeLinear / DequantizeLinear (the QDQ format ONNX
Runtime fuses into integer kernels)."""
from __future__ import annotations

import onnx
from onnxscript import opset18 as op

import graphopt.ir.quant_ops  # noqa: F401  the ops must exist before they can be looked up


def _int8_scalar(v: int):
    return op.Constant(value=onnx.helper.make_tensor("zp", onnx.TensorProto.INT8, [], [int(v)]))


def quantize_per_tensor(x, scale: float, zero_point: int, qmin: int, qmax: int, dtype):
    return op.QuantizeLinear(x, op.Constant(value_float=float(scale)), _int8_scalar(zero_point))


def dequantize_per_tensor(q, scale: float, zero_point: int):
    return op.DequantizeLinear(q, op.Constant(value_float=float(scale)), _int8_scalar(zero_point))


def dequantize_per_channel(q, scales, zero_points, axis: int):
    return op.DequantizeLinear(q, scales, op.Cast(zero_points, to=onnx.TensorProto.INT8), axis=axis)


def translation_table() -> dict:
    import torch
    return {torch.ops.graphopt.quantize_per_tensor.default: quantize_per_tensor,
            torch.ops.graphopt.dequantize_per_tensor.default: dequantize_per_tensor,
            torch.ops.graphopt.dequantize_per_channel.default: dequantize_per_channel}
