"""fold-bn: fold inference batch norm into the preceding conv or linear (exact up to float rounding), and a constant
added to or multiplied with one per output channel into its bias / weight (ONNX files that write the bias as its own
Add, ONNX Runtime's quantize_dynamic output; a batch norm written as Mul and Add by other converters), so the conv's
kernel applies it in its epilogue.

A rewrite rule in three parts (onnxscript's habit): `match` finds the pattern, `check` says why it may not
apply, `rewrite` replaces it. Every batch norm that is left alone gets a reason in the pass stats.
"""
from __future__ import annotations

import operator
from dataclasses import dataclass

import torch
import torch.fx as fx

from graphopt.ir.graph import Graph
from graphopt.passes.canonicalize.dce import eliminate_dead_code
from graphopt.pm.registry import Contract, Pass, PassContext, PassResult, reasons_by_op, register_pass

aten = torch.ops.aten
CONVS = (aten.conv1d.default, aten.conv2d.default, aten.conv3d.default, aten.convolution.default,
         aten.conv_transpose1d.default, aten.conv_transpose2d.input, aten.conv_transpose3d.input)
TRANSPOSED = CONVS[4:]  # (input, weight, bias, stride, padding, output_padding, groups, dilation)
LINEAR = aten.linear.default
BN_OPS = (aten.batch_norm.default, aten._native_batch_norm_legit_no_training.default)


@dataclass
class Match:
    bn: fx.Node
    producer: fx.Node
    outputs: list[fx.Node]          # the nodes whose uses become the producer's (bn, or getitem 0 of bn)
    weight: torch.Tensor | None
    bias: torch.Tensor | None
    mean: torch.Tensor
    var: torch.Tensor
    eps: float


def _param(graph: Graph, node) -> torch.Tensor | None:
    if node is None:
        return None
    if isinstance(node, fx.Node) and node.op == "get_attr":
        return graph.get_param(node.target)
    raise ValueError("not a parameter")


def match(graph: Graph, bn: fx.Node) -> Match | str:
    """The pattern at `bn`, or the reason it does not fit."""
    if bn.target is aten.batch_norm.default:
        x, w, b, mean, var, training, _momentum, eps = bn.args[:8]
        if training:
            return "batch norm runs in training mode"
        outputs = [bn]
    else:
        x, w, b, mean, var, _momentum, eps = bn.args[:7]
        outputs = list(bn.users)
        if any(u.target is not operator.getitem or u.args[1] != 0 for u in outputs):
            return "batch norm's saved statistics are used"
    if not isinstance(x, fx.Node) or x.op != "call_function" or (x.target not in CONVS and x.target is not aten.linear.default):
        return f"input '{getattr(x, 'name', x)}' is not a conv or linear"
    try:
        tensors = [_param(graph, a) for a in (w, b, mean, var)]
    except ValueError:
        return "batch norm statistics are computed, not parameters"
    return Match(bn, x, outputs, *tensors, float(eps))


AFFINE = (aten.add.Tensor, aten.mul.Tensor)


def match_affine(graph: Graph, add: fx.Node) -> Match | None:
    """add or mul (conv or linear, constant) with the constant one value per output channel (or one value), as a
    batch norm of mean 0 and variance 1 with the constant as its shift (add) or its weight (mul; the layer's
    weight and bias are scaled); None where the op is not of that form."""
    if add.target not in AFFINE or add.kwargs.get("alpha", 1) != 1 or len(add.args) != 2:
        return None
    for x, c in (add.args, add.args[::-1]):
        producer = isinstance(x, fx.Node) and x.op == "call_function" and (x.target in CONVS or x.target is LINEAR)
        if not (producer and isinstance(c, fx.Node) and c.op == "get_attr"):
            continue
        out, const = x.meta.get("val"), graph.get_param(c.target)
        if out is None or const.dtype != out.dtype or const.dim() > out.dim():
            return None
        shape = [1] * (out.dim() - const.dim()) + list(const.shape)
        channel = out.dim() - 1 if x.target is LINEAR else 1
        if any(d != 1 for i, d in enumerate(shape) if i != channel) or shape[channel] not in (1, out.shape[channel]):
            return None
        value = const.reshape(-1).expand(int(out.shape[channel])).clone()
        zeros, ones = torch.zeros_like(value), torch.ones_like(value)
        if add.target is aten.mul.Tensor:
            return Match(add, x, [add], value, None, zeros, ones, 0.0)
        return Match(add, x, [add], None, value, zeros, ones, 0.0)
    return None


def check(graph: Graph, m: Match) -> str:
    """Empty when the rewrite is safe, else why not."""
    p = m.producer
    if len(p.users) != 1:
        return f"'{p.name}' has other users besides " + ("the batch norm" if m.bn.target in BN_OPS else f"'{m.bn.name}'")
    bias = p.args[2] if len(p.args) > 2 else p.kwargs.get("bias")
    if bias is not None and (not isinstance(bias, fx.Node) or bias.op != "get_attr" or len(bias.users) != 1):
        return f"bias of '{p.name}' is computed or shared"
    if m.bn.target is aten.add.Tensor:  # a bias add changes the bias only: any weight (one value a channel: matched)
        return ""
    w_node = p.args[1]
    if not isinstance(w_node, fx.Node) or w_node.op != "get_attr":
        return f"'{p.name}' has a computed weight"
    readers = [n for n in graph.gm.graph.nodes if n.op == "get_attr" and n.target == w_node.target]
    if len(readers) != 1 or len(w_node.users) != 1:
        return f"weight '{w_node.target}' of '{p.name}' is shared with other ops"
    if m.bn.target is aten.mul.Tensor:  # (its channel axis is the layer's outputs: matched so, any rank)
        return ""
    if p.target is LINEAR:
        out = p.meta.get("val")
        if out is None or out.dim() != 2:
            return f"'{p.name}' output is not 2-D, so the batch norm's channel dim is not the linear's features"
    channels = _out_channels(p, graph.get_param(w_node.target))
    if m.mean.numel() != channels:
        return f"batch norm has {m.mean.numel()} channels but '{p.name}' has {channels} outputs"
    return ""


