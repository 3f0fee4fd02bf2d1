"""Pointwise (1x1, stride 1) convolution at batch 1 with the weight packed at compile time.

NCHW batch 1 makes a 1x1 conv the GEMM out[Cout, HW] = W[Cout, Cin] @ x[Cin, HW]. The kernel keeps an mr x nr
output tile in registers (6 output channels x 16 pixels on AVX2), broadcasting packed weights Wp[Cout/mr, Cin, mr]
(read sequentially) against contiguous pixel vectors; bias and a following clamp (ReLU/ReLU6) are applied on the
tile before it is stored. Channel and pixel counts that do not divide get smaller tail tiles (the 14x14 and 7x7
stages of MobileNet have 196 and 49 pixels). The source is generated per shape, so only the tiles a shape needs exist.
"""
from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np

from graphopt.targets.tvm.cpu.batch import batch_source
from graphopt.targets.tvm.cpu.knobs import Site, bind, knob_str, pick
from graphopt.targets.tvm.cpu.parse import parse_kernel

MR = 6
PREFETCH = 64
STAGE_MIN_CIN = 256
STAGE_MIN_MACS = 7_000_000
# pointwise layers with at most this many output channels prefetch their next pixel tile (`_tile`'s xnext)
XPREFETCH_MAX_COUT = 32


def _tile(rows: int, cols: int, r0: str, c0: str, k: int, clamp: tuple[float, float] | None, name: str,
          pad: str = " " * 12, res: bool = False, prefetch: int = 0, xcol: str | None = None,
          xnext: str | None = None, dest: str | None = None) -> str:
    """One `rows` x `cols` output tile at (r0, c0), accumulated in registers over all k, then stored (plus the
    residual `res` at the same place, before the clamp, when `res`). `prefetch` > 0 asks for the packed weight that
    many k steps ahead at every step (the address runs on into the next panel, which the next tile reads). With
    `xcol` (an expression of the pixel tile's index) the inputs come from the staged copy xs[tile, k, cols]. With
    `xnext` (the column the task's next pixel tile starts at) every step also asks for row kk's line there: a
    tile's K rows lie P floats apart, too many streams for the hardware prefetcher, and with few output channels
    only few panels share each tile's misses. Measured in the model (interleaved perf profiles, 1 thread): 24x144
    at 56x56 0.48 -> 0.34 ms (MobileNetV2 0.52 -> 0.41), 16x32 at 112x112 0.33 -> 0.25; layers with many panels
    per tile (96x16, 144x24, 672x112) gained nothing, hence XPREFETCH_MAX_COUT. `dest`: where element (i, v) of
    the tile is stored instead of out[r0 + i, c0 + v] (the fused expansion's band buffer)."""
    val = _clamped(f"{name}[i, v]" + (f" + res[{r0} + i, {c0} + v]" if res else ""), clamp)
    xv = f"x[kk, {c0} + v]" if xcol is None else f"xs[(({xcol}) * {k} + kk) * {cols} + v]"
    pf = "" if not prefetch else f"""
{pad}    T.evaluate(T.call_intrin("", "tirx.prefetch", T.address_of(wp[({r0}) // {MR}, kk + {prefetch}, 0]), 0, 3, 1))"""
    if xnext is not None:
        pf += f"""
{pad}    T.evaluate(T.call_intrin("", "tirx.prefetch", T.address_of(x[kk, {xnext}]), 0, 3, 1))"""
    return f"""
{pad}{name} = T.decl_buffer(({rows}, {cols}), "float32", scope="global")
{pad}for i in T.unroll({rows}):
{pad}    for v in T.vectorized({cols}):
{pad}        {name}[i, v] = bias[{r0} + i]
{pad}for kk in T.serial({k}):{pf}
{pad}    for i in T.unroll({rows}):
{pad}        for v in T.vectorized({cols}):
{pad}            {name}[i, v] = {name}[i, v] + wp[({r0}) // {MR}, kk, ({r0}) % {MR} + i] * {xv}
{pad}for i in T.unroll({rows}):
{pad}    for v in T.vectorized({cols}):
{pad}        {dest or f"out[{r0} + i, {c0} + v]"} = {val}"""


def _tile_nest(rows: int, cols: int, r0: str, c0: str, n_tiles: str, k: int, clamp: tuple[float, float] | None,
               name: str, res: bool = False, tail: str = "", prefetch: int = 0, xcol: str | None = None,
               xnext: str | None = None) -> str:
    """One parallel loop over tiles of `rows` x `cols` outputs; r0 / c0 are expressions of the tile index t; `tail`
    (code) runs after each tile; `prefetch` and `xcol` as in `_tile`."""
    body = _tile(rows, cols, r0, c0, k, clamp, name, res=res, prefetch=prefetch, xcol=xcol, xnext=xnext)
    return f"""
        for t in T.parallel({n_tiles}):{body}{tail}
"""


def rows_alias(cin: int, p: int) -> bool:
    """x's Cin rows lie P floats apart, a multiple of 4 KB (P a multiple of 1024: PointNet's 2048 points, 32x32 and
    64x64 maps): a pixel tile's rows then share one set of each cache and evict each other before the next channel
    tile reads them. Pointwise layers there ran at 52-66 GMAC/s, with their tiles copied contiguous first 100-110
    (1.6-2x: 128 -> 1024 at 2048 points 4.3 -> 2.5 ms, 128 -> 384 at 1024 0.80 -> 0.46, 64 -> 192 at 4096 0.79 ->
    0.48), where 2000 points, or 512, ran at 103-115 either way (Zen 4, 2 threads)."""
    return (p * 4) % 4096 == 0 and cin >= 32


def slab_staged(cin: int, p: int, rt: int) -> bool:
    """Whether the slab kernel copies each task's slab contiguous first: where its rows alias (`rows_alias`) and
    enough channel tiles reuse the copy (MobileNetV2's 32 -> 16 at 112x112, two tiles, ran 1.47x slower staged)."""
    return rt >= 4 and rows_alias(cin, p)


def _slab_nest(rt: int, rrem: int, nr: int, ct: int, k: int, clamp: tuple[float, float] | None, res: bool,
               stage: bool = False) -> str:
    """One parallel task per pixel slab x[:, c0:c0+nr] running every channel tile, the remainder rows included,
    while the slab is in L1 (a separate loop for the remainder rows read every slab a second time: MobileNetV2's
    16x32x12544 layer, memory-bound, was 1.6x ORT's time). `stage`: the task first copies its slab into a
    contiguous buffer (`slab_staged`)."""
    copy = "" if not stage else f"""
            xs = T.decl_buffer(({k * nr},), "float32", scope="global")
            for kk in T.serial({k}):
                for v in T.vectorized({nr}):
                    xs[kk * {nr} + v] = x[kk, t * {nr} + v]"""
    xcol = "0" if stage else None
    xnext = f"(t + 1) * {nr}" if rt * MR <= XPREFETCH_MAX_COUT and not stage else None
    return f"""
        for t in T.parallel({ct}):{copy}
            for rb in T.serial({rt}):{_tile(MR, nr, f"rb * {MR}", f"t * {nr}", k, clamp, "acc", " " * 16, res,
                                            xnext=xnext, xcol=xcol)}
            if True:{_tile(rrem, nr, str(rt * MR), f"t * {nr}", k, clamp, "acc_r", " " * 16, res, xcol=xcol)}
"""


def _column_tail_body(panel: str, c0: int, crem: int, cin: int, clamp: tuple[float, float] | None, res: bool,
                      pad: str) -> str:
    """The last crem (<= 4) pixels of the MR channels of `panel`, vectorized over those channels (one packed weight
    row against a broadcast pixel) and summed in `parts` independent partial sums over k (one chain would wait on
    the FMA latency at every k: a 49-pixel image's last pixel cost as much as 19 others)."""
    parts = 4 if crem <= 2 else 2
    kq, kr = divmod(cin, parts)
    val = _clamped(" + ".join([f"acc_t[{q}, c, i]" for q in range(parts)]
                              + ([f"res[({panel}) * {MR} + i, {c0} + c]"] if res else [])), clamp)
    rest = "" if not kr else f"""
{pad}for kk in T.serial({kr}):
{pad}    for c in T.unroll({crem}):
{pad}        for i in T.vectorized({MR}):
{pad}            acc_t[0, c, i] = acc_t[0, c, i] + wp[{panel}, {kq * parts} + kk, i] * x[{kq * parts} + kk, {c0} + c]"""
    return f"""
{pad}acc_t = T.decl_buffer(({parts}, {crem}, {MR}), "float32", scope="global")
{pad}for q in T.unroll({parts}):
{pad}    for c in T.unroll({crem}):
{pad}        for i in T.vectorized({MR}):
{pad}            acc_t[q, c, i] = T.if_then_else(q == 0, bias[({panel}) * {MR} + i], T.float32(0))
{pad}for kk in T.serial({kq}):
{pad}    for q in T.unroll({parts}):
{pad}        for c in T.unroll({crem}):
{pad}            for i in T.vectorized({MR}):
{pad}                acc_t[q, c, i] = acc_t[q, c, i] + wp[{panel}, kk * {parts} + q, i] * x[kk * {parts} + q, {c0} + c]{rest}
{pad}for c in T.unroll({crem}):
{pad}    for i in T.unroll({MR}):
{pad}        out[({panel}) * {MR} + i, {c0} + c] = {val}"""


