"""Bilinear resizing of NCHW float maps (segmentation heads, FPN / UNet decoders): one task per output row, which
blends its two input rows into a row buffer (vectors), then takes each output column from the buffer through
index and weight tables computed at compile time (a vector gather). TVM's resize2d recomputes the coordinates of
every output element in float and took 1.7x PyTorch's time (64x28x28 -> 56x56: 388 us against 223)."""
from __future__ import annotations

from graphopt.targets.tvm.cpu.parse import parse_kernel

import numpy as np

CHUNK = 16  # output columns a step: one 16-lane gather


def _source_index(out_size: int, in_size: int, align_corners: bool, scale: float | None):
    """PyTorch's source coordinates of the output rows (or columns), in float32 as it computes them: (first input
    index, second, weight of the second)."""
    dst = np.arange(out_size, dtype=np.float64)
    if align_corners:
        ratio = np.float32(in_size - 1) / np.float32(out_size - 1) if out_size > 1 else np.float32(0)
        src = (dst * np.float64(ratio)).astype(np.float32)
    else:  # (its compiler fuses (dst + 0.5) * ratio - 0.5 into one rounding: float64 here, then rounded once)
        ratio = np.float32(1.0 / scale) if scale else np.float32(in_size) / np.float32(out_size)
        src = np.maximum((dst + 0.5) * np.float64(ratio) - 0.5, 0).astype(np.float32)
    i0 = np.minimum(np.floor(src).astype(np.int32), in_size - 1)
    i1 = np.minimum(i0 + 1, in_size - 1)
    return i0, i1, (src - i0.astype(np.float32)).astype(np.float32)


def nearest_index(out_size: int, in_size: int, scale: float | None) -> np.ndarray:
    """PyTorch's source index of each output row (or column) in "nearest" mode: min(floor(dst * s), in - 1) in
    float32, s = 1 / scale_factor when one was given, else in / out (its `nearest_idx`, with its exact 2x case)."""
    dst = np.arange(out_size)
    if out_size == in_size:
        return dst.astype(np.int64)
    if out_size == 2 * in_size:
        return (dst >> 1).astype(np.int64)
    s = np.float32(1.0 / scale) if scale else np.float32(in_size) / np.float32(out_size)
    return np.minimum(np.floor(dst.astype(np.float32) * s).astype(np.int64), in_size - 1)


def emit_nearest_take(bb, x, x_shape, out_sizes, scales=None):
    """upsample_nearest{1,2,3}d of x [N, C, *spatial] (a Relax value, any dtype and device) as one take per spatial
    axis through PyTorch's index tables. TVM's converter computed other indices when the size was given and the
    factor was not whole (13 -> 25, 13x20 -> 7x9: values off by up to 3.7), and aten's 3-D decomposition did not
    import."""
    from tvm import relax

    nd = len(out_sizes)
    y = x
    for i, (o, n) in enumerate(zip(out_sizes, x_shape[-nd:])):
        s = None if not scales else float(scales[i])
        idx = relax.const(nearest_index(int(o), int(n), s))
        y = bb.emit(relax.op.take(y, idx, axis=len(x_shape) - nd + i, mode="clip"))
    return y


def bilinear_applies(x_shape, out_hw) -> bool:
    """4-D float maps whose output rows hold at least one 16-column gather."""
    return len(x_shape) == 4 and int(out_hw[1]) >= CHUNK


