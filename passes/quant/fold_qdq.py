"""fold-qdq: rewrite dequantize -> conv1d/conv2d/conv3d/linear/matmul (fed by quantizes) into graphopt's integer
ops: int8 x int8 with exact int32 accumulation and one float rescale per output channel (a conv1d as a conv2d on a
one-row map, a conv3d as a conv2d over its depth taps).
Equal to the Q/DQ graph up to float rounding; Q/DQ pairs that do not fit stay and are reported with the reason.
An activation function between two int8 grids (dequantize -> SiLU / GELU ... -> quantize, as `quantize{tables}`
leaves them) becomes a 256-entry table on the codes (`lookup_tables`, graphopt.lut).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import torch
import torch.fx as fx

import graphopt.ir.quant_ops  # noqa: F401  registers the graphopt ops
from graphopt.ir.quant_ops import unfold_integer_ops  # noqa: F401  (its home is the IR; kept importable here)
from graphopt.ir.graph import Graph
from graphopt.passes.analysis.weights import tidied
from graphopt.passes.canonicalize.dce import eliminate_dead_code
from graphopt.passes.canonicalize.transposed import conv_ints
from graphopt.passes.quant.quantize import before_in_graph
from graphopt.pm.registry import Contract, Pass, PassContext, PassResult, reasons_by_op, register_pass

aten = torch.ops.aten
go = torch.ops.graphopt
MATMULS = (aten.matmul.default, aten.bmm.default)


def _arg(n: fx.Node, i: int, default):
    return n.args[i] if len(n.args) > i else default


def _one(v, default: int) -> int:
    """A conv1d's stride / padding / dilation argument (an int or a one-element list) as an int."""
    if isinstance(v, (list, tuple)):
        return int(v[0]) if v else default
    return int(v)


# ops that move or select int8 codes without changing any (ONNX Runtime's QOperator files apply MaxPool, Reshape,
# Transpose ... to the codes themselves): a dequantize after them still reads codes of the quantize before them
CODE_MOVES = {aten.max_pool2d.default, aten.max_pool1d.default, aten.view.default, aten.reshape.default,
              aten._unsafe_view.default, aten.permute.default, aten.transpose.int, aten.t.default, aten.slice.Tensor,
              aten.select.int, aten.unsqueeze.default, aten.squeeze.dim, aten.squeeze.dims, aten.squeeze.default,
              aten.flatten.using_ints, aten.clone.default, aten.expand.default}


def _through_moves(x) -> tuple[object, list[fx.Node]]:
    """(what x reads through code moves (CODE_MOVES), the moves from x back to it)."""
    chain = []
    while isinstance(x, fx.Node) and x.target in CODE_MOVES:
        chain.append(x)
        x = x.args[0]
    return x, chain


def _replay_moves(g: fx.Graph, chain: list[fx.Node], value: fx.Node) -> fx.Node:
    """The moves of `chain` (as `_through_moves` lists them, the last one first) applied to `value` anew."""
    for m in reversed(chain):
        value = g.call_function(m.target, (value, *m.args[1:]), dict(m.kwargs))
    return value


def _replace(graph: Graph, old: fx.Node, new: fx.Node) -> None:
    old.replace_all_uses_with(new)
    graph.gm.graph.erase_node(old)


def _quantized(x) -> bool:
    """x is dequantize_per_tensor of int8 codes made by quantize_per_tensor (or a table lookup, `lookup_tables`),
    with code moves (CODE_MOVES) in between allowed."""
    if not (isinstance(x, fx.Node) and x.target is go.dequantize_per_tensor.default):
        return False
    q, _ = _through_moves(x.args[0])
    return isinstance(q, fx.Node) and q.target in (go.quantize_per_tensor.default, go.lut.default)


def lookup_tables(graph: Graph) -> list[str]:
    """Each int8 quantize of an elementwise function of one int8 dequantize (dequantize -> SiLU / GELU / sigmoid
    ... -> quantize, `tables.backward_chain`) becomes graphopt.lut on the codes, its table the quantize's codes for
    each of the 256 inputs (`tables.table`): exact against the float chain it replaces. Returns the names of the
    quantizes replaced."""
    from graphopt.passes.quant.tables import backward_chain, table
    g, done = graph.gm.graph, []
    for qn in [n for n in g.nodes if n.op == "call_function" and n.target is go.quantize_per_tensor.default]:
        found = backward_chain(graph, qn.args[0]) if isinstance(qn.args[0], fx.Node) and \
            _arg(qn, 5, None) == torch.int8 else None
        if found is None:
            continue
        chain, source = found
        codes = table(graph, chain, source, qn)
        with g.inserting_before(qn):
            t = graph.add_param(f"{qn.name}_table", codes, before=qn)
            new = g.call_function(go.lut.default, (source.args[0], t))
        qn.replace_all_uses_with(new)
        g.erase_node(qn)
        done.append(qn.name)
    if done:
        eliminate_dead_code(graph)
        graph.refresh()
    return done


