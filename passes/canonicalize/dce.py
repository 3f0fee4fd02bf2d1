"""dce: remove ops whose results nobody uses, and parameters nobody reads."""
from __future__ import annotations

from dataclasses import dataclass

from graphopt.ir.graph import Graph
from graphopt.pm.registry import Contract, Pass, PassContext, PassResult, register_pass


def eliminate_dead_code(graph: Graph) -> tuple[int, int]:
    """Remove dead nodes and unread parameters in place; returns (nodes removed, params removed)."""
    before = len(graph.gm.graph.nodes)
    graph.gm.graph.eliminate_dead_code()
    nodes = before - len(graph.gm.graph.nodes)
    params = graph.remove_unused_params()
    return nodes, params


@register_pass
class DeadCodeElimination(Pass):
    name = "dce"
    summary = "Remove ops whose results are unused and parameters that no op reads (exact)."
    contract = Contract.EXACT

    @dataclass
    class Options:
        pass

    def run(self, graph: Graph, ctx: PassContext) -> PassResult:
        nodes, params = eliminate_dead_code(graph)
        changed = bool(nodes or params)
        return PassResult(graph, changed, {"nodes_removed": nodes, "params_removed": params},
                          "" if changed else "no dead ops or unused parameters")
