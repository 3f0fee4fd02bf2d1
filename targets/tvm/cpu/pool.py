"""Copy-like and pooling kernels for float maps: max and average pooling (separable, `max_pool_source`,
`avg_pool_source`), constant and edge pads, roll, flip, transposes, crops, concatenation and adaptive average
pooling, each a plain loop nest LLVM vectorizes where Relax's legalized op ran a generic per-element loop."""
from __future__ import annotations

import math

import numpy as np

from graphopt.targets.tvm.cpu.batch import batch_source
from graphopt.targets.tvm.cpu.conv import _batched, _ntag
from graphopt.targets.tvm.cpu.parse import parse_kernel


def max_pool_applies(x_shape, kernel, stride, padding, dilation) -> bool:
    """NCHW, 2-d kernel, stride and symmetric padding, no dilation (others keep TVM's op); floor or ceil mode."""
    return (len(x_shape) == 4 and len(kernel) == 2 and len(stride) == 2 and len(padding) == 2
            and all(int(d) == 1 for d in dilation)
            and all(2 * int(p) <= int(k) for p, k in zip(padding, kernel)))  # PyTorch's own limit on padding


def avg_pool_applies(x_shape, kernel, stride, padding, ceil_mode) -> bool:
    """NCHW, 2-d kernel and stride, symmetric padding at most half the kernel, floor mode."""
    return (len(x_shape) == 4 and len(kernel) == 2 and len(stride) == 2 and len(padding) == 2 and not ceil_mode
            and all(2 * int(p) <= int(k) for p, k in zip(padding, kernel)))


POOL_BAND = 16  # output rows one pooling task computes


