"""graphopt's quantization ops as torch.library custom ops (namespace `graphopt`), each with a reference
implementation, so a quantized graph stays runnable, exportable and serializable; targets lower them.

Affine mapping: q = clamp(round(x / scale) + zero_point, qmin, qmax); x ~= (q - zero_point) * scale.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from graphopt.ir.graph import Graph

# int7: 7-bit weights stored as int8 (symmetric, so [-63, 63]): u8 x s8 pair products cannot saturate int16, so
# AVX2 CPUs without VNNI take the faster exact `vpmaddubsw` kernel (ONNX Runtime's reduce_range, made exact).
# int8s ("saturation-safe"): int8 values in [-127, 127] whose per-channel scale is just coarse enough that no pair
# the kernel adds (input channels 2m, 2m + 1 at one tap) sums past 128 in magnitude: the same kernel, at a median
# 1.3x the int8 step where int7 takes 2x (`pair_bounded_scales`)
DTYPE_RANGES = {"int8": (-128, 127, torch.int8), "uint8": (0, 255, torch.uint8), "int7": (-64, 63, torch.int8),
                "int8s": (-128, 127, torch.int8), "int4": (-8, 7, torch.int8)}
PAIR_BOUND = 128  # |sum| of a pair's same-sign weights: 255 x 128 = 32640 fits int16


def weight_pairs(w: torch.Tensor) -> torch.Tensor:
    """w [Cout, Cin, *taps] (or [N, K]) as [Cout, ceil(Cin / 2), *taps, 2]: the weights a u8 x s8 pair product adds
    (input channels 2m and 2m + 1 at one tap; an odd last channel pairs with a zero)."""
    if w.shape[1] % 2:
        w = torch.cat([w, w.new_zeros(w.shape[0], 1, *w.shape[2:])], 1)
    return w.reshape(w.shape[0], w.shape[1] // 2, 2, *w.shape[2:]).movedim(2, -1)


def flat_pairs(w: torch.Tensor) -> torch.Tensor:
    """w [Cout, Cin, *taps] (or [N, K]) as [Cout, ceil(taps x Cin / 2), 2]: the pairs ONNX Runtime's u8 x s8
    kernels add, consecutive weights of each output channel's filter flattened channels-last (its NHWC im2col
    order: (kh, kw, c)). The same pairs as `weight_pairs` where Cin is even; with an odd Cin (a stem's 3 colours)
    a pair crosses from one tap to the next."""
    flat = w.movedim(1, -1).reshape(w.shape[0], -1)
    if flat.shape[1] % 2:
        flat = torch.cat([flat, flat.new_zeros(w.shape[0], 1)], 1)
    return flat.reshape(w.shape[0], -1, 2)


def worst_pair_sums(pairs: torch.Tensor) -> torch.Tensor:
    """Per output channel (dim 0), the largest same-sign sum of magnitudes over the pairs in `pairs` [..., 2]."""
    flat = pairs.reshape(pairs.shape[0], -1, 2)
    return torch.maximum(flat.clamp(min=0).sum(-1).amax(1), (-flat).clamp(min=0).sum(-1).amax(1))


def kernel_pair_sums(w: torch.Tensor) -> torch.Tensor:
    """Per output channel, the largest same-sign pair sum graphopt's u8 x s8 kernels can add for weight w: channel
    pairs at a tap (`weight_pairs`), and for a 3-D conv's [Cout, C, kd, kh, kw] also those of the 2-D conv over its
    depth taps that fold-qdq makes of it (channels (c, t) flattened: consecutive depth taps, and the last tap of
    one channel with the first of the next)."""
    worst = worst_pair_sums(weight_pairs(w))
    if w.dim() == 5:
        worst = torch.maximum(worst, worst_pair_sums(weight_pairs(w.reshape(w.shape[0], -1, *w.shape[3:]))))
    return worst


def pairs_bounded(q: torch.Tensor) -> bool:
    """Whether every pair of integer weights q [Cout, Cin, ...] stays within PAIR_BOUND (the u8 x s8 kernels are
    exact on it)."""
    return int(kernel_pair_sums(q.int()).max()) <= PAIR_BOUND


def pair_bounded_scales(w: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """Per output channel, the smallest scale >= `scales` at which w's rounded pairs stay within PAIR_BOUND (in
    graphopt's pairing and ONNX Runtime's):
    round(a / s) + round(b / s) <= P / s + 1 <= PAIR_BOUND for P (the channel's largest same-sign pair sum)
    <= (PAIR_BOUND - 1) x s."""
    w = w.detach().double()
    # both pairings: graphopt's kernels (channel pairs at a tap) and ONNX Runtime's (flattened channels-last), so an
    # int8s weight is exact on either; they differ only for an odd number of input channels
    worst = torch.maximum(kernel_pair_sums(w), worst_pair_sums(flat_pairs(w)))
    return torch.maximum(scales.double(), worst / (PAIR_BOUND - 1)).to(scales.dtype)


def _quantize_per_tensor(x, scale, zero_point, qmin, qmax, dtype):
    return torch.clamp(torch.round(x / scale) + zero_point, qmin, qmax).to(dtype)


def _dequantize_per_tensor(q, scale, zero_point):
    return (q.to(torch.float32) - zero_point) * scale


def _dequantize_per_channel(q, scales, zero_points, axis):
    shape = [1] * q.dim()
    shape[axis] = -1
    return (q.to(torch.float32) - zero_points.reshape(shape).to(torch.float32)) * scales.reshape(shape)


def dynamic_qparams(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """ONNX DynamicQuantizeLinear's uint8 grid for x, computed from x itself (ONNX Runtime's quantize_dynamic
    quantizes every MatMul / Conv input this way, per call): the range [min(x, 0), max(x, 0)] over 255 steps (scale
    1 where that range is empty), zero point round-half-even(clamp(-min / scale, 0, 255)); as float 0-d tensors."""
    lo = torch.clamp(x.amin(), max=0.0).to(torch.float32)
    hi = torch.clamp(x.amax(), min=0.0).to(torch.float32)
    scale = torch.where(hi == lo, torch.ones_like(hi), (hi - lo) / 255)
    return scale, torch.round(torch.clamp(-lo / scale, 0, 255))


def _dynamic_quantize(x):
    scale, zp = dynamic_qparams(x)
    return (torch.clamp(torch.round(x / scale) + zp, 0, 255) - zp) * scale


def plain_decompositions() -> dict:
    """The Q/DQ ops as plain ATen (for `ExportedProgram.run_decompositions`): a program holding them then loads
    and runs in a PyTorch without graphopt, its int8 weights kept."""
    go = torch.ops.graphopt
    return {go.quantize_per_tensor.default: _quantize_per_tensor,
            go.dequantize_per_tensor.default: _dequantize_per_tensor,
            go.dequantize_per_channel.default: _dequantize_per_channel,
            go.dynamic_quantize.default: _dynamic_quantize, go.lut.default: _lut,
            go.depth_taps.default: _depth_taps}


@torch.library.custom_op("graphopt::quantize_per_tensor", mutates_args=())
def quantize_per_tensor(x: torch.Tensor, scale: float, zero_point: int, qmin: int, qmax: int,
                        dtype: torch.dtype) -> torch.Tensor:
    return _quantize_per_tensor(x, scale, zero_point, qmin, qmax, dtype)


@quantize_per_tensor.register_fake
def _(x, scale, zero_point, qmin, qmax, dtype):
    return torch.empty_like(x, dtype=dtype)


@torch.library.custom_op("graphopt::dequantize_per_tensor", mutates_args=())
def dequantize_per_tensor(q: torch.Tensor, scale: float, zero_point: int) -> torch.Tensor:
    return _dequantize_per_tensor(q, scale, zero_point)


@dequantize_per_tensor.register_fake
def _(q, scale, zero_point):
    return torch.empty_like(q, dtype=torch.float32)


@torch.library.custom_op("graphopt::dequantize_per_channel", mutates_args=())
def dequantize_per_channel(q: torch.Tensor, scales: torch.Tensor, zero_points: torch.Tensor,
                           axis: int) -> torch.Tensor:
    return _dequantize_per_channel(q, scales, zero_points, axis)


@dequantize_per_channel.register_fake
def _(q, scales, zero_points, axis):
    return torch.empty_like(q, dtype=torch.float32)


@torch.library.custom_op("graphopt::dynamic_quantize", mutates_args=())
def dynamic_quantize(x: torch.Tensor) -> torch.Tensor:
    """x rounded onto its own uint8 grid (`dynamic_qparams`), computed on every call: an ONNX Runtime
    quantize_dynamic model's DynamicQuantizeLinear as its dequantized value. `quantize` replaces it with a
    calibrated static quantize / dequantize pair, which fold-qdq turns into integer kernels."""
    return _dynamic_quantize(x)


@dynamic_quantize.register_fake
def _(x):
    return torch.empty_like(x)


def _grad_scale(x: torch.Tensor, g: float) -> torch.Tensor:
    """x in the forward pass, gradient scaled by g in the backward pass (LSQ's step-size gradient scale)."""
    return (x - x * g).detach() + x * g


def fake_quant_per_tensor(x: torch.Tensor, scale, zero_point: int, qmin: int, qmax: int,
                          lsq_g: float = 0.0) -> torch.Tensor:
    """Quantize-dequantize for QAT: straight-through gradient through the rounding, none where clamped; with
    lsq_g > 0 and a tensor `scale`, the scale learns too (LSQ)."""
    s = _grad_scale(scale, lsq_g) if lsq_g else scale
    v = x / s + zero_point
    q = torch.clamp(v + (torch.round(v) - v).detach(), qmin, qmax)
    return (q - zero_point) * s


def fake_quant_per_channel(w: torch.Tensor, scales: torch.Tensor, qmax: int, lsq_g: float = 0.0) -> torch.Tensor:
    """Symmetric per-output-channel (axis 0) quantize-dequantize of a weight, as fake_quant_per_tensor."""
    s = (_grad_scale(scales, lsq_g) if lsq_g else scales).reshape(-1, *([1] * (w.dim() - 1)))
    v = w / s
    q = torch.clamp(v + (torch.round(v) - v).detach(), -qmax, qmax)
    return q * s


@torch.library.custom_op("graphopt::qlinear", mutates_args=())
def qlinear(xq: torch.Tensor, x_scale: float, x_zp: int, wq: torch.Tensor, w_scales: torch.Tensor,
            bias: torch.Tensor | None) -> torch.Tensor:
    """int8 x int8 -> int32 accumulate, then one float rescale per output channel (+ bias): float output."""
    acc = (xq.to(torch.float64) - x_zp) @ wq.to(torch.float64).t()  # int32-exact: float64 holds these sums
    y = acc * (x_scale * w_scales.to(torch.float64))
    if bias is not None:
        y = y + bias.to(torch.float64)
    return y.to(torch.float32)


@qlinear.register_fake
def _(xq, x_scale, x_zp, wq, w_scales, bias):
    return xq.new_empty((*xq.shape[:-1], wq.shape[0]), dtype=torch.float32)


@torch.library.custom_op("graphopt::qconv2d", mutates_args=())
def qconv2d(xq: torch.Tensor, x_scale: float, x_zp: int, wq: torch.Tensor, w_scales: torch.Tensor,
            bias: torch.Tensor | None, stride: list[int], padding: list[int], dilation: list[int],
            groups: int) -> torch.Tensor:
    """int8 conv with int32-exact accumulation (zero padding pads with the zero point), float output."""
    x = xq.to(torch.float64) - x_zp  # the zero point maps to 0.0, so zero padding here is exact
    acc = torch.nn.functional.conv2d(x, wq.to(torch.float64), None, stride, padding, dilation, groups)
    y = acc * (x_scale * w_scales.to(torch.float64)).reshape(1, -1, 1, 1)
    if bias is not None:
        y = y + bias.to(torch.float64).reshape(1, -1, 1, 1)
    return y.to(torch.float32)


def _conv_out(xq, wq, stride, padding, dilation, dtype):
    n, _, h, w = xq.shape
    kh, kw = wq.shape[2:]
    oh = (h + 2 * padding[0] - dilation[0] * (kh - 1) - 1) // stride[0] + 1
    ow = (w + 2 * padding[1] - dilation[1] * (kw - 1) - 1) // stride[1] + 1
    return xq.new_empty((n, wq.shape[0], oh, ow), dtype=dtype)


@qconv2d.register_fake
def _(xq, x_scale, x_zp, wq, w_scales, bias, stride, padding, dilation, groups):
    return _conv_out(xq, wq, stride, padding, dilation, torch.float32)


def depth_tap_count(d: int, kd: int, sd: int, pd: int) -> int:
    """Output depths of a 3-D conv of kd taps, stride sd, padding pd over d input depths."""
    return (d + 2 * pd - kd) // sd + 1


def _depth_taps(x, kd, sd, pd, fill):
    od = depth_tap_count(x.shape[2], kd, sd, pd)
    xp = torch.nn.functional.pad(x, [0, 0, 0, 0, pd, pd], value=fill) if pd else x
    taps = torch.stack([xp[:, :, t:t + sd * (od - 1) + 1:sd] for t in range(kd)], 2)  # [N, C, kd, OD, H, W]
    n, c, _, _, h, w = taps.shape
    return taps.permute(0, 3, 1, 2, 4, 5).reshape(n * od, c * kd, h, w)


@torch.library.custom_op("graphopt::depth_taps", mutates_args=())
def depth_taps(x: torch.Tensor, kd: int, sd: int, pd: int, fill: float) -> torch.Tensor:
    """A 3-D conv's input x [N, C, D, H, W] as a 2-D conv's [N * OD, C * kd, H, W]: sample (n, o) holds, for each
    depth tap t, the input slice at depth o sd + t - pd (`fill` outside the depth: an int8 input's zero point) as
    channels (c, t), so the conv with weight [Cout, C, kd, kh, kw] is the 2-D conv with weight [Cout, C kd, kh,
    kw] on it. fold-qdq writes an int8 3-D conv so (`qconv2d` on these taps: graphopt's int8 2-D kernels); any
    dtype, values only moved."""
    return _depth_taps(x, kd, sd, pd, fill)


@depth_taps.register_fake
def _(x, kd, sd, pd, fill):
    od = depth_tap_count(x.shape[2], kd, sd, pd)
    return x.new_empty((x.shape[0] * od, x.shape[1] * kd, x.shape[3], x.shape[4]))


@torch.library.custom_op("graphopt::qmatmul", mutates_args=())
def qmatmul(aq: torch.Tensor, a_scale: float, a_zp: int, bq: torch.Tensor, b_scale: float, b_zp: int) -> torch.Tensor:
    """Activation x activation int8 matmul (attention scores and outputs): (a - za) @ (b - zb) accumulated exactly,
    times a_scale * b_scale; float output. Broadcasts like torch.matmul."""
    acc = torch.matmul(aq.to(torch.float64) - a_zp, bq.to(torch.float64) - b_zp)
    return (acc * (a_scale * b_scale)).to(torch.float32)


@qmatmul.register_fake
def _(aq, a_scale, a_zp, bq, b_scale, b_zp):
    return torch.matmul(aq.to(torch.float32), bq.to(torch.float32))


def _lut(q, table):
    return table[q.to(torch.int64) + 128]


@torch.library.custom_op("graphopt::lut", mutates_args=())
def lut(q: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
    """An int8 -> int8 function as a 256-entry table (`fold-qdq`: an activation function between two int8 grids,
    dequantize -> SiLU / GELU / sigmoid ... -> quantize, evaluated once for every code): table[q + 128]."""
    return _lut(q, table)


@lut.register_fake
def _(q, table):
    return torch.empty_like(q, dtype=table.dtype)


def fixed_point_multiplier(real: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """real multipliers (> 0) as int32 Q31 mantissas in [2^30, 2^31) and right shifts: real ~= m * 2^-(31 + shift)
    (gemmlowp / TFLite convention; shift may be negative for multipliers >= 1)."""
    real = real.double()
    mant, exp = torch.frexp(real)  # real = mant * 2^exp, mant in [0.5, 1)
    m = torch.round(mant * 2 ** 31).long()
    carry = m == 2 ** 31  # a mantissa that rounded up to 1.0
    m = torch.where(carry, m // 2, m)
    exp = torch.where(carry, exp + 1, exp)
    return m.to(torch.int32), (-exp).to(torch.int32)


@torch.library.custom_op("graphopt::requantize", mutates_args=())
def requantize(acc: torch.Tensor, multiplier: torch.Tensor, shift: torch.Tensor, axis: int, out_scale: float,
               out_zp: int, qmin: int, qmax: int) -> torch.Tensor:
    """Integer-only requantization of an int32 accumulator: (acc * m) >> (31 + shift) with round half up, per
    channel along `axis`, plus the output zero point, clamped to [qmin, qmax] (a fused ReLU/ReLU6 narrows these).
    `out_scale` is not used by the arithmetic; it names the int8 grid for exporters and readers."""
    view = [1] * acc.dim()
    view[axis] = -1
    n = (31 + shift.long()).reshape(view)
    prod = acc.long() * multiplier.long().reshape(view)
    y = torch.bitwise_right_shift(prod + torch.bitwise_left_shift(torch.ones_like(n), n - 1), n) + out_zp
    return torch.clamp(y, qmin, qmax).to(torch.int8)


@requantize.register_fake
def _(acc, multiplier, shift, axis, out_scale, out_zp, qmin, qmax):
    return torch.empty_like(acc, dtype=torch.int8)


@torch.library.custom_op("graphopt::qlinear_i32", mutates_args=())
def qlinear_i32(xq: torch.Tensor, x_scale: float, x_zp: int, wq: torch.Tensor, w_scales: torch.Tensor,
                bias: torch.Tensor | None) -> torch.Tensor:
    """int8 x int8 -> int32 accumulator (x zero point removed) plus an int32 bias at the accumulator's scale
    (x_scale * w_scale; the scales are not used by the arithmetic, they describe the accumulator)."""
    acc = (xq.to(torch.float64) - x_zp) @ wq.to(torch.float64).t()
    if bias is not None:
        acc = acc + bias.to(torch.float64)
    return acc.round().to(torch.int32)


@qlinear_i32.register_fake
def _(xq, x_scale, x_zp, wq, w_scales, bias):
    return xq.new_empty((*xq.shape[:-1], wq.shape[0]), dtype=torch.int32)


@torch.library.custom_op("graphopt::qconv2d_i32", mutates_args=())
def qconv2d_i32(xq: torch.Tensor, x_scale: float, x_zp: int, wq: torch.Tensor, w_scales: torch.Tensor,
                bias: torch.Tensor | None, stride: list[int], padding: list[int], dilation: list[int],
                groups: int) -> torch.Tensor:
    """int8 conv -> int32 accumulator (zero padding pads with the zero point) plus an int32 bias."""
    acc = torch.nn.functional.conv2d(xq.to(torch.float64) - x_zp, wq.to(torch.float64), None, stride, padding,
                                     dilation, groups)
    if bias is not None:
        acc = acc + bias.to(torch.float64).reshape(1, -1, 1, 1)
    return acc.round().to(torch.int32)


@qconv2d_i32.register_fake
def _(xq, x_scale, x_zp, wq, w_scales, bias, stride, padding, dilation, groups):
    return _conv_out(xq, wq, stride, padding, dilation, torch.int32)


QUANT_OPS = ("quantize_per_tensor", "dequantize_per_tensor", "dequantize_per_channel", "qlinear", "qconv2d",
             "qmatmul", "requantize", "qlinear_i32", "qconv2d_i32", "dynamic_quantize", "lut", "depth_taps")
# ops that round activations onto a grid: a float rounding difference before one can move a value a whole step
ROUNDING_OPS = ("quantize_per_tensor", "dynamic_quantize", "fake_quant_per_tensor", "requantize")


def rounds_activations(graph: "Graph") -> bool:
    """Whether the graph rounds activations onto a grid somewhere (a quantized or dynamically quantized graph)."""
    return any(n.op == "call_function" and getattr(n.target, "__name__", "").split(".")[0] in ROUNDING_OPS
               for n in graph.gm.graph.nodes)


_go = torch.ops.graphopt
_aten = torch.ops.aten


def unfold_integer_ops(graph: "Graph") -> "Graph":
    """The inverse of fold-qdq, on a clone: qconv2d/qlinear/qmatmul become dequantize -> float op again (same
    values: the integer ops equal their Q/DQ form within a rounding step). The ONNX exporter writes that QDQ form,
    which ONNX Runtime fuses back into its own integer kernels."""
    out = graph.clone()
    g = out.gm.graph
    for r in [n for n in g.nodes if n.target is _go.requantize.default]:
        acc = r.args[0]
        _, _, _, _, s_out, zp, qmin, qmax = r.args
        b_i32 = acc.args[5]
        with g.inserting_before(acc):
            bias = None
            if b_i32 is not None:  # the int32 bias back at the accumulator's scale (x_scale * w_scale)
                value = out.get_param(b_i32.target).double() * float(acc.args[1]) * \
                    out.get_param(acc.args[4].target).double()
                bias = out.add_param(f"{b_i32.target}_float", value.float(), before=acc)
            float_target = _go.qconv2d.default if acc.target is _go.qconv2d_i32.default else _go.qlinear.default
            y = g.call_function(float_target, (*acc.args[:5], bias, *acc.args[6:]))
        with g.inserting_before(r):  # the narrowed grid bounds are a clamp in float, then the quantize
            y = g.call_function(_aten.clamp.default, (y, (qmin - zp) * s_out, (qmax - zp) * s_out))
            q = g.call_function(_go.quantize_per_tensor.default, (y, s_out, zp, -128, 127, torch.int8))
        r.replace_all_uses_with(q)
        g.erase_node(r)
    g.eliminate_dead_code()
    out.remove_unused_params()
    names = {"qconv2d.default", "qlinear.default", "qmatmul.default"}
    todo = [n for n in g.nodes if n.op == "call_function" and getattr(n.target, "__name__", "") in names]
    for n in todo:
        with g.inserting_before(n):
            if n.target is _go.qmatmul.default:
                a = g.call_function(_go.dequantize_per_tensor.default, tuple(n.args[0:3]))
                b = g.call_function(_go.dequantize_per_tensor.default, tuple(n.args[3:6]))
                new = g.call_function(_aten.matmul.default, (a, b))
            else:
                xq, sx, zx, wq, ws, bias = n.args[:6]
                x = g.call_function(_go.dequantize_per_tensor.default, (xq, sx, zx))
                zeros = out.add_param(f"{wq.target}_zp", torch.zeros(out.get_param(wq.target).shape[0],
                                                                     dtype=torch.int32), before=x)
                w = g.call_function(_go.dequantize_per_channel.default, (wq, ws, zeros, 0))
                if n.target is _go.qlinear.default:
                    new = g.call_function(_aten.linear.default, (x, w, bias))
                else:
                    new = g.call_function(_aten.conv2d.default, (x, w, bias, *n.args[6:10]))
        n.replace_all_uses_with(new)
        g.erase_node(n)
    if todo:
        out.refresh()
    return out
