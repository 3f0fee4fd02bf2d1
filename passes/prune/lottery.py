"""lottery-ticket: iterative magnitude pruning with weight rewinding (Frankle & Carbin; Frankle et al. 2020)."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import torch

from graphopt.ir.graph import Graph
from graphopt.passes.distill.recover import TrainOptions
from graphopt.passes.distill.trainer import trainer_from_ctx
from graphopt.passes.prune.masks import magnitude_masks, prunable_weights
from graphopt.passes.prune.sparsify import set_masks, sparsity_stats
from graphopt.pm.registry import Contract, Pass, PassContext, PassResult, register_pass


def parse_rewind(text: str) -> int:
    """'init' -> 0; 'step:K' -> K (rewind to the weights after K training steps)."""
    if text == "init":
        return 0
    if text.startswith("step:") and text[5:].isdigit():
        return int(text[5:])
    raise ValueError(f"option 'rewind' must be init or step:K (K >= 0 training steps), got '{text}'")


@register_pass
class LotteryTicket(Pass):
    name = "lottery-ticket"
    summary = ("Iterative magnitude pruning with rewinding: train, prune `rate` of the remaining weights, rewind the "
               "survivors to their early values; repeat `rounds` times, then train the ticket.")
    contract = Contract.TRAINING
    rewrites_weights = True

    @dataclass
    class Options(TrainOptions):
        rounds: int = field(default=5, metadata={"help": "prune-rewind rounds"})
        rate: float = field(default=0.4, metadata={
            "help": "fraction of the remaining weights removed per round (final sparsity 1-(1-rate)^rounds)"})
        rewind: str = field(default="init", metadata={
            "help": "init: rewind to the weights the pass received; step:K: to the weights after K training steps"})
        scope: Literal["layer", "global"] = field(default="global", metadata={
            "help": "magnitude threshold per layer or over all layers"})
        reinit: bool = field(default=False, metadata={
            "help": "control experiment: train the final mask from a fresh random initialization instead"})
        protect: list[str] = field(default_factory=list, metadata={
            "help": "node or parameter names (glob) whose weights stay dense"})

        def validate(self) -> str:
            if self.rounds < 1:
                return f"option 'rounds' must be >= 1, got {self.rounds}"
            if not 0 < self.rate < 1:
                return f"option 'rate' must be in (0, 1), got {self.rate}"
            try:
                parse_rewind(self.rewind)
            except ValueError as e:
                return str(e)
            return self.validate_training()

    def run(self, graph: Graph, ctx: PassContext) -> PassResult:
        o = self.options
        weights = prunable_weights(graph, o.protect, self.name)
        trainer = trainer_from_ctx(graph, ctx, o.train_config(ctx.seed, "lottery"), kd=o.kd)
        rewind_step = parse_rewind(o.rewind)
        if rewind_step:
            trainer.fit(steps=rewind_step, desc=f"to rewind point (step {rewind_step})")
        anchor = {n: p.detach().clone() for n, p in trainer.params.items()}
        rounds = []
        for r in range(1, o.rounds + 1):
            trainer.optimizer = None  # every round trains like the first: fresh optimizer state
            fit = trainer.fit(desc=f"lottery round {r}/{o.rounds}")
            s = 1.0 - (1.0 - o.rate) ** r
            set_masks(graph, magnitude_masks(prunable_weights(graph, o.protect, self.name), s, o.scope,
                                             graph.masks), "unstructured")
            with torch.no_grad():
                for n, p in trainer.params.items():
                    p.copy_(anchor[n])
            graph.apply_masks()
            rounds.append({"round": r, "sparsity": round(s, 4), "loss_last": fit["loss_last"]})
        if o.reinit:
            gen = torch.Generator().manual_seed(ctx.seed + 7919)
            with torch.no_grad():
                for n in weights:
                    p = trainer.params[n]
                    p.copy_(torch.randn(p.shape, generator=gen) * anchor[n].std())
            graph.apply_masks()
        trainer.optimizer = None
        final = trainer.fit(desc="train ticket")
        stats = sparsity_stats(graph, weights)
        stats.update(rounds=rounds, rewind=o.rewind, reinit=o.reinit, loss_last=final["loss_last"])
        return PassResult(graph, True, stats)
