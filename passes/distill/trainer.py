"""The trainer every training-based pass uses: knowledge distillation from a frozen teacher graph.

Losses: Hinton KD on the logits (softened with a temperature), feature matching at named nodes, and the task loss
(cross-entropy, or the user's `loss` callable) when labels exist; unlabeled data works with KD alone. Sparsity masks
of the student graph are honored: gradients of removed weights are zeroed and removed weights stay exactly zero.
Under `torch.distributed` (torchrun, any backend) the student is wrapped in DistributedDataParallel and each rank
trains on its share of the batches; everything random is seeded identically on every rank.
"""
from __future__ import annotations

import copy
import logging
import math
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import torch
import torch.fx as fx
import torch.nn.functional as F

from graphopt.errors import GraphoptError
from graphopt.ir.graph import Graph
from graphopt.passes.analysis.weights import learnable_params

log = logging.getLogger(__name__)


class TrainingError(GraphoptError):
    """Training diverged or could not start; names the step."""


@dataclass
class DistillConfig:
    epochs: int = 3
    lr: float = 1e-3
    temperature: float = 4.0
    kd_weight: float = 1.0          # weight of the logits KD loss (the task loss gets 1 - kd_weight with labels)
    feature_weight: float = 1.0     # weight of the feature-matching loss at `match` nodes
    match: list[str] = field(default_factory=list)   # node names whose activations the student should match
    weight_decay: float = 0.0
    optimizer: str = "adam"         # adam | sgd (momentum 0.9); ctx extras 'optimizer' (a callable) overrides
    seed: int = 0
    progress: bool = True
    desc: str = "distill"
    bn: str = "auto"                # batch norms: train (batch statistics, running stats updated) | frozen | auto
    kd_loss: str = "auto"           # auto | kl | mse | cosine (see kd_loss)


BATCH_NORMS = (torch.ops.aten.batch_norm.default,)
MIN_BN_BATCH = 8  # auto: batch statistics only from batches at least this large


def set_bn_training(gm: fx.GraphModule, on: bool) -> int:
    """Flip the `training` argument of the graph's batch norms (the traced graph says False) and recompile; in
    training mode they normalize with batch statistics and update their running-stat buffers in place. Returns how
    many batch norms there are."""
    nodes = [n for n in gm.graph.nodes if n.op == "call_function" and n.target in BATCH_NORMS]
    for n in nodes:
        n.args = (*n.args[:5], on, *n.args[6:])
    if nodes:
        gm.recompile()
    return len(nodes)


def _first(out: Any) -> torch.Tensor:
    return out[0] if isinstance(out, (tuple, list)) else out


KD_LOSSES = ("auto", "kl", "mse", "cosine")


def kd_loss(student: torch.Tensor, teacher: torch.Tensor, temperature: float, kind: str = "auto") -> torch.Tensor:
    """The distillation loss on the model's output. kl: Hinton KD for logits [N, C] (softened with the
    temperature); mse: mean squared error; cosine: 1 - the mean cosine similarity of each sample's output (for
    embeddings, where only the direction matters, e.g. a sentence encoder); auto: kl for [N, C > 1] outputs, else
    mse."""
    kind = _kd_kind(student, kind)
    if kind == "kl":
        t = temperature
        return F.kl_div(F.log_softmax(student / t, 1), F.softmax(teacher / t, 1), reduction="batchmean") * t * t
    if kind == "cosine":  # per sample (dim 0); a 1-D output is one sample
        rows = student.shape[0] if student.dim() > 1 else 1
        return 1 - F.cosine_similarity(student.reshape(rows, -1), teacher.reshape(rows, -1), dim=1).mean()
    return F.mse_loss(student, teacher)


def _kd_kind(student: torch.Tensor, kind: str) -> str:
    """kd-loss=auto resolved on the output: kl for [N, C > 1] outputs (logits), else mse."""
    if kind != "auto":
        return kind
    return "kl" if student.dim() == 2 and student.shape[1] > 1 else "mse"


