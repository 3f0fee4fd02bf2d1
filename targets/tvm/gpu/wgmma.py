"""Hopper dense linears on `wgmma.mma_async` (sm_90a only): y [cols, n] = x [cols, k] @ W[n, k]^T, fp16 or bf16
(fp32 accumulation) or int8 (int32).

A block is `warpgroups` groups of 4 warps; each warpgroup computes 64 weight rows x `n_block` activation columns with
one m64nNk16 (int8: k32) instruction a k-step. A (the weight) comes from registers: the fragment-packed weight of
sparse.pack_dense_fragments is exactly each warp's 16-row slice of wgmma's register A (the mma.sync m16n8k16 / k32
A layout), staged through shared memory by cp.async and read as one 16-byte load a lane. B (the activations) stays in
shared memory, read by the tensor cores through a matrix descriptor: K-major without swizzle, i.e. core matrices of
8 columns x 16 bytes (8 fp16 / 16 int8 inputs) stored as 128 contiguous bytes, the next 16 bytes of inputs one core
matrix on (LBO = 128 B), the next 8 columns a stage's worth of core matrices on (SBO). The accumulator of each warp
is the mma.sync C layout per 8-column chunk (c_coords). cp.async writes through the generic proxy, so each stage
fences (fence.proxy.async) before the barrier that hands it to wgmma's async proxy. Stages are pipelined: stage
s + stages - 2 is copied in while stage s's wgmmas are issued and stage s - 1's may still run (one group in flight,
two A register sets); the 128-byte swizzle (tiles[4]) stores a column's 128 bytes as one row of a 1 KiB atom.

2:4 (sparse=True, `wgmma.mma_async.sp`, registered into TVM's T.ptx table by register_sparse_wgmma): the same
kernel with the weight in sparse.pack_fragments' layout -- a warp's compressed 16 x (tile_k / 2) values are its
register A (the mma.sp A layout), its metadata word the sp-meta operand (selector 0) -- and k-steps of 32 fp16 / 64
int8 inputs, 64 bytes of an activation column, so 2 k-steps a stage fill the swizzle's 128-byte rows. sm_90a
`cuda-sparse` builds run it for 2:4 linears the cost table (sparse.COST_TABLE_WGMMA) gives a gain. On an H200
(2026-12-04, benchmarks/results/gpu_check_h200_s51*.json, two runs) it was correct (fp16 within fp16 rounding, int8
exact) and 1.15-1.16x / 1.18-1.22x / 1.23-1.25x as fast as the dense wgmma kernel at 2048^3 / 4096^3 / 8192^3
(fp16 and int8 alike); a whole sm_90a MLP with two 2:4 2048 x 2048 linears on 1024 tokens ran 1.11x (fp16) and
1.06x (int8) as fast as its dense build.

Used by the build for `--cuda-arch sm_90a` (H100/H200 only): dense linears whose shape fits (wg_applies) run it
at the tiles of wg_tiles. On an H200 (2026-12-04, benchmarks/results/gpu_check_h200_s50*.json) it was correct (fp16
within fp16 rounding of fp32 PyTorch, int8 exact) and at 2048^3-8192^3 fp16 1.17-1.41x cuBLAS's time (gemm.py's
mma.sync kernel: 1.9-2.1x), int8 0.76-0.82x torch._int_mm's. Without the swizzle the same tiles ran 1.9-2x slower
(bank conflicts of the tensor cores' B reads).
"""
from __future__ import annotations

from graphopt.errors import TargetError
from graphopt.targets.tvm.gpu.sparse import TILE_M, c_coords, dense_fmt_of, tc_prim_func

