"""Graph -> TVM Relax, through torch.export and Relax's `from_exported_program`.

`from_fx` is not used: it computes wrong batch-norm results in TVM 0.27.
"""
from __future__ import annotations

import logging

from graphopt.errors import TargetError, UnsupportedOpError
from graphopt.ir.graph import Graph
from graphopt.ir.printer import target_name

log = logging.getLogger(__name__)


def lower_to_relax(graph: Graph):
    """Return a Relax IRModule whose `main` takes the graph's inputs in order, parameters bound as constants."""
    from tvm.relax.frontend.torch import from_exported_program

    ep = graph.to_exported_program()
    try:
        mod = from_exported_program(ep, keep_params_as_input=False)
    except AssertionError as e:
        # the Relax importer asserts on ops it has no converter for; name the node for the user
        msg = str(e)
        for n in graph.gm.graph.nodes:
            if n.op == "call_function" and target_name(n.target).split(".")[1] in msg:
                raise UnsupportedOpError(n.name, target_name(n.target),
                                         "TVM's Relax importer has no converter for it; run a pass that rewrites "
                                         "it or choose --target onnx") from None
        raise TargetError(f"TVM could not import the graph: {msg}") from None
    except Exception as e:
        raise TargetError(f"TVM could not import the graph: {type(e).__name__}: {e}") from None
    return mod
