"""Sparse matmul kernels in TIR for the CPU: y = x W^T with W in BSR (R x C blocks; CSR is 1 x 1).

The main kernel vectorizes over M (tokens / batch rows): its innermost loop is one broadcast weight value times a
contiguous row of x^T, accumulated in registers for an R x V tile of y^T. The tasks run in parallel over tiles of V
tokens: each transposes its own V rows of x into a private x^T [K, V], walks every block-row, and transposes its y^T
[N, V] into its V rows of the output. No phase waits for another task, and both transposes stay in the core's
cache (one shared x^T, transposed by all threads, then block-rows in parallel, cost a third of the time at 95%
sparsity in barriers and cross-core traffic). For M < 4 (batch-1 classifier heads) the row variant vectorizes along
the block's columns instead, and CSR there gathers its inputs (`csr_gemv`, AVX2). Both are generated fully scheduled
(no MetaSchedule needed) and tagged so no rule touches them.
"""
from __future__ import annotations

from graphopt.targets.tvm.cpu.conv import deeper, transpose8
from graphopt.targets.tvm.cpu.parse import parse_kernel


def token_tile(m: int, r: int, lanes: int = 8, cores: int = 0) -> int:
    """Tokens per task (the vector length of the inner loop): 16 for blocks of 4+ rows, 32 for 1-2 rows (the index
    load and weight broadcast are then shared by more FMAs), keeping the R x V accumulator in registers; measured on
    128 x 768 x 768 at 80-95% sparsity (v=8/16/32/64) with 8-lane vectors. Never more than M: the last tile overlaps
    the one before.

    With 16-lane vectors (`lanes`, AVX-512) blocks of 4+ rows take 64 tokens where M is whole 64-token tiles, else
    32, each only while it leaves a tile for each of the target's `cores`: 16 tokens were one zmm accumulator per
    block row, 4 dependent FMA chains for a 4x4 block. Kernel alone (Emerald Rapids, 2 threads, 80 / 90%
    sparsity), against 16 tokens: 4x4 linears at 128 tokens 0.63-0.76x with 64 (32: 0.87-0.95x), 8x1 on 768x768
    0.69-0.91x, 4x4 at 384 tokens 0.64-0.84x; 4x4 pointwise convs 0.48-0.91x with 32 (MobileNetV2's 96x576x196
    at 90% 46 -> 22 us; 64 pixels were no faster on 196 and 784 pixels, whose last tile then overlaps most; on
    whole 64-pixel tiles, 3136, 12544 and 256 pixels, 64 took 0.56-0.93x, 8x1 blocks included). CSR
    (1-row blocks) keeps 32: 64 tokens were even on 768x768 at 80% and slower tiled (its x^T slice no longer fits
    L1)."""
    v = 16 if r >= 4 else 32
    if lanes >= 16 and r >= 4:
        for wide in (64, 32):
            if (wide == 32 or m % wide == 0) and -(-m // wide) >= max(cores, 1):
                v = wide
                break
    while v > m:
        v //= 2
    return v


def _local_transpose(src: str, dst: str, rows: int, cols: int, indent: str) -> str:
    """TVMScript loops writing dst(j, i) = src(i, j) for i < rows, j < cols (src/dst are format strings in i, j):
    8 x 8 blocks, each read as 8 row vectors, transposed in registers by shuffles (`conv.transpose8`) and written
    as 8 row vectors; a partial last block overlaps the one before (rows, cols >= 8), else scalar. A vectorized
    strided copy instead (one lane gathered at a time) took 36 us of a 768x768 CSR kernel's 180 (128 tokens,
    2 threads), the shuffles 20."""
    if rows < 8 or cols < 8:
        return f"""{indent}for i in T.serial({rows}):
{indent}    for j in T.serial({cols}):
{indent}        {dst.format(i="i", j="j")} = {src.format(i="i", j="j")}
"""
    i0, j0 = f"T.min(ti * 8, {rows - 8})", f"T.min(tj * 8, {cols - 8})"
    p = indent
    return f"""{p}for ti in T.serial({-(-rows // 8)}):
{p}    for tj in T.serial({-(-cols // 8)}):
{p}        ta = T.decl_buffer((8, 8), "float32", scope="global")
{p}        tb = T.decl_buffer((8, 8), "float32", scope="global")
{p}        s1 = T.decl_buffer((8, 8), "float32", scope="global")
{p}        s2 = T.decl_buffer((8, 8), "float32", scope="global")
{p}        for r in T.unroll(8):
{p}            for l in T.vectorized(8):
{p}                ta[r, l] = {src.format(i=f"{i0} + r", j=f"{j0} + l")}{transpose8("ta", "tb", p + "        ")}
{p}        for r in T.unroll(8):
{p}            for l in T.vectorized(8):
{p}                {dst.format(i=f"{i0} + l", j=f"{j0} + r")} = tb[r, l]
"""


def csr_stream(data, indices, scale: int):
    """CSR weights as one int64 a nonzero for the fp32 CSR kernels: the value's float32 bits in the low half, its
    column times `scale` (the element offset of that column's row in the row-major [K, scale] x^T the kernel
    reads) in the high half. The inner loop then loads one scalar a nonzero instead of two (value and column), and
    needs no shift: unstructured CSR is bound by its loads (a nonzero's two 64-byte x^T rows, plus the scalars),
    and with the one stream the k-tiled 768x768 kernel at 128 tokens took 0.87-0.91x the time at 80-95% sparsity
    (Zen 4, two threads; with every index 0, so every x^T row in L1, it had been only 5% faster)."""
    import numpy as np
    bits = np.ascontiguousarray(np.asarray(data, np.float32).reshape(-1)).view(np.uint32).astype(np.int64)
    offsets = np.asarray(indices, np.int64).reshape(-1) * scale
    if offsets.size and (offsets.min() < 0 or offsets.max() >= 2 ** 31):
        raise ValueError(f"csr_stream: column offsets (column x {scale}) must fit int32, got "
                         f"{offsets.min()}..{offsets.max()}")
    return np.ascontiguousarray(offsets << 32 | bits)


def streams(block: tuple[int, int], nnz: int, n: int, arrays) -> bool:
    """Whether an untiled CSR kernel (`_stream_row`) reads its weights as a `csr_stream`: 1x1 blocks known at
    compile time (`arrays`), with 8+ nonzeros a row on average (nnz over n rows)."""
    return block == (1, 1) and arrays is not None and nnz >= 8 * n


def _stream_const(data, indices, scale: int):
    """`csr_stream` as a Relax constant (int64 said outright: `relax.const` makes int64 arrays int32)."""
    from tvm import relax
    return relax.const(csr_stream(data, indices, scale), "int64")


def _nz_value(e: str) -> str:
    """TVMScript: the float weight of `csr_stream` entry e (buffer `nz`)."""
    return f'T.reinterpret("float32", T.Cast("int32", nz[{e}] & T.int64(4294967295)))'


def _nz_offset(e: str) -> str:
    """TVMScript: the x^T element offset of `csr_stream` entry e (buffer `nz`)."""
    return f'T.Cast("int32", T.shift_right(nz[{e}], T.int64(32)))'


def _block_row(r: int, c: int, v: int, x_row: str, pad: str = "", stream: bool = False) -> str:
    """TVMScript (inside `for ib` of a parallel body, `pad` deeper than its 12 spaces) summing block-row ib into an
    R x V register tile `acc`: per stored block, per weight value, one broadcast times the V-vector x_row (a format
    string in {k}, the input index) of contiguous activations. With `stream` (CSR: 1x1 blocks) the weights are one
    `csr_stream` buffer `nz`, {k} is the element offset of the x^T row, for a flat x^T view (`_stream_row`)."""
    if stream:
        return _stream_row(v, x_row, pad)
    x = x_row.format(k=f"indices[indptr[ib] + j] * {c} + ci")
    # scope "global" inside the parallel body becomes a stack alloca LLVM keeps in registers; "local" becomes a
    # heap workspace it cannot promote (3x slower: every FMA stored and reloaded)
    body = f"""
            acc = T.decl_buffer(({r}, {v}), "float32", scope="global")
            for ri in T.unroll({r}):
                for vi in T.vectorized({v}):
                    acc[ri, vi] = T.float32(0)
            for j in T.serial(indptr[ib + 1] - indptr[ib]):
                for ri in T.unroll({r}):
                    for ci in T.unroll({c}):
                        for vi in T.vectorized({v}):
                            acc[ri, vi] = acc[ri, vi] + data[indptr[ib] + j, ri, ci] * {x}"""
    return deeper(body, len(pad))


def _stream_pairs(a0: str, a1: str, start: str, end: str, v: int, x_row: str, pad: str) -> str:
    """TVMScript (its `for` lines at `pad`) summing `csr_stream` entries start..end - 1 into two accumulator chains
    over alternate nonzeros, a0 and a1 (element expressions in vi), the odd last one into a0; x_row: the x^T
    V-vector, a format string in {k}, the row's element offset."""
    fma = lambda acc, e: f"""
{pad}    for vi in T.vectorized({v}):
{pad}        {acc} = {acc} + {_nz_value(e)} * {x_row.format(k=_nz_offset(e))}"""  # noqa: E731
    return f"""
{pad}for j in T.serial(({end} - {start}) // 2):{fma(a0, f"{start} + j * 2")}{fma(a1, f"{start} + j * 2 + 1")}
{pad}for j in T.serial(({end} - {start}) % 2):{fma(a0, f"{end} - 1")}"""


def _stream_row(v: int, x_row: str, pad: str = "") -> str:
    """`_block_row` for a CSR stream (`csr_stream`): row ib's nonzeros summed into `acc` [1, V] in two accumulator
    chains over alternate nonzeros, added at the end. With one chain each FMA waited on the one before (4 cycles);
    two, with the one-load stream, measured 0.84-0.96x the data + indices kernel's time on MobileNetV2's pointwise
    shapes at 90% sparsity (96x576x196, 1280x320x49, 576x96x196; Zen 4, two threads), but 1.03x where rows have
    ~2 nonzeros (144x24x3136), so `emit_bsr_conv1x1` / `emit_bsr_linear` stream only rows of 8+ on average."""
    body = f"""
            acc = T.decl_buffer((1, {v}), "float32", scope="global")
            a1 = T.decl_buffer(({v},), "float32", scope="global")
            for vi in T.vectorized({v}):
                acc[0, vi] = T.float32(0)
            for vi in T.vectorized({v}):
                a1[vi] = T.float32(0){_stream_pairs("acc[0, vi]", "a1[vi]", "indptr[ib]", "indptr[ib + 1]", v, x_row,
                                                  " " * 12)}
            for vi in T.vectorized({v}):
                acc[0, vi] = acc[0, vi] + a1[vi]"""
    return deeper(body, len(pad))


def _token_start(m: int, v: int) -> str:
    """The first token of parallel task `mo`'s tile of V (the last tile starts at M - V: any M >= V works)."""
    return f"T.min(mo * {v}, {m - v})"


def _token_tasks(m: int, k: int, n: int, v: int, y_t: bool = True) -> tuple[str, str]:
    """TVMScript around a token-major sparse linear's body: one parallel task per tile of V tokens (the last
    starts at M - V) with private x^T [K, V] (filled from its x rows) and, with `y_t`, y^T [N, V]; and, after the
    body, y^T transposed into the task's output rows."""
    m0 = _token_start(m, v)
    y = f"""
        yT = T.decl_buffer(({n}, {v}), "float32", scope="global")""" if y_t else ""
    head = f"""    for mo in T.parallel({-(-m // v)}):
        xT = T.decl_buffer(({k}, {v}), "float32", scope="global"){y}
{_local_transpose(f"x[{m0} + {{i}}, {{j}}]", "xT[{j}, {i}]", v, k, "        ")}"""
    return head, _local_transpose("yT[{i}, {j}]", f"out[{m0} + {{j}}, {{i}}]", n, v, "        ") if y_t else ""


NNZ = '"nnz"'  # the float sparse kernels' stored-block count: a symbolic dim, bound by the weight tensors at the call


def _weight_params(r: int, c: int, stream: bool) -> str:
    """The float sparse kernels' weight parameters: BSR data and indices, or one CSR stream (`csr_stream`), with
    the stored-block count symbolic (`NNZ`): the kernel's code does not depend on it (its loops run over indptr),
    so one parsed kernel serves every layer of the same shape (`parse.parse_kernel`)."""
    if stream:
        return f'nz: T.Buffer(({NNZ},), "int64")'
    return f'data: T.Buffer(({NNZ}, {r}, {c}), "float32"), indices: T.Buffer(({NNZ},), "int32")'


def bsr_linear_source(m: int, k: int, n: int, r: int, c: int, nnzb: int, lanes: int = 8, cores: int = 0,
                      stream: bool = False) -> str:
    """out[M, N] = x[M, K] @ W.T with W in BSR, M >= 4. One parallel loop over tiles of V tokens (the last tile
    starts at M - V, so any M works); each task: x rows -> private x^T, every block-row with an R x V tile of y^T in
    registers, and y^T -> its output rows. With blocks of 4 or 8 rows the block-rows run in groups of 8 output rows
    whose [8, V] tile of y^T is transposed straight into the output (the last group overlaps the one before);
    else through a private y^T [N, V], transposed at the end. Measured against y^T (128 tokens, 2 threads): 8x1
    blocks at 90% 1.42x on 768x768 and 1.10x on 384->1536, 4x4 at 95% 1.06-1.11x, at 80% even; CSR 0.88-0.97x.
    `stream` (CSR only): the weights are one `csr_stream(data, indices, V)` buffer `nz` [nnz] instead of data and
    indices."""
    nb, v = n // r, token_tile(m, r, lanes, cores)
    if stream and (r, c) != (1, 1):
        raise ValueError(f"the CSR weight stream (csr_stream) holds 1x1 blocks, not {r}x{c}: pass stream=False")
    grouped = r in (4, 8) and n >= 8
    head, tail = _token_tasks(m, k, n, v, y_t=not grouped)
    if grouped:
        m0 = _token_start(m, v)
        body = f"""
        for g in T.serial({-(-n // 8)}):
            yg = T.decl_buffer((8, {v}), "float32", scope="global")
            for gb in T.serial({8 // r}):
                ib: T.let = T.min(g * 8, {n - 8}) // {r} + gb{_block_row(r, c, v, "xT[{k}, vi]", pad="    ")}
                for ri in T.unroll({r}):
                    for vi in T.vectorized({v}):
                        yg[gb * {r} + ri, vi] = acc[ri, vi]
{_local_transpose("yg[{i}, {j}]", f"out[{m0} + {{j}}, T.min(g * 8, {n - 8}) + {{i}}]", 8, v, "            ")}"""
    else:
        flat = f"""
        xTf = T.decl_buffer(({k * v},), "float32", data=xT.data)""" if stream else ""
        body = f"""{flat}
        for ib in T.serial({nb}):{_block_row(r, c, v, "xTf[{k} + vi]" if stream else "xT[{k}, vi]", stream=stream)}
            for ri in T.unroll({r}):
                for vi in T.vectorized({v}):
                    yT[ib * {r} + ri, vi] = acc[ri, vi]"""
    return f"""
@T.prim_func(private=True)
def bsr_linear(x: T.Buffer(({m}, {k}), "float32"), {_weight_params(r, c, stream)},
               indptr: T.Buffer(({nb + 1},), "int32"),
               out: T.Buffer(({m}, {n}), "float32")):
    T.func_attr({{"tirx.noalias": True, "tirx.is_scheduled": True, "op_pattern": 8}})
{head}{body}
{tail}
"""


def bsr_matmul_t(m: int, k: int, n: int, r: int, c: int, nnzb: int, lanes: int = 8, cores: int = 0,
                 stream: bool = False):
    """PrimFunc(x[M, K], data[nnzb, R, C], indices[nnzb], indptr[N/R+1], out[M, N]) for M >= 4 (`token_tile`:
    lanes, cores); with `stream`, (x, nz[nnzb], indptr, out)."""
    return parse_kernel(bsr_linear_source(m, k, n, r, c, nnzb, lanes, cores, stream))


def bsr_rows_source(m: int, k: int, n: int, r: int, c: int, nnzb: int) -> str:
    """out[M, N] = x[M, K] @ W.T for small M (batch-1 heads): per row and block-row, the block's C columns are the
    vector, summed horizontally at the end."""
    nb = n // r
    return f"""
@T.prim_func(private=True)
def bsr_rows(x: T.Buffer(({m}, {k}), "float32"), {_weight_params(r, c, False)},
             indptr: T.Buffer(({nb + 1},), "int32"),
             out: T.Buffer(({m}, {n}), "float32")):
    T.func_attr({{"tirx.noalias": True, "tirx.is_scheduled": True, "op_pattern": 8}})
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
    return parse_kernel(bsr_rows_source(m, k, n, r, c, nnzb))


def csr_gemv_source(m: int, k: int, n: int, nnz: int) -> str:
    """out[M, N] = x[M, K] @ W.T for CSR W and M < 4 (a batch-1 classifier head) on AVX2 gathers: per output row,
    8 nonzeros at a time, one `vgatherdps` of their 8 inputs from each x row times the 8 values, into two
    accumulator chains of 8 lanes per x row (alternate groups), the row's last partial group masked (its values
    and columns by masked loads, its gather by the mask), then summed across the lanes. The scalar row kernel
    (`bsr_rows` with 1x1 blocks) waited on one dependent FMA chain per nonzero: 1x1280x1000 at 90% took 46-55 us,
    over the dense GEMV's 45; with the gathers 26-37 us (Zen 4, 2 threads). What bounds it: a gather of 8 costs
    ~12 cycles on Zen 4 (16-lane gathers took longer; a scalar stream with 4-8 chains 31 us; AVX-512
    `vexpandps` over 16-column bitmasks, whose cost follows K rather than the nonzeros, 55-58 us at 80-90%),
    while the dense GEMV streams its weights at ~0.13 cycles each."""
    ones = 'T.reinterpret("float32x8", T.broadcast(T.int32(-1), 8))'

    def fma(acc: int, mi: int, vals: str, cols: str, mask: str = ones) -> str:
        a = f"acc[T.ramp({acc * 8}, 1, 8)]"
        return f"""
            {a} = {a} + {vals} * T.call_llvm_pure_intrin("float32x8", "llvm.x86.avx2.gather.d.ps.256",
                T.broadcast(T.float32(0), 8), T.address_of(x[{mi}, 0]), {cols}, {mask}, T.int8(4))"""

    def group(e: str) -> tuple[str, str]:
        return f"vals[T.ramp({e}, 1, 8)]", f"indices[T.ramp({e}, 1, 8)]"

    pairs = "".join(fma(mi * 2 + h, mi, *group(f"p0 + j * 16 + {h * 8}")) for mi in range(m) for h in range(2))
    last = "".join(fma(mi * 2, mi, *group("p0 + cnt // 16 * 16")) for mi in range(m))
    tail = "".join(fma(mi * 2 + 1, mi, "tv", "ti", "lm") for mi in range(m))
    at = "p0 + cnt // 8 * 8"
    return f"""
