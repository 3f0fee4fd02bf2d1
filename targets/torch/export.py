"""`.pt2` export (torch.export's archive) for PyTorch users, written atomically."""
from __future__ import annotations

from pathlib import Path

from graphopt.errors import TargetError
from graphopt.ir.files import atomic_file
from graphopt.ir.graph import Graph


def export_pt2(graph: Graph, path: str | Path) -> Path:
    """Write `graph` as a torch.export program; load it back with `torch.export.load(path)`."""
    import torch

    try:
        ep = graph.to_exported_program()
        with atomic_file(path) as tmp:
            torch.export.save(ep, str(tmp))
    except Exception as e:
        raise TargetError(f".pt2 export failed: {type(e).__name__}: {e}") from None
    return Path(path)
