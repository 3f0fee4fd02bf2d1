"""Top-k selection over long rows: a detector's heatmap peaks (CenterNet: the 10 best of 3 x 128 x 128 scores), a
decoder's query selection, a sampler's top-k over a vocabulary. graphopt's topk converter sorts the whole row
(PyTorch's NaN rule needs that of TVM's sort): 2.2 ms for one row of 49152. Here each row keeps its k best in a
sorted buffer, one pass over the row, an entry inserted only when it beats the k-th (O(N) compares for random
data). Order as PyTorch's topk (sorted): NaN counts as the largest, equal values keep index order."""
from __future__ import annotations

from graphopt.targets.tvm.cpu.parse import parse_kernel

TOPK_MAX_K = 64  # beyond it the insertion's k steps a hit cost more than the sort
TOPK_MIN_ROW = 512  # shorter rows: the sort is as cheap


def topk_applies(n: int, k: int) -> bool:
    return 0 < k <= TOPK_MAX_K and n >= max(TOPK_MIN_ROW, 4 * k)


def topk_source(rows: int, n: int, k: int, largest: bool, dtype: str = "float32") -> str:
    """TVMScript of (values, indices) [rows, k] of each row of x [rows, n]: its k largest (or smallest) in order.
    `better(a, b)`: a comes before b (NaN first when largest, last when smallest; ties: the earlier index, which
    is already placed, stays first)."""
    def better(a: str, b: str) -> str:
        if largest:
            return f"(T.isnan({a}) and not T.isnan({b})) or {a} > {b}"
        return f"not T.isnan({a}) and (T.isnan({b}) or {a} < {b})"
    return f"""
@T.prim_func(private=True)
def topk_rows(x: T.Buffer(({rows}, {n}), "{dtype}"), zero: T.Buffer((1,), "int32"),
              vals: T.Buffer(({rows}, {k}), "{dtype}"), idxs: T.Buffer(({rows}, {k}), "int64")):
    T.func_attr({{"tirx.noalias": True, "tirx.is_scheduled": True}})
    for r in T.parallel({rows}):
        bv = T.decl_buffer(({k},), "{dtype}")
        bi = T.decl_buffer(({k},), "int64")
        cnt = T.decl_buffer((1,), "int32")
        pos = T.decl_buffer((1,), "int32")
        cnt[0] = zero[0]
        for i in T.serial({n}):
            v: T.let = x[r, i]
            if cnt[0] < {k} or ({better("v", f"bv[{k - 1}]")}):
                pos[0] = T.min(cnt[0], {k - 1})
                while pos[0] > 0 and ({better("v", "bv[T.max(pos[0] - 1, 0)]")}):
                    bv[pos[0]] = bv[pos[0] - 1]
                    bi[pos[0]] = bi[pos[0] - 1]
                    pos[0] = pos[0] - 1
                bv[pos[0]] = v
                bi[pos[0]] = T.Cast("int64", i)
                cnt[0] = T.min(cnt[0] + 1, {k})
        for j in T.serial({k}):
            vals[r, j] = bv[j]
            idxs[r, j] = bi[j]
"""


def emit_topk(bb, x, shape, k: int, largest: bool, dtype: str = "float32"):
    """(values, indices) of torch.topk(x, k, dim=-1, largest, sorted=True) for x (a Relax value of `shape`) as a
    Relax tuple, on `topk_source` (`topk_applies` must hold)."""
    import math

    import numpy as np
    from tvm import relax

    shape = [int(d) for d in shape]
    n, rows = shape[-1], math.prod(shape[:-1])
    gv = bb.add_func(parse_kernel(topk_source(rows, n, k, largest, dtype)),
                     f"topk_{'largest' if largest else 'smallest'}_{rows}x{n}_k{k}")
    out = bb.emit(relax.call_tir(gv, [bb.emit(relax.op.reshape(x, (rows, n))), relax.const(np.zeros(1, np.int32))],
                                 [relax.TensorType((rows, k), dtype), relax.TensorType((rows, k), "int64")]))
    vals = bb.emit(relax.op.reshape(bb.emit(relax.TupleGetItem(out, 0)), (*shape[:-1], k)))
    idxs = bb.emit(relax.op.reshape(bb.emit(relax.TupleGetItem(out, 1)), (*shape[:-1], k)))
    return bb.emit(relax.Tuple([vals, idxs]))


