"""mixed-precision: choose each layer's bit width from its measured sensitivity under a size or latency budget.

Sensitivity of (layer, bits) = the model output's error when only that layer's weight is quantized to `bits`
(1 - cosine similarity to the float output, over the context's data). Starting from the widest candidate everywhere,
the pass repeatedly narrows the layer whose next step costs the least sensitivity per byte saved, until the weights
fit `target` (a fraction of the float weight bytes). The chosen widths are weight-only Q/DQ (per-channel symmetric);
a following `quantize` keeps them and adds int8 activations, so `fold-qdq` can fold the mixed graph. They are printed
per layer, kept in the graph's metadata and written to the artifact manifest. budget=latency (`_run_latency`) times
each layer on the target instead and quantizes weight and input of the layers it picks.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Literal

import torch
import torch.fx as fx
from tqdm.auto import tqdm

from graphopt.errors import GraphoptError
from graphopt.ir.graph import Graph
from graphopt.ir.names import unmatched_patterns
from graphopt.ir.observe import observe_outputs
from graphopt.ir.precision import widen_half
from graphopt.ir.printer import target_name
from graphopt.ir.quant_ops import DTYPE_RANGES
from graphopt.passes.analysis.weights import linears_from_matmuls
from graphopt.passes.canonicalize.transposed import convs_from_transposed
from graphopt.passes.canonicalize.fold_bn import fold_first
from graphopt.passes.quant.quantize import (PAIR_WIDTHS, layer_width, quantizable_ops, quantize_op_weight,
                                           quantize_weight)
from graphopt.pm.registry import Contract, Pass, PassContext, PassResult, register_pass

log = logging.getLogger(__name__)
aten = torch.ops.aten
BITS = {"fp32": 32, "int8": 8, "int8s": 7.5, "int7": 7, "int4": 4}  # resolution order (int8s: int8, coarser step)
STORED_BITS = {**BITS, "int8s": 8, "int7": 8}  # both stored as int8: no smaller, only faster on AVX2


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
    summary = ("Per-layer bit widths (fp32/int8/int8s/int7/int4) from measured sensitivity under a size or "
               "measured-latency budget; the choice is printed, kept in the graph and written to the manifest.")
    contract = Contract.BOUNDED
    rewrites_weights = True
    min_sqnr_db = 12.0

    @dataclass
    class Options:
        budget: Literal["size", "latency"] = field(default="size", metadata={
            "help": "size: weight bytes (weight-only widths; int8 activations can follow with quantize); latency: "
                    "each layer's time on the target, measured fp32 vs int8/int8s/int7/int4 (weights and input "
                    "activation)"})
        target: float = field(default=0.2, metadata={
            "help": "size: a fraction of the float weight bytes (0.25 = as small as all-int8); latency: a fraction "
                    "of the layers' measured time at the widest candidate (e.g. 0.8)"})
        candidates: list[str] = field(default_factory=lambda: ["fp32", "int8", "int4"], metadata={
            "help": "bit widths to choose from (fp32, int8, int8s, int7, int4); int8s and int7 (latency budget "
                    "only) are int8 storage that AVX2 multiplies with the faster u8 x s8 kernel, at a coarser step "
                    "(see quantize's weights), offered only to the layers that kernel reads"})
        exclude: list[str] = field(default_factory=list, metadata={
            "help": "node or parameter names (glob) kept in float"})

        def validate(self) -> str:
            bad = [c for c in self.candidates if c not in BITS]
            if bad:
                return f"option 'candidates': unsupported bit width {bad} (choose from fp32, int8, int8s, int7, int4)"
            if not self.candidates:
                return "option 'candidates' is empty"
            narrow = [c for c in self.candidates if c in PAIR_WIDTHS]
            if self.budget == "size" and narrow:
                return (f"option 'candidates': {', '.join(narrow)} is stored as int8 and saves no bytes under "
                        "budget=size; use it with budget=latency")
            if not 0 < self.target <= 1:
                return f"option 'target' must be in (0, 1] (a fraction of the float weight bytes), got {self.target}"
            return ""

    def run(self, graph: Graph, ctx: PassContext) -> PassResult:
        o = self.options
        graph = widen_half(graph)  # (float16 / bfloat16 graphs: the quantization ops are float32)
        for pat in unmatched_patterns(graph, o.exclude):
            raise MixedPrecisionError(f"mixed-precision option 'exclude': '{pat}' matches no node or parameter")
        # as quantize does: a batch norm left after a rounded weight would keep its layer from an int8 kernel
        folded = fold_first(graph)
        result = self._choose(graph, ctx)
        result.changed = result.changed or bool(folded)
        result.stats.update(folded)
        return result

    def _choose(self, graph: Graph, ctx: PassContext) -> PassResult:
        o = self.options
        linears_from_matmuls(graph, o.exclude)  # (x @ W.T, GPT-2's addmm: the weight passes take linears)
        convs_from_transposed(graph, o.exclude)  # (as quantize does: its layers are the ones measured here)
        ops, _ = quantizable_ops(graph, o.exclude)
        if not ops:
            raise MixedPrecisionError("mixed-precision: no conv or linear with a float weight to quantize")
        cands = sorted(dict.fromkeys(o.candidates), key=lambda c: -BITS[c])  # widest first
        batches = ctx.batches(graph)
        if o.budget == "latency":
            return _run_latency(o, graph, ctx, ops, cands, batches)
        # one width per weight: a weight several layers read (ALBERT's one layer run 4 times, a cell unrolled over
        # steps) is stored once, so it is measured, counted and quantized once (each use had been a layer of its
        # own: some uses int8, others fp32, both copies stored, and the budget counted the bytes once per use)
        groups: dict[str, list[fx.Node]] = {}
        for op in ops:
            groups.setdefault(op.args[1].target, []).append(op)
        with torch.no_grad():
            ref = [graph.gm(*b) for b in batches]
            ref = [r[0] if isinstance(r, (tuple, list)) else r for r in ref]
            w_sens: dict[str, dict[str, float]] = {}  # by weight
            for name in groups:
                param = getattr(graph.gm, name)
                orig = param.data.clone()
                w_sens[name] = {}
                for c in cands:
                    if c != "fp32":
                        param.data.copy_(_dequantized(orig, c))
                    out = [graph.gm(*b) for b in batches]
                    w_sens[name][c] = _error(ref, [x[0] if isinstance(x, (tuple, list)) else x for x in out])
                    param.data.copy_(orig)
        numel = {name: graph.get_param(name).numel() for name in groups}
        channels = {name: graph.get_param(name).shape[0] for name in groups}

        def nbytes(name: str, c: str) -> float:
            extra = 0 if c == "fp32" else channels[name] * 8  # a scale and a zero point per channel
            return numel[name] * STORED_BITS[c] / 8 + extra

        float_bytes = sum(t.numel() * t.element_size() for t in graph.params().values() if t.is_floating_point())
        fixed = float_bytes - sum(numel[n] * 4 for n in numel)  # biases, norms, excluded layers stay float
        w_choice = {name: cands[0] for name in groups}
        budget = o.target * float_bytes

        def total() -> float:
            return fixed + sum(nbytes(n, c) for n, c in w_choice.items())

        while total() > budget:
            best, best_cost = None, None
            for n, c in w_choice.items():
                i = cands.index(c)
                if i + 1 >= len(cands):
                    continue
                nxt = cands[i + 1]
                saved = nbytes(n, c) - nbytes(n, nxt)
                cost = (w_sens[n][nxt] - w_sens[n][c]) / max(saved, 1e-9)
                if best_cost is None or cost < best_cost:
                    best, best_cost = (n, nxt), cost
            if best is None:
                raise MixedPrecisionError(
                    f"mixed-precision: even the narrowest candidate everywhere needs {total() / float_bytes:.3f} of "
                    f"the float weight bytes, over target={o.target}; raise target or add int4 to candidates")
            w_choice[best[0]] = best[1]
        size_fraction = total() / float_bytes
        # per layer from here on, as the report and the manifest give them
        sens = {op.name: w_sens[name] for name, uses in groups.items() for op in uses}
        choice = {op.name: w_choice[name] for name, uses in groups.items() for op in uses}
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
                          {"size_fraction": round(size_fraction, 4), "target": o.target,
                           "bits": {n: v["bits"] for n, v in per_layer.items()},
                           "sensitivity": {n: v["sensitivity"] for n, v in per_layer.items()}})


class _Recorded(torch.fx.Interpreter):
    """Runs the graph once, keeping every node's value (`values`), or, given such values and a layer, recomputes only
    that layer and what depends on it, with the layer's input quantized to int8 (per tensor) and its weight
    replaced; every other node's value is the recorded one (the same ops on the same inputs: identical values)."""

    def __init__(self, gm, values=None, node=None, qparams=None, weight=None, after=frozenset()):
        super().__init__(gm)
        self.recording = values is None
        self.values = {} if values is None else values
        self.node, self.qparams, self.weight, self.after = node, qparams, weight, after

    def run_node(self, n):
        if self.recording:
            self.values[n] = v = super().run_node(n)
            return v
        if n not in self.after:
            return self.values[n]
        if n is not self.node:
            return super().run_node(n)
        args, kwargs = self.fetch_args_kwargs_from_env(n)
        scale, zp = self.qparams
        x = (torch.clamp(torch.round(args[0] / scale) + zp, -128, 127) - zp) * scale
        return n.target(x, self.weight, *args[2:], **kwargs)


