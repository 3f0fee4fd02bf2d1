"""Transposed convs as ordinary convs, the form the weight passes (quantize) and the int8 kernels take.

A transposed conv (1-D or 2-D; a grouped one is G of them side by side) with stride s, padding p and a k-tap
kernel writes output pixel o = i s - p + t from tap t of input pixel i. Output o has phase r = (o + p) mod s and
reads only taps t = r + s j, so with q = (o + p - r) / s the phase is y_r[q] = sum_j x[q - j] w[r + s j]: a
stride-1 conv with a ceil(k / s)-tap kernel, flipped, over the input padded by ceil(k / s) - 1. The s_h s_w phases
read the same input, so their kernels stack as s_h s_w Cout output channels of ONE conv; its outputs interleave
(a pixel shuffle: output row q s + r) and the rows before p and past the output are cut.
A transposed conv of a 1 x 1 map (generators' first layer: z -> Cout x 4 x 4) reads tap o + p at output o: a
linear with Cout OH OW outputs. The CPU target lowers float transposed convs the same way (`lower.py`); this is
the graph-level form, so `quantize` can put int8 weights and activation grids on them (they had stayed float:
a DCGAN generator "quantized" kept every layer fp32).

The phases share one padded input, so each computes a row and a column more than its share of the output (the
rows and columns that are cut): on a 4 x 4 map (k 4, stride 2) 5 x 5 phase outputs for 4 x 4, 1.56x the MACs.
Where that exceeds FOLD_WASTE, or the taps are dilated, the layer is a GEMM and F.fold instead (`fold_pays`):
the pointwise conv with the weight as [Cout kh kw, Cin] gives each input pixel's output block, and aten.col2im
adds the blocks into place (the transposed conv's own MACs; the CPU target runs the fold as one kernel).
"""
from __future__ import annotations

from typing import Iterable

import torch
import torch.fx as fx

from graphopt.ir.graph import Graph
from graphopt.ir.names import matches, node_labels
from graphopt.passes.analysis.weights import tidied

aten = torch.ops.aten
_TRANSPOSED = (aten.conv_transpose1d.default, aten.conv_transpose2d.input, aten.conv_transpose3d.input)


def _arguments(n: fx.Node):
    """(x, weight, bias, stride, padding, output_padding, groups, dilation) of a transposed conv node, else None."""
    if n.op != "call_function" or n.kwargs:
        return None
    if n.target in _TRANSPOSED:
        defaults = (None, None, None, 1, 0, 0, 1, 1)
        a = tuple(n.args) + defaults[len(n.args):]
        return a
    if n.target is aten.convolution.default and len(n.args) == 9 and n.args[6]:
        x, w, b, stride, padding, dilation, _, out_pad, groups = n.args
        return x, w, b, stride, padding, out_pad, groups, dilation
    return None


def conv_ints(v, dims: int) -> list[int]:
    """A conv's stride / padding / dilation argument (an int, or one or `dims` values) as `dims` ints."""
    v = [int(a) for a in v] if isinstance(v, (list, tuple)) else [int(v)]
    return v * dims if len(v) == 1 else v


