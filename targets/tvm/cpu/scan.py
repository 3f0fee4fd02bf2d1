"""Running sums / products along an axis with many values behind it: causal linear attention's cumsum of k v^T
outer products over the tokens ([B, T, D, D] summed along T), a scan over the time steps of a feature map.

TVM's cumsum (topi's scan) parallelizes over every position before x after the axis and walks each one's running
value serially, one scalar at a time down a stride of the whole inner extent: for [1, 256, 64, 64] along the
tokens, 4096 strided scalar scans (several ms). Here the axis's inner extent is cut into chunks of whole vectors,
each task runs one chunk down the axis, vector by vector: row l = row l - 1 (just written, in cache) + x's row l.
The values are summed (multiplied) in PyTorch's order, one step at a time, so the results are the same as a
serial scan's."""
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