def _downstream(node: fx.Node) -> frozenset:
    """The node and every node that depends on it."""
    seen, todo = {node}, [node]
    while todo:
        for user in todo.pop().users:
            if user not in seen:
                seen.add(user)
                todo.append(user)
    return frozenset(seen)


class _Layer(torch.nn.Module):
    """One conv/linear node as a module, so it can be traced and built alone."""

    def __init__(self, fn, weight, bias, rest):
        super().__init__()
        self.fn, self.rest = fn, list(rest)
        self.weight = torch.nn.Parameter(weight.detach().clone(), requires_grad=False)
        self.bias = None if bias is None else torch.nn.Parameter(bias.detach().clone(), requires_grad=False)

    def forward(self, x):
        return self.fn(x, self.weight, self.bias, *self.rest)


def _run_latency(o, graph: Graph, ctx: PassContext, ops, cands, batches) -> PassResult:
    """budget=latency: each layer alone is built for the target in fp32 and in each integer width (int8 input
    activation, calibrated like quantize{calibrator=percentile}) and timed there; sensitivity is the model output's
    error with only that layer quantized; the cheapest error per second saved is taken until the layers' time fits
    target x their time at the widest candidate (fp32 when it is one). Chosen layers get Q/DQ on weight and input,
    so fold-qdq follows. With int7 and int8 both candidates, each layer a u8 x s8 kernel reads is timed at both, so
    the pass keeps int8 where 7 bits cost the most error per second they save."""
    from graphopt.frontends.torch_export import trace
    from graphopt.passes.quant.quantize import calibrate, insert_qdq
    from graphopt.pm.manager import PassManager

    oracle = ctx.target
    if ctx.onnx_export:
        raise MixedPrecisionError("mixed-precision{budget=latency} times layers on graphopt's own kernels, which an "
                                  "ONNX export does not run: use budget=size for --target onnx, or compile for llvm")
    if oracle is None or not hasattr(oracle, "measure_variants"):
        raise MixedPrecisionError("mixed-precision{budget=latency} measures layers on a target: call "
                                  "optimize(..., target='llvm') or use graphopt compile/opt (they give the host CPU)")
    if not batches:
        raise MixedPrecisionError("mixed-precision{budget=latency} calibrates int8 activations: give data")
    ops = [op for op in ops if isinstance(op.args[0], fx.Node) and op.target in (aten.conv2d.default,
                                                                                aten.linear.default)
           and (len(op.args) < 3 or op.args[2] is None or (isinstance(op.args[2], fx.Node)
                                                          and op.args[2].op == "get_attr"))]
    if not ops:
        raise MixedPrecisionError("mixed-precision{budget=latency}: no conv2d or linear layer with constant weights")
    observers = calibrate(graph, [(op.args[0], op.name) for op in ops], batches, "percentile")
    qmin, qmax, _ = DTYPE_RANGES["int8"]
    qp = {op.name: observers[op.args[0].name].qparams(qmin, qmax) for op in ops}
    inputs: dict[str, torch.Tensor] = {}
    observe_outputs(graph, {op.args[0].name for op in ops}, batches[:1],
                    lambda name, x: inputs.setdefault(name, x.clone()))
    with torch.no_grad():
        ref = [graph.gm(*b) for b in batches]
        ref = [r[0] if isinstance(r, (tuple, list)) else r for r in ref]
    seconds: dict[str, dict[str, float]] = {}
    for op in tqdm(ops, desc="mixed-precision: timing layers", unit="layer", leave=False):
        x = inputs[op.args[0].name]
        w = graph.get_param(op.args[1].target)
        b = graph.get_param(op.args[2].target) if len(op.args) > 2 and op.args[2] is not None else None
        layer = trace(_Layer(op.target, w, b, op.args[3:]).eval(), (x,))
        variants = {}
        # int7 / int8s only where a u8 x s8 kernel reads the weight; elsewhere int8 (as quantize does)
        for c in dict.fromkeys(layer_width(op, c) for c in cands):
            if c == "fp32":
                variants[c] = (layer, (x.numpy(),))
            else:
                q = PassManager(f"quantize{{weights={c} calibrator=percentile}},fold-qdq").run(
                    layer, PassContext(data=[(x,)], reference=layer))
                variants[c] = (q, (x.numpy(),))
        key = (f"{target_name(op.target)}|{tuple(x.shape)}|{tuple(w.shape)}|{b is not None}|"
               f"{[a for a in op.args[3:]]}")
        seconds[op.name] = oracle.measure_variants(key, variants)
    # sensitivity: the model's output error with only that layer quantized. Batch by batch, the float graph runs
    # once with its values recorded, then each layer and width recomputes only the nodes after that layer (all
    # of them had run the whole graph for every layer: MobileNetV2 55 s)
    after = {op.name: _downstream(op) for op in ops}
    weights = {(op.name, c): _dequantized(graph.get_param(op.args[1].target), c)
               for op in ops for c in seconds[op.name] if c != "fp32"}
    outs: dict[tuple[str, str], list] = {key: [] for key in weights}
    with torch.no_grad():
        for bt in tqdm(batches, desc="mixed-precision: layer sensitivity", unit="batch", leave=False):
            rec = _Recorded(graph.gm)
            rec.run(*bt)
            for op in ops:
                for c in seconds[op.name]:
                    if c != "fp32":
                        v = _Recorded(graph.gm, rec.values, op, qp[op.name], weights[op.name, c],
                                      after[op.name]).run(*bt)
                        outs[op.name, c].append(v[0] if isinstance(v, (tuple, list)) else v)
            del rec
    sens = {op.name: {c: 0.0 if c == "fp32" else _error(ref, outs[op.name, c]) for c in seconds[op.name]}
            for op in ops}
    # one width per weight (see _choose): the layers reading one weight are chosen together, their times and
    # errors summed over the widths timed for every one of them
    groups: dict[str, list[str]] = {}
    for op in ops:
        groups.setdefault(op.args[1].target, []).append(op.name)
    g_sec = {w: {c: sum(seconds[n][c] for n in uses) for c in cands if all(c in seconds[n] for n in uses)}
             for w, uses in groups.items()}
    g_sens = {w: {c: sum(sens[n][c] for n in groups[w]) for c in t} for w, t in g_sec.items()}
    base_total = sum(t[next(c for c in cands if c in t)] for t in g_sec.values())  # the widest candidate's
    g_choice = {w: next(c for c in cands if c in t) for w, t in g_sec.items()}
    budget = o.target * base_total

    def total() -> float:
        return sum(g_sec[w][c] for w, c in g_choice.items())

    while total() > budget:
        best, best_cost = None, None
        for n, c in g_choice.items():
            for nxt in [d for d in cands[cands.index(c) + 1:] if d in g_sec[n]]:
                saved = g_sec[n][c] - g_sec[n][nxt]
                if saved <= 0:
                    continue
                cost = (g_sens[n][nxt] - g_sens[n][c]) / saved
                if best_cost is None or cost < best_cost:
                    best, best_cost = (n, nxt), cost
        if best is None:
            raise MixedPrecisionError(
                f"mixed-precision: the fastest measured width for every layer takes {total() / base_total:.3f} of "
                f"the layers' time at {cands[0]}, over target={o.target}; raise target (a layer whose narrower "
                f"widths are not faster here keeps its widest)")
        g_choice[best[0]] = best[1]
    choice = {n: g_choice[w] for w, uses in groups.items() for n in uses}
    by_name = {op.name: op for op in ops}
    done: dict = {}
    for n, c in choice.items():
        if c != "fp32":
            op = by_name[n]
            quantize_op_weight(graph, op, c)
            op.args = (insert_qdq(graph, op.args[0], qp[n], done), *op.args[1:])
    graph.gm.graph.eliminate_dead_code()
    graph.remove_unused_params()
    graph.meta["weight_bits"] = dict(choice)
    for n, c in choice.items():
        log.info("mixed-precision: %-30s %s (%s)", n, c,
                 ", ".join(f"{k} {v * 1e6:.0f} us" for k, v in seconds[n].items()))
    return PassResult(graph, any(c != "fp32" for c in choice.values()),
                      {"latency_fraction": round(total() / base_total, 4), "target": o.target,
                       "bits": dict(choice),
                       "seconds": {n: {k: round(v, 7) for k, v in t.items()} for n, t in seconds.items()},
                       "sensitivity": {n: {k: round(v, 6) for k, v in t.items()} for n, t in sens.items()}})

