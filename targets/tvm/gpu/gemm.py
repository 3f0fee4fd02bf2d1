"""Multistage tensor-core linears: y [cols, n] = x [cols, k] @ W[n, k]^T on `mma.sync` (dense) or `mma.sp` (2:4),
with the weight packed in fragment order at compile time (sparse.pack_dense_fragments / pack_fragments).

The design of the one-stage kernel this replaced (activation tiles in shared memory, fragment-packed weights, one
barrier a stage), rebuilt around the memory pipeline it lacked:
- every operand moves global -> shared by `cp.async` (16-byte copies, no registers held while they fly), `stages`
  buffers deep: stage s + stages - 1 is requested while stage s computes, with one barrier per stage;
- the weight fragments go to shared memory once per block (each warp along the columns used to load its own copy
  from global memory) and come back as one conflict-free 16-byte load a lane;
- the activations' B fragments come from shared memory by `ldmatrix.x4`: four registers (two dense instruction
  steps, or one sparse) in one instruction, where the old kernel issued one 32-bit load a register. A column's row of
  `words` 32-bit words is padded to words + 4, which puts the 8 rows each ldmatrix phase reads in 8 different groups
  of 4 banks (conflict-free) and keeps the rows 16-byte aligned.

Register layout per lane as in sparse.py's helpers: A (the weight tile) by a_coords, B by b_coords (word t + 4 r of
column g for every format: fp16 packs 2 inputs a word, int8 4, and the instruction's k covers 8 words of a column
dense, 16 sparse), C/D by c_coords. ldmatrix (m8n8, b16, not transposed) gives lane L row L // 4, 32-bit word L % 4
of each 8 x 4-word matrix, whose row addresses lanes 8 q .. 8 q + 7 supply: with row = column g of the tile and
matrix q = words 4 q .. 4 q + 3, register q of lane L is word L % 4 + 4 q of column L // 4 -- B register q.
"""
from __future__ import annotations

from graphopt.errors import TargetError
from graphopt.targets.tvm.gpu.sparse import TILE_M, TILE_N, c_coords, dense_fmt_of, fmt_of, tc_prim_func

# (row tiles of 16 per warp, column tiles of 8 per warp, warps along rows, warps along columns, instruction k-steps
# per stage, stages)
DEFAULT_PIPELINE = (4, 8, 2, 2, 2, 4)
# The most dynamic shared memory one block may opt into on sm_86 and sm_89 (99 KiB; sm_80 163, sm_90 227): one
# kernel binary serves every arch of a build, so every tile shape must fit the smallest.
SMEM_LIMIT = 99 * 1024


