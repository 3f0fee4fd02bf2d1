"""int8 pointwise convolution for AVX2 CPUs without VNNI: exact int16 pair products with `vpmaddwd`, reading int8
activations as they are stored (NCHW) and writing the next layer's int8 activations (or floats) from registers.

The weight is packed at compile time as int16 pairs per output channel, so one 32-bit broadcast holds
(w[co, 2k], w[co, 2k+1]). In the reduction loop, 8 pixels of input channels 2k and 2k+1 are loaded as int8, byte
interleaved (`vpunpcklbw`) and sign-extended (`vpmovsxbw`); one `vpmaddwd` then does 16 multiply-adds into 8 int32
lanes: twice the fp32 FMA rate, exact (int8 products summed in pairs fit int32). A 6 x 16 output tile (6 channels,
16 pixels) stays in 12 registers over all of Cin. The epilogue works on the tile in registers: it removes the input
zero point (acc - zx * sum(w)), scales per channel (sx * w_scale), adds the bias, clamps (a fused ReLU/ReLU6) and,
when the only consumer is a quantize, rounds to the consumer's int8 grid and stores int8: no int32 or float tensor,
no separate requantize or layout pass ever touches memory. The last pixel block overlaps the one before it (it
starts at P - 16), so 49- and 196-pixel images need no tail code.
"""
from __future__ import annotations

import numpy as np

from graphopt.targets.tvm.cpu.conv import _clamped, in_grid_steps

MR = 6
PAIR_ORDER = [j for i in range(8) for j in (i, i + 8)]  # byte interleave of two 8-byte rows


