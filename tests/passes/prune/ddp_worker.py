"""Run by test_sparsity.py under torchrun (2 processes, gloo): RigL on a digits MLP, each rank saves its result."""
from __future__ import annotations

import sys
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))


def main(out_dir: str, pipeline: str) -> None:
    dist.init_process_group("gloo")
    torch.set_num_threads(1)
    import graphopt
    from digits import DigitsMLP, batches, digits_split, label_batches
    xtr, _, ytr, _ = digits_split(0)
    torch.manual_seed(0)
    g = graphopt.trace(DigitsMLP().eval(), (xtr[:64],))
    out = graphopt.optimize(g, pipeline, data=batches(xtr[:512]), labels=label_batches(ytr[:512]), seed=3)
    tensors = {f"param.{k}": v for k, v in out.params().items()}
    tensors.update({f"mask.{k}": v for k, v in out.masks.items()})
    torch.save(tensors, Path(out_dir) / f"rank{dist.get_rank()}.pt")
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