WG_DEFAULT = (2, 128, 4, 3, 1)  # (warpgroups, activation columns a block = wgmma N, k-steps a stage, stages, swizzle)
WG_SPARSE_DEFAULT = (2, 128, 2, 3, 1)  # 2:4: a k-step reads 64 bytes of a column, so 2 a stage fill the swizzle row
# The build's tiles (wg_tiles): the largest block that still gives MIN_BLOCKS blocks. Measured on an H200
# (2026-12-04, benchmarks/results/gpu_check_h200_s50_explore2.json; 2 x 128 columns in two runs): at 2048^3-8192^3
# two warpgroups of 64 rows x 256 columns, 4 stages, were the fastest fp16 tiles (1.17-1.41x cuBLAS; 2 x 128
# columns 1.41-1.66x, 4 x 128 1.26-1.53x, 5 or 6 stages slower), four warpgroups x 128 columns the fastest int8
# ones (0.76-0.82x torch._int_mm); on MiniLM-L6's GEMMs (128 activation rows, 48 or fewer blocks at any tile) one
# warpgroup x 16 columns was fastest or within 0.5 us of it.
WG_LARGE = {"f16": (2, 256, 4, 4, 1), "bf16": (2, 256, 4, 4, 1), "s8": (4, 128, 4, 4, 1)}
WG_SMALLER = ((2, 128, 4, 3, 1), (1, 64, 4, 3, 1), (1, 32, 4, 3, 1), (1, 16, 4, 4, 1))
MIN_BLOCKS = 64  # about half the SMs of an H100/H200 (114-132): fewer blocks leave the GPU idle
_PTX_TYPE = {"f16": "f16", "bf16": "bf16"}