def requantized_moves(graph: Graph) -> int:
    """quantize(moves(dequantize(q))) onto the grid q is already on -> moves(q), the codes moved as they are (ONNX
    Runtime's QDQ files put a Q/DQ pair around every reshape / transpose: in a Swin file one such chain, kept as
    float arithmetic fused with the transpose, took 490 us of 3.1 ms). Exact: the dequantize's scale and zero point
    are the quantize's, and the codes come from a quantize of the same dtype whose range lies within this one's
    (so the clamp changes nothing), through CODE_MOVES (ops that move codes without changing any). Returns how
    many quantizes were dropped; the float chain stays for other readers (dead code otherwise)."""
    g = graph.gm.graph
    done = 0
    for qn in [n for n in g.nodes if n.op == "call_function" and n.target is go.quantize_per_tensor.default]:
        x, chain = _through_moves(qn.args[0])
        if not (isinstance(x, fx.Node) and x.target is go.dequantize_per_tensor.default
                and (float(x.args[1]), int(x.args[2])) == (float(qn.args[1]), int(qn.args[2]))):
            continue
        src, _ = _through_moves(x.args[0])
        if not (isinstance(src, fx.Node) and src.target is go.quantize_per_tensor.default
                and _arg(src, 5, None) == _arg(qn, 5, None)
                and int(src.args[3]) >= int(qn.args[3]) and int(src.args[4]) <= int(qn.args[4])):
            continue
        with g.inserting_before(qn):
            codes = _replay_moves(g, chain, x.args[0])
        _replace(graph, qn, codes)
        done += 1
    return tidied(graph, done)


# ops that only move values (each output is one input value), through which a quantize may go first
_VALUE_MOVES = {aten.view.default, aten.reshape.default, aten._unsafe_view.default, aten.permute.default,
                aten.transpose.int, aten.slice.Tensor, aten.unsqueeze.default, aten.squeeze.dim, aten.squeeze.dims,
                aten.squeeze.default, aten.flatten.using_ints, aten.clone.default}


def quantize_before_moves(graph: Graph) -> int:
    """qconv2d -> value moves (reshape / permute / slice ...) and at most one ReLU / clamp -> int8 quantize, each
    read only by the next, becomes qconv2d -> [clamp] -> quantize -> the moves on the codes. Exact: rounding onto
    a grid is elementwise, so it commutes with moving values, and the clamp is elementwise too. The conv's kernel
    then stores int8 with the quantize in its store (`_quant_chain` in the CPU lowering) and the moves copy a
    quarter of the bytes; a transposed conv as phase conv + pixel shuffle (`convs_from_transposed`) had shuffled
    its float output and quantized it after (0.30 ms a layer of 64 channels at 56x56). Returns how many moved."""
    g, done = graph.gm.graph, 0
    for qn in [n for n in g.nodes if n.op == "call_function" and n.target is go.quantize_per_tensor.default]:
        if _arg(qn, 5, None) != torch.int8:
            continue
        chain, clamp, x = [], None, qn.args[0]
        while isinstance(x, fx.Node) and len(x.users) == 1 and (
                x.target in _VALUE_MOVES or (clamp is None and _clamp_bounds(x) is not None)):
            if x.target in _VALUE_MOVES:
                chain.append(x)
            else:
                clamp = x
            x = x.args[0]
        if not chain or not (isinstance(x, fx.Node) and x.target is go.qconv2d.default and len(x.users) == 1):
            continue
        with g.inserting_before(qn):
            y = x if clamp is None else g.call_function(clamp.target, (x, *clamp.args[1:]), dict(clamp.kwargs))
            y = _replay_moves(g, chain, g.call_function(qn.target, (y, *qn.args[1:]), dict(qn.kwargs)))
        _replace(graph, qn, y)
        done += 1
    return tidied(graph, done)


def foldable_ops(graph: Graph) -> list[str]:
    """The names of the ops fold-qdq would turn into integer ops (`check` passes): a quantized graph's."""
    return [n.name for n in graph.nodes("call_function") if not check(graph, n)]


