"""Winograd F(2x2, 3x3) for int8 3x3 stride-1 convs in 16-bit integers (`vpmaddwd`): the float Winograd kernel's
tiles and tasks (`winograd.py`) on int8 codes, exact.

With the weight transform scaled by 2 per side, G' = 2G = [[2,0,0],[1,1,1],[1,-1,1],[0,0,2]], U' = G' g G'^T is
4 U in integers: |U'| <= 9 * 128 = 1152 for int8 weights. The input transform V = B^T d B of int8 codes d (the
conv's padding holds the zero point, so the map is the codes themselves) adds 4 x 4 of them with signs:
|V| <= 512. Both fit int16, and `vpmaddwd` multiplies a pair of input channels' (V, U') and adds the two
products in int32 (16 products per instruction, as `vpmaddubsw` + `vpmaddwd` make 32 from two); the sum over
Cin channels stays below 2^31 for Cin < 3640. M = sum U' V is thus 4 x the exact int32 conv sum of the Winograd
elements, and the output transform Y = A^T M A (adds only) runs in float on M, so an output is the direct int8
conv's sum up to float32's rounding of the transform's few adds (relative 2^-24), then the int8 kernels' epilogue:
(Y / 4 - zero point x sum(w) - bias steps) x multiplier, clamped, requantized or dequantized.

On AVX2 the direct int8 convs (`vpmaddubsw`) multiply at 2x the FMA's rate and Winograd multiplies 2.25x less, so
the int8 3x3 convs had run at about the float Winograd kernel's speed (ResNet-18's 64 -> 64 at 56x56: int7 1.13
ms, fp32 1.25); this kernel multiplies at the direct int8 kernels' rate in 2.25x fewer products. It also takes
full-range int8 weights (`vpmaddubsw`'s pairs of u8 x s8 saturate int16 unless weights are 7-bit).
"""
from __future__ import annotations

import numpy as np

from graphopt.targets.tvm.cpu.conv import _clamped
from graphopt.targets.tvm.cpu.winograd import PANEL, panel_groups, winograd_geometry

# F(2x2, 3x3)'s weight transform scaled by 2 (integers): U' = G' g G'^T = 4 G g G^T
_G2 = np.array([[2, 0, 0], [1, 1, 1], [1, -1, 1], [0, 0, 2]], np.int64)
# the AVX2 register file the tile is sized for (`winograd_geometry`: 4-6 tiles of 16 int32 channels, two ymm
# each, + two of U' and a broadcast; the input transform's one 16-byte row load covers 6 tiles' 14 columns)
REGISTERS = 16
MAX_CIN = 3639  # 512 * 1152 * Cin < 2^31: the int32 sum of U' V cannot wrap


