"""fold-constants: evaluate ops whose inputs are all parameters or constants, and store the result as a parameter."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
import torch.fx as fx

from graphopt.ir.graph import Graph
from graphopt.passes.canonicalize.dce import eliminate_dead_code
from graphopt.pm.registry import Contract, Pass, PassContext, PassResult, register_pass

NONDETERMINISTIC = ("rand", "dropout", "bernoulli", "normal", "uniform", "empty", "multinomial")


def _target(n) -> str:
    return getattr(n.target, "__name__", str(n.target)) if isinstance(n, fx.Node) else ""


def kept_integer_weight(n: fx.Node, consts: dict[fx.Node, torch.Tensor]) -> bool:
    """n dequantizes an integer parameter that only dynamically quantized linears read, as their weight (an ONNX
    Runtime quantize_dynamic model's MatMulInteger): folding it would store the weight as float (4x the bytes),
    and the CPU target runs those layers as int8 kernels on it (the other targets dequantize it when they lower)."""
    if _target(n) not in ("dequantize_per_channel.default", "dequantize_per_tensor.default") or not n.users:
        return False
    q = n.args[0]
    if not isinstance(q, fx.Node) or q.op != "get_attr" or q not in consts or consts[q].dtype.is_floating_point:
        return False
    return all(_target(u) == "linear.default" and len(u.args) > 1 and u.args[1] is n and
               _target(u.args[0]) == "dynamic_quantize.default" for u in n.users)


def dequantize_kept_weights(graph: Graph) -> Graph:
    """A clone of `graph` with the weights fold-constants keeps integer (kept_integer_weight) folded to float, for
    targets that have no int8 kernel for them."""
    consts = {n: graph.get_param(n.target) for n in graph.gm.graph.nodes if n.op == "get_attr"}
    if not any(n.op == "call_function" and kept_integer_weight(n, consts) for n in graph.gm.graph.nodes):
        return graph
    graph = graph.clone()
    consts = {n: graph.get_param(n.target) for n in graph.gm.graph.nodes if n.op == "get_attr"}
    for n in [n for n in graph.gm.graph.nodes if n.op == "call_function" and kept_integer_weight(n, consts)]:
        with torch.no_grad():
            value = n.target(*_value(n.args, consts), **_value(n.kwargs, consts))
        n.replace_all_uses_with(graph.add_param(f"{n.name}_folded", value.contiguous(), before=n))
    eliminate_dead_code(graph)
    graph.refresh()
    return graph


def _is_const(a, consts: dict[fx.Node, torch.Tensor]) -> bool:
    if isinstance(a, fx.Node):
        return a in consts
    if isinstance(a, (list, tuple)):
        return all(_is_const(x, consts) for x in a)
    return True


def _numel(v) -> int:
    return v.numel() if isinstance(v, torch.Tensor) else sum(t.numel() for t in v)


def _value(a, consts):
    if isinstance(a, fx.Node):
        return consts[a]
    if isinstance(a, (list, tuple)):
        return type(a)(_value(x, consts) for x in a)
    return a


@register_pass
class FoldConstants(Pass):
    name = "fold-constants"
    summary = "Precompute ops that depend only on parameters and constants (exact)."
    contract = Contract.EXACT

    @dataclass
    class Options:
        max_growth: float = field(default=4.0, metadata={
            "help": "skip a fold whose result has more than this many times the values of its inputs (e.g. expand)"})

        def validate(self) -> str:
            return "option 'max-growth' must be >= 1" if self.max_growth < 1 else ""

    def run(self, graph: Graph, ctx: PassContext) -> PassResult:
        consts: dict[fx.Node, torch.Tensor] = {}
        folded, skipped = [], {}
        # the same op on the same constants folds once: a weight several uses read as `w.t()` (a layer run in a
        # loop, ALBERT's sharing) had become one parameter per use, 4x the weights of a layer run 4 times
        canon: dict[fx.Node, Any] = {}
        seen: dict[tuple, fx.Node] = {}
        shared = 0

        def key(a):
            if isinstance(a, fx.Node):
                return ("node", canon[a])
            if isinstance(a, (list, tuple)):
                return tuple(key(x) for x in a)
            return (type(a).__name__, repr(a))

        for n in list(graph.gm.graph.nodes):
            if n.op == "get_attr":
                consts[n] = graph.get_param(n.target)
                canon[n] = n.target
                continue
            if n.op != "call_function" or not _is_const(list(n.args) + list(n.kwargs.values()), consts):
                continue
            name = getattr(n.target, "__name__", str(n.target))
            if any(k in name for k in NONDETERMINISTIC):
                continue
            if kept_integer_weight(n, consts):
                skipped[n.name] = "int8 weight of a dynamically quantized linear: kept integer (int8 kernel)"
                continue
            k = (n.target, key(n.args), key(sorted(n.kwargs.items())))
            if k in seen:
                n.replace_all_uses_with(seen[k])
                consts[n], canon[n] = consts[seen[k]], canon[seen[k]]
                shared += 1
                continue
            canon[n] = ("op", n.name)
            with torch.no_grad():
                value = n.target(*_value(n.args, consts), **_value(n.kwargs, consts))
            if not isinstance(value, torch.Tensor):
                if isinstance(value, (tuple, list)) and value and all(isinstance(v, torch.Tensor) for v in value):
                    consts[n] = value  # a split / chunk / unbind of a parameter: its getitems fold to parameters
                    seen[k] = n
                continue
            in_numel = sum(_numel(consts[a]) for a in n.all_input_nodes)
            if value.numel() > self.options.max_growth * max(in_numel, 1):
                skipped[n.name] = f"result has {value.numel()} values from {in_numel} (max-growth)"
                continue
            consts[n] = value
            if not n.users:
                continue
            node = graph.add_param(f"{n.name}_folded", value.contiguous(), before=n)
            n.replace_all_uses_with(node)
            consts[node] = value
            canon[node] = canon[n] = node.target
            seen[k] = node
            folded.append(n.name)
        if folded or shared:
            eliminate_dead_code(graph)
        stats = {"folded": len(folded), "ops": folded, "skipped": skipped}
        if shared:
            stats["shared"] = shared  # (ops whose result an earlier fold of the same op on the same values gave)
        return PassResult(graph, bool(folded or shared), stats, "" if folded or shared else
                          "no op has only constant inputs")
