"""recover: fine-tune the graph with knowledge distillation from the pipeline's input graph (unlabeled data ok)."""
from __future__ import annotations

from dataclasses import dataclass, field

from graphopt.ir.graph import Graph
from graphopt.passes.distill.trainer import DistillConfig, TrainingError, distill
from graphopt.pm.registry import Contract, Pass, PassContext, PassResult, register_pass


@register_pass
class Recover(Pass):
    name = "recover"
    summary = ("Fine-tune with knowledge distillation from the unpruned/unquantized input graph on the context's data "
               "(labels optional, via ctx extras 'labels').")
    contract = Contract.TRAINING

    @dataclass
    class Options:
        epochs: int = field(default=3, metadata={"help": "passes over the data"})
        lr: float = field(default=1e-3, metadata={"help": "Adam learning rate"})
        temperature: float = field(default=4.0, metadata={"help": "KD softmax temperature"})
        kd: bool = field(default=True, metadata={"help": "distill from the teacher (false: labels only)"})

        def validate(self) -> str:
            if self.epochs < 1:
                return f"option 'epochs' must be >= 1, got {self.epochs}"
            if not self.lr > 0:
                return f"option 'lr' must be > 0, got {self.lr}"
            return ""

    def run(self, graph: Graph, ctx: PassContext) -> PassResult:
        if not ctx.data:
            raise TrainingError("recover needs training data: optimize(..., data=[batches]) or --inputs")
        labels = ctx.extras.get("labels")
        if not self.options.kd and not labels:
            raise TrainingError("recover{kd=false} needs labels (optimize(..., labels=[...]))")
        cfg = DistillConfig(epochs=self.options.epochs, lr=self.options.lr, temperature=self.options.temperature,
                            kd_weight=1.0 if self.options.kd else 0.0, seed=ctx.seed)
        teacher = ctx.reference if ctx.reference is not None else graph.clone()
        stats = distill(graph, teacher, list(ctx.data), cfg, labels)
        return PassResult(graph, stats["steps"] > 0, stats)
