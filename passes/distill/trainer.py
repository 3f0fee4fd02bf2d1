"""Distillation trainer: a frozen teacher graph teaches a student graph on (possibly unlabeled) batches."""
from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Sequence

import torch
import torch.nn.functional as F

from graphopt.errors import GraphoptError
from graphopt.ir.graph import Graph

log = logging.getLogger(__name__)


class TrainingError(GraphoptError):
    """Training diverged or could not start; names the step."""


@dataclass
class DistillConfig:
    epochs: int = 3
    lr: float = 1e-3
    temperature: float = 4.0
    kd_weight: float = 1.0          # weight of the distillation loss (the task loss gets 1 - kd_weight with labels)
    weight_decay: float = 0.0
    seed: int = 0
    progress: bool = True


def _outputs(gm, batch) -> torch.Tensor:
    out = gm(*batch)
    return out[0] if isinstance(out, (tuple, list)) else out


def kd_loss(student: torch.Tensor, teacher: torch.Tensor, temperature: float) -> torch.Tensor:
    """Hinton KD for logits [N, C]; mean squared error for any other output."""
    if student.dim() == 2 and student.shape[1] > 1:
        t = temperature
        return F.kl_div(F.log_softmax(student / t, 1), F.softmax(teacher / t, 1), reduction="batchmean") * t * t
    return F.mse_loss(student, teacher)


def distill(student: Graph, teacher: Graph, batches: Sequence[tuple], cfg: DistillConfig,
            labels: Sequence[torch.Tensor] | None = None) -> dict:
    """Train the student's float parameters in place; return loss statistics. Raises TrainingError on NaN."""
    if not batches:
        raise TrainingError("the data loader yielded no batches: give data (optimize(..., data=[...]) or --inputs)")
    torch.manual_seed(cfg.seed)
    params = [p for n, p in student.gm.named_parameters() if p.is_floating_point()]
    if not params:
        raise TrainingError("the student graph has no trainable parameters")
    for p in params:
        p.requires_grad_(True)
    opt = torch.optim.Adam(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    from tqdm.auto import tqdm
    total = cfg.epochs * len(batches)
    bar = tqdm(total=total, desc="distill", unit="step", disable=None if cfg.progress else True, leave=False)
    first = last = None
    step = 0
    teacher_outs = []
    with torch.no_grad():
        for b in batches:
            teacher_outs.append(_outputs(teacher.gm, b).detach())
    try:
        student.gm.train()
        for epoch in range(cfg.epochs):
            order = torch.randperm(len(batches)).tolist()
            for k in order:
                out = _outputs(student.gm, batches[k])
                loss = kd_loss(out, teacher_outs[k], cfg.temperature) * (cfg.kd_weight if labels else 1.0)
                if labels:
                    loss = loss + (1 - cfg.kd_weight) * F.cross_entropy(out, labels[k])
                if not math.isfinite(loss.item()):
                    raise TrainingError(f"training diverged: loss is {loss.item()} at step {step} (epoch {epoch}); "
                                        "lower lr= or check the data for NaN/inf")
                opt.zero_grad()
                loss.backward()
                opt.step()
                last = loss.item()
                first = last if first is None else first
                step += 1
                bar.update(1)
                bar.set_postfix_str(f"loss {last:.4g}")
    finally:
        bar.close()
        student.gm.eval()
        for p in params:
            p.requires_grad_(False)
            p.grad = None
    return {"steps": step, "loss_first": first, "loss_last": last}
