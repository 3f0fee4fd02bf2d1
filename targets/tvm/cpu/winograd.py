"""Winograd F(2x2, 3x3) for dense 3x3 stride-1 float convs: each 2x2 block of outputs from a 4x4 block of input
(a tile) in 16 products per (input, output) channel pair instead of 36, so the convs that are most of a ResNet's
or a UNet's work multiply 2.25x less.

Per tile and input channel the input transform V = B^T d B (adds only), per channel pair the weight transform
U = G g G^T (at compile time), then for each of the 16 elements e a GEMM over input channels,
M[e] = U[e] V[e], and the output transform Y = A^T M A (adds only) with bias, the residual and the clamp. One
kernel does all three per task (`winograd_source`): a task is a block of `nt` tiles along one tile row; it
transforms its input for every channel into a task-local V, then for each 16-channel output panel runs the 16
GEMMs in an nt x 16 register tile (a V value broadcast, a vector of U loaded, as in the pixel-row conv
`conv.tok_conv_source`) and transforms and stores the panel's outputs. Keeping V in the task (28 KB for 64
channels) instead of writing it out for a separate GEMM kernel (four times the input's size) was 1.03-1.5x faster
(64->64 at 128x128: 4.18 vs 6.19 ms).

Numerically F(2x2, 3x3) is as exact as the direct conv: B and A hold only 0 and +-1, G halves; against PyTorch
the outputs differ by 2-6e-6 where the pixel-row conv's differ by 8e-6 to 3e-5 (a 64- instead of a 576-term
sum per output).
"""
from __future__ import annotations

import numpy as np

from graphopt.targets.tvm.cpu.conv import channel_store

PANEL = 16  # output channels per register tile: one 16-float vector (a zmm, or two ymm)
# F(2x2, 3x3)'s weight transform; the input (B^T) and output (A^T) transforms are written out in the sources
_G = np.array([[1, 0, 0], [.5, .5, .5], [.5, -.5, .5], [0, 0, 1]], np.float64)


