"""Attention written out by hand (softmax(q @ k^T * scale + bias) @ v) as one aten scaled_dot_product_attention.

Models write attention as its parts as often as they call SDPA: ViT-style `(q @ k.transpose(-2, -1)) * scale`,
softmax, `@ v`; Swin's `(q * scale) @ k^T + relative-position bias`; SAGAN's `bmm(q^T, k)`, softmax and
`bmm(v, p^T)` over a feature map's pixels. Lowered as written, that is two batched matmuls, the scale's and the
bias's passes over the scores, a softmax and the transposes between (ViT-Ti's 3 heads over 197 tokens: 0.56 ms of
kernels against ONNX Runtime's 0.32 ms). As SDPA it is the CPU target's fused attention kernel (cpu/attention.py):
the scores of a block of query rows stay in the cache from their product to their use.

The chain, each intermediate read by the next op alone: mm1 = matmul / bmm(Q, Kt) with Q optionally `Q0 * c` (a
number), or an einsum of the same product ("bhid,bhjd->bhij", "bci,bcj->bij": either operand's last two letters in
either order); optionally `* c` or `/ c` (a number) and `+ bias` (a tensor: SDPA's additive float mask); softmax
over the last dim (no dtype change); mm2 = matmul / bmm(P, V), SAGAN's bmm(V', P^T) (then V = V'^T and the result
is SDPA's, transposed), or an einsum of P with V ("bhij,bhjd->bhid", "bij,bcj->bci"). Kt is a transpose of K's last
two dims (K itself), or else K is Kt transposed. Q, K and V have the same leading (batch, head) dims, 3 or 4 of
them. The scale is the product of the numbers (1 where none): SDPA
computes (q @ k^T) * scale, which equals (q * c) @ k^T up to float rounding.
"""
from __future__ import annotations

import logging

import torch
import torch.fx as fx

from graphopt.ir.graph import Graph
from graphopt.passes.analysis.weights import tidied

log = logging.getLogger("graphopt")
_aten = torch.ops.aten
_MATMULS = (_aten.matmul.default, _aten.bmm.default)


def _is(n, *targets) -> bool:
    return isinstance(n, fx.Node) and n.op == "call_function" and n.target in targets


def _only_user(n: fx.Node):
    users = list(n.users)
    return users[0] if len(users) == 1 else None


def _swaps_last_two(n) -> bool:
    """A transpose of its input's last two dims."""
    val = n.args[0].meta.get("val") if _is(n, _aten.transpose.int) and isinstance(n.args[0], fx.Node) else None
    if val is None:
        return False
    rank = val.dim()
    return sorted(d % rank for d in n.args[1:3]) == [rank - 2, rank - 1]


