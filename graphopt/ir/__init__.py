"""Layer 1: the Graph IR, its text form and diff, statistics, serialization and atomic file writes."""
from graphopt.ir.graph import DTYPES, Graph, TensorSpec, dtype_name
from graphopt.ir.printer import graph_diff, graph_text
from graphopt.ir.stats import GraphStats, graph_stats

__all__ = ["Graph", "TensorSpec", "DTYPES", "dtype_name", "graph_text", "graph_diff", "GraphStats", "graph_stats"]