def pool_geometry(h: int, w: int, kernel, stride, padding, ceil: bool = False) -> tuple:
    """((kh, kw), (sh, sw), (ph, pw), (OH, OW)) of a 2-D pool of an H x W map, as ints; `ceil`: PyTorch's
    ceil_mode (a last, partial window wherever it starts inside the image or its left / top padding)."""
    (kh, kw), (sh, sw), (ph, pw) = ((int(a), int(b)) for a, b in (kernel, stride, padding))

    def size(n: int, k: int, st: int, p: int) -> int:
        if not ceil:
            return (n + 2 * p - k) // st + 1
        o = -(-(n + 2 * p - k) // st) + 1
        return o - 1 if (o - 1) * st >= n + p else o
    return (kh, kw), (sh, sw), (ph, pw), (size(h, kh, sh, ph), size(w, kw, sw, pw))


def max_pool_source(c: int, h: int, w: int, kernel, stride, padding, depth: int = 1, ceil: bool = False) -> str:
    """TVMScript of max pooling, separably: one task per channel and band of POOL_BAND output rows; for each output
    row the maxima down the kernel's kh input rows go into a row buffer (whole rows, contiguous), then each output
    is the maximum of kw of those along the row: kh + kw comparisons an output instead of kh x kw, and the strided
    reads (stride 2) only on the output rows. A tap outside the image reads the nearest row or column inside it
    instead, which lies in the same window (every window holds one inside: PyTorch's padding is at most half the
    kernel), so the maximum is the same and no load is guarded; each loop is plain code LLVM vectorizes. A NaN in
    a window gives NaN, as in PyTorch (TVM's max keeps a NaN only when it is the second operand). `zero` [1] holds
    0, added to an index (a second input the body reads keeps Relax from taking the function for a reshape).
    `depth` > 1: a 3-D pool whose depth windows tile the depth (x holds c depth planes of each output plane in
    turn): the row maxima run down the kh rows of those planes too. `ceil`: PyTorch's ceil_mode, whose last window
    still starts inside the image, so its taps past the edge read the last row / column, inside it too."""
    (kh, kw), (sh, sw), (ph, pw), (oh, ow) = pool_geometry(h, w, kernel, stride, padding, ceil)
    lo = min(ow, -(-pw // sw))  # first output column whose taps are all inside
    hi = max(lo, min(ow, (w - kw + pw) // sw + 1))  # one past the last
    band = min(oh, POOL_BAND)
    nb = -(-oh // band)

    def maxima(srcs, pad: str) -> str:
        """Let-bindings of the running maximum of `srcs` (m0 .. m{k-1}), a NaN kept. The lets are substituted into
        one expression, so past 3 taps each step names the one before once (T.max(v, m) keeps m's NaN, the Select
        v's): with m named twice a step the expression doubled with each tap, and a 7 x 7 pool's build did not
        finish (5 x 5: 2.3 s, this way 0.4). Up to 3 taps the two-reference form stays: 5-8% faster (ResNet's 3x3
        stride-2 pool over 64x112x112: 73-76 against 77-81 us)."""
        lines = [f"m0: T.let = {srcs[0]}"]
        for k, src in enumerate(srcs[1:], 1):
            step = (f"T.Select(T.Or(T.isnan(v{k}), v{k} > m{k - 1}), v{k}, m{k - 1})" if len(srcs) <= 3 else
                    f"T.Select(T.isnan(v{k}), v{k}, T.max(v{k}, m{k - 1}))")
            lines += [f"v{k}: T.let = {src}", f"m{k}: T.let = {step}"]
        return "".join(f"\n{pad}{ln}" for ln in lines)

    def cols(a: int, b: int, inside: bool) -> str:
        if b <= a:
            return ""
        at = (lambda j: f"(ox + {a}) * {sw} + {j - pw}") if inside else (
            lambda j: f"T.max(T.min((ox + {a}) * {sw} + {j - pw}, {w - 1}), 0)")
        return f"""
                for ox in T.serial({b - a}):{maxima([f"vr[{at(j)}]" for j in range(kw)], " " * 20)}
                    out[ch, oy, ox + {a}] = m{kw - 1}"""
    rows = [f"x[ch * {depth} + {t}, T.max(T.min(oy * {sh} + {i - ph}, {h - 1}), 0), u]" for t in range(depth)
            for i in range(kh)]
    return f"""
@T.prim_func(private=True)
def max_pool(x: T.Buffer(({c * depth}, {h}, {w}), "float32"), zero: T.Buffer((1,), "int32"),
             out: T.Buffer(({c}, {oh}, {ow}), "float32")):
    T.func_attr({{"tirx.noalias": True, "tirx.is_scheduled": True, "op_pattern": 8}})
    for t in T.parallel({c * nb}):
        ch: T.let = t // {nb}
        vr = T.decl_buffer(({w},), "float32")
        for q in T.serial({band}):
            oy: T.let = (t % {nb}) * {band} + q + zero[0]
            if oy < {oh}:
                for u in T.serial({w}):{maxima(rows, " " * 20)}
                    vr[u] = m{kh * depth - 1}{cols(0, lo, False) + cols(lo, hi, True) + cols(hi, ow, False)}
"""


def _emit_pool(bb, x, x_shape, kernel, stride, padding, src: str, name: str, suffix: str = "", depth: int = 1,
               ceil: bool = False):
    """A pooling kernel's TVMScript `src` for one sample of x [N, C, H, W] called on all of x (`batch_source`),
    its `zero` input a constant; the output [N, C / depth, OH, OW]. `suffix` ends the function's name."""
    from tvm import relax

    n, c, h, w = (int(d) for d in x_shape)
    (kh, kw), (sh, sw), (ph, pw), (oh, ow) = pool_geometry(h, w, kernel, stride, padding, ceil)
    tag = f"k{depth}x{kh}x{kw}" if depth > 1 else f"k{kh}x{kw}"
    suffix += "_ceil" if ceil else ""
    gv = bb.add_func(parse_kernel(batch_source(src, n, ["x", "out"])),
                     f"{name}_{c}x{h}x{w}_{tag}s{sh}x{sw}p{ph}x{pw}{suffix}" + _ntag(n))
    y = bb.emit(relax.call_tir(gv, [bb.emit(relax.op.reshape(x, _batched(n, c, h, w))),
                                    relax.const(np.zeros(1, np.int32))],
                               relax.TensorType(_batched(n, c // depth, oh, ow), "float32")))
    return bb.emit(relax.op.reshape(y, (n, c // depth, oh, ow)))


def emit_max_pool(bb, x, x_shape, kernel, stride, padding, depth: int = 1, ceil: bool = False):
    """max_pool2d of x [N, C, H, W] (per sample); with `depth`, a 3-D pool over windows of `depth` planes (C / depth
    output planes; `max_pool_source`). TVM's pooling with the schedule rules took 1.1 ms for ResNet-18's 3x3
    stride-2 pool on 64x112x112."""
    _, c, h, w = (int(d) for d in x_shape)
    return _emit_pool(bb, x, x_shape, kernel, stride, padding,
                      max_pool_source(c // depth, h, w, kernel, stride, padding, depth, ceil), "max_pool", depth=depth,
                      ceil=ceil)


def avg_pool_source(c: int, h: int, w: int, kernel, stride, padding, count_pad: bool, divisor: int | None,
                    depth: int = 1) -> str:
    """TVMScript of average pooling, separably as `max_pool_source`: per output row the sums down the kernel's kh
    input rows go into a row buffer whose pw columns either side hold zeros (a row outside the image adds 0), then
    each output sums kw of those along the row and scales: by 1 / divisor, 1 / (kh x kw) with `count_pad` (PyTorch's
    count_include_pad: without ceil_mode every window lies inside the padded map), else by 1 / the window's taps
    inside the image. `depth`: as `max_pool_source`'s (the rows of `depth` planes summed, counted in the divisor)."""
    (kh, kw), (sh, sw), (ph, pw), (oh, ow) = pool_geometry(h, w, kernel, stride, padding)
    band = min(oh, POOL_BAND)
    nb = -(-oh // band)
    rows = " + ".join(f"T.Select(oy * {sh} + {i - ph} >= 0 and oy * {sh} + {i - ph} < {h}, "
                      f"x[ch * {depth} + {t}, T.max(T.min(oy * {sh} + {i - ph}, {h - 1}), 0), u], T.float32(0))"
                      for t in range(depth) for i in range(kh))
    total = " + ".join(f"vr[ox * {sw} + {j}]" for j in range(kw))
    if divisor is not None or count_pad:
        scaled = f"({total}) * T.float32({1.0 / (divisor or kh * kw * depth)!r})"
    else:
        y0, x0 = f"oy * {sh} - {ph}", f"ox * {sw} - {pw}"
        taps = (f"(T.min({y0} + {kh}, {h}) - T.max({y0}, 0)) * (T.min({x0} + {kw}, {w}) - T.max({x0}, 0))"
                + (f" * {depth}" if depth > 1 else ""))
        scaled = f"({total}) / T.Cast(\"float32\", {taps})"
    return f"""
@T.prim_func(private=True)
def avg_pool(x: T.Buffer(({c * depth}, {h}, {w}), "float32"), zero: T.Buffer((1,), "int32"),
             out: T.Buffer(({c}, {oh}, {ow}), "float32")):
    T.func_attr({{"tirx.noalias": True, "tirx.is_scheduled": True, "op_pattern": 8}})
    for t in T.parallel({c * nb}):
        ch: T.let = t // {nb}
        vr = T.decl_buffer(({w + 2 * pw},), "float32")
        for u in T.serial({pw}):
            vr[u] = T.float32(0)
            vr[{w + pw} + u] = T.float32(0)
        for q in T.serial({band}):
            oy: T.let = (t % {nb}) * {band} + q + zero[0]
            if oy < {oh}:
                for u in T.serial({w}):
                    vr[{pw} + u] = {rows}
                for ox in T.serial({ow}):
                    out[ch, oy, ox] = {scaled}
"""


def emit_avg_pool(bb, x, x_shape, kernel, stride, padding, count_pad: bool, divisor: int | None, depth: int = 1):
    """avg_pool2d of x [N, C, H, W] (per sample; `avg_pool_source`; `depth` as `emit_max_pool`'s). Relax's op under
    the schedule rules took 482 us for an Inception block's 3x3 stride-1 pool of 288x35x35 (ORT's whole block: 1.3
    ms)."""
    _, c, h, w = (int(d) for d in x_shape)
    ph, pw = (int(p) for p in padding)
    tag = "" if divisor is None and (count_pad or (ph, pw) == (0, 0)) else f"_d{divisor}" if divisor else "_exclude_pad"
    src = avg_pool_source(c // depth, h, w, kernel, stride, padding, count_pad, divisor, depth)
    return _emit_pool(bb, x, x_shape, kernel, stride, padding, src, "avg_pool", tag, depth)


def pad_source(rows: int, h: int, w: int, top: int, bottom: int, left: int, right: int, dtype: str) -> str:
    """TVMScript of y = x [rows, H, W] padded by constant fill[0] on its last two axes: one task per output row,
    which is all fill, or fill, a copy of its input row, fill (plain loops LLVM vectorizes)."""
    oh, ow = h + top + bottom, w + left + right
    return f"""
@T.prim_func(private=True)
def pad(x: T.Buffer(({rows}, {h}, {w}), "{dtype}"), fill: T.Buffer((1,), "{dtype}"),
        y: T.Buffer(({rows}, {oh}, {ow}), "{dtype}")):
    T.func_attr({{"tirx.noalias": True, "tirx.is_scheduled": True, "op_pattern": 8}})
    for t in T.parallel({rows * oh}):
        r: T.let = t // {oh}
        oy: T.let = t % {oh}
        if oy < {top} or oy >= {top + h}:
            for ox in T.serial({ow}):
                y[r, oy, ox] = fill[0]
        else:
            for ox in T.serial({left}):
                y[r, oy, ox] = fill[0]
            for ox in T.serial({w}):
                y[r, oy, {left} + ox] = x[r, oy - {top}, ox]
            for ox in T.serial({right}):
                y[r, oy, {left + w} + ox] = fill[0]
"""


def emit_pad(bb, x, x_shape, pads, value: float, dtype: str):
    """constant_pad_nd of x (a Relax value) with aten's `pads` on the last one or two axes only, non-negative."""
    import math

    from tvm import relax

    dims = [int(d) for d in x_shape]
    left, right = int(pads[0]), int(pads[1])
    top, bottom = (int(pads[2]), int(pads[3])) if len(pads) == 4 else (0, 0)
    h, w = (dims[-2], dims[-1]) if len(pads) == 4 else (1, dims[-1])
    rows = math.prod(dims) // (h * w)
    gv = bb.add_func(parse_kernel(pad_source(rows, h, w, top, bottom, left, right, dtype)),
                     f"pad_{rows}x{h}x{w}_{top}_{bottom}_{left}_{right}")
    oh, ow = h + top + bottom, w + left + right
    y = bb.emit(relax.call_tir(gv, [bb.emit(relax.op.reshape(x, (rows, h, w))),
                                    relax.const(np.full(1, value, dtype))], relax.TensorType((rows, oh, ow), dtype)))
    out = dims[:-2] + [oh, ow] if len(pads) == 4 else dims[:-1] + [ow]
    return bb.emit(relax.op.reshape(y, tuple(out)))


def _edge_index(i: str, n: int, mode: str) -> str:
    """TVMScript of the input index that output index `i` (relative to the first input element, -pad .. n + pad)
    reads: PyTorch's reflect (mirrored about the edge element, which is not repeated), replicate (the edge element)
    or circular (wrapped) padding."""
    if mode == "reflect":
        return f"T.if_then_else({i} < 0, 0 - ({i}), T.if_then_else({i} >= {n}, {2 * n - 2} - ({i}), {i}))"
    if mode == "replicate":
        return f"T.max(T.min({i}, {n - 1}), 0)"
    return f"T.if_then_else({i} < 0, {i} + {n}, T.if_then_else({i} >= {n}, {i} - {n}, {i}))"


def edge_pad_applies(x_shape, pads, mode: str, dtype: str) -> bool:
    """Reflect / replicate / circular pads of the last one or two axes of a float32 tensor, with pads PyTorch
    accepts (reflect: under the axis' size; circular: at most it); others keep Relax's pad."""
    if mode not in ("reflect", "replicate", "circular") or dtype != "float32" or len(pads) not in (2, 4) \
            or len(x_shape) < len(pads) // 2 or any(not isinstance(d, int) for d in x_shape):
        return False
    sizes = [int(x_shape[-1 - i // 2]) for i in range(len(pads))]
    limit = {"reflect": lambda n: n - 1, "replicate": lambda n: 1 << 30, "circular": lambda n: n}[mode]
    return all(0 <= int(p) <= limit(n) for p, n in zip(pads, sizes))


def edge_pad_source(rows: int, h: int, w: int, top: int, bottom: int, left: int, right: int, mode: str) -> str:
    """TVMScript of y = x [rows, H, W] padded on its last two axes by `mode` (reflect / replicate / circular): one
    task per output row, which copies input row r(oy), its border columns through the index map and its inner
    columns as a plain loop LLVM vectorizes. `zero` [1] holds 0, added to the row: a second input that the body
    reads (a one-input copy kernel fails Relax's reshape detection, which wants a block-structured function)."""
    oh, ow = h + top + bottom, w + left + right
    sy = _edge_index(f"oy - {top}", h, mode)
    return f"""
@T.prim_func(private=True)
def edge_pad(x: T.Buffer(({rows}, {h}, {w}), "float32"), zero: T.Buffer((1,), "int32"),
             y: T.Buffer(({rows}, {oh}, {ow}), "float32")):
    T.func_attr({{"tirx.noalias": True, "tirx.is_scheduled": True, "op_pattern": 8}})
    for t in T.parallel({rows * oh}):
        r: T.let = t // {oh}
        oy: T.let = t % {oh}
        sy: T.let = {sy} + zero[0]
        for ox in T.unroll({left}):
            y[r, oy, ox] = x[r, sy, {_edge_index(f"ox - {left}", w, mode)}]
        for ox in T.serial({w}):
            y[r, oy, {left} + ox] = x[r, sy, ox]
        for ox in T.unroll({right}):
            y[r, oy, {left + w} + ox] = x[r, sy, {_edge_index(f"ox + {w}", w, mode)}]
"""


def emit_edge_pad(bb, x, x_shape, pads, mode: str):
    """pad(x, pads, mode) of x (a Relax value, float32) on its last one or two axes (`edge_pad_applies`). Relax's
    reflect pad (and aten's decomposition into index gathers) took 5.8x PyTorch's time on 64x64x64 by 3, its
    replicate pad 9x."""
    import math

    from tvm import relax

    dims = [int(d) for d in x_shape]
    left, right = int(pads[0]), int(pads[1])
    top, bottom = (int(pads[2]), int(pads[3])) if len(pads) == 4 else (0, 0)
    h, w = (dims[-2], dims[-1]) if len(pads) == 4 else (1, dims[-1])
    rows = math.prod(dims) // (h * w)
    gv = bb.add_func(parse_kernel(edge_pad_source(rows, h, w, top, bottom, left, right, mode)),
                     f"{mode}_pad_{rows}x{h}x{w}_{top}_{bottom}_{left}_{right}")
    oh, ow = h + top + bottom, w + left + right
    y = bb.emit(relax.call_tir(gv, [bb.emit(relax.op.reshape(x, (rows, h, w))), relax.const(np.zeros(1, np.int32))],
                               relax.TensorType((rows, oh, ow), "float32")))
    out = dims[:-2] + [oh, ow] if len(pads) == 4 else dims[:-1] + [ow]
    return bb.emit(relax.op.reshape(y, tuple(out)))


def _source_row(prefix, coords) -> str:
    """The TIR expression of the source row of output row t over the `prefix` axes (row-major), where coords[k](i, d)
    maps axis k's output coordinate expression i (of size d) to its source coordinate (roll's shift, flip's
    mirror)."""
    src, stride = [], math.prod(prefix)
    for d, coord in zip(prefix, coords):
        stride //= d
        i = f"(t // {stride}) % {d}" if stride > 1 else f"t % {d}"
        src.append(f"({coord(i, d)}) * {stride}")
    return " + ".join(src) or "0"


def roll_source(prefix, shifts, n: int, inner: int, s: int) -> str:
    """TVMScript of torch.roll on x viewed as [P, n * inner] (P = prod(prefix)): its last rolled axis (size n, each
    element a contiguous run of `inner`) rolled by s, the prefix axes by `shifts` (0 where not rolled). One task
    per output row: it finds its source row through the prefix shifts and copies two contiguous chunks."""
    rows = math.prod(prefix)
    src_row = _source_row(prefix, [(lambda i, d, sh=sh: f"({i} + {(d - sh) % d}) % {d}" if sh % d else i)
                                   for sh in shifts])
    k = (s % n) * inner  # output element k of a row reads element k - k0 (mod the row)
    width = n * inner
    return f"""
@T.prim_func(private=True)
def roll(x: T.Buffer(({rows}, {width}), "float32"), zero: T.Buffer((1,), "int32"),
         y: T.Buffer(({rows}, {width}), "float32")):
    T.func_attr({{"tirx.noalias": True, "tirx.is_scheduled": True, "op_pattern": 8}})
    for t in T.parallel({rows}):
        r: T.let = {src_row} + zero[0]
        for j in T.serial({k}):
            y[t, j] = x[r, {width - k} + j]
        for j in T.serial({width - k}):
            y[t, {k} + j] = x[r, j]
"""


def emit_roll(bb, x, x_shape, shifts, dims):
    """torch.roll(x, shifts, dims) of a float32 x (a Relax value) with constant sizes; dims None rolls the flat
    tensor. aten's decomposition (an index_select per axis) took 3.4x PyTorch's time on Swin's 56x56x96 window
    shift."""
    from tvm import relax

    shape = [int(d) for d in x_shape] if dims is not None else [math.prod(int(d) for d in x_shape)]
    dims = [0] if dims is None else [int(d) % len(shape) for d in dims]
    total = [0] * len(shape)
    for d, sh in zip(dims, shifts):  # rolls along one axis add up
        total[d] += int(sh)
    last = max(dims)
    prefix, inner = shape[:last], math.prod(shape[last + 1:])
    src = roll_source(prefix, [total[d] for d in range(last)], shape[last], inner, total[last])
    gv = bb.add_func(parse_kernel(src),
                     "roll_" + "x".join(map(str, shape)) + "_" + "_".join(map(str, total)))
    rows, width = math.prod(prefix), shape[last] * inner
    y = bb.emit(relax.call_tir(gv, [bb.emit(relax.op.reshape(x, (rows, width))), relax.const(np.zeros(1, np.int32))],
                               relax.TensorType((rows, width), "float32")))
    return bb.emit(relax.op.reshape(y, tuple(int(d) for d in x_shape)))


def flip_source(prefix, flipped, n: int, inner: int, flip_last: bool) -> str:
    """TVMScript of torch.flip on x viewed as [P, n * inner] (P = prod(prefix)): each prefix axis with `flipped`
    True is mirrored, the axis of size n (each element a contiguous run of `inner`) too when flip_last. One task
    per output run (per row when inner is 1: a reversed element copy): it finds its source row through the
    mirrored prefix axes and copies the run from its mirrored place."""
    rows = math.prod(prefix)
    src_row = _source_row(prefix, [(lambda i, d, f=f: f"{d - 1} - {i}" if f else i) for f in flipped])
    width = n * inner
    if inner == 1:  # a reversed element copy per row
        return f"""
@T.prim_func(private=True)
def flip(x: T.Buffer(({rows}, {width}), "float32"), zero: T.Buffer((1,), "int32"),
         y: T.Buffer(({rows}, {width}), "float32")):
    T.func_attr({{"tirx.noalias": True, "tirx.is_scheduled": True, "op_pattern": 8}})
    for t in T.parallel({rows}):
        r: T.let = {src_row} + zero[0]
        for j in T.vectorized({width}):
            y[t, j] = x[r, {width - 1} - j]
"""
    k_src = f"{n - 1} - u % {n}" if flip_last else f"u % {n}"
    return f"""
@T.prim_func(private=True)
def flip(x: T.Buffer(({rows}, {width}), "float32"), zero: T.Buffer((1,), "int32"),
         y: T.Buffer(({rows}, {width}), "float32")):
    T.func_attr({{"tirx.noalias": True, "tirx.is_scheduled": True, "op_pattern": 8}})
    for u in T.parallel({rows * n}):
        t: T.let = u // {n}
        r: T.let = {src_row} + zero[0]
        for j in T.vectorized({inner}):
            y[t, (u % {n}) * {inner} + j] = x[r, ({k_src}) * {inner} + j]
"""


def emit_flip(bb, x, x_shape, dims):
    """torch.flip(x, dims) of a float32 x (a Relax value) with constant sizes, on the row copy above. Relax's flip
    ran a generic loop at 2-3.4x PyTorch's time (64x56x56 over the width: 77-80 us against 24-39)."""
    from tvm import relax

    shape = [int(d) for d in x_shape]
    dims = sorted({int(d) % len(shape) for d in dims})
    last = dims[-1]
    prefix, inner = shape[:last], math.prod(shape[last + 1:])
    src = flip_source(prefix, [d in dims for d in range(last)], shape[last], inner, True)
    gv = bb.add_func(parse_kernel(src),
                     "flip_" + "x".join(map(str, shape)) + "_" + "_".join(map(str, dims)))
    rows, width = math.prod(prefix), shape[last] * inner
    y = bb.emit(relax.call_tir(gv, [bb.emit(relax.op.reshape(x, (rows, width))), relax.const(np.zeros(1, np.int32))],
                               relax.TensorType((rows, width), "float32")))
    return bb.emit(relax.op.reshape(y, tuple(shape)))


def batched_transpose(shape, perm) -> tuple[int, int, int] | None:
    """(B, R, C) when permuting `shape` by `perm` is B transposes of R x C matrices with R and C at least 64: the
    last two axes swapped (SAGAN's 1024 x 1024 attention map, MLP-Mixer's token mixing), or runs of axes that
    stay together swapped the same way (NCHW <-> NHWC: C against H W, ConvNeXt's and TF ports' layout changes),
    unit axes anywhere. Smaller ones (attention heads' K^T) stay in Relax, fused with their neighbours; None
    otherwise."""
    nd = len(shape)
    if nd < 2 or sorted(perm) != list(range(nd)):
        return None
    if any(int(d) == 1 for d in shape):  # unit axes move no data: the permutation of the others (einsum's
        keep = [a for a in range(nd) if int(shape[a]) != 1]  # [1, 1, N, N] -> [N, N, 1, 1] transposes)
        return batched_transpose([shape[a] for a in keep], [keep.index(int(p)) for p in perm if int(shape[p]) != 1])
    groups = [[int(perm[0])]]  # runs of input axes kept adjacent and in order, in output order
    for a in perm[1:]:
        if int(a) == groups[-1][-1] + 1:
            groups[-1].append(int(a))
        else:
            groups.append([int(a)])
    by_input = sorted(groups)
    if len(groups) < 2 or groups != by_input[:-2] + [by_input[-1], by_input[-2]]:
        return None
    size = lambda g: math.prod(int(shape[a]) for a in g)  # noqa: E731
    b, r, c = math.prod(size(g) for g in by_input[:-2]), size(by_input[-2]), size(by_input[-1])
    return (b, r, c) if r >= 64 and c >= 64 else None


def transpose_source(b: int, r: int, c: int) -> str:
    """TVMScript of y[i, :, :] = x[i, :, :]^T for x [B, R, C]: one task per 16 rows, which walks their columns in
    16 x 16 tiles (whole cache lines read and written), each as four 8 x 8 blocks loaded as 8 row vectors,
    transposed in registers (conv.transpose8) and stored as 8 column vectors. The last row and column blocks
    overlap the ones before (the same values written twice). `zero` [1] holds 0 (a second input keeps Relax from
    reading the function as a reshape, as in roll)."""
    from graphopt.targets.tvm.cpu.conv import transpose8

    rb, cb = -(-r // 16), -(-c // 16)
    return f"""
@T.prim_func(private=True)
def transpose(x: T.Buffer(({b}, {r}, {c}), "float32"), zero: T.Buffer((1,), "int32"),
              y: T.Buffer(({b}, {c}, {r}), "float32")):
    T.func_attr({{"tirx.noalias": True, "tirx.is_scheduled": True, "op_pattern": 8}})
    for t in T.parallel({b * rb}):
        bi: T.let = t // {rb}
        r0: T.let = T.min((t % {rb}) * 16, {r - 16}) + zero[0]
        ta = T.decl_buffer((8, 8), "float32", scope="global")
        tb = T.decl_buffer((8, 8), "float32", scope="global")
        s1 = T.decl_buffer((8, 8), "float32", scope="global")
        s2 = T.decl_buffer((8, 8), "float32", scope="global")
        for q in T.serial({cb}):
            c0: T.let = T.min(q * 16, {c - 16})
            for hi in T.unroll(2):
                for hj in T.unroll(2):
                    for i in T.unroll(8):
                        for l in T.vectorized(8):
                            ta[i, l] = x[bi, r0 + hi * 8 + i, c0 + hj * 8 + l]{transpose8("ta", "tb", " " * 20)}
                    for j in T.unroll(8):
                        for l in T.vectorized(8):
                            y[bi, c0 + hj * 8 + j, r0 + hi * 8 + l] = tb[j, l]
"""


def emit_transpose(bb, x, x_shape, perm):
    """x (a float32 Relax value of constant shape) permuted by `perm`, a batched_transpose. Relax's transpose ran a
    generic loop reading down the columns: 1.7 ms for SAGAN's 1024 x 1024 map, 224 us for MLP-Mixer's 196 x 512
    tokens, 2.4x PyTorch's time from NHWC to NCHW."""
    from tvm import relax

    shape = [int(d) for d in x_shape]
    b, r, c = batched_transpose(shape, perm)
    gv = bb.add_func(parse_kernel(transpose_source(b, r, c)), f"transpose_{b}x{r}x{c}")
    y = bb.emit(relax.call_tir(gv, [bb.emit(relax.op.reshape(x, (b, r, c))), relax.const(np.zeros(1, np.int32))],
                               relax.TensorType((b, c, r), "float32")))
    return bb.emit(relax.op.reshape(y, tuple(shape[int(p)] for p in perm)))


CONCAT_CHUNK = 4096  # elements one task of the concat copies (16 KB of floats)
CONCAT_MIN_RUN = 256  # the shortest contiguous run per input and outer index the concat kernel takes


def concat_geometry(shapes, dim: int) -> tuple[int, list[int]] | None:
    """(outer, runs) of torch.cat(tensors of `shapes`, dim): each input is `outer` contiguous runs of runs[i]
    elements (its size along dim times the axes after it), and the output row o is input 0's run o, input 1's run o,
    and so on. None where a run is shorter than CONCAT_MIN_RUN (a rotary embedding's half-rows: Relax fuses those
    concats with the arithmetic around them, which an opaque copy would split) or the shapes do not concatenate,
    unless some run is not a whole number of 16-float vectors, the rows are 48 floats or wider and there are
    CONCAT_MIN_RUN rows or more: Relax's fused concat chose each lane's input there (NeRF's [3 | 30 | 30] encoding
    of 4096 points with its sin / cos: 728 us, now 154 + the sin / cos; [64 | 63] with a ReLU: 458 -> 110 us);
    those rows copy as short runs (`concat_source`). Narrower rows stay fused: a rotary embedding of head width 24
    (halves of 12) took 114 us fused, 149 as a copy; width 80 the same both ways (338 / 341 us)."""
    if len(shapes) < 2 or any(len(sh) != len(shapes[0]) for sh in shapes):
        return None
    nd = len(shapes[0])
    dim %= nd
    if any(tuple(sh[:dim]) + tuple(sh[dim + 1:]) != tuple(shapes[0][:dim]) + tuple(shapes[0][dim + 1:])
           for sh in shapes):
        return None
    outer = math.prod(int(d) for d in shapes[0][:dim])
    runs = [math.prod(int(d) for d in sh[dim:]) for sh in shapes]
    if min(runs) < CONCAT_MIN_RUN and (outer < CONCAT_MIN_RUN or sum(runs) < 48 or all(r % 16 == 0 for r in runs)):
        return None
    return outer, runs


def concat_source(outer: int, runs, dtype: str) -> str:
    """TVMScript of the concat of inputs x_i [outer, runs[i]] into out [outer, sum(runs)]: one parallel loop over
    chunks of CONCAT_CHUNK elements of every input's runs, each a plain copy loop (LLVM makes it vector moves);
    with short runs (under CONCAT_MIN_RUN) one parallel loop over the rows, each copying its runs in turn."""
    width = sum(runs)
    params = ", ".join(f'x{i}: T.Buffer(({outer}, {r}), "{dtype}")' for i, r in enumerate(runs))
    if max(runs) < CONCAT_MIN_RUN:
        offs = [sum(runs[:i]) for i in range(len(runs))]
        copies = "".join(f"""
        for j in T.serial({r}):
            out[o, {off} + j] = x{i}[o, j]""" for i, (r, off) in enumerate(zip(runs, offs)))
        return f"""
@T.prim_func(private=True)
def concat({params}, out: T.Buffer(({outer}, {width}), "{dtype}")):
    T.func_attr({{"tirx.noalias": True, "tirx.is_scheduled": True, "op_pattern": 8}})
    for o in T.parallel({outer}):{copies}
"""
    body, first, off = [], 0, 0
    for i, r in enumerate(runs):
        per = -(-r // CONCAT_CHUNK)
        n = outer * per
        body.append(f"""
        {"if" if i == 0 else "elif" if i < len(runs) - 1 else "else"}{f" t < {first + n}" if i < len(runs) - 1 else ""}:
            o: T.let = (t - {first}) // {per}
            c0: T.let = ((t - {first}) % {per}) * {CONCAT_CHUNK}
            for j in T.serial(T.min({CONCAT_CHUNK}, {r} - c0)):
                out[o, {off} + c0 + j] = x{i}[o, c0 + j]""")
        first += n
        off += r
    return f"""
@T.prim_func(private=True)
def concat({params}, out: T.Buffer(({outer}, {width}), "{dtype}")):
    T.func_attr({{"tirx.noalias": True, "tirx.is_scheduled": True, "op_pattern": 8}})
    for t in T.parallel({first}):{"".join(body)}
"""


def emit_concat(bb, xs, shapes, dim: int, dtype: str):
    """torch.cat(xs, dim) of Relax values of constant `shapes` (`concat_geometry` not None) as one copy kernel.
    Relax's concatenate ran one loop over the output whose vectors chose their input per lane: YOLO's 3 x 48 x 80
    x 80 -> 144 x 80 x 80 took 541 us, 1.9x ONNX Runtime's time."""
    from tvm import relax

    outer, runs = concat_geometry(shapes, dim)
    gv = bb.add_func(parse_kernel(concat_source(outer, runs, dtype)),
                     f"concat_{outer}x" + "_".join(map(str, runs)))
    y = bb.emit(relax.call_tir(gv, [bb.emit(relax.op.reshape(x, (outer, r))) for x, r in zip(xs, runs)],
                               relax.TensorType((outer, sum(runs)), dtype)))
    out = list(int(d) for d in shapes[0])
    out[dim % len(out)] = sum(int(sh[dim % len(out)]) for sh in shapes)
    return bb.emit(relax.op.reshape(y, tuple(out)))


def emit_crop(bb, x, x_shape, h: int, w: int):
    """The first h rows and w columns of the last two axes of x (a Relax value), as an opaque row copy: as a
    strided slice Relax fused the cut into the matmul before it, whose rule then scheduled the padded output
    badly (ViT's 197-token scores: 453 us against 105 for the uncut matmul). `fill` [1] holds 0, added: a second
    input that the body reads (as im2col's; with one unread, the build failed in Relax's reshape detection)."""
    import math

    from tvm import relax

    dims = [int(d) for d in x_shape]
    hi, wi = dims[-2], dims[-1]
    rows = math.prod(dims) // (hi * wi)
    src = f"""
@T.prim_func(private=True)
def crop(x: T.Buffer(({rows}, {hi}, {wi}), "float32"), fill: T.Buffer((1,), "float32"),
         y: T.Buffer(({rows}, {h}, {w}), "float32")):
    T.func_attr({{"tirx.noalias": True, "tirx.is_scheduled": True, "op_pattern": 8}})
    for t in T.parallel({rows * h}):
        for ox in T.serial({w}):
            y[t // {h}, t % {h}, ox] = x[t // {h}, t % {h}, ox] + fill[0]
"""
    gv = bb.add_func(parse_kernel(src), f"crop_{rows}x{hi}x{wi}_to_{h}x{w}")
    y = bb.emit(relax.call_tir(gv, [bb.emit(relax.op.reshape(x, (rows, hi, wi))),
                                    relax.const(np.zeros(1, np.float32))], relax.TensorType((rows, h, w), "float32")))
    return bb.emit(relax.op.reshape(y, (*dims[:-2], h, w)))


def adaptive_windows(out_size: int, in_size: int) -> tuple[np.ndarray, np.ndarray]:
    """PyTorch's adaptive pooling windows: output o reads [floor(o in / out), ceil((o + 1) in / out))."""
    o = np.arange(out_size)
    return (o * in_size // out_size).astype(np.int32), (-(-(o + 1) * in_size // out_size)).astype(np.int32)


def adaptive_avg_source(nc: int, h: int, w: int, oh: int, ow: int) -> str:
    """TVMScript of adaptive average pooling: one task per output row sums its window's input rows into a row
    buffer (vectors over the width), then each output column sums its window of that buffer and divides by the
    window's size."""
    return f"""
@T.prim_func(private=True)
def adaptive_avg(x: T.Buffer(({nc}, {h}, {w}), "float32"), hs: T.Buffer(({oh},), "int32"),
                 he: T.Buffer(({oh},), "int32"), ws: T.Buffer(({ow},), "int32"), we: T.Buffer(({ow},), "int32"),
                 y: T.Buffer(({nc}, {oh}, {ow}), "float32")):
    T.func_attr({{"tirx.noalias": True, "tirx.is_scheduled": True, "op_pattern": 8}})
    for t in T.parallel({nc * oh}):
        c: T.let = t // {oh}
        o: T.let = t % {oh}
        row = T.decl_buffer(({w},), "float32")
        acc = T.decl_buffer((1,), "float32")
        for i in T.vectorized({w}):
            row[i] = x[c, hs[o], i]
        for r in T.serial(he[o] - hs[o] - 1):
            for i in T.vectorized({w}):
                row[i] = row[i] + x[c, hs[o] + 1 + r, i]
        for ox in T.serial({ow}):
            acc[0] = T.float32(0)
            for k in T.serial(we[ox] - ws[ox]):
                acc[0] = acc[0] + row[ws[ox] + k]
            y[c, o, ox] = acc[0] / T.Cast("float32", (he[o] - hs[o]) * (we[ox] - ws[ox]))
"""


def emit_adaptive_avg(bb, x, x_shape, out_hw):
    """adaptive_avg_pool2d of float32 x [N, C, H, W] (a Relax value) to out_hw. Relax's op (aten's
    _adaptive_avg_pool2d) ran a generic loop at 1.4-1.9x PyTorch's time (PSPNet's pyramid pools of 512x60x60: 1.1-
    1.4 ms)."""
    from tvm import relax

    n, c, h, w = (int(d) for d in x_shape)
    oh, ow = (int(d) for d in out_hw)
    gv = bb.add_func(parse_kernel(adaptive_avg_source(n * c, h, w, oh, ow)),
                     f"adaptive_avg_{n * c}x{h}x{w}_to_{oh}x{ow}")
    tables = [*adaptive_windows(oh, h), *adaptive_windows(ow, w)]
    y = bb.emit(relax.call_tir(gv, [bb.emit(relax.op.reshape(x, (n * c, h, w))), *map(relax.const, tables)],
                               relax.TensorType((n * c, oh, ow), "float32")))
    return bb.emit(relax.op.reshape(y, (n, c, oh, ow)))