def bilinear_source(nc: int, h: int, w: int, oh: int, ow: int) -> str:
    """TVMScript of y[c, oy, :] from x [NC, H, W]: row = x[c, y0] + wy (x[c, y1] - x[c, y0]) over the input width,
    then y[ox] = row[x0] + wx (row[x1] - row[x0]) in 16-column steps, the last one overlapping the one before."""
    steps = -(-ow // CHUNK)
    col = f"T.min(j * {CHUNK}, {ow - CHUNK}) + k"
    return f"""
@T.prim_func(private=True)
def bilinear(x: T.Buffer(({nc}, {h}, {w}), "float32"), ty0: T.Buffer(({oh},), "int32"),
             ty1: T.Buffer(({oh},), "int32"), twy: T.Buffer(({oh},), "float32"),
             tx0: T.Buffer(({ow},), "int32"), tx1: T.Buffer(({ow},), "int32"), twx: T.Buffer(({ow},), "float32"),
             y: T.Buffer(({nc}, {oh}, {ow}), "float32")):
    T.func_attr({{"tirx.noalias": True, "tirx.is_scheduled": True, "op_pattern": 8}})
    for t in T.parallel({nc * oh}):
        c: T.let = t // {oh}
        oy: T.let = t % {oh}
        row = T.decl_buffer(({w},), "float32")
        for ix in T.serial({w}):
            row[ix] = x[c, ty0[oy], ix] + twy[oy] * (x[c, ty1[oy], ix] - x[c, ty0[oy], ix])
        for j in T.serial({steps}):
            for k in T.vectorized({CHUNK}):
                y[c, oy, {col}] = row[tx0[{col}]] + twx[{col}] * (row[tx1[{col}]] - row[tx0[{col}]])
"""


def _emit_planes(bb, x, x_shape, out_hw, align_corners: bool, scales, kind: str):
    """x [N, C, H, W] (a Relax value) resized to out_hw by `kind`'s row kernel ("bilinear" / "bicubic") over its
    N C planes, with its tables of PyTorch's source rows / columns and weights (`scales`: PyTorch's scale factors,
    which it uses in place of in / out when given)."""
    from tvm import relax

    n, c, h, w = (int(d) for d in x_shape)
    oh, ow = (int(d) for d in out_hw)
    sh, sw = (None, None) if not scales else (float(scales[0]), float(scales[1]))
    taps, source = (_source_index, bilinear_source) if kind == "bilinear" else (_cubic_taps, bicubic_source)
    tables = [*taps(oh, h, align_corners, sh), *taps(ow, w, align_corners, sw)]
    gv = bb.add_func(parse_kernel(source(n * c, h, w, oh, ow)),
                     f"{kind}_{n * c}x{h}x{w}_to_{oh}x{ow}")
    y = bb.emit(relax.call_tir(gv, [bb.emit(relax.op.reshape(x, (n * c, h, w))), *map(relax.const, tables)],
                               relax.TensorType((n * c, oh, ow), "float32")))
    return bb.emit(relax.op.reshape(y, (n, c, oh, ow)))


def emit_bilinear(bb, x, x_shape, out_hw, align_corners: bool, scales=None):
    """upsample_bilinear2d of x [N, C, H, W] (a Relax value) to out_hw, PyTorch's coordinates (`scales`: its
    scale_factors, which it uses in place of in / out when given)."""
    return _emit_planes(bb, x, x_shape, out_hw, align_corners, scales, "bilinear")


def nearest_applies(x_shape, out_hw) -> bool:
    """4-D maps scaled up by whole factors (FPN / YOLO necks' 2x)."""
    return (len(x_shape) == 4 and all(int(o) % int(i) == 0 and int(o) >= int(i)
                                      for o, i in zip(out_hw, x_shape[2:])))


def emit_nearest(bb, x, x_shape, out_hw):
    """upsample_nearest2d of x [N, C, H, W] by whole factors (sh, sw) as its own (opaque) kernel: each output row
    copies input row oy // sh, each input pixel sw times. As Relax's resize2d it fused with the SiLU before it and
    the concat after it (a YOLO neck) into one generic loop that recomputed the SiLU for every output pixel: 2.2
    ms for 128x20x20 -> 40x40 and a 192-channel concat."""
    from tvm import relax

    n, c, h, w = (int(d) for d in x_shape)
    oh, ow = (int(d) for d in out_hw)
    sh, sw = oh // h, ow // w
    src = f"""
@T.prim_func(private=True)
def nearest(x: T.Buffer(({n * c}, {h}, {w}), "float32"), fill: T.Buffer((1,), "float32"),
            y: T.Buffer(({n * c}, {oh}, {ow}), "float32")):
    T.func_attr({{"tirx.noalias": True, "tirx.is_scheduled": True, "op_pattern": 8}})
    for t in T.parallel({n * c * oh}):
        for ix in T.serial({w}):
            for a in T.unroll({sw}):
                y[t // {oh}, t % {oh}, ix * {sw} + a] = x[t // {oh}, t % {oh} // {sh}, ix] + fill[0]
"""
    gv = bb.add_func(parse_kernel(src), f"nearest_{n * c}x{h}x{w}_to_{oh}x{ow}")
    y = bb.emit(relax.call_tir(gv, [bb.emit(relax.op.reshape(x, (n * c, h, w))), relax.const(np.zeros(1, np.float32))],
                               relax.TensorType((n * c, oh, ow), "float32")))
    return bb.emit(relax.op.reshape(y, (n, c, oh, ow)))


def depth_lerp_source(nc: int, d: int, od: int, plane: int) -> str:
    """TVMScript of z[c, od, :] = y[c, d0] + wd (y[c, d1] - y[c, d0]) over planes of `plane` floats: the depth step
    of trilinear resizing (vectors over the plane, one task per output plane)."""
    return f"""
@T.prim_func(private=True)
def depth_lerp(y: T.Buffer(({nc}, {d}, {plane}), "float32"), td0: T.Buffer(({od},), "int32"),
               td1: T.Buffer(({od},), "int32"), twd: T.Buffer(({od},), "float32"),
               z: T.Buffer(({nc}, {od}, {plane}), "float32")):
    T.func_attr({{"tirx.noalias": True, "tirx.is_scheduled": True, "op_pattern": 8}})
    for t in T.parallel({nc * od}):
        c: T.let = t // {od}
        o: T.let = t % {od}
        for i in T.vectorized({plane}):
            z[c, o, i] = y[c, td0[o], i] + twd[o] * (y[c, td1[o], i] - y[c, td0[o], i])
"""


def emit_trilinear(bb, x, x_shape, out_dhw, align_corners: bool, scales=None):
    """upsample_trilinear3d of x [N, C, D, H, W] (a Relax value) to out_dhw with PyTorch's coordinates (`scales`
    its scale factors, used in place of in / out when given): the bilinear kernel over the N C D planes, then a
    lerp between the two source planes of each output depth. aten's decomposition failed TVM's build ("Cannot
    convert infinity to BigInt"). Needs bilinear_applies on the planes (output width >= 16)."""
    from tvm import relax

    n, c, d, h, w = (int(v) for v in x_shape)
    od, oh, ow = (int(v) for v in out_dhw)
    sd, sh, sw = (None, None, None) if not scales else (float(s) if s else None for s in scales)
    y = emit_bilinear(bb, bb.emit(relax.op.reshape(x, (n, c * d, h, w))), (n, c * d, h, w), (oh, ow),
                      align_corners, None if sh is None or sw is None else [sh, sw])
    if od == d and not align_corners and (sd is None or sd == 1.0):
        return bb.emit(relax.op.reshape(y, (n, c, od, oh, ow)))
    gv = bb.add_func(parse_kernel(depth_lerp_source(n * c, d, od, oh * ow)),
                     f"depth_lerp_{n * c}x{d}_to_{od}x{oh * ow}")
    z = bb.emit(relax.call_tir(gv, [bb.emit(relax.op.reshape(y, (n * c, d, oh * ow))),
                                    *map(relax.const, _source_index(od, d, align_corners, sd))],
                               relax.TensorType((n * c, od, oh * ow), "float32")))
    return bb.emit(relax.op.reshape(z, (n, c, od, oh, ow)))


def _cubic_taps(out_size: int, in_size: int, align_corners: bool, scale: float | None):
    """PyTorch's bicubic source taps of each output row (or column): (indices [out, 4], clamped into the input;
    weights [out, 4]) from its cubic convolution with A = -0.75 and its coordinates (not clamped at 0, unlike
    linear's), in float32."""
    a = np.float32(-0.75)
    dst = np.arange(out_size, dtype=np.float64)
    if align_corners:
        ratio = np.float32(in_size - 1) / np.float32(out_size - 1) if out_size > 1 else np.float32(0)
        src = (dst * np.float64(ratio)).astype(np.float32)
    else:
        ratio = np.float32(1.0 / scale) if scale else np.float32(in_size) / np.float32(out_size)
        src = ((dst + 0.5) * np.float64(ratio) - 0.5).astype(np.float32)
    i0 = np.floor(src).astype(np.int64)
    t = (src - i0.astype(np.float32)).astype(np.float32)

    def near(x):  # |x| <= 1
        return ((a + 2) * x - (a + 3)) * x * x + 1

    def far(x):  # 1 < |x| < 2
        return ((a * x - 5 * a) * x + 8 * a) * x - 4 * a
    w = np.stack([far(t + 1), near(t), near(1 - t), far(2 - t)], 1).astype(np.float32)
    idx = np.clip(i0[:, None] + np.arange(-1, 3)[None, :], 0, in_size - 1).astype(np.int32)
    return idx, w


def bicubic_source(nc: int, h: int, w: int, oh: int, ow: int) -> str:
    """TVMScript of y[c, oy, :] from x [NC, H, W]: row = sum of the output row's 4 input rows by their weights
    over the input width, then y[ox] = sum of row at the column's 4 taps by theirs, in 16-column steps (the last
    one overlapping the one before)."""
    steps = -(-ow // CHUNK)
    col = f"T.min(j * {CHUNK}, {ow - CHUNK}) + k"
    taps = " + ".join(f"twx[{col}, {q}] * row[tx[{col}, {q}]]" for q in range(4))
    rows = " + ".join(f"twy[oy, {q}] * x[c, ty[oy, {q}], ix]" for q in range(4))
    return f"""
@T.prim_func(private=True)
def bicubic(x: T.Buffer(({nc}, {h}, {w}), "float32"), ty: T.Buffer(({oh}, 4), "int32"),
            twy: T.Buffer(({oh}, 4), "float32"), tx: T.Buffer(({ow}, 4), "int32"),
            twx: T.Buffer(({ow}, 4), "float32"), y: T.Buffer(({nc}, {oh}, {ow}), "float32")):
    T.func_attr({{"tirx.noalias": True, "tirx.is_scheduled": True, "op_pattern": 8}})
    for t in T.parallel({nc * oh}):
        c: T.let = t // {oh}
        oy: T.let = t % {oh}
        row = T.decl_buffer(({w},), "float32")
        for ix in T.vectorized({w}):
            row[ix] = {rows}
        for j in T.serial({steps}):
            for k in T.vectorized({CHUNK}):
                y[c, oy, {col}] = {taps}
"""


def emit_bicubic(bb, x, x_shape, out_hw, align_corners: bool, scales=None):
    """upsample_bicubic2d of x [N, C, H, W] (a Relax value) to out_hw with PyTorch's taps and weights (`scales`: its
    scale factors). aten's decomposition (index gathers) took 2.7-3.2x PyTorch's time (64x28x28 ->
    56x56: 3.3 ms)."""
    return _emit_planes(bb, x, x_shape, out_hw, align_corners, scales, "bicubic")
