"""Layer 1: the Graph IR, its text form and diff, statistics, serialization and atomic file writes.

Its names are imported on first use: `graphopt.ir.files` (atomic writes, the cache folder) is read by the artifact
loader of a deploy process that has no torch."""
from __future__ import annotations

from graphopt.lazy import lazy_attributes

_LAZY = {"Graph": "graphopt.ir.graph", "TensorSpec": "graphopt.ir.graph", "DTYPES": "graphopt.ir.graph",
         "dtype_name": "graphopt.ir.graph", "graph_text": "graphopt.ir.printer", "graph_diff": "graphopt.ir.printer",
         "GraphStats": "graphopt.ir.stats", "graph_stats": "graphopt.ir.stats"}

__all__ = ["Graph", "TensorSpec", "DTYPES", "dtype_name", "graph_text", "graph_diff", "GraphStats", "graph_stats"]


__getattr__, __dir__ = lazy_attributes("graphopt.ir", _LAZY, globals())
