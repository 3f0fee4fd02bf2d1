"""Row kernels over the last axis, vectorized along the row: layer norm (the row's sum, then its squared deviations,
in 8-lane accumulators, then the normalize-scale-shift store) and softmax (a vector max, exp by the same polynomial
TVM's fast_exp uses, a vector sum, the scale). dlight's CPU reduction schedule, which took these before, reduces a
row as a chain of scalar steps: MiniLM's 128 x 384 layer norm took 52 us a call on Zen 4, its int8 attention
softmax over 12 x 128 rows of 128 (with the quantize after it) 262 us."""
from __future__ import annotations

from graphopt.targets.tvm.cpu.parse import parse_kernel

import math

LANES = 8


def rows_apply(dim: int, dtype: str) -> bool:
    """The row kernels take float32 rows of at least one 8-float vector; a row that is not whole vectors ends with
    one overlapping the one before, its repeated lanes left out of the sums (`_tail`)."""
    return dtype == "float32" and dim >= LANES


def _tail(dim: int) -> tuple[str, str]:
    """(the row's last vector, overlapping the one before when dim is not whole vectors, as a ramp offset from the
    row start; a mask of its lanes past the whole vectors) or ("", "") when the row is whole vectors."""
    rem = dim % LANES
    if not rem:
        return "", ""
    return str(dim - LANES), f"T.ramp(0, 1, {LANES}) >= T.broadcast({LANES - rem}, {LANES})"


def _call_rows(bb, source: str, name: str, x, extra: list, x_shape):
    """Emit one row kernel (TVMScript `source`, taking x flat, the `extra` Relax inputs, y flat) on x [..., D]."""
    from tvm import relax

    dims = tuple(int(d) for d in x_shape)
    size = math.prod(dims)
    gv = bb.add_func(parse_kernel(source), f"{name}_{size // dims[-1]}x{dims[-1]}")
    flat = bb.emit(relax.op.reshape(x, (size,)))
    y = bb.emit(relax.call_tir(gv, [flat, *extra], relax.TensorType((size,), "float32")))
    return bb.emit(relax.op.reshape(y, dims))