def feature_loss(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """MSE normalized by the teacher feature's mean square, so layers of any scale weigh alike."""
    return F.mse_loss(student, teacher) / (teacher.pow(2).mean() + 1e-8)


def with_taps(graph: Graph, names: Sequence[str]) -> fx.GraphModule:
    """A module sharing `graph`'s parameters that returns (outputs, (activation of each named node, ...))."""
    g = copy.deepcopy(graph.gm.graph)
    by_name = {n.name: n for n in g.nodes}
    missing = [n for n in names if n not in by_name]
    if missing:
        raise TrainingError(f"feature matching: no node named {missing} (see `graphopt inspect --ir`)")
    out = next(n for n in g.nodes if n.op == "output")
    out.args = ((tuple(out.args[0]), tuple(by_name[n] for n in names)),)
    return fx.GraphModule(graph.gm, g)  # get_attr targets are copied by reference: training updates `graph`


def shard(items: Sequence, rank: int, world: int) -> list:
    """Rank `rank`'s equal share of `items` (the remainder is dropped, so every rank runs the same steps)."""
    per = len(items) // world
    return list(items[rank * per:(rank + 1) * per]) if world > 1 else list(items)


def dist_info() -> tuple[int, int]:
    import torch.distributed as dist
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


class Trainer:
    """Trains `student`'s float parameters in place, distilling from `teacher`.

    Hooks: `on_grad(step)` runs after backward, while the gradients are still dense (RigL reads them there);
    `on_step(step)` after the optimizer step and the masks were applied.
    """

    def __init__(self, student: Graph, teacher: Graph | None, batches: Sequence[tuple], cfg: DistillConfig,
                 labels: Sequence[torch.Tensor] | None = None, loss_fn: Callable | None = None,
                 make_optimizer: Callable | None = None):
        if not batches:
            raise TrainingError("the data loader yielded no batches: give data (optimize(..., data=[...]) or "
                                "--inputs)")
        if labels is not None and len(labels) != len(batches):
            raise TrainingError(f"got {len(batches)} batches but {len(labels)} label tensors: give one per batch")
        if teacher is None and labels is None:
            raise TrainingError("training needs a teacher graph or labels")
        self.student, self.teacher, self.cfg = student, teacher, cfg
        self.rank, self.world = dist_info()
        idx = shard(range(len(batches)), self.rank, self.world)
        if not idx:
            raise TrainingError(f"{len(batches)} batch(es) cannot be shared by {self.world} ranks")
        self.batches = [batches[i] for i in idx]
        self.labels = [labels[i] for i in idx] if labels is not None else None
        self.loss_fn = loss_fn
        self.params = learnable_params(student)
        if not self.params:
            raise TrainingError("the student graph has no trainable parameters")
        self.make_optimizer = make_optimizer
        self.student_mod = with_taps(student, cfg.match) if cfg.match else student.gm
        self.teacher_mod = None
        if teacher is not None:
            self.teacher_mod = with_taps(teacher, cfg.match) if cfg.match else teacher.gm
        self.step = 0
        self.on_grad: Callable[[int], None] | None = None
        self.on_step: Callable[[int], None] | None = None
        self.matched: float | None = None  # a loss under which the student matches its teacher (`_matched_loss`)
        self.optimizer: torch.optim.Optimizer | None = None

    def _new_optimizer(self) -> torch.optim.Optimizer:
        params = list(self.params.values())
        if self.make_optimizer is not None:
            return self.make_optimizer(params)
        if self.cfg.optimizer == "sgd":
            return torch.optim.SGD(params, lr=self.cfg.lr, momentum=0.9, weight_decay=self.cfg.weight_decay)
        return torch.optim.Adam(params, lr=self.cfg.lr, weight_decay=self.cfg.weight_decay)

    def _loss(self, model, k: int) -> torch.Tensor:
        batch = self.batches[k]
        out = model(*batch)
        feats = ()
        if self.cfg.match:
            out, feats = out
        out = _first(out)
        loss = out.new_zeros(())
        has_labels = self.labels is not None
        if self.teacher_mod is not None and (self.cfg.kd_weight > 0 or feats):
            with torch.no_grad():
                t_out = self.teacher_mod(*batch)
            t_feats = ()
            if self.cfg.match:
                t_out, t_feats = t_out
            if self.cfg.kd_weight > 0:
                loss = loss + kd_loss(out, _first(t_out), self.cfg.temperature, self.cfg.kd_loss) * (
                    self.cfg.kd_weight if has_labels else 1.0)
                if self.matched is None and not has_labels and not self.cfg.match:
                    self.matched = _matched_loss(out, _first(t_out), self.cfg.kd_loss)
            for name, s, t in zip(self.cfg.match, feats, t_feats):
                if s.shape != t.shape:
                    raise TrainingError(f"feature matching at '{name}': student shape {list(s.shape)} differs from "
                                        f"the teacher's {list(t.shape)} (pick a node whose width pruning kept)")
                loss = loss + self.cfg.feature_weight * feature_loss(s, t)
        if has_labels:
            if self.loss_fn is None:
                _check_class_ids(self.labels[k], out, k)
            task = self.loss_fn(out, self.labels[k]) if self.loss_fn else F.cross_entropy(out, self.labels[k])
            weight = (1 - self.cfg.kd_weight) if self.teacher_mod is not None else 1.0
            loss = loss + weight * task
        return loss

    def mean_loss(self) -> float:
        """The loss over this trainer's batches with the student in inference mode (no gradients, no updates)."""
        self.student_mod.eval()
        with torch.no_grad():
            return float(sum(self._loss(self.student_mod, k).item() for k in range(len(self.batches)))
                         / len(self.batches))

    def fit(self, epochs: int | None = None, steps: int | None = None, desc: str | None = None,
            first_epoch: int = 0) -> dict:
        """Train for `epochs` passes over the data (or exactly `steps` steps); returns loss statistics.
        `first_epoch` numbers the epochs of a fit that continues an earlier one (each epoch's shuffle is seeded by
        its number)."""
        from tqdm.auto import tqdm

        epochs = self.cfg.epochs if epochs is None and steps is None else epochs
        total = steps if steps is not None else epochs * len(self.batches)
        for p in self.params.values():
            p.requires_grad_(True)
        model = self.student_mod
        if self.world > 1:  # gradients are averaged over the ranks during backward
            model = torch.nn.parallel.DistributedDataParallel(model)
        if self.optimizer is None:
            self.optimizer = self._new_optimizer()
        masks = {n: self.student.masks[n] for n in self.params if n in self.student.masks}
        bar = tqdm(total=total, desc=desc or self.cfg.desc, unit="step", leave=False,
                   disable=True if not self.cfg.progress or self.rank != 0 else None)
        first = last = None
        losses: list[float] = []
        done = 0
        epoch = 0
        bn_train = self.cfg.bn == "train" or (self.cfg.bn == "auto" and all(
            isinstance(b[0], torch.Tensor) and b[0].dim() > 0 and b[0].shape[0] >= MIN_BN_BATCH for b in self.batches))
        try:
            self.student_mod.train()
            if bn_train:
                set_bn_training(self.student_mod, True)
            while done < total:
                gen = torch.Generator().manual_seed(self.cfg.seed * 1000 + first_epoch + epoch)
                for k in torch.randperm(len(self.batches), generator=gen).tolist():
                    if done >= total:
                        break
                    loss = self._loss(model, k)
                    value = loss.item()
                    if not math.isfinite(value):
                        raise TrainingError(f"training diverged: loss is {value} at step {self.step} "
                                            f"(epoch {epoch}); lower lr= or check the data for NaN/inf")
                    self.optimizer.zero_grad()
                    loss.backward()
                    if self.on_grad is not None:
                        self.on_grad(self.step)
                    with torch.no_grad():
                        for n, m in masks.items():
                            if self.params[n].grad is not None:
                                self.params[n].grad.mul_(m)
                    self.optimizer.step()
                    self.student.apply_masks(list(masks))
                    if self.on_step is not None:
                        self.on_step(self.step)
                        masks = {n: self.student.masks[n] for n in self.params if n in self.student.masks}
                    last = value
                    first = value if first is None else first
                    losses.append(value)
                    self.step += 1
                    done += 1
                    bar.update(1)
                    bar.set_postfix_str(f"loss {value:.4g}")
                epoch += 1
        finally:
            bar.close()
            if bn_train:
                set_bn_training(self.student_mod, False)
            self.student_mod.eval()
            self.student.gm.eval()
            for p in self.params.values():
                p.requires_grad_(False)
                p.grad = None
        stats = {"steps": done, "loss_first": first, "loss_last": last}
        rose = loss_rose(losses, self.matched or 0.0)
        if rose:
            stats["loss_rose"] = True
            log.warning("%s: the training loss rose (mean of the first %d steps %.4g, of the last %d %.4g): lr=%g "
                        "is likely too high for this model; try a lower lr=", self.cfg.desc, rose[0], rose[1],
                        rose[0], rose[2], self.cfg.lr)
        return stats


def loss_rose(losses: Sequence[float], matched: float = 0.0) -> tuple[int, float, float] | None:
    """(steps compared, first steps' mean loss, last steps' mean) when the last quarter of a fit's steps (at least
    8 steps) averaged 10% above its first quarter, else None: the mark of a learning rate too high for the model
    (one batch's loss alone is too noisy to tell). A last quarter under `matched` is no rise: the student still
    matches its teacher (`_matched_loss`), and its loss only wanders in the batches' noise."""
    q = len(losses) // 4
    if len(losses) < 8:
        return None
    head, tail = sum(losses[:q]) / q, sum(losses[-q:]) / q
    return (q, head, tail) if tail > 1.1 * head and tail > head + 1e-6 and tail >= matched else None


def _matched_loss(student: torch.Tensor, teacher: torch.Tensor, kind: str) -> float:
    """The distillation loss under which a student's outputs match its teacher's for any use: KL (T^2-scaled, as
    kd_loss gives it) 1e-3, cosine distance 1e-4, MSE 1e-4 of the teacher's mean square (40 dB SQNR). Quantized and
    recovered, a small CNN's KD loss wandered between 1e-5 and 1e-4 and its last steps averaged 30% above its first
    ones: the trainer had said its lr was too high."""
    kind = _kd_kind(student, kind)
    if kind == "kl":
        return 1e-3
    if kind == "cosine":
        return 1e-4
    return 1e-4 * float(teacher.detach().pow(2).mean())


def _check_class_ids(labels: torch.Tensor, out: torch.Tensor, k: int) -> None:
    """Labels the default cross-entropy can take for this output: one integer class id per sample, each in
    range (torch's own error was "Target 12 is out of bounds", or an IndexError, from inside the loss)."""
    labels = torch.as_tensor(labels)
    if labels.is_floating_point() or labels.dtype == torch.bool:
        raise TrainingError(f"batch {k}: labels are {labels.dtype}; the default task loss (cross-entropy) takes "
                            "integer class ids; give those, or a loss of your own (optimize(..., loss=...))")
    if out.dim() < 2 or labels.shape[:1] != out.shape[:1] or labels.dim() != out.dim() - 1:
        raise TrainingError(f"batch {k}: labels have shape {list(labels.shape)}, the model's output "
                            f"{list(out.shape)}: cross-entropy needs one class id per sample "
                            f"({list(out.shape[:1]) + list(out.shape[2:])})")
    classes, ids = out.shape[1], labels[labels != -100]  # (-100: cross-entropy's ignored position)
    if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= classes):
        raise TrainingError(f"batch {k}: labels hold class ids {int(ids.min())}..{int(ids.max())}, the model's "
                            f"output has {classes} classes (0..{classes - 1}; -100 marks a position to ignore)")