def ldsm_row(lane, st, ws: int):
    """(column within an 8-column tile, first 32-bit word) of the 16-byte row whose address `lane` gives the
    ldmatrix.x4 of instruction step st (ws words a step): lanes 8 q .. 8 q + 7 address matrix q's 8 rows, the
    columns, at words 4 q .. 4 q + 3 past the step's first word. Works on python ints and TIR expressions."""
    return lane % 8, st * ws + (lane // 8) * 4


def ldsm_register(lane: int, q: int, row_addr) -> tuple[int, int]:
    """What ldmatrix.m8n8.x4.b16 (not transposed) puts in register q of `lane` (PTX ISA, ldmatrix fragment layout):
    32-bit word lane % 4 of row lane // 4 of matrix q, whose row address lane 8 q + lane // 4 supplied;
    row_addr(l) = (column, first word) that lane l supplied. Returns (column, word)."""
    col, word = row_addr(8 * q + lane // 4)
    return col, word + lane % 4


def raster(pid, grid_n: int, grid_c: int, group: int, minimum=min):
    """(row block, column block) of block `pid` in the grouped raster: groups of `group` row blocks (the last one
    smaller when group does not divide grid_n), walked row block first, then column, so that the blocks in flight
    together share both their weight rows and their activation columns in L2. Python ints or TIR expressions
    (minimum=T.min)."""
    first = pid // (group * grid_c) * group
    size = minimum(grid_n - first, group)
    return first + pid % (group * grid_c) % size, pid % (group * grid_c) // size


def pipeline_fit(cols: int, k: int, n: int, sparse: bool, fmt: str, tiles: tuple) -> str:
    """'' when the multistage kernel takes this GEMM with these tiles; else why not."""
    f = fmt_of(fmt) if sparse else dense_fmt_of(fmt)
    if len(tiles) not in (6, 7) or min(tiles[:6]) < 1 or min(tiles) < 0:
        return (f"tiles {tiles}: give (row tiles per warp, column tiles per warp, row warps, column warps, "
                "k-steps per stage, stages[, raster group]), all >= 1 (the group >= 0)")
    mt, j, wn, wc, ks, stages = tiles[:6]
    ws = f.tile_k // f.per_reg  # words of a column one instruction consumes
    if (ks * ws) % 16:
        return f"tiles {tiles}: a stage must cover whole ldmatrix.x4 loads (k-steps x {ws} words a multiple of 16)"
    if stages < 2 or wn * wc > 16:
        return f"tiles {tiles}: needs 2+ stages and at most 16 warps"
    if n % TILE_M or k % (ks * f.tile_k):
        return (f"shape {cols}x{k}x{n}: needs output features % {TILE_M} == 0 and inputs % {ks * f.tile_k} == 0 "
                f"(one stage)")
    if smem_bytes(sparse, fmt, tiles) > SMEM_LIMIT:
        return (f"tiles {tiles}: {smem_bytes(sparse, fmt, tiles)} bytes of shared memory (at most {SMEM_LIMIT}: what "
                "an sm_86 / sm_89 block gets, the smallest of the archs a cuda build targets)")
    return ""


def smem_bytes(sparse: bool, fmt: str, tiles: tuple) -> int:
    f = fmt_of(fmt) if sparse else dense_fmt_of(fmt)
    mt, j, wn, wc, ks, stages = tiles[:6]
    words = ks * (f.tile_k // f.per_reg)
    per_stage = wc * j * TILE_N * (words + 4) + wn * mt * ks * 128 + (wn * mt * ks * 32 if sparse else 0)
    return 4 * stages * per_stage


def tc_kernel_pipelined(cols: int, k: int, n: int, bias: bool, fmt: str = "f16", sparse: bool = False,
                        tiles: tuple | None = None):
    """PrimFunc of the multistage tensor-core linear: dense (x, values, bias) -> y, or sparse (x, values, metadata,
    bias) -> y; x [cols, k] in the instruction's element type, y float32 (+ bias) or the int32 accumulator."""
    import tvm.backend.cuda  # noqa: F401  (registers T.ptx)
    from tvm.script import tirx as T

    tiles = tuple(tiles or DEFAULT_PIPELINE)
    why = pipeline_fit(cols, k, n, sparse, fmt, tiles)
    if why:
        raise TargetError(f"multistage tensor-core kernel: {why}")
    f = fmt_of(fmt) if sparse else dense_fmt_of(fmt)
    MT, J, WN, WC, KS, P = tiles[:6]
    G = tiles[6] if len(tiles) > 6 else 0  # row blocks per raster group (0: a plain 2-D grid)
    e = f.per_reg
    ws = f.tile_k // e  # words of a column per instruction step (8 dense, 16 sparse)
    bregs = ws // 4  # B registers per instruction
    W = KS * ws  # words of a column per stage
    stride = W + 4
    nt, kt = n // TILE_M, k // f.tile_k
    nstage = kt // KS
    BMT = WN * MT  # row tiles of a block
    BN = WC * J * TILE_N  # activation columns of a block
    threads = 32 * WN * WC
    grid_n, grid_c = (nt + BMT - 1) // BMT, (cols + BN - 1) // BN
    x_chunks, v_chunks, m_chunks = BN * W // 4, BMT * KS * 32, (BMT * KS * 8 if sparse else 0)
    x_size, v_size, m_size = BN * stride, BMT * KS * 128, BMT * KS * 32 if sparse else 0
    stage_words = x_size + v_size + m_size
    integer = f.name == "s8"
    reg_acc = "uint32" if integer else f.acc

    def result(acc_value, bias_value):
        if integer:
            return T.reinterpret("int32", acc_value)
        return acc_value + bias_value if bias else acc_value

    def cp16(dst, src, ok):
        return T.ptx["cp.async.cg.shared.global"](dst, src, 16, T.Cast("uint32", T.if_then_else(ok, 16, 0)))

    @T.macro
    def issue(sm, xb, wv, wm, bx, by, tid, s, buf):
        """cp.async of stage s (activations, weight values[, metadata]) into buffer buf."""
        base = buf * stage_words
        for it in T.unroll((x_chunks + threads - 1) // threads):
            if it * threads + tid < x_chunks:
                c = it * threads + tid
                col = by * BN + c // (W // 4)
                cp16(T.address_of(sm[base + (c // (W // 4)) * stride + (c % (W // 4)) * 4]),
                     T.address_of(xb[T.min(col, cols - 1), (s * W + (c % (W // 4)) * 4) * e]), col < cols)
        for it in T.unroll((v_chunks + threads - 1) // threads):
            if it * threads + tid < v_chunks:
                c = it * threads + tid
                tile = bx * BMT + c // (KS * 32)
                cp16(T.address_of(sm[base + x_size + c * 4]),
                     T.address_of(wv[T.min(tile, nt - 1), s * KS + (c // 32) % KS, c % 32, 0]),
                     tile < nt)
        if sparse:
            for it in T.unroll((m_chunks + threads - 1) // threads):
                if it * threads + tid < m_chunks:
                    c = it * threads + tid
                    tile = bx * BMT + c // (KS * 8)
                    cp16(T.address_of(sm[base + x_size + v_size + c * 4]),
                         T.address_of(wm[T.min(tile, nt - 1), s * KS + (c // 8) % KS, (c % 8) * 4]),
                         tile < nt)

    def mma(acc, a, bf, meta, m, j, st):
        q = (m * J + j) * 4
        ar = m * 4
        br = j * bregs
        if sparse:
            return T.ptx[f.ptx](acc[q], acc[q + 1], acc[q + 2], acc[q + 3], a[ar], a[ar + 1], a[ar + 2], a[ar + 3],
                                bf[br], bf[br + 1], bf[br + 2], bf[br + 3], acc[q], acc[q + 1], acc[q + 2],
                                acc[q + 3], meta[m], 0)
        return T.ptx[f.ptx](acc[q], acc[q + 1], acc[q + 2], acc[q + 3], a[ar], a[ar + 1], a[ar + 2], a[ar + 3],
                            bf[br], bf[br + 1], acc[q], acc[q + 1], acc[q + 2], acc[q + 3])

    ldsm = "ldmatrix.sync.aligned.m8n8.x4.shared.b16"

    @T.macro
    def compute(sm, buf, acc, a, bf, bf2, meta, wr, wcol, lane):
        base = buf * stage_words
        for st in T.unroll(KS):
            for m in T.unroll(MT):
                for r in T.vectorized(4):
                    a[m * 4 + r] = sm[base + x_size + ((wr * MT + m) * KS + st) * 128 + lane * 4 + r]
                if sparse:
                    meta[m] = sm[base + x_size + v_size + ((wr * MT + m) * KS + st) * 32 + lane]
            for j in T.unroll(J):
                if bregs == 4:  # sparse: one ldmatrix.x4 is the step's 4 registers
                    T.ptx[ldsm](bf[j * 4], bf[j * 4 + 1], bf[j * 4 + 2], bf[j * 4 + 3], T.address_of(
                        sm[base + (wcol * J * TILE_N + j * TILE_N + ldsm_row(lane, st, ws)[0]) * stride
                           + ldsm_row(lane, st, ws)[1]]))
                elif st % 2 == 0:  # dense: one ldmatrix.x4 holds this step's and the next step's 2 registers
                    T.ptx[ldsm](bf2[j * 4], bf2[j * 4 + 1], bf2[j * 4 + 2], bf2[j * 4 + 3], T.address_of(
                        sm[base + (wcol * J * TILE_N + j * TILE_N + ldsm_row(lane, st, ws)[0]) * stride
                           + ldsm_row(lane, st, ws)[1]]))
            if bregs == 2:
                for j in T.unroll(J):
                    for r in T.unroll(2):
                        bf[j * 2 + r] = bf2[j * 4 + (st % 2) * 2 + r]
            for m in T.unroll(MT):
                for j in T.unroll(J):
                    mma(acc, a, bf, meta, m, j, st)

    @T.macro
    def epilogue(acc, b, y, first, col0, lane):
        for m in T.unroll(MT):
            if first + m < nt:
                for j in T.unroll(J):
                    for i in T.unroll(4):
                        row = (first + m) * TILE_M + c_coords(lane, i)[0]
                        c = col0 + j * TILE_N + c_coords(lane, i)[1]
                        if c < cols:
                            y[c, row] = result(acc[(m * J + j) * 4 + i], b[row])

    @T.macro
    def body(xb, wv, wm, b, y):
        if G > 0:  # grouped raster: consecutive blocks walk G row blocks, then the next columns (L2 reuse of both)
            pid = T.launch_thread("blockIdx.x", grid_n * grid_c)
            bx = raster(pid, grid_n, grid_c, G, T.min)[0]
            by = raster(pid, grid_n, grid_c, G, T.min)[1]
        else:
            bx = T.launch_thread("blockIdx.x", grid_n)
            by = T.launch_thread("blockIdx.y", grid_c)
        lane = T.launch_thread("threadIdx.x", 32)
        warp = T.launch_thread("threadIdx.y", WN * WC)
        sm = T.alloc_buffer((P * stage_words,), "uint32", scope="shared.dyn")
        acc = T.alloc_buffer((MT * J * 4,), reg_acc, scope="local")
        a = T.alloc_buffer((MT * 4,), "uint32", scope="local")
        meta = T.alloc_buffer((MT,), "uint32", scope="local")
        bf = T.alloc_buffer((J * bregs,), "uint32", scope="local")
        bf2 = T.alloc_buffer((J * 4,), "uint32", scope="local")  # dense: two steps' B registers (one ldmatrix)
        wr = warp % WN
        wcol = warp // WN
        tid = warp * 32 + lane
        for i in T.unroll(MT * J * 4):
            acc[i] = T.Cast(reg_acc, 0)
        for s in T.unroll(P - 1):
            if s < nstage:
                issue(sm, xb, wv, wm, bx, by, tid, s, s)
            T.ptx["cp.async.commit_group"]()
        for s in range(nstage):
            T.ptx["cp.async.wait_group"](P - 2)
            T.tvm_storage_sync("shared")
            if s + P - 1 < nstage:
                issue(sm, xb, wv, wm, bx, by, tid, s + P - 1, (s + P - 1) % P)
            T.ptx["cp.async.commit_group"]()
            compute(sm, s % P, acc, a, bf, bf2, meta, wr, wcol, lane)
        epilogue(acc, b, y, bx * BMT + wr * MT, by * BN + wcol * J * TILE_N, lane)

    return tc_prim_func(body, cols, k, n, f, sparse)


def pipeline_tiles(cols: int, n: int, sparse: bool = False) -> tuple:
    """Tiles of the multistage kernel for a [cols, k] x [k, n] GEMM. On an H200 (2026-12-04, benchmarks/gpu_check.py
    --quick, two runs): 128 x 128 blocks of 64 x 64 warp tiles, 4 stages of two instruction steps (dense: 32 fp16 /
    64 int8 inputs; 2:4: 64 / 128), were the fastest at 2048^3, 4096^3 and 8192^3 or within the runs' 5% noise of
    it (3 or 5 stages, one-step 2:4 stages, 128 x 256 or 128 x 64 blocks measured slower); at MiniLM-L6 and
    MobileNetV2 sizes (<= 1536 on a side) 32 x 64 blocks, which give the GPU's 132 SMs enough blocks, beat the
    larger ones by 1-64%. The 1024 threshold lies between the sizes measured. A grouped raster (the optional 7th
    entry) is not picked: groups of 8 row blocks ran the dense 8192^3 9% faster in one run and 10% slower in the next
    (run-to-run spread there is about 10%), and were within noise at 2048^3 and 4096^3 and for 2:4."""
    if cols >= 1024 and n >= 1024:  # 2:4: 3 stages (4 need 112 KiB, past SMEM_LIMIT; measured within 3% of them)
        return (4, 8, 2, 2, 2, 3 if sparse else 4)
    return (1, 4, 2, 2, 1 if sparse else 2, 4)


def emit_tc(bb, x, w, bias, cols: int, fmt: str = "f16", sparse: bool = False, tiles: tuple | None = None):
    """call_tir of the multistage tensor-core linear with the weight packed in fragment order as constants; x is
    [cols, k] (cast to the instruction's element type for fp16/bf16; int8 as is), y [cols, n] float32 (+ bias) or
    the int32 accumulator. The caller checked the weight fits (sparse.dense_tc_applies / sp24_applies)."""
    from graphopt.targets.tvm.gpu.sparse import emit_tc_call
    n, k = w.shape
    tiles = tuple(tiles or pipeline_tiles(cols, n, sparse))
    return emit_tc_call(bb, tc_kernel_pipelined(cols, k, n, bias is not None, fmt, sparse, tiles),
                        f"graphopt_{'sp24' if sparse else 'tc'}_{fmt}_{cols}x{k}x{n}", x, w, bias, cols, fmt, sparse)
