"""Which nodes carry a trainable/compressible weight: conv and linear nodes whose weight is a float parameter.

One walk for every pass that rewrites weights (quantize, mixed-precision, sparsify and the other sparsity passes), so
they agree on what a "layer" is and on how an exclude/protect pattern applies (glob on the node and its weight)."""
from __future__ import annotations

import math
from typing import Iterable

import torch
import torch.fx as fx

from graphopt.ir.graph import Graph
from graphopt.ir.names import matches, node_labels
from graphopt.passes.canonicalize.dce import eliminate_dead_code

aten = torch.ops.aten
WEIGHT_OPS = (aten.conv1d.default, aten.conv2d.default, aten.conv3d.default, aten.convolution.default,
              aten.linear.default)


def weighted_ops(graph: Graph, exclude: Iterable[str] = ()) -> tuple[list[fx.Node], dict[str, str]]:
    """Conv/linear nodes whose weight (arg 1) is a float parameter, in graph order, and why the others were skipped
    (by node name): excluded by a pattern, or a weight that is computed or already quantized."""
    exclude = list(exclude)
    ops, skipped = [], {}
    for n in graph.gm.graph.nodes:
        if n.op != "call_function" or n.target not in WEIGHT_OPS or len(n.args) < 2:
            continue
        w = n.args[1]
        labels = node_labels(n) | (node_labels(w) if isinstance(w, fx.Node) else set())
        if exclude and matches(labels, exclude):
            skipped[n.name] = "excluded"
            continue
        if not isinstance(w, fx.Node) or w.op != "get_attr" or not graph.get_param(w.target).is_floating_point():
            skipped[n.name] = "weight is computed or already quantized"
            continue
        ops.append(n)
    return ops, skipped


# where each layer op reads the tensors it learns (weight, bias): argument positions
_LEARNED_ARGS = {**{op: (1, 2) for op in WEIGHT_OPS},
                 aten.layer_norm.default: (2, 3), aten.group_norm.default: (2, 3),
                 aten.batch_norm.default: (1, 2), aten._native_batch_norm_legit_no_training.default: (1, 2),
                 aten.instance_norm.default: (1, 2), aten.embedding.default: (0,), aten.prelu.default: (1,)}


def learnable_params(graph: Graph) -> dict[str, torch.nn.Parameter]:
    """The float tensors training may update, as nn.Parameters by attribute name: the graph's float parameters,
    and float buffers a conv / linear / norm / embedding / prelu reads as its weight or bias. An ONNX import's
    initializers are buffers (ONNX has no parameters), so recover, qat, lottery-ticket, rigl and set had stopped on
    "no trainable parameters" and taylor importance crashed on every imported model; those buffers become
    parameters here, in place (requires_grad off; the trainer turns it on). Other buffers (running statistics,
    masks, constant tables) stay as they are."""
    gm = graph.gm
    buffers = dict(gm.named_buffers())
    for n in gm.graph.nodes:
        slots = _LEARNED_ARGS.get(n.target) if n.op == "call_function" else None
        for i in slots or ():
            a = n.args[i] if i < len(n.args) else None
            if not isinstance(a, fx.Node) or a.op != "get_attr" or a.target not in buffers:
                continue
            t = buffers.pop(a.target)
            if t.is_floating_point() and "." not in a.target:
                delattr(gm, a.target)
                gm.register_parameter(a.target, torch.nn.Parameter(t.detach(), requires_grad=False))
    return {name: p for name, p in gm.named_parameters() if p.is_floating_point()}


_TRANSPOSES = ("numpy_T.default", "t.default", "mT.default")


def _param_2d(graph: Graph, n) -> bool:
    return (isinstance(n, fx.Node) and n.op == "get_attr" and graph.get_param(n.target).is_floating_point()
            and graph.get_param(n.target).dim() == 2)


def _transposed_param(graph: Graph, n):
    """The parameter node p when n is p.T / p.t() / p.mT / p.permute(1, 0) / p.transpose(0, 1) of a 2-D float
    parameter, else None."""
    if not isinstance(n, fx.Node) or n.op != "call_function" or not n.args or not _param_2d(graph, n.args[0]):
        return None
    name = str(n.target).split("aten.", 1)[-1]
    if (name in _TRANSPOSES or (name == "permute.default" and [int(d) for d in n.args[1]] == [1, 0])
            or (name == "transpose.int" and sorted(int(d) % 2 for d in n.args[1:3]) == [0, 1])):
        return n.args[0]
    return None


def tidied(graph: Graph, count: int) -> int:
    """`count`, after dropping the nodes and parameters the rewrites left unread and recomputing shapes (when
    there were rewrites: every graph rewrite of the weight and quantization passes ends so)."""
    if count:
        eliminate_dead_code(graph)
        graph.refresh()
    return count


