"""int8 depthwise convolution on `vpdpbusd`: four taps of a row in one instruction, for 16 outputs at a time.

A depthwise conv has no reduction over channels for the int8 dot product to run along, so the quads are taps:
output column x of tap row i needs input bytes x*s .. x*s + 3 of padded row y*s + i (weights w[i, 0..3], the
fourth zero for 3x3 taps; 5x5 taps take a second quad, w[i, 4] and three zeros). One 64-byte load of the padded
input row and one byte permute (`vpermb`, AVX512-VBMI: a constant shuffle LLVM emits as one instruction) lay out
16 such overlapping quads, one per output column (at stride 2 the quads start two bytes apart: the same permute,
other indices); one `vpdpbusd` against the broadcast weight quad then adds that tap row's products into 16 int32
accumulators. A 3x3 layer takes 3 dot products per 16 outputs where the float kernel takes 9 FMAs, and the
input is read as the int8 its producer stored, without converting a value.

Each task stages its channel as uint8 (x + 128, `xor`) in a plane padded with the input's zero point (so padding
needs no branches: a pad byte stands for 0.0 like any zero-point byte), then:
- maps 16 or more columns wide (the row kernel): blocks of `rows` output rows x 16 columns (the last column block
  overlapping the one before: same values), each permuted input row used by every output row of the block that
  reads it;
- narrower maps (the 14x14 and 7x7 stages): 16 consecutive outputs of the flattened map at a time, wrapping
  across output rows; the permute gathers each lane's quad from one or two 64-byte loads (`vpermt2b`), since such
  a chunk spans two or three input rows.
The epilogue is the pointwise kernels' (`int8._requantized`): the accumulator starts at -offset (the zero point's
sum over the taps and the int32 bias), is scaled per channel, clamped and rounded to the output grid.
"""
from __future__ import annotations

import numpy as np

from graphopt.targets.tvm.cpu.batch import batch_source
from graphopt.targets.tvm.cpu.conv import deeper, store_params
from graphopt.targets.tvm.cpu.int8 import MR, _requantized, epilogue_constants, quad_dot_stmt
from graphopt.targets.tvm.cpu.parse import parse_kernel

LANES = 16  # outputs per accumulator (512-bit int32)
WINDOW = 64  # bytes per load, and the permute's reach per source
MAX_CHUNKS = 16  # narrow maps: flattened chunks unrolled per channel


def int8_depthwise_dot(target) -> str | None:
    """"vnni" where `target` has what the kernel needs: 512-bit `vpdpbusd` (AVX512-VNNI) and `vpermb`
    (AVX512-VBMI); else None (the float depthwise kernels)."""
    from tvm.target import codegen
    try:
        return "vnni" if codegen.llvm_cpu_has_features(["avx512vnni", "avx512vbmi"], target) else None
    except Exception:
        return None