def check(graph: Graph, op: fx.Node) -> str:
    """Empty if `op` can become an integer op, else why not."""
    if op.target in MATMULS:
        return "" if _quantized(op.args[0]) and _quantized(op.args[1]) else "an operand is not quantized"
    if op.target not in (aten.linear.default, aten.conv2d.default, aten.conv1d.default, aten.conv3d.default):
        return "only linear, conv1d / conv2d / conv3d and matmul have integer kernels"
    x, w = op.args[0], op.args[1]
    if not _quantized(x):
        return "input is not quantized (activations=none, or excluded)"
    if not (isinstance(w, fx.Node) and w.target is go.dequantize_per_channel.default and w.args[3] == 0
            and all(isinstance(a, fx.Node) and a.op == "get_attr" for a in w.args[:3])):
        return "weight is not a per-output-channel dequantized parameter"
    if graph.get_param(w.args[2].target).abs().max() != 0:
        return "weight zero points are not zero (asymmetric weights)"
    bias = _arg(op, 2, None)
    if bias is not None and not (isinstance(bias, fx.Node) and bias.op == "get_attr"):
        return "bias is computed"
    if op.target in (aten.conv2d.default, aten.conv1d.default, aten.conv3d.default) and \
            isinstance(_arg(op, 4, [0, 0]), str):
        return "string padding"
    val = x.meta.get("val") if isinstance(x, fx.Node) else None
    if op.target is aten.conv1d.default and (val is None or val.dim() != 3):
        return "unbatched conv1d input (the integer conv takes [N, C, L])"
    if op.target is aten.conv3d.default:
        if val is None or val.dim() != 5:
            return "unbatched conv3d input (the integer conv takes [N, C, D, H, W])"
        if int(_arg(op, 6, 1)) != 1:
            return "grouped conv3d (the integer 3-D conv is a 2-D one over depth taps, ungrouped)"
        if conv_ints(_arg(op, 5, [1]), 3)[0] != 1:
            return "conv3d dilated in depth (the depth taps are adjacent slices)"
    return ""


def _conv3d_as_2d(graph: Graph, op: fx.Node, q_x: fx.Node, scale: float, zp: int, wq: fx.Node, ws: fx.Node,
                  bias) -> fx.Node:
    """An int8 conv3d as graphopt's int8 2-D conv (inserted before `op`; returns the [N, Cout, OD, OH, OW] output):
    a (kd, 1, 1) conv of stride 1 padded in depth only (R(2+1)D's temporal convs, 1x1x1 heads) as a kd x 1 conv over
    [N, C, D, H W], with no copy; any other over the depth taps (`graphopt.depth_taps`: [N OD, C kd, H, W], padded
    with the zero point) with the weight [Cout, C kd, kh, kw], its [N OD, Cout, OH, OW] output permuted back. Exact:
    the same products, summed in int32. A quantized 3-D UNet had kept its convs in float on the dequantized codes,
    its int8 build 1.05x the fp32 one's time."""
    g = graph.gm.graph
    n, c, d, h, w = (int(v) for v in q_x.meta["val"].shape)
    cout, _, kd, kh, kw = (int(v) for v in graph.get_param(wq.target).shape)
    (sd, sh, sw), (pd, ph, pw), (_, dh, dw) = (conv_ints(_arg(op, i, [v]), 3)
                                               for i, v in ((3, 1), (4, 0), (5, 1)))
    od, oh, ow = (int(v) for v in op.meta["val"].shape[2:])
    temporal = (kh, kw, sd, sh, sw, ph, pw) == (1, 1, 1, 1, 1, 0, 0)
    key = f"{wq.target}_{'kd1' if temporal else 'taps'}"
    w2 = before_in_graph(graph, op, lambda m: m.meta.get("as_2d_from") == key)
    if w2 is None:  # (once for a weight several convs read)
        wt = graph.get_param(wq.target)
        w2 = graph.add_param(f"{wq.target}_2d", wt.reshape(cout, c, kd, 1) if temporal else
                             wt.reshape(cout, c * kd, kh, kw), before=op)
        w2.meta["as_2d_from"] = key
    if temporal:
        x2 = g.call_function(aten.reshape.default, (q_x, [n, c, d, h * w]))
        y = g.call_function(go.qconv2d.default, (x2, scale, zp, w2, ws, bias, [1, 1], [pd, 0], [1, 1], 1))
        return g.call_function(aten.reshape.default, (y, [n, cout, od, oh, ow]))
    x2 = g.call_function(go.depth_taps.default, (q_x, kd, sd, pd, float(zp)))
    y = g.call_function(go.qconv2d.default, (x2, scale, zp, w2, ws, bias, [sh, sw], [ph, pw], [dh, dw], 1))
    y = g.call_function(aten.reshape.default, (y, [n, od, cout, oh, ow]))
    return g.call_function(aten.permute.default, (y, [0, 2, 1, 3, 4]))