def layer_norm_source(rows: int, dim: int, eps: float, residual: bool = False,
                      group: tuple[int, int, int] | None = None) -> str:
    """TVMScript of y[r, :] = (x[r, :] - mean) / sqrt(var + eps) * w + b per row (biased variance, two passes over
    the row, which stays in L1), rows in parallel. With `residual` the row is x + res (a residual add before the
    norm, as in every transformer block): summed into a row buffer in the first pass, so the sum never makes a
    pass over memory of its own. `group` = (groups, channels per group, pixels per channel >= 8): group norm, a
    row is one group of one sample and w, b are per channel, so the store scales each channel's pixels by one
    factor and shift (`_group_store`)."""
    steps = dim // LANES
    v = f"T.ramp(r * {dim} + j * {LANES}, 1, {LANES})"
    lane = f"T.ramp(0, 1, {LANES})"
    xv = f"e[T.ramp(j * {LANES}, 1, {LANES})]" if residual else f"x[{v}]"
    first = (f"""
            {xv} = x[{v}] + res[{v}]
            acc[{lane}] = acc[{lane}] + {xv}""" if residual else f"""
            acc[{lane}] = acc[{lane}] + x[{v}]""")
    res_arg = f' res: T.Buffer(({rows * dim},), "float32"),' if residual else ""
    row_buf = f"""
        e = T.decl_buffer(({dim},), "float32", scope="global")""" if residual else ""
    last, mask = _tail(dim)
    zero = f"T.broadcast(T.float32(0), {LANES})"
    lv = f"T.ramp(r * {dim} + {last}, 1, {LANES})"
    lx = f"e[T.ramp({last}, 1, {LANES})]" if residual else f"x[{lv}]"
    tail1 = tail2 = tail3 = ""
    if last:  # the overlapping last vector: its new lanes join the sums; its store repeats the same values
        tail1 = (f"""
        {lx} = x[{lv}] + res[{lv}]""" if residual else "") + f"""
        acc[{lane}] = acc[{lane}] + T.Select({mask}, {lx}, {zero})"""
        tail2 = f"""
        acc[{lane}] = acc[{lane}] + T.Select({mask}, ({lx} - T.broadcast(stat[0], {LANES})) * ({lx} - T.broadcast(
            stat[0], {LANES})), {zero})"""
        tail3 = f"""
        y[{lv}] = ({lx} - T.broadcast(stat[0], {LANES})) * T.broadcast(stat[1], {LANES}) * w[
            T.ramp({last}, 1, {LANES})] + b[T.ramp({last}, 1, {LANES})]"""
    store = f"""
        for j in T.serial({steps}):
            y[{v}] = ({xv} - T.broadcast(stat[0], {LANES})) * T.broadcast(stat[1], {LANES}) * w[
                T.ramp(j * {LANES}, 1, {LANES})] + b[T.ramp(j * {LANES}, 1, {LANES})]{tail3}"""
    params = dim
    if group is not None:
        store, params = _group_store(dim, *group), group[0] * group[1]
    return f"""
@T.prim_func(private=True)
def layer_norm_rows(x: T.Buffer(({rows * dim},), "float32"),{res_arg} w: T.Buffer(({params},), "float32"),
                    b: T.Buffer(({params},), "float32"), y: T.Buffer(({rows * dim},), "float32")):
    T.func_attr({{"tirx.noalias": True, "tirx.is_scheduled": True, "op_pattern": 8}})
    for r in T.parallel({rows}):{row_buf}
        acc = T.decl_buffer(({LANES},), "float32", scope="global")
        stat = T.decl_buffer((4,), "float32", scope="global")
        acc[{lane}] = T.broadcast(T.float32(0), {LANES})
        for j in T.serial({steps}):{first}{tail1}
        stat[0] = T.float32(0)
        for l in T.serial({LANES}):
            stat[0] = stat[0] + acc[l]
        stat[0] = stat[0] * T.float32({1.0 / dim!r})
        acc[{lane}] = T.broadcast(T.float32(0), {LANES})
        for j in T.serial({steps}):
            acc[{lane}] = acc[{lane}] + ({xv} - T.broadcast(stat[0], {LANES})) * ({xv} - T.broadcast(
                stat[0], {LANES})){tail2}
        stat[1] = T.float32(0)
        for l in T.serial({LANES}):
            stat[1] = stat[1] + acc[l]
        stat[1] = T.float32(1) / T.sqrt(stat[1] * T.float32({1.0 / dim!r}) + T.float32({float(eps)!r})){store}
"""


def _group_store(dim: int, groups: int, cg: int, hw: int) -> str:
    """The group norm store of row r (mean stat[0], 1 / std stat[1]): channel c of the group gets factor stat[2] =
    stat[1] w[c] and shift stat[3] = b[c] - mean stat[2] over its hw pixels, in vectors, the last overlapping the
    one before when hw is not whole vectors (it stores the same values again)."""
    def store(off: str, pad: str) -> str:
        at = f"T.ramp(r * {dim} + c * {hw} + {off}, 1, {LANES})"
        return f"""
{pad}y[{at}] = x[{at}] * T.broadcast(stat[2], {LANES}) + T.broadcast(stat[3], {LANES})"""
    return f"""
        for c in T.serial({cg}):
            stat[2] = stat[1] * w[(r % {groups}) * {cg} + c]
            stat[3] = b[(r % {groups}) * {cg} + c] - stat[0] * stat[2]
            for j in T.serial({hw // LANES}):{store(f"j * {LANES}", " " * 16)}{
                store(str(hw - LANES), " " * 12) if hw % LANES else ""}"""


def emit_group_norm(bb, x, weight, bias, x_shape, groups: int, eps: float):
    """group_norm(x) of x [N, C, *spatial] (float32, at least 8 pixels per channel) with weight and bias [C] (Relax
    values): the layer norm row kernel over each sample's groups, per-channel scale and shift in its store.
    Relax's group norm ran at 3x PyTorch's time (32 groups of 256x28x28: 150 us against 50)."""
    n, c = int(x_shape[0]), int(x_shape[1])
    hw = math.prod(int(d) for d in x_shape[2:])
    cg = c // groups
    src = layer_norm_source(n * groups, cg * hw, eps, group=(groups, cg, hw))
    from tvm import relax
    y = _call_rows(bb, src, f"group_norm_g{groups}", x, [weight, bias], (n * groups, cg * hw))
    return bb.emit(relax.op.reshape(y, tuple(int(d) for d in x_shape)))


