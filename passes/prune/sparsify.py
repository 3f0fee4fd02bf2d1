"""sparsify (unstructured magnitude pruning, one-shot or gradual) and sparsify-nm (N:M semi-structured masks).

Masks live in the IR (`Graph.masks`): the weights they remove are exact zeros, training passes keep them zero, and
the compiler and the manifest see them.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal, Optional

from graphopt.ir.graph import Graph
from graphopt.passes.distill.recover import TrainOptions
from graphopt.passes.distill.trainer import trainer_from_ctx
from graphopt.passes.prune.masks import (SparsityError, block_scores, check_sparsity, expand_blocks,
                                         magnitude_masks, nm_mask, parse_block, prunable_weights, reduction_last)
from graphopt.pm.registry import Contract, Pass, PassContext, PassResult, register_pass


def gmp_sparsity(final: float, k: int, n: int, initial: float = 0.0) -> float:
    """Zhu & Gupta's gradual schedule: s_k = s_f + (s_i - s_f)(1 - k/n)^3 for k = 0..n."""
    return final + (initial - final) * (1.0 - k / n) ** 3


def set_masks(graph: Graph, masks: dict, pattern: str) -> None:
    for name, m in masks.items():
        graph.set_mask(name, m, pattern)


def sparsity_stats(graph: Graph, names) -> dict:
    kept = sum(int(graph.masks[n].sum()) for n in names)
    total = sum(graph.masks[n].numel() for n in names)
    return {"layers": len(names), "sparsity": round(1 - kept / total, 4),
            "per_layer": {n: graph.sparsity_report()[n]["sparsity"] for n in names}}


@register_pass
class Sparsify(Pass):
    name = "sparsify"
    summary = ("Unstructured magnitude pruning of conv/linear weights: one-shot, or gradual (GMP, Zhu & Gupta) with "
               "distillation fine-tuning between steps. Masks are kept in the IR.")
    contract = Contract.TRAINING
    rewrites_weights = True

    @dataclass
    class Options(TrainOptions):
        sparsity: Optional[float] = field(default=None, metadata={"help": "fraction of weights to remove, in [0,1)"})
        scope: Literal["layer", "global"] = field(default="layer", metadata={
            "help": "layer: the same sparsity in every layer; global: one magnitude threshold over all layers"})
        schedule: Literal["oneshot", "gmp"] = field(default="oneshot", metadata={
            "help": "oneshot: prune now, no training; gmp: prune in `steps` cubic steps over the first 75% of "
                    "`epochs` of distillation, fine-tune for the rest (needs data)"})
        steps: int = field(default=8, metadata={"help": "pruning steps of the gmp schedule"})
        block: str = field(default="1x1", metadata={
            "help": "RxC: remove whole R x C blocks of linear and pointwise (1x1) conv weights (scored by mean "
                    "|w|), the shape BSR kernels turn into speed; 1x1 is unstructured. Other conv weights stay "
                    "unstructured"})
        protect: list[str] = field(default_factory=list, metadata={
            "help": "node or parameter names (glob) whose weights stay dense"})

        def validate(self) -> str:
            if self.sparsity is None:
                return "needs sparsity= (e.g. sparsify{sparsity=0.9})"
            try:
                parse_block(self.block)
            except ValueError as e:
                return str(e)
            if self.steps < 1:
                return f"option 'steps' must be >= 1, got {self.steps}"
            return check_sparsity(self.sparsity) or self.validate_training()

    def _prune(self, graph: Graph, sparsity: float) -> None:
        o = self.options
        weights = prunable_weights(graph, o.protect, self.name)
        block = parse_block(o.block)
        if block == (1, 1):
            set_masks(graph, magnitude_masks(weights, sparsity, o.scope, graph.masks), "unstructured")
            return
        pooled, plain = {}, {}
        for name, w in weights.items():
            kept = w * graph.masks[name] if name in graph.masks else w
            if kept.dim() == 4 and tuple(kept.shape[2:]) == (1, 1):  # a pointwise conv: an [O, I] matrix
                kept = kept.reshape(kept.shape[:2])
            b = block_scores(kept, block)
            if b is None:
                plain[name] = w
            else:
                pooled[name] = b
        if pooled:
            for name, m in magnitude_masks(pooled, sparsity, o.scope).items():
                graph.set_mask(name, expand_blocks(m, block).reshape(weights[name].shape), f"block{o.block}")
        if plain:
            set_masks(graph, magnitude_masks(plain, sparsity, o.scope, graph.masks), "unstructured")

    def run(self, graph: Graph, ctx: PassContext) -> PassResult:
        o = self.options
        weights = prunable_weights(graph, o.protect, self.name)
        if o.schedule == "oneshot":
            self._prune(graph, o.sparsity)
            return PassResult(graph, o.sparsity > 0, sparsity_stats(graph, weights),
                              "" if o.sparsity > 0 else "sparsity=0 removes nothing")
        trainer = trainer_from_ctx(graph, ctx, o.train_config(ctx.seed, "sparsify gmp"), kd=o.kd)
        total = o.epochs * len(trainer.batches)
        prune_span = max(o.steps, int(0.75 * total))
        done = 0
        losses = []
        for k in range(1, o.steps + 1):
            s = gmp_sparsity(o.sparsity, k, o.steps)
            self._prune(graph, s)
            chunk = round(k * prune_span / o.steps) - done
            if chunk > 0:
                losses.append(trainer.fit(steps=chunk, desc=f"gmp {k}/{o.steps} s={s:.2f}"))
                done += chunk
        if total - done > 0:
            losses.append(trainer.fit(steps=total - done, desc="gmp fine-tune"))
        stats = sparsity_stats(graph, weights)
        stats.update(steps=done + max(0, total - done), loss_last=losses[-1]["loss_last"] if losses else None)
        return PassResult(graph, o.sparsity > 0, stats, "" if o.sparsity > 0 else "sparsity=0 removes nothing")


