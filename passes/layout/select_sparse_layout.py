"""select-sparse-layout: for each masked linear weight (and, on the CPU, each masked pointwise conv), time
every candidate layout for that exact shape and block count on the target (through ctx.target's cost oracle,
cached), keep the fastest that beats dense by at least `min-speedup`, and rewrite the layer to graphopt::bsr_linear
(graphopt::bsr_conv1x1). int8 linears and pointwise convs (graphopt::qlinear / qconv2d after quantize + fold-qdq)
are measured the same way on the CPU (dense int8 vs the int8 CSR and BSR kernels); their graph stays as it is
(exact) and the CPU target reads the choice from graph.meta["sparse_layout"]. Never slower than dense: dense is
always measured."""
from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass, field

import torch
import torch.fx as fx

from graphopt.errors import GraphoptError
from graphopt.ir.graph import Graph
from graphopt.ir.precision import widen_half
from graphopt.ir.sparse_ops import layout_block, to_bsr
from graphopt.passes.canonicalize.fold_bn import fold_first
from graphopt.pm.options import was_given
from graphopt.pm.registry import Contract, Pass, PassContext, PassResult, register_pass

aten = torch.ops.aten


def _pointwise(node, first: int = 3, batched: bool = True) -> str:
    """Why a conv node is not a sparse pointwise conv candidate ("" when it is): 1x1, stride 1, no padding, no
    dilation, one group; batch 1 unless `batched` (the CPU kernels loop over samples, the GPU's 2:4 one does not).
    `first`: where stride is in the node's arguments (aten.conv2d: 3, graphopt.qconv2d: 6); the weight comes right
    before it (bias in between for aten.conv2d)."""
    args = list(node.args) + [None] * (first + 4 - len(node.args))
    stride, padding, dilation, groups = (args[first] or [1, 1], args[first + 1] or [0, 0], args[first + 2] or [1, 1],
                                         args[first + 3] or 1)
    w = node.args[1 if first == 3 else 3].meta["val"].shape
    x = node.args[0].meta["val"].shape
    if tuple(w[2:]) != (1, 1) or int(groups) != 1 or any(int(v) != 1 for v in stride) \
            or any(int(v) != 0 for v in padding) or any(int(v) != 1 for v in dilation):
        return "not a pointwise conv (sparse convs are 1x1, stride 1, no padding, one group)"
    if len(x) != 4 or (int(x[0]) != 1 and not batched):
        return f"input batch {int(x[0])}: the 2:4 pointwise kernel takes batch 1"
    return ""


class LayoutError(GraphoptError):
    """The layout pass cannot measure or rewrite; says what is missing."""


