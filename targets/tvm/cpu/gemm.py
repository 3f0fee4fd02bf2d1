"""Dense linear layers with weights packed at compile time: the register-blocked GEMM micro-kernel.

y[M, N] = x[M, K] @ W^T: W (a constant) is stored as panels Wp[N/nr, K, nr] so the kernel streams each panel
sequentially; a tile of mr x nr outputs (6 x 16 on AVX2: 12 accumulator registers) is accumulated over all of K with
one broadcast of x and nr/lanes vector loads of Wp per step. Tiles run in parallel, panel-major so a panel is reused
from L2 by every row tile; the M % mr last rows get one smaller tile per panel. Measured here (Zen 3, 2 threads): ~85 GMAC/s on
126x768x768, where the rule-scheduled matmul on the unpacked weight reaches 22-47.
"""
from __future__ import annotations

import math

import numpy as np

from graphopt.targets.tvm.cpu.knobs import Site, bind, pick
from graphopt.targets.tvm.cpu.parse import parse_kernel

MR = 6


def _gemm_nest(rows: int, nr: int, k: int, row0: str, panel: str, n_tiles: int, name: str, vec: int = 0,
               bias: bool = False) -> str:
    """One parallel loop over tiles of `rows` x nr outputs; row0 / panel are expressions of the tile index t. With
    `vec` (16: AVX-512) the tile is nr / vec buffers of rows x vec, each step written as explicit vectors. `bias`:
    the store adds bias[column]."""
    if vec and nr % vec == 0 and nr > vec:
        names = [f"{name}{j}" for j in range(nr // vec)]
        decl = "".join(f"""
        {a} = T.decl_buffer(({rows * vec},), "float32", scope="global")""" for a in names)
        zero = "".join(f"""
            {a}[T.ramp(i * {vec}, 1, {vec})] = T.broadcast(T.float32(0), {vec})""" for a in names)
        lane = f"T.ramp(i * {vec}, 1, {vec})"
        step = "".join(f"""
                {a}[{lane}] = ({a}[{lane}] + T.broadcast(a[{row0} + i, kk], {vec})
                    * bp[{panel}, kk, T.ramp({j * vec}, 1, {vec})])""" for j, a in enumerate(names))
        store = "".join(f"""
            c[{row0} + i, T.ramp(({panel}) * {nr} + {j * vec}, 1, {vec})] = {a}[T.ramp(i * {vec}, 1, {vec})]"""
                        + (f" + bias[T.ramp(({panel}) * {nr} + {j * vec}, 1, {vec})]" if bias else "")
                        for j, a in enumerate(names))
        return f"""
    for t in T.parallel({n_tiles}):{decl}
        for i in T.unroll({rows}):{zero}
        for kk in T.serial({k}):
            for i in T.unroll({rows}):{step}
        for i in T.unroll({rows}):{store}
"""
    return f"""
    for t in T.parallel({n_tiles}):
        {name} = T.decl_buffer(({rows}, {nr}), "float32", scope="global")
        for i in T.unroll({rows}):
            for v in T.vectorized({nr}):
                {name}[i, v] = T.float32(0)
        for kk in T.serial({k}):
            for i in T.unroll({rows}):
                for v in T.vectorized({nr}):
                    {name}[i, v] = {name}[i, v] + a[{row0} + i, kk] * bp[{panel}, kk, v]
        for i in T.unroll({rows}):
            for v in T.vectorized({nr}):
                c[{row0} + i, ({panel}) * {nr} + v] = {name}[i, v]{f" + bias[({panel}) * {nr} + v]" if bias else ""}
"""


def gemm_source(m: int, k: int, n: int, mr: int, nr: int, vec: int = 0, bias: bool = False) -> str:
    """a[M, K] @ bp[N/nr, K, nr] -> c[M, N] for N % nr == 0; the last M % mr rows get one smaller tile per panel.
    Tiles are panel-major, so a panel is reused from L2 by every row tile. The accumulator tile is a stack array
    (scope "global" inside the parallel body) that LLVM keeps in registers (see sparse.py). Row-tile-major (each
    thread writing whole output rows, which the int8 GEMM gained 1.02-1.10x from: `int8._qgemm_frame`) measured
    the same here on MiniLM's shapes (Zen 4, 2 threads): this kernel runs at the FMA peak.

    `vec=16` (AVX-512): the tile is one buffer of rows x 16 per 16 columns, written as explicit 16-lane vectors
    (`_gemm_nest`), which lets it reach 6 x 64 (24 zmm accumulators; one 2D buffer that size is over the 1 KB TVM
    keeps on the stack). Kernel alone (Emerald Rapids, 2 threads, interleaved, hot): 6 x 32 in that form 0.93-0.98x
    the 2D buffer's time, 6 x 64 0.80-0.87x (512^3 1448 -> 1195 us, 128x1536x384 856 -> 703, 128x384x384 183 ->
    153); 8 x 48 0.81-0.86x, 12 x 32 0.92-0.93x, 5 or 7 x 64 0.86-0.91x.

    `bias`: a linear's bias [N] added in the store (it had been a separate elementwise kernel after each linear,
    reading and writing the output again: MiniLM's 36 linears, 30 of them with no activation to fuse it into)."""
    mt, nt, rem = m // mr, n // nr, m % mr
    body = _gemm_nest(mr, nr, k, f"(t % {mt}) * {mr}", f"t // {mt}", mt * nt, "acc", vec, bias) if mt else ""
    if rem:
        body += _gemm_nest(rem, nr, k, str(mt * mr), "t", nt, "acc_tail", vec, bias)
    bias_arg = f' bias: T.Buffer(({n},), "float32"),' if bias else ""
    return f"""
@T.prim_func(private=True)
def gemm(a: T.Buffer(({m}, {k}), "float32"), bp: T.Buffer(({nt}, {k}, {nr}), "float32"),{bias_arg}
         c: T.Buffer(({m}, {n}), "float32")):
    T.func_attr({{"tirx.noalias": True, "tirx.is_scheduled": True, "graphopt.knobs": "mr={mr},nr={nr}"}}){body}"""


def gemm_packed(m: int, k: int, n: int, mr: int, nr: int, vec: int = 0, bias: bool = False):
    """PrimFunc(a[M, K], bp[N/nr, K, nr], [bias[N],] c[M, N])."""
    return parse_kernel(gemm_source(m, k, n, mr, nr, vec, bias))


def pack_weight(w: np.ndarray, nr: int) -> np.ndarray:
    """W [N, K] -> Wp [N/nr, K, nr] (panel-major, each panel row contiguous)."""
    n, k = w.shape
    return np.ascontiguousarray(w.T.reshape(k, n // nr, nr).transpose(1, 0, 2))


def panel_width(n: int, lanes: int) -> int:
    """Columns of a packed weight panel: two vectors, or one of 16 floats where AVX-512's two would be wider than the
    layer (16 <= N < 32: those layers kept the 16-column panel they have on AVX2); 0 where N fills neither."""
    if n >= 2 * lanes:
        return 2 * lanes
    return lanes if lanes >= 16 and n >= lanes else 0


def gemm_knobs(m: int, n: int, lanes: int) -> tuple[dict, list[dict]]:
    """The rule's register tile (`mr` rows x `nr` columns of y: 6 x 2 vectors) and the candidates tuning may measure
    (`knobs.py`): 8 x 1, 6 x 2 and 3 x 4 vectors, 8-12 accumulator registers of AVX2's 16, where the layer has rows
    for two tiles and columns for one panel. 4 x 3 is not one: LLVM legalizes the 24-lane vectors so badly that it
    ran 8x slower inside MiniLM.

    With 16 lanes also 6 x 4 vectors (64 columns, 24 of AVX-512's 32 registers; `gemm_source`), the rule where N
    is whole 64-column panels."""
    rule = {"mr": MR, "nr": 2 * lanes} if panel_width(n, lanes) == 2 * lanes else {"mr": 8, "nr": lanes}
    tiles = ((1, 8), (2, MR), (4, 3)) + (((4, MR),) if lanes >= 16 else ())
    cands = [{"mr": mr, "nr": v * lanes} for v, mr in tiles if m >= 2 * mr and n >= v * lanes]
    if lanes >= 16 and n % (4 * lanes) == 0 and {"mr": MR, "nr": 4 * lanes} in cands:
        rule = {"mr": MR, "nr": 4 * lanes}
    return rule, cands if rule in cands else [rule]


def packed_linear_applies(m: int, n: int, nr: int) -> bool:
    """From two rows (one row is the weight stream, `gemv_source`); N is padded to whole panels. Under 12 rows
    (fewer than two row tiles) the rules' generic kernel had kept the layer, at 3.6-11x the packed kernel's time
    (1280 -> 1000 on Zen 4, 2 threads: 2-6 rows 175-511 us against 48-74, 7-11 rows 251-709 against 116-139):
    a classifier head at batch 2-11, or a transformer on a short sequence."""
    return m >= 2 and nr > 0 and n >= nr


def gemv_source(k: int, n: int, nr: int, with_bias: bool, quant_bits: int | None = None) -> str:
    """y[n] = x[k] . W[n, k] (+ b[n]) for one row: the weight is streamed once, panel by panel (Wp[N/nr, K, nr],
    contiguous), each panel accumulated in 4 independent partial sums (k mod 2, two vectors each) so the FMA
    latency is hidden and the loop runs at memory speed; panels are split over the threads. A linear layer at
    batch 1 (a classifier head) is a weight stream: TVM's GEMV schedule read it at half ORT's bandwidth.

    quant_bits=8|4: the one-row qlinear, y = (sum_k (x[k] - zx) w[n, k]) * mult[n] (+ b[n]) with x int8, zx in
    the 1-float buffer `qz`, and W int8 (or int4: a byte holds columns c and c + nr/2 of a panel row, low nibble
    first, so both halves unpack with shifts and no shuffle), converted to float as it is loaded (a float sum of
    integer products: within float rounding of the integer result)."""
    kq, kr = divmod(k, 2)
    half = nr // 2

    def x_at(kidx: str) -> str:
        return f"x[{kidx}]" if quant_bits is None else f'T.Cast("float32", x[{kidx}]) - zx'

    def w_at(kidx: str, hv: int) -> str:
        if quant_bits is None:
            return f"wp[T.ramp((t * {k} + {kidx}) * {nr} + {hv * half}, 1, {half})]"
        if quant_bits == 8:
            return f'T.Cast("float32x{half}", wp[T.ramp((t * {k} + {kidx}) * {nr} + {hv * half}, 1, {half})])'
        b = f'T.Cast("int32x{half}", wp[T.ramp((t * {k} + {kidx}) * {half}, 1, {half})])'
        v = (f"T.shift_right(T.shift_left({b}, T.broadcast(28, {half})), T.broadcast(28, {half}))" if hv == 0
             else f"T.shift_right({b}, T.broadcast(4, {half}))")
        return f'T.Cast("float32x{half}", {v})'

    def step(kidx: str, q: int, pad: str) -> str:
        out = ""
        for hv in range(2):
            a = f"acc[T.ramp({(q * 2 + hv) * half}, 1, {half})]"
            out += f"""
{pad}{a} = {a} + T.broadcast({x_at(kidx)}, {half}) * {w_at(kidx, hv)}"""
        return out

    body = "".join(step(f"kk * 2 + {q}", q, " " * 12) for q in range(2))
    rest = step(str(k - 1), 0, " " * 8) if kr else ""
    val = f"acc[v] + acc[{nr} + v]" if quant_bits is None else f"(acc[v] + acc[{nr} + v]) * mult[t * {nr} + v]"
    b = f" + bias[t * {nr} + v]" if with_bias else ""
    if quant_bits is None:
        args = f'x: T.Buffer(({k},), "float32"), wp: T.Buffer(({n * k},), "float32"),'
    else:
        args = (f'x: T.Buffer(({k},), "int8"), wp: T.Buffer(({n * k * quant_bits // 8},), "int8"), '
                f'mult: T.Buffer(({n},), "float32"), qz: T.Buffer((1,), "float32"),')
    bias_arg = f' bias: T.Buffer(({n},), "float32"),' if with_bias else ""
    zx = "" if quant_bits is None else """
    zx: T.let = qz[0]"""
    return f"""
@T.prim_func(private=True)
def gemv({args}{bias_arg}
         out: T.Buffer(({n},), "float32")):
    T.func_attr({{"tirx.noalias": True, "tirx.is_scheduled": True}}){zx}
    for t in T.parallel({n // nr}):
        acc = T.decl_buffer(({2 * nr},), "float32", scope="global")
        for v in T.vectorized({2 * nr}):
            acc[v] = T.float32(0)
        for kk in T.serial({kq}):{body}{rest}
        for v in T.vectorized({nr}):
            out[t * {nr} + v] = {val}{b}
"""


def padded_rows(w: np.ndarray, nr: int) -> np.ndarray:
    """W [N, K] with zero rows appended up to a whole number of nr-column panels."""
    n_pad = -(-int(w.shape[0]) // nr) * nr
    out = np.zeros((n_pad, *w.shape[1:]), w.dtype)
    out[:w.shape[0]] = w
    return out


def call_gemv(bb, x, k: int, n: int, nr: int, packed, consts: list, bias_np: np.ndarray | None,
              quant_bits: int | None, name: str):
    """Emit the one-row weight stream: x flattened to [K], the packed weight (an array, or a flat Relax value:
    `packed_weight`), `consts` (after the weight, before the bias), the bias padded to whole panels; returns y [N]
    (panel padding sliced off)."""
    from tvm import relax

    n_pad = -(-n // nr) * nr
    weight = relax.const(np.ascontiguousarray(packed).reshape(-1)) if isinstance(packed, np.ndarray) else packed
    args = [bb.emit(relax.op.reshape(x, (k,))), weight, *(relax.const(c) for c in consts)]
    if bias_np is not None:
        args.append(relax.const(np.pad(bias_np.astype(np.float32), (0, n_pad - n))))
    src = gemv_source(k, n_pad, nr, bias_np is not None, quant_bits)
    gv = bb.add_func(parse_kernel(src), name)
    y = bb.emit(relax.call_tir(gv, args, relax.TensorType((n_pad,), "float32")))
    if n_pad != n:
        y = bb.emit(relax.op.strided_slice(y, axes=[0], begin=[0], end=[n]))
    return y


def emit_packed_gemv(bb, x, w: np.ndarray, bias_np: np.ndarray | None, k: int, lanes: int, codes=None):
    """Batch-1 y = x @ w.T (+ bias) for x [..., K] with one row; returns y [N] or None when it does not apply.
    `codes`: as `emit_packed_linear`'s."""
    n = int(w.shape[0])
    nr = panel_width(n, lanes)
    if not nr or w.dtype != np.float32:
        return None
    wpad = padded_rows(w, nr)
    return call_gemv(bb, x, k, n, nr, packed_weight(bb, wpad, nr, codes, flat=True), [], bias_np, None,
                     f"gemv_packed_{k}x{wpad.shape[0]}")


def dequantize_panels_source(panels: int, k: int, nr: int, flat: bool = False) -> str:
    """TVMScript of a load-time kernel (`prepared.py`: the unread int8 seed last) making the packed GEMM's float
    weight [panels, K, nr] (`flat`: the GEMV's, as one dimension) from the int8 one packed alike and a float32
    scale per column: a weight-only int8 linear (`quantize{activations=none}`) stays int8 in the artifact."""
    from graphopt.targets.tvm.cpu.prepared import kernel_head
    attrs, read_seed = kernel_head()
    shape, at = ((panels * k * nr,), f"(p * {k} + kk) * {nr} + c") if flat else ((panels, k, nr), "p, kk, c")
    return f"""
@T.prim_func(private=True)
def dequantize_panels(w: T.Buffer(({panels * k * nr},), "int8"), s: T.Buffer(({panels * nr},), "float32"),
                      seed: T.Buffer((1,), "int8"), out: T.Buffer({shape}, "float32")):
{attrs}
{read_seed}
    for p in T.parallel({panels}):
        for kk in T.serial({k}):
            for c in T.vectorized({nr}):
                out[{at}] = T.Cast("float32", w[(p * {k} + kk) * {nr} + c]) * s[p * {nr} + c]
"""


def packed_weight(bb, w: np.ndarray, nr: int, codes=None, flat: bool = False):
    """The packed GEMM's weight `pack_weight(w, nr)` as a Relax value (`flat`: one dimension, the GEMV's): a
    constant, or when lowering for an artifact (`prepared.load_time_weights`) and `codes` = (int8 [N, K], float32
    scale [N]) give w (w = codes * scale, the same rows), the int8 codes packed alike as the constant and
    `dequantize_panels_source` making the floats when the artifact is loaded."""
    from tvm import relax

    from graphopt.targets.tvm.cpu import prepared
    if codes is None or not prepared.active():
        packed = pack_weight(w, nr)
        return relax.const(packed.reshape(-1) if flat else packed)
    q, scale = codes
    n, k = w.shape
    q = np.concatenate([q, np.zeros((n - q.shape[0], k), np.int8)])  # (panel padding: zero rows)
    scale = np.concatenate([np.asarray(scale, np.float32), np.zeros(n - len(scale), np.float32)])
    gv = bb.add_func(parse_kernel(dequantize_panels_source(n // nr, k, nr, flat)),
                     f"dequantize_panels_{n}x{k}_{nr}" + ("_flat" if flat else ""))
    return prepared.load_time_call(bb, gv, [relax.const(pack_weight(q, nr).reshape(-1)), relax.const(scale)],
                                   relax.TensorType((n * k,) if flat else (n // nr, k, nr), "float32"))


def emit_packed_linear(bb, x, w: np.ndarray, bias, x_shape, lanes: int, codes=None):
    """Emit y = x @ w.T (+ bias) with the packed kernel; None when it does not apply (caller emits plain linear).
    `codes`: the int8 codes and per-row scales w dequantizes (`packed_weight`: kept int8 in an artifact)."""
    from tvm import relax

    lead, k = tuple(int(d) for d in x_shape[:-1]), int(x_shape[-1])
    m = math.prod(lead) if lead else 1
    n = int(w.shape[0])
    nr = panel_width(n, lanes)
    if not packed_linear_applies(m, n, nr) or w.dtype != np.float32:
        return None
    rule, cands = gemm_knobs(m, n, lanes)
    site = Site("gemm", f"{m}x{k}x{n}|v{lanes}", rule, cands, m * k * n)
    kn = pick(site)
    nr = kn["nr"]
    n_pad = -(-n // nr) * nr  # channel-pruned layers: zero panels past N, sliced off below
    x2 = bb.emit(relax.op.reshape(x, (m, k)))
    if n_pad != n:
        w = np.concatenate([w, np.zeros((n_pad - n, k), w.dtype)])
    fused = bias is not None and n_pad == n  # (a padded layer's bias is added after the slice)
    gv = bb.add_func(gemm_packed(m, k, n_pad, kn["mr"], nr, lanes if lanes >= 16 else 0, fused),
                     f"gemm_packed_{m}x{k}x{n_pad}" + ("_bias" if fused else ""))
    bind(site, gv.name_hint)
    args = [x2, packed_weight(bb, w, nr, codes)] + ([bias] if fused else [])  # (bias: [N], as linear's)
    y = bb.emit(relax.call_tir(gv, args, relax.TensorType((m, n_pad), "float32")))
    if n_pad != n:
        y = bb.emit(relax.op.strided_slice(y, axes=[1], begin=[0], end=[n]))
    if bias is not None and not fused:
        y = bb.emit(relax.op.add(y, bias))
    return bb.emit(relax.op.reshape(y, (*lead, n))) if lead != (m,) else y