def wg_blocks(cols: int, n: int, tiles: tuple) -> int:
    """Thread blocks the kernel launches for a [cols, k] x [k, n] GEMM."""
    wgs, bn = tiles[:2]
    return -(-n // (TILE_M * 4 * wgs)) * -(-cols // bn)


def wg_tiles(cols: int, n: int, fmt: str = "f16", sparse: bool = False) -> tuple:
    """The build's tiles for the GEMM: the first of WG_LARGE[fmt], WG_SMALLER giving >= MIN_BLOCKS blocks (else the
    smallest). 2:4: the same blocks with 2 k-steps a stage (the swizzle's 128 bytes of a column), also the fastest
    2:4 tiles measured (2 x 256 columns fp16, 4 x 128 int8; 4 x 128 with 5 stages and 2 x 128 slower)."""
    cands = (WG_LARGE[dense_fmt_of(fmt).name], *WG_SMALLER)
    if sparse:
        cands = tuple((*t[:2], 2, *t[3:]) for t in cands)
    return next((t for t in cands if wg_blocks(cols, n, t) >= MIN_BLOCKS), cands[-1])


def wg_applies(n: int, k: int, fmt: str = "f16") -> str:
    """'' when the wgmma kernel (at 4 k-steps a stage, which the swizzle takes) can take a weight [n, k]; else why."""
    f = dense_fmt_of(fmt)
    if n % TILE_M or k % (4 * f.tile_k):
        return f"shape {n}x{k}: the wgmma kernel needs rows % {TILE_M} == 0 and inputs % {4 * f.tile_k} == 0"
    return ""


def emit_wgmma(bb, x, w, bias, cols: int, fmt: str = "f16", tiles: tuple | None = None, sparse: bool = False):
    """call_tir of the wgmma linear with the weight packed in fragment order as constants (the caller checked
    wg_applies; sparse: the 2:4 kernel, the caller also checked sparse.sp24_applies); x [cols, k] (cast to the
    instruction's type unless int8), y [cols, n] float32 (+ bias) or the int32 accumulator."""
    from graphopt.targets.tvm.gpu.sparse import emit_tc_call
    n, k = w.shape
    tiles = tuple(tiles or wg_tiles(cols, n, fmt, sparse))
    return emit_tc_call(bb, wgmma_kernel(cols, k, n, bias is not None, fmt, tiles, sparse),
                        f"graphopt_wgmma{'_sp24' if sparse else ''}_{fmt}_{cols}x{k}x{n}", x, w, bias, cols, fmt,
                        sparse)


def b_chunk(c, chunks: int, swizzle: bool = False):
    """(column within the block, 16-byte chunk along k, byte offset in the stage's B area) of cp.async chunk c of a
    stage with `chunks` 16-byte chunks a column. Consecutive threads take 8 columns' same chunk, then the next chunk
    (each column's bytes in whole 32-byte sectors). Without swizzle the 8 columns' chunk is one 128-byte core matrix;
    with the 128-byte swizzle (chunks == 8) a column's 128 bytes are one row of a 1 KiB atom of 8 columns, its chunk
    j stored at j XOR (column % 8) -- conflict-free stores either way."""
    group, kw, row = c // (8 * chunks), c // 8 % chunks, c % 8
    if swizzle:
        return group * 8 + row, kw, group * 1024 + row * 128 + (kw ^ row) * 16
    return group * 8 + row, kw, (group * chunks + kw) * 128 + row * 16


def b_read(col: int, kbyte: int, step: int, chunks: int, swizzle: bool = False, step_bytes: int = 32) -> int:
    """Byte offset in the stage's B area at which wgmma reads byte kbyte (of step_bytes: 32 dense, 64 for 2:4, whose
    k-step covers twice the inputs) of column col at k-step `step`, per the descriptor the kernel encodes. No swizzle
    (K-major core matrices): start (the step's first core matrix) + (col // 8) SBO + (col % 8) 16 + (kbyte // 16)
    LBO + kbyte % 16 with LBO = 128, SBO = chunks 128. 128-byte swizzle: start + step step_bytes, rows of 128 B,
    SBO 1 KiB, and the hardware XORs address bits 4-6 (the 16-byte chunk) with bits 7-9 (the row within the 1
    KiB-aligned atom)."""
    byte = step * step_bytes + kbyte
    if swizzle:
        return (col // 8) * 1024 + (col % 8) * 128 + (((byte // 16) ^ (col % 8)) * 16) + byte % 16
    return (col // 8) * chunks * 128 + (col % 8) * 16 + (byte // 16) * 128 + byte % 16


def _formats(fmt: str, sparse: bool):
    from graphopt.targets.tvm.gpu.sparse import fmt_of
    return fmt_of(fmt) if sparse else dense_fmt_of(fmt)


def wg_fit(cols: int, k: int, n: int, fmt: str, tiles: tuple, sparse: bool = False) -> str:
    """'' when the wgmma kernel takes this GEMM with these tiles; else why not. (2:4: a k-step is 32 fp16 / 64 int8
    inputs, 64 bytes of a column, so the 128-byte swizzle takes 2 k-steps a stage.)"""
    f = _formats(fmt, sparse)
    if len(tiles) not in (4, 5) or min(tiles) < 0 or min(tiles[:4]) < 1:
        return f"tiles {tiles}: give (warpgroups, columns a block, k-steps a stage, stages[, swizzle]), all >= 1"
    wgs, bn, ks, stages = tiles[:4]
    if bn % 8 or not 8 <= bn <= (224 if f.name == "s8" else 256) or stages < 3 or wgs > 4:
        return f"tiles {tiles}: wgmma takes 8-256 columns in steps of 8 (int8 at most 224), 3+ stages, <= 4 groups"
    if f.name == "s8" and bn > 32 and bn % 16:
        return f"tiles {tiles}: int8 wgmma takes 8, 16, 24, 32 columns, then multiples of 16"
    if len(tiles) > 4 and tiles[4] and ks * (64 if sparse else 32) != 128:
        return (f"tiles {tiles}: the 128-byte swizzle takes {2 if sparse else 4} k-steps a stage (128 bytes a "
                "column)")
    if n % TILE_M or k % (ks * f.tile_k):
        return f"shape {cols}x{k}x{n}: needs output features % 16 == 0 and inputs % {ks * f.tile_k} == 0"
    if wg_smem_bytes(tiles, sparse) > 200 * 1024:
        return f"tiles {tiles}: {wg_smem_bytes(tiles, sparse)} bytes of shared memory (at most 200 KiB)"
    return ""


def _stage_words(tiles: tuple, sparse: bool) -> tuple[int, int, int, int]:
    """Words of a stage: (activations, weight values, 2:4 metadata, the whole stage rounded to 1 KiB)."""
    wgs, bn, ks = tiles[:3]
    x_words = bn * ks * (64 if sparse else 32) // 4
    v_words = wgs * 4 * ks * 128
    m_words = wgs * 4 * ks * 32 if sparse else 0
    return x_words, v_words, m_words, -(-(x_words + v_words + m_words) // 256) * 256


def wg_smem_bytes(tiles: tuple, sparse: bool = False) -> int:
    return tiles[3] * _stage_words(tiles, sparse)[3] * 4 + 1024  # + 1 KiB to align the stages for the swizzle


_SPARSE_REGISTERED: list = []


def register_sparse_wgmma() -> None:
    """TVM 0.27's T.ptx table leaves out `wgmma.mma_async.sp` (its comment: "NOT REGISTERED"); graphopt adds the
    register-A forms (fp16/bf16 m64nNk32 with fp32 accumulation, int8 m64nNk64 with int32) to the table and to the
    T.ptx namespace, once. The operands follow PTX ISA 9.7.15.6.3: d, a, b-desc, sp-meta, sp-sel, scale-d[,
    imm-scale-a, imm-scale-b, imm-trans-b]."""
    if _SPARSE_REGISTERED:
        return
    import tvm.backend.cuda  # noqa: F401  (registers T.ptx)
    from tvm.backend.cuda.ptx import engine
    from tvm.backend.cuda.ptx import table as tb
    from tvm.script import tirx as T
    if "graphopt_wgmma_sp_f16_rs" in tb.TABLE:  # a re-imported module
        _SPARSE_REGISTERED.append(True)
        return
    head = (tb.ModifierSlot("action", ("mma_async",)), tb.ModifierSlot("sp", ("sp",)),
            tb.ModifierSlot("sync", ("sync",)), tb.ModifierSlot("aligned", ("aligned",)))

    def entry(name, k, ns, dtype, carrier, types, sels, tail=()):
        return tb.InstructionEntry(
            name=name, mnemonic="wgmma", cert_arch="sm_90a",
            slots=(*head, tb.ModifierSlot("shape", tuple(f"m64n{n}k{k}" for n in ns)),
                   tb.ModifierSlot("dtype", (dtype,)), tb.ModifierSlot("atype", types),
                   tb.ModifierSlot("btype", types)),
            operands=(tb.OperandSlot("d", rw="rw", dtype=carrier, lanes=tb._wgmma_acc_lanes),
                      tb.OperandSlot("a", dtype="u32", lanes=4), tb.OperandSlot("b_desc", dtype="u64"),
                      tb.OperandSlot("sp_meta", dtype="u32"), tb.OperandSlot("sp_sel", kind="imm", choices=sels),
                      tb.OperandSlot("scale_d", dtype="pred"), *tail))
    fp = entry("graphopt_wgmma_sp_f16_rs", 32, tb._WGMMA_N_FULL, "f32", "f32", ("f16", "bf16"), ("0", "1"),
               (tb.OperandSlot("scale_a", kind="imm", choices=("-1", "1")),
                tb.OperandSlot("scale_b", kind="imm", choices=("-1", "1")),
                tb.OperandSlot("trans_b", kind="imm", choices=("0", "1"))))
    # (an .s32 accumulator rides a u32 carrier register, as in TVM's own int8 wgmma entries)
    s8 = entry("graphopt_wgmma_sp_s8_rs", 64, tb._WGMMA_N_S8, "s32", "u32", ("s8", "u8"), ("0",))
    try:
        families = T.ptx._by_family
    except AttributeError:
        raise TargetError("graphopt's 2:4 wgmma kernel adds wgmma.mma_async.sp to TVM's T.ptx table, whose layout "
                          "this TVM version changed: use the pinned apache-tvm") from None
    for e in (fp, s8):
        tb.TABLE[e.name] = e
        engine.register_table({e.name: e})
        families.setdefault(e.family, []).append((e, (None,) * len(e.slots)))
    _SPARSE_REGISTERED.append(True)


def wgmma_kernel(cols: int, k: int, n: int, bias: bool, fmt: str = "f16", tiles: tuple | None = None,
                 sparse: bool = False):
    """PrimFunc (x [cols, k], packed weight[, 2:4 metadata], bias) -> y [cols, n] for sm_90a. sparse: the weight is
    2:4 (sparse.pack_fragments: its compressed values are each warp's register A of wgmma.mma_async.sp, its
    metadata the sp-meta operand, selector 0)."""
    import tvm.backend.cuda  # noqa: F401  (registers T.ptx)
    from tvm.script import tirx as T
    f = _formats(fmt, sparse)
    tiles = tuple(tiles or (WG_SPARSE_DEFAULT if sparse else WG_DEFAULT))
    why = wg_fit(cols, k, n, fmt, tiles, sparse)
    if why:
        raise TargetError(f"wgmma kernel: {why}")
    if sparse:
        register_sparse_wgmma()
    WGS, BN, KS, P = tiles[:4]
    SW = bool(len(tiles) > 4 and tiles[4])  # 128-byte swizzle of the activation tile
    e = f.per_reg
    SB = 64 if sparse else 32  # bytes of a column a k-step: k16 fp16 / k32 int8; 2:4 k32 / k64
    BK = KS * SB  # bytes of a column a stage
    nt, kt = n // TILE_M, k // f.tile_k
    nstage = kt // KS
    BMT = WGS * 4  # row tiles of 16 a block
    threads = 128 * WGS
    grid_n, grid_c = (nt + BMT - 1) // BMT, (cols + BN - 1) // BN
    # activation words a stage (a multiple of 256: the swizzle's atoms stay 1 KiB-aligned), weight values, 2:4
    # metadata; stages are rounded up to 1 KiB
    x_words, v_words, m_words, stage_words = _stage_words(tiles, sparse)
    x_chunks, v_chunks, m_chunks = BN * BK // 16, BMT * KS * 32, BMT * KS * 8
    integer = f.name == "s8"
    reg_acc = "uint32" if integer else "float32"
    op = "wgmma.mma_async.sp.sync.aligned" if sparse else "wgmma.mma_async.sync.aligned"
    ptx = (f"{op}.m64n{BN}k{f.tile_k}.s32.s8.s8" if integer
           else f"{op}.m64n{BN}k{f.tile_k}.f32.{_PTX_TYPE[f.name]}.{_PTX_TYPE[f.name]}")
    NA = BN // 2  # accumulator registers a thread
    # descriptor fields (bytes): no swizzle: LBO the next core matrix along k, SBO the next 8 columns; 128-byte
    # swizzle: LBO unused (1), SBO one 1 KiB atom of 8 columns
    LBO, SBO, LAYOUT = (16, 1024, 1) if SW else (128, (BK // 16) * 128, 0)

    def cp16(dst, src, ok):
        return T.ptx["cp.async.cg.shared.global"](dst, src, 16, T.Cast("uint32", T.if_then_else(ok, 16, 0)))

    @T.macro
    def issue(sm, pad, xb, wv, wm, bx, by, tid, s, buf):
        base = pad + buf * stage_words
        for it in T.unroll((x_chunks + threads - 1) // threads):
            if it * threads + tid < x_chunks:
                c = it * threads + tid
                col = by * BN + b_chunk(c, BK // 16, SW)[0]
                cp16(T.address_of(sm[base + b_chunk(c, BK // 16, SW)[2] // 4]),
                     T.address_of(xb[T.min(col, cols - 1), (s * BK + b_chunk(c, BK // 16, SW)[1] * 16) // (4 // e)]),
                     col < cols)
        for it in T.unroll((v_chunks + threads - 1) // threads):
            if it * threads + tid < v_chunks:
                c = it * threads + tid
                tile = bx * BMT + c // (KS * 32)
                cp16(T.address_of(sm[base + x_words + c * 4]),
                     T.address_of(wv[T.min(tile, nt - 1), s * KS + (c // 32) % KS, c % 32, 0]), tile < nt)
        if sparse:  # the metadata: 4 lanes' words a chunk
            for it in T.unroll((m_chunks + threads - 1) // threads):
                if it * threads + tid < m_chunks:
                    c = it * threads + tid
                    tile = bx * BMT + c // (KS * 8)
                    cp16(T.address_of(sm[base + x_words + v_words + c * 4]),
                         T.address_of(wm[T.min(tile, nt - 1), s * KS + (c // 8) % KS, c % 8 * 4]), tile < nt)

    def wgmma(acc, a, desc, meta):
        args = [acc[i] for i in range(NA)] + [a[0], a[1], a[2], a[3], desc]
        args += [meta, 0, T.ptx.pred(1)] if sparse else [T.ptx.pred(1)]
        if integer:
            return T.ptx[ptx](*args)
        return T.ptx[ptx](*args, 1, 1, 0)

    @T.macro
    def stage(sm, pad, a, mt, acc, xb, wv, wm, bx, by, tid, wg, warp, lane, s, h):
        """Stage s (register set h = s % 2): its copies landed, the copies of stage s + P - 2 issued, its wgmmas
        issued on A registers of set h while stage s - 1's may still run, then stage s - 1 waited for."""
        T.ptx["cp.async.wait_group"](P - 3)
        T.ptx["fence.proxy.async.shared::cta"]()  # cp.async wrote through the generic proxy; wgmma reads async
        T.tvm_storage_sync("shared")
        if s + P - 2 < nstage:  # into the buffer of stage s - 2, whose wgmmas every warpgroup has waited for
            issue(sm, pad, xb, wv, wm, bx, by, tid, s + P - 2, (s + P - 2) % P)
        T.ptx["cp.async.commit_group"]()
        for st in T.unroll(KS):
            for r in T.vectorized(4):
                a[(h * KS + st) * 4 + r] = sm[pad + s % P * stage_words + x_words + ((wg * 4 + warp) * KS + st) * 128
                                              + lane * 4 + r]
            if sparse:
                mt[h * KS + st] = sm[pad + s % P * stage_words + x_words + v_words + ((wg * 4 + warp) * KS + st) * 32
                                     + lane]
        T.ptx["wgmma.fence.sync.aligned"]()
        for st in T.unroll(KS):
            wgmma(acc, _Slice(a, (h * KS + st) * 4),
                  desc_of(T, T.cuda.cvta_generic_to_shared(
                      T.address_of(sm[pad + s % P * stage_words + b_read(0, 0, st, BK // 16, SW, SB) // 4])),
                      LBO, SBO, LAYOUT), mt[h * KS + st])
        T.ptx["wgmma.commit_group.sync.aligned"]()
        T.ptx["wgmma.wait_group.sync.aligned"](1)

    @T.macro
    def body(xb, wv, wm, b, y):
        bx = T.launch_thread("blockIdx.x", grid_n)
        by = T.launch_thread("blockIdx.y", grid_c)
        tid = T.launch_thread("threadIdx.x", threads)
        sm = T.alloc_buffer((P * stage_words + 256,), "uint32", scope="shared.dyn")
        acc = T.alloc_buffer((NA,), reg_acc, scope="local")
        a = T.alloc_buffer((2 * KS * 4,), "uint32", scope="local")  # two stages' A: one in flight, one loading
        mt = T.alloc_buffer((2 * KS,), "uint32", scope="local")  # their 2:4 metadata (unused when dense)
        # words to the first 1 KiB boundary: the swizzle's atoms must be 1 KiB-aligned
        # (a multiple of 4 words, as dynamic shared memory is 16-byte aligned: the A loads stay 16-byte vectors)
        pad = T.Cast("int32", ((T.uint32(1024) - (T.cuda.cvta_generic_to_shared(T.address_of(sm[0])) & T.uint32(1023)))
                               & T.uint32(1023)) >> T.uint32(4)) * 4
        wg = tid // 128
        warp = tid % 128 // 32
        lane = tid % 32
        for i in T.unroll(NA):
            acc[i] = T.Cast(reg_acc, 0)
        for s in T.unroll(P - 2):
            if s < nstage:
                issue(sm, pad, xb, wv, wm, bx, by, tid, s, s)
            T.ptx["cp.async.commit_group"]()
        for s2 in range((nstage + 1) // 2):  # unrolled by two: the A register set is static
            for h in T.unroll(2):
                if s2 * 2 + h < nstage:
                    stage(sm, pad, a, mt, acc, xb, wv, wm, bx, by, tid, wg, warp, lane, s2 * 2 + h, h)
        T.ptx["wgmma.wait_group.sync.aligned"](0)
        row0 = (bx * BMT + wg * 4 + warp) * TILE_M
        for j in T.unroll(BN // 8):
            for i in T.unroll(4):
                if bx * BMT + wg * 4 + warp < nt:
                    if by * BN + j * 8 + c_coords(lane, i)[1] < cols:
                        y[by * BN + j * 8 + c_coords(lane, i)[1], row0 + c_coords(lane, i)[0]] = (
                            T.reinterpret("int32", acc[j * 4 + i]) if integer
                            else (acc[j * 4 + i] + b[row0 + c_coords(lane, i)[0]] if bias else acc[j * 4 + i]))

    return tc_prim_func(body, cols, k, n, f, sparse)


class _Slice:
    def __init__(self, buf, off):
        self.buf, self.off = buf, off

    def __getitem__(self, i):
        return self.buf[self.off + i]


def desc_of(T, saddr, lbo, sbo, layout):
    """The 64-bit shared-memory matrix descriptor: start address, leading and stride byte offsets (each in 16-byte
    units), layout (bits 62-63: 0 none, 1 the 128-byte swizzle); base offset 0 (the kernel aligns its atoms)."""
    return (T.Cast("uint64", (saddr >> 4) & T.uint32(0x3FFF))
            | (T.uint64(lbo >> 4) << T.uint64(16)) | (T.uint64(sbo >> 4) << T.uint64(32))
            | (T.uint64(layout) << T.uint64(62)))
