"""`.pt2` export (torch.export's archive) for PyTorch users, written atomically."""
from __future__ import annotations

from pathlib import Path

from graphopt.errors import TargetError
from graphopt.ir.files import atomic_file
from graphopt.ir.graph import Graph, run_decompositions


def export_pt2(graph: Graph, path: str | Path) -> Path:
    """Write `graph` as a torch.export program; load it back with `torch.export.load(path)` in any PyTorch of this
    version, graphopt imported or not: sparse layers go out dense (exact zeros), integer ops in their Q/DQ form
    and the Q/DQ ops as plain ATen (round, clamp, casts), the int8 weights kept. (Written with graphopt's own ops,
    a quantized program failed to load without `import graphopt` first.)"""
    import torch

    from graphopt.ir.quant_ops import plain_decompositions, unfold_integer_ops
    from graphopt.ir.sparse_ops import densify
    try:
        ep = unfold_integer_ops(densify(graph)).to_exported_program()
        if _graphopt_ops(ep):
            ep = run_decompositions(ep, plain_decompositions())
    except Exception as e:
        raise TargetError(f".pt2 export failed: {type(e).__name__}: {e}") from None
    left = _graphopt_ops(ep)
    if left:
        raise TargetError(f".pt2 export: {', '.join(left[:3])} {'has' if len(left) == 1 else 'have'} no "
                          "plain-PyTorch form yet; export .gopt or .onnx instead")
    try:
        with atomic_file(path) as tmp:
            torch.export.save(ep, str(tmp))
    except Exception as e:
        raise TargetError(f".pt2 export failed: {type(e).__name__}: {e}") from None
    return Path(path)


def _graphopt_ops(ep) -> list[str]:
    return [f"{n.target} at '{n.name}'" for n in ep.graph.nodes
            if n.op == "call_function" and str(n.target).startswith("graphopt.")]
