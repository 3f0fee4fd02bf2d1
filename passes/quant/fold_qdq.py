"""fold-qdq: rewrite dequantize -> conv2d/linear/matmul (fed by quantizes) into graphopt's integer ops: int8 x int8 with
exact int32 accumulation and one float rescale per output channel. Equal to the Q/DQ graph up to float rounding;
Q/DQ pairs that do not fit stay and are reported with the reason."""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.fx as fx

import graphopt.ir.quant_ops  # noqa: F401  registers the graphopt ops
from graphopt.ir.graph import Graph
from graphopt.passes.canonicalize.dce import eliminate_dead_code
from graphopt.pm.registry import Contract, Pass, PassContext, PassResult, register_pass

aten = torch.ops.aten
go = torch.ops.graphopt
MATMULS = (aten.matmul.default, aten.bmm.default)


def _arg(n: fx.Node, i: int, default):
    return n.args[i] if len(n.args) > i else default


def _quantized(x) -> bool:
    """x is dequantize_per_tensor(quantize_per_tensor(...))."""
    return (isinstance(x, fx.Node) and x.target is go.dequantize_per_tensor.default
            and isinstance(x.args[0], fx.Node) and x.args[0].target is go.quantize_per_tensor.default)


def check(graph: Graph, op: fx.Node) -> str:
    """Empty if `op` can become an integer op, else why not."""
    if op.target in MATMULS:
        return "" if _quantized(op.args[0]) and _quantized(op.args[1]) else "an operand is not quantized"
    if op.target not in (aten.linear.default, aten.conv2d.default):
        return "only linear, conv2d and matmul have integer kernels"
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
    if op.target is aten.conv2d.default and isinstance(_arg(op, 4, [0, 0]), str):
        return "string padding"
    return ""


@register_pass
class FoldQDQ(Pass):
    name = "fold-qdq"
    summary = ("Turn dequantize -> conv2d/linear/matmul <- quantize into int8 x int8 -> int32 ops with a float "
               "rescale.")
    # exact integer accumulation vs the float Q/DQ reference: values on a rounding tie at a later quantize can move
    # one step (1 LSB), which the SQNR bound allows and a max-error bound would not
    contract = Contract.BOUNDED
    min_sqnr_db = 40.0

    @dataclass
    class Options:
        pass

    def run(self, graph: Graph, ctx: PassContext) -> PassResult:
        g = graph.gm.graph
        folded, kept = [], {}
        for op in [n for n in g.nodes if n.op == "call_function" and n.target in (aten.linear.default,
                                                                                   aten.conv2d.default, *MATMULS)]:
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
                else:
                    args = (q_x, scale, zp, wq, ws, bias, list(_arg(op, 3, [1, 1])), list(_arg(op, 4, [0, 0])),
                            list(_arg(op, 5, [1, 1])), int(_arg(op, 6, 1)))
                    new = g.call_function(go.qconv2d.default, args)
            op.replace_all_uses_with(new)
            g.erase_node(op)
            folded.append(new.name)
        if folded:
            eliminate_dead_code(graph)
        reason = "" if folded else ("nothing to fold: " + "; ".join(f"{k}: {v}" for k, v in kept.items())
                                    if kept else "no quantized conv2d or linear (run quantize first)")
        return PassResult(graph, bool(folded), {"folded": len(folded), "kept": kept}, reason)


def unfold_integer_ops(graph: Graph) -> Graph:
    """The inverse of fold-qdq, on a clone: qconv2d/qlinear/qmatmul become dequantize -> float op again (same
    values: the integer ops equal their Q/DQ form within a rounding step). The ONNX exporter writes that QDQ form,
    which ONNX Runtime fuses back into its own integer kernels."""
    out = graph.clone()
    g = out.gm.graph
    names = {"qconv2d.default", "qlinear.default", "qmatmul.default"}
    todo = [n for n in g.nodes if n.op == "call_function" and getattr(n.target, "__name__", "") in names]
    for n in todo:
        with g.inserting_before(n):
            if n.target is go.qmatmul.default:
                a = g.call_function(go.dequantize_per_tensor.default, tuple(n.args[0:3]))
                b = g.call_function(go.dequantize_per_tensor.default, tuple(n.args[3:6]))
                new = g.call_function(aten.matmul.default, (a, b))
            else:
                xq, sx, zx, wq, ws, bias = n.args[:6]
                x = g.call_function(go.dequantize_per_tensor.default, (xq, sx, zx))
                zeros = out.add_param(f"{wq.target}_zp", torch.zeros(out.get_param(wq.target).shape[0],
                                                                     dtype=torch.int32), before=x)
                w = g.call_function(go.dequantize_per_channel.default, (wq, ws, zeros, 0))
                if n.target is go.qlinear.default:
                    new = g.call_function(aten.linear.default, (x, w, bias))
                else:
                    new = g.call_function(aten.conv2d.default, (x, w, bias, *n.args[6:10]))
        n.replace_all_uses_with(new)
        g.erase_node(n)
    if todo:
        out.refresh()
    return out
