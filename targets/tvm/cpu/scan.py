"""Running sums / products along an axis with many values behind it: causal linear attention's cumsum of k v^T
outer products over the tokens ([B, T, D, D] summed along T), a scan over the time steps of a feature map.

TVM's cumsum (topi's scan) parallelizes over every position before x after the axis and walks each one's running
value serially, one scalar at a time down a stride of the whole inner extent: for [1, 256, 64, 64] along the
tokens, 4096 strided scalar scans (several ms). Here the axis's inner extent is cut into chunks of whole vectors,
each task runs one chunk down the axis, vector by vector: row l = row l - 1 (just written, in cache) + x's row l.
The values are summed (multiplied) in PyTorch's order, one step at a time, so the results are the same as a
serial scan's.

logcumsumexp runs the same way on a running (maximum, rescaled sum) pair: O(L) a row, where the generic
converter compares every pair of positions (minGRU's log-space scan over 512 steps was refused by its size)."""
from __future__ import annotations

import math

from graphopt.targets.tvm.cpu.parse import parse_kernel

CHUNK = 256  # floats a task runs down the axis (16 vectors of 16: a few KB of the row before it in L1)


def scan_geometry(shape, axis: int, lanes: int) -> tuple[int, int, int, int] | None:
    """(outer, length, inner, chunk) of a float32 scan along `axis`, or None where it does not apply: the values
    after the axis must fill whole vectors (and at least one)."""
    outer = length = inner = 1
    for i, d in enumerate(shape):
        d = int(d)
        if i < axis:
            outer *= d
        elif i == axis:
            length = d
        else:
            inner *= d
    if lanes > 8 and inner % lanes and inner % (lanes // 2) == 0:
        lanes //= 2  # (24 values behind the axis on a 16-lane CPU: 8-float vectors)
    if inner < lanes or inner % lanes or length < 2:
        return None
    chunk = max(c for c in range(lanes, min(inner, CHUNK) + 1, lanes) if inner % c == 0)
    return outer, length, inner, chunk


def scan_source(outer: int, length: int, inner: int, chunk: int, lanes: int, product: bool) -> str:
    op = "*" if product else "+"
    chunks = inner // chunk
    return f"""
@T.prim_func(private=True)
def scan(x: T.Buffer(({outer}, {length}, {inner}), "float32"), init: T.Buffer((1,), "float32"),
         y: T.Buffer(({outer}, {length}, {inner}), "float32")):
    T.func_attr({{"tirx.noalias": True, "tirx.is_scheduled": True}})
    for t in T.parallel({outer * chunks}):
        o: T.let = t // {chunks}
        c0: T.let = (t % {chunks}) * {chunk}
        for j in T.serial({chunk // lanes}):
            for v in T.vectorized({lanes}):
                y[o, 0, c0 + j * {lanes} + v] = init[0] {op} x[o, 0, c0 + j * {lanes} + v]
        for l in T.serial(1, {length}):
            for j in T.serial({chunk // lanes}):
                for v in T.vectorized({lanes}):
                    y[o, l, c0 + j * {lanes} + v] = y[o, l - 1, c0 + j * {lanes} + v] {op} x[o, l, c0 + j * {lanes} + v]
"""


def emit_scan(bb, x, shape, geometry: tuple[int, int, int, int], lanes: int, product: bool = False):
    """cumsum (cumprod with `product`) of the float32 Relax value x (its `shape`) along the axis `scan_geometry`
    gave `geometry` for; returns a value of x's shape."""
    import numpy as np
    from tvm import relax

    outer, length, inner, chunk = geometry
    lanes = math.gcd(lanes, chunk)  # (half vectors where `scan_geometry` took them)
    src = scan_source(outer, length, inner, chunk, lanes, product)
    gv = bb.add_func(parse_kernel(src), f"{'cumprod' if product else 'cumsum'}_{outer}x{length}x{inner}")
    x3 = bb.emit(relax.op.reshape(x, (outer, length, inner)))
    init = np.full(1, 1.0 if product else 0.0, np.float32)  # PyTorch's running value starts there (0 + -0.0 = 0)
    y = bb.emit(relax.call_tir(gv, [x3, relax.const(init)],
                               relax.TensorType((outer, length, inner), "float32")))
    return bb.emit(relax.op.reshape(y, tuple(int(d) for d in shape)))


def logcumsumexp_source(outer: int, length: int, inner: int, chunk: int, lanes: int) -> str:
    """TVMScript of the running (maximum, scaled sum) of logcumsumexp over x [outer, L, inner]: m_l = max(m_{l-1},
    x_l) and s_l = sum_{j <= l} exp(x_j - m_l), one exp per element (the new term's, or the old sum's rescale where
    x_l is the new maximum), so log(s_l) + m_l is the prefix's log-sum-exp without overflow or underflow. A NaN
    makes s NaN from there on; m at -inf or +inf gives log(s) + m = m (s stays finite: it counts ties there).
    `one` [1] holds 1, the first sum, a second input as in the softmax kernels (Relax's reshape detection asserts
    on a one-input kernel)."""
    from graphopt.targets.tvm.cpu.norm import _exp_stmts, _vconst
    chunks = inner // chunk
    lane = f"T.ramp(0, 1, {lanes})"
    at = f"T.ramp(c0 + j * {lanes}, 1, {lanes})"
    exp = _exp_stmts(f"e[{lane}]", f"d[{lane}]", " " * 16, lanes)
    return f"""
@T.prim_func(private=True)
def logcumsumexp_scan(x: T.Buffer(({outer}, {length}, {inner}), "float32"), one: T.Buffer((1,), "float32"),
                      m: T.Buffer(({outer}, {length}, {inner}), "float32"),
                      s: T.Buffer(({outer}, {length}, {inner}), "float32")):
    T.func_attr({{"tirx.noalias": True, "tirx.is_scheduled": True, "op_pattern": 8}})
    for task in T.parallel({outer * chunks}):
        o: T.let = task // {chunks}
        c0: T.let = (task % {chunks}) * {chunk}
        t = T.decl_buffer(({lanes},), "float32", scope="global")
        n = T.decl_buffer(({lanes},), "float32", scope="global")
        d = T.decl_buffer(({lanes},), "float32", scope="global")
        e = T.decl_buffer(({lanes},), "float32", scope="global")
        for j in T.serial({chunk // lanes}):
            m[o, 0, {at}] = x[o, 0, {at}]
            s[o, 0, {at}] = T.Select(T.isnan(x[o, 0, {at}]), x[o, 0, {at}],
                                     T.broadcast(one[0], {lanes}))
        for l in T.serial(1, {length}):
            for j in T.serial({chunk // lanes}):
                d[{lane}] = T.Select(x[o, l, {at}] > m[o, l - 1, {at}], m[o, l - 1, {at}] - x[o, l, {at}],
                                     T.Select(x[o, l, {at}] == m[o, l - 1, {at}], {_vconst(0.0, lanes)},
                                              x[o, l, {at}] - m[o, l - 1, {at}])){exp}
                s[o, l, {at}] = T.Select(T.isnan(x[o, l, {at}]), x[o, l, {at}],
                                         T.Select(x[o, l, {at}] > m[o, l - 1, {at}],
                                                  s[o, l - 1, {at}] * e[{lane}] + {_vconst(1.0, lanes)},
                                                  s[o, l - 1, {at}] + e[{lane}]))
                m[o, l, {at}] = T.max(m[o, l - 1, {at}], x[o, l, {at}])
"""


def emit_logcumsumexp(bb, x, shape, axis: int, lanes: int):
    """logcumsumexp of the float32 Relax value x (static `shape`) along `axis` on the running-maximum scan above:
    O(L) per row where the generic converter compares every pair of positions. Fewer than a vector of values
    behind the axis: the axis goes first and everything else behind it, padded to whole vectors."""
    import numpy as np
    from tvm import relax
    from graphopt.targets.tvm.cpu.vmath import emit_log

    dims = [int(d) for d in shape]
    outer, length, inner = math.prod(dims[:axis]), dims[axis], math.prod(dims[axis + 1:])
    x3 = bb.emit(relax.op.reshape(x, (outer, length, inner)))
    moved = inner < lanes or inner % lanes
    if moved:
        x3 = bb.emit(relax.op.reshape(bb.emit(relax.op.permute_dims(x3, [1, 0, 2])), (1, length, outer * inner)))
    rows, width = (1, outer * inner) if moved else (outer, inner)
    padded = -(-width // lanes) * lanes
    if padded != width:
        x3 = bb.emit(relax.op.nn.pad(x3, [0, 0, 0, 0, 0, padded - width]))
    chunk = max(c for c in range(lanes, min(padded, CHUNK) + 1, lanes) if padded % c == 0)
    src = logcumsumexp_source(rows, length, padded, chunk, lanes)
    gv = bb.add_func(parse_kernel(src), f"logcumsumexp_{rows}x{length}x{padded}")
    ty = relax.TensorType((rows, length, padded), "float32")
    ms = bb.emit(relax.call_tir(gv, [x3, relax.const(np.ones(1, np.float32))], [ty, ty]))
    m, s = bb.emit(relax.TupleGetItem(ms, 0)), bb.emit(relax.TupleGetItem(ms, 1))
    y = bb.emit(relax.op.add(m, emit_log(bb, s)))
    if padded != width:
        y = bb.emit(relax.op.strided_slice(y, axes=[2], begin=[0], end=[width]))
    if moved:
        y = bb.emit(relax.op.permute_dims(bb.emit(relax.op.reshape(y, (length, outer, inner))), [1, 0, 2]))
    return bb.emit(relax.op.reshape(y, tuple(dims)))
