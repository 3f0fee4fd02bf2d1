"""mixed-precision: choose each layer's weight bit width from its measured sensitivity under a size budget.

Sensitivity of (layer, bits) = the model output's error when only that layer's weight is quantized to `bits`
(1 - cosine similarity to the float output, over the context's data). Starting from the widest candidate everywhere,
the pass repeatedly narrows the layer whose next step costs the least sensitivity per byte saved, until the weights
fit `target` (a fraction of the float weight bytes). The chosen widths are weight-only Q/DQ (per-channel symmetric),
so `quantize`-style activation quantization can follow; they are printed per layer, kept in the graph's metadata and
written to the artifact manifest.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Literal

import torch

from graphopt.errors import GraphoptError
from graphopt.ir.graph import Graph
from graphopt.ir.names import unmatched_patterns
from graphopt.passes.quant.quantize import quantizable_ops, quantize_op_weight, quantize_weight
from graphopt.pm.registry import Contract, Pass, PassContext, PassResult, register_pass

log = logging.getLogger(__name__)
BITS = {"fp32": 32, "int8": 8, "int4": 4}


class MixedPrecisionError(GraphoptError):
    """The budget cannot be met or the options do not make sense; says which."""


def _dequantized(w: torch.Tensor, bits: str) -> torch.Tensor:
    q, scales, _ = quantize_weight(w, bits)
    return q.float() * scales.reshape(-1, *([1] * (w.dim() - 1)))


def _error(ref: list[torch.Tensor], out: list[torch.Tensor]) -> float:
    a = torch.cat([r.reshape(-1) for r in ref]).double()
    b = torch.cat([o.reshape(-1) for o in out]).double()
    return float(1.0 - torch.nn.functional.cosine_similarity(a, b, dim=0))


@register_pass
class MixedPrecision(Pass):
    name = "mixed-precision"
    summary = ("Per-layer weight bit widths (fp32/int8/int4) from measured sensitivity under a size budget; "
               "the choice is printed, kept in the graph and written to the manifest.")
    contract = Contract.BOUNDED
    min_sqnr_db = 12.0

    @dataclass
    class Options:
        budget: Literal["size", "latency"] = field(default="size", metadata={
            "help": "size: weight bytes; latency: measured int kernels (not available on this target yet)"})
        target: float = field(default=0.2, metadata={
            "help": "budget as a fraction of the float weight bytes (0.25 = as small as all-int8)"})
        candidates: list[str] = field(default_factory=lambda: ["fp32", "int8", "int4"], metadata={
            "help": "bit widths to choose from (fp32, int8, int4)"})
        exclude: list[str] = field(default_factory=list, metadata={
            "help": "node or parameter names (glob) kept in float"})

        def validate(self) -> str:
            bad = [c for c in self.candidates if c not in BITS]
            if bad:
                return f"option 'candidates': unsupported bit width {bad} (choose from fp32, int8, int4)"
            if not self.candidates:
                return "option 'candidates' is empty"
            if not 0 < self.target <= 1:
                return f"option 'target' must be in (0, 1] (a fraction of the float weight bytes), got {self.target}"
            return ""

    def run(self, graph: Graph, ctx: PassContext) -> PassResult:
        o = self.options
        if o.budget == "latency":
            raise MixedPrecisionError("mixed-precision{budget=latency} needs measured int8/int4 kernel costs, which "
                                      "the CPU target does not provide yet; use budget=size")
        for pat in unmatched_patterns(graph, o.exclude):
            raise MixedPrecisionError(f"mixed-precision option 'exclude': '{pat}' matches no node or parameter")
        ops, _ = quantizable_ops(graph, o.exclude)
        if not ops:
            raise MixedPrecisionError("mixed-precision: no conv or linear with a float weight to quantize")
        cands = sorted(dict.fromkeys(o.candidates), key=lambda c: -BITS[c])  # widest first
        batches = ctx.batches(graph)
        with torch.no_grad():
            ref = [graph.gm(*b) for b in batches]
            ref = [r[0] if isinstance(r, (tuple, list)) else r for r in ref]
            sens: dict[str, dict[str, float]] = {}
            for op in ops:
                name = op.args[1].target
                param = getattr(graph.gm, name)
                orig = param.data.clone()
                sens[op.name] = {}
                for c in cands:
                    if c != "fp32":
                        param.data.copy_(_dequantized(orig, c))
                    out = [graph.gm(*b) for b in batches]
                    sens[op.name][c] = _error(ref, [x[0] if isinstance(x, (tuple, list)) else x for x in out])
                    param.data.copy_(orig)
        numel = {op.name: graph.get_param(op.args[1].target).numel() for op in ops}
        channels = {op.name: graph.get_param(op.args[1].target).shape[0] for op in ops}

        def nbytes(op_name: str, c: str) -> float:
            extra = 0 if c == "fp32" else channels[op_name] * 8  # a scale and a zero point per channel
            return numel[op_name] * BITS[c] / 8 + extra

        float_bytes = sum(t.numel() * t.element_size() for t in graph.params().values() if t.is_floating_point())
        fixed = float_bytes - sum(numel[n] * 4 for n in numel)  # biases, norms, excluded layers stay float
        choice = {op.name: cands[0] for op in ops}
        budget = o.target * float_bytes

        def total() -> float:
            return fixed + sum(nbytes(n, c) for n, c in choice.items())

        while total() > budget:
            best, best_cost = None, None
            for n, c in choice.items():
                i = cands.index(c)
                if i + 1 >= len(cands):
                    continue
                nxt = cands[i + 1]
                saved = nbytes(n, c) - nbytes(n, nxt)
                cost = (sens[n][nxt] - sens[n][c]) / max(saved, 1e-9)
                if best_cost is None or cost < best_cost:
                    best, best_cost = (n, nxt), cost
            if best is None:
                raise MixedPrecisionError(
                    f"mixed-precision: even the narrowest candidate everywhere needs {total() / float_bytes:.3f} of "
                    f"the float weight bytes, over target={o.target}; raise target or add int4 to candidates")
            choice[best[0]] = best[1]
        by_name = {op.name: op for op in ops}
        for n, c in choice.items():
            if c != "fp32":
                quantize_op_weight(graph, by_name[n], c)
        graph.gm.graph.eliminate_dead_code()
        graph.remove_unused_params()
        per_layer = {n: {"bits": c, "sensitivity": {k: round(v, 6) for k, v in sens[n].items()}}
                     for n, c in choice.items()}
        graph.meta["weight_bits"] = {n: c for n, c in choice.items()}
        for n, c in choice.items():
            log.info("mixed-precision: %-30s %s (1-cos int8 %.2e, int4 %s)", n, c, sens[n].get("int8", 0.0),
                     f"{sens[n]['int4']:.2e}" if "int4" in sens[n] else "-")
        return PassResult(graph, any(c != "fp32" for c in choice.values()),
                          {"size_fraction": round(total() / float_bytes, 4), "target": o.target,
                           "bits": {n: v["bits"] for n, v in per_layer.items()},
                           "sensitivity": {n: v["sensitivity"] for n, v in per_layer.items()}})