@T.prim_func(private=True)
def csr_gemv(x: T.Buffer(({m}, {k}), "float32"), {_weight_params(1, 1, False)},
             indptr: T.Buffer(({n + 1},), "int32"),
             out: T.Buffer(({m}, {n}), "float32")):
    T.func_attr({{"tirx.noalias": True, "tirx.is_scheduled": True, "op_pattern": 8}})
    vals = T.decl_buffer((data.shape[0],), "float32", data=data.data)
    for r in T.parallel({n}):
        acc = T.decl_buffer(({m * 16},), "float32", scope="global")
        for i in T.unroll({m * 2}):
            acc[T.ramp(i * 8, 1, 8)] = T.broadcast(T.float32(0), 8)
        p0: T.let = indptr[r]
        cnt: T.let = indptr[r + 1] - p0
        for j in T.serial(cnt // 16):{pairs}
        if cnt % 16 >= 8:{last}
        if cnt % 8 > 0:
            lm: T.let = T.reinterpret("float32x8", T.ramp(0, 1, 8) - T.broadcast(cnt % 8, 8))  # sign: lane < rest
            tv: T.let = T.call_llvm_pure_intrin("float32x8", "llvm.x86.avx.maskload.ps.256",
                                                T.address_of(vals[{at}]), T.reinterpret("int32x8", lm))
            ti: T.let = T.call_llvm_pure_intrin("int32x8", "llvm.x86.avx2.maskload.d.256",
                                                T.address_of(indices[{at}]), T.reinterpret("int32x8", lm)){tail}
        for mi in T.serial({m}):
            s = T.decl_buffer((8,), "float32", scope="global")
            s[T.ramp(0, 1, 8)] = acc[T.ramp(mi * 16, 1, 8)] + acc[T.ramp(mi * 16 + 8, 1, 8)]
            out[mi, r] = ((s[0] + s[4]) + (s[2] + s[6])) + ((s[1] + s[5]) + (s[3] + s[7]))
"""


def csr_gemv(m: int, k: int, n: int, nnz: int):
    """PrimFunc(x[M, K], data[nnz, 1, 1], indices, indptr, out[M, N]): `csr_gemv_source`."""
    return parse_kernel(csr_gemv_source(m, k, n, nnz))


CSR_TILE = 192  # inputs per k-tile of the tiled CSR kernel: its [192, 32] slice of x^T (24 KB) stays in L1


def csr_tiled_applies(m: int, k: int, n: int, nnz: int) -> bool:
    """Whether unstructured (CSR) weights take the k-tiled kernel. Each nonzero's FMA reads one 32-token row of x^T;
    untiled, x^T [K, 32] (96 KB at K=768) is read from L2, at one such row per ~4 cycles, and two accumulator
    chains gained nothing there. Tiled, the rows come from L1 and two chains run in parallel, but every row's
    outputs are reloaded once per tile, which only pays with enough nonzeros per row and tile. Measured (128
    tokens, 2 threads): 1.21x / 1.13x / 0.98x the untiled kernel at 80 / 90 / 95% sparsity on 768x768, 1.37x /
    1.11x / 1.0x on 1536->384, 1.04x / 0.97x / 0.91x on 384->1536 (K = 2 tiles).

    From K = 1536 (x^T 192 KB: L2 reads cost more) it also pays with 8 nonzeros per row and tile: at 95% through
    the cost oracle (Zen 4, two runs each) 1.06-1.08x on 1536->384 and 1.12-1.26x on 3072->768, while 768x768 at
    95% stays untiled (the tiled kernel there 0.89x)."""
    per_tile = 8 if k >= 8 * CSR_TILE else 16  # nonzeros per row and k-tile it needs
    return m >= 4 and k >= 4 * CSR_TILE and nnz * CSR_TILE >= per_tile * n * k


def csr_tiled_pack(data, indices, indptr, k: int):
    """CSR arrays (a 1x1-block BSR: data [nnz(, 1, 1)], column indices, row pointers [N + 1]) regrouped by k-tile:
    tile-major, then row, each (tile, row) segment in column order; pointers [tiles * N + 1]."""
    import numpy as np
    indptr = np.asarray(indptr, np.int64)
    n = len(indptr) - 1
    cols = np.asarray(indices, np.int64)
    rows = np.repeat(np.arange(n), np.diff(indptr))
    tiles = cols // CSR_TILE
    order = np.lexsort((cols, rows, tiles))
    seg = tiles[order] * n + rows[order]
    counts = np.bincount(seg, minlength=-(-k // CSR_TILE) * n)
    ptr = np.concatenate([[0], np.cumsum(counts)]).astype(np.int32)
    vals = np.asarray(data, np.float32).reshape(-1)[order]
    return np.ascontiguousarray(vals), np.ascontiguousarray(cols[order].astype(np.int32)), ptr


def csr_tiled_source(m: int, k: int, n: int, nnz: int) -> str:
    """out[M, N] = x[M, K] @ W.T with W in k-tiled CSR (`csr_tiled_pack`) as one `csr_stream(values, columns, 32)`
    buffer `nz`, M >= 4: per task of 32 tokens, x^T private as in the BSR kernel; for each k-tile, every row's
    nonzeros in it are summed into its y^T row (loaded, two accumulator chains over alternate nonzeros, stored)."""
    v, tiles = token_tile(m, 1), -(-k // CSR_TILE)
    head, tail = _token_tasks(m, k, n, v)
    pairs = _stream_pairs("a0[vi]", "a1[vi]", f"indptr[t * {n} + row]", f"indptr[t * {n} + row + 1]", v,
                          "xTf[{k} + vi]", " " * 16)
    return f"""
@T.prim_func(private=True)
def csr_tiled(x: T.Buffer(({m}, {k}), "float32"), {_weight_params(1, 1, True)},
              indptr: T.Buffer(({tiles * n + 1},), "int32"), out: T.Buffer(({m}, {n}), "float32")):
    T.func_attr({{"tirx.noalias": True, "tirx.is_scheduled": True, "op_pattern": 8}})
{head}
        xTf = T.decl_buffer(({k * v},), "float32", data=xT.data)
        for row in T.serial({n}):
            for vi in T.vectorized({v}):
                yT[row, vi] = T.float32(0)
        for t in T.serial({tiles}):
            for row in T.serial({n}):
                a0 = T.decl_buffer(({v},), "float32", scope="global")
                a1 = T.decl_buffer(({v},), "float32", scope="global")
                for vi in T.vectorized({v}):
                    a0[vi] = yT[row, vi]
                for vi in T.vectorized({v}):
                    a1[vi] = T.float32(0){pairs}
                for vi in T.vectorized({v}):
                    yT[row, vi] = a0[vi] + a1[vi]
{tail}
"""


def use_rows(m: int) -> bool:
    return m < 4


def emit_bsr_linear(bb, x, data, indices, indptr, bias, x_shape, n: int, block: tuple[int, int], nnzb: int,
                    arrays=None, lanes: int = 8, cores: int = 0, gather: bool = False):
    """Emit y = x @ W.T (+ bias) with W given as Relax BSR tensors; x [..., K] -> [..., N]. `arrays`: the same
    three as numpy, when known at compile time: CSR weights then take the k-tiled kernel where it pays, and both
    CSR kernels read them as one stream (`csr_stream`). `lanes` and `cores` (the target's vector lanes and cores)
    size the token tiles (`token_tile`). `gather`: the target has AVX2's gathers, which CSR weights under 4 rows of
    x take (`csr_gemv`)."""
    import math

    from tvm import relax

    lead, k = tuple(int(d) for d in x_shape[:-1]), int(x_shape[-1])
    m = math.prod(lead) if lead else 1
    r, c = block
    x2 = bb.emit(relax.op.reshape(x, (m, k)))
    tag = f"{m}x{k}x{n}_b{r}x{c}_nnz{nnzb}"
    if block == (1, 1) and arrays is not None and csr_tiled_applies(m, k, n, nnzb):
        vals, cols, ptr = csr_tiled_pack(*arrays, k)
        gv = bb.add_func(parse_kernel(csr_tiled_source(m, k, n, nnzb)), f"csr_tiled_{m}x{k}x{n}_nnz{nnzb}")
        nz = _stream_const(vals, cols, token_tile(m, 1))
        y = bb.emit(relax.call_tir(gv, [x2, nz, relax.const(ptr)], relax.TensorType((m, n), "float32")))
    elif use_rows(m) and block == (1, 1) and gather:
        gv = bb.add_func(csr_gemv(m, k, n, nnzb), f"csr_gemv_{tag}")
        y = bb.emit(relax.call_tir(gv, [x2, data, indices, indptr], relax.TensorType((m, n), "float32")))
    elif use_rows(m):
        gv = bb.add_func(bsr_matmul_rows(m, k, n, r, c, nnzb), f"bsr_rows_{tag}")
        y = bb.emit(relax.call_tir(gv, [x2, data, indices, indptr], relax.TensorType((m, n), "float32")))
    else:
        stream = streams(block, nnzb, n, arrays)
        gv = bb.add_func(bsr_matmul_t(m, k, n, r, c, nnzb, lanes, cores, stream), f"bsr_t_{tag}")
        weights = [_stream_const(*arrays[:2], token_tile(m, r, lanes, cores))] if stream else [data, indices]
        y = bb.emit(relax.call_tir(gv, [x2, *weights, indptr], relax.TensorType((m, n), "float32")))
    if bias is not None:
        y = bb.emit(relax.op.add(y, bias))
    return bb.emit(relax.op.reshape(y, (*lead, n))) if lead != (m,) else y


def bsr_conv1x1_source(p: int, k: int, n: int, r: int, c: int, nnzb: int,
                       clamp: tuple[float, float] | None = None, residual: bool = False, copy: bool = False,
                       lanes: int = 8, cores: int = 0, stream: bool = False) -> str:
    """out[N, P] = W x + bias (+ residual, then clamp) for a batch-1 pointwise conv, x [K = Cin, P] as NCHW stores
    it, W [N = Cout, K] in BSR. The linear kernel's inner loop without its transposes: the rows of x already are
    the contiguous pixel vectors it reads (its x^T), and the R x V tile of outputs in registers is a tile of output
    rows, stored in place with the epilogue fused. One parallel loop over tiles of V pixels (the last overlaps the
    one before, any P >= 1). With `copy` each task first copies its V pixel columns of x into a contiguous
    [K, V] buffer.

    Maps of under 8 pixel tiles (7x7) also split the block-rows in two halves, half-major, so the threads split
    the output channels rather than the pixels of every row: 1280x320x49 at 95% 29-31 -> 17-20 us, 960x160x49
    20 -> 8 us, 320x960x49 1.03-1.12x (kernel alone, two threads; see `int8.quad_chunks` for the same effect).
    On 14x14 maps it was 0.92-1.11x and on 56x56 0.88x (four halves) to 0.4x (two), so they keep the pixel split.
    With `copy` (CSR), each half copies its pixel columns again: on 14x14 maps CSR's 32-pixel tiles (7) made the
    copy ~40% of 96x576x196's time, and the pixel split alone measured 0.70-0.84x on the projections (64x384x196,
    96x576x196 at 80-95%) but 1.05-1.06x on the expansions (384x64x196, 576x96x196): projections (K > N) with 4+
    tiles keep the pixel split (Zen 4, two threads).

    `stream` (CSR with `copy`): the weights are one `csr_stream(data, indices, V)` buffer `nz`, offsets into the
    copied [K, V] pixel columns."""
    from graphopt.targets.tvm.cpu.conv import _clamped
    nb, v = n // r, token_tile(p, r, lanes, cores)
    if stream and ((r, c) != (1, 1) or not copy):
        raise ValueError(f"the CSR weight stream (csr_stream) holds 1x1 blocks (not {r}x{c}) read from the copied "
                         f"pixel columns (copy=True, not {copy}): pass stream=False")
    tiles = -(-p // v)
    # a copied pixel tile is copied once per half: a projection (K > N) with 4+ tiles splits the pixels only
    halves = 2 if tiles < 8 and nb >= 2 and not (copy and tiles >= 4 and k > n) else 1
    p0 = f"T.min(po * {v}, {p - v})"
    val = "acc[ri, vi] + bias[ib * {r} + ri]".format(r=r)
    if residual:
        val += f" + res[ib * {r} + ri, {p0} + vi]"
    res_arg = f' res: T.Buffer(({n}, {p}), "float32"),' if residual else ""
    staged = f"""
        xs = T.decl_buffer(({k}, {v}), "float32", scope="global")
        for kk in T.serial({k}):
            for vi in T.vectorized({v}):
                xs[kk, vi] = x[kk, {p0} + vi]""" if copy else ""
    if stream:
        staged += f"""
        xsf = T.decl_buffer(({k * v},), "float32", data=xs.data)"""
    x_row = "xsf[{k} + vi]" if stream else "xs[{k}, vi]" if copy else f"x[{{k}}, {p0} + vi]"
    store = f"""
            for ri in T.unroll({r}):
                for vi in T.vectorized({v}):
                    out[ib * {r} + ri, {p0} + vi] = {_clamped(val, clamp)}"""
    if halves == 1:
        loop = f"""
    for po in T.parallel({tiles}):{staged}
        for ib in T.serial({nb}):{_block_row(r, c, v, x_row, stream=stream)}{store}"""
    else:  # the block-row loop starts at 0 (TVM 0.27 mis-lowers inner loops reading a loop that starts above 0)
        half = -(-nb // halves)
        store_deeper = deeper(store)  # inside the `if True:` below
        loop = f"""
    for t in T.parallel({tiles * halves}):
        po: T.let = t % {tiles}{staged}
        for ih in T.serial({half}):
            ib: T.let = T.min((t // {tiles}) * {half} + ih, {nb - 1})
            if True:{_block_row(r, c, v, x_row, pad="    ", stream=stream)}{store_deeper}"""
    return f"""
@T.prim_func(private=True)
def bsr_conv1x1(x: T.Buffer(({k}, {p}), "float32"), {_weight_params(r, c, stream)},
                indptr: T.Buffer(({nb + 1},), "int32"),
                bias: T.Buffer(({n},), "float32"),{res_arg} out: T.Buffer(({n}, {p}), "float32")):
    T.func_attr({{"tirx.noalias": True, "tirx.is_scheduled": True, "op_pattern": 8}}){loop}
"""


def emit_bsr_conv1x1(bb, x, data, indices, indptr, bias, x_shape, n: int, block: tuple[int, int], nnzb: int,
                     clamp: tuple[float, float] | None = None, residual=None, lanes: int = 8, cores: int = 0,
                     arrays=None):
    """Emit a pointwise conv of x [B, Cin, H, W] (the kernel loops over the samples) with its weight [n, Cin] given
    as Relax BSR tensors, bias (a Relax value [n] or None), a residual of the output's shape and a clamp fused into
    the store. `lanes`, `cores`: the target's, for the pixel tiles (`token_tile`). `arrays`: data, indices and
    indptr as numpy when known at compile time; CSR weights then go to the kernel as one stream (`csr_stream`)."""
    import numpy as np
    from tvm import relax

    from graphopt.targets.tvm.cpu.batch import batch_source

    bn, k, h, w = (int(d) for d in x_shape)
    p, (r, c) = h * w, block
    # 1-2 row blocks (CSR): a private copy of the task's pixel columns, so each nonzero's x row is one compact
    # cache-line pair (1280x320x49 CSR at 90%: 2.9 -> 3.6x dense); blocks of 4 rows gained nothing from it
    stream = streams(block, nnzb, n, arrays)
    src = batch_source(bsr_conv1x1_source(p, k, n, r, c, nnzb, clamp, residual is not None, r < 4, lanes, cores,
                                          stream), bn, ["x", "out"] + ([] if residual is None else ["res"]))
    tag = (f"{n}x{k}x{p}_b{r}x{c}_nnz{nnzb}" + ("_res" if residual is not None else "") + ("_clamp" if clamp else "")
           + (f"_n{bn}" if bn > 1 else ""))
    gv = bb.add_func(parse_kernel(src), f"bsr_conv1x1_{tag}")
    b = bias if bias is not None else relax.const(np.zeros(n, np.float32))
    shape = lambda rows: (bn, rows, p) if bn > 1 else (rows, p)  # noqa: E731  (batch_source's per-sample views)
    extra = [] if residual is None else [bb.emit(relax.op.reshape(residual, shape(n)))]
    weights = [_stream_const(*arrays[:2], token_tile(p, r, lanes, cores))] if stream else [data, indices]
    y = bb.emit(relax.call_tir(gv, [bb.emit(relax.op.reshape(x, shape(k))), *weights, indptr, b, *extra],
                               relax.TensorType(shape(n), "float32")))
    return bb.emit(relax.op.reshape(y, (bn, n, h, w)))


QBLOCK = (8, 4)  # int8 BSR blocks: 8 output rows (one int32x8 accumulator) x 4 inputs (one u8 x s8 quad)
QTOKENS = 12  # tokens per int8 task: 12 accumulators in registers


def bsr_qlinear_applies(m: int, k: int, n: int, block: tuple[int, int]) -> str:
    """Why the int8 BSR kernel cannot take this qlinear ("" when it can)."""
    if tuple(block) != QBLOCK:
        return f"int8 sparse kernels use {QBLOCK[0]}x{QBLOCK[1]} blocks (bsr8x4), not {block[0]}x{block[1]}"
    if n % QBLOCK[0] or k % QBLOCK[1]:
        return f"weight [{n}, {k}] does not divide into 8x4 blocks"
    return ""


QPAIRS = 8  # token pairs per task of the 16-lane int8 BSR kernel: 8 zmm accumulators


def bsr_qlinear_pairs_source(m: int, k: int, n: int, dot: str, float_bias: bool = False) -> str:
    """`bsr_qlinear_source` on 512-bit vectors: each accumulator holds the 8 output rows of a block-row for two
    tokens, lane 2r + u = row r of token 2i + u. The activation comes paired (`pair_tokens_source`: quads
    ap[M/2, K/4, 2], the two tokens' quads of one block column side by side), so a pair's operand is one 8-byte
    broadcast; the block's 32 bytes are loaded once and spread to match (each row's quad twice, one shuffle shared
    by the task's pairs), so the weight is stored as the 8-lane kernel stores it. The stores take the even and odd
    lanes apart. Kernel alone (Emerald Rapids, 2 threads, 80 / 90% sparse, exact against int64): 0.55-0.82x the
    8-lane kernel's time on 128 x 768 x 768, 128 x 384 x 1536, 128 x 1536 x 384 and 384 x 768 x 768 (127 tokens:
    0.69-0.82); 12 pairs a task 0.56-0.98x, 6 pairs 0.66-0.92x; the block stored pre-spread (64 bytes) was no
    faster. Whole calls against 8 pairs a task (QPAIRS): 12 pairs 0.76-1.32x, 16 pairs 1.06-1.69x."""
    from graphopt.targets.tvm.cpu.int8 import quad_dot
    r, c = QBLOCK
    nb, k4, mp = n // r, k // c, -(-m // 2)
    pt = min(QPAIRS, mp)
    p0 = f"T.min((t // {nb}) * {pt}, {mp - pt})"
    ib = f"(t % {nb})"
    quad = (f'T.reinterpret("uint8x64", T.broadcast(T.reinterpret("int64", '
            f'ap[T.ramp((({p0} + i) * {k4} + indices[jj]) * 2, 1, 2)]), 8))')
    block = 'T.reinterpret("int32x8", data[T.ramp(jj * 32, 1, 32)])'
    spread = f'T.reinterpret("int8x64", T.Shuffle([{block}, {block}], {[q for q in range(8) for _ in (0, 1)]}))'
    acc = "acc[T.ramp(i * 16, 1, 16)]"
    cols = f"T.ramp({ib} * 8, 1, 8)"
    bias_arg = f' bias: T.Buffer(({n},), "float32"),' if float_bias else ""
    store = ""
    for u in (0, 1):
        val = (f'T.Cast("float32x8", T.Shuffle([{acc}], {list(range(u, 16, 2))}) - off[{cols}]) * mult[{cols}]'
               + (f" + bias[{cols}]" if float_bias else ""))
        dst = f"out[T.ramp((2 * ({p0} + i) + {u}) * {n} + {ib} * 8, 1, 8)]"
        store += (f"""
            {dst} = {val}""" if u == 0 or m % 2 == 0 else f"""
            if 2 * ({p0} + i) + 1 < {m}:
                {dst} = {val}""")
    return f"""
@T.prim_func(private=True)
def bsr_qlinear_pairs(ap: T.Buffer(({mp * k4 * 2},), "int32"), data: T.Buffer(("ndata",), "int8"),
                      indices: T.Buffer(("nnz",), "int32"), indptr: T.Buffer(({nb + 1},), "int32"),
                      off: T.Buffer(({n},), "int32"), mult: T.Buffer(({n},), "float32"),{bias_arg}
                      out: T.Buffer(({m * n},), "float32")):
    T.func_attr({{"tirx.noalias": True, "tirx.is_scheduled": True, "op_pattern": 8}})
    for t in T.parallel({-(-mp // pt) * nb}):
        acc = T.decl_buffer(({pt * 16},), "int32", scope="global")
        for i in T.unroll({pt}):
            {acc} = T.broadcast(T.int32(0), 16)
        for j in T.serial(indptr[{ib} + 1] - indptr[{ib}]):
            jj: T.let = indptr[{ib}] + j
            w: T.let = {spread}
            for i in T.unroll({pt}):
                {acc} = {quad_dot(acc, quad, "w", dot, 16)}
        for i in T.unroll({pt}):{store}
"""


def pair_tokens_source(m: int, k: int) -> str:
    """xq int8 [M, K] -> the uint8 quads of xq + 128, as int32 [ceil(M/2), K/4, 2]: pair p, block column q holds
    token 2p's quad then token 2p + 1's (an odd M's last pair repeats its token, never stored). Four quads of each
    token a step, interleaved as int32 lanes by one shuffle; +128 is a flip of every byte's top bit (`flip` [1] =
    `int8.BYTE_TOPS`). The same relayout as Relax ops (reshape + permute_dims fused with the +128) took 50 us on
    128 x 768, the kernel it feeds 61. Opaque to Relax's fusion (its int32 view of x cannot merge with a producer's
    buffer), and two inputs, so Relax does not check it for a reshape (TVM 0.27 fails on a kernel without blocks)."""
    k4, mp = k // 4, -(-m // 2)
    rows = [f"2 * p * {k4}", f"T.min(2 * p + 1, {m - 1}) * {k4}"]
    body = ""
    if k4 // 4:
        halves = ", ".join(f"x32[T.ramp({r} + q * 4, 1, 4)]" for r in rows)
        body += f"""
        for q in T.serial({k4 // 4}):
            a32[T.ramp((p * {k4} + q * 4) * 2, 1, 8)] = T.bitwise_xor(T.Shuffle([{halves}], [0, 4, 1, 5, 2, 6, 3, 7]),
                                                                     T.broadcast(flip[0], 8))"""
    if k4 % 4:
        body += f"""
        for q in T.serial({k4 % 4}):
            for u in T.unroll(2):
                a32[(p * {k4} + {k4 // 4 * 4} + q) * 2 + u] = T.bitwise_xor(
                    x32[T.if_then_else(u == 0, {rows[0]}, {rows[1]}) + {k4 // 4 * 4} + q], flip[0])"""
    return f"""
@T.prim_func(private=True)
def pair_tokens(x: T.Buffer(({m * k},), "int8"), flip: T.Buffer((1,), "int32"),
                a32: T.Buffer(({mp * k4 * 2},), "int32")):
    T.func_attr({{"tirx.noalias": True, "tirx.is_scheduled": True, "op_pattern": 8}})
    for p in T.parallel({mp}):
        x32 = T.decl_buffer(({m * k4},), "int32", data=x.data){body}
"""


def bsr_qlinear_source(m: int, k: int, n: int, dot: str, float_bias: bool = False) -> str:
    """out[M, N] (float) = dequant(a[M, K] @ W^T) for a uint8 (the int8 activation + 128) and W int8 in BSR with
    8 x 4 blocks. A block's 32 bytes (8 rows x 4 inputs, row-major) are one vector: per token, the broadcast quad
    a[t, 4c:4c+4] against it is one `quad_dot` step (`vpdpbusd`, or `vpmaddubsw` + `vpmaddwd` under `ubsw_exact`)
    giving 8 int32 lanes, the 8 output rows of that token. So nothing is transposed: a is read as stored, and a
    tile's accumulator is 8 contiguous outputs of a token's row. Tasks are (token tile of 12) x (block-row), token
    tile major, so consecutive tasks reuse the tile's activations from L1; the last tile overlaps the one before.
    The epilogue is the dense int8 GEMM's: (acc - offset) * multiplier (+ float bias) per output column."""
    from graphopt.targets.tvm.cpu.int8 import quad_dot
    r, c = QBLOCK
    nb, mt_rows = n // r, min(QTOKENS, m)
    mt = -(-m // mt_rows)
    t0 = f"T.min((t // {nb}) * {mt_rows}, {m - mt_rows})"
    ib = f"(t % {nb})"
    quad = f'T.reinterpret("uint8x32", T.broadcast(T.reinterpret("int32", a[T.ramp(({t0} + i) * {k} + indices[jj] * 4, 1, 4)]), 8))'
    acc = "acc[T.ramp(i * 8, 1, 8)]"
    cols = f"T.ramp({ib} * 8, 1, 8)"
    bias_arg = f' bias: T.Buffer(({n},), "float32"),' if float_bias else ""
    return f"""
@T.prim_func(private=True)
def bsr_qlinear(a: T.Buffer(({m * k},), "uint8"), data: T.Buffer(("ndata",), "int8"),
                indices: T.Buffer(("nnz",), "int32"), indptr: T.Buffer(({nb + 1},), "int32"),
                off: T.Buffer(({n},), "int32"), mult: T.Buffer(({n},), "float32"),{bias_arg}
                out: T.Buffer(({m * n},), "float32")):
    T.func_attr({{"tirx.noalias": True, "tirx.is_scheduled": True, "op_pattern": 8}})
    for t in T.parallel({mt * nb}):
        acc = T.decl_buffer(({mt_rows * 8},), "int32", scope="global")
        for i in T.unroll({mt_rows}):
            {acc} = T.broadcast(T.int32(0), 8)
        for j in T.serial(indptr[{ib} + 1] - indptr[{ib}]):
            jj: T.let = indptr[{ib}] + j
            for i in T.unroll({mt_rows}):
                {acc} = {quad_dot(acc, quad, "data[T.ramp(jj * 32, 1, 32)]", dot)}
        for i in T.unroll({mt_rows}):
            out[T.ramp(({t0} + i) * {n} + {ib} * 8, 1, 8)] = T.Cast("float32x8", {acc} - off[{cols}]) * mult[{cols}]""" + (
        f" + bias[{cols}]" if float_bias else "") + "\n"


def emit_bsr_qlinear(bb, xq, wq, w_scales, bias, sx: float, zx: int, x_shape, dot: str, lanes: int = 8):
    """qlinear of xq int8 [..., K] with a constant int8 weight [N, K] (numpy, mostly zero 8x4 blocks) on the int8
    BSR kernel -> float32 [..., N]; where the quads run 512-bit (`int8.wide_quads`), two tokens a vector
    (`bsr_qlinear_pairs_source`)."""
    import math

    import numpy as np
    import torch
    from tvm import relax

    from graphopt.ir.sparse_ops import to_bsr
    from graphopt.targets.tvm.cpu.int8 import BYTE_TOPS, MR, epilogue_constants, wide_quads

    lead, k = tuple(int(d) for d in x_shape[:-1]), int(x_shape[-1])
    m, n = math.prod(lead), int(wq.shape[0])
    s = to_bsr(torch.from_numpy(np.ascontiguousarray(wq, np.int8)), QBLOCK)
    off, mult, fb = epilogue_constants(wq, w_scales, bias, sx, zx + 128, -(-n // MR))
    wide = wide_quads(dot, lanes)
    src = (bsr_qlinear_pairs_source if wide else bsr_qlinear_source)(m, k, n, dot, fb is not None)
    gv = bb.add_func(parse_kernel(src),
                     f"bsr_qlinear_{dot}{'_pairs' if wide else ''}_{m}x{k}x{n}_nnz{s.nnzb}")
    if wide:
        pair = bb.add_func(parse_kernel(pair_tokens_source(m, k)), f"pair_tokens_{m}x{k}")
        a = bb.emit(relax.call_tir(pair, [bb.emit(relax.op.reshape(xq, (m * k,))),
                                          relax.const(np.array([BYTE_TOPS], np.int32))],
                                   relax.TensorType((-(-m // 2) * (k // 2),), "int32")))
    else:
        a = relax.op.astype(relax.op.add(relax.op.astype(xq, "int16"), relax.const(128, "int16")), "uint8")
        a = bb.emit(relax.op.reshape(bb.emit(a), (m * k,)))
    consts = [relax.const(s.data.numpy().reshape(-1)), relax.const(s.indices.numpy()), relax.const(s.indptr.numpy()),
              *(relax.const(v[:n]) for v in (off, mult, fb) if v is not None)]
    y = bb.emit(relax.call_tir(gv, [a, *consts], relax.TensorType((m * n,), "float32")))
    return bb.emit(relax.op.reshape(y, (*lead, n)))



def emit_amx_bsr_qlinear(bb, xq, wq, w_scales, bias, sx: float, zx: int, x_shape, cores: int = 2):
    """qlinear of xq int8 [..., K] (16+ rows) with a constant int8 weight [N, K] (numpy, mostly zero 16 x 64
    blocks: bsr16x64) on the AMX block-sparse kernel (`amx.qbsr_amx_source`) -> float32 [..., N]. The activation
    goes in as the quantize wrote it (signed x signed tiles), rows padded with the zero point to 32 where fewer."""
    import math

    import numpy as np
    import torch
    from tvm import relax

    from graphopt.ir.sparse_ops import to_bsr
    from graphopt.targets.tvm.cpu import amx
    from graphopt.targets.tvm.cpu.int8 import MR, epilogue_constants

    lead, k = tuple(int(d) for d in x_shape[:-1]), int(x_shape[-1])
    m, n = math.prod(lead), int(wq.shape[0])
    why = amx.amx_bsr_applies(m, k, n)
    if why:
        raise ValueError(why)
    s = to_bsr(torch.from_numpy(np.ascontiguousarray(wq, np.int8)), amx.QBSR_BLOCK)
    off, mult, fb = epilogue_constants(wq, w_scales, bias, sx, zx, -(-n // MR))
    mq = max(m, amx.ROWS)
    src = amx.qbsr_amx_source(mq, k, n, s.nnzb, fb is not None, cores)
    gv = bb.add_func(parse_kernel(src), f"{amx.KERNEL_PREFIX}_bsr16x64_{mq}x{k}x{n}_nnz{s.nnzb}")
    a = bb.emit(relax.op.reshape(xq, (m, k)))
    if mq != m:
        a = bb.emit(relax.op.nn.pad(a, [0, mq - m, 0, 0], pad_value=float(zx)))
    a = bb.emit(relax.op.reshape(a, (mq * k,)))
    consts = [relax.const(amx.pack_bsr_blocks(s.data.numpy())), relax.const(s.indices.numpy()),
              relax.const(s.indptr.numpy()), relax.const(amx.tile_config()),
              *(relax.const(v[:n]) for v in (off, mult, fb) if v is not None)]
    y = bb.emit(relax.call_tir(gv, [a, *consts], relax.TensorType((mq * n,), "float32")))
    if mq != m:
        y = bb.emit(relax.op.strided_slice(bb.emit(relax.op.reshape(y, (mq, n))), axes=[0], begin=[0], end=[m]))
    return bb.emit(relax.op.reshape(y, (*lead, n)))

QCSR_TILE = 16  # the int8 CSR kernels' least token (pixel) tile: two int32x8 accumulators per output row
# vpunpcklwd / vpunpckhwd interleave inside each 128-bit half (int16 lanes 0-3 and 8-11 go low, 4-7 and 12-15
# high), so for tokens staged in order a 16-token group's two accumulators hold tokens [0-3, 8-11] and [4-7,
# 12-15]: QCSR_SLOT[j] is where token j's sum sits in the group's 16 accumulator lanes (and, staged at QCSR_SLOT[j]
# instead, token j's sum lands in lane j). The map is its own inverse.
QCSR_SLOT = [0, 1, 2, 3, 8, 9, 10, 11, 4, 5, 6, 7, 12, 13, 14, 15]
_QCSR_LO = [j for i in (0, 1, 2, 3, 8, 9, 10, 11) for j in (i, i + 16)]
_QCSR_HI = [j for i in (4, 5, 6, 7, 12, 13, 14, 15) for j in (i, i + 16)]


def qcsr_tile(m: int) -> int:
    """Tokens (pixels) per task of the int8 CSR kernels: 32 (each pair's index and weight loads shared by 4
    `vpmaddwd`, and the per-row loop and store cost spread over twice the tokens; the staged rows, 48 KB at K =
    768, then come from L2: 1.07-1.12x the 16-token tile on 128 x 768 x 768 at 80-99.8% sparsity, 1.5-1.8x on the
    1280x320x49 and 144x24x3136 pointwise convs, even on 96x576x196 and 576x96x196), 16 under 32 tokens."""
    return 32 if m >= 32 else QCSR_TILE


def csr_qpairs(wq, tile: int = QCSR_TILE):
    """int8 W [N, K] -> the int8 CSR kernels' arrays: each row's nonzeros in column order, taken two at a time
    (an odd row ends with a zero weight on column 0): pair words int32 [pairs] (first weight in the low
    int16, second in the high: one `vpmaddwd` operand when broadcast), the pair's two staged-row offsets
    (column * tile) int32 [2 * pairs], and row pointers in pairs, int64 [N + 1] (int32 ones made LLVM redo and
    sign-extend the index arithmetic of every pair: 1.2x slower)."""
    import numpy as np
    w = np.asarray(wq, np.int8)
    n = w.shape[0]
    rows, cols = np.nonzero(w)
    counts = np.bincount(rows, minlength=n)
    pairs = (counts + 1) // 2
    ptr = np.concatenate([[0], np.cumsum(pairs)]).astype(np.int64)
    vals = np.zeros(2 * int(ptr[-1]), np.int16)
    offs = np.zeros(2 * int(ptr[-1]), np.int32)
    first = np.concatenate([[0], np.cumsum(counts)[:-1]])
    slot = 2 * ptr[rows] + (np.arange(len(rows)) - first[rows])
    vals[slot], offs[slot] = w[rows, cols], cols * tile
    return vals.view(np.int32).copy(), offs, ptr


def qcsr_weight_consts(pw, cols, ptr) -> list:
    """`csr_qpairs`' arrays as the kernels' Relax constants (a weight with no nonzero gets one-element buffers; row
    pointers stay int64: relax.const would narrow them to int32)."""
    import numpy as np
    from tvm import relax
    return [relax.const(a if len(a) else np.zeros(1, np.int32)) for a in (pw, cols)] + [relax.const(ptr, "int64")]


def qcsr_applies(m: int) -> str:
    """Why the int8 CSR kernels cannot take a layer of m tokens (pixels) ("" when they can)."""
    return "" if m >= QCSR_TILE else f"the int8 CSR kernel vectorizes over {QCSR_TILE} tokens; this layer has {m}"


def _qcsr_rows(r0: str, r1: str, v: int, pad: str, dot: str = "ubsw") -> str:
    """TVMScript summing output rows r0 <= r < r1 of an int8 CSR weight against the task's staged int16 rows xs
    (v tokens each) into acc (int32 [v]; each group of 16 in `QCSR_SLOT` order): per pair of nonzeros, the two
    staged rows interleaved (`vpunpcklwd` / `vpunpckhwd`) and multiplied by the broadcast pair word (`vpmaddwd`,
    then added; with dot="vnni" one `vpdpwssd` multiplies and accumulates), exact for any int8 values."""
    row = lambda e, order, h: (f"T.Shuffle([xs[T.ramp(cols[2 * ({e})] + {h}, 1, 16)], "  # noqa: E731
                               f"xs[T.ramp(cols[2 * ({e}) + 1] + {h}, 1, 16)]], {order})")
    w = 'T.reinterpret("int16x16", T.broadcast(pw[ptr[r] + j], 8))'
    # the pair loop starts at 0: TVM 0.27 lowers `for j in T.serial(ptr[r], ...)` inside `for r in T.serial(r0,
    # ...)` with r0 > 0 to ptr[r - r0] (the outer loop's offset is not put into the inner loop's start)
    out = f"""
{pad}for r in T.serial({r0}, {r1}):
{pad}    acc[T.ramp(0, 1, {v})] = T.broadcast(T.int32(0), {v})
{pad}    for j in T.serial(ptr[r + 1] - ptr[r]):"""
    for h in range(0, v, 16):
        for half, order in ((0, _QCSR_LO), (8, _QCSR_HI)):
            a, pair = f"acc[T.ramp({h + half}, 1, 8)]", row("ptr[r] + j", order, h)
            step = (f'T.call_llvm_pure_intrin("int32x8", "llvm.x86.avx512.vpdpwssd.256", {a}, {pair}, {w})'
                    if dot == "vnni" else f'{a} + T.call_llvm_pure_intrin("int32x8", "llvm.x86.avx2.pmadd.wd", {pair}, {w})')
            out += f"""
{pad}        {a} = {step}"""
    return out


def _qcsr_groups(tiles: int, n: int) -> int:
    """Row groups per token tile: enough tasks for 8 threads where tiles are few (each group stages the tile)."""
    return max(1, min(max(1, n // 16), -(-8 // tiles)))


def _unpack_tree() -> tuple[list[list[tuple[int, int, int, list[int]]]], list[int]]:
    """The 16 x 16 byte transpose as four levels of unpacks (bytes, then 2-, 4- and 8-byte units: `vpunpckl*` /
    `vpunpckh*`): per level, (output vector, input a, input b, shuffle indices over a ++ b) for 16 vectors, and which
    final vector holds input column j. Worked out by following (row, column) labels through the unpacks."""
    vecs = [[(t, j) for j in range(16)] for t in range(16)]
    levels = []
    for w in (1, 2, 4, 8):
        e, ops, out = 16 // w, [], []
        lo = [s + i * w + b for i in range(e // 2) for s in (0, 16) for b in range(w)]
        hi = [s + i * w + b for i in range(e // 2, e) for s in (0, 16) for b in range(w)]
        for a in range(0, 16, 2 * w):  # vector a + i holds rows a.. (w of them); its partner the next w rows
            for i in range(w):
                pair = vecs[a + i] + vecs[a + w + i]
                for idx in (lo, hi):
                    ops.append((len(out), a + i, a + w + i, idx))
                    out.append([pair[x] for x in idx])
        levels.append(ops)
        vecs = out
    where = [0] * 16
    for i, v in enumerate(vecs):
        assert [t for t, _ in v] == list(range(16)) and len({j for _, j in v}) == 1
        where[v[0][1]] = i
    return levels, where


def _stage_transposed(k: int, v: int, pad: str) -> str:
    """TVMScript staging a task's v tokens of x [M, K] int8 (rows t0..) as int16 rows xs [K, v]: 16 x 16 byte
    blocks transposed by `_unpack_tree` through a small buffer, each column then sign-extended and stored; inputs
    past the last whole 16 one element at a time. The element-wise form alone (a strided gather per input) took
    1.07x / 1.2x / 1.4x as long on 768x768 at 90% / 95% / ~100% sparsity."""
    levels, where = _unpack_tree()
    kb = k // 16
    code = f"""
{pad}tb = T.decl_buffer((512,), "int8", scope="global")
{pad}for kb in T.serial({kb}):""" if kb else ""
    for g in range(v // 16):
        cur = None  # the level's input: the x rows, then one half of tb
        for li, ops in enumerate(levels):
            dst = li % 2
            for o, a, b, idx in ops:
                ea, eb = (f"x[T.ramp((t0 + {g * 16 + r}) * {k} + kb * 16, 1, 16)]" if cur is None else
                          f"tb[T.ramp({cur * 256 + r * 16}, 1, 16)]" for r in (a, b))
                code += f"""
{pad}    tb[T.ramp({dst * 256 + o * 16}, 1, 16)] = T.Shuffle([{ea}, {eb}], {idx})""" if kb else ""
            cur = dst
        for j in range(16 if kb else 0):
            code += f"""
{pad}    xs[T.ramp((kb * 16 + {j}) * {v} + {g * 16}, 1, 16)] = T.Cast("int16x16", tb[T.ramp({cur * 256 + where[j] * 16}, 1, 16)])"""
    if k % 16:
        code += f"""
{pad}for kk in T.serial({kb * 16}, {k}):
{pad}    xs[T.ramp(kk * {v}, 1, {v})] = T.Cast("int16x{v}", x[T.ramp(t0 * {k} + kk, {k}, {v})])"""
    return code


def csr_qlinear_source(m: int, k: int, n: int, float_bias: bool = False, dot: str = "ubsw") -> str:
    """out[M, N] (float) = dequant(x[M, K] @ W^T) for int8 x and W int8 in pair CSR (`csr_qpairs` with the tile
    `qcsr_tile(M)`), M >= 16. Each task takes a tile of V tokens (the last overlaps the one before) and a group
    of rows (the last group overlaps the one before: sizes are compile-time constants): it stages its tokens'
    activations once as int16 rows [K, V] (the transpose, `_stage_transposed`), sums each output row's nonzero pairs (`_qcsr_rows`),
    puts the V outputs in token order with the dense int8 GEMM's epilogue, (acc - offset) * multiplier (+ float
    bias), into y^T [rows, V], and transposes that into its rows of out. offset = the zero point times the row
    sum minus the int32 bias: the products are the exact integers the dense kernels sum, so the two agree to
    float rounding."""
    v = qcsr_tile(m)
    tiles = -(-m // v)
    groups = _qcsr_groups(tiles, n)
    ng = -(-n // groups)
    bias_arg = f' bias: T.Buffer(({n},), "float32"),' if float_bias else ""
    order = [h + q for h in range(0, v, 16) for q in QCSR_SLOT]
    b = f" + T.broadcast(bias[r], {v})" if float_bias else ""
    return f"""
@T.prim_func(private=True)
def csr_qlinear(x: T.Buffer(({m * k},), "int8"), pw: T.Buffer(("npairs",), "int32"),
                cols: T.Buffer(("ncols",), "int32"), ptr: T.Buffer(({n + 1},), "int64"),
                off: T.Buffer(({n},), "int32"), mult: T.Buffer(({n},), "float32"),{bias_arg}
                out: T.Buffer(({m * n},), "float32")):
    T.func_attr({{"tirx.noalias": True, "tirx.is_scheduled": True, "op_pattern": 8}})
    for t in T.parallel({tiles * groups}):
        t0: T.let = T.min((t // {groups}) * {v}, {m - v})
        r0: T.let = T.min((t % {groups}) * {ng}, {n - ng})
        xs = T.decl_buffer(({k * v},), "int16", scope="global")
        yT = T.decl_buffer(({ng * v},), "float32", scope="global")
        acc = T.decl_buffer(({v},), "int32", scope="global"){_stage_transposed(k, v, " " * 8)}
{_qcsr_rows("r0", f"r0 + {ng}", v, " " * 8, dot)}
            yT[T.ramp((r - r0) * {v}, 1, {v})] = T.Cast("float32x{v}", T.Shuffle([acc[T.ramp(0, 1, {v})]], {order}) - T.broadcast(off[r], {v})) * T.broadcast(mult[r], {v}){b}
{_local_transpose(f"yT[({{i}}) * {v} + {{j}}]", f"out[(t0 + {{j}}) * {n} + r0 + {{i}}]", ng, v, "        ")}"""


def csr_qconv1x1_source(cout: int, cin: int, p: int, clamp: tuple[float, float] | None = None,
                        out_q: tuple[float, int, int, int] | None = None, dequantized: bool = False,
                        float_bias: bool = False, v: int = QCSR_TILE, dot: str = "ubsw") -> str:
    """The int8 pointwise conv (x int8 [Cin, P] as NCHW stores it -> out [Cout, P]) with its weight in pair CSR
    (`csr_qpairs` with tile v), P >= v: each task stages its v pixels of every input channel as int16 (per 16: one
    load, sign extension and shuffle into `QCSR_SLOT` order; NCHW rows already are the tokens' vectors), sums each
    output channel's nonzero pairs (`_qcsr_rows`), and stores the v outputs with the dense int8 kernel's epilogue
    (bias, clamp, the next quantize or its dequantized floats; `_tile_store`). Tasks are tile-minor, so the
    threads split the output channels, as in the dense kernel (`int8.quad_chunks`; 1280x320x49 at 90% 55 -> 43
    us, others within 5%)."""
    from graphopt.targets.tvm.cpu.int8 import _tile_store
    tiles = -(-p // v)
    groups = _qcsr_groups(tiles, cout)
    bias_arg = f' bias: T.Buffer(({cout},), "float32"),' if float_bias else ""
    c0 = f"T.min((t % {tiles}) * {v}, {p - v})"
    r0, r1 = f"(t // {tiles}) * {cout} // {groups}", f"(t // {tiles} + 1) * {cout} // {groups}"
    store = _tile_store("r", c0, v // 8, p, clamp, out_q, dequantized, float_bias, " " * 12, row="0")
    stage = "".join(f"""
            xs[T.ramp(kk * {v} + {h}, 1, 16)] = T.Shuffle([T.Cast("int16x16", x[T.ramp(kk * {p} + {c0} + {h}, 1, 16)])], {QCSR_SLOT})"""
                    for h in range(0, v, 16))
    return f"""
@T.prim_func(private=True)
def csr_qconv1x1(x: T.Buffer(({cin * p},), "int8"), pw: T.Buffer(("npairs",), "int32"),
                 cols: T.Buffer(("ncols",), "int32"), ptr: T.Buffer(({cout + 1},), "int64"),
                 off: T.Buffer(({cout},), "int32"), mult: T.Buffer(({cout},), "float32"),{bias_arg}
                 qp: T.Buffer((4,), "float32"),
                 out: T.Buffer(({cout * p},), "{'int8' if out_q and not dequantized else 'float32'}")):
    T.func_attr({{"tirx.noalias": True, "tirx.is_scheduled": True, "op_pattern": 8}})
    for t in T.parallel({tiles * groups}):
        xs = T.decl_buffer(({cin * v},), "int16", scope="global")
        acc = T.decl_buffer(({v},), "int32", scope="global")
        for kk in T.serial({cin}):{stage}
{_qcsr_rows(r0, r1, v, " " * 8, dot)}{store}
"""


def emit_csr_qlinear(bb, xq, wq, w_scales, bias, sx: float, zx: int, x_shape, dot: str = "ubsw"):
    """qlinear of xq int8 [..., K] (at least 16 rows) with a constant int8 weight [N, K] (numpy, mostly zeros) on
    the int8 CSR kernel -> float32 [..., N]; dot: the target's `int8_dot` ("vnni": `vpdpwssd`)."""
    import math

    import numpy as np
    from tvm import relax

    from graphopt.targets.tvm.cpu.int8 import MR, epilogue_constants

    lead, k = tuple(int(d) for d in x_shape[:-1]), int(x_shape[-1])
    m, n = math.prod(lead), int(wq.shape[0])
    w = np.ascontiguousarray(wq, np.int8)
    pw, cols, ptr = csr_qpairs(w, qcsr_tile(m))
    off, mult, fb = epilogue_constants(w, w_scales, bias, sx, zx, -(-n // MR))
    src = csr_qlinear_source(m, k, n, fb is not None, dot)
    name = f"csr_qlinear{'_vnni' if dot == 'vnni' else ''}_{m}x{k}x{n}_pairs{len(pw)}"
    gv = bb.add_func(parse_kernel(src), name)
    consts = qcsr_weight_consts(pw, cols, ptr) + [relax.const(v[:n]) for v in (off, mult, fb) if v is not None]
    y = bb.emit(relax.call_tir(gv, [bb.emit(relax.op.reshape(xq, (m * k,))), *consts],
                               relax.TensorType((m * n,), "float32")))
    return bb.emit(relax.op.reshape(y, (*lead, n)))
