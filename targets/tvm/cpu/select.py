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