def arg_extreme_source(outer: int, r: int, inner: int, lanes: int, largest: bool) -> str:
    """TVMScript of argmax (argmin) of x [outer, R, inner] over R -> int64 [outer, inner], PyTorch's answer: the
    first NaN's index where a reduced run holds one, else the first extreme's. Each vector lane keeps its best
    value and index (a strict compare keeps the earlier one) and its first NaN. `inner` > 1 (whole vectors; a
    segmentation head's classes over its pixels): the lanes are the inner values, each its own answer. `inner` == 1
    (a classifier's or greedy decoder's rows): the lanes take a row's values in turn and are merged at its end."""
    cmp = ">" if largest else "<"
    if inner > 1:
        chunk = max(c for c in range(lanes, min(inner, 256) + 1, lanes) if inner % c == 0)
        chunks = inner // chunk
        return f"""
@T.prim_func(private=True)
def arg_extreme(x: T.Buffer(({outer}, {r}, {inner}), "float32"), zero: T.Buffer((1,), "int32"),
                out: T.Buffer(({outer}, {inner}), "int64")):
    T.func_attr({{"tirx.noalias": True, "tirx.is_scheduled": True}})
    for t in T.parallel({outer * chunks}):
        o: T.let = t // {chunks}
        c0: T.let = (t % {chunks}) * {chunk}
        bv = T.decl_buffer(({lanes},), "float32")
        bi = T.decl_buffer(({lanes},), "int32")
        ni = T.decl_buffer(({lanes},), "int32")
        for j in T.serial({chunk // lanes}):
            for v in T.vectorized({lanes}):
                bv[v] = x[o, 0, c0 + j * {lanes} + v]
                bi[v] = zero[0]
                ni[v] = T.Select(T.isnan(x[o, 0, c0 + j * {lanes} + v]), 0, {r})
            for k in T.serial(1, {r}):
                for v in T.vectorized({lanes}):
                    ni[v] = T.min(ni[v], T.Select(T.isnan(x[o, k, c0 + j * {lanes} + v]), k, {r}))
                    bi[v] = T.Select(x[o, k, c0 + j * {lanes} + v] {cmp} bv[v], k, bi[v])
                    bv[v] = T.Select(x[o, k, c0 + j * {lanes} + v] {cmp} bv[v], x[o, k, c0 + j * {lanes} + v], bv[v])
            for v in T.vectorized({lanes}):
                out[o, c0 + j * {lanes} + v] = T.Cast("int64", T.Select(ni[v] < {r}, ni[v], bi[v]))
"""
    full = r // lanes * lanes
    return f"""
@T.prim_func(private=True)
def arg_extreme(x: T.Buffer(({outer}, {r}), "float32"), zero: T.Buffer((1,), "int32"),
                out: T.Buffer(({outer},), "int64")):
    T.func_attr({{"tirx.noalias": True, "tirx.is_scheduled": True}})
    for o in T.parallel({outer}):
        bv = T.decl_buffer(({lanes},), "float32")
        bi = T.decl_buffer(({lanes},), "int32")
        ni = T.decl_buffer(({lanes},), "int32")
        best = T.decl_buffer((2,), "int32")
        bestv = T.decl_buffer((1,), "float32")
        for v in T.vectorized({lanes}):
            bv[v] = x[o, v]
            bi[v] = v + zero[0]
            ni[v] = T.Select(T.isnan(x[o, v]), v, {r})
        for j in T.serial(1, {full // lanes}):
            for v in T.vectorized({lanes}):
                ni[v] = T.min(ni[v], T.Select(T.isnan(x[o, j * {lanes} + v]), j * {lanes} + v, {r}))
                bi[v] = T.Select(x[o, j * {lanes} + v] {cmp} bv[v], j * {lanes} + v, bi[v])
                bv[v] = T.Select(x[o, j * {lanes} + v] {cmp} bv[v], x[o, j * {lanes} + v], bv[v])
        for i in T.serial({full}, {r}):
            ni[i % {lanes}] = T.min(ni[i % {lanes}], T.Select(T.isnan(x[o, i]), i, {r}))
            bi[i % {lanes}] = T.Select(x[o, i] {cmp} bv[i % {lanes}], i, bi[i % {lanes}])
            bv[i % {lanes}] = T.Select(x[o, i] {cmp} bv[i % {lanes}], x[o, i], bv[i % {lanes}])
        best[0] = ni[0]
        best[1] = bi[0]
        bestv[0] = bv[0]
        for v in T.serial(1, {lanes}):
            best[0] = T.min(best[0], ni[v])
            if bv[v] {cmp} bestv[0] or (bv[v] == bestv[0] and bi[v] < best[1]):
                best[1] = bi[v]
                bestv[0] = bv[v]
        out[o] = T.Cast("int64", T.Select(best[0] < {r}, best[0], best[1]))
"""