def phase_plan(size: int, s: int, p: int, k: int, out: int) -> tuple[int, int, int, int]:
    """Along one axis: (taps per phase, rows of q skipped at the start, padding before, padding after)."""
    taps = -(-k // s)
    q0 = min(p // s, taps - 1)  # rows q < p // s hold only outputs before the first
    return taps, q0, taps - 1 - q0, -(-(p + out) // s) - size


# Past this many times the transposed conv's MACs in its phase conv, the layer is a GEMM + fold (module doc). k 4,
# stride 2 (interleaved, Zen 3, 2 threads): at 8 x 8 and 16 x 16 maps (1.27x, 1.13x) the fold took 0.80-1.02x the
# phase conv's time (0.70x at batch 4); at 32 x 32 and 64 x 64 (1.07x, 1.03x) the phase conv's one pass over the
# output won (0.74-0.87x the fold's time). The CPU target's float lowering uses the same rule.
FOLD_WASTE = 1.1


def fold_pays(size: tuple[int, int], stride: tuple[int, int], padding: tuple[int, int],
              kernel: tuple[int, int], out: tuple[int, int], groups: int = 1) -> bool:
    """Whether a transposed conv (2-D sizes; a 1-D one as 1 x W) runs as GEMM + fold rather than as its phase
    conv: the phase conv would do more than FOLD_WASTE times the MACs, or cannot crop the output
    (`phase_plan`'s padding after < 0). With groups only the crop decides: the per-group GEMM is a grouped 1 x 1
    conv, which lost to the grouped phase conv on every map (interleaved, Zen 3: depthwise 4x4 stride 2 at 8 x 8,
    16 x 16 and 32 x 32 2.2-3.3x the phase conv's time, 4 groups at 16 x 16 1.35x). A 1-D one (one row) always
    folds: there the fold won at every length, waste or not (HiFi-GAN's k 16, stride 8 upsamplers, 256 -> 128 at
    64 steps and 512 -> 256 at 32: 0.67x and 0.55x the phase conv's time; k 4, stride 2 at 256 and 1024 steps:
    0.95x and 0.92x)."""
    (h, w), (sh, sw), (ph, pw), (kh, kw), (oh, ow) = size, stride, padding, kernel, out
    jh, _, pt, pb = phase_plan(h, sh, ph, kh, oh)
    jw, _, pl, pr = phase_plan(w, sw, pw, kw, ow)
    qy, qx = h + pt + pb - jh + 1, w + pl + pr - jw + 1
    if min(pb, pr) < 0:
        return True
    return groups == 1 and (h == 1 or qy * qx * sh * sw * jh * jw > FOLD_WASTE * h * w * kh * kw)


def phase_weight(w: torch.Tensor, stride: tuple[int, int], taps: tuple[int, int]) -> torch.Tensor:
    """The stacked phase kernels [s_h s_w Cout, Cin, jh, jw] of a transposed conv weight [Cin, Cout, kh, kw]:
    phase (rh, rw)'s tap (m, v) is the weight's tap (rh + s_h (jh - 1 - m), rw + s_w (jw - 1 - v)), zero past
    the kernel."""
    (sh, sw), (jh, jw) = stride, taps
    cin, cout, kh, kw = w.shape
    g = torch.zeros(sh, sw, cout, cin, jh, jw, dtype=w.dtype)
    for rh in range(sh):
        for rw in range(sw):
            for m in range(jh):
                for v in range(jw):
                    th, tw = rh + sh * (jh - 1 - m), rw + sw * (jw - 1 - v)
                    if th < kh and tw < kw:
                        g[rh, rw, :, :, m, v] = w[:, :, th, tw].t()
    return g.reshape(sh * sw * cout, cin, jh, jw)


def _rewrite(graph: Graph, n: fx.Node, args) -> str:
    """Rewrite transposed conv `n` (its `_arguments`); "" when done, else why it stays."""
    x, wn, bn, stride, padding, out_pad, groups, dilation = args
    val = x.meta.get("val") if isinstance(x, fx.Node) else None
    if val is None or not val.is_floating_point():
        return "its input is not a float tensor"
    if val.dim() not in (3, 4):
        return "a 3-D transposed conv (1-D and 2-D ones become convs)"
    dims = val.dim() - 2
    if not (isinstance(wn, fx.Node) and wn.op == "get_attr") or not graph.get_param(wn.target).is_floating_point():
        return "weight is computed or already quantized"
    w = graph.get_param(wn.target)
    if w.dim() != val.dim():
        return "an unbatched input"
    b = None
    if bn is not None:
        if not (isinstance(bn, fx.Node) and bn.op == "get_attr"):
            return "bias is computed"
        b = graph.get_param(bn.target)
    one_d = dims == 1
    lift = (lambda v, fill: [fill, *conv_ints(v, 1)]) if one_d else (lambda v, fill: conv_ints(v, 2))
    (sh, sw), (ph, pw), (oph, opw) = lift(stride, 1), lift(padding, 0), lift(out_pad, 0)
    dh, dw = lift(dilation, 1)
    w4 = w[:, :, None, :] if one_d else w
    n_, cin = int(val.shape[0]), int(val.shape[1])
    h, wd = (1, int(val.shape[2])) if one_d else (int(val.shape[2]), int(val.shape[3]))
    # groups: the weight is [Cin, Cout / G, kh, kw], group i's input channels the i-th Cin / G; each group is its
    # own transposed conv, so the rewrites below stack per group and run as convs of G groups (depthwise
    # upsampling, G = Cin, and its channel multiplier: a depthwise conv then)
    groups = int(groups)
    cout_g, kh, kw = int(w4.shape[1]), int(w4.shape[2]), int(w4.shape[3])
    cout, cin_g = groups * cout_g, cin // groups
    per_group = [w4[i * cin_g:(i + 1) * cin_g] for i in range(groups)]
    oh, ow = (h - 1) * sh - 2 * ph + dh * (kh - 1) + 1 + oph, (wd - 1) * sw - 2 * pw + dw * (kw - 1) + 1 + opw
    g = graph.gm.graph
    src = wn.meta.get("source_fqn", wn.target)
    call = lambda op, *a: g.call_function(op, a)  # noqa: E731

    one_pixel = (h, wd) == (1, 1)
    if (dh, dw) != (1, 1) or (one_pixel and groups > 1) or (
            not one_pixel and fold_pays((h, wd), (sh, sw), (ph, pw), (kh, kw), (oh, ow), groups)):
        # a GEMM (the pointwise conv of the weight as [Cout kh kw, Cin], per group) and F.fold (module doc)
        rows = torch.cat([wg.permute(1, 2, 3, 0).reshape(cout_g * kh * kw, cin_g, 1, 1) for wg in per_group])
        weight = graph.add_param(f"{wn.target}_blocks", (rows[..., 0] if one_d else rows).contiguous(), before=n)
        weight.meta["source_fqn"] = src
        bias = None
        if b is not None:
            bias = graph.add_param(f"{bn.target}_folded", b.reshape(cout, 1, 1).contiguous(), before=n)
        with g.inserting_before(n):
            conv = aten.conv1d.default if one_d else aten.conv2d.default
            y = call(conv, x, weight, None, [1] * dims, [0] * dims, [1] * dims, groups)
            cols = call(aten.reshape.default, y, [n_, cout * kh * kw, h * wd])
            out = call(aten.col2im.default, cols, [oh, ow], [kh, kw], [dh, dw], [ph, pw], [sh, sw])
            if bias is not None:
                out = call(aten.add.Tensor, out, bias)
            if one_d:
                out = call(aten.reshape.default, out, [n_, cout, ow])
        y.meta["transposed_from"] = n.name
    elif one_pixel:  # a 1 x 1 map (one group): a linear with Cout OH OW outputs
        rows = torch.zeros(cout, oh, ow, cin, dtype=w.dtype)
        taps = w4[:, :, ph:min(kh, ph + oh), pw:min(kw, pw + ow)].permute(1, 2, 3, 0)
        rows[:, :taps.shape[1], :taps.shape[2]] = taps
        weight = graph.add_param(f"{wn.target}_as_linear", rows.reshape(cout * oh * ow, cin).contiguous(), before=n)
        weight.meta["source_fqn"] = src
        bias = None
        if b is not None:
            bias = graph.add_param(f"{bn.target}_as_linear", b.repeat_interleave(oh * ow).contiguous(), before=n)
        with g.inserting_before(n):
            flat = call(aten.reshape.default, x, [n_, cin])
            y = call(aten.linear.default, flat, weight, *(() if bias is None else (bias,)))
            out = call(aten.reshape.default, y, [n_, cout, ow] if one_d else [n_, cout, oh, ow])
        y.meta["transposed_from"] = n.name
    else:
        jh, qh, pt, pb = phase_plan(h, sh, ph, kh, oh)
        jw, qw, pl, pr = phase_plan(wd, sw, pw, kw, ow)
        kernel = torch.cat([phase_weight(wg, (sh, sw), (jh, jw)) for wg in per_group])
        if one_d:
            kernel = kernel[:, :, 0, :]
        weight = graph.add_param(f"{wn.target}_phases", kernel.contiguous(), before=n)
        weight.meta["source_fqn"] = src
        bias = None
        if b is not None:  # (per group: its phases, then its channels)
            stacked = torch.cat([b[i * cout_g:(i + 1) * cout_g].repeat(sh * sw) for i in range(groups)])
            bias = graph.add_param(f"{bn.target}_phases", stacked.contiguous(), before=n)
        qy, qx = h + pt + pb - jh + 1, wd + pl + pr - jw + 1
        with g.inserting_before(n):
            src_x, pad = x, ([pl, pr] if one_d else [pl, pr, pt, pb])
            even = pl == pr and pt == pb
            if not even:
                src_x = call(aten.constant_pad_nd.default, x, pad, 0.0)
            conv_pad = ([pl] if one_d else [pt, pl]) if even else ([0] if one_d else [0, 0])
            conv = aten.conv1d.default if one_d else aten.conv2d.default
            y = call(conv, src_x, weight, bias, [1] * dims, conv_pad, [1] * dims, groups)
            if one_d:  # [N, G, s, Cout / G, Q] -> [N, G, Cout / G, Q, s] (grouped: one group folds, `fold_pays`)
                out = call(aten.reshape.default, y, [n_, groups, sw, cout_g, qx])
                out = call(aten.permute.default, out, [0, 1, 3, 4, 2])
                out = call(aten.reshape.default, out, [n_, cout, qx * sw])
            else:
                if groups == 1:
                    out = call(aten.reshape.default, y, [n_, sh, sw, cout, qy, qx])
                    out = call(aten.permute.default, out, [0, 3, 4, 1, 5, 2])
                else:  # [N, G, s_h, s_w, Cout / G, Qy, Qx] -> [N, G, Cout / G, Qy, s_h, Qx, s_w]
                    out = call(aten.reshape.default, y, [n_, groups, sh, sw, cout_g, qy, qx])
                    out = call(aten.permute.default, out, [0, 1, 4, 5, 2, 6, 3])
                out = call(aten.reshape.default, out, [n_, cout, qy * sh, qx * sw])
                top = ph - qh * sh
                if (top, oh) != (0, qy * sh):  # (a cut of nothing is left out)
                    out = call(aten.slice.Tensor, out, 2, top, top + oh)
            left = pw - qw * sw
            if (left, ow) != (0, qx * sw):
                out = call(aten.slice.Tensor, out, dims + 1, left, left + ow)
        y.meta["transposed_from"] = n.name
    for key in ("nn_module_stack", "stack_trace", "source_fn_stack"):
        if key in n.meta:
            y.meta[key] = n.meta[key]
    if "val" in n.meta:  # (a transposed conv reading this one's output reads its shape there, before the refresh)
        out.meta["val"] = n.meta["val"]
    n.replace_all_uses_with(out)
    g.erase_node(n)
    return ""


def convs_from_transposed(graph: Graph, exclude: Iterable[str] = (), kept: dict[str, str] | None = None
                          ) -> list[str]:
    """Rewrite every 1-D / 2-D transposed conv with a float parameter weight as an ordinary conv (of G groups for
    a grouped one) of its stacked phase kernels and a pixel shuffle (a linear, for a 1 x 1 input map; a pointwise
    conv and a fold, where the phases would waste work, the conv is 1-D or the taps are dilated: module doc);
    returns the rewritten nodes' names, and puts why each other transposed conv stays into `kept` (by node name;
    quantize's `skipped`). One that `exclude` names (the node or its weight) stays as it is."""
    exclude, done = list(exclude), []
    for n in list(graph.gm.graph.nodes):
        args = _arguments(n)
        if args is None:
            continue
        if exclude and matches(node_labels(n) | (node_labels(args[1]) if isinstance(args[1], fx.Node) else set()),
                               exclude):
            continue
        why = _rewrite(graph, n, args)
        if not why:
            done.append(n.name)
        elif kept is not None:
            kept[n.name] = f"{why}: stays a float transposed conv"
    tidied(graph, len(done))
    return done


def grouped_as_convs(graph: Graph) -> Graph:
    """`graph` with each grouped transposed conv (1-D / 2-D, a float parameter weight) rewritten as above, on a
    clone; `graph` itself where it has none. For the CPU lowering, whose kernels take grouped and depthwise convs
    but left grouped transposed convs to TVM's generic conv2d_transpose (a depthwise 4x4 stride-2 upsampling of 64
    channels at 32x32: 4.3 ms against ONNX Runtime's 1.0; 4 groups: 58 ms against 0.87)."""
    def grouped(n: fx.Node):
        args = _arguments(n)
        return args if args is not None and int(args[6]) > 1 else None
    if not any(grouped(n) for n in graph.gm.graph.nodes):
        return graph
    g = graph.clone()
    done = [n for n in list(g.gm.graph.nodes) if (args := grouped(n)) is not None and not _rewrite(g, n, args)]
    tidied(g, len(done))
    return g