@register_pass
class SelectSparseLayout(Pass):
    name = "select-sparse-layout"
    summary = ("Measure dense vs CSR vs BSR kernels for each masked linear weight (and, on the CPU, "
               "pointwise conv and int8 linear) on the target and rewrite to the fastest sparse layout that beats "
               "dense by min-speedup (else keep dense); choices go to the manifest.")
    contract = Contract.EXACT

    @dataclass
    class Options:
        candidates: list[str] = field(default_factory=lambda: ["dense", "csr", "bsr4x4", "bsr1x16", "bsr8x1",
                                                               "bsr8x4", "bsr16x64"],
                                      metadata={"help": "layouts to measure: dense, csr, bsrRxC (R x C blocks) on "
                                                "the CPU (int8 linears and pointwise convs: csr, bsr8x4; int8 linears "
                                                "on CPUs with AMX tiles: bsr16x64 too); dense, sp24 (2:4 on sparse "
                                                "tensor cores) with target cuda, which is the default there. A "
                                                "block layout that would store 1/min-speedup of the weight or more "
                                                "is not measured"})
        min_speedup: float = field(default=1.1, metadata={
            "help": "a sparse layout must be at least this many times faster than dense to be chosen"})
        min_sparsity: float = field(default=0.5, metadata={
            "help": "weights with fewer zeros than this are not measured (dense)"})

        def validate(self) -> str:
            for c in self.candidates:
                if c == "sp24":
                    continue
                try:
                    layout_block(c)
                except ValueError as e:
                    return f"option 'candidates': {e}; or sp24 (2:4 on GPU sparse tensor cores, target cuda)"
            if not self.min_speedup >= 1.0:
                return f"option 'min-speedup' must be >= 1 (never slower than dense), got {self.min_speedup}"
            if not 0 <= self.min_sparsity < 1:
                return f"option 'min-sparsity' must be in [0, 1), got {self.min_sparsity}"
            return ""

    def run(self, graph: Graph, ctx: PassContext) -> PassResult:
        o = self.options
        oracle = ctx.target
        if ctx.onnx_export:
            raise LayoutError("select-sparse-layout chooses graphopt's sparse kernels, and an ONNX export has none "
                              "(ONNX stores the weights dense, with their zeros; ONNX Runtime runs them dense): drop "
                              "it from the pipeline, or compile for --target llvm / cuda-sparse")
        if oracle is None or not hasattr(oracle, "measure"):
            raise LayoutError("select-sparse-layout measures kernels on a target: call optimize(..., target='llvm') "
                              "or use graphopt compile/opt (they give the host CPU)")
        from tqdm.auto import tqdm
        gpu = "sp24" in getattr(oracle, "layouts", ())
        # the GPU's candidates when none are given (the CPU layouts' list had been an error with target cuda)
        candidates = ["dense", "sp24"] if gpu and not was_given(o, "candidates") else o.candidates
        if gpu and any(c not in ("dense", "sp24") for c in candidates):
            raise LayoutError("select-sparse-layout: with a cuda target the candidates are dense and sp24 (2:4 on "
                              "sparse tensor cores); csr/bsr kernels exist for the CPU (target llvm)")
        if not gpu and "sp24" in candidates:
            raise LayoutError("select-sparse-layout: candidate sp24 runs on GPU sparse tensor cores; optimize with "
                              "target='cuda' (graphopt opt/compile --target cuda-sparse)")
        source = "estimated (cost table, no GPU here)" if getattr(oracle, "estimated", False) else "measured"
        if not gpu:
            graph = widen_half(graph)  # (the CPU's sparse kernels are float32; float16 / bfloat16 graphs compute in it)
        # a batch norm after a layer this pass makes sparse could not fold into it any more and would run as its own
        # op (sparsify,select-sparse-layout on MobileNetV2 left 52): fold them first, as quantize does
        folded = fold_first(graph)

        choices, rewritten = {}, 0
        kinds = (aten.linear.default,) if gpu else (aten.linear.default, aten.conv2d.default)
        layers = [n for n in graph.gm.graph.nodes if n.op == "call_function" and n.target in kinds
                  and getattr(n.args[1], "op", None) == "get_attr" and n.args[1].target in graph.masks]
        int8_ops = (torch.ops.graphopt.qlinear.default, torch.ops.graphopt.qconv2d.default)
        if not gpu:  # int8 linears and convs (quantize + fold-qdq): their zeros are exact, with or without a mask
            layers += [n for n in graph.gm.graph.nodes if n.op == "call_function" and n.target in int8_ops
                       and getattr(n.args[3], "op", None) == "get_attr"]
        covered = {(n.args[3] if n.target in int8_ops else n.args[1]).target for n in layers}
        int8_chosen = 0
        stored: dict[tuple[str, str], tuple[fx.Node, fx.Node, fx.Node]] = {}  # (weight, layout) -> its arrays
        for node in tqdm(layers, desc="select-sparse-layout", unit="layer", leave=False):
            qconv = node.target is torch.ops.graphopt.qconv2d.default
            int8 = qconv or node.target is torch.ops.graphopt.qlinear.default
            wnode = node.args[3] if int8 else node.args[1]
            name = wnode.target
            w = graph.get_param(name)
            if not int8 and (not w.is_floating_point() or w.dtype != torch.float32):
                continue
            if int8 and (w.dtype != torch.int8 or w.dim() != (4 if qconv else 2)):
                continue
            conv = qconv or node.target is aten.conv2d.default
            sparsity = float((w == 0).float().mean())
            xshape = tuple(node.args[0].meta["val"].shape)
            if conv:  # [Cout, Cin, 1, 1] over [1, Cin, H, W]: an [Cout, Cin] weight times H*W pixel columns
                w = w.reshape(w.shape[0], -1)
                n, k = w.shape
                m = math.prod(xshape[2:])
            else:
                n, k = w.shape
                m = math.prod(xshape[:-1]) if len(xshape) > 1 else 1
            # estimated timings are relative (dense = 1), and say so
            op = ("q" if int8 else "") + ("conv1x1" if conv else "linear")
            rec = {"node": node.name, "op": op, "shape": [m, k, n],
                   "sparsity": round(sparsity, 4), "timings_us": {}, "choice": "dense", "timing_source": source}
            choices[name] = rec
            if sparsity < o.min_sparsity:
                rec["reason"] = f"sparsity {sparsity:.2f} < min-sparsity {o.min_sparsity}"
                continue
            why = _pointwise(node, 6 if qconv else 3, batched=not gpu) if conv else ""
            if why:
                rec["reason"] = why
                continue
            if gpu:  # the target says whether its 2:4 kernel can take this weight (passes never import targets)
                why = oracle.applies("sp24", w.detach().numpy())
                if why:
                    rec["reason"] = why
                    continue
            for lay in dict.fromkeys(["dense", *candidates]):
                block = None if lay == "sp24" else layout_block(lay)
                if block is not None and (n % block[0] or k % block[1]):
                    rec["timings_us"][lay] = None  # shape not divisible into these blocks
                    continue
                if block is not None and block != (1, 1):
                    kept = to_bsr(w, block).nnzb * block[0] * block[1] / (n * k)
                    if kept * o.min_speedup > 1:  # its kernel would have to beat dense's per stored weight
                        rec["timings_us"][lay] = None
                        rec.setdefault("not_measured", {})[lay] = (
                            f"{lay} would store {kept:.0%} of the weight (blocks with a nonzero): it cannot be "
                            f"min-speedup {o.min_speedup:g}x faster than dense")
                        continue
                why = oracle.applies(lay, w, op, tokens=m) if int8 and hasattr(oracle, "applies") else ""
                if why:  # no int8 kernel for this layout here (the target says why)
                    rec["timings_us"][lay] = None
                    rec.setdefault("not_measured", {})[lay] = why
                    continue
                rec["timings_us"][lay] = 0.0  # measured below
            todo = [lay for lay, t in rec["timings_us"].items() if t is not None]
            if hasattr(oracle, "measure_many"):  # one interleaved measurement of all candidates
                timed = oracle.measure_many(op, (m, k, n), todo, w)
            else:
                timed = {lay: oracle.measure(op, (m, k, n), lay, w) for lay in todo}
            for lay, t in timed.items():
                rec["timings_us"][lay] = round(t, 4) if source != "measured" else round(t * 1e6, 2)
            dense_t = rec["timings_us"]["dense"]
            sparse = {lay: t for lay, t in rec["timings_us"].items() if lay != "dense" and t is not None}
            if sparse:
                best = min(sparse, key=sparse.get)
                rec["best_speedup"] = round(dense_t / sparse[best], 3)
                if sparse[best] * o.min_speedup <= dense_t:
                    rec["choice"] = best
            if rec["choice"] in ("dense", "sp24"):
                continue  # sp24: the weight stays masked in the graph; the cuda-sparse target packs it
            s = to_bsr(w, layout_block(rec["choice"]))
            rec["stored_blocks"] = s.nnzb
            if int8:  # the int8 weight stays in the graph (exact as it is); the CPU target reads the choice
                int8_chosen += 1
                continue
            with graph.gm.graph.inserting_before(node):
                if (name, rec["choice"]) not in stored:  # (once for a weight several layers read: each had its own)
                    stored[name, rec["choice"]] = (graph.add_param(f"{name}_bsr_data", s.data, before=node),
                                                   graph.add_param(f"{name}_bsr_indices", s.indices, before=node),
                                                   graph.add_param(f"{name}_bsr_indptr", s.indptr, before=node))
                data, idx, ptr = stored[name, rec["choice"]]
                bias = node.args[2] if len(node.args) > 2 else None
                op = torch.ops.graphopt.bsr_conv1x1.default if conv else torch.ops.graphopt.bsr_linear.default
                new = graph.gm.graph.call_function(op, (node.args[0], data, idx, ptr, bias, int(n)))
            new.meta.update(node.meta)  # (its shape too: a layer right after it reads it before the refresh)
            node.replace_all_uses_with(new)
            graph.gm.graph.erase_node(node)
            rewritten += 1
        for node in graph.gm.graph.nodes:  # masked weights of ops no sparse kernel covers stay dense, and say why
            if node.op != "call_function" or node.target in kinds or node.target in int8_ops:
                continue
            for a in node.args:
                if getattr(a, "op", None) == "get_attr" and a.target in graph.masks and a.target not in covered:
                    covered.add(a.target)
                    kernels = "linear" if gpu else "linear and 1x1 conv2d"
                    choices[a.target] = {"node": node.name, "op": str(node.target), "choice": "dense",
                                         "timings_us": {}, "timing_source": source,
                                         "reason": f"no sparse kernel for {node.target} (they cover {kernels})"}
        if not choices:
            qdq = any(n.target is torch.ops.graphopt.dequantize_per_channel.default for n in graph.gm.graph.nodes)
            raise LayoutError("select-sparse-layout: no masked linear or conv weight in the graph; run sparsify, "
                              "sparsify-nm, lottery-ticket or rigl first" + (
                                  "; quantized weights are measured as the int8 layers fold-qdq makes of them "
                                  "(quantize,fold-qdq,select-sparse-layout)" if qdq and not gpu else ""))
        graph.gm.graph.eliminate_dead_code()
        graph.remove_unused_params()
        graph.meta.setdefault("sparse_layout", {}).update(choices)
        graph.refresh()
        on_tensor_cores = sum(1 for r in choices.values() if r["choice"] == "sp24")
        changed = rewritten + on_tensor_cores + int8_chosen > 0
        return PassResult(graph, changed or bool(folded),
                          {"rewritten": rewritten, "int8_sparse": int8_chosen, "sp24": on_tensor_cores, **folded,
                           "measured": len(choices), "choices": {k: v["choice"] for k, v in choices.items()}},
                          reason="" if changed else _unchanged_reason(choices))


def _unchanged_reason(choices: dict) -> str:
    """Why every layer stayed dense: measured slower, or skipped (below min-sparsity, no kernel, ...), by count."""
    skipped = [r["reason"] for r in choices.values() if r.get("reason")]
    timed = len(choices) - len(skipped)
    parts = [f"dense was fastest (or within min-speedup) for {timed} measured layer(s)"] if timed else []
    for why, count in sorted(Counter(r.split(" (")[0] for r in skipped).items()):
        parts.append(f"{count} layer(s): {why}")
    return "; ".join(parts)