def _clamp_bounds(n: fx.Node) -> tuple[float | None, float | None] | None:
    """(lo, hi) of a ReLU / ReLU6 / hardtanh / clamp node, None for anything else."""
    t = n.target
    if t is aten.relu.default:
        return 0.0, None
    if t is aten.relu6.default:
        return 0.0, 6.0
    if t is aten.hardtanh.default:
        return float(_arg(n, 1, -1.0)), float(_arg(n, 2, 1.0))
    if t is aten.clamp.default:
        lo, hi = _arg(n, 1, None), _arg(n, 2, None)
        return (None if lo is None else float(lo)), (None if hi is None else float(hi))
    return None


def fixed_point_requantize(graph: Graph) -> tuple[int, dict[str, str]]:
    """qconv2d/qlinear -> [ReLU/ReLU6/clamp] -> int8 quantize becomes qconv2d_i32/qlinear_i32 (int32 accumulator
    with an int32 bias) -> requantize (Q31 multiplier and shift per channel; the activation's bounds become the
    clamp in grid steps, exact because rounding is monotonic). Integer-only from input to output grid."""
    from graphopt.ir.quant_ops import fixed_point_multiplier
    g = graph.gm.graph
    done, kept = 0, {}
    for op in [n for n in g.nodes if n.target in (go.qconv2d.default, go.qlinear.default)]:
        users = list(op.users)
        act = users[0] if len(users) == 1 and _clamp_bounds(users[0]) is not None else None
        if act is not None:
            users = list(act.users)
        if not (len(users) == 1 and users[0].target is go.quantize_per_tensor.default):
            kept[op.name] = "its output is not quantized next (stays float)"
            continue
        qn = users[0]
        s_out, zp_out, qmin, qmax = float(qn.args[1]), int(qn.args[2]), int(qn.args[3]), int(qn.args[4])
        sx, ws_node, b_node = float(op.args[1]), op.args[4], op.args[5]
        if not (isinstance(ws_node, fx.Node) and ws_node.op == "get_attr"):
            kept[op.name] = "weight scales are computed"
            continue
        ws = graph.get_param(ws_node.target).double()
        acc_scale = sx * ws
        bias_i32 = None
        if b_node is not None:
            b = torch.round(graph.get_param(b_node.target).double() / acc_scale)
            if b.abs().max() > 2 ** 31 - 1:
                kept[op.name] = "bias does not fit int32 at the accumulator's scale"
                continue
            bias_i32 = b.to(torch.int32)
        if act is not None:
            lo, hi = _clamp_bounds(act)
            if lo is not None:
                qmin = max(qmin, int(round(lo / s_out)) + zp_out)
            if hi is not None:
                qmax = min(qmax, int(round(hi / s_out)) + zp_out)
        m, shift = fixed_point_multiplier(acc_scale / s_out)
        with g.inserting_before(op):
            nb = graph.add_param(f"{op.args[3].target}_bias_i32", bias_i32, before=op) if bias_i32 is not None \
                else None
            nm = graph.add_param(f"{op.args[3].target}_requant_m", m, before=op)
            ns = graph.add_param(f"{op.args[3].target}_requant_shift", shift, before=op)
            if op.target is go.qconv2d.default:
                acc = g.call_function(go.qconv2d_i32.default, (*op.args[:5], nb, *op.args[6:10]))
                axis = 1
            else:
                acc = g.call_function(go.qlinear_i32.default, (*op.args[:5], nb))
                axis = len(op.meta["val"].shape) - 1 if op.meta.get("val") is not None else -1
            r = g.call_function(go.requantize.default, (acc, nm, ns, axis, s_out, zp_out, qmin, qmax))
        qn.replace_all_uses_with(r)
        done += 1
    if done:
        eliminate_dead_code(graph)
        graph.refresh()
    return done, kept


