"""Graph -> TVM Relax, through torch.export and Relax's `from_exported_program`.

`from_fx` is not used: it computes wrong batch-norm results in TVM 0.27.
"""
from __future__ import annotations

import logging
import math

from graphopt.errors import TargetError, UnsupportedOpError
from graphopt.ir.graph import Graph
from graphopt.ir.printer import target_name
from graphopt.targets.tvm.complex import complex_as_real
from graphopt.targets.tvm.precision import float32_compute
from graphopt.targets.tvm.missing_ops import CONVERTERS as MISSING_OPS, builtin_converter, with_promotion
from graphopt.targets.tvm.more_ops import CONVERTERS as MORE_OPS, first_nan

log = logging.getLogger(__name__)


def _lifted_tensors(ep) -> dict:
    """Placeholder name -> tensor for the exported program's parameters, buffers and constants."""
    state = dict(ep.state_dict)
    state.update(ep.constants)
    return {spec.arg.name: state[spec.target] for spec in ep.graph_signature.input_specs
            if spec.target is not None and spec.target in state}


def _quant_converters(lifted: dict | None = None, cpu_kernels: bool = True, sparse24: dict | None = None,
                      target=None, layouts: dict | None = None, gpu_dense: dict | None = None):
    """Relax lowering of graphopt's Q/DQ ops (reference semantics: round half to even, clamp, affine).

    cpu_kernels: batch-1 convs, linears and their int8 forms go to graphopt's CPU kernels (TIR with x86 vector
    shapes for `target`, by default this machine's CPU); False keeps every op a plain Relax op, for GPU targets,
    whose schedules come from dlight. `layouts`: select-sparse-layout's record per weight placeholder (int8
    linears it chose bsr8x4 for run the int8 BSR kernel). `gpu_dense` (GPU targets: {"format": "f16" | "bf16" |
    None, "records": {}, "wgmma": sm_90a build}): linears with constant weights that fit the tile run graphopt's
    dense tensor-core kernel (int8 ones always, float ones in the half format; fp32 builds keep float linears on
    dlight), each recorded."""
    from tvm import relax

    from graphopt.targets.tvm.host import cpu_target
    if cpu_kernels and target is None:
        target = cpu_target()

    def f32(v):
        return relax.const(float(v), "float32")

    fused_acts: set = set()

    fused_quants: dict = {}

    def quantize_per_tensor(node, importer):
        if node in fused_quants:  # done in the producing conv's store
            return fused_quants[node]
        x = importer.env[node.args[0]]
        scale, zp, qmin, qmax, dtype = node.args[1:6]
        bb = importer.block_builder
        y = bb.emit(relax.op.divide(x, f32(scale)))
        y = bb.emit(relax.op.round(y))
        y = bb.emit(relax.op.add(y, f32(zp)))
        y = bb.emit(relax.op.clip(y, int(qmin), int(qmax)))
        return bb.emit(relax.op.astype(y, str(dtype).replace("torch.", "")))

    def lut(node, importer):
        """graphopt.lut: table[q + 128] (an activation function between int8 grids); graphopt's byte-permute kernel
        on the CPU (`cpu/lut.py`), a take elsewhere."""
        bb = importer.block_builder
        xq, table = importer.env[node.args[0]], importer.env[node.args[1]]
        shape = node.args[0].meta["val"].shape
        if cpu_kernels and all(isinstance(d, int) for d in shape):
            from graphopt.targets.tvm.cpu.lut import emit_lut
            return emit_lut(bb, xq, table, shape, target)
        idx = bb.emit(relax.op.add(bb.emit(relax.op.astype(xq, "int32")), relax.const(128, "int32")))
        return bb.emit(relax.op.take(table, idx, axis=0))

    def depth_taps(node, importer):
        """graphopt.depth_taps (an int8 3-D conv's input as fold-qdq writes it, or any dtype): graphopt's copy kernel
        on the CPU, TVM's pad + slices + stack + reshape elsewhere."""
        from graphopt.ir.quant_ops import depth_tap_count
        x_shape = node.args[0].meta["val"].shape
        kd, sd, pd, fill = node.args[1:5]
        od = depth_tap_count(int(x_shape[2]), int(kd), int(sd), int(pd))
        dtype = str(node.args[0].meta["val"].dtype).replace("torch.", "")
        if cpu_kernels and all(isinstance(v, int) for v in x_shape):
            from graphopt.targets.tvm.cpu.conv import emit_depth_taps
            return emit_depth_taps(importer.block_builder, importer.env[node.args[0]], x_shape, int(kd), int(sd),
                                   int(pd), od, dtype, float(fill))
        bb = importer.block_builder
        x = importer.env[node.args[0]]
        if pd:
            x = bb.emit(relax.op.nn.pad(x, [0, 0, 0, 0, int(pd), int(pd), 0, 0, 0, 0], "constant", float(fill)))
        ends = [t + int(sd) * (od - 1) + 1 for t in range(int(kd))]
        taps = [bb.emit(relax.op.strided_slice(x, [2], [t], [e], [int(sd)])) for t, e in zip(range(int(kd)), ends)]
        y = bb.emit(relax.op.stack(taps, axis=2))
        y = bb.emit(relax.op.permute_dims(y, [0, 3, 1, 2, 4, 5]))
        n, c, _, h, w = (int(v) for v in x_shape)
        return bb.emit(relax.op.reshape(y, (n * od, c * int(kd), h, w)))

    def _dequantized(bb, q, scale, zp):
        """(float(q) - zp) * scale, per tensor."""
        from graphopt.targets.tvm.cpu.conv import dequantized
        return dequantized(bb, q, scale, zp)

    def dequantize_per_tensor(node, importer):
        return _dequantized(importer.block_builder, importer.env[node.args[0]], *node.args[1:3])

    def dequantize_per_channel(node, importer):
        q, scales, zps = (importer.env[a] for a in node.args[:3])
        axis = int(node.args[3])
        rank = len(node.args[0].meta["val"].shape)
        shape = [1] * rank
        shape[axis] = -1
        bb = importer.block_builder
        s = bb.emit(relax.op.reshape(scales, shape))
        z = bb.emit(relax.op.astype(zps, "float32"))
        z = bb.emit(relax.op.reshape(z, shape))
        y = bb.emit(relax.op.astype(q, "float32"))
        y = bb.emit(relax.op.subtract(y, z))
        return bb.emit(relax.op.multiply(y, s))

    def _linear_acc(bb, node, xq, wq, zx):
        """sum((x - zx) w) in int32 for int8 x and w [N, K], as sum(x w) - zx sum(w) (the operands stay int8, so
        the artifact stores int8 weights); returns (accumulator, per-channel broadcast shape). On cuda-sparse an
        int8 2:4 weight takes the int8 sparse tensor-core kernel for sum(x w)."""
        acc = _sparse_int8_acc(bb, node, xq) if sparse24 is not None else None
        if acc is None and gpu_dense is not None and str(node.args[0].meta["val"].dtype) == "torch.int8":
            acc = _dense_tc(bb, node, xq, getattr(node.args[3], "name", None), None, "s8")
        if acc is None:
            acc = bb.emit(relax.op.matmul(xq, bb.emit(relax.op.permute_dims(wq, [1, 0])), out_dtype="int32"))
        wsum = bb.emit(relax.op.sum(bb.emit(relax.op.astype(wq, "int32")), axis=1))
        shape = [1] * (len(node.args[0].meta["val"].shape) - 1) + [-1]
        return _minus_zero_point(bb, acc, wsum, zx, shape), shape

    def _dense_tc(bb, node, x, wname, bias, fmt):
        """x @ w^T (+ bias) on graphopt's dense tensor-core kernel for the constant weight `wname` (wgmma for
        sm_90a builds where the shape fits it, else the multistage mma.sync kernel), or None where neither applies
        (the caller emits the plain op)."""
        from graphopt.targets.tvm.gpu.gemm import pipeline_tiles
        from graphopt.targets.tvm.gpu.sparse import dense_tc_applies, emit_dense_tc
        from graphopt.targets.tvm.gpu.wgmma import emit_wgmma, wg_applies, wg_tiles
        wt = (lifted or {}).get(wname)
        x_shape = node.args[0].meta["val"].shape
        if wt is None or wt.dim() != 2 or fmt is None:
            return None
        n, k = (int(d) for d in wt.shape)
        cols = math.prod(int(d) for d in x_shape[:-1])
        if dense_tc_applies(n, k, fmt) or cols == 0:
            return None
        x2 = bb.emit(relax.op.reshape(x, (cols, k)))
        w = wt.detach().float().numpy()
        if gpu_dense.get("wgmma") and not wg_applies(n, k, fmt):
            tiles, kernel = wg_tiles(cols, n, fmt), "graphopt dense tensor-core (wgmma, sm_90a)"
            y = emit_wgmma(bb, x2, w, bias, cols, fmt, tiles)
        else:
            tiles, kernel = pipeline_tiles(cols, n), "graphopt dense tensor-core (mma.sync, multistage)"
            y = emit_dense_tc(bb, x2, w, bias, cols, fmt, tiles)
        param = gpu_dense.get("names", {}).get(wname, wname)
        gpu_dense["records"][param] = {"shape": [cols, k, n], "format": fmt, "tiles": list(tiles), "kernel": kernel}
        return bb.emit(relax.op.reshape(y, [int(d) for d in x_shape[:-1]] + [n]))

    def _emit_24(bb, x2, w, bias, cols, fmt, rec):
        """y [cols, n] of the 2:4 linear x2 [cols, k] @ w^T on the kernel sp24_decision chose (`rec`): wgmma.sp in
        sm_90a builds where the wgmma kernels take the weight, else the multistage mma.sp kernel."""
        if rec.get("sp24_kernel", "").startswith("wgmma"):
            from graphopt.targets.tvm.gpu.wgmma import emit_wgmma, wg_tiles
            tiles = wg_tiles(cols, w.shape[0], fmt, sparse=True)
            rec["tiles"] = list(tiles)
            return emit_wgmma(bb, x2, w, bias, cols, fmt, tiles, sparse=True)
        from graphopt.targets.tvm.gpu.sparse import emit_sp24
        return emit_sp24(bb, x2, w, bias, cols, "tk", fmt)

    def _sparse_int8_acc(bb, node, xq):
        x_shape = node.args[0].meta["val"].shape
        wname = getattr(node.args[3], "name", None)
        if str(node.args[0].meta["val"].dtype) != "torch.int8" or \
                (rec := sparse24_layer(node, wname, x_shape, False, "s8")) is None:
            return None
        k = int(x_shape[-1])
        cols = math.prod(int(d) for d in x_shape[:-1])
        x2 = bb.emit(relax.op.reshape(xq, (cols, k)))
        w = lifted[wname].detach().numpy().astype("float32")
        y = _emit_24(bb, x2, w, None, cols, "s8", rec)
        out = [int(d) for d in x_shape[:-1]] + [int(w.shape[0])]
        return bb.emit(relax.op.reshape(y, out))

    def _conv_acc(bb, node, xq, wq, zx):
        """The same for a conv2d: the input is padded with the zero point, so the correction is uniform."""
        stride, padding, dilation, groups = node.args[6:10]
        if any(padding):
            ph, pw = int(padding[0]), int(padding[1])
            xq = bb.emit(relax.op.nn.pad(xq, [0, 0, 0, 0, ph, ph, pw, pw], "constant", float(zx)))
        acc = bb.emit(relax.op.nn.conv2d(xq, wq, strides=tuple(stride), padding=(0, 0), dilation=tuple(dilation),
                                         groups=int(groups), out_dtype="int32"))
        wsum = bb.emit(relax.op.sum(bb.emit(relax.op.astype(wq, "int32")), axis=[1, 2, 3]))
        return _minus_zero_point(bb, acc, wsum, zx, [1, -1, 1, 1]), [1, -1, 1, 1]

    def _minus_zero_point(bb, acc, wsum, zx, shape):
        corr = bb.emit(relax.op.reshape(bb.emit(relax.op.multiply(wsum, relax.const(int(zx), "int32"))), shape))
        return bb.emit(relax.op.subtract(acc, corr))

    def _rescale(bb, acc, sx, ws, bias, shape):
        """The zero-point-free int32 accumulator as float, times sx * w_scale per channel, plus bias."""
        y = bb.emit(relax.op.astype(acc, "float32"))
        scale = bb.emit(relax.op.multiply(ws, f32(sx)))
        y = bb.emit(relax.op.multiply(y, bb.emit(relax.op.reshape(scale, shape))))
        if bias is not None:
            y = bb.emit(relax.op.add(y, bb.emit(relax.op.reshape(bias, shape))))
        return y

    def qlinear(node, importer):
        # int8 operands stay int8 (so the artifact stores int8 weights); the zero point comes out of the
        # accumulator: sum((x - zx) w) = sum(x w) - zx sum(w)
        bb = importer.block_builder
        xq, wq, ws = importer.env[node.args[0]], importer.env[node.args[3]], importer.env[node.args[4]]
        sx, zx = node.args[1], node.args[2]
        bias = importer.env[node.args[5]] if node.args[5] is not None else None
        fast = _qlinear_fast(node, bb, xq, sx, zx)
        if fast is not None:
            return fast
        acc, shape = _linear_acc(bb, node, xq, wq, zx)
        return _rescale(bb, acc, sx, ws, bias, shape)

    def qmatmul(node, importer):
        # activation x activation: both zero points come off before the product, accumulated exactly. Centered
        # int8 codes are in [-255, 255], so while K * 255^2 < 2^24 every partial sum is an integer float32 holds
        # exactly and the float matmul (FMA) is exact; longer reductions accumulate in int32
        bb = importer.block_builder
        a, b = importer.env[node.args[0]], importer.env[node.args[3]]
        a_shape, b_shape = node.args[0].meta["val"].shape, node.args[3].meta["val"].shape
        if cpu_kernels:  # graphopt's int8 kernel: quad products (VNNI) or AMX tiles, zero points off in the store
            from graphopt.targets.tvm.cpu.amx import amx_cores
            from graphopt.targets.tvm.cpu.int8 import emit_qbmm, int8_dot, qbmm_applies
            dot = int8_dot(target)
            if not qbmm_applies(a_shape, b_shape, dot):
                return emit_qbmm(bb, a, b, a_shape, b_shape, float(node.args[1]), int(node.args[2]),
                                 float(node.args[4]), int(node.args[5]), dot, amx_cores(target))
        k = int(a_shape[-1])
        dtype = "float32" if k * 255 * 255 < 2 ** 24 else "int32"

        def centered(q, zp):
            q = bb.emit(relax.op.astype(q, dtype))
            return q if int(zp) == 0 else bb.emit(relax.op.subtract(q, relax.const(int(zp), dtype)))

        acc = bb.emit(relax.op.matmul(centered(a, node.args[2]), centered(b, node.args[5]), out_dtype=dtype))
        y = acc if dtype == "float32" else bb.emit(relax.op.astype(acc, "float32"))
        return bb.emit(relax.op.multiply(y, f32(float(node.args[1]) * float(node.args[4]))))

    def _int32_bias(bb, acc, bias, shape):
        return acc if bias is None else bb.emit(relax.op.add(acc, bb.emit(relax.op.reshape(bias, shape))))

    def qlinear_i32(node, importer):
        bb = importer.block_builder
        xq, wq = importer.env[node.args[0]], importer.env[node.args[3]]
        acc, shape = _linear_acc(bb, node, xq, wq, node.args[2])
        return _int32_bias(bb, acc, importer.env[node.args[5]] if node.args[5] is not None else None, shape)

    def qconv2d_i32(node, importer):
        bb = importer.block_builder
        xq, wq = importer.env[node.args[0]], importer.env[node.args[3]]
        acc, shape = _conv_acc(bb, node, xq, wq, node.args[2])
        return _int32_bias(bb, acc, importer.env[node.args[5]] if node.args[5] is not None else None, shape)

    def requantize(node, importer):
        # (acc * m + 2^(n-1)) >> n, n = 31 + shift, in int64: the reference op's integer arithmetic exactly
        bb = importer.block_builder
        acc, m, sh = (importer.env[a] for a in node.args[:3])
        axis, _, zp, qmin, qmax = node.args[3:8]
        rank = len(node.args[0].meta["val"].shape)
        shape = [1] * rank
        shape[axis] = -1
        i64 = lambda v: bb.emit(relax.op.astype(v, "int64"))  # noqa: E731
        n = bb.emit(relax.op.reshape(bb.emit(relax.op.add(i64(sh), relax.const(31, "int64"))), shape))
        prod = bb.emit(relax.op.multiply(i64(acc), bb.emit(relax.op.reshape(i64(m), shape))))
        half = bb.emit(relax.op.left_shift(relax.const(1, "int64"),
                                           bb.emit(relax.op.subtract(n, relax.const(1, "int64")))))
        y = bb.emit(relax.op.right_shift(bb.emit(relax.op.add(prod, half)), n))
        y = bb.emit(relax.op.add(y, relax.const(int(zp), "int64")))
        y = bb.emit(relax.op.clip(y, int(qmin), int(qmax)))
        return bb.emit(relax.op.astype(y, "int8"))

    def _qlinear_fast(node, bb, xq, sx, zx):
        """qlinear with constant weight, scales and bias -> graphopt's int8 GEMMs (`int8.emit_qlinear`: VNNI / AVX2
        quad or pair kernels, AMX tiles where usable; epilogue fused), or its int8 sparse kernels."""
        from graphopt.targets.tvm.cpu.amx import amx_cores
        from graphopt.targets.tvm.cpu.int8 import emit_qlinear, int8_dot
        from graphopt.targets.tvm.cpu.rules import vector_lanes
        wt = (lifted or {}).get(getattr(node.args[3], "name", None))
        wst = (lifted or {}).get(getattr(node.args[4], "name", None))
        bt = (lifted or {}).get(getattr(node.args[5], "name", None)) if node.args[5] is not None else None
        if not cpu_kernels or wt is None or wst is None or (node.args[5] is not None and bt is None) or wt.dim() != 2:
            return None
        dot = int8_dot(target)
        if dot is None:
            return None
        b = None if bt is None else bt.detach().numpy().astype("float32")
        x_shape = node.args[0].meta["val"].shape
        layout = _int8_sparse(node, "qlinear", wt.numpy(), math.prod(x_shape[:-1]))
        if layout == "bsr16x64":
            from graphopt.targets.tvm.cpu.sparse import emit_amx_bsr_qlinear
            return emit_amx_bsr_qlinear(bb, xq, wt.numpy(), wst.numpy(), b, sx, zx, x_shape, amx_cores(target))
        if layout == "bsr8x4":
            from graphopt.targets.tvm.cpu.sparse import emit_bsr_qlinear
            return emit_bsr_qlinear(bb, xq, wt.numpy(), wst.numpy(), b, sx, zx, x_shape, dot, vector_lanes(target))
        if layout == "csr":
            from graphopt.targets.tvm.cpu.sparse import emit_csr_qlinear
            return emit_csr_qlinear(bb, xq, wt.numpy(), wst.numpy(), b, sx, zx, x_shape, dot)
        return emit_qlinear(bb, xq, wt.numpy(), wst.numpy(), b, sx, zx, x_shape, dot, vector_lanes(target),
                            amx_cores(target))

    def _int8_sparse(node, op: str, w, m: int) -> str:
        """The int8 sparse layout select-sparse-layout chose for this int8 layer ("" for dense) when this target
        can run it exactly: bsr8x4 with VNNI or weights under the `vpmaddubsw` bound; csr (`vpmaddwd`, exact for any
        int8 weight) over at least 16 tokens (pixels) m; bsr16x64 (linears) on AMX tiles over at least 16 tokens."""
        import numpy as np

        from graphopt.targets.tvm.cpu.int8 import int8_dot, ubsw_exact
        from graphopt.targets.tvm.cpu.sparse import qcsr_applies
        rec = (layouts or {}).get(node.args[3].name) or {}
        choice = rec.get("choice")
        if rec.get("op") != op or choice not in ("bsr8x4", "csr", "bsr16x64") or \
                (choice == "bsr16x64" and op != "qlinear"):
            return ""
        if choice == "csr":
            why = qcsr_applies(int(m))
        elif choice == "bsr16x64":
            from graphopt.targets.tvm.cpu.amx import amx_bsr_applies, amx_usable
            why = ("this target has no AMX tiles (or GRAPHOPT_AMX=0)" if not amx_usable(target) else
                   amx_bsr_applies(int(m), w.shape[1], w.shape[0]))
        elif int8_dot(target) == "vnni" or ubsw_exact(np.pad(w, ((0, 0), (0, -w.shape[1] % 4)))):
            why = ""
        else:
            why = "this target (no VNNI) cannot multiply these full-range weights exactly with it"
        if why:
            logging.getLogger(__name__).warning(  # (`log` in here is the aten.log converter below)
                "%s: select-sparse-layout chose the int8 %s kernel, but %s; the layer stays dense", node.name,
                choice, why)
            return ""
        return choice

    def qconv2d(node, importer):
        bb = importer.block_builder
        xq, wq, ws = importer.env[node.args[0]], importer.env[node.args[3]], importer.env[node.args[4]]
        sx, zx = node.args[1], node.args[2]
        bias = importer.env[node.args[5]] if node.args[5] is not None else None
        fast = _qconv_fast(node, bb, xq, sx, zx, importer)
        if fast is not None:
            return fast
        acc, shape = _conv_acc(bb, node, xq, wq, zx)
        return _rescale(bb, acc, sx, ws, bias, shape)

    def _quant_chain(node):
        """(clamp, clamp node, quantize node, zero pad node) for a conv whose output goes, through at most one lone
        ReLU/ReLU6/clamp and a zero pad of H and W (TF "SAME", only when every consumer is a depthwise conv that can
        take the pad instead), only into an int8 quantize_per_tensor; missing parts are None."""
        users, clamp, act, pad = list(node.users), None, None, None
        if len(users) == 1 and _clamp_of(users[0]) is not None:
            act, clamp = users[0], _clamp_of(users[0])
            clamp = (clamp[0], min(clamp[1], 3.0e38))
            users = list(act.users)
        if (len(users) == 1 and getattr(users[0].target, "__name__", "") == "constant_pad_nd.default"
                and len(users[0].args[1]) == 4 and float(users[0].args[2] if len(users[0].args) > 2 else 0) == 0.0
                and len(users[0].users) == 1):
            pad, users = users[0], list(users[0].users)
        quant = None
        if (len(users) == 1 and getattr(users[0].target, "__name__", "") == "quantize_per_tensor.default"
                and str(users[0].args[5]) == "torch.int8"):
            quant = users[0]
        if pad is not None and (quant is None or not all(_fast_depthwise(u) for u in quant.users)):
            return clamp, act, None, None
        return clamp, act, quant, pad

    dequantized: set = set()  # quantize nodes whose value was stored as the float of the int8 grid
    quant_pads: dict = {}  # such a quantize node -> the zero pad (left, right, top, bottom, unpadded shape) left out

    def _qconv_kind(node):
        """(kind of graphopt kernel, weight, weight scales, bias) for a qconv2d whose weight, scales and bias are
        constants (any batch: the kernels loop over the samples); kind None when no graphopt kernel takes it."""
        wt = (lifted or {}).get(getattr(node.args[3], "name", None))
        wst = (lifted or {}).get(getattr(node.args[4], "name", None))
        bt = (lifted or {}).get(getattr(node.args[5], "name", None)) if node.args[5] is not None else None
        x_shape = node.args[0].meta["val"].shape
        if wt is None or wst is None or (node.args[5] is not None and bt is None) or len(x_shape) != 4:
            return None, wt, wst, bt
        stride, padding, dilation, groups = node.args[6:10]
        return _conv_kernel(x_shape, wt.shape, (stride, padding, dilation, False, None, groups)), wt, wst, bt

    def _fast_depthwise(node) -> bool:
        """Whether `node` is a qconv2d the depthwise kernels take (the float ones read the floats of the int8 grid,
        or int8 where `_int8_depthwise_input`; the int8 kernel, with AVX512-VNNI and VBMI, reads int8)."""
        return getattr(node.target, "__name__", "") == "qconv2d.default" and _qconv_kind(node)[0] == "depthwise"

    def _int8_depthwise_input(node) -> bool:
        """Whether `node` is a depthwise qconv2d whose kernel reads its int8 input itself (`depthwise_int8_input`)."""
        from graphopt.targets.tvm.cpu.conv import depthwise_int8_input
        from graphopt.targets.tvm.cpu.qdepthwise import int8_depthwise_dot
        from graphopt.targets.tvm.cpu.rules import vector_lanes
        if not _fast_depthwise(node):
            return False
        (c, oh, ow), (kh, kw) = node.meta["val"].shape[1:], node.args[3].meta["val"].shape[2:]
        return depthwise_int8_input(*(int(d) for d in (c, oh, ow, kh, kw, node.args[6][0])), lanes=vector_lanes(target),
                                    qdot=int8_depthwise_dot(target))

    def _fast_float_conv(node) -> bool:
        """Whether `node` is a qconv2d the depthwise or direct kernel takes (both pad inside, in float)."""
        return (getattr(node.target, "__name__", "") == "qconv2d.default"
                and _qconv_kind(node)[0] in ("depthwise", "direct"))

    def _qconv_fast(node, bb, xq, sx, zx, importer):
        """qconv2d with constant weights on graphopt's kernels: pointwise -> the int8 quad (VNNI) or pair kernels,
        depthwise -> the int8 kernel (VNNI + VBMI) or the float ones, the stem -> int8 im2col or the flat conv.
        Each fuses the bias, a following ReLU/ReLU6 and, when that is all that consumes it, the next quantize: the
        activation between two such convs is int8 (or, into a float depthwise kernel, the floats of the int8 grid)
        and no other pass touches it; a pointwise conv whose float output meets only a residual add takes the add
        (and a ReLU after it) into its store. `importer`: the converter's, for the add's other operand."""
        import numpy as np

        from graphopt.targets.tvm.cpu import conv as k
        from graphopt.targets.tvm.cpu.amx import amx_cores, amx_flat_qconv_applies
        from graphopt.targets.tvm.cpu.int8 import (emit_flat_qconv, emit_im2col_qconv, emit_qconv1x1,
                                                   flat_qconv_applies, im2col_beats_flat, int8_dot, qconv1x1_applies,
                                                   quad_weights, tok_qconv_applies)
        from graphopt.targets.tvm.cpu import qwinograd as qw
        from graphopt.targets.tvm.cpu import winograd as wg
        from graphopt.targets.tvm.cpu.qdepthwise import int8_depthwise_dot
        from graphopt.targets.tvm.cpu.rules import half_width_vnni, target_cores, vector_lanes, vector_registers
        kind, wt, wst, bt = _qconv_kind(node)
        groups = int(node.args[9])
        if (kind is None and cpu_kernels and wt is not None and wst is not None and groups > 1
                and (node.args[5] is None or bt is not None) and len(node.args[0].meta["val"].shape) == 4):
            g_shape = (int(node.args[0].meta["val"].shape[0]), int(wt.shape[1]), *node.args[0].meta["val"].shape[2:])
            g_kind = _conv_kernel(g_shape, (int(wt.shape[0]) // groups, *wt.shape[1:]),
                                  (*node.args[6:9], False, None, 1))
            kind = g_kind if g_kind in ("pointwise", "im2col", "direct") else None  # a grouped conv, per group
        dilation = [int(v) for v in node.args[8]]
        if (kind is None and cpu_kernels and wt is not None and wst is not None
                and (node.args[5] is None or bt is not None) and len(node.args[0].meta["val"].shape) == 4
                and min(dilation) > 1 and len(set(dilation)) == 1 and len(set(int(v) for v in node.args[6])) == 1
                and int8_dot(target) is not None and (groups == 1 or int(wt.shape[0]) != groups)
                and qconv1x1_applies(node.meta["val"].shape)):
            # int8 im2col with the taps d apart (TVM's int8 dilated conv: 0.7 ms, 64 at 28x28); grouped, per group
            # (SKNet's dilated branch, 128 channels in 4 groups at 28x28: TVM's 1.5 ms)
            kind = "dilated"
        if kind is None or not cpu_kernels:
            return None
        x_shape = node.args[0].meta["val"].shape
        stride, padding = node.args[6:8]
        clamp, act, quant, pad = _quant_chain(node)
        out_q = None if quant is None else tuple(quant.args[1:5])
        b = None if bt is None else bt.detach().numpy().astype(np.float32)
        ph, pw = int(padding[0]), int(padding[1])
        w_real = (wt.double() * wst.double().reshape(-1, 1, 1, 1)).float().numpy()
        # a depthwise consumer computes in float: hand it the int8 grid's float values rather than int8 (converting
        # int8 at every tap inside the depthwise kernel costs more than the wider store: on Zen 4 a per-tap convert
        # made the 112x112 and 56x56 depthwise kernels 0.66-0.81x, while the float store costs 96x16x12544 147 vs
        # 101 us), unless its kernel converts each input row once (the row and phase kernels: the large maps) or
        # computes in int8 itself (`qdepthwise`: every map it takes)
        dq = (quant is not None and all(_fast_depthwise(u) for u in quant.users)
              and not all(_int8_depthwise_input(u) for u in quant.users))
        dot, full, lanes, half = int8_dot(target), (ph, ph, pw, pw), vector_lanes(target), half_width_vnni(target)
        amx = amx_cores(target)
        if node.args[0] in quant_pads:  # the producer left the zero pad out: it joins this conv's padding
            left, right, top, bottom, x_shape = quant_pads[node.args[0]]
            full = (ph + top, ph + bottom, pw + left, pw + right)
        residual = None
        if (quant is None and act is None and kind == "pointwise" and groups == 1 and dot is not None
                and qconv1x1_applies(x_shape) and not (layouts or {}).get(node.args[3].name)
                and _residual_add(node, importer) is not None):
            # a projection whose float output only meets a residual add (MobileNetV2's blocks): the add, and a
            # clamp after it, in the int8 kernel's store
            other, clamp = _fused_epilogue(node, importer, True)
            residual = importer.env[other]
        float_store = []  # set when `dense` ran the conv in float: its quantize (and pad) then run after it

        def winograd_plan(w_shape, x_shape_):
            """`qwinograd.qwinograd_plan` where the int8 Winograd conv may run (AVX2, a dense undilated conv)."""
            if kind in ("im2col", "direct") and dot == "ubsw" and not amx and max(dilation) == 1:
                return qw.qwinograd_plan(w_shape, int(stride[0]), x_shape_, full)
            return None

        def dense(xq_, w_, ws_, b_, x_shape_, w_real_, sparse: bool):
            """The dense conv on its kernel (None: no graphopt kernel takes it)."""
            s_ = int(stride[0])
            plan = winograd_plan(w_.shape, x_shape_)
            if plan is not None:
                # AVX2: the 3x3 stride-1 convs as int16 Winograd (`cpu.qwinograd`: exact, any int8 weight), 2.25x
                # fewer products at `vpmaddwd`'s 16 a instruction where the direct int8 convs make 32 from two
                return qw.emit_qwinograd(bb, xq_, w_, ws_, b_, sx, zx, x_shape_, full, clamp, out_q, dq,
                                         target_cores(target), plan == "whole")
            if (groups == 1 and kind in ("im2col", "direct") and dot != "vnni" and not amx
                    and not flat_qconv_applies(w_, dot or "ubsw")
                    and wg.winograd_applies(w_.shape, s_, x_shape_, full, vector_registers(target))
                    and wg.winograd_wins(int(w_.shape[0]), int(w_.shape[1]))):
                # no exact int8 kernel takes this 3x3 conv (full-range int8 weights on AVX2, whose u8 x s8 pairs
                # could saturate): the float conv on the dequantized codes, as Winograd, rather than the float
                # direct kernel or int8 im2col's exact int16 pairs (interleaved on a Zen 3, two-conv blocks:
                # 0.44-0.67x their time; 256 -> 128 at 56x56 27.0 -> 11.7 ms, 128 -> 128 at 28x28 4.5 -> 2.9)
                float_store.append(True)
                return _emit_conv(bb, _dequantized(bb, xq_, sx, zx), w_real_, b_, x_shape_, kind, s_, full, clamp,
                                  None)
            if kind in ("im2col", "dilated") and not qconv1x1_applies(node.meta["val"].shape):
                # im2col's columns go to the pointwise kernel, which needs 8 output pixels or more: a 3x3 stride-2
                # conv to 2x2 (HF ResNet's last stage at 64x64) wrote before its output buffer (heap corruption)
                return None
            if kind == "pointwise" and qconv1x1_applies(x_shape_) and dot is not None:
                return emit_qconv1x1(bb, xq_, w_, ws_, b_, sx, zx, x_shape_, clamp, out_q, dq, dot,
                                     _int8_sparse(node, "qconv1x1", w_.reshape(w_.shape[0], -1),
                                                  int(x_shape_[2]) * int(x_shape_[3])) if sparse else "", lanes,
                                     target_cores(target), half, residual)
            if (kind in ("im2col", "direct") and im2col_beats_flat(int(x_shape_[1]), s_, dot)
                    and qconv1x1_applies(node.meta["val"].shape)
                    and quad_weights(w_.transpose(0, 2, 3, 1).reshape(w_.shape[0], -1), dot)):
                # (on AVX2 where the quad product is exact on im2col's pairs: else the pair kernel, not measured)
                return emit_im2col_qconv(bb, xq_, w_, ws_, b_, sx, zx, x_shape_, s_, full, clamp, out_q, dq,
                                         dot, lanes=lanes, half_width=half)  # RGB stems: the taps in whole quads
            if (amx and kind in ("im2col", "direct") and flat_qconv_applies(w_, dot)
                    and k.flat_conv_applies(x_shape_, w_.shape, s_, full)
                    and amx_flat_qconv_applies(int(x_shape_[1]), int(x_shape_[0]), k.flat_positions(
                        int(x_shape_[2]), int(x_shape_[3]), int(w_.shape[2]), int(w_.shape[3]), s_, full))):
                # AMX tiles over the quad planes in place (`cpu.amx`)
                return emit_flat_qconv(bb, xq_, w_, ws_, b_, sx, zx, x_shape_, s_, full, clamp, out_q, dq, dot,
                                       amx_cores=amx)
            if (kind in ("im2col", "direct") and flat_qconv_applies(w_, dot)
                    and tok_qconv_applies(w_.shape, s_, node.meta["val"].shape, dot, out_q is None or dq)):
                return emit_flat_qconv(bb, xq_, w_, ws_, b_, sx, zx, x_shape_, s_, full, clamp, out_q, dq, dot,
                                       tok=True)
            if (kind in ("im2col", "direct") and dot is not None  # stems too: 7x7 ResNet stem 3.6 -> 1.4 ms
                    and flat_qconv_applies(w_, dot) and k.flat_conv_applies(x_shape_, w_.shape, s_, full)):
                return emit_flat_qconv(bb, xq_, w_, ws_, b_, sx, zx, x_shape_, s_, full, clamp, out_q, dq, dot)
            if kind == "im2col" and dot is not None:
                return emit_im2col_qconv(bb, xq_, w_, ws_, b_, sx, zx, x_shape_, s_, full, clamp, out_q, dq, dot,
                                         lanes=lanes, half_width=half)
            if (kind == "dilated" and dot in ("vnni", "ubsw") and flat_qconv_applies(w_, dot)
                    and int(x_shape_[1]) > 8 and s_ in (1, 2)):
                # the taps d apart in the quad planes: no 9x im2col columns through memory (alone, 2 threads, Zen 4:
                # 0.48-0.55x im2col's time on DeepLab's 64 -> 16 at 128x128, 0.77-0.99x on 16-512 channels at 17-56;
                # AVX2's vpmaddubsw, exact for int8s / int7 weights, interleaved on a Zen 3, conv + ReLU: 64 -> 16 at
                # 128x128 d4 1.61 vs 3.92 ms (fp32 2.26), 256 -> 256 at 28x28 d2 3.14 vs 3.28, 128 -> 128 at 33x33
                # d6 1.01 vs 1.17, 64 -> 64 at 56x56 d2 0.78 vs 1.03)
                return emit_flat_qconv(bb, xq_, w_, ws_, b_, sx, zx, x_shape_, s_, full, clamp, out_q, dq, dot,
                                       tok=True, dilation=dilation[0])
            if kind == "dilated":
                return emit_im2col_qconv(bb, xq_, w_, ws_, b_, sx, zx, x_shape_, s_, full, clamp, out_q, dq, dot,
                                         dilation[0], lanes, half)
            if kind == "direct":
                return k.emit_direct_conv(bb, _dequantized(bb, xq_, sx, zx), w_real_, b_, x_shape_, s_, full,
                                          clamp, out_q, dq)
            return None

        if groups > 1 and kind != "depthwise":
            # a grouped conv that is not depthwise: one dense conv per group on its channels, concatenated (TVM's
            # generic int8 grouped conv took 0.48 ms for 64 channels in 4 groups at 28x28)
            cig, cog = int(x_shape[1]) // groups, int(wt.shape[0]) // groups
            g_shape = (int(x_shape[0]), cig, *(int(d) for d in x_shape[2:]))
            if kind != "direct" and (dot is None or kind == "pointwise" and not qconv1x1_applies(g_shape)):
                return None  # (checked before emitting: `dense` takes every group or none)
            plan = winograd_plan((cog, cig, *wt.shape[2:]), g_shape) if int(x_shape[0]) == 1 else None
            y = None if plan is None else qw.emit_qwinograd(
                bb, xq, wt.numpy(), wst.numpy(), b, sx, zx, x_shape, full, clamp, out_q, dq, target_cores(target),
                plan == "whole", groups)  # (the groups as the samples of one call: no split, no concat)
            if y is None:
                parts = bb.emit(relax.op.split(xq, groups, axis=1))
                ys = [dense(bb.emit(relax.TupleGetItem(parts, g)), wt.numpy()[g * cog:(g + 1) * cog],
                            wst.numpy()[g * cog:(g + 1) * cog], None if b is None else b[g * cog:(g + 1) * cog],
                            g_shape, w_real[g * cog:(g + 1) * cog], False) for g in range(groups)]
                y = _join_groups(bb, ys)
        elif kind != "depthwise":
            y = dense(xq, wt.numpy(), wst.numpy(), b, x_shape, w_real, True)
            if y is None:
                return None
        elif kind == "depthwise":
            int8_in = node.args[0] not in dequantized
            y = k.emit_depthwise(bb, xq, wt.numpy(), b, x_shape, int(stride[0]), full, clamp, out_q,
                                 w_scale=wst.double().numpy(), lanes=vector_lanes(target),
                                 x_q=(float(sx), int(zx)) if int8_in else None, qdot=int8_depthwise_dot(target),
                                 cores=target_cores(target))
            dq = False
        else:
            return None
        if act is not None:
            fused_acts.add(act)
        if float_store:  # (a float output: the quantize and a pad after it are their own ops)
            return y
        if pad is not None:
            fused_acts.add(pad)
            quant_pads[quant] = (*(int(v) for v in pad.args[1]), node.meta["val"].shape)
        if quant is not None:
            fused_quants[quant] = y
            if dq:
                dequantized.add(quant)
        return y

    def _weight_arrays(node):
        """A sparse op's data, indices and indptr as numpy where all three are constants of the graph, else None."""
        tensors = [(lifted or {}).get(getattr(a, "name", None)) for a in node.args[1:4]]
        return None if any(t is None for t in tensors) else [t.detach().numpy() for t in tensors]

    def bsr_linear(node, importer):
        from graphopt.targets.tvm.cpu.rules import has_gather, target_cores, vector_lanes
        from graphopt.targets.tvm.cpu.sparse import emit_bsr_linear
        x, data, indices, indptr = (importer.env[a] for a in node.args[:4])
        bias = importer.env[node.args[4]] if node.args[4] is not None else None
        dshape = node.args[1].meta["val"].shape
        return emit_bsr_linear(importer.block_builder, x, data, indices, indptr, bias, node.args[0].meta["val"].shape,
                               int(node.args[5]), (int(dshape[1]), int(dshape[2])), int(dshape[0]),
                               _weight_arrays(node), vector_lanes(target), target_cores(target), has_gather(target))

    def bsr_conv1x1(node, importer):
        """The sparse pointwise conv, with bias, a residual add and a clamp after it fused into the store, as the
        dense pointwise kernel does."""
        from graphopt.targets.tvm.cpu.rules import target_cores, vector_lanes
        from graphopt.targets.tvm.cpu.sparse import emit_bsr_conv1x1
        x_shape = node.args[0].meta["val"].shape
        if len(x_shape) != 4:
            raise UnsupportedOpError(node.name, "graphopt.bsr_conv1x1", f"the sparse pointwise kernel takes NCHW "
                                     f"input, not {list(x_shape)}")
        x, data, indices, indptr = (importer.env[a] for a in node.args[:4])
        bias = importer.env[node.args[4]] if node.args[4] is not None else None
        residual, clamp = _fused_epilogue(node, importer, True)
        dshape = node.args[1].meta["val"].shape
        return emit_bsr_conv1x1(importer.block_builder, x, data, indices, indptr, bias, x_shape, int(node.args[5]),
                                (int(dshape[1]), int(dshape[2])), int(dshape[0]), clamp,
                                None if residual is None else importer.env[residual], vector_lanes(target),
                                target_cores(target), _weight_arrays(node))

    def linear(node, importer):
        # constant float weights go to the packed GEMM micro-kernel (weights laid out at compile time)
        import torch

        bb = importer.block_builder
        x, w = importer.env[node.args[0]], importer.env[node.args[1]]
        bias = importer.env[node.args[2]] if len(node.args) > 2 and node.args[2] is not None else None
        const = (lifted or {}).get(getattr(node.args[1], "name", None))
        b_const = (lifted or {}).get(getattr(node.args[2], "name", None)) if bias is not None else None
        deq = _dequantized_weight(node.args[1]) if const is None else None
        if deq is not None:  # an int8 weight fold-constants kept: the int8 kernel, else dequantized here
            wq, ws, wz = deq
            if (bias is None or b_const is not None) and not wz.any():
                y = _dynamic_qlinear(node, importer, wq, ws, b_const)
                if y is not None:
                    return y
            const = torch.from_numpy(((wq.astype("int32") - wz[:, None]).astype("float32") * ws[:, None]))
        if const is not None and const.dtype == torch.float32:
            codes = (deq[0], deq[1]) if deq is not None and not deq[2].any() else None
            y = _constant_linear(node, importer, const.detach().numpy(), bias, b_const, codes=codes)
            if y is not None:
                return y
            if deq is not None:  # (not the weight dequantized on every call)
                w = relax.const(const.numpy())
        return bb.emit(relax.op.linear(x, w, bias, "float32"))

    def _constant_linear(node, importer, w, bias, b_const, x_node=None, codes=None):
        """x @ w.T (+ bias) for a constant float32 w [N, K] on the packed GEMM (GEMV for one row), or None where
        those do not apply; x is x_node (node.args[0] by default); `codes`: the int8 codes and scales w
        dequantizes, which an artifact keeps (`gemm.packed_weight`)."""
        from graphopt.targets.tvm.cpu.gemm import emit_packed_gemv, emit_packed_linear
        from graphopt.targets.tvm.cpu.rules import vector_lanes
        x_node = node.args[0] if x_node is None else x_node
        bb, x = importer.block_builder, importer.env[x_node]
        x_shape = x_node.meta["val"].shape
        if math.prod(int(d) for d in x_shape[:-1]) == 1:  # one row: a weight stream (classifier heads)
            if bias is None or b_const is not None:
                y = emit_packed_gemv(bb, x, w, None if b_const is None else b_const.detach().numpy(),
                                     int(x_shape[-1]), vector_lanes(target), codes)
                if y is not None:
                    return bb.emit(relax.op.reshape(y, tuple(int(d) for d in node.meta["val"].shape)))
        return emit_packed_linear(bb, x, w, bias, x_shape, vector_lanes(target), codes)

    def mm(node, importer):
        """x @ W with W a constant float32 matrix, or its transpose (`x @ self.weight.t()`, GCN's support = x @ W,
        hand-written projections), on the packed GEMM as a linear layer; Relax's matmul under the rule ran at ~43
        GMAC/s (64 x 512 x 1024: 0.75 ms)."""
        import numpy as np
        import torch
        w_node, transposed = node.args[1], False
        if (getattr(w_node, "op", None) == "call_function" and getattr(w_node.target, "__name__", "") ==
                "permute.default" and [int(p) for p in w_node.args[1]] == [1, 0]):
            w_node, transposed = w_node.args[0], True
        const = (lifted or {}).get(getattr(w_node, "name", None))
        if (const is not None and const.dtype == torch.float32 and const.dim() == 2
                and str(node.args[0].meta["val"].dtype) == "torch.float32"):
            w = const.detach().numpy()
            y = _constant_linear(node, importer, w if transposed else np.ascontiguousarray(w.T), None, None)
            if y is not None:
                return y
        return MORE_OPS["mm.default"](node, importer)

    def addmm(node, importer):
        """bias + x @ W with W a constant float32 matrix [K, N] and a bias of N values (GPT-2's Conv1D, a linear
        written as torch.addmm) on the packed GEMM as a linear layer; Relax's matmul + add ran 2-3x its time."""
        import numpy as np
        import torch
        bias_node, x_node, w_node = node.args[:3]
        const = (lifted or {}).get(getattr(w_node, "name", None))
        bias_shape = tuple(getattr(bias_node, "meta", {}).get("val", torch.empty(0, 0)).shape)
        if (const is not None and const.dtype == torch.float32 and const.dim() == 2
                and float(node.kwargs.get("beta", 1)) == 1.0 and float(node.kwargs.get("alpha", 1)) == 1.0
                and bias_shape == (int(const.shape[1]),) and str(x_node.meta["val"].dtype) == "torch.float32"):
            b_const = (lifted or {}).get(getattr(bias_node, "name", None))
            y = _constant_linear(node, importer, np.ascontiguousarray(const.detach().numpy().T),
                                 importer.env[bias_node], b_const, x_node)
            if y is not None:
                return y
        return _builtin(importer, "addmm.default")(node)

    def gelu(node, importer):
        # erf GELU with TVM's vectorizable polynomial erf (libm erff is scalar: 1.4 ms for MiniLM's 128x1536)
        from tvm import topi
        bb = importer.block_builder
        x = importer.env[node.args[0]]
        approximate = node.kwargs.get("approximate", node.args[1] if len(node.args) > 1 else "none")
        if str(node.args[0].meta["val"].dtype) != "torch.float32":
            return bb.emit(relax.op.nn.gelu_tanh(x) if approximate == "tanh" else relax.op.nn.gelu(x))
        if approximate == "tanh":  # GPT-2's; Relax's gelu_tanh legalizes to libm's scalar tanh (2.4x PyTorch)
            cube = bb.emit(relax.op.multiply(bb.emit(relax.op.multiply(x, x)), x))
            inner = bb.emit(relax.op.multiply(bb.emit(relax.op.add(x, bb.emit(relax.op.multiply(cube, f32(0.044715))))),
                                              f32(0.7978845608028654)))
            return bb.emit(relax.op.multiply(bb.emit(relax.op.multiply(x, f32(0.5))),
                                             bb.emit(relax.op.add(bb.emit(relax.op.tanh(inner)), f32(1.0)))))
        e = bb.emit_te(topi.fast_erf, bb.emit(relax.op.multiply(x, f32(0.7071067811865476))))
        return bb.emit(relax.op.multiply(bb.emit(relax.op.multiply(x, f32(0.5))),
                                         bb.emit(relax.op.add(e, f32(1.0)))))

    def sigmoid(node, importer):
        """1 / (1 + exp(-x)): the pipeline's FastMathTransform makes the exp a vectorized polynomial (error ~1e-7);
        Relax's sigmoid legalized to a scalar loop at 3.6x PyTorch's time (SiLU, 96x56x56: 5.4x)."""
        bb, x = importer.block_builder, importer.env[node.args[0]]
        if str(node.args[0].meta["val"].dtype) != "torch.float32":
            return bb.emit(relax.op.sigmoid(x))
        e = bb.emit(relax.op.exp(bb.emit(relax.op.negative(x))))
        return bb.emit(relax.op.divide(f32(1.0), bb.emit(relax.op.add(e, f32(1.0)))))

    def rsqrt(node, importer):
        """1 / sqrt(x), two vector instructions; Relax's rsqrt ran a scalar loop (RMS norms)."""
        bb, x = importer.block_builder, importer.env[node.args[0]]
        if str(node.args[0].meta["val"].dtype) != "torch.float32":
            return bb.emit(relax.op.rsqrt(x))
        return bb.emit(relax.op.divide(f32(1.0), bb.emit(relax.op.sqrt(x))))

    def log(node, importer, plus_one: bool = False):
        """log / log1p of float32 on graphopt's polynomial (`vmath`); Relax's legalize to scalar libm calls."""
        from graphopt.targets.tvm.cpu.vmath import emit_log
        bb, x = importer.block_builder, importer.env[node.args[0]]
        if str(node.args[0].meta["val"].dtype) != "torch.float32":
            return _builtin(importer, "log1p.default" if plus_one else "log.default")(node)
        return emit_log(bb, x, plus_one)

    def sin(node, importer, cos: bool = False):
        """sin / cos of float32 on graphopt's polynomial (`vmath`); Relax's legalize to scalar libm calls."""
        from graphopt.targets.tvm.cpu.vmath import emit_sin
        if str(node.args[0].meta["val"].dtype) != "torch.float32":
            return _builtin(importer, "cos.default" if cos else "sin.default")(node)
        return emit_sin(importer.block_builder, importer.env[node.args[0]], cos)

    def layer_norm(node, importer):
        # float32 layer norm over the last axis: one vectorized pass per row (norm.py); else Relax's layer norm.
        # A missing weight / bias is ones / zeros (TVM's own converter fails on them; they used to be decomposed)
        import numpy as np
        import torch

        from graphopt.targets.tvm.cpu.norm import emit_layer_norm, rows_apply
        x_val, shape = node.args[0].meta["val"], [int(d) for d in node.args[1]]
        eps = float(node.args[4]) if len(node.args) > 4 else float(node.kwargs.get("eps", 1e-5))
        args, bb = list(node.args) + [None] * (4 - len(node.args)), importer.block_builder
        dtype = str(x_val.dtype).replace("torch.", "")
        w, b = ((importer.env[a] if a is not None else  # (built in float32 and cast: numpy has no bfloat16)
                 bb.emit(relax.op.astype(relax.const(np.full(shape, fill, np.float32)), dtype)))
                for a, fill in ((args[2], 1.0), (args[3], 0.0)))
        x = importer.env[node.args[0]]
        if len(shape) == 1 and shape[0] == int(x_val.shape[-1]) and rows_apply(shape[0], dtype):
            src = node.args[0]
            # (not an add a conv kernel already computed: its conv's value there is the sum, `fused_adds`)
            if (getattr(src.target, "__name__", "") == "add.Tensor" and len(src.users) == 1 and not src.kwargs
                    and src not in fused_adds and len(src.args) == 2 and all(isinstance(a, torch.fx.Node) and tuple(a.meta["val"].shape)
                                                   == tuple(x_val.shape) and a.meta["val"].dtype == x_val.dtype
                                                   for a in src.args)):
                # the residual add before the norm, inside its kernel (the add Relax emitted is then unused)
                return emit_layer_norm(bb, importer.env[src.args[0]], w, b, x_val.shape, eps,
                                       residual=importer.env[src.args[1]])
            return emit_layer_norm(bb, x, w, b, x_val.shape, eps)
        size = math.prod(shape)
        if (len(shape) > 1 and _static(x_val) and tuple(int(d) for d in x_val.shape[-len(shape):]) == tuple(shape)
                and rows_apply(size, dtype)):
            # over several trailing axes (LayerNorm([C, H, W]), GroupNorm(1)-like): the same row kernel over the
            # flattened rows; Relax's layer norm over 64x28x28 took 3.3 ms, 103x PyTorch's time
            rows = x_val.numel() // size
            flat = [bb.emit(relax.op.reshape(v, (size,))) for v in (w, b)]
            y = emit_layer_norm(bb, bb.emit(relax.op.reshape(x, (rows, size))), *flat, (rows, size), eps)
            return bb.emit(relax.op.reshape(y, tuple(int(d) for d in x_val.shape)))
        return bb.emit(relax.op.nn.layer_norm(x, w, b, axes=list(range(-len(shape), 0)), epsilon=eps))

    def upsample_bilinear2d(node, importer):
        """float32 NCHW bilinear resizing on graphopt's row kernel (resize.py); else TVM's resize2d."""
        from graphopt.targets.tvm.cpu.resize import bilinear_applies, emit_bilinear
        x_val, out = node.args[0].meta["val"], node.meta["val"]
        args = list(node.args) + [None] * (4 - len(node.args))
        if str(x_val.dtype) != "torch.float32" or not bilinear_applies(x_val.shape, out.shape[2:]):
            return _builtin(importer, "upsample_bilinear2d.vec")(node)
        return emit_bilinear(importer.block_builder, importer.env[node.args[0]], x_val.shape, out.shape[2:],
                             bool(args[2]), args[3])

    def upsample_bicubic2d(node, importer):
        """float32 NCHW bicubic resizing on graphopt's row kernel (resize.py); else aten's decomposition through
        TVM's converters."""
        from graphopt.targets.tvm.cpu.resize import bilinear_applies, emit_bicubic
        x_val, out = node.args[0].meta["val"], node.meta["val"]
        args = list(node.args) + [None] * (4 - len(node.args))
        if (str(x_val.dtype) != "torch.float32" or not _static(x_val)
                or not bilinear_applies(x_val.shape, out.shape[2:])):
            return _builtin(importer, "upsample_bicubic2d.vec")(node)
        return emit_bicubic(importer.block_builder, importer.env[node.args[0]], x_val.shape, out.shape[2:],
                            bool(args[2]), args[3])

    def upsample_linear1d(node, importer):
        """F.interpolate(mode="linear") on [N, C, L] (input, output_size, align_corners, scale_factors): the bilinear
        kernel on a one-row map. aten's decomposition into index gathers failed TVM's build ("Cannot convert
        infinity to BigInt"). Outputs under one 16-column gather (the kernel's least) go to Relax's resize2d on a
        two-row map, which maps positions as PyTorch does unless a scale factor other than the sizes' ratio was
        given (refused with the node's name, as are other dtypes)."""
        from graphopt.targets.tvm.cpu.resize import bilinear_applies, emit_bilinear
        x_val, out = node.args[0].meta["val"], node.meta["val"]
        args = list(node.args) + [None] * (4 - len(node.args))
        n, c, length = (int(d) for d in x_val.shape)
        bb = importer.block_builder
        scales = None if not args[3] else [1.0, float(args[3][0])]
        width = int(out.shape[2])
        if str(x_val.dtype) == "torch.float32" and not bilinear_applies((n, c, 1, length), (1, width)) and (
                bool(args[2]) or scales is None or math.isclose(scales[1], width / length)):
            if width == 1 and args[2]:  # (align_corners with one output takes the first input, as PyTorch)
                return bb.emit(relax.op.strided_slice(importer.env[node.args[0]], [2], [0], [1]))
            # on two equal rows: resize2d's align_corners divides by the rows less one
            rows = bb.emit(relax.op.broadcast_to(bb.emit(relax.op.reshape(importer.env[node.args[0]],
                                                                          (n, c, 1, length))), (n, c, 2, length)))
            y = bb.emit(relax.op.image.resize2d(rows, (2, width), method="linear", coordinate_transformation_mode=(
                "align_corners" if args[2] else "half_pixel")))
            return bb.emit(relax.op.reshape(bb.emit(relax.op.strided_slice(y, [2], [0], [1])), (n, c, width)))
        if str(x_val.dtype) != "torch.float32" or not bilinear_applies((n, c, 1, length), (1, width)):
            raise UnsupportedOpError(node.name, "aten.upsample_linear1d", "graphopt resizes float32 rows linearly "
                                     "(under 16 outputs only by their sizes' ratio, not another scale factor); "
                                     "resize outside the model, give the size, or use mode='nearest'")
        y = emit_bilinear(bb, bb.emit(relax.op.reshape(importer.env[node.args[0]], (n, c, 1, length))),
                          (n, c, 1, length), (1, int(out.shape[2])), bool(args[2]), scales)
        return bb.emit(relax.op.reshape(y, (n, c, int(out.shape[2]))))

    def antialiased(kind: str):
        def convert(node, importer):
            """F.interpolate(..., antialias=True) (input, output_size, align_corners, scales_h, scales_w): TVM's
            converter resized without the antialiasing filter (13x40 -> 25x19: off by 1.27). Bilinear upsampling,
            where PyTorch's filter is the plain interpolation, runs graphopt's bilinear kernel; the rest (downsampling,
            align_corners, bicubic, whose antialiased form uses another cubic: off by 0.27 as plain bicubic) is
            refused with the node's name."""
            from graphopt.targets.tvm.cpu.resize import bilinear_applies, emit_bilinear
            x_val, out = node.args[0].meta["val"], node.meta["val"]
            args = list(node.args) + [None] * (5 - len(node.args))
            if isinstance(args[3], (list, tuple)):  # the .vec form: (input, output_size, align_corners, scales)
                args[3:5] = list(args[3]) if len(args[3]) == 2 else [None, None]
            up = all(int(o) >= int(i) for o, i in zip(out.shape[2:], x_val.shape[2:]))
            if (kind == "bilinear" and up and not bool(args[2]) and cpu_kernels
                    and str(x_val.dtype) == "torch.float32" and bilinear_applies(x_val.shape, out.shape[2:])):
                scales = None if args[3] is None or args[4] is None else [float(args[3]), float(args[4])]
                return emit_bilinear(importer.block_builder, importer.env[node.args[0]], x_val.shape, out.shape[2:],
                                     bool(args[2]), scales)
            if not str(x_val.dtype).startswith("torch.float"):
                raise UnsupportedOpError(node.name, f"aten._upsample_{kind}2d_aa", "antialiased resizing takes a "
                                         "float input; cast it first, or resize outside the model")
            return _separable_resize(importer.block_builder, importer.env[node.args[0]], node, kind, args)
        return convert

    def _separable_resize(bb, x, node, kind: str, args):
        """An antialiased resize (downsampling, align_corners, bicubic: torchvision's Resize default, preprocessing
        kept in the model) as out = A_h x A_w^T: PyTorch's filter is separable, so each axis is a constant [out,
        in] matrix, read off PyTorch's own op applied to the identity (one axis at a time, over a map two columns
        wide), and two matmuls apply them. Had been refused."""
        import numpy as np
        import torch
        x_val, out = node.args[0].meta["val"], node.meta["val"]
        (h, w), (oh, ow) = (int(d) for d in x_val.shape[2:]), (int(d) for d in out.shape[2:])
        op = getattr(torch.ops.aten, f"_upsample_{kind}2d_aa").default

        def axis(size: int, out_size: int, scale) -> np.ndarray:
            # the identity's rows as channels, along H, two columns wide (PyTorch's filter over a width of 1 gave
            # every output row the same value)
            eye = torch.eye(size, dtype=torch.float64)[:, :, None].expand(size, size, 2).reshape(1, size, size, 2)
            m = op(eye.contiguous(), [out_size, 2], bool(args[2]), None if scale is None else float(scale), None)
            return m[0, :, :, 0].t().float().numpy()  # [out, in]
        a_h = axis(h, oh, args[3])
        a_wt = np.ascontiguousarray(axis(w, ow, args[4]).T)
        dtype = str(x_val.dtype).replace("torch.", "")
        xf = x if dtype == "float32" else bb.emit(relax.op.astype(x, "float32"))
        y = bb.emit(relax.op.matmul(relax.const(a_h), xf))
        y = bb.emit(relax.op.matmul(y, relax.const(a_wt)))
        return y if dtype == "float32" else bb.emit(relax.op.astype(y, dtype))

    def _transposed_operand(node):
        """(X, alpha) where `node` is view(clone(expand(alpha * permute(X)))) with the permute swapping X's last
        two axes (unit axes aside: einsum's "bij,bcj->bci" permutes the map as [1, 1, N, K] -> [K, N, 1, 1]), the
        expand and view changing no element's place and alpha an optional constant scale (torch's decomposition
        of q @ k.transpose(-2, -1), and SDPA's, which scales k^T by sqrt(scale)): the bmm operand is alpha times
        X's transpose, batch by batch. None otherwise."""
        alpha, steps = 1.0, 0
        while getattr(node, "op", None) == "call_function" and steps < 6:
            name = getattr(node.target, "__name__", "")
            if name == "permute.default":
                src = node.args[0].meta["val"]
                nd = src.dim()
                if not all(isinstance(d, int) for d in src.shape) or src.dtype != node.meta["val"].dtype:
                    return None
                # the axes that are not unit ones (einsum's decomposition permutes [1, 1, N, K] to [K, N, 1, 1])
                keep = [a for a in range(nd) if int(src.shape[a]) != 1]
                perm = [keep.index(int(p) % nd) for p in node.args[1] if int(src.shape[int(p) % nd]) != 1]
                nk = len(keep)
                if (nd >= 3 or nk < nd) and nk >= 2 and perm == [*range(nk - 2), nk - 1, nk - 2]:
                    return node.args[0], alpha
                return None
            if name in ("mul.Scalar", "mul.Tensor") and alpha == 1.0 and not node.kwargs \
                    and isinstance(node.args[1], float):
                alpha = float(node.args[1])
            elif name == "expand.default":
                if tuple(node.args[0].meta["val"].shape) != tuple(node.meta["val"].shape):
                    return None
            elif name in ("view.default", "_unsafe_view.default", "reshape.default"):
                if steps:
                    return None  # only the bmm's own [B, K, N] view, right after it
            elif name != "clone.default":
                return None
            steps += 1
            node = node.args[0]
        return None

    def _swapped_bmm(importer, node, x_node, batch, m, k, n, lanes):
        """a @ X^T for a [B, M, K] and a large X [B, N, K] (SAGAN's context, v @ attn^T over 1024 pixels), as
        (X @ a^T)^T: the batched kernel stages a (M x K, under 1 MB) as its right operand, reading it as K^T, and
        streams X's rows; the product is transposed back. The rule's matmul ran at ~40 GMAC/s over K = 1024 (not
        blocked over K) after a generic transpose of X (1.7 ms for 1024 x 1024)."""
        from graphopt.targets.tvm.cpu.bmm import emit_bmm
        from graphopt.targets.tvm.cpu.pool import batched_transpose, emit_transpose
        bb = importer.block_builder
        x = bb.emit(relax.op.reshape(importer.env[x_node], (batch, n, k)))
        ct = emit_bmm(bb, x, importer.env[node.args[0]], batch, n, k, m, True, lanes)
        if batched_transpose((batch, n, m), (0, 2, 1)):
            return emit_transpose(bb, ct, (batch, n, m), (0, 2, 1))
        return bb.emit(relax.op.permute_dims(ct, [0, 2, 1]))

    def bmm(node, importer):
        """A float32 batched matmul of two activations (attention's scores and context) whose output rows or
        columns the schedule rule cannot tile (ViT's 197 tokens: prime) runs on zero-padded operands, the pad cut
        from the result: the rule needs a vector's worth of columns dividing N and register rows dividing M, and
        without them the matmul kept TVM's unscheduled loop, scalar and on one thread (ViT-Ti's attention: 4 ms
        a layer, 2.5x PyTorch's time for the whole model)."""
        a_val, b_val = node.args[0].meta["val"], node.args[1].meta["val"]
        if (str(a_val.dtype) != "torch.float32" or str(b_val.dtype) != "torch.float32" or a_val.dim() != 3
                or b_val.dim() != 3):
            return MORE_OPS["bmm.default"](node, importer)
        m, n = int(a_val.shape[1]), int(b_val.shape[2])
        mp = m if m % 4 == 0 else -(-m // 8) * 8
        np_ = n if n % 8 == 0 else -(-n // 16) * 16
        from graphopt.targets.tvm.cpu.bmm import bmm_applies, bmm_beats_rule, emit_bmm
        from graphopt.targets.tvm.cpu.rules import vector_lanes
        batch, k = int(a_val.shape[0]), int(a_val.shape[2])
        lanes = vector_lanes(target)
        keys = _transposed_operand(node.args[1])
        if (mp, np_) == (m, n):
            if (keys is not None and keys[1] == 1.0 and k >= 256 and not bmm_applies(batch, m, k, n, lanes)
                    and bmm_applies(batch, n, k, m, lanes)):
                return _swapped_bmm(importer, node, keys[0], batch, m, k, n, lanes)
            if not bmm_beats_rule(k, n):
                return _builtin(importer, "bmm.default")(node)
        if bmm_applies(batch, m, k, n, lanes) and keys is not None:
            # attention's K^T: the kernel reads K's rows (scaled), no transposed copy
            bb = importer.block_builder
            w = bb.emit(relax.op.reshape(importer.env[keys[0]], (batch, n, k)))
            return emit_bmm(bb, importer.env[node.args[0]], w, batch, m, k, n, True, lanes, keys[1])
        return _bmm_values(importer.block_builder, importer.env[node.args[0]], importer.env[node.args[1]],
                           batch, m, k, n)

    def _bmm_values(bb, a, b, batch: int, m: int, k: int, n: int):
        """a [B, M, K] @ b [B, K, N], float32 Relax values: graphopt's batched kernel (bmm.py) on large right
        operands (`bmm_beats_rule`), else Relax's matmul under the schedule rule where it tiles the shape, else the
        kernel where its staged panels fit, else Relax's matmul on zero-padded operands, the pad cut from the
        result."""
        from graphopt.targets.tvm.cpu.bmm import bmm_applies, bmm_beats_rule, emit_bmm
        from graphopt.targets.tvm.cpu.pool import emit_crop
        from graphopt.targets.tvm.cpu.rules import vector_lanes
        lanes = vector_lanes(target)
        mp = m if m % 4 == 0 else -(-m // 8) * 8
        np_ = n if n % 8 == 0 else -(-n // 16) * 16
        if bmm_beats_rule(k, n) and bmm_applies(batch, m, k, n, lanes, per_panel=True):
            return emit_bmm(bb, a, b, batch, m, k, n, False, lanes)
        if (mp, np_) == (m, n):
            return bb.emit(relax.op.matmul(a, b))
        if bmm_applies(batch, m, k, n, lanes):
            return emit_bmm(bb, a, b, batch, m, k, n, False, lanes)
        if mp != m:
            a = bb.emit(relax.op.nn.pad(a, [0, 0, 0, mp - m, 0, 0]))
        if np_ != n:
            b = bb.emit(relax.op.nn.pad(b, [0, 0, 0, 0, 0, np_ - n]))
        return emit_crop(bb, bb.emit(relax.op.matmul(a, b)), (batch, mp, np_), m, n)

    def upsample_nearest2d(node, importer):
        """float32 NCHW nearest upsampling by whole factors on its own kernel (resize.py); else
        `nearest_take`."""
        from graphopt.targets.tvm.cpu.resize import emit_nearest, nearest_applies
        x_val, out = node.args[0].meta["val"], node.meta["val"]
        if str(x_val.dtype) != "torch.float32" or not nearest_applies(x_val.shape, out.shape[2:]):
            return nearest_take(node, importer)
        return emit_nearest(importer.block_builder, importer.env[node.args[0]], x_val.shape, out.shape[2:])

    def mean(node, importer):
        """A float32 mean over the trailing axes (global average pooling: SE blocks, heads) of at least 8 values
        on graphopt's row kernel (norm.py); else Relax's mean."""
        from graphopt.targets.tvm.cpu.norm import emit_row_mean
        x_val = node.args[0].meta["val"]
        nd = x_val.dim()
        if nd == 0 and node.meta["val"].dim() == 0 and node.meta["val"].dtype == x_val.dtype:
            # a 0-d tensor's mean over its dim 0 (or -1) is the tensor itself; Relax's mean rejects axis 0 there
            return importer.env[node.args[0]]
        if nd == 0:
            return _builtin(importer, "mean.dim")(node)
        dims = sorted(int(d) % nd for d in (node.args[1] if len(node.args) > 1 and node.args[1] is not None
                                             else range(nd)))
        dtype_ok = str(x_val.dtype) == "torch.float32" and str(node.meta["val"].dtype) == "torch.float32"
        trailing = dims == list(range(nd - len(dims), nd))
        size = math.prod(int(x_val.shape[d]) for d in dims) if dims else 0
        if not dtype_ok or not trailing or size < 8 or node.kwargs.get("dtype") not in (None, x_val.dtype):
            return _builtin(importer, "mean.dim")(node)
        rows = math.prod(int(d) for d in x_val.shape) // size
        return emit_row_mean(importer.block_builder, importer.env[node.args[0]], rows, size, node.meta["val"].shape)

    def select(node, importer):
        """x[..., i, ...] at a constant index as a slice and a reshape: TVM's converter emits a take with a constant
        index, a generic gather (ViT's q / k / v picked from the packed projection: 40 us each for 38K floats)."""
        x_val = node.args[0].meta["val"]
        if any(not isinstance(d, int) for d in x_val.shape) or not isinstance(node.args[2], int):
            return _builtin(importer, "select.int")(node)  # (symbolic sizes or index: TVM's take)
        dim, index = int(node.args[1]) % x_val.dim(), int(node.args[2])
        size = int(x_val.shape[dim])
        if not -size <= index < size:
            return _builtin(importer, "select.int")(node)
        index %= size
        bb = importer.block_builder
        y = bb.emit(relax.op.strided_slice(importer.env[node.args[0]], axes=[dim], begin=[index], end=[index + 1]))
        return bb.emit(relax.op.reshape(y, tuple(int(d) for d in node.meta["val"].shape)))

    def native_group_norm(node, importer):
        """float32 group norm (native_group_norm: input, weight, bias, N, C, HxW, groups, eps) on the layer norm
        row kernel with a per-channel store (norm.py), at least 8 pixels a channel; else Relax's group norm. As
        TVM's converter, it gives the normalized tensor alone (getitem 0); mean and rstd are not read in
        inference graphs."""
        import numpy as np

        from graphopt.targets.tvm.cpu.norm import emit_group_norm
        x_val = node.args[0].meta["val"]
        groups, eps = int(node.args[6]), float(node.args[7])
        c = int(x_val.shape[1])
        hw = math.prod(int(d) for d in x_val.shape[2:])
        if str(x_val.dtype) != "torch.float32" or hw < 8 or any(
                getattr(u.target, "__name__", "") != "getitem" or u.args[1] != 0 for u in node.users):
            return _builtin(importer, "native_group_norm.default")(node)
        bb = importer.block_builder
        w, b = (importer.env[a] if a is not None else relax.const(np.full(c, fill, np.float32))
                for a, fill in ((node.args[1], 1.0), (node.args[2], 0.0)))
        return emit_group_norm(bb, importer.env[node.args[0]], w, b, x_val.shape, groups, eps)

    def instance_norm(node, importer):
        """instance_norm (input, weight, bias, running_mean, running_var, use_input_stats, momentum, eps, cudnn):
        with the input's statistics, the group norm kernel with a group per channel (aten's decomposition into a
        batch norm over [1, N C, H, W] took 2.6x PyTorch's time, 3.2 ms on 64x128x128); with running statistics
        an affine map. TVM's own converter reads eps from running_var's slot."""
        import numpy as np

        from graphopt.targets.tvm.cpu.norm import emit_group_norm
        x_val = node.args[0].meta["val"]
        use_stats, eps = bool(node.args[5]), float(node.args[7])
        c, nd = int(x_val.shape[1]), x_val.dim()
        hw = math.prod(int(d) for d in x_val.shape[2:])
        dtype = str(x_val.dtype).replace("torch.", "")
        bb = importer.block_builder
        x = importer.env[node.args[0]]
        w, b = (importer.env[a] if a is not None else relax.const(np.full(c, fill, dtype))
                for a, fill in ((node.args[1], 1.0), (node.args[2], 0.0)))
        if use_stats and dtype == "float32" and hw >= 8:
            return emit_group_norm(bb, x, w, b, x_val.shape, c, eps)
        if use_stats:
            return bb.emit(relax.op.nn.instance_norm(x, w, b, channel_axis=1, axes=list(range(2, nd)), epsilon=eps))
        per_channel = (c,) + (1,) * (nd - 2)  # running statistics: (x - mean) / sqrt(var + eps) * w + b
        mean, var = (bb.emit(relax.op.reshape(importer.env[a], per_channel)) for a in node.args[3:5])
        scale = bb.emit(relax.op.multiply(bb.emit(relax.op.reshape(w, per_channel)), bb.emit(
            relax.op.rsqrt(bb.emit(relax.op.add(var, relax.const(eps, dtype)))))))
        y = bb.emit(relax.op.multiply(bb.emit(relax.op.subtract(x, mean)), scale))
        return bb.emit(relax.op.add(y, bb.emit(relax.op.reshape(b, per_channel))))

    def edge_pad(mode: str):
        def convert(node, importer):
            """aten's reflection / replication pads and circular pad (x, pads) on graphopt's row kernel (pool.py)
            where it applies; else Relax's pad in that mode."""
            from graphopt.targets.tvm.cpu.pool import edge_pad_applies, emit_edge_pad
            x_val, pads = node.args[0].meta["val"], [int(p) for p in node.args[1]]
            x = importer.env[node.args[0]]
            if edge_pad_applies(x_val.shape, pads, mode, str(x_val.dtype).replace("torch.", "")):
                return emit_edge_pad(importer.block_builder, x, x_val.shape, pads, mode)
            widths = [0] * (2 * x_val.dim())
            for i in range(len(pads) // 2):  # aten's pairs run from the last axis backwards
                widths[2 * (x_val.dim() - 1 - i): 2 * (x_val.dim() - i)] = pads[2 * i: 2 * i + 2]
            return importer.block_builder.emit(relax.op.nn.pad(x, widths, mode))
        return convert

    def roll(node, importer):
        """torch.roll of a float32 tensor with constant sizes on graphopt's two-chunk row copy (pool.py); else
        TVM's converter (slices and concats)."""
        from graphopt.targets.tvm.cpu.pool import emit_roll
        x_val = node.args[0].meta["val"]
        shifts = node.args[1] if len(node.args) > 1 else node.kwargs.get("shifts")
        dims = node.args[2] if len(node.args) > 2 else node.kwargs.get("dims", [])
        shifts = [shifts] if isinstance(shifts, int) else list(shifts)
        dims = [dims] if isinstance(dims, int) else list(dims or [])
        if (str(x_val.dtype) != "torch.float32" or x_val.dim() == 0 or x_val.numel() == 0
                or any(not isinstance(v, int) for v in [*x_val.shape, *shifts, *dims])
                or len(shifts) != (len(dims) or 1)):
            return _builtin(importer, "roll.default")(node)
        return emit_roll(importer.block_builder, importer.env[node.args[0]], x_val.shape, shifts, dims or None)

    def recurrent(node, importer):
        """aten.lstm.input / aten.gru.input on graphopt's recurrence kernels (cpu/rnn.py): per layer and direction
        the input projections of all steps as one packed GEMM and the steps in one kernel. `lower_to_relax` keeps
        them whole only where `_rnn_geometry` takes every one of the graph's (else all decompose). Against core
        ATen's unrolled steps compiled (Zen 4, 2 threads, interleaved): 2-layer 256-unit LSTM / GRU over 50 steps
        1.22 -> 0.84 / 1.00 -> 0.71 ms, a bidirectional 128-unit LSTM over 100 steps 1.01 -> 0.55 -> 0.39 ms (a
        kernel per direction, then both in one)."""
        from graphopt.targets.tvm.cpu.rnn import emit_rnn_layer
        from graphopt.targets.tvm.cpu.rules import vector_lanes
        geo = _rnn_geometry(node, lifted)
        if geo is None:  # (not reached: lower_to_relax decomposes every recurrent layer unless all fit)
            raise UnsupportedOpError(node.name, str(node.target), "this recurrent layer does not fit graphopt's "
                                     "recurrence kernel and was not decomposed; please report it")
        bb = importer.block_builder
        t, n, h, dirs = geo["t"], geo["n"], geo["h"], geo["dirs"]
        weights = [lifted[p.name].detach().float().numpy() for p in geo["params"]]
        per = 4 if geo["biases"] else 2
        x = importer.env[node.args[0]]
        if geo["batch_first"]:
            x = bb.emit(relax.op.permute_dims(x, [1, 0, 2]))
        hx = node.args[1]
        h0 = importer.env[hx[0] if isinstance(hx, (list, tuple)) else hx]
        c0 = importer.env[hx[1]] if geo["kind"] == "lstm" else None
        hs, cs = [], []
        for layer in range(geo["layers"]):
            w = [weights[(layer * dirs + d) * per:(layer * dirs + d + 1) * per] for d in range(dirs)]

            def states(s, layer=layer):
                return bb.emit(relax.op.reshape(bb.emit(relax.op.strided_slice(
                    s, axes=[0], begin=[layer * dirs], end=[(layer + 1) * dirs])), (dirs, n, h)))
            x, hn, cn = emit_rnn_layer(bb, geo["kind"], x, t, n, int(w[0][0].shape[1]), h,
                                       [(a[0], a[1], a[2] if per == 4 else None, a[3] if per == 4 else None)
                                        for a in w], states(h0), None if c0 is None else states(c0),
                                       vector_lanes(target))
            hs.append(hn)
            cs.append(cn)
        if geo["batch_first"]:
            x = bb.emit(relax.op.permute_dims(x, [1, 0, 2]))
        out = [x, hs[0] if len(hs) == 1 else bb.emit(relax.op.concat(hs, axis=0))]
        if geo["kind"] == "lstm":
            out.append(cs[0] if len(cs) == 1 else bb.emit(relax.op.concat(cs, axis=0)))
        return tuple(out)

    attention_outputs: dict = {}  # permute(0, 2, 1, 3) node -> the fused attention's output as [B, L, H, Ev]

    def sdpa(node, importer):
        """float32 scaled_dot_product_attention on the fused kernel (cpu/attention.py), reading q, k and v where a
        linear wrote them ([B, L, H, E], no transposed copies) and, where the output goes back to that layout
        (permute(0, 2, 1, 3), `_sdpa_output_permute`), writing it there: that permute then is the kernel's result.
        `lower_to_relax` keeps SDPA undecomposed only where every SDPA of the graph fits (`_sdpa_geometry`).
        Against PyTorch's math decomposition compiled (its two batched matmuls, the mask's add, the softmax and
        the transposes; Zen 4, 2 threads, instrument hook): MiniLM's 6 layers at 128 tokens 1447 -> 1052 us (whole
        model 15.17 -> 14.94 ms, interleaved), at 512 tokens 27.8 -> 15.5 ms (model 82 -> 67 ms, 0.65x ORT)."""
        from graphopt.targets.tvm.cpu.attention import emit_attention
        from graphopt.targets.tvm.cpu.rules import vector_lanes, vector_registers
        geo = _sdpa_geometry(node, vector_lanes(target))
        if geo is None:  # (not reached: lower_to_relax decomposes every SDPA unless all fit)
            return _builtin(importer, "scaled_dot_product_attention.default")(node)
        bb = importer.block_builder
        q, k, v = (importer.env[t] for t in geo["sources"])
        bias = None
        if geo["mask_node"] is not None:
            bias = importer.env[geo["mask_node"]]
            if str(geo["mask_node"].meta["val"].dtype) == "torch.bool":
                bias = _mask_bias(importer, geo["mask_node"])
        b, h, l, ev = geo["b"], geo["h"], geo["l"], geo["ev"]
        perm = _sdpa_output_permute(node)
        geo["strides"]["out"] = (l * h * ev, ev, h * ev) if perm is not None else (h * l * ev, l * ev, ev)
        y = emit_attention(bb, q, k, v, bias, geo, geo["lanes"], vector_registers(target))
        if perm is None:
            return bb.emit(relax.op.reshape(y, tuple(int(d) for d in node.meta["val"].shape)))
        attention_outputs[perm] = bb.emit(relax.op.reshape(y, (b, l, h, ev)))
        return bb.emit(relax.op.permute_dims(attention_outputs[perm], [0, 2, 1, 3]))

    def permute(node, importer):
        """A float32 permutation that is a batch of large matrix transposes (pool.batched_transpose) on graphopt's
        16 x 16 tile transpose; other permutations, and small ones (fused with their neighbours), stay Relax's.
        The permute that takes a fused attention's heads back to [B, L, H, Ev] is that kernel's output (`sdpa`)."""
        if node in attention_outputs:
            return attention_outputs[node]
        from graphopt.targets.tvm.cpu.pool import batched_transpose, emit_transpose
        x_val = node.args[0].meta["val"]
        perm = [int(p) % max(x_val.dim(), 1) for p in node.args[1]]
        moved = [p for p in perm if not (_static(x_val) and int(x_val.shape[p]) == 1)]
        if _static(x_val) and moved == sorted(moved):  # only unit axes move (einsum's unsqueeze + permute pairs):
            return importer.block_builder.emit(relax.op.reshape(  # the same memory order, a reshape
                importer.env[node.args[0]], [int(x_val.shape[p]) for p in perm]))
        if (str(x_val.dtype) != "torch.float32" or not _static(x_val)
                or batched_transpose(x_val.shape, perm) is None):
            return _builtin(importer, "permute.default")(node)
        return emit_transpose(importer.block_builder, importer.env[node.args[0]], x_val.shape, perm)

    def flip(node, importer):
        """torch.flip of a float32 tensor with constant sizes on graphopt's row copy (pool.py); else TVM's."""
        from graphopt.targets.tvm.cpu.pool import emit_flip
        x_val, dims = node.args[0].meta["val"], list(node.args[1])
        if (str(x_val.dtype) != "torch.float32" or x_val.dim() == 0 or x_val.numel() == 0 or not dims
                or not _static(x_val)):
            return _builtin(importer, "flip.default")(node)
        return emit_flip(importer.block_builder, importer.env[node.args[0]], x_val.shape, dims)

    safe_softmax: dict = {}  # where node -> the safe softmax that is its value

    def _safe_softmax_where(node):
        """The where of PyTorch's SDPA decomposition that zeroes the softmax of rows that are all -inf:
        where(logical_not(any(logical_not(eq(S, -inf)), -1, keepdim)), full_like(softmax, 0), softmax) with
        softmax = _softmax(S, -1); None if `node`'s users are not that."""
        users = list(node.users)
        names = sorted(getattr(u.target, "__name__", "") for u in users)
        if names != ["full_like.default", "where.self"]:
            return None
        where = next(u for u in users if getattr(u.target, "__name__", "") == "where.self")
        fill = next(u for u in users if u is not where)
        if len(where.args) != 3 or where.args[1] is not fill or where.args[2] is not node or where.kwargs \
                or fill.args[1] != 0 or len(fill.users) != 1:
            return None
        chain = where.args[0]
        for name in ("logical_not.default", "any.dim", "logical_not.default", "eq.Scalar"):
            if getattr(chain, "op", None) != "call_function" or getattr(chain.target, "__name__", "") != name:
                return None
            if name == "any.dim" and (int(chain.args[1]) % chain.args[0].meta["val"].dim()
                                      != chain.args[0].meta["val"].dim() - 1):
                return None
            if name == "eq.Scalar" and not (chain.args[1] == float("-inf") and chain.args[0] is node.args[0]):
                return None
            chain = chain.args[0]
        return where

    def _extreme(importer, src, axes: list[int], keep: bool, out_shape, kind: str):
        """max (kind "max") or min of fx node `src`'s value over `axes` (sorted, non-negative), NaN wherever a
        reduced row holds one, as PyTorch's. float32 over trailing axes of at least a vector: graphopt's row
        kernel (norm.py); else Relax's reduction (which drops a NaN unless it comes last) with the NaN put back."""
        from graphopt.targets.tvm.cpu.norm import emit_row_mean
        x_val, x, bb = src.meta["val"], importer.env[src], importer.block_builder
        nd = x_val.dim()
        size = math.prod(int(x_val.shape[a]) for a in axes)
        if axes == list(range(nd - len(axes), nd)) and size >= 8 and str(x_val.dtype) == "torch.float32":
            return emit_row_mean(bb, x, x_val.numel() // size, size, out_shape, kind)
        reduce = relax.op.max if kind == "max" else relax.op.min
        y = bb.emit(reduce(x, axis=axes, keepdims=keep))
        if not x_val.dtype.is_floating_point:
            return y
        nan = bb.emit(relax.op.max(bb.emit(relax.op.astype(bb.emit(relax.op.isnan(x)), "int8")), axis=axes,
                                   keepdims=keep))
        return bb.emit(relax.op.where(bb.emit(relax.op.greater(nan, relax.const(0, "int8"))),
                                      relax.const(float("nan"), str(x_val.dtype).replace("torch.", "")), y))

    def _static(val) -> bool:
        return val.dim() > 0 and all(isinstance(d, int) for d in val.shape)

    dynamic_grids: dict = {}

    def _dynamic_grid(importer, node, dequantized: bool = False):
        """(codes, scale, zero point) of graphopt.dynamic_quantize `node`: x's per-call uint8 grid, as
        graphopt.ir.quant_ops.dynamic_qparams (a min and a max over x, then one elementwise pass; codes as float32 in
        [0, 255]); emitted once, its readers share it. `dequantized`: on graphopt's CPU kernel, the values the codes
        stand for in place of the codes (None elsewhere)."""
        if (node, dequantized) not in dynamic_grids:
            src, bb = node.args[0], importer.block_builder
            val = src.meta["val"]
            kernel = cpu_kernels and _static(val) and str(val.dtype) == "torch.float32" and val.numel() >= 16
            if dequantized and not kernel:
                return None
            axes = list(range(val.dim()))
            lo_x, hi_x = (_extreme(importer, src, axes, False, (), kind) for kind in ("min", "max"))
            if kernel:
                from graphopt.targets.tvm.cpu.int8 import emit_dynamic_grid
                grid = emit_dynamic_grid(bb, importer.env[src], lo_x, hi_x, val.shape, dequantized=dequantized)
                dynamic_grids[node, dequantized] = grid
                return grid
            lo = bb.emit(relax.op.minimum(lo_x, f32(0)))
            hi = bb.emit(relax.op.maximum(hi_x, f32(0)))
            span = bb.emit(relax.op.subtract(hi, lo))
            scale = bb.emit(relax.op.where(bb.emit(relax.op.equal(span, f32(0))), f32(1),
                                           bb.emit(relax.op.divide(span, f32(255)))))
            zp = bb.emit(relax.op.round(bb.emit(relax.op.clip(bb.emit(relax.op.divide(
                bb.emit(relax.op.negative(lo)), scale)), 0, 255))))
            q = bb.emit(relax.op.round(bb.emit(relax.op.divide(importer.env[src], scale))))
            q = bb.emit(relax.op.clip(bb.emit(relax.op.add(q, zp)), 0, 255))
            dynamic_grids[node, dequantized] = (q, scale, zp)
        return dynamic_grids[node, dequantized]

    def dynamic_quantize(node, importer):
        """x on its own per-call uint8 grid: a quantize_dynamic model's activations that `quantize` has not made
        static (the linears reading it with an int8 weight take its codes instead: `_dynamic_qlinear`)."""
        values = _dynamic_grid(importer, node, dequantized=True)
        if values is not None:
            return values[0]
        q, scale, zp = _dynamic_grid(importer, node)
        bb = importer.block_builder
        return bb.emit(relax.op.multiply(bb.emit(relax.op.subtract(q, zp)), scale))

    def _dynamic_qlinear(node, importer, wq, ws, b_const):
        """linear(dynamic_quantize(x), the dequantized int8 weight wq [N, K] with scales ws [N]) as ONNX Runtime's
        MatMulInteger computes it: x's per-call uint8 codes (less 128, as int8) times wq on graphopt's int8 GEMM
        with scale 1 and zero point 0, so the kernel's store applies ws alone (y0), then the call's scale and zero
        point in one elementwise pass: y = sx (y0 - (zx - 128) ws sum_k w) + b. The artifact stores the int8
        weight. None where the int8 kernels do not apply (the caller runs the layer in float)."""
        import numpy as np

        from graphopt.targets.tvm.cpu.amx import amx_cores
        from graphopt.targets.tvm.cpu.int8 import emit_qlinear, int8_dot
        from graphopt.targets.tvm.cpu.rules import vector_lanes
        x_node = node.args[0]
        dot = int8_dot(target) if cpu_kernels else None
        if dot is None or target_name(getattr(x_node, "target", None)) != "graphopt.dynamic_quantize.default":
            return None
        bb = importer.block_builder
        codes, scale, zp = _dynamic_grid(importer, x_node)
        xq = bb.emit(relax.op.astype(bb.emit(relax.op.subtract(codes, f32(128))), "int8"))
        y = emit_qlinear(bb, xq, wq, ws, None, 1.0, 0, x_node.meta["val"].shape, dot, vector_lanes(target),
                         amx_cores(target))
        if y is None:
            return None
        c = (ws.astype(np.float64) * wq.astype(np.int64).sum(axis=1)).astype(np.float32)
        shift = bb.emit(relax.op.multiply(relax.const(c), bb.emit(relax.op.subtract(zp, f32(128)))))
        y = bb.emit(relax.op.multiply(bb.emit(relax.op.subtract(y, shift)), scale))
        if b_const is not None:
            y = bb.emit(relax.op.add(y, relax.const(b_const.detach().float().numpy())))
        return y

    def _dequantized_weight(w_node):
        """(int8 codes [N, K], float32 scales [N], zero points [N]) of a constant weight behind a per-row or
        per-tensor dequantize (fold-constants keeps a dynamically quantized linear's int8 weight so), else None."""
        import numpy as np
        import torch
        name = target_name(getattr(w_node, "target", None))
        if name not in ("graphopt.dequantize_per_channel.default", "graphopt.dequantize_per_tensor.default"):
            return None
        q = (lifted or {}).get(getattr(w_node.args[0], "name", None))
        if q is None or q.dtype != torch.int8 or q.dim() != 2:
            return None
        if name.endswith("per_tensor.default"):
            s, z = torch.full((q.shape[0],), float(w_node.args[1])), torch.full((q.shape[0],), int(w_node.args[2]))
        else:
            s, z = ((lifted or {}).get(getattr(a, "name", None)) for a in w_node.args[1:3])
            if s is None or z is None or int(w_node.args[3]) != 0:
                return None
        return q.numpy(), np.ascontiguousarray(s.detach().float().numpy().reshape(-1)), z.numpy().reshape(-1)

    def _dequantized_conv_weight(w_node):
        """The float weight behind a dequantize of constant int8 codes (per tensor or per channel, any axis), for a
        conv fold-qdq left in float (3-D, transposed): computed here, the conv runs graphopt's float kernels. Run
        as the graph says, the dequantize made the weight a computed value and the conv TVM's generic op: int8
        R(2+1)D's 3-D convs took 4x ORT's time, a 3-D UNet's 5x. None for any other weight."""
        import torch
        import torch.fx as fx
        name = target_name(getattr(w_node, "target", None))
        if name not in ("graphopt.dequantize_per_channel.default", "graphopt.dequantize_per_tensor.default"):
            return None
        args = [(lifted or {}).get(a.name) if isinstance(a, fx.Node) else a for a in w_node.args]
        if any(a is None for a in args) or args[0].dtype not in (torch.int8, torch.uint8):
            return None
        return w_node.target(*args)  # (the op itself on the constants: its reference semantics)

    def max_dim(node, importer):
        """max over one axis as (values, indices): `_extreme`'s values (PointNet's max over 2048 points ran TVM's
        converter's top-1 sort: 2.9 ms, now 0.24) and Relax's argmax (the first maximum's index, as PyTorch's)."""
        x_val = node.args[0].meta["val"]
        if not x_val.dtype.is_floating_point or not _static(x_val):
            return _builtin(importer, "max.dim")(node)
        dim = int(node.args[1]) % x_val.dim()
        keep = bool(node.args[2]) if len(node.args) > 2 else bool(node.kwargs.get("keepdim", False))
        bb, x = importer.block_builder, importer.env[node.args[0]]
        values = _extreme(importer, node.args[0], [dim], keep, node.meta["val"][0].shape, "max")
        # indices: a NaN counts as +inf (PyTorch points at the first NaN; here a +inf before it wins) and a row
        # of -inf answers 0 (Relax's argmax: -1)
        dtype = str(x_val.dtype).replace("torch.", "")
        ranked = bb.emit(relax.op.where(bb.emit(relax.op.isnan(x)), relax.const(float("inf"), dtype), x))
        indices = bb.emit(relax.op.astype(bb.emit(relax.op.argmax(ranked, axis=dim, keepdims=keep)), "int64"))
        indices = bb.emit(relax.op.maximum(indices, relax.const(0, "int64")))
        return bb.emit(relax.Tuple([values, indices]))

    def _trailing_rows(node, dims):
        """(rows, size) when float32 node.args[0] is reduced over trailing axes `dims` (None: all) holding at least a
        vector, to a float32 result; else None."""
        x_val = node.args[0].meta["val"]
        if not _static(x_val) or str(x_val.dtype) != "torch.float32" or str(node.meta["val"].dtype) != "torch.float32":
            return None
        nd = x_val.dim()
        dims = [dims] if isinstance(dims, int) else list(range(nd)) if not dims else list(dims)
        axes = sorted({int(d) % nd for d in dims})
        size = math.prod(int(x_val.shape[a]) for a in axes)
        if axes != list(range(nd - len(axes), nd)) or size < 8:
            return None
        return x_val.numel() // size, size

    def sum_dim(node, importer):
        """A float32 sum over trailing axes on the row kernel (norm.py); Relax's sum ran 1.8x PyTorch's time on 80
        rows of 3000."""
        from graphopt.targets.tvm.cpu.norm import emit_row_mean
        dims = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim")
        shape = _trailing_rows(node, dims) if node.kwargs.get("dtype") is None else None
        if shape is None:
            return _builtin(importer, "sum.dim_IntList")(node)
        return emit_row_mean(importer.block_builder, importer.env[node.args[0]], *shape, node.meta["val"].shape,
                             "sum")

    def vector_norm(node, importer):
        """The 2-norm over trailing float32 axes (F.normalize, CLIP / ArcFace embeddings) on the row kernel
        (norm.py), the squares summed in its partials: TVM's converter's pow / sum / pow took 4.7x PyTorch's time
        (F.normalize over 512 rows of 512: 249 us)."""
        from graphopt.targets.tvm.cpu.norm import emit_row_mean
        args = list(node.args) + [2, None, False][len(node.args) - 1:]  # (x, ord, dim, keepdim; dtype a kwarg)
        shape = (_trailing_rows(node, args[2]) if isinstance(args[1], (int, float)) and float(args[1]) == 2.0
                 and node.kwargs.get("dtype") is None else None)
        if shape is None:
            return MORE_OPS["linalg_vector_norm.default"](node, importer)
        return emit_row_mean(importer.block_builder, importer.env[node.args[0]], *shape, node.meta["val"].shape,
                             "norm2")

    def im2col(node, importer):
        """F.unfold (aten.im2col: x, kernel_size, dilation, padding, stride) on graphopt's im2col kernel, whose
        [N, C kh kw, L] columns are aten's; aten's decomposition gathered with index tensors of two shapes, which
        TVM's index converter cannot broadcast (the import failed)."""
        import numpy as np

        from graphopt.targets.tvm.cpu.conv import emit_im2col
        x_val = node.args[0].meta["val"]
        (kh, kw), (dh, dw), (ph, pw), (sh, sw) = ([int(v) for v in a] for a in node.args[1:5])
        if str(x_val.dtype) != "torch.float32" or not _static(x_val) or dh != dw:
            raise UnsupportedOpError(node.name, "aten.im2col", "graphopt's CPU target unfolds float32 tensors "
                                     "of static shape with the same dilation along both axes")
        bb, x = importer.block_builder, importer.env[node.args[0]]
        shape = tuple(int(d) for d in x_val.shape)
        if len(shape) == 3:  # unbatched [C, H, W]
            x, shape = bb.emit(relax.op.reshape(x, (1, *shape))), (1, *shape)
        col, _, _ = emit_im2col(bb, x, shape, kh, kw, (sh, sw), (ph, ph, pw, pw), np.float32(0), dilation=dh)
        return bb.emit(relax.op.reshape(col, tuple(int(d) for d in node.meta["val"].shape)))

    def col2im(node, importer):
        """F.fold (aten.col2im: cols, output_size, kernel_size, dilation, padding, stride) on graphopt's fold kernel
        (`emit_col2im`); the transposed convs that `convs_from_transposed` makes a GEMM + fold end in one. Core
        ATen's decomposition (an index_put) did not build past batch 1, and the grouped transposed conv that
        replaced it ran on TVM's generic conv2d_transpose."""
        from graphopt.targets.tvm.cpu.conv import emit_col2im
        x_val = node.args[0].meta["val"]
        if str(x_val.dtype) != "torch.float32" or not _static(x_val):
            raise UnsupportedOpError(node.name, "aten.col2im", "graphopt's CPU target folds float32 tensors of "
                                     "static shape")
        out_hw, kernel, dilation, padding, stride = ([int(v) for v in a] for a in node.args[1:6])
        n = 1 if x_val.dim() == 2 else int(x_val.shape[0])
        c = int(x_val.shape[-2]) // (kernel[0] * kernel[1])
        grid = [(out_hw[i] + 2 * padding[i] - dilation[i] * (kernel[i] - 1) - 1) // stride[i] + 1 for i in range(2)]
        y = emit_col2im(importer.block_builder, importer.env[node.args[0]], n, c, kernel, grid, out_hw, stride,
                        padding, dilation)
        return importer.block_builder.emit(relax.op.reshape(y, tuple(int(d) for d in node.meta["val"].shape)))

    def amax_amin(kind: str):
        def convert(node, importer):
            """amax / amin (x, dims=[] for all, keepdim): TVM's importer has no converter for them, so a graph
            with torch.amax or torch.logsumexp (which decomposes into one) did not compile."""
            x_val = node.args[0].meta["val"]
            if not _static(x_val):
                raise UnsupportedOpError(node.name, f"aten.{kind}", "symbolic shapes; export with static ones")
            dims = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim", [])
            dims = [dims] if isinstance(dims, int) else list(dims or [])
            axes = sorted({int(d) % x_val.dim() for d in dims}) or list(range(x_val.dim()))
            keep = bool(node.args[2]) if len(node.args) > 2 else bool(node.kwargs.get("keepdim", False))
            return _extreme(importer, node.args[0], axes, keep, node.meta["val"].shape, kind)
        return convert

    def arg_extreme(kind: str):
        def convert(node, importer):
            """argmax / argmin (x, dim=None for all, keepdim): the first extreme's index, and on floats the first
            NaN's where a reduced row holds one, as PyTorch's (Relax's argmax passed over a NaN)."""
            x_val, bb = node.args[0].meta["val"], importer.block_builder
            dim = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim")
            keep = bool(node.args[2]) if len(node.args) > 2 else bool(node.kwargs.get("keepdim", False))
            x = importer.env[node.args[0]]
            nd = x_val.dim()
            if dim is None and nd > 1:  # (over everything: the flat index)
                x, dim, flat = bb.emit(relax.op.reshape(x, (x_val.numel(),))), 0, True
            else:
                dim, flat = (0 if dim is None else int(dim) % max(nd, 1)), False
            if str(x_val.dtype) == "torch.float32" and nd > 0 and _static(x_val):
                from graphopt.targets.tvm.cpu.rules import vector_lanes
                from graphopt.targets.tvm.cpu.select import arg_extreme_geometry, emit_arg_extreme
                lanes = vector_lanes(target)
                geometry = arg_extreme_geometry((x_val.numel(),) if flat else x_val.shape, dim, lanes)
                if geometry is not None:  # graphopt's kernel, NaN rule included
                    y = emit_arg_extreme(bb, x, geometry, lanes, kind == "max")
                    return bb.emit(relax.op.reshape(y, tuple(int(d) for d in node.meta["val"].shape)))
            op = relax.op.argmax if kind == "max" else relax.op.argmin
            axis = None if nd == 0 else dim
            y = bb.emit(op(x, axis=axis, keepdims=keep and not flat))
            y = bb.emit(relax.op.astype(y, "int64"))
            if x_val.dtype.is_floating_point:  # (Relax's answer for a run of -inf (+inf for argmin): -1; PyTorch: 0)
                y = bb.emit(relax.op.maximum(y, relax.const(0, "int64")))
            if x_val.dtype.is_floating_point and nd > 0:
                has, first = first_nan(bb, x, dim, keep and not flat)
                y = bb.emit(relax.op.where(has, first, y))
            shape = tuple(int(d) for d in node.meta["val"].shape)
            return bb.emit(relax.op.reshape(y, shape)) if flat else y
        return convert

    mask_biases: dict = {}  # boolean attention mask node -> its additive float32 form (0 / -inf)

    def _mask_bias(importer, keep):
        """where(keep, 0, -inf) of boolean mask node `keep`, emitted once for all the layers that read it (a
        transformer's layers share one padding mask: 6 elementwise kernels of 16-36 us in MiniLM before)."""
        if keep not in mask_biases:
            mask_biases[keep] = importer.block_builder.emit(
                relax.op.where(importer.env[keep], f32(0.0), f32(float("-inf"))))
        return mask_biases[keep]

    def _masked_softmax_q(node):
        """(scores, alpha, keep mask, its (batch, head, row) strides, quantize, its grid) where softmax `node` over
        the last axis of [B, H, L, S] float32 reads where(logical_not(keep), -inf, scores * alpha) (the int8
        attention `passes.quant.attention` writes, decomposed) with a boolean keep of shape [1|B, 1|H, 1|L, S],
        and its only user is an int8 quantize (the probabilities for the int8 P V); else None."""
        import torch.fx as fx

        from graphopt.targets.tvm.cpu.norm import mask_strides, masked_softmax_q_applies
        x_val, where = node.meta["val"], node.args[0]
        users = list(node.users)
        if (int(node.args[1]) % 4 != 3 or x_val.dim() != 4 or str(x_val.dtype) != "torch.float32"
                or not masked_softmax_q_applies(int(x_val.shape[-1])) or len(users) != 1
                or target_name(users[0].target) != "graphopt.quantize_per_tensor.default"
                or str(users[0].args[5]) != "torch.int8"
                or (len(node.args) > 2 and node.args[2]) or target_name(where.target) != "aten.where.self"
                or len(where.users) != 1 or len(where.args) != 3):
            return None
        cond, fill, scaled = where.args
        if isinstance(fill, fx.Node):  # (the decomposition's scalar_tensor(-inf), or -inf itself)
            fill = fill.args[0] if target_name(fill.target) == "aten.scalar_tensor.default" else None
        if fill != float("-inf"):
            return None
        if (target_name(cond.target) != "aten.logical_not.default" or target_name(scaled.target) != "aten.mul.Tensor"
                or not isinstance(scaled.args[1], (int, float)) or not isinstance(scaled.args[0], fx.Node)):
            return None
        keep = cond.args[0]
        kv = keep.meta.get("val")
        mstr = mask_strides(tuple(kv.shape), x_val.shape) if kv is not None and str(kv.dtype) == "torch.bool" else None
        if mstr is None:
            return None
        q = users[0]
        return (scaled.args[0], float(scaled.args[1]), keep, mstr, q,
                (float(q.args[1]), int(q.args[2]), int(q.args[3]), int(q.args[4])))

    def softmax(node, importer):
        # float32 softmax over the last axis: one vectorized pass per row (norm.py); SDPA's where that zeroes
        # rows of -inf done in the same kernel (as Relax ops it was a generic reduction + select, 0.13 ms a
        # ViT-Ti layer)
        from graphopt.targets.tvm.cpu.norm import emit_softmax, rows_apply
        x_val = node.args[0].meta["val"]
        dim, half_to_float = int(node.args[1]), bool(node.args[2]) if len(node.args) > 2 else False
        masked = _masked_softmax_q(node)
        if masked is not None:  # int8 attention's scale, mask, softmax and quantize in one kernel
            from graphopt.targets.tvm.cpu.norm import emit_masked_softmax_q
            scores, alpha, keep, mstr, quant, grid = masked
            bb = importer.block_builder
            bias = _mask_bias(importer, keep)
            y = emit_masked_softmax_q(bb, importer.env[scores], bias, x_val.shape, alpha, mstr, grid)
            fused_quants[quant] = y
            return y
        if (dim in (-1, x_val.dim() - 1) and not half_to_float
                and rows_apply(int(x_val.shape[-1]), str(x_val.dtype).replace("torch.", ""))):
            where = _safe_softmax_where(node)
            y = emit_softmax(importer.block_builder, importer.env[node.args[0]], x_val.shape, where is not None)
            if where is not None:
                safe_softmax[where] = y
            return y
        y = _softmax_cols(node, importer, False)
        return y if y is not None else _builtin(importer, "_softmax.default")(node)

    def _softmax_cols(node, importer, log: bool):
        """(log_)softmax over an axis before the last (a segmentation head's softmax over NCHW channels) on the
        column kernel (norm.py), float32, with at least a vector's worth of positions after the axis; else None.
        Relax's took 6.2x PyTorch's time on 21 classes at 128x128."""
        from graphopt.targets.tvm.cpu.norm import LANES, emit_softmax_cols
        x_val = node.args[0].meta["val"]
        half_to_float = bool(node.args[2]) if len(node.args) > 2 else False
        if (x_val.dim() < 2 or half_to_float or str(x_val.dtype) != "torch.float32"
                or any(not isinstance(d, int) for d in x_val.shape)):
            return None
        dim = int(node.args[1]) % x_val.dim()
        if dim == x_val.dim() - 1 or math.prod(int(d) for d in x_val.shape[dim + 1:]) < LANES:
            return None
        return emit_softmax_cols(importer.block_builder, importer.env[node.args[0]], x_val.shape, dim, log)

    def log_softmax(node, importer):
        """float32 log_softmax over the last axis on the softmax row kernel (norm.py): Relax fused aten's
        decomposition (x - max - log(sum(exp(x - max)))) into a loop that recomputed the row's reductions for
        every output, 2.0 s for one row of 32000 (a language model's head; PyTorch 20 us)."""
        from graphopt.targets.tvm.cpu.norm import emit_softmax, rows_apply
        x_val = node.args[0].meta["val"]
        dim, half_to_float = int(node.args[1]), bool(node.args[2]) if len(node.args) > 2 else False
        if (x_val.dim() and dim % x_val.dim() == x_val.dim() - 1 and not half_to_float
                and rows_apply(int(x_val.shape[-1]), str(x_val.dtype).replace("torch.", ""))):
            return emit_softmax(importer.block_builder, importer.env[node.args[0]], x_val.shape, log=True)
        y = _softmax_cols(node, importer, True)
        return y if y is not None else _builtin(importer, "_log_softmax.default")(node)

    def nearest_take(node, importer):
        """upsample_nearest2d / 3d (input, output_size, scale_factors) through PyTorch's index tables, any device
        (resize.py): TVM's converter picked other rows and columns when the size was given and not a whole
        multiple (13 -> 25: values off by up to 1.7x the output's range), and the 3-D one did not import."""
        from graphopt.targets.tvm.cpu.resize import emit_nearest_take
        x_val, out = node.args[0].meta["val"], node.meta["val"]
        if not _static(x_val) or not all(isinstance(d, int) for d in out.shape):
            return _builtin(importer, node.target.__name__)(node)  # (symbolic sizes: TVM's converter)
        scales = node.args[2] if len(node.args) > 2 else node.kwargs.get("scale_factors")
        return emit_nearest_take(importer.block_builder, importer.env[node.args[0]], x_val.shape,
                                 out.shape[2:], scales)

    def adaptive_avg_pool2d(node, importer):
        """float32 NCHW adaptive average pooling (PSPNet's pyramid, VGG / AlexNet heads on other input sizes) on
        graphopt's row kernel (pool.py); an output the input's size is the input."""
        from graphopt.targets.tvm.cpu.pool import emit_adaptive_avg
        x_val, out = node.args[0].meta["val"], node.meta["val"]
        if (not _static(x_val) or x_val.dim() != 4 or str(x_val.dtype) != "torch.float32"
                or not all(isinstance(d, int) for d in out.shape)):
            return _builtin(importer, "_adaptive_avg_pool2d.default")(node)
        if tuple(out.shape) == tuple(x_val.shape):
            return importer.env[node.args[0]]
        return emit_adaptive_avg(importer.block_builder, importer.env[node.args[0]], x_val.shape, out.shape[2:])

    def trilinear(node, importer):
        """F.interpolate(mode="trilinear") (input, output_size, align_corners, scale_factors): aten's decomposition
        failed TVM's build ("Cannot convert infinity to BigInt"). float32 on the CPU with output planes at least 16
        wide: the bilinear kernel over the planes and a lerp over depth (resize.py); else Relax's resize3d, whose
        coordinates are PyTorch's where the scale factors, if given, are the sizes' ratios (refused otherwise)."""
        from graphopt.targets.tvm.cpu.resize import bilinear_applies, emit_trilinear
        x_val, out = node.args[0].meta["val"], node.meta["val"]
        args = list(node.args) + [None] * (4 - len(node.args))
        scales = list(args[3]) if args[3] else None
        if not _static(x_val) or not all(isinstance(d, int) for d in out.shape):
            raise UnsupportedOpError(node.name, "aten.upsample_trilinear3d", "trilinear resizing needs static "
                                     "shapes; export with fixed input sizes")
        n, c, d, h, w = (int(v) for v in x_val.shape)
        if (cpu_kernels and str(x_val.dtype) == "torch.float32"
                and bilinear_applies((n, c * d, h, w), out.shape[3:])):
            return emit_trilinear(importer.block_builder, importer.env[node.args[0]], x_val.shape, out.shape[2:],
                                  bool(args[2]), scales)
        if scales and any(float(s) != int(o) / int(i) for s, o, i in zip(scales, out.shape[2:], x_val.shape[2:])):
            raise UnsupportedOpError(node.name, "aten.upsample_trilinear3d", "this trilinear resize's scale factors "
                                     "are not its sizes' ratios (PyTorch then uses the factors); pass size= instead")
        return importer.block_builder.emit(relax.op.image.resize3d(
            importer.env[node.args[0]], [int(v) for v in out.shape[2:]], layout="NCDHW", method="linear",
            coordinate_transformation_mode="align_corners" if args[2] else "half_pixel"))

    def grid_sampler_2d(node, importer):
        """grid_sample: PyTorch's grid is [N, H_out, W_out, 2]; Relax's grid_sample infers its output from, and its
        legalization reads, a grid laid out [N, 2, H_out, W_out], and TVM's converter passed PyTorch's as it is (a
        [1, 3, 8, 10] image sampled on an 8 x 10 grid came out [1, 3, 10, 2]). The grid is transposed first."""
        args = list(node.args) + [0, 0, False][len(node.args) - 2:]
        bb = importer.block_builder
        grid, padding = importer.env[node.args[1]], int(args[3])
        x_val = node.args[0].meta["val"]
        if padding == 2 and int(args[2]) in (0, 1) and x_val.dim() == 4 and _static(x_val) and \
                str(node.args[1].meta["val"].dtype) == "torch.float32":
            grid, padding = _reflected_grid(bb, grid, int(x_val.shape[2]), int(x_val.shape[3]), bool(args[4])), 1
        grid = bb.emit(relax.op.permute_dims(grid, [0, 3, 1, 2]))
        return bb.emit(relax.op.image.grid_sample(
            importer.env[node.args[0]], grid, method={0: "bilinear", 1: "nearest", 2: "bicubic"}[int(args[2])],
            layout="NCHW", padding_mode={0: "zeros", 1: "border", 2: "reflection"}[padding],
            align_corners=bool(args[4])))

    def _reflected_grid(bb, grid, h: int, w: int, align: bool):
        """grid_sample's reflection padding done on the grid: each coordinate reflected into the image as PyTorch
        does (over [0, 2 (size - 1)] with align_corners, else [-1, 2 size - 1], then clipped) and normalized back,
        so a border-padding sample reads the same pixels. TVM's reflection sample redid that arithmetic (an fmod, a
        libm call) for every channel: 2.26 ms for 16 channels of 64 x 64 samples, border padding 0.28."""
        import numpy as np

        def c(v):
            return relax.const(np.float32(v), "float32")

        def axis(t, size: int):
            if size == 1 and align:
                return bb.emit(relax.op.multiply(t, c(0.0)))  # PyTorch's reflection of a one-pixel axis: 0
            i = (relax.op.multiply(relax.op.add(t, c(1.0)), c((size - 1) / 2.0)) if align
                 else relax.op.multiply(relax.op.subtract(relax.op.multiply(relax.op.add(t, c(1.0)), c(size)), c(1.0)),
                                        c(0.5)))
            lo, span = (0.0, size - 1.0) if align else (-0.5, float(size))
            a = bb.emit(relax.op.abs(relax.op.subtract(i, c(lo))))
            flips = bb.emit(relax.op.floor(relax.op.divide(a, c(span))))
            extra = relax.op.subtract(a, relax.op.multiply(flips, c(span)))
            even = relax.op.equal(relax.op.subtract(flips, relax.op.multiply(
                relax.op.floor(relax.op.multiply(flips, c(0.5))), c(2.0))), c(0.0))
            r = relax.op.where(even, relax.op.add(extra, c(lo)), relax.op.add(relax.op.subtract(c(span), extra), c(lo)))
            r = relax.op.clip(r, 0.0, float(size - 1))
            back = (relax.op.subtract(relax.op.multiply(r, c(2.0 / (size - 1) if size > 1 else 0.0)), c(1.0))
                    if align else relax.op.subtract(relax.op.divide(relax.op.add(relax.op.multiply(r, c(2.0)), c(1.0)),
                                                                    c(size)), c(1.0)))
            return bb.emit(back)
        gx = relax.op.strided_slice(grid, axes=[3], begin=[0], end=[1])
        gy = relax.op.strided_slice(grid, axes=[3], begin=[1], end=[2])
        return bb.emit(relax.op.concat([axis(gx, w), axis(gy, h)], axis=3))

    def where(node, importer):
        if node in safe_softmax:
            return safe_softmax[node]
        return _builtin(importer, "where.self")(node)

    def _clamp_of(user) -> tuple[float, float] | None:
        """(lo, hi) when `user` is relu / relu6 / hardtanh / clamp with constant float bounds."""
        t = getattr(user, "target", None)
        name = getattr(t, "__name__", "")
        if name in ("relu.default",):
            return (0.0, float("inf"))
        if name in ("relu6.default",):
            return (0.0, 6.0)
        if name in ("hardtanh.default", "clamp.default"):
            # hardtanh's bounds default to -1 and 1; clamp's missing one is no bound
            lo_name, hi_name, lo0, hi0 = (("min_val", "max_val", -1.0, 1.0) if name == "hardtanh.default"
                                          else ("min", "max", None, None))
            lo = user.args[1] if len(user.args) > 1 else user.kwargs.get(lo_name, lo0)
            hi = user.args[2] if len(user.args) > 2 else user.kwargs.get(hi_name, hi0)
            if lo is None and hi is None:
                return None
            lo, hi = (float("-inf") if lo is None else lo), (float("inf") if hi is None else hi)
            if isinstance(lo, (int, float)) and isinstance(hi, (int, float)):
                return (float(min(lo, hi)), float(hi))  # (min above max: every value becomes max, as in PyTorch)
        return None

    def _conv_kernel(x_shape, w_shape, args):
        """Which of graphopt's conv kernels takes this convolution (None: TVM's conv + the schedule rules)."""
        from graphopt.targets.tvm.cpu import conv as k
        stride, padding, dilation, transposed, _, groups = args
        for kind, applies in (("pointwise", k.pointwise_applies), ("depthwise", k.depthwise_applies),
                              ("direct", k.direct_applies)):
            if applies(x_shape, w_shape, stride, padding, dilation, groups, transposed):
                return kind
        if k.dense_conv_applies(x_shape, w_shape, stride, padding, dilation, groups, transposed):
            x_shape = list(x_shape)
            s = int(stride[0])
            oh = (int(x_shape[2]) + 2 * int(padding[0]) - int(w_shape[2])) // s + 1
            ow = (int(x_shape[3]) + 2 * int(padding[1]) - int(w_shape[3])) // s + 1
            if k.im2col_pays(int(w_shape[1]), int(w_shape[2]), int(w_shape[3]), oh * ow):
                return "im2col"
            return "direct" if s in (1, 2) else None  # the direct kernel's strides
        if k.patchify_applies(x_shape, w_shape, stride, padding, dilation, groups, transposed):
            return "im2col"
        return None

    def convolution(node, importer):
        # convs with a constant float weight go to graphopt's kernels, looping over the samples at batch > 1 (bias
        # and a lone ReLU/ReLU6/clamp fused; a zero pad right before a depthwise or direct conv folded into its
        # padding)
        import torch

        from graphopt.targets.tvm.cpu import conv as k
        from graphopt.targets.tvm.cpu.rules import vector_lanes
        if node in expanded_dw:  # computed with the pointwise conv before it (`_expand_depthwise`)
            return expanded_dw[node]
        x_shape = node.args[0].meta["val"].shape
        spatial = len(x_shape) - 2
        if spatial > 1:  # conv2d(padding="valid") decomposes with padding [0]: one value for every spatial dim
            node.args = tuple(list(a) * spatial if i in (3, 4, 5, 7) and isinstance(a, (list, tuple)) and len(a) == 1
                              else a for i, a in enumerate(node.args))
        wt = (lifted or {}).get(getattr(node.args[1], "name", None))
        if wt is None:
            wt = _dequantized_conv_weight(node.args[1])
        bnode = node.args[2] if len(node.args) > 2 else None
        bt = (lifted or {}).get(getattr(bnode, "name", None)) if bnode is not None else None
        pads = absorbed_pads.get(node.args[0])
        if pads is not None:  # the zero pad before this conv was left out; its amounts join the conv's padding
            x_shape = node.args[0].args[0].meta["val"].shape
        kind = None
        # a float32 conv with a constant weight and bias: what graphopt's kernels (and the rewrites below) take
        constant = (wt is not None and wt.dtype == torch.float32 and (bnode is None or bt is not None)
                    and str(node.args[0].meta["val"].dtype) == "torch.float32")
        if constant:
            kind = _conv_kernel(x_shape, wt.shape, node.args[3:9])
            if kind is None and pads is None and k.unpooling_applies(x_shape, wt.shape, *node.args[3:9]):
                return k.emit_unpooling_conv(importer.block_builder, importer.env[node.args[0]],
                                             wt.detach().numpy(), None if bt is None else bt.detach().numpy(),
                                             x_shape, vector_lanes(target))
        if node.args[6] and len(x_shape) == 5:  # any other 3-D transposed conv: Relax's (TVM's importer has none)
            return _conv3d_transpose_relax(node, importer)
        groups = int(node.args[8]) if len(node.args) > 8 else 1
        if kind is None and constant and pads is None and _one_pixel_pointwise(node, x_shape, wt, groups):
            y = _pixel_linear(node, importer, x_shape, wt, bt)
            if y is not None:
                return y
        if kind is None and constant and node.args[6] and groups == 1 and pads is None:
            y = _transposed_conv(node, importer, x_shape, wt, bt)
            if y is not None:
                return y
        if constant and wt.dim() == 5 and len(x_shape) == 5 and groups == 1 and pads is None:
            y = _conv3d(node, importer, x_shape, wt, bt)
            if y is not None:
                return y
        if constant and wt.dim() == 3 and len(x_shape) == 3 and pads is None:
            y = _conv1d(node, importer, x_shape, wt, bt, groups)
            if y is not None:
                return y
        if kind is None and constant and groups > 1 and len(x_shape) == 4:
            return _grouped_conv(node, importer, x_shape, wt, bt, pads, groups)
        if kind is None and constant and pads is None and _uneven_stride_applies(node, x_shape, wt, groups):
            residual, clamp = _fused_epilogue(node, importer, True)
            if int(wt.shape[1]) * int(wt.shape[2]) * int(wt.shape[3]) > k.STEM_STEPS:
                return k.emit_flat_conv(importer.block_builder, importer.env[node.args[0]], wt.detach().numpy(),
                                        None if bt is None else bt.detach().numpy(), x_shape,
                                        tuple(int(v) for v in node.args[3]), _full_padding(node, None), clamp,
                                        None if residual is None else importer.env[residual],
                                        lanes=vector_lanes(target))
            return k.emit_im2col_conv(importer.block_builder, importer.env[node.args[0]], wt.detach().numpy(),
                                      None if bt is None else bt.detach().numpy(), x_shape,
                                      tuple(int(v) for v in node.args[3]), _full_padding(node, None),
                                      vector_lanes(target), clamp, None if residual is None else importer.env[residual])
        if kind is None and constant and pads is None and _dilated_applies(node, x_shape, wt):
            return _dilated_conv(node, importer, x_shape, wt, bt)
        if kind is None and constant and pads is None and _dilated_im2col_applies(node, x_shape, wt):
            residual, clamp = _fused_epilogue(node, importer, True)
            return k.emit_im2col_conv(importer.block_builder, importer.env[node.args[0]], wt.detach().numpy(),
                                      None if bt is None else bt.detach().numpy(), x_shape, int(node.args[3][0]),
                                      _full_padding(node, None), vector_lanes(target), clamp,
                                      None if residual is None else importer.env[residual], int(node.args[5][0]))
        if wt is None:  # a weight the graph computes (its bias constant or computed too)
            y = _runtime_weight_conv(node, importer, x_shape, pads, groups)
            if y is not None:
                return y
        if kind is None:
            return importer._convolution(node)
        if kind == "pointwise" and pads is None and int(x_shape[0]) == 1:
            y = _expand_depthwise(node, importer, x_shape, wt, bt)
            if y is not None:
                return y
        residual, clamp = _fused_epilogue(node, importer, kind in ("pointwise", "im2col"))
        w, b = wt.detach().numpy(), None if bt is None else bt.detach().numpy()
        return _emit_conv(importer.block_builder, importer.env[node.args[0]], w, b, x_shape, kind,
                          int(node.args[3][0]), _full_padding(node, pads), clamp,
                          None if residual is None else importer.env[residual])

    convolution.takes_3d_transposed = True

    def _runtime_weight_conv(node, importer, x_shape, pads, groups: int):
        """A float32 2-D conv whose weight the graph computes (StyleGAN's modulated / demodulated convs, weight
        standardization left unfolded, hypernetworks) as graphopt's im2col columns times the weight, one batched
        matmul over samples x groups (`_bmm_values`); TVM's conv2d on such a weight ran its generic loop nest
        (StyleGAN2's 4 x 256 -> 256 modulated 3x3 at 16x16: 640 ms). None where it does not apply."""
        import numpy as np

        from graphopt.targets.tvm.cpu.conv import emit_im2col
        x_val, w_val, out = node.args[0].meta["val"], node.args[1].meta["val"], node.meta["val"]
        bnode = node.args[2] if len(node.args) > 2 else None
        if (len(x_shape) != 4 or node.args[6] or w_val.dim() != 4 or not _static(w_val) or not _static(x_val)
                or str(w_val.dtype) != "torch.float32" or str(x_val.dtype) != "torch.float32"
                or len({int(d) for d in node.args[5]}) != 1
                or (bnode is not None and str(bnode.meta["val"].dtype) != "torch.float32")):
            return None
        n, c, h, wd = (int(d) for d in x_shape)
        co, cig, kh, kw = (int(d) for d in w_val.shape)
        cog, kk = co // groups, cig * kh * kw
        oh, ow = int(out.shape[2]), int(out.shape[3])
        stride, full = tuple(int(v) for v in node.args[3]), _full_padding(node, pads)
        bb, x = importer.block_builder, importer.env[node.args[0]]
        y = _runtime_weight_flat_conv(node, importer, x_shape, pads, groups)
        if y is not None:
            return y
        if (kh, kw, *stride, *full) == (1, 1, 1, 1, 0, 0, 0, 0):
            col = x  # a 1x1 conv's columns are its input
        else:
            col, _, _ = emit_im2col(bb, x, (n, c, h, wd), kh, kw, stride, full, np.float32(0),
                                    dilation=int(node.args[5][0]))
        col = bb.emit(relax.op.reshape(col, (n * groups, kk, oh * ow)))
        w = bb.emit(relax.op.reshape(importer.env[node.args[1]], (groups, cog, kk)))
        if n > 1:  # every sample's groups take the same weights
            w = bb.emit(relax.op.reshape(relax.op.broadcast_to(relax.op.reshape(w, (1, groups, cog, kk)),
                                                               (n, groups, cog, kk)), (n * groups, cog, kk)))
        y = bb.emit(relax.op.reshape(_bmm_values(bb, w, col, n * groups, cog, kk, oh * ow), (n, co, oh, ow)))
        if bnode is not None:
            y = bb.emit(relax.op.add(y, relax.op.reshape(importer.env[bnode], (1, co, 1, 1))))
        return y

    def _runtime_weight_flat_conv(node, importer, x_shape, pads, groups: int):
        """`_runtime_weight_conv` on the pixel-row / flat conv kernels, the weight packed by Relax ops when the model
        runs (`conv._runtime_packed_taps`): a k x k conv at stride 1 or 2, not dilated, the groups of a batch-1
        grouped conv as the samples of one call, each with its own weights. im2col + the batched matmul took 3.1-3.3x
        the time of the same conv on a constant weight (CondConv's 32 -> 32 3x3 at 28x28, interleaved) and
        1.7-1.8x at 64 channels at 56x56. None where it does not apply."""
        import numpy as np

        from graphopt.targets.tvm.cpu import conv as k
        from graphopt.targets.tvm.cpu.rules import target_cores, vector_lanes, vector_registers
        w_shape = tuple(int(d) for d in node.args[1].meta["val"].shape)
        n, c, h, wd = (int(d) for d in x_shape)
        co, cig, kh, kw = w_shape
        cog = co // groups
        stride = {int(v) for v in node.args[3]}
        if len(stride) != 1 or {int(v) for v in node.args[5]} != {1} or (groups > 1 and (n > 1 or cig == 1)):
            return None
        s, full = stride.pop(), _full_padding(node, pads)
        g_shape = (groups if groups > 1 else n, cig, h, wd)
        kind = _conv_kernel(g_shape, (cog, cig, kh, kw), (*node.args[3:8], 1))
        if (kind not in ("im2col", "direct") or h == 1 or not k.tok_conv_applies(w_shape, s)
                and not k.flat_conv_applies(g_shape, w_shape, s, full)):
            return None
        bb = importer.block_builder
        x = bb.emit(relax.op.reshape(importer.env[node.args[0]], g_shape))
        wv = importer.env[node.args[1]]
        bnode = node.args[2] if len(node.args) > 2 else None
        bv = None if bnode is None else importer.env[bnode]
        if groups > 1:
            wv = bb.emit(relax.op.reshape(wv, (groups, cog, cig, kh, kw)))
        shape = (groups, cog, cig, kh, kw) if groups > 1 else w_shape
        lanes = vector_lanes(target)
        residual, clamp = _fused_epilogue(node, importer, groups == 1)
        y = k.emit_flat_conv(bb, x, np.broadcast_to(np.float32(0), shape), None, g_shape, s, full, clamp,
                             None if residual is None else importer.env[residual], lanes >= 8, per_sample=groups > 1,
                             lanes=lanes, registers=vector_registers(target),
                             cores=target_cores(target), weights=(wv, bv))
        return bb.emit(relax.op.reshape(y, tuple(int(d) for d in node.meta["val"].shape)))

    def _full_padding(node, pads) -> tuple:
        """(top, bottom, left, right) of a conv node, with a zero pad before it that was left out (`pads`)."""
        ph, pw = int(node.args[4][0]), int(node.args[4][1])
        left, right, top, bottom = pads if pads is not None else (0, 0, 0, 0)
        return (ph + top, ph + bottom, pw + left, pw + right)

    def _emit_conv(bb, x, w, b, x_shape, kind: str, stride: int, full: tuple, clamp, residual):
        """A float conv on graphopt's kernel `kind` (`_conv_kernel`), with bias, clamp and residual in its store."""
        from graphopt.targets.tvm.cpu import conv as k
        from graphopt.targets.tvm.cpu.rules import target_cores, vector_lanes, vector_registers
        if kind == "pointwise":
            return k.emit_conv1x1(bb, x, w, b, x_shape, vector_lanes(target), clamp, residual)
        # a conv of one row (conv1d: TCNs, audio) takes im2col + the packed GEMM below, not the flat / pixel-row
        # kernels: interleaved on a Zen 3, 64 -> 64 k5 at 1000 steps 0.585 -> 0.380 ms, 128 k3 at 500 0.549 ->
        # 0.425, 256 k3 at 250 1.075 -> 0.986, 32 -> 64 k7 at 4000 1.265 -> 0.943, 512 k3 at 100 1.676 -> 1.182
        one_row = int(x_shape[2]) == 1 and int(w.shape[2]) == 1 and kind == "im2col"
        if not one_row and (kind == "im2col" or (kind == "direct" and w.shape[1] > 8)) and (
                k.tok_conv_applies(w.shape, stride) or k.flat_conv_applies(x_shape, w.shape, stride, full)):
            lanes = vector_lanes(target)
            return k.emit_flat_conv(bb, x, w, b, x_shape, stride, full, clamp, residual, lanes >= 8, lanes=lanes,
                                    registers=vector_registers(target), cores=target_cores(target))
        if kind == "direct" and k.staged_conv_applies(x_shape, w.shape, stride, full):
            return k.emit_flat_conv(bb, x, w, b, x_shape, stride, full, clamp, None, vector_lanes(target) >= 8,
                                    stem=True)
        if kind == "im2col" or (kind == "direct" and k.rows_too_narrow(x_shape, w.shape, stride, full)):
            return k.emit_im2col_conv(bb, x, w, b, x_shape, stride, full, vector_lanes(target), clamp, residual)
        if kind == "depthwise":
            return k.emit_depthwise(bb, x, w, b, x_shape, stride, full, clamp, lanes=vector_lanes(target),
                                    cores=target_cores(target))
        return k.emit_direct_conv(bb, x, w, b, x_shape, stride, full, clamp)

    def _grouped_conv(node, importer, x_shape, wt, bt, pads, groups: int, conv_args=None, full=None):
        """A grouped conv that is not depthwise (ResNeXt, RegNet, ShuffleNet; depthwise with a channel multiplier).
        At batch 1 a k x k one is one call of the flat conv, or of im2col + the packed GEMM, whose samples are the
        groups, each with its own packed weights, the threads splitting the groups (`per_sample`); otherwise one
        dense conv per group on its slice of the channels, concatenated. TVM's grouped conv2d under the schedule
        rules took 31x PyTorch's time (64 channels in 4 groups at 28x28: 5.0 ms against 0.16)."""
        from tvm import relax

        from graphopt.targets.tvm.cpu import conv as k
        n, cin = int(x_shape[0]), int(x_shape[1])
        cout = int(wt.shape[0])
        cig, cog = cin // groups, cout // groups
        g_shape = (n, cig, *(int(d) for d in x_shape[2:]))
        conv_args = tuple(node.args[3:8]) if conv_args is None else conv_args  # (a conv1d's, as 2-D: `_conv1d`)
        kind = _conv_kernel(g_shape, (cog, *wt.shape[1:]), (*conv_args, 1))
        if kind is None and full is None and len(x_shape) == 4:
            y = _grouped_dilated_conv(node, importer, x_shape, wt, bt, pads, groups, g_shape)
            if y is not None:
                return y
        if kind is None or kind == "depthwise":
            return None if full is not None else importer._convolution(node)
        _, clamp = _fused_epilogue(node, importer, False)
        bb = importer.block_builder
        w, b = wt.detach().numpy(), None if bt is None else bt.detach().numpy()
        s, full = int(conv_args[0][0]), _full_padding(node, pads) if full is None else full
        if n == 1 and kind in ("im2col", "direct") and k.flat_conv_applies(g_shape, w.shape, s, full):
            # the groups as the samples of one flat conv call, each with its own weights: [1, C, H, W] is [groups,
            # C / groups, H, W] as it lies, and so is the output (no split, no concat, one launch). Per group with
            # a concat: 64 channels in 4 groups at 28x28 134-152 us, this way 95-108 (ORT 85-95)
            from graphopt.targets.tvm.cpu.rules import vector_lanes
            x = bb.emit(relax.op.reshape(importer.env[node.args[0]], (groups, cig, *g_shape[2:])))
            y = k.emit_flat_conv(bb, x, w.reshape(groups, cog, *w.shape[1:]),
                                 None if b is None else b.reshape(groups, cog), (groups, cig, *g_shape[2:]), s, full,
                                 clamp, None, vector_lanes(target) >= 8, per_sample=True,
                                 lanes=vector_lanes(target))
            return bb.emit(relax.op.reshape(y, tuple(int(d) for d in node.meta["val"].shape)))
        if n == 1 and kind == "im2col":  # (RegNet's strided grouped convs: 28 groups at 28x28, 770 -> 176-203 us)
            from graphopt.targets.tvm.cpu.rules import vector_lanes
            x = bb.emit(relax.op.reshape(importer.env[node.args[0]], (groups, cig, *g_shape[2:])))
            y = k.emit_im2col_conv(bb, x, w.reshape(groups, cog, *w.shape[1:]),
                                   None if b is None else b.reshape(groups, cog), (groups, cig, *g_shape[2:]), s,
                                   full, vector_lanes(target), clamp, per_sample=True)
            return bb.emit(relax.op.reshape(y, tuple(int(d) for d in node.meta["val"].shape)))
        x = bb.emit(relax.op.reshape(importer.env[node.args[0]], (n, cin, *g_shape[2:])))
        parts = bb.emit(relax.op.split(x, groups, axis=1))
        ys = [_emit_conv(bb, bb.emit(relax.TupleGetItem(parts, g)), w[g * cog:(g + 1) * cog],
                         None if b is None else b[g * cog:(g + 1) * cog], g_shape, kind, s, full, clamp, None)
              for g in range(groups)]
        return bb.emit(relax.op.reshape(_join_groups(bb, ys), tuple(int(d) for d in node.meta["val"].shape)))

    GROUPED_DILATED_MIN_CHANNELS = 4  # a group's input channels (fewer: depthwise-like, one-channel GEMMs)
    GROUPED_DILATED_MAX_SPLIT = 8  # groups run as separate pixel-row convs (more: one call each, then a concat;
    # a dilated depthwise conv at batch 2 as 32 of them took 2.6x TVM's time)

    def _grouped_dilated_conv(node, importer, x_shape, wt, bt, pads, groups: int, g_shape):
        """A grouped conv with one dilation d > 1 (SKNet's and ResNeSt's dilated branches, grouped ASPP): each group
        on the pixel-row conv with taps d apart, concatenated (at batch 1, where the cores divide the groups, one
        call whose samples are the groups); at batch 1, where a group's columns are at most 2^17
        values or the stride is 2, dilated im2col + the packed GEMM with the groups as samples, each with its own
        weights (one call). Alone, interleaved, 2 threads (emeraldrapids), pixel-row / im2col time: 32 channels a
        group at 28x28 0.82x, 16 at 56x56 0.76x; 16 at 16x16 1.62x, 32 at 14x14 1.15x, 32 at 33x33 stride 2 1.42x.
        TVM's grouped dilated conv2d took 43x ORT's time (128 channels in 4 groups at 28x28, d 2: 37 ms)."""
        from tvm import relax

        from graphopt.targets.tvm.cpu import conv as k
        from graphopt.targets.tvm.cpu.rules import vector_lanes
        stride, _, dilation, transposed = node.args[3:7]
        d, s = int(dilation[0]), int(stride[0])
        if transposed or d < 2 or len(set(int(v) for v in dilation)) != 1 or len(set(int(v) for v in stride)) != 1:
            return None
        n, cin = int(x_shape[0]), int(x_shape[1])
        cig, cog = cin // groups, int(wt.shape[0]) // groups
        kh, kw = int(wt.shape[2]), int(wt.shape[3])
        full = _full_padding(node, pads)
        oh = (int(x_shape[2]) + int(full[0]) + int(full[1]) - d * (kh - 1) - 1) // s + 1
        ow = (int(x_shape[3]) + int(full[2]) + int(full[3]) - d * (kw - 1) - 1) // s + 1
        if oh < 1 or ow < 1 or cig * kh * kw * oh * ow > 1 << 20 or cig < GROUPED_DILATED_MIN_CHANNELS:
            return None  # (dilated depthwise convs keep TVM's: 1x64x56x56 383 us there, 491 either way here)
        w, b = wt.detach().numpy(), None if bt is None else bt.detach().numpy()
        bb = importer.block_builder
        tok = k.tok_conv_applies(wt.shape, s) and groups <= GROUPED_DILATED_MAX_SPLIT
        if n == 1 and (not tok or s > 1 or cig * kh * kw * oh * ow <= 1 << 17):
            _, clamp = _fused_epilogue(node, importer, False)
            x = bb.emit(relax.op.reshape(importer.env[node.args[0]], (groups, cig, *g_shape[2:])))
            y = k.emit_im2col_conv(bb, x, w.reshape(groups, cog, cig, kh, kw),
                                   None if b is None else b.reshape(groups, cog), (groups, cig, *g_shape[2:]), s,
                                   full, vector_lanes(target), clamp, dilation=d, per_sample=True)
            return bb.emit(relax.op.reshape(y, tuple(int(v) for v in node.meta["val"].shape)))
        if not tok:
            return None
        _, clamp = _fused_epilogue(node, importer, False)
        from graphopt.targets.tvm.cpu.rules import target_cores
        if n == 1 and groups % max(1, target_cores(target)) == 0:
            # one pixel-row call, the groups its samples with their own weights, the threads splitting them (no
            # split, no concat): interleaved on a Zen 3, 0.90-0.91x the per-group calls' time for 128 channels in
            # 4 groups at 28x28 d2 (SKNet), 0.91-0.94x 256 in 8, 0.92-0.93x 128 in 4 at 40x40 d3, 0.99x 64 in 2
            x = bb.emit(relax.op.reshape(importer.env[node.args[0]], (groups, cig, *g_shape[2:])))
            y = k.emit_flat_conv(bb, x, w.reshape(groups, cog, cig, kh, kw),
                                 None if b is None else b.reshape(groups, cog), (groups, cig, *g_shape[2:]), s, full,
                                 clamp, per_sample=True, lanes=vector_lanes(target), dilation=d)
            return bb.emit(relax.op.reshape(y, tuple(int(v) for v in node.meta["val"].shape)))
        parts = bb.emit(relax.op.split(importer.env[node.args[0]], groups, axis=1))
        ys = [k.emit_flat_conv(bb, bb.emit(relax.TupleGetItem(parts, g)), w[g * cog:(g + 1) * cog],
                               None if b is None else b[g * cog:(g + 1) * cog], g_shape, s, full, clamp,
                               lanes=vector_lanes(target), dilation=d)
              for g in range(groups)]
        return bb.emit(relax.op.reshape(_join_groups(bb, ys), tuple(int(v) for v in node.meta["val"].shape)))

    def _conv3d(node, importer, x_shape, wt, bt):
        """A dense 3-D conv (video, volumetric models) as a 2-D one over the output depths as samples: sample (n,
        o) stacks, for each depth tap t, the input slice at depth o sd + t - pd (zeros outside) as channels (c, t),
        so the weight [Cout, C, kd, kh, kw] is a 2-D one with C kd input channels and graphopt's kernels take it
        (a copy of kd times the input); the outputs [N OD, Cout, OH, OW] go back to [N, Cout, OD, OH, OW]. TVM's
        conv3d under the rules took 3-3.4x PyTorch's time (16 and 64 channels, 8x28x28: 12.5 -> 0.69 ms and 145 ->
        9.7 ms), 19x on a (3, 7, 7) stride (1, 2, 2) RGB stem (16.9 -> 0.95 ms). None where no 2-D kernel takes it
        (uneven H / W strides or dilations, dilation in depth, transposed). (kd, 1, 1) kernels of stride 1
        (R(2+1)D's temporal convs, 3-D UNets' 1x1x1 heads) need no copy: a 2-D conv with a kd x 1 kernel over
        [N, C, D, H W]; TVM's conv3d took 2.8 ms for 16 channels over 8x56x56 with 3 taps (7 GMAC/s). A conv dilated
        in H and W alike (not in depth) runs the pixel-row conv with its taps that far apart over the depth taps
        (C3D-style nets' dilated 3x3x3 convs had TVM's conv3d: a 64-channel one at 4x8x8 most of a 13.3 ms model,
        1.0 ms int8)."""
        from tvm import relax

        from graphopt.ir.quant_ops import depth_tap_count
        from graphopt.targets.tvm.cpu import conv as kc
        stride, padding, dilation, transposed = node.args[3:7]
        dl = int(dilation[1])
        if (transposed or int(dilation[0]) != 1 or int(dilation[2]) != dl or int(stride[1]) != int(stride[2])
                or dl > 1 and not kc.tok_conv_applies(wt.shape[:2] + wt.shape[3:], int(stride[1]))):
            return None
        n, c, dd, h, wd = (int(v) for v in x_shape)
        cout, _, kd, kh, kw = (int(v) for v in wt.shape)
        sd, s = int(stride[0]), int(stride[1])
        pd, ph, pw = (int(v) for v in padding)
        if (kh, kw) == (1, 1):
            return _temporal_conv3d(node, importer, x_shape, wt, bt) if dl == 1 else None
        od = depth_tap_count(dd, kd, sd, pd)
        sub = (n * od, c * kd, h, wd)
        kind = _conv_kernel(sub, (cout, c * kd, kh, kw), ([s, s], [ph, pw], [1, 1], False, None, 1))
        if kind in (None, "depthwise") and dl == 1 or od < 1:
            return None
        _, clamp = _fused_epilogue(node, importer, False)
        bb = importer.block_builder
        x = kc.emit_depth_taps(bb, importer.env[node.args[0]], x_shape, kd, sd, pd, od)
        w = wt.detach().numpy().reshape(cout, c * kd, kh, kw)
        b = None if bt is None else bt.detach().numpy()
        if dl > 1:
            from graphopt.targets.tvm.cpu.rules import vector_lanes
            y = kc.emit_flat_conv(bb, x, w, b, sub, s, (ph, ph, pw, pw), clamp, lanes=vector_lanes(target),
                                  dilation=dl)
        else:
            y = _emit_conv(bb, x, w, b, sub, kind, s, (ph, ph, pw, pw), clamp, None)
        oh, ow = (int(v) for v in node.meta["val"].shape[3:])
        y = bb.emit(relax.op.reshape(y, (n, od, cout, oh, ow)))
        return bb.emit(relax.op.permute_dims(y, [0, 2, 1, 3, 4]))

    def _temporal_conv3d(node, importer, x_shape, wt, bt):
        """A (kd, 1, 1) conv3d of stride 1, padded in depth only, as a 2-D conv over [N, C, D, H W] with a kd x 1
        kernel (`_conv3d`); None where no graphopt kernel takes that or the conv has other strides / padding."""
        from tvm import relax

        from graphopt.ir.quant_ops import depth_tap_count
        stride, padding = node.args[3:5]
        if any(int(v) != 1 for v in stride) or int(padding[1]) or int(padding[2]):
            return None
        n, c, dd, h, wd = (int(v) for v in x_shape)
        cout, kd, pd = int(wt.shape[0]), int(wt.shape[2]), int(padding[0])
        x4, w4 = (n, c, dd, h * wd), wt.detach().numpy().reshape(cout, c, kd, 1)
        kind = _conv_kernel(x4, w4.shape, ([1, 1], [pd, 0], [1, 1], False, None, 1))
        if kind in (None, "depthwise"):
            return None
        residual, clamp = _fused_epilogue(node, importer, kind in ("pointwise", "im2col"))
        bb = importer.block_builder
        od = depth_tap_count(dd, kd, 1, pd)
        y = _emit_conv(bb, bb.emit(relax.op.reshape(importer.env[node.args[0]], x4)), w4,
                       None if bt is None else bt.detach().numpy(), x4, kind, 1, (pd, pd, 0, 0), clamp,
                       None if residual is None else bb.emit(relax.op.reshape(importer.env[residual],
                                                                              (n, cout, od, h * wd))))
        return bb.emit(relax.op.reshape(y, tuple(int(v) for v in node.meta["val"].shape)))

    def _conv1d(node, importer, x_shape, wt, bt, groups: int = 1):
        """A 1-D conv [N, C, L] (audio, time series, TCNs) as a 2-D one on a [N, C, 1, L] map with a 1 x k
        kernel, on graphopt's kernels (None where none takes it): TVM's conv1d under the rules took 21x PyTorch's
        time (64 channels, length 1000, 5 taps: 6.1 ms against 0.29). Grouped ones (wav2vec2 / HuBERT's
        positional conv: 16 groups, 128 taps in the base models) as `_grouped_conv` over that map: TVM's took 2.9
        ms for 64 channels in 4 groups, 16 taps, length 199 (1.1 GMAC/s), most of a small wav2vec2's time."""
        from tvm import relax
        from graphopt.targets.tvm.cpu import conv as kc
        from graphopt.targets.tvm.cpu.rules import vector_lanes
        stride, padding, dilation, transposed = node.args[3:7]
        n, c, length = (int(v) for v in x_shape)
        s, p, k, d = int(stride[0]), int(padding[0]), int(wt.shape[2]), int(dilation[0])
        x4, w4 = (n, c, 1, length), wt.reshape(int(wt.shape[0]), int(wt.shape[1]), 1, k)
        if transposed or (d != 1 and (groups != 1 or not kc.tok_conv_applies(w4.shape, s)
                                      or length + 2 * p < d * (k - 1) + 1)):
            return None
        if d != 1:  # a dilated one (TCNs, WaveNet) on the pixel-row conv, its taps d apart (`_dilated_conv`)
            residual, clamp = _fused_epilogue(node, importer, True)
            bb = importer.block_builder
            y = kc.emit_flat_conv(bb, bb.emit(relax.op.reshape(importer.env[node.args[0]], x4)), w4.detach().numpy(),
                                  None if bt is None else bt.detach().numpy(), x4, s, (0, 0, p, p), clamp,
                                  None if residual is None else importer.env[residual], lanes=vector_lanes(target),
                                  dilation=d)
            return bb.emit(relax.op.reshape(y, tuple(int(v) for v in node.meta["val"].shape)))
        if groups > 1 and _conv_kernel(x4, w4.shape, ([s, s], [0, p], [1, 1], False, None, groups)) == "depthwise":
            # (Conformer's and ConvNeXt-1D's depthwise convs, 15-31 taps: TVM's conv1d took 92 us for 256 channels
            # at length 256, 15 taps, with its SiLU)
            _, clamp = _fused_epilogue(node, importer, False)
            bb = importer.block_builder
            y = _emit_conv(bb, bb.emit(relax.op.reshape(importer.env[node.args[0]], x4)), w4.detach().numpy(),
                           None if bt is None else bt.detach().numpy(), x4, "depthwise", s, (0, 0, p, p), clamp, None)
            return bb.emit(relax.op.reshape(y, tuple(int(v) for v in node.meta["val"].shape)))
        if groups > 1:
            return _grouped_conv(node, importer, x4, w4, bt, None, groups, ([s, s], [0, p], [1, 1], False, [0, 0]),
                                 (0, 0, p, p))
        kind = _conv_kernel(x4, w4.shape, ([s, s], [0, p], [1, 1], False, None, 1))
        if kind in (None, "depthwise"):
            return None
        _, clamp = _fused_epilogue(node, importer, False)
        bb = importer.block_builder
        y = _emit_conv(bb, bb.emit(relax.op.reshape(importer.env[node.args[0]], x4)), w4.detach().numpy(),
                       None if bt is None else bt.detach().numpy(), x4, kind, s, (0, 0, p, p), clamp, None)
        return bb.emit(relax.op.reshape(y, tuple(int(v) for v in node.meta["val"].shape)))

    def _one_pixel_pointwise(node, x_shape, wt, groups: int) -> bool:
        """A 1x1 conv on 1x1 maps (classifier heads written as convs: MobileNetV3's 960 -> 1280, SqueezeNet; SE
        blocks' squeeze and excite): a linear layer over the channels."""
        padding, transposed = node.args[4], node.args[6]
        return (len(x_shape) == 4 and int(x_shape[2]) * int(x_shape[3]) == 1 and tuple(wt.shape[2:]) == (1, 1)
                and groups == 1 and not transposed and all(int(v) == 0 for v in padding))

    def _pixel_linear(node, importer, x_shape, wt, bt):
        """`_one_pixel_pointwise` convs on the packed GEMV (one sample) or GEMM: TVM's conv2d under the rules took
        4.4x PyTorch's time (512 -> 1000: 239 us against 55). None where neither takes the shape."""
        from graphopt.targets.tvm.cpu.gemm import emit_packed_gemv, emit_packed_linear
        from graphopt.targets.tvm.cpu.rules import vector_lanes
        bb = importer.block_builder
        n, cin, cout = int(x_shape[0]), int(x_shape[1]), int(wt.shape[0])
        w = wt.detach().numpy().reshape(cout, cin)
        b = None if bt is None else bt.detach().numpy().astype("float32")
        x = bb.emit(relax.op.reshape(importer.env[node.args[0]], (n, cin)))
        if n == 1:
            y = emit_packed_gemv(bb, x, w, b, cin, vector_lanes(target))
        else:
            y = emit_packed_linear(bb, x, w, None if b is None else relax.const(b), (n, cin), vector_lanes(target))
        return None if y is None else bb.emit(relax.op.reshape(y, (n, cout, 1, 1)))

    def _transposed_conv(node, importer, x_shape, wt, bt):
        """A transposed conv (1-D or 2-D, one group, no dilation; DCGAN/UNet decoders' 4x4 stride 2, HiFi-GAN's
        upsamplers) as one ordinary conv and a pixel shuffle. Output pixel o = i s - p + t (tap t of input i) has
        phase r = (o + p) mod s and reads only taps t = r + s j, so with q = (o + p - r) / s the phase is
        y_r[q] = sum_j x[q - j] w[r + s j]: a stride-1 conv with a ceil(k / s)-tap kernel, flipped, on the input
        padded by ceil(k / s) - 1. The s_h s_w phases share that input, so their kernels stack as s_h s_w Cout
        output channels of one conv on graphopt's kernels (as many MACs as the transposed conv); its outputs
        interleave (full row q s + r) and the rows before p and after the output are cut. TVM's conv2d_transpose
        under the schedule rules took 90x PyTorch's time (4x4, stride 2, 128 -> 64 channels at 14x14: 33 ms
        against 0.36). None where no graphopt kernel takes the phase conv."""
        import numpy as np
        import torch
        from tvm import relax

        from graphopt.passes.canonicalize.transposed import fold_pays, phase_plan, phase_weight
        stride, padding, dilation, _, out_pad = node.args[3:8]
        if len(x_shape) not in (3, 4):
            return None
        one_d = len(x_shape) == 3
        lift = (lambda v, fill: [fill, int(v[0])]) if one_d else (lambda v, fill: [int(a) for a in v])
        (sh, sw), (ph, pw), (oph, opw) = lift(stride, 1), lift(padding, 0), lift(out_pad, 0)
        dh, dw = lift(dilation, 1)
        n, cin, h, wd = (int(x_shape[0]), int(x_shape[1]), 1, int(x_shape[2])) if one_d else map(int, x_shape)
        w = wt.detach().numpy()
        w = w[:, :, None, :] if one_d else w
        cout, kh, kw = int(w.shape[1]), int(w.shape[2]), int(w.shape[3])
        oh, ow = (h - 1) * sh - 2 * ph + dh * (kh - 1) + 1 + oph, (wd - 1) * sw - 2 * pw + dw * (kw - 1) + 1 + opw
        sub = (n, cin, h, wd)
        bb = importer.block_builder
        if (dh, dw) != (1, 1):
            return _transposed_as_fold(node, importer, sub, w, bt, (sh, sw), (ph, pw), (dh, dw), (oh, ow))
        if h == 1 and wd == 1:
            return _one_pixel_transposed(node, importer, w, bt, (ph, pw), (oh, ow))
        jh, qh, pt, pb = phase_plan(h, sh, ph, kh, oh)
        jw, qw, pl, pr = phase_plan(wd, sw, pw, kw, ow)
        qy, qx = h + pt + pb - jh + 1, wd + pl + pr - jw + 1
        if fold_pays((h, wd), (sh, sw), (ph, pw), (kh, kw), (oh, ow)):
            return _transposed_as_fold(node, importer, sub, w, bt, (sh, sw), (ph, pw), (1, 1), (oh, ow))
        g = phase_weight(torch.from_numpy(np.ascontiguousarray(w, np.float32)), (sh, sw), (jh, jw)).numpy()
        kind = _conv_kernel(sub, g.shape, ([1, 1], [pt, pl], [1, 1], False, None, 1))
        if kind in (None, "depthwise"):
            return _transposed_as_fold(node, importer, sub, w, bt, (sh, sw), (ph, pw), (1, 1), (oh, ow))
        _, clamp = _fused_epilogue(node, importer, False)
        b = None if bt is None else np.tile(bt.detach().numpy().astype(np.float32), sh * sw)
        x = bb.emit(relax.op.reshape(importer.env[node.args[0]], sub)) if one_d else importer.env[node.args[0]]
        y = _emit_conv(bb, x, g, b, sub, kind, 1, (pt, pb, pl, pr), clamp, None)
        y = bb.emit(relax.op.reshape(y, (n, sh, sw, cout, qy, qx)))
        y = bb.emit(relax.op.reshape(bb.emit(relax.op.permute_dims(y, [0, 3, 4, 1, 5, 2])),
                                     (n, cout, qy * sh, qx * sw)))
        top, left = ph - qh * sh, pw - qw * sw
        y = bb.emit(relax.op.strided_slice(y, axes=[2, 3], begin=[top, left], end=[top + oh, left + ow]))
        return bb.emit(relax.op.reshape(y, (n, cout, ow))) if one_d else y

    def _transposed_as_fold(node, importer, sub, w, bt, stride, padding, dilation, out_hw):
        """A transposed conv as a GEMM and F.fold: the pointwise conv with the weight as [Cout kh kw, Cin] gives
        every input pixel's Cout x kh x kw block, and `emit_col2im` adds the blocks into the output (bias and a
        fused ReLU in its store). As many MACs as the transposed conv, where the phase conv computes a row and a
        column more per phase (the phases share one padded input): on small maps that is most of it (4 x 4, k 4,
        stride 2: 5 x 5 phase outputs for 4 x 4 rows of output, 1.56x; a DCGAN's 256 -> 128 layer at batch 8,
        2.4 against 0.97 ms for the GEMM alone). Dilated ones take this way too (the phases assume taps 1 apart;
        TVM's conv2d_transpose had them). None where no pointwise kernel takes the GEMM."""
        import numpy as np
        from tvm import relax

        from graphopt.targets.tvm.cpu.conv import emit_col2im
        n, cin, h, wd = sub
        cout, kh, kw = (int(v) for v in w.shape[1:])
        rows = np.ascontiguousarray(w.transpose(1, 2, 3, 0).reshape(cout * kh * kw, cin, 1, 1), np.float32)
        if _conv_kernel(sub, rows.shape, ([1, 1], [0, 0], [1, 1], False, None, 1)) != "pointwise":
            return None
        _, clamp = _fused_epilogue(node, importer, False)
        bb = importer.block_builder
        x = importer.env[node.args[0]]
        x = bb.emit(relax.op.reshape(x, sub)) if len(node.args[0].meta["val"].shape) == 3 else x
        cols = _emit_conv(bb, x, rows, None, sub, "pointwise", 1, (0, 0, 0, 0), None, None)
        b = None if bt is None else bt.detach().numpy().astype(np.float32)
        y = emit_col2im(bb, cols, n, cout, (kh, kw), (h, wd), out_hw, stride, padding, dilation, b, clamp)
        return bb.emit(relax.op.reshape(y, tuple(int(v) for v in node.meta["val"].shape)))

    def _one_pixel_transposed(node, importer, w, bt, padding, out_hw):
        """A transposed conv of a 1 x 1 map (DCGAN's and other generators' first layer, z [N, Cin, 1, 1] -> Cout x
        4 x 4): output pixel o is tap o + p of the kernel (zero past it), so the layer is a linear with Cout OH OW
        outputs on the packed GEMV / GEMM. As a phase conv over the map padded by k - 1 no kernel took it, and
        TVM's conv2d_transpose took 7.2 ms (batch 8, 64 -> 256 channels, 4 x 4: 2 M MACs)."""
        import numpy as np
        from tvm import relax

        from graphopt.targets.tvm.cpu.gemm import emit_packed_gemv, emit_packed_linear
        from graphopt.targets.tvm.cpu.rules import vector_lanes
        cin, cout, kh, kw = (int(v) for v in w.shape)
        (ph, pw), (oh, ow) = padding, out_hw
        rows = np.zeros((cout, oh, ow, cin), np.float32)
        ys, xs = slice(ph, min(kh, ph + oh)), slice(pw, min(kw, pw + ow))
        taps = w[:, :, ys, xs].transpose(1, 2, 3, 0)
        rows[:, :taps.shape[1], :taps.shape[2]] = taps
        b = None if bt is None else np.repeat(bt.detach().numpy().astype(np.float32), oh * ow)
        bb = importer.block_builder
        n = int(node.args[0].meta["val"].shape[0])
        x = bb.emit(relax.op.reshape(importer.env[node.args[0]], (n, cin)))
        rows = rows.reshape(cout * oh * ow, cin)
        y = (emit_packed_gemv(bb, x, rows, b, cin, vector_lanes(target)) if n == 1 else
             emit_packed_linear(bb, x, rows, None if b is None else relax.const(b), (n, cin), vector_lanes(target)))
        if y is None:
            return None
        return bb.emit(relax.op.reshape(y, tuple(int(v) for v in node.meta["val"].shape)))

    def _uneven_stride_applies(node, x_shape, wt, groups: int) -> bool:
        """A dense conv whose strides along H and W differ (text recognizers' and spectrogram CNNs' (2, 1)), no
        dilation, columns im2col copies: the pixel-row conv with its own row and column strides, or, with a short
        reduction (Cin * kh * kw up to `conv.STEM_STEPS`), im2col with its own row stride and the packed GEMM.
        TVM's conv took 11.6x PyTorch's time (64 channels at 28x28, 3x3, stride (2, 1): 4.7 ms against 0.40).
        Pixel-row / im2col time (conv + ReLU, interleaved, 2 threads, Zen 3): 64 -> 64 at 28x28 (2, 1) 0.192 /
        0.215 ms, 128 -> 128 at 16x64 0.842 / 1.190 (ORT 0.830), 256 -> 256 at 8x32 0.844 / 0.877, 32 -> 64 at
        32x100 0.351 / 0.372, 64 -> 64 at 40x40 (1, 2) 0.352 / 0.378; 1 -> 32 at 64x256 0.197 / 0.097."""
        from graphopt.targets.tvm.cpu import conv as k
        stride, padding, dilation, transposed = node.args[3:7]
        if (len(x_shape) != 4 or groups != 1 or transposed or any(int(v) != 1 for v in dilation)
                or len(stride) != 2 or int(stride[0]) == int(stride[1])):
            return False
        kh, kw = int(wt.shape[2]), int(wt.shape[3])
        oh = (int(x_shape[2]) + 2 * int(padding[0]) - kh) // int(stride[0]) + 1
        ow = (int(x_shape[3]) + 2 * int(padding[1]) - kw) // int(stride[1]) + 1
        return oh >= 1 and ow >= 1 and k.im2col_pays(int(wt.shape[1]), kh, kw, oh * ow)

    def _dilated_im2col_applies(node, x_shape, wt) -> bool:
        """A dense conv with one dilation d > 1 (DeepLab's atrous convs), square stride, that the pixel-row conv
        does not take (`_dilated_applies`: stride 3 and up): im2col with taps d apart and one packed GEMM over the
        whole map, where the columns are at most 1M values (or, strided, where `conv.im2col_pays`). At stride 1 the
        pixel-row conv took 0.70-1.03x this one's time (alone, interleaved, 2 threads, Zen 4: 32 channels at 32x32
        d2 0.70x, 16 at 17x17 d4 0.76x, 64 at 28x28 d2 0.93x; 64 -> 64 at 56x56 d2 stride 2 1.02x).
        At stride 2 TVM's dilated conv had taken 11.5x PyTorch's time."""
        from graphopt.targets.tvm.cpu import conv as k
        stride, padding, dilation, transposed = node.args[3:7]
        groups = int(node.args[8]) if len(node.args) > 8 else 1
        d, s = int(dilation[0]), int(stride[0])
        if (len(x_shape) != 4 or groups != 1 or transposed or d < 2 or len(set(int(v) for v in dilation)) != 1
                or len(set(int(v) for v in stride)) != 1):
            return False
        kh, kw = int(wt.shape[2]), int(wt.shape[3])
        oh = (int(x_shape[2]) + 2 * int(padding[0]) - d * (kh - 1) - 1) // s + 1
        ow = (int(x_shape[3]) + 2 * int(padding[1]) - d * (kw - 1) - 1) // s + 1
        values = int(wt.shape[1]) * kh * kw * oh * ow
        return oh >= 1 and ow >= 1 and k.im2col_pays(int(wt.shape[1]), kh, kw, oh * ow) and (
            s > 1 or values <= 1 << 20)

    def _dilated_applies(node, x_shape, wt) -> bool:
        """A dense conv with one dilation d > 1 and square stride 1 or 2 (DeepLab's atrous convs): the pixel-row
        conv with its taps d apart (`_dilated_conv`)."""
        from graphopt.targets.tvm.cpu import conv as k
        stride, padding, dilation, transposed = node.args[3:7]
        groups = int(node.args[8]) if len(node.args) > 8 else 1
        d, s = int(dilation[0]), int(stride[0])
        if (len(x_shape) != 4 or groups != 1 or transposed or d < 2 or len(set(int(v) for v in dilation)) != 1
                or len(set(int(v) for v in stride)) != 1 or not k.tok_conv_applies(wt.shape, s)):
            return False
        oh = (int(x_shape[2]) + 2 * int(padding[0]) - d * (int(wt.shape[2]) - 1) - 1) // s + 1
        ow = (int(x_shape[3]) + 2 * int(padding[1]) - d * (int(wt.shape[3]) - 1) - 1) // s + 1
        return oh >= 1 and ow >= 1

    def _dilated_conv(node, importer, x_shape, wt, bt):
        """A dilated conv on the pixel-row conv, which reads its taps d apart in the zero-padded map (each tap a
        broadcast wherever it lies), bias / residual / clamp in its store. It had run as an ordinary conv over the
        d x d phase images (TF's space-to-batch), whose splitting and interleaving copies took more than the conv:
        DeepLab's ASPP at 128x128 (64 -> 16 channels, d 2 / 4 / 6) 2.7-3.3 ms a branch in copies against 1.6 in
        the conv. TVM's dilated conv2d under the rules took 13x PyTorch's time (64 channels at 28x28, d 2: 4.4 ms
        against 0.33)."""
        from graphopt.targets.tvm.cpu import conv as k
        from graphopt.targets.tvm.cpu.rules import vector_lanes
        residual, clamp = _fused_epilogue(node, importer, True)
        return k.emit_flat_conv(importer.block_builder, importer.env[node.args[0]], wt.detach().numpy(),
                                None if bt is None else bt.detach().numpy(), x_shape, int(node.args[3][0]),
                                _full_padding(node, None), clamp,
                                None if residual is None else importer.env[residual], lanes=vector_lanes(target),
                                dilation=int(node.args[5][0]))

    fused_adds: dict = {}  # add node -> the conv whose kernel computed it

    expanded_dw: dict = {}  # depthwise conv node -> the fused kernel's output that computed it

    def _expand_depthwise(node, importer, x_shape, wt, bt):
        """A pointwise conv whose output (after a lone clamp) meets only a depthwise conv that graphopt's row
        kernel would run, as one fused kernel (`conv.expand_dw_source`: the expanded map is never stored), or one
        the 16-channel group kernel would run on a 14x14-like map (`conv.expand_cb_applies`); both clamps go into
        it, and a zero pad between them whose output is "same"'s size (TF "SAME" at stride 2: EfficientNet-Lite0's
        four stride-2 layers, `conv.expand_pads`). None where neither applies or the depthwise is not a plain
        float one."""
        import torch

        from graphopt.targets.tvm.cpu import conv as k
        from graphopt.targets.tvm.cpu.rules import target_cores, vector_lanes
        users = list(node.users)
        head = users[0] if len(users) == 1 and _clamp_of(users[0]) is not None else node
        after = list(head.users)
        if len(users) != 1 or len(after) != 1:
            return None
        dw, pad = after[0], None
        if getattr(dw.target, "__name__", "") == "constant_pad_nd.default":
            pad, later = dw, list(dw.users)
            if not _zero_hw_pad(pad) or len(later) != 1:
                return None
            dw = later[0]
        if getattr(dw.target, "__name__", "") != "convolution.default" or dw.args[0] is not (pad or head) or dw.kwargs:
            return None
        dwt = (lifted or {}).get(getattr(dw.args[1], "name", None))
        dbn = dw.args[2] if len(dw.args) > 2 else None
        dbt = (lifted or {}).get(getattr(dbn, "name", None)) if dbn is not None else None
        if dwt is None or dwt.dtype != torch.float32 or (dbn is not None and dbt is None) or dwt.dim() != 4:
            return None
        y_shape = head.meta["val"].shape
        stride, padding, dilation = dw.args[3:6]
        kk = int(dwt.shape[-1])
        pads = k.expand_pads(int(y_shape[2]), int(y_shape[3]), kk, int(stride[0]),
                             _full_padding(dw, None if pad is None else tuple(int(q) for q in pad.args[1])))
        if (_conv_kernel(y_shape, dwt.shape, dw.args[3:9]) != "depthwise" or int(dwt.shape[-2]) != kk
                or pads is None or any(int(d) != 1 for d in dilation)):
            return None
        pads = None if pads == (kk // 2, kk // 2) else pads
        plan = k.expand_dw_plan(int(x_shape[1]), int(y_shape[1]), int(x_shape[2]), int(x_shape[3]), kk,
                                int(stride[0]), vector_lanes(target), target_cores(target))
        cb = plan is None and k.expand_cb_applies(int(y_shape[1]), int(x_shape[2]), int(x_shape[3]), kk,
                                                  int(stride[0]), vector_lanes(target))
        if plan is None and not cb:
            return None
        _, clamp_e = _fused_epilogue(node, importer, False)
        _, clamp_d = _fused_epilogue(dw, importer, False)
        weights = (wt.detach().numpy(), None if bt is None else bt.detach().numpy(), dwt.detach().numpy(),
                   None if dbt is None else dbt.detach().numpy())
        x = importer.env[node.args[0]]
        if cb:
            y = k.emit_expand_cb(importer.block_builder, x, *weights, x_shape, int(stride[0]), clamp_e, clamp_d,
                                 target_cores(target), pads)
        else:
            y = k.emit_expand_dw(importer.block_builder, x, *weights, x_shape, int(stride[0]), plan,
                                 vector_lanes(target), clamp_e, clamp_d, pads)
        if pad is not None:  # (its converter then emits nothing)
            fused_acts.add(pad)
        expanded_dw[dw] = y
        return y

    def _fused_epilogue(node, importer, residual_ok: bool):
        """What a conv kernel's store takes over from the ops after `node`: the other operand of a residual add
        (pointwise kernels, `residual_ok`) and a lone clamp (ReLU/ReLU6) after the conv or that add; both are
        marked so their own converters return the kernel's output."""
        users = list(node.users)
        residual = _residual_add(node, importer) if residual_ok else None
        if residual is not None:  # conv -> add(x): the add (and a lone clamp after it) go into the epilogue
            fused_adds[users[0]] = node
            users = list(users[0].users)
        clamp = _clamp_of(users[0]) if len(users) == 1 else None
        if clamp is not None:
            fused_acts.add(users[0])
            clamp = (clamp[0], min(clamp[1], 3.0e38))
        return residual, clamp

    def _residual_add(node, importer):
        """The other operand of an add that is this conv's only user (a residual connection), when the kernel can
        take it: same shape and dtype as the conv's output, no alpha, already computed."""
        users = list(node.users)
        if len(users) != 1 or getattr(users[0].target, "__name__", "") != "add.Tensor" or users[0].kwargs:
            return None
        args = users[0].args
        if len(args) != 2 or sum(a is node for a in args) != 1:
            return None
        other = args[1] if args[0] is node else args[0]
        val, mine = getattr(other, "meta", {}).get("val"), node.meta["val"]
        if (val is None or other not in importer.env or tuple(val.shape) != tuple(mine.shape)
                or val.dtype != mine.dtype):
            return None
        return other

    def cat(node, importer):
        """torch.cat of static-shape tensors of one dtype whose runs per outer index are long (`concat_geometry`)
        as graphopt's copy kernel; others (a rotary embedding's half-rows) stay Relax's, fused with their
        neighbours."""
        from graphopt.targets.tvm.cpu.pool import concat_geometry, emit_concat
        tensors = node.args[0]
        dim = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim", 0)
        vals = [getattr(t, "meta", {}).get("val") for t in tensors]
        if (all(v is not None for v in vals) and len({str(v.dtype) for v in vals}) == 1
                and str(vals[0].dtype) in ("torch.float32", "torch.int8", "torch.uint8")
                and all(isinstance(d, int) for v in vals for d in v.shape)
                and concat_geometry([tuple(v.shape) for v in vals], int(dim)) is not None):
            return emit_concat(importer.block_builder, [importer.env[t] for t in tensors],
                               [tuple(v.shape) for v in vals], int(dim), str(vals[0].dtype).replace("torch.", ""))
        return MORE_OPS["cat.default"](node, importer)  # (legacy empty inputs skipped, as PyTorch does)

    def add(node, importer):
        if node in fused_adds:  # computed by the conv kernel's epilogue
            return importer.env[fused_adds[node]]
        return _builtin(importer, "add.Tensor")(node)

    absorbed_pads: dict = {}

    def _zero_hw_pad(node) -> bool:
        """A constant_pad_nd of zeros on H and W of a 4-D tensor (what a conv kernel can do itself)."""
        value = node.args[2] if len(node.args) > 2 else node.kwargs.get("value", 0)
        return (getattr(node.target, "__name__", "") == "constant_pad_nd.default" and len(node.args[1]) == 4
                and float(value) == 0.0 and len(node.args[0].meta["val"].shape) == 4)

    def constant_pad_nd(node, importer):
        if node in fused_acts:  # left out by a quantized conv; the depthwise conv after it pads instead
            return importer.env[node.args[0]]
        # a zero pad of H and W feeding only a depthwise or direct conv (TF "SAME", often asymmetric) is done by
        # that conv's kernel: no padded copy of the activation
        x_shape = node.args[0].meta["val"].shape
        pad = list(node.args[1])
        value = node.args[2] if len(node.args) > 2 else node.kwargs.get("value", 0)
        zero_hw = _zero_hw_pad(node)
        if all(int(p) == 0 for p in pad):  # TF "SAME" padding works out to none here: no copy (was a kernel call)
            return importer.env[node.args[0]]
        users = list(node.users)
        if (zero_hw and len(users) == 1
                and getattr(users[0].target, "__name__", "") == "convolution.default" and users[0].args[0] is node):
            conv = users[0]
            wt = (lifted or {}).get(getattr(conv.args[1], "name", None))
            if wt is not None and _conv_kernel(x_shape, wt.shape, conv.args[3:9]) in ("depthwise", "direct",
                                                                                       "im2col"):
                absorbed_pads[node] = tuple(int(p) for p in pad)
                return importer.env[node.args[0]]
        # the same pad before an int8 quantize whose every consumer is such a conv (a quantized model's input ahead
        # of a TF "SAME" stem): zero stays exactly zero on the grid (its zero point is in range), so quantizing the
        # unpadded input and letting the conv pad is the same. The padded quantize had no whole-vector length
        # (3 x 225 x 225) and ran scalar: 388 us, 15% of a pruned int7 EfficientNet-Lite0.
        quant = users[0] if len(users) == 1 else None
        if (zero_hw and quant is not None
                and getattr(quant.target, "__name__", "") == "quantize_per_tensor.default"
                and str(quant.args[5]) == "torch.int8" and int(quant.args[3]) <= int(quant.args[2]) <= int(quant.args[4])
                and quant.users and all(_fast_float_conv(u) for u in quant.users)):
            quant_pads[quant] = (*(int(p) for p in pad), x_shape)
            return importer.env[node.args[0]]
        dtype = str(node.args[0].meta["val"].dtype).replace("torch.", "")
        if len(pad) in (2, 4) and min(int(p) for p in pad) >= 0 and dtype == "float32" \
                and len(x_shape) >= len(pad) // 2:
            # graphopt's row kernel; Relax's pad legalized to a per-element select at 14x PyTorch's time (64x64x64
            # by 1: 565 us against 40)
            from graphopt.targets.tvm.cpu.pool import emit_pad
            return emit_pad(importer.block_builder, importer.env[node.args[0]], x_shape, pad, float(value), dtype)
        return _builtin(importer, "constant_pad_nd.default")(node)

    _builtin = builtin_converter

    def _activation(original):
        def convert(node, importer):
            if node in fused_acts:  # already applied in the conv kernel's epilogue
                return importer.env[node.args[0]]
            bounds = _clamp_of(node)
            if bounds is not None and str(node.args[0].meta["val"].dtype) == "torch.float32":
                # as max(lo, min(hi, x)): TVM's max / min keep a NaN in their second operand only (its ReLU,
                # max(x, 0), turned a NaN into 0; PyTorch's keeps it)
                bb, y = importer.block_builder, importer.env[node.args[0]]
                if bounds[1] < float("inf"):
                    y = bb.emit(relax.op.minimum(relax.const(bounds[1], "float32"), y))
                if bounds[0] > float("-inf"):
                    y = bb.emit(relax.op.maximum(relax.const(bounds[0], "float32"), y))
                return y
            return _builtin(importer, original)(node)
        return convert

    def embedding(node, importer):
        """Token ids -> rows with an index that stays in bounds: TVM's own converter casts the ids to int32
        (2**32 + 5 becomes 5) and takes in "fast" mode, which reads past the table on a bad id (a segfault in a
        deployed model). Here an id outside the table gives a row of NaN (the runtime also refuses such inputs
        with the table's range, from the manifest)."""
        bb = importer.block_builder
        w, ids = importer.env[node.args[0]], importer.env[node.args[1]]
        shape = [int(d) for d in node.args[1].meta["val"].shape]
        dim = int(node.args[0].meta["val"].shape[-1])
        if str(node.args[1].meta["val"].dtype) not in ("torch.int32", "torch.int64"):
            ids = bb.emit(relax.op.astype(ids, "int64"))
        mode = "nan" if str(node.args[0].meta["val"].dtype).startswith("torch.float") else "clip"
        rows = bb.emit(relax.op.take(w, bb.emit(relax.op.reshape(ids, (-1,))), axis=0, mode=mode))
        return bb.emit(relax.op.reshape(rows, (*shape, dim)))

    generic = {"embedding.default": embedding, "grid_sampler_2d.default": grid_sampler_2d,
               "upsample_nearest2d.vec": nearest_take, "upsample_nearest3d.vec": nearest_take,
               "upsample_trilinear3d.vec": trilinear,
               **{f"_upsample_{kind}2d_aa.{form}": antialiased(kind) for kind in ("bilinear", "bicubic")
                  for form in ("default", "vec")},
               "qlinear.default": qlinear, "qconv2d.default": qconv2d, "qmatmul.default": qmatmul,
               "qlinear_i32.default": qlinear_i32, "qconv2d_i32.default": qconv2d_i32,
               "requantize.default": requantize, "quantize_per_tensor.default": quantize_per_tensor,
               "dequantize_per_tensor.default": dequantize_per_tensor,
               "dequantize_per_channel.default": dequantize_per_channel,
               "dynamic_quantize.default": dynamic_quantize, "lut.default": lut, "depth_taps.default": depth_taps,
               **MISSING_OPS,
               **MORE_OPS}

    def sparse24_layer(node, wname, x_shape, as_conv, fmt=None):
        """The 2:4 kernel's record for this node's constant weight, or None (dense)."""
        from graphopt.targets.tvm.gpu.sparse import sp24_decision
        wt = (lifted or {}).get(wname)
        fmt = fmt or sparse24.get("format", "f16")
        if wt is None or (fmt == "s8") == wt.is_floating_point():
            return None
        w = wt.detach().float().numpy()
        w = w.reshape(w.shape[0], -1)
        cols = math.prod(int(d) for d in x_shape[:-1]) if not as_conv else int(x_shape[2]) * int(x_shape[3])
        param = sparse24["names"].get(wname, wname)
        chosen = sparse24.get("measured", {}).get(param) or {}
        rec = sp24_decision(param, w, cols, sparse24.get("min_speedup", 1.1), chosen.get("timings_us"),
                            chosen.get("timing_source", "measured"), fmt, sparse24.get("wgmma", False) and not as_conv)
        sparse24["records"][param] = rec
        if rec["choice"] != "sp24":
            return None
        return rec

    def sparse_linear(node, importer):
        x_shape = node.args[0].meta["val"].shape
        wname = getattr(node.args[1], "name", None)
        bname = getattr(node.args[2], "name", None) if len(node.args) > 2 and node.args[2] is not None else None
        bt = (lifted or {}).get(bname) if bname else None
        if sparse24 is not None and str(node.args[0].meta["val"].dtype) == "torch.float32" and \
                (bname is None or bt is not None) and \
                (rec := sparse24_layer(node, wname, x_shape, False)) is not None:
            bb = importer.block_builder
            k = int(x_shape[-1])
            cols = math.prod(int(d) for d in x_shape[:-1])
            x2 = bb.emit(relax.op.reshape(importer.env[node.args[0]], (cols, k)))
            w = lifted[wname].detach().float().numpy()
            y = _emit_24(bb, x2, w, None if bt is None else bt.detach().float().numpy(), cols,
                         sparse24.get("format", "f16"), rec)
            return bb.emit(relax.op.reshape(y, tuple(int(d) for d in node.meta["val"].shape)))
        if gpu_dense is not None and str(node.args[0].meta["val"].dtype) == "torch.float32" and \
                (bname is None or bt is not None):
            y = _dense_tc(importer.block_builder, node, importer.env[node.args[0]], wname,
                          None if bt is None else bt.detach().float().numpy(), gpu_dense.get("format"))
            if y is not None:
                return y
        bias = importer.env[node.args[2]] if len(node.args) > 2 and node.args[2] is not None else None
        return importer.block_builder.emit(relax.op.linear(importer.env[node.args[0]], importer.env[node.args[1]],
                                                           bias, "float32"))

    def sparse_conv(node, importer):
        x_shape = node.args[0].meta["val"].shape
        stride, padding, dilation, transposed, _, groups = node.args[3:9]
        wname = getattr(node.args[1], "name", None)
        wt = (lifted or {}).get(wname)
        bnode = node.args[2] if len(node.args) > 2 else None
        bt = (lifted or {}).get(getattr(bnode, "name", None)) if bnode is not None else None
        pointwise = (wt is not None and wt.dim() == 4 and tuple(wt.shape[2:]) == (1, 1) and len(x_shape) == 4
                     and int(x_shape[0]) == 1 and not transposed and int(groups) == 1
                     and all(int(v) == 1 for v in stride) and all(int(v) == 0 for v in padding)
                     and (bnode is None or bt is not None)
                     and str(node.args[0].meta["val"].dtype) == "torch.float32")
        if pointwise and sparse24 is not None and sparse24_layer(node, wname, x_shape, True) is not None:
            from graphopt.targets.tvm.gpu.sparse import emit_sp24
            bb = importer.block_builder
            c, h, w_ = (int(d) for d in x_shape[1:])
            x2 = bb.emit(relax.op.reshape(importer.env[node.args[0]], (c, h * w_)))
            w = wt.detach().float().numpy().reshape(wt.shape[0], -1)
            y = emit_sp24(bb, x2, w, None if bt is None else bt.detach().float().numpy(), h * w_, "kt",
                          sparse24.get("format", "f16"))
            return bb.emit(relax.op.reshape(y, (1, int(wt.shape[0]), h, w_)))
        return importer._convolution(node)

    def max_pool2d_with_indices(node, importer):
        """The exported form of max pooling: (output, indices), the indices computed only where a user reads them
        (`missing_ops.pool_with_indices`)."""
        from tvm import relax

        from graphopt.targets.tvm.missing_ops import pool_with_indices
        bb = importer.block_builder
        y = max_pool2d(node, importer, "max_pool2d_with_indices.default")
        if isinstance(y.ty, relax.TupleType):  # TVM's converter answered
            y = bb.emit(relax.TupleGetItem(y, 0))
        return pool_with_indices(node, importer, y)

    def adaptive_max_pool2d(node, importer):
        """adaptive_max_pool2d (x, output_size) -> (values, indices); TVM's importer has no converter (CBAM's
        channel attention did not compile). Output 1x1: `_extreme` over H and W (NaN kept), the indices Relax's
        argmax over the flattened map; sizes that divide the map: max pooling with kernel = stride = the quotient
        (graphopt's kernel); uneven windows: the max of each window's rows, then of its columns. No graph may read the
        indices (refused with the node's name)."""
        x_val = node.args[0].meta["val"]
        oh, ow = (int(v) for v in node.args[1])
        bb, x = importer.block_builder, importer.env[node.args[0]]
        if not _static(x_val) or x_val.dim() != 4 or not x_val.dtype.is_floating_point:
            raise UnsupportedOpError(node.name, "aten.adaptive_max_pool2d", "graphopt takes float NCHW maps of "
                                     "static shape; export the model with static input shapes")
        n, c, h, w = (int(d) for d in x_val.shape)
        if (oh, ow) == (1, 1):
            values = _extreme(importer, node.args[0], [2, 3], True, (n, c, 1, 1), "max")
            flat = bb.emit(relax.op.reshape(x, (n, c, h * w)))
            inf = relax.const(float("inf"), str(x_val.dtype).replace("torch.", ""))
            ranked = bb.emit(relax.op.where(bb.emit(relax.op.isnan(flat)), inf, flat))
            idx = bb.emit(relax.op.astype(bb.emit(relax.op.argmax(ranked, axis=2, keepdims=True)), "int64"))
            idx = bb.emit(relax.op.maximum(idx, relax.const(0, "int64")))
            return bb.emit(relax.Tuple([values, bb.emit(relax.op.reshape(idx, (n, c, 1, 1)))]))
        reads_indices = any(getattr(u.target, "__name__", "") != "getitem" or u.args[1] != 0 for u in node.users)
        if reads_indices:
            raise UnsupportedOpError(node.name, "aten.adaptive_max_pool2d", "graphopt computes the values only, "
                                     "without the indices; use nn.MaxPool2d with the window you want")
        if h % oh == 0 and w % ow == 0:
            from graphopt.targets.tvm.cpu.pool import emit_max_pool
            y = emit_max_pool(bb, x, x_val.shape, (h // oh, w // ow), (h // oh, w // ow), (0, 0))
        else:  # uneven windows (a 7x9 map to 3x4; refused before): PyTorch's window i spans
            # [floor(i * size / out), ceil((i + 1) * size / out)); a rectangle's max is its rows' max of column maxima,
            # and a window holding a NaN gives NaN as PyTorch's (Relax's max drops it: a flag map is pooled beside)
            def windows(t):
                for axis, size, out in ((2, h, oh), (3, w, ow)):
                    t = bb.emit(relax.op.concat([bb.emit(relax.op.max(bb.emit(relax.op.strided_slice(
                        t, [axis], [i * size // out], [-(-(i + 1) * size // out)])), axis=[axis], keepdims=True))
                        for i in range(out)], axis=axis))
                return t
            dtype = str(x_val.dtype).replace("torch.", "")
            nan = windows(bb.emit(relax.op.astype(bb.emit(relax.op.isnan(x)), dtype)))
            y = bb.emit(relax.op.where(bb.emit(relax.op.greater(nan, relax.const(0, dtype))),
                                       relax.const(float("nan"), dtype), windows(x)))
        return bb.emit(relax.Tuple([y, bb.emit(relax.op.zeros((n, c, oh, ow), "int64"))]))

    def max_pool2d(node, importer, name: str = "max_pool2d.default"):
        """Float NCHW max pooling on graphopt's kernel (any batch, floor or ceil mode); other cases keep TVM's op."""
        from graphopt.targets.tvm.cpu.pool import emit_max_pool, max_pool_applies
        args = list(node.args) + [None] * (6 - len(node.args))
        kernel = _pair(args[1], None)
        stride, padding, dilation = _pair(args[2], kernel), _pair(args[3], [0, 0]), _pair(args[4], [1, 1])
        x_shape = node.args[0].meta["val"].shape
        if (str(node.args[0].meta["val"].dtype) == "torch.float32" and kernel is not None
                and max_pool_applies(x_shape, kernel, stride, padding, dilation)):
            return emit_max_pool(importer.block_builder, importer.env[node.args[0]], x_shape, kernel, stride, padding,
                                 ceil=bool(args[5] if args[5] is not None else node.kwargs.get("ceil_mode", False)))
        return _builtin(importer, name)(node)

    def avg_pool2d(node, importer):
        """Float NCHW average pooling without ceil_mode on graphopt's kernel (any batch; `pool.avg_pool_source`),
        PyTorch's count_include_pad and divisor_override kept; other cases go to the converter before."""
        from graphopt.targets.tvm.cpu.pool import avg_pool_applies, emit_avg_pool
        args = list(node.args) + [None] * (7 - len(node.args))
        kw = node.kwargs
        kernel = _pair(args[1], None)
        stride, padding = _pair(args[2] or kw.get("stride"), kernel), _pair(args[3] or kw.get("padding"), [0, 0])
        ceil = bool(args[4] if args[4] is not None else kw.get("ceil_mode", False))
        count_pad = bool(args[5] if args[5] is not None else kw.get("count_include_pad", True))
        divisor = args[6] if args[6] is not None else kw.get("divisor_override")
        x_shape = node.args[0].meta["val"].shape
        if (str(node.args[0].meta["val"].dtype) == "torch.float32" and kernel is not None
                and avg_pool_applies(x_shape, kernel, stride, padding, ceil)):
            return emit_avg_pool(importer.block_builder, importer.env[node.args[0]], x_shape, kernel, stride,
                                 padding, count_pad, None if divisor is None else int(divisor))
        return generic["avg_pool2d.default"](node, importer)

    def pool3d(node, importer):
        """max_pool3d (with indices unread) / avg_pool3d whose depth windows tile the depth (kernel = stride, no
        padding; (1, k, k) video pools and 3-D UNets' 2x2x2) on graphopt's 2-D pooling kernel over [N, C D, H,
        W], its row maxima / sums running over the kd planes of a window too. Relax's pools took 220 us for
        R(2+1)D's (1, 2, 2) average over 32x8x56x56 and 311 us for a 3-D UNet's 2x2x2 max over 16x32x64x64.
        Others: TVM's op."""
        from graphopt.targets.tvm.cpu.pool import avg_pool_applies, emit_avg_pool, emit_max_pool, max_pool_applies
        from graphopt.targets.tvm.missing_ops import _indices_used
        name = node.target.__name__
        avg, indices = name.startswith("avg"), "indices" in name
        args = list(node.args) + [None] * (7 - len(node.args))
        kw = node.kwargs
        kernel = _pair(args[1], None, 3)
        stride = _pair(args[2] or kw.get("stride"), kernel, 3)
        padding = _pair(args[3] or kw.get("padding"), [0, 0, 0], 3)
        if avg:
            dilation, ceil = [1, 1, 1], bool(args[4] if args[4] is not None else kw.get("ceil_mode", False))
            count_pad = bool(args[5] if args[5] is not None else kw.get("count_include_pad", True))
            divisor = args[6] if args[6] is not None else kw.get("divisor_override")
        else:
            dilation = _pair(args[4] or kw.get("dilation"), [1, 1, 1], 3)
            ceil, divisor = bool(args[5] if args[5] is not None else kw.get("ceil_mode", False)), None
        x_val = node.args[0].meta["val"]

        def fallback():
            return generic[name](node, importer) if name in generic else _builtin(importer, name)(node)
        if (str(x_val.dtype) != "torch.float32" or x_val.dim() != 5 or kernel is None or divisor is not None
                or (indices and _indices_used(node))):
            return fallback()
        n, c, d, h, w = (int(v) for v in x_val.shape)
        kd = kernel[0]
        x2 = (n, c * d, h, w)
        ok = (kd == stride[0] and padding[0] == 0 and dilation[0] == 1 and d % kd == 0 and not ceil
              and (avg_pool_applies(x2, kernel[1:], stride[1:], padding[1:], False) if avg else
                   max_pool_applies(x2, kernel[1:], stride[1:], padding[1:], dilation[1:])))
        if not ok:
            return fallback()
        bb = importer.block_builder
        x = bb.emit(relax.op.reshape(importer.env[node.args[0]], x2))
        y = (emit_avg_pool(bb, x, x2, kernel[1:], stride[1:], padding[1:], count_pad, None, kd) if avg
             else emit_max_pool(bb, x, x2, kernel[1:], stride[1:], padding[1:], kd))
        out = [int(v) for v in (node.meta["val"][0] if indices else node.meta["val"]).shape]
        y = bb.emit(relax.op.reshape(y, out))
        if indices:
            return bb.emit(relax.Tuple([y, bb.emit(relax.op.zeros(y.ty.shape, "int64"))]))
        return y

    def _unwrapped_index(node, n: int):
        """The index under ONNX import's negative-index wrap into an axis of n, where(i < 0, i + n, i) (the row
        kernel wraps by n and clips its indices itself), else `node`."""
        import torch.fx as fx
        if (isinstance(node, fx.Node) and target_name(node.target) == "aten.where.self"
                and isinstance(node.args[2], fx.Node) and isinstance(node.args[1], fx.Node)
                and target_name(node.args[1].target) == "aten.add.Tensor" and node.args[1].args[0] is node.args[2]
                and isinstance(node.args[1].args[1], int) and node.args[1].args[1] == n
                and isinstance(node.args[0], fx.Node) and target_name(node.args[0].target) == "aten.lt.Scalar"
                and node.args[0].args[0] is node.args[2] and node.args[0].args[1] == 0):
            return node.args[2]
        return node

    def _row_index(i_node, dim: int, x_shape):
        """The index vector behind a scatter's index whose entries along every axis but `dim` repeat one value and
        span x's axes (GNNs' `dst[:, None].expand(-1, D)`, ONNX ScatterND's row offsets): that [.., E, ..] node
        (its other axes 1), or None. A constant index (torch's ONNX export writes an expanded index out whole, and
        fold-constants folds one computed from constants) that repeats so gives its [.., E, ..] slice as a tensor."""
        import torch
        import torch.fx as fx
        i_shape = [int(v) for v in i_node.meta["val"].shape]
        if len(i_shape) != len(x_shape) or any(i_shape[k] != int(x_shape[k]) for k in range(len(i_shape)) if k != dim):
            return None
        const = (lifted or {}).get(getattr(i_node, "name", None))
        if isinstance(const, torch.Tensor) and not const.is_floating_point() and const.dim() == len(i_shape):
            rows = const[tuple(slice(None) if k == dim else slice(0, 1) for k in range(const.dim()))]
            return rows.contiguous() if bool((const == rows).all()) else None
        n = int(x_shape[dim])
        v = _unwrapped_index(i_node, n)
        while not all(int(s) == 1 for k, s in enumerate(v.meta["val"].shape) if k != dim):
            if not (isinstance(v, fx.Node) and target_name(v.target) in ("aten.expand.default",
                                                                          "aten.expand_as.default")):
                return None  # (expand_as: ONNX import's ScatterND rows)
            v = _unwrapped_index(v.args[0], n)
            val = v.meta["val"] if isinstance(v, fx.Node) else None
            if val is None or val.dim() != len(i_shape) or int(val.shape[dim]) != i_shape[dim]:
                return None
        return v

    def scatter_rows(node, importer):
        """scatter_add / scatter (src) / scatter_reduce (sum, prod, amax, amin, mean; with or without self) whose
        index repeats along every axis but dim (`_row_index`): whole rows on the row scatter kernel (`cpu.scatter`),
        repeated indices reducing in order (or the last winning); others go to the converter before. Reductions
        other than sum take floating tensors (integer means floor-divide: the converter before)."""
        import numpy as np
        import torch.fx as fx

        from graphopt.targets.tvm.cpu.rules import target_cores
        from graphopt.targets.tvm.cpu.scatter import emit_scatter_rows
        from graphopt.targets.tvm.missing_ops import _dtype
        name = node.target.__name__
        x_val = node.args[0].meta["val"]
        dt = _dtype(x_val)
        dim = int(node.args[1]) % max(x_val.dim(), 1)
        src_node = node.args[3] if len(node.args) > 3 else None
        reduce, include_self = {"scatter.src": "put"}.get(name, "sum"), True
        if name == "scatter_reduce.two":
            reduce = {"sum": "sum", "prod": "prod", "amax": "max", "amin": "min", "mean": "mean"}.get(
                str(node.args[4]))
            include_self = bool(node.args[5] if len(node.args) > 5 else node.kwargs.get("include_self", True))
            if reduce != "sum" and not dt.startswith("float"):
                reduce = None
        v = (_row_index(node.args[2], dim, x_val.shape) if reduce is not None and isinstance(src_node, fx.Node)
             and x_val.dim() > 0 and src_node.meta["val"].dtype == x_val.dtype else None)
        if v is None:
            return generic[name](node, importer) if name in generic else _builtin(importer, name)(node)
        bb = importer.block_builder
        i_shape = [int(d) for d in node.args[2].meta["val"].shape]
        src = importer.env[src_node]
        if [int(d) for d in src_node.meta["val"].shape] != i_shape:
            src = bb.emit(relax.op.strided_slice(src, axes=list(range(len(i_shape))), begin=[0] * len(i_shape),
                                                 end=i_shape))
        if isinstance(v, fx.Node):
            index, it = importer.env[v], _dtype(v.meta["val"])
        else:  # a constant index's rows (`_row_index`)
            index, it = relax.const(v.numpy(), _dtype(v)), _dtype(v)  # (int64 numpy: int32 unless named)
        cores = target_cores(target)
        x = importer.env[node.args[0]]
        out = emit_scatter_rows(bb, x, index, src, x_val.shape, dim, i_shape[dim], dt, it,
                                "sum" if reduce == "mean" else reduce, cores, include_self)
        if reduce != "mean":
            return out
        # the mean: the sum over how many values each row receives (+ 1 for self's); a row no index names keeps
        # self's (its sum is self's, its count 0)
        n = int(x_val.shape[dim])
        count = emit_scatter_rows(bb, relax.const(np.full(n, float(include_self), dt)), index,
                                  relax.const(np.ones(i_shape[dim], dt)), [n], 0, i_shape[dim], dt, it, "sum", cores)
        count = bb.emit(relax.op.maximum(count, relax.const(1.0, dt)))
        count = bb.emit(relax.op.reshape(count, [n] + [1] * (x_val.dim() - dim - 1)))
        return bb.emit(relax.op.divide(out, count))

    def index_add(node, importer):
        """x.index_add(dim, index, source, alpha): source's rows along dim added into x's rows index[i], in order
        (repeated indices accumulate), on the row scatter kernel (`cpu.scatter`)."""
        from graphopt.targets.tvm.cpu.rules import target_cores
        from graphopt.targets.tvm.cpu.scatter import emit_scatter_rows
        from graphopt.targets.tvm.missing_ops import _dtype
        x_val = node.args[0].meta["val"]
        dim = int(node.args[1]) % max(x_val.dim(), 1)
        alpha = node.args[4] if len(node.args) > 4 else node.kwargs.get("alpha", 1)
        bb = importer.block_builder
        src = importer.env[node.args[3]]
        if alpha != 1:
            src = bb.emit(relax.op.multiply(src, relax.const(alpha, _dtype(x_val))))
        rows = max(int(node.args[2].meta["val"].numel()), 1)
        y = emit_scatter_rows(bb, importer.env[node.args[0]], importer.env[node.args[2]], src,
                              x_val.shape if x_val.dim() else [1], dim, rows, _dtype(x_val),
                              _dtype(node.args[2].meta["val"]), "sum", target_cores(target))
        return y if x_val.dim() else bb.emit(relax.op.reshape(y, ()))

    def index_put(node, importer):
        """x[index] = values / += values with one integer index vector on the first axis (KV-cache rows, `x[idx]
        += v` message passing): whole rows on the row scatter kernel; other forms go to the converter before."""
        import numpy as np
        import torch.fx as fx

        from graphopt.targets.tvm.cpu.rules import target_cores
        from graphopt.targets.tvm.cpu.scatter import emit_scatter_rows
        from graphopt.targets.tvm.missing_ops import _dtype
        x_val, idx = node.args[0].meta["val"], list(node.args[1])
        name = node.target.__name__
        if (x_val.dim() < 2 or len(idx) != 1 or idx[0] is None or idx[0].meta["val"].dim() != 1
                or idx[0].meta["val"].dtype.is_floating_point or str(idx[0].meta["val"].dtype) == "torch.bool"):
            return generic[name](node, importer)
        accumulate = bool(node.args[3] if len(node.args) > 3 else node.kwargs.get("accumulate", False))
        bb = importer.block_builder
        rows = int(idx[0].meta["val"].shape[0])
        shape = [rows] + [int(d) for d in x_val.shape[1:]]
        values = importer.env[node.args[2]] if isinstance(node.args[2], fx.Node) else \
            relax.const(np.asarray(node.args[2], _dtype(x_val)), _dtype(x_val))
        if isinstance(node.args[2], fx.Node) and node.args[2].meta["val"].dtype != x_val.dtype:
            values = bb.emit(relax.op.astype(values, _dtype(x_val)))
        values = bb.emit(relax.op.broadcast_to(values, shape))
        return emit_scatter_rows(bb, importer.env[node.args[0]], importer.env[idx[0]], values, x_val.shape, 0, rows,
                                 _dtype(x_val), _dtype(idx[0].meta["val"]), "sum" if accumulate else "put",
                                 target_cores(target))

    def topk(node, importer):
        """torch.topk of float32 rows along the last axis with k <= 64 of >= 512 entries: one pass a row keeping
        the k best (`cpu.select`; the converter before sorts the whole row: 2.2 ms for CenterNet's 10 of 49152);
        rows of up to 256 on the sorting network (ONNX exports torch.sort as a TopK of the whole row: TabNet's
        8.2 ms against 1.7 traced); others go to that converter."""
        from graphopt.targets.tvm.cpu.select import emit_topk, sort_applies, topk_applies
        from graphopt.targets.tvm.missing_ops import _arg
        x_val = node.args[0].meta["val"]
        k = int(node.args[1])
        dim = int(_arg(node, 2, "dim", -1)) % max(x_val.dim(), 1)
        if (str(x_val.dtype) == "torch.float32" and x_val.dim() > 0 and dim == x_val.dim() - 1 and _static(x_val)
                and not topk_applies(int(x_val.shape[-1]), k) and sort_applies(int(x_val.shape[-1]))):
            # short rows (ONNX exports torch.sort as TopK of the whole row): the sorting network, its first k
            from graphopt.targets.tvm.cpu.rules import vector_lanes
            from graphopt.targets.tvm.cpu.select import emit_sort
            bb = importer.block_builder
            both = emit_sort(bb, importer.env[node.args[0]], x_val.shape, bool(_arg(node, 3, "largest", True)),
                             vector_lanes(target))
            ax, n = x_val.dim() - 1, int(x_val.shape[-1])
            return bb.emit(relax.Tuple([
                bb.emit(relax.op.strided_slice(bb.emit(relax.TupleGetItem(both, i)), axes=[ax], begin=[0], end=[k]))
                if k < n else bb.emit(relax.TupleGetItem(both, i)) for i in (0, 1)]))
        if (str(x_val.dtype) != "torch.float32" or x_val.dim() == 0 or dim != x_val.dim() - 1
                or not topk_applies(int(x_val.shape[-1]), k)):
            return generic["topk.default"](node, importer)
        return emit_topk(importer.block_builder, importer.env[node.args[0]], x_val.shape, k,
                         bool(_arg(node, 3, "largest", True)))

    def scan(product: bool):
        def convert(node, importer):
            """float32 cumsum / cumprod with whole vectors of values behind the axis (causal linear attention's
            running k v^T sums) on graphopt's chunked scan (`cpu.scan`); others the generic converter's."""
            from graphopt.targets.tvm.cpu.rules import vector_lanes
            from graphopt.targets.tvm.cpu.scan import emit_scan, scan_geometry
            x_val, name = node.args[0].meta["val"], "cumprod.default" if product else "cumsum.default"
            geometry = None
            if str(x_val.dtype) == "torch.float32" and str(node.meta["val"].dtype) == "torch.float32" and \
                    x_val.dim() > 0 and _static(x_val):
                geometry = scan_geometry(x_val.shape, int(node.args[1]) % x_val.dim(), vector_lanes(target))
            if geometry is None:
                return generic[name](node, importer)
            return emit_scan(importer.block_builder, importer.env[node.args[0]], x_val.shape, geometry,
                             vector_lanes(target), product)
        return convert

    def sort(node, importer):
        """float32 torch.sort along the last axis of rows up to SORT_MAX_ROW on graphopt's sorting network
        (`cpu.select.sort_source`: stable, NaN the largest, as the converter before); others that converter's."""
        from graphopt.targets.tvm.cpu.rules import vector_lanes
        from graphopt.targets.tvm.cpu.select import emit_sort, sort_applies
        from graphopt.targets.tvm.more_ops import sort_args
        x_val, name = node.args[0].meta["val"], node.target.__name__
        dim, desc = sort_args(node)
        if (str(x_val.dtype) != "torch.float32" or x_val.dim() == 0 or dim != x_val.dim() - 1
                or not _static(x_val) or not sort_applies(int(x_val.shape[-1]))):
            return generic[name](node, importer)
        return emit_sort(importer.block_builder, importer.env[node.args[0]], x_val.shape, desc,
                         vector_lanes(target))

    def logcumsumexp(node, importer):
        """float32 logcumsumexp on graphopt's running-maximum scan (`cpu.scan`: O(L) a row; the generic converter
        compares every pair of positions and refuses long axes, minGRU's log-space scan over 512 steps)."""
        from graphopt.targets.tvm.cpu.rules import vector_lanes
        from graphopt.targets.tvm.cpu.scan import emit_logcumsumexp
        x_val = node.args[0].meta["val"]
        if str(x_val.dtype) != "torch.float32" or x_val.dim() == 0 or not _static(x_val):
            return generic["logcumsumexp.default"](node, importer)
        return emit_logcumsumexp(importer.block_builder, importer.env[node.args[0]], x_val.shape,
                                 int(node.args[1]) % x_val.dim(), vector_lanes(target))

    if not cpu_kernels:
        if sparse24 is not None or gpu_dense is not None:
            generic = {**generic, "linear.default": sparse_linear, "convolution.default": sparse_conv}
        return generic
    return {**generic, "gelu.default": gelu, "sigmoid.default": sigmoid, "rsqrt.default": rsqrt,
            "log.default": log, "log1p.default": lambda node, importer: log(node, importer, True),
            "sin.default": sin, "cos.default": lambda node, importer: sin(node, importer, True),
            "convolution.default": convolution, "layer_norm.default": layer_norm,
            "_softmax.default": softmax, "native_group_norm.default": native_group_norm,
            "upsample_bilinear2d.vec": upsample_bilinear2d, "upsample_bicubic2d.vec": upsample_bicubic2d,
            "bmm.default": bmm, "scaled_dot_product_attention.default": sdpa,
            "lstm.input": recurrent, "gru.input": recurrent,
            "select.int": select, "upsample_nearest2d.vec": upsample_nearest2d,
            "mean.dim": mean,
            "constant_pad_nd.default": constant_pad_nd, "bsr_linear.default": bsr_linear,
            "bsr_conv1x1.default": bsr_conv1x1, "linear.default": linear, "mm.default": mm, "addmm.default": addmm,
            "add.Tensor": add, "cat.default": cat, "max_pool2d.default": max_pool2d, "avg_pool2d.default": avg_pool2d,
            "max_pool2d_with_indices.default": max_pool2d_with_indices, "instance_norm.default": instance_norm,
            "max_pool3d.default": pool3d, "max_pool3d_with_indices.default": pool3d, "avg_pool3d.default": pool3d,
            "scatter_add.default": scatter_rows, "scatter.src": scatter_rows, "scatter_reduce.two": scatter_rows,
            "index_add.default": index_add, "index_put.default": index_put, "index_put_.default": index_put,
            "topk.default": topk, "cumsum.default": scan(False), "cumprod.default": scan(True),
            "logcumsumexp.default": logcumsumexp,
            "sort.default": sort, "sort.stable": sort,
            "upsample_linear1d.vec": upsample_linear1d,
            "adaptive_max_pool2d.default": adaptive_max_pool2d,
            "_adaptive_avg_pool2d.default": adaptive_avg_pool2d,
            "roll.default": roll, "flip.default": flip, "permute.default": permute, "where.self": where,
            "max.dim": max_dim, "_log_softmax.default": log_softmax,
            "amax.default": amax_amin("max"), "amin.default": amax_amin("min"), "sum.dim_IntList": sum_dim,
            "max.default": amax_amin("max"), "min.default": amax_amin("min"),
            "argmax.default": arg_extreme("max"), "argmin.default": arg_extreme("min"),
            "linalg_vector_norm.default": vector_norm, "im2col.default": im2col, "col2im.default": col2im,
            **{f"{kind}_pad{d}d.default": edge_pad(mode) for kind, mode in (("reflection", "reflect"),
                                                                           ("replication", "replicate"))
               for d in (1, 2, 3)}, "_pad_circular.default": edge_pad("circular"),
            **{k: _activation(k) for k in ("relu.default", "relu6.default", "hardtanh.default", "clamp.default")}}


def _rnn_geometry(node, lifted: dict | None = None) -> dict | None:
    """What the recurrence kernels (cpu/rnn.py) need of aten.lstm.input / aten.gru.input `node`, or None where they
    do not take it: float32 input [T, N, I] (or [N, T, I] batch-first) with static sizes and a batch of at most
    rnn.MAX_BATCH, inference (train=False), constant float32 weights (w_ih, w_hh[, b_ih, b_hh] per layer and
    direction; an LSTM with projections has a fifth and is not taken). Constant: a parameter (get_attr) of the
    graph, or, in the exported program (`lifted`: its lifted parameters by placeholder name), one of those; weights
    the model takes as inputs are not (they decompose)."""
    import torch
    import torch.fx as fx

    from graphopt.targets.tvm.cpu.rnn import rnn_applies
    kind = {torch.ops.aten.lstm.input: "lstm", torch.ops.aten.gru.input: "gru"}.get(node.target)
    if kind is None or len(node.args) < 9:
        return None
    x, hx, params, biases, layers, _, train, bidirectional, batch_first = node.args[:9]
    xv = x.meta.get("val") if isinstance(x, fx.Node) else None
    if (train or xv is None or str(xv.dtype) != "torch.float32" or xv.dim() != 3
            or not all(isinstance(d, int) for d in xv.shape)):
        return None
    dirs = 2 if bidirectional else 1
    per = 4 if biases else 2
    if len(params) != layers * dirs * per or not all(
            isinstance(p, fx.Node) and (p.op == "get_attr" or p.op == "placeholder" and p.name in (lifted or {}))
            and str(getattr(p.meta.get("val"), "dtype", "")) == "torch.float32" for p in params):
        return None
    t, n = (int(xv.shape[1]), int(xv.shape[0])) if batch_first else (int(xv.shape[0]), int(xv.shape[1]))
    g = 4 if kind == "lstm" else 3
    h = int(params[1].meta["val"].shape[1])
    if any(tuple(params[k * per + 1].meta["val"].shape) != (g * h, h) or params[k * per].meta["val"].dim() != 2
           or int(params[k * per].meta["val"].shape[0]) != g * h for k in range(layers * dirs)):
        return None
    if not rnn_applies(kind, t, n, int(xv.shape[2]), h):
        return None
    return {"kind": kind, "t": t, "n": n, "h": h, "dirs": dirs, "layers": int(layers), "biases": bool(biases),
            "batch_first": bool(batch_first), "params": list(params)}


MANUAL_ATTENTION_MIN_KEYS = 192  # keys (S) and query width (E) from which hand-written attention runs on the
MANUAL_ATTENTION_MIN_WIDTH = 64  # fused kernel (`_manual_attention_pays`)


def _manual_attention_pays(node, lanes: int) -> bool:
    """Whether the SDPA `manual_attention_as_sdpa` made of hand-written attention runs faster on the fused kernel
    than as written (batched matmuls and a softmax): where the kernel takes it (`_sdpa_geometry`) with at least
    MANUAL_ATTENTION_MIN_KEYS keys and MANUAL_ATTENTION_MIN_WIDTH query width, q, k and v as the model wrote them
    (no transpose added). Interleaved on Zen 3 (2 threads), fused / as written: ViT-Ti's 3 heads of 197 tokens x 64
    0.83x, 4 heads of 512 x 64 0.86x, 6 heads of 197 x 64 1.00x; 2 heads of 160 x 32 1.06x; Swin-T's 192 windows of
    49 x 32 1.13x; with transposes added (attention over a feature map's pixels, [B, C, HW] operands): SAGAN's 1024
    pixels x 16 1.13x, 256 x 32 (256 values wide) 0.95x, einsum forms 256 x 64 1.36x, 1024 x 64 1.30x, a DDPM
    block's 1024 x 128 1.71x (its batched matmuls run at ~70% of the FMA peak; the kernel re-reads a head's values
    for every block of query rows)."""
    from graphopt.passes.canonicalize.attention import SWAPS
    geo = _sdpa_geometry(node, lanes)
    q, k = (t.meta["val"] for t in node.args[:2])
    return geo is not None and not node.meta.get(SWAPS, 0) and int(k.shape[-2]) >= MANUAL_ATTENTION_MIN_KEYS \
        and int(q.shape[-1]) >= MANUAL_ATTENTION_MIN_WIDTH


def _sdpa_geometry(node, lanes: int) -> dict | None:
    """What the fused attention kernel (cpu/attention.py) needs of aten SDPA `node`, or None where it does not take
    it: float32 q [B, H, L, E] (or [B, L, E]), k and v of the same batch and heads (no grouped-query broadcast), no
    dropout, value width in whole vectors of `lanes` (8 or 4 floats also do, on narrower vectors), a boolean or
    float32 mask broadcasting over batch, heads and query rows but spanning the keys. q, k and v given as a
    [B, L, H, E] tensor's permute(0, 2, 1, 3) (a linear's heads) are read in place: their strides are those."""
    import torch.fx as fx
    args = list(node.args) + [None] * (4 - len(node.args))
    q, k, v, mask = args[:4]
    kw = node.kwargs
    dropout = node.args[4] if len(node.args) > 4 else kw.get("dropout_p", 0.0)
    causal = bool(node.args[5] if len(node.args) > 5 else kw.get("is_causal", False))
    mask = kw.get("attn_mask", mask)
    if dropout or kw.get("enable_gqa", False) or not all(isinstance(t, fx.Node) for t in (q, k, v)):
        return None
    vals = [t.meta.get("val") for t in (q, k, v)]
    if any(getattr(t, "dtype", None) is None or str(t.dtype) != "torch.float32" or t.dim() not in (3, 4)
           or not all(isinstance(d, int) for d in t.shape) for t in vals):
        return None
    qv, kv, vv = vals
    if not (qv.dim() == kv.dim() == vv.dim()) or qv.shape[:-2] != kv.shape[:-2] or kv.shape[:-1] != vv.shape[:-1]:
        return None
    b, h = (int(qv.shape[0]), int(qv.shape[1])) if qv.dim() == 4 else (int(qv.shape[0]), 1)
    l, e, s, ev = int(qv.shape[-2]), int(qv.shape[-1]), int(kv.shape[-2]), int(vv.shape[-1])
    from graphopt.targets.tvm.cpu.attention import attention_applies
    from graphopt.targets.tvm.cpu.norm import mask_strides
    lanes = next((n for n in (lanes, 8, 4) if n <= lanes and ev % n == 0), 0)
    if not lanes or not attention_applies(l, s, e, ev, lanes) or b * h * l * s == 0:
        return None
    mstr = None
    if mask is not None:
        mv = mask.meta.get("val") if isinstance(mask, fx.Node) else None
        if mv is None or str(mv.dtype) not in ("torch.bool", "torch.float32") or causal:
            return None
        mstr = mask_strides(tuple(mv.shape), (b, h, l, s))
        if mstr is None:
            return None

    def strides(t, rows: int, width: int) -> tuple[tuple[int, int, int], object]:
        """(batch, head, row) strides and the node whose value the kernel reads."""
        src = t
        if (qv.dim() == 4 and getattr(t, "op", None) == "call_function"
                and target_name(t.target) == "aten.permute.default"
                and [int(p) % 4 for p in t.args[1]] == [0, 2, 1, 3] and isinstance(t.args[0], fx.Node)):
            return (rows * h * width, width, h * width), t.args[0]
        return (h * rows * width, rows * width, width), src
    (qs, qsrc), (ks, ksrc), (vs, vsrc) = strides(q, l, e), strides(k, s, e), strides(v, s, ev)
    scale = kw.get("scale")
    return {"b": b, "h": h, "l": l, "s": s, "e": e, "ev": ev, "causal": causal, "lanes": lanes,
            "scale": float(scale) if scale is not None else 1.0 / math.sqrt(e), "mask": mstr, "mask_node": mask,
            "sources": (qsrc, ksrc, vsrc), "strides": {"q": qs, "k": ks, "v": vs}}


def _sdpa_output_permute(node):
    """The permute(0, 2, 1, 3) that reads SDPA `node`'s output, alone or through a view of its own shape (the
    heads going back to [B, L, H, Ev] for the output projection), or None."""
    users = list(node.users)
    if len(users) != 1:
        return None
    u = users[0]
    if (target_name(u.target) in ("aten.view.default", "aten._unsafe_view.default", "aten.reshape.default")
            and list(u.meta["val"].shape) == list(node.meta["val"].shape) and len(u.users) == 1):
        u = next(iter(u.users))
    if (u.op == "call_function" and target_name(u.target) == "aten.permute.default"
            and [int(p) % 4 for p in u.args[1]] == [0, 2, 1, 3] and node.meta["val"].dim() == 4):
        return u
    return None


def _conv3d_transpose_relax(node, importer):
    """A 5-D transposed conv as Relax's conv3d_transpose (TVM 0.27's torch importer refuses them: "Unsupported
    transposed convolution dimensionality: 5", though Relax has the op)."""
    from tvm import relax
    x, w = node.args[0], node.args[1]
    bb = importer.block_builder
    stride, padding, dilation, out_pad = ([int(v) for v in node.args[i]] for i in (3, 4, 5, 7))
    y = bb.emit(relax.op.nn.conv3d_transpose(importer.env[x], importer.env[w], strides=stride, padding=padding,
                                             output_padding=out_pad, dilation=dilation, groups=int(node.args[8]),
                                             data_layout="NCDHW", kernel_layout="IODHW"))
    if node.args[2] is not None:
        y = bb.emit(relax.op.add(y, relax.op.reshape(importer.env[node.args[2]], (1, -1, 1, 1, 1))))
    return y


def _with_conv_transpose_3d(inner):
    """The convolution converter, taking 5-D transposed convs itself unless `inner` (graphopt's converter for this
    device) does (`takes_3d_transposed`: the CPU one runs kernel == stride ones on its kernels); the rest go to
    `inner` or TVM's own."""
    def convert(node, importer):
        if (node.args[6] and len(node.args[0].meta["val"].shape) == 5
                and not getattr(inner, "takes_3d_transposed", False)):
            return _conv3d_transpose_relax(node, importer)
        return inner(node, importer) if inner is not None else importer._convolution(node)
    return convert


def _col2im_as_conv_transpose(x, output_size, kernel_size, dilation, padding, stride):
    """F.fold (aten.col2im) as a grouped transposed conv: block element k of channel c, input channel c K + k, adds
    into its kernel position ki, kj through a one-hot [C K, 1, kh, kw] weight (groups = C) -- the same sums, where
    core ATen's decomposition (an index_put with broadcast index tensors) did not build in TVM for batch > 1."""
    import torch
    if x.dim() == 2:  # unbatched [C K, L]
        return _col2im_as_conv_transpose(x[None], output_size, kernel_size, dilation, padding, stride)[0]
    kh, kw = kernel_size
    n, ck, _ = x.shape
    c = ck // (kh * kw)
    grid = [(output_size[i] + 2 * padding[i] - dilation[i] * (kernel_size[i] - 1) - 1) // stride[i] + 1
            for i in range(2)]
    weight = torch.eye(kh * kw, dtype=x.dtype).reshape(kh * kw, 1, kh, kw).repeat(c, 1, 1, 1)
    # output padding: the rows and columns past the last block (fewer than a stride), which no block covers: zeros
    extra = [output_size[i] + 2 * padding[i] - ((grid[i] - 1) * stride[i] + dilation[i] * (kernel_size[i] - 1) + 1)
             for i in range(2)]
    return torch.nn.functional.conv_transpose2d(x.reshape(n, ck, grid[0], grid[1]), weight, None, stride, padding,
                                                extra, c, dilation)


def _constant_hint(graph: Graph, name: str, hint: str) -> str:
    """`hint`, or where graph node `name` is computed from parameters alone (a weight parametrization: orthogonal's
    matrix_exp, spectral norm's power iteration), what computes it once instead: fold-constants."""
    constant = set()  # (one pass in graph order: every input comes before its users)
    for n in graph.gm.graph.nodes:
        if n.op == "get_attr" or (n.op == "call_function" and all(a in constant for a in n.all_input_nodes)):
            constant.add(n)
        if n.name == name:
            break
    else:
        return hint
    if n.op != "call_function" or not n.all_input_nodes or n not in constant:
        return hint
    return ("its inputs are computed from parameters alone (a weight parametrization, such as orthogonal's "
            "matrix_exp): fold-constants computes it once at compile time (graphopt.optimize(graph, "
            "'fold-constants'), in the CLI's default pipeline). Else: " + hint)


def _decomposed_from(ep, graph: Graph, ops: set[str]) -> tuple[str, str]:
    """(the graph node, "aten.op (what aten.source decomposes into)") for the first node of the decomposed program
    `ep` whose op is one of `ops` (names without the overload), traced back through torch's provenance (the
    node's meta["from_node"]) to the graph node it came from; ("(from a decomposition)", "") where none is found."""
    names = {n.name: n for n in graph.gm.graph.nodes if n.op == "call_function"}
    for n in ep.graph_module.graph.nodes:
        if n.op != "call_function" or target_name(n.target).split(".")[1] not in ops:
            continue
        for src in n.meta.get("from_node") or []:
            origin = names.get(getattr(src, "name", None))
            if origin is not None:
                return origin.name, (f"{'.'.join(target_name(n.target).split('.')[:2])} (what "
                                     f"{'.'.join(target_name(origin.target).split('.')[:2])} decomposes into)")
    return "(from a decomposition)", ""


# ops that draw random numbers (a VAE's reparameterization, gumbel_softmax, noise injection): TVM's importer compiled
# randn / randn_like as ONE draw made at compile time, the same numbers on every call, exponential_ as zeros
# (gumbel_softmax then gave NaN everywhere) and bernoulli(p) as its input, all without a word
_RANDOM_OPS = frozenset({
    "randn", "randn_like", "rand", "rand_like", "randint", "randint_like", "randperm", "bernoulli", "bernoulli_",
    "exponential", "exponential_", "normal", "normal_", "normal_functional", "uniform", "uniform_", "multinomial",
    "poisson", "cauchy", "cauchy_", "log_normal", "log_normal_", "geometric", "geometric_", "random", "random_",
    "native_dropout", "rrelu_with_noise", "rrelu_with_noise_"})


def _refuse_random(graph: Graph) -> None:
    """A graph op that draws random numbers is an error naming it: a compiled artifact is a function of its inputs."""
    for n in graph.gm.graph.nodes:
        if n.op == "call_function" and getattr(n.target, "_opname", None) in _RANDOM_OPS:
            raise UnsupportedOpError(n.name, target_name(n.target),
                                     "it draws random numbers, and graphopt's artifact is a deterministic function "
                                     "of its inputs: pass the noise in as a model input (eps = torch.randn_like(mu) "
                                     "by the caller, z = mu + std * eps in the model), or export with --target "
                                     "onnx / pt2, whose runtimes sample")


def _refuse_side_effects(graph: Graph, ep) -> None:
    """Ops with a runtime side effect (torch.linalg.inv / solve / cholesky check their input and raise on a singular
    one) export as `with_effects` calls threaded by a token input, which TVM's importer rejects ("Unsupported input
    kind: InputKind.TOKEN"); name the op and the graph node instead."""
    import torch
    for n in ep.graph_module.graph.nodes:
        if n.op == "call_function" and n.target is torch.ops.higher_order.with_effects:
            effect = target_name(n.args[1]) if len(n.args) > 1 else "a side effect"
            api = str(n.args[3]) if len(n.args) > 3 else ""
            key = api.replace(".", "_")  # linalg.inv -> the graph's aten.linalg_inv (not any op holding "inv")
            node = next((m.name for m in graph.gm.graph.nodes if m.op == "call_function" and key
                         and key in target_name(m.target)), "(from a decomposition)")
            raise UnsupportedOpError(node, f"{api or effect} ({effect})",
                                     "it checks its input at run time and raises (a singular or non-positive-definite "
                                     "matrix), a side effect TVM cannot compile: compute it outside the model, or "
                                     "export with --target pt2")


def _signbit(x):
    """torch.signbit as the sign copysign gives 1 (TVM's importer has no signbit): true for -0.0 as signbit is, where
    x < 0 is not (a NaN reads as positive: TVM's copysign drops a NaN's sign)."""
    import torch
    if not x.is_floating_point():
        return x < 0
    return torch.copysign(torch.ones_like(x), x) < 0


def _bilinear(x1, x2, weight, bias=None):
    """F.bilinear, y[..., o] = x1 W[o] x2 + b[o], as one matmul and a product-sum: core ATen's decomposition is
    aten._trilinear, which TVM's importer has no converter for."""
    import torch
    out, i, j = weight.shape
    lead = x1.shape[:-1]
    t = torch.matmul(x1.reshape(-1, i), weight.permute(1, 0, 2).reshape(i, out * j)).reshape(-1, out, j)
    y = (t * x2.reshape(-1, 1, j)).sum(-1)
    y = y if bias is None else y + bias
    return y.reshape(*lead, out)


def _narrow_copy(x, dim, start, length):
    """Tensor.narrow_copy: a slice (TVM's importer has no converter for it)."""
    import torch
    return torch.narrow(x, dim, start, length).clone()


def _dist(a, b, p=2):
    """torch.dist(a, b, p): the p-norm of a - b over every element (no converter)."""
    import torch
    return torch.linalg.vector_norm(a - b, p)


def _pdist(x, p=2.0):
    """torch.pdist: the upper triangle (row-major, as PyTorch lists it) of cdist(x, x), whose converter exists."""
    import torch
    n = x.shape[0]
    iu = torch.triu_indices(n, n, 1)
    return torch.cdist(x, x, p)[iu[0], iu[1]]


def _lu_pivots(a):
    """(the U diagonal, the permutation's sign) of the LU factorization with partial pivoting of a [..., n, n]
    float matrix, as elementary ops (n is static: unrolled). At each column the row of the largest magnitude is
    swapped up (gather); a zero column leaves a zero pivot (its factors are 0, not NaN), so the determinant is 0."""
    import torch
    n = a.shape[-1]
    rows = torch.arange(n, device=a.device)
    sign = torch.ones(a.shape[:-2], dtype=a.dtype, device=a.device)
    diag = []
    for k in range(n):
        p = torch.argmax(a[..., k:, k].abs(), dim=-1) + k
        pk = p[..., None]
        order = torch.where(rows == k, pk, torch.where(rows == pk, k, rows))
        a = torch.gather(a, -2, order[..., None].expand(a.shape))
        sign = torch.where(p != k, -sign, sign)
        piv = a[..., k, k]
        diag.append(piv)
        if k + 1 < n:
            safe = torch.where(piv == 0, torch.ones_like(piv), piv)
            factors = a[..., k + 1:, k] / safe[..., None]
            below = a[..., k + 1:, :] - factors[..., None] * a[..., k:k + 1, :]
            a = torch.cat([a[..., :k + 1, :], below], dim=-2)
    return torch.stack(diag, -1), sign


def _det(a):
    """torch.linalg.det / torch.det (no converter: its _linalg_det returns the LU factors too): the closed forms
    for 1 x 1 to 3 x 3 matrices (geometry's orientation and volume tests), else the product of the LU pivots with
    partial pivoting (`_lu_pivots`)."""
    import torch
    n = a.shape[-1]
    if n == 1:
        return a[..., 0, 0]
    if n == 2:
        return a[..., 0, 0] * a[..., 1, 1] - a[..., 0, 1] * a[..., 1, 0]
    if n == 3:
        c0 = a[..., 1, 1] * a[..., 2, 2] - a[..., 1, 2] * a[..., 2, 1]
        c1 = a[..., 1, 0] * a[..., 2, 2] - a[..., 1, 2] * a[..., 2, 0]
        c2 = a[..., 1, 0] * a[..., 2, 1] - a[..., 1, 1] * a[..., 2, 0]
        return a[..., 0, 0] * c0 - a[..., 0, 1] * c1 + a[..., 0, 2] * c2
    diag, sign = _lu_pivots(a)
    return sign * torch.prod(diag, -1)


def _slogdet(a):
    """torch.linalg.slogdet: (sign, log |det|) from the LU pivots (a sum of logs: no overflow of the product);
    a singular matrix gives (0, -inf), as PyTorch's."""
    import torch
    diag, sign = _lu_pivots(a)
    sign = sign * torch.prod(torch.sign(diag), -1)
    return sign, torch.sum(torch.log(diag.abs()), -1)


def _logdet(a):
    """torch.logdet: log det, NaN for a negative determinant, -inf for a singular matrix (PyTorch's values)."""
    import torch
    sign, logabs = _slogdet(a)
    return torch.where(sign < 0, torch.full_like(logabs, float("nan")), logabs)


def _index_add_as_matmul(x, dim, index, source, alpha=1):
    """torch.index_add (Tensor.index_add_) as x + alpha * source @ one_hot(index) along `dim`: row i of the source
    adds into row index[i] (repeated indices accumulate, as in index_add); core ATen's decomposition is an
    index_put with a None index, which TVM's importer rejects ("IndexPut requires the number of index tensors")."""
    import torch
    dim = dim % max(x.dim(), 1)
    onehot = (index.reshape(-1, 1) == torch.arange(x.shape[dim], device=x.device).reshape(1, -1)).to(source.dtype)
    contrib = torch.matmul(source.movedim(dim, -1), onehot).movedim(-1, dim)
    return x + contrib * alpha if alpha != 1 else x + contrib


def _join_groups(bb, ys):
    """The outputs of a grouped conv's groups (Relax values [N, C_g, ...]) concatenated along the channels, by the
    copy kernel where their runs are long (`pool.concat_geometry`): Relax's concatenate of ResNeXt's 32 int8 groups
    (4 channels at 56x56 each) took 1.6 ms, 3x the 32 convs."""
    from tvm import relax

    from graphopt.targets.tvm.cpu.pool import concat_geometry, emit_concat
    shapes = [tuple(int(d) for d in v.ty.shape.values) for v in ys]
    if concat_geometry(shapes, 1) is not None:
        return emit_concat(bb, ys, shapes, 1, str(ys[0].ty.dtype))
    return bb.emit(relax.op.concat(ys, axis=1))


def _pair(v, default, n: int = 2):
    """aten's int-or-list pooling argument as [h, w] (n = 3: [d, h, w]); None or [] -> default (a stride: the
    kernel)."""
    if v is None or (not isinstance(v, int) and len(v) == 0):
        return default
    v = [int(v)] if isinstance(v, int) else [int(a) for a in v]
    return v * n if len(v) == 1 else v


def _converters(ep, device: str, sparse24: dict | None, target=None, layouts: dict | None = None,
                gpu_dense: dict | None = None):
    names = {spec.arg.name: spec.target for spec in ep.graph_signature.input_specs if spec.target is not None}
    for opts in (sparse24, gpu_dense):
        if opts is not None:
            opts.setdefault("records", {})
            opts["names"] = names
    # select-sparse-layout's choices, by the placeholder name the importer sees
    chosen = {arg: (layouts or {}).get(param) for arg, param in names.items() if param in (layouts or {})}
    return with_promotion(_quant_converters(_lifted_tensors(ep), device == "cpu", sparse24, target, chosen,
                                            gpu_dense))


def lower_to_relax(graph: Graph, device: str = "cpu", sparse24: dict | None = None, target=None,
                   gpu_dense: dict | None = None):
    """Return a Relax IRModule whose `main` takes the graph's inputs in order, parameters bound as constants.
    device "cpu" uses graphopt's CPU kernels where they apply, shaped for `target` (a TVM llvm Target; default:
    this machine's CPU); "cuda" keeps plain Relax ops, and with `sparse24` (a dict: min_speedup, records filled
    in) puts 2:4 weights on the sparse tensor-core kernel, with `gpu_dense` (see `_quant_converters`) dense linears
    on the dense one."""
    from tvm import relax
    from tvm.relax.frontend.torch import from_exported_program

    import torch
    from torch.export import default_decompositions

    _refuse_random(graph)
    graph = complex_as_real(graph)  # (TVM has no complex dtype: Llama's rotary embedding as (real, imag) pairs)
    if device == "cpu":
        graph = float32_compute(graph)
        from graphopt.passes.canonicalize.transposed import grouped_as_convs
        graph = grouped_as_convs(graph)  # (grouped transposed convs as grouped convs, for the kernels)
        from graphopt.passes.canonicalize.attention import manual_attention_as_sdpa
        from graphopt.targets.tvm.cpu.rules import vector_lanes
        from graphopt.targets.tvm.host import cpu_target
        lanes = vector_lanes(target if target is not None else cpu_target())
        # attention written as matmul, softmax, matmul: one SDPA, for the fused kernel (each chain where it pays)
        graph = manual_attention_as_sdpa(graph, takes=lambda n: _manual_attention_pays(n, lanes))
    # core-ATen decomposition, except linear: decomposed, it becomes permute + addmm and hides the constant weight
    # the packed GEMM needs
    table = default_decompositions()
    table.pop(torch.ops.aten.linear.default, None)
    table.pop(torch.ops.aten.upsample_nearest3d.vec, None)  # (its index gathers do not import; nearest_take)
    table.pop(torch.ops.aten.upsample_trilinear3d.vec, None)  # (nor do trilinear's; trilinear)
    table.pop(torch.ops.aten.heaviside.default, None)  # (its decomposition mixed dtypes in a where; more_ops)
    table[torch.ops.aten.col2im.default] = _col2im_as_conv_transpose  # (its index_put did not build past batch 1)
    if device != "cpu":  # (its index_put did not import; the CPU converter runs the row scatter kernel)
        table[torch.ops.aten.index_add.default] = _index_add_as_matmul
    else:
        table.pop(torch.ops.aten.index_add.default, None)
    table[torch.ops.aten.signbit.default] = _signbit  # (no converter)
    table[torch.ops.aten.bilinear.default] = _bilinear  # (its _trilinear has no converter)
    table[torch.ops.aten.narrow_copy.default] = _narrow_copy  # (no converter)
    table[torch.ops.aten.dist.default] = _dist  # (no converter)
    table[torch.ops.aten._pdist_forward.default] = _pdist  # (no converter)
    table[torch.ops.aten.linalg_det.default] = _det  # (no converter; _linalg_det returns its LU factors too)
    table[torch.ops.aten.linalg_slogdet.default] = _slogdet
    table[torch.ops.aten.logdet.default] = _logdet
    if device == "cpu":  # layer norm whole, for its row kernel (norm.py); not native_layer_norm's 3 outputs
        table.pop(torch.ops.aten.layer_norm.default, None)
        # instance norm, roll, im2col (F.unfold), col2im (F.fold), linear / bicubic resizing and the reflect /
        # replicate / circular pads whole, for their kernels (their decompositions: a batch norm over [1, N C, H, W],
        # index gathers)
        aten = torch.ops.aten
        for op in (aten.instance_norm.default, aten._pad_circular.default, aten.roll.default, aten.im2col.default,
                   aten.col2im.default,
                   aten.upsample_linear1d.vec, aten.upsample_bicubic2d.vec,
                   *(getattr(aten, f"{kind}_pad{d}d").default for kind in ("reflection", "replication")
                     for d in (1, 2, 3))):
            table.pop(op, None)
        # SDPA whole, for the fused attention kernel, where it takes every SDPA of the graph (else all decompose)
        from graphopt.targets.tvm.cpu.rules import vector_lanes
        from graphopt.targets.tvm.host import cpu_target
        lanes = vector_lanes(target if target is not None else cpu_target())
        sdpa = [n for n in graph.gm.graph.nodes if n.op == "call_function"
                and n.target is aten.scaled_dot_product_attention.default]
        if sdpa and all(_sdpa_geometry(n, lanes) is not None for n in sdpa):
            table.pop(aten.scaled_dot_product_attention.default, None)
        # LSTM and GRU layers whole, for the recurrence kernels, where they take every one (else all decompose)
        for op in (aten.lstm.input, aten.gru.input):
            rnns = [n for n in graph.gm.graph.nodes if n.op == "call_function" and n.target is op]
            if rnns and all(_rnn_geometry(n) is not None for n in rnns):
                table.pop(op, None)
    if device != "cpu":  # (the int8 weights fold-constants keeps are for the CPU's int8 kernels)
        from graphopt.passes.canonicalize.fold_constants import dequantize_kept_weights
        graph = dequantize_kept_weights(graph)
        for n in graph.gm.graph.nodes:
            if n.op == "call_function" and target_name(n.target) in ("graphopt.bsr_linear.default",
                                                                     "graphopt.bsr_conv1x1.default"):
                raise UnsupportedOpError(n.name, target_name(n.target).rsplit(".", 1)[0],
                                         "the cuda targets have no BSR kernel (select-sparse-layout chose it for "
                                         "the CPU): run select-sparse-layout with target='cuda' "
                                         "(candidates=dense,sp24) on the masked graph, or compile with --target "
                                         "llvm")
    from graphopt.ir.graph import run_decompositions
    ep = run_decompositions(graph.to_exported_program(), table)
    for n in ep.graph_module.graph.nodes:
        # topk(sorted=False) lets the values come in any order: TVM's importer takes only sorted ("Currently supports
        # only sorted output"), which is one of those orders
        if n.op == "call_function" and n.target is torch.ops.aten.topk.default:
            if len(n.args) > 4:
                n.args = n.args[:4] + (True,)
            elif "sorted" in n.kwargs:
                n.kwargs = {**n.kwargs, "sorted": True}
    _refuse_side_effects(graph, ep)
    from graphopt.targets.tvm.cpu.batch import samples_across
    from graphopt.targets.tvm.cpu.rules import target_cores
    from graphopt.targets.tvm.host import cpu_target
    cores = target_cores(target if target is not None else cpu_target()) if device == "cpu" else 0
    try:
        convert = _converters(ep, device, sparse24, target, graph.meta.get("sparse_layout"), gpu_dense)
        convert["convolution.default"] = _with_conv_transpose_3d(convert.get("convolution.default"))
        with samples_across(cores):
            mod = from_exported_program(ep, keep_params_as_input=False, custom_convert_map=convert,
                                        run_ep_decomposition=False)
    except AssertionError as e:
        # the Relax importer asserts on ops it has no converter for; name the node for the user
        # (its message lists them: "Unsupported function types ['index_reduce.default']"; matched by op name, not
        # substring: "default" holds "lt", which had blamed a `<` node)
        import re
        msg = str(e)
        listed = {m.split(".")[0] for m in re.findall(r"'([A-Za-z_0-9]+\.[A-Za-z_0-9]+)'", msg)}
        hint = "TVM's Relax importer has no converter for it; run a pass that rewrites it or choose --target onnx"
        for n in graph.gm.graph.nodes:
            if n.op == "call_function" and target_name(n.target).split(".")[1] in listed:
                raise UnsupportedOpError(n.name, target_name(n.target), _constant_hint(graph, n.name, hint)) from None
        if listed:
            node, op = _decomposed_from(ep, graph, listed)
            raise UnsupportedOpError(node, op or "aten." + ", aten.".join(sorted(listed)), _constant_hint(
                graph, node, hint.replace("for it", "for it (an op another op of the graph decomposes into)"))
                                     ) from None
        raise TargetError(f"TVM could not import the graph: {msg}") from None
    except (UnsupportedOpError, TargetError):  # a converter's own refusal, naming the node
        raise
    except Exception as e:
        raise TargetError(f"TVM could not import the graph: {type(e).__name__}: {e}") from None
    # converters that take another op's inputs instead of its result (an int8 linear reading a dynamic quantize's
    # codes, not its float output) leave that result unused: dropped here, not computed on every call
    return relax.transform.DeadCodeElimination()(_post_import_fixes(mod))


def _post_import_fixes(mod):
    """Rewrites of the imported module, each for a way TVM 0.27 fails on a valid graph:
    - every `take` in "fast" mode (TVM's importer uses it for index_select, advanced indexing, gathers) becomes
      "wrap" (the index modulo the axis): fast mode reads out of bounds on a bad index, and the .so must stay
      memory-safe on any input; a negative index counts from the end, as in PyTorch (`qkv[..., [-2]]`, Falcon's
      key heads: "clip" had taken index 0 and computed a wrong model);
    - bool * bool and bool + bool become logical and / or (TVM's LLVM codegen fails on the bool arithmetic
      torch.logaddexp decomposes into);
    - a concat drops operands that are empty along its axis (torch.block_diag's zero-width padding blocks,
      `torch.cat([torch.empty(0, d), x])`): folded to zero-element constants they made a library that TVM saved
      but could not load ("Invalid DLTensor file format");
    - x / 0.0 and x % 0.0 (a one-element zero constant: TVM's simplifier stopped the build with "Divide by zero")
      become x * +-inf and x * NaN, IEEE's results, and x * 0.0 becomes 0 where x is finite, else NaN (TVM folded
      it to 0: the NaN PyTorch gives for an inf or NaN x was lost); -x of an unsigned tensor is 0 - x (its lowering
      did not build)."""
    import tvm
    from tvm import relax

    take, concat = tvm_op("relax.take"), tvm_op("relax.concat")
    divide, floor_mod, negative = tvm_op("relax.divide"), tvm_op("relax.floor_mod"), tvm_op("relax.negative")
    multiply = tvm_op("relax.multiply")

    def dtype_of(expr) -> str:
        return str(getattr(getattr(expr, "ty", None), "dtype", ""))

    def _scalar_zero(expr) -> bool:
        """A one-element float constant equal to (+-) zero: TVM inlines it as an immediate and folds with it."""
        if not isinstance(expr, tvm.ir.expr.Constant) or not dtype_of(expr).startswith(("float", "bfloat")):
            return False
        v = expr.value.numpy()
        return v.size == 1 and float(v.reshape(-1)[0]) == 0.0
    bool_ops = {tvm_op("relax.multiply"): relax.op.logical_and, tvm_op("relax.add"): relax.op.logical_or}

    def extent(expr, axis):
        shape = getattr(getattr(expr, "ty", None), "shape", None)
        values = getattr(shape, "values", None)
        if values is None or not -len(values) <= axis < len(values):
            return None
        v = values[axis]
        return int(v.value) if hasattr(v, "value") else None

    @relax.expr_functor.mutator
    class Bound(relax.PyExprMutator):
        def visit_call_(self, call):
            call = super().visit_call_(call)
            for op, logical in bool_ops.items():  # ATen's bool * bool / bool + bool (torch.logaddexp's isfinite
                # test): TVM's LLVM codegen fails on a bool multiply ("MatchesCode(kDLFloat)")
                if call.op.same_as(op) and all(str(getattr(getattr(a, "ty", None), "dtype", "")) == "bool"
                                               for a in call.args):
                    return logical(*call.args)
            if call.op.same_as(divide) and _scalar_zero(call.args[1]):  # x / 0.0: TVM's simplifier stops the
                # build ("Divide by zero"); x * +-inf is IEEE's x / +-0.0 (+-inf by sign, NaN at 0 and NaN)
                zero = float(call.args[1].value.numpy().reshape(-1)[0])
                return relax.op.multiply(call.args[0], relax.const(math.copysign(math.inf, zero), dtype_of(call)))
            if call.op.same_as(multiply) and len(call.args) == 2:  # x * 0.0: TVM folds it to 0, losing IEEE's NaN
                # at inf and NaN (its zero is +0.0 where x * 0.0 gives -0.0 for a negative x)
                for zero, other in ((call.args[1], call.args[0]), (call.args[0], call.args[1])):
                    if _scalar_zero(zero) and len(zero.ty.shape) <= len(getattr(other.ty, "shape", None) or ()):
                        dt = dtype_of(call)
                        return relax.op.where(relax.op.isfinite(other), relax.const(0.0, dt),
                                              relax.const(math.nan, dt))
            if call.op.same_as(floor_mod) and _scalar_zero(call.args[1]):  # x % 0.0: NaN (the same build stop)
                return relax.op.multiply(call.args[0], relax.const(math.nan, dtype_of(call)))
            if call.op.same_as(negative) and dtype_of(call).startswith("uint"):  # -x modulo 2^bits (TVM's
                # lowering multiplied by -1, no unsigned value: the build stopped)
                return relax.op.subtract(relax.op.zeros_like(call.args[0]), call.args[0])
            if call.op.same_as(take) and str(call.attrs.mode) == "fast":
                return relax.op.take(call.args[0], call.args[1], call.attrs.axis, mode="wrap")
            if call.op.same_as(concat) and hasattr(call.args[0], "fields") and call.attrs.axis is not None:
                fields = list(call.args[0].fields)
                kept = [f for f in fields if extent(f, int(call.attrs.axis)) != 0]
                if kept and len(kept) < len(fields):
                    return kept[0] if len(kept) == 1 else relax.op.concat(kept, int(call.attrs.axis))
            return call

    for gv, func in list(mod.functions.items()):
        if isinstance(func, relax.Function):
            mod[gv] = Bound().visit_expr(func)
    return mod


def tvm_op(name: str):
    import tvm
    return tvm.ir.Op.get(name)
