"""Ops torch's ONNX exporter has no function for, or refuses in one of their forms, written as ops it has: run on
the exported program before the export. Each was a model that compiled with graphopt and whose `--target onnx`
failed ("No ONNX function found for aten._cdist_forward", "Required parameter 'dim' is not provided")."""
from __future__ import annotations

import math


def _amax_amin(op_name: str):
    def decompose(x, dim=(), keepdim=False):
        """amax / amin over every dim (torch.amax(x) with no dims, as in x.abs().amax() for a clamp bound): the
        exporter's function requires the dims, so they are written out."""
        import torch
        if len(dim) or x.dim() == 0:
            return NotImplemented
        return getattr(torch.ops.aten, op_name).default(x, list(range(x.dim())), keepdim)
    return decompose


def _sort_stable(x, *, stable=None, dim=-1, descending=False):
    """torch.sort(..., stable=True): the exporter has sort.default only, which it writes as TopK; ONNX TopK puts the
    lower index first among equal values, the order a stable sort gives."""
    import torch
    return torch.ops.aten.sort.default(x, dim, descending)


def _rrelu(x, noise, lower=1.0 / 8.0, upper=1.0 / 3.0, training=False, generator=None):
    """rrelu in eval mode (F.rrelu(training=False), nn.RReLU in an eval model): a leaky ReLU of slope
    (lower + upper) / 2; the noise goes out as it came."""
    import torch
    if training:
        return NotImplemented
    return torch.ops.aten.leaky_relu.default(x, (float(lower) + float(upper)) / 2.0), noise


def _rrelu_whole(x, lower=1.0 / 8.0, upper=1.0 / 3.0, training=False, generator=None):
    """F.rrelu as the graph holds it (see `_rrelu`)."""
    if training:
        return NotImplemented
    import torch
    return torch.ops.aten.leaky_relu.default(x, (float(lower) + float(upper)) / 2.0)


def _cdist(x1, x2, p=2.0, compute_mode=None):
    """torch.cdist as the differences of every pair of rows ([..., M, N, D], reduced over D): exact for every p
    (p = 2 as the square root of the summed squares, p = 0 counting the differing coordinates, p = inf the largest
    difference)."""
    import torch
    d = (x1.unsqueeze(-2) - x2.unsqueeze(-3)).abs()
    p = float(p)
    if p == 0.0:
        return (d != 0).to(x1.dtype).sum(-1)
    if p == 1.0:
        return d.sum(-1)
    if p == 2.0:
        return torch.sqrt((d * d).sum(-1))
    if math.isinf(p):
        return d.amax(-1)
    return d.pow(p).sum(-1).pow(1.0 / p)