def _einsum_plan(equation: str, x_shape, w_shape):
    """For torch.einsum(equation, x, w) with w a weight: (batch letters, contraction letters, free letters, output
    letters) when it is a linear, x [batch..., contraction...] against w's contraction and free letters (every
    letter of w in x or the output, none in all three: "td,edf->tef" is, an expert's "tef,efd->ted" is not; x's
    contraction letters last, so a reshape merges them), else None. An ellipsis in x and the output (leading)
    counts as batch letters."""
    lhs, arrow, out = equation.replace(" ", "").partition("->")
    terms = lhs.split(",")
    if not arrow or len(terms) != 2 or "..." in terms[1]:
        return None
    xt, wt = terms
    if xt.startswith("...") and out.startswith("..."):
        extra = len(x_shape) - (len(xt) - 3)
        if extra < 0:
            return None
        spare = "".join(chr(0x100 + i) for i in range(extra))
        xt, out = spare + xt[3:], spare + out[3:]
    if "." in xt + out or len(xt) != len(x_shape) or len(wt) != len(w_shape):
        return None
    if len(set(xt)) != len(xt) or len(set(wt)) != len(wt) or len(set(out)) != len(out):
        return None
    contract = [c for c in xt if c in wt and c not in out]
    batch = [c for c in xt if c in out and c not in wt]
    free = [c for c in wt if c in out and c not in xt]
    if (not contract or len(batch) + len(contract) != len(xt) or len(free) + len(contract) != len(wt)
            or sorted(out) != sorted(batch + free) or xt[len(batch):] != "".join(contract)):
        return None
    return batch, contract, free, out


def einsums_as_linears(graph: Graph, exclude: Iterable[str] = ()) -> int:
    """Rewrite einsum(x, W) with W a float parameter that is a linear (`_einsum_plan`: "td,edf->tef", "bld,dhk->blhk")
    into reshape -> aten.linear -> reshape (-> permute where the output puts a weight letter before a batch
    letter), the weight stored [free, contraction] once: quantize had kept such layers float (a mixture of experts'
    first einsum). Returns how many; one `exclude` names (the node or its weight) is left as it is."""
    g, count, exclude = graph.gm.graph, 0, list(exclude)
    for n in list(g.nodes):
        if n.op != "call_function" or n.target is not aten.einsum.default or n.kwargs or len(n.args) != 2:
            continue
        equation, operands = n.args
        if not isinstance(equation, str) or len(operands) != 2:
            continue
        x, w = operands
        if not (isinstance(w, fx.Node) and w.op == "get_attr" and graph.get_param(w.target).is_floating_point()):
            continue
        val = x.meta.get("val") if isinstance(x, fx.Node) else None
        if val is None or not val.is_floating_point():
            continue
        weight = graph.get_param(w.target)
        plan = _einsum_plan(equation, tuple(val.shape), tuple(weight.shape))
        if plan is None:
            continue
        if exclude and matches(node_labels(n) | node_labels(w), exclude):
            continue
        batch, contract, free, out = plan
        wt = equation.replace(" ", "").split("->")[0].split(",")[1]
        size = {c: int(d) for c, d in zip(wt, weight.shape)}
        k = math.prod(size[c] for c in contract)
        order = [wt.index(c) for c in free] + [wt.index(c) for c in contract]
        mat = weight.detach().permute(order).reshape(-1, k).contiguous()
        wn = graph.add_param(f"{w.target}_linear", mat, before=n)
        wn.meta["source_fqn"] = w.meta.get("source_fqn", w.target)
        lead = [int(d) for d in val.shape[:len(batch)]]
        with g.inserting_before(n):
            y = g.call_function(aten.reshape.default, (x, lead + [k]))
            lin = g.call_function(aten.linear.default, (y, wn))
            y = g.call_function(aten.reshape.default, (lin, lead + [size[c] for c in free]))
            now = "".join(batch + free)
            if now != out:
                y = g.call_function(aten.permute.default, (y, [now.index(c) for c in out]))
        lin.meta["einsum"] = equation
        n.replace_all_uses_with(y)
        g.erase_node(n)
        count += 1
    return tidied(graph, count)


def linears_from_matmuls(graph: Graph, exclude: Iterable[str] = ()) -> int:
    """Rewrite products with a constant weight into aten.linear, the form every weight pass takes: `x @ W.T`
    (Falcon's and other hand-written linears), `x @ W` / `addmm(b, x, W)` (GPT-2's Conv1D, W stored [in, out]: the
    transposed copy becomes the linear's weight), einsums that are linears (`einsums_as_linears`). Returns how many;
    quantize and mixed-precision skipped these layers before (a GPT-2 "quantized" to int8 had every weight left
    float). A product that `exclude` names (the node or its weight) is left as it is; a transposed copy keeps its
    weight's source name."""
    count = einsums_as_linears(graph, exclude)
    g, exclude = graph.gm.graph, list(exclude)
    for n in list(g.nodes):
        if n.op != "call_function" or n.kwargs:
            continue
        name = str(n.target).split("aten.", 1)[-1]
        if name in ("mm.default", "matmul.default") and len(n.args) == 2:
            x, w, b = n.args[0], n.args[1], None
        elif name == "addmm.default" and len(n.args) == 3:
            b, x, w = n.args
            bias = graph.get_param(b.target) if isinstance(b, fx.Node) and b.op == "get_attr" else None
            if bias is None or bias.dim() != 1:
                continue
        else:
            continue
        val = x.meta.get("val") if isinstance(x, fx.Node) else None
        if val is None or not val.is_floating_point() or val.dim() < 1:
            continue
        if exclude and matches(node_labels(n) | (node_labels(w) if isinstance(w, fx.Node) else set()), exclude):
            continue
        weight = _transposed_param(graph, w)
        if weight is None and _param_2d(graph, w):
            weight = graph.add_param(f"{w.target}_t", graph.get_param(w.target).t().contiguous(), before=n)
            weight.meta["source_fqn"] = w.meta.get("source_fqn", w.target)
        if weight is None:
            continue
        with g.inserting_before(n):
            lin = g.call_function(aten.linear.default, (x, weight) + ((b,) if b is not None else ()))
        lin.meta = dict(n.meta)
        n.replace_all_uses_with(lin)
        g.erase_node(n)
        count += 1
    return tidied(graph, count)
