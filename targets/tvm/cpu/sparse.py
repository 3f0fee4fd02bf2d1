"""Sparse matmul kernels in TIR for the CPU: y = x W^T with W in BSR (R x C blocks; CSR is 1 x 1).

The main kernel transposes x into a workspace x^T [K, M] itself, so its innermost loop is a vector FMA over M (tokens
/ batch rows): one broadcast weight value times a contiguous x^T row, accumulated in registers for an R x V tile of
y^T, which is transposed into the output at the end. Block-rows run in parallel over the cores. For M < 4
(batch-1 classifier heads) the row variant vectorizes along the block's columns instead. Both are generated fully
scheduled (no MetaSchedule needed) and tagged so no rule touches them.
"""
from __future__ import annotations


def _vector_width(m: int) -> int:
    for v in (16, 8, 4, 2):
        if m % v == 0:
            return v
    return 1


def _transpose_loops(src: str, dst: str, r: int, c: int, indent: str) -> str:
    """TVMScript loops writing dst[c, r] = src[r, c]: b x b tiles (vector writes, gathered reads) in parallel."""
    b = 16 if r % 16 == 0 and c % 16 == 0 else 8 if r % 8 == 0 and c % 8 == 0 else 0
    if not b:
        return f"""{indent}for i in T.parallel({r}):
{indent}    for j in T.serial({c}):
{indent}        {dst}[j, i] = {src}[i, j]
"""
    nc = c // b
    return f"""{indent}for t in T.parallel({(r // b) * nc}):
{indent}    for j in T.unroll({b}):
{indent}        for i in T.vectorized({b}):
{indent}            {dst}[(t % {nc}) * {b} + j, (t // {nc}) * {b} + i] = {src}[(t // {nc}) * {b} + i, (t % {nc}) * {b} + j]
"""


def bsr_linear_source(m: int, k: int, n: int, r: int, c: int, nnzb: int) -> str:
    """out[M, N] = x[M, K] @ W.T with W in BSR. Three phases in one kernel: x is transposed into a workspace
    (tiled: TVM's default transpose was 4-10x slower, and a separate Relax transpose fused badly), the block-rows
    run in parallel with an R x V tile of y^T in registers (V tokens per vector), y^T is transposed into out."""
    nb = n // r
    # one or two block rows leave registers for 32 tokens: the index load and weight broadcast are shared by twice
    # the FMAs (CSR at 90%: 329 -> 245 us on 128x768x768); taller blocks would spill
    v = 32 if r <= 2 and m % 32 == 0 else _vector_width(m)
    return f"""
@T.prim_func(private=True)
def bsr_linear(x: T.Buffer(({m}, {k}), "float32"), data: T.Buffer(({nnzb}, {r}, {c}), "float32"),
               indices: T.Buffer(({nnzb},), "int32"), indptr: T.Buffer(({nb + 1},), "int32"),
               out: T.Buffer(({m}, {n}), "float32")):
    T.func_attr({{"tirx.noalias": True, "tirx.is_scheduled": True}})
    xT = T.decl_buffer(({k}, {m}), "float32", scope="global")
    yT = T.decl_buffer(({n}, {m}), "float32", scope="global")
{_transpose_loops("x", "xT", m, k, "    ")}
    for ib in T.parallel({nb}):
        for mo in T.serial({m // v}):
            # scope "global" inside the parallel body becomes a stack alloca LLVM keeps in registers; "local"
            # becomes a heap workspace it cannot promote (3x slower: every FMA stored and reloaded)
            acc = T.decl_buffer(({r}, {v}), "float32", scope="global")
            for ri in T.unroll({r}):
                for vi in T.vectorized({v}):
                    acc[ri, vi] = T.float32(0)
            for j in T.serial(indptr[ib + 1] - indptr[ib]):
                for ri in T.unroll({r}):
                    for ci in T.unroll({c}):
                        for vi in T.vectorized({v}):
                            acc[ri, vi] = acc[ri, vi] + data[indptr[ib] + j, ri, ci] * xT[indices[indptr[ib] + j] * {c} + ci, mo * {v} + vi]
            for ri in T.unroll({r}):
                for vi in T.vectorized({v}):
                    yT[ib * {r} + ri, mo * {v} + vi] = acc[ri, vi]
{_transpose_loops("yT", "out", n, m, "    ")}
"""


