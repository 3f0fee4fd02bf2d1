"""Size and work of a graph: parameters, multiply-accumulates, bytes of weights."""
from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass, field

import torch
import torch.fx as fx

from graphopt.ir.graph import Graph

aten = torch.ops.aten


@dataclass
class GraphStats:
    """params: weight values; macs: multiply-accumulates for one run; bytes: weight storage (`weight_bytes`)."""

    params: int
    macs: int
    bytes: int
    nodes: int
    ops: Counter = field(default_factory=Counter)

    def to_json(self) -> dict:
        return {"params": self.params, "macs": self.macs, "bytes": self.bytes, "nodes": self.nodes}

    def delta(self, before: "GraphStats") -> dict:
        return {k: getattr(self, k) - getattr(before, k) for k in ("params", "macs", "bytes", "nodes")}


def _shape(n) -> tuple[int, ...] | None:
    val = n.meta.get("val") if isinstance(n, fx.Node) else None
    return tuple(int(s) for s in val.shape) if isinstance(val, torch.Tensor) else None


def einsum_macs(equation: str, shapes: list[tuple[int, ...]]) -> int:
    """Multiply-accumulates of torch.einsum(equation, *operands of `shapes`) contracted left to right, as torch
    does without opt_einsum: each step's product spans every index of the two operands (sizes broadcast), and
    keeps the indices a later operand or the output reads. One operand (a sum or a transpose) does none."""
    lhs, arrow, out = equation.replace(" ", "").partition("->")
    terms = lhs.split(",")
    if len(terms) != len(shapes) or len(terms) < 2:
        return 0
    rank = max((len(sh) - len(t.replace("...", "")) for t, sh in zip(terms, shapes) if "..." in t), default=0)
    spare = [chr(0x100 + i) for i in range(rank)]  # the ellipsis' dims, right-aligned as they broadcast

    def expand(term: str, ndim: int) -> str:
        if "..." not in term:
            return term
        k = ndim - len(term.replace("...", ""))
        return term.replace("...", "".join(spare[rank - k:]))
    terms = [expand(t, len(sh)) for t, sh in zip(terms, shapes)]
    if not arrow:  # implicit output: the indices used once, in order
        out = "".join(sorted(c for c in set("".join(terms)) if "".join(terms).count(c) == 1))
    out = out.replace("...", "".join(spare))
    size: dict[str, int] = {}
    for t, sh in zip(terms, shapes):
        if len(t) != len(sh):
            return 0
        for c, d in zip(t, sh):
            size[c] = max(size.get(c, 1), int(d))
    macs, cur = 0, terms[0]
    for i, t in enumerate(terms[1:], 1):
        both = set(cur) | set(t)
        macs += math.prod(size[c] for c in both)
        later = set(out).union(*terms[i + 1:])
        cur = "".join(c for c in both if c in later)
    return macs


def node_macs(n: fx.Node) -> int:
    """Multiply-accumulates of one node from its recorded shapes (0 for ops that do no dot products)."""
    if n.op != "call_function":
        return 0
    out = _shape(n)
    if out is None:
        return 0
    t = n.target
    numel = math.prod(out)
    if t in (aten.conv2d.default, aten.conv1d.default, aten.conv3d.default, aten.convolution.default):
        w = _shape(n.args[1])
        return numel * math.prod(w[1:]) if w else 0
    if t in (aten.conv_transpose2d.input, aten.conv_transpose1d.default):
        w, x = _shape(n.args[1]), _shape(n.args[0])
        return math.prod(x) * math.prod(w[1:]) if w and x else 0
    if t is aten.linear.default:
        w = _shape(n.args[1])
        return numel * w[1] if w else 0
    if t in (aten.mm.default, aten.bmm.default, aten.matmul.default) or getattr(t, "__name__", "") == "qmatmul.default":
        a = _shape(n.args[0])
        return numel * a[-1] if a else 0
    if t is aten.scaled_dot_product_attention.default:  # q k^T (L x S x E) and p v (L x S x Ev) per batch/head
        q, k = _shape(n.args[0]), _shape(n.args[1])
        return math.prod(q[:-1]) * k[-2] * (q[-1] + out[-1]) if q and k else 0
    if t is aten.addmm.default:
        a = _shape(n.args[1])
        return numel * a[-1] if a else 0
    if getattr(t, "__name__", "") in ("qconv2d.default", "qlinear.default", "qconv2d_i32.default",
                                      "qlinear_i32.default"):  # integer ops: weight is arg 3
        w = _shape(n.args[3])
        return numel * math.prod(w[1:]) if w else 0
    if getattr(t, "__name__", "") == "bsr_linear.default":  # stored blocks only: the work the sparse kernel does
        d = _shape(n.args[1])
        return (numel // out[-1]) * math.prod(d) if d else 0
    if getattr(t, "__name__", "") == "bsr_conv1x1.default":  # stored blocks x pixels
        d = _shape(n.args[1])
        return (numel // out[1]) * math.prod(d) if d else 0
    if t is aten.baddbmm.default:
        a = _shape(n.args[1])
        return numel * a[-1] if a else 0
    if t is aten.einsum.default and isinstance(n.args[0], str):  # (MoE experts, einsum attention)
        shapes = [_shape(a) for a in n.args[1]]
        return einsum_macs(n.args[0], shapes) if all(sh is not None for sh in shapes) else 0
    return 0


def weight_bytes(t: torch.Tensor) -> int:
    """Bytes a weight takes stored: its elements' size, but 4 bits a value for an int8 tensor whose values all fit
    int4 ([-8, 7]: `quantize{weights=int4}`'s), which graphopt's int8 CPU kernels keep as nibbles (all but the
    depthwise convs, whose taps stay int8: a few percent of a CNN's weights)."""
    if t.dtype == torch.int8 and t.numel() and int(t.min()) >= -8 and int(t.max()) <= 7:
        return -(-t.numel() // 2)
    return t.numel() * t.element_size()


def graph_stats(g: Graph) -> GraphStats:
    params = g.params()
    ops = Counter()
    macs = 0
    for n in g.gm.graph.nodes:
        if n.op == "call_function":
            ops[getattr(n.target, "__name__", str(n.target))] += 1
            macs += node_macs(n)
    return GraphStats(
        params=sum(t.numel() for t in params.values()),
        macs=macs,
        bytes=sum(weight_bytes(t) for t in params.values()),
        nodes=sum(1 for n in g.gm.graph.nodes if n.op == "call_function"),
        ops=ops,
    )


def human(n: float, unit: str = "") -> str:
    """1234567 -> '1.23M'."""
    for div, suf in ((1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(n) >= div:
            return f"{n / div:.2f}{suf}{unit}"
    return f"{n:.0f}{unit}"
