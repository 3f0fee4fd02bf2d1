"""Run a graph on batches and hand the outputs of chosen nodes to a callback (calibration, activation stats)."""
from __future__ import annotations

from typing import Callable, Iterable, Sequence

import torch
import torch.fx as fx

from graphopt.ir.graph import Graph


def observe_outputs(graph: Graph, names: Iterable[str], batches: Sequence[tuple],
                    record: Callable[[str, torch.Tensor], None]) -> None:
    """For every batch, call record(node name, output) for each named node whose output is a tensor."""
    wanted = set(names)

    class Recorder(fx.Interpreter):
        def run_node(self, n):
            out = super().run_node(n)
            if n.name in wanted and isinstance(out, torch.Tensor):
                record(n.name, out.detach())
            return out

    with torch.no_grad():
        for b in batches:
            Recorder(graph.gm).run(*b)
