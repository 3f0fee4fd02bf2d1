"""graphopt's quantization ops as torch.library custom ops (namespace `graphopt`), each with a reference
implementation, so a quantized graph stays runnable, exportable and serializable; targets lower them.

Affine mapping: q = clamp(round(x / scale) + zero_point, qmin, qmax); x ~= (q - zero_point) * scale.
"""
from __future__ import annotations

import torch

DTYPE_RANGES = {"int8": (-128, 127, torch.int8), "uint8": (0, 255, torch.uint8), "int4": (-8, 7, torch.int8)}


@torch.library.custom_op("graphopt::quantize_per_tensor", mutates_args=())
def quantize_per_tensor(x: torch.Tensor, scale: float, zero_point: int, qmin: int, qmax: int,
                        dtype: torch.dtype) -> torch.Tensor:
    return torch.clamp(torch.round(x / scale) + zero_point, qmin, qmax).to(dtype)


@quantize_per_tensor.register_fake
def _(x, scale, zero_point, qmin, qmax, dtype):
    return torch.empty_like(x, dtype=dtype)


@torch.library.custom_op("graphopt::dequantize_per_tensor", mutates_args=())
def dequantize_per_tensor(q: torch.Tensor, scale: float, zero_point: int) -> torch.Tensor:
    return (q.to(torch.float32) - zero_point) * scale


@dequantize_per_tensor.register_fake
def _(q, scale, zero_point):
    return torch.empty_like(q, dtype=torch.float32)


@torch.library.custom_op("graphopt::dequantize_per_channel", mutates_args=())
def dequantize_per_channel(q: torch.Tensor, scales: torch.Tensor, zero_points: torch.Tensor,
                           axis: int) -> torch.Tensor:
    shape = [1] * q.dim()
    shape[axis] = -1
    return (q.to(torch.float32) - zero_points.reshape(shape).to(torch.float32)) * scales.reshape(shape)


@dequantize_per_channel.register_fake
def _(q, scales, zero_points, axis):
    return torch.empty_like(q, dtype=torch.float32)


def fake_quant_per_tensor(x: torch.Tensor, scale: float, zero_point: int, qmin: int, qmax: int) -> torch.Tensor:
    """Quantize-dequantize with a straight-through gradient (for QAT)."""
    q = torch.clamp(torch.round(x / scale) + zero_point, qmin, qmax)
    y = (q - zero_point) * scale
    return x + (y - x).detach()


QUANT_OPS = ("quantize_per_tensor", "dequantize_per_tensor", "dequantize_per_channel")