def trainer_from_ctx(student: Graph, ctx: Any, cfg: DistillConfig, kd: bool = True) -> Trainer:
    """A Trainer fed from the pass context: data, labels/loss/optimizer extras, teacher = the pipeline's input."""
    if not ctx.data:
        raise TrainingError(f"{cfg.desc} needs training data: optimize(..., data=[batches]) or --inputs")
    labels = ctx.extras.get("labels")
    if not kd and labels is None:
        raise TrainingError("training without distillation (kd=false) needs labels (optimize(..., labels=[...]), or "
                            "class ids under 'labels' in the --inputs .npz)")
    teacher = None
    if kd:
        teacher = ctx.extras.get("teacher") or ctx.reference or student.clone()
        if labels is not None and cfg.kd_weight == 1.0:
            cfg.kd_weight = 0.5  # labels and a teacher: half task loss, half distillation
    else:
        cfg.kd_weight = 0.0
    return Trainer(student, teacher, list(ctx.data), cfg, labels, ctx.extras.get("loss"),
                   ctx.extras.get("optimizer"))


def distill(student: Graph, teacher: Graph, batches: Sequence[tuple], cfg: DistillConfig,
            labels: Sequence[torch.Tensor] | None = None) -> dict:
    """Train the student in place for cfg.epochs; return loss statistics. Raises TrainingError on NaN."""
    return Trainer(student, teacher, batches, cfg, labels).fit()