def emit_layer_norm(bb, x, weight, bias, x_shape, eps: float, residual=None):
    """y = layer_norm(x (+ residual)) over the last axis of x [..., D] with weight and bias [D] (Relax values;
    residual: x's shape, added inside the kernel)."""
    from tvm import relax
    dim = int(x_shape[-1])
    rows = math.prod(int(d) for d in x_shape) // dim
    extra = [] if residual is None else [bb.emit(relax.op.reshape(residual, (rows * dim,)))]
    return _call_rows(bb, layer_norm_source(rows, dim, eps, residual is not None),
                      "layer_norm_rows" + ("_res" if residual is not None else ""), x, [*extra, weight, bias], x_shape)


# TVM's fast_exp (topi): exp(x) = 2^n * (1 + r + r^2 * p(r)), n = floor(x log2(e) + 1/2), r = x - n ln(2), x clamped
# to +-88.376 (the float32 range); p's coefficients, highest first
EXP_POLY = (1.9875691214110702e-4, 1.3981999363750219e-3, 8.333452045917511e-3, 4.1665796190500259e-2,
            1.666666567325592e-1, 0.5)


def _vconst(value: float, lanes: int = LANES) -> str:
    return f"T.broadcast(T.float32({value!r}), {lanes})"


def _exp_stmts(dst: str, src: str, pad: str, lanes: int = LANES) -> str:
    """TVMScript statements dst = exp(src) for one vector expression of `lanes` floats, TVM's fast_exp (clamped to
    the float range), through the kernel's vector buffers t and n."""
    lane = f"T.ramp(0, 1, {lanes})"

    def c(value: float) -> str:
        return _vconst(value, lanes)
    poly = c(EXP_POLY[0])
    for k in EXP_POLY[1:]:
        poly = f"({poly} * t[{lane}] + {c(k)})"
    return f"""
{pad}t[{lane}] = T.max(T.min({src}, {c(88.37626266479492)}),
{pad}                  {c(-88.37625885009766)})
{pad}n[{lane}] = T.floor(t[{lane}] * {c(1.4426950216293335)} + {c(0.5)})
{pad}t[{lane}] = t[{lane}] - n[{lane}] * {c(0.6931471824645996)}
{pad}{dst} = T.reinterpret("float32x{lanes}", T.shift_left(T.Cast("int32x{lanes}", n[{lane}]) + T.broadcast(
{pad}    T.int32(127), {lanes}), T.broadcast(T.int32(23), {lanes}))) * (
{pad}    {poly} * t[{lane}] * t[{lane}] + t[{lane}] + {c(1.0)})"""


