"""recover: fine-tune the graph with knowledge distillation from the pipeline's input graph (unlabeled data ok)."""
from __future__ import annotations

from dataclasses import dataclass, field

from graphopt.ir.graph import Graph
from graphopt.passes.distill.trainer import KD_LOSSES, DistillConfig, TrainingError, trainer_from_ctx
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
    kd_loss: str = field(default="auto", metadata={
        "help": "distillation loss on the output: kl (logits, softened by the temperature), mse, cosine (embeddings: "
                "1 - cosine similarity per sample), auto (kl for [N, C] outputs, else mse)"})
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
        if self.kd_loss not in KD_LOSSES:
            return f"option 'kd-loss' must be one of {', '.join(KD_LOSSES)}, got '{self.kd_loss}'"
        if self.bn not in ("auto", "train", "frozen"):
            return f"option 'bn' must be auto, train or frozen, got '{self.bn}'"
        return ""

    def validate(self) -> str:
        return self.validate_training()

    def train_config(self, seed: int, desc: str) -> DistillConfig:
        return DistillConfig(epochs=self.epochs, lr=self.lr, temperature=self.temperature, match=list(self.match),
                             optimizer=self.optimizer, seed=seed, desc=desc, bn=self.bn, kd_loss=self.kd_loss)


@register_pass
class Recover(Pass):
    name = "recover"
    summary = ("Fine-tune with knowledge distillation from the unpruned/unquantized input graph on the context's data "
               "(labels optional, via ctx extras 'labels'); sparsity masks stay fixed.")
    contract = Contract.TRAINING
    rewrites_weights = True

    @dataclass
    class Options(TrainOptions):
        holdout: float = field(default=0.0, metadata={
            "help": "fraction of the batches kept out of training (0: none); the weights with the lowest loss on them, "
                    "before training or after any epoch, are the ones kept, so recovery never ends worse there"})

        def validate(self) -> str:
            if not 0.0 <= self.holdout < 1.0:
                return f"option 'holdout' must be in [0, 1), got {self.holdout}"
            return self.validate_training()

    def run(self, graph: Graph, ctx: PassContext) -> PassResult:
        o = self.options
        cfg = o.train_config(ctx.seed, "recover")
        if o.holdout == 0.0:
            stats = trainer_from_ctx(graph, ctx, cfg, kd=o.kd).fit()
            return PassResult(graph, stats["steps"] > 0, stats)
        return self._run_with_holdout(graph, ctx, cfg)

    def _run_with_holdout(self, graph: Graph, ctx: PassContext, cfg) -> PassResult:
        import copy

        import torch
        o = self.options
        data = list(ctx.data or [])
        labels = ctx.extras.get("labels")
        n_val = max(1, round(len(data) * o.holdout))
        if len(data) - n_val < 1:
            raise TrainingError(f"recover{{holdout={o.holdout}}} leaves no batch to train on ({len(data)} batch(es)); "
                                "give more data or a smaller holdout")
        order = torch.randperm(len(data), generator=torch.Generator().manual_seed(ctx.seed)).tolist()
        val_idx, train_idx = sorted(order[:n_val]), sorted(order[n_val:])

        def part(idx):
            sub = copy.copy(ctx)
            sub.data = [data[i] for i in idx]
            sub.extras = dict(ctx.extras)
            if labels is not None:
                sub.extras["labels"] = [labels[i] for i in idx]
            return sub

        trainer = trainer_from_ctx(graph, part(train_idx), cfg, kd=o.kd)
        held = trainer_from_ctx(graph, part(val_idx), copy.copy(cfg), kd=o.kd)
        best, best_epoch = held.mean_loss(), 0
        before = best
        best_state = copy.deepcopy(graph.gm.state_dict())
        steps, curve = 0, []
        for epoch in range(1, o.epochs + 1):
            steps += trainer.fit(epochs=1, first_epoch=epoch - 1)["steps"]
            loss = held.mean_loss()
            curve.append(round(loss, 6))
            if loss < best:
                best, best_epoch, best_state = loss, epoch, copy.deepcopy(graph.gm.state_dict())
        graph.gm.load_state_dict(best_state)
        stats = {"steps": steps, "holdout_batches": n_val, "holdout_loss_before": round(before, 6),
                 "holdout_loss_best": round(best, 6), "holdout_curve": curve, "best_epoch": best_epoch}
        if best_epoch == 0:
            return PassResult(graph, False, stats, reason=f"no epoch lowered the loss on the {n_val} held-out "
                              f"batch(es) (before {before:.4g}, epochs {curve}); the input weights are kept")
        return PassResult(graph, True, stats)
