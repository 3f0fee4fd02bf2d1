"""fold-pad: move a symmetric zero pad into the padding of the convolutions that consume it (exact).

TF-style "same" padding (EfficientNet) arrives as an explicit pad before a conv with padding 0; as its own kernel
that pad costs a full copy of the activation. Asymmetric pads (stride-2 "same") are kept, with the reason.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.fx as fx

from graphopt.ir.graph import Graph
from graphopt.passes.canonicalize.dce import eliminate_dead_code
from graphopt.pm.registry import Contract, Pass, PassContext, PassResult, reasons_by_op, register_pass

aten = torch.ops.aten
PADS = (aten.pad.default, aten.constant_pad_nd.default)


def check(pad: fx.Node) -> str:
    """Empty if the pad can move into its consumers, else why not."""
    widths = list(pad.args[1])
    if pad.target is aten.pad.default:
        mode = pad.args[2] if len(pad.args) > 2 else pad.kwargs.get("mode", "constant")
        value = pad.args[3] if len(pad.args) > 3 else pad.kwargs.get("value")
        if mode != "constant":
            return f"{mode} padding"
    else:
        value = pad.args[2] if len(pad.args) > 2 else 0.0
    if value not in (None, 0, 0.0):
        return f"pads with {value}, not zero"
    if len(widths) != 4:
        return "does not pad exactly the two spatial dims"
    left, right, top, bottom = widths
    if left != right or top != bottom or min(widths) < 0:
        return f"asymmetric ({widths})"
    for u in pad.users:
        if u.target is not aten.conv2d.default or u.args[0] is not pad:
            return f"used by '{u.name}', which is not a conv2d input"
        if len(u.args) > 4 and isinstance(u.args[4], str):
            return f"'{u.name}' has string padding"
    return ""


@register_pass
class FoldPad(Pass):
    name = "fold-pad"
    summary = "Fold symmetric zero pads into the padding of the convs that read them (exact)."
    contract = Contract.EXACT

    @dataclass
    class Options:
        pass

    def run(self, graph: Graph, ctx: PassContext) -> PassResult:
        folded, kept = [], {}
        for pad in [n for n in graph.gm.graph.nodes if n.op == "call_function" and n.target in PADS]:
            reason = check(pad)
            if reason:
                kept[pad.name] = reason
                continue
            left, _, top, _ = pad.args[1]
            for conv in list(pad.users):
                args = list(conv.args)
                while len(args) < 5:
                    args.append([1, 1] if len(args) == 3 else [0, 0] if len(args) == 4 else None)
                ph, pw = (list(args[4]) * 2)[:2] if len(args[4]) == 1 else list(args[4])
                args[0], args[4] = pad.args[0], [ph + top, pw + left]
                conv.args = tuple(args)
            folded.append(pad.name)
        if folded:
            eliminate_dead_code(graph)
        reason = "" if folded else (reasons_by_op(kept) or "no pad")
        return PassResult(graph, bool(folded), {"folded": len(folded), "kept": kept}, reason)