def bsr_matmul_t(m: int, k: int, n: int, r: int, c: int, nnzb: int):
    """PrimFunc(x[M, K], data[nnzb, R, C], indices[nnzb], indptr[N/R+1], out[M, N]) for M >= 4."""
    import tvm
    from tvm.script import tirx as T
    return tvm.script.parse(bsr_linear_source(m, k, n, r, c, nnzb), extra_vars={"T": T})


def bsr_rows_source(m: int, k: int, n: int, r: int, c: int, nnzb: int) -> str:
    """out[M, N] = x[M, K] @ W.T for small M (batch-1 heads): per row and block-row, the block's C columns are the
    vector, summed horizontally at the end."""
    nb = n // r
    return f"""
@T.prim_func(private=True)
def bsr_rows(x: T.Buffer(({m}, {k}), "float32"), data: T.Buffer(({nnzb}, {r}, {c}), "float32"),
             indices: T.Buffer(({nnzb},), "int32"), indptr: T.Buffer(({nb + 1},), "int32"),
             out: T.Buffer(({m}, {n}), "float32")):
    T.func_attr({{"tirx.noalias": True, "tirx.is_scheduled": True}})
    for ib in T.parallel({nb}):
        for mi in T.serial({m}):
            acc = T.decl_buffer(({r}, {c}), "float32", scope="global")
            for ri in T.unroll({r}):
                for ci in T.vectorized({c}):
                    acc[ri, ci] = T.float32(0)
            for j in T.serial(indptr[ib + 1] - indptr[ib]):
                for ri in T.unroll({r}):
                    for ci in T.vectorized({c}):
                        acc[ri, ci] = acc[ri, ci] + data[indptr[ib] + j, ri, ci] * x[mi, indices[indptr[ib] + j] * {c} + ci]
            for ri in T.unroll({r}):
                s = T.decl_buffer((1,), "float32", scope="global")
                s[0] = T.float32(0)
                for ci in T.serial({c}):
                    s[0] = s[0] + acc[ri, ci]
                out[mi, ib * {r} + ri] = s[0]
"""


def bsr_matmul_rows(m: int, k: int, n: int, r: int, c: int, nnzb: int):
    """PrimFunc(x[M, K], data, indices, indptr, out[M, N]) for small M."""
    import tvm
    from tvm.script import tirx as T
    return tvm.script.parse(bsr_rows_source(m, k, n, r, c, nnzb), extra_vars={"T": T})


def use_rows(m: int) -> bool:
    return m < 4


def emit_bsr_linear(bb, x, data, indices, indptr, bias, x_shape, n: int, block: tuple[int, int], nnzb: int):
    """Emit y = x @ W.T (+ bias) with W given as Relax BSR tensors; x [..., K] -> [..., N]."""
    import math

    from tvm import relax

    lead, k = tuple(int(d) for d in x_shape[:-1]), int(x_shape[-1])
    m = math.prod(lead) if lead else 1
    r, c = block
    x2 = bb.emit(relax.op.reshape(x, (m, k)))
    tag = f"{m}x{k}x{n}_b{r}x{c}_nnz{nnzb}"
    if use_rows(m):
        gv = bb.add_func(bsr_matmul_rows(m, k, n, r, c, nnzb), f"bsr_rows_{tag}")
        y = bb.emit(relax.call_tir(gv, [x2, data, indices, indptr], relax.TensorType((m, n), "float32")))
    else:
        gv = bb.add_func(bsr_matmul_t(m, k, n, r, c, nnzb), f"bsr_t_{tag}")
        y = bb.emit(relax.call_tir(gv, [x2, data, indices, indptr], relax.TensorType((m, n), "float32")))
    if bias is not None:
        y = bb.emit(relax.op.add(y, bias))
    return bb.emit(relax.op.reshape(y, (*lead, n))) if lead != (m,) else y