def arg_extreme_geometry(shape, dim: int, lanes: int) -> tuple[int, int, int] | None:
    """(outer, R, inner) of a float32 argmax / argmin over `dim`, or None where the kernel does not apply: a
    last-axis run of at least two vectors, or whole vectors of values behind the axis."""
    import math

    shape = [int(d) for d in shape]
    outer, r, inner = math.prod(shape[:dim]), shape[dim], math.prod(shape[dim + 1:])
    if inner > 1 and lanes > 8 and inner % lanes and inner % (lanes // 2) == 0:
        lanes //= 2  # (24 values behind the axis on a 16-lane CPU: 8-float vectors; `emit_arg_extreme` follows)
    if r < 2 or (inner == 1 and r < 2 * lanes) or (inner > 1 and (inner < lanes or inner % lanes)):
        return None
    return outer, r, inner


def emit_arg_extreme(bb, x, geometry: tuple[int, int, int], lanes: int, largest: bool):
    """argmax (argmin) indices (int64, [outer, inner] or [outer]) of the float32 Relax value x over the axis
    `arg_extreme_geometry` gave `geometry` for; the caller reshapes them."""
    import math

    import numpy as np
    from tvm import relax

    outer, r, inner = geometry
    if inner > 1:
        lanes = math.gcd(lanes, inner)
    src = arg_extreme_source(outer, r, inner, lanes, largest)
    shape = (outer, r, inner) if inner > 1 else (outer, r)
    gv = bb.add_func(parse_kernel(src), f"{'argmax' if largest else 'argmin'}_{outer}x{r}x{inner}")
    return bb.emit(relax.call_tir(gv, [bb.emit(relax.op.reshape(x, shape)), relax.const(np.zeros(1, np.int32))],
                                  relax.TensorType((outer, inner) if inner > 1 else (outer,), "int64")))


SORT_MAX_ROW = 256  # longest row the sorting network takes (n log^2 n compare-exchanges a group of rows)


def sort_applies(n: int) -> bool:
    return 2 <= n <= SORT_MAX_ROW


def sort_source(rows: int, n: int, descending: bool, lanes: int) -> str:
    """TVMScript of torch.sort(x, -1, descending, stable=True) for x [rows, n]: values and int64 indices. A
    bitonic network over the row padded to a power of two, `lanes` rows at a time, one row a vector lane (the
    group's rows staged column by column into a buffer), each compare-exchange a few vector selects. The order
    is PyTorch's: NaN counts as the largest (first descending, last ascending), equal values keep index order
    (ties are broken on the index, so the network's result is the stable one), the padding after everything.
    TVM's argsort (the converter before) took 2.9 ms for 1024 rows of 64 (TabNet's sparsemax), a serial sort a
    row."""
    n2 = 1 << max(n - 1, 1).bit_length()
    logn = n2.bit_length() - 1
    groups = -(-rows // lanes)
    at = "T.ramp({} * {}, 1, {})"
    a, b = f"v[{at.format('i', lanes, lanes)}]", f"v[{at.format('l', lanes, lanes)}]"
    ia, ib = f"ix[{at.format('i', lanes, lanes)}]", f"ix[{at.format('l', lanes, lanes)}]"

    def gt(p: str, q: str) -> str:  # p > q with NaN the largest
        return f"T.Or({p} > {q}, T.And(T.isnan({p}), T.Not(T.isnan({q}))))"
    eq = f"T.Or({a} == {b}, T.And(T.isnan({a}), T.isnan({b})))"
    core = f"T.Or({gt(a, b) if descending else gt(b, a)}, T.And({eq}, {ia} < {ib}))"
    pa, pb = f"{ia} >= T.broadcast({n}, {lanes})", f"{ib} >= T.broadcast({n}, {lanes})"
    before = f"T.And(T.Not({pa}), T.Or({pb}, {core}))"  # (two pads: either order)
    lane = f"T.ramp(0, 1, {lanes})"
    kept = f"keep[{lane}] == T.broadcast(1, {lanes})"
    return f"""
@T.prim_func(private=True)
def sort_rows(x: T.Buffer(({rows}, {n}), "float32"), zero: T.Buffer((1,), "int32"),
              vals: T.Buffer(({rows}, {n}), "float32"), idxs: T.Buffer(({rows}, {n}), "int64")):
    T.func_attr({{"tirx.noalias": True, "tirx.is_scheduled": True}})
    for g in T.parallel({groups}):
        v = T.decl_buffer(({n2 * lanes},), "float32")
        ix = T.decl_buffer(({n2 * lanes},), "int32")
        keep = T.decl_buffer(({lanes},), "int32")
        t = T.decl_buffer(({lanes},), "float32")
        ti = T.decl_buffer(({lanes},), "int32")
        for j in T.serial({n2}):
            for u in T.vectorized({lanes}):
                v[j * {lanes} + u] = T.Select(j < {n}, x[T.min(g * {lanes} + u, {rows - 1}), T.min(j, {n - 1})],
                                              T.float32(0))
                ix[j * {lanes} + u] = j + zero[0]
        for kk in T.serial(1, {logn + 1}):
            for jj in T.serial(kk):
                for i in T.serial({n2}):
                    l: T.let = T.bitwise_xor(i, T.shift_left(1, kk - 1 - jj))
                    if l > i:
                        up: T.let = T.Select(T.bitwise_and(i, T.shift_left(1, kk)) == 0, 1, 0)
                        keep[{lane}] = T.Select({before}, T.broadcast(up, {lanes}),
                                                               T.broadcast(1 - up, {lanes}))
                        t[{lane}] = {a}
                        ti[{lane}] = {ia}
                        {a} = T.Select({kept}, {a}, {b})
                        {ia} = T.Select({kept}, {ia}, {ib})
                        {b} = T.Select({kept}, {b}, t[{lane}])
                        {ib} = T.Select({kept}, {ib}, ti[{lane}])
        for j in T.serial({n}):
            for u in T.vectorized({lanes}):
                vals[T.min(g * {lanes} + u, {rows - 1}), j] = v[j * {lanes} + u]
                idxs[T.min(g * {lanes} + u, {rows - 1}), j] = T.Cast("int64", ix[j * {lanes} + u])
"""


def emit_sort(bb, x, shape, descending: bool, lanes: int):
    """(values, indices) of a stable torch.sort of the float32 Relax value x (`shape`) along its last axis as a
    Relax tuple, on `sort_source` (`sort_applies` must hold for the last axis)."""
    import math

    import numpy as np
    from tvm import relax

    shape = [int(d) for d in shape]
    n, rows = shape[-1], math.prod(shape[:-1])
    gv = bb.add_func(parse_kernel(sort_source(rows, n, descending, lanes)),
                     f"sort_{'desc' if descending else 'asc'}_{rows}x{n}")
    out = bb.emit(relax.call_tir(gv, [bb.emit(relax.op.reshape(x, (rows, n))), relax.const(np.zeros(1, np.int32))],
                                 [relax.TensorType((rows, n), "float32"), relax.TensorType((rows, n), "int64")]))
    vals = bb.emit(relax.op.reshape(bb.emit(relax.TupleGetItem(out, 0)), shape))
    idxs = bb.emit(relax.op.reshape(bb.emit(relax.TupleGetItem(out, 1)), shape))
    return bb.emit(relax.Tuple([vals, idxs]))