def winograd_geometry(h: int, wd: int, padding, registers: int = 32) -> dict | None:
    """Output size, tiles (TH x TW, 2x2 outputs each), tiles per task `nt` and the task blocks of a 3x3 stride-1
    conv on an H x W map, with the padding the input needs for every tile's 4x4 read (`pad`: the conv's, plus a
    row and columns of zeros where OH is odd or a block's 18-column vector read passes the right edge), or None
    where a tile row is shorter than a register tile. `nt` is 6-8 tiles with 32 vector registers (nt x 16-float
    accumulators), 4-6 with 16 (AVX2: each 16-float accumulator two registers), the one of least overlap: blocks
    are nt tiles of one tile row, the last block of a row moved back to end at its end (overlapping the block
    before; those outputs are computed twice, with the same values). Not on maps under 11 columns (ResNet's 7x7
    stage): there U, 1.8x the conv's weight, is read from memory for few products (512->512 at 7x7: 16 MB;
    inside ResNet-18 each such conv took 2.3-2.4 ms against the pixel-row conv's 1.3, alone 0.83-0.97 against
    1.2)."""
    pt, pb, pl, pr = (int(q) for q in padding)
    oh, ow = h + pt + pb - 2, wd + pl + pr - 2
    th, tw = -(-oh // 2), -(-ow // 2)
    options = (8, 7, 6) if registers >= 32 else (6, 5, 4)
    if tw < 6 or oh < 1:
        return None
    nt = min((n for n in options if n <= tw), key=lambda n: (-(-tw // n) * n, -n))
    ncx = -(-tw // nt)
    hq, wq = h + pt + pb, wd + pl + pr
    extra_b = max(0, 2 * th + 2 - hq)
    extra_r = max(0, 2 * (tw - nt) + 18 - wq, 2 * tw + 2 - wq)
    return {"oh": oh, "ow": ow, "th": th, "tw": tw, "nt": nt, "ncx": ncx, "blocks": th * ncx,
            "pad": (pt, pb + extra_b, pl, pr + extra_r), "hq": hq + extra_b, "wq": wq + extra_r}


def winograd_applies(w_shape, stride: int, x_shape, padding, registers: int = 32) -> bool:
    """3x3 stride-1 convs of 8+ input channels whose tile rows hold a register tile (`winograd_geometry`)."""
    return (tuple(int(d) for d in w_shape[2:]) == (3, 3) and stride == 1 and int(w_shape[1]) >= 8
            and winograd_geometry(int(x_shape[2]), int(x_shape[3]), padding, registers) is not None)


WINOGRAD_PANEL_INPUT_BYTES = 4 << 20  # a one-panel conv's input (all samples) from which Winograd pays


def winograd_wins(cout: int, cin: int, input_bytes: int = 0) -> bool:
    """Whether the rule takes Winograd over the pixel-row conv: with 16+ input and 32+ output channels, or 16+
    output channels (one panel) where the reduction is long (128+ input channels) or the input, all samples,
    `input_bytes`, is 4 MB or more. Kernels alone (with the zero pad before each; 2 threads, Zen 4, conv + ReLU),
    pixel-row / Winograd time: 64->64 at 56x56 1.79x, 128->128 at 28x28 2.04x, 256->256 at 14x14 1.93x, 64->64 at
    128x128 1.53x, 32->32 at 16x16 1.30x, 16->32 at 64x64 1.21x, 32->64 at 28x28 1.59x; 16->16 at 32x32 0.81x and
    12->16 at 24x24 0.99x (one output panel: the transforms and the store outweigh the shorter reduction). One
    panel on a Zen 3 (conv + ReLU alone, 3 interleaved rounds, Winograd / pixel-row time): 16-64 -> 16 at 32x32 and
    64x64 0.96-1.24x, 96 -> 16 at 64x64 0.90-1.08x at batch 1 but 0.73-0.88x at batch 4 (6.3 MB of input, which the
    pixel-row conv reads from memory), 128 -> 16 at 28x28 0.81-0.87x; a 3-D UNet's 96 -> 16 conv over 32 depth
    samples at 64x64 (50 MB) took the model to 0.83-0.91x its time."""
    return cin >= 16 and (cout >= 32 or cout >= 16 and (cin >= 128 or input_bytes >= WINOGRAD_PANEL_INPUT_BYTES))


def pack_winograd(w: np.ndarray) -> np.ndarray:
    """W [Cout, Cin, 3, 3] -> U [16, ceil(Cout / 16), Cin, 16] flat: element e = 4i + j of G g G^T, then the
    output-channel panel, the input channel, the panel's 16 channels (zero past Cout). In float64, rounded once."""
    cout, cin = w.shape[:2]
    panels = -(-cout // PANEL)
    u = np.einsum("ai,ocij,bj->aboc", _G, w.astype(np.float64), _G)
    up = np.zeros((4, 4, panels * PANEL, cin))
    up[:, :, :cout] = u
    return np.ascontiguousarray(up.reshape(16, panels, PANEL, cin).transpose(0, 1, 3, 2)).astype(np.float32).ravel()


def _input_transform(hq: int, wq: int, vs: int, nt: int, pad: str, edges: tuple | None = None) -> str:
    """Statements transforming input channel `ci` of the task's tiles (tile row ty, tiles tx0 .. tx0 + 7) into the
    task's vb[e * vs + ci * nt + tile]. Each of the 4 input rows is three 8-float loads (columns 2 tx0 + 0..17),
    split by shuffles into the even and odd columns the 8 tiles' columns 0..3 are; the row transform (d0 - d2,
    d1 + d2, d2 - d1, d1 - d3) runs on those vectors, then the column transform on the rows. Lanes past nt are
    written too: into the next channel's slot, which that channel then overwrites (the last channel's spill into
    the `8 - nt` floats past its element). The input is the padded map xp [Cin, hq, wq], or with `edges` = (H, W,
    top, left) the map x [Cin, H, W] itself, read by masked loads (AVX `vmaskmovps`: lanes outside the map read
    as 0 and do not touch memory, so the zero pad is never written)."""
    even, odd = list(range(0, 16, 2)), list(range(1, 16, 2))
    even2, odd2 = list(range(2, 16, 2)) + [22], list(range(3, 16, 2)) + [23]
    out = ""
    for i in range(4):
        if edges is None:
            base = f"ci * {hq * wq} + (ty * 2 + {i}) * {wq} + tx0 * 2"
            lo, hi, tail = (f"xp[T.ramp({base} + {o}, 1, 8)]" for o in (0, 8, 10))
        else:
            h, wd, top, left = edges
            y, c = f"(ty * 2 + {i - top})", f"(tx0 * 2 - {left})"
            inside = f"T.broadcast(0 <= {y} and {y} < {h}, 8)"

            def load(o: int) -> str:
                cols = f"T.ramp({c} + {o}, 1, 8)"
                mask = (f'T.Cast("int32x8", T.bitwise_and(T.bitwise_and({cols} >= T.broadcast(0, 8), {cols} < '
                        f'T.broadcast({wd}, 8)), {inside})) * T.broadcast(-1, 8)')
                return (f'T.call_llvm_pure_intrin("float32x8", "llvm.x86.avx.maskload.ps.256", '
                        f'T.address_of(xp[ci * {h * wd} + {y} * {wd} + {c} + {o}]), {mask})')
            lo, hi, tail = (load(o) for o in (0, 8, 10))
        d0, d1 = f"T.Shuffle([{lo}, {hi}], {even})", f"T.Shuffle([{lo}, {hi}], {odd})"
        d2, d3 = f"T.Shuffle([{lo}, {hi}, {tail}], {even2})", f"T.Shuffle([{lo}, {hi}, {tail}], {odd2})"
        for j, e in enumerate((f"{d0} - {d2}", f"{d1} + {d2}", f"{d2} - {d1}", f"{d1} - {d3}")):
            out += f"\n{pad}hb[{i * 4 + j}, T.ramp(0, 1, 8)] = {e}"
    for j in range(4):
        r0, r1, r2, r3 = (f"hb[{i * 4 + j}, T.ramp(0, 1, 8)]" for i in range(4))
        for i, e in enumerate((f"{r0} - {r2}", f"{r1} + {r2}", f"{r2} - {r1}", f"{r1} - {r3}")):
            out += f"\n{pad}vb[T.ramp({(i * 4 + j) * vs} + ci * {nt}, 1, 8)] = {e}"
    return out


def panel_groups(blocks: int, panels: int, cores: int) -> int:
    """Tasks per block: its output panels split into this many groups (each task transforming the block's input
    again), the fewest that give every core the same number of tasks, where the blocks alone do not and are few
    (ResNet's 14x14 maps: 7 blocks on 2 cores, 2 groups)."""
    if cores <= 1 or blocks % cores == 0 or blocks >= 8 * cores:
        return 1
    return next((g for g in range(2, min(panels, 8) + 1) if blocks * g % cores == 0), 1)


def winograd_source(cout: int, cin: int, h: int, wd: int, padding, clamp: tuple[float, float] | None,
                    res: bool = False, registers: int = 32, cores: int = 1, masked: bool = False) -> str:
    """TVMScript of the whole F(2x2, 3x3) conv (module docstring) over xp, the input zero-padded to
    `winograd_geometry`'s `pad` ([Cin, Hq, Wq] flat: `conv.pad_phases_source` at stride 1), with the packed U
    (`pack_winograd`), bias [panels * 16] and optionally the residual [Cout, OH, OW], into out [Cout, OH, OW].
    Per panel and element the nt x 16 accumulators go to the task's m; the output transform then reads the 16
    elements of each tile as 16-channel vectors and stores its 2x2 outputs channel by channel (the pixel-row conv's
    store), skipping outputs past an odd OH or OW. `cores`: the panels split into `panel_groups` per block.
    `masked` (AVX): xp is the input map itself, [Cin, H, W], read by masked loads (`_input_transform`); inside
    ResNet-18 the zero-padded copies before its ten Winograd convs had cost ~1 ms of the model's ~17."""
    g = winograd_geometry(h, wd, padding, registers)
    nt, ncx, tw, oh, ow, hq, wq = (g[k] for k in ("nt", "ncx", "tw", "oh", "ow", "hq", "wq"))
    edges = (h, wd, int(padding[0]), int(padding[2])) if masked else None
    size = cin * h * wd if masked else cin * hq * wq
    vs = cin * nt + 8 - nt
    panels = -(-cout // PANEL)
    groups = panel_groups(g["blocks"], panels, cores)
    m = [f"m[{e}, r, T.ramp(0, 1, {PANEL})]" for e in range(16)]
    s0 = [f"({m[j]} + {m[4 + j]} + {m[8 + j]})" for j in range(4)]  # A^T M: rows 0 and 1
    s1 = [f"({m[4 + j]} - {m[8 + j]} - {m[12 + j]})" for j in range(4)]
    bias = f"bias[T.ramp(p * {PANEL}, 1, {PANEL})]"
    ys = [f"{s[0]} + {s[1]} + {s[2]} + {bias}" if b == 0 else f"{s[1]} - {s[2]} - {s[3]} + {bias}"
          for s in (s0, s1) for b in (0, 1)]  # output (a, b) at index 2a + b
    outputs = "".join(f"\n                yb[{k}, T.ramp(0, 1, {PANEL})] = {y}" for k, y in enumerate(ys))
    store, res_arg = channel_store("yb[a * 2 + b, v]", f"p * {PANEL} + v", "oy, ox", cout, PANEL, (oh, ow), res,
                                   clamp, 36)
    return f"""
@T.prim_func(private=True)
def winograd(xp: T.Buffer(({size},), "float32"), u: T.Buffer(({16 * panels * cin * PANEL},), "float32"),
             bias: T.Buffer(({panels * PANEL},), "float32"), {res_arg}out: T.Buffer(({cout}, {oh}, {ow}), "float32")):
    T.func_attr({{"tirx.noalias": True, "tirx.is_scheduled": True, "op_pattern": 8}})
    for t in T.parallel({g["blocks"] * groups}):
        ty: T.let = t // {groups} // {ncx}
        tx0: T.let = T.min(t // {groups} % {ncx} * {nt}, {tw - nt})
        hb = T.decl_buffer((16, 8), "float32", scope="global")
        vb = T.decl_buffer(({16 * vs},), "float32", scope="global")
        for ci in T.serial({cin}):{_input_transform(hq, wq, vs, nt, " " * 12, edges)}
        m = T.decl_buffer((16, {nt}, {PANEL}), "float32", scope="global")
        acc = T.decl_buffer(({nt}, {PANEL}), "float32", scope="global")
        yb = T.decl_buffer((4, {PANEL}), "float32", scope="global")
        for p in T.serial(t % {groups} * {panels} // {groups}, (t % {groups} + 1) * {panels} // {groups}):
            for e in T.serial(16):
                for r in T.unroll({nt}):
                    for v in T.vectorized({PANEL}):
                        acc[r, v] = T.float32(0)
                for ci in T.serial({cin}):
                    for r in T.unroll({nt}):
                        for v in T.vectorized({PANEL}):
                            acc[r, v] = acc[r, v] + vb[e * {vs} + ci * {nt} + r] * u[
                                ((e * {panels} + p) * {cin} + ci) * {PANEL} + v]
                for r in T.unroll({nt}):
                    for v in T.vectorized({PANEL}):
                        m[e, r, v] = acc[r, v]
            for r in T.serial({nt}):{outputs}
                for a in T.unroll(2):
                    for b in T.unroll(2):
                        oy: T.let = ty * 2 + a
                        ox: T.let = (tx0 + r) * 2 + b
                        if oy < {oh} and ox < {ow}:
                            for v in T.serial({PANEL}):
                                {store}
"""