def _transposed(p: fx.Node) -> int:
    """A transposed conv's groups (its weight is [Cin, Cout / groups, *k]), 0 for any other layer."""
    if p.target in TRANSPOSED:
        return int(p.args[6]) if len(p.args) > 6 else int(p.kwargs.get("groups", 1))
    if p.target is aten.convolution.default and p.args[6]:
        return int(p.args[8])
    return 0


def _out_channels(p: fx.Node, w: torch.Tensor) -> int:
    groups = _transposed(p)
    return int(w.shape[1]) * groups if groups else int(w.shape[0])


def _scaled(p: fx.Node, w: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """w with output channel j scaled by scale[j]: axis 0, or a transposed conv's axis 1 within each group."""
    groups = _transposed(p)
    if not groups:
        return w * scale.reshape(-1, *([1] * (w.dim() - 1)))
    cin, cog, rest = int(w.shape[0]), int(w.shape[1]), [1] * (w.dim() - 2)
    return (w.reshape(groups, cin // groups, cog, *w.shape[2:]) * scale.reshape(groups, 1, cog, *rest)).reshape(w.shape)


def rewrite(graph: Graph, m: Match) -> None:
    p = m.producer
    w_node = p.args[1]
    inv = torch.rsqrt(m.var.double() + m.eps)
    scale = inv * (m.weight.double() if m.weight is not None else 1.0)
    shift = (m.bias.double() if m.bias is not None else 0.0) - m.mean.double() * scale
    bias_node = p.args[2] if len(p.args) > 2 else p.kwargs.get("bias")
    old_bias = graph.get_param(bias_node.target).double() if bias_node is not None else torch.zeros_like(scale)
    dtype = p.meta["val"].dtype
    if m.bn.target is not aten.add.Tensor:  # (a bias add leaves the weight as it is)
        w = graph.get_param(w_node.target).double()
        graph.set_param(w_node.target, _scaled(p, w, scale).to(dtype))
    new_bias = (old_bias * scale + shift).to(dtype)
    if bias_node is not None:
        graph.set_param(bias_node.target, new_bias)
    else:
        stem = w_node.target if isinstance(w_node, fx.Node) and w_node.op == "get_attr" else p.name
        node = graph.add_param(f"{stem}_folded_bias", new_bias, before=p)
        args = list(p.args)
        if "bias" in p.kwargs:
            kwargs = dict(p.kwargs)
            kwargs["bias"] = node
            p.kwargs = kwargs
        else:
            while len(args) < 3:
                args.append(None)
            args[2] = node
            p.args = tuple(args)
    for out in m.outputs:
        out.replace_all_uses_with(p)


def fold(graph: Graph) -> tuple[list[str], list[str], dict[str, str]]:
    """Fold every batch norm, then every per-channel constant mul / add, that fits into its conv or linear (in
    place). Returns the folded batch norms and affine ops ("node -> layer") and why each other one stayed."""
    folded, skipped = [], {}
    for bn in [n for n in graph.gm.graph.nodes if n.op == "call_function" and n.target in BN_OPS]:
        m = match(graph, bn)
        reason = m if isinstance(m, str) else check(graph, m)
        if reason:
            skipped[bn.name] = reason
            continue
        rewrite(graph, m)
        folded.append(f"{bn.name} -> {m.producer.name}")
    biases = []  # (muls first: a conv -> mul -> add chain folds whole)
    for add in [n for kind in (aten.mul.Tensor, aten.add.Tensor) for n in graph.gm.graph.nodes
                if n.op == "call_function" and n.target is kind]:
        m = match_affine(graph, add)
        if m is None:
            continue
        reason = check(graph, m)
        if reason:
            skipped[add.name] = reason
            continue
        rewrite(graph, m)
        graph.gm.graph.erase_node(add)  # (now unread: a mul's add after it sees the layer's one user)
        biases.append(f"{add.name} -> {m.producer.name}")
    if folded or biases:
        eliminate_dead_code(graph)
        graph.gm.recompile()  # (runnable at once: mixed-precision runs the graph inside its own pass)
    return folded, biases, skipped


def fold_first(graph: Graph) -> dict[str, int]:
    """`fold` for passes that rewrite layers into ops fold-bn cannot fold into (int8, sparse): their stats entries,
    the batch norms and affine ops folded (zeros left out)."""
    folded, biases, _ = fold(graph)
    return {k: v for k, v in (("batch_norms_folded", len(folded)), ("affine_ops_folded", len(biases))) if v}


@register_pass
class FoldBatchNorm(Pass):
    name = "fold-bn"
    summary = ("Fold inference batch norm into the preceding conv/linear weights and bias, and per-channel constant "
               "muls / adds into them (exact).")
    contract = Contract.EXACT

    @dataclass
    class Options:
        pass

    def run(self, graph: Graph, ctx: PassContext) -> PassResult:
        folded, biases, skipped = fold(graph)
        reason = ""
        if not folded and not biases:
            reason = "no batch norm found" if not skipped else reasons_by_op(skipped)
        return PassResult(graph, bool(folded or biases), {"folded": len(folded), "affine_ops": len(biases),
                                                          "skipped": skipped, "pairs": folded + biases}, reason)
