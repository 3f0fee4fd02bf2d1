"""Which nodes carry a trainable/compressible weight: conv and linear nodes whose weight is a float parameter.

One walk for every pass that rewrites weights (quantize, mixed-precision, sparsify and the other sparsity passes), so
they agree on what a "layer" is and on how an exclude/protect pattern applies (glob on the node and its weight)."""
from __future__ import annotations

from typing import Iterable

import torch
import torch.fx as fx

from graphopt.ir.graph import Graph
from graphopt.ir.names import matches, node_labels

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
