"""2:4 structured-sparse linears on NVIDIA sparse tensor cores (PTX `mma.sp.m16n8k32`, fp16 in, fp32 accumulate).

The weight W[N, K] (2 nonzeros in every 4 consecutive inputs) is the sparse operand A of the instruction, the
activations are B, so Y^T[N, T] = W[N, K] @ X^T[K, T]. At compile time W is compressed to its nonzero values
[N, K/2] and 2-bit positions, and both are laid out in *fragment order*: for each 16x32 tile of W, lane l of the warp
finds its four A registers and its metadata register at [tile, l], one 16-byte and one 4-byte load.

Fragment layout (PTX ISA, "Matrix fragments for sparse mma.m16n8k32 with .f16"), with g = lane // 4 and
t = lane % 4 -- written once below and used by the packer, the CPU reference and the TIR kernel alike:
- A (compressed 16x16): register r holds the pair of columns 2t + 8 (r // 2), +1 of row g + 8 (r % 2).
- metadata (sparsity selector 0: lanes with t = 0, 1 supply it): bits 0-15 hold row g, bits 16-31 row g + 8, of
  input columns 16 t .. 16 t + 15; each 4-column chunk is one nibble, the first kept position in its low 2 bits.
- B (32x8, column-major): register r holds rows 2t + 8 r, +1 of column g.
- C/D (16x8): element i is row g + 8 (i // 2), column 2t + i % 2.
"""
from __future__ import annotations

import numpy as np

from graphopt.errors import TargetError

TILE_M, TILE_N, TILE_K = 16, 8, 32  # the instruction's shape (M: weight rows, N: activation columns)
WARPS = 4  # warps per block, each on its own 16 weight rows
COLS_PER_WARP = 4  # 8-column tiles each warp computes (32 activation columns)

# -- the fragment layout, for python ints and TIR expressions alike --------------------------------------------------


def a_coords(lane, r):
    """(row, first compressed column) of A register r of `lane` within a 16x16 compressed tile."""
    return lane // 4 + 8 * (r % 2), 2 * (lane % 4) + 8 * (r // 2)


def b_coords(lane, r):
    """(first k row, column) of B register r of `lane` within a 32x8 tile."""
    return 2 * (lane % 4) + 8 * r, lane // 4


def c_coords(lane, i):
    """(row, column) of accumulator element i of `lane` within a 16x8 tile."""
    return lane // 4 + 8 * (i // 2), 2 * (lane % 4) + i % 2


# -- 2:4 compression and fragment packing (numpy, at compile time) ---------------------------------------------------


