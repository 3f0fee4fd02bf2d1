"""graphopt's sparse ops (torch.library custom ops `graphopt::bsr_linear` and `graphopt::bsr_conv1x1`, a pointwise
conv) and the BSR format they read.

A weight W [N, K] in block-sparse-row (BSR) form with R x C blocks: `data[nnzb, R, C]` are the stored blocks,
`indices[nnzb]` their block-column, `indptr[N/R + 1]` where each block-row starts. CSR is BSR with 1 x 1 blocks.
The reference implementation densifies; targets lower the op to real sparse kernels.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from graphopt.ir.graph import Graph


@dataclass(frozen=True)
class BSR:
    data: torch.Tensor      # [nnzb, R, C] float
    indices: torch.Tensor   # [nnzb] int32 block-column index
    indptr: torch.Tensor    # [N/R + 1] int32
    shape: tuple[int, int]  # (N, K)

    @property
    def block(self) -> tuple[int, int]:
        return int(self.data.shape[1]), int(self.data.shape[2])

    @property
    def nnzb(self) -> int:
        return int(self.data.shape[0])


def layout_block(layout: str) -> tuple[int, int] | None:
    """'csr' -> (1, 1); 'bsr4x4' -> (4, 4); 'dense' -> None. Raises ValueError for anything else."""
    if layout == "dense":
        return None
    if layout == "csr":
        return 1, 1
    if layout.startswith("bsr") and "x" in layout:
        r, _, c = layout[3:].partition("x")
        if r.isdigit() and c.isdigit() and int(r) > 0 and int(c) > 0:
            return int(r), int(c)
    raise ValueError(f"unknown sparse layout '{layout}' (use dense, csr or bsrRxC such as bsr4x4, bsr1x16)")


def to_bsr(w: torch.Tensor, block: tuple[int, int]) -> BSR:
    """W [N, K] -> BSR keeping every R x C block with a nonzero (zeros inside kept blocks are stored)."""
    r, c = block
    n, k = w.shape
    if n % r or k % c:
        raise ValueError(f"weight [{n}, {k}] is not divisible into {r}x{c} blocks")
    blocks = w.reshape(n // r, r, k // c, c).permute(0, 2, 1, 3)  # [N/R, K/C, R, C]
    keep = blocks.ne(0).any(-1).any(-1)
    rows, cols = keep.nonzero(as_tuple=True)
    counts = keep.sum(1)
    indptr = torch.zeros(n // r + 1, dtype=torch.int32)
    indptr[1:] = torch.cumsum(counts, 0).to(torch.int32)
    data = blocks[rows, cols].contiguous()
    if data.shape[0] == 0:  # an all-zero weight still needs one (zero) block for a valid kernel
        data = torch.zeros(1, r, c, dtype=w.dtype)
        cols = torch.zeros(1, dtype=torch.long)
        indptr[1:] = 1  # block-row 0 holds it
    return BSR(data, cols.to(torch.int32), indptr, (n, k))


def bsr_dense(data: torch.Tensor, indices: torch.Tensor, indptr: torch.Tensor, n: int, k: int) -> torch.Tensor:
    """The dense [N, K] weight a BSR triple stands for."""
    nnzb, r, c = data.shape
    rows = torch.repeat_interleave(torch.arange(n // r), (indptr[1:] - indptr[:-1]).long())
    dense = torch.zeros(n // r, k // c, r, c, dtype=data.dtype)
    dense[rows, indices.long()] = data
    return dense.permute(0, 2, 1, 3).reshape(n, k)


@torch.library.custom_op("graphopt::bsr_linear", mutates_args=())
def bsr_linear(x: torch.Tensor, data: torch.Tensor, indices: torch.Tensor, indptr: torch.Tensor,
               bias: torch.Tensor | None, n: int) -> torch.Tensor:
    """y = x @ W.T + bias with W [n, x.shape[-1]] given in BSR form."""
    w = bsr_dense(data, indices, indptr, n, x.shape[-1])
    return torch.nn.functional.linear(x, w, bias)


@bsr_linear.register_fake
def _(x, data, indices, indptr, bias, n):
    return x.new_empty((*x.shape[:-1], n))


@torch.library.custom_op("graphopt::bsr_conv1x1", mutates_args=())
def bsr_conv1x1(x: torch.Tensor, data: torch.Tensor, indices: torch.Tensor, indptr: torch.Tensor,
                bias: torch.Tensor | None, n: int) -> torch.Tensor:
    """A pointwise conv (stride 1, no padding, one group) of x [B, K, H, W] with W [n, K] given in BSR form."""
    w = bsr_dense(data, indices, indptr, n, x.shape[1])
    return torch.nn.functional.conv2d(x, w[:, :, None, None], bias)


@bsr_conv1x1.register_fake
def _(x, data, indices, indptr, bias, n):
    return x.new_empty((x.shape[0], n, *x.shape[2:]))


SPARSE_OPS = ("bsr_linear.default", "bsr_conv1x1.default")


def sparse_layout_names(graph: "Graph") -> list[str]:
    """The nodes select-sparse-layout rewrote to bsr_linear / bsr_conv1x1 (no dense weight left to rewrite)."""
    return [n.name for n in graph.gm.graph.nodes
            if n.op == "call_function" and getattr(n.target, "__name__", "") in SPARSE_OPS]


def densify(graph: "Graph") -> "Graph":
    """A clone of `graph` with every bsr_linear / bsr_conv1x1 back to aten.linear / aten.conv2d over the dense
    weight (for targets, such as ONNX, that have no sparse op; the zeros stay exact)."""
    g = graph.clone()
    changed = False
    sparse = set(sparse_layout_names(g))
    for node in list(g.gm.graph.nodes):
        if node.name not in sparse:
            continue
        x, d, i, p, bias, n = node.args
        conv = node.target is torch.ops.graphopt.bsr_conv1x1.default
        w = bsr_dense(g.get_param(d.target), g.get_param(i.target), g.get_param(p.target), int(n),
                      int(x.meta["val"].shape[1 if conv else -1]))
        wnode = g.add_param(d.target.replace("_bsr_data", "") + "_dense", w[:, :, None, None] if conv else w,
                            before=node)
        with g.gm.graph.inserting_before(node):
            if conv:
                new = g.gm.graph.call_function(torch.ops.aten.conv2d.default, (x, wnode, bias))
            else:
                new = g.gm.graph.call_function(torch.ops.aten.linear.default, (x, wnode, bias))
        node.replace_all_uses_with(new)
        g.gm.graph.erase_node(node)
        changed = True
    if changed:
        g.gm.graph.eliminate_dead_code()
        g.remove_unused_params()
        g.refresh()
    return g
