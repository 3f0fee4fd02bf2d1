"""2:4 structured-sparse linears on NVIDIA sparse tensor cores (PTX `mma.sp`): fp16 and bf16 (m16n8k32, fp32
accumulate) and int8 (m16n8k64, int32 accumulate).

The weight W[N, K] (2 nonzeros in every 4 consecutive inputs) is the sparse operand A of the instruction, the
activations are B, so Y^T[N, T] = W[N, K] @ X^T[K, T]. At compile time W is compressed to its nonzero values
[N, K/2] and 2-bit positions, and both are laid out in *fragment order*: for each 16 x tile_k tile of W, lane l of
the warp finds its four A registers and its metadata register at [tile, l], one 16-byte and one 4-byte load.

Fragment layout (PTX ISA, sparse mma fragments), with g = lane // 4, t = lane % 4 and e elements per 32-bit register
(2 for fp16/bf16, 4 for int8) -- written once below and used by the packer, the CPU reference and the TIR kernel:
- A (compressed 16 x tile_k/2, laid out as the dense A fragment of that shape): register r holds the e compressed
  columns from e t + 4e (r // 2) of row g + 8 (r % 2).
- metadata (selector 0): bits 0-15 hold row g, bits 16-31 row g + 8, of the four 4-input chunks 4 t' .. 4 t' + 3
  with t' = t mod (lanes supplying metadata: 2 for fp16/bf16, all 4 for int8); each chunk is one nibble, the first
  kept position in its low 2 bits.
- B (tile_k x 8, column-major): register r holds the e rows from e t + 4e r of column g.
- C/D (16x8): element i is row g + 8 (i // 2), column 2t + i % 2.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from graphopt.errors import TargetError

TILE_M, TILE_N = 16, 8  # the instruction's M (weight rows) and N (activation columns)
WARPS = 4  # warps per block, each on its own 16 weight rows
COLS_PER_WARP = 4  # 8-column tiles each warp computes (32 activation columns)
M_TILES_PER_WARP = 2  # 16-row weight tiles each warp computes (each B fragment feeds both)


@dataclass(frozen=True)
class Format:
    name: str
    ptx: str
    tile_k: int  # logical inputs per instruction
    per_reg: int  # elements per 32-bit register
    meta_lanes: int  # lanes of each group of 4 that supply metadata
    value: str  # TIR dtype of the operands
    acc: str  # TIR dtype of the accumulator


FORMATS = {
    "f16": Format("f16", "mma.sp.sync.aligned.m16n8k32.row.col.f32.f16.f16.f32", 32, 2, 2, "float16", "float32"),
    "bf16": Format("bf16", "mma.sp.sync.aligned.m16n8k32.row.col.f32.bf16.bf16.f32", 32, 2, 2, "bfloat16",
                   "float32"),
    "s8": Format("s8", "mma.sp.sync.aligned.m16n8k64.row.col.s32.s8.s8.s32", 64, 4, 4, "int8", "int32"),
}


def fmt_of(name: str) -> Format:
    if name not in FORMATS:
        raise TargetError(f"unknown 2:4 kernel format '{name}' (choose one of: {', '.join(FORMATS)})")
    return FORMATS[name]


# -- the fragment layout, for python ints and TIR expressions alike --------------------------------------------------


def a_coords(lane, r, e: int = 2):
    """(row, first compressed column) of A register r of `lane` within a compressed tile."""
    return lane // 4 + 8 * (r % 2), e * (lane % 4) + 4 * e * (r // 2)


def b_coords(lane, r, e: int = 2):
    """(first k row, column) of B register r of `lane` within a tile_k x 8 tile."""
    return e * (lane % 4) + 4 * e * r, lane // 4


def c_coords(lane, i):
    """(row, column) of accumulator element i of `lane` within a 16x8 tile."""
    return lane // 4 + 8 * (i // 2), 2 * (lane % 4) + i % 2


# Which bits of which lane's metadata register hold the nibble of (row, chunk of 4 inputs) of a 16 x tile_k tile.
# fp16/bf16 (m16n8k32, selector 0: lanes t = 0, 1 of each group of 4 supply it): one register holds rows g and g + 8,
# chunks 4t .. 4t + 3 of each (16 bits a row). int8 (m16n8k64, all four lanes): one register holds 8 chunks of one
# row -- lane t: row g + 8 (t % 2), chunks 8 (t // 2) .. + 7 ("rows-inner", the order CUTLASS's int8 metadata
# reordering implies). "rows-outer" (row g + 8 (t // 2), chunks 8 (t % 2) ..) and "pairs" (the fp16 scheme over four
# lanes) are the other candidate readings, kept for the device check that settles which one the hardware uses.
META_LAYOUTS = ("rows-inner", "rows-outer", "pairs")
S8_META_LAYOUT = "rows-inner"


def meta_map(f: Format, layout: str | None = None) -> dict[tuple[int, int], tuple[int, int]]:
    """{(row, chunk): (lane, bit shift of the chunk's nibble)} for one tile in format f."""
    layout = layout or (S8_META_LAYOUT if f.name == "s8" else "pairs")
    if layout not in META_LAYOUTS:
        raise TargetError(f"unknown 2:4 metadata layout '{layout}' (choose one of: {', '.join(META_LAYOUTS)})")
    out = {}
    for lane in range(32):
        g, t = lane // 4, lane % 4
        if layout == "pairs":
            if t >= f.meta_lanes:
                continue  # fp16: lanes 2 and 3 of a group supply no metadata (selector 0)
            for row, shift in ((g, 0), (g + 8, 16)):
                for c in range(4):
                    out[(row, 4 * t + c)] = (lane, shift + 4 * c)
        else:
            rowsel, colsel = (t % 2, t // 2) if layout == "rows-inner" else (t // 2, t % 2)
            for c in range(8):
                out[(g + 8 * rowsel, 8 * colsel + c)] = (lane, 4 * c)
    return out


# -- element bits -----------------------------------------------------------------------------------------------------


def to_bits(x: np.ndarray, f: Format) -> np.ndarray:
    """Values -> their bit patterns (uint32) in format f (fp16, bf16 rounded to nearest even, or int8)."""
    if f.name == "f16":
        return np.asarray(x).astype(np.float16).view(np.uint16).astype(np.uint32)
    if f.name == "bf16":
        u = np.ascontiguousarray(x, dtype=np.float32).view(np.uint32).astype(np.uint64)
        return (((u + 0x7FFF + ((u >> 16) & 1)) >> 16) & 0xFFFF).astype(np.uint32)
    return np.asarray(x).astype(np.int8).view(np.uint8).astype(np.uint32)


def from_bits(b: np.ndarray, f: Format) -> np.ndarray:
    b = np.asarray(b)
    if f.name == "f16":
        return b.astype(np.uint16).view(np.float16).astype(np.float32)
    if f.name == "bf16":
        return (b.astype(np.uint32) << 16).view(np.float32)
    return b.astype(np.uint8).view(np.int8).astype(np.float32)


def rounded(x: np.ndarray, f: Format) -> np.ndarray:
    """x as format f represents it (float32)."""
    return from_bits(to_bits(x, f), f).reshape(np.shape(x))


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


def pack_fragments(w: np.ndarray, fmt: str = "f16", meta_layout: str | None = None) -> tuple[np.ndarray, np.ndarray]:
    """W [N, K] (2:4, N % 16 == 0, K % tile_k == 0) -> (values uint32 [N/16, K/tile_k, 32, 4], metadata uint32
    [N/16, K/tile_k, 32]) in the order the kernel's lanes load them."""
    f = fmt_of(fmt)
    n, k = w.shape
    if n % TILE_M or k % f.tile_k:
        raise TargetError(f"a 2:4 tensor-core weight ({f.name}) needs rows % {TILE_M} == 0 and inputs % {f.tile_k} "
                          f"== 0, got {n}x{k}")
    vals, pos = compress_24(w)
    nt, kt, e = n // TILE_M, k // f.tile_k, f.per_reg
    bits = to_bits(vals, f).reshape(n, k // 2)
    vt = bits.reshape(nt, TILE_M, kt, f.tile_k // 2).transpose(0, 2, 1, 3)  # [nt, kt, 16, tile_k/2] compressed tiles
    nib = (pos[..., 0] | (pos[..., 1] << 2)).astype(np.uint32)  # [N, K/4]
    nt_ = nib.reshape(nt, TILE_M, kt, f.tile_k // 4).transpose(0, 2, 1, 3)  # [nt, kt, 16 rows, chunks]
    width = 32 // e
    wv = np.zeros((nt, kt, 32, 4), np.uint32)
    wm = np.zeros((nt, kt, 32), np.uint32)
    for lane in range(32):
        for r in range(4):
            row, col = a_coords(lane, r, e)
            for i in range(e):
                wv[:, :, lane, r] |= vt[:, :, row, col + i] << (width * i)
    for (row, chunk), (lane, shift) in meta_map(f, meta_layout).items():
        wm[:, :, lane] |= nt_[:, :, row, chunk] << shift
    for lane in range(32):  # lanes that supply no metadata carry a copy (what the kernel was verified with)
        if lane % 4 >= f.meta_lanes:
            wm[:, :, lane] = wm[:, :, lane - lane % 4 + lane % 4 % f.meta_lanes]
    return wv, wm


# The dense instructions of the same element types (mma.sync): the A fragment of a 16 x tile_k tile has the layout of
# the 2:4 instruction's compressed A (a_coords), B has 2 registers (b_coords with r < 2), C/D are the same.
DENSE_FORMATS = {
    "f16": Format("f16", "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32", 16, 2, 0, "float16", "float32"),
    "bf16": Format("bf16", "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32", 16, 2, 0, "bfloat16", "float32"),
    "s8": Format("s8", "mma.sync.aligned.m16n8k32.row.col.s32.s8.s8.s32", 32, 4, 0, "int8", "int32"),
}


def dense_fmt_of(name: str) -> Format:
    if name not in DENSE_FORMATS:
        raise TargetError(f"unknown dense tensor-core format '{name}' (choose one of: {', '.join(DENSE_FORMATS)})")
    return DENSE_FORMATS[name]


def tc_prim_func(body, cols: int, k: int, n: int, f: Format, sparse: bool):
    """The PrimFunc (x [cols, k], fragment-packed weight [n/16, k/tile_k, 32, 4], 2:4 metadata [n/16, k/tile_k, 32]
    when sparse, bias [n]) -> y [cols, n] around a tensor-core kernel's body macro body(x, wv, wm or None, b, y)."""
    from tvm.script import tirx as T
    nt, kt = n // TILE_M, k // f.tile_k
    if sparse:
        @T.prim_func(private=True)
        def kernel(xb: T.Buffer((cols, k), f.value), wv: T.Buffer((nt, kt, 32, 4), "uint32"),
                   wm: T.Buffer((nt, kt, 32), "uint32"), b: T.Buffer((n,), "float32"),
                   y: T.Buffer((cols, n), f.acc)):
            T.func_attr({"tirx.noalias": True, "tirx.is_scheduled": True})
            body(xb, wv, wm, b, y)
        return kernel

    @T.prim_func(private=True)
    def dense_kernel(xb: T.Buffer((cols, k), f.value), wv: T.Buffer((nt, kt, 32, 4), "uint32"),
                     b: T.Buffer((n,), "float32"), y: T.Buffer((cols, n), f.acc)):
        T.func_attr({"tirx.noalias": True, "tirx.is_scheduled": True})
        body(xb, wv, None, b, y)
    return dense_kernel


def pack_dense_fragments(w: np.ndarray, fmt: str = "f16") -> np.ndarray:
    """W [N, K] (N % 16 == 0, K % (2 tile_k) == 0) -> uint32 [N/16, K/tile_k, 32, 4]: lane l's four A registers of
    each 16 x tile_k tile at [tile, k step, l], in the format's element type."""
    f = dense_fmt_of(fmt)
    n, k = w.shape
    why = dense_tc_applies(n, k, fmt)
    if why:
        raise TargetError(f"a dense tensor-core weight ({f.name}): {why}")
    nt, kt, e = n // TILE_M, k // f.tile_k, f.per_reg
    width = 32 // e
    vt = to_bits(w, f).reshape(nt, TILE_M, kt, f.tile_k).transpose(0, 2, 1, 3)
    wv = np.zeros((nt, kt, 32, 4), np.uint32)
    for lane in range(32):
        for r in range(4):
            row, col = a_coords(lane, r, e)
            for i in range(e):
                wv[:, :, lane, r] |= vt[:, :, row, col + i] << (width * i)
    return wv


def unpack_dense_fragments(wv: np.ndarray, fmt: str = "f16") -> np.ndarray:
    """The dense weight (float32 of the format's values) packed fragments stand for (the CPU reference)."""
    f = dense_fmt_of(fmt)
    nt, kt = wv.shape[:2]
    e, width = f.per_reg, 32 // f.per_reg
    out = np.zeros((nt, kt, TILE_M, f.tile_k), np.float32)
    for lane in range(32):
        for r in range(4):
            row, col = a_coords(lane, r, e)
            for i in range(e):
                out[:, :, row, col + i] = from_bits((wv[:, :, lane, r] >> (width * i)) & ((1 << width) - 1),
                                                    f).reshape(nt, kt)
    return out.transpose(0, 2, 1, 3).reshape(nt * TILE_M, kt * f.tile_k)


def unpack_fragments(wv: np.ndarray, wm: np.ndarray, fmt: str = "f16", meta_layout: str | None = None) -> np.ndarray:
    """The dense weight (float32 of the format's values) a packed (values, metadata) pair stands for, read the way
    the hardware reads the lanes' registers (the CPU reference of the layout)."""
    f = fmt_of(fmt)
    nt, kt = wv.shape[:2]
    e, width = f.per_reg, 32 // f.per_reg
    where = meta_map(f, meta_layout)
    out = np.zeros((nt, kt, TILE_M, f.tile_k), np.float32)
    for lane in range(32):
        for r in range(4):
            row, col0 = a_coords(lane, r, e)
            for i in range(e):
                col = col0 + i
                v = from_bits((wv[:, :, lane, r] >> (width * i)) & ((1 << width) - 1), f).reshape(nt, kt)
                chunk, which = col // 2, col % 2  # compressed column -> chunk of 4 inputs, first or second kept
                meta_lane, shift = where[row, chunk]
                p = (wm[:, :, meta_lane] >> (shift + 2 * which)) & 3
                for q in range(4):
                    sel = p == q
                    out[:, :, row, 4 * chunk + q][sel] = v[sel]
    return out.transpose(0, 2, 1, 3).reshape(nt * TILE_M, kt * f.tile_k)


def mma_sp_reference(a: np.ndarray, b: np.ndarray, c: np.ndarray, e_: np.ndarray, fmt: str = "f16") -> np.ndarray:
    """One warp's mma.sp (selector 0) on per-lane registers: a [32, 4] and b [32, 4] uint32, c [32, 4] accumulator,
    e_ [32] uint32 metadata -> d [32, 4] (float64, exact for the int8 accumulator)."""
    f = fmt_of(fmt)
    e, width = f.per_reg, 32 // f.per_reg
    wa = unpack_fragments(a.reshape(1, 1, 32, 4), e_.reshape(1, 1, 32), fmt).astype(np.float64)  # [16, tile_k]
    bm = np.zeros((f.tile_k, TILE_N), np.float64)
    for lane in range(32):
        for r in range(4):
            k0, col = b_coords(lane, r, e)
            for i in range(e):
                bm[k0 + i, col] = from_bits(np.array([(b[lane, r] >> (width * i)) & ((1 << width) - 1)]), f)[0]
    prod = wa @ bm
    d = np.empty((32, 4), np.float64)
    for lane in range(32):
        for i in range(4):
            row, col = c_coords(lane, i)
            d[lane, i] = c[lane, i] + prod[row, col]
    return d


def sp24_linear_reference(x: np.ndarray, wv: np.ndarray, wm: np.ndarray, bias: np.ndarray | None,
                          fmt: str = "f16") -> np.ndarray:
    """The kernel's loops on the CPU, lane by lane with the kernel's own index maps: x [T, K] -> [T, N]."""
    f = fmt_of(fmt)
    e, width = f.per_reg, 32 // f.per_reg
    tcols, k = x.shape
    nt, kt = wv.shape[:2]
    y = np.zeros((tcols, nt * TILE_M), np.float64)
    xb = to_bits(x, f).reshape(tcols, k)
    for n0 in range(nt):
        for c0 in range(0, tcols, TILE_N):
            acc = np.zeros((32, 4), np.float64)
            for k0 in range(kt):
                b = np.zeros((32, 4), np.uint32)
                for lane in range(32):
                    for r in range(4):
                        kk, col = b_coords(lane, r, e)
                        if c0 + col < tcols:
                            for i in range(e):
                                b[lane, r] |= xb[c0 + col, f.tile_k * k0 + kk + i] << (width * i)
                acc = mma_sp_reference(wv[n0, k0], b, acc, wm[n0, k0], fmt)
            for lane in range(32):
                for i in range(4):
                    row, col = c_coords(lane, i)
                    if c0 + col < tcols:
                        y[c0 + col, 16 * n0 + row] = acc[lane, i] + (0 if bias is None else bias[16 * n0 + row])
    return y


# -- the TIR kernel ---------------------------------------------------------------------------------------------------


def a_loader(T, MT: int, nt: int):
    """A TVMScript macro: lane `lane` loads its A registers and metadata for the warp's MT weight tiles from
    `first` at k step k0 (tiles past nt skipped). Shared by both kernels."""

    @T.macro
    def load_a(a, meta, wv, wm, first, k0, lane):
        for m in T.unroll(MT):
            if first + m < nt:
                for r in T.unroll(4):
                    a[m * 4 + r] = wv[first + m, k0, lane, r]
                meta[m] = wm[first + m, k0, lane]

    return load_a


def mma_sp(T, f: Format, acc, a, bf, meta, m, j, J: int):
    """The instruction for weight tile m and column tile j of a warp: accumulator registers (m J + j) * 4 .. +3 in
    place, A registers of tile m, B registers of tile j, tile m's metadata, sparsity selector 0. Called while a
    kernel's TVMScript body is parsed: it returns the statement."""
    q = (m * J + j) * 4
    return T.ptx[f.ptx](acc[q], acc[q + 1], acc[q + 2], acc[q + 3], a[m * 4], a[m * 4 + 1], a[m * 4 + 2],
                        a[m * 4 + 3], bf[j * 4], bf[j * 4 + 1], bf[j * 4 + 2], bf[j * 4 + 3],
                        acc[q], acc[q + 1], acc[q + 2], acc[q + 3], meta[m], 0)


def sp24_kernel(cols: int, k: int, n: int, bias: bool, activations: str = "tk", xdtype: str = "float32",
                fmt: str = "f16"):
    """PrimFunc (x, values, metadata, bias) -> y for a 2:4 weight [n, k] and `cols` activation columns.
    activations "tk": x is [cols, k] and y [cols, n] (a linear); "kt": x is [k, cols] and y [n, cols] (a 1x1 conv
    at batch 1, columns = pixels). Each warp owns ROWS_PER_WARP weight rows (tiles of 16, so each B fragment serves
    them all) x 32 columns. fp16/bf16: x (float32, float16 or bfloat16) is rounded to the format as it is loaded,
    y is float32 (+ bias); int8: x is int8, y the int32 accumulator (bias unused). When x already has the
    instruction's element type and its e inputs per register are contiguous ("tk"), a B register is one 32-bit
    load of x viewed as uint32."""
    import tvm.backend.cuda  # noqa: F401  (registers T.ptx)
    from tvm.script import tirx as T

    f = fmt_of(fmt)
    nt, kt = n // TILE_M, k // f.tile_k
    span = TILE_N * COLS_PER_WARP
    MT = M_TILES_PER_WARP
    grid_n, grid_c = (nt + WARPS * MT - 1) // (WARPS * MT), (cols + span - 1) // span
    xshape = (cols, k) if activations == "tk" else (k, cols)
    yshape = (cols, n) if activations == "tk" else (n, cols)
    J, e, width = COLS_PER_WARP, f.per_reg, 32 // f.per_reg
    integer = f.name == "s8"
    bits = "uint8" if integer else "uint16"
    reg_acc = "uint32" if integer else f.acc  # the int8 instruction's accumulator registers are typed .u32
    packed = activations == "tk" and xdtype == f.value  # a B register is one aligned 32-bit word of x

    def elem_bits(v):
        return T.Cast("uint32", T.reinterpret(bits, v if integer else T.Cast(f.value, v)))

    def result(acc_value, bias_value):
        if integer:
            return T.reinterpret("int32", acc_value)
        return acc_value + bias_value if bias else acc_value

    load_a = a_loader(T, MT, nt)

    def xload_bound(x, c, kk):
        """The e consecutive inputs kk.. of column c of buffer x, as one 32-bit B register (called while the
        TVMScript body is parsed: it builds the expression)."""
        if packed:
            return x.view("uint32")[c, kk // e]
        word = None
        for i in range(e):
            v = x[c, kk + i] if activations == "tk" else x[kk + i, c]
            part = elem_bits(v) if i == 0 else elem_bits(v) << T.uint32(width * i)
            word = part if word is None else word | part
        return word

    @T.prim_func(private=True)
    def kernel(xb: T.Buffer(xshape, xdtype), wv: T.Buffer((nt, kt, 32, 4), "uint32"),
               wm: T.Buffer((nt, kt, 32), "uint32"), b: T.Buffer((n,), "float32"), y: T.Buffer(yshape, f.acc)):
        T.func_attr({"tirx.noalias": True, "tirx.is_scheduled": True})
        bx = T.launch_thread("blockIdx.x", grid_n)
        by = T.launch_thread("blockIdx.y", grid_c)
        lane = T.launch_thread("threadIdx.x", 32)
        warp = T.launch_thread("threadIdx.y", WARPS)
        acc = T.alloc_buffer((MT * J * 4,), reg_acc, scope="local")
        a = T.alloc_buffer((MT * 4,), "uint32", scope="local")
        meta = T.alloc_buffer((MT,), "uint32", scope="local")
        bf = T.alloc_buffer((J * 4,), "uint32", scope="local")
        first = (bx * WARPS + warp) * MT
        if first < nt:
            for i in T.unroll(MT * J * 4):
                acc[i] = T.Cast(reg_acc, 0)
            for k0 in range(kt):
                load_a(a, meta, wv, wm, first, k0, lane)
                for j in T.unroll(J):
                    for r in T.unroll(4):
                        kk = k0 * f.tile_k + b_coords(lane, r, e)[0]
                        c = by * span + j * TILE_N + b_coords(lane, r, e)[1]
                        bf[j * 4 + r] = T.uint32(0)
                        if c < cols:
                            bf[j * 4 + r] = xload_bound(xb, c, kk)
                for m in T.unroll(MT):
                    if first + m < nt:
                        for j in T.unroll(J):
                            mma_sp(T, f, acc, a, bf, meta, m, j, J)
            for m in T.unroll(MT):
                if first + m < nt:
                    for j in T.unroll(J):
                        for i in T.unroll(4):
                            row = (first + m) * TILE_M + c_coords(lane, i)[0]
                            c = by * span + j * TILE_N + c_coords(lane, i)[1]
                            if c < cols:
                                if activations == "tk":
                                    y[c, row] = result(acc[(m * J + j) * 4 + i], b[row])
                                else:
                                    y[row, c] = result(acc[(m * J + j) * 4 + i], b[row])

    return kernel


def emit_tc_call(bb, kernel, name: str, x, w: np.ndarray, bias, cols: int, fmt: str, sparse: bool):
    """call_tir of a tensor-core linear PrimFunc (tc_prim_func's signature) under `name`: x cast to the
    instruction's element type (int8 as is), the weight packed in fragment order (2:4: values and metadata) and the
    bias (zeros if None) as constants; y [cols, n] float32 or the int32 accumulator."""
    from tvm import relax
    f = fmt_of(fmt) if sparse else dense_fmt_of(fmt)
    n = w.shape[0]
    if f.name != "s8":
        x = bb.emit(relax.op.astype(x, f.value))
    gv = bb.add_func(kernel, name)
    b = relax.const(np.zeros(n, np.float32) if bias is None else np.asarray(bias, np.float32))
    consts = [relax.const(a) for a in pack_fragments(w, fmt)] if sparse else [relax.const(pack_dense_fragments(w, fmt))]
    return bb.emit(relax.call_tir(gv, [x, *consts, b], relax.TensorType((cols, n), f.acc)))


def emit_sp24(bb, x, w: np.ndarray, bias: np.ndarray | None, cols: int, activations: str, fmt: str = "f16"):
    """call_tir of the 2:4 kernel with the packed weight as constants; x is [cols, k] ("tk") or [k, cols] ("kt")."""
    from tvm import relax
    f = fmt_of(fmt)
    n, k = w.shape
    if activations == "tk":  # a linear: the multistage kernel (activations in the instruction's type)
        from graphopt.targets.tvm.gpu.gemm import emit_tc
        return emit_tc(bb, x, w, bias, cols, fmt, sparse=True)
    wv, wm = pack_fragments(w, fmt)
    kernel = sp24_kernel(cols, k, n, bias is not None, activations, "int8" if f.name == "s8" else "float32", fmt)
    gv = bb.add_func(kernel, f"graphopt_sp24_{fmt}_{activations}_{cols}x{k}x{n}")
    b = relax.const(np.zeros(n, np.float32) if bias is None else bias.astype(np.float32))
    return bb.emit(relax.call_tir(gv, [x, relax.const(wv), relax.const(wm), b], relax.TensorType((n, cols), f.acc)))


def dense_tc_applies(n: int, k: int, fmt: str = "f16") -> str:
    """'' when graphopt's dense tensor-core kernel can take a weight [n, k]; else why not."""
    f = dense_fmt_of(fmt)
    if n % TILE_M or k % (2 * f.tile_k):
        return f"shape {n}x{k}: the tensor-core tile needs rows % {TILE_M} == 0 and inputs % {2 * f.tile_k} == 0"
    return ""


def emit_dense_tc(bb, x, w: np.ndarray, bias: np.ndarray | None, cols: int, fmt: str = "f16",
                  tiles: tuple | None = None):
    """call_tir of the dense tensor-core linear (the multistage kernel of gemm.py; tiles are its 6-tuples, default
    gemm.pipeline_tiles) with the weight packed in fragment order as a constant."""
    from graphopt.targets.tvm.gpu.gemm import emit_tc
    return emit_tc(bb, x, w, bias, cols, fmt, sparse=False, tiles=tiles)


# -- when to use it ---------------------------------------------------------------------------------------------------

# Estimated speedup of the 2:4 kernel over graphopt's dense tensor-core kernel (the multistage kernels of gemm.py at
# their pipeline_tiles) by GEMM size (multiply-accumulates), used when no GPU is present to measure on. Measured on an
# H200 (benchmarks/gpu_check.py --quick, 2026-12-04, two runs): fp16 2048^3 1.25-1.30x, 4096^3 1.19x, 8192^3
# 1.25-1.32x; int8 1.14-1.15x, 1.19-1.20x, 1.23-1.25x; MiniLM-L6 and MobileNetV2 linears (<= 0.5G MACs) 0.59-1.0x
# (launch-bound, and a 2:4 step holds twice the activation words of a dense one). The sparse instruction halves the
# tensor-core work and the weight bytes but not the activation traffic or the launch. Recorded in the manifest as
# "estimated", never as measured.
COST_TABLE = ((2 << 30, 1.0), (32 << 30, 1.2), (256 << 30, 1.19), (float("inf"), 1.25))


# The same for sm_90a builds (gpu/wgmma.py), where a 2:4 layer runs the 2:4 wgmma kernel (wgmma.mma_async.sp) and a
# dense one the dense wgmma kernel, each at wg_tiles. Measured on an H200 (2026-12-04,
# benchmarks/results/gpu_check_h200_s51_explore.json, both correct): fp16 2048^3 1.16x, 4096^3 1.18x, 8192^3
# 1.25x; int8 1.15x, 1.21x, 1.25x; MiniLM-L6's linears (19-75M MACs, launch-bound) fp16 0.89-1.04x, int8
# 0.92-1.13x. (Hopper's mma.sp -- the kernel above -- lost to the dense wgmma kernel: 0.83-0.87x.)
COST_TABLE_WGMMA = ((2 << 30, 0.9), (32 << 30, 1.15), (256 << 30, 1.18), (float("inf"), 1.25))


def estimated_speedup(cols: int, k: int, n: int, wgmma: bool = False) -> float:
    """The cost table's 2:4 speedup over the dense kernel the build would use (wgmma: an sm_90a build)."""
    macs = cols * k * n
    return next(s for limit, s in (COST_TABLE_WGMMA if wgmma else COST_TABLE) if macs < limit)


def sp24_applies(w: np.ndarray, fmt: str = "f16") -> str:
    """'' when the 2:4 kernel can take weight w [n, k]; else why not."""
    n, k = w.shape
    tk = fmt_of(fmt).tile_k
    if n % TILE_M or k % tk:
        return f"shape {n}x{k}: the tensor-core tile needs rows % {TILE_M} == 0 and inputs % {tk} == 0"
    if not (w != 0).any():
        return "all zeros"
    if not is_24(w):
        return "not 2:4 (a group of 4 inputs has more than 2 nonzeros)"
    return ""


def sp24_decision(name: str, w: np.ndarray, cols: int, min_speedup: float, measured: dict | None = None,
                  measured_source: str = "measured", fmt: str = "f16", wgmma: bool = False) -> dict:
    """Whether layer `name` runs on the 2:4 kernel: the times select-sparse-layout recorded (measured on a GPU, or
    its estimates) when given, else the cost table. In an sm_90a build (`wgmma`) a weight the wgmma kernels take
    (wgmma.wg_applies) runs the 2:4 wgmma kernel or the dense one, which select-sparse-layout does not time: their
    cost table decides. Returns the manifest record ("sp24_kernel": the 2:4 kernel it runs if chosen)."""
    n, k = w.shape
    rec = {"shape": [cols, k, n], "dtype": {"f16": "fp16 x fp16 -> fp32", "bf16": "bf16 x bf16 -> fp32",
                                            "s8": "int8 x int8 -> int32"}[fmt]}
    why = sp24_applies(w, fmt)
    if why:
        return {**rec, "choice": "dense", "reason": why}
    from graphopt.targets.tvm.gpu.wgmma import wg_applies
    wgmma = wgmma and not wg_applies(n, k, fmt)
    if wgmma:
        speed, source = estimated_speedup(cols, k, n, True), "estimated (cost table of sm_90a's wgmma kernels)"
    elif measured and measured.get("sp24") and measured.get("dense"):
        speed, source = measured["dense"] / measured["sp24"], f"select-sparse-layout, {measured_source}"
    else:
        speed, source = estimated_speedup(cols, k, n), "estimated (cost table, no GPU here)"
    rec["sp24_kernel"] = "wgmma.sp (sm_90a)" if wgmma else "mma.sp"
    choice = "sp24" if speed >= min_speedup else "dense"
    return {**rec, "choice": choice, "speedup": round(speed, 3), "source": source,
            "decision": f"{choice} ({source}: {speed:.2f}x vs dense, min-speedup {min_speedup})"}
