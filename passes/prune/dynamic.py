"""Dynamic sparse training at fixed sparsity: rigl (regrow by gradient magnitude, Evci et al. 2020) and set
(regrow at random, Mocanu et al. 2018). Every `update-every` steps a cosine-decaying fraction of each layer's active
weights with the smallest magnitude is dropped and as many inactive ones are grown (at zero)."""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Literal, Optional

import torch

from graphopt.ir.graph import Graph
from graphopt.passes.distill.recover import TrainOptions
from graphopt.passes.distill.trainer import Trainer, trainer_from_ctx
from graphopt.passes.prune.masks import check_sparsity, erk_densities, layer_masks, prunable_weights
from graphopt.passes.prune.sparsify import set_masks, sparsity_stats
from graphopt.pm.registry import Contract, Pass, PassContext, PassResult, register_pass


def drop_fraction(base: float, step: int, end: int) -> float:
    """Cosine decay of the update fraction from `base` at step 0 to 0 at `end`."""
    return 0.0 if step >= end else base * 0.5 * (1 + math.cos(math.pi * step / end))


class _Updater:
    def __init__(self, graph: Graph, trainer: Trainer, names: list[str], grow: str, every: int, base: float,
                 end: int, seed: int):
        self.graph, self.trainer, self.names, self.grow = graph, trainer, names, grow
        self.every, self.base, self.end = every, base, end
        self.gen = torch.Generator().manual_seed(seed + 104729)
        self.grads: dict[str, torch.Tensor] = {}
        self.updates = 0
        self.changed = 0

    def due(self, step: int) -> bool:
        return (step + 1) % self.every == 0 and step + 1 < self.end

    def on_grad(self, step: int) -> None:
        if self.grow == "gradient" and self.due(step):
            self.grads = {n: self.trainer.params[n].grad.detach().abs().clone() for n in self.names}

    @torch.no_grad()
    def on_step(self, step: int) -> None:
        if not self.due(step):
            return
        frac = drop_fraction(self.base, step + 1, self.end)
        opt_state = self.trainer.optimizer.state
        for n in self.names:
            p, mask = self.trainer.params[n], self.graph.masks[n]
            k = int(frac * int(mask.sum()))
            if k == 0:
                continue
            mag = torch.where(mask, p.detach().abs(), torch.full_like(p, math.inf))
            drop = torch.topk(mag.reshape(-1), k, largest=False).indices
            new = mask.clone().reshape(-1)
            new[drop] = False
            if self.grow == "gradient":
                score = self.grads[n].reshape(-1).clone()
            else:
                score = torch.rand(new.numel(), generator=self.gen)
            score[new] = -math.inf
            grow = torch.topk(score, k).indices
            new[grow] = True
            new = new.reshape(mask.shape)
            grown = new & ~mask
            p.masked_fill_(grown, 0.0)
            for buf in ("exp_avg", "exp_avg_sq", "momentum_buffer"):
                if p in opt_state and buf in opt_state[p]:
                    opt_state[p][buf].masked_fill_(grown, 0.0)
            self.changed += int(grown.sum())
            self.graph.masks[n] = new
        self.graph.apply_masks(self.names)
        self.updates += 1


class _DynamicSparse(Pass):
    contract = Contract.TRAINING
    rewrites_weights = True
    grow = "gradient"

    @dataclass
    class Options(TrainOptions):
        sparsity: Optional[float] = field(default=None, metadata={"help": "fraction of weights removed, in [0,1)"})
        update_every: int = field(default=50, metadata={"help": "training steps between mask updates"})
        drop_fraction: float = field(default=0.3, metadata={
            "help": "fraction of active weights replaced at the first update (cosine-decayed to 0)"})
        end: float = field(default=0.75, metadata={"help": "stop updating masks after this fraction of training"})
        init: Literal["erk", "uniform"] = field(default="erk", metadata={
            "help": "per-layer densities: erk (Erdos-Renyi-Kernel, denser small layers) or uniform"})
        protect: list[str] = field(default_factory=list, metadata={
            "help": "node or parameter names (glob) whose weights stay dense"})

        def validate(self) -> str:
            if self.sparsity is None:
                return "needs sparsity= (e.g. rigl{sparsity=0.9})"
            if self.update_every < 1:
                return f"option 'update-every' must be >= 1, got {self.update_every}"
            if not 0 <= self.drop_fraction < 1:
                return f"option 'drop-fraction' must be in [0, 1), got {self.drop_fraction}"
            if not 0 < self.end <= 1:
                return f"option 'end' must be in (0, 1], got {self.end}"
            return check_sparsity(self.sparsity) or self.validate_training()

    def run(self, graph: Graph, ctx: PassContext) -> PassResult:
        o = self.options
        weights = prunable_weights(graph, o.protect, self.name)
        density = 1.0 - o.sparsity
        if o.init == "erk":
            dens = erk_densities({n: tuple(w.shape) for n, w in weights.items()}, density)
        else:
            dens = {n: density for n in weights}
        gen = torch.Generator().manual_seed(ctx.seed + 31)
        # initial masks: magnitude (tiny random jitter breaks the ties of a fresh init deterministically)
        scores = {n: w.detach().abs() + 1e-12 * torch.rand(w.shape, generator=gen) for n, w in weights.items()}
        set_masks(graph, layer_masks(scores, dens), "unstructured")
        trainer = trainer_from_ctx(graph, ctx, o.train_config(ctx.seed, self.name), kd=o.kd)
        total = o.epochs * len(trainer.batches)
        up = _Updater(graph, trainer, list(weights), self.grow, o.update_every, o.drop_fraction,
                      int(o.end * total), ctx.seed)
        trainer.on_grad, trainer.on_step = up.on_grad, up.on_step
        fit = trainer.fit()
        stats = sparsity_stats(graph, weights)
        stats.update(mask_updates=up.updates, connections_regrown=up.changed, loss_last=fit["loss_last"],
                     init=o.init)
        return PassResult(graph, True, stats)


@register_pass
class RigL(_DynamicSparse):
    name = "rigl"
    summary = ("RigL dynamic sparse training at fixed sparsity: periodically drop the smallest active weights and "
               "regrow the inactive ones with the largest gradient magnitude (distillation or labels).")
    grow = "gradient"


@register_pass
class SET(_DynamicSparse):
    name = "set"
    summary = ("SET dynamic sparse training at fixed sparsity: periodically drop the smallest active weights and "
               "regrow as many inactive ones at random.")
    grow = "random"