def parts(kw: int) -> int:
    """Weight quads per tap row."""
    return -(-kw // 4)


def plane(oh: int, ow: int, kh: int, kw: int, s: int) -> tuple[int, int, int]:
    """(rows, row length, bytes) of the padded plane a task stages: the padded rows and columns the taps read, and
    a window's slack past the last row (a 64-byte load at the last quad)."""
    hp, wb = (oh - 1) * s + kh, (ow - 1) * s + kw
    return hp, wb, -(-(hp * wb + WINDOW) // WINDOW) * WINDOW


def flat_chunks(oh: int, ow: int, s: int, wb: int) -> list[tuple[int, int, list[int], list[int]]] | None:
    """The narrow-map plan: per chunk of 16 flattened outputs (the last overlapping the one before), (first output,
    plane offset of its first lane's tap row 0, window origins relative to that offset, the permute's 64 byte
    indices into the windows laid end to end); None when a chunk needs more than two windows."""
    n = oh * ow
    if n < LANES:
        return None
    plan = []
    for t in range(-(-n // LANES)):
        p0 = min(t * LANES, n - LANES)
        offs = [(p // ow) * s * wb + (p % ow) * s for p in range(p0, p0 + LANES)]
        rel = [o - offs[0] for o in offs]
        wins, idx = [0], []
        for r in rel:
            if r + 3 >= wins[-1] + WINDOW:
                wins.append(r)
            idx += [WINDOW * (len(wins) - 1) + r - wins[-1] + b for b in range(4)]
        if len(wins) > 2:
            return None
        plan.append((p0, offs[0], wins, idx))
    return plan


def qdepthwise_applies(c: int, oh: int, ow: int, kh: int, kw: int, stride: int) -> bool:
    """Whether the kernel takes the layer: stride 1 or 2; 16 output columns or more (the row kernel) or a narrow map
    of 16 to 256 outputs whose chunks each fit two windows; the staged plane within 64 KB."""
    if stride not in (1, 2) or kh < 1 or kw < 1:
        return False
    _, wb, size = plane(oh, ow, kh, kw, stride)
    if size > 65536:
        return False
    if ow >= LANES:
        return True
    return oh * ow <= MAX_CHUNKS * LANES and flat_chunks(oh, ow, stride, wb) is not None


def pack_tap_quads(w: np.ndarray) -> np.ndarray:
    """int8 weight [C, kh, kw] -> int32 [C * kh * parts]: each tap row's taps 4 to a word (byte b = tap 4k + b,
    zeros past kw), the word a `vpdpbusd` broadcasts."""
    c, kh, kw = w.shape
    z = np.zeros((c, kh, 4 * parts(kw)), np.int8)
    z[:, :, :kw] = w
    return np.ascontiguousarray(z).view(np.int32).reshape(-1)


def qdepthwise_source(c: int, h: int, wd: int, oh: int, ow: int, kh: int, kw: int, stride: int, pt: int, pl: int,
                      clamp: tuple[float, float] | None = None, out_q: tuple[float, int, int, int] | None = None,
                      float_bias: bool = False, dot: str = "vnni", rows: int = 4) -> str:
    """TVMScript of the int8 depthwise kernel (module docstring) for x int8 [C, h, wd] (top and left padding pt,
    pl; the bottom and right ones are what the output size needs) -> out [C, oh, ow]: int8 on out_q's grid, else
    float32. Arguments: x, the packed weight quads (`pack_tap_quads`), off and mult per channel (and the float bias
    with `float_bias`), xz = [the input's zero point + 128] (the pad byte: layers of one shape share the
    function), the store parameters qp, out. `dot`: "vnni", or "exact" (the reference `quad_dot`, any CPU)."""
    s, nk = stride, parts(kw)
    if not qdepthwise_applies(c, oh, ow, kh, kw, s):
        raise ValueError(f"the int8 depthwise kernel does not take {c}x{oh}x{ow} outputs, {kh}x{kw} taps, stride {s}")
    hp, wb, size = plane(oh, ow, kh, kw, s)
    n_out = oh * ow
    copy_rows, copy_cols = min(h, hp - pt), min(wd, wb - pl)

    def weight(i, k) -> str:
        return f'T.reinterpret("int8x{4 * LANES}", T.broadcast(w4[(ch * {kh} + {i}) * {nk} + {k}], {LANES}))'

    def window(origin: str) -> str:
        return f"xp[T.ramp(pb + {origin}, 1, {WINDOW})]"

    def store(acc: str, p0: str) -> str:
        val = _requantized(f"{acc}[r * {LANES} + u]", "ch", clamp, out_q, False, float_bias, offset_in_acc=True)
        return f"""
for u in T.vectorized({LANES}):
    out[ch * {n_out} + {p0} + u] = {val}"""

    init = f"T.broadcast(-off[ch], {LANES})"
    if ow >= LANES:  # the row kernel
        rb = min(oh, rows)
        idx = [lane * s + b for lane in range(LANES) for b in range(4)]
        dots = ""
        for ii in range((rb - 1) * s + kh):
            for k in range(nk):
                win = f"T.Shuffle([{window(f'(y0 * {s} + {ii}) * {wb} + x0 * {s} + {4 * k}')}], {idx})"
                for r in range(rb):
                    if 0 <= ii - r * s < kh:
                        a = f"acc[T.ramp({r * LANES}, 1, {LANES})]"
                        dots += "\n" + quad_dot_stmt(a, win, weight(ii - r * s, k), dot, LANES, f"p{ii}_{k}_{r}")
        body = f"""
for yb in T.serial({-(-oh // rb)}):
    y0: T.let = T.min(yb * {rb}, {oh - rb})
    for xo in T.serial({-(-ow // LANES)}):
        x0: T.let = T.min(xo * {LANES}, {ow - LANES})
        acc = T.decl_buffer(({rb * LANES},), "int32", scope="global")
        for r in T.unroll({rb}):
            acc[T.ramp(r * {LANES}, 1, {LANES})] = {init}{deeper(dots, 8)}
        for r in T.unroll({rb}):{deeper(store("acc", f"(y0 + r) * {ow} + x0"), 12)}"""
    else:  # narrow maps: flattened chunks, unrolled
        body = ""
        for t, (p0, base, wins, idx) in enumerate(flat_chunks(oh, ow, s, wb)):
            dots = ""
            for i in range(kh):
                for k in range(nk):
                    srcs = ", ".join(window(f"{base + o + i * wb + 4 * k}") for o in wins)
                    a = f"acc{t}[T.ramp(0, 1, {LANES})]"
                    dots += "\n" + quad_dot_stmt(a, f"T.Shuffle([{srcs}], {idx})", weight(i, k), dot, LANES,
                                                  f"p{t}_{i}_{k}")
            body += f"""
acc{t} = T.decl_buffer(({LANES},), "int32", scope="global")
acc{t}[T.ramp(0, 1, {LANES})] = {init}{dots}
for r in T.unroll(1):{deeper(store(f"acc{t}", str(p0)), 4)}"""
    copy = _copy_rows(h, wd, hp, wb, pt, pl, copy_rows, copy_cols)
    per = next((p for p in (8, 4, 2) if c >= 8 * p), 1)  # channels a task (the plane's pad filled once a task)
    loop = f"""
for ci in T.serial({per}):
    ch: T.let = cc * {per} + ci"""
    if ow >= LANES:  # a plane, filled and read channel by channel
        planes = 1
        channels = deeper(f"""{loop}
    pb: T.let = 0
    if ch < {c}:{deeper(copy + body, 8)}""", 8)
    else:  # a plane per channel of the task, all filled first
        planes = per
        channels = deeper(f"""{loop}
    pb: T.let = ci * {size}
    if ch < {c}:{deeper(copy, 8)}{loop}
    pb: T.let = ci * {size}
    if ch < {c}:{deeper(body, 8)}""", 8)
    bias_arg = f' bias: T.Buffer(({c},), "float32"),' if float_bias else ""
    out_t = "int8" if out_q is not None else "float32"
    return f"""
@T.prim_func(private=True)
def qdepthwise_{dot}(x: T.Buffer(({c * h * wd},), "int8"), w4: T.Buffer(({c * kh * nk},), "int32"),
                     off: T.Buffer(({c},), "int32"), mult: T.Buffer(({c},), "float32"),{bias_arg}
                     xz: T.Buffer((1,), "int32"), qp: T.Buffer((4,), "float32"),
                     out: T.Buffer(({c * n_out},), "{out_t}")):
    T.func_attr({{"tirx.noalias": True, "tirx.is_scheduled": True}})
    for cc in T.parallel({-(-c // per)}):
        xp = T.decl_buffer(({size * planes},), "uint8", scope="global")
        for q in T.serial({size * planes // WINDOW}):
            for u in T.vectorized({WINDOW}):
                xp[q * {WINDOW} + u] = T.Cast("uint8", xz[0]){channels}
"""


def _pow2(n: int) -> int:
    return 1 << (n - 1).bit_length()


def _copy_rows(h: int, wd: int, hp: int, wb: int, pt: int, pl: int, copy_rows: int, copy_cols: int) -> str:
    """TVMScript (at indent 0) copying channel ch's input rows into the plane as uint8 (x xor 0x80). Planes up to 64
    bytes a row build each padded row in a register, pads included: the input row read as a power-of-2 vector (past
    its end into the next row; the channel's last row as the vector that ends with it), one shuffle against the
    zero point byte, one power-of-2 store whose spill past the row the next row's store overwrites (the last row's spill
    lands in the bottom pad, filled again after, or in the slack). A 7- or 14-byte row copied as it is took 3
    loads, 3 xors and 3 stores; wider rows are copied so, between the pads written once a task."""
    if wb > WINDOW:
        return f"""
for yy in T.serial({copy_rows}):
    for u in T.vectorized({copy_cols}):
        xp[pb + (yy + {pt}) * {wb} + {pl} + u] = T.Cast("uint8", T.bitwise_xor(
            x[(ch * {h} + yy) * {wd} + u], T.int8(-128)))"""
    n, m = min(_pow2(wd), WINDOW), _pow2(wb)

    def row(yy: str, width: int, back: int = 0) -> str:
        idx = [j - pl + back if 0 <= j - pl < copy_cols else width for j in range(wb)] + [width] * (m - wb)
        src = f"x[T.ramp((ch * {h} + {yy}) * {wd} - {back}, 1, {width})]"
        return f"""
xp[T.ramp(pb + ({yy} + {pt}) * {wb}, 1, {m})] = T.reinterpret("uint8x{m}", T.bitwise_xor(
    T.Shuffle([{src}, T.broadcast(zs, {max(width, m)})], {idx}), T.broadcast(T.int8(-128), {m})))"""
    last = copy_rows == h  # (the channel's last row ends its n-byte read: the next bytes may be past the input)
    code = f"""
zs: T.let = T.Cast("int8", xz[0] - 128)
for yy in T.serial({copy_rows - last}):{deeper(row("yy", n), 4)}"""
    if last:
        code += row(str(h - 1), n, n - wd) if h * wd >= n else row(str(h - 1), wd)
    if m > wb and pt + copy_rows < hp:  # the last row's spill went into the bottom pad: fill it again
        bottom = (pt + copy_rows) * wb
        code += f"""
for u in T.vectorized({min(m - wb, hp * wb - bottom)}):
    xp[pb + {bottom} + u] = T.Cast("uint8", xz[0])"""
    return code


def emit_qdepthwise(bb, xq, wq: np.ndarray, w_scales: np.ndarray, bias: np.ndarray | None, sx: float, zx: int,
                    x_shape, stride: int, padding, clamp: tuple[float, float] | None,
                    out_q: tuple[float, int, int, int] | None, dot: str = "vnni", tag: str = ""):
    """Emit the int8 depthwise conv of xq int8 [N, C, H, W] on the grid (sx, zx) with the int8 weight wq
    [C, 1, kh, kw] (scales w_scales per channel or one), float bias, `padding` (top, bottom, left, right):
    -> [N, C, oh, ow], int8 on out_q's grid or float32, and the kernel's function name. The caller checked
    `qdepthwise_applies`."""
    from tvm import relax

    n, c, h, wd = (int(d) for d in x_shape)
    kh, kw = int(wq.shape[2]), int(wq.shape[3])
    if not -128 <= int(zx) <= 127:  # (its pad byte, zx + 128, must be a uint8)
        raise ValueError(f"the int8 depthwise kernel takes an int8 input grid; zero point {zx} is outside [-128, 127]")
    pt, pb, pl, pr = (int(q) for q in padding)
    oh, ow = (h + pt + pb - kh) // stride + 1, (wd + pl + pr - kw) // stride + 1
    w = np.asarray(wq, np.int8).reshape(c, kh, kw)
    off, mult, fbias = (None if a is None else a[:c] for a in
                        epilogue_constants(w, np.asarray(w_scales, np.float64).reshape(-1), bias, sx, zx + 128,
                                           -(-c // MR), out_q))
    src = qdepthwise_source(c, h, wd, oh, ow, kh, kw, stride, pt, pl, clamp, out_q, fbias is not None, dot)
    gv = bb.add_func(parse_kernel(batch_source(src, n, ["x", "out"])), f"qdepthwise_{dot}_{tag}")
    flat = lambda size: (n, size) if n > 1 else (size,)  # noqa: E731  (batch_source's per-sample buffers)
    consts = [pack_tap_quads(w), off, mult] + ([fbias] if fbias is not None else []) + \
        [np.array([zx + 128], np.int32), store_params(clamp, out_q)]
    y = bb.emit(relax.call_tir(gv, [bb.emit(relax.op.reshape(xq, flat(c * h * wd))), *map(relax.const, consts)],
                               relax.TensorType(flat(c * oh * ow), "int8" if out_q is not None else "float32")))
    return bb.emit(relax.op.reshape(y, (n, c, oh, ow))), gv.name_hint
