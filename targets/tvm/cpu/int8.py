"""int8 pointwise convolution for AVX2 CPUs without VNNI: exact int16 pair products with `vpmaddwd`, reading int8
activations as they are stored (NCHW) and writing the next layer's int8 activations (or floats) from registers.

The weight is stored in the artifact as int8 in pairs per output channel, and each task
first widens its 6-channel block to int16 pairs on the stack, so one 32-bit broadcast holds
(w[co, 2k], w[co, 2k+1]). In the reduction loop, 8 pixels of input channels 2k and 2k+1 are loaded as int8, byte
interleaved (`vpunpcklbw`) and sign-extended (`vpmovsxbw`); one `vpmaddwd` then does 16 multiply-adds into 8 int32
lanes: twice the fp32 FMA rate, exact (int8 products summed in pairs fit int32). A 6 x 16 output tile (6 channels,
16 pixels) stays in 12 registers over all of Cin. The epilogue works on the tile in registers: it removes the input
zero point and adds the int32 bias (acc - offset), scales per channel (sx * w_scale), clamps (a fused ReLU/ReLU6) and,
when the only consumer is a quantize, rounds to the consumer's int8 grid and stores int8: no int32 or float tensor,
no separate requantize or layout pass ever touches memory. The last pixel block overlaps the one before it (it
starts at P - 16), so 49- and 196-pixel images need no tail code.
"""
from __future__ import annotations

import math

import numpy as np

from graphopt.targets.tvm.cpu import prepared
from graphopt.targets.tvm.cpu.batch import batch_source

from graphopt.targets.tvm.cpu.conv import _clamped, deeper, in_grid_steps, store_params
from graphopt.targets.tvm.cpu.knobs import Site, bind, pick
from graphopt.targets.tvm.cpu.parse import parse_kernel

MR = 6
PAIR_ORDER = [j for i in range(8) for j in (i, i + 8)]  # byte interleave of two 8-byte rows