def _panel_tail(panel: str, c0: int, crem: int, cin: int, clamp, res: bool, pad: str) -> str:
    """The last crem pixels of one panel's MR (6) channels, run right after one of the panel's pixel tiles while
    its weights are in L1. The panel row for 4 consecutive k is 24 contiguous floats (3 vectors); the pixel's 4 inputs
    (xt: the tail columns made contiguous once per call) are spread to match with 3 lane shuffles, so the sum runs as
    full-width FMAs; lane l of the 24 belongs to channel l % 6."""
    kq, kr = divmod(cin, 4)
    idx = [[(m * 8 + lane) // MR for lane in range(8)] for m in range(3)]
    xv = "xt[c, T.ramp(kk * 4, 1, 4)]"  # twice: a shuffle cannot pick more lanes than its inputs hold
    val = _clamped(" + ".join([f"acc_p[c, i + {MR * g}]" for g in range(4)]
                              + ([f"res[({panel}) * {MR} + i, {c0} + c]"] if res else [])), clamp)
    rest = "" if not kr else f"""
{pad}    for kk in T.serial({kr}):
{pad}        for i in T.unroll({MR}):
{pad}            acc_p[c, i] = acc_p[c, i] + wp[{panel}, {kq * 4} + kk, i] * xt[c, {kq * 4} + kk]"""
    steps = "".join(f"""
{pad}        acc_p[c, T.ramp({m * 8}, 1, 8)] = acc_p[c, T.ramp({m * 8}, 1, 8)] + wpf[T.ramp(({panel}) * {cin * MR} + kk * 24 + {m * 8}, 1, 8)] * T.Shuffle([{xv}, {xv}], {idx[m]})"""
                    for m in range(3))
    return f"""
{pad}acc_p = T.decl_buffer(({crem}, 24), "float32", scope="global")
{pad}for c in T.serial({crem}):
{pad}    for u in T.vectorized(24):
{pad}        acc_p[c, u] = T.if_then_else(u < {MR}, bias[({panel}) * {MR} + T.min(u, {MR - 1})], T.float32(0))
{pad}    for kk in T.serial({kq}):{steps}{rest}
{pad}    for i in T.unroll({MR}):
{pad}        out[({panel}) * {MR} + i, {c0} + c] = {val}"""


def _column_tail(rt: int, c0: int, crem: int, cin: int, clamp: tuple[float, float] | None, res: bool) -> str:
    """The last crem pixels of every whole channel tile as a loop of their own (every map but the small ones, whose
    tiles take them with `_panel_tail`; on 14x14 maps that was slower than this loop)."""
    return f"""
        for t in T.parallel({rt}):{_column_tail_body("t", c0, crem, cin, clamp, res, " " * 12)}
"""


def conv1x1_knobs(cout: int, cin: int, p: int, nr: int, lanes: int | None = None) -> tuple[dict, list[dict]]:
    """The rule's knobs for a pointwise layer and the candidates tuning may measure (`knobs.py`): `order` (the parallel
    tiles run panel-major, a weight panel outer, or pixel-major, a pixel tile outer), `stage` (copy the pixel
    tiles contiguous first) and `xprefetch` (prefetch the next pixel tile's line at every k). The rule: panel-
    major on maps of at most 3 pixel tiles (a 7x7 map's weight is then read once), staging for long reductions
    (STAGE_MIN_CIN, STAGE_MIN_MACS) and for rows 4 KB apart (`rows_alias`), the prefetch for few output channels
    (XPREFETCH_MAX_COUT). Layers on the slab kernel (a partial channel tile and 16+ pixel tiles) have no knobs.

    With `lanes` (the target's vector width), maps of 6-256 pixels also have {"vec": "channels", "nr": 2 * lanes}:
    the channels-in-vector kernel (`conv1x1_cv_source`), the rule's choice with 16-lane vectors on maps of at most
    64 pixels, where it measured faster in the models; a candidate on larger maps (14x14: faster alone on some
    layers, slower in EfficientNet-Lite0) and on 8-lane CPUs (not measured)."""
    rule, cands = _pixel_knobs(cout, cin, p, nr)
    if lanes is None or not cv_applies(p):
        return rule, cands
    cv = {"vec": "channels", "nr": 2 * lanes}
    if lanes >= 16 and p <= CV_RULE_MAX_PIXELS:
        return cv, [cv, *cands]
    return rule, [*cands, cv]


def _pixel_knobs(cout: int, cin: int, p: int, nr: int) -> tuple[dict, list[dict]]:
    """`conv1x1_knobs`' rule and candidates for the pixel-vector kernel."""
    rt, rrem = divmod(cout, MR)
    ct = p // nr
    staged = ct > 0 and (cin >= STAGE_MIN_CIN and cout * cin * p >= STAGE_MIN_MACS or rows_alias(cin, p))
    rule = {"order": "panel" if ct <= 3 else "pixels", "stage": staged,
            "xprefetch": not staged and ct > 3 and rt * MR <= XPREFETCH_MAX_COUT}
    if not (rt and ct) or (rrem and ct >= 16):
        return rule, [rule]
    cands = [{"order": o, "stage": s, "xprefetch": x} for o in ("panel", "pixels") for s in (False, True)
             for x in ((False, True) if not s and ct > 3 else (False,))]
    return rule, cands


def conv1x1_source(cout: int, cin: int, p: int, nr: int, clamp: tuple[float, float] | None,
                   res: bool = False, knobs: dict | None = None) -> str:
    """The kernel for one shape; with `res` it also reads res[Cout, P] and stores clamp(W x + b + res) (a residual
    add after a projecting conv, done in the epilogue instead of a pass over both tensors). `knobs`: see
    `conv1x1_knobs` (default: the rule's; {"vec": "channels", ...} is `conv1x1_cv_source`)."""
    if knobs is not None and knobs.get("vec") == "channels":
        return conv1x1_cv_source(cout, cin, p, knobs["nr"], clamp, res)
    rt, rrem = divmod(cout, MR)
    ct, crem = divmod(p, nr)
    mt = -(-cout // MR)
    kn = knobs if knobs is not None else conv1x1_knobs(cout, cin, p, nr)[0]
    body, fused = "", False
    if rt and rrem and ct >= 16:
        body += _slab_nest(rt, rrem, nr, ct, cin, clamp, res, slab_staged(cin, p, rt))
    else:
        if rt and kn["order"] == "panel":  # panel outer: a 7x7 map's weight (1280x320: 1.6 MB, past L2) is read once
            panel, col = f"t // {ct}", f"t % {ct}"
        else:  # column-tile outer: a pixel slab x[:, c0:c0+nr] is reused by every channel tile
            panel, col = f"t % {rt}", f"t // {rt}"
        c0 = f"({col}) * {nr}"
        # a long reduction reads its pixel tiles from a contiguous copy: x's rows are P floats apart, so a tile's
        # 16 pixels at each k start anywhere in a cache line and most of its loads split two lines. The copy is one
        # more pass (and launch) over x: on small layers (64x384x196, 160x576x49) it cost more than it saved
        staged = ct > 0 and kn["stage"]
        if rt and ct:
            # small maps (7x7: 3 pixel tiles + 1 pixel): the last crem pixels of each panel go right after one of
            # its pixel tiles (a different one per panel, so no thread gets them all), while the panel is in L1. A
            # loop of their own streamed all 1.6 MB of 1280x320's weight again: 260 -> 250 us (48 pixels: 218).
            # With 12 pixel tiles (14x14) the tail is a smaller share and the loop of its own was as fast.
            fused = 0 < crem <= 4 and ct <= 3
            tail = "" if not fused else f"""
            if {col} == ({panel}) % {ct}:{_panel_tail(panel, ct * nr, crem, cin, clamp, res, " " * 16)}"""
            xnext = f"({col} + 1) * {nr}" if not staged and ct > 3 and kn["xprefetch"] else None
            body += _tile_nest(MR, nr, f"({panel}) * {MR}", c0, str(rt * ct), cin, clamp, "acc", res, tail,
                               prefetch=PREFETCH, xcol=col if staged else None, xnext=xnext)
        if rrem and ct:
            body += _tile_nest(rrem, nr, str(rt * MR), f"t * {nr}", str(ct), cin, clamp, "acc_r", res,
                               xcol="t" if staged else None)
        if staged:
            body = f"""
        xs = T.decl_buffer(({ct * cin * nr},), "float32")
        for kk in T.parallel({cin}):
            for c in T.unroll({ct}):
                for v in T.vectorized({nr}):
                    xs[(c * {cin} + kk) * {nr} + v] = x[kk, c * {nr} + v]""" + body
    if rt and 0 < crem <= 4:
        if not fused:
            body += _column_tail(rt, ct * nr, crem, cin, clamp, res)
    elif rt and crem:
        body += _tile_nest(MR, crem, f"t * {MR}", str(ct * nr), str(rt), cin, clamp, "acc_c", res)
    if rrem and crem:
        body += _tile_nest(rrem, crem, f"t * 0 + {rt * MR}", str(ct * nr), "1", cin, clamp, "acc_rc", res)
    res_arg = f'res: T.Buffer(({cout}, {p}), "float32"), ' if res else ""
    if fused:  # the tail pixels' inputs made contiguous (a strided column each), and a flat panel view
        body = f"""
        xt = T.decl_buffer(({crem}, {cin}), "float32")
        for c in T.serial({crem}):
            for kk in T.serial({cin}):
                xt[c, kk] = x[kk, {ct * nr} + c]
        wpf = T.decl_buffer(({mt * cin * MR},), "float32", data=wp.data)""" + body
    return f"""
@T.prim_func(private=True)
def conv1x1(x: T.Buffer(({cin}, {p}), "float32"), wp: T.Buffer(({mt}, {cin}, {MR}), "float32"),
            bias: T.Buffer(({cout},), "float32"), {res_arg}out: T.Buffer(({cout}, {p}), "float32")):
    T.func_attr({{"tirx.noalias": True, "tirx.is_scheduled": True, "graphopt.knobs": "{knob_str(kn)}"}})
    if True:{body}
"""


CV_MAX_PIXELS = 256  # maps the channels-in-vector pointwise kernel may take (14x14, 16x16 and smaller)
CV_RULE_MAX_PIXELS = 64  # with 16-lane vectors, maps it takes by rule (a tuning candidate up to CV_MAX_PIXELS)
CV_GROUP = 7  # pixel rows per accumulator buffer: 7 x 32 floats stay under TVM's 1 KB limit for a stack buffer


def cv_rows(p: int, nr: int = 32) -> int:
    """Pixels per tile of the channels-in-vector pointwise kernel. With 32-channel panels (16-lane vectors): 10
    pixels (20 accumulators) where that leaves at most 4% of the tiles' pixels over the map's, else the count of
    8, 12, 7, 9, 11, 6 that wastes the least, overlapping the last tile with the one before it (it recomputes a few
    pixels and stores the same values). Against 7 pixels a tile, kernel alone (Emerald Rapids, 2 threads, hot and
    with cold weights, interleaved): 0.90-0.97x on 7x7 maps (1152x192, 192x1152, 1280x320, 960x160), 0.93-0.99x on
    14x14 ones; 12-14 pixels were slower on most shapes. With 16-channel panels (8-lane CPUs, a tuning candidate
    there, not measured) 7, or 8 or 6 where that divides the map and 7 does not."""
    if nr < 32:
        return next((mr for mr in (7, 8, 6) if p % mr == 0), 7)
    fits = [mr for mr in (10, 8, 12, 7, 9, 11, 6) if mr <= p]
    waste = {mr: -(-p // mr) * mr / p for mr in fits}
    return next((mr for mr in fits if waste[mr] <= 1.04), min(fits, key=lambda mr: (waste[mr], fits.index(mr))))


def cv_applies(p: int) -> bool:
    """Maps the channels-in-vector kernel can take: at least one 6-pixel tile, at most CV_MAX_PIXELS."""
    return 6 <= p <= CV_MAX_PIXELS


def conv1x1_cv_source(cout: int, cin: int, p: int, nr: int, clamp: tuple[float, float] | None,
                      res: bool = False) -> str:
    """The pointwise conv on small maps with output channels in the vectors: out^T = x^T W^T as the GEMM's register
    tile, mr pixels (`cv_rows`) x nr channels (two vectors), each step one broadcast of x[k, pixel] per pixel
    against the nr channels' weights (wp [ceil(Cout/nr), Cin, nr]: `pack_rows(w, nr)`), stored transposed into
    out[Cout, P] (plus `res` at the same place, then the clamp). Tasks run panel-major (a panel's weights stay in
    L1 or L2 while its pixel tiles run). The pixel-vector kernel's tile there is 6 channels x 16 pixels: a 7x7 map
    gives it 3 tiles and a pixel left per row, 6 accumulators (the FMA latency wants 8+) and input rows 196 bytes
    apart, so most vector loads split two cache lines; this one runs 14-20 accumulators, 2 vector loads per 14-20
    FMAs, and reads x only by broadcast. Kernel alone (Emerald Rapids, 2 threads, interleaved): 960x160x49 74 -> 52
    us, 160x960x49 108 -> 50, 1280x320x49 210 -> 134 (145-151 GMAC/s, ~90% of the FMA peak); on 14x14 it won only
    with long reductions (96x576 91 -> 77 us, 64x384 53 -> 37; 576x96 77 -> 82) and on 28x28 it lost (192x32 33
    -> 58): the rule in `conv1x1_knobs`.

    In a model the weight comes from L3 or memory (each layer's is read once a run), and a layer there took 1.3x
    its time with the weight in cache. So every task also asks for its share of the next panel's weight, one line
    a reduction step: the panel's pt tasks together prefetch all of the next one while they compute, where the
    hardware prefetcher only starts on a panel when its first task reads it. With the weight cold, kernel alone:
    0.81-0.84x the time of a prefetch 96 steps ahead in the same panel (7x7: 1152x192, 192x1152, 1280x320,
    960x160), with it hot 0.97-1.01x. With 10-pixel tiles too, in the models (per-kernel profiles, interleaved):
    EfficientNet-Lite0's 7x7 pointwise layers 1.94 -> 1.67 ms a run, MobileNetV2's 0.78-0.94x; whole models
    0.93-0.97x (4 runs). On 14x14 maps it stayed slower in the models than the pixel-vector kernel (EfficientNet-
    Lite0 1.19x as a whole with it there), so the rule there is unchanged."""
    mr, nt = cv_rows(p, nr), -(-cout // nr)
    pt = -(-p // mr)
    panel, p0 = f"t // {pt}", f"T.min((t % {pt}) * {mr}, {p - mr})"
    c = f"({panel}) * {nr} + v"
    groups = [(g, min(CV_GROUP, mr - g)) for g in range(0, mr, CV_GROUP)]  # accumulator buffers acc0, acc7
    whole = cout % nr == 0

    def rows(body: str, pad: str = " " * 8) -> str:
        return "".join(body.format(a=f"acc{g}", g=g, n=n, pad=pad) for g, n in groups)

    init = rows("""
{pad}{a} = T.decl_buffer(({n}, %d), "float32", scope="global")
{pad}for i in T.unroll({n}):
{pad}    for v in T.vectorized(%d):
{pad}        {a}[i, v] = bias[%s]""" % (nr, nr, c))
    step = rows("""
{pad}for i in T.unroll({n}):
{pad}    for v in T.vectorized(%d):
{pad}        {a}[i, v] = {a}[i, v] + x[kk, %s + {g} + i] * wp[%s, kk, v]""" % (nr, p0, panel), " " * 12)
    val = _clamped("{a}[i, v]" + (f" + res[{c}, {p0} + {{g}} + i]" if res else ""), clamp)
    if whole:
        store = rows("""
{pad}for i in T.unroll({n}):
{pad}    for v in T.vectorized(%d):
{pad}        out[%s, %s + {g} + i] = %s""" % (nr, c, p0, val))
    else:  # the last panel's padding channels are not stored: each group goes through memory (indexed by a loop
        # variable, the accumulators themselves would leave the registers) and every lane is stored on its own
        store = rows("""
{pad}tile{g} = T.decl_buffer(({n}, %d), "float32", scope="global")
{pad}for i in T.unroll({n}):
{pad}    for v in T.vectorized(%d):
{pad}        tile{g}[i, v] = {a}[i, v]
{pad}for i in T.unroll({n}):
{pad}    for v in T.serial(%d):
{pad}        if %s < %d:
{pad}            out[%s, %s + {g} + i] = %s""" % (nr, nr, nr, c, cout, c, p0, val.replace("{a}", "tile{g}")))
    res_arg = f'res: T.Buffer(({cout}, {p}), "float32"), ' if res else ""
    # the next panel's lines, lt for each of the pt tasks, `ahead` floats further at each step (the last panel's
    # addresses run past the weight: a prefetch does not fault)
    lt = -(-cin * nr // 16 // pt)
    ahead = -(-lt * 16 // cin)
    nxt = f"(({panel}) + 1) * {cin * nr} + (t % {pt}) * {lt * 16} + kk * {ahead}"
    return f"""
@T.prim_func(private=True)
def conv1x1_cv(x: T.Buffer(({cin}, {p}), "float32"), wp: T.Buffer(({nt}, {cin}, {nr}), "float32"),
               bias: T.Buffer(({nt * nr},), "float32"), {res_arg}out: T.Buffer(({cout}, {p}), "float32")):
    T.func_attr({{"tirx.noalias": True, "tirx.is_scheduled": True, "graphopt.knobs": "vec=channels"}})
    wpf = T.decl_buffer(({nt * cin * nr},), "float32", data=wp.data)
    for t in T.parallel({nt * pt}):{init}
        for kk in T.serial({cin}):
            T.evaluate(T.call_intrin("", "tirx.prefetch", T.address_of(wpf[{nxt}]), 0, 3, 1)){step}{store}
"""


def pointwise_cols(p: int, lanes: int) -> int:
    """Pixels per tile of the pointwise kernel: two vectors, except with 16-lane vectors where 32-pixel tiles would
    leave a remainder the kernel takes badly (5-15 or 17-31 pixels: one tile of that odd width, whose vectors LLVM
    splits) or fewer than two tiles: those maps keep 16-pixel tiles. A 7x7 map (49 pixels: one 32-pixel tile and
    17 left) took 8x the 16-pixel kernel's time (960x160x49: 1052 vs 128 us, Emerald Rapids, 2 threads)."""
    nr = 2 * lanes
    if lanes >= 16 and (p < 2 * nr or 4 < p % nr != lanes):
        return lanes
    return nr


def conv1x1_packed(cout: int, cin: int, p: int, nr: int, clamp: tuple[float, float] | None = None,
                   res: bool = False, knobs: dict | None = None):
    src = conv1x1_source(cout, cin, p, nr, clamp, res, knobs)
    return parse_kernel(src)


def pack_rows(w: np.ndarray, rows: int = MR) -> np.ndarray:
    """W [Cout, Cin] -> Wp [ceil(Cout/rows), Cin, rows], zero-padded rows: the pixel-vector kernel's panels of MR
    channels, or the channels-in-vector kernel's of 2 vectors (`conv1x1_cv_source`)."""
    cout, cin = w.shape
    mt = -(-cout // rows)
    padded = np.zeros((mt * rows, cin), dtype=np.float32)
    padded[:cout] = w
    return np.ascontiguousarray(padded.reshape(mt, rows, cin).transpose(0, 2, 1))


def emit_conv1x1(bb, x, w: np.ndarray, bias: np.ndarray | None, x_shape, lanes: int,
                 clamp: tuple[float, float] | None, residual=None):
    """Emit conv1x1(x) (+ bias [+ residual], clamp) for x [N, Cin, H, W]; returns [N, Cout, H, W]. `residual` is a
    Relax value of the output's shape added before the clamp."""
    from tvm import relax

    n, cin, h, wd = (int(d) for d in x_shape)
    x2 = bb.emit(relax.op.reshape(x, _batched(n, cin, h * wd)))
    y = _conv1x1_call(bb, x2, w, bias, n, cin, h * wd, lanes, clamp, residual)
    return bb.emit(relax.op.reshape(y, (n, int(w.shape[0]), h, wd)))


def _conv1x1_call(bb, x2, w: np.ndarray, bias: np.ndarray | None, n: int, cin: int, p: int, lanes: int,
                  clamp: tuple[float, float] | None, residual=None, per_sample: bool = False):
    """The packed pointwise kernel's call on x2 [(N,) Cin, P]; returns [(N,) Cout, P]. `per_sample`: w is [N, Cout,
    Cin] and bias [N, Cout], each sample with its own (the groups of a grouped conv as the samples of one call)."""
    from tvm import relax

    cout = int(w.shape[-2] if per_sample else w.shape[0])
    nr = pointwise_cols(p, lanes)
    b = bias if bias is not None else np.zeros((n, cout) if per_sample else cout, np.float32)
    res = residual is not None
    tag = (f"{cout}x{cin}x{p}" + ("_res" if res else "") + ("" if clamp is None else "_clamp") + _ntag(n)
           + ("_own_weights" if per_sample else ""))
    rule, cands = conv1x1_knobs(cout, cin, p, nr, lanes)
    site = Site("conv1x1", f"{tag}|nr{nr}", rule, cands, n * cout * cin * p)
    own = ["wp", "bias"] if per_sample and n > 1 else []
    kn = pick(site)
    src = batch_source(conv1x1_source(cout, cin, p, nr, clamp, res, kn), n,
                       ["x", "out"] + (["res"] if res else []) + own, bool(own))
    if kn.get("vec") == "channels":  # channel panels; the bias padded to whole panels as the weight is
        pack = lambda wi: pack_rows(wi, kn["nr"])  # noqa: E731
        b = np.pad(b, [(0, 0)] * (b.ndim - 1) + [(0, -(-cout // kn["nr"]) * kn["nr"] - cout)])
    else:
        pack = pack_rows
    packed = (np.stack([pack(wi.reshape(cout, cin)) for wi in w]) if own
              else pack(w.reshape(-1, cout, cin)[0] if per_sample else w.reshape(cout, cin)))
    b = b if own or not per_sample else b.reshape(-1, b.shape[-1])[0]
    name = f"conv1x1_packed_{tag}"
    gv = bb.add_func(parse_kernel(src), name)
    bind(site, gv.name_hint)
    extra = [] if residual is None else [bb.emit(relax.op.reshape(residual, _batched(n, cout, p)))]
    return bb.emit(relax.call_tir(gv, [x2, relax.const(packed), relax.const(b.astype(np.float32)), *extra],
                                  relax.TensorType(_batched(n, cout, p), "float32")))


def _batched(n: int, *dims: int) -> tuple[int, ...]:
    """A kernel operand's shape: the per-sample dims, with a leading batch dim when n > 1 (`batch_source`)."""
    return (n, *dims) if n > 1 else dims


def _ntag(n: int) -> str:
    return f"_n{n}" if n > 1 else ""


def pointwise_applies(x_shape, w_shape, stride, padding, dilation, groups, transposed) -> bool:
    return (len(x_shape) == 4 and len(w_shape) == 4 and tuple(w_shape[2:]) == (1, 1)
            and int(groups) == 1 and not transposed and all(int(s) == 1 for s in stride)
            and all(int(q) == 0 for q in padding) and all(int(d) == 1 for d in dilation)
            and math.prod(int(d) for d in x_shape[2:]) >= 4)


def grid_bounds(clamp: tuple[float, float] | None, out_q: tuple[float, int, int, int]) -> tuple[int, int]:
    """The clamp and the int8 range of out_q = (scale, zero point, qmin, qmax) as one range of rounded grid steps
    (zero point excluded): rounding is monotonic, so round(clamp(v, lo, hi) / s) = clamp(round(v / s), round(lo / s),
    round(hi / s)) and one clamp after rounding does both."""
    scale, zp, qmin, qmax = out_q
    lo, hi = qmin - zp, qmax - zp
    if clamp is not None:
        lo = max(lo, int(np.round(clamp[0] / scale))) if np.isfinite(clamp[0]) else lo
        hi = min(hi, int(np.round(clamp[1] / scale))) if np.isfinite(clamp[1]) and clamp[1] < 1e30 else hi
    return lo, hi


def store_params(clamp: tuple[float, float] | None, out_q: tuple[float, int, int, int] | None) -> np.ndarray:
    """The numbers a store uses, [lo, hi, zero point, scale] as float32, for kernels that take them as a buffer
    (`_clamped(..., qp=)`) rather than as literals: layers of one shape then share one compiled function."""
    if out_q is None:
        lo, hi = clamp if clamp is not None else (-np.inf, np.inf)
        return np.array([lo, hi, 0.0, 1.0], np.float32)
    lo, hi = grid_bounds(clamp, out_q)
    return np.array([lo, hi, out_q[1], out_q[0]], np.float32)


def _clamped(e: str, clamp: tuple[float, float] | None, out_q: tuple[float, int, int, int] | None = None,
             dequantized: bool = False, qp: str | None = None, times: str | None = None) -> str:
    """TVMScript for `e` (times `times` when given) clamped to [lo, hi] (ReLU / ReLU6 fused into a kernel's store),
    or that value itself. With out_q = (scale, zero point, qmin, qmax) the next quantize happens in the store: the
    value must then already be in grid steps (the caller folds 1 / scale into the weights and bias), and is rounded
    (half to even), clamped once (`grid_bounds`) and stored as int8 or, `dequantized`, as the float that grid value
    stands for (for a consumer that computes in float). With qp (a buffer name) the bounds, zero point and scale are
    read from `store_params`' buffer instead of written as literals.

    The int8 store computes v = e * times + zero point + 1.5 * 2^23 (`llvm.fmuladd`: one FMA where the CPU has
    it): at that magnitude a float32's unit in the last place is 1, so the float rounds v to an integer (half to
    even), and its bits read as int32 are that integer plus a constant whose low byte is 0; float bits
    order like their values, so one int32 clamp to the bounds' bits does the grid clamp (also for any v out of
    range), and the int8 cast keeps the low byte, the output code. 7 vector ops per 8 outputs of an int8 pointwise
    kernel instead of 10 (the old store rounded, clamped in float, added the zero point and truncated to int32 as
    separate steps): MobileNetV2's few-input-channel expansions (96x16x12544, 144x24x3136) ran 1.21-1.28x faster
    on Zen 4, the deeper layers 1.01-1.10x (a vector `llvm.lrint` took 8 ops, and LLVM aborts on it for CPUs
    without AVX). A value exactly halfway between grid
    steps rounds to the even output code rather than the even step count (they differ for odd zero points), the
    same order of difference as the float rounding of e itself."""
    if qp is None:
        lo, hi, zp, scale = (f"T.float32({float(v)!r})" for v in store_params(clamp, out_q))
    else:
        lo, hi, zp, scale = (f"{qp}[{i}]" for i in range(4))
    if out_q is not None and not dequantized:
        big = "T.float32(12582912.0)"  # 1.5 * 2^23
        v = (f'T.call_llvm_pure_intrin("float32", "llvm.fmuladd", {e}, {times}, {zp} + {big})' if times is not None
             else f"{e} + ({zp} + {big})")
        bound_lo, bound_hi = (f'T.reinterpret("int32", {b} + {zp} + {big})' for b in (lo, hi))
        return f'T.Cast("int8", T.max(T.min(T.reinterpret("int32", {v}), {bound_hi}), {bound_lo}))'
    e = e if times is None else f"{e} * {times}"
    if out_q is None:
        # bounds first: TVM's max / min keep a NaN in their second operand (a select on an ordered compare,
        # vmaxps / vminps on x86), so a NaN passes the clamp as it passes PyTorch's ReLU, at no cost
        return e if clamp is None else f"T.max({lo}, T.min({hi}, {e}))"
    # llvm.nearbyint rounds half to even like torch.round; TVM's vectorizer scalarizes T.nearbyint mixed with
    # anything else, so the intrinsic is called directly
    r = f'T.max(T.min(T.call_llvm_pure_intrin("float32", "llvm.nearbyint", {e}), {hi}), {lo})'
    return f"{r} * {scale}"


def in_grid_steps(w: np.ndarray, bias: np.ndarray | None, out_q) -> tuple[np.ndarray, np.ndarray | None]:
    """Weight and bias times 1 / scale of out_q (unchanged without it): the accumulator then counts grid steps."""
    if out_q is None:
        return w, bias
    inv = np.float32(1.0 / out_q[0])
    return (w * inv).astype(np.float32), None if bias is None else (bias * inv).astype(np.float32)


def _qtag(out_q, dequantized: bool) -> str:
    return "" if out_q is None else ("_qdq" if dequantized else "_q")


def _out_dtype(out_q, dequantized: bool) -> str:
    return "int8" if out_q is not None and not dequantized else "float32"


def _column_plan(ow: int, wd: int, kw: int, s: int, pl: int) -> tuple[list, list]:
    """Split output columns into vector segments over the interior (every tap inside the image: 16 wide while
    possible, then 8, then 4) and the scalar ranges left (borders and remainder), as (start, width, count) and
    (start, end)."""
    x_lo = -(-pl // s)
    x_hi = min(ow - 1, (wd - 1 + pl - (kw - 1)) // s)
    n_int = max(0, x_hi - x_lo + 1)
    segments, start = [], x_lo
    if n_int > 16 and n_int % 16:
        # the interior's last 16 columns as one more 16-wide vector that overlaps the one before (the overlap is
        # computed twice, same values): the 8-, 4- and scalar-wide remainder it replaces took a third of the
        # 224x224 stem's time (27 guarded scalar taps per column)
        segments = [(x_lo, 16, n_int // 16), (x_hi - 15, 16, 1)]
        return segments, [(0, x_lo), (x_hi + 1, ow)]
    for v in (16, 8, 4):
        if n_int - (start - x_lo) >= v:
            count = (n_int - (start - x_lo)) // v
            segments.append((start, v, count))
            start += v * count
    return segments, ([(0, x_lo), (start, ow)] if segments else [(0, ow)])


def strided_vector(row: str, base: str, v: int, s: int) -> str:
    """TVMScript of the v inputs at base, base + s, ... of a row (`row` is the indexing up to the column, as
    "x[c, y, ") as one vector, for stride 1 or 2. Stride 2 loads the 2v - 1 contiguous inputs as two vectors and
    keeps the even lanes (a shuffle): TVM would otherwise gather them with a scalar load and insert per lane (2x
    slower on MobileNetV2's 112x112 stride-2 depthwise layer)."""
    if s == 1:
        return f"{row}T.ramp({base}, 1, {v})]"
    if s != 2:
        raise ValueError(f"strided vectors are for stride 1 or 2, not {s}")
    lo, hi = f"{row}T.ramp({base}, 1, {v})]", f"{row}T.ramp({base} + {v - 1}, 1, {v})]"
    lanes = [2 * u for u in range((v + 1) // 2)] + [2 * ((v + 1) // 2) + 2 * u + 1 for u in range(v // 2)]
    return f"T.Shuffle([{lo}, {hi}], {lanes})"


def _depthwise_head(c: int, h: int, wd: int, oh: int, ow: int, w_arg: str, ot: str, xt: str = "float32") -> str:
    """The depthwise kernels' signature: x (of dtype xt), the weight arguments (w_arg), bias, the store parameters,
    out."""
    return f"""@T.prim_func(private=True)
def depthwise(x: T.Buffer(({c}, {h}, {wd}), "{xt}"), {w_arg},
              bias: T.Buffer(({c},), "float32"), qp: T.Buffer((4,), "float32"),
              out: T.Buffer(({c}, {oh}, {ow}), "{ot}")):
    T.func_attr({{"tirx.noalias": True, "tirx.is_scheduled": True}})"""


TILE_UNROLL_TAPS = 81  # most taps the tile kernel unrolls whole (past it, the tap rows are a loop)


def _channel_tile_kernel(c: int, h: int, wd: int, oh: int, ow: int, kh: int, kw: int, w_arg: str, ot: str,
                         int8_weight: bool, tile: str, xs: Callable[[int, int], str], clamp, out_q, lanes: int,
                         rb: int, tile_once: str) -> str:
    """The frame the depthwise tile kernels share: for each of its channels a task broadcasts the taps into wb,
    fills its tile (`tile`: code), then runs rb output rows of `lanes` lanes at a time (the last
    step overlapping the one before: same values), acc[r, 0:lanes] += the tap's 8 broadcast copies x `xs(r, q)`
    (the 8 inputs of tap (i, j) for row r, chunk q): rb * lanes / 8 independent accumulator chains sharing each
    tap load (one row of 8-16 lanes was 1-2 chains, bound by the FMA latency). A scalar tap broadcast in the loop
    is hoisted by LLVM once the buffers are known not to alias (inside relax.build), kept as a scalar on the
    stack and rebuilt with four inserts at every use: 2x slower than this vector load.

    `tile_once` (code) declares the tile and zeroes what no channel's fill writes: it runs once a task, and a task
    takes `depthwise_per_task(c)` channels (a tile over 1 KB is a heap workspace, allocated at every iteration of
    the parallel loop that declares it). Kernel alone on Zen 4 against a task a channel (outputs bit-identical):
    EfficientNet-Lite0's stride-2 144x56x56 5x5 on the phase kernel 0.83-0.92x (one and two threads, int8 store
    alike), 72x112x112 5x5 0.99x; layers of under 16 channels keep a task a channel."""
    fmas = "".join(f"""
                    acc[T.ramp({r * lanes + q * 8}, 1, 8)] = acc[T.ramp({r * lanes + q * 8}, 1, 8)] + wb[T.ramp((i * {kw} + j) * 8, 1, 8)] * {xs(r, q)}"""
                   for r in range(rb) for q in range(lanes // 8))
    wsrc = f'T.Cast("float32", w8[ch * {kh * kw} + k]) * ws[ch]' if int8_weight else f"w[ch, k // {kw}, k % {kw}]"
    per = depthwise_per_task(c)
    body = f"""
        for k in T.serial({kh * kw}):
            wb[T.ramp(k * 8, 1, 8)] = T.broadcast({wsrc}, 8){tile}
        for yb in T.serial({-(-oh // rb)}):
            y0: T.let = T.min(yb * {rb}, {oh - rb})
            acc = T.decl_buffer(({rb * lanes},), "float32", scope="global")
            for u in T.vectorized({rb * lanes}):
                acc[u] = bias[ch]
            for i in T.{"unroll" if kh * kw <= TILE_UNROLL_TAPS else "serial"}({kh}):
                for j in T.unroll({kw}):{fmas}
            for r in T.unroll({rb}):
                for u in T.vectorized({ow}):
                    out[ch, y0 + r, u] = {_clamped(f"acc[r * {lanes} + u]", clamp, out_q, qp="qp")}"""
    return f"""
{_depthwise_head(c, h, wd, oh, ow, w_arg, ot)}
    for cc in T.parallel({-(-c // per)}):
        wb = T.decl_buffer(({kh * kw * 8},), "float32", scope="global"){tile_once}
        for ci in T.serial({per}):
            ch: T.let = cc * {per} + ci
            if ch < {c}:{deeper(body, 8)}
"""


def depthwise_source(c: int, h: int, wd: int, oh: int, ow: int, kh: int, kw: int, stride: int, ph: int, pw: int,
                     clamp: tuple[float, float] | None, out_q: tuple[float, int, int, int] | None = None,
                     int8_weight: bool = False, rows: int = 4, int8_input: bool = False) -> str:
    """out[c, y, x] = bias[c] + sum w[c, i, j] * x[c, y*s + i - ph, x*s + j - pw] (zero outside the image).

    Padding is handled in the kernel, not by a padded copy: rows out of the image are skipped (one scalar branch
    per tap row), the interior columns are vectorized without checks, and the few border columns (and the interior
    remainder) run a scalar loop with guarded loads. With `int8_weight` the weight is stored as int8 with a float
    scale per channel (w[c] = w8[c] * ws[c]), converted once per task into a small float buffer. With `int8_input`
    x is int8 and the row kernel converts it itself (`_depthwise_int8_planes`; an extra argument xqp holds the
    input's scale and zero point, after the weight arguments). The store's bounds
    and grid come from the `qp` buffer (`store_params`): layers of one shape share one function.

    On the large maps (the row kernel: 3x3 taps on outputs 16 or more wide, 5x5 on outputs wider than 32 or whose
    padded tile is too big for the stack) a task computes `rows` output rows of a channel (`depthwise_rows`; the
    last block overlapping the one before: same values), and each vector of an input row's taps is loaded (and, at
    stride 2, shuffled) once for every output row that reads it: 3 rows share it at stride 1. One row a task had
    two accumulator chains of 9 dependent FMAs per 16 columns and loaded each input vector 3 times; with 4 rows,
    kernel alone on Zen 4 (2 threads): MobileNetV2's 96x112x112 stride 2 1.15-1.24x, 144x56x56 1.27-1.57x,
    144x56x56 stride 2 1.24-1.32x, 32x112x112 1.23-1.43x (int8 weights with int8 output, and fp32),
    EfficientNet-Lite0's 5x5 144x56x56 1.25x; 2 rows 1.11-1.25x, 8 rows 1.19-1.22x, 6 rows 0.54x at stride 1. Each
    output's taps are summed in the same order as with one row a task."""
    s = stride
    ot = _out_dtype(out_q, False)
    w_arg = (f'w8: T.Buffer(({c * kh * kw},), "int8"), ws: T.Buffer(({c},), "float32")' if int8_weight
             else f'w: T.Buffer(({c}, {kh}, {kw}), "float32")')

    # int8 storage: the row-task kernel converts its channel's taps into a stack buffer per task (reading taps from
    # a workspace there costs ~50%: the compiler no longer keeps them apart from the output); the small-image kernel
    # converts them into its per-channel buffer of broadcast taps (below)
    task_widen = "" if not int8_weight else f"""
        wt = T.decl_buffer(({kh * kw},), "float32", scope="global")
        for k in T.serial({kh * kw}):
            wt[k] = T.Cast("float32", w8[ch * {kh * kw} + k]) * ws[ch]"""

    def strided(row: str, base: str, v: int) -> str:
        return strided_vector(row, base, v, s)

    def clamped(e: str) -> str:
        return _clamped(e, clamp, out_q, qp="qp")

    hp, wp = (oh - 1) * s + kh, (ow - 1) * s + kw  # the padded rows/columns the taps read
    lanes = -(-ow // 8) * 8  # whole vectors: a 7- or 14-lane row was assembled from 4-, 2- and 1-lane pieces per tap
    wpl = max(wp, (lanes - 1) * s + kw)  # the tile is wide enough for the extra lanes to read zeros
    if _small_tile(oh, ow, kh, kw, s):
        if int8_input:
            raise ValueError("int8 input is for the row kernel (depthwise_int8_input)")
        # small images (the 14x14 and 7x7 stages): with 5x5 taps most columns are borders, so copy each channel
        # into a zeroed padded tile on the stack and run every output row as whole unguarded vectors
        rows, cols = min(h, hp - ph), min(wd, wp - pw)
        rb = min(oh, max(1, 64 // lanes))  # rows per step
        once = f"""
        tile = T.decl_buffer(({hp}, {wpl}), "float32", scope="global")
        for yy in T.serial({hp}):
            for xx in T.vectorized({wpl}):
                tile[yy, xx] = T.float32(0)"""
        tile = f"""
        for yy in T.serial({rows}):
            for xx in T.vectorized({cols}):
                tile[yy + {ph}, xx + {pw}] = x[ch, yy, xx]"""
        return _channel_tile_kernel(c, h, wd, oh, ow, kh, kw, w_arg, ot, int8_weight, tile,
                                    lambda r, q: strided(f"tile[(y0 + {r}) * {s} + i, ", f"j + {q * 8 * s}", 8),
                                    clamp, out_q, lanes, rb, once)

    rb = min(oh, rows)
    nb = -(-oh // rb)
    if int8_input:
        return _depthwise_int8_planes(c, h, wd, oh, ow, kh, kw, s, ph, pw, w_arg, ot, task_widen, clamped, rb,
                                      "wt" if int8_weight else None)
    body = depthwise_rows(rb, h, wd, ow, kh, kw, s, ph, pw, lambda row: f"x[ch, {row}, ",
                          lambda row, col: f"x[ch, {row}, {col}]",
                          (lambda ki, kj: f"wt[{ki * kw + kj if isinstance(ki, int) else f'{ki} * {kw} + {kj}'}]")
                          if int8_weight else (lambda ki, kj: f"w[ch, {ki}, {kj}]"), "bias[ch]", "out[ch, ", clamped)
    return f"""
{_depthwise_head(c, h, wd, oh, ow, w_arg, ot)}
    for t in T.parallel({c * nb}):
        ch: T.let = t // {nb}
        y0: T.let = T.min((t % {nb}) * {rb}, {oh - rb}){task_widen}{body}
"""


def _depthwise_int8_planes(c: int, h: int, wd: int, oh: int, ow: int, kh: int, kw: int, s: int, ph: int, pw: int,
                           w_arg: str, ot: str, task_widen: str, clamped: Callable[[str], str], rb: int,
                           wt: str | None) -> str:
    """The row kernel for an int8 input x on the grid xqp = [scale, zero point]: a task a channel, which converts
    its rows to the floats of the grid, (q - zero point) * scale as the producer's float store would have written
    them, into s column phase planes of the zero-padded row (plane p, column u: padded column s * u + p; at stride
    2 the bytes are split into even and odd before they are widened), each row just before the first row block
    that reads it. The taps then read plain vectors, plane kj % s at column offset kj // s: no border columns and,
    at stride 2, no shuffles. Rows outside the image are skipped as in `depthwise_rows`; each output's taps are
    summed in the same order."""
    wq = ow + (kw - 1) // s  # each plane's columns
    v = 16 if ow >= 16 else 8
    if ow < 8 or s not in (1, 2):
        raise ValueError("the int8-input depthwise kernel takes stride 1 or 2 and 8 outputs a row or more")
    cv = lambda e, n: f'(T.Cast("float32x{n}", {e}) - T.broadcast(xqp[1], {n})) * T.broadcast(xqp[0], {n})'  # noqa
    at = lambda plane, row, col: f"(({plane} * {h} + {row}) * {wq} + {col})"  # noqa: E731
    # conversion of row `row`: input column j goes to plane (j + pw) % s, column (j + pw) // s
    fill, written = "", set()
    chunks = [8] * (wd // (8 * s)) + ([4] if wd % (8 * s) >= 4 * s else [])  # lanes a plane per chunk
    j0 = 0
    for n in chunks:
        src = f"x[ch, row, T.ramp({j0}, 1, {n * s})]"
        for q in range(s):  # bytes j = j0 + s * i + q
            plane, col = (q + pw) % s, (j0 + q + pw) // s
            e = src if s == 1 else f"T.Shuffle([{src}], {[s * i + q for i in range(n)]})"
            fill += f"""
                xf[T.ramp({at(plane, "row", col)}, 1, {n})] = {cv(e, n)}"""
            written.update((plane, col + i) for i in range(n))
        j0 += n * s
    for j in range(j0, wd):
        plane, col = (j + pw) % s, (j + pw) // s
        if col < wq:
            fill += f"""
                xf[{at(plane, "row", col)}] = (T.Cast("float32", x[ch, row, {j}]) - xqp[1]) * xqp[0]"""
            written.add((plane, col))
    for plane in range(s):
        for col in range(wq):
            if (plane, col) not in written:
                fill += f"""
                xf[{at(plane, "row", col)}] = T.float32(0)"""
    last = lambda y: f"T.min({(rb - 1) * s + kh - ph} + {y} * {s}, {h})"  # noqa: E731  (rows a block needs)
    tap = (lambda ki, kj: f"{wt}[{ki * kw + kj}]") if wt else (lambda ki, kj: f"w[ch, {ki}, {kj}]")
    steps = _tap_rows(rb, s, h, kh, kw, ph, v, tap,
                      lambda row, kj: f"xf[T.ramp({at(kj % s, row, f'x0 + {kj // s}')}, 1, {v})]", " " * 16)
    return f"""
{_depthwise_head(c, h, wd, oh, ow, w_arg + ', xqp: T.Buffer((2,), "float32")', ot, "int8")}
    for ch in T.parallel({c}):
        xf = T.decl_buffer(({s * h * wq},), "float32", scope="global"){task_widen}
        for yb in T.serial({-(-oh // rb)}):
            y0: T.let = T.min(yb * {rb}, {oh - rb})
            lo: T.let = T.if_then_else(yb > 0, {last(f"T.min((yb - 1) * {rb}, {oh - rb})")}, 0)
            for yy in T.serial({last("y0")} - lo):
                row: T.let = lo + yy{fill}
            for xo in T.serial({-(-ow // v)}):
                x0: T.let = T.min(xo * {v}, {ow - v})
                acc = T.decl_buffer(({rb * v},), "float32", scope="global")
                for u in T.vectorized({rb * v}):
                    acc[u] = bias[ch]{steps}
                for r in T.unroll({rb}):
                    for u in T.vectorized({v}):
                        out[ch, y0 + r, x0 + u] = {clamped(f"acc[r * {v} + u]")}
"""


def _small_tile(oh: int, ow: int, kh: int, kw: int, s: int) -> bool:
    """Whether `depthwise_source` takes the padded-tile kernel (small images) rather than the row kernel. A 5x5
    kernel's scalar border columns cost more than the copy even on a 59x67 tile; 3x3 ones, since the row kernel
    takes 4 rows a task, only under 16 columns: 192x28x28 1.04x int8, 1.20x fp32, 16x28x28 1.09x against the tile;
    5x5 240x28x28 0.45x."""
    hp, wp = (oh - 1) * s + kh, (ow - 1) * s + kw
    wpl = max(wp, (-(-ow // 8) * 8 - 1) * s + kw)
    return (ow <= 32 and hp * wpl <= 4096) if kw >= 5 else (ow < 16 and hp * wpl <= 2048)


def _reads_int8(kernel: str, oh: int, ow: int, kh: int, kw: int, stride: int) -> bool:
    """Whether depthwise kernel `kernel` (a knob value) takes an int8 input for this layer: the int8 kernel
    (`qdepthwise`), and the row and phase kernels' layers outside the small-image tile, stride 1 or 2, 8 outputs a
    row or more (`_depthwise_int8_planes`)."""
    return kernel == "vnni" or (kernel in ("rows", "phases") and stride in (1, 2) and ow >= 8
                                and not _small_tile(oh, ow, kh, kw, stride))


def dequantized(bb, q, scale: float, zero_point: int):
    """Emit (float(q) - zero point) * scale for an int8 Relax value q, per tensor: the floats of its grid."""
    from tvm import relax
    y = bb.emit(relax.op.astype(q, "float32"))
    y = bb.emit(relax.op.subtract(y, relax.const(float(zero_point), "float32")))
    return bb.emit(relax.op.multiply(y, relax.const(float(scale), "float32")))


def depthwise_int8_input(c: int, oh: int, ow: int, kh: int, kw: int, stride: int, lanes: int = 8,
                         qdot: str | None = None) -> bool:
    """Whether the depthwise kernel for this layer reads its input as int8 (`_depthwise_int8_planes`), so that the
    int8 conv before it stores int8 rather than the floats of its grid: where the rule takes the row or phase
    kernel (the large maps). The producer's store and the depthwise kernel's read move a quarter of the bytes; the
    kernel converts every input value instead (about a uop a value, as much as a stride-2 3x3 layer's FMAs).

    Zen 4, int8 MobileNetV2 and EfficientNet-Lite0 against the float hand-off (outputs within a grid step: the
    int8 and float stores round a tie apart now and then), whole models timed in shuffled interleaved rounds: one
    thread 0.95-0.98x and 0.985x; two threads with the second vCPU busy elsewhere 0.79x and 0.83x (the same
    fastest runs). Limiting it to inputs of 1 or 2 MB of floats or more (only the 112x112 and 56x56 layers) gained
    less: 0.98-0.99x. Kernel alone with a hot input the int8 kernel takes 1.07-1.28x the float kernel's time, with
    inputs rotated through 38 MB 0.43x (96x112x112 stride 2) and 0.51x (32x112x112)."""
    return _reads_int8(depthwise_knobs(c, oh, ow, kh, kw, stride, lanes, qdot)[0]["kernel"], oh, ow, kh, kw, stride)


def _tap_rows(rb: int, s: int, h: int, kh: int, kw: int, ph: int, v: int, tap: Callable, vector: Callable,
              pad: str) -> str:
    """TVMScript (its `if` lines at `pad`) of a row block's taps: for each input row the block's rb output rows read
    (rows outside the image skipped), each tap column's v-vector (`vector(row, kj)`) loaded once and multiplied
    into every output row's accumulator acc[r * v: (r + 1) * v] that reads it, with weight `tap(ki, kj)`."""
    steps = ""
    for ii in range((rb - 1) * s + kh):  # the input rows the block's rb output rows read, each loaded once
        row = f"y0 * {s} + {ii - ph}"
        fmas = ""
        for kj in range(kw):
            xv = vector(row, kj)
            for r in range(rb):
                if 0 <= ii - r * s < kh:
                    a = f"acc[T.ramp({r * v}, 1, {v})]"
                    fmas += f"""
{pad}    {a} = {a} + T.broadcast({tap(ii - r * s, kj)}, {v}) * {xv}"""
        steps += f"""
{pad}if {row} >= 0 and {row} < {h}:{fmas}"""
    return steps


def depthwise_rows(rb: int, h: int, wd: int, ow: int, kh: int, kw: int, s: int, ph: int, pw: int,
                   row_of: Callable[[str], str], at: Callable[[str, str], str], tap: Callable,
                   bias: str, out_row: str, clamped: Callable[[str], str]) -> str:
    """TVMScript (at 8 spaces) of the row kernel's work on one channel: output rows y0 .. y0 + rb - 1 (y0 bound by
    the caller) of an image h x wd. `row_of(row)` is the indexing of input row `row` up to its column (as
    "x[ch, row, "), `at(row, col)` one input value, `tap(ki, kj)` a weight (ints, or the loop names ki, kj),
    `bias` the bias, `out_row` the output's indexing up to its row (as "out[ch, "), `clamped` the store. Each
    vector of an input row's taps is loaded (at stride 2 also shuffled) once for every output row of the block that
    reads it (`depthwise_source`); input rows outside the image are skipped. Border columns are scalar, each
    unrolled with the taps inside the image known here (1.00-1.07x int8, 1.04-1.18x fp32 on MobileNetV2's
    row-kernel layers against a guarded load per tap; their products are now fused into the add, as the interior's
    are, which moves an int8 output code now and then); wider scalar ranges keep the guarded loads."""
    segments, scalar_ranges = _column_plan(ow, wd, kw, s, pw)
    body = ""
    for seg, (x0, v, nv) in enumerate(segments):
        steps = _tap_rows(rb, s, h, kh, kw, ph, v, tap, lambda row, kj: strided_vector(
            row_of(row), f"({x0} + xo * {v}) * {s} + {kj - pw}", v, s), " " * 12)
        body += f"""
        for xo in T.serial({nv}):
            acc = T.decl_buffer(({rb * v},), "float32", scope="global")
            for u in T.vectorized({rb * v}):
                acc[u] = {bias}{steps}
            for r in T.unroll({rb}):
                for u in T.vectorized({v}):
                    {out_row}y0 + r, {x0} + xo * {v} + u] = {clamped(f"acc[r * {v} + u]")}"""
    row = f"y * {s} + ki - {ph}"  # (the tap loops are ki, kj: names apart from the caller's loops)
    for k, (a, b) in enumerate(scalar_ranges):
        if b <= a:
            continue
        if b - a <= 4:  # border columns, each unrolled with the taps inside the image known statically
            for xc in range(a, b):
                fmas = "".join(f"""
                    acc_c[0] = acc_c[0] + {tap("ki", kj)} * {at(row, str(xc * s + kj - pw))}"""
                               for kj in range(kw) if 0 <= xc * s + kj - pw < wd)
                body += f"""
        for r in T.serial({rb}):
            y: T.let = y0 + r
            acc_c = T.decl_buffer((1,), "float32", scope="global")
            acc_c[0] = {bias}
            for ki in T.unroll({kh}):
                if {row} >= 0 and {row} < {h}:{fmas}
            {out_row}y, {xc}] = {clamped("acc_c[0]")}"""
            continue
        col = f"({a} + xs) * {s} + kj - {pw}"
        body += f"""
        for r, xs in T.grid({rb}, {b - a}):
            y: T.let = y0 + r
            acc_s{k} = T.decl_buffer((1,), "float32", scope="global")
            acc_s{k}[0] = {bias}
            for ki in T.unroll({kh}):
                for kj in T.unroll({kw}):
                    acc_s{k}[0] = acc_s{k}[0] + T.if_then_else({row} >= 0 and {row} < {h} and {col} >= 0 and {col} < {wd},
                        {tap("ki", "kj")} * {at(row, col)}, T.float32(0))
            {out_row}y, {a} + xs] = {clamped(f"acc_s{k}[0]")}"""
    return body + "\n"


def depthwise_phases_applies(oh: int, ow: int, kh: int, kw: int, stride: int) -> bool:
    """Stride 2 with 5x5 or wider taps (outside the channel-blocked kernel's maps), the two phase planes within 512
    KB. Measured against the row and tile kernels, whose every 8-lane tap is two loads and two shuffles: 144x56x56
    5x5 270 -> 140 us, 72x112x112 397 -> 242, 16x57x57 7x7 91 -> 27 (2 threads); 3x3 stride-2 layers gained
    nothing (96x112x112 184 vs 189 us, 144x56x56 72 vs 86: they are bound by reading the input) and stay."""
    return kw >= 5 and _phases_fit(oh, ow, kh, kw, stride)


def _phases_fit(oh: int, ow: int, kh: int, kw: int, stride: int) -> bool:
    """Whether the phase kernel can run the layer: stride 2, its two phase planes within 512 KB."""
    hp, wh = (oh - 1) * 2 + kh, -(-ow // 8) * 8 + kw // 2
    return stride == 2 and 2 * hp * wh * 4 <= 512 * 1024


def depthwise_phases_source(c: int, h: int, wd: int, oh: int, ow: int, kh: int, kw: int, ph: int, pw: int,
                            clamp: tuple[float, float] | None, out_q: tuple[float, int, int, int] | None = None,
                            int8_weight: bool = False) -> str:
    """Stride-2 depthwise conv over a channel's two column phases: each task copies its channel into a tile
    [2, rows, cols] where plane p holds the zero-padded input's columns 2u + p (two 8-lane loads give 8 even and 8
    odd inputs by two shuffles, once per input), so tap (i, j) of 8 output pixels is one contiguous load from
    plane j % 2 at column j // 2 + x and one FMA, with no border cases. Only the tile's pad rows and columns are
    zeroed (zeroing all of it cost 10-20%). Rows, accumulators and the store as in `depthwise_source`'s tile
    kernel; out_q and int8_weight as there."""
    ot = _out_dtype(out_q, False)
    w_arg = (f'w8: T.Buffer(({c * kh * kw},), "int8"), ws: T.Buffer(({c},), "float32")' if int8_weight
             else f'w: T.Buffer(({c}, {kh}, {kw}), "float32")')
    lanes = -(-ow // 8) * 8
    hp = (oh - 1) * 2 + kh
    wh = lanes + kw // 2  # plane columns: the taps read lanes + (kw - 1) // 2; the input reaches at most this far
    rows = min(h, hp - ph)  # input rows inside the tile
    rb = min(oh, max(1, 64 // lanes))  # output rows per step, as in the tile kernel
    q = wd // 16
    # plane p's column u is padded column 2u + p, input column 2u + p - pw: [lo[p], hi[p]) hold input
    lo = [(pw - p + 1) // 2 for p in (0, 1)]
    hi = [min(wh, (pw + wd - p + 1) // 2) for p in (0, 1)]
    pe, po = pw % 2, (pw + 1) % 2  # the planes of the even / odd input columns
    ce, co = pw // 2, (pw + 1) // 2  # and where they start in them
    zero = ""
    for y0, y1 in ((0, ph), (ph + rows, hp)):  # pad rows: both planes whole
        if y1 > y0:
            zero += f"""
        for pp in T.serial(2):
            for yy in T.serial({y0}, {y1}):
                for xx in T.vectorized({wh}):
                    tile[pp, yy, xx] = T.float32(0)"""
    for p in (0, 1):  # pad columns of the input rows
        for x0, x1 in ((0, lo[p]), (hi[p], wh)):
            if x1 > x0:
                zero += f"""
        for yy in T.serial({ph}, {ph + rows}):
            for xx in T.serial({x0}, {x1}):
                tile[{p}, yy, xx] = T.float32(0)"""
    pair = "[x[ch, yy, T.ramp(v * 16, 1, 8)], x[ch, yy, T.ramp(v * 16 + 8, 1, 8)]]"
    copy = f"""
        for yy in T.serial({rows}):"""
    if q:
        copy += f"""
            for v in T.serial({q}):
                tile[{pe}, yy + {ph}, T.ramp(v * 8 + {ce}, 1, 8)] = T.Shuffle({pair}, {list(range(0, 16, 2))})
                tile[{po}, yy + {ph}, T.ramp(v * 8 + {co}, 1, 8)] = T.Shuffle({pair}, {list(range(1, 16, 2))})"""
    if wd > q * 16:
        copy += f"""
            for u in T.serial({wd - q * 16}):
                tile[({q * 16} + u + {pw}) % 2, yy + {ph}, ({q * 16} + u + {pw}) // 2] = x[ch, yy, {q * 16} + u]"""
    once = f"""
        tile = T.decl_buffer((2, {hp}, {wh}), "float32", scope="global"){zero}"""
    return _channel_tile_kernel(c, h, wd, oh, ow, kh, kw, w_arg, ot, int8_weight, copy,
                                lambda r, q: f"tile[j % 2, (y0 + {r}) * 2 + i, T.ramp(j // 2 + {q * 8}, 1, 8)]",
                                clamp, out_q, lanes, rb, once)


def transpose8(src: str, dst: str, pad: str) -> str:
    """dst[j, 0:8] = column j of the 8x8 block src (8 row vectors), in three stages of two-vector shuffles (the
    unpack / shuffle / 128-bit permute pattern)."""
    def v(b: str, r: int) -> str:
        return f"{b}[{r}, T.ramp(0, 1, 8)]"

    stages = (([0, 8, 1, 9, 4, 12, 5, 13], [2, 10, 3, 11, 6, 14, 7, 15]),
              ([0, 1, 8, 9, 4, 5, 12, 13], [2, 3, 10, 11, 6, 7, 14, 15]),
              ([0, 1, 2, 3, 8, 9, 10, 11], [4, 5, 6, 7, 12, 13, 14, 15]))
    out = ""
    for k in range(4):  # rows 2k, 2k+1 interleaved
        for half, lanes in enumerate(stages[0]):
            out += f"\n{pad}s1[{2 * k + half}, T.ramp(0, 1, 8)] = T.Shuffle([{v(src, 2 * k)}, {v(src, 2 * k + 1)}], {lanes})"
    for k in range(2):  # pairs of pairs
        for n, (a, b) in enumerate(((4 * k, 4 * k + 2), (4 * k + 1, 4 * k + 3))):
            for half, lanes in enumerate(stages[1]):
                out += f"\n{pad}s2[{4 * k + 2 * n + half}, T.ramp(0, 1, 8)] = T.Shuffle([{v('s1', a)}, {v('s1', b)}], {lanes})"
    for m in range(4):  # 128-bit halves
        for half, lanes in enumerate(stages[2]):
            out += f"\n{pad}{dst}[{m + 4 * half}, T.ramp(0, 1, 8)] = T.Shuffle([{v('s2', m)}, {v('s2', m + 4)}], {lanes})"
    return out


def _cb_zero_border(hp: int, wq: int, ph: int, pw: int, rows: int, cols: int, lanes: int) -> str:
    """Zero the channel-blocked tile's padding only (its pad rows, and the pad columns of the input rows), once a
    task: each group's fill writes the rest. Zeroing all of it was hp * wq vector stores a group, as many as a 3x3
    stride-2 layer's taps."""
    code = ""
    for y0, y1 in ((0, ph), (ph + rows, hp)):
        if y1 > y0:
            code += f"""
        for yy, xx in T.grid({y1 - y0}, {wq}):
            for l in T.vectorized({lanes}):
                tile[yy + {y0}, xx, l] = T.float32(0)"""
    for x0, x1 in ((0, pw), (pw + cols, wq)):
        if x1 > x0:
            code += f"""
        for yy, xx in T.grid({rows}, {x1 - x0}):
            for l in T.vectorized({lanes}):
                tile[yy + {ph}, xx + {x0}, l] = T.float32(0)"""
    return code


def _cb_fill(h: int, wd: int, ph: int, pw: int, rows: int, cols: int, lanes: int, xc: str) -> str:
    """The channel-blocked tile's fill: 8 channels x 8 input pixels a step, made channel-last by an 8x8 transpose.
    Input rows of 8+ used columns go row by row in blocks of 8 columns (the last one overlapping the one before),
    every tile address known at compile time; narrower maps (7x7) in blocks of 8 consecutive pixels of the flat
    map, unrolled where there are at most 16 blocks so that each pixel's row and column are constants. The flat
    fill's divisions, checks and addresses at run time had cost more than the transposes. With the border-only
    zeroing (`_cb_zero_border`), kernel alone on Zen 4 (fp32, 11 interleaved rounds, outputs bit-identical): 14x14
    outputs of stride-2 layers 0.59-0.69x the old fill's time at 1 and 2 threads (192x28x28 3x3 39.8 -> 24.9 us,
    576x14x14 3x3 43.8 -> 25.9, 672x14x14 5x5 73.4 -> 50.6, one thread), 14x14 stride 1 0.71-0.85x, 28x28 5x5
    0.88x, 7x7 maps (then still rolled: the zeroing only) 0.89-0.95x; with an int8 store 0.59-0.89x."""
    if cols >= 8:
        blocks = sorted({min(b * 8, cols - 8) for b in range(-(-cols // 8))})
        steps = "".join(f"""
            for r in T.unroll(8):
                for l in T.vectorized(8):
                    ta[r, l] = x[{xc}, yy * {wd} + {x0} + l]{transpose8("ta", "tb", " " * 12)}
            for j in T.unroll(8):
                for l in T.vectorized(8):
                    tile[yy + {ph}, j + {x0 + pw}, hf * 8 + l] = tb[j, l]""" for x0 in blocks)
        return f"""
        for yy, hf in T.grid({rows}, {lanes // 8}):{steps}"""
    blocks = -(-(h * wd) // 8)
    loop = "T.unroll" if blocks <= 16 else "T.serial"  # unrolled, each pixel's row and column are constants
    return f"""
        for hf in T.serial({lanes // 8}):
            for q in {loop}({blocks}):
                p0: T.let = T.min(q * 8, {h * wd - 8})
                for r in T.unroll(8):
                    for l in T.vectorized(8):
                        ta[r, l] = x[{xc}, p0 + l]{transpose8("ta", "tb", " " * 16)}
                for j in T.unroll(8):
                    if (p0 + j) // {wd} < {rows} and (p0 + j) % {wd} < {cols}:
                        for l in T.vectorized(8):
                            tile[(p0 + j) // {wd} + {ph}, (p0 + j) % {wd} + {pw}, hf * 8 + l] = tb[j, l]"""


EXPAND_CB_PIXELS = 14  # widest input row the fused expansion takes (`_expand_cb_source`: 2 accumulators a pixel)


def deeper(code: str, n: int = 4) -> str:
    """TVMScript `code` (its lines each starting after a newline) moved n spaces deeper, for a loop or branch
    around it."""
    return code.replace("\n", "\n" + " " * n)


def depthwise_per_task(units: int) -> int:
    """How many of a depthwise layer's `units` one task takes: channel groups in the channel-blocked kernel,
    channels in the tile and phase kernels (`_channel_tile_kernel`). 8, 4 or 2 while that leaves 8 tasks or more
    (threads to spare on machines with more cores than the build's), else 1. The channel-blocked kernel's tile and
    output buffers (2-58 KB) live on the heap: TVM allocates them at every iteration of the parallel loop that
    declares them, and a group's
    work is short (960x7x7: ~170 ns). Kernel alone on Zen 4 against a task a group, with the padding's zeroing
    moved to once a task and the 7x7 fill unrolled in the same change (interleaved, outputs bit-identical, one and
    two threads, fp32 and int8 store): 960x7x7 0.68-0.76x, 1152x7x7 5x5 0.81-0.82x, 576x14x14 stride 2 0.87x,
    384x14x14 0.89-0.93x, 28x28 maps 0.96-0.98x. The buffers alone hoisted: 2, 4 or 8 groups a task measured alike
    on 384x14x14 and 192x28x28 (0.90-0.95x), 8 best on the 7x7 maps (0.77-0.88x)."""
    return next((per for per in (8, 4, 2) if units >= 8 * per), 1)


def depthwise_cb_source(c: int, h: int, wd: int, oh: int, ow: int, kh: int, kw: int, stride: int, ph: int, pw: int,
                        clamp: tuple[float, float] | None, out_q: tuple[float, int, int, int] | None = None,
                        int8_weight: bool = False, lanes: int = 8,
                        expand: tuple[int, tuple[float, float] | None] | None = None, per: int = 0) -> str:
    """Depthwise conv for small maps (7x7, 14x14), vectorized over 8 channels instead of over a row: each task takes
    8 channels into a zero-padded channel-last tile [rows, cols, 8], so every tap is one FMA of the tap's 8 weights
    (packed so at compile time: wv[C/8, kh*kw, 8]) against 8 channels of one input pixel, with no border cases
    and no partial vectors. The tile is filled and the output rows go back to NCHW by 8x8 shuffle transposes (8
    channels x 8 pixels a block). Kernel alone on Zen 4: filling by transposes rather than a per-pixel load of 8
    channel rows, 1.01-1.16x (int8 store; 960x7x7 and 192x28x28 stride 2 the most); storing 7x7 maps by
    transposes rather than lane by lane, 1.12-1.24x with an int8 store (it converts whole vectors), 1.05-1.10x in
    fp32, 1.03-1.37x on 3x3 to 8x8 maps. Row vectors wasted most lanes on these maps (7 of 8 lanes at best,
    and a padded tile per channel): 1152x7x7 5x5 took 61 us here against 38. out_q and int8_weight as in
    `depthwise_source` (the int8 taps of a group are widened once per task).

    `lanes` 16 (512-bit vectors) takes 16 channels a task: half the FMAs of 8-lane vectors for the same work, the
    fill and store still 8x8 transposes (two per 8 pixels, one per half of the group).

    `expand` = (cin, clamp_e): the pointwise expansion before the layer runs in this kernel (`expand_cb_applies`):
    x is then the expansion's input [cin, H * W], and each group's tile is filled by the expansion itself
    (`_expand_cb_source`) instead of by transposes of x, so the expanded map is never stored; `per` then counts
    pairs of groups."""
    if lanes not in (8, 16):
        raise ValueError(f"channel groups are 8 or 16 lanes, not {lanes}")
    if expand is not None and (out_q is not None or int8_weight):
        raise ValueError("the fused expansion (expand=) computes a float layer: out_q and int8_weight must be unset")
    L = lanes
    s = stride
    hp, wq = (oh - 1) * s + kh, (ow - 1) * s + kw
    rows, cols = min(h, hp - ph), min(wd, wq - pw)
    nblk = -(-ow // 8)
    ob = -(-ow // nblk)  # output pixels per accumulator block (<= 8 registers), the last block overlapping
    n_out = oh * ow
    ot_type = _out_dtype(out_q, False)
    groups = -(-c // L)
    w_arg = (f'w8: T.Buffer(({groups}, {kh * kw}, {L}), "int8"), ws: T.Buffer(({groups * L},), "float32")'
             if int8_weight else f'wv: T.Buffer(({groups}, {kh * kw}, {L}), "float32")')
    widen = "" if not int8_weight else f"""
        wv = T.decl_buffer((1, {kh * kw}, {L}), "float32", scope="global")
        for k in T.serial({kh * kw}):
            for l in T.vectorized({L}):
                wv[0, k, l] = T.Cast("float32", w8[g, k, l]) * ws[g * {L} + l]"""
    wg = "0" if int8_weight else "g"
    # a last partial group (C % L > 0) reads a valid channel in its spare lanes and stores none of them; the 8
    # channels g * L + hf * 8 + 0..7 (half hf of the group) go through one 8x8 transpose

    def lane_guard(lane: str, pad: str) -> str:
        return f"\n{pad}if g * {L} + hf * 8 + {lane} < {c}:" if c % L else f"\n{pad}if True:"

    xc = f"g * {L} + hf * 8 + r" if c % L == 0 else f"T.min(g * {L} + hf * 8 + r, {c - 1})"
    # output rows a step (ry * ob accumulator chains of kh * kw FMAs): 2 for 5x5 taps on 14-wide maps, 1.07-1.20x
    # kernel alone on EfficientNet-Lite0's 480/672x14x14 (int8 store and fp32); 3x3 layers and 7x7 maps 0.89-1.04x
    ry = min(oh, 2 if kw >= 5 and ow > 8 else 1)
    store = f"""
                for r in T.unroll({ry}):
                    for xx in T.unroll({ob}):
                        for l in T.vectorized({L}):
                            ot[(y0 + r) * {ow} + x0 + xx, l] = acc[r, xx, l]
        for q, hf in T.grid({-(-n_out // 8)}, {L // 8}):
            p0: T.let = T.min(q * 8, {n_out - 8})
            for r in T.unroll(8):
                for l in T.vectorized(8):
                    ta[r, l] = ot[p0 + r, hf * 8 + l]{transpose8("ta", "tb", " " * 12)}
            for r in T.unroll(8):{lane_guard("r", " " * 16)}
                    for l in T.vectorized(8):
                        out[g * {L} + hf * 8 + r, p0 + l] = {_clamped("tb[r, l]", clamp, out_q)}"""
    dw = f"""
        for yb in T.serial({-(-oh // ry)}):
            y0: T.let = T.min(yb * {ry}, {oh - ry})
            for b in T.serial({nblk}):
                x0: T.let = T.min(b * {ob}, {ow - ob})
                acc = T.decl_buffer(({ry}, {ob}, {L}), "float32", scope="global")
                for r in T.unroll({ry}):
                    for xx in T.unroll({ob}):
                        for l in T.vectorized({L}):
                            acc[r, xx, l] = bias[g * {L} + l]
                for i in T.unroll({kh}):
                    for j in T.unroll({kw}):
                        for r in T.unroll({ry}):
                            for xx in T.unroll({ob}):
                                for l in T.vectorized({L}):
                                    acc[r, xx, l] = acc[r, xx, l] + wv[{wg}, i * {kw} + j, l] * tile[
                                        (y0 + r) * {s} + i, (x0 + xx) * {s} + j, l]{store}
"""
    if expand is not None:
        return _expand_cb_source(c, groups, L, hp, wq, ph, pw, rows, cols, h, wd, n_out, w_arg, dw, expand, per)
    body = _cb_fill(h, wd, ph, pw, rows, cols, L, xc) + dw
    # tasks of `per` groups (`depthwise_per_task`, or the caller's `balanced_per_task`): the tile and output
    # buffers, past the 1 KB TVM keeps on the stack, are allocated once a task, not once a group
    per = per or depthwise_per_task(groups)
    return f"""
@T.prim_func(private=True)
def depthwise_cb(x: T.Buffer(({c}, {h * wd}), "float32"), {w_arg},
                 bias: T.Buffer(({groups * L},), "float32"), out: T.Buffer(({c}, {n_out}), "{ot_type}")):
    T.func_attr({{"tirx.noalias": True, "tirx.is_scheduled": True}})
    for gc in T.parallel({-(-groups // per)}):
        tile = T.decl_buffer(({hp}, {wq}, {L}), "float32", scope="global")
        ot = T.decl_buffer(({n_out}, {L}), "float32", scope="global")
        ta = T.decl_buffer((8, 8), "float32", scope="global")
        tb = T.decl_buffer((8, 8), "float32", scope="global")
        s1 = T.decl_buffer((8, 8), "float32", scope="global")
        s2 = T.decl_buffer((8, 8), "float32", scope="global"){_cb_zero_border(hp, wq, ph, pw, rows, cols, L)}
        for gi in T.serial({per}):
            g: T.let = gc * {per} + gi
            if g < {groups}:{deeper(widen + body, 8)}
"""


def _expand_cb_source(c: int, groups: int, L: int, hp: int, wq: int, ph: int, pw: int, rows: int, cols: int,
                      h: int, wd: int, n_out: int, w_arg: str, dw: str, expand: tuple[int, tuple[float, float] | None],
                      per: int) -> str:
    """`depthwise_cb_source` with the expansion before the layer in it (`expand` = (cin, clamp_e)): x is the
    expansion's input [cin, H * W], the expansion's weight we [groups, cin, L] and bias be. A task takes `per` pairs
    of channel groups; for a pair, input row by input row, the two groups' channels of each of the row's `cols`
    pixels are summed over the cin inputs in registers (2 x cols accumulators: each pixel's input broadcast once
    against both groups' weight vectors), clamped and stored channel-last into the pair's two tiles, which `dw`
    (one group's depthwise conv and store, from `tile` for group `g`) then reads. The expanded map is never stored;
    the sums are the pointwise kernel's, in the same order (bias first, then k = 0..cin-1). An odd last group
    computes its pair's second half from itself and stores nothing of it. Against one group a step (each input
    broadcast for one weight vector), alone on the Xeon: 0.91-0.93x at 2 threads, 0.91-0.93x at 1."""
    import re
    cin, clamp_e = expand
    pairs = -(-groups // 2)
    dw_b = re.sub(r"\bg\b", "g1", dw)
    for a, b in (("tile[", "tile_b["), ("acc[", "acc_b["), ("acc =", "acc_b ="), ("y0", "y0b"), ("x0", "x0b"),
                 ("p0", "p0b")):
        dw_b = dw_b.replace(a, b)
    g1 = f"T.min(g + 1, {groups - 1})" if groups % 2 else "g + 1"
    steps = "".join(f"""
                    for l in T.vectorized({L}):
                        acc_e[{h}, xx, l] = acc_e[{h}, xx, l] + we[{gh}, kk, l] * x[kk, yy * {wd} + xx]"""
                    for h, gh in ((0, "g"), (1, g1)))
    fill = f"""
        for yy in T.serial({rows}):
            acc_e = T.decl_buffer((2, {cols}, {L}), "float32", scope="global")
            for xx in T.unroll({cols}):
                for l in T.vectorized({L}):
                    acc_e[0, xx, l] = be[g * {L} + l]
                for l in T.vectorized({L}):
                    acc_e[1, xx, l] = be[({g1}) * {L} + l]
            for kk in T.serial({cin}):
                for xx in T.unroll({cols}):{steps}
            for xx in T.unroll({cols}):
                for l in T.vectorized({L}):
                    tile[yy + {ph}, xx + {pw}, l] = {_clamped("acc_e[0, xx, l]", clamp_e)}
                for l in T.vectorized({L}):
                    tile_b[yy + {ph}, xx + {pw}, l] = {_clamped("acc_e[1, xx, l]", clamp_e)}"""
    zero = _cb_zero_border(hp, wq, ph, pw, rows, cols, L)
    return f"""
@T.prim_func(private=True)
def expand_cb(x: T.Buffer(({cin}, {h * wd}), "float32"), we: T.Buffer(({groups}, {cin}, {L}), "float32"),
              be: T.Buffer(({groups * L},), "float32"), {w_arg},
              bias: T.Buffer(({groups * L},), "float32"), out: T.Buffer(({c}, {n_out}), "float32")):
    T.func_attr({{"tirx.noalias": True, "tirx.is_scheduled": True}})
    for gc in T.parallel({-(-pairs // per)}):
        tile = T.decl_buffer(({hp}, {wq}, {L}), "float32", scope="global")
        tile_b = T.decl_buffer(({hp}, {wq}, {L}), "float32", scope="global")
        ot = T.decl_buffer(({n_out}, {L}), "float32", scope="global")
        ta = T.decl_buffer((8, 8), "float32", scope="global")
        tb = T.decl_buffer((8, 8), "float32", scope="global")
        s1 = T.decl_buffer((8, 8), "float32", scope="global")
        s2 = T.decl_buffer((8, 8), "float32", scope="global"){zero}{zero.replace("tile[", "tile_b[")}
        for gi in T.serial({per}):
            gp: T.let = gc * {per} + gi
            if gp < {pairs}:
                g: T.let = gp * 2{deeper(fill + dw, 8)}
                if g + 1 < {groups}:
                    g1: T.let = g + 1{deeper(dw_b, 12)}
"""


def depthwise_cb_applies(c: int, oh: int, ow: int, kh: int, kw: int, stride: int) -> bool:
    """Small output maps, 8 channels or more (and the padded tile within 32 KB). Measured: 0.54-0.83x
    the row kernel's time on 7x7 and 14x14 outputs; on 28x28 it was 1.0-1.4x with 3x3 taps (0.75x against the
    4-row row kernel), so those keep the row kernel, and 0.93-0.95x with 5x5 taps against the padded tile
    (EfficientNet-Lite0's 240x28x28, int8 store and fp32), which it takes. With the row-block fill
    (`_cb_fill`), 3x3 stride 1 on 28x28 still took 1.10-1.28x the row kernel's time (32, 96 and 192 channels, Zen 4,
    one and two threads), so the rule stands."""
    return (ow <= 16 or kw >= 5 and ow <= 28) and _channels_fit(c, oh, ow, kh, kw, stride)


def _channels_fit(c: int, oh: int, ow: int, kh: int, kw: int, stride: int, lanes: int = 8) -> bool:
    """Whether the channel-blocked kernel can run the layer in groups of `lanes` channels: that many channels or
    more, 8+ outputs, its padded tile within 4 KB a lane (32 KB at 8 lanes)."""
    hp, wq = (oh - 1) * stride + kh, (ow - 1) * stride + kw
    return c >= lanes and oh * ow >= 8 and hp * wq * 4 <= 4096


CB16_MIN_CHANNELS = 192  # 16-channel groups from here (fewer groups than this left the second thread short of work)


def depthwise_knobs(c: int, oh: int, ow: int, kh: int, kw: int, stride: int,
                    lanes: int = 8, qdot: str | None = None) -> tuple[dict, list[dict]]:
    """The rule's depthwise kernel and the candidates tuning may measure (`knobs.py`): `kernel` = rows (vectors
    along output rows, any shape), channels (groups of 8 channels over a channel-last tile, where the padded tile
    fits in 32 KB; with 512-bit vectors (`lanes` 16) also groups of 16, "lanes": 16) or phases (stride 2: the input
    split into column phases once, planes within 512 KB). The rule: channels on 7x7 and 14x14 outputs
    (`depthwise_cb_applies`), in 16-channel groups with 16 lanes and CB16_MIN_CHANNELS channels or more, phases for
    stride 2 with 5x5 or wider taps (`depthwise_phases_applies`), else rows. 16- against 8-channel groups, kernel
    alone on Emerald Rapids (2 threads): 5x5 taps 0.66-0.95x (1152x7x7 0.82-0.87, 672x14x14 0.75-0.95, 672x14x14
    stride 2 0.66, 240x28x28 0.86), 3x3 0.89-0.95x (960x7x7, 480/384/576x14x14; one 576x14x14 run 1.10), 100
    channels at 14x14 1.18x. Inside the models (each site's calls timed by the profiler, 4 rounds): EfficientNet-
    Lite0's 5x5 layers 0.70-0.94x (its eight channel-kernel layers 918 -> 781 us a run), its 3x3 0.96-1.07x,
    MobileNetV2's 3x3 layers 0.87-0.96x (539 -> 489 us); whole models within their noise (0.96-1.03x, 2 runs).
    There the row kernel was as fast on MobileNetV2's 3x3 layers (468 us): tuning measures both.

    With `qdot` (an int8 layer on a CPU with the int8 depthwise kernel's instructions) the rule is that kernel
    ("vnni", `qdepthwise`) wherever `qdepthwise_applies`: 1.4-4.7x faster than the float kernels by MobileNetV2
    layer; they stay candidates."""
    cands = [{"kernel": "rows"}]
    cb16 = lanes >= 16 and _channels_fit(c, oh, ow, kh, kw, stride, 16)
    if _channels_fit(c, oh, ow, kh, kw, stride):
        cands.append({"kernel": "channels"})
    if cb16:
        cands.append({"kernel": "channels", "lanes": 16})
    if _phases_fit(oh, ow, kh, kw, stride):
        cands.append({"kernel": "phases"})
    if depthwise_cb_applies(c, oh, ow, kh, kw, stride):
        rule = {"kernel": "channels", "lanes": 16} if cb16 and c >= CB16_MIN_CHANNELS else {"kernel": "channels"}
    else:
        rule = {"kernel": "phases" if depthwise_phases_applies(oh, ow, kh, kw, stride) else "rows"}
    from graphopt.targets.tvm.cpu.qdepthwise import qdepthwise_applies
    if qdot is not None and qdepthwise_applies(c, oh, ow, kh, kw, stride):
        rule = {"kernel": "vnni"}
        cands.append(rule)
    return rule, cands


def depthwise_applies(x_shape, w_shape, stride, padding, dilation, groups, transposed) -> bool:
    return (len(x_shape) == 4 and len(w_shape) == 4 and int(w_shape[1]) == 1
            and int(groups) == int(x_shape[1]) == int(w_shape[0]) and not transposed
            and len(set(int(s) for s in stride)) == 1 and int(stride[0]) in (1, 2)
            and all(int(d) == 1 for d in dilation))


def emit_depthwise(bb, x, w: np.ndarray, bias: np.ndarray | None, x_shape, stride: int, padding,
                   clamp: tuple[float, float] | None, out_q: tuple[float, int, int, int] | None = None,
                   w_scale: np.ndarray | None = None, lanes: int = 8, x_q: tuple[float, int] | None = None,
                   qdot: str | None = None, cores: int = 0):
    """Emit a depthwise conv (+ bias, clamp) for x [N, C, H, W] with a constant weight [C, 1, kh, kw].

    `padding` is (top, bottom, left, right), so an asymmetric zero pad before the conv (TF "SAME") folds in. With
    out_q the output is int8 on that grid (the next quantize done in the store). With w_scale, w is int8 and
    w_scale its float scale per channel: the artifact keeps the int8 weight. `lanes`: the target's vector lanes.
    With x_q = (scale, zero point) x is int8 on that grid: the row and phase kernels' layers convert each input
    row themselves (`_depthwise_int8_planes`), the others get the floats from a dequantize before them. With x_q,
    w_scale and `qdot` (`qdepthwise.int8_depthwise_dot`: the target has the int8 kernel's instructions) the layers
    `qdepthwise_applies` takes run on the int8 kernel (`qdepthwise`), a tuning candidate among the float ones.
    `cores` (the target's; 0: unknown) sizes the channel-group kernel's tasks (`balanced_per_task`): MobileNetV2
    (960 x 7 x 7: 3 groups a task, 20 tasks, instead of 4 and 15) 0.978-0.996x in four interleaved runs at 2
    threads; EfficientNet-Lite0 (1152 x 7 x 7: 6 a task instead of 8) 0.91-1.02x, noise.
    """
    from tvm import relax

    n, c, h, wd = (int(d) for d in x_shape)
    kh, kw = int(w.shape[2]), int(w.shape[3])
    pt, pb, pl, pr = (int(q) for q in padding)
    oh, ow = (h + pt + pb - kh) // stride + 1, (wd + pl + pr - kw) // stride + 1
    tag = (f"{c}x{h}x{wd}_k{kh}s{stride}" + ("" if clamp is None else "_clamp") + _qtag(out_q, False)
           + ("_w8" if w_scale is not None else "") + _ntag(n))
    qdot = qdot if x_q is not None and w_scale is not None else None
    rule, cands = depthwise_knobs(c, oh, ow, kh, kw, stride, lanes, qdot)
    site = Site("depthwise", f"{tag}|p{pt}{pb}{pl}{pr}", rule, cands, n * c * oh * ow * kh * kw)
    knobs = pick(site)
    kernel, gl = knobs["kernel"], knobs.get("lanes", 8)
    if kernel == "vnni":
        from graphopt.targets.tvm.cpu.qdepthwise import emit_qdepthwise
        y = emit_qdepthwise(bb, x, w, w_scale, bias, *x_q, x_shape, stride, padding, clamp, out_q, qdot, tag)
        bind(site, y[1])
        return y[0]
    if kernel == "channels" and h * wd < 8:  # its fill transposes blocks of 8 input pixels
        kernel = "rows"
    int8_in = x_q is not None and _reads_int8(kernel, oh, ow, kh, kw, stride)
    if x_q is not None and not int8_in:  # (tuning moved the layer to a kernel that reads floats)
        x = dequantized(bb, x, *x_q)
    if kernel == "channels":
        cp = -(-c // gl) * gl

        def grouped(a: np.ndarray, dtype) -> np.ndarray:  # [C, kh, kw] -> [C/gl, kh*kw, gl], zero channels appended
            z = np.zeros((cp, kh * kw), dtype)
            z[:c] = a.reshape(c, kh * kw)
            return np.ascontiguousarray(z.reshape(cp // gl, gl, kh * kw).transpose(0, 2, 1))

        def padded(v: np.ndarray) -> np.ndarray:
            z = np.zeros(cp, np.float32)
            z[:c] = v
            return z
        if w_scale is None:
            w, bias = in_grid_steps(w, bias, out_q)
            weights = [relax.const(grouped(w, np.float32))]
        else:
            w_scale, bias = in_grid_steps(np.broadcast_to(np.asarray(w_scale, np.float32).reshape(-1), (c,)).copy(),
                                          bias, out_q)
            weights = [relax.const(grouped(w, np.int8)), relax.const(padded(w_scale))]
        src = batch_source(depthwise_cb_source(c, h, wd, oh, ow, kh, kw, stride, pt, pl, clamp, out_q,
                                               w_scale is not None, gl, per=balanced_per_task(cp // gl, cores)),
                           n, ["x", "out"])
        gv = bb.add_func(parse_kernel(src), f"depthwise_cb{gl if gl != 8 else ''}_{tag}")
        bind(site, gv.name_hint)
        b = padded(bias if bias is not None else np.zeros(c, np.float32))
        y = bb.emit(relax.call_tir(gv, [bb.emit(relax.op.reshape(x, _batched(n, c, h * wd))), *weights,
                                        relax.const(b)],
                                   relax.TensorType(_batched(n, c, oh * ow), _out_dtype(out_q, False))))
        return bb.emit(relax.op.reshape(y, (n, c, oh, ow)))
    if w_scale is None:
        w, bias = in_grid_steps(w, bias, out_q)
        weights = [relax.const(np.ascontiguousarray(w.reshape(c, kh, kw).astype(np.float32)))]
    else:
        w_scale, bias = in_grid_steps(np.broadcast_to(np.asarray(w_scale, np.float32).reshape(-1), (c,)).copy(), bias, out_q)
        weights = [relax.const(np.ascontiguousarray(w.reshape(-1).astype(np.int8))), relax.const(w_scale)]
    if kernel == "phases" and not int8_in:
        src, kind = depthwise_phases_source(c, h, wd, oh, ow, kh, kw, pt, pl, clamp, out_q, w_scale is not None), "ph"
    else:
        src = depthwise_source(c, h, wd, oh, ow, kh, kw, stride, pt, pl, clamp, out_q, w_scale is not None,
                               int8_input=int8_in)
        kind = "i8in" if int8_in else ""
    func = parse_kernel(batch_source(src, n, ["x", "out"]))
    gv = bb.add_func(func, f"depthwise_{kind + '_' if kind else ''}{tag}")
    bind(site, gv.name_hint)
    x3 = bb.emit(relax.op.reshape(x, _batched(n, c, h, wd)))
    b = bias if bias is not None else np.zeros(c, np.float32)
    xqp = [relax.const(np.array([x_q[0], x_q[1]], np.float32))] if int8_in else []
    y = bb.emit(relax.call_tir(gv, [x3, *weights, *xqp, relax.const(b.astype(np.float32)),  # (xqp after w_arg)
                                    relax.const(store_params(clamp, out_q))],
                               relax.TensorType(_batched(n, c, oh, ow), _out_dtype(out_q, False))))
    return bb.emit(relax.op.reshape(y, (n, c, oh, ow)))


def expand_pads(h: int, wd: int, k: int, stride: int, full) -> tuple[int, int] | None:
    """(top, left) zero padding of a depthwise conv the fused expansion kernels take, from its (top, bottom, left,
    right) (`full`: the conv's own with a zero pad before it, such as TF "SAME"'s, folded in): any split whose
    output is the size "same" padding gives ((h - 1) // stride + 1 rows) with at most k // 2 before, or None.
    EfficientNet-Lite0's stride-2 layers pad 0 / 1 (3x3) and 1 / 2 (5x5) so."""
    pt, pb, pl, pr = (int(q) for q in full)
    if min(pt, pb, pl, pr) < 0 or max(pt, pl) > k // 2:
        return None
    if (h + pt + pb - k) // stride != (h - 1) // stride or (wd + pl + pr - k) // stride != (wd - 1) // stride:
        return None
    return pt, pl


def _pad_tag(pads: tuple[int, int] | None) -> str:
    return "" if pads is None else f"_p{pads[0]}{pads[1]}"


EXPAND_DW_BAND_BYTES = 46 * 1024  # one task's expanded band (MR channels x its input rows): within a 48 KB L1
EXPAND_DW_MAX_RECOMPUTE = 1.15  # most expanded pixels a fused layer may compute per pixel of the map (band halos)


def expand_dw_plan(cin: int, c: int, h: int, wd: int, k: int, stride: int, lanes: int,
                   cores: int = 2) -> tuple[int, int] | None:
    """(band rows, bands) of the fused expand + depthwise kernel (`expand_dw_source`) for a pointwise conv of cin ->
    c channels on an h x wd map whose only consumer is a k x k depthwise conv ("same" padding, `stride`), or None
    where it does not apply: c a multiple of MR, a depthwise layer the rule gives the row kernel (large maps), and
    a split of the output rows into bands whose expanded input rows (MR channels) fit EXPAND_DW_BAND_BYTES while
    the rows the bands share (their halos, computed twice) stay within EXPAND_DW_MAX_RECOMPUTE, with at least two
    tasks a core."""
    if c % MR or k % 2 == 0 or stride not in (1, 2) or h < k or wd < k:
        return None
    oh, ow = (h - 1) // stride + 1, (wd - 1) // stride + 1
    if depthwise_knobs(c, oh, ow, k, k, stride, lanes)[0]["kernel"] != "rows":
        return None
    most = EXPAND_DW_BAND_BYTES // (MR * wd * 4)
    for nb in range(1, oh + 1):
        br = -(-oh // nb)
        rows = min((br - 1) * stride + k, h)
        if rows <= most and (c // MR) * nb >= 2 * cores:
            break
    else:
        return None
    if nb * rows > EXPAND_DW_MAX_RECOMPUTE * h or rows * wd < 2 * lanes:
        return None
    return br, nb


def expand_dw_source(cin: int, c: int, h: int, wd: int, k: int, stride: int, br: int, nr: int,
                     clamp_e: tuple[float, float] | None, clamp_d: tuple[float, float] | None,
                     pads: tuple[int, int] | None = None) -> str:
    """An inverted-residual block's expansion and depthwise conv in one kernel: out = dw(clamp_e(We x + be)) + bd,
    clamped by clamp_d, for x [cin, h * wd], the expansion's weight packed in MR-channel panels (`pack_rows`), the
    depthwise's [c, k, k] ("same" padding). A task takes one panel and a band of `br` output rows: it computes the
    expansion for the band's input rows into a stack-sized buffer (each panel x pixel tile as the pointwise
    kernel's, over the band's contiguous pixels, the last tile overlapping the one before), then runs the row
    kernel (`depthwise_rows`) on it, so the expanded map (MobileNetV2's 96 x 112 x 112: 4.8 MB) is never
    written out and read back. Bands overlap by the depthwise's halo rows, computed in both; the sums are the two
    kernels' in the same order (outputs bit-identical). `pads` = (top, left) zero padding where it is not k // 2
    (TF "SAME" at stride 2: more at the bottom and right, as `expand_pads` takes it); the output size is "same"'s."""
    s, p = stride, k // 2
    top, left = pads if pads is not None else (p, p)
    oh, ow = (h - 1) // s + 1, (wd - 1) // s + 1
    rows = min((br - 1) * s + k, h)
    npx = rows * wd
    npan, nb = c // MR, -(-oh // br)
    rb = min(4, br)

    expand = _tile(MR, nr, f"pan * {MR}", f"rs * {wd} + p0", cin, clamp_e, "acc_e", " " * 12,
                   dest=f"bandf[i * {npx} + p0 + v]")
    dw = depthwise_rows(rb, h, wd, ow, k, k, s, top, left, lambda row: f"band[cl, {row} - rs, ",
                        lambda row, col: f"band[cl, {row} - rs, {col}]", lambda ki, kj: f"wdw[ch, {ki}, {kj}]",
                        "bd[ch]", "out[ch, ", lambda e: _clamped(e, clamp_d))
    return f"""
@T.prim_func(private=True)
def expand_dw(x: T.Buffer(({cin}, {h * wd}), "float32"), wp: T.Buffer(({npan}, {cin}, {MR}), "float32"),
              bias: T.Buffer(({c},), "float32"), wdw: T.Buffer(({c}, {k}, {k}), "float32"),
              bd: T.Buffer(({c},), "float32"), out: T.Buffer(({c}, {oh}, {ow}), "float32")):
    T.func_attr({{"tirx.noalias": True, "tirx.is_scheduled": True}})
    for t in T.parallel({npan * nb}):
        pan: T.let = t % {npan}
        b0: T.let = T.min((t // {npan}) * {br}, {oh - br})
        rs: T.let = T.max(0, T.min(b0 * {s} - {top}, {h - rows}))
        band = T.decl_buffer(({MR}, {rows}, {wd}), "float32", scope="global")
        bandf = T.decl_buffer(({MR * npx},), "float32", data=band.data)
        for pt in T.serial({-(-npx // nr)}):
            p0: T.let = T.min(pt * {nr}, {npx - nr}){expand}
        for cl, yb in T.grid({MR}, {-(-br // rb)}):
            ch: T.let = pan * {MR} + cl
            y0: T.let = b0 + T.min(yb * {rb}, {br - rb}){deeper(dw, 4)}
"""


def emit_expand_dw(bb, x, we: np.ndarray, be: np.ndarray | None, wdw: np.ndarray, bd: np.ndarray | None, x_shape,
                   stride: int, plan: tuple[int, int], lanes: int, clamp_e: tuple[float, float] | None,
                   clamp_d: tuple[float, float] | None, pads: tuple[int, int] | None = None):
    """Emit the fused expansion + depthwise conv (`expand_dw_source`, `plan` from `expand_dw_plan`) for x [1, Cin,
    H, W], the pointwise weight we [C, Cin(, 1, 1)] and the depthwise's wdw [C, 1, k, k]; returns [1, C, OH, OW].
    `pads`: (top, left) where they are not k // 2 (`expand_pads`)."""
    from tvm import relax

    _, cin, h, wd = (int(d) for d in x_shape)
    c, k = int(wdw.shape[0]), int(wdw.shape[-1])
    oh, ow = (h - 1) // stride + 1, (wd - 1) // stride + 1
    zeros = np.zeros(c, np.float32)
    src = expand_dw_source(cin, c, h, wd, k, stride, plan[0], 2 * lanes, clamp_e, clamp_d, pads)
    tag = f"{c}x{cin}x{h}x{wd}_k{k}s{stride}" + ("" if clamp_d is None else "_clamp") + _pad_tag(pads)
    gv = bb.add_func(parse_kernel(src), f"expand_dw_{tag}")
    args = [bb.emit(relax.op.reshape(x, (cin, h * wd))), relax.const(pack_rows(we.reshape(c, cin))),
            relax.const((zeros if be is None else be).astype(np.float32)),
            relax.const(np.ascontiguousarray(wdw.reshape(c, k, k).astype(np.float32))),
            relax.const((zeros if bd is None else bd).astype(np.float32))]
    y = bb.emit(relax.call_tir(gv, args, relax.TensorType((c, oh, ow), "float32")))
    return bb.emit(relax.op.reshape(y, (1, c, oh, ow)))


def expand_cb_applies(c: int, h: int, wd: int, k: int, stride: int, lanes: int) -> bool:
    """Whether a pointwise expansion to c channels on an h x wd map, whose only consumer is a k x k depthwise conv
    ("same" padding, `stride`), runs with it in the channel-blocked kernel (`depthwise_cb_source` with `expand`):
    where the rule gives that layer 16-channel groups (512-bit vectors; 8-lane CPUs not measured), c a multiple
    of 16, input rows of 8 to EXPAND_CB_PIXELS pixels (MobileNetV2's and EfficientNet-Lite0's 14x14 maps).

    In-model A/Bs against the two kernels (the Xeon, interleaved, 30 rounds a run, outputs within 5e-6):
    MobileNetV2 (its four 384 x 64 and three 576 x 96 pairs) 0.971-0.989x in four runs at 2 threads, 0.946-0.981x
    in three at 1; EfficientNet-Lite0 (three 480 x 80 and 672 x 112 pairs) 0.978-0.998x at 2. Alone (hot, the
    two kernels' call overhead included) 0.64-0.73x at 2 threads, 0.85-0.88x at 1. Fusing MobileNetV2's 7x7 maps
    too (960 x 160, rows of 7) was 1.00-1.02x without them with one group a step, 0.99-1.05x with pairs: that
    expanded map is 188 KB, in L2 either way."""
    if lanes < 16 or c % 16 or k % 2 == 0 or stride not in (1, 2) or not 8 <= wd <= EXPAND_CB_PIXELS:
        return False
    oh, ow = (h - 1) // stride + 1, (wd - 1) // stride + 1
    return depthwise_knobs(c, oh, ow, k, k, stride, lanes)[0] == {"kernel": "channels", "lanes": 16}


def balanced_per_task(units: int, cores: int) -> int:
    """Units (channel groups, or the fused kernel's pairs of them) a task of the channel-group kernels: at most
    `depthwise_per_task`'s (8+ tasks), the most that keeps the busiest of `cores` threads (the tasks split in
    contiguous runs) at its least number of units; `depthwise_per_task`'s where cores is 0 (not known). 576
    channels in pairs (18) 1 a task, 18 tasks, where 2 made 9 (5 and 4 a thread at 2 threads)."""
    if not cores:
        return depthwise_per_task(units)
    most = depthwise_per_task(units)

    def busiest(per: int) -> int:
        return -(-(-(-units // per)) // max(cores, 1)) * per
    return min(range(most, 0, -1), key=lambda per: (busiest(per), -per))


def emit_expand_cb(bb, x, we: np.ndarray, be: np.ndarray | None, wdw: np.ndarray, bd: np.ndarray | None, x_shape,
                   stride: int, clamp_e: tuple[float, float] | None, clamp_d: tuple[float, float] | None,
                   cores: int = 0, pads: tuple[int, int] | None = None):
    """Emit the expansion + depthwise conv as one channel-blocked kernel (`expand_cb_applies`) for x [1, Cin, H,
    W], the pointwise weight we [C, Cin(, 1, 1)] and the depthwise's wdw [C, 1, k, k]; returns [1, C, OH, OW].
    `pads`: (top, left) where they are not k // 2 (`expand_pads`)."""
    from tvm import relax

    _, cin, h, wd = (int(d) for d in x_shape)
    c, k, lanes = int(wdw.shape[0]), int(wdw.shape[-1]), 16
    oh, ow = (h - 1) // stride + 1, (wd - 1) // stride + 1
    groups = c // lanes
    zeros = np.zeros(c, np.float32)
    pt, pl = pads if pads is not None else (k // 2, k // 2)
    src = depthwise_cb_source(c, h, wd, oh, ow, k, k, stride, pt, pl, clamp_d, lanes=lanes,
                              expand=(cin, clamp_e), per=balanced_per_task(-(-groups // 2), cores))
    tag = f"{c}x{cin}x{h}x{wd}_k{k}s{stride}" + ("" if clamp_d is None else "_clamp") + _pad_tag(pads)
    gv = bb.add_func(parse_kernel(src), f"expand_cb16_{tag}")
    wg = np.ascontiguousarray(we.reshape(groups, lanes, cin).transpose(0, 2, 1).astype(np.float32))
    wv = np.ascontiguousarray(wdw.reshape(groups, lanes, k * k).transpose(0, 2, 1).astype(np.float32))
    args = [bb.emit(relax.op.reshape(x, (cin, h * wd))), relax.const(wg),
            relax.const((zeros if be is None else be).astype(np.float32)), relax.const(wv),
            relax.const((zeros if bd is None else bd).astype(np.float32))]
    y = bb.emit(relax.call_tir(gv, args, relax.TensorType((c, oh * ow), "float32")))
    return bb.emit(relax.op.reshape(y, (1, c, oh, ow)))


def direct_conv_source(cout: int, cin: int, h: int, wd: int, oh: int, ow: int, kh: int, kw: int, stride: int,
                       pt: int, pl: int, clamp: tuple[float, float] | None,
                       out_q: tuple[float, int, int, int] | None = None, dequantized: bool = False) -> str:
    """A dense (groups=1) kxk conv at batch 1, computed directly (no im2col copy): a tile of MR output channels x
    a vector of output pixels of one row accumulates over input channels and taps; borders as in the depthwise
    kernel (row taps skipped, interior columns vectorized, border columns scalar with guarded loads).

    Tasks run row-major (a task's index: output row outer, channel panel inner), and so does the stride-2 column
    split before them (`_deinterleave`), so with the threads' static split of the tasks each thread reads back
    the split rows it wrote itself: split channel by channel and run panel by panel, half of every thread's split
    input had been written by the other core. MobileNetV2's 224x224 stem alone at 2 threads 266 -> 198 us (1 thread
    305 -> 316), the model 0.97-0.98x (three interleaved runs of 30 rounds, the Xeon; outputs identical)."""
    s = stride
    mt = -(-cout // MR)
    ot = _out_dtype(out_q, dequantized)

    def clamped(e: str) -> str:
        return _clamped(e, clamp, out_q, dequantized)

    segments, scalar_ranges = _column_plan(ow, wd, kw, s, pl)
    co = f"(t % {mt}) * {MR}"
    row = f"(t // {mt}) * {s} + i - {pt}"

    # stride 2: the even and odd input columns first (declared here, so one call does both loops)
    split = "" if s != 2 else f"""
    xe = T.decl_buffer(({cin}, {h}, {(wd + 1) // 2}), "float32")
    xodd = T.decl_buffer(({cin}, {h}, {wd // 2}), "float32"){_deinterleave(cin, h, wd)}"""

    def taps(seg: int, x0: int, v: int) -> str:
        """The kw taps of one tile row. Stride 1 reads x directly; stride 2 reads the even or odd columns (split
        once per call), so every tap is a contiguous vector load instead of a stride-2 gather."""
        out = ""
        for j in range(kw):
            if s == 2:
                d = j - pl
                src = f"xe[ci, {row}, {x0} + xo * {v} + u + {d // 2}]" if d % 2 == 0 else \
                    f"xodd[ci, {row}, {x0} + xo * {v} + u + {(d - 1) // 2}]"
            else:
                src = f"x[ci, {row}, {x0} + xo * {v} + u + {j - pl}]"
            out += f"""
                        for r in T.unroll({MR}):
                            for u in T.vectorized({v}):
                                acc{seg}[r, u] = acc{seg}[r, u] + wp[t % {mt}, ci, i, {j}, r] * {src}"""
        return out
    body = ""
    for seg, (x0, v, nv) in enumerate(segments):
        body += f"""
        for xo in T.serial({nv}):
            acc{seg} = T.decl_buffer(({MR}, {v}), "float32", scope="global")
            for r in T.unroll({MR}):
                for u in T.vectorized({v}):
                    acc{seg}[r, u] = bias[{co} + r]
            for ci in T.serial({cin}):
                for i in T.unroll({kh}):
                    if {row} >= 0 and {row} < {h}:{taps(seg, x0, v)}
            for r in T.unroll({MR}):
                if {co} + r < {cout}:
                    for u in T.vectorized({v}):
                        out[{co} + r, t // {mt}, {x0} + xo * {v} + u] = {clamped(f"acc{seg}[r, u]")}
"""
    for k, (a, b) in enumerate(scalar_ranges):
        if b <= a:
            continue
        col = f"({a} + xs) * {s} + j - {pl}"
        body += f"""
        for xs in T.serial({b - a}):
            accs{k} = T.decl_buffer(({MR},), "float32", scope="global")
            for r in T.unroll({MR}):
                accs{k}[r] = bias[{co} + r]
            for ci in T.serial({cin}):
                for i in T.unroll({kh}):
                    for j in T.unroll({kw}):
                        for r in T.unroll({MR}):
                            accs{k}[r] = accs{k}[r] + T.if_then_else({row} >= 0 and {row} < {h} and {col} >= 0 and {col} < {wd},
                                wp[t % {mt}, ci, i, j, r] * x[ci, {row}, {col}], T.float32(0))
            for r in T.unroll({MR}):
                if {co} + r < {cout}:
                    out[{co} + r, t // {mt}, {a} + xs] = {clamped(f"accs{k}[r]")}
"""
    return f"""
@T.prim_func(private=True)
def conv_direct(x: T.Buffer(({cin}, {h}, {wd}), "float32"),
                wp: T.Buffer(({mt}, {cin}, {kh}, {kw}, {MR}), "float32"),
                bias: T.Buffer(({mt * MR},), "float32"), out: T.Buffer(({cout}, {oh}, {ow}), "{ot}")):
    T.func_attr({{"tirx.noalias": True, "tirx.is_scheduled": True}}){split}
    for t in T.parallel({mt * oh}):{body}
"""


def _deinterleave(c: int, h: int, wd: int) -> str:
    """A parallel loop writing xe = the even columns of x[C, H, W] and xodd = the odd ones (buffers the caller
    declares): two contiguous 8-lane loads give 8 even and 8 odd values by two shuffles. Two strided_slice functions
    gathered lane by lane and read x twice (40 us for the 3x224x224 stem input)."""
    q = wd // 16
    even, odd = list(range(0, 16, 2)), list(range(1, 16, 2))
    row = f"r % {c}, r // {c}"
    pair = f"[x[{row}, T.ramp(v * 16, 1, 8)], x[{row}, T.ramp(v * 16 + 8, 1, 8)]]"
    out = f"""
    for r in T.parallel({c * h}):"""
    if q:
        out += f"""
        for v in T.serial({q}):
            xe[{row}, T.ramp(v * 8, 1, 8)] = T.Shuffle({pair}, {even})
            xodd[{row}, T.ramp(v * 8, 1, 8)] = T.Shuffle({pair}, {odd})"""
    for name, n, first in (("xe", (wd + 1) // 2, 0), ("xodd", wd // 2, 1)):
        if n > q * 8:
            out += f"""
        for u in T.serial({n - q * 8}):
            {name}[{row}, {q * 8} + u] = x[{row}, {q * 16} + 2 * u + {first}]"""
    return out


def direct_applies(x_shape, w_shape, stride, padding, dilation, groups, transposed) -> bool:
    """Small-Cin dense convs (the stem: 3 input channels) where the rule-scheduled conv is slowest."""
    return (len(x_shape) == 4 and len(w_shape) == 4 and int(groups) == 1
            and int(w_shape[1]) <= 8 and tuple(w_shape[2:]) != (1, 1) and not transposed and int(x_shape[3]) >= 2
            and len(set(int(s) for s in stride)) == 1 and int(stride[0]) in (1, 2)
            and all(int(d) == 1 for d in dilation))


def rows_too_narrow(x_shape, w_shape, stride: int, padding) -> bool:
    """A stem whose output rows are under 16 pixels (a keyword-spotting DS-CNN's 10x4 stride-2 conv over 49 x 10
    MFCC frames: 5 columns) leaves the direct kernel, which vectorizes along a row, mostly scalar border code: it
    takes im2col + the packed GEMM instead (that DS-CNN stem 25-27 -> 13-15 us, an 8x8-digit CNN's 1->32 3x3
    conv 2.3-2.8 -> 0.6-0.7 us; kernels alone, 2 threads). At least 8 output pixels (the GEMM's tile); columns
    within im2col's budget (`im2col_pays`)."""
    pt, pb, pl, pr = (int(q) for q in padding)
    oh = (int(x_shape[2]) + pt + pb - int(w_shape[2])) // stride + 1
    ow = (int(x_shape[3]) + pl + pr - int(w_shape[3])) // stride + 1
    return ow < 16 and oh * ow >= 8 and im2col_pays(int(w_shape[1]), int(w_shape[2]), int(w_shape[3]), oh * ow)


def emit_direct_conv(bb, x, w: np.ndarray, bias: np.ndarray | None, x_shape, stride: int, padding,
                     clamp: tuple[float, float] | None, out_q: tuple[float, int, int, int] | None = None,
                     dequantized: bool = False):
    """Emit the direct conv for x [N, Cin, H, W], weight [Cout, Cin, kh, kw]; padding (top, bottom, left, right)."""
    from tvm import relax

    n, cin, h, wd = (int(d) for d in x_shape)
    cout, _, kh, kw = (int(d) for d in w.shape)
    pt, pb, pl, pr = (int(q) for q in padding)
    oh, ow = (h + pt + pb - kh) // stride + 1, (wd + pl + pr - kw) // stride + 1
    w, bias = in_grid_steps(w, bias, out_q)
    mt = -(-cout // MR)
    wp = np.zeros((mt * MR, cin, kh, kw), np.float32)
    wp[:cout] = w
    wp = np.ascontiguousarray(wp.reshape(mt, MR, cin, kh, kw).transpose(0, 2, 3, 4, 1))
    b = np.zeros(mt * MR, np.float32)
    if bias is not None:
        b[:cout] = bias
    src = batch_source(direct_conv_source(cout, cin, h, wd, oh, ow, kh, kw, stride, pt, pl, clamp, out_q,
                                          dequantized), n, ["x", "out"])
    gv = bb.add_func(parse_kernel(src), f"conv_direct_{cout}x{cin}x{h}x{wd}_k{kh}s{stride}"
                     + ("" if clamp is None else "_clamp") + _qtag(out_q, dequantized) + _ntag(n))
    x3 = bb.emit(relax.op.reshape(x, _batched(n, cin, h, wd)))
    y = bb.emit(relax.call_tir(gv, [x3, relax.const(wp), relax.const(b)],
                               relax.TensorType(_batched(n, cout, oh, ow), _out_dtype(out_q, dequantized))))
    return bb.emit(relax.op.reshape(y, (n, cout, oh, ow)))


def dense_conv_applies(x_shape, w_shape, stride, padding, dilation, groups, transposed) -> bool:
    """Dense (groups=1) k x k convs beyond the stem's few input channels (ResNet/UNet/YOLO bodies), and strided 1x1
    ones (ResNet's downsampling shortcuts): TVM's conv with the schedule rules ran them at 5-15 GMAC/s here."""
    return (len(x_shape) == 4 and len(w_shape) == 4 and int(groups) == 1 and int(w_shape[1]) > 8
            and (tuple(w_shape[2:]) != (1, 1) or int(stride[0]) > 1) and not transposed and int(x_shape[3]) >= 2
            and len(set(int(s) for s in stride)) == 1
            and all(int(d) == 1 for d in dilation))


def patchify_applies(x_shape, w_shape, stride, padding, dilation, groups, transposed) -> bool:
    """Convs with one stride of 3 or more on few input channels, which the direct kernel's strides (1, 2) do not
    cover: ViT's 16x16 patch embedding and Swin's / ConvNeXt's 4x4 stems (stride = kernel: im2col copies each
    pixel once into the packed GEMM's columns), a 3x3 stride-4 stem. TVM's conv under the rules took 1.65x
    PyTorch's time on ViT's, 2x on the 3x3 stride-4 stem."""
    if not (len(x_shape) == 4 and len(w_shape) == 4 and int(groups) == 1 and not transposed
            and len(set(int(s) for s in stride)) == 1 and int(stride[0]) > 2 and all(int(d) == 1 for d in dilation)):
        return False
    s, (kh, kw) = int(stride[0]), (int(w_shape[2]), int(w_shape[3]))
    oh = (int(x_shape[2]) + 2 * int(padding[0]) - kh) // s + 1
    ow = (int(x_shape[3]) + 2 * int(padding[1]) - kw) // s + 1
    return oh >= 1 and ow >= 1 and im2col_pays(int(w_shape[1]), kh, kw, oh * ow)


def im2col_pays(cin: int, kh: int, kw: int, out_pixels: int) -> bool:
    """im2col + the packed GEMM, or the direct kernel? im2col won on every ResNet/UNet shape measured (3x3, 2
    threads, GMAC/s im2col / direct): 32 @32x32 53/38, 64 @56x56 85/51, 64->128 s2 @56 84/49, 128 @28 86/37,
    256 @14 65/22, 512 @7 59/12. The direct kernel stays for columns over 16 MB (a VGG-style 64-channel 224x224
    conv would copy 115 MB)."""
    return cin * kh * kw * out_pixels <= 4 << 20


def im2col_source(cin: int, h: int, wd: int, oh: int, ow: int, kh: int, kw: int, stride: int, pt: int,
                  pl: int, batch_dim: bool = False, dtype: str = "float32", tap_major: bool = False,
                  dilation: int = 1, row_stride: int | None = None) -> str:
    """col[(ci * kh + i) * kw + j, oy * ow + ox] = x[ci, oy * s + i d - pt, ox * s + j d - pl] (0 outside): the
    [Cin * kh * kw, OH * OW] operand that turns a dense conv into the pointwise kernel's GEMM (weight rows in
    PyTorch's [Cout, Cin, kh, kw] order already); `fill` [1] is the value outside the image (0). It is marked
    opaque (op_pattern 8): as an injective function Relax fused the reshape producing its input into it, and the
    buffers clashed; with one input and one output its reshape detection asserted on it. `batch_dim`: x is
    declared [1, Cin, H, W], the activation as it comes, so no reshape is needed at batch 1. `dtype` int8: the
    columns of a quantized conv, `fill` then the input's zero point. `tap_major`: rows (i * kw + j) * Cin + ci
    instead, so adjacent rows are adjacent channels at one tap, the pairs the u8 x s8 kernel adds (the weight's
    columns permuted to match), which `quantize{weights=int8s}` bounds. Outputs 12+ columns wide at stride 1 or 2
    take the vector-copy kernel (`_im2col_rows_source`); the rest this per-element one. `dilation` d: the taps
    are d pixels apart (DeepLab's atrous convs, as one GEMM over the whole map); `row_stride`: the stride along H
    when it differs from the one along W (`stride`)."""
    taps, d = kh * kw, dilation
    sh = stride if row_stride is None else row_stride
    lead, lead_index = ("1, ", "0, ") if batch_dim else ("", "")
    if stride in (1, 2) and ow >= 12:
        return _im2col_rows_source(cin, h, wd, oh, ow, kh, kw, stride, pt, pl, lead, lead_index, dtype, tap_major,
                                   d, sh)
    tap, ci = (f"(r // {cin})", f"r % {cin}") if tap_major else ("r", f"r // {taps}")
    y = f"oy * {sh} + ({tap} // {kw}) % {kh} * {d} - {pt}"
    # the output columns whose input column ox * s + j d - pl lies inside the image: [lo, hi)
    lo = f"T.max(0, ({pl} - {tap} % {kw} * {d} + {stride - 1}) // {stride})"
    hi = f"T.min({ow}, ({wd - 1} + {pl} - {tap} % {kw} * {d}) // {stride} + 1)"
    return f"""
@T.prim_func(private=True)
def im2col(x: T.Buffer(({lead}{cin}, {h}, {wd}), "{dtype}"), fill: T.Buffer((1,), "{dtype}"),
           col: T.Buffer(({cin * taps}, {oh * ow}), "{dtype}")):
    T.func_attr({{"tirx.noalias": True, "tirx.is_scheduled": True, "op_pattern": 8}})
    for r in T.parallel({cin * taps}):
        for oy in T.serial({oh}):
            if {y} < 0 or {y} >= {h}:
                for ox in T.serial({ow}):
                    col[r, oy * {ow} + ox] = fill[0]
            else:
                for ox in T.serial({lo}):
                    col[r, oy * {ow} + ox] = fill[0]
                for ox in T.serial({hi} - {lo}):
                    col[r, oy * {ow} + {lo} + ox] = x[{lead_index}{ci}, {y}, ({lo} + ox) * {stride} + {tap} % {kw} * {d} - {pl}]
                for ox in T.serial({ow} - {hi}):
                    col[r, oy * {ow} + {hi} + ox] = fill[0]
"""


def _im2col_rows_source(cin: int, h: int, wd: int, oh: int, ow: int, kh: int, kw: int, stride: int, pt: int,
                        pl: int, lead: str, lead_index: str, dtype: str, tap_major: bool, d: int = 1,
                        sh: int | None = None) -> str:
    """im2col for stride 1 or 2 with whole vectors: one task per (input channel, tap row); each tap column j is
    written out separately, so the output columns whose input lies inside the image are a constant range, copied
    as vectors of up to 16 (the last one overlapping the one before; stride 2 loads 2v - 1 contiguous inputs as
    two vectors and keeps the even lanes), with only the border columns filled one by one. The scalar per-element
    copy took 75-89 us for ResNet-18's 128x28x28 stride-2 columns and 375 us for a 7x7 stride-2 RGB stem (this
    one: 40 and 118 us; int8 128x28x28 56 -> 36 us); on 7-column maps it was 0.76-0.86x, so narrow outputs keep
    the scalar kernel (`im2col_source`)."""
    s, body = stride, ""
    for j in range(kw):
        lo, hi = max(0, -(-(pl - j * d) // s)), min(ow, (wd - 1 + pl - j * d) // s + 1)  # the inside columns [lo, hi)
        r = f"(i * {kw} + {j}) * {cin} + ci" if tap_major else f"(ci * {kh} + i) * {kw} + {j}"
        border = "".join(f"""
                    for ox in T.serial({b - a}):
                        col[{r}, oy * {ow} + {a} + ox] = fill[0]""" for a, b in ((0, min(lo, ow)), (max(hi, lo), ow))
                         if b > a)
        copy, n = "", hi - lo
        if n > 0:
            v = min(16, n)
            src = strided_vector(f"x[{lead_index}ci, y, ", f"({lo} + T.min(c * {v}, {n - v})) * {s} + {j * d - pl}", v,
                                 s)
            copy = f"""
                    for c in T.serial({-(-n // v)}):
                        col[{r}, T.ramp(oy * {ow} + {lo} + T.min(c * {v}, {n - v}), 1, {v})] = {src}"""
        body += f"""
        for oy in T.serial({oh}):
            y: T.let = oy * {s if sh is None else sh} + i * {d} - {pt}
            if y < 0 or y >= {h}:
                for ox in T.vectorized({ow}):
                    col[{r}, oy * {ow} + ox] = fill[0]
            else:
                if True:{border}{copy}"""
    return f"""
@T.prim_func(private=True)
def im2col(x: T.Buffer(({lead}{cin}, {h}, {wd}), "{dtype}"), fill: T.Buffer((1,), "{dtype}"),
           col: T.Buffer(({cin * kh * kw}, {oh * ow}), "{dtype}")):
    T.func_attr({{"tirx.noalias": True, "tirx.is_scheduled": True, "op_pattern": 8}})
    for t in T.parallel({cin * kh}):
        ci: T.let = t // {kh}
        i: T.let = t % {kh}{body}
"""


NR_FLAT = 16  # output pixels per tile of the flat conv: two 8-lane vectors
STEM_STEPS = 64  # a conv's reduction (Cin * kh * kw) up to this is too short for the flat / pixel-row kernels


def flat_geometry(h: int, wd: int, kh: int, kw: int, stride: int, padding) -> tuple[int, int, int, int]:
    """(OH, OW, Hq, Wq) of the flat conv: each of the stride x stride phase planes of the zero-padded input is Hq x
    Wq, so output pixel (oy, ox) reads plane (i % s, j % s) at (oy + i // s, ox + j // s) for tap (i, j)."""
    pt, pb, pl, pr = (int(q) for q in padding)
    oh, ow = (h + pt + pb - kh) // stride + 1, (wd + pl + pr - kw) // stride + 1
    return oh, ow, oh + (kh - 1) // stride, ow + (kw - 1) // stride


def flat_positions(h: int, wd: int, kh: int, kw: int, stride: int, padding) -> int:
    """The flat convs' output range: positions numbered over the planes' width up to the last output pixel."""
    oh, ow, _, wq = flat_geometry(h, wd, kh, kw, stride, padding)
    return (oh - 1) * wq + ow


def flat_conv_applies(x_shape, w_shape, stride: int, padding) -> bool:
    """kxk kernels (1x1 strided ones gather a quarter of the input: im2col's copy is smaller) whose flat output
    range holds a whole tile; strided ones only on maps of more than 16 tiles. Strided convs with small outputs
    ran at half the GMAC/s of stride 1 in either task order (ResNet-18's 128->256 at 28x28 and 256->512 at 14x14,
    2.8 ms each against ~1.5-2 for im2col + the packed GEMM; an A/B build with tile-major order: 1.33 / 2.15 ms
    against im2col's 1.18 / 1.60); the cause is not found."""
    qmax = flat_positions(int(x_shape[2]), int(x_shape[3]), int(w_shape[2]), int(w_shape[3]), stride, padding)
    return (tuple(int(d) for d in w_shape[2:]) != (1, 1) and qmax >= NR_FLAT
            and (stride == 1 or qmax > 16 * NR_FLAT))


def pad_phases_source(cin: int, h: int, wd: int, kh: int, kw: int, stride: int, padding) -> str:
    """TVMScript writing xp [Cin, s * s, Hq * Wq]: the zero-padded input split into its stride phases (stride 1: the
    padded input itself), each plane flat. Every row is three contiguous runs: zeros, the input row's columns of this
    phase, zeros (`fill` [1] holds the 0). Opaque (op_pattern 8), with that second input, for the reasons im2col
    is (`im2col_source`)."""
    s, (pt, _, pl, _) = stride, (int(q) for q in padding)
    _, _, hq, wq = flat_geometry(h, wd, kh, kw, s, padding)
    ph = s * s
    y = f"((r // {hq}) % {ph} // {s} + (r % {hq}) * {s} - {pt})"  # the input row of plane row r
    b = f"((r // {hq}) % {s})"  # the column phase
    lo = f"(({pl} - {b} + {s - 1}) // {s})"  # plane columns [lo, hi) lie inside the input row
    hi = f"T.min({wq}, ({wd - 1 + pl} - {b}) // {s} + 1)"
    return f"""
@T.prim_func(private=True)
def pad_phases(x: T.Buffer(({cin}, {h}, {wd}), "float32"), fill: T.Buffer((1,), "float32"),
               xp: T.Buffer(({cin * ph * hq * wq},), "float32")):
    T.func_attr({{"tirx.noalias": True, "tirx.is_scheduled": True, "op_pattern": 8}})
    for r in T.parallel({cin * ph * hq}):
        if {y} < 0 or {y} >= {h}:
            for u in T.serial({wq}):
                xp[r * {wq} + u] = fill[0]
        else:
            for u in T.serial({lo}):
                xp[r * {wq} + u] = fill[0]
            for u in T.serial({hi} - {lo}):
                xp[r * {wq} + {lo} + u] = x[r // {hq * ph}, {y}, {b} + ({lo} + u) * {s} - {pl}]
            for u in T.serial({wq} - {hi}):
                xp[r * {wq} + {hi} + u] = fill[0]
"""


def _flat_store(cout: int, co: str, ow: int, wq: int, clamp: tuple[float, float] | None, res: bool,
                masked: bool) -> str:
    """The flat conv's store of its 6 x 16 tile (flat pixels q0..q0+15, rows of Wq of which OW are output pixels).
    Per lane (a division by Wq and a scalar store each: 23% of a 64->64 56x56 conv's time), or with `masked`
    (AVX) as vectors: a tile inside one output row is two plain stores a channel, and one that crosses rows, or
    the plane's extra columns, is an 8-lane masked store (`vmaskmovps`) per row it touches, the mask keeping the
    lanes of that row's output pixels (64->64 at 56x56: 2.33 -> 1.99 ms, 128->128 at 28x28 2.28 -> 2.03)."""
    pad = " " * 16
    if not masked:
        pix = f"(q0 + v) // {wq}, (q0 + v) % {wq}"
        val = _clamped("acc[r, v]" + (f" + res[{co}, {pix}]" if res else ""), clamp)
        return f"""
        for r in T.unroll({MR}):
            if {co} < {cout}:
                for v in T.serial({NR_FLAT}):
                    if (q0 + v) % {wq} < {ow}:
                        out[{co}, {pix}] = {val}"""
    rows = 1 + (wq + NR_FLAT - 2) // wq  # output rows one tile can touch
    x = f"x0 + hv * 8 - s * {wq}"  # the output column of the vector's lane 0 in row y0 + s
    mask = (f'T.Cast("int32x8", T.bitwise_and(T.ramp({x}, 1, 8) >= T.broadcast(0, 8), '
            f'T.ramp({x}, 1, 8) < T.broadcast({ow}, 8))) * T.broadcast(-1, 8)')
    res8 = (f' + T.call_llvm_pure_intrin("float32x8", "llvm.x86.avx.maskload.ps.256", '
            f'T.address_of(res[{co}, y0 + s, {x}]), {mask})') if res else ""
    lo, hi = (f"T.broadcast(T.float32({float(b)!r}), 8)" for b in store_params(clamp, None)[:2])
    val8 = f"acc[r, T.ramp(hv * 8, 1, 8)]{res8}"
    if clamp is not None:
        val8 = f"T.max({lo}, T.min({hi}, {val8}))"  # (a NaN kept, as in _clamped)
    whole = _clamped("acc[r, v]" + (f" + res[{co}, y0, x0 + v]" if res else ""), clamp)
    return f"""
        y0: T.let = q0 // {wq}
        x0: T.let = q0 % {wq}
        if x0 + {NR_FLAT} <= {ow}:
            for r in T.unroll({MR}):
                if {co} < {cout}:
                    for v in T.vectorized({NR_FLAT}):
                        out[{co}, y0, x0 + v] = {whole}
        else:
            for hv in T.unroll({NR_FLAT // 8}):
                for s in T.unroll({rows}):
                    if {x} + 7 >= 0 and {x} < {ow}:
                        for r in T.unroll({MR}):
                            if {co} < {cout}:
{pad}                T.evaluate(T.call_llvm_intrin("void", "llvm.x86.avx.maskstore.ps.256",
{pad}                    T.address_of(out[{co}, y0 + s, {x}]), {mask}, {val8}))"""


def flat_conv_source(cout: int, cin: int, h: int, wd: int, kh: int, kw: int, stride: int, padding,
                     clamp: tuple[float, float] | None, res: bool = False, masked: bool = False) -> str:
    """A dense kxk conv as an implicit GEMM over the flat phase planes (`pad_phases_source`): output pixels are
    numbered q = oy * Wq + ox over the planes' width, so for every tap the 16 pixels of a tile read 16 consecutive
    floats of one plane, whatever rows they span: a 6-channel x 16-pixel tile accumulates in 12 registers over
    (input channel, tap) from contiguous vector loads and broadcast packed weights, with no im2col copy (an input
    channel's taps reuse the same few cache lines; tap-major order was up to 1.3x slower on 14x14 and 7x7 maps).
    The planes' extra (kw - 1) // s columns per row are computed and not stored; the last tile overlaps the one
    before it.
    Tasks run tile-major (a tile's inputs stay in L1 across the channel panels) or, with few tiles (7x7 maps, big
    weights), panel-major (each panel is read once). Bias, the residual and the clamp are done in the store.
    Tile-major splits the pixels of every output row between the threads; forcing panel-major (the threads split
    the channels, which the int8 staged kernels gained from: `int8.quad_chunks`) measured the same on ResNet-18's
    3x3 convs (Zen 4, 2 threads)."""
    s = stride
    oh, ow, hq, wq = flat_geometry(h, wd, kh, kw, s, padding)
    plane, ph = hq * wq, s * s
    qmax, mt = (oh - 1) * wq + ow, -(-cout // MR)
    nq = _flat_tiles(h, wd, kh, kw, stride, padding)
    panel, tile = (f"t // {nq}", f"t % {nq}") if nq <= 16 else (f"t % {mt}", f"t // {mt}")
    tap = f"(((i % {s}) * {s} + j % {s}) * {plane} + (i // {s}) * {wq} + j // {s})"
    x_at = f"ci * {ph * plane} + {tap} + q0 + v"
    co = f"({panel}) * {MR} + r"
    res_arg = f'res: T.Buffer(({cout}, {oh}, {ow}), "float32"), ' if res else ""
    return f"""
@T.prim_func(private=True)
def conv_flat(xp: T.Buffer(({cin * ph * plane},), "float32"), wp: T.Buffer(({mt}, {kh * kw * cin}, {MR}), "float32"),
              bias: T.Buffer(({mt * MR},), "float32"), {res_arg}out: T.Buffer(({cout}, {oh}, {ow}), "float32")):
    T.func_attr({{"tirx.noalias": True, "tirx.is_scheduled": True, "op_pattern": 8}})
    for t in T.parallel({mt * nq}):
        q0: T.let = T.min(({tile}) * {NR_FLAT}, {qmax - NR_FLAT})
        acc = T.decl_buffer(({MR}, {NR_FLAT}), "float32", scope="global")
        for r in T.unroll({MR}):
            for v in T.vectorized({NR_FLAT}):
                acc[r, v] = bias[{co}]
        for ci in T.serial({cin}):
            for i in T.unroll({kh}):
                for j in T.unroll({kw}):
                    for r in T.unroll({MR}):
                        for v in T.vectorized({NR_FLAT}):
                            acc[r, v] = acc[r, v] + wp[{panel}, ci * {kh * kw} + i * {kw} + j, r] * xp[{x_at}]{
        _flat_store(cout, co, ow, wq, clamp, res, masked)}
"""


def staged_conv_applies(x_shape, w_shape, stride: int, padding) -> bool:
    """Stems (few input channels) whose reduction is long enough for the staged flat conv: ResNet's 7x7 stride-2
    RGB stem (147 steps) 4.1 -> 3.3 ms against the direct kernel, a 5-channel 5x5 one (125) 290 -> 164 us; the
    3x3 RGB stem of MobileNetV2 / EfficientNet (27 steps) lost (454 -> 550 us) and stays direct."""
    cin, kh, kw = int(w_shape[1]), int(w_shape[2]), int(w_shape[3])
    oh, ow, _, wq = flat_geometry(int(x_shape[2]), int(x_shape[3]), kh, kw, stride, padding)
    return cin * kh * kw > STEM_STEPS and (oh - 1) * wq + ow >= NR_FLAT


def stem_takes_tok(w_shape, stride: int) -> bool:
    """Whether a long-reduction stem (`staged_conv_applies`) runs on the pixel-row conv rather than the staged one:
    where Cout fills whole 16-channel tiles. Single-conv models (+ ReLU, 2 threads, Zen 4), staged / pixel-row time
    with the pad before each: ResNet's 7x7 stride-2 3->64 at 224 1.65 / 1.48 ms (inside ResNet-18 1.72 -> 1.45
    ms, the model 0.98x), 7x7 stride-1 3->16 at 96 0.32 / 0.26, 5x5 5->32 at 64 and 3->32 stride 2 at 128
    0.93x; 7x7 stride-2 3->24 at 224 0.54 / 0.63 (a third of the second tile's lanes idle), so that one stays
    staged. A conv_kxk tuning site either way it goes to the pixel-row conv."""
    return int(w_shape[0]) % NR_TOK == 0 and tok_conv_applies(w_shape, stride)


def staged_tiling(cout: int, h: int, wd: int, kh: int, kw: int, stride: int, padding, steps: int) -> dict:
    """The task layout the staged flat convs (float `staged_conv_source`, int8 `int8.qconv_flat_source`) share:
    16-pixel blocks over the flat output range, cut into even chunks whose staged `steps` reduction rows per block
    fit half of L1 (`int8.quad_chunks`), panel groups enough for the threads, and each tap's flat offset in the
    phase planes. Tasks are chunk-minor (task t: chunk t % chunks, group t // chunks), so the threads, which take
    contiguous runs of tasks, split the channel groups, each writing whole output rows (`int8.quad_chunks`)."""
    from graphopt.targets.tvm.cpu.int8 import quad_chunks
    oh, ow, hq, wq = flat_geometry(h, wd, kh, kw, stride, padding)
    plane, mt, s = hq * wq, -(-cout // MR), stride
    qmax = (oh - 1) * wq + ow
    cb = -(-qmax // NR_FLAT)
    chunks, nblk = quad_chunks(cb, steps, NR_FLAT)
    groups = max(1, min(mt, -(-8 // chunks)))  # enough tasks for the threads; each group stages its chunk once
    return {"oh": oh, "ow": ow, "wq": wq, "plane": plane, "ph": s * s, "taps": kh * kw, "mt": mt, "qmax": qmax,
            "cb": cb, "chunks": chunks, "nblk": nblk, "groups": groups,
            "offs": [((i % s) * s + j % s) * plane + (i // s) * wq + j // s for i in range(kh) for j in range(kw)],
            "blocks": f"T.serial(b0, (t % {chunks} + 1) * {cb} // {chunks})"}  # the task's chunk of blocks


def staged_conv_source(cout: int, cin: int, h: int, wd: int, kh: int, kw: int, stride: int, padding,
                       clamp: tuple[float, float] | None, masked: bool = False, res: bool = False) -> str:
    """The staged flat conv (dense kxk convs and long-reduction stems): each task first copies its 16-pixel
    blocks' rows of every (input channel, tap) from the phase planes into a staged [block, Cin * kh * kw, 16]
    buffer (16 contiguous floats per tap, as in `flat_conv_source`), then runs the 6 x 16 register tile over it
    like the packed pointwise GEMM, each panel's weights reused across the chunk's blocks (the flat int8 conv's
    structure). Bias, the residual and the clamp are done in the store. Against `flat_conv_source`, which reads
    the taps from the planes in place (kernels alone, 2 threads, ResNet-18's 3x3 convs): 1.07-1.11x at stride 1
    (64->64 at 56x56 ... 512->512 at 7x7), 1.2-1.3x at stride 2, even on a 10x10 map; inside the model it loses
    on the small maps (`conv_kxk_knobs`)."""
    k, nr = cin * kh * kw, NR_FLAT
    g = staged_tiling(cout, h, wd, kh, kw, stride, padding, k)
    oh, ow, wq, plane, ph, taps, mt, qmax = (g[n] for n in ("oh", "ow", "wq", "plane", "ph", "taps", "mt", "qmax"))
    cb, chunks, nblk, groups, blocks = (g[n] for n in ("cb", "chunks", "nblk", "groups", "blocks"))
    stage = "".join(f"""
                xs[T.ramp((((b - b0) * {k} + ci * {taps} + {tp}) * {nr}), 1, {nr})] = xp[T.ramp(
                    ci * {ph * plane} + {off} + q0, 1, {nr})]""" for tp, off in enumerate(g["offs"]))
    store = "\n".join(" " * 8 + ln if ln.strip() else ln
                       for ln in _flat_store(cout, f"c * {MR} + r", ow, wq, clamp, res, masked).split("\n"))
    res_arg = f'res: T.Buffer(({cout}, {oh}, {ow}), "float32"), ' if res else ""
    return f"""
@T.prim_func(private=True)
def conv_staged(xp: T.Buffer(({cin * ph * plane},), "float32"), wp: T.Buffer(({mt}, {k}, {MR}), "float32"),
                bias: T.Buffer(({mt * MR},), "float32"), {res_arg}out: T.Buffer(({cout}, {oh}, {ow}), "float32")):
    T.func_attr({{"tirx.noalias": True, "tirx.is_scheduled": True, "op_pattern": 8}})
    for t in T.parallel({chunks * groups}):
        b0: T.let = (t % {chunks}) * {cb} // {chunks}
        xs = T.decl_buffer(({nblk * k * nr},), "float32", scope="global")
        for b in {blocks}:
            q0: T.let = T.min(b * {nr}, {qmax - nr})
            for ci in T.serial({cin}):{stage}
        for c in T.serial((t // {chunks}) * {mt} // {groups}, (t // {chunks} + 1) * {mt} // {groups}):
            for b in {blocks}:
                q0: T.let = T.min(b * {nr}, {qmax - nr})
                acc = T.decl_buffer(({MR}, {nr}), "float32", scope="global")
                for r in T.unroll({MR}):
                    for v in T.vectorized({nr}):
                        acc[r, v] = bias[c * {MR} + r]
                for kk in T.serial({k}):
                    for r in T.unroll({MR}):
                        for v in T.vectorized({nr}):
                            acc[r, v] = acc[r, v] + wp[c, kk, r] * xs[((b - b0) * {k} + kk) * {nr} + v]{store}
"""


NR_TOK = 16  # output channels per tile of the pixel-row conv: two 8-lane vectors


def tok_tiling(cout: int, rows: int, h: int, wd: int, kh: int, kw: int, stride: int | tuple[int, int], padding,
               steps: int, row: str, nr: int = NR_TOK, dilation: int = 1) -> tuple:
    """The pixel-row convs' geometry and task layout (float `tok_conv_source`, int8 `int8.qconv_tok_source`):
    (Hp, Wp, OH, OW, P, pixels per tile, channel panels, pixel tiles, the panel and tile of task t, and the padded
    map's element of pixel p0 + r at tap (i, j) of `row`, one of `rows` rows of Hp x Wp; the taps `dilation`
    apart; `stride` an int or (along H, along W)). Tasks are panel-major, or tile-major where the padded map (rows
    x Hp x Wp elements) outweighs the weights (`steps` x `nr` per panel): 64x64 at 56x56 1.24 -> 0.88x the staged
    kernel's time."""
    pt, pb, pl, pr = (int(q) for q in padding)
    hp, wp_ = h + pt + pb, wd + pl + pr
    d = dilation
    sh, sw = (stride, stride) if isinstance(stride, int) else (int(stride[0]), int(stride[1]))
    oh, ow = (hp - d * (kh - 1) - 1) // sh + 1, (wp_ - d * (kw - 1) - 1) // sw + 1
    p = oh * ow
    mr = min(MR, p)
    nt, pt_ = -(-cout // nr), -(-p // mr)
    if nt * steps * nr < rows * hp * wp_:
        panel, tile = f"(t % {nt})", f"(t // {nt})"
    else:
        panel, tile = f"(t // {pt_})", f"(t % {pt_})"
    i, j = ("i", "j") if d == 1 else (f"i * {d}", f"j * {d}")
    at = f"{row} * {hp * wp_} + ((p0 + r) // {ow} * {sh} + {i}) * {wp_} + (p0 + r) % {ow} * {sw} + {j}"
    return hp, wp_, oh, ow, p, mr, nt, pt_, panel, tile, at


def tok_channels(cout: int, lanes: int) -> int:
    """Output channels per tile of the float pixel-row conv: 16 (one 16-float vector, or two 8-lane ones), and with
    16-lane vectors two of them where Cout is a multiple of 32: 6 x 32 = 12 accumulators, which a full-width
    AVX-512 core needs to keep its two FMA ports busy. Alone against 16 (Emerald Rapids, 2 threads): ResNet-18's
    3x3 layers 0.65-0.84x (256x256 at 14x14 1529 -> 1000 us), 16x16 at 32x32 (padded to 32 channels) 1.47x."""
    return 2 * lanes if lanes >= 16 and cout % (2 * lanes) == 0 else NR_TOK


def channel_store(value: str, co: str, at: str, cout: int, nr: int, out_hw: tuple[int, int], res: bool,
                  clamp: tuple[float, float] | None, indent: int) -> tuple[str, str]:
    """The per-output store of the kernels whose vectors hold `nr` output channels (the pixel-row conv, Winograd):
    out[co, at] = value (+ res[co, at]) clamped, behind `co < Cout` where Cout is not a multiple of nr (the
    guarded store on a line of its own, `indent` spaces in), and the residual's parameter declaration (or "")."""
    val = _clamped(value + (f" + res[{co}, {at}]" if res else ""), clamp)
    store = f"out[{co}, {at}] = {val}"
    if cout % nr:
        store = f"if {co} < {cout}:\n{' ' * indent}{store}"
    return store, (f'res: T.Buffer(({cout}, {out_hw[0]}, {out_hw[1]}), "float32"), ' if res else "")


def tok_conv_source(cout: int, cin: int, h: int, wd: int, kh: int, kw: int, stride: int, padding,
                    clamp: tuple[float, float] | None, res: bool = False, nr: int = NR_TOK, dilation: int = 1) -> str:
    """A dense kxk conv with the flat kernels' orientation turned over (the rule: `conv_kxk_knobs`): output pixels
    are the rows of a 6 x 16 register tile (each input value broadcast, as a token's activation is in the packed
    linear GEMM) and `nr` (16 or 32: `tok_channels`) output channels its columns (vector loads of the packed weight
    [Cout / nr, Cin * kh * kw, nr] per step), so a tile holds 6 real pixels wherever they lie: the flat kernels' 16
    consecutive flat pixels include the padded planes' extra columns and, on a 5x5 map, only 25 of their 48 lanes
    are outputs. The input is the zero-padded map (`pad_phases_source` at stride 1, whatever the conv's stride),
    read in place.
    Tasks are panel-major (a panel's weights stay in L2 across the pixel tiles) or, where the padded input is the
    larger operand, tile-major; the last pixel tile overlaps the one before it (its outputs are written twice,
    with the same values). The store is per output (a tile's 96 outputs lie in 16 channel rows), with bias, the
    residual and the clamp. A dilated conv (DeepLab's atrous ones) reads its taps `dilation` apart in the same map:
    a broadcast per tap wherever it lies."""
    k = cin * kh * kw
    hp, wp_, oh, ow, p, mr, nt, pt_, panel, tile, at = tok_tiling(cout, cin, h, wd, kh, kw, stride, padding, k, "ci",
                                                                  nr, dilation)
    pix = "(p0 + r)"
    store, res_arg = channel_store("acc[r, v]", f"{panel} * {nr} + v", f"{pix} // {ow}, {pix} % {ow}", cout, nr,
                                   (oh, ow), res, clamp, 20)
    return f"""
@T.prim_func(private=True)
def conv_tok(xp: T.Buffer(({cin * hp * wp_},), "float32"), wp: T.Buffer(({nt}, {k}, {nr}), "float32"),
             bias: T.Buffer(({nt * nr},), "float32"), {res_arg}out: T.Buffer(({cout}, {oh}, {ow}), "float32")):
    T.func_attr({{"tirx.noalias": True, "tirx.is_scheduled": True, "op_pattern": 8}})
    for t in T.parallel({nt * pt_}):
        p0: T.let = T.min({tile} * {mr}, {p - mr})
        acc = T.decl_buffer(({mr}, {nr}), "float32", scope="global")
        for r in T.unroll({mr}):
            for v in T.vectorized({nr}):
                acc[r, v] = bias[{panel} * {nr} + v]
        for ci in T.serial({cin}):
            for i in T.unroll({kh}):
                for j in T.unroll({kw}):
                    for r in T.unroll({mr}):
                        for v in T.vectorized({nr}):
                            acc[r, v] = acc[r, v] + xp[{at}] * wp[{panel}, (ci * {kh} + i) * {kw} + j, v]
        for r in T.unroll({mr}):
            for v in T.serial({nr}):
                {store}
"""


def tok_conv_applies(w_shape, stride: int) -> bool:
    """Dense kxk convs (not 1x1) at stride 1 or 2 (against im2col + the packed GEMM at stride 2, alone: 0.94x on
    256x128 at 28x28 and 512x256 at 14x14, 0.52x on 64x32 at 16x16)."""
    return tuple(int(d) for d in w_shape[2:]) != (1, 1) and stride in (1, 2)


def pack_taps(w: np.ndarray, panel: int = MR) -> np.ndarray:
    """W [Cout, Cin, kh, kw] -> [ceil(Cout / panel), Cin * kh * kw, panel] (input channel, then tap: the kernels'
    reduction order), zero rows padding Cout to whole panels: MR-row panels for the flat convs, NR_TOK-channel ones
    for the pixel-row conv."""
    cout, cin, kh, kw = w.shape
    mt = -(-cout // panel)
    wp = np.zeros((mt * panel, cin, kh, kw), np.float32)
    wp[:cout] = w
    return np.ascontiguousarray(wp.reshape(mt, panel, cin, kh, kw).transpose(0, 2, 3, 4, 1)
                                .reshape(mt, kh * kw * cin, panel))


def _flat_tiles(h: int, wd: int, kh: int, kw: int, stride: int, padding) -> int:
    """16-pixel tiles over the flat conv's output range; with at most 16 the flat kernel runs panel-major."""
    oh, ow, _, wq = flat_geometry(h, wd, kh, kw, stride, padding)
    return -(-((oh - 1) * wq + ow) // NR_FLAT)


def conv_kxk_knobs(h: int, wd: int, kh: int, kw: int, stride: int, padding, tok: bool = True,
                   winograd: bool = False, winograd_rule: bool = False,
                   grouped_cout: tuple[int, int] | None = None) -> tuple[dict, list[dict]]:
    """The rule's kernel for a dense kxk conv, and the candidates tuning may measure (`knobs.py`): `kernel` = tok
    (`tok_conv_source`: output pixels broadcast, output channels in the vectors), staged (`staged_conv_source`)
    or flat (`flat_conv_source`, the taps read from the phase planes in place); the last two only where the flat
    output range holds a whole 16-pixel tile, and tok only where `tok` (stride 1 or 2).
    The rule is tok. Against the staged / flat rule before it (alone, interleaved, 2 threads, Zen 4; conv + ReLU,
    stride 1): 0.64x on 512x256 at 5x5 and 64x64 at 4x4, 0.81-0.84x on 256x256 / 512x512 at 7x7, 256x128 at
    10x10, 32x32 at 16x16, 0.75-0.93x on the rest from 16 channels at 64x64 to 64x64 at 56x56 (the last after
    tile-major task order for maps whose input outweighs the weights); inside ResNet-18 0.87x, a CIFAR ResNet-20
    0.84x, a small UNet 0.85x, TinyYOLO 0.90x, outputs equal to float rounding. Before that rule, staged on maps
    of more than 16 tiles and flat on smaller ones, measured inside ResNet-18 (`knobs.measure_in_model`, per-layer
    times paired by round, 2 threads), staged / flat time: 64->64 at 56x56 0.89-0.91, 128->128 at 28x28
    0.85-1.02, 64->128 stride 2 at 56x56 0.85; 256->256 at 14x14 (14 tiles) 0.92-1.03, 512->512 at 7x7 (4 tiles)
    1.01-1.12.
    `winograd`: the conv may run as Winograd F(2x2, 3x3) (`winograd.winograd_source`, a candidate then), and
    `winograd_rule`: the rule takes it (`winograd.winograd_wins`).
    `grouped_cout` (output channels per group, vector lanes): a grouped conv, its groups the samples of one call,
    each with its own weights. The rule is tok where a group's channels fill whole tiles (`tok_channels`), else
    flat. Alone, interleaved, 2 threads, Zen 3 (tok / staged / flat, ms): 16 channels a group, 4 groups at 28x28
    0.140 / 0.189 / 0.160, 32 a group in 8 at 14x14 0.177 / 0.246 / 0.248, 48 in 4 at 14x14 0.218 / 0.228 /
    0.228; 4 a group (ResNeXt) in 32 at 56x56 0.866 / 0.361 / 0.299 and at 28x28 0.228 / 0.173 / 0.125, 8 in 8
    at 28x28 0.157 / 0.157 / 0.133, 24 in 4 at 28x28 0.308 / 0.254 / 0.223 (staged had been the rule on maps of
    more than 16 tiles, tok not a candidate). One-row maps (grouped conv1d: wav2vec's positional conv) keep that
    rule: 128 channels in 4 groups, 3 taps over 2000 steps 1.51 / 0.42 / 0.44 ms, 256 in 4 with 16 taps over 1599
    5.00 / 4.71 / 5.16 (512 in 16 over 800: 2.62 / 2.89 / 2.87)."""
    oh, ow, _, wq = flat_geometry(h, wd, kh, kw, stride, padding)
    cands = [{"kernel": "tok"}] if tok else []
    if (oh - 1) * wq + ow >= NR_FLAT:
        cands += [{"kernel": "staged"}, {"kernel": "flat"}]
    if winograd:
        cands.append({"kernel": "winograd"})
    rule = "staged" if _flat_tiles(h, wd, kh, kw, stride, padding) > 16 else "flat"
    if grouped_cout is None:
        rule = "tok" if tok else rule
    elif h > 1:
        cout, lanes = grouped_cout
        rule = "tok" if tok and cout % tok_channels(cout, lanes) == 0 else "flat"
    return {"kernel": "winograd" if winograd and winograd_rule else rule}, cands


def _packed_taps(w: np.ndarray, bias: np.ndarray | None, panel: int, own: bool) -> tuple[np.ndarray, np.ndarray]:
    """`pack_taps` of w and its bias zero-padded to whole panels; `own`: w [N, Cout, ...] and bias [N, Cout], one
    packed weight and bias per sample, stacked (a grouped conv's groups), else w [Cout, ...] (or one sample's)."""
    ws = w if w.ndim == 5 else w[None]
    cout = ws.shape[1]
    b = np.zeros((len(ws), -(-cout // panel) * panel), np.float32)
    if bias is not None:
        b[:, :cout] = bias.reshape(len(ws), cout)
    wp = np.stack([pack_taps(wi, panel) for wi in ws])
    return (wp, b) if own else (wp[0], b[0])


def _taps_args(bb, w, bias, panel: int, own: bool, weights):
    """The packed weight and bias arguments of a flat / pixel-row conv call: constants (`_packed_taps`), or Relax
    values packing `weights` at run time (`_runtime_packed_taps`)."""
    from tvm import relax
    if weights is not None:
        return _runtime_packed_taps(bb, weights, w.shape[-4:], panel, int(w.shape[0]) if own else 0)
    wp, b = _packed_taps(w, bias, panel, own)
    return relax.const(wp), relax.const(b)


def _runtime_packed_taps(bb, weights, w_shape, panel: int, own: int):
    """`_packed_taps` of a weight the graph computes, as Relax ops run with the model: weights = (w, bias or None),
    w [Cout, Cin, kh, kw] = `w_shape` ([own, Cout, ...] with `own` samples of their own weights). Returns (packed w,
    bias)."""
    from tvm import relax

    w, bias = weights
    lead = (own,) if own else ()
    cout, cin, kh, kw = (int(d) for d in w_shape)
    mt = -(-cout // panel)
    pad = [0, 0] * len(lead) + [0, mt * panel - cout] + [0, 0] * 3
    if mt * panel != cout:
        w = bb.emit(relax.op.nn.pad(w, pad))
    w = bb.emit(relax.op.reshape(w, (*lead, mt, panel, cin, kh, kw)))
    w = bb.emit(relax.op.permute_dims(w, [*range(len(lead)), *(len(lead) + a for a in (0, 2, 3, 4, 1))]))
    w = bb.emit(relax.op.reshape(w, (*lead, mt, cin * kh * kw, panel)))
    if bias is None:
        return w, relax.const(np.zeros((*lead, mt * panel), np.float32))
    b = bb.emit(relax.op.reshape(bias, (*lead, cout)))
    if mt * panel != cout:
        b = bb.emit(relax.op.nn.pad(b, [0, 0] * len(lead) + [0, mt * panel - cout]))
    return w, b


def emit_flat_conv(bb, x, w: np.ndarray, bias: np.ndarray | None, x_shape, stride: int | tuple[int, int], padding,
                   clamp: tuple[float, float] | None, residual=None, masked: bool = False, stem: bool = False,
                   per_sample: bool = False, lanes: int = 8, registers: int = 16, cores: int = 1,
                   dilation: int = 1, weights=None):
    """A dense kxk conv of x [N, Cin, H, W] (per sample): the zero-padded map, then the pixel-row conv, or the phase
    planes and the staged or in-place flat implicit GEMM (`conv_kxk_knobs`), with bias / residual add / clamp in
    its store (the flat ones' vector and masked stores with `masked`: the CPU has AVX). A `stem` (few input
    channels, long reduction) takes the pixel-row conv where its output channels fill whole 16-channel tiles, else
    the staged kernel (`stem_takes_tok`).
    `per_sample`: w is [N, Cout, Cin, kh, kw] and bias [N, Cout], sample n convolved with its own weights (the
    groups of a grouped conv as the samples of one call). `lanes`: the target's vector lanes (`tok_channels`);
    `registers`: its vector registers (Winograd's tile, `winograd.winograd_geometry`), `cores` its cores.
    `dilation` > 1: the pixel-row conv, its taps that far apart in the padded map; so is a `stride` given as
    (along H, along W) (CRNN's (2, 1)).
    `weights`: (w, bias or None) as Relax values, a weight the graph computes (`w` then gives only its shape),
    packed at run time (`_runtime_packed_taps`); no Winograd, whose transform of the weight is made here."""
    from tvm import relax

    from graphopt.targets.tvm.cpu import winograd as wg

    n, cin, h, wd = (int(d) for d in x_shape)
    cout, _, kh, kw = (int(d) for d in w.shape[-4:])
    oh, ow = tok_tiling(cout, cin, h, wd, kh, kw, stride, padding, 1, "ci", dilation=dilation)[2:4]
    pads = "".join(str(int(q)) for q in padding)
    uneven = not isinstance(stride, int)
    st = "x".join(str(int(v)) for v in stride) if uneven else stride
    geo = f"{cin}x{h}x{wd}_k{kh}x{kw}s{st}" + (f"d{dilation}" if dilation > 1 else "") + f"_p{pads}"
    tag = (f"{cout}x{geo}" + ("" if residual is None else "_res") + ("" if clamp is None else "_clamp") + _ntag(n)
           + ("_own_weights" if per_sample else ""))
    site = None
    if dilation > 1 or uneven:
        kernel = "tok"
    elif stem and not stem_takes_tok(w.shape, stride):
        kernel = "staged"
    else:
        wino = weights is None and wg.winograd_applies(w.shape[-4:], stride, x_shape, padding, registers)
        rule, cands = conv_kxk_knobs(h, wd, kh, kw, stride, padding,
                                     tok=tok_conv_applies(w.shape, stride), winograd=wino,
                                     winograd_rule=wino and wg.winograd_wins(cout, cin, 4 * n * cin * h * wd),
                                     grouped_cout=(cout, lanes) if per_sample else None)
        site = Site("conv_kxk", tag, rule, cands, n * cout * cin * kh * kw * oh * ow)
        kernel = pick(site)["kernel"]
    extra = [] if residual is None else [bb.emit(relax.op.reshape(residual, _batched(n, cout, oh, ow)))]
    if kernel == "winograd" and masked:  # reads the map itself, its edges by masked loads
        xp = bb.emit(relax.op.reshape(x, _batched(n, cin * h * wd)))
    else:
        ps = 1 if kernel in ("tok", "winograd") else stride  # those read the padded map itself, not its phases
        # Winograd's 4x4 reads may need zeros past the conv's own padding (`winograd_geometry`)
        xpad = wg.winograd_geometry(h, wd, padding, registers)["pad"] if kernel == "winograd" else padding
        _, _, hq, wq = flat_geometry(h, wd, kh, kw, ps, xpad)
        pgeo = f"{cin}x{h}x{wd}_k{kh}x{kw}s{ps}_p{''.join(str(int(q)) for q in xpad)}"
        gv = bb.add_func(parse_kernel(batch_source(pad_phases_source(cin, h, wd, kh, kw, ps, xpad), n,
                                                   ["x", "xp"], per_sample)),
                         f"pad_phases_{pgeo}{_ntag(n)}" + ("_across" if per_sample else ""))
        xp = bb.emit(relax.call_tir(gv, [bb.emit(relax.op.reshape(x, _batched(n, cin, h, wd))),
                                         relax.const(np.zeros(1, np.float32))],
                                    relax.TensorType(_batched(n, cin * ps * ps * hq * wq), "float32")))
    if kernel == "winograd":
        # per_sample (a grouped conv's groups as the samples, each its own U and bias): each thread runs its
        # samples' blocks in turn (`batch_source`'s across), so no panel groups
        own = per_sample and n > 1
        src = batch_source(wg.winograd_source(cout, cin, h, wd, padding, clamp, residual is not None, registers,
                                              1 if per_sample else cores, masked), n,
                           ["xp", "out"] + ([] if residual is None else ["res"]) + (["u", "bias"] if own else []),
                           per_sample)
        gv = bb.add_func(parse_kernel(src), f"conv_winograd_{tag}")
        bind(site, gv.name_hint)
        ws = w if w.ndim == 5 else w[None]
        u = np.stack([wg.pack_winograd(wi) for wi in ws])
        b = np.zeros((len(ws), -(-cout // wg.PANEL) * wg.PANEL), np.float32)
        if bias is not None:
            b[:, :cout] = bias.reshape(len(ws), cout)
        y = bb.emit(relax.call_tir(gv, [xp, relax.const(u if own else u[0]), relax.const(b if own else b[0]),
                                        *extra], relax.TensorType(_batched(n, cout, oh, ow), "float32")))
        return bb.emit(relax.op.reshape(y, (n, cout, oh, ow)))
    if kernel == "tok":
        names = ["xp", "out"] + ([] if residual is None else ["res"]) + (["wp", "bias"] if per_sample else [])
        nr = tok_channels(cout, lanes)
        src = batch_source(tok_conv_source(cout, cin, h, wd, kh, kw, stride, padding, clamp,
                                           res=residual is not None, nr=nr, dilation=dilation), n, names, per_sample)
        gv = bb.add_func(parse_kernel(src), f"conv_tok_{tag}")
        if site is not None:
            bind(site, gv.name_hint)
        wp, b = _taps_args(bb, w, bias, nr, per_sample and n > 1, weights)
        y = bb.emit(relax.call_tir(gv, [xp, wp, b, *extra],
                                   relax.TensorType(_batched(n, cout, oh, ow), "float32")))
        return bb.emit(relax.op.reshape(y, (n, cout, oh, ow)))
    source = staged_conv_source if kernel == "staged" else flat_conv_source
    names = ["xp", "out"] + ([] if residual is None else ["res"]) + (["wp", "bias"] if per_sample else [])
    src = batch_source(source(cout, cin, h, wd, kh, kw, stride, padding, clamp, masked=masked,
                              res=residual is not None), n, names, per_sample)
    gv = bb.add_func(parse_kernel(src), f"conv_{kernel}_{tag}")
    if site is not None:
        bind(site, gv.name_hint)
    wp, b = _taps_args(bb, w, bias, MR, per_sample and n > 1, weights)
    y = bb.emit(relax.call_tir(gv, [xp, wp, b, *extra],
                               relax.TensorType(_batched(n, cout, oh, ow), "float32")))
    return bb.emit(relax.op.reshape(y, (n, cout, oh, ow)))


def emit_im2col_conv(bb, x, w: np.ndarray, bias: np.ndarray | None, x_shape, stride, padding, lanes: int,
                     clamp: tuple[float, float] | None, residual=None, dilation: int = 1, per_sample: bool = False):
    """A dense k x k conv of x [N, Cin, H, W] as im2col (per sample) then the packed pointwise GEMM over the
    [Cin * kh * kw, OH * OW] columns, bias / residual add / clamp fused into its store as for 1x1 convs.
    `per_sample`: w [N, Cout, Cin, kh, kw] and bias [N, Cout], each sample with its own (`_conv1x1_call`)."""
    from tvm import relax

    n, cin = (int(d) for d in x_shape[:2])
    cout, _, kh, kw = (int(d) for d in w.shape[-4:])
    col, oh, ow = emit_im2col(bb, x, x_shape, kh, kw, stride, padding, np.float32(0), dilation=dilation,
                              across=per_sample)
    w2 = w.reshape(n, cout, cin * kh * kw) if per_sample else w.reshape(cout, cin * kh * kw)
    y = _conv1x1_call(bb, col, w2, bias, n, cin * kh * kw, oh * ow, lanes, clamp, residual, per_sample)
    return bb.emit(relax.op.reshape(y, (n, cout, oh, ow)))


def emit_im2col(bb, x, x_shape, kh: int, kw: int, stride, padding, fill: np.generic, tap_major: bool = False,
                dilation: int = 1, across: bool = False):
    """The [N, Cin * kh * kw, OH * OW] columns of x [N, Cin, H, W] (per sample; the activation goes in as it is,
    see im2col_source), `fill` (a numpy scalar of x's dtype) outside the image, taps `dilation` apart, `stride` an
    int or (along H, along W); returns (columns, OH, OW)."""
    from tvm import relax

    n, cin, h, wd = (int(d) for d in x_shape)
    pt, pb, pl, pr = (int(q) for q in padding)
    d = dilation
    sh, sw = (int(stride[0]), int(stride[1])) if isinstance(stride, (tuple, list)) else (stride, stride)
    oh = (h + pt + pb - d * (kh - 1) - 1) // sh + 1
    ow = (wd + pl + pr - d * (kw - 1) - 1) // sw + 1
    dtype = np.dtype(type(fill)).name
    src = batch_source(im2col_source(cin, h, wd, oh, ow, kh, kw, sw, pt, pl, batch_dim=n == 1, dtype=dtype,
                                     tap_major=tap_major, dilation=d, row_stride=sh), n, ["x", "col"], across)
    name = (f"im2col_{cin}x{h}x{wd}_k{kh}s{sh if sh == sw else f'{sh}x{sw}'}_p{pt}{pb}{pl}{pr}"
            + ("" if d == 1 else f"d{d}")
            + ("" if dtype == "float32" else f"_{dtype}") + ("_tm" if tap_major else "")
            + ("_across" if across else ""))
    gv = bb.add_func(parse_kernel(src), name + _ntag(n))
    col = bb.emit(relax.call_tir(gv, [x, relax.const(np.full(1, fill, dtype))],
                                 relax.TensorType(_batched(n, cin * kh * kw, oh * ow), dtype)))
    return col, oh, ow


def unpooling_applies(x_shape, w_shape, stride, padding, dilation, transposed, output_padding, groups) -> bool:
    """Transposed convs (2-D or 3-D) whose kernel equals their stride (UNet/decoder upsampling: no overlap between
    the output blocks of neighbouring inputs), no padding, one group."""
    return (bool(transposed) and len(x_shape) in (4, 5) and len(w_shape) == len(x_shape) and int(groups) == 1
            and tuple(int(s) for s in stride) == tuple(int(k) for k in w_shape[2:])
            and all(int(p) == 0 for p in padding) and all(int(p) == 0 for p in output_padding)
            and all(int(d) == 1 for d in dilation))


def emit_unpooling_conv(bb, x, w: np.ndarray, bias: np.ndarray | None, x_shape, lanes: int):
    """A stride == kernel transposed conv of x [N, Cin, *S] (2-D or 3-D), weight [Cin, Cout, *k]: each input
    pixel's output block is one column of the packed pointwise GEMM with the weight as [(Cout, *k), Cin], then the
    blocks are laid out (a pixel shuffle). TVM's generic conv2d_transpose took 1.6 ms for 2.1 M MACs in a UNet; a
    3-D UNet's 2x2x2 up-convolution (32 -> 16 channels, 16x32x32 -> 32x64x64) took 108 ms as Relax's
    conv3d_transpose."""
    from tvm import relax

    n, cin, *sizes = (int(d) for d in x_shape)
    cout, ks = int(w.shape[1]), [int(k) for k in w.shape[2:]]
    nd, blk = len(ks), math.prod(ks)
    rows = np.ascontiguousarray(np.moveaxis(w, 0, -1).reshape(cout * blk, cin))
    b = None if bias is None else np.repeat(np.asarray(bias, np.float32), blk)
    flat = (n, cin, math.prod(sizes[:-1]), sizes[-1])  # (a volume's depth and rows as one axis of rows)
    y = emit_conv1x1(bb, bb.emit(relax.op.reshape(x, flat)) if nd == 3 else x, rows, b, flat, lanes, None)
    y = bb.emit(relax.op.reshape(y, (n, cout, *ks, *sizes)))  # [N, Cout, *k, *S] -> [N, Cout, S0, k0, S1, k1, ..]
    y = bb.emit(relax.op.permute_dims(y, [0, 1] + [a for i in range(nd) for a in (2 + nd + i, 2 + i)]))
    return bb.emit(relax.op.reshape(y, (n, cout, *(s * k for s, k in zip(sizes, ks)))))


def col2im_source(planes: int, kh: int, kw: int, gh: int, gw: int, oh: int, ow: int, stride, padding, dilation,
                  channels: int, clamp: tuple[float, float] | None) -> str:
    """TVMScript of F.fold (aten.col2im) on `planes` (N C) planes: cols [N C, kh, kw, GH, GW] (tap (t, u) of grid
    point (i, j)) adds into out [N C, OH, OW] at (i s_h - p_h + t d_h, j s_w - p_w + u d_w). Each plane is set to
    its bias (b [C]: plane p's is b[p % C]; zeros for none, and a second input Relax's reshape detection needs, as
    `depth_taps_source`'s fill), then each tap's grid points add in: for a tap the rows i it lands inside the
    output are a range (computed, no test per point), so the loops are branch-free. Then the clamp (a fused
    ReLU). One plane per task: its adds stay in L1."""
    (sh, sw), (ph, pw), (dh, dw) = stride, padding, dilation
    # along one axis, the grid points a tap t lands inside the output at: [lo, hi)
    lo = lambda s, p, d, t: f"T.max(0, ({p} - {t} * {d} + {s - 1}) // {s})"  # noqa: E731
    hi = lambda g, o, s, p, d, t: f"T.min({g}, ({o - 1 + p} - {t} * {d}) // {s} + 1)"  # noqa: E731
    clamped = ""
    if clamp is not None:
        low, high = (f"T.float32({float(v)!r})" for v in clamp)
        clamped = f"""
        for y, x in T.grid({oh}, {ow}):
            out[p, y, x] = T.max({low}, T.min({high}, out[p, y, x]))"""
    return f"""
@T.prim_func(private=True)
def col2im(cols: T.Buffer(({planes}, {kh}, {kw}, {gh}, {gw}), "float32"), b: T.Buffer(({channels},), "float32"),
           out: T.Buffer(({planes}, {oh}, {ow}), "float32")):
    T.func_attr({{"tirx.noalias": True, "tirx.is_scheduled": True, "op_pattern": 8}})
    for p in T.parallel({planes}):
        for y, x in T.grid({oh}, {ow}):
            out[p, y, x] = b[p % {channels}]
        for t, u in T.grid({kh}, {kw}):
            i0: T.let = {lo(sh, ph, dh, "t")}
            j0: T.let = {lo(sw, pw, dw, "u")}
            for i in T.serial(T.max(0, {hi(gh, oh, sh, ph, dh, "t")} - i0)):
                for j in T.serial(T.max(0, {hi(gw, ow, sw, pw, dw, "u")} - j0)):
                    out[p, (i0 + i) * {sh} - {ph} + t * {dh}, (j0 + j) * {sw} - {pw} + u * {dw}] = (
                        out[p, (i0 + i) * {sh} - {ph} + t * {dh}, (j0 + j) * {sw} - {pw} + u * {dw}]
                        + cols[p, t, u, i0 + i, j0 + j]){clamped}
"""


def emit_col2im(bb, cols, n: int, c: int, kernel, grid, out_hw, stride, padding, dilation,
                bias: np.ndarray | None = None, clamp: tuple[float, float] | None = None):
    """out [N, C, OH, OW] from cols [N, C kh kw, GH GW] (any shape of those elements, in that order) as F.fold
    (`col2im_source`), bias [C] and a clamp fused."""
    from tvm import relax

    (kh, kw), (gh, gw), (oh, ow) = kernel, grid, out_hw
    (sh, sw), (ph, pw), (dh, dw) = ((int(a), int(b)) for a, b in (stride, padding, dilation))
    src = col2im_source(n * c, kh, kw, gh, gw, oh, ow, (sh, sw), (ph, pw), (dh, dw), c, clamp)
    name = (f"col2im_{c}x{gh}x{gw}_to{oh}x{ow}_k{kh}x{kw}s{sh}x{sw}p{ph}x{pw}"  # (the output size: output padding)
            + ("" if (dh, dw) == (1, 1) else f"d{dh}x{dw}") + ("" if clamp is None else "_clamp") + _ntag(n))
    gv = bb.add_func(parse_kernel(src), name)
    b = np.zeros(c, np.float32) if bias is None else np.ascontiguousarray(bias, np.float32)
    y = bb.emit(relax.call_tir(gv, [bb.emit(relax.op.reshape(cols, (n * c, kh, kw, gh, gw))), relax.const(b)],
                               relax.TensorType((n * c, oh, ow), "float32")))
    return bb.emit(relax.op.reshape(y, (n, c, oh, ow)))


def depth_taps_source(n: int, c: int, d: int, hw: int, kd: int, sd: int, pd: int, od: int,
                      dtype: str = "float32") -> str:
    """TVMScript of y[n, o, c, t, :] = x[n, c, o sd + t - pd, :] (fill[0] outside the depth): a 3-D conv's input
    with each output depth's kd input slices side by side as channels, one contiguous H W copy per (n, o, c, t).
    TVM's fused pad + slices + concat + transpose took 400 us for 3 x 75K floats. `fill` [1] holds the pad value
    (0, or an int8 input's zero point; a second input, as im2col has: Relax's reshape detection asserted on a
    one-input, one-output kernel). `dtype`: the values' (float32, or int8 for the int8 3-D conv)."""
    return f"""
@T.prim_func(private=True)
def depth_taps(x: T.Buffer(({n}, {c}, {d}, {hw}), "{dtype}"), fill: T.Buffer((1,), "{dtype}"),
               y: T.Buffer(({n}, {od}, {c}, {kd}, {hw}), "{dtype}")):
    T.func_attr({{"tirx.noalias": True, "tirx.is_scheduled": True, "op_pattern": 8}})
    for r in T.parallel({n * od * c * kd}):
        b: T.let = r // {od * c * kd}
        o: T.let = r // {c * kd} % {od}
        ci: T.let = r // {kd} % {c}
        t: T.let = r % {kd}
        z: T.let = o * {sd} + t - {pd}
        if z < 0 or z >= {d}:
            for i in T.serial({hw}):
                y[b, o, ci, t, i] = fill[0]
        else:
            for i in T.serial({hw}):
                y[b, o, ci, t, i] = x[b, ci, z, i]
"""


def emit_depth_taps(bb, x, x_shape, kd: int, sd: int, pd: int, od: int, dtype: str = "float32", fill: float = 0.0):
    """[N * OD, C * kd, H, W] from a 3-D conv's input x [N, C, D, H, W] (`depth_taps_source`), `fill` outside the
    depth."""
    from tvm import relax

    n, c, d, h, w = (int(v) for v in x_shape)
    gv = bb.add_func(parse_kernel(depth_taps_source(n, c, d, h * w, kd, sd, pd, od, dtype)),
                     f"depth_taps_{n}x{c}x{d}x{h}x{w}_k{kd}s{sd}p{pd}{'' if dtype == 'float32' else '_' + dtype}")
    y = bb.emit(relax.call_tir(gv, [bb.emit(relax.op.reshape(x, (n, c, d, h * w))),
                                    relax.const(np.full(1, fill, dtype))],
                               relax.TensorType((n, od, c, kd, h * w), dtype)))
    return bb.emit(relax.op.reshape(y, (n * od, c * kd, h, w)))