def pack_qwinograd(wq: np.ndarray) -> np.ndarray:
    """int8 W [Cout, Cin, 3, 3] (Cin even) -> int32 [16, panels, Cin / 2, 16] flat: per Winograd element e = 4i + j
    of U' = G' g G'^T, output-channel panel and input-channel pair, each of the panel's 16 channels' two int16
    values (channel 2c, then 2c + 1) as one word, `vpmaddwd`'s pair (zero past Cout)."""
    cout, cin = wq.shape[:2]
    panels = -(-cout // PANEL)
    u = np.einsum("ai,ocij,bj->aboc", _G2, wq.astype(np.int64), _G2)
    up = np.zeros((4, 4, panels * PANEL, cin), np.int16)
    up[:, :, :cout] = u
    up = up.reshape(16, panels, PANEL, cin // 2, 2).transpose(0, 1, 3, 2, 4)
    return np.ascontiguousarray(up).view(np.int32).reshape(-1)


def _transform_terms(g) -> list[str]:
    """U' = G' g G'^T of a 3x3 `g` (names or expressions, g[i][j]) as 16 integer expressions, element 4a + b."""
    def rows(v):  # G' applied to a 3-vector
        return [f"2 * {v[0]}", f"({v[0]} + {v[1]} + {v[2]})", f"({v[0]} - {v[1]} + {v[2]})", f"2 * {v[2]}"]
    t = [rows([g[0][j], g[1][j], g[2][j]]) for j in range(3)]  # t[j][a] = (G' g)[a][j]
    return [rows([t[0][a], t[1][a], t[2][a]])[b] for a in range(4) for b in range(4)]


def qwinograd_weights_source(cout: int, cin: int, nibbles: bool) -> str:
    """TVMScript of a load-time kernel (`prepared.py`) making `pack_qwinograd`'s U' from the int8 weight as stored
    in an artifact: W [Cout, Cin, 3, 3] flat, int8, or with `nibbles` two int4 values a byte (`int8.nibbles` of
    the even and the odd elements). U' is 32 bytes per channel pair against the weight's 9 (4.5 as int4): kept in
    the artifact, an int7 ResNet-18's library was 36.2 MB, 3.1x its 11.7 MB of int8 weights; made at load, 12.1
    MB."""
    from graphopt.targets.tvm.cpu import prepared
    panels, cp_n = -(-cout // PANEL), cin // 2
    attrs, read_seed = prepared.kernel_head()

    def weight(c: int, i: int, j: int) -> str:
        k = f"((o * {cin} + cp * 2 + {c}) * 9 + {i * 3 + j})"
        if not nibbles:
            return f'T.Cast("int32", w[{k}])'
        nib = f'T.bitwise_and(T.shift_right(T.Cast("int32", w[{k} // 2]), ({k} % 2) * 4), 15)'
        return f"(T.bitwise_xor({nib}, 8) - 8)"
    lets = "".join(f"""
                g{c}{i}{j}: T.let = {weight(c, i, j)}""" for c in range(2) for i in range(3) for j in range(3))
    terms = [_transform_terms([[f"g{c}{i}{j}" for j in range(3)] for i in range(3)]) for c in range(2)]
    words = "".join(f"""
                u[(({e} * {panels} + o // {PANEL}) * {cp_n} + cp) * {PANEL} + o % {PANEL}] = T.bitwise_or(
                    T.bitwise_and({terms[0][e]}, 65535), T.shift_left({terms[1][e]}, 16))""" for e in range(16))
    size = cout * cin * 9
    return f"""
@T.prim_func(private=True)
def qwinograd_weights(w: T.Buffer(({-(-size // 2) if nibbles else size},), "int8"), seed: T.Buffer((1,), "int8"),
                      u: T.Buffer(({16 * panels * cp_n * PANEL},), "int32")):
{attrs}
{read_seed}
    for o in T.parallel({panels * PANEL}):
        for cp in T.serial({cp_n}):
            if o >= {cout}:
                for e in T.serial(16):
                    u[((e * {panels} + o // {PANEL}) * {cp_n} + cp) * {PANEL} + o % {PANEL}] = 0
            else:{lets}{words}
"""


def qwinograd_weight(bb, wq: np.ndarray, groups: int = 1):
    """U' as a Relax value: the constant `pack_qwinograd(wq)`, or when lowering for an artifact
    (`prepared.active`) the weight itself (int8, or nibbles where it fits int4) and `qwinograd_weights_source`
    making U' when the artifact is loaded. `groups` > 1: wq holds the groups' weights one after the other (a
    grouped conv's [Cout, Cin / groups, 3, 3]), each packed on its own, end to end."""
    from tvm import relax

    from graphopt.targets.tvm.cpu import prepared
    from graphopt.targets.tvm.cpu.batch import batch_source
    from graphopt.targets.tvm.cpu.int8 import fits_int4, nibbles
    from graphopt.targets.tvm.cpu.parse import parse_kernel
    parts = np.split(np.ascontiguousarray(wq, np.int8), groups)
    if not prepared.active():
        packed = np.stack([pack_qwinograd(w) for w in parts])
        return relax.const(packed[0] if groups == 1 else packed)
    cout, cin = (int(d) for d in parts[0].shape[:2])
    small = fits_int4(wq)
    flats = [w.reshape(-1) for w in parts]
    if small:
        flats = [nibbles(f[0::2], np.pad(f[1::2], (0, f.size % 2))) for f in flats]
    src = batch_source(qwinograd_weights_source(cout, cin, small), groups, ["w", "u"], across=True)
    gv = bb.add_func(parse_kernel(src), f"qwinograd_weights_{cout}x{cin}" + ("_int4" if small else "")
                     + (f"_g{groups}" if groups > 1 else ""))
    size = 16 * -(-cout // PANEL) * (cin // 2) * PANEL
    flat = np.stack(flats)
    return prepared.load_time_call(bb, gv, [relax.const(flat[0] if groups == 1 else flat)],
                                   relax.TensorType((size,) if groups == 1 else (groups, size), "int32"))


WHOLE_V_BYTES = 512 * 1024  # a task's V for every tile of the map at most: L2-sized (Zen 3: 512 KB a core)


def qwinograd_plan(w_shape, stride: int, x_shape, padding) -> str | None:
    """How the rule runs a 3x3 stride-1 int8 conv on AVX2: "block" (`qwinograd_source`'s tasks of nt tiles),
    "whole" (every tile in each task, U' read once a call: where V for all tiles fits WHOLE_V_BYTES, or maps too
    narrow for a block, 7x7, with 16+ tiles and 256 x 128 channel pairs or more) or None (the direct int8 convs):
    32 to MAX_CIN input channels (an odd count: a zero weight channel pairs the last one, `qwinograd_source`'s
    `odd`), and 32+ output channels, or 16 (one output panel) with 96+ input channels. Odd counts: a HarDNet block
    (121 -> 78 and 75 -> 46 at 56x56, int8s) took 0.79-0.82x its time (5 interleaved rounds, Zen 4 without
    AVX-512: AVX2); in the profile 121 -> 78 1.72 ms against the pixel-row int8 conv's 2.09, 75 -> 46 0.73 / 0.80.

    Block against the direct int8 convs, kernels alone, interleaved (7 rounds, 2 threads, Zen 3, ReLU, int8 /
    float output), against the pixel-row and the flat int8 conv: 64x64 at 56x56 0.51 vs 0.70 / 0.70 ms, 128x128
    at 28x28 0.48 vs 0.66 / 0.72, 256x256 at 14x14 0.49 vs 0.64 / 0.72, 64x64 at 112x112 2.01 vs 2.78 / 2.74,
    32x32 at 64x64 0.22 vs 0.24 / 0.47, 64x32 at 56x56 0.29 vs 0.39 / 0.63, 32x64 at 56x56 0.28 vs 0.38 / 0.42,
    48x48 at 20x30 0.053 vs 0.072 / 0.079, 64x64 at 27x27 0.12 vs 0.17 / 0.17; 128x128 at 13x13 (two 6-tile
    blocks a 7-tile row) 0.149 vs 0.151; 16 channels in or out tie with the pixel-row conv or lose (16x16 at
    128x128 0.29-0.32 vs 0.26-0.28, 32x16 at 64x64 with a float output 0.19 vs 0.14; 24x24 at 64x64 0.16-0.26 vs
    0.20-0.25). The float Winograd kernel on the dequantized codes took 0.72-0.83 ms on the first three. One
    output panel with a long reduction (an int8 1x1 conv before it, the pair timed together, 3 rounds): 96 -> 16 at
    64x64 0.83-0.92x batch 1, 0.79-0.87x batch 4, 128 -> 16 at 28x28 0.70-1.00x; 64 -> 16 at 32x32 lost (1.42-1.45x),
    64 -> 16 at 64x64 batch 4 0.89-1.08x; a 3-D UNet's 96 -> 16 conv over 32 depth samples at 64x64 took the int8
    model to 0.71-0.91x its time (4 interleaved rounds).
    Whole against block and the pixel-row conv, warm / with the caches flushed before each run (a model's
    weights are cold: the layers between evict them), same conditions: 128x128 at 14x14 0.160 / 0.173 vs 0.184 /
    0.214 vs 0.275 / 0.268 ms, 256x256 at 14x14 0.65 / 0.67 vs 0.60 / 0.70 vs 1.06, 128x128 at 28x28 (V 800 KB:
    block) 0.62 / 0.61 vs 0.63 / 0.64; 7x7 maps (pixel-row conv): 512x512 0.57-0.64 / 0.75-0.77 vs 0.74-0.86 /
    0.87-0.88, 256x256 0.171 / 0.204 vs 0.227 / 0.225, 256x256 at 10x10 0.30 / 0.33 vs 0.38 / 0.38, 128x128 at
    10x10 0.071 / 0.080 vs 0.090 / 0.086; lost or tied with fewer tiles or channels (U' is 3.6x the weight's
    bytes, read for few products): 512x512 at 4x4 0.19 / 0.37 vs 0.25 / 0.27, 128x128 at 7x7 0.036 / 0.050 vs
    0.046 / 0.047, 256x128 at 7x7 0.090 / 0.116 vs 0.114 / 0.111, 64x64 at 7x7 0.015 / 0.021 vs 0.016 / 0.017."""
    cout, cin = int(w_shape[0]), int(w_shape[1])
    if not (tuple(int(d) for d in w_shape[2:]) == (3, 3) and stride == 1
            and 32 <= cin <= MAX_CIN and (cout >= 32 or cout >= 16 and cin >= 96)):
        return None
    h, wd = int(x_shape[2]), int(x_shape[3])
    whole = whole_geometry(h, wd, padding)
    fits = 32 * cin * whole["tiles"] <= WHOLE_V_BYTES  # (16 elements x Cin / 2 words x 4 bytes a tile)
    if winograd_geometry(h, wd, padding, REGISTERS) is not None:
        return "whole" if fits else "block"
    return "whole" if fits and whole["tiles"] >= 16 and cin * cout >= 256 * 128 else None


def _input_transform(wq: int, hq: int, vs: int, dst: str, pad: str, last: int | None = None) -> str:
    """Statements transforming input channels 2 cp and 2 cp + 1 of 6 or fewer tiles (tile row ty, tiles tx0 ..)
    into vb[e * vs + dst + tile]: per tile the two channels' int16 values as one word. `last`: the map's last
    channel where its count is odd (the last pair reads it twice; U' of the second is zero).
    Each of a channel's 4 input rows is one 16-byte load (columns 2 tx0 + 0..15) widened to int16, split by
    shuffles into the tiles' columns 0..3; the row transform (d0 - d2, d1 + d2, d2 - d1, d1 - d3) runs on those
    8-lane vectors, then the column transform on the rows; the two channels' results are interleaved. All 8
    lanes are written: those past the block's tiles go into the slots the next block or pair then overwrites (the
    last one's into the 8 words past its element's)."""
    even, odd = list(range(0, 16, 2)), list(range(1, 16, 2))
    even2, odd2 = list(range(2, 16, 2)) + [15], list(range(3, 16, 2)) + [15]
    out = ""
    for c in range(2):
        for i in range(4):
            ch = f"T.min(cp * 2 + 1, {last})" if c and last is not None else f"(cp * 2 + {c})"
            row = f'T.Cast("int16x16", xp[T.ramp({ch} * {hq * wq} + (ty * 2 + {i}) * {wq} + tx0 * 2, 1, 16)])'
            out += f"\n{pad}rw[T.ramp(0, 1, 16)] = {row}"
            d0, d1, d2, d3 = (f"T.Shuffle([rw[T.ramp(0, 1, 16)]], {ix})" for ix in (even, odd, even2, odd2))
            for j, e in enumerate((f"{d0} - {d2}", f"{d1} + {d2}", f"{d2} - {d1}", f"{d1} - {d3}")):
                out += f"\n{pad}hb[{c}, {i * 4 + j}, T.ramp(0, 1, 8)] = {e}"
    mix = [k for r in range(8) for k in (r, 8 + r)]
    for j in range(4):
        cols = []
        for c in range(2):
            r0, r1, r2, r3 = (f"hb[{c}, {i * 4 + j}, T.ramp(0, 1, 8)]" for i in range(4))
            cols.append((f"{r0} - {r2}", f"{r1} + {r2}", f"{r2} - {r1}", f"{r1} - {r3}"))
        for i in range(4):
            out += (f'\n{pad}vb[T.ramp({(i * 4 + j) * vs} + {dst}, 1, 8)] = T.reinterpret("int32x8", '
                    f"T.Shuffle([{cols[0][i]}, {cols[1][i]}], {mix}))")
    return out


def whole_geometry(h: int, wd: int, padding) -> dict:
    """`qwinograd_source(whole=True)`'s tiles: all TH x TW tiles of the map in one task, transformed 6 or fewer a
    16-column load (`nb`, the last block of a row moved back to end at its end), multiplied `nt` (6, or all where
    fewer) a register tile over the tiles in row-major order; the zeros the loads need past the conv's padding."""
    pt, pb, pl, pr = (int(q) for q in padding)
    hq, wq = h + pt + pb, wd + pl + pr
    oh, ow = hq - 2, wq - 2
    th, tw = -(-oh // 2), -(-ow // 2)
    nb = min(6, tw)
    extra_b, extra_r = max(0, 2 * th + 2 - hq), max(0, 2 * (tw - nb) + 16 - wq)
    return {"oh": oh, "ow": ow, "th": th, "tw": tw, "nb": nb, "ncx": -(-tw // nb), "tiles": th * tw,
            "nt": min(6, th * tw), "pad": (pt, pb + extra_b, pl, pr + extra_r), "hq": hq + extra_b, "wq": wq + extra_r}


def _epilogue(cout: int, panels: int, clamp, out_q, dequantized: bool, float_bias: bool) -> tuple[str, ...]:
    """The output transform's four 16-channel values of a tile (from m[e, r, :]) as TVMScript, the stored value of
    output (a, b) channel v (from yb[2a + b, v]), the output dtype, the bias parameter and the panel's guard."""
    m = [f"m[{e}, r, T.ramp(0, 1, {PANEL})]" for e in range(16)]
    s0 = [f"({m[j]} + {m[4 + j]} + {m[8 + j]})" for j in range(4)]  # A^T M: rows 0 and 1
    s1 = [f"({m[4 + j]} - {m[8 + j]} - {m[12 + j]})" for j in range(4)]
    ys = [f"{s[0]} + {s[1]} + {s[2]}" if b == 0 else f"{s[1]} - {s[2]} - {s[3]}" for s in (s0, s1) for b in (0, 1)]
    co = f"p * {PANEL} + v"
    x = f'(yb[a * 2 + b, v] * T.float32(0.25) - T.Cast("float32", off[{co}]))'
    if float_bias:
        val = _clamped(f"{x} * mult[{co}] + bias[{co}]", clamp, out_q, dequantized, qp="qp")
    else:
        val = _clamped(x, clamp, out_q, dequantized, qp="qp", times=f"mult[{co}]")
    otype = "int8" if out_q and not dequantized else "float32"
    bias_arg = f' bias: T.Buffer(({panels * PANEL},), "float32"),' if float_bias else ""
    guard = f"if {co} < {cout}:" if cout % PANEL else "if True:"
    return ys, val, otype, bias_arg, guard


def _gemm(nt: int, panels: int, cp_n: int, v_at: str, pad: str) -> str:
    """The GEMM of element e, panel p over the channel pairs into the nt x 16 int32 tile acc: per pair and tile a V
    word (vb[`v_at` + r]) broadcast, `vpmaddwd` with the two vectors of U' of the panel's 16 channels."""
    u = f"u[T.ramp(((e * {panels} + p) * {cp_n} + cp) * {PANEL} + {{h}}, 1, 8)]"
    step = "".join(f"""
{pad}        acc[T.ramp(r * {PANEL} + {hh}, 1, 8)] = acc[T.ramp(r * {PANEL} + {hh}, 1, 8)] + \\
{pad}            T.call_llvm_pure_intrin("int32x8", "llvm.x86.avx2.pmadd.wd", vx, T.reinterpret(
{pad}                "int16x16", {u.format(h=hh)}))""" for hh in (0, 8))
    return f"""
{pad}for r in T.unroll({nt}):
{pad}    acc[T.ramp(r * {PANEL}, 1, {PANEL})] = T.broadcast(T.int32(0), {PANEL})
{pad}for cp in T.serial({cp_n}):
{pad}    for r in T.unroll({nt}):
{pad}        vx: T.let = T.reinterpret("int16x16", T.broadcast(vb[{v_at} + r], 8)){step}"""


def _row_store(cout: int, oh: int, ow: int, w2: str, wmax: int, guard: str, pad: str) -> str:
    """Store the staged outputs ob[(a * w2 + x) * 16 + v] (2 output rows from oy0, w2 columns from ox0) channel by
    channel: each row's first `wmax` as one run (LLVM: vector stores) where they lie inside the map, else per
    output, those inside."""
    co = f"p * {PANEL} + v"
    return f"""
{pad}for v in T.serial({PANEL}):
{pad}    {guard}
{pad}        if oy0 + 2 <= {oh} and ox0 + {wmax} <= {ow}:
{pad}            for a in T.unroll(2):
{pad}                for x in T.unroll({wmax}):
{pad}                    out[{co}, oy0 + a, ox0 + x] = ob[(a * {w2} + x) * {PANEL} + v]
{pad}        else:
{pad}            for a in T.serial(2):
{pad}                for x in T.serial({w2}):
{pad}                    if oy0 + a < {oh} and ox0 + x < {ow}:
{pad}                        out[{co}, oy0 + a, ox0 + x] = ob[(a * {w2} + x) * {PANEL} + v]"""


def qwinograd_source(cout: int, cin: int, h: int, wd: int, padding, clamp: tuple[float, float] | None,
                     out_q: tuple[float, int, int, int] | None = None, dequantized: bool = False,
                     float_bias: bool = False, cores: int = 1, whole: bool = False, odd: bool = False) -> str:
    """TVMScript of the int8 F(2x2, 3x3) conv (module docstring) over xp, the int8 map padded with its zero point
    to the geometry's `pad` ([Cin, Hq, Wq] flat), with U' (`pack_qwinograd`) and the int8 kernels' epilogue
    constants (`int8.epilogue_constants` at the map's own zero point: off, mult, [bias], qp = `store_params`), into
    out [Cout, OH, OW] (int8 with out_q, else float32). A task (nt tiles of a tile row, `winograd_geometry`)
    transforms its input into a task-local V; per 16-channel output panel and element an nt x 16 int32 tile
    accumulates `vpmaddwd` products (a V word broadcast, two vectors of U' loaded per channel pair); M, as floats,
    goes to the output transform, whose values the epilogue turns into the block's 2 x 2 nt outputs per channel,
    stored channel by channel (the 2 nt outputs of a row as one run), per output at the map's odd edges.
    `whole`: a task transforms every tile of the map (`whole_geometry`) and runs its share of the panels over all
    of them, so U' is read once per call rather than once per block of tiles (small maps of deep convs, where U'
    is megabytes and the blocks many). `odd`: xp holds Cin - 1 channels (an odd count; U' packed with a zero
    input channel to make Cin even), the last pair reading its last channel twice."""
    cp_n = cin // 2
    last = cin - 2 if odd else None
    panels = -(-cout // PANEL)
    ys, val, otype, bias_arg, guard = _epilogue(cout, panels, clamp, out_q, dequantized, float_bias)
    outputs = "".join(f"""
                yb[{k}, T.ramp(0, 1, {PANEL})] = {y}""" for k, y in enumerate(ys))
    head = f"""
@T.prim_func(private=True)
def qwinograd(xp: T.Buffer(({{size}},), "int8"), u: T.Buffer(({16 * panels * cp_n * PANEL},), "int32"),
              off: T.Buffer(({panels * PANEL},), "int32"), mult: T.Buffer(({panels * PANEL},), "float32"),{bias_arg}
              qp: T.Buffer((4,), "float32"), out: T.Buffer(({cout}, {{oh}}, {{ow}}), "{otype}")):
    T.func_attr({{{{"tirx.noalias": True, "tirx.is_scheduled": True, "op_pattern": 8}}}})"""
    if whole:
        g = whole_geometry(h, wd, padding)
        nt, nb, ncx, tw, th, tiles, oh, ow, hq, wq = (g[k] for k in ("nt", "nb", "ncx", "tw", "th", "tiles", "oh",
                                                                      "ow", "hq", "wq"))
        vs = cp_n * tiles + 8
        groups = max(1, min(cores, panels))
        chunks = -(-tiles // nt)
        w2 = 2 * tw
        transform = _input_transform(wq, hq, vs, f"cp * {tiles} + ty * {tw} + tx0", " " * 20, last)
        gemm = _gemm(nt, panels, cp_n, f"e * {vs} + cp * {tiles} + k0", " " * 20)
        return head.format(size=(cin - odd) * hq * wq, oh=oh, ow=ow) + f"""
    for t in T.parallel({groups}):
        rw = T.decl_buffer((16,), "int16", scope="global")
        hb = T.decl_buffer((2, 16, 8), "int16", scope="global")
        vb = T.decl_buffer(({16 * vs},), "int32", scope="global")
        for cp in T.serial({cp_n}):
            for ty in T.serial({th}):
                for bx in T.serial({ncx}):
                    tx0: T.let = T.min(bx * {nb}, {tw - nb}){transform}
        m = T.decl_buffer((16, {chunks * nt}, {PANEL}), "float32", scope="global")
        acc = T.decl_buffer(({nt * PANEL},), "int32", scope="global")
        yb = T.decl_buffer((4, {PANEL}), "float32", scope="global")
        ob = T.decl_buffer(({2 * w2 * PANEL},), "{otype}", scope="global")
        for p in T.serial(t * {panels} // {groups}, (t + 1) * {panels} // {groups}):
            for e in T.serial(16):
                for c in T.serial({chunks}):
                    k0: T.let = T.min(c * {nt}, {tiles - nt}){gemm}
                    for r in T.unroll({nt}):
                        m[e, k0 + r, T.ramp(0, 1, {PANEL})] = T.Cast("float32x{PANEL}", acc[T.ramp(r * {PANEL}, 1,
                                                                                                   {PANEL})])
            for ty in T.serial({th}):
                for tx in T.serial({tw}):
                    r: T.let = ty * {tw} + tx{outputs.replace(chr(10) + " " * 16, chr(10) + " " * 20)}
                    for a in T.unroll(2):
                        for b in T.unroll(2):
                            for v in T.vectorized({PANEL}):
                                ob[(a * {w2} + tx * 2 + b) * {PANEL} + v] = {val}
                oy0: T.let = ty * 2
                ox0: T.let = 0{_row_store(cout, oh, ow, str(w2), ow, guard, " " * 16)}
"""
    g = winograd_geometry(h, wd, padding, REGISTERS)
    nt, ncx, tw, oh, ow, hq, wq = (g[k] for k in ("nt", "ncx", "tw", "oh", "ow", "hq", "wq"))
    vs = cp_n * nt + 8 - nt
    groups = panel_groups(g["blocks"], panels, cores)
    w2 = 2 * nt
    return head.format(size=(cin - odd) * hq * wq, oh=oh, ow=ow) + f"""
    for t in T.parallel({g["blocks"] * groups}):
        ty: T.let = t // {groups} // {ncx}
        tx0: T.let = T.min(t // {groups} % {ncx} * {nt}, {tw - nt})
        rw = T.decl_buffer((16,), "int16", scope="global")
        hb = T.decl_buffer((2, 16, 8), "int16", scope="global")
        vb = T.decl_buffer(({16 * vs},), "int32", scope="global")
        for cp in T.serial({cp_n}):{_input_transform(wq, hq, vs, f"cp * {nt}", " " * 12, last)}
        m = T.decl_buffer((16, {nt}, {PANEL}), "float32", scope="global")
        acc = T.decl_buffer(({nt * PANEL},), "int32", scope="global")
        yb = T.decl_buffer((4, {PANEL}), "float32", scope="global")
        ob = T.decl_buffer(({2 * w2 * PANEL},), "{otype}", scope="global")
        for p in T.serial(t % {groups} * {panels} // {groups}, (t % {groups} + 1) * {panels} // {groups}):
            for e in T.serial(16):{_gemm(nt, panels, cp_n, f"e * {vs} + cp * {nt}", " " * 16)}
                for r in T.unroll({nt}):
                    m[e, r, T.ramp(0, 1, {PANEL})] = T.Cast("float32x{PANEL}", acc[T.ramp(r * {PANEL}, 1, {PANEL})])
            for r in T.serial({nt}):{outputs}
                for a in T.unroll(2):
                    for b in T.unroll(2):
                        for v in T.vectorized({PANEL}):
                            ob[(a * {w2} + r * 2 + b) * {PANEL} + v] = {val}
            oy0: T.let = ty * 2
            ox0: T.let = tx0 * 2{_row_store(cout, oh, ow, str(w2), w2, guard, " " * 12)}
"""


def emit_qwinograd(bb, xq, wq: np.ndarray, w_scales: np.ndarray, bias: np.ndarray | None, sx: float, zx: int,
                   x_shape, padding, clamp, out_q, dequantized: bool = False, cores: int = 1, whole: bool = False,
                   groups: int = 1):
    """The int8 3x3 stride-1 conv of xq int8 [N, Cin, H, W] (per sample) as int16 Winograd: the map padded with its
    zero point (`pool.emit_pad`) to the geometry's pad, then `qwinograd_source` (`whole`: see there). `groups` > 1
    (batch 1 only): a grouped conv (wq [Cout, Cin / groups, 3, 3]) as one call whose samples are the groups, each
    with its own weights and epilogue, the threads splitting the groups (`batch_source`'s across): the groups'
    input and output channels are contiguous runs of the map, so no split or concatenation is needed (SKNet's
    int8 unit 0.86-0.97x its time with a call per group, interleaved, Zen 3). None where the groups' bias
    forms differ (`epilogue_constants`: a float bias in some groups only): the caller then runs them one by one."""
    from tvm import relax

    from graphopt.targets.tvm.cpu.batch import batch_source
    from graphopt.targets.tvm.cpu.conv import _batched, _ntag, store_params
    from graphopt.targets.tvm.cpu.int8 import MR, epilogue_constants
    from graphopt.targets.tvm.cpu.parse import parse_kernel
    from graphopt.targets.tvm.cpu.pool import emit_pad

    n, cin, h, wd = (int(d) for d in x_shape)
    cout = int(wq.shape[0]) // groups
    width = -(-cout // PANEL) * PANEL
    odd = int(wq.shape[1]) % 2  # (a zero input channel makes the weight's pairs whole; the map stays as it is)
    wq = np.pad(wq, ((0, 0), (0, odd), (0, 0), (0, 0))) if odd else wq
    per_group = [tuple(None if c is None else c[:width] for c in epilogue_constants(
        wq[k * cout:(k + 1) * cout], w_scales[k * cout:(k + 1) * cout],
        None if bias is None else bias[k * cout:(k + 1) * cout], sx, zx, -(-width // MR), out_q))
        for k in range(groups)]
    if len({c[2] is None for c in per_group}) > 1:
        return None
    if groups > 1:
        if n != 1:
            raise ValueError("a grouped int8 Winograd conv runs as one call at batch 1 only")
        x_shape, n, cin = (groups, cin // groups, h, wd), groups, cin // groups
        xq = bb.emit(relax.op.reshape(xq, x_shape))
    g = whole_geometry(h, wd, padding) if whole else winograd_geometry(h, wd, padding, REGISTERS)
    top, bottom, left, right = (int(q) for q in g["pad"])
    oh, ow, hq, wq_ = g["oh"], g["ow"], g["hq"], g["wq"]
    consts = tuple(None if per_group[0][i] is None else np.concatenate([c[i] for c in per_group]) for i in range(3))
    xp = emit_pad(bb, xq, x_shape, (left, right, top, bottom), int(zx), "int8")
    xp = bb.emit(relax.op.reshape(xp, _batched(n, cin * hq * wq_)))
    # (groups > 1: each thread runs whole groups, so one task per group: split further, each task would transform
    # the group's input again, serially)
    src = qwinograd_source(cout, cin + odd, h, wd, padding, clamp, out_q, dequantized, consts[2] is not None,
                           cores if groups == 1 else 1, whole, bool(odd))
    pads = "".join(str(int(q)) for q in padding)
    tag = (f"{cout}x{cin}x{h}x{wd}_p{pads}" + ("_whole" if whole else "") + ("" if clamp is None else "_clamp")
           + ("_q" if out_q else "") + ("dq" if dequantized else "")
           + (f"_g{groups}" if groups > 1 else _ntag(n)))
    names = ["xp", "out"] + (["u", "off", "mult"] + (["bias"] if consts[2] is not None else []) if groups > 1 else [])
    gv = bb.add_func(parse_kernel(batch_source(src, n, names, across=groups > 1)), f"qwinograd_{tag}")
    dtype = "int8" if out_q and not dequantized else "float32"
    epilogue = [relax.const(c if groups == 1 else c.reshape(groups, -1)) for c in consts if c is not None]
    y = bb.emit(relax.call_tir(gv, [xp, qwinograd_weight(bb, wq, groups), *epilogue,
                                    relax.const(store_params(clamp, out_q))],
                               relax.TensorType(_batched(n, cout, oh, ow), dtype)))
    return bb.emit(relax.op.reshape(y, (1, groups * cout, oh, ow) if groups > 1 else (n, cout, oh, ow)))