def is_24(w: np.ndarray) -> bool:
    """Whether every 4 consecutive inputs of every row hold at most 2 nonzeros."""
    n, k = w.shape
    if k % 4:
        return False
    return bool(((w.reshape(n, k // 4, 4) != 0).sum(-1) <= 2).all())


def compress_24(w: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(values [N, K/2], positions [N, K/4, 2] ascending) of a 2:4 weight. A chunk with fewer than 2 nonzeros keeps
    zeros at unused positions (positions always differ: equal pairs are invalid metadata)."""
    n, k = w.shape
    if not is_24(w):
        raise TargetError("weight is not 2:4 sparse along its input dimension (more than 2 nonzeros in some group of "
                          "4); run sparsify-nm{n=2 m=4} first")
    chunks = w.reshape(n, k // 4, 4)
    nz = chunks != 0
    # rank positions: nonzeros first (in order), then zeros; keep the first two, sorted
    order = np.argsort(~nz, axis=-1, kind="stable")[..., :2]
    pos = np.sort(order, axis=-1)
    vals = np.take_along_axis(chunks, pos, axis=-1).reshape(n, k // 2)
    return vals, pos.astype(np.uint8)


def decompress_24(vals: np.ndarray, pos: np.ndarray, k: int) -> np.ndarray:
    n = vals.shape[0]
    out = np.zeros((n, k // 4, 4), dtype=vals.dtype)
    np.put_along_axis(out, pos.astype(np.int64), vals.reshape(n, k // 4, 2), axis=-1)
    return out.reshape(n, k)


def _half_bits(x: np.ndarray) -> np.ndarray:
    return x.astype(np.float16).view(np.uint16).astype(np.uint32)


def pack_fragments(w: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """W [N, K] (2:4, N % 16 == 0, K % 32 == 0) -> (values uint32 [N/16, K/32, 32, 4], metadata uint32 [N/16, K/32,
    32]) in the order the kernel's lanes load them."""
    n, k = w.shape
    if n % TILE_M or k % TILE_K:
        raise TargetError(f"a 2:4 tensor-core weight needs rows % {TILE_M} == 0 and inputs % {TILE_K} == 0, got {n}x{k}")
    vals, pos = compress_24(w)
    nt, kt = n // TILE_M, k // TILE_K
    vt = vals.reshape(nt, TILE_M, kt, TILE_K // 2).transpose(0, 2, 1, 3)  # [nt, kt, 16, 16] compressed tiles
    nib = (pos[..., 0] | (pos[..., 1] << 2)).astype(np.uint32)  # [N, K/4]
    nt_ = nib.reshape(nt, TILE_M, kt, TILE_K // 4).transpose(0, 2, 1, 3)  # [nt, kt, 16 rows, 8 chunks]
    wv = np.zeros((nt, kt, 32, 4), np.uint32)
    wm = np.zeros((nt, kt, 32), np.uint32)
    for lane in range(32):
        for r in range(4):
            row, col = a_coords(lane, r)
            wv[:, :, lane, r] = _half_bits(vt[:, :, row, col]) | (_half_bits(vt[:, :, row, col + 1]) << 16)
        g, half = lane // 4, (lane % 4) % 2  # lanes t = 2, 3 repeat t = 0, 1 (selector 0 reads t = 0, 1)
        for row, shift in ((g, 0), (g + 8, 16)):
            word = np.zeros((nt, kt), np.uint32)
            for c in range(4):
                word |= nt_[:, :, row, 4 * half + c] << (4 * c)
            wm[:, :, lane] |= word << shift
    return wv, wm


def unpack_fragments(wv: np.ndarray, wm: np.ndarray) -> np.ndarray:
    """The dense fp16 weight a packed (values, metadata) pair stands for, read the way the hardware reads the lanes'
    registers (the CPU reference of the layout)."""
    nt, kt = wv.shape[:2]
    out = np.zeros((nt, kt, TILE_M, TILE_K), np.float16)
    for lane in range(32):
        g, t = lane // 4, lane % 4
        regs = {}
        for r in range(4):
            row, col = a_coords(lane, r)
            regs[(row, col)] = (wv[:, :, lane, r] & 0xFFFF).astype(np.uint16).view(np.float16)
            regs[(row, col + 1)] = (wv[:, :, lane, r] >> 16).astype(np.uint16).view(np.float16)
        for (row, col), v in regs.items():
            chunk, which = col // 2, col % 2  # compressed column -> chunk of 4 inputs, first or second kept value
            meta_lane = 4 * (row % 8) + chunk // 4  # lane t = 0 holds inputs 0-15, t = 1 inputs 16-31
            shift = (16 if row >= 8 else 0) + 4 * (chunk % 4) + 2 * which
            p = (wm[:, :, meta_lane] >> shift) & 3
            for q in range(4):
                sel = p == q
                out[:, :, row, 4 * chunk + q][sel] = v[sel]
        del g, t
    return out.transpose(0, 2, 1, 3).reshape(nt * TILE_M, kt * TILE_K)


def mma_sp_reference(a: np.ndarray, b: np.ndarray, c: np.ndarray, e: np.ndarray) -> np.ndarray:
    """One warp's mma.sp.m16n8k32 (selector 0) on per-lane registers: a [32, 4] and b [32, 4] uint32 (two fp16
    each), c [32, 4] float32, e [32] uint32 -> d [32, 4] float32."""
    wa = unpack_fragments(a.reshape(1, 1, 32, 4), e.reshape(1, 1, 32)).astype(np.float32)  # [16, 32]
    bm = np.zeros((TILE_K, TILE_N), np.float32)
    for lane in range(32):
        for r in range(4):
            k0, col = b_coords(lane, r)
            bm[k0, col] = np.uint16(b[lane, r] & 0xFFFF).view(np.float16)
            bm[k0 + 1, col] = np.uint16(b[lane, r] >> 16).view(np.float16)
    prod = wa @ bm
    d = np.empty((32, 4), np.float32)
    for lane in range(32):
        for i in range(4):
            row, col = c_coords(lane, i)
            d[lane, i] = c[lane, i] + prod[row, col]
    return d


def sp24_linear_reference(x: np.ndarray, wv: np.ndarray, wm: np.ndarray, bias: np.ndarray | None) -> np.ndarray:
    """The kernel's loops on the CPU, lane by lane with the kernel's own index maps: x [T, K] float32 -> [T, N]."""
    tcols, k = x.shape
    nt, kt = wv.shape[:2]
    y = np.zeros((tcols, nt * TILE_M), np.float32)
    xh = x.astype(np.float16)
    for n0 in range(nt):
        for c0 in range(0, tcols, TILE_N):
            acc = np.zeros((32, 4), np.float32)
            for k0 in range(kt):
                b = np.zeros((32, 4), np.uint32)
                for lane in range(32):
                    for r in range(4):
                        kk, col = b_coords(lane, r)
                        if c0 + col < tcols:
                            pair = xh[c0 + col, 32 * k0 + kk: 32 * k0 + kk + 2].view(np.uint16).astype(np.uint32)
                            b[lane, r] = pair[0] | (pair[1] << 16)
                acc = mma_sp_reference(wv[n0, k0], b, acc, wm[n0, k0])
            for lane in range(32):
                for i in range(4):
                    row, col = c_coords(lane, i)
                    if c0 + col < tcols:
                        y[c0 + col, 16 * n0 + row] = acc[lane, i] + (0 if bias is None else bias[16 * n0 + row])
    return y


# -- the TIR kernel ---------------------------------------------------------------------------------------------------

MMA_SP = "mma.sp.sync.aligned.m16n8k32.row.col.f32.f16.f16.f32"


def sp24_kernel(cols: int, k: int, n: int, bias: bool, activations: str = "tk", xdtype: str = "float32"):
    """PrimFunc (x, values, metadata[, bias]) -> y for a 2:4 weight [n, k] and `cols` activation columns.
    activations "tk": x is [cols, k] and y [cols, n] (a linear); "kt": x is [k, cols] and y [n, cols] (a 1x1 conv
    at batch 1, columns = pixels). Each warp owns 16 weight rows x 32 columns; x (float32 or float16) is rounded to
    fp16 as it is loaded."""
    import tvm
    import tvm.backend.cuda  # noqa: F401  (registers T.ptx)
    from tvm.script import tirx as T

    nt, kt = n // TILE_M, k // TILE_K
    span = TILE_N * COLS_PER_WARP
    grid_n, grid_c = (nt + WARPS - 1) // WARPS, (cols + span - 1) // span
    xshape = (cols, k) if activations == "tk" else (k, cols)
    yshape = (cols, n) if activations == "tk" else (n, cols)
    J = COLS_PER_WARP

    def half_bits(v):
        return T.Cast("uint32", T.reinterpret("uint16", v))

    @T.prim_func(private=True)
    def kernel(x: T.Buffer(xshape, xdtype), wv: T.Buffer((nt, kt, 32, 4), "uint32"),
               wm: T.Buffer((nt, kt, 32), "uint32"), b: T.Buffer((n,), "float32"), y: T.Buffer(yshape, "float32")):
        T.func_attr({"tirx.noalias": True, "tirx.is_scheduled": True})
        bx = T.launch_thread("blockIdx.x", grid_n)
        by = T.launch_thread("blockIdx.y", grid_c)
        lane = T.launch_thread("threadIdx.x", 32)
        warp = T.launch_thread("threadIdx.y", WARPS)
        acc = T.alloc_buffer((J * 4,), "float32", scope="local")
        a = T.alloc_buffer((4,), "uint32", scope="local")
        e = T.alloc_buffer((1,), "uint32", scope="local")
        bf = T.alloc_buffer((J * 4,), "uint32", scope="local")
        tile = bx * WARPS + warp
        if tile < nt:
            for i in T.unroll(J * 4):
                acc[i] = T.float32(0)
            for k0 in range(kt):
                for r in T.unroll(4):
                    a[r] = wv[tile, k0, lane, r]
                e[0] = wm[tile, k0, lane]
                for j in T.unroll(J):
                    for r in T.unroll(4):
                        kk = k0 * TILE_K + b_coords(lane, r)[0]
                        c = by * span + j * TILE_N + b_coords(lane, r)[1]
                        bf[j * 4 + r] = T.uint32(0)
                        if c < cols:
                            if activations == "tk":
                                bf[j * 4 + r] = half_bits(T.Cast("float16", x[c, kk])) | (
                                    half_bits(T.Cast("float16", x[c, kk + 1])) << T.uint32(16))
                            else:
                                bf[j * 4 + r] = half_bits(T.Cast("float16", x[kk, c])) | (
                                    half_bits(T.Cast("float16", x[kk + 1, c])) << T.uint32(16))
                for j in T.unroll(J):
                    T.ptx[MMA_SP](acc[j * 4], acc[j * 4 + 1], acc[j * 4 + 2], acc[j * 4 + 3], a[0], a[1], a[2], a[3],
                                  bf[j * 4], bf[j * 4 + 1], bf[j * 4 + 2], bf[j * 4 + 3],
                                  acc[j * 4], acc[j * 4 + 1], acc[j * 4 + 2], acc[j * 4 + 3], e[0], 0)
            for j in T.unroll(J):
                for i in T.unroll(4):
                    row = tile * TILE_M + c_coords(lane, i)[0]
                    c = by * span + j * TILE_N + c_coords(lane, i)[1]
                    if c < cols:
                        if activations == "tk":
                            y[c, row] = acc[j * 4 + i] + (b[row] if bias else T.float32(0))
                        else:
                            y[row, c] = acc[j * 4 + i] + (b[row] if bias else T.float32(0))

    del tvm
    return kernel


def emit_sp24(bb, x, w: np.ndarray, bias: np.ndarray | None, cols: int, activations: str):
    """call_tir of the 2:4 kernel with the packed weight as constants; x is [cols, k] ("tk") or [k, cols] ("kt")."""
    from tvm import relax
    n, k = w.shape
    wv, wm = pack_fragments(w)
    kernel = sp24_kernel(cols, k, n, bias is not None, activations)
    gv = bb.add_func(kernel, f"graphopt_sp24_{activations}_{cols}x{k}x{n}")
    b = relax.const(np.zeros(n, np.float32) if bias is None else bias.astype(np.float32))
    out = relax.TensorType((cols, n) if activations == "tk" else (n, cols), "float32") \
        if hasattr(relax, "TensorType") else None
    if out is None:
        out = relax.TensorStructInfo((cols, n) if activations == "tk" else (n, cols), "float32")
    return bb.emit(relax.call_tir(gv, [x, relax.const(wv), relax.const(wm), b], out))


# -- when to use it ---------------------------------------------------------------------------------------------------

# Estimated speedup of the 2:4 kernel over the dense fp16 kernel by GEMM size (multiply-accumulates), used when no GPU
# is present to measure on. The sparse instruction halves the tensor-core work and the weight bytes (plus 1/8 for the
# metadata) but not the activation traffic or the launch: small GEMMs are latency-bound and gain nothing, large ones
# approach the 1.3-1.6x reported for 2:4 on A100/H100. Recorded in the manifest as "estimated", never as measured.
COST_TABLE = ((8 << 20, 1.0), (64 << 20, 1.15), (float("inf"), 1.4))


def estimated_speedup(cols: int, k: int, n: int) -> float:
    macs = cols * k * n
    return next(s for limit, s in COST_TABLE if macs < limit)


def sp24_applies(w: np.ndarray) -> str:
    """'' when the 2:4 kernel can take weight w [n, k]; else why not."""
    n, k = w.shape
    if n % TILE_M or k % TILE_K:
        return f"shape {n}x{k}: the tensor-core tile needs rows % {TILE_M} == 0 and inputs % {TILE_K} == 0"
    if not (w != 0).any():
        return "all zeros"
    if not is_24(w):
        return "not 2:4 (a group of 4 inputs has more than 2 nonzeros)"
    return ""


def sp24_decision(name: str, w: np.ndarray, cols: int, min_speedup: float, measured: dict | None = None,
                  measured_source: str = "measured") -> dict:
    """Whether layer `name` runs on the 2:4 kernel: the times select-sparse-layout recorded (measured on a GPU, or
    its estimates) when given, else the cost table. Returns the manifest record."""
    n, k = w.shape
    rec = {"shape": [cols, k, n], "dtype": "fp16 x fp16 -> fp32"}
    why = sp24_applies(w)
    if why:
        return {**rec, "choice": "dense", "reason": why}
    if measured and measured.get("sp24") and measured.get("dense"):
        speed, source = measured["dense"] / measured["sp24"], f"select-sparse-layout, {measured_source}"
    else:
        speed, source = estimated_speedup(cols, k, n), "estimated (cost table, no GPU here)"
    choice = "sp24" if speed >= min_speedup else "dense"
    return {**rec, "choice": choice, "speedup": round(speed, 3), "source": source,
            "decision": f"{choice} ({source}: {speed:.2f}x vs dense, min-speedup {min_speedup})"}
