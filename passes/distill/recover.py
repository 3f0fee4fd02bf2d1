"""recover: fine-tune the graph with knowledge distillation from the pipeline's input graph (unlabeled data ok)."""
from __future__ import annotations

from dataclasses import dataclass, field

from graphopt.ir.graph import Graph
from graphopt.passes.distill.trainer import DistillConfig, trainer_from_ctx
from graphopt.pm.registry import Contract, Pass, PassContext, PassResult, register_pass


@dataclass
class TrainOptions:
    """Options every training pass shares (its Options dataclass inherits them)."""

    epochs: int = field(default=3, metadata={"help": "passes over the data"})
    lr: float = field(default=1e-3, metadata={"help": "learning rate"})
    optimizer: str = field(default="adam", metadata={"help": "adam | sgd (momentum 0.9); ctx extras 'optimizer' "
                                                             "(a callable params -> optimizer) overrides"})
    temperature: float = field(default=4.0, metadata={"help": "KD softmax temperature"})
    kd: bool = field(default=True, metadata={
        "help": "distill from the teacher (ctx extras 'teacher', else the pipeline's input graph); false: labels only"})
    match: list[str] = field(default_factory=list, metadata={
        "help": "node names whose activations the student learns to match (feature distillation)"})
    bn: str = field(default="auto", metadata={
        "help": "batch norms while training: train (batch statistics; running stats updated), frozen (running "
                "stats as they are), auto (train when every batch has >= 8 samples)"})

    def validate_training(self) -> str:
        if self.epochs < 1:
            return f"option 'epochs' must be >= 1, got {self.epochs}"
        if not self.lr > 0:
            return f"option 'lr' must be > 0, got {self.lr}"
        if self.optimizer not in ("adam", "sgd"):
            return f"option 'optimizer' must be adam or sgd, got '{self.optimizer}'"
        if self.bn not in ("auto", "train", "frozen"):
            return f"option 'bn' must be auto, train or frozen, got '{self.bn}'"
        return ""

    def validate(self) -> str:
        return self.validate_training()

    def train_config(self, seed: int, desc: str) -> DistillConfig:
        return DistillConfig(epochs=self.epochs, lr=self.lr, temperature=self.temperature, match=list(self.match),
                             optimizer=self.optimizer, seed=seed, desc=desc, bn=self.bn)


@register_pass
class Recover(Pass):
    name = "recover"
    summary = ("Fine-tune with knowledge distillation from the unpruned/unquantized input graph on the context's data "
               "(labels optional, via ctx extras 'labels'); sparsity masks stay fixed.")
    contract = Contract.TRAINING

    @dataclass
    class Options(TrainOptions):
        pass

    def run(self, graph: Graph, ctx: PassContext) -> PassResult:
        trainer = trainer_from_ctx(graph, ctx, self.options.train_config(ctx.seed, "recover"), kd=self.options.kd)
        stats = trainer.fit()
        return PassResult(graph, stats["steps"] > 0, stats)
