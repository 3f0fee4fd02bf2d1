"""Row scatter: out = x, then out[.., index[e], ..] += src[.., e, ..] (or =) for whole rows, the form of graph
neural networks' message passing (`index_add_`, `scatter_add_` with an index expanded along the features, ONNX
ScatterND over leading axes) and of `x[idx] += v`.

PyTorch's index_add decomposed to an index_put that TVM's importer rejects, so graphopt computed it as a product with
a one-hot matrix (E x N: 60 ms for a 2000-node, 10000-edge graph's 32 features); Relax's scatter_elements of a
row-expanded index writes element by element (614 us there). Here the rows go in order (repeated indices accumulate,
or the last one wins), each row a vector loop, the threads splitting the row's columns (disjoint, so no update is
lost)."""
from __future__ import annotations

from graphopt.targets.tvm.cpu.parse import parse_kernel

SCATTER_CHUNK = 16  # fewest columns a thread takes


# reduce -> the new value of out[o, r, c] from it and src[o, e, c]
_REDUCE = {"put": "{s}", "sum": "{o} + {s}", "prod": "{o} * {s}", "max": "T.max({o}, {s})", "min": "T.min({o}, {s})"}


def _identity(reduce: str, dtype: str) -> str:
    """The value a reset row starts from: the reduction's identity in dtype."""
    import numpy as np
    if reduce in ("sum", "prod"):
        return f"T.{dtype}({int(reduce == 'prod')})"
    if dtype.startswith(("float", "bfloat")):
        return f"T.{dtype}({'-inf' if reduce == 'max' else 'inf'!r})"
    info = np.iinfo(dtype) if dtype != "bool" else None
    extreme = (info.min if reduce == "max" else info.max) if info else int(reduce == "min")
    return f"T.{dtype}({extreme})"


def scatter_rows_source(outer: int, n: int, rows: int, inner: int, dtype: str, index_dtype: str,
                        reduce: str = "sum", cores: int = 2, include_self: bool = True) -> str:
    """TVMScript of out [outer, n, inner] = x, then for e in order: out[o, index[e], :] = reduce(out[o, index[e],
    :], src[o, e, :]) ("put": src's row, the last one winning; "sum", "prod", "max", "min"), index wrapped when
    negative and clipped into [0, n) (PyTorch raises on a bad index; here it cannot write outside the buffer).
    Without `include_self` every row an index names starts from the reduction's identity instead of x's row
    (scatter_reduce(include_self=False): rows no index names keep x's). The copy runs parallel over the rows, the
    scatter over (o, column chunks)."""
    chunk = max(min(SCATTER_CHUNK, inner), -(-inner // max(cores, 1)))
    chunks = -(-inner // chunk)
    new = _REDUCE[reduce].format(o="out[o, r, c0 + j]", s="src[o, e, c0 + j]")
    row = f"""
        for e in T.serial({rows}):
            r: T.let = T.max(T.min(T.Select(index[e] < T.{index_dtype}(0), index[e] + T.{index_dtype}({n}),
                                            index[e]), T.{index_dtype}({n - 1})), T.{index_dtype}(0))
            for j in T.serial(T.min({chunk}, {inner} - c0)):"""
    reset = ""
    if not include_self and reduce != "put":
        reset = row + f"""
                out[o, r, c0 + j] = {_identity(reduce, dtype)}"""
    return f"""
@T.prim_func(private=True)
def scatter_rows(x: T.Buffer(({outer}, {n}, {inner}), "{dtype}"), index: T.Buffer(({rows},), "{index_dtype}"),
                 src: T.Buffer(({outer}, {rows}, {inner}), "{dtype}"),
                 out: T.Buffer(({outer}, {n}, {inner}), "{dtype}")):
    T.func_attr({{"tirx.noalias": True, "tirx.is_scheduled": True, "op_pattern": 8}})
    for t in T.parallel({outer * n}):
        for i in T.serial({inner}):
            out[t // {n}, t % {n}, i] = x[t // {n}, t % {n}, i]
    for t in T.parallel({outer * chunks}):
        o: T.let = t // {chunks}
        c0: T.let = (t % {chunks}) * {chunk}{reset}{row}
                out[o, r, c0 + j] = {new}
"""


def emit_scatter_rows(bb, x, index, src, shape, dim: int, rows: int, dtype: str, index_dtype: str,
                      reduce: str = "sum", cores: int = 2, include_self: bool = True):
    """out = x (a Relax value of `shape`) with src's rows [.., rows, ..] reduced into (added into, or written over:
    `reduce` as `scatter_rows_source`'s) x's rows index[e] along `dim` (index: a Relax vector of `rows`
    entries)."""
    import math

    from tvm import relax

    shape = [int(d) for d in shape]
    outer, n, inner = math.prod(shape[:dim]), shape[dim], math.prod(shape[dim + 1:])
    src_text = scatter_rows_source(outer, n, rows, inner, dtype, index_dtype, reduce, cores, include_self)
    kind = ("add" if reduce == "sum" else reduce) + ("" if include_self or reduce == "put" else "_reset")
    gv = bb.add_func(parse_kernel(src_text), f"scatter_rows_{kind}_{outer}x{n}x{inner}_e{rows}")
    y = bb.emit(relax.call_tir(gv, [bb.emit(relax.op.reshape(x, (outer, n, inner))),
                                    bb.emit(relax.op.reshape(index, (rows,))),
                                    bb.emit(relax.op.reshape(src, (outer, rows, inner)))],
                               relax.TensorType((outer, n, inner), dtype)))
    return bb.emit(relax.op.reshape(y, shape))