def softmax_cols_source(outer: int, c: int, inner: int, log: bool = False) -> str:
    """TVMScript of softmax (log: log_softmax) over the middle axis of x [outer, C, inner] (a segmentation head's
    softmax over channels, NCHW): one task per block of W = 32 neighbouring positions (8 under 32; the last block
    overlapping the one before: columns are independent, so it recomputes the same values), the max, the sum of
    exponentials and the scaling each a pass over C with the block in registers (four 8-lane chains in flight:
    21 x 128 x 128 130 us against one 8-lane chain's 302, PyTorch 280-360). `scale` [1] holds 1, an input the
    kernel must read."""
    w = 4 * LANES if inner >= 4 * LANES else LANES
    nv = -(-inner // w)
    lane = f"T.ramp(0, 1, {w})"
    base = f"(task // {nv}) * {c * inner} + j0"
    at = f"T.ramp({base} + ch * {inner}, 1, {w})"
    if log:
        finish = f"""
        s[{lane}] = T.log(s[{lane}] * T.broadcast(scale[0], {w}))
        for ch in T.serial({c}):
            y[{at}] = (x[{at}] - m[{lane}]) - s[{lane}]"""
    else:
        finish = f"""
        s[{lane}] = T.broadcast(scale[0], {w}) / s[{lane}]
        for ch in T.serial({c}):
            y[{at}] = y[{at}] * s[{lane}]"""
    return f"""
@T.prim_func(private=True)
def softmax_cols(x: T.Buffer(({outer * c * inner},), "float32"), scale: T.Buffer((1,), "float32"),
                 y: T.Buffer(({outer * c * inner},), "float32")):
    T.func_attr({{"tirx.noalias": True, "tirx.is_scheduled": True, "op_pattern": 8}})
    for task in T.parallel({outer * nv}):
        m = T.decl_buffer(({w},), "float32", scope="global")
        s = T.decl_buffer(({w},), "float32", scope="global")
        t = T.decl_buffer(({w},), "float32", scope="global")
        n = T.decl_buffer(({w},), "float32", scope="global")
        j0: T.let = T.min((task % {nv}) * {w}, {inner - w})
        m[{lane}] = x[T.ramp({base}, 1, {w})]
        for ch in T.serial(1, {c}):
            m[{lane}] = T.max(m[{lane}], x[{at}])
        s[{lane}] = {_vconst(0.0, w)}
        for ch in T.serial({c}):{_exp_stmts(f"y[{at}]", f"x[{at}] - m[{lane}]", " " * 12, w)}
            s[{lane}] = s[{lane}] + y[{at}]{finish}
"""


def softmax_source(rows: int, dim: int, safe: bool = False, log: bool = False) -> str:
    """TVMScript of y[r, :] = softmax(x[r, :]) per row, rows in parallel: the row's max in a vector, then
    exp(x - max) stored and summed in a vector, then the store scaled by scale[0] / sum (1: softmax). Opaque
    (op_pattern 8) and with that second input, as im2col is (`conv.im2col_source`): Relax's reshape detection
    asserted on a one-input, one-output kernel. `safe`: a row whose every value is -inf (attention masked
    everywhere) is zeros, as PyTorch's SDPA gives (its decomposition selects them with a where). `log`: log_softmax,
    y = (x - max) - log(sum * scale[0]) in PyTorch's order, a third pass over x in place of the scaling one (the
    exponentials stored by the second are overwritten)."""
    steps = dim // LANES
    v, lane = f"T.ramp(r * {dim} + j * {LANES}, 1, {LANES})", f"T.ramp(0, 1, {LANES})"

    c = _vconst

    def exp_into(at: str, pad: str) -> str:
        """y[at] = exp(x[at] - max), TVM's fast_exp on one vector."""
        return _exp_stmts(f"y[{at}]", f"x[{at}] - T.broadcast(stat[0], {LANES})", pad)
    last, mask = _tail(dim)
    lv = f"T.ramp(r * {dim} + {last}, 1, {LANES})"
    tail_max = tail_exp = tail_scale = ""
    if last:  # the overlapping last vector: max is idempotent; only its new lanes join the sum and get scaled
        tail_max = f"""
        acc[{lane}] = T.max(acc[{lane}], x[{lv}])"""
        tail_exp = exp_into(lv, " " * 8) + f"""
        acc[{lane}] = acc[{lane}] + T.Select({mask}, y[{lv}], {c(0.0)})"""
        tail_scale = f"""
        y[{lv}] = T.Select({mask}, y[{lv}] * T.broadcast(stat[1], {LANES}), y[{lv}])"""
    body = f"""
        acc[{lane}] = {c(0.0)}
        for j in T.serial({steps}):{exp_into(v, " " * 12)}
            acc[{lane}] = acc[{lane}] + y[{v}]{tail_exp}
        stat[1] = T.float32(0)
        for l in T.serial({LANES}):
            stat[1] = stat[1] + acc[l]
        stat[1] = scale[0] / stat[1]
        for j in T.serial({steps}):
            y[{v}] = y[{v}] * T.broadcast(stat[1], {LANES}){tail_scale}"""
    if log:
        shifted = "(x[{at}] - T.broadcast(stat[0], {n})) - T.broadcast(stat[1], {n})"
        head = body[:body.index("        stat[1] = scale[0] / stat[1]")]
        body = head + f"""        stat[1] = T.log(stat[1] * scale[0])
        for j in T.serial({steps}):
            y[{v}] = {shifted.format(at=v, n=LANES)}""" + ("" if not last else f"""
        y[{lv}] = {shifted.format(at=lv, n=LANES)}""")
    if safe:  # the max is -inf only when every value is (below the lowest finite float)
        body = f"""
        if stat[0] < T.float32(-3.4028234663852886e38):
            for j in T.serial({dim}):
                y[r * {dim} + j] = T.float32(0)
        else:""" + body.replace("\n", "\n    ")
    return f"""
@T.prim_func(private=True)
def softmax_rows(x: T.Buffer(({rows * dim},), "float32"), scale: T.Buffer((1,), "float32"),
                 y: T.Buffer(({rows * dim},), "float32")):
    T.func_attr({{"tirx.noalias": True, "tirx.is_scheduled": True, "op_pattern": 8}})
    for r in T.parallel({rows}):
        acc = T.decl_buffer(({LANES},), "float32", scope="global")
        t = T.decl_buffer(({LANES},), "float32", scope="global")
        n = T.decl_buffer(({LANES},), "float32", scope="global")
        stat = T.decl_buffer((2,), "float32", scope="global")
        acc[{lane}] = x[T.ramp(r * {dim}, 1, {LANES})]
        for j in T.serial(1, {steps}):
            acc[{lane}] = T.max(acc[{lane}], x[{v}]){tail_max}
        stat[0] = acc[0]
        for l in T.serial(1, {LANES}):
            stat[0] = T.max(stat[0], acc[l]){body}
"""


def emit_softmax(bb, x, x_shape, safe: bool = False, log: bool = False):
    """softmax (log: log_softmax) over the last axis of x [..., D] (a Relax value); `safe`: rows of -inf give
    zeros."""
    import numpy as np
    from tvm import relax

    dim = int(x_shape[-1])
    rows = math.prod(int(d) for d in x_shape) // dim
    return _call_rows(bb, softmax_source(rows, dim, safe, log), ("log_" if log else "") + "softmax_rows"
                      + ("_safe" if safe else ""), x, [relax.const(np.ones(1, np.float32))], x_shape)


def mask_strides(mask_shape, full) -> tuple[int, int, int] | None:
    """(batch, head, query row) strides of an attention mask of `mask_shape` (up to 4 dims, broadcasting from the
    right) read against scores `full` [B, H, L, S]: 0 where it broadcasts; None unless it spans the keys and each
    other dim is 1 or the scores' own."""
    if len(mask_shape) > 4 or not all(isinstance(d, int) for d in mask_shape):
        return None
    dims = [1] * (4 - len(mask_shape)) + [int(d) for d in mask_shape]
    s = int(full[3])
    if dims[3] != s or any(d not in (1, int(f)) for d, f in zip(dims[:3], full[:3])):
        return None
    return (dims[1] * dims[2] * s if dims[0] > 1 else 0, dims[2] * s if dims[1] > 1 else 0, s if dims[2] > 1 else 0)


def mask_elements(b: int, h: int, l: int, s: int, strides: tuple[int, int, int]) -> int:
    """Elements of a contiguous mask whose `mask_strides` these are (its flat buffer's size)."""
    mb, mh, ml = strides
    return (b - 1) * mb + (h - 1) * mh + (l - 1) * ml + s


def masked_softmax_q_source(b: int, h: int, l: int, dim: int, alpha: float, mask: tuple[int, int, int],
                            out_q: tuple[float, int, int, int]) -> str:
    """TVMScript of int8 attention probabilities: per row of scores x [B, H, L, S], q = quantize(softmax(x * alpha
    + bias)) on the grid out_q, the additive mask `bias` (0 / -inf) read through its (batch, head, row) strides
    `mask`: the int8 attention's scale, mask, softmax and quantize (four elementwise passes over the scores
    before) in one kernel. The row's scaled, masked scores go to a stack buffer with their max, the exponentials
    replace them with their sum, and the store writes codes. A row masked everywhere gives probability 0 (the zero
    point), as PyTorch's SDPA does. S whole vectors (`masked_softmax_q_applies`)."""
    from graphopt.targets.tvm.cpu.conv import _clamped
    steps, lane = dim // LANES, f"T.ramp(0, 1, {LANES})"
    mb, mh, ml = mask
    v = f"T.ramp(j * {LANES}, 1, {LANES})"
    mrow = f"bi * {mb} + hi * {mh} + li * {ml}"
    exp = _exp_stmts(f"row[{v}]", f"row[{v}] - T.broadcast(stat[0], {LANES})", " " * 16)
    code = _clamped(f"row[j * {LANES} + u] * stat[1]", None, out_q, times=f"T.float32({1.0 / out_q[0]!r})")
    zero = _clamped("T.float32(0)", None, out_q, times=f"T.float32({1.0 / out_q[0]!r})")
    msize = mask_elements(b, h, l, dim, mask)
    return f"""
@T.prim_func(private=True)
def softmax_masked_q(x: T.Buffer(({b * h * l * dim},), "float32"), bias: T.Buffer(({msize},), "float32"),
                     y: T.Buffer(({b * h * l * dim},), "int8")):
    T.func_attr({{"tirx.noalias": True, "tirx.is_scheduled": True, "op_pattern": 8}})
    for r in T.parallel({b * h * l}):
        bi: T.let = r // {h * l}
        hi: T.let = r // {l} % {h}
        li: T.let = r % {l}
        row = T.decl_buffer(({dim},), "float32", scope="global")
        acc = T.decl_buffer(({LANES},), "float32", scope="global")
        t = T.decl_buffer(({LANES},), "float32", scope="global")
        n = T.decl_buffer(({LANES},), "float32", scope="global")
        stat = T.decl_buffer((2,), "float32", scope="global")
        acc[{lane}] = T.broadcast(T.float32("-inf"), {LANES})
        for j in T.serial({steps}):
            row[{v}] = x[T.ramp(r * {dim} + j * {LANES}, 1, {LANES})] * {_vconst(alpha)} + bias[T.ramp({mrow} + j * {
                LANES}, 1, {LANES})]
            acc[{lane}] = T.max(acc[{lane}], row[{v}])
        stat[0] = acc[0]
        for u in T.serial(1, {LANES}):
            stat[0] = T.max(stat[0], acc[u])
        if stat[0] < T.float32(-3.4028234663852886e38):
            for j in T.serial({dim}):
                y[r * {dim} + j] = {zero}
        else:
            acc[{lane}] = {_vconst(0.0)}
            for j in T.serial({steps}):{exp}
                acc[{lane}] = acc[{lane}] + row[{v}]
            stat[1] = T.float32(0)
            for u in T.serial({LANES}):
                stat[1] = stat[1] + acc[u]
            stat[1] = T.float32(1) / stat[1]
            for j in T.serial({steps}):
                for u in T.vectorized({LANES}):
                    y[r * {dim} + j * {LANES} + u] = {code}
"""


def masked_softmax_q_applies(dim: int) -> bool:
    return dim >= LANES and dim % LANES == 0


def emit_masked_softmax_q(bb, x, bias, x_shape, alpha: float, mask: tuple[int, int, int], out_q):
    """int8 codes of softmax(x * alpha + bias) over the last axis of x [B, H, L, S] (`masked_softmax_q_source`)."""
    from tvm import relax
    b, h, l, dim = (int(d) for d in x_shape)
    msize = mask_elements(b, h, l, dim, mask)
    gv = bb.add_func(parse_kernel(masked_softmax_q_source(b, h, l, dim, alpha, mask, out_q)),
                     f"softmax_masked_q_{b * h * l}x{dim}")
    flat = [bb.emit(relax.op.reshape(x, (b * h * l * dim,))), bb.emit(relax.op.reshape(bias, (msize,)))]
    y = bb.emit(relax.call_tir(gv, flat, relax.TensorType((b * h * l * dim,), "int8")))
    return bb.emit(relax.op.reshape(y, (b, h, l, dim)))


def emit_softmax_cols(bb, x, x_shape, dim: int, log: bool = False):
    """softmax (log: log_softmax) of x (a Relax value, float32) over axis `dim`, not the last one, whose trailing
    axes hold at least one vector (`softmax_cols_source`)."""
    import numpy as np
    from tvm import relax

    dims = [int(d) for d in x_shape]
    outer, c, inner = math.prod(dims[:dim]), dims[dim], math.prod(dims[dim + 1:])
    return _call_rows(bb, softmax_cols_source(outer, c, inner, log), ("log_" if log else "") + "softmax_cols", x,
                      [relax.const(np.ones(1, np.float32))], x_shape)


def row_reduce_source(rows: int, dim: int, kind: str = "mean") -> str:
    """TVMScript of y[r] = mean(x[r, :]), its sum, max, min or 2-norm (kind "norm2") per row (four 8-lane partials,
    so four operations are in flight; the last vector overlapping the one before, its repeated lanes masked out of
    a sum), rows in parallel; a second input `scale` [1] holds 1 / dim for the mean, else 1 (opaque with two inputs,
    as softmax_rows is). One chain of partial sums ran 96 x 12544 at 65 us, PyTorch 42. The max and min take NaN
    wherever it appears, as PyTorch's (TVM's max keeps a NaN only when it is the second operand)."""
    steps = dim // LANES
    lane = f"T.ramp(0, 1, {LANES})"
    quads = steps // 4
    last, mask = _tail(dim)
    wide = f"T.ramp(0, 1, {4 * LANES})"
    if kind in ("max", "min"):
        def combine(a: str, b: str) -> str:
            return f"T.Select(T.Or(T.isnan({b}), {b} {'>' if kind == 'max' else '<'} {a}), {b}, {a})"
        init = f'T.reinterpret("float32", T.uint32({0xFF800000 if kind == "max" else 0x7F800000}))'  # -inf / inf
        tail_value = f"x[T.ramp(r * {dim} + {last}, 1, {LANES})]"  # lanes seen twice change no max
    else:  # sums: of the values (mean, sum) or of their squares (norm2, whose root the store takes)
        def combine(a: str, b: str) -> str:
            if kind == "norm2" and b.startswith("x["):
                return f"{a} + {b} * {b}"
            return f"{a} + {b}"
        init = "T.float32(0)"
        tail_x = f"x[T.ramp(r * {dim} + {last}, 1, {LANES})]"
        tail_value = f"""T.Select({mask}, {tail_x}{f" * {tail_x}" if kind == "norm2" else ""}, T.broadcast(
            T.float32(0), {LANES}))"""
    tail = "" if not last else f"""
        acc[{lane}] = {combine(f"acc[{lane}]", tail_value)}"""
    return f"""
@T.prim_func(private=True)
def row_{kind}(x: T.Buffer(({rows * dim},), "float32"), scale: T.Buffer((1,), "float32"),
             y: T.Buffer(({rows},), "float32")):
    T.func_attr({{"tirx.noalias": True, "tirx.is_scheduled": True, "op_pattern": 8}})
    for r in T.parallel({rows}):
        acc = T.decl_buffer(({4 * LANES},), "float32", scope="global")
        s = T.decl_buffer((1,), "float32", scope="global")
        acc[{wide}] = T.broadcast({init}, {4 * LANES})
        for j in T.serial({quads}):
            acc[{wide}] = {combine(f"acc[{wide}]", f"x[T.ramp(r * {dim} + j * {4 * LANES}, 1, {4 * LANES})]")}
        for j in T.serial({quads * 4}, {steps}):
            acc[{lane}] = {combine(f"acc[{lane}]", f"x[T.ramp(r * {dim} + j * {LANES}, 1, {LANES})]")}{tail}
        for l in T.serial({LANES}, {4 * LANES}):
            acc[l % {LANES}] = {combine(f"acc[l % {LANES}]", "acc[l]")}
        s[0] = {init}
        for l in T.serial({LANES}):
            s[0] = {combine("s[0]", "acc[l]")}
        y[r] = {"T.sqrt(s[0])" if kind == "norm2" else "s[0]"} * scale[0]
"""


def emit_row_mean(bb, x, rows: int, dim: int, out_shape, kind: str = "mean"):
    """mean (or `kind` "sum" / "max" / "min" / "norm2") over the last `dim` values of x (a Relax value holding
    rows x dim floats), shaped out_shape: global average pooling (SE blocks, classifier heads), PointNet's max over
    its points, F.normalize's norm. Relax's mean ran a reduction at 2-7x PyTorch's time on large maps (96x112x112:
    299 us against 42), its max over 1024 rows of 2048 2.9 ms (PyTorch 1.0-1.3)."""
    import numpy as np
    from tvm import relax

    gv = bb.add_func(parse_kernel(row_reduce_source(rows, dim, kind)),
                     f"row_{kind}_{rows}x{dim}")
    y = bb.emit(relax.call_tir(gv, [bb.emit(relax.op.reshape(x, (rows * dim,))),
                                    relax.const(np.full(1, 1.0 / dim if kind == "mean" else 1.0, np.float32))],
                               relax.TensorType((rows,), "float32")))
    return bb.emit(relax.op.reshape(y, tuple(int(d) for d in out_shape)))
