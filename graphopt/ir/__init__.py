"""Layer 1: the Graph IR, its text form and diff, statistics, serialization and atomic file writes.

Its names are imported on first use: `graphopt.ir.files` (atomic writes, the cache folder) is read by the artifact
loader of a deploy process that has no torch."""
from __future__ import annotations

_LAZY = {"Graph": "graphopt.ir.graph", "TensorSpec": "graphopt.ir.graph", "DTYPES": "graphopt.ir.graph",
         "dtype_name": "graphopt.ir.graph", "graph_text": "graphopt.ir.printer", "graph_diff": "graphopt.ir.printer",
         "GraphStats": "graphopt.ir.stats", "graph_stats": "graphopt.ir.stats"}

__all__ = ["Graph", "TensorSpec", "DTYPES", "dtype_name", "graph_text", "graph_diff", "GraphStats", "graph_stats"]


def __getattr__(name: str):
    if name not in _LAZY:
        raise AttributeError(f"module 'graphopt.ir' has no attribute '{name}'")
    import importlib
    value = getattr(importlib.import_module(_LAZY[name]), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))
