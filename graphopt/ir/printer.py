"""A stable, human-readable text form of a Graph, and a diff between two of them."""
from __future__ import annotations

import difflib
from typing import Any

import torch
import torch.fx as fx

from graphopt.ir.graph import Graph, dtype_name


def target_name(target: Any) -> str:
    """'aten.conv2d.default' for an OpOverload, 'operator.getitem' for a Python function."""
    if isinstance(target, torch._ops.OpOverload):
        return f"{target.namespace}.{target._schema.name.split('::')[-1]}.{target._overloadname}"
    if isinstance(target, torch._ops.OpOverloadPacket):
        return f"{target._qualified_op_name.replace('::', '.')}"
    mod = getattr(target, "__module__", None) or ""
    name = getattr(target, "__name__", str(target))
    return f"{'operator' if mod in ('_operator', 'operator') else mod}.{name}" if mod else name


def type_str(val: Any) -> str:
    if isinstance(val, torch.Tensor):
        return f"{dtype_name(val.dtype)}[{','.join(str(int(s)) for s in val.shape)}]"
    if isinstance(val, (tuple, list)):
        return "(" + ", ".join(type_str(v) for v in val) + ")"
    return type(val).__name__


def _arg_str(a: Any) -> str:
    if isinstance(a, fx.Node):
        return ("@" if a.op == "get_attr" else "%") + a.name
    if isinstance(a, (list, tuple)):
        inner = ", ".join(_arg_str(x) for x in a)
        return f"[{inner}]" if isinstance(a, list) else f"({inner}{',' if len(a) == 1 else ''})"
    if isinstance(a, float):
        return repr(a)
    if isinstance(a, torch.dtype):
        return dtype_name(a)
    return repr(a) if isinstance(a, str) else str(a)


def node_text(n: fx.Node) -> str:
    args = [_arg_str(a) for a in n.args] + [f"{k}={_arg_str(v)}" for k, v in n.kwargs.items()]
    return f"%{n.name}: {type_str(n.meta.get('val'))} = {target_name(n.target)}({', '.join(args)})"


def graph_text(g: Graph, params: bool = True) -> str:
    """The graph as text: signature, parameters (name, type), one line per op, return."""
    lines = [f"graph({', '.join('%' + str(s) for s in g.inputs)}) -> ({', '.join(str(s) for s in g.outputs)})"]
    if params:
        for n in g.gm.graph.nodes:
            if n.op == "get_attr":
                lines.append(f"  @{n.target}: {type_str(g.get_param(n.target))}")
    for n in g.gm.graph.nodes:
        if n.op == "call_function":
            lines.append("  " + node_text(n))
        elif n.op in ("call_module", "call_method"):
            lines.append(f"  %{n.name} = {n.op} {n.target}({', '.join(_arg_str(a) for a in n.args)})")
        elif n.op == "output":
            lines.append(f"  return {_arg_str(n.args[0])}")
    return "\n".join(lines) + "\n"


def graph_diff(before: Graph, after: Graph, before_name: str = "before", after_name: str = "after") -> str:
    """Unified diff of the two text forms; empty when nothing changed."""
    a, b = before.text().splitlines(keepends=True), after.text().splitlines(keepends=True)
    return "".join(difflib.unified_diff(a, b, before_name, after_name))