@register_pass
class SparsifyNM(Pass):
    name = "sparsify-nm"
    summary = ("N:M semi-structured sparsity (2:4 for sparse tensor cores): in every group of M consecutive input "
               "channels keep the N largest weights. One-shot; follow with `recover` to fine-tune.")
    contract = Contract.TRAINING
    rewrites_weights = True

    @dataclass
    class Options:
        n: int = field(default=2, metadata={"help": "weights kept per group"})
        m: int = field(default=4, metadata={"help": "group size along the input channels"})
        protect: list[str] = field(default_factory=list, metadata={
            "help": "node or parameter names (glob) whose weights stay dense"})

        def validate(self) -> str:
            if self.m < 1 or self.n < 1:
                return f"options 'n' and 'm' must be >= 1, got n={self.n} m={self.m}"
            if self.n > self.m:
                return f"option 'n' ({self.n}) must not exceed 'm' ({self.m}): N:M keeps N of every M weights"
            return ""

    def run(self, graph: Graph, ctx: PassContext) -> PassResult:
        o = self.options
        weights = prunable_weights(graph, o.protect, self.name)
        done, skipped = [], {}
        for name, w in weights.items():
            cin = reduction_last(w).shape[-1]
            if cin % o.m:
                skipped[name] = f"{cin} input channels are not a multiple of {o.m}"
                continue
            graph.set_mask(name, nm_mask(w, o.n, o.m) if name not in graph.masks else
                           nm_mask(w * graph.masks[name], o.n, o.m) & graph.masks[name], f"{o.n}:{o.m}")
            done.append(name)
        if not done:
            raise SparsityError(f"sparsify-nm: no layer has input channels divisible by m={o.m} "
                                f"({'; '.join(f'{k}: {v}' for k, v in skipped.items())})")
        stats = sparsity_stats(graph, done)
        stats["skipped"] = skipped
        return PassResult(graph, o.n < o.m, stats, "" if o.n < o.m else f"n=m={o.m} keeps every weight")