def _number(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


def _einsum_letters(n) -> tuple[str, str, str] | None:
    """(first operand's, second's, output's) letters of a two-operand einsum node without ellipsis or repeats."""
    if not (_is(n, _aten.einsum.default) and len(n.args) == 2 and len(n.args[1]) == 2):
        return None
    lhs, arrow, out = n.args[0].replace(" ", "").partition("->")
    terms = lhs.split(",")
    if not arrow or len(terms) != 2 or any("." in t or len(set(t)) != len(t) for t in (*terms, out)):
        return None
    return terms[0], terms[1], out


def _rows(letters: str, batch: str, row: str, col: str) -> bool | None:
    """An operand with these letters as [batch..., row, col]: False as it is, True transposed (last two), else
    None."""
    if letters == batch + row + col:
        return False
    return True if letters == batch + col + row else None


def _scores(x) -> tuple | None:
    """((Q, transposed), (K, transposed)) of a scores product Q @ K^T: a matmul / bmm (K^T a transpose of K, or
    transposed here) or an einsum such as "bhid,bhjd->bhij" (lucidrains' attention) or "bci,bcj->bij"."""
    if _is(x, *_MATMULS):
        q, kt = x.args[:2]
        k = (kt.args[0], False) if _swaps_last_two(kt) and len(kt.users) == 1 else (kt, True)
        return (q, False), k
    letters = _einsum_letters(x)
    if letters is None:
        return None
    xs, ys, out = letters
    batch, i, j = out[:-2], out[-2], out[-1]
    e = set(xs) & set(ys) - set(out)
    if len(e) != 1 or len(out) < 3:
        return None
    e = e.pop()
    tq, tk = _rows(xs, batch, i, e), _rows(ys, batch, j, e)
    return None if tq is None or tk is None else ((x.args[1][0], tq), (x.args[1][1], tk))


def _context(sm: fx.Node) -> tuple | None:
    """(mm2, (V, transposed), output transposed) of the product of probabilities `sm` with the values: P @ V, SAGAN's
    V' @ P^T (V = V'^T, the result transposed), or an einsum such as "bhij,bhjd->bhid" / "bij,bcj->bci"."""
    user = _only_user(sm)
    if _is(user, *_MATMULS) and user.args[0] is sm:
        return user, (user.args[1], False), False
    if _swaps_last_two(user) and _is(_only_user(user), _aten.bmm.default) and _only_user(user).args[1] is user:
        mm2 = _only_user(user)
        return mm2, (mm2.args[0], True), True
    letters = _einsum_letters(user)
    if letters is None or user.args[1][0] is not sm:
        return None
    ps, vs, out = letters
    batch, i, j = ps[:-2], ps[-2], ps[-1]
    c = set(vs) - set(ps)
    if len(c) != 1 or j in out or not batch:
        return None
    c = c.pop()
    tv, tout = _rows(vs, batch, j, c), _rows(out, batch, i, c)
    return None if tv is None or tout is None else (user, (user.args[1][1], tv), tout)


def _match(sm: fx.Node) -> dict | None:
    """The attention chain around softmax node `sm`, or None."""
    val = sm.meta.get("val")
    if len(sm.args) > 2 or sm.kwargs or val is None or val.dtype != torch.float32:
        return None
    rank = val.dim()
    if rank not in (3, 4) or sm.args[1] % rank != rank - 1:
        return None
    context = _context(sm)
    if context is None:
        return None
    mm2, v, transposed_out = context
    scale, bias, x = 1.0, None, sm.args[0]
    if _is(x, _aten.add.Tensor) and len(x.users) == 1 and isinstance(x.args[1], fx.Node):
        bias, x = x.args[1], x.args[0]
    if _is(x, _aten.mul.Tensor, _aten.div.Tensor) and len(x.users) == 1 and _number(x.args[1]):
        c = float(x.args[1])
        if c == 0:
            return None
        scale, x = (scale * c if x.target is _aten.mul.Tensor else scale / c), x.args[0]
    scores = _scores(x) if isinstance(x, fx.Node) and len(x.users) == 1 else None
    if scores is None:
        return None
    q, k = scores
    if _is(q[0], _aten.mul.Tensor) and not q[1] and len(q[0].users) == 1 and _number(q[0].args[1]) \
            and isinstance(q[0].args[0], fx.Node):
        scale, q = scale * float(q[0].args[1]), (q[0].args[0], False)
    vals = []
    for node, transposed in (q, k, v):
        val = node.meta.get("val") if isinstance(node, fx.Node) else None
        if val is None or val.dtype != torch.float32 or val.dim() != rank:
            return None
        vals.append(val.transpose(-2, -1) if transposed else val)
    qv, kv, vv = vals
    if not (qv.shape[:-2] == kv.shape[:-2] == vv.shape[:-2] and qv.shape[-1] == kv.shape[-1]
            and kv.shape[-2] == vv.shape[-2]):
        return None
    if bias is not None and (bias.meta.get("val") is None or bias.meta["val"].dtype != torch.float32):
        return None
    return {"mm2": mm2, "q": q, "k": k, "v": v, "bias": bias, "scale": scale, "transposed_out": transposed_out,
            "softmax": sm.name}


def _rewrite(gm: fx.GraphModule, m: dict, index: int) -> None:
    g, mm2 = gm.graph, m["mm2"]
    with g.inserting_before(mm2):
        swap = lambda t: g.call_function(_aten.transpose.int, (t, -2, -1))  # noqa: E731
        q, k, v = (swap(node) if transposed else node for node, transposed in (m["q"], m["k"], m["v"]))
        y = sdpa = g.call_function(_aten.scaled_dot_product_attention.default, (q, k, v, m["bias"]),
                                   {"scale": m["scale"]})
        if m["transposed_out"]:
            y = swap(y)
    sdpa.meta[_MARK] = index
    sdpa.meta[SWAPS] = sum(t for _, t in (m["q"], m["k"], m["v"])) + int(m["transposed_out"])
    mm2.replace_all_uses_with(y)


_MARK = "graphopt_manual_attention"  # meta key of the SDPA nodes made here: the chain's index in the graph
SWAPS = "graphopt_manual_attention_swaps"  # and how many transposes of q, k, v or the result the rewrite added


def _chains(graph: Graph) -> list[dict]:
    return [m for n in list(graph.gm.graph.nodes) if _is(n, _aten.softmax.int) and (m := _match(n)) is not None]


def _rewritten(graph: Graph, which: set[int]) -> Graph:
    g = graph.clone()
    chains = _chains(g)
    for i in sorted(which):
        _rewrite(g.gm, chains[i], i)
    tidied(g, len(which))
    return g


def manual_attention_as_sdpa(graph: Graph, takes=None) -> Graph:
    """`graph` with each hand-written attention chain (module docstring) as one SDPA, on a clone; `graph` itself
    where there is none. With `takes` (the target's check of an SDPA node: its shapes), a chain whose SDPA it
    refuses stays as written, and the debug log names each chain's softmax node as fused or kept."""
    count = len(_chains(graph))
    if not count:
        return graph
    g = _rewritten(graph, set(range(count)))
    if takes is None:
        return g
    keep = {n.meta[_MARK] for n in g.gm.graph.nodes
            if _is(n, _aten.scaled_dot_product_attention.default) and _MARK in n.meta and takes(n)}
    softmaxes = [m["softmax"] for m in _chains(graph)]
    log.debug("hand-written attention: %s as one SDPA; %s kept as written",
              ", ".join(softmaxes[i] for i in sorted(keep)) or "none",
              ", ".join(n for i, n in enumerate(softmaxes) if i not in keep) or "none")
    if len(keep) == count:
        return g
    return _rewritten(graph, keep) if keep else graph
