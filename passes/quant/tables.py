"""Activation functions between two int8 grids as 256-entry tables.

A quantized layer's output that goes through float elementwise functions of itself alone (SiLU = x * sigmoid(x),
GELU, tanh, hardswish, Mish, ...) into the next quantized layer's grid computes, per element, a function of one
int8 code: dequantize -> f -> quantize has 256 possible inputs. `quantize{tables=...}` puts an int8 grid on the layer's
output before such a chain (one more rounding, as ONNX Runtime's QDQ files place one around every activation);
`fold-qdq` evaluates the chain once on the 256 codes and replaces it with `graphopt.lut` (table[q + 128]), so the
layer's kernel stores int8 and the function costs a byte lookup instead of an exp and a divide per element in
float. Exact against the Q/DQ graph it replaces (the table holds what the chain computes for each code)."""
from __future__ import annotations

import torch
import torch.fx as fx

from graphopt.ir.graph import Graph

aten = torch.ops.aten

# float elementwise ops whose result, for scalar other operands, is a function of their activation operand(s)
UNARY = {aten.sigmoid.default, aten.tanh.default, aten.silu.default, aten.gelu.default, aten.hardswish.default,
         aten.hardsigmoid.default, aten.mish.default, aten.softplus.default, aten.elu.default, aten.selu.default,
         aten.celu.default, aten.leaky_relu.default, aten.exp.default, aten.erf.default, aten.neg.default,
         aten.abs.default, aten.relu.default, aten.relu6.default, aten.hardtanh.default, aten.clamp.default,
         aten.square.default, aten.reciprocal.default, aten.pow.Tensor_Scalar, aten.log1p.default}
BINARY = {aten.mul.Tensor, aten.add.Tensor, aten.sub.Tensor, aten.div.Tensor, aten.rsub.Scalar, aten.mul.Scalar,
          aten.add.Scalar, aten.sub.Scalar, aten.div.Scalar, aten.maximum.default, aten.minimum.default}
# ops that a conv kernel's store already applies (a clamp in grid steps): a chain of only these is left to it
CLAMPS = {aten.relu.default, aten.relu6.default, aten.hardtanh.default, aten.clamp.default}


def _scalar(graph: Graph, a) -> bool:
    """A Python number, or a float parameter of one element."""
    if isinstance(a, (int, float)) and not isinstance(a, bool):
        return True
    if not (isinstance(a, fx.Node) and a.op == "get_attr"):
        return False
    t = graph.get_param(a.target)
    return t.numel() == 1 and t.is_floating_point()


def _elementwise(graph: Graph, n: fx.Node) -> list[fx.Node] | None:
    """The activation operands of `n` when it is a float32 elementwise function of them (all of its output's
    shape) with scalar other operands; else None."""
    if n.op != "call_function" or n.target not in UNARY | BINARY or any(
            isinstance(v, (fx.Node, list, tuple)) for v in n.kwargs.values()):
        return None
    val = n.meta.get("val")
    if val is None or val.dtype != torch.float32:
        return None
    ops = []
    for a in n.args:
        if isinstance(a, (list, tuple)):
            return None
        if isinstance(a, fx.Node) and not _scalar(graph, a):
            if a.meta.get("val") is None or tuple(a.meta["val"].shape) != tuple(val.shape):
                return None
            ops.append(a)
    return ops or None


def forward_chain(graph: Graph, start: fx.Node) -> tuple[set[fx.Node], fx.Node] | None:
    """(the elementwise chain `start`, a layer's float output, feeds, its one end: the node read outside it) when
    every reader of `start` is in the chain, every chain op's activation operands come from it, and it does more
    than clamp; else None."""
    chain: set[fx.Node] = set()
    reach = {start}
    after = False
    for n in graph.gm.graph.nodes:
        after = after or n is start
        if not after or n is start or not any(a in reach for a in n.all_input_nodes):
            continue
        ops = _elementwise(graph, n)
        if ops is not None and all(a in reach for a in ops):
            chain.add(n)
            reach.add(n)
    if not chain or not set(start.users) <= chain or all(n.target in CLAMPS for n in chain):
        return None
    ends = [n for n in chain if not set(n.users) <= chain]
    return (chain, ends[0]) if len(ends) == 1 else None


def backward_chain(graph: Graph, end: fx.Node) -> tuple[list[fx.Node], fx.Node] | None:
    """(the chain in graph order, its one source) for an elementwise chain ending at `end` whose activation
    operands all reach back to one dequantize_per_tensor of int8 codes and whose nodes but `end` are read only
    inside it; None otherwise, or where the chain only clamps."""
    dq_op = torch.ops.graphopt.dequantize_per_tensor.default
    chain: set[fx.Node] = set()
    sources: set[fx.Node] = set()
    todo = [end]
    while todo:
        n = todo.pop()
        if n in chain or n in sources:
            continue
        if n.op == "call_function" and n.target is dq_op:
            codes = n.args[0].meta.get("val") if isinstance(n.args[0], fx.Node) else None
            if codes is None or codes.dtype != torch.int8:
                return None
            sources.add(n)
            continue
        ops = _elementwise(graph, n)
        if ops is None:
            return None
        chain.add(n)
        todo.extend(ops)
    if len(sources) != 1 or not chain or all(n.target in CLAMPS for n in chain):
        return None
    if any(not set(n.users) <= chain for n in chain if n is not end):
        return None
    return [n for n in graph.gm.graph.nodes if n in chain], next(iter(sources))


def table(graph: Graph, chain: list[fx.Node], source: fx.Node, quant: fx.Node) -> torch.Tensor:
    """The int8 codes `quant` gives for the chain's value at each of the 256 int8 codes of `source` (a
    dequantize): entry k for code k - 128."""
    go = torch.ops.graphopt
    codes = torch.arange(-128, 128, dtype=torch.int32).to(torch.int8)
    env = {source: go.dequantize_per_tensor.default(codes, *source.args[1:3])}

    def value(a):
        if isinstance(a, fx.Node):
            return env[a] if a in env else graph.get_param(a.target)
        return a
    for n in chain:
        env[n] = n.target(*[value(a) for a in n.args], **n.kwargs)
    return go.quantize_per_tensor.default(env[chain[-1]].to(torch.float32), *quant.args[1:6])
