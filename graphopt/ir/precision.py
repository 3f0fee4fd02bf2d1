"""float16 / bfloat16 graphs computed in float32, behind the graph's own interface.

graphopt's CPU kernels and its quantization ops are float32. A half-precision graph is widened, as ONNX Runtime
does for CPUs without half kernels: its half parameters and constants become float32 (exactly), every dtype the
graph names (casts, factory ops) becomes float32, each half input is widened first and each half output narrowed
last, so the graph still takes and returns what the model does. The outputs round once, at the end, where PyTorch
rounds after every op: they are at least as accurate as PyTorch's half CPU result.
"""
from __future__ import annotations

import torch
import torch.fx as fx

from graphopt.ir.graph import DTYPES, Graph

HALF = (torch.float16, torch.bfloat16)


def _widen_arg(a):
    if isinstance(a, torch.dtype):
        return torch.float32 if a in HALF else a
    if isinstance(a, (list, tuple)):
        return type(a)(_widen_arg(x) for x in a)
    if isinstance(a, dict):
        return {k: _widen_arg(v) for k, v in a.items()}
    return a


_aten = torch.ops.aten
# ops that only move or copy values (views, copies, slices: no arithmetic, no cast)
VALUE_MOVES = {_aten.view.default, _aten.reshape.default, _aten._unsafe_view.default, _aten.permute.default,
               _aten.transpose.int, _aten.expand.default, _aten.clone.default, _aten.contiguous.default,
               _aten.squeeze.dim, _aten.squeeze.dims, _aten.unsqueeze.default, _aten.slice.Tensor, _aten.select.int,
               _aten.flatten.using_ints, _aten.alias.default, _aten.detach.default}
# those and casts: a graph whose half values come from these alone rounds on purpose
_MOVES = VALUE_MOVES | {_aten._to_copy.default, _aten.to.dtype, _aten.to.dtype_layout, _aten.type_as.default}


def is_half(graph: Graph) -> bool:
    """Whether `graph` is a half-precision model: a float16 / bfloat16 input, parameter or buffer, or an op that
    computes in half (a `torch.autocast` region in forward: its linears ran in bfloat16 with mixed-dtype bias adds
    TVM refused). (A float32 model that rounds through bfloat16 on purpose, `x.bfloat16().float()`, is not: its
    casts are kept.)"""
    if any(DTYPES[s.dtype] in HALF for s in graph.inputs):
        return True
    if any(t.dtype in HALF for t in list(graph.gm.parameters()) + list(graph.gm.buffers())):
        return True
    return any(n.op == "call_function" and n.target not in _MOVES and isinstance(n.meta.get("val"), torch.Tensor)
               and n.meta["val"].dtype in HALF for n in graph.gm.graph.nodes)


def widen_half(graph: Graph) -> Graph:
    """`graph` itself when `is_half` is false, else a copy that computes in float32 with the same input and output
    dtypes."""
    if not is_half(graph):
        return graph
    g = graph.clone()
    with torch.no_grad():
        for t in list(g.gm.parameters()) + list(g.gm.buffers()):
            if t.dtype in HALF:
                t.data = t.data.float()
    fxg = g.gm.graph
    to_copy = torch.ops.aten._to_copy.default
    for n in list(fxg.nodes):
        if n.op == "placeholder":
            val = n.meta.get("val")
            if val is not None and val.dtype in HALF:
                with fxg.inserting_after(n):
                    wide = fxg.call_function(to_copy, (n,), {"dtype": torch.float32})
                n.replace_all_uses_with(wide, delete_user_cb=lambda u: u is not wide)
        elif n.op == "call_function":
            n.args, n.kwargs = _widen_arg(n.args), _widen_arg(n.kwargs)
        elif n.op == "output":
            outs = []
            for arg, spec in zip(n.args[0], graph.outputs):
                dt = DTYPES[spec.dtype]
                if dt in HALF and isinstance(arg, fx.Node):
                    with fxg.inserting_before(n):
                        arg = fxg.call_function(to_copy, (arg,), {"dtype": dt})
                outs.append(arg)
            n.args = (tuple(outs),)
    g.refresh()
    return g