def chunks(mt: int, cb: int) -> int:
    """Pixel chunks per channel block: enough tasks for the threads, each chunk long enough that widening its
    channel block's weights once is a small cost next to the products."""
    return min(cb, max(1, -(-32 // mt)))


def quad_chunks(cb: int, k4: int, nr: int) -> tuple[int, int]:
    """(chunks, longest chunk) of the quad kernel's cb pixel blocks: each chunk's staged quads (k4 quads of nr
    pixels a block) fit half of L1, and the chunks differ by at most one block (chunk c is blocks
    c * cb // chunks ..). The threads take contiguous runs of tasks, so a short last chunk left one thread idle:
    576x96x196 went 151 -> 102 us and 1280x320x49 305 -> 194 us when 21 + 4 and 3 + 1 blocks became 13 + 12 and
    2 + 2.

    The tasks (chunk, channel group) run chunk-minor (t % chunks), so with two or more groups the threads split
    the channels and each writes whole output rows. Chunk-major, they split the pixels and wrote the two halves
    of every row at the same time, and two threads ran 1.2-5x slower (once 15x) than with the rows split (alone,
    float outputs, Zen 4: 192x32x784 34 -> 15 us, 576x96x196 int8 BSR 32 -> 6 us, 144x24x3136 51-140 -> 34-44 us;
    int8 outputs 1.0-1.18x; 1 thread: equal). Which part of the memory system makes neighbouring rows' halves so
    costly (two cores' prefetchers reaching into each other's lines is a guess) was not measured."""
    chunks = -(-cb // max(1, min(cb, 16384 // (k4 * 4 * nr))))
    return chunks, -(-cb // chunks)


def kpad(cin: int) -> int:
    """Input-channel pairs as stored: a multiple of 4 so one channel block's pairs are whole 16-byte vectors."""
    return -(-(-(-cin // 2)) // 4) * 4


def qconv1x1_source(cout: int, cin: int, p: int, nv: int, clamp: tuple[float, float] | None = None,
                    out_q: tuple[float, int, int, int] | None = None, dequantized: bool = False,
                    float_bias: bool = False, residual: bool = False) -> str:
    """TVMScript of the kernel for x int8 [Cin, P] -> out [Cout, P]: int8 when out_q = (scale, zero point, qmin,
    qmax), else float32; with `dequantized` the int8 values are stored as the floats they stand for (for a
    depthwise consumer, which computes in float); with `residual` (float output) a float res [Cout, P] is added in
    the store, before the clamp (argument `res` before qp). nv vectors of 8 pixels per tile (P >= 8 * nv). Weights are
    stored as int8 and widened to int16 pairs once per task (int4 ones run on the quad kernel). The store's bounds,
    zero point and scale come from the `qp` buffer (`store_params`), so layers of one shape share one function."""
    nr = 8 * nv
    kp, odd = divmod(cin, 2)
    k4 = kpad(cin)
    bias_arg = f' bias: T.Buffer(({-(-cout // MR) * MR},), "float32"),' if float_bias else ""
    mt, cb = -(-cout // MR), -(-p // nr)
    nch = chunks(mt, cb)
    c0 = f"T.min(b * {nr}, {p - nr})"

    def pairs(k: str, v: int, last: bool) -> str:
        lo = f"x[T.ramp(2 * ({k}) * {p} + {c0} + {v * 8}, 1, 8)]"
        hi = "T.broadcast(T.int8(0), 8)" if last else f"x[T.ramp((2 * ({k}) + 1) * {p} + {c0} + {v * 8}, 1, 8)]"
        return f'T.Cast("int16x16", T.Shuffle([{lo}, {hi}], {PAIR_ORDER}))'

    def step(k: str, last: bool = False, pad: str = " " * 16) -> str:
        # expressions are written inline: a TVMScript binding of a vector would be kept in memory, not a register
        out = f"""
{pad}for i in T.unroll({MR}):"""
        for v in range(nv):
            acc = f"acc[T.ramp(i * {nr} + {v * 8}, 1, 8)]"
            out += f"""
{pad}    {acc} = {acc} + T.call_llvm_pure_intrin("int32x8", "llvm.x86.avx2.pmadd.wd", {pairs(k, v, last)},
{pad}        T.reinterpret("int16x16", T.broadcast(wl[({k}) * {MR} + i], 8)))"""
        return out

    co = f"(t // {nch}) * {MR} + i"
    store = _tile_store(co, c0, nv, p, clamp, out_q, dequantized, float_bias, " " * 20, residual=residual)
    res_arg = f' res: T.Buffer(({cout * p},), "float32"),' if residual else ""
    return f"""
@T.prim_func(private=True)
def qconv1x1(x: T.Buffer(({cin * p},), "int8"), w8: T.Buffer(({mt * k4 * MR * 2},), "int8"),
             off: T.Buffer(({mt * MR},), "int32"), mult: T.Buffer(({mt * MR},), "float32"),{bias_arg}{res_arg}
             qp: T.Buffer((4,), "float32"),
             out: T.Buffer(({cout * p},), "{'int8' if out_q and not dequantized else 'float32'}")):
    T.func_attr({{"tirx.noalias": True, "tirx.is_scheduled": True}})
    for t in T.parallel({mt * nch}):
        wl = T.decl_buffer(({k4 * MR},), "int32", scope="global")
        for j in T.serial({k4 * MR // 8}):
            wl[T.ramp(j * 8, 1, 8)] = T.reinterpret("int32x8", T.Cast("int16x16", w8[T.ramp((t // {nch}) * {
                k4 * MR * 2} + j * 16, 1, 16)]))
        acc = T.decl_buffer(({MR * nr},), "int32", scope="global")
        for b in T.serial((t % {nch}) * {cb} // {nch}, (t % {nch} + 1) * {cb} // {nch}):
            for i in T.unroll({MR}):
                acc[T.ramp(i * {nr}, 1, {nr})] = T.broadcast(T.int32(0), {nr})
            for kk in T.serial({kp}):{step("kk")}{step(str(kp), True, " " * 12) if odd else ""}
            for i in T.unroll({MR}):
                if {co} < {cout}:{store}
"""


def _requantized(acc: str, co: str, clamp, out_q, dequantized: bool, float_bias: bool,
                 offset_in_acc: bool = False) -> str:
    """The stored value of int32 accumulator `acc` of output channel co: (acc - offset) * mult (+ float bias),
    clamped, and on the output grid when out_q (the multiply fused with the zero point's add, see `_clamped`).
    With `offset_in_acc` the kernel started the accumulator at -offset, so acc is already acc - offset."""
    x = f'T.Cast("float32", {acc})' if offset_in_acc else f'T.Cast("float32", {acc} - off[{co}])'
    if float_bias:
        return _clamped(f"{x} * mult[{co}] + bias[{co}]", clamp, out_q, dequantized, qp="qp")
    return _clamped(x, clamp, out_q, dequantized, qp="qp", times=f"mult[{co}]")


def _tile_store(co: str, c0: str, nv: int, p: int, clamp, out_q, dequantized: bool, float_bias: bool, pad: str,
                row: str = "i", offset_in_acc: bool = False, lanes: int = 8, residual: bool = False) -> str:
    """Store row `row` of a 6 x 8nv int32 tile `acc` (channel co, pixels c0..): (acc - offset) * mult (+ float
    bias), clamped, and rounded to the output grid when out_q; offset holds the zero point's sum and the int32 bias,
    and with out_q mult is in the output's grid steps (emit scales it). `offset_in_acc`: see `_requantized`.
    `lanes=16`: the tile is in buffers acc0, acc1, .. of one 16-pixel vector a row each (`qconv1x1_ubsw_source`).
    `residual` (float output only): the value plus res at the same place, then the clamp (a residual add and the
    ReLU after it)."""
    if residual and out_q is not None:
        raise ValueError("a residual add joins the int8 pointwise store only with a float output")
    nr, store = 8 * nv, ""
    for v in range(nr // lanes):
        acc = f"acc[{row} * {nr} + {v * 8} + u]" if lanes == 8 else f"acc{v}[{row} * {lanes} + u]"
        if residual:
            val = _clamped(f"{_requantized(acc, co, None, None, False, float_bias, offset_in_acc)} + "
                           f"res[({co}) * {p} + {c0} + {v * lanes} + u]", clamp, None, qp="qp")
        else:
            val = _requantized(acc, co, clamp, out_q, dequantized, float_bias, offset_in_acc)
        store += f"""
{pad}for u in T.vectorized({lanes}):
{pad}    out[({co}) * {p} + {c0} + {v * lanes} + u] = {val}"""
    return store


DOTS = ("ubsw", "vnni", "exact")


# every byte's top bit as an int32 (0x80808080): XOR with it adds 128 to four int8 bytes read as uint8
BYTE_TOPS = -2139062144


def wide_quads(dot: str | None, lanes: int) -> bool:
    """Whether the quad kernels can run 512-bit: a 16-lane target and a quad product with a 16-lane form (`quad_dot`:
    VNNI, or the exact reference; `vpmaddubsw` is AVX2's 8 lanes only)."""
    return lanes >= 16 and dot in ("vnni", "exact")


def quad_dot(acc: str, u8: str, s8: str, dot: str, lanes: int = 8) -> str:
    """TVMScript of acc (int32 x lanes) plus, per lane, the 4 products of u8 (uint8 x 4 lanes) and s8 (int8 x 4
    lanes) bytes 4l..4l+3:
    - "vnni": one `vpdpbusd` (AVX-VNNI or AVX512-VNNI + VL), exact for any bytes; 16 lanes: the 512-bit form;
    - "ubsw": `vpmaddubsw` (pairs summed in int16 with saturation: exact only under `ubsw_exact`), then `vpmaddwd`
      by ones; AVX2, 8 lanes only;
    - "exact": the same sum in plain widened vector arithmetic, the reference that runs on any CPU (tests check
      the vnni kernels' layout and epilogue through it where the CPU has no VNNI): the byte products in int16
      (exact: 255 x -128 fits), adjacent pairs summed in int32 by reading the int16 pairs as int32 lanes, and the
      pair sums likewise as int64 (`_halves`). No shuffles: as products of int32 lanes gathered by four strided
      shuffles, LLVM took 5.5 s to compile the exact int8 depthwise kernel of a 24 x 28 x 28 map (0.6 s now)."""
    if dot == "vnni":  # LLVM 22 declares the byte operands as <32 x i8>: unsigned first, signed second
        form = "512" if lanes == 16 else "256"
        return f'T.call_llvm_pure_intrin("int32x{lanes}", "llvm.x86.avx512.vpdpbusd.{form}", {acc}, {u8}, {s8})'
    if dot == "ubsw" and lanes == 8:
        return (f'{acc} + T.call_llvm_pure_intrin("int32x8", "llvm.x86.avx2.pmadd.wd", T.call_llvm_pure_intrin('
                f'"int16x16", "llvm.x86.avx2.pmadd.ub.sw", {u8}, {s8}), T.broadcast(T.int16(1), 16))')
    if dot == "exact":  # (`quad_dot_stmt`'s sums, its intermediates written out in place)
        quads = f'T.reinterpret("int64x{lanes}", {_halves(_int16_products(u8, s8, lanes), 16)})'
        return f'{acc} + T.Cast("int32x{lanes}", {_halves(quads, 32)})'
    raise ValueError(f"unknown int8 dot product '{dot}' at {lanes} lanes (one of {', '.join(DOTS)}; ubsw: 8 lanes)")


def quad_dot_stmt(acc: str, u8: str, s8: str, dot: str, lanes: int, name: str) -> str:
    """TVMScript statement(s) `acc = quad_dot(acc, u8, s8, dot, lanes)`. The "exact" product's intermediates (its
    int16 products read as int32 pairs, then the pair sums as int64: see `quad_dot`) are bound once, as T.lets named
    `name` and `name`_p (unique in the function: TVM rejects one name bound twice), so the source holds u8 and s8
    once; the expression form holds them four times (each `_halves` reads its operand twice). In the int8 depthwise
    kernel the four copies of each window shuffle, with the strided shuffles the exact sum had before, made its
    source 3.6x the VNNI one's (257 against 71 KB): 6.3 s to parse and 4.9 s to build, 2.2 and 0.9 s now."""
    if dot != "exact":
        return f"{acc} = {quad_dot(acc, u8, s8, dot, lanes)}"
    return (f'{name}: T.let = {_int16_products(u8, s8, lanes)}\n'
            f'{name}_p: T.let = T.reinterpret("int64x{lanes}", {_halves(name, 16)})\n'
            f'{acc} = {acc} + T.Cast("int32x{lanes}", {_halves(name + "_p", 32)})')


def _int16_products(u8: str, s8: str, lanes: int) -> str:
    """TVMScript of the 4 x `lanes` byte products u8 x s8 in int16 (exact: 255 x -128 fits), read as 2 x `lanes`
    int32 lanes of two products each."""
    return f'T.reinterpret("int32x{2 * lanes}", T.Cast("int16x{4 * lanes}", {u8}) * T.Cast("int16x{4 * lanes}", {s8}))'


def _halves(v: str, bits: int) -> str:
    """TVMScript of each lane of v (a signed integer vector of 2 x `bits`-bit lanes) as the sum of its two halves,
    each read as a signed `bits`-bit number: the low half sign-extended by two shifts, plus the high half."""
    return f"T.shift_right(T.shift_left({v}, {bits}), {bits}) + T.shift_right({v}, {bits})"


def stage_quads(cin: int, p: int, nv: int, origin: str, slot: str, blocks: str) -> str:
    """TVMScript that stages a task's pixel blocks as uint8 quads (x + 128; 4 channels of a pixel side by side) in
    xq [block slot, Cin/4, 8nv, 4], from x [Cin, p] int8: `blocks` is the loop header over the blocks (variable b),
    `origin` a block's first pixel, `slot` its place in xq. Channels past Cin (a partial last quad) are zeros, which
    meet zero weights. Quad-major: the 8-byte runs of 4 channel rows that consecutive pixel blocks read share cache
    lines, so each line is read while in L1 (block-major, a block touched a line in each of Cin rows: 36 KB at Cin
    576)."""
    nr, k4 = 8 * nv, -(-cin // 4)
    order = [r * 8 + px for px in range(8) for r in range(4)]

    def quad(q: str, v: int, n_rows: int) -> str:
        rows = [f"x[T.ramp((4 * ({q}) + {j}) * {p} + {origin} + {v * 8}, 1, 8)]" if j < n_rows else
                "T.broadcast(T.int8(0), 8)" for j in range(4)]
        return f"""
                    xq[T.ramp(({slot} * {k4} + {q}) * {nr * 4} + {v * 32}, 1, 32)] = T.reinterpret("uint8x32", T.bitwise_xor(
                        T.Shuffle([{", ".join(rows)}], {order}), T.broadcast(T.int8(-128), 32)))"""
    whole, part = divmod(cin, 4)
    stage = f"""
        for q in T.serial({whole}):
            {blocks}{deeper("".join(quad("q", v, 4) for v in range(nv)))}"""
    if part:
        stage += f"""
        {blocks}{"".join(quad(str(whole), v, part) for v in range(nv))}"""
    return stage


def qconv1x1_ubsw_source(cout: int, cin: int, p: int, nv: int, clamp: tuple[float, float] | None = None,
                         out_q: tuple[float, int, int, int] | None = None, dequantized: bool = False,
                         float_bias: bool = False, dot: str = "ubsw", bsr_blocks: int | None = None,
                         tiles: int = 1, lanes: int = 8, cores: int = 0, residual: bool = False,
                         wbits: int = 8) -> str:
    """The pointwise kernel for weights where u8 x s8 pairs cannot saturate (`ubsw_exact`, 7-bit weights): each
    task takes a chunk of pixel blocks (8nv pixels each) and a group of channel blocks. It first rewrites its
    pixels once as uint8 quads (x + 128; 4 channels of a pixel side by side: [block, Cin/4, 8nv, 4]), so that every
    channel block then reads one 32-byte vector per 8 pixels and quad, with no shuffles, for 6 `vpmaddubsw` against
    broadcast weight quads (`vpmaddwd` by ones widens the int16 pair sums). The int16 kernel above interleaves and
    sign-extends the same bytes again for every 6 channels. The epilogue is the same. With `dot="vnni"` each
    product is one `vpdpbusd` into the int32 accumulator instead (exact for any int8 weight; see `quad_dot`).

    With `bsr_blocks` (the stored block count) the weight is int8 BSR with 8 x 4 blocks (8 output channels x one
    quad of input channels): a channel block is a block-row of 8, and its reduction runs over the stored blocks only,
    each block's 8 row quads broadcast against the staged quad vector of its input channels.

    `tiles=2` (dense, 8-pixel blocks: nv=1) holds two channel blocks' 12 rows x 8 pixels in the registers instead
    of 6 x 16: the same 12 accumulators on half the pixels, so a map that is not whole 16-pixel blocks computes
    fewer overlapping pixels (49: 56 instead of 64), for 12 weight broadcasts per quad instead of 6. A tuning
    candidate with VNNI (`qconv1x1_knobs`); the packed weight is the same.

    A task stages its pixels quad by quad, each quad for all the chunk's pixel blocks in turn: kernel alone on Zen 4
    1.04-1.09x on the deep MobileNetV2 layers (Cin 384-960) and the int8 BSR 96x576x196 1.25-1.37x at 80-95%
    (its one-block time 7.0 -> 5.1 us) against block by block, all quads of a block in turn.

    Each accumulator starts at -offset (the zero point's sum and the int32 bias) rather than 0, so the store skips
    one subtract per 8 outputs: kernel alone on Zen 4, 1.02-1.09x on MobileNetV2's pointwise shapes (the short
    reductions most: 96x16x12544 int8 out 91 -> 84 us), the BSR kernel 1.02-1.04x. Each row's two 8-lane halves
    start from their own broadcast: one 16-lane broadcast made LLVM carry the accumulators as zmm pairs through the
    reduction, split and rejoined every step (0.55-0.66x on the deeper layers). `residual`: as `qconv1x1_source`'s.

    `wbits=4` (dense only): the weight is stored as int4 nibbles, two bytes a quad (`pack_quads_w4`), and each
    task widens its channel block's quads to int8 words in a local buffer before the block's pixels
    (`widen_quads`), so the reduction is the int8 kernel's."""
    nr, k4 = 8 * nv, -(-cin // 4)
    if wbits not in (4, 8) or wbits == 4 and bsr_blocks is not None:
        raise ValueError(f"the int8 pointwise quad kernel stores weights as int8 or (dense) int4, not {wbits}-bit")
    if tiles > 1 and (bsr_blocks is not None or nv != 1 and (lanes == 8 or nv > 4)):
        raise ValueError("paired channel blocks are for the dense kernel with 8 pixels (nv=1), or at most 32 with "
                         "16 lanes (nv <= 4)")
    if p < nr:  # (its last pixel block would start before the map)
        raise ValueError(f"the int8 pointwise kernel with {nr}-pixel blocks needs {nr} pixels or more, not {p}")
    if lanes not in (8, 16) or nr % lanes or lanes == 16 and dot == "ubsw":
        raise ValueError(f"int8 pointwise kernel with lanes={lanes}, nv={nv} ({nr}-pixel blocks), dot='{dot}': lanes "
                         "is 8, or 16 with the 'vnni' or 'exact' product and blocks of a multiple of 16 pixels")
    rows = MR if bsr_blocks is None else 8
    mt, cb = -(-cout // rows), -(-p // nr)
    trows, mg = rows * tiles, -(-mt // tiles)  # a register tile's rows; register tiles
    chunks, nblk = quad_chunks(cb, k4, nr)
    groups = max(1, min(mg, -(-8 // chunks)))  # enough tasks for the threads; each group re-reads its chunk once
    if bsr_blocks is not None and groups == 1 and mg % 2 == 0 and 0 < cores <= 2:
        chunks, nblk, groups = bsr_row_split(cb, k4, nr)
    bias_arg = f' bias: T.Buffer(({mt * rows},), "float32"),' if float_bias else ""
    c0 = f"T.min(b * {nr}, {p - nr})"
    off0 = f"off[T.min(c * {trows} + i, {mt * rows - 1})]"  # the accumulator starts at -offset (rows past Cout: any)
    if bsr_blocks is None:
        blk = "c" if tiles == 1 else f"T.min(c * {tiles} + i // {MR}, {mt - 1})"  # (past the last: not stored)
        q, wquad, reduce = "q", f"w4[({blk} * {k4} + q) * {MR} + i % {MR}]", f"for q in T.serial({k4}):"
        w_args = f'w4: T.Buffer(({mt * k4 * MR},), "int32"),'
        if wbits == 4:
            k4p = w4_quads(cin)
            wquad = f"wl[({'i // %d * %d + ' % (MR, k4p) if tiles > 1 else ''}q) * {MR} + i % {MR}]"
            w_args = f'wn: T.Buffer(({mt * k4p * MR * 2},), "int8"),'
    else:
        q, wquad = "indices[indptr[c] + j]", "data[(indptr[c] + j) * 8 + i]"
        reduce = "for j in T.serial(indptr[c + 1] - indptr[c]):"
        # the stored-block count symbolic (as in the float sparse kernels): one parsed kernel per layer shape
        w_args = ('data: T.Buffer(("ndata",), "int32"), indices: T.Buffer(("nnz",), "int32"),\n'
                  f'                  indptr: T.Buffer(({mt + 1},), "int32"),')

    stage = stage_quads(cin, p, nv, c0, "(b - b0)", f"for b in T.serial(b0, (t % {chunks} + 1) * {cb} // {chunks}):")
    # the accumulators: 8 lanes, one buffer [rows, nr]; 16 lanes, a buffer [rows, 16] per pixel vector (a buffer
    # over 1 KB goes to the heap, out of the registers)
    bufs = [("acc", trows * nr)] if lanes == 8 else [(f"acc{v}", trows * 16) for v in range(nr // 16)]
    decl = "".join(f"""
                {name} = T.decl_buffer(({size},), "int32", scope="global")""" for name, size in bufs)
    steps, init = "", ""
    for v in range(nr // lanes):
        acc = f"acc[T.ramp(i * {nr} + {v * 8}, 1, 8)]" if lanes == 8 else f"acc{v}[T.ramp(i * 16, 1, 16)]"
        xv = f"xq[T.ramp(((b - b0) * {k4} + {q}) * {nr * 4} + {v * 4 * lanes}, 1, {4 * lanes})]"
        wv = f'T.reinterpret("int8x{4 * lanes}", T.broadcast({wquad}, {lanes}))'
        steps += f"""
                            {acc} = {quad_dot(acc, xv, wv, dot, lanes)}"""
        init += f"""
                        {acc} = T.broadcast(-{off0}, {lanes})"""
    store = _tile_store(f"c * {trows} + i", c0, nv, p, clamp, out_q, dequantized, float_bias, " " * 24,
                        offset_in_acc=True, lanes=lanes, residual=residual)
    res_arg = f' res: T.Buffer(({cout * p},), "float32"),' if residual else ""
    wl_decl, widen_block = "", ""
    if wbits == 4:
        k4p = w4_quads(cin)
        wl_decl = f"""
        wl = T.decl_buffer(({tiles * k4p * MR},), "int32", scope="global")"""
        widen_block = f"""
            for tb in T.serial({tiles}):
                for j in T.serial({k4p * MR // 16}):
                    wl[T.ramp(tb * {k4p * MR} + j * 16, 1, 16)] = {
                        widen_quads("wn", f"T.min(c * {tiles} + tb, {mt - 1}) * {k4p * MR * 2} + j * 32")}"""
    return f"""
@T.prim_func(private=True)
def qconv1x1_{dot}(x: T.Buffer(({cin * p},), "int8"), {w_args}
                  off: T.Buffer(({mt * rows},), "int32"), mult: T.Buffer(({mt * rows},), "float32"),{bias_arg}{res_arg}
                  qp: T.Buffer((4,), "float32"),
                  out: T.Buffer(({cout * p},), "{'int8' if out_q and not dequantized else 'float32'}")):
    T.func_attr({{"tirx.noalias": True, "tirx.is_scheduled": True{', "op_pattern": 8' if bsr_blocks is not None else ''}}})
    for t in T.parallel({chunks * groups}):
        b0: T.let = (t % {chunks}) * {cb} // {chunks}
        xq = T.decl_buffer(({nblk * k4 * nr * 4},), "uint8", scope="global"){wl_decl}{stage}
        for c in T.serial((t // {chunks}) * {mg} // {groups}, (t // {chunks} + 1) * {mg} // {groups}):{widen_block}
            for b in T.serial(b0, (t % {chunks} + 1) * {cb} // {chunks}):{decl}
                for i in T.unroll({trows}):{init}
                {reduce}
                    for i in T.unroll({trows}):{steps}
                for i in T.unroll({trows}):
                    if c * {trows} + i < {cout}:{store}
"""


def pack_quads(wq: np.ndarray, mt: int) -> np.ndarray:
    """int8 W [Cout, Cin] -> [Cout/MR, Cin quads, MR] int32, each word the 4 bytes w[co, 4q:4q+4] (zero-padded
    rows and channels): one broadcast feeds `vpmaddubsw`."""
    cout, cin = wq.shape
    k4 = -(-cin // 4)
    w = np.zeros((mt * MR, 4 * k4), np.int8)
    w[:cout, :cin] = wq
    return np.ascontiguousarray(w.reshape(mt, MR, k4, 4).transpose(0, 2, 1, 3)).view(np.int32).reshape(-1)


def w4_quads(cin: int) -> int:
    """Input-channel quads a channel block of int4 quad weights stores: a multiple of 8, so its 6-channel rows
    widen in whole 16-word vectors."""
    return -(-(-(-cin // 4)) // 8) * 8


def nibble_quads(words: np.ndarray) -> np.ndarray:
    """int32 quad words of int4-valued bytes -> flat int8, two bytes of nibbles a word, its first byte in the low
    nibble of the first (`widen_quads` undoes it)."""
    q = np.ascontiguousarray(words, np.int32).reshape(-1).view(np.int8).reshape(-1, 4)
    return np.stack([nibbles(q[:, 0], q[:, 1]), nibbles(q[:, 2], q[:, 3])], -1).reshape(-1)


def pack_quads_w4(wq: np.ndarray, mt: int) -> np.ndarray:
    """int4-valued W [Cout, Cin] -> int8 [Cout/MR, w4_quads(Cin), MR, 2]: `pack_quads`' words as nibbles
    (`nibble_quads`), with the quads padded to w4_quads."""
    cout, cin = wq.shape
    return nibble_quads(pack_quads(np.pad(wq, ((0, 0), (0, 4 * w4_quads(cin) - cin))), mt))


def widen_quads(buf: str, base: str, words: int = 16) -> str:
    """`words` int32 quad words (4 int8 weights each) from the 2 * words bytes of int4 nibbles at buf[base:]
    (`pack_quads_w4`): low and high nibbles masked apart, interleaved byte by byte, then sign-extended byte-wise
    ((v ^ 8) - 8); with GFNI and AVX512-VBMI LLVM makes 4 instructions of it (`vgf2p8affineqb`, `vpermt2b`)."""
    nb = 2 * words
    b = f"{buf}[T.ramp({base}, 1, {nb})]"
    lo = f"T.bitwise_and({b}, T.broadcast(T.int8(15), {nb}))"
    hi = f"T.bitwise_and(T.shift_right({b}, T.broadcast(T.int8(4), {nb})), T.broadcast(T.int8(15), {nb}))"
    both = f"T.Shuffle([{lo}, {hi}], {[j for i in range(nb) for j in (i, i + nb)]})"
    return (f'T.reinterpret("int32x{words}", T.bitwise_xor({both}, T.broadcast(T.int8(8), {2 * nb}))'
            f' - T.broadcast(T.int8(8), {2 * nb}))')


def widen_nibbles_source(dtype: str = "int8") -> str:
    """TVMScript that widens a packed int8 weight stored as nibbles (`nibble_quads`: half its bytes) back to its
    bytes, or the int32 words of 4 of them (`dtype`), 64 bytes a step (`widen_quads`; its length symbolic: one
    function for every layer; 64 bytes at least and whole words, the last step overlapping the one before where
    they are not a multiple of 64: the same bytes written twice), in parallel: a load-time kernel
    (`prepared.py`; its last argument the unread seed) for int4 weights of the kernels that read a whole int8
    weight (the GEMMs, the flat convs), which stay nibbles in the artifact (`weight_const`)."""
    words = dtype == "int32"
    step = 16 if words else 64  # (w's elements a step)
    value = widen_quads("wn", "T.min(j * 32, nh - 32)")  # (nh: half w's bytes)
    attrs, read_seed = prepared.kernel_head()
    return f"""
@T.prim_func(private=True)
def widen_nibbles(wn_h: T.handle, seed: T.Buffer((1,), "int8"), w_h: T.handle):
{attrs}
    nh, nw = T.int32(), T.int32()
    wn = T.match_buffer(wn_h, (nh,), "int8")
    w = T.match_buffer(w_h, (nw,), "{dtype}")
{read_seed}
    for j in T.parallel((nw + {step - 1}) // {step}):
        w[T.ramp(T.min(j * {step}, nw - {step}), 1, {step})] = {
            value if words else f'T.reinterpret("int8x64", {value})'}
"""


def weight_const(bb, packed: np.ndarray):
    """A packed weight (int8 bytes, or int32 words of 4) as a Relax value: a constant, or when lowering for an
    artifact (`prepared.load_time_weights`) where every byte fits int4 (64 bytes or more, whole words: an int4 3x3
    conv of 64 channels on AVX2's 6-channel panels is 28512 bytes, not whole 64-byte steps) the nibbles as the
    constant and `widen_nibbles_source` making the weight when the artifact is loaded, so an int4 layer stays 4
    bits a value in it."""
    from tvm import relax
    data = packed.reshape(-1).view(np.int8)
    if not prepared.active() or data.size % 4 or data.size < 64 or not fits_int4(data):
        return relax.const(packed)
    dtype = str(packed.dtype)
    gv = bb.add_func(parse_kernel(widen_nibbles_source(dtype)), f"widen_nibbles_{dtype}")
    return prepared.load_time_call(bb, gv, [relax.const(nibble_quads(data.view(np.int32)))],
                                   relax.TensorType((packed.size,), dtype))


def fits_int4(w: np.ndarray) -> bool:
    """int4 weights (or any that fit [-8, 7]): stored as nibbles, losslessly."""
    return bool(w.min() >= -8 and w.max() <= 7)


def nibbles(lo: np.ndarray, hi: np.ndarray) -> np.ndarray:
    """Two int4 arrays (values in [-8, 7]) as one int8 array: `lo` in the low nibble, `hi` in the high one."""
    if not (fits_int4(lo) and fits_int4(hi)):
        raise ValueError("int4 packing needs weights in [-8, 7]")
    u_lo, u_hi = lo.astype(np.uint8) & 0xF, hi.astype(np.uint8) & 0xF
    return (u_lo | (u_hi << 4)).astype(np.uint8).view(np.int8)


def pack_pairs(wq: np.ndarray, mt: int) -> np.ndarray:
    """int8 W [Cout, Cin] -> the stored weight [Cout/MR, Cin pairs (kpad), MR, 2] as int8 bytes; zero-padded rows
    and channels."""
    cout, cin = wq.shape
    k4 = kpad(cin)
    w = np.zeros((mt * MR, 2 * k4), np.int8)
    w[:cout, :cin] = wq
    return np.ascontiguousarray(w.reshape(mt, MR, k4, 2).transpose(0, 2, 1, 3)).reshape(-1)


def int8_kernels_available(target) -> bool:
    return int8_dot(target) is not None


def int8_dot(target) -> str | None:
    """The u8 x s8 quad product graphopt's int8 kernels use on `target`: "vnni" (`vpdpbusd`: AVX-VNNI, or
    AVX512-VNNI with 256-bit forms, AVX512-VL), "ubsw" (AVX2), or None (no int8 kernels: TVM's generic lowering)."""
    from tvm.target import codegen
    try:
        if codegen.llvm_cpu_has_features(["avxvnni"], target) or \
                codegen.llvm_cpu_has_features(["avx512vnni", "avx512vl"], target):
            return "vnni"
        return "ubsw" if codegen.llvm_cpu_has_features(["avx2"], target) else None
    except Exception:
        return None


def qconv1x1_applies(x_shape) -> bool:
    """Whether the int8 pointwise kernels take a map of x_shape's pixels (their last 8-pixel block overlaps the one
    before it, so fewer than 8 would read and write before the buffers)."""
    return int(x_shape[2]) * int(x_shape[3]) >= 8


def epilogue_constants(wq: np.ndarray, w_scales: np.ndarray, bias: np.ndarray | None, sx: float, zx: int, mt: int,
                       out_q=None) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """Per output channel (padded to mt * MR): the accumulator offset zx * sum(w) - round(bias / (sx * w_scale))
    (int32: the bias is quantized at the accumulator's scale, as ONNX QLinearConv and TFLite store it, at most half
    an accumulator step from the float bias) and the multiplier sx * w_scale (float32, in the output's grid steps
    when the store quantizes: out_q). The store computes (acc - offset) * multiplier. When some channel's bias does
    not fit int32 at that scale (a near-zero weight scale), the bias stays float: third value, added after the
    multiply (else None)."""
    cout = wq.shape[0]
    scale = np.zeros(mt * MR, np.float64)
    scale[:cout] = np.asarray(w_scales, np.float64) * float(sx)
    off = np.zeros(mt * MR, np.int64)
    off[:cout] = int(zx) * wq.reshape(cout, -1).astype(np.int64).sum(1)
    mult, _ = in_grid_steps(scale.astype(np.float32), None, out_q)
    if bias is None:
        return off.astype(np.int32), mult.astype(np.float32), None
    b = np.zeros(mt * MR, np.float64)
    b[:cout] = bias
    with np.errstate(divide="ignore", invalid="ignore"):
        b_int = np.where(scale > 0, np.round(b / np.where(scale > 0, scale, 1.0)), 0)
    if np.abs(off - b_int).max(initial=0) < 2 ** 31:
        return (off - b_int.astype(np.int64)).astype(np.int32), mult.astype(np.float32), None
    _, fb = in_grid_steps(mult, b.astype(np.float32), out_q)
    return off.astype(np.int32), mult.astype(np.float32), fb.astype(np.float32)


def quad_weights(w2: np.ndarray, dot: str) -> bool:
    """Whether the int8 pointwise weight w2 [Cout, Cin] runs on the quad kernels (`qconv1x1_ubsw_source`) with
    quad product `dot`: every weight with VNNI, 7-bit ones on AVX2 (no u8 x s8 pair can saturate), int4 ones
    (stored as nibbles, widened per task: `qconv1x1_ubsw_source`'s wbits) on both."""
    return dot != "ubsw" or fits_int4(w2) or ubsw_exact(np.pad(w2, ((0, 0), (0, w2.shape[1] % 2))))


def qconv1x1_knobs(p: int, dot: str | None = None, lanes: int = 8, half_width: bool = False) -> tuple[dict, list[dict]]:
    """The rule's pixel tile of the dense int8 pointwise kernels (`nv` vectors of 8 pixels) and the candidates
    tuning may measure (`knobs.py`): on maps of 16 pixels or more, 16 (the rule) or 8; on smaller ones 8 only.
    Inside int7 MobileNetV2 the 8-pixel tile's 19 layers summed to 0.99x the rule's in two paired measurements.
    With VNNI (`dot`) also 8 pixels x two channel blocks (`tiles`, see `qconv1x1_ubsw_source`): kernel alone on
    Zen 4 it ran at 0.92-1.14x the rule's speed by layer (MobileNetV2's 960x160x49 and 64x384x196 1.13-1.14x,
    320x960x49 and 160x960x49 0.92x), so it is a candidate tuning measures, not the rule.

    With 16 lanes (VNNI on a full-width AVX-512 CPU, or the exact product) the rule takes 512-bit `vpdpbusd` on
    16-pixel vectors, 32 pixels a tile (12 zmm accumulators; 16 on maps under 32 pixels): kernel alone (Emerald
    Rapids, 2 threads, float out, interleaved) 0.50-0.80x the 8-lane rule's time on MobileNetV2's pointwise shapes
    from 3136 pixels down to 49 (960x160x49 40 -> 25 us, 1280x320x49 93 -> 55, 576x96x196 48 -> 33), 0.93 on the
    memory-bound 96x16x12544. One 16-pixel vector (6 accumulators) took 0.78-1.14x; 64 pixels 0.64-0.96x; two
    channel blocks (12 rows) of 16 or 32 pixels, 0.51-1.10x by layer, are candidates with the 8-lane rule.

    `half_width` (`rules.half_width_vnni`: Zen 4, whose float kernels keep 8 lanes): one 16-pixel zmm vector a row
    (6 accumulators) is the rule. Kernel alone on Zen 4 (2 threads, int8 out) against 8-pixel ymm pairs it took
    0.85-0.97x the time on 96x16x12544, 144x24x3136, 576x96x196, 960x160x49, 384x64x196 and 192x32x784 (the
    short reductions most: a 16-byte narrowing store per 16 outputs instead of two 8-byte ones); whole int8
    MobileNetV2 0.96x, EfficientNet-Lite0 0.97-0.98x (interleaved rounds). 32-pixel tiles measured as the 8-lane
    rule."""
    pair = [{"nv": 1, "tiles": 2}] if dot == "vnni" else []
    if dot == "vnni" and half_width and p >= 16:
        rule = {"nv": 2, "lanes": 16}
        return rule, [rule, {"nv": 2}, {"nv": 1}, *pair] + ([{"nv": 4, "lanes": 16}] if p >= 32 else [])
    if wide_quads(dot, lanes) and p >= 16:
        wide = [{"nv": 4, "lanes": 16}] if p >= 32 else []
        wide += [{"nv": 2, "lanes": 16}, {"nv": 2, "lanes": 16, "tiles": 2}]
        wide += [{"nv": 4, "lanes": 16, "tiles": 2}] if p >= 32 else []
        return wide[0], [*wide, {"nv": 2}]
    if p < 16:
        return {"nv": 1}, [{"nv": 1}] + pair
    return {"nv": 2}, [{"nv": 2}, {"nv": 1}] + pair


BSR_QUADS_L2 = 256 * 1024  # bytes of staged quads a task of the row-split int8 BSR kernel may hold


def bsr_row_split(cb: int, k4: int, nr: int) -> tuple[int, int, int]:
    """(chunks, longest chunk, channel groups) of the int8 BSR pointwise kernel where `quad_chunks` leaves one channel
    group (chunks >= 8: deep inputs on small maps, 96x576x196) on a target of two cores, with an even count of 8-row
    blocks: two groups, each staging as few chunks as keep its quads within `BSR_QUADS_L2` (one on the shapes it
    takes in the zoo), so each thread stages the whole map once, reading whole rows of x, and writes whole output
    rows. With one group the two threads took a contiguous run of the one-block chunks each, so they wrote the two
    halves of every output row (the split `quad_chunks` describes) and staged 16 bytes from each of Cin rows a
    block. Kernel alone (Zen 4, two threads, shuffled rounds, a fresh process each): 96x576x196 at 90% 0.90-0.97x
    (three processes), at 80% 0.78-0.96x, 112x672x196 at 80% 0.94-0.95x; the old split ran in two modes, fast or
    ~1.3x slower, the row split in one. At one thread the one-chunk staging alone took the kernel to 0.70x. An odd
    count of row blocks splits unevenly (24x144x3136's 3: 1.36-1.41x the time; 40x240x784's 5: 0.57x and 1.09x), so
    those keep `quad_chunks`; 32x192x784's 4 measured 0.51-1.02x. The dense int8 kernel, which re-reads each staged
    block for every channel block, gained less from the same split (0.93-0.97x on 96x576x196, 0.96-1.06x on
    112x672x196) and keeps `quad_chunks`, as do other core counts (unmeasured)."""
    chunks = max(1, -(-cb * k4 * 4 * nr // BSR_QUADS_L2))
    return chunks, -(-cb // chunks), 2


def bsr_pixels16(p: int, dot: str, lanes: int) -> bool:
    """Whether the int8 BSR pointwise kernel takes 16-pixel blocks in one 512-bit vector (`vpdpbusd` zmm: 16 lanes,
    the VNNI or exact product, 16 pixels or more) instead of 8. Kernel alone (Emerald Rapids, 2 threads, 80 / 90%
    sparse 8x4 blocks, MobileNetV2's shapes) 0.53-1.37x the 8-pixel kernel's time by layer, median ~0.85; 16
    pixels as two 8-lane vectors 0.62-1.37x, 32 pixels 0.81-2.01x. In the whole sparse80+int8 MobileNetV2 (every
    layer the layout pass made sparse on it) 0.90-1.03x, median 0.96, over 10 interleaved rounds; outputs
    identical."""
    return wide_quads(dot, lanes) and p >= 16


def emit_qconv1x1(bb, xq, wq: np.ndarray, w_scales: np.ndarray, bias: np.ndarray | None, sx: float, zx: int,
                  x_shape, clamp: tuple[float, float] | None, out_q: tuple[float, int, int, int] | None,
                  dequantized: bool = False, dot: str = "ubsw", sparse: str = "", lanes: int = 8, cores: int = 0,
                  half_width: bool = False, residual=None):
    """Pointwise qconv2d of xq int8 [N, Cin, H, W] -> [N, Cout, H, W] (the kernel loops over the samples): int8 on out_q's grid (or the floats of that
    grid with `dequantized`), else float32. `dot` is the target's quad product (`int8_dot`). `sparse` (the layout
    select-sparse-layout chose): "bsr8x4", the weight goes in as int8 BSR with 8 x 4 blocks (Cout % 8 == 0, and the
    quad product must be exact for it: VNNI or `ubsw_exact`); "csr", as pair CSR on the `vpmaddwd` kernel (exact
    for any int8 weight; H * W >= 16). `lanes`: the target's vector width in int32 lanes (`rules.vector_lanes`);
    with 16 the dense quad kernel runs 512-bit `vpdpbusd` (`qconv1x1_knobs`). `cores`: the target's (0: not
    known), for how the int8 BSR kernel splits its work (`bsr_row_split`). `half_width`: see `qconv1x1_knobs`.
    `residual`: a float Relax value of the output's shape added in the store before the clamp (a residual add;
    float output, dense layout only)."""
    from tvm import relax

    n, cin, h, w = (int(d) for d in x_shape)
    cout, p = int(wq.shape[0]), h * w
    mt = -(-cout // MR)
    w2 = wq.reshape(cout, cin)
    wbits = 4 if fits_int4(w2) else 8
    ubsw = quad_weights(w2, dot)  # else the pair kernel: full-range int8 weights without VNNI
    if sparse not in ("", "bsr8x4", "csr"):
        raise ValueError(f"no int8 sparse pointwise kernel for layout '{sparse}' (bsr8x4 or csr)")
    if residual is not None and (sparse or out_q is not None or dequantized):
        raise ValueError("a residual add joins the dense int8 pointwise kernel with a float output only")
    if not qconv1x1_applies(x_shape):  # (its last 8-pixel block overlaps the one before: it would start before 0)
        raise ValueError(f"the int8 pointwise kernels need 8 pixels or more, not {p}")
    quads = sparse == "bsr8x4" or (ubsw and not sparse)  # the quad kernels read x + 128 (uint8)
    consts = epilogue_constants(wq, w_scales, bias, sx, zx + 128 * quads, mt, out_q)
    tag = (f"{cout}x{cin}x{p}" + ("" if clamp is None else "_clamp") + ("_q" if out_q else "") + ("dq" if dequantized else "")
           + ("_res" if residual is not None else "")
           + ("_w4" if wbits == 4 and not sparse else "") + (f"_n{n}" if n > 1 else ""))
    site = None
    if not sparse:
        rule, cands = qconv1x1_knobs(p, dot if ubsw else None, lanes, half_width)
        site = Site("qconv1x1", f"{'quad_' + dot if ubsw else 'pairs'}|{tag}", rule, cands, n * cout * cin * p)
        knobs = pick(site)
        nv, tiles, kl = knobs["nv"], knobs.get("tiles", 1), knobs.get("lanes", 8)
    if sparse == "csr":
        from graphopt.targets.tvm.cpu.sparse import csr_qconv1x1_source, csr_qpairs, qcsr_tile, qcsr_weight_consts
        v = qcsr_tile(p)
        pw, cols, ptr = csr_qpairs(w2, v)
        src = batch_source(csr_qconv1x1_source(cout, cin, p, clamp, out_q, dequantized, consts[2] is not None,
                                               v, dot), n, ["x", "out"])
        gv = bb.add_func(parse_kernel(src),
                         f"qconv1x1_csr{'_vnni' if dot == 'vnni' else ''}_{tag}_pairs{len(pw)}")
        weights = qcsr_weight_consts(pw, cols, ptr)
        consts = [c if c is None else c[:cout] for c in consts]
    elif sparse:
        import torch

        from graphopt.ir.sparse_ops import to_bsr
        k4 = -(-cin // 4)
        wpad = np.zeros((cout, 4 * k4), np.int8)
        wpad[:, :cin] = w2
        bsr = to_bsr(torch.from_numpy(wpad), (8, 4))
        wide = bsr_pixels16(p, dot, lanes)
        src = batch_source(qconv1x1_ubsw_source(cout, cin, p, 2 if wide else 1, clamp, out_q, dequantized,
                                                consts[2] is not None, dot, bsr.nnzb, lanes=16 if wide else 8,
                                                cores=cores),
                           n, ["x", "out"])
        gv = bb.add_func(parse_kernel(src),
                         f"qconv1x1_bsr_{dot}{'_v16' if wide else ''}_{tag}_nnz{bsr.nnzb}")
        weights = [relax.const(np.ascontiguousarray(bsr.data.numpy()).view(np.int32).reshape(-1)),
                   relax.const(bsr.indices.numpy()), relax.const(bsr.indptr.numpy())]
        consts = [c if c is None else c[:cout] for c in consts]
    elif ubsw:
        src = qconv1x1_ubsw_source(cout, cin, p, nv, clamp, out_q, dequantized, consts[2] is not None, dot,
                                   tiles=tiles, lanes=kl, residual=residual is not None, wbits=wbits)
        packed = pack_quads_w4(w2, mt) if wbits == 4 else pack_quads(w2, mt)
        name = f"qconv1x1_{dot}_{tag}"
    else:
        src = qconv1x1_source(cout, cin, p, nv, clamp, out_q, dequantized, consts[2] is not None,
                              residual is not None)
        packed, name = pack_pairs(w2, mt), f"qconv1x1_{tag}"
    if not sparse:
        gv = bb.add_func(parse_kernel(batch_source(src, n, ["x", "out"] + (["res"] if residual is not None else []))),
                         name)
        bind(site, gv.name_hint)
        weights = [relax.const(packed)]
    dtype = "int8" if out_q and not dequantized else "float32"
    flat = lambda size: (n, size) if n > 1 else (size,)  # noqa: E731  (batch_source's per-sample buffers)
    y = bb.emit(relax.call_tir(gv, [bb.emit(relax.op.reshape(xq, flat(cin * p))), *weights,
                                    *(relax.const(c) for c in consts if c is not None),
                                    *([bb.emit(relax.op.reshape(residual, flat(cout * p)))] if residual is not None
                                      else []),
                                    relax.const(store_params(clamp, out_q))],
                               relax.TensorType(flat(cout * p), dtype)))
    return bb.emit(relax.op.reshape(y, (n, cout, h, w)))


def emit_im2col_qconv(bb, xq, wq: np.ndarray, w_scales: np.ndarray, bias: np.ndarray | None, sx: float, zx: int,
                      x_shape, stride: int, padding, clamp, out_q, dequantized: bool = False, dot: str = "ubsw",
                      dilation: int = 1, lanes: int = 8, half_width: bool = False):
    """A dense k x k qconv2d of xq int8 [N, Cin, H, W] as int8 im2col (the input's zero point outside the image, so
    padding is exact on the grid) then the pointwise int8 kernel over the [Cin * k * k, OH * OW] columns, with its
    epilogue (bias, clamp, the next quantize). TVM's generic int8 conv took 4-6 ms for each ResNet-18 3x3 layer
    here, twice the fp32 model's time. `dilation`: the taps that many pixels apart (atrous convs); `lanes` and
    `half_width`: as `emit_qconv1x1`'s."""
    from tvm import relax

    from graphopt.targets.tvm.cpu.conv import emit_im2col
    n, (cout, _, kh, kw) = int(x_shape[0]), (int(d) for d in wq.shape)
    # tap-major columns: adjacent rows are channels 2m, 2m + 1 at one tap, the pairs int8s weights bound
    col, oh, ow = emit_im2col(bb, xq, x_shape, kh, kw, stride, padding, np.int8(zx), tap_major=True,
                              dilation=dilation)
    cols = int(x_shape[1]) * kh * kw
    y = emit_qconv1x1(bb, col, wq.transpose(0, 2, 3, 1).reshape(cout, cols), w_scales, bias, sx, zx,
                      (n, cols, oh, ow), clamp, out_q, dequantized, dot, lanes=lanes, half_width=half_width)
    return bb.emit(relax.op.reshape(y, (n, cout, oh, ow)))


NR_GEMM = 16  # output columns per tile: two int32x8 accumulators per row


def qgemm_source(m: int, k: int, n: int, float_bias: bool = False) -> str:
    """TVMScript of y[M, N] = dequant(a[M, K] @ W^T) for a int16 (int8 values, widened by the producing quantize)
    and W (int8, so the artifact stays small) packed as pairs per panel of 16 columns: per reduction step one
    32-bit broadcast of a[m, 2k:2k+2] and two sign-extending panel loads (`vpmovsxbw`) feed 12 `vpmaddwd` (6 rows x
    16 columns); the epilogue removes the zero point, adds the int32 bias and scales per column in registers.
    Tasks are row-tile-major (`_qgemm_frame`); the last row tile overlaps the one before it (M >= 6, any M % 6)."""
    kp, nt = k // 2, n // NR_GEMM

    def product(h: int, r0: str, acc: str, panel: str) -> str:
        return (f'{acc} + T.call_llvm_pure_intrin("int32x8", "llvm.x86.avx2.pmadd.wd", '
                f'T.Cast("int16x16", wp[T.ramp(((({panel}) * {kp} + kk) * 2 + {h}) * 16, 1, 16)]), '
                f'T.reinterpret("int16x16", T.broadcast(T.reinterpret("int32", a[T.ramp(({r0} + i) * {k} + 2 * kk, 1, 2)]), 8)))')
    return _qgemm_frame("qgemm", m, n, f'a: T.Buffer(({m * k},), "int16"), wp: T.Buffer(({nt * kp * 2 * 16},), "int8")',
                        kp, product, float_bias)


def _qgemm_frame(name: str, m: int, n: int, inputs: str, steps_k: int, product, float_bias: bool,
                 lanes: int = 8, panels: int = 1) -> str:
    """The int8 GEMM around a reduction step: 6 x (16 x `panels`) int32 tiles in registers, row-tile-major tasks
    (the last row tile overlaps the one before it), the epilogue (acc - offset) * multiplier (+ float bias) per
    column. product(h, r0, acc, panel) is the int32 x lanes vector that step kk makes of acc, row i's part h
    (columns lanes * h .. lanes * h + lanes - 1 of the panel: two halves at 8 lanes, the whole 16 at 16) of the
    tile at row r0 and weight panel `panel` (16 columns; a task takes panels P * panels .. P * panels + panels - 1,
    each in an accumulator buffer of its own, 384 bytes).

    Row-tile-major, the threads (contiguous runs of tasks) split the rows and each writes whole output rows; panel-
    major (each panel reused from L2 by every row tile) they wrote the two halves of every row and ran 1.02-1.10x
    slower on MiniLM's shapes and 512^3 (as `quad_chunks` found for the pointwise kernels; the fp32 GEMM, at its
    FMA peak, measured the same either way)."""
    mt, nt = -(-m // MR), n // (NR_GEMM * panels)
    r0 = f"T.min((t // {nt}) * {MR}, {m - MR})"
    steps, store, parts = "", "", NR_GEMM // lanes
    for j in range(panels):
        panel = f"{panels} * (t % {nt}) + {j}" if panels > 1 else f"t % {nt}"
        col = f"({panel}) * {NR_GEMM}"
        for h in range(parts):
            acc = f"acc{j}[T.ramp(i * 16 + {h * lanes}, 1, {lanes})]"
            steps += f"""
                {acc} = {product(h, r0, acc, panel)}"""
            cols = f"T.ramp({col} + {h * lanes}, 1, {lanes})"
            store += f"""
            out[T.ramp(({r0} + i) * {n} + {col} + {h * lanes}, 1, {lanes})] = (T.Cast("float32x{lanes}", {acc}
                - off[{cols}]) * mult[{cols}]""" + (f" + bias[{cols}])" if float_bias else ")")
    tile = _gemm_tile(f"for kk in T.serial({steps_k}):", steps, store, " " * 8, tuple(f"acc{j}" for j in range(panels)))
    return f"""
@T.prim_func(private=True)
def {name}({inputs},
          off: T.Buffer(({n},), "int32"), mult: T.Buffer(({n},), "float32"),{' bias: T.Buffer((' + str(n) + ',), "float32"),' if float_bias else ''}
          out: T.Buffer(({m * n},), "float32")):
    T.func_attr({{"tirx.noalias": True, "tirx.is_scheduled": True}})
    for t in T.parallel({mt * nt}):{tile}
"""


def _gemm_tile(reduce: str, steps: str, store: str, pad: str, names: tuple[str, ...] = ("acc",)) -> str:
    """TVMScript of the int8 GEMMs' 6 x 16 int32 register tiles at indent `pad`, one accumulator buffer per name
    (each at most 1 KB: TVM puts larger buffers on the heap, where they are not kept in registers): zeroed, the
    reduction loop `reduce` (a `for` header) over the 6 rows' `steps` (written 8 deeper than pad), then the rows'
    `store` (4 deeper)."""
    decl = "".join(f"""
{pad}{a} = T.decl_buffer(({MR * 16},), "int32", scope="global")""" for a in names)
    zero = "".join(f"""
{pad}    {a}[T.ramp(i * 16, 1, 16)] = T.broadcast(T.int32(0), 16)""" for a in names)
    return f"""{decl}
{pad}for i in T.unroll({MR}):{zero}
{pad}{reduce}
{pad}    for i in T.unroll({MR}):{steps}
{pad}for i in T.unroll({MR}):{store}"""


def pack_gemm_pairs(wq: np.ndarray) -> np.ndarray:
    """int8 W [N, K] (N % 16 == 0, K even) -> int8 [N/16, K/2, 2 halves, 8 columns, 2 (k, k+1)]."""
    n, k = wq.shape
    w = wq.astype(np.int8).reshape(n // NR_GEMM, 2, 8, k // 2, 2)  # panel, half, column, pair, k
    return np.ascontiguousarray(w.transpose(0, 3, 1, 2, 4)).reshape(-1)


def ubsw_exact(wq: np.ndarray) -> bool:
    """Whether `vpmaddubsw` (u8 x s8, the two products of a pair summed in int16 with saturation) is exact for this
    weight [N, K] against any u8 activations: per column and pair (2j, 2j+1), 255 x the positive weights' sum must
    stay <= 32767 and 255 x the negative ones' <= 32768, i.e. each sum <= 128 in magnitude. True for any weight in
    [-64, 64] (`quantize{weights=int7}`); full-range int8 weights usually break it somewhere."""
    n, k = wq.shape
    if k % 2:
        return False
    w = wq.astype(np.int32).reshape(n, k // 2, 2)
    return bool(np.clip(w, 0, None).sum(2).max(initial=0) <= 128 and (-np.clip(w, None, 0)).sum(2).max(initial=0) <= 128)


def qgemm_ubsw_source(m: int, k: int, n: int, float_bias: bool = False, dot: str = "ubsw", lanes: int = 8,
                      panels: int = 1) -> str:
    """TVMScript of y[M, N] = dequant(a[M, K] @ W^T) with a as uint8 (the int8 activation + 128, written by the
    producing quantize) and W int8 packed as quads per panel of 16 columns: per reduction step of 4 one 32-bit
    broadcast of a[m, 4k:4k+4] and two 32-byte panel loads feed 12 `vpmaddubsw` (32 multiply-adds each, pairs
    summed in int16: exact when `ubsw_exact` holds) and 12 `vpmaddwd` by ones (int16 pairs -> int32). Twice the
    multiply-adds per instruction of the int16 kernel and no sign-extending loads: on AVX2 without VNNI the
    vector pipes, not the multipliers, bound the int16 kernel. The epilogue is `qgemm_source`'s (its offsets
    include 128 x sum(w) for the shifted activations). With `dot="vnni"` one `vpdpbusd` per 32 bytes replaces the
    pair of instructions and any int8 weight is exact (`quad_dot`); with `lanes=16` (VNNI on a full-width AVX-512
    CPU) one 64-byte load and one 512-bit `vpdpbusd` per row take the panel's 16 columns at once (the same
    packing: its two halves lie side by side). Kernel alone, 8 -> 16 lanes (Emerald Rapids, 2 threads,
    interleaved): 512^3 447 -> 433 us, 128x384x1536 235 -> 225, 128x1536x384 269 -> 240.

    `panels`: 16-column panels per task (`gemm_panels`), each with accumulators of its own: with 16 lanes, 6 rows
    x 4 panels keep 24 zmm accumulators (of 32 registers) in flight where one panel kept 6, whose chains of
    dependent `vpdpbusd` (several cycles each) held the kernel near 300 G MAC/s on two cores: with 4 panels it
    reached 480-520 (Emerald Rapids issues two 512-bit `vpdpbusd` a cycle, ~660 G at its clock; an earlier
    session's "370 G peak" was the narrow tile's bound). Kernel
    alone, 1 -> 4 panels (2 threads, interleaved, hot operands): 512^3 447 -> 280 us (258 in another run),
    128x384x1536 263 -> 162, 128x1536x384 271 -> 210, 128x384x384 57 -> 32, 384x768x768 699 -> 386; 2 panels
    took 0.68-0.77x, 8 rows x 2 panels 0.55-0.77x."""
    kq, nt = k // 4, n // NR_GEMM

    def product(h: int, r0: str, acc: str, panel: str) -> str:
        quad = (f'T.reinterpret("uint8x{4 * lanes}", T.broadcast(T.reinterpret("int32", '
                f'a[T.ramp(({r0} + i) * {k} + 4 * kk, 1, 4)]), {lanes}))')
        return quad_dot(acc, quad, f"wp[T.ramp((({panel}) * {kq} + kk) * 64 + {h * 4 * lanes}, 1, {4 * lanes})]", dot,
                        lanes)
    return _qgemm_frame(f"qgemm_{dot}", m, n, f'a: T.Buffer(({m * k},), "uint8"), wp: T.Buffer(({nt * kq * 2 * 32},), "int8")',
                        kq, product, float_bias, lanes, panels)


def gemm_panels(n: int, lanes: int) -> int:
    """16-column panels per task of the quad GEMM (`qgemm_ubsw_source`): with 16 lanes 4 where they divide N's
    panels, else 2, else 1; 8-lane CPUs keep 1 (two accumulator halves a panel already; not measured wider)."""
    nt = n // NR_GEMM
    if lanes < 16:
        return 1
    return next(p for p in (4, 2, 1) if nt % p == 0)


def pack_gemm_quads(wq: np.ndarray) -> np.ndarray:
    """int8 W [N, K] (N % 16 == 0, K % 4 == 0) -> int8 [N/16, K/4, 2 halves, 8 columns, 4 (k .. k+3)]."""
    n, k = wq.shape
    w = wq.astype(np.int8).reshape(n // NR_GEMM, 2, 8, k // 4, 4)  # panel, half, column, quad, k
    return np.ascontiguousarray(w.transpose(0, 3, 1, 2, 4)).reshape(-1)


def qgemm_applies(m: int, k: int) -> bool:
    """Row tiles to fill (batch-1 GEMV keeps TVM's kernel) and whole K pairs."""
    return m >= MR and k % 2 == 0


QBMM_DOTS = ("vnni", "exact")  # the quad products exact for any int8 bytes (`quad_dot`)


def qbmm_applies(a_shape, b_shape, dot: str | None) -> str:
    """Why an activation x activation int8 matmul a [..., M, K] @ b [..., K, N] cannot take `qbmm_source` ("" if
    it can): equal batch dims, K a multiple of 4, at least 6 rows and 16 columns, an exact quad product."""
    if dot not in QBMM_DOTS:
        return "no exact int8 quad product on this target (VNNI)"
    if len(a_shape) < 2 or len(b_shape) != len(a_shape) or tuple(a_shape[:-2]) != tuple(b_shape[:-2]):
        return f"batch dims differ ({list(a_shape)} @ {list(b_shape)}): broadcasting matmuls keep the generic path"
    m, k, n = int(a_shape[-2]), int(a_shape[-1]), int(b_shape[-1])
    if k % 4 or m < MR or n < 16:
        return f"shape {m}x{k}x{n}: the kernel needs K % 4 == 0, M >= {MR}, N >= 16"
    return ""


def qbmm_source(bt: int, m: int, k: int, n: int, dot: str = "vnni") -> str:
    """out[b] = ((a[b] - za) @ (b[b] - zb)) * scale for int8 a [B, M, K], b [B, K, N] known only at run time
    (attention's scores and outputs), float32 out. Each task takes a batch and a run of 6-row tiles: it packs the
    batch's b into quads of 4 inputs x 16 columns (a byte shuffle per 4 rows of 16) with each column's sum (one
    quad product by ones), sums its rows of a + 128 the same way, and runs the int8 GEMM's 6 x 16 register tile:
    a + 128 (uint8) broadcast per quad against the packed columns, one quad product per 8 columns. The zero points
    come off in the store, exactly in int32: sum (a - za)(b - zb) = sum (a + 128) b - zb * rowsum(a + 128) -
    (128 + za) * colsum(b) + K (128 + za) zb. zp holds (za, zb), scale the float multiplier."""
    if dot not in QBMM_DOTS:
        raise ValueError(f"qbmm needs an exact quad product ({', '.join(QBMM_DOTS)}), not '{dot}'")
    k4, mt, npn = k // 4, -(-m // MR), -(-n // 16)
    runs = max(1, min(mt, -(-16 // bt)))  # tasks per batch: 16+ tasks in all, each packing b once
    order = [j * 16 + c for c in range(16) for j in range(4)]
    row = f"(bi * {m} + r0 + i)"  # the row of a (and out) that tile row i is
    packed = lambda h: f'T.reinterpret("int8x32", bq[T.ramp((pn * {k4} + q) * 16 + {h * 8}, 1, 8)])'  # noqa: E731
    cs8, acc8 = "cs[T.ramp(pn * 16 + {h}, 1, 8)]", "acc[T.ramp(i * 16 + {h}, 1, 8)]"
    rows = ", ".join(f"b[T.ramp((bi * {k} + 4 * q + {j}) * {n} + n0, 1, 16)]" for j in range(4))
    ones_u8, ones_s8 = "T.broadcast(T.uint8(1), 32)", 'T.reinterpret("int8x32", T.broadcast(T.int32(16843009), 8))'
    colsum = "".join(f"""
                {cs8.format(h=h * 8)} = {quad_dot(cs8.format(h=h * 8), ones_u8, packed(h), dot)}""" for h in range(2))
    a_quad = f'T.reinterpret("int32", a[T.ramp(({row} * {k4} + q) * 4, 1, 4)])'
    a_u8 = f'T.reinterpret("uint8x32", T.broadcast(T.bitwise_xor({a_quad}, T.int32({BYTE_TOPS})), 8))'  # + 128
    steps = "".join(f"""
                        {acc8.format(h=h * 8)} = {quad_dot(acc8.format(h=h * 8), a_u8, packed(h), dot)}"""
                    for h in range(2))
    a_vec = (f'T.bitwise_xor(T.reinterpret("uint8x32", a[T.ramp({row} * {k} + q * 32, 1, 32)]), '
             f'T.broadcast(T.uint8(128), 32))')
    tail = " + ".join(f'T.Cast("int32", a[{row} * {k} + q * 4 + {j}])' for j in range(4))
    rest = "" if k % 32 == 0 else f"""
                for q in T.serial({k // 32 * 8}, {k4}):
                    rs[i] = rs[i] + {tail} + 512"""
    store = "".join(f"""
                    out[T.ramp({row} * {n} + n0 + {h * 8}, 1, 8)] = T.Cast("float32x8", {acc8.format(h=h * 8)}
                        - T.broadcast(zp[1] * rs[i], 8) - {cs8.format(h=h * 8)}) * T.broadcast(scale[0], 8)"""
                    for h in range(2))
    return f"""
@T.prim_func(private=True)
def qbmm_{dot}(a: T.Buffer(({bt * m * k},), "int8"), b: T.Buffer(({bt * k * n},), "int8"),
               zp: T.Buffer((2,), "int32"), scale: T.Buffer((1,), "float32"),
               out: T.Buffer(({bt * m * n},), "float32")):
    T.func_attr({{"tirx.noalias": True, "tirx.is_scheduled": True, "op_pattern": 8}})
    for t in T.parallel({bt * runs}):
        bi: T.let = t // {runs}
        bq = T.decl_buffer(({npn * k4 * 16},), "int32", scope="global")
        cs = T.decl_buffer(({npn * 16},), "int32", scope="global")
        rs = T.decl_buffer(({MR},), "int32", scope="global")
        for pn in T.serial({npn}):
            n0: T.let = T.min(pn * 16, {n - 16})
            for h in T.unroll(2):
                cs[T.ramp(pn * 16 + h * 8, 1, 8)] = T.broadcast(T.int32(0), 8)
            for q in T.serial({k4}):
                bq[T.ramp((pn * {k4} + q) * 16, 1, 16)] = T.reinterpret("int32x16", T.Shuffle([{rows}],
                                                                                             {order})){colsum}
            for h in T.unroll(2):  # (colsum(b) - K zb) (128 + za): all of the correction but zb * rowsum
                cs[T.ramp(pn * 16 + h * 8, 1, 8)] = ((cs[T.ramp(pn * 16 + h * 8, 1, 8)] - T.broadcast({k} * zp[1], 8))
                                                     * T.broadcast(128 + zp[0], 8))
        for rt in T.serial((t % {runs}) * {mt} // {runs}, (t % {runs} + 1) * {mt} // {runs}):
            r0: T.let = T.min(rt * {MR}, {m - MR})
            for i in T.unroll({MR}):
                rv = T.decl_buffer((8,), "int32", scope="global")
                rv[T.ramp(0, 1, 8)] = T.broadcast(T.int32(0), 8)
                for q in T.serial({k // 32}):
                    rv[T.ramp(0, 1, 8)] = {quad_dot("rv[T.ramp(0, 1, 8)]", a_vec, ones_s8, dot)}
                rs[i] = rv[0] + rv[1] + rv[2] + rv[3] + rv[4] + rv[5] + rv[6] + rv[7]{rest}
            for pn in T.serial({npn}):
                n0: T.let = T.min(pn * 16, {n - 16}){_gemm_tile(f"for q in T.serial({k4}):", steps, store, " " * 16)}
"""


def emit_qbmm(bb, a, b, a_shape, b_shape, sa: float, za: int, sb: float, zb: int, dot: str, amx_cores: int = 0):
    """Emit `qbmm_source` for qmatmul a [..., M, K] @ b [..., K, N] (int8, per-tensor zero points and scales; check
    `qbmm_applies` first): float32 [..., M, N]. With `amx_cores` (AMX usable: `amx.amx_cores`) the tile form
    (`amx.qbmm_amx_source`) where its shapes apply (32+ rows, N % 32 == 0, K = 32 or K % 64 == 0)."""
    import math

    from tvm import relax

    from graphopt.targets.tvm.cpu import amx
    m, k, n = int(a_shape[-2]), int(a_shape[-1]), int(b_shape[-1])
    lead = [int(d) for d in a_shape[:-2]]
    bt = math.prod(lead)
    tiles = amx_cores > 0 and amx.amx_qbmm_applies(m, k, n)
    if tiles:
        gv = bb.add_func(parse_kernel(amx.qbmm_amx_source(bt, m, k, n, amx_cores)),
                         f"{amx.KERNEL_PREFIX}_qbmm_{bt}x{m}x{k}x{n}")
    else:
        gv = bb.add_func(parse_kernel(qbmm_source(bt, m, k, n, dot)), f"qbmm_{dot}_{bt}x{m}x{k}x{n}")
    flat_a, flat_b = bb.emit(relax.op.reshape(a, (bt * m * k,))), bb.emit(relax.op.reshape(b, (bt * k * n,)))
    cfg = [relax.const(amx.tile_config(amx.amx_qbmm_step(k)))] if tiles else []
    y = bb.emit(relax.call_tir(gv, [flat_a, flat_b, *cfg, relax.const(np.array([za, zb], np.int32)),
                                    relax.const(np.array([sa * sb], np.float32))],
                               relax.TensorType((bt * m * n,), "float32")))
    return bb.emit(relax.op.reshape(y, (*lead, m, n)))


QGEMV_ACCS = 8  # accumulators per 16 output columns: partial sums over k quads (mod 8 / 2m) x rows x 2 halves
# rows the quad GEMV takes; 3-5 rows run the GEMM on one padded row tile. Kernel alone on Zen 4, 1280 -> 1000: 1
# row 9 us, 2 rows 15, 3 rows 62, 4 rows 30, 5 rows 116 on the GEMV (not investigated); 6 rows on the GEMM 24 us
QGEMV_ROWS = 2


def qgemv_quads_source(k: int, n: int, with_bias: bool, dot: str = "vnni", m: int = 1, wbits: int = 8) -> str:
    """y[r, n] = (sum_k (x[r, k] + 128) w[n, k] - off[n]) * mult[n] (+ b[n]) for m < 6 int8 rows x [m, K] (a
    classifier head at batch 1-5, a short sequence) and an int8 weight packed as quads (`pack_gemv_quads`: [N/16,
    K/4, 16] words, each the 4 bytes w[n, 4q:4q+4]); off[n] = (zx + 128) * sum_k w[n, k], so the sum is exactly
    sum (x - zx) w, in int32. x + 128 is staged once as uint8 quads; each task streams a panel of 16 columns once
    for all rows, one quad product (`quad_dot`: `vpdpbusd` with VNNI) per 4 inputs x 8 columns x row against the
    row's broadcast quad of x, into QGEMV_ACCS accumulators (partial sums over the quads while rows are few).
    `wbits=4`: the words are stored as nibbles (`nibble_quads`, 2 bytes a word) and widened as read
    (`widen_quads`)."""
    nr, k4 = NR_GEMM, -(-k // 4)
    p = max(1, QGEMV_ACCS // (2 * m))  # partial sums per row
    kq, kr = divmod(k4, p)

    def step(q: str, h: int, pad: str) -> str:
        out = ""
        for r in range(m):
            for hv in range(2):
                a = f"acc[T.ramp({((r * p + h) * 2 + hv) * 8}, 1, 8)]"
                word = f"(t * {k4} + {q}) * {nr} + {hv * 8}"
                wv = (f'w4[T.ramp({word}, 1, 8)]' if wbits == 8 else widen_quads("wn", f"({word}) * 2", 8))
                out += f"""
{pad}{a} = {quad_dot(a, f'T.reinterpret("uint8x32", T.broadcast(xw[{r * k4} + {q}], 8))',
                     f'T.reinterpret("int8x32", {wv})', dot)}"""
        return out
    body = "".join(step(f"qq * {p} + {h}", h, " " * 12) for h in range(p))
    rest = "".join(step(str(kq * p + h), h, " " * 8) for h in range(kr))
    total = " + ".join(f"acc[(r * {p} + {h}) * {nr} + v]" for h in range(p))
    b = f" + bias[t * {nr} + v]" if with_bias else ""
    bias_arg = f' bias: T.Buffer(({n},), "float32"),' if with_bias else ""
    w_arg = f'w4: T.Buffer(({n * k4},), "int32")' if wbits == 8 else f'wn: T.Buffer(({n * k4 * 2},), "int8")'
    return f"""
@T.prim_func(private=True)
def qgemv_{dot}(x: T.Buffer(({m * k},), "int8"), {w_arg}, off: T.Buffer(({n},), "int32"),
               mult: T.Buffer(({n},), "float32"),{bias_arg} out: T.Buffer(({m * n},), "float32")):
    T.func_attr({{"tirx.noalias": True, "tirx.is_scheduled": True}})
    xw = T.decl_buffer(({m * k4},), "int32", scope="global")
    xb = T.decl_buffer(({m * k4 * 4},), "uint8", data=xw.data)
    for r in T.serial({m}):
        for i in T.vectorized({k}):
            xb[r * {k4 * 4} + i] = T.reinterpret("uint8", T.bitwise_xor(x[r * {k} + i], T.int8(-128)))
        for i in T.serial({k4 * 4 - k}):
            xb[r * {k4 * 4} + {k} + i] = T.uint8(0)
    for t in T.parallel({n // nr}):
        acc = T.decl_buffer(({m * p * nr},), "int32", scope="global")
        for v in T.vectorized({m * p * nr}):
            acc[v] = 0
        for qq in T.serial({kq}):{body}{rest}
        for r in T.unroll({m}):
            for v in T.vectorized({nr}):
                out[r * {n} + t * {nr} + v] = T.Cast("float32", {total} - off[t * {nr} + v]) * mult[t * {nr} + v]{b}
"""


def pack_gemv_quads(w: np.ndarray) -> np.ndarray:
    """int8 W [N, K] (N a multiple of 16) -> [N/16, K/4, 16] int32 words, word (panel, q, c) the bytes
    w[16 * panel + c, 4q:4q+4] (inputs past K zero)."""
    n, k = w.shape
    k4 = -(-k // 4)
    wp = np.zeros((n, 4 * k4), np.int8)
    wp[:, :k] = w
    quads = wp.reshape(n // NR_GEMM, NR_GEMM, k4, 4).transpose(0, 2, 1, 3)
    return np.ascontiguousarray(quads).view(np.int32).reshape(-1)


def emit_qgemv(bb, xq, wq: np.ndarray, w_scales: np.ndarray, bias: np.ndarray | None, sx: float, zx: int, k: int,
               dot: str | None = None, m: int = 1):
    """One-row qlinear (a classifier head at batch 1) of xq int8 [..., K] with a constant int8 weight [N, K] ->
    float32 [N]. With VNNI (`dot`), full int8 weights take the quad kernel (`qgemv_quads_source`): kernel alone on
    Zen 4, 1280 -> 1000 45 -> 9 us (the float-converting stream below took longer than the fp32 stream of a weight 4x
    its size, 31 us, its weight in cache). Otherwise the weight stream of `gemm.gemv_source` with the weight int8,
    or int4 nibbles when it fits (TVM's kernel for it read the weight at a fraction of the bandwidth: 0.15 ms for
    MobileNetV2's 1000x1280 head)."""
    from graphopt.targets.tvm.cpu.gemm import call_gemv, pack_weight, padded_rows
    n, nr = int(wq.shape[0]), NR_GEMM
    w = padded_rows(wq.astype(np.int8), nr)
    mult = np.zeros(w.shape[0], np.float32)
    mult[:n] = (np.asarray(w_scales, np.float64) * float(sx)).astype(np.float32)
    wbits = 4 if fits_int4(w) else 8
    if dot in ("vnni", "exact"):
        return _emit_qgemv_quads(bb, xq, w, mult, bias, zx, k, n, dot, m, wbits)
    if m != 1:
        raise ValueError(f"the float-converting weight stream takes one row, not {m}: pass the quad product (dot)")
    packed = pack_weight(w, nr)  # [N/16, K, 16]
    if wbits == 4:  # columns c and c + 8 of a panel row share a byte
        packed = nibbles(packed[..., :nr // 2], packed[..., nr // 2:])
    return call_gemv(bb, xq, k, n, nr, packed, [mult, np.array([float(zx)], np.float32)], bias, wbits,
                     f"qgemv_{k}x{w.shape[0]}" + ("_w4" if wbits == 4 else ""))


def _emit_qgemv_quads(bb, xq, w: np.ndarray, mult: np.ndarray, bias: np.ndarray | None, zx: int, k: int, n: int,
                      dot: str, m: int, wbits: int = 8):
    """`emit_qgemv`'s quad kernel for m rows and the panel-padded int8 weight w [N', K]: y [N] for one row, else
    [m, N]."""
    from tvm import relax
    n_pad = int(w.shape[0])
    off = ((int(zx) + 128) * w.astype(np.int64).sum(1)).astype(np.int32)
    packed = pack_gemv_quads(w)
    args = [bb.emit(relax.op.reshape(xq, (m * k,))), relax.const(packed if wbits == 8 else nibble_quads(packed)),
            relax.const(off), relax.const(mult)]
    if bias is not None:
        args.append(relax.const(np.pad(np.asarray(bias, np.float32), (0, n_pad - n))))
    gv = bb.add_func(parse_kernel(qgemv_quads_source(k, n_pad, bias is not None, dot, m, wbits)),
                     f"qgemv_{dot}_{k}x{n_pad}" + (f"_m{m}" if m > 1 else "") + ("_w4" if wbits == 4 else ""))
    shape = (n_pad,) if m == 1 else (m, n_pad)
    y = bb.emit(relax.call_tir(gv, args, relax.TensorType((m * n_pad,), "float32")))
    y = bb.emit(relax.op.reshape(y, shape)) if m > 1 else y
    if n_pad != n:
        y = bb.emit(relax.op.strided_slice(y, axes=[len(shape) - 1], begin=[0], end=[n]))
    return y


def emit_qlinear(bb, xq, wq: np.ndarray, w_scales: np.ndarray, bias: np.ndarray | None, sx: float, zx: int,
                 x_shape, dot: str = "ubsw", lanes: int = 8, amx_cores: int = 0):
    """qlinear of xq int8 [..., K] with a constant int8 weight [N, K] -> float32 [..., N]; None when the kernel
    does not apply (the caller lowers it generically). `dot` is the target's quad product (`int8_dot`), `lanes`
    its vector width in int32 lanes (`rules.vector_lanes`): with 16 the VNNI GEMM runs 512-bit `vpdpbusd`.
    `amx_cores` > 0 (the target's cores, where `amx.amx_usable`): 16 rows or more run the AMX tile GEMM."""
    import math

    from tvm import relax

    from graphopt.targets.tvm.cpu import amx

    lead, k = tuple(int(d) for d in x_shape[:-1]), int(x_shape[-1])
    m, n = math.prod(lead), int(wq.shape[0])
    if amx_cores and amx.amx_qlinear_applies(m, k):
        return _emit_amx_qlinear(bb, xq, wq, w_scales, bias, sx, zx, lead, k, amx_cores)
    quads = dot in ("vnni", "exact")
    if n >= 16 and (m == 1 or m < MR and quads and (m <= QGEMV_ROWS or not qgemm_applies(MR, k))):
        return bb.emit(relax.op.reshape(emit_qgemv(bb, xq, wq, w_scales, bias, sx, zx, k, dot, m), (*lead, n)))
    mq = MR if m < MR and quads else m  # 3-5 rows: padded to one row tile (zero rows, sliced off below)
    if not qgemm_applies(mq, k):
        return None
    n_pad = -(-n // NR_GEMM) * NR_GEMM  # channel-pruned widths: zero columns past N, sliced off below
    w = np.zeros((n_pad, k), np.int8)
    w[:n] = wq
    # u8 x s8 quads with VNNI, or on AVX2 when no pair can saturate (7-bit weights), else exact int16 pairs; the
    # activation copy (int16, or shifted to uint8: x + 128, which the offsets undo) fuses into the quantize that
    # produced xq
    ubsw = k % 4 == 0 and (dot != "ubsw" or ubsw_exact(w))
    off, mult, fb = epilogue_constants(w, np.pad(w_scales, (0, n_pad - n)), None if bias is None else
                                       np.pad(bias, (0, n_pad - n)), sx, zx + 128 * ubsw, n_pad // MR + 1)
    vl = 16 if dot == "vnni" and lanes >= 16 else 8
    if ubsw:
        panels = gemm_panels(n_pad, vl)  # (the int16 kernel below: 1)
        src = qgemm_ubsw_source(mq, k, n_pad, fb is not None, dot, vl, panels)
        packed, name = pack_gemm_quads(w), f"qgemm_{dot}"
        a = relax.op.astype(relax.op.add(relax.op.astype(xq, "int16"), relax.const(128, "int16")), "uint8")
    else:
        src, packed, name = qgemm_source(mq, k, n_pad, fb is not None), pack_gemm_pairs(w), "qgemm"
        a = relax.op.astype(xq, "int16")
    tag = f"{mq}x{k}x{n_pad}" + (f"_v16p{panels}" if vl == 16 and ubsw else "")
    gv = bb.add_func(parse_kernel(src), f"{name}_{tag}")
    a = bb.emit(relax.op.reshape(bb.emit(a), (m, k)))
    if mq != m:
        a = bb.emit(relax.op.nn.pad(a, [0, mq - m, 0, 0]))
    a = bb.emit(relax.op.reshape(a, (mq * k,)))
    y = bb.emit(relax.call_tir(gv, [a, weight_const(bb, packed),
                                    *(relax.const(c[:n_pad]) for c in (off, mult, fb) if c is not None)],
                               relax.TensorType((mq * n_pad,), "float32")))
    y = bb.emit(relax.op.reshape(y, (mq, n_pad)))
    if n_pad != n or mq != m:
        y = bb.emit(relax.op.strided_slice(y, axes=[0, 1], begin=[0, 0], end=[m, n]))
    return bb.emit(relax.op.reshape(y, (*lead, n)))


def _emit_amx_qlinear(bb, xq, wq: np.ndarray, w_scales: np.ndarray, bias: np.ndarray | None, sx: float, zx: int,
                      lead: tuple[int, ...], k: int, cores: int):
    """`emit_qlinear` on the AMX tile GEMM (`amx.qgemm_amx_source`): the int8 activation as the quantize wrote it
    (signed x signed tiles: the offset is the zero point's alone), rows padded to one 32-row block where fewer, K
    to whole 64-byte steps (zero weights there), N to 32-column blocks (sliced off)."""
    import math

    from tvm import relax

    from graphopt.targets.tvm.cpu import amx
    m, n = math.prod(lead), int(wq.shape[0])
    mq, kp, n_pad = amx.padded_shape(m, k, n)
    w = np.zeros((n_pad, kp), np.int8)
    w[:n, :k] = wq
    off, mult, fb = epilogue_constants(w, np.pad(w_scales, (0, n_pad - n)), None if bias is None else
                                       np.pad(bias, (0, n_pad - n)), sx, zx, n_pad // MR + 1)
    gv = bb.add_func(parse_kernel(amx.qgemm_amx_source(mq, kp, n_pad, fb is not None, cores)),
                     f"{amx.KERNEL_PREFIX}_{mq}x{kp}x{n_pad}")
    a = bb.emit(relax.op.reshape(xq, (m, k)))
    if mq != m or kp != k:
        a = bb.emit(relax.op.nn.pad(a, [0, mq - m, 0, kp - k], pad_value=float(zx)))
    a = bb.emit(relax.op.reshape(a, (mq * kp,)))
    y = bb.emit(relax.call_tir(gv, [a, weight_const(bb, pack_gemm_quads(w)), relax.const(amx.tile_config()),
                                    *(relax.const(c[:n_pad]) for c in (off, mult, fb) if c is not None)],
                               relax.TensorType((mq * n_pad,), "float32")))
    y = bb.emit(relax.op.reshape(y, (mq, n_pad)))
    if n_pad != n or mq != m:
        y = bb.emit(relax.op.strided_slice(y, axes=[0, 1], begin=[0, 0], end=[m, n]))
    return bb.emit(relax.op.reshape(y, (*lead, n)))


def quad_planes_source(cin: int, h: int, wd: int, kh: int, kw: int, stride: int, padding) -> str:
    """TVMScript writing xq [ceil(Cin/4), s * s, Hq * Wq, 4] uint8 from x int8 [Cin, H, W]: the input + 128, padded
    with the zero point (`fill` [1], already + 128) and split into its stride phases as for the float flat conv
    (`conv.pad_phases_source`), with every 4 input channels of a pixel side by side (the quad product's operand):
    the flat int8 conv reads 8 pixels x 4 channels of one tap as one 32-byte vector. Channels past Cin (a partial
    last quad) hold the fill and meet zero weights."""
    from graphopt.targets.tvm.cpu.conv import flat_geometry
    s, (pt, _, pl, _) = stride, (int(q) for q in padding)
    _, _, hq, wq = flat_geometry(h, wd, kh, kw, s, padding)
    ph, k4 = s * s, -(-cin // 4)
    y = f"((r // {hq}) % {ph} // {s} + (r % {hq}) * {s} - {pt})"  # the input row of plane row r
    xc = f"((r // {hq}) % {s} + u * {s} - {pl})"  # the input column of plane column u
    return f"""
@T.prim_func(private=True)
def quad_planes(x: T.Buffer(({cin}, {h}, {wd}), "int8"), fill: T.Buffer((1,), "uint8"),
              xq: T.Buffer(({k4 * ph * hq * wq * 4},), "uint8")):
    T.func_attr({{"tirx.noalias": True, "tirx.is_scheduled": True, "op_pattern": 8}})
    for r in T.parallel({k4 * ph * hq}):
        for u in T.serial({wq}):
            for c in T.unroll(4):
                if {y} >= 0 and {y} < {h} and {xc} >= 0 and {xc} < {wd} and (r // {ph * hq}) * 4 + c < {cin}:
                    xq[(r * {wq} + u) * 4 + c] = T.reinterpret("uint8", T.bitwise_xor(
                        x[(r // {ph * hq}) * 4 + c, {y}, {xc}], T.int8(-128)))
                else:
                    xq[(r * {wq} + u) * 4 + c] = fill[0]
"""


def qconv_flat_source(cout: int, cin: int, h: int, wd: int, kh: int, kw: int, stride: int, padding,
                      clamp: tuple[float, float] | None = None, out_q: tuple[float, int, int, int] | None = None,
                      dequantized: bool = False, float_bias: bool = False, dot: str = "ubsw") -> str:
    """The int8 dense kxk conv as an implicit GEMM over the quad planes of `quad_planes_source`: the pointwise quad
    kernel (`qconv1x1_ubsw_source`) with reduction quads (input quad, tap), whose staging copies each 16-pixel
    block's 64 bytes per quad and tap straight from the planes (pixels are numbered over the planes' width as in
    the float flat conv, `conv.flat_conv_source`, so a tap is one contiguous run whatever rows the block spans).
    No im2col columns (9 x the activation for a 3x3 conv, then re-read and shuffled into quads) are written. The
    reduction loop is the pointwise kernel's (a 6 x 16 int32 tile in registers; the conv's taps unrolled inside it
    spilled the tile: 84 stack references per 108 products). The epilogue is the pointwise kernel's; a block
    inside one output row stores vectors, one crossing rows (or the planes' extra columns) stores per lane."""
    from graphopt.targets.tvm.cpu.conv import NR_FLAT, staged_tiling
    k4, nr = -(-cin // 4), NR_FLAT  # blocks of 16 pixels: two 32-byte quad vectors (`steps` below)
    kq = k4 * kh * kw
    g = staged_tiling(cout, h, wd, kh, kw, stride, padding, kq)
    oh, ow, wq, plane, ph, taps, mt, qmax = (g[n] for n in ("oh", "ow", "wq", "plane", "ph", "taps", "mt", "qmax"))
    cb, chunks, nblk, groups, blocks, offs = (g[n] for n in ("cb", "chunks", "nblk", "groups", "blocks", "offs"))
    stage = "".join(f"""
                    for v in T.unroll(2):
                        xs[T.ramp((((b - b0) * {kq} + qc * {taps} + {tp}) * {nr} + v * 8) * 4, 1, 32)] = xq[T.ramp(
                            (qc * {ph * plane} + {off} + q0 + v * 8) * 4, 1, 32)]""" for tp, off in enumerate(offs))
    steps = ""
    for v in range(2):
        acc = f"acc[T.ramp(i * {nr} + {v * 8}, 1, 8)]"
        x = f"xs[T.ramp((((b - b0) * {kq} + k) * {nr} + {v * 8}) * 4, 1, 32)]"
        w = f'T.reinterpret("int8x32", T.broadcast(w4[(c * {kq} + k) * {MR} + i], 8))'
        steps += f"""
                        {acc} = {quad_dot(acc, x, w, dot)}"""
    co = f"c * {MR} + i"

    def val(lane: str) -> str:
        return _requantized(f"acc[{lane}]", co, clamp, out_q, dequantized, float_bias)
    bias_arg = f' bias: T.Buffer(({mt * MR},), "float32"),' if float_bias else ""
    otype = "int8" if out_q and not dequantized else "float32"
    return f"""
@T.prim_func(private=True)
def qconv_flat_{dot}(xq: T.Buffer(({k4 * ph * plane * 4},), "uint8"), w4: T.Buffer(({mt * kq * MR},), "int32"),
                     off: T.Buffer(({mt * MR},), "int32"), mult: T.Buffer(({mt * MR},), "float32"),{bias_arg}
                     qp: T.Buffer((4,), "float32"), out: T.Buffer(({cout * oh * ow},), "{otype}")):
    T.func_attr({{"tirx.noalias": True, "tirx.is_scheduled": True, "op_pattern": 8}})
    for t in T.parallel({chunks * groups}):
        b0: T.let = (t % {chunks}) * {cb} // {chunks}
        xs = T.decl_buffer(({nblk * kq * nr * 4},), "uint8", scope="global")
        for b in {blocks}:
            q0: T.let = T.min(b * {nr}, {qmax - nr})
            for qc in T.serial({k4}):{stage}
        for c in T.serial((t // {chunks}) * {mt} // {groups}, (t // {chunks} + 1) * {mt} // {groups}):
            for b in {blocks}:
                q0: T.let = T.min(b * {nr}, {qmax - nr})
                acc = T.decl_buffer(({MR * nr},), "int32", scope="global")
                for i in T.unroll({MR}):
                    acc[T.ramp(i * {nr}, 1, {nr})] = T.broadcast(T.int32(0), {nr})
                for k in T.serial({kq}):
                    for i in T.unroll({MR}):{steps}
                y0: T.let = q0 // {wq}
                x0: T.let = q0 % {wq}
                for i in T.unroll({MR}):
                    if {co} < {cout}:
                        if x0 + {nr} <= {ow}:
                            for v in T.vectorized({nr}):
                                out[({co}) * {oh * ow} + y0 * {ow} + x0 + v] = {val(f"i * {nr} + v")}
                        else:
                            ot = T.decl_buffer(({nr},), "{otype}", scope="global")
                            for v in T.vectorized({nr}):
                                ot[v] = {val(f"i * {nr} + v")}
                            for v in T.serial({nr}):
                                if (x0 + v) % {wq} < {ow}:
                                    out[({co}) * {oh * ow} + (y0 + (x0 + v) // {wq}) * {ow} + (x0 + v) % {wq}] = ot[v]
"""


def qconv_tok_source(cout: int, cin: int, h: int, wd: int, kh: int, kw: int, stride: int, padding,
                     clamp: tuple[float, float] | None = None, out_q: tuple[float, int, int, int] | None = None,
                     dequantized: bool = False, float_bias: bool = False, dot: str = "vnni", dilation: int = 1) -> str:
    """The int8 pixel-row conv (the float one: `conv.tok_conv_source`): a 6-pixel x 16-channel int32 tile whose
    pixels each broadcast one 4-channel quad of the zero-padded quad planes (`quad_planes_source` at stride 1,
    read in place at any stride) against the packed weight's 16 channels x 4 bytes of that (quad, tap), two quad
    products (`quad_dot`, 8 channels each) per pixel and step: the flat int8 conv's 16-pixel blocks include the
    planes' extra columns and round up per tile, as the float flat conv's do. The epilogue requantizes each
    pixel's 16 channels as vectors (per-channel offset and multiplier) into the tile's buffer, then stores it
    channel by channel, the 6 pixels of a channel in a row: LLVM writes those as vector stores, where the stores
    pixel by pixel had been one `vpextrb` per int8 output (kernels alone, AVX2, int8 out: 16x16 at 128x128 0.66 ->
    0.29 ms, 16x64 at 128x128 1.84 -> 1.42, 32x32 at 112x112 1.05 -> 0.84, 64x64 at 56x56 1.23 -> 1.03, 256x256
    at 14x14 0.82 -> 0.76; bit-identical). Tasks are
    panel-major, or tile-major where the planes outweigh the weights; the last pixel tile overlaps the one before
    it. A dilated conv reads its taps `dilation` apart in the same planes (as the float one)."""
    from graphopt.targets.tvm.cpu.conv import NR_TOK, tok_tiling
    k4, nr = -(-cin // 4), NR_TOK
    kq = k4 * kh * kw
    hp, wp_, oh, ow, p, mr, nt, pt_, panel, tile, at = tok_tiling(cout, k4, h, wd, kh, kw, stride, padding, kq, "qc",
                                                                  dilation=dilation)
    pix = "(p0 + r)"
    u8 = f'T.reinterpret("uint8x32", T.broadcast(T.reinterpret("int32", xq[T.ramp(({at}) * 4, 1, 4)]), 8))'
    steps = ""
    for v in range(2):
        acc = f"acc[T.ramp(r * {nr} + {v * 8}, 1, 8)]"
        s8 = f'T.reinterpret("int8x32", w4[T.ramp((({panel} * {kq} + (qc * {kh} + i) * {kw} + j) * {nr} + {v * 8}), 1, 8)])'
        steps += f"""
                        {acc} = {quad_dot(acc, u8, s8, dot)}"""
    co = f"{panel} * {nr} + v"
    val = _requantized(f"acc[r * {nr} + v]", co, clamp, out_q, dequantized, float_bias)
    bias_arg = f' bias: T.Buffer(({nt * nr},), "float32"),' if float_bias else ""
    otype = "int8" if out_q and not dequantized else "float32"
    stores = f"""for r in T.unroll({mr}):
                out[({co}) * {p} + {pix}] = ot[r * {nr} + v]"""
    if cout % nr:
        stores = f"""if {co} < {cout}:
                {stores.replace(chr(10), chr(10) + "    ")}"""
    return f"""
@T.prim_func(private=True)
def qconv_tok_{dot}(xq: T.Buffer(({k4 * hp * wp_ * 4},), "uint8"), w4: T.Buffer(({nt * kq * nr},), "int32"),
                    off: T.Buffer(({nt * nr},), "int32"), mult: T.Buffer(({nt * nr},), "float32"),{bias_arg}
                    qp: T.Buffer((4,), "float32"), out: T.Buffer(({cout * p},), "{otype}")):
    T.func_attr({{"tirx.noalias": True, "tirx.is_scheduled": True, "op_pattern": 8}})
    for t in T.parallel({nt * pt_}):
        p0: T.let = T.min({tile} * {mr}, {p - mr})
        acc = T.decl_buffer(({mr * nr},), "int32", scope="global")
        for r in T.unroll({mr}):
            acc[T.ramp(r * {nr}, 1, {nr})] = T.broadcast(T.int32(0), {nr})
        for qc in T.serial({k4}):
            for i in T.unroll({kh}):
                for j in T.unroll({kw}):
                    for r in T.unroll({mr}):{steps}
        ot = T.decl_buffer(({mr * nr},), "{otype}", scope="global")
        for r in T.unroll({mr}):
            for v in T.vectorized({nr}):
                ot[r * {nr} + v] = {val}
        for v in T.serial({nr}):
            {stores}
"""


def tok_qconv_applies(w_shape, stride: int, out_shape, dot: str | None, float_out: bool = False) -> bool:
    """Whether a dense int8 k x k conv runs on the pixel-row int8 conv (`qconv_tok_source`): with VNNI, more than 8
    input channels, at stride 1, or at stride 2 with at most 64 output pixels. Against the flat int8 conv (alone,
    + a 1x1 conv, interleaved, 2 threads, Zen 4; outputs bit-identical; this host moves single runs by 20-40%):
    128x128 at 28x28 0.66-1.15x over four runs (two at 0.88-0.96x), 256x256 at 14x14 0.84-0.88x, 512x512 at 7x7
    0.91x, 512x256 at 5x5 0.73x, 64x64 at 56x56 0.97x; at stride 2 0.59x to 7x7 (512x256 at 14x14) but 1.10x to
    14x14 and 1.24x to 28x28, which keep the flat conv or im2col. Int7 ResNet-18 0.83x and 0.89x in two A/Bs
    (8.1 -> 6.7 ms, 8.5 -> 7.5). On AVX2 (`vpmaddubsw`, for weights it is exact on: the caller checks) at stride 2
    to at most 64 pixels (conv + a 1x1 conv, interleaved, Zen 3, bit-identical): 256x256 at 14x14 0.79x (0.57x
    and 0.76x in two earlier runs), 128 -> 256 at 14x14 0.67x, 512x512 at 7x7 0.90x, 64 -> 128 at 16x16 0.69x; at
    stride 1 0.82-1.12x in one run and unreadable in the next, so those keep the flat conv where they store int8
    (the kernels alone, 7 interleaved rounds, 0.92-1.05x over five shapes). Where they store float (`float_out`:
    the conv's output dequantized for a float consumer, RCAN's channel attention, a residual add) the flat conv's
    store of 16-pixel blocks across rows and pad columns costs more, and the pixel-row conv took 0.57-0.84x its
    time (kernels alone, Zen 3: 64x64 at 32x32 0.32 vs 0.48 ms, 128x128 at 16x16 0.28 vs 0.48, 64x64 at 56x56
    0.93 vs 1.26, 256x256 at 14x14 0.78 vs 0.92, 32x32 at 64x64 0.33 vs 0.50), where the output channels fill a
    16-channel panel (32 -> 3 at 64x64: 0.15 vs 0.05 ms). Whole int8s models, interleaved, Zen 3: RCAN block
    0.83-0.93x, UNet decoder 0.91x, TCN 0.91x, ESRGAN blocks 0.95-0.98x, pix2pix 0.94x, SK unit 0.99x, ResNeXt
    0.84-1.03x (noise: its convs are 4-channel groups, unchanged). Storing int8 too where the output channels are
    whole 16-channel panels (the 78th session, after the int8 Winograd conv took the convs of 32+ channels in and
    out, `qwinograd`, among them the 64x64 at 56x56 the pixel-row conv had lost on; kernels alone, 7 interleaved
    rounds, Zen 3: 32x16 at 112x112 0.43 vs 0.74 ms, 16x16 at 56x56 0.10 vs 0.13, 48x24 at 28x28 0.07 vs 0.09,
    512x256 at 7x7 0.49 vs 0.55, 96x96 at 10x10 0.053 vs 0.068; 24x16 at 56x56 0.14 vs 0.11, hence whole panels).
    Whole int8s models, interleaved: a 16-32 channel stack at 128x128 0.77x and 0.81x, ResNet-18 0.97-1.0x (its
    7x7 stage), outputs bit-identical. At stride 2 on AVX2 likewise, for outputs of any size (kernels alone, 11
    rounds, Zen 3, int8 / float output: 64x32 at 112x112 0.39 / 0.51 vs 0.68 / 0.72 ms, 96x48 at 56x56 0.28 / 0.26
    vs 0.37 / 0.37, 256x128 at 28x28 0.42 / 0.36 vs 0.58 / 0.42, 128x64 at 56x56 0.47 / 0.46 vs 0.45 / 0.64): a
    strided 3x3 + 1x1 stack at 192x192 0.75-0.93x, ResNet-18 0.97-1.11x (noise; its strided convs are few)."""
    from graphopt.targets.tvm.cpu.conv import NR_TOK
    n_out = int(out_shape[-1]) * int(out_shape[-2])
    small_strided = stride == 2 and n_out <= 64
    return (int(w_shape[1]) > 8 and tuple(int(d) for d in w_shape[2:]) != (1, 1)
            and (dot == "vnni" and (stride == 1 or small_strided)
                 or dot == "ubsw" and (small_strided or stride in (1, 2) and (
                     int(w_shape[0]) >= NR_TOK if float_out else int(w_shape[0]) % NR_TOK == 0))))


def pack_flat_quads(wq: np.ndarray, panel: int = MR) -> np.ndarray:
    """int8 W [Cout, Cin, kh, kw] -> int32 [ceil(Cout / panel) * ceil(Cin/4) * kh * kw * panel]: per panel of output
    channels (6 for the flat conv, 16 for the pixel-row one), input quad and tap, each channel's 4 weights of that
    quad as one word (zeros pad both)."""
    cout, cin, kh, kw = wq.shape
    mt, k4 = -(-cout // panel), -(-cin // 4)
    w = np.zeros((mt * panel, k4 * 4, kh, kw), np.int8)
    w[:cout, :cin] = wq
    w = w.reshape(mt, panel, k4, 4, kh, kw).transpose(0, 2, 4, 5, 1, 3)
    return np.ascontiguousarray(w).view(np.int32).reshape(-1)


def flat_qconv_applies(wq: np.ndarray, dot: str) -> bool:
    """Whether the flat int8 conv takes this int8 weight [Cout, Cin, kh, kw]: where the pointwise kernel would use
    the quad product for the im2col columns (int4 weights too: `emit_flat_qconv` keeps them nibbles; on AVX2 only
    weights `vpmaddubsw` is exact for, paired as the kernel pairs them: channels 2m, 2m + 1 of a tap)."""
    cout, cin, kh, kw = wq.shape
    if dot != "ubsw":
        return True
    k4 = -(-cin // 4)
    w = np.zeros((cout, 4 * k4, kh, kw), np.int8)
    w[:, :cin] = wq
    return ubsw_exact(w.reshape(cout, k4, 4, kh * kw).transpose(0, 1, 3, 2).reshape(cout, -1))


def im2col_beats_flat(cin: int, stride: int, dot: str | None) -> bool:
    """Whether a dense int8 k x k conv with `cin` input channels at `stride` runs faster as int8 im2col + the
    pointwise quad kernel (`emit_im2col_qconv`) than on the flat conv: stride 2 or more with Cin not a multiple of
    4 (RGB stems; audio models' waveform convs: wav2vec2's 1 channel, 10 taps, stride 5 at 16000 samples 465 ->
    ~60 us), with VNNI. The flat conv reads one quad of channels per tap, a quarter of it zeros at Cin 3, from four
    phase planes built first; im2col packs Cin x kh x kw into whole quads (27 values: 7 quads, not 9). Kernel alone
    on Zen 4 (2 threads, 11-15 interleaved rounds in a quiet phase): MobileNetV2's and EfficientNet-Lite0's 32x3x224
    3x3 stem 105 -> 76 us (1.37-1.39x), a 5x5 one 1.31x, ResNet's 7x7 stem 486 -> 381 us (1.28x), 32x6x112 3x3
    1.61x; at stride 1 im2col was 0.86-1.04x (16x3x112, 32x3x224) and on deep convs 0.56-0.82x. On AVX2 too
    (`vpmaddubsw`; `emit_qconv1x1` checks its exactness on im2col's own pairs, else the exact pair kernel): a
    stem + 1x1 conv alone, interleaved, Zen 3, 0.66-0.73x (32x3x224 3x3) and 0.63x (ResNet's 7x7 stem); in
    MobileNetV2's int8 build the stem went 0.33 -> 0.14 ms (quad planes + flat conv against im2col + the
    pointwise kernel), ResNet-18's 1.8 ms stem to 0.96x the model's time; bit-identical."""
    return dot in ("vnni", "ubsw") and stride >= 2 and cin % 4 != 0


def emit_flat_qconv(bb, xq, wq: np.ndarray, w_scales: np.ndarray, bias: np.ndarray | None, sx: float, zx: int,
                    x_shape, stride: int, padding, clamp, out_q, dequantized: bool = False, dot: str = "ubsw",
                    tok: bool = False, dilation: int = 1, amx_cores: int = 0):
    """A dense k x k qconv2d of xq int8 [N, Cin, H, W] on the flat int8 conv (per sample): the quad planes (the
    input's zero point as padding: exact on the grid), then `qconv_flat_source` with its epilogue. For weights the
    quad product is exact on (VNNI, or `ubsw_exact`: 7-bit weights on AVX2). `tok`: the pixel-row int8 conv
    (`qconv_tok_source`) over the padded quad planes at stride 1 instead, the only one for `dilation` > 1.
    `amx_cores` > 0 (not with tok): the AMX tile form over the same planes (`amx.qconv_flat_amx_source`; the caller
    checks `amx.amx_flat_qconv_applies`)."""
    from tvm import relax

    from graphopt.targets.tvm.cpu.conv import NR_TOK, _batched, _ntag, flat_geometry, staged_tiling, tok_tiling
    n, cin, h, wd = (int(d) for d in x_shape)
    cout, _, kh, kw = (int(d) for d in wq.shape)
    if dilation > 1 and not tok:
        raise ValueError("a dilated int8 conv runs on the pixel-row int8 conv (tok=True) only")
    oh, ow = tok_tiling(cout, cin, h, wd, kh, kw, stride, padding, 1, "qc", dilation=dilation)[2:4]
    ps = 1 if tok else stride  # the pixel-row conv reads the padded planes themselves, not their phases
    _, _, hq, wqd = flat_geometry(h, wd, kh, kw, ps, padding)
    size = -(-cin // 4) * ps * ps * hq * wqd * 4
    pads = ''.join(str(int(q)) for q in padding)
    geo = f"{cin}x{h}x{wd}_k{kh}x{kw}s{stride}" + (f"d{dilation}" if dilation > 1 else "") + f"_p{pads}"
    gv = bb.add_func(parse_kernel(batch_source(quad_planes_source(cin, h, wd, kh, kw, ps, padding), n,
                                                   ["x", "xq"])),
                     f"quad_planes_{cin}x{h}x{wd}_k{kh}x{kw}s{ps}_p{pads}{_ntag(n)}")
    planes = bb.emit(relax.call_tir(gv, [bb.emit(relax.op.reshape(xq, _batched(n, cin, h, wd))),
                                         relax.const(np.full(1, (int(zx) + 128) % 256, np.uint8))],
                                    relax.TensorType(_batched(n, size), "uint8")))
    if amx_cores and not tok:
        from graphopt.targets.tvm.cpu import amx
        cpad = -(-cout // amx.ROWS) * amx.ROWS
        consts = tuple(None if c is None else c[:cpad]
                       for c in epilogue_constants(wq, w_scales, bias, sx, zx + 128, cpad // MR + 1, out_q))
        src = amx.qconv_flat_amx_source(cout, cin, h, wd, kh, kw, stride, padding, clamp, out_q, dequantized,
                                        consts[2] is not None, amx_cores)
        tag = (f"{cout}x{geo}" + ("" if clamp is None else "_clamp") + ("_q" if out_q else "")
               + ("dq" if dequantized else ""))
        gv = bb.add_func(parse_kernel(src), f"{amx.KERNEL_PREFIX}_flat_{tag}")
        offs = staged_tiling(cout, h, wd, kh, kw, stride, padding, 1)["offs"]
        y = bb.emit(relax.call_tir(gv, [planes, weight_const(bb, amx.pack_flat_weight(wq)),
                                        relax.const(amx.tile_config(4 * amx.flat_quads_step(cin))),
                                        *(relax.const(c) for c in consts if c is not None),
                                        relax.const(np.asarray(offs, np.int32)),
                                        relax.const(store_params(clamp, out_q))],
                                   relax.TensorType((cout * oh * ow,), "int8" if out_q and not dequantized
                                                    else "float32")))
        return bb.emit(relax.op.reshape(y, (n, cout, oh, ow)))
    if tok:
        width = -(-cout // NR_TOK) * NR_TOK
        consts = tuple(None if c is None else c[:width]
                       for c in epilogue_constants(wq, w_scales, bias, sx, zx + 128, -(-width // MR), out_q))
        src = qconv_tok_source(cout, cin, h, wd, kh, kw, stride, padding, clamp, out_q, dequantized,
                               consts[2] is not None, dot, dilation)
    else:
        consts = epilogue_constants(wq, w_scales, bias, sx, zx + 128, -(-cout // MR), out_q)
        src = qconv_flat_source(cout, cin, h, wd, kh, kw, stride, padding, clamp, out_q, dequantized,
                                consts[2] is not None, dot)
    tag = (f"{cout}x{geo}" + ("" if clamp is None else "_clamp") + ("_q" if out_q else "") + ("dq" if dequantized else "")
           + _ntag(n))
    gv = bb.add_func(parse_kernel(batch_source(src, n, ["xq", "out"])),
                     f"qconv_{'tok' if tok else 'flat'}_{dot}_{tag}")
    dtype = "int8" if out_q and not dequantized else "float32"
    y = bb.emit(relax.call_tir(gv, [planes, weight_const(bb, pack_flat_quads(wq, NR_TOK if tok else MR)),
                                    *(relax.const(c) for c in consts if c is not None),
                                    relax.const(store_params(clamp, out_q))],
                               relax.TensorType(_batched(n, cout * oh * ow), dtype)))
    return bb.emit(relax.op.reshape(y, (n, cout, oh, ow)))


DYNAMIC_CHUNK = 4096  # values a task of the dynamic-grid kernel codes


def dynamic_codes_source(n: int, lanes: int = 8, dequantized: bool = False) -> str:
    """TVMScript of a per-call uint8 grid's codes (graphopt.ir.quant_ops.dynamic_qparams, ONNX Runtime's
    DynamicQuantizeLinear) for x [n] float32, given its min `lo` and max `hi` over all of x: scale = (max(hi, 0) -
    min(lo, 0)) / 255 (1 where that is 0), zero point = round(clip(-min(lo, 0) / scale, 0, 255)), codes =
    clip(round(x / scale) + zero point, 0, 255) as floats, written to q, and (scale, zero point) to sz. Each task
    computes the scale and zero point once and codes DYNAMIC_CHUNK values (the last chunk overlapping the one
    before: the same values). As Relax ops, the scale's and zero point's arithmetic was fused into the pass over x
    and redone for every value, three float divisions a value: MobileNetV2 from ONNX Runtime's quantize_dynamic
    spent 615 us coding its 96x112x112 activation; the same float32 operations in the same order, so the codes are
    the same. `dequantized`: q holds the values the codes stand for, (code - zero point) * scale (a float layer's
    input), rather than the codes."""
    chunk = min(DYNAMIC_CHUNK, n // lanes * lanes)
    if chunk < lanes:
        raise ValueError(f"the dynamic-grid kernel codes {lanes} values or more, not {n}")
    tasks = -(-n // chunk)
    code = f"T.max(T.min(T.round(x[c0 + j * {lanes} + u] / scale) + zp, T.float32(255)), T.float32(0))"
    if dequantized:
        code = f"({code} - zp) * scale"
    return f"""
@T.prim_func(private=True)
def dynamic_codes(x: T.Buffer(({n},), "float32"), lo_in: T.Buffer((1,), "float32"), hi_in: T.Buffer((1,), "float32"),
                  q: T.Buffer(({n},), "float32"), sz: T.Buffer((2,), "float32")):
    T.func_attr({{"tirx.noalias": True, "tirx.is_scheduled": True}})
    for t in T.parallel({tasks}):
        lo: T.let = T.min(lo_in[0], T.float32(0))
        hi: T.let = T.max(hi_in[0], T.float32(0))
        span: T.let = hi - lo
        scale: T.let = T.Select(span == T.float32(0), T.float32(1), span / T.float32(255))
        zp: T.let = T.round(T.max(T.min(-lo / scale, T.float32(255)), T.float32(0)))
        c0: T.let = T.min(t * {chunk}, {n - chunk})
        for j in T.serial({chunk // lanes}):
            for u in T.vectorized({lanes}):
                q[c0 + j * {lanes} + u] = {code}
        if t == 0:
            sz[0] = scale
            sz[1] = zp
"""


def emit_dynamic_grid(bb, x, lo, hi, shape, lanes: int = 8, dequantized: bool = False):
    """(codes shaped `shape`, scale, zero point) of float32 x's per-call uint8 grid from its min `lo` and max
    `hi` (Relax scalars) on `dynamic_codes_source`'s kernel; scale and zero point as Relax scalars. `dequantized`:
    the values the codes stand for instead of the codes."""
    from tvm import relax

    n = math.prod(int(d) for d in shape)
    gv = bb.add_func(parse_kernel(dynamic_codes_source(n, lanes, dequantized)),
                     f"dynamic_{'values' if dequantized else 'codes'}_{n}")
    res = bb.emit(relax.call_tir(gv, [bb.emit(relax.op.reshape(v, s)) for v, s in ((x, (n,)), (lo, (1,)), (hi, (1,)))],
                                 [relax.TensorType((n,), "float32"), relax.TensorType((2,), "float32")]))
    q = bb.emit(relax.op.reshape(bb.emit(relax.TupleGetItem(res, 0)), tuple(int(d) for d in shape)))
    sz = bb.emit(relax.TupleGetItem(res, 1))
    scale, zp = (bb.emit(relax.op.reshape(bb.emit(relax.op.strided_slice(sz, [0], [i], [i + 1])), ())) for i in (0, 1))
    return q, scale, zp
