"""Sparsity masks: which weights can be masked, magnitude masks (per layer or global), N:M masks, ERK densities."""
from __future__ import annotations

import math
from typing import Iterable

import torch

from graphopt.errors import GraphoptError
from graphopt.ir.graph import Graph
from graphopt.ir.names import unmatched_patterns
from graphopt.passes.analysis.weights import linears_from_matmuls, weighted_ops


class SparsityError(GraphoptError):
    """A sparsity pass cannot do what it was asked; says which layer or option and what to do."""


def prunable_weights(graph: Graph, protect: Iterable[str] = (), who: str = "sparsify") -> dict[str, torch.Tensor]:
    """Float weights (>= 2-D) read as the weight of a conv or linear node, by parameter name, minus `protect`.
    Products with a constant weight (`x @ W.T`, GPT-2's `addmm`) are rewritten into linears first
    (`linears_from_matmuls`, as quantize does): the sparsity passes had found "no prunable weights" in GPT-2 and
    Falcon."""
    protect = list(protect)
    for pat in unmatched_patterns(graph, protect):
        raise SparsityError(f"{who} option 'protect': '{pat}' matches no node or parameter")
    linears_from_matmuls(graph, protect)
    ops, _ = weighted_ops(graph, protect)
    out = {n.args[1].target: graph.get_param(n.args[1].target) for n in ops
           if graph.get_param(n.args[1].target).dim() >= 2}
    if not out:
        quantized = [n.name for n in graph.nodes("call_function") if n.target in (
            torch.ops.aten.linear.default, torch.ops.aten.conv2d.default, torch.ops.aten.convolution.default)
            and len(n.args) > 1 and getattr(n.args[1], "op", "") == "call_function"
            and getattr(n.args[1].target, "__name__", "").startswith("dequantize_per_")]
        why = (f" {len(quantized)} layer(s) ({', '.join(quantized[:3])}{', ...' if len(quantized) > 3 else ''}) "
               "read integer weights through a dequantize (a quantized model): sparsify or prune the float "
               "model, then quantize it") if quantized else ""
        raise SparsityError(f"{who}: the graph has no prunable weights (conv/linear weights that are float "
                            f"parameters and not protected); nothing to sparsify.{why}")
    return out


def _keep_top(score: torch.Tensor, keep: int) -> torch.Tensor:
    """A bool mask keeping the `keep` largest entries of `score` (ties broken by position, deterministically)."""
    flat = score.reshape(-1)
    keep = max(0, min(keep, flat.numel()))
    mask = torch.zeros(flat.numel(), dtype=torch.bool)
    if keep:
        idx = torch.sort(flat, descending=True, stable=True).indices[:keep]
        mask[idx] = True
    return mask.reshape(score.shape)


def layer_masks(scores: dict[str, torch.Tensor], densities: dict[str, float]) -> dict[str, torch.Tensor]:
    """Keep round(density * numel) top-scoring entries of each tensor (at least one)."""
    return {n: _keep_top(s, max(1, round(densities[n] * s.numel()))) for n, s in scores.items()}


def magnitude_masks(weights: dict[str, torch.Tensor], sparsity: float, scope: str,
                    existing: dict[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
    """Masks removing `sparsity` of the weights by magnitude, per layer or with one global threshold.

    Weights already masked out stay out (their score is -1). Global scope keeps at least one weight per layer.
    """
    existing = existing or {}
    scores = {}
    for n, w in weights.items():
        s = w.detach().abs().float().clone()
        if n in existing:
            s[~existing[n]] = -1.0
        scores[n] = s
    if scope == "layer":
        return layer_masks(scores, {n: 1.0 - sparsity for n in weights})
    total = sum(s.numel() for s in scores.values())
    keep = max(len(scores), round((1.0 - sparsity) * total))
    flat = torch.cat([s.reshape(-1) for s in scores.values()])
    order = torch.sort(flat, descending=True, stable=True).indices[:keep]
    kept = torch.zeros(total, dtype=torch.bool)
    kept[order] = True
    out, off = {}, 0
    for n, s in scores.items():
        m = kept[off:off + s.numel()].reshape(s.shape).clone()
        if not m.any():
            m.reshape(-1)[s.reshape(-1).argmax()] = True
        out[n] = m
        off += s.numel()
    return out


def parse_block(text: str) -> tuple[int, int]:
    """'4x4' -> (4, 4); '1x1' is unstructured."""
    r, _, c = text.partition("x")
    if not (r.isdigit() and c.isdigit() and int(r) > 0 and int(c) > 0):
        raise ValueError(f"option 'block' must look like RxC (1x1, 4x4, 1x16), got '{text}'")
    return int(r), int(c)


def block_scores(w: torch.Tensor, block: tuple[int, int]) -> torch.Tensor | None:
    """Mean |w| of each R x C block of a 2-D weight [N/R, K/C], or None if the weight does not tile."""
    r, c = block
    if w.dim() != 2 or w.shape[0] % r or w.shape[1] % c:
        return None
    n, k = w.shape
    return w.detach().abs().float().reshape(n // r, r, k // c, c).mean((1, 3))


def expand_blocks(mask: torch.Tensor, block: tuple[int, int]) -> torch.Tensor:
    return mask.repeat_interleave(block[0], 0).repeat_interleave(block[1], 1)


def reduction_last(w: torch.Tensor) -> torch.Tensor:
    """The weight with its input channels last ([O, I] stays, conv [O, I, *k] -> [O, *k, I])."""
    return w if w.dim() == 2 else w.movedim(1, -1)


def nm_mask(w: torch.Tensor, n: int, m: int) -> torch.Tensor:
    """Keep the `n` largest of every `m` consecutive input channels (the reduction dimension sparse tensor cores
    compress), for each output channel and kernel position. Needs in_channels % m == 0."""
    r = reduction_last(w.detach().abs().float())
    groups = r.reshape(-1, m)
    idx = torch.topk(groups, n, dim=1, sorted=False).indices
    keep = torch.zeros_like(groups, dtype=torch.bool).scatter_(1, idx, True).reshape(r.shape)
    return keep if w.dim() == 2 else keep.movedim(-1, 1)


def is_nm(mask: torch.Tensor, n: int, m: int) -> bool:
    """True when every group of `m` consecutive input channels keeps at most `n`."""
    r = reduction_last(mask)
    return bool((r.reshape(-1, m).sum(1) <= n).all())


def erk_densities(shapes: dict[str, tuple[int, ...]], density: float) -> dict[str, float]:
    """Erdos-Renyi-Kernel densities: layer density proportional to sum(dims)/prod(dims), scaled so the total
    number of kept weights is `density` of all, with layers that would exceed 1 kept dense."""
    dense: set[str] = set()
    numel = {k: math.prod(s) for k, s in shapes.items()}
    raw = {k: sum(s) / math.prod(s) for k, s in shapes.items()}
    total = sum(numel.values())
    while True:
        budget = density * total - sum(numel[k] for k in dense)
        free = [k for k in shapes if k not in dense]
        eps = budget / sum(raw[k] * numel[k] for k in free)
        over = [k for k in free if eps * raw[k] > 1.0]
        if not over:
            break
        dense.update(over)
    return {k: 1.0 if k in dense else eps * raw[k] for k in shapes}


def check_sparsity(value: float, key: str = "sparsity") -> str:
    if not 0.0 <= value < 1.0:
        return f"option '{key}' must be in [0, 1), got {value}"
    return ""