def _windows(size: int, out: int) -> list[tuple[int, int]]:
    """Adaptive pooling's windows along one axis: output i reads [floor(i size / out), ceil((i + 1) size / out))."""
    return [(i * size // out, -(-(i + 1) * size // out)) for i in range(out)]


def _adaptive_max_pool2d(x, output_size):
    """Adaptive max pooling's values (CBAM's, SPP's), the max over each output cell's window taken along H, then
    along W (the max of a rectangle is the max of its rows' maxima: exact). Only where the indices go unread
    (`for_exporter` checks); the exporter has no function for the op."""
    import torch
    h, w = int(x.shape[-2]), int(x.shape[-1])
    oh, ow = (int(v) if v is not None else d for v, d in zip(output_size, (h, w)))
    rows = torch.cat([x[..., a:b, :].amax(-2, keepdim=True) for a, b in _windows(h, oh)], -2)
    values = torch.cat([rows[..., a:b].amax(-1, keepdim=True) for a, b in _windows(w, ow)], -1)
    return values, torch.zeros(values.shape, dtype=torch.int64)


def _cumulative(op_name: str):
    def decompose(x, dim):
        """cummax / cummin's values as a scan of log2(n) steps: step k takes the max (min) with the values 2^k
        before, the shifted-in ones padded with the values themselves (exact; ONNX has no cumulative max). Only
        where the indices go unread (`for_exporter` checks)."""
        import torch
        if x.dim() == 0:
            return NotImplemented
        dim = dim % x.dim()
        n, v, step = int(x.shape[dim]), x, 1
        pick = torch.maximum if op_name == "cummax" else torch.minimum
        while step < n:
            v = torch.cat([v.narrow(dim, 0, step), pick(v.narrow(dim, step, n - step), v.narrow(dim, 0, n - step))],
                          dim)
            step *= 2
        return v, torch.zeros(v.shape, dtype=torch.int64)
    return decompose


def _embedding_bag(weight, indices, offsets, scale_grad_by_freq=False, mode=0, sparse=False,
                   per_sample_weights=None, include_last_offset=False, padding_idx=None):
    """nn.EmbeddingBag (DLRM's tables) as a gather and a segment reduction: position j of the flat indices belongs
    to bag (number of offsets <= j) - 1; sum and mean add the (weighted) rows into their bags (index_add, which
    the export writes as a scatter add), max takes a scatter amax; padding_idx's rows count for nothing, and a bag
    with no rows is zeros, as in PyTorch. torch's exporter wrote an invalid model for every mode ("Nodes in a graph
    must be topologically sorted"). The other three outputs are zeros: only where they go unread."""
    import torch
    if indices.dim() == 2:  # [B, L]: bags of L (offsets unused)
        bags, length = int(indices.shape[0]), int(indices.shape[1])
        indices = indices.reshape(-1)
        bag = torch.arange(bags * length, dtype=torch.int64) // length
        if per_sample_weights is not None:
            per_sample_weights = per_sample_weights.reshape(-1)
    else:
        starts = offsets[:-1] if include_last_offset else offsets
        bags = int(starts.shape[0])
        bag = (torch.arange(int(indices.shape[0]), dtype=torch.int64)[:, None] >= starts[None, :]).sum(1) - 1
    rows = torch.ops.aten.embedding.default(weight, indices)
    valid = torch.ones(indices.shape, dtype=weight.dtype) if padding_idx is None or padding_idx < 0 else \
        (indices != padding_idx).to(weight.dtype)
    count = torch.zeros(bags, dtype=weight.dtype).index_add(0, bag, valid)
    if int(mode) == 2:
        lowest = torch.full_like(rows, float("-inf"))
        taken = torch.where(valid[:, None] > 0, rows, lowest)
        out = torch.full((bags, int(weight.shape[1])), float("-inf"), dtype=weight.dtype).scatter_reduce(
            0, bag[:, None].expand(rows.shape), taken, "amax")
        out = torch.where(count[:, None] > 0, out, torch.zeros_like(out))
    else:
        if per_sample_weights is not None:
            rows = rows * per_sample_weights[:, None]
        out = torch.zeros(bags, int(weight.shape[1]), dtype=weight.dtype).index_add(0, bag, rows * valid[:, None])
        if int(mode) == 1:
            out = out / count.clamp_min(1.0)[:, None]
    none = torch.zeros(1, dtype=torch.int64)
    return out, none, none, none


def _cumprod(x, dim, dtype=None):
    """torch.cumprod as a scan of log2(n) steps (step k multiplies in the product 2^k before; ONNX has no
    cumulative product): the products are grouped differently from a running one, so they agree to float rounding
    (a zero stays exact)."""
    import torch
    if dtype is not None and dtype != x.dtype:
        x = x.to(dtype)
    if x.dim() == 0:
        return x
    dim = dim % x.dim()
    n, v, step = int(x.shape[dim]), x, 1
    while step < n:
        v = torch.cat([v.narrow(dim, 0, step), v.narrow(dim, step, n - step) * v.narrow(dim, 0, n - step)], dim)
        step *= 2
    return v


def _kth(x, k: int, dim: int, keepdim: bool):
    """The k-th smallest value (from 0) along `dim` by a sort (ONNX TopK), and zeros for the indices."""
    import torch
    dim = dim % max(x.dim(), 1)
    v = torch.sort(x, dim).values.narrow(dim, k, 1)
    v = v if keepdim else v.squeeze(dim)
    return v, torch.zeros(v.shape, dtype=torch.int64)


def _median_dim(x, dim=-1, keepdim=False):
    """torch.median along a dim: the lower middle value, (n - 1) // 2 in sorted order. Values only (`for_exporter`
    checks the indices go unread). A NaN in a row: torch gives NaN, TopK's order of NaN is not defined."""
    if x.dim() == 0:
        return NotImplemented
    return _kth(x, (int(x.shape[dim]) - 1) // 2, dim, keepdim)


def _median_all(x):
    """torch.median over every element (see `_median_dim`)."""
    if x.numel() == 0:
        return NotImplemented
    return _kth(x.reshape(-1), (x.numel() - 1) // 2, 0, False)[0]


def _kthvalue(x, k, dim=-1, keepdim=False):
    """torch.kthvalue's values (k from 1)."""
    if x.dim() == 0:
        return NotImplemented
    return _kth(x, int(k) - 1, dim, keepdim)


def _adaptive_avg_pool3d(x, output_size):
    """Adaptive average pooling over D, H and W (3-D CNNs' heads): the mean over each output cell's window, taken
    along W, then H, then D (a box's mean is the mean of its rows' means when each axis's window is the same for
    every position on the others: exact up to float rounding, uneven windows included)."""
    import torch
    v = x
    for axis, out in zip((-1, -2, -3), reversed([int(o) if o is not None else None for o in output_size])):
        size = int(v.shape[axis])
        out = size if out is None else out
        v = torch.cat([v.narrow(axis, a, b - a).mean(axis, keepdim=True) for a, b in _windows(size, out)], axis)
    return v


def _searchsorted(sorted_sequence, x, *, out_int32=False, right=False, side=None, sorter=None):
    """torch.searchsorted (quantile binning, piecewise tables): the count of boundaries below each value (at or
    below: right / side='right'), a comparison against every boundary summed over them; a NaN counts past every
    boundary, as torch places it. Batched boundaries [..., M] compare with values [..., K] row by row. A `sorter`
    stays with the exporter."""
    import torch
    if sorter is not None:
        return NotImplemented
    bounds = sorted_sequence if sorted_sequence.dim() == 1 else sorted_sequence.unsqueeze(-2)
    v = x.unsqueeze(-1)
    past = (v >= bounds) if right or side == "right" else (v > bounds)
    past = past | torch.isnan(v) if x.is_floating_point() else past
    return past.to(torch.int64).sum(-1).to(torch.int32 if out_int32 else torch.int64)


def _bucketize(x, boundaries, *, out_int32=False, right=False):
    """torch.bucketize: searchsorted with the roles of its arguments exchanged (and `right` meaning the same)."""
    return _searchsorted(boundaries, x, out_int32=out_int32, right=right)


def exporter_table() -> dict:
    """The decompositions above, by the op the graph holds (torch.cdist and F.rrelu are still whole there; the
    exporter's own decompositions would make them _cdist_forward and rrelu_with_noise_functional, which it lacks),
    and graphopt's depth taps (an int8 3-D conv's input, fold-qdq's) as the pad, slices, stack and reshape they
    are."""
    import torch

    from graphopt.ir.quant_ops import _depth_taps  # (importing it registers torch.ops.graphopt)
    aten = torch.ops.aten
    return {aten.amax.default: _amax_amin("amax"), aten.amin.default: _amax_amin("amin"),
            aten.sort.stable: _sort_stable, aten.rrelu.default: _rrelu_whole,
            aten.rrelu_with_noise_functional.default: _rrelu, aten.cdist.default: _cdist,
            aten._cdist_forward.default: _cdist, aten.adaptive_max_pool2d.default: _adaptive_max_pool2d,
            aten.cummax.default: _cumulative("cummax"), aten.cummin.default: _cumulative("cummin"),
            aten.embedding_bag.default: _embedding_bag, aten.embedding_bag.padding_idx: _embedding_bag,
            aten._embedding_bag.default: _embedding_bag, aten._embedding_bag_forward_only.default: _embedding_bag,
            aten.searchsorted.Tensor: _searchsorted, aten.bucketize.Tensor: _bucketize,
            aten.cumprod.default: _cumprod, aten.median.dim: _median_dim, aten.median.default: _median_all,
            aten.kthvalue.default: _kthvalue, aten._adaptive_avg_pool3d.default: _adaptive_avg_pool3d,
            aten.adaptive_avg_pool3d.default: _adaptive_avg_pool3d,
            torch.ops.graphopt.depth_taps.default: _depth_taps}


# ops whose decomposition above computes the first output only (the others are zeros): taken where nothing reads
# the others
_VALUES_ONLY = ("adaptive_max_pool2d", "cummax", "cummin", "embedding_bag", "_embedding_bag",
                "_embedding_bag_forward_only", "median", "kthvalue")


def _projected_lstm(n) -> bool:
    """Whether node `n` is an LSTM with projections (proj_size: its h state narrower than its c state)."""
    import torch
    if n.op != "call_function" or n.target is not torch.ops.aten.lstm.input:
        return False
    h, c = (getattr(t, "meta", {}).get("val") for t in n.args[1])
    return h is not None and c is not None and h.shape[-1] != c.shape[-1]


def for_exporter(ep):
    """`ep` with the ops of `exporter_table` decomposed, or `ep` itself where it has none. An LSTM with projections
    is refused here, naming its node: the exporter wrote one layer of it as an LSTM whose states ONNX Runtime
    refused at run time ("Input initial_c must have shape {1,2,4}") and two as an invalid model (ONNX's LSTM has
    no projection)."""
    import operator

    from graphopt.errors import TargetError
    from graphopt.ir.graph import run_decompositions
    for n in ep.graph.nodes:
        if _projected_lstm(n):
            raise TargetError(f"ONNX export of aten.lstm.input (node '{n.name}'): an LSTM with projections "
                              "(proj_size) has no ONNX form (ONNX's LSTM has no projection, and torch's exporter "
                              "writes a model ONNX Runtime cannot run); graphopt's own targets compile it "
                              "(--target llvm), or export a model whose LSTM has proj_size=0")
    table = exporter_table()
    for n in ep.graph.nodes:
        name = getattr(n.target, "_opname", None)
        several = n.op == "call_function" and len(getattr(getattr(n.target, "_schema", None), "returns", ())) > 1
        if several and name in _VALUES_ONLY and any(
                u.target is not operator.getitem or (u.args[1] != 0 and u.users) for u in n.users):
            table.pop(n.target, None)  # (its indices are read: left to the exporter, which names the op)
    if not any(n.op == "call_function" and n.target in table for n in ep.graph.nodes):
        return ep
    return run_decompositions(ep, table)
