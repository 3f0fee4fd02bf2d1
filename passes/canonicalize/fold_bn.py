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
    return _shape_reason(graph, m)


def _shape_reason(graph: Graph, m: Match) -> str:
    """Why the folded channels would not be the layer's output channels, or empty."""
    p, w_node = m.producer, m.producer.args[1]
    if m.bn.target in AFFINE:  # (an add: any weight; a mul: its channel axis is the layer's outputs, any rank)
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


def rewrite(graph: Graph, m: Match, tied: list[Match] = ()) -> None:
    """Fold `m` into its layer; `tied`: matches at other layers of the same weight (and bias) whose batch norm or
    constant is the same, which then read the folded weight and the one bias."""
    p = m.producer
    w_node = p.args[1]
    inv = torch.rsqrt(m.var.double() + m.eps)
    scale = inv * (m.weight.double() if m.weight is not None else 1.0)
    shift = (m.bias.double() if m.bias is not None else 0.0) - m.mean.double() * scale
    bias_node = _bias(p)
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
        for layer in [p] + [t.producer for t in tied]:
            if "bias" in layer.kwargs:
                layer.kwargs = {**layer.kwargs, "bias": node}
            else:
                layer.args = tuple(layer.args[:2]) + (node,) + tuple(layer.args[3:])
    for one in [m, *tied]:
        for out in one.outputs:
            out.replace_all_uses_with(one.producer)


def _bias(p: fx.Node) -> fx.Node | None:
    return p.args[2] if len(p.args) > 2 else p.kwargs.get("bias")


def _tie_key(m: Match) -> str | None:
    """The weight's name where `m` was refused only because its layer's weight or bias is read by other layers too
    (a Siamese branch, a block applied twice), else None."""
    p, w = m.producer, m.producer.args[1]
    b = _bias(p)
    if len(p.users) != 1 or not (isinstance(w, fx.Node) and w.op == "get_attr"):
        return None
    return w.target if b is None or isinstance(b, fx.Node) and b.op == "get_attr" else None


def _readers(graph: Graph, target: str) -> set[fx.Node]:
    return {u for n in graph.gm.graph.nodes if n.op == "get_attr" and n.target == target for u in n.users}


def _same(a: torch.Tensor | None, b: torch.Tensor | None) -> bool:
    return a is None and b is None or a is not None and b is not None and a.shape == b.shape and torch.equal(a, b)


def check_tied(graph: Graph, group: list[Match]) -> str:
    """Empty when the layers of one weight can all take the same fold: every reader of the weight (and bias) is one
    of them, one kind of layer, each followed by the same batch norm or constant. Else why not."""
    m, p = group[0], group[0].producer
    w, names = p.args[1].target, ", ".join(f"'{t.producer.name}'" for t in group[1:])
    if _readers(graph, w) != {t.producer for t in group}:
        return f"weight '{w}' of '{p.name}' is shared with other ops"
    biases = {getattr(_bias(t.producer), "target", None) for t in group}
    what = ("bias" if len(biases) != 1 else "batch norm" if m.bn.target in BN_OPS else "constant")
    if len(biases) == 1 and len({(t.producer.target, _transposed(t.producer), t.bn.target) for t in group}) == 1 \
            and all(_same(m.weight, t.weight) and _same(m.bias, t.bias) and _same(m.mean, t.mean)
                    and _same(m.var, t.var) and m.eps == t.eps for t in group):
        b = next(iter(biases))
        return "" if b is None or _readers(graph, b) <= {t.producer for t in group} else \
            f"bias '{b}' of '{p.name}' is shared with other ops"
    return (f"weight '{w}' of '{p.name}' is shared with {names}, whose {what} differs (folding would need a copy of "
            "the weight for each)")


def _fold_all(graph: Graph, nodes: list[fx.Node], matcher, skipped: dict[str, str]) -> list[Match]:
    """Fold each node's match (`matcher`: a Match, a reason, or None for no pattern) that `check` allows, matched in
    order so that a fold can make the next node's pattern (a second batch norm, an add after a folded mul); then
    each group of layers of one weight that `check_tied` allows. Other reasons go into `skipped`. Returns the
    folded matches."""
    done, tied = [], {}
    for node in nodes:
        m = matcher(graph, node)
        reason = m if isinstance(m, str) else check(graph, m) if m is not None else ""
        key = _tie_key(m) if reason and isinstance(m, Match) else None
        if key is not None:
            tied.setdefault(key, []).append((m, reason))
        elif reason:
            skipped[node.name] = reason
        elif m is not None:
            rewrite(graph, m)
            done.append(m)
    order = {n: i for i, n in enumerate(graph.gm.graph.nodes)}
    for pairs in tied.values():
        group = sorted((m for m, _ in pairs), key=lambda t: order[t.producer])
        reason = (check_tied(graph, group) or _shape_reason(graph, group[0])) if len(pairs) > 1 else pairs[0][1]
        if reason:
            skipped.update((t.bn.name, reason) for t in group)
            continue
        rewrite(graph, group[0], group[1:])
        done.extend(group)
    return done


def fold(graph: Graph) -> tuple[list[str], list[str], dict[str, str]]:
    """Fold every batch norm, then every per-channel constant mul / add, that fits into its conv or linear (in
    place); layers that share one weight fold together where their batch norms (constants) are the same. Returns
    the folded batch norms and affine ops ("node -> layer") and why each other one stayed."""
    skipped: dict[str, str] = {}
    bns = [n for n in graph.gm.graph.nodes if n.op == "call_function" and n.target in BN_OPS]
    folded = [f"{m.bn.name} -> {m.producer.name}" for m in _fold_all(graph, bns, match, skipped)]
    biases = []  # (muls first: a conv -> mul -> add chain folds whole)
    for kind in (aten.mul.Tensor, aten.add.Tensor):
        nodes = [n for n in graph.gm.graph.nodes if n.op == "call_function" and n.target is kind]
        for m in _fold_all(graph, nodes, match_affine, skipped):
            graph.gm.graph.erase_node(m.bn)  # (now unread: a mul's add after it sees the layer's one user)
            biases.append(f"{m.bn.name} -> {m.producer.name}")
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
