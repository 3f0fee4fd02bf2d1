"""Attention as explicit matmuls, so its two activation x activation products (Q K^T and P V) can be quantized.

`scaled_dot_product_attention(q, k, v, mask, dropout_p=0, is_causal, scale)` becomes
softmax(q @ k^T * scale + mask) @ v with the same semantics (a boolean mask keeps where True, -inf elsewhere; a float
mask adds). Nodes that cannot be rewritten exactly (dropout during training, grouped-query broadcasting) stay fused and
are returned with the reason."""
from __future__ import annotations

import math

import torch
import torch.fx as fx

from graphopt.ir.graph import Graph

aten = torch.ops.aten
SDPA = aten.scaled_dot_product_attention.default


def _kw(n: fx.Node, i: int, name: str, default):
    if len(n.args) > i:
        return n.args[i]
    return n.kwargs.get(name, default)


def decompose_attention(graph: Graph) -> tuple[list[fx.Node], dict[str, str]]:
    """Rewrite every SDPA node it can; returns (the new score and output matmul nodes, kept node -> why)."""
    g = graph.gm.graph
    matmuls, kept = [], {}
    sdpa = [n for n in g.nodes if n.op == "call_function" and n.target is SDPA]
    if any(a.meta.get("val") is None for n in sdpa for a in n.args[:3] if isinstance(a, fx.Node)):
        graph.refresh()  # an earlier rewrite left nodes without shapes
    for n in sdpa:
        q, k, v = n.args[:3]
        mask = _kw(n, 3, "attn_mask", None)
        if float(_kw(n, 4, "dropout_p", 0.0)) != 0.0:
            kept[n.name] = "dropout_p > 0 (training-mode attention)"
            continue
        if n.kwargs.get("enable_gqa", False):
            kept[n.name] = "grouped-query broadcasting (enable_gqa)"
            continue
        causal = bool(_kw(n, 5, "is_causal", False))
        scale = n.kwargs.get("scale")
        qv, kv = q.meta["val"], k.meta["val"]
        if qv.shape[:-2] != kv.shape[:-2]:
            kept[n.name] = "query and key batch/head dims differ"
            continue
        scale = float(scale) if scale is not None else 1.0 / math.sqrt(qv.shape[-1])
        with g.inserting_before(n):
            kt = g.call_function(aten.transpose.int, (k, -2, -1))
            scores = g.call_function(aten.matmul.default, (q, kt))
            s = g.call_function(aten.mul.Tensor, (scores, scale))
            if causal:
                lq, lk = qv.shape[-2], kv.shape[-2]
                ones = g.call_function(aten.ones.default, ([lq, lk],), {"dtype": torch.bool})
                tri = g.call_function(aten.tril.default, (ones,))
                s = g.call_function(aten.masked_fill.Scalar, (s, g.call_function(aten.logical_not.default, (tri,)),
                                                              float("-inf")))
            if isinstance(mask, fx.Node):
                if mask.meta["val"].dtype == torch.bool:
                    s = g.call_function(aten.masked_fill.Scalar,
                                        (s, g.call_function(aten.logical_not.default, (mask,)), float("-inf")))
                else:
                    s = g.call_function(aten.add.Tensor, (s, mask))
            p = g.call_function(aten._softmax.default, (s, -1, False))
            out = g.call_function(aten.matmul.default, (p, v))
        n.replace_all_uses_with(out)
        g.erase_node(n)
        matmuls += [scores, out]
    if matmuls:
        graph.refresh()
    return matmuls, kept