def qconv1x1_source(cout: int, cin: int, p: int, nv: int, clamp: tuple[float, float] | None = None,
                    out_q: tuple[float, int, int, int] | None = None, dequantized: bool = False) -> str:
    """TVMScript of the kernel for x int8 [Cin, P] -> out [Cout, P]: int8 when out_q = (scale, zero point, qmin,
    qmax), else float32; with `dequantized` the int8 values are stored as the floats they stand for (for a
    depthwise consumer, which computes in float). nv vectors of 8 pixels per tile (P >= 8 * nv)."""
    nr = 8 * nv
    kp, odd = divmod(cin, 2)
    mt, cb = -(-cout // MR), -(-p // nr)
    c0 = f"T.min((t // {mt}) * {nr}, {p - nr})"

    def pairs(k: str, v: int, last: bool) -> str:
        lo = f"x[T.ramp(2 * ({k}) * {p} + {c0} + {v * 8}, 1, 8)]"
        hi = "T.broadcast(T.int8(0), 8)" if last else f"x[T.ramp((2 * ({k}) + 1) * {p} + {c0} + {v * 8}, 1, 8)]"
        return f'T.Cast("int16x16", T.Shuffle([{lo}, {hi}], {PAIR_ORDER}))'

    def step(k: str, last: bool = False, pad: str = " " * 12) -> str:
        # expressions are written inline: a TVMScript binding of a vector would be kept in memory, not a register
        out = f"""
{pad}for i in T.unroll({MR}):"""
        for v in range(nv):
            acc = f"acc[T.ramp(i * {nr} + {v * 8}, 1, 8)]"
            out += f"""
{pad}    {acc} = {acc} + T.call_llvm_pure_intrin("int32x8", "llvm.x86.avx2.pmadd.wd", {pairs(k, v, last)},
{pad}        T.reinterpret("int16x16", T.broadcast(wp[((t % {mt}) * {kp + odd} + {k}) * {MR} + i], 8)))"""
        return out

    co = f"(t % {mt}) * {MR} + i"
    store = ""
    for v in range(nv):
        # (acc - zx sum(w)) * mult + bias; with out_q, mult and bias are in the output's grid steps (emit scales them)
        val = (f'T.Cast("float32", acc[i * {nr} + {v * 8} + u] - corr[{co}]) * mult[{co}] + bias[{co}]')
        store += f"""
                for u in T.vectorized(8):
                    out[({co}) * {p} + {c0} + {v * 8} + u] = {_clamped(val, clamp, out_q, dequantized)}"""
    return f"""
@T.prim_func(private=True)
def qconv1x1(x: T.Buffer(({cin * p},), "int8"), wp: T.Buffer(({mt * (kp + odd) * MR},), "int32"),
             corr: T.Buffer(({mt * MR},), "int32"), mult: T.Buffer(({mt * MR},), "float32"),
             bias: T.Buffer(({mt * MR},), "float32"), out: T.Buffer(({cout * p},), "{'int8' if out_q and not dequantized else 'float32'}")):
    T.func_attr({{"tir.noalias": True, "tirx.is_scheduled": True}})
    for t in T.parallel({mt * cb}):
        acc = T.decl_buffer(({MR * nr},), "int32", scope="global")
        for i in T.unroll({MR}):
            acc[T.ramp(i * {nr}, 1, {nr})] = T.broadcast(T.int32(0), {nr})
        for kk in T.serial({kp}):{step("kk")}{step(str(kp), True, " " * 8) if odd else ""}
        for i in T.unroll({MR}):
            if {co} < {cout}:{store}
"""


def pack_pairs(wq: np.ndarray, mt: int, cin2: int) -> np.ndarray:
    """int8 W [Cout, Cin] -> int32 words of int16 pairs [Cout/MR, Cin/2, MR] (zero-padded rows and channels)."""
    cout, cin = wq.shape
    w = np.zeros((mt * MR, cin2), np.int16)
    w[:cout, :cin] = wq
    pairs = np.ascontiguousarray(w.reshape(mt, MR, cin2 // 2, 2).transpose(0, 2, 1, 3))
    return pairs.view(np.int32).reshape(-1)


def int8_kernels_available(target) -> bool:
    from tvm.target import codegen
    try:
        return bool(codegen.llvm_cpu_has_features(["avx2"], target))
    except Exception:
        return False


def qconv1x1_applies(x_shape) -> bool:
    return int(x_shape[2]) * int(x_shape[3]) >= 8


def epilogue_constants(wq: np.ndarray, w_scales: np.ndarray, bias: np.ndarray | None, sx: float, zx: int, mt: int,
                       out_q=None):
    """Per output channel (padded to mt * MR): zx * sum(w) (int32), sx * w_scale and bias (float32); the last two in
    the output's grid steps when the store quantizes (out_q)."""
    cout = wq.shape[0]
    corr = np.zeros(mt * MR, np.int32)
    corr[:cout] = int(zx) * wq.reshape(cout, -1).astype(np.int64).sum(1)
    mult = np.zeros(mt * MR, np.float32)
    mult[:cout] = w_scales.astype(np.float32) * np.float32(sx)
    b = np.zeros(mt * MR, np.float32)
    if bias is not None:
        b[:cout] = bias
    mult, b = in_grid_steps(mult, b, out_q)
    return corr, mult, b


def emit_qconv1x1(bb, xq, wq: np.ndarray, w_scales: np.ndarray, bias: np.ndarray | None, sx: float, zx: int,
                  x_shape, clamp: tuple[float, float] | None, out_q: tuple[float, int, int, int] | None,
                  dequantized: bool = False):
    """Pointwise qconv2d of xq int8 [1, Cin, H, W] -> [1, Cout, H, W]: int8 on out_q's grid (or the floats of that
    grid with `dequantized`), else float32."""
    import tvm
    from tvm import relax
    from tvm.script import tirx as T

    _, cin, h, w = (int(d) for d in x_shape)
    cout, p = int(wq.shape[0]), h * w
    nv = 2 if p >= 16 else 1
    mt = -(-cout // MR)
    src = qconv1x1_source(cout, cin, p, nv, clamp, out_q, dequantized)
    tag = f"{cout}x{cin}x{p}" + ("" if clamp is None else "_clamp") + ("_q" if out_q else "") + ("dq" if dequantized else "")
    gv = bb.add_func(tvm.script.parse(src, extra_vars={"T": T}), f"qconv1x1_{tag}")
    consts = epilogue_constants(wq, w_scales, bias, sx, zx, mt, out_q)
    dtype = "int8" if out_q and not dequantized else "float32"
    y = bb.emit(relax.call_tir(gv, [bb.emit(relax.op.reshape(xq, (cin * p,))),
                                    relax.const(pack_pairs(wq.reshape(cout, cin), mt, cin + cin % 2)),
                                    *(relax.const(c) for c in consts)],
                               relax.TensorType((cout * p,), dtype)))
    return bb.emit(relax.op.reshape(y, (1, cout, h, w)))


NR_GEMM = 16  # output columns per tile: two int32x8 accumulators per row


def qgemm_source(m: int, k: int, n: int) -> str:
    """TVMScript of y[M, N] = dequant(a[M, K] @ W^T) for a int16 (int8 values, widened by the producing quantize)
    and W (int8, so the artifact stays small) packed as pairs per panel of 16 columns: per reduction step one
    32-bit broadcast of a[m, 2k:2k+2] and two sign-extending panel loads (`vpmovsxbw`) feed 12 `vpmaddwd` (6 rows x
    16 columns); the epilogue removes the zero point, scales per
    column and adds the bias in registers. Tiles are panel-major (a panel stays in L2 for every row tile); the last
    row tile overlaps the one before it (M >= 6, any M % 6)."""
    kp, mt, nt = k // 2, -(-m // MR), n // NR_GEMM
    r0 = f"T.min((t % {mt}) * {MR}, {m - MR})"
    col = f"(t // {mt}) * {NR_GEMM}"
    steps = ""
    for h in range(2):
        steps += f"""
                acc[T.ramp(i * 16 + {h * 8}, 1, 8)] = acc[T.ramp(i * 16 + {h * 8}, 1, 8)] + T.call_llvm_pure_intrin(
                    "int32x8", "llvm.x86.avx2.pmadd.wd", T.Cast("int16x16", wp[T.ramp((((t // {mt}) * {kp} + kk) * 2 + {h}) * 16, 1, 16)]),
                    T.reinterpret("int16x16", T.broadcast(T.reinterpret("int32", a[T.ramp(({r0} + i) * {k} + 2 * kk, 1, 2)]), 8)))"""
    store = ""
    for h in range(2):
        cols = f"T.ramp({col} + {h * 8}, 1, 8)"
        store += f"""
            out[T.ramp(({r0} + i) * {n} + {col} + {h * 8}, 1, 8)] = T.Cast("float32x8", acc[T.ramp(i * 16 + {h * 8}, 1, 8)] - corr[{cols}]) * mult[{cols}] + bias[{cols}]"""
    return f"""
@T.prim_func(private=True)
def qgemm(a: T.Buffer(({m * k},), "int16"), wp: T.Buffer(({nt * kp * 2 * 16},), "int8"),
          corr: T.Buffer(({n},), "int32"), mult: T.Buffer(({n},), "float32"), bias: T.Buffer(({n},), "float32"),
          out: T.Buffer(({m * n},), "float32")):
    T.func_attr({{"tir.noalias": True, "tirx.is_scheduled": True}})
    for t in T.parallel({mt * nt}):
        acc = T.decl_buffer(({MR * 16},), "int32", scope="global")
        for i in T.unroll({MR}):
            acc[T.ramp(i * 16, 1, 16)] = T.broadcast(T.int32(0), 16)
        for kk in T.serial({kp}):
            for i in T.unroll({MR}):{steps}
        for i in T.unroll({MR}):{store}
"""


def pack_gemm_pairs(wq: np.ndarray) -> np.ndarray:
    """int8 W [N, K] (N % 16 == 0, K even) -> int8 [N/16, K/2, 2 halves, 8 columns, 2 (k, k+1)]."""
    n, k = wq.shape
    w = wq.astype(np.int8).reshape(n // NR_GEMM, 2, 8, k // 2, 2)  # panel, half, column, pair, k
    return np.ascontiguousarray(w.transpose(0, 3, 1, 2, 4)).reshape(-1)


def qgemm_applies(m: int, k: int) -> bool:
    """Row tiles to fill (batch-1 GEMV keeps TVM's kernel) and whole K pairs."""
    return m >= MR and k % 2 == 0


def emit_qlinear(bb, xq, wq: np.ndarray, w_scales: np.ndarray, bias: np.ndarray | None, sx: float, zx: int,
                 x_shape):
    """qlinear of xq int8 [..., K] with a constant int8 weight [N, K] -> float32 [..., N]; None when the kernel
    does not apply (the caller lowers it generically)."""
    import math

    import tvm
    from tvm import relax
    from tvm.script import tirx as T

    lead, k = tuple(int(d) for d in x_shape[:-1]), int(x_shape[-1])
    m, n = math.prod(lead), int(wq.shape[0])
    if not qgemm_applies(m, k):
        return None
    n_pad = -(-n // NR_GEMM) * NR_GEMM  # channel-pruned widths: zero columns past N, sliced off below
    w = np.zeros((n_pad, k), np.int8)
    w[:n] = wq
    corr, mult, b = epilogue_constants(w, np.pad(w_scales, (0, n_pad - n)), None if bias is None else
                                       np.pad(bias, (0, n_pad - n)), sx, zx, n_pad // MR + 1)
    gv = bb.add_func(tvm.script.parse(qgemm_source(m, k, n_pad), extra_vars={"T": T}), f"qgemm_{m}x{k}x{n_pad}")
    # the int16 copy fuses into the quantize that produced xq: one pass writes the widened values
    a = bb.emit(relax.op.reshape(bb.emit(relax.op.astype(xq, "int16")), (m * k,)))
    y = bb.emit(relax.call_tir(gv, [a, relax.const(pack_gemm_pairs(w)),
                                    *(relax.const(c[:n_pad]) for c in (corr, mult, b))],
                               relax.TensorType((m * n_pad,), "float32")))
    y = bb.emit(relax.op.reshape(y, (m, n_pad)))
    if n_pad != n:
        y = bb.emit(relax.op.strided_slice(y, axes=[1], begin=[0], end=[n]))
    return bb.emit(relax.op.reshape(y, (*lead, n)))