@register_pass
class FoldQDQ(Pass):
    name = "fold-qdq"
    summary = ("Turn dequantize -> conv1d/2d/3d/linear/matmul <- quantize into int8 x int8 -> int32 ops with a float "
               "rescale.")
    # exact integer accumulation vs the float Q/DQ reference: values on a rounding tie at a later quantize can move
    # one step (1 LSB), which the SQNR bound allows and a max-error bound would not
    contract = Contract.BOUNDED
    min_sqnr_db = 40.0

    @dataclass
    class Options:
        requantize: Literal["float", "fixed"] = field(default="float", metadata={
            "help": "float: one float32 multiplier per channel (the CPU kernels fuse it); fixed: integer-only, an "
                    "int32 accumulator with an int32 bias and a Q31 multiplier + shift per channel into the next "
                    "int8 grid (for integer-only targets; the CPU target runs it with generic kernels)"})

    def run(self, graph: Graph, ctx: PassContext) -> PassResult:
        moved = requantized_moves(graph)
        tables = lookup_tables(graph)
        g = graph.gm.graph
        folded, kept = [], {}
        for op in [n for n in g.nodes if n.op == "call_function" and n.target in (
                aten.linear.default, aten.conv2d.default, aten.conv1d.default, aten.conv3d.default, *MATMULS)]:
            reason = check(graph, op)
            if reason:
                if op.target not in MATMULS:  # a float matmul is not a layer anyone asked to quantize
                    kept[op.name] = reason
                continue
            if op.target in MATMULS:
                a, b = op.args[0], op.args[1]
                with g.inserting_before(op):
                    new = g.call_function(go.qmatmul.default, (a.args[0], float(a.args[1]), int(a.args[2]),
                                                               b.args[0], float(b.args[1]), int(b.args[2])))
                op.replace_all_uses_with(new)
                g.erase_node(op)
                folded.append(new.name)
                continue
            dq_x, dq_w = op.args[0], op.args[1]
            q_x = dq_x.args[0]
            scale, zp = float(dq_x.args[1]), int(dq_x.args[2])
            wq, ws = dq_w.args[0], dq_w.args[1]
            bias = _arg(op, 2, None)
            with g.inserting_before(op):
                if op.target is aten.linear.default:
                    new = g.call_function(go.qlinear.default, (q_x, scale, zp, wq, ws, bias))
                elif op.target is aten.conv1d.default:
                    # a conv2d on a one-row map (graphopt's int8 kernels; as a Relax conv1d on the dequantized
                    # weight it ran TVM's generic loop: a quantized PointNet 2.2x its fp32 time)
                    wq2 = before_in_graph(graph, op, lambda n: n.meta.get("unsqueezed_from") == wq.target)
                    if wq2 is None:  # (once for a weight several convs read)
                        wq2 = graph.add_param(f"{wq.target}_2d", graph.get_param(wq.target).unsqueeze(2), before=op)
                        wq2.meta["unsqueezed_from"] = wq.target
                    # the stride and the dilation on both axes (the one row gives one output row either way):
                    # graphopt's kernels take square ones, and with (1, s) a wav2vec2 feature conv (256 channels,
                    # 3 taps, stride 2 on 3199 samples) ran TVM's generic int8 conv, 94 ms (a TCN's dilated convs
                    # with (1, d) the same way)
                    stride, dilation = _one(_arg(op, 3, [1]), 1), _one(_arg(op, 5, [1]), 1)
                    args = (g.call_function(aten.unsqueeze.default, (q_x, 2)), scale, zp, wq2, ws, bias,
                            [stride, stride], [0, _one(_arg(op, 4, [0]), 0)], [dilation, dilation],
                            int(_arg(op, 6, 1)))
                    new = g.call_function(aten.squeeze.dim, (g.call_function(go.qconv2d.default, args), 2))
                elif op.target is aten.conv3d.default:
                    new = _conv3d_as_2d(graph, op, q_x, scale, zp, wq, ws, bias)
                else:
                    args = (q_x, scale, zp, wq, ws, bias, list(_arg(op, 3, [1, 1])), list(_arg(op, 4, [0, 0])),
                            list(_arg(op, 5, [1, 1])), int(_arg(op, 6, 1)))
                    new = g.call_function(go.qconv2d.default, args)
            op.replace_all_uses_with(new)
            g.erase_node(op)
            folded.append(new.name)
        if folded:
            eliminate_dead_code(graph)
        quantized_first = quantize_before_moves(graph) if folded else 0
        fixed, float_kept = (fixed_point_requantize(graph) if self.options.requantize == "fixed" and folded
                             else (0, {}))
        reason = "" if folded or moved or tables else (
            "nothing to fold: " + reasons_by_op(kept) if kept else "no quantized conv2d or linear (run quantize first)")
        stats = {"folded": len(folded), "kept": kept, "requantized_moves": moved, "lookup_tables": len(tables),
                 "quantized_before_moves": quantized_first}
        if self.options.requantize == "fixed":
            stats.update(fixed_point_requantized=fixed, float_requantize=float_kept)
        return PassResult(graph, bool(folded or moved or tables), stats, reason)
